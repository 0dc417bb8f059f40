package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/freeport"
)

// TestBenchFootprint measures what one gateway costs its host: RSS and CPU
// of a real `skybridge gateway` process that has 100 gateways in its mesh
// (99 WireGuard peers), at idle and while it sends a VM image to one of
// them. The 100 gateways are real processes in netstack mode on loopback
// (memberlist's LAN profile as tuned for production, real WireGuard).
// A benchmark, not a test: it runs only with SKYBRIDGE_BENCH=1.
func TestBenchFootprint(t *testing.T) {
	benchmarkOnly(t)
	tool(t, "qemu-img")
	n := envInt("SKYBRIDGE_BENCH_GATEWAYS", 100)
	idle := time.Duration(envInt("SKYBRIDGE_BENCH_IDLE_SECONDS", 30)) * time.Second
	const settle = 10 * time.Second
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	sb(t, 0, "ca", "init", "--dir", caDir)
	pol := filepath.Join(dir, "residency.hcl")
	os.WriteFile(pol, []byte(policyV1), 0o644)
	sb(t, 0, "policy", "sign", "--policy", pol, "--ca", caDir)

	// Each gateway's gossip and WireGuard ports, in freeport's band.
	ports, err := freeport.Loopback(2 * n)
	if err != nil {
		t.Fatal(err)
	}
	gossipPort := func(i int) int { return ports[2*i] }
	type gw struct {
		cmd          *exec.Cmd
		socket, name string
	}
	gws := make([]*gw, n)
	t.Cleanup(func() {
		for _, g := range gws {
			if g != nil && g.cmd.ProcessState == nil {
				g.cmd.Process.Signal(syscall.SIGKILL)
				g.cmd.Wait()
			}
		}
	})
	for i := range n {
		name := fmt.Sprintf("fp-%03d", i+1)
		sdir := filepath.Join(dir, name)
		overlay := fmt.Sprintf("100.96.%d.%d", 20+(i+1)/250, (i+1)%250+1)
		site := fmt.Sprintf("site-%03d", i+1)
		sb(t, 0, "ca", "issue", "--ca", caDir, "--node", name, "--site", site, "--region", "r", "--provider", "onprem",
			"--jurisdiction", "CH", "--overlay-ip", overlay, "--label", "classes=risk-batch", "--out", filepath.Join(sdir, "identity"))
		cfg := filepath.Join(dir, name+".hcl")
		os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir = %q
node {
  name         = %q
  site         = %q
  region       = "r"
  provider     = "onprem"
  jurisdiction = "CH"
  overlay_ip   = %q
  labels       = { classes = "risk-batch" }
}
identity {
  dir = %q
}
policy {
  file = %q
}
gossip {
  bind  = "127.0.0.1:%d"
  seeds = ["127.0.0.1:%d", "127.0.0.1:%d"]
}
wireguard {
  interface = "fp%d"
  port      = %d
  mode      = "netstack"
}
operator { listen = "127.0.0.1:0" }
`, sdir, name, site, overlay, filepath.Join(sdir, "identity"), pol, gossipPort(i), gossipPort(0), gossipPort(1), i, ports[2*i+1])), 0o644)
		logf, err := os.Create(filepath.Join(dir, name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		c := childCommand(skybridge, "gateway", "run", "--config", cfg)
		c.Stdout, c.Stderr = logf, logf
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		gws[i] = &gw{cmd: c, socket: filepath.Join(sdir, "control.sock"), name: name}
	}
	peers := func(g *gw) int {
		st, err := status(g.socket)
		if err != nil {
			return -1
		}
		return len(st.peers())
	}
	// Every gateway, not only the measured one: while others still join,
	// their gossip reaches it too. Each is asked until it has all its
	// peers, then the next (a pass over all of them is 100 CLI runs).
	complete := 0
	conv := waitFor(t, 3*time.Minute, fmt.Sprintf("all %d gateways peered", n), func() (bool, string) {
		for complete < n {
			p := peers(gws[complete])
			if p != n-1 {
				return false, fmt.Sprintf("%d gateways have all %d peers; %s has %d", complete, n-1, gws[complete].name, p)
			}
			complete++
		}
		return true, ""
	})
	t.Logf("%d gateway processes: all have their %d peers %s after start", n, n-1, conv.Round(time.Millisecond))
	// Then the joins' gossip is left to die down, as the scale benchmark
	// does (mesh/scale_test.go, settle): retransmissions and newcomers'
	// follow-up exchanges go on for seconds after the last peer is
	// configured, and would be counted as idle.
	time.Sleep(settle)

	one, two := gws[0].cmd.Process.Pid, gws[1].cmd.Process.Pid
	cpuAll := func() float64 {
		var s float64
		for _, g := range gws {
			s += cpuOf(g.cmd.Process.Pid)
		}
		return s
	}
	c1, call := cpuOf(one), cpuAll()
	time.Sleep(idle) // the measurement window
	idleCPU := (cpuOf(one) - c1) / idle.Seconds()
	idleAll := (cpuAll() - call) / idle.Seconds() / float64(n)
	rssOne := procKiB(one, "VmRSS")
	var rss []int64
	for _, g := range gws {
		rss = append(rss, procKiB(g.cmd.Process.Pid, "VmRSS"))
	}
	slices.Sort(rss)

	// A migration from the first gateway to the second, with peak RSS
	// sampled on both.
	raw := filepath.Join(dir, "vm.raw")
	qcow := filepath.Join(dir, "vm.qcow2")
	size := int64(envInt("SKYBRIDGE_BENCH_FOOTPRINT_GIB", 4)) << 30
	makeImage(t, raw, qcow, size, 40<<20, 10<<20)
	_, stopRSS := peakRSS(t, one, two)
	s1, s2 := cpuOf(one), cpuOf(two)
	start := time.Now()
	ch, cmd := startMigration(t, "migrate", "run", raw, "--to", "site-002", "--class", "risk-batch", "--socket", gws[0].socket)
	ev := lastEvent(t, ch, cmd)
	wall := time.Since(start)
	peak := stopRSS()
	if ev.Record == nil || ev.Record.State != "done" {
		t.Fatalf("migration: %+v", ev)
	}
	alloc := float64(ev.Record.Stats.AllocatedBytes)
	sendCPU, recvCPU := cpuOf(one)-s1, cpuOf(two)-s2

	var b strings.Builder
	fmt.Fprintf(&b, "\n%d gateway processes (netstack mode, loopback); the measured gateway has %d WireGuard peers\n\n", n, n-1)
	fmt.Fprintf(&b, "| state | RSS | CPU |\n|---|---|---|\n")
	fmt.Fprintf(&b, "| idle, %s window | %.1f MiB (all %d gateways: median %.1f MiB, max %.1f MiB) | %.2f %% of a core (mean of all gateways %.2f %%) |\n",
		idle, float64(rssOne)/1024, n, float64(rss[len(rss)/2])/1024, float64(rss[len(rss)-1])/1024, 100*idleCPU, 100*idleAll)
	fmt.Fprintf(&b, "| sending a %d MiB-allocated image (%.1f s, %.0f MiB/s) | peak %.1f MiB | %.2f cores (%.2f s per allocated GiB) |\n",
		int64(alloc)>>20, wall.Seconds(), alloc/(1<<20)/wall.Seconds(), float64(peak[0])/1024, sendCPU/wall.Seconds(), sendCPU/(alloc/(1<<30)))
	fmt.Fprintf(&b, "| receiving it | peak %.1f MiB | %.2f cores (%.2f s per allocated GiB) |\n",
		float64(peak[1])/1024, recvCPU/wall.Seconds(), recvCPU/(alloc/(1<<30)))
	t.Log(b.String())
	fmt.Println(b.String())
}

// peakRSS has the kernel start afresh its record of each process's peak
// resident set (VmHWM, reset through clear_refs) and returns each one's
// RSS now, in KiB, and a stop that reads the peaks since (in the order
// of pids; 0 for a process that has gone).
func peakRSS(t *testing.T, pids ...int) (start []int64, stop func() []int64) {
	t.Helper()
	for _, p := range pids {
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", p), []byte("5"), 0); err != nil {
			t.Fatalf("reset the peak RSS of process %d: %v", p, err)
		}
		start = append(start, procKiB(p, "VmRSS"))
	}
	return start, func() []int64 {
		peaks := make([]int64, len(pids))
		for i, p := range pids {
			peaks[i] = procKiB(p, "VmHWM")
		}
		return peaks
	}
}

// procKiB reads a "kB" field of /proc/PID/status (VmRSS, VmHWM).
func procKiB(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			v, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return v
		}
	}
	return 0
}
