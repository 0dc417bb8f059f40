package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBenchMigrateVsRsync measures `skybridge migrate` against rsync over
// the same WireGuard mesh in the same run and prints a table. It is a
// benchmark, not a test: it runs only with SKYBRIDGE_BENCH=1 (see
// scripts/bench.sh) and asserts nothing about speed.
func TestBenchMigrateVsRsync(t *testing.T) {
	if os.Getenv("SKYBRIDGE_BENCH") == "" {
		t.Skip("benchmark: set SKYBRIDGE_BENCH=1 (scripts/bench.sh does)")
	}
	l := newLab(t)
	defer l.dumpLogs()
	tool(t, "qemu-img")
	rsync := tool(t, "rsync")
	caDir := filepath.Join(l.dir, "ca")
	sb(t, 0, "ca", "init", "--dir", caDir)
	pol := filepath.Join(l.dir, "residency.hcl")
	src, _ := os.ReadFile("../docs/examples/residency.hcl")
	os.WriteFile(pol, src, 0o644)
	sb(t, 0, "policy", "sign", "--policy", pol, "--ca", caDir)
	sites := l.threeSites(caDir, pol, [3]string{"swiss-banking-secret,pii-eu,risk-batch", "pii-eu,risk-batch", "risk-batch"})
	zrh, fra := sites[0], sites[1]
	l.startGateway(zrh, 1)
	l.startGateway(fra, 1)
	waitFor(t, 60*time.Second, "tunnel up", func() (bool, string) {
		st, err := status(zrh.socket)
		if err != nil {
			return false, err.Error()
		}
		for _, m := range st.Members {
			if m.Node == "gw-2" && m.Peer {
				return true, ""
			}
		}
		return false, "no peer"
	})

	size := int64(2 << 30)
	if s := os.Getenv("SKYBRIDGE_BENCH_GIB"); s != "" {
		g, _ := strconv.Atoi(s)
		size = int64(g) << 30
	}
	raw := filepath.Join(l.dir, "vm.raw")
	qcow := filepath.Join(l.dir, "vm.qcow2")
	makeImage(t, raw, qcow, size, 100<<20, 10<<20)

	// An rsync daemon in the destination site, on its overlay address.
	mod := filepath.Join(l.dir, "rsync-dst")
	os.MkdirAll(mod, 0o755)
	conf := filepath.Join(l.dir, "rsyncd.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("use chroot = no\n[dst]\npath = %s\nread only = false\nuid = root\ngid = root\n", mod)), 0o644)
	daemon := l.start(fra.ns, "rsyncd", nil, rsync, "--daemon", "--no-detach", "--config", conf, "--address", fra.overlay, "--port", "8873")
	waitFor(t, 10*time.Second, "rsync daemon", func() (bool, string) {
		_, err := l.nsexec(zrh.ns, rsync, "rsync://"+fra.overlay+":8873/")
		return err == nil, fmt.Sprint(err)
	})

	type row struct {
		name          string
		wall          time.Duration
		wire, cpuSend float64
		cpuRecv       float64
	}
	var rows []row
	allocated := int64(0)
	// CPU is counted on both sites for every tool alike: the gateway
	// processes (WireGuard's encryption runs there for everyone's
	// traffic), plus the tool's own processes (rsync's client is our
	// child, its daemon's connection handlers are the daemon's children).
	gwPID := func(s *meshSite) int { return s.gwCmd.Process.Pid }
	sendCPU := func() float64 { return cpuOf(gwPID(zrh)) + cpuSelfChildren() }
	recvCPU := func() float64 { return cpuOf(gwPID(fra)) + cpuOf(daemon.Process.Pid) }
	measure := func(name string, run func()) {
		tx0 := ifaceTX(t, l, zrh)
		s0, r0 := sendCPU(), recvCPU()
		start := time.Now()
		run()
		wall := time.Since(start)
		waitReaped(daemon.Process.Pid)
		tx := ifaceTX(t, l, zrh) - tx0
		rows = append(rows, row{name: name, wall: wall, wire: float64(tx) / (1 << 20), cpuSend: sendCPU() - s0, cpuRecv: recvCPU() - r0})
	}
	n := 0
	migrate := func(img, format string) func() {
		return func() {
			n++
			ch, cmd := startMigration(t, "migrate", "run", img, "--to", "aws-eu-central-1", "--class", "pii-eu", "--format", format, "--name", fmt.Sprintf("bench%d", n), "--socket", zrh.socket)
			ev := lastEvent(t, ch, cmd)
			if ev.Record == nil || ev.Record.State != "done" {
				t.Fatalf("migration: %+v", ev)
			}
			allocated = ev.Record.Stats.AllocatedBytes
		}
	}
	rsyncRun := func(args ...string) func() {
		return func() {
			os.RemoveAll(mod)
			os.MkdirAll(mod, 0o755)
			out, err := l.nsexec(zrh.ns, append([]string{rsync}, append(args, "rsync://"+fra.overlay+":8873/dst/")...)...)
			if err != nil {
				t.Fatalf("rsync: %v %s", err, out)
			}
		}
	}
	measure("skybridge migrate raw → raw", migrate(raw, "raw"))
	measure("rsync -S raw", rsyncRun("-S", raw))
	measure("rsync -Sz raw", rsyncRun("-Sz", raw))
	measure("skybridge migrate qcow2 → qcow2", migrate(qcow, "qcow2"))
	measure("rsync -S qcow2", rsyncRun("-S", qcow))
	measure("rsync -Sz qcow2", rsyncRun("-Sz", qcow))

	var b strings.Builder
	fmt.Fprintf(&b, "\nimage: %d GiB virtual, %d MiB allocated (raw and qcow2), over one WireGuard tunnel (TUN mode) between two network namespaces\n\n", size>>30, allocated>>20)
	fmt.Fprintf(&b, "| tool | wall s | MiB/s of allocated data | MiB through the tunnel | CPU s sender + receiver site | CPU s per allocated GiB | skybridge speed-up over the better rsync |\n|---|---|---|---|---|---|---|\n")
	// rows come in threes per format: skybridge, rsync -S, rsync -Sz.
	for i, r := range rows {
		cpu := r.cpuSend + r.cpuRecv
		speedup := ""
		if i%3 == 0 {
			better := min(rows[i+1].wall, rows[i+2].wall)
			speedup = fmt.Sprintf("%.1f×", better.Seconds()/r.wall.Seconds())
		}
		fmt.Fprintf(&b, "| %s | %.2f | %.0f | %.0f | %.2f + %.2f | %.2f | %s |\n", r.name, r.wall.Seconds(), float64(allocated)/(1<<20)/r.wall.Seconds(),
			r.wire, r.cpuSend, r.cpuRecv, cpu/(float64(allocated)/(1<<30)), speedup)
	}
	t.Log(b.String())
	fmt.Println(b.String())
}

// ifaceTX is the bytes the site's WireGuard interface has sent.
func ifaceTX(t *testing.T, l *lab, s *meshSite) int64 {
	out, err := l.nsexec(s.ns, "cat", "/sys/class/net/"+s.ifname+"/statistics/tx_bytes")
	if err != nil {
		t.Fatalf("tx bytes: %v %s", err, out)
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	return n
}

// cpuOf is the user+system CPU seconds of a process and its reaped
// children, from /proc.
func cpuOf(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	var ticks float64
	for _, i := range []int{11, 12, 13, 14} { // utime stime cutime cstime
		v, _ := strconv.ParseFloat(f[i], 64)
		ticks += v
	}
	return ticks / 100 // USER_HZ
}

// waitReaped waits (briefly) until pid has reaped its children, so their
// CPU time is in its counters.
func waitReaped(pid int) {
	for range 50 {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		if err != nil || strings.TrimSpace(string(b)) == "" {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// cpuSelfChildren is the CPU of this process's reaped children.
func cpuSelfChildren() float64 { return cpuOf(os.Getpid()) - cpuSelf() }

func cpuSelf() float64 {
	b, _ := os.ReadFile("/proc/self/stat")
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (u + st) / 100
}
