package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A test lab: sites as network namespaces on one underlay segment (a
// bridge in a "wan" namespace), each running the real skybridge binary.
// Names carry a per-run ID, and everything is removed at the end, also
// when the test fails. When go test's -timeout kills the test binary no
// cleanup runs: its children die with it (childCommand), and the next
// run removes its namespaces and sockets (sweepLabs).

const helperEnv = "SKYBRIDGE_E2E_HELPER"

// runHelper is the test binary acting as a tiny network tool inside a
// namespace: "echo ADDR" serves TCP echo; "dial ADDR" sends a line and
// expects it back; "get URL TOKENFILE" prints what an HTTP GET with the
// bearer token returns (exit 3 on 401, 1 if unreachable); "stream ADDR
// SECONDS" keeps one TCP connection busy with a line every 20 ms for that
// long, expects every line back, and prints the longest wait for one;
// "reconnect ADDR SECONDS" does the same but, when the connection breaks,
// connects again (as a client of a failed-over service does) and prints
// the longest time between two echoed lines and the number of reconnects;
// "closed SRC ADDR" connects from SRC and waits up to 3 s for a byte: exit
// 0 if the server closes the connection unread, 3 if it holds it;
// "parent" starts `sleep 300` as the harness starts its children, prints
// its PID and waits: a test kills it to see the child go too.
func runHelper(h string) int {
	f := strings.Fields(h)
	switch f[0] {
	case "parent":
		c := childCommand("sleep", "300")
		if err := c.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println(c.Process.Pid)
		c.Wait()
		return 0
	case "echo":
		ln, err := net.Listen("tcp", f[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				return 1
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	case "dial":
		c, err := net.DialTimeout("tcp", f[1], 3*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		msg := "hello over skybridge\n"
		io.WriteString(c, msg)
		got, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || got != msg {
			fmt.Fprintln(os.Stderr, "echo mismatch:", got, err)
			return 1
		}
		return 0
	case "closed":
		d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(f[1])}}
		c, err := d.Dial("tcp", f[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err = c.Read(make([]byte, 1))
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			fmt.Println("held")
			return 3
		case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
			fmt.Println("closed")
			return 0
		}
		fmt.Fprintln(os.Stderr, "read:", err)
		return 1
	case "stream":
		secs, _ := strconv.Atoi(f[2])
		c, err := net.DialTimeout("tcp", f[1], 3*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer c.Close()
		r := bufio.NewReader(c)
		end := time.Now().Add(time.Duration(secs) * time.Second)
		var worst time.Duration
		for i := 0; time.Now().Before(end); i++ {
			msg := fmt.Sprintf("line %08d\n", i)
			sent := time.Now()
			c.SetDeadline(sent.Add(30 * time.Second))
			if _, err := io.WriteString(c, msg); err != nil {
				fmt.Fprintln(os.Stderr, "write:", err)
				return 1
			}
			got, err := r.ReadString('\n')
			if err != nil || got != msg {
				fmt.Fprintln(os.Stderr, "echo:", got, err)
				return 1
			}
			worst = max(worst, time.Since(sent))
			time.Sleep(20 * time.Millisecond)
		}
		fmt.Printf("lines=ok longest_ms=%d\n", worst.Milliseconds())
		return 0
	case "reconnect":
		secs, _ := strconv.Atoi(f[2])
		end := time.Now().Add(time.Duration(secs) * time.Second)
		var (
			c          net.Conn
			r          *bufio.Reader
			last       = time.Now()
			worst      time.Duration
			reconnects int
			ok         bool
		)
		for i := 0; time.Now().Before(end); i++ {
			if c == nil {
				var err error
				if c, err = net.DialTimeout("tcp", f[1], 500*time.Millisecond); err != nil {
					c = nil
					time.Sleep(100 * time.Millisecond)
					continue
				}
				r = bufio.NewReader(c)
				if i > 0 {
					reconnects++
				}
			}
			msg := fmt.Sprintf("line %08d\n", i)
			c.SetDeadline(time.Now().Add(time.Second))
			_, err := io.WriteString(c, msg)
			var got string
			if err == nil {
				got, err = r.ReadString('\n')
			}
			if err != nil || got != msg {
				c.Close()
				c, ok = nil, false
				continue
			}
			worst, last, ok = max(worst, time.Since(last)), time.Now(), true
			time.Sleep(20 * time.Millisecond)
		}
		fmt.Printf("longest_ms=%d reconnects=%d\n", worst.Milliseconds(), reconnects)
		if !ok {
			return 1
		}
		return 0
	case "get":
		tok, err := os.ReadFile(f[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		req, _ := http.NewRequest(http.MethodGet, f[1], nil)
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
		resp, err := (&http.Client{Timeout: 3 * time.Second}).Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer resp.Body.Close()
		io.Copy(os.Stdout, resp.Body)
		switch resp.StatusCode {
		case http.StatusOK:
			return 0
		case http.StatusUnauthorized:
			return 3
		}
		return 4
	}
	return 2
}

// requireRoot skips without root, except under CI where it must fail.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("this end-to-end test needs root (network namespaces, TUN); CI must run it as root")
		}
		t.Skip("needs root for network namespaces and TUN devices")
	}
	tool(t, "ip")
	tool(t, "wg")
	tool(t, "nft")
}

type lab struct {
	t      *testing.T
	id     string
	dir    string
	wan    string
	procs  []*exec.Cmd
	netnss []string
	// secrets the logs must not hold beyond those of the files in dir at
	// the end: tokens the test was given, keys of gateways that removed
	// them.
	secrets secretSet
}

func newLab(t *testing.T) *lab {
	requireRoot(t)
	b := make([]byte, 3)
	rand.Read(b)
	l := &lab{t: t, id: hex.EncodeToString(b), dir: t.TempDir()}
	l.wan = "sbw" + l.id
	t.Cleanup(l.cleanup)
	// Before any namespace: a run sweeping at the same time must find
	// the lab's owner alive, not take its namespaces for leftovers.
	if err := recordOwner(l.id); err != nil {
		t.Fatal(err)
	}
	l.ip("netns", "add", l.wan)
	l.netnss = append(l.netnss, l.wan)
	l.nsip(l.wan, "link", "add", "br0", "type", "bridge")
	l.nsip(l.wan, "link", "set", "br0", "up")
	l.nsip(l.wan, "link", "set", "lo", "up")
	return l
}

func (l *lab) cleanup() {
	for _, p := range l.procs {
		if p.Process != nil && p.ProcessState == nil {
			p.Process.Signal(syscall.SIGKILL)
			p.Wait()
		}
	}
	// Every process has stopped: its log is complete.
	noSecretsInLogs(l.t, l.dir, &l.secrets)
	for _, ns := range l.netnss {
		exec.Command("ip", "netns", "del", ns).Run()
	}
	// Gateways killed with SIGKILL leave their UAPI sockets behind.
	socks, _ := filepath.Glob("/var/run/wireguard/sb" + l.id + "*.sock")
	for _, s := range socks {
		os.Remove(s)
	}
	// No namespace of this run may survive.
	out, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(out), l.id) {
		l.t.Errorf("namespaces left behind: %s", out)
		return // the record lets the next run remove them
	}
	os.Remove(filepath.Join(labRuns, l.id))
}

// childCommand is exec.Command for a process the harness starts: it is
// killed when the test binary dies. go test's -timeout ends the binary
// with a panic that runs no cleanup, and gateways and helpers otherwise
// ran on under PID 1, holding their namespaces.
//
// The kernel sends the signal when the thread that forked the child
// ends, not the process. Go ends a thread only when a goroutine locked
// to it (runtime.LockOSThread) returns without unlocking it, and nothing
// in this package locks one, so the threads, and the children, live as
// long as the binary; locking the thread around each start would buy
// nothing more.
func childCommand(name string, args ...string) *exec.Cmd {
	c := exec.Command(name, args...)
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return c
}

func (l *lab) run(name string, args ...string) string {
	l.t.Helper()
	out, err := childCommand(name, args...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (l *lab) ip(args ...string) string { l.t.Helper(); return l.run("ip", args...) }

func (l *lab) nsip(ns string, args ...string) string {
	l.t.Helper()
	return l.run("ip", append([]string{"-n", ns}, args...)...)
}

func (l *lab) nsexec(ns string, args ...string) (string, error) {
	out, err := childCommand("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	return string(out), err
}

// waitConnected waits until a TCP connection to port is established from
// ns: a load must be running before the event it is to live through.
func (l *lab) waitConnected(ns string, port int) {
	l.t.Helper()
	waitFor(l.t, 30*time.Second, fmt.Sprintf("a TCP connection to port %d from %s", port, ns), func() (bool, string) {
		out, err := l.nsexec(ns, "ss", "-Htn", "state", "established", fmt.Sprintf("( dport = :%d )", port))
		return err == nil && strings.TrimSpace(out) != "", strings.TrimSpace(out)
	})
}

// addHost makes a namespace attached to the underlay with addr/24.
func (l *lab) addHost(short, addr string) string {
	ns := "sb" + short + l.id
	l.ip("netns", "add", ns)
	l.netnss = append(l.netnss, ns)
	in, out := "u"+short+l.id, "w"+short+l.id
	l.ip("link", "add", in, "netns", ns, "type", "veth", "peer", "name", out, "netns", l.wan)
	l.nsip(l.wan, "link", "set", out, "master", "br0")
	l.nsip(l.wan, "link", "set", out, "up")
	l.nsip(ns, "link", "set", "lo", "up")
	l.nsip(ns, "link", "set", in, "mtu", "1500")
	l.nsip(ns, "addr", "add", addr+"/24", "dev", in)
	l.nsip(ns, "link", "set", in, "up")
	return ns
}

// start runs a process in ns, logging to a file kept for failures.
func (l *lab) start(ns, logName string, env []string, args ...string) *exec.Cmd {
	l.t.Helper()
	logf, err := os.Create(filepath.Join(l.dir, logName+".log"))
	if err != nil {
		l.t.Fatal(err)
	}
	cmd := childCommand("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	l.procs = append(l.procs, cmd)
	l.t.Cleanup(func() { logf.Close() })
	return cmd
}

// dumpLogs prints the gateways' logs when the test failed.
func (l *lab) dumpLogs() { logTails(l.t, filepath.Join(l.dir, "*.log")) }

// logTails prints the end of the logs that match pattern when the test
// failed: what a gateway saw is what explains a failure seen only in CI.
func logTails(t *testing.T, pattern string) {
	if !t.Failed() {
		return
	}
	files, _ := filepath.Glob(pattern)
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if len(b) > 20000 {
			b = b[len(b)-20000:]
		}
		t.Logf("==== %s (tail)\n%s", f, b)
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	last := ""
	for {
		ok, state := cond()
		if ok {
			return time.Since(start)
		}
		last = state
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; last state: %s", what, timeout, last)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// wgPeer is a line of `wg show IF dump`.
type wgPeer struct {
	PublicKey  string
	Endpoint   string
	AllowedIPs []string
	Handshake  int64
	Rx, Tx     int64
}

func (l *lab) wgDump(ns, ifname string) (map[string]wgPeer, error) {
	out, err := l.nsexec(ns, "wg", "show", ifname, "dump")
	if err != nil {
		return nil, fmt.Errorf("wg show: %v: %s", err, out)
	}
	peers := map[string]wgPeer{}
	sc := bufio.NewScanner(strings.NewReader(out))
	first := true
	for sc.Scan() {
		if first {
			first = false
			continue
		}
		f := strings.Split(sc.Text(), "\t")
		if len(f) < 8 {
			continue
		}
		p := wgPeer{PublicKey: f[0], Endpoint: f[2]}
		if f[3] != "(none)" {
			p.AllowedIPs = strings.Split(f[3], ",")
		}
		p.Handshake, _ = strconv.ParseInt(f[4], 10, 64)
		p.Rx, _ = strconv.ParseInt(f[5], 10, 64)
		p.Tx, _ = strconv.ParseInt(f[6], 10, 64)
		peers[p.PublicKey] = p
	}
	return peers, nil
}

// status asks a gateway for its status through the real CLI.
func status(socket string) (*gwStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, skybridge, "status", "--socket", socket, "--json").Output()
	if err != nil {
		return nil, err
	}
	var st gwStatus
	return &st, json.Unmarshal(out, &st)
}

type gwStatus struct {
	Node        string              `json:"node"`
	PublicKey   string              `json:"public_key"`
	Policy      string              `json:"policy"`
	Operator    string              `json:"operator"`
	Carriers    map[string]string   `json:"carriers"`
	Unreachable []string            `json:"unreachable"`
	Held        map[string][]string `json:"held"`
	Members     []struct {
		Node      string `json:"node"`
		State     string `json:"state"`
		Peer      bool   `json:"peer"`
		PublicKey string `json:"public_key"`
		Reason    string `json:"reason"`
	} `json:"members"`
}

// peers names the members configured as WireGuard peers.
func (st *gwStatus) peers() []string {
	var out []string
	for _, m := range st.Members {
		if m.Peer {
			out = append(out, m.Node)
		}
	}
	return out
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
