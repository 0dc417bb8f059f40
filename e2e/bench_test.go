package e2e

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestBenchMigrateVsRsync measures `skybridge migrate` against rsync over
// the same WireGuard mesh in the same run and prints a table: wall time,
// bytes through the tunnel and CPU per allocated GiB for raw and qcow2
// images (8 GiB virtual, 2 GiB allocated by default), the migration's rate
// on incompressible data against the overlay's own TCP throughput, the
// extra bytes a kill at 50 % costs, and the bytes a re-sync after a 1 %
// change sends. It is a benchmark, not a test: it runs only with
// SKYBRIDGE_BENCH=1 (see scripts/bench.sh) and asserts nothing about speed.
func TestBenchMigrateVsRsync(t *testing.T) {
	benchmarkOnly(t)
	l := newLab(t)
	defer l.dumpLogs()
	tool(t, "qemu-img")
	rsync := tool(t, "rsync")
	iperf := tool(t, "iperf3")
	src, err := os.ReadFile("../docs/examples/residency.hcl")
	if err != nil {
		t.Fatal(err)
	}
	_, sites := l.signedSites(src, [3]string{"swiss-banking-secret,pii-eu,risk-batch", "pii-eu,risk-batch", "risk-batch"})
	zrh, fra := sites[0], sites[1]
	l.startQuiet(zrh, 1)
	l.startQuiet(fra, 1)
	waitTunnel := func() {
		waitFor(t, 60*time.Second, "tunnel up", func() (bool, string) {
			st, err := status(zrh.socket)
			if err != nil {
				return false, err.Error()
			}
			p := st.peers()
			return slices.Contains(p, "gw-2"), fmt.Sprintf("peers %v", p)
		})
	}
	waitTunnel()

	const mib = 1 << 20
	size := int64(envInt("SKYBRIDGE_BENCH_GIB", 8)) << 30
	raw := filepath.Join(l.dir, "vm.raw")
	qcow := filepath.Join(l.dir, "vm.qcow2")
	// A 10 MiB block every 40 MiB: a quarter allocated, in a mix of
	// random, text-like and half-compressible data.
	genStart := time.Now()
	makeImage(t, raw, qcow, size, 40*mib, 10*mib)
	t.Logf("images made in %s", time.Since(genStart).Round(time.Millisecond))
	// All random: the migration's ceiling is then the tunnel itself.
	noise := filepath.Join(l.dir, "noise.raw")
	makeNoise(t, noise, min(size/8, 1<<30))

	// An rsync daemon and an iperf3 server in the destination site, on
	// its overlay address.
	mod := filepath.Join(l.dir, "rsync-dst")
	os.MkdirAll(mod, 0o755)
	conf := filepath.Join(l.dir, "rsyncd.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("use chroot = no\n[dst]\npath = %s\nread only = false\nuid = root\ngid = root\n", mod)), 0o644)
	daemon := l.start(fra.ns, "rsyncd", nil, rsync, "--daemon", "--no-detach", "--config", conf, "--address", fra.overlay, "--port", "8873")
	waitFor(t, 10*time.Second, "rsync daemon", func() (bool, string) {
		_, err := l.nsexec(zrh.ns, rsync, "rsync://"+fra.overlay+":8873/")
		return err == nil, fmt.Sprint(err)
	})
	l.start(fra.ns, "iperf3", nil, iperf, "-s", "-p", "5201")
	waitFor(t, 10*time.Second, "iperf3 server", func() (bool, string) {
		out, err := l.nsexec(zrh.ns, iperf, "-c", fra.overlay, "-p", "5201", "-n", "1K")
		return err == nil, out
	})

	type row struct {
		name          string
		wall          time.Duration
		wire, cpuSend float64
		cpuRecv       float64
		allocated     int64
		// The sending and receiving gateways' RSS in KiB as the row
		// starts (Go returns freed memory to the system slowly, so a row
		// starts from what the one before left) and at its peak. Not
		// printed for the resume row, whose sender is a new process.
		rssStart, rss []int64
	}
	var rows []row
	// CPU is counted on both sites for every tool alike: the gateway
	// processes (WireGuard's encryption runs there for everyone's
	// traffic), plus the tool's own processes (rsync's client is our
	// child, its daemon's connection handlers are the daemon's children).
	gwPID := func(s *meshSite) int { return s.gwCmd.Process.Pid }
	sendCPU := func() float64 { return cpuOf(gwPID(zrh)) + cpuSelfChildren() }
	recvCPU := func() float64 { return cpuOf(gwPID(fra)) + cpuOf(daemon.Process.Pid) }
	// Bytes through the tunnel are counted where they arrive: the
	// receiving gateway lives through the sender's kill below.
	wire := func() float64 { return float64(ifaceStat(t, l, fra, "rx_bytes")) }
	var allocated int64
	measure := func(name string, run func()) row {
		// Every tool starts with the disk idle: rsync -S leaves gigabytes
		// of dirty data not yet written back, which the next row's
		// writes would otherwise queue behind.
		syscall.Sync()
		w0 := wire()
		s0, r0 := sendCPU(), recvCPU()
		rssStart, stopRSS := peakRSS(t, gwPID(zrh), gwPID(fra))
		start := time.Now()
		run()
		wall := time.Since(start)
		rss := stopRSS()
		waitReaped(daemon.Process.Pid)
		r := row{name: name, wall: wall, wire: (wire() - w0) / mib, cpuSend: sendCPU() - s0, cpuRecv: recvCPU() - r0, allocated: allocated, rssStart: rssStart, rss: rss}
		t.Logf("%s: %.2f s, %.0f MiB through the tunnel", name, wall.Seconds(), r.wire)
		return r
	}
	// Each migration stores its image under its own name: the re-sync
	// below updates the measured raw row's.
	migrate := func(name, img, format string) func() {
		return func() {
			ch, cmd := startMigration(t, "migrate", "run", img, "--to", "aws-eu-central-1", "--class", "pii-eu", "--format", format, "--name", name, "--socket", zrh.socket)
			ev := lastEvent(t, ch, cmd)
			if ev.Record == nil || ev.Record.State != "done" {
				t.Fatalf("migration: %+v", ev)
			}
			allocated = ev.Record.Stats.AllocatedBytes
		}
	}
	// rsyncRun empties the destination as the row is built, before
	// measure: deleting the row before's 8 GiB sparse copy is not rsync's
	// work, and measure's sync then writes the deletion back before the
	// clock starts.
	rsyncRun := func(args ...string) func() {
		if err := os.RemoveAll(mod); err != nil {
			t.Fatalf("empty the rsync destination: %v", err)
		}
		os.MkdirAll(mod, 0o755)
		return func() {
			out, err := l.nsexec(zrh.ns, append([]string{rsync}, append(args, "rsync://"+fra.overlay+":8873/dst/")...)...)
			if err != nil {
				t.Fatalf("rsync: %v %s", err, out)
			}
		}
	}
	// SKYBRIDGE_BENCH_PERF samples both gateways through 10 s of a
	// migration of their own: where a migration's cycles go, WireGuard
	// included. Not a row of the table: perf slows what it watches.
	syscall.Sync()
	if stop, sampling := l.perfRecord("migrate raw", []int{gwPID(zrh), gwPID(fra)}, 10); sampling {
		migrate("bench-perf", raw, "raw")()
		stop()
	}
	rows = append(rows, measure("skybridge migrate raw → raw", migrate("bench-raw", raw, "raw")))
	rows = append(rows, measure("rsync -S raw", rsyncRun("-S", raw)))
	rows = append(rows, measure("rsync -Sz raw", rsyncRun("-Sz", raw)))
	rows = append(rows, measure("skybridge migrate qcow2 → qcow2", migrate("bench-qcow2", qcow, "qcow2")))
	rows = append(rows, measure("rsync -S qcow2", rsyncRun("-S", qcow)))
	rows = append(rows, measure("rsync -Sz qcow2", rsyncRun("-Sz", qcow)))
	imageAlloc := rows[0].allocated

	// The overlay's TCP throughput just before and just after a migration
	// of random data: one iperf3 run varies by a fifth from run to run
	// here, so the migration is compared with the mean of the two.
	overlay := func() float64 {
		bits, _, err := l.iperfTCP(zrh.ns, fra.overlay, 5)
		if err != nil {
			t.Fatal(err)
		}
		return bits / 8 / mib
	}
	before := overlay()
	noiseRow := measure("skybridge migrate, incompressible raw", migrate("bench-noise", noise, "raw"))
	after := overlay()
	overlayMiBs := (before + after) / 2
	noiseMiBs := float64(noiseRow.allocated) / mib / noiseRow.wall.Seconds()

	// Kill the sending gateway half-way, restart it, resume: what does
	// the interruption cost on the wire beyond a clean run's bytes?
	var resumeWire float64
	var resumed migrationStats
	resumeRow := measure("skybridge migrate raw, sender killed at 50 %, resumed", func() {
		ch, cmd := startMigration(t, "migrate", "run", raw, "--to", "aws-eu-central-1", "--class", "pii-eu", "--name", "bench-resume", "--socket", zrh.socket)
		id := ""
		for ev := range ch {
			id = ev.ID
			if p := ev.Progress; p != nil && p.Stats.Chunks > 0 && p.Stats.ChunksDone*2 >= p.Stats.Chunks {
				break
			}
		}
		zrh.gwCmd.Process.Signal(syscall.SIGKILL)
		zrh.gwCmd.Wait()
		cmd.Process.Kill()
		cmd.Wait()
		l.startQuiet(zrh, 2)
		waitTunnel()
		ch, cmd = startMigration(t, "migrate", "resume", id, "--socket", zrh.socket)
		ev := lastEvent(t, ch, cmd)
		if ev.Record == nil || ev.Record.State != "done" {
			t.Fatalf("resume: %+v", ev)
		}
		resumed = ev.Record.Stats
	})
	resumeWire = resumeRow.wire - rows[0].wire

	// Change 1 % of the image's allocated bytes, in 16 places, and
	// migrate it again to the destination that holds the old version.
	f, _ := os.OpenFile(raw, os.O_WRONLY, 0)
	change := imageAlloc / 100
	piece := make([]byte, change/16)
	for i := range int64(16) {
		rand.Read(piece)
		// Inside the allocated blocks: block k starts at k*40 MiB.
		blocks := size / (40 * mib)
		off := (i*blocks/16)*40*mib + (i%4)*mib
		f.WriteAt(piece, off)
	}
	f.Close()
	var resync migrationStats
	resyncRow := measure("skybridge re-sync after a 1 % change", func() {
		ch, cmd := startMigration(t, "migrate", "run", raw, "--to", "aws-eu-central-1", "--class", "pii-eu", "--format", "raw", "--name", "bench-raw", "--socket", zrh.socket)
		ev := lastEvent(t, ch, cmd)
		if ev.Record == nil || ev.Record.State != "done" {
			t.Fatalf("re-sync: %+v", ev)
		}
		resync = ev.Record.Stats
	})
	compareImages(t, raw, filepath.Join(fra.dir, "images", "bench-raw.raw"))

	var b strings.Builder
	fmt.Fprintf(&b, "\nimage: %d GiB virtual, %d MiB allocated (raw and qcow2), over one WireGuard tunnel (TUN mode) between two network namespaces\n\n", size>>30, imageAlloc>>20)
	fmt.Fprintf(&b, "| tool | wall s | MiB/s of allocated data | MiB through the tunnel | CPU s sender + receiver site | CPU s per allocated GiB | skybridge speed-up over the better rsync |\n|---|---|---|---|---|---|---|\n")
	// rows come in threes per format: skybridge, rsync -S, rsync -Sz.
	for i, r := range rows {
		cpu := r.cpuSend + r.cpuRecv
		speedup := ""
		if i%3 == 0 {
			better := min(rows[i+1].wall, rows[i+2].wall)
			speedup = fmt.Sprintf("%.1f×", better.Seconds()/r.wall.Seconds())
		}
		fmt.Fprintf(&b, "| %s | %.2f | %.0f | %.0f | %.2f + %.2f | %.2f | %s |\n", r.name, r.wall.Seconds(), float64(imageAlloc)/mib/r.wall.Seconds(),
			r.wire, r.cpuSend, r.cpuRecv, cpu/(float64(imageAlloc)/(1<<30)), speedup)
	}
	fmt.Fprintf(&b, "\n| measure | figure |\n|---|---|\n")
	fmt.Fprintf(&b, "| overlay TCP throughput (iperf3, same tunnel, 5 s before and after the next row) | %.0f MiB/s (%.0f and %.0f) |\n", overlayMiBs, before, after)
	fmt.Fprintf(&b, "| migration of %d MiB of random data | %.0f MiB/s = %.0f %% of the overlay; CPU %.2f s per GiB |\n", noiseRow.allocated>>20, noiseMiBs, 100*noiseMiBs/overlayMiBs,
		(noiseRow.cpuSend+noiseRow.cpuRecv)/(float64(noiseRow.allocated)/(1<<30)))
	rssOf := func(r row) string {
		return fmt.Sprintf("%.0f / %.0f MiB (from %.0f / %.0f)", float64(r.rss[0])/1024, float64(r.rss[1])/1024, float64(r.rssStart[0])/1024, float64(r.rssStart[1])/1024)
	}
	fmt.Fprintf(&b, "| the gateways' peak RSS, sender / receiver (TUN mode, one peer; from: as the row started) | raw → raw %s, qcow2 → qcow2 %s, random data %s |\n",
		rssOf(rows[0]), rssOf(rows[3]), rssOf(noiseRow))
	fmt.Fprintf(&b, "| sender killed at 50 %%, restarted, resumed | %.2f s in all; %.0f MiB through the tunnel vs %.0f MiB for a clean run (%+.0f MiB); the resume skipped %d of %d chunks unread |\n",
		resumeRow.wall.Seconds(), resumeRow.wire, rows[0].wire, resumeWire, resumed.ChunksResumed, resumed.Chunks)
	fmt.Fprintf(&b, "| re-sync after changing 1 %% of the allocated bytes (%d MiB in 16 places) | %d chunks sent, %.0f MiB raw = %.2f %% of the allocated bytes (%.2f %% of the virtual size), %.0f MiB through the tunnel, %.2f s; %d chunks reused |\n",
		change>>20, resync.ChunksSent, float64(resync.BytesRaw)/mib, 100*float64(resync.BytesRaw)/float64(imageAlloc), 100*float64(resync.BytesRaw)/float64(size), resyncRow.wire, resyncRow.wall.Seconds(), resync.ChunksSame)
	t.Log(b.String())
	fmt.Println(b.String())
}

// makeNoise writes a raw image that is entirely random data.
func makeNoise(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		rand.Read(buf)
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
			t.Fatal(err)
		}
	}
}

