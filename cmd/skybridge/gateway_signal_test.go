package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/freeport"
)

// realProcess is `skybridge args…` as a process of its own: the test
// binary running the real command (TestMain), not the idle stand-in that
// "gateway" otherwise starts.
func realProcess(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "SKYBRIDGE_TEST_MAIN=1")
	return cmd
}

// netstackGateway writes the identity and configuration of a netstack
// gateway on loopback (no root, no TUN) and returns its configuration
// file and state directory.
func netstackGateway(t *testing.T) (cfg, state string) {
	t.Helper()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	state = filepath.Join(dir, "state")
	mustRun(t, issueArgs(ca, filepath.Join(state, "identity"), "gw1", "100.96.0.1")...)
	ports, err := freeport.Loopback(2)
	if err != nil {
		t.Fatal(err)
	}
	cfg = gatewayConfigWith(t, dir, fmt.Sprintf(`gossip {
  bind    = "127.0.0.1:%d"
  profile = "local"
}
wireguard {
  interface  = "sbsig0"
  port       = %d
  mode       = "netstack"
  behind_nat = true
}
operator { listen = "127.0.0.1:0" }
`, ports[0], ports[1]), fmt.Sprintf("identity { dir = %q }\n", filepath.Join(state, "identity")))
	return cfg, state
}

// runningGateway starts `gateway run` with its log on a pipe and returns
// once the gateway says it runs, with the pipe's reader (the caller keeps
// reading it or closes it) and a channel that gets its exit.
func runningGateway(t *testing.T, cfg string) (*exec.Cmd, *os.File, <-chan error) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := realProcess("gateway", "run", "--config", cfg)
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	done := make(chan error, 1)
	exited := make(chan struct{})
	go func() { done <- cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited; r.Close() })
	running := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if strings.Contains(sc.Text(), `msg="gateway running"`) {
				close(running)
				return
			}
		}
	}()
	select {
	case <-running:
	case err := <-done:
		t.Fatalf("the gateway exited before it ran: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the gateway did not start within 30 s")
	}
	return cmd, r, done
}

// exitOf waits for the process's exit.
func exitOf(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("the gateway did not exit within 30 s")
		return nil
	}
}

// stoppedGracefully checks what only the gateway's own stop does: exit 0,
// its control socket removed, its membership saved. (Its leave notice and
// the routes it holds go with that stop.)
func stoppedGracefully(t *testing.T, err error, state string) {
	t.Helper()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			t.Errorf("the gateway was killed by %v, without its stop", ws.Signal())
		} else {
			t.Errorf("the gateway exited: %v; want 0", err)
		}
	}
	if _, err := os.Lstat(filepath.Join(state, "control.sock")); err == nil {
		t.Error("its control socket was left behind")
	}
	if _, err := os.Stat(filepath.Join(state, "members.json")); err != nil {
		t.Errorf("its membership was not saved: %v", err)
	}
}

// hangupIgnored says whether this process ignores SIGHUP, as the kernel
// has it (/proc/self/status), which its children inherit: under nohup. Not
// signal.Ignored: once an earlier test's command (run in-process) asked
// for SIGHUP and let it go, Go restores the ignoring it found at start but
// no longer reports it.
func hangupIgnored(t *testing.T) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if mask, ok := strings.CutPrefix(line, "SigIgn:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(mask), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return m&(1<<(syscall.SIGHUP-1)) != 0
		}
	}
	t.Fatal("no SigIgn in /proc/self/status")
	return false
}

// TestGatewayStopsOnHangup: SIGHUP (a closed terminal or ssh session, a
// `kill -HUP` meant as "reload") stops the gateway as SIGTERM does, and a
// second one during the stop does not cut it short. It killed it outright: no leave notice, and in TUN mode the routes into
// the interface gone with it, the mesh's traffic then sent by the host's
// other routes, in clear.
func TestGatewayStopsOnHangup(t *testing.T) {
	if hangupIgnored(t) {
		t.Skip("run under nohup: the gateway inherits SIGHUP ignored, and keeps it so")
	}
	cfg, state := netstackGateway(t)
	cmd, r, done := runningGateway(t, cfg)
	stopping := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "gateway stopping") {
				close(stopping)
				break
			}
		}
		io.Copy(io.Discard, r)
	}()
	cmd.Process.Signal(syscall.SIGHUP) // the shell's
	select {
	case <-stopping:
	case <-time.After(30 * time.Second):
		t.Fatal("the gateway did not begin its stop within 30 s of a hangup")
	}
	// A closed terminal hangs up twice: the kernel's, as the shell exits,
	// comes during the stop, and must not end it.
	cmd.Process.Signal(syscall.SIGHUP)
	stoppedGracefully(t, exitOf(t, done), state)
}

// TestGatewayOutlivesItsLogReader: the reader of the gateway's log (`|
// tee`, ended by the same Ctrl-C; a log shipper restarted) gone, the next
// SIGTERM still stops the gateway as it should. Its stop's first log line
// killed it with SIGPIPE.
func TestGatewayOutlivesItsLogReader(t *testing.T) {
	cfg, state := netstackGateway(t)
	cmd, r, done := runningGateway(t, cfg)
	r.Close()
	cmd.Process.Signal(syscall.SIGTERM)
	stoppedGracefully(t, exitOf(t, done), state)
}

// TestGatewayStoppedWhileStarting: a stop asked for while the gateway
// waits for Vault at start (one that accepts connections and never
// answers) exits 0, as a stop once it runs does; it exited 1 with
// "context canceled", and a supervisor counted `systemctl stop` a failure.
func TestGatewayStoppedWhileStarting(t *testing.T) {
	dir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	asked := make(chan struct{})
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if held = append(held, c); len(held) == 1 {
				close(asked)
			}
		}
	}()
	tok := filepath.Join(dir, "vault-token")
	if err := os.WriteFile(tok, []byte("s.token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := gatewayConfig(t, dir, fmt.Sprintf(`identity {
  backend   = "vault"
  mesh_cidr = "100.96.0.0/16"
  vault {
    address  = "http://%s"
    pki_role = "gw"
    auth {
      method     = "token"
      token_file = %q
    }
  }
}
`, ln.Addr(), tok))
	var stderr strings.Builder
	cmd := realProcess("gateway", "run", "--config", cfg)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	exited := make(chan struct{})
	go func() { done <- cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	select {
	case <-asked: // waiting for Vault
	case err := <-done:
		t.Fatalf("the gateway exited before it asked Vault: %v\n%s", err, stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatal("the gateway did not ask Vault within 30 s")
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := exitOf(t, done); err != nil {
		t.Errorf("stopped while it waited for Vault: %v; want exit 0\n%s", err, stderr.String())
	}
}
