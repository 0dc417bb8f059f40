package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBenchDataPlane measures TCP throughput between two sites (network
// namespaces on a 1500-byte underlay) in one run: over the raw underlay,
// over the skybridge overlay (the real gateway binary in TUN mode), and
// over two reference WireGuard implementations on the same underlay —
// the upstream wireguard-go binary built from the module version
// skybridge embeds, and Debian's wireguard-go. It prints a table of
// medians and ratios. A benchmark, not a test: it runs only with
// SKYBRIDGE_BENCH=1 and asserts nothing about speed.
//
// The upstream binary comes from SKYBRIDGE_WG_UPSTREAM (scripts/bench.sh
// builds it with `go install golang.zx2c4.com/wireguard@VERSION`); a
// reference that is missing is reported as such, not silently dropped.
func TestBenchDataPlane(t *testing.T) {
	benchmarkOnly(t)
	l := newLab(t)
	defer l.dumpLogs()
	iperf := tool(t, "iperf3")
	_, sites := l.signedSites([]byte(policyV1), [3]string{"pii-eu,risk-batch", "pii-eu,risk-batch", "risk-batch"})
	a, b := sites[0], sites[1]
	l.startQuiet(a, 1)
	l.startQuiet(b, 1)

	type variant struct {
		name, addr string
		pids       func() []int // processes doing the WireGuard work
	}
	variants := []variant{
		{name: "raw veth underlay (MTU 1500)", addr: b.underlay, pids: func() []int { return nil }},
		{name: "skybridge overlay (TUN, embedded wireguard-go)", addr: b.overlay, pids: func() []int {
			return []int{a.gwCmd.Process.Pid, b.gwCmd.Process.Pid}
		}},
	}
	refs := []struct{ name, bin, short string }{
		{"upstream wireguard-go binary, same module version", os.Getenv("SKYBRIDGE_WG_UPSTREAM"), "u"},
		{"Debian wireguard-go " + debianWGVersion(), "/usr/bin/wireguard-go", "d"},
	}
	var missing []string
	for i, r := range refs {
		if r.bin == "" {
			missing = append(missing, r.name+": not built (set SKYBRIDGE_WG_UPSTREAM)")
			continue
		}
		if _, err := os.Stat(r.bin); err != nil {
			missing = append(missing, r.name+": "+err.Error())
			continue
		}
		pa, pb := l.plainWireGuard(r.bin, r.short, i+1, a, b)
		variants = append(variants, variant{name: r.name, addr: fmt.Sprintf("10.250.%d.2", i+1), pids: func() []int {
			return []int{pa.Process.Pid, pb.Process.Pid}
		}})
	}
	// Every path is ready when a tiny iperf3 run gets through it.
	l.start(b.ns, "iperf3-server", nil, iperf, "-s", "-p", "5201")
	for _, v := range variants {
		waitFor(t, 60*time.Second, "path "+v.name, func() (bool, string) {
			out, err := l.nsexec(a.ns, iperf, "-c", v.addr, "-p", "5201", "-n", "1K", "--connect-timeout", "1000")
			return err == nil, out
		})
	}

	secs := envInt("SKYBRIDGE_BENCH_SECONDS", 5)
	rounds := envInt("SKYBRIDGE_BENCH_ROUNDS", 3)
	// SKYBRIDGE_BENCH_PERF profiles each WireGuard variant through a round
	// of its own, not recorded: perf slows what it watches, and raw veth
	// has no process to watch, so a profiled round among the recorded ones
	// skewed the medians and the ratios to raw veth.
	for _, v := range variants {
		if stop, sampling := l.perfRecord(v.name, v.pids(), secs); sampling {
			_, _, err := l.iperfTCP(a.ns, v.addr, secs)
			stop()
			if err != nil {
				t.Fatalf("%s, profiled: %v", v.name, err)
			}
		}
	}

	type result struct{ gbits, cpuPerGB []float64 }
	res := make([]result, len(variants))
	// Rounds interleave the variants so that drift on a shared machine
	// hits them all alike.
	for round := range rounds {
		for i, v := range variants {
			var cpu0 float64
			for _, p := range v.pids() {
				cpu0 += cpuOf(p)
			}
			bits, bytes, err := l.iperfTCP(a.ns, v.addr, secs)
			if err != nil {
				t.Fatalf("%s: %v", v.name, err)
			}
			var cpu float64
			for _, p := range v.pids() {
				cpu += cpuOf(p)
			}
			gb := bytes / 1e9
			res[i].gbits = append(res[i].gbits, bits/1e9)
			if len(v.pids()) > 0 {
				// The omitted first second is not in Bytes but is in the
				// CPU delta; scale the bytes up to the whole run.
				gb *= float64(secs+1) / float64(secs)
				res[i].cpuPerGB = append(res[i].cpuPerGB, (cpu-cpu0)/gb)
			}
			t.Logf("round %d: %s: %.2f Gbit/s", round+1, v.name, bits/1e9)
		}
	}

	med := func(xs []float64) float64 {
		if len(xs) == 0 {
			return 0
		}
		s := slices.Clone(xs)
		slices.Sort(s)
		return s[len(s)/2]
	}
	raw := med(res[0].gbits)
	ref := 0.0
	if len(variants) > 2 && strings.HasPrefix(variants[2].name, "upstream") {
		ref = med(res[2].gbits)
	}
	var tb strings.Builder
	fmt.Fprintf(&tb, "\nTCP throughput between two namespaces, iperf3 -t %d, %d interleaved rounds (median, min–max)\n\n", secs, rounds)
	fmt.Fprintf(&tb, "| path | Gbit/s | of raw veth | vs upstream binary | WireGuard CPU s per GB, both ends |\n|---|---|---|---|---|\n")
	for i, v := range variants {
		m := med(res[i].gbits)
		vsRef, cpu := "", ""
		if ref > 0 && i > 0 {
			vsRef = fmt.Sprintf("%.2f×", m/ref)
		}
		if len(res[i].cpuPerGB) > 0 {
			cpu = fmt.Sprintf("%.2f", med(res[i].cpuPerGB))
		}
		fmt.Fprintf(&tb, "| %s | %.2f (%.2f–%.2f) | %.2f | %s | %s |\n", v.name, m, slices.Min(res[i].gbits), slices.Max(res[i].gbits), m/raw, vsRef, cpu)
	}
	for _, m := range missing {
		fmt.Fprintf(&tb, "| %s | — | | | |\n", m)
	}
	t.Log(tb.String())
	fmt.Println(tb.String())
}

// plainWireGuard runs a stand-alone wireguard-go binary in both sites and
// configures one tunnel between them with wg(8) and ip(8), the way its
// users do: overlay 10.250.n.1 ↔ 10.250.n.2, UDP port 51820+n, MTU 1420
// (the same as skybridge's default).
func (l *lab) plainWireGuard(bin, short string, n int, a, b *meshSite) (*exec.Cmd, *exec.Cmd) {
	l.t.Helper()
	type end struct {
		s                *meshSite
		key, pub, ifname string
		cmd              *exec.Cmd
		addr, udp        string
	}
	ends := []*end{{s: a}, {s: b}}
	for i, e := range ends {
		// UAPI sockets live in the shared /var/run/wireguard, so the two
		// ends need distinct interface names even in distinct namespaces.
		e.ifname = fmt.Sprintf("wg%s%s%d", short, l.id, i)
		l.t.Cleanup(func() { os.Remove("/var/run/wireguard/" + e.ifname + ".sock") })
		key, err := exec.Command("wg", "genkey").Output()
		if err != nil {
			l.t.Fatalf("wg genkey: %v", err)
		}
		e.key = filepath.Join(l.dir, fmt.Sprintf("%s%d.key", short, i))
		if err := os.WriteFile(e.key, key, 0o600); err != nil {
			l.t.Fatal(err)
		}
		cmd := exec.Command("wg", "pubkey")
		cmd.Stdin = strings.NewReader(string(key))
		pub, err := cmd.Output()
		if err != nil {
			l.t.Fatalf("wg pubkey: %v", err)
		}
		e.pub = strings.TrimSpace(string(pub))
		e.addr = fmt.Sprintf("10.250.%d.%d", n, i+1)
		e.udp = fmt.Sprintf("%s:%d", e.s.underlay, 51820+n)
		e.cmd = l.start(e.s.ns, fmt.Sprintf("wg%s-%d", short, i), []string{"LOG_LEVEL=error"}, bin, "-f", e.ifname)
	}
	for i, e := range ends {
		peer := ends[1-i]
		waitFor(l.t, 10*time.Second, "interface "+e.ifname, func() (bool, string) {
			out, err := l.nsexec(e.s.ns, "wg", "show", e.ifname)
			return err == nil, out
		})
		if out, err := l.nsexec(e.s.ns, "wg", "set", e.ifname, "private-key", e.key, "listen-port", strconv.Itoa(51820+n),
			"peer", peer.pub, "allowed-ips", peer.addr+"/32", "endpoint", peer.udp); err != nil {
			l.t.Fatalf("wg set: %v %s", err, out)
		}
		l.nsip(e.s.ns, "addr", "add", e.addr+"/24", "dev", e.ifname)
		l.nsip(e.s.ns, "link", "set", e.ifname, "mtu", "1420", "up")
	}
	return ends[0].cmd, ends[1].cmd
}

// perfRecord samples, when SKYBRIDGE_BENCH_PERF names a directory, the
// processes pids (a variant's WireGuard ends, two gateways) with perf(1)
// for secs, and prints the hottest functions when stopped: where the
// cycles go. sampling is false when it does not (no directory named, no
// perf, no process), so that work done only to be sampled, and left out
// of the figures, can be skipped.
func (l *lab) perfRecord(name string, pids []int, secs int) (stop func(), sampling bool) {
	dir := os.Getenv("SKYBRIDGE_BENCH_PERF")
	if dir == "" || len(pids) == 0 {
		return func() {}, false
	}
	perf, err := exec.LookPath("perf")
	if err != nil {
		l.t.Logf("SKYBRIDGE_BENCH_PERF: %v (Debian package linux-perf)", err)
		return func() {}, false
	}
	var ps []string
	for _, p := range pids {
		ps = append(ps, strconv.Itoa(p))
	}
	file := filepath.Join(dir, strings.Fields(name)[0]+".perf.data")
	cmd := exec.Command(perf, "record", "-e", "cpu-clock", "-F", "999", "-g", "-o", file, "-p", strings.Join(ps, ","), "--", "sleep", strconv.Itoa(secs))
	if err := cmd.Start(); err != nil {
		l.t.Logf("perf record: %v", err)
		return func() {}, false
	}
	return func() {
		cmd.Wait()
		out, err := exec.Command(perf, "report", "-i", file, "--no-children", "--sort", "comm,symbol", "--percent-limit", "1.5", "--stdio", "-g", "none").CombinedOutput()
		if err != nil {
			l.t.Logf("perf report: %v", err)
		}
		fmt.Printf("\n== where the cycles go: %s (perf, both ends)\n%s\n", name, out)
	}, true
}

func debianWGVersion() string {
	out, err := exec.Command("/usr/bin/wireguard-go", "--version").Output()
	if err != nil {
		return ""
	}
	f := strings.Fields(string(out))
	if len(f) >= 2 {
		return f[1]
	}
	return ""
}
