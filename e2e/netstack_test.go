package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/freeport"
)

// TestNetstackMeshUnprivileged runs three gateways in netstack mode on
// loopback, as an unprivileged user when the test runs as root: no TUN, no
// root, real memberlist and real WireGuard handshakes between them.
func TestNetstackMeshUnprivileged(t *testing.T) {
	// Not t.TempDir: its parent is private to root, and the gateways run
	// as nobody.
	dir, err := os.MkdirTemp("", "skybridge-netstack-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	caDir := filepath.Join(dir, "ca")
	sb(t, 0, "ca", "init", "--dir", caDir)
	// Ports freeport finds free in its own band, not a fixed range: the
	// unit tests of other packages run at the same time and probe ports
	// from 20000 up.
	ports, err := freeport.Loopback(7)
	if err != nil {
		t.Fatal(err)
	}
	gossip, wg, enroll := ports[:3], ports[3:6], ports[6]
	var cmds []*exec.Cmd
	var sockets []string
	t.Cleanup(func() {
		// A gateway that does not stop must not hang the test until go
		// test's -timeout ends the binary, with no cleanup and no word of
		// which gateway it was: killed, and the test fails saying so.
		for _, c := range cmds {
			c.Process.Signal(syscall.SIGTERM)
		}
		const stopWithin = 20 * time.Second // a stop waits for no peer: seconds under -race
		deadline := time.Now().Add(stopWithin)
		for i, c := range cmds {
			exited := make(chan struct{})
			go func() { c.Wait(); close(exited) }()
			select {
			case <-exited:
			case <-time.After(time.Until(deadline)):
				c.Process.Kill()
				<-exited
				t.Errorf("gateway %d did not stop within %s of SIGTERM: killed; its log says where it stuck", i+1, stopWithin)
				logTails(t, filepath.Join(dir, fmt.Sprintf("gw%d.log", i+1)))
			}
		}
		noSecretsInLogs(t, dir, nil)
	})
	asNobody := os.Geteuid() == 0
	if asNobody {
		os.Chmod(dir, 0o755)
		os.Chmod(filepath.Dir(skybridge), 0o755)
	}
	// The first gateway holds the CA, as the gateway that opens burst
	// sites does: the keyring `ca issue` hands out must rotate with it.
	// The third, issued offline for a minute, renews through it.
	identity := func(i int) (string, string) {
		switch i {
		case 1:
			return fmt.Sprintf("  ca_dir = %q\n", caDir), fmt.Sprintf("127.0.0.1:%d", enroll)
		case 3:
			return fmt.Sprintf("  renew_from = [\"127.0.0.1:%d\"]\n", enroll), "off"
		}
		return "", "off"
	}
	for i := 1; i <= 3; i++ {
		ttl := "720h"
		if i == 3 {
			ttl = "60s"
		}
		sb(t, 0, "ca", "issue", "--ca", caDir, "--node", fmt.Sprintf("ns-%d", i), "--site", fmt.Sprintf("site-%d", i), "--region", "r",
			"--provider", "onprem", "--jurisdiction", "CH", "--overlay-ip", fmt.Sprintf("100.96.1.%d", i), "--ttl", ttl, "--out", filepath.Join(dir, fmt.Sprintf("gw%d", i), "identity"))
	}
	if asNobody {
		chownR(t, caDir, 65534)
	}
	for i := 1; i <= 3; i++ {
		sdir := filepath.Join(dir, fmt.Sprintf("gw%d", i))
		cfg := filepath.Join(dir, fmt.Sprintf("gw%d.hcl", i))
		idExtra, enrollListen := identity(i)
		os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir = %q
node {
  name         = "ns-%d"
  site         = "site-%d"
  region       = "r"
  provider     = "onprem"
  jurisdiction = "CH"
  overlay_ip   = "100.96.1.%d"
}
identity {
  dir = %q
%s}
enroll { listen = %q }
gossip {
  bind    = "127.0.0.1:%d"
  seeds   = ["127.0.0.1:%d"]
  profile = "local"
}
wireguard {
  interface  = "sbns%d"
  port       = %d
  mode       = "netstack"
  behind_nat = true
}
operator { listen = "127.0.0.1:0" }
`, sdir, i, i, i, filepath.Join(sdir, "identity"), idExtra, enrollListen, gossip[i-1], gossip[0], i, wg[i-1])), 0o644)
		args := []string{skybridge, "gateway", "run", "--config", cfg}
		if asNobody {
			chownR(t, sdir, 65534)
			// Its own parent-death signal: the kernel clears the one
			// childCommand sets when setpriv changes its user.
			args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--pdeathsig=KILL"}, args...)
		}
		logf, _ := os.Create(filepath.Join(dir, fmt.Sprintf("gw%d.log", i)))
		c := childCommand(args[0], args[1:]...)
		c.Stdout, c.Stderr = logf, logf
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, c)
		sockets = append(sockets, filepath.Join(sdir, "control.sock"))
	}
	defer logTails(t, filepath.Join(dir, "*.log"))
	waitFor(t, 60*time.Second, "netstack gateways handshake with each other", func() (bool, string) {
		var state []string
		ok := true
		for i, s := range sockets {
			st, err := statusAs(s, asNobody)
			if err != nil {
				return false, err.Error()
			}
			var hs []string
			for _, m := range st.Members {
				if m.Peer && m.Handshake != "" && !strings.HasPrefix(m.Handshake, "0001") {
					hs = append(hs, m.Node)
				}
			}
			slices.Sort(hs)
			state = append(state, fmt.Sprintf("%d:%v", i+1, hs))
			if len(hs) != 2 {
				ok = false
			}
		}
		return ok, strings.Join(state, " ")
	})

	peerOf := func(sock, node string) (bool, error) {
		st, err := statusAs(sock, asNobody)
		if err != nil {
			return false, err
		}
		for _, m := range st.Members {
			if m.Node == node && m.Peer {
				return true, nil
			}
		}
		return false, nil
	}
	// The gateway issued offline for a minute has renewed its certificate
	// through the one holding the CA by about 40 s in (two thirds of its
	// life, counted from a minute back), and its tunnels stayed.
	first, err := statusAs(sockets[2], asNobody)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "ns-3 renews its certificate through ns-1 (identity.renew_from)", func() (bool, string) {
		st, err := statusAs(sockets[2], asNobody)
		if err != nil {
			return false, err.Error()
		}
		peer, _ := peerOf(sockets[0], "ns-3")
		return st.Identity.Serial != first.Identity.Serial && st.Identity.Issuer == "renew_from" && peer,
			fmt.Sprintf("serial %s (issuer %q)", st.Identity.Serial, st.Identity.Issuer)
	})

	// The gossip key rotates on every gateway, from one of them, without a
	// restart, and the mesh keeps gossiping under the new key.
	before := map[string]bool{}
	for i := 1; i <= 3; i++ {
		b, _ := os.ReadFile(filepath.Join(dir, fmt.Sprintf("gw%d", i), "identity", "gossip.keyring"))
		before[string(b)] = true
	}
	rot := []string{skybridge, "keys", "rotate-gossip", "--socket", sockets[0]}
	if asNobody {
		rot = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"}, rot...)
	}
	if out, err := exec.Command(rot[0], rot[1:]...).CombinedOutput(); err != nil || !strings.Contains(string(out), "rotated on 2 other gateways") {
		t.Fatalf("keys rotate-gossip: %v\n%s", err, out)
	}
	var after string
	for i := 1; i <= 3; i++ {
		b, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("gw%d", i), "identity", "gossip.keyring"))
		if err != nil {
			t.Fatal(err)
		}
		keys := 0
		for _, line := range strings.Split(string(b), "\n") {
			if line != "" && !strings.HasPrefix(line, "#") {
				keys++
			}
		}
		if before[string(b)] || keys != 1 || (after != "" && string(b) != after) {
			t.Fatalf("gateway %d keyring after rotation (%d keys, unchanged=%v):\n%s", i, keys, before[string(b)], b)
		}
		after = string(b)
	}
	if b, err := os.ReadFile(filepath.Join(caDir, "gossip.keyring")); err != nil || string(b) != after {
		t.Fatalf("the CA directory's keyring, which ca issue hands out, after rotation: %v\n%s", err, b)
	}
	// Gossip still works under the new key: a gateway that leaves and
	// comes back (reading the new key from its file) is taken back by the
	// others, which only gossip with the new key now.
	cmds[2].Process.Signal(syscall.SIGTERM)
	cmds[2].Wait()
	waitFor(t, 30*time.Second, "ns-1 drops the departed ns-3", func() (bool, string) {
		// A status that fails says nothing of ns-1's peers.
		peer, err := peerOf(sockets[0], "ns-3")
		if err != nil {
			return false, err.Error()
		}
		return !peer, "ns-3 still a peer"
	})
	c := childCommand(cmds[2].Args[0], cmds[2].Args[1:]...)
	c.Stdout, c.Stderr = cmds[2].Stdout, cmds[2].Stderr
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	cmds[2] = c
	waitFor(t, 30*time.Second, "ns-1 takes ns-3 back, gossiping under the new key", func() (bool, string) {
		peer, err := peerOf(sockets[0], "ns-3")
		return peer, fmt.Sprint(err)
	})
}

func chownR(t *testing.T, dir string, uid int) {
	t.Helper()
	filepath.Walk(dir, func(p string, _ os.FileInfo, _ error) error { return os.Lchown(p, uid, uid) })
}

// statusAs queries a control socket, as the unprivileged gateway's user
// when it runs as one (the socket is 0600: nobody else may).
func statusAs(socket string, asNobody bool) (*netstackStatus, error) {
	args := []string{skybridge, "status", "--socket", socket, "--json"}
	if asNobody {
		args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"}, args...)
	}
	out, err := exec.Command(args[0], args[1:]...).Output()
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	var st netstackStatus
	return &st, jsonUnmarshal(out, &st)
}

type netstackStatus struct {
	Mode     string `json:"mode"`
	Identity struct {
		Serial string `json:"serial"`
		Issuer string `json:"issuer"`
	} `json:"identity"`
	Members []struct {
		Node      string `json:"node"`
		Peer      bool   `json:"peer"`
		Handshake string `json:"last_handshake"`
	} `json:"members"`
}