// ifaceStat is a counter of the site's WireGuard interface (tx_bytes,
// rx_bytes).
func ifaceStat(t *testing.T, l *lab, s *meshSite, stat string) int64 {
	out, err := l.nsexec(s.ns, "cat", "/sys/class/net/"+s.ifname+"/statistics/"+stat)
	if err != nil {
		t.Fatalf("%s: %v %s", stat, err, out)
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

// benchmarkOnly skips a benchmark unless SKYBRIDGE_BENCH is set: they
// print figures, take minutes, and are not part of the tests.
func benchmarkOnly(t *testing.T) {
	t.Helper()
	if os.Getenv("SKYBRIDGE_BENCH") == "" {
		t.Skip("benchmark: set SKYBRIDGE_BENCH=1 (scripts/bench.sh does)")
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// iperfTCP runs one iperf3 measurement from ns to an iperf3 server (port
// 5201) at addr for secs seconds after a first second left out (TCP's slow
// start), and returns what the server received: bits per second and bytes.
func (l *lab) iperfTCP(ns, addr string, secs int) (bitsPerSec, bytes float64, err error) {
	out, err := l.nsexec(ns, "iperf3", "-c", addr, "-p", "5201", "-t", strconv.Itoa(secs), "-O", "1", "-J")
	if err != nil {
		return 0, 0, fmt.Errorf("iperf3 to %s: %v\n%s", addr, err, out)
	}
	var rep struct {
		End struct {
			SumReceived struct {
				Bytes float64 `json:"bytes"`
				Bits  float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || rep.End.SumReceived.Bits == 0 {
		return 0, 0, fmt.Errorf("iperf3 report from %s: %v\n%s", addr, err, out)
	}
	return rep.End.SumReceived.Bits, rep.End.SumReceived.Bytes, nil
}
