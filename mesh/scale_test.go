package mesh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/freeport"
)

// TestScaleConvergence is the mesh-scale benchmark of docs/BENCHMARKS.md:
// N gateways in one process — real memberlist over loopback, real
// signature verification (each advert verified once per process: the
// gateways share a verification cache), real topology and reconciliation
// into devices that record the configuration. It measures convergence
// after the last join, the removal of a crashed gateway, CPU, memory and
// gossip traffic, and the same of plain memberlist instances at each size
// in the same run as the reference (SKYBRIDGE_BENCH_REFERENCE=0 skips
// it). It runs only with SKYBRIDGE_BENCH_SCALE=1 (sizes in
// SKYBRIDGE_BENCH_SIZES, default 10,100,300,1000).
func TestScaleConvergence(t *testing.T) {
	if os.Getenv("SKYBRIDGE_BENCH_SCALE") == "" {
		t.Skip("benchmark: set SKYBRIDGE_BENCH_SCALE=1 (scripts/bench.sh does)")
	}
	sizes := []int{10, 100, 300, 1000}
	if s := os.Getenv("SKYBRIDGE_BENCH_SIZES"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, _ := strconv.Atoi(f)
			sizes = append(sizes, n)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n| members | what | sequential joins took | CPU per join until converged (whole process) | converge after last join | crash removed everywhere | CPU per member (steady) | heap per member | gossip per member |\n|---|---|---|---|---|---|---|---|---|\n")
	row := func(n int, what string, r scaleResult) {
		if r.note != "" {
			fmt.Fprintf(&b, "| %d | %s | %s | | | | | | |\n", n, what, r.note)
			return
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %.0f ms | %s | %s | %.2f %% of a core | %s | %.1f KB/s |\n", n, what, r.joins.Round(10*time.Millisecond), 1000*r.joinCPU, r.converge.Round(time.Millisecond),
			r.crash.Round(time.Millisecond), r.cpuPct, kib(r.heap), r.gossipBps/1000)
	}
	for _, n := range sizes {
		row(n, "skybridge gateways", runScale(t, n))
		if os.Getenv("SKYBRIDGE_BENCH_REFERENCE") != "0" {
			row(n, "reference: plain memberlist, DefaultLANConfig", runPlainScale(t, n))
		}
	}
	t.Log(b.String())
	fmt.Println(b.String())
}

// A size that cannot join or converge within these budgets on the
// machine at hand is reported as such rather than waited for. Where joins
// stall on two cores, gateways and reference alike, the stall begins
// within the first 20 s and a slow crawl follows (175–212 of 300 gateways
// and 260–279 reference instances after 2 minutes); one minute keeps the
// whole suite within 20.
const (
	joinBudget = time.Minute
	waitBudget = 90 * time.Second
	// settle is how long the joins' gossip is left to die down after
	// convergence; steadyWindow is how long steady state is then measured.
	settle       = 10 * time.Second
	steadyWindow = 10 * time.Second
)

type scaleResult struct {
	note            string        // why the run stopped short, if it did
	joins           time.Duration // from the first member's start to the last one's join
	joinCPU         float64       // CPU seconds the process spent per join, from the first join to convergence
	converge, crash time.Duration
	cpuPct          float64 // percent of one core per member
	heap            uint64  // bytes per member
	gossipBps       float64 // gossip bytes per second per member
}

func kib(n uint64) string { return fmt.Sprintf("%.0f KiB", float64(n)/1024) }

type simGateway struct {
	g        *Gateway
	dev      *RecordingDevice
	key      wgtypes.Key
	endpoint netip.AddrPort // the one it is given to advertise
	cancel   context.CancelFunc
	done     chan struct{}
	// The last check of the device, valid while it applies nothing new.
	checked struct {
		applies int
		exclude wgtypes.Key
		ok      bool
	}
}

// countingTransport counts the gossip bytes a reference member sends: UDP
// packets, and both directions of the streams it dials (push/pull). The
// gateways' own transport counts its traffic (gossipTraffic).
type countingTransport struct {
	memberlist.NodeAwareTransport
	n *atomic.Int64
}

func (t countingTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	t.n.Add(int64(len(b)))
	return t.NodeAwareTransport.WriteToAddress(b, a)
}

func (t countingTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

func (t countingTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	c, err := t.NodeAwareTransport.DialAddressTimeout(a, timeout)
	if err != nil {
		return nil, err
	}
	return countingConn{Conn: c, sent: t.n, received: t.n}, nil
}

func (t countingTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

// provisionGateway issues attrs an identity valid for ttl, stores it in
// idDir with the mesh's trust bundle and gossip keyring, as `skybridge ca
// issue --out` would, and returns the node block that asks for it.
func provisionGateway(t testing.TB, ca *certs.CA, tb *certs.TrustBundle, attrs certs.Attributes, ttl time.Duration, idDir string) certs.NodeConfig {
	t.Helper()
	id, err := ca.IssueIdentity(attrs, ttl, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := id.Save(idDir, tb); err != nil {
		t.Fatal(err)
	}
	if err := ca.CopyGossipKeyring(context.Background(), idDir); err != nil {
		t.Fatal(err)
	}
	return attrs.NodeConfig()
}

// loopbackPort is a port of 127.0.0.1 free for both UDP and TCP, never
// handed out before in this process, from below the kernel's ephemeral
// range (so no outgoing stream takes it before the gateway binds it).
func loopbackPort(t testing.TB) int {
	p, err := freeport.Loopback(1)
	if err != nil {
		t.Fatal(err)
	}
	return p[0]
}

func runScale(t *testing.T, n int) scaleResult {
	base := "/dev/shm"
	if _, err := os.Stat(base); err != nil {
		base = ""
	}
	dir, err := os.MkdirTemp(base, "skybridge-scale-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ca := meshCA(t, dir)
	tb, _ := ca.TrustBundle()
	cache := certs.NewVerifyCache()
	log := slog.New(slog.DiscardHandler)
	if f := os.Getenv("SKYBRIDGE_BENCH_LOG"); f != "" {
		lf, err := os.Create(f)
		if err != nil {
			t.Fatal(err)
		}
		defer lf.Close()
		log = slog.New(slog.NewTextHandler(lf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}

	sims := make([]*simGateway, n)
	var seeds []string
	setup := time.Now()
	for i := range n {
		node := fmt.Sprintf("gw%04d", i)
		gdir := filepath.Join(dir, node)
		overlay := netip.AddrFrom4([4]byte{100, 64 + byte(i/65536), byte(i / 256 % 256), byte(i % 256)}).Next()
		route := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i / 256), byte(i % 256), 0}), 24)
		attrs := certs.Attributes{Node: node, Site: "site-" + node, Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: overlay, Routes: []netip.Prefix{route}}
		idDir := filepath.Join(gdir, "identity")
		nodeCfg := provisionGateway(t, ca, tb, attrs, 24*time.Hour, idDir)
		port := loopbackPort(t)
		ap := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
		if i < 3 {
			seeds = append(seeds, ap.String())
		}
		s := &Settings{
			StateDir: gdir, Identity: certs.Config{Dir: idDir},
			Node:       nodeCfg,
			GossipBind: ap, GossipAdvertise: ap, Seeds: seeds, GossipProfile: "lan",
			Interface: "sim", Port: port, MTU: DefaultMTU, Endpoints: []netip.AddrPort{ap}, Topology: TopologyFullMesh,
		}
		dev := NewRecordingDevice(node)
		g, err := newGateway(context.Background(), s, log, options{
			device: dev, noControl: true, noMigrations: true, cache: cache, tune: scaleTuning,
		})
		if err != nil {
			t.Fatal(err)
		}
		sims[i] = &simGateway{g: g, dev: dev, key: wgtypes.Key(g.wgKey.Public()), endpoint: ap, done: make(chan struct{})}
	}
	t.Logf("N=%d: %d identities and gateways prepared in %s", n, n, time.Since(setup).Round(time.Millisecond))
	defer func() {
		stopping := time.Now()
		defer func() { t.Logf("N=%d: gateways stopped in %s", n, time.Since(stopping).Round(time.Millisecond)) }()
		var wg sync.WaitGroup
		for _, s := range sims {
			if s.cancel != nil {
				s.cancel()
				wg.Go(func() { <-s.done })
			}
		}
		wg.Wait()
	}()

	if f := os.Getenv("SKYBRIDGE_BENCH_PPROF"); f != "" && n == maxSize() {
		pf, _ := os.Create(f)
		pprof.StartCPUProfile(pf)
		// At most a minute: enough to see where the time goes, and the
		// profile is written even if the run is cut short.
		stop := sync.OnceFunc(func() { pprof.StopCPUProfile(); pf.Close() })
		time.AfterFunc(time.Minute, stop)
		defer stop()
	}
	// Join one after the other, as gateways coming up.
	joinStart, cpuStart := time.Now(), processCPU()
	var r scaleResult
	for i, s := range sims {
		if time.Since(joinStart) > joinBudget {
			r.note = fmt.Sprintf("only %d of %d joined within %s", i, n, joinBudget)
			t.Logf("N=%d: %s", n, r.note)
			return r
		}
		if debug && i%25 == 0 {
			t.Logf("joining: %d up after %s, CPU %.1f s", i, time.Since(joinStart).Round(time.Millisecond), processCPU())
		}
		ctx, cancel := context.WithCancel(context.Background())
		s.cancel = cancel
		runErr := make(chan error, 1)
		go func() { runErr <- s.g.Run(ctx); close(s.done) }()
		select {
		case <-s.g.joined:
		case err := <-runErr:
			t.Fatalf("N=%d: gateway %s stopped: %v", n, s.g.s.Node.Name, err)
		case <-time.After(time.Until(joinStart.Add(joinBudget))):
			r.note = fmt.Sprintf("only %d of %d joined within %s", i, n, joinBudget)
			t.Logf("N=%d: %s", n, r.note)
			return r
		}
	}
	lastJoin := time.Now()
	// Complete and correct: every other live gateway is a peer, at the
	// endpoint it advertises (its gossip address, whose port is its
	// WireGuard port here), with exactly its overlay address and its
	// site's route.
	var check func(*simGateway, map[wgtypes.Key]wgtypes.Peer, wgtypes.Key) bool
	type wantPeer struct {
		allowed  [2]netip.Prefix
		endpoint netip.AddrPort
	}
	want := make(map[wgtypes.Key]wantPeer, n)
	for _, s := range sims {
		a := s.g.id.Load().Attributes()
		want[s.key] = wantPeer{[2]netip.Prefix{netip.PrefixFrom(a.OverlayIP, 32), a.Routes[0]}, s.endpoint}
	}
	complete := func(s *simGateway, exclude wgtypes.Key) bool {
		return s.dev.Check(func(peers map[wgtypes.Key]wgtypes.Peer, applies int) bool {
			if applies == s.checked.applies && exclude == s.checked.exclude {
				return s.checked.ok
			}
			ok := check(s, peers, exclude)
			s.checked.applies, s.checked.exclude, s.checked.ok = applies, exclude, ok
			return ok
		})
	}
	check = func(s *simGateway, peers map[wgtypes.Key]wgtypes.Peer, exclude wgtypes.Key) bool {
		wantN := n - 1
		if exclude != (wgtypes.Key{}) {
			if _, ok := peers[exclude]; ok {
				return false
			}
			if s.key != exclude {
				wantN = n - 2
			}
		}
		if len(peers) != wantN {
			return false
		}
		for k, p := range peers {
			w, ok := want[k]
			if !ok || k == s.key || len(p.AllowedIPs) != 2 || !sameEndpoint(p.Endpoint, w.endpoint) {
				return false
			}
			for _, ip := range p.AllowedIPs {
				pf, _ := netip.AddrFromSlice(ip.IP)
				ones, _ := ip.Mask.Size()
				if q := netip.PrefixFrom(pf.Unmap(), ones); q != w.allowed[0] && q != w.allowed[1] {
					return false
				}
			}
		}
		return true
	}
	// done counts the gateways whose configuration is complete, and in
	// debug runs describes one that is not.
	done := func(exclude wgtypes.Key, skip int) func(bool) int {
		return func(describe bool) int {
			count := 0
			var inc *simGateway
			for i, s := range sims {
				if i == skip || complete(s, exclude) {
					count++
				} else {
					inc = s
				}
			}
			if describe && inc != nil {
				states := map[MemberState]int{}
				for _, m := range inc.g.members.snapshot() {
					states[m.State]++
				}
				known := map[string]bool{}
				for _, m := range inc.g.ml.Members() {
					known[m.Name] = true
				}
				var missing []string
				for i, s := range sims {
					if i != skip && !known[s.g.s.Node.Name] && len(missing) < 5 {
						missing = append(missing, s.g.s.Node.Name)
					}
				}
				t.Logf("%s sees %v, memberlist %d (missing %v), peers %d", inc.g.s.Node.Name, states, inc.g.ml.NumMembers(), missing, len(inc.dev.Peers()))
			}
			return count
		}
	}
	r.joins = lastJoin.Sub(joinStart)
	if _, r.note = awaitAll(t, "convergence", n, done(wgtypes.Key{}, -1)); r.note != "" {
		return r
	}
	r.converge = time.Since(lastJoin)
	r.joinCPU = (processCPU() - cpuStart) / float64(n)
	// What the gateways send, streams counted at both ends: every byte of
	// gossip once, as the reference's count below has it.
	r.measureSteady(n, func() (sent int64) {
		for _, s := range sims {
			sent += s.g.traffic.packetBytesSent.Load() + s.g.traffic.streamBytesSent.Load()
		}
		return sent
	})

	// Crash one gateway (not a seed): no leave, it just stops.
	victim := n / 2
	sims[victim].g.crash()
	if r.crash, r.note = awaitAll(t, "crash removal", n, done(sims[victim].key, victim)); r.note != "" {
		return r
	}
	t.Logf("N=%d: converged %s after the last join; crash removed everywhere in %s", n, r.converge.Round(time.Millisecond), r.crash.Round(time.Millisecond))
	return r
}

var debug = os.Getenv("SKYBRIDGE_BENCH_DEBUG") != ""

// runPlainScale is the reference for runScale, measured the same way in the
// same run: n plain memberlist instances with memberlist.DefaultLANConfig
// (no encryption, no metadata, no delegate), each joining through the
// first three in random order until one answers, as the gateways do. "Converged" is every
// instance counting n live members; "crash removed" is every other one
// counting n-1 and not listing the crashed one.
func runPlainScale(t *testing.T, n int) scaleResult {
	var gossipBytes atomic.Int64
	mls := make([]*memberlist.Memberlist, 0, n)
	defer func() {
		stopping := time.Now()
		// In parallel: one at a time, a mesh that stalled took 3 minutes.
		var wg sync.WaitGroup
		for _, m := range mls {
			wg.Go(func() { m.Shutdown() })
		}
		wg.Wait()
		t.Logf("N=%d (plain memberlist): stopped in %s", n, time.Since(stopping).Round(time.Millisecond))
	}()
	var seeds []string
	joinStart, cpuStart := time.Now(), processCPU()
	var r scaleResult
	for i := range n {
		if time.Since(joinStart) > joinBudget {
			r.note = fmt.Sprintf("only %d of %d joined within %s", i, n, joinBudget)
			t.Logf("N=%d (plain memberlist): %s", n, r.note)
			return r
		}
		cfg := memberlist.DefaultLANConfig()
		cfg.Name = fmt.Sprintf("ml%04d", i)
		port := loopbackPort(t)
		cfg.BindAddr, cfg.BindPort = "127.0.0.1", port
		cfg.AdvertiseAddr, cfg.AdvertisePort = cfg.BindAddr, port
		cfg.Logger = log.New(io.Discard, "", 0)
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{cfg.BindAddr}, BindPort: port, Logger: cfg.Logger})
		if err != nil {
			t.Fatal(err)
		}
		cfg.Transport = countingTransport{NodeAwareTransport: nt, n: &gossipBytes}
		m, err := memberlist.Create(cfg)
		if err != nil {
			t.Fatal(err)
		}
		mls = append(mls, m)
		// Seeds in random order until one answers, as joinSeeds does
		// (err is nil here: the first member has no seed to join).
		for _, k := range rand.Perm(len(seeds)) {
			if _, err = m.Join([]string{seeds[k]}); err == nil {
				break
			}
		}
		if err != nil {
			r.note = fmt.Sprintf("%s could not join: %v", cfg.Name, err)
			t.Logf("N=%d (plain memberlist): %s", n, r.note)
			return r
		}
		if i < 3 {
			seeds = append(seeds, fmt.Sprintf("127.0.0.1:%d", port))
		}
	}
	lastJoin := time.Now()
	r.joins = lastJoin.Sub(joinStart)
	// counting counts the instances that see want live members, none of
	// them the one at index gone (if any), which does not count itself.
	counting := func(want, gone int) func(bool) int {
		goneName := ""
		if gone >= 0 {
			goneName = mls[gone].LocalNode().Name
		}
		lacksGone := func(m *memberlist.Memberlist) bool {
			return goneName == "" || !slices.ContainsFunc(m.Members(), func(nd *memberlist.Node) bool { return nd.Name == goneName })
		}
		return func(bool) int {
			d := 0
			for i, m := range mls {
				if i == gone || m.NumMembers() == want && lacksGone(m) {
					d++
				}
			}
			return d
		}
	}
	if _, r.note = awaitAll(t, "convergence (plain memberlist)", n, counting(n, -1)); r.note != "" {
		return r
	}
	r.converge = time.Since(lastJoin)
	r.joinCPU = (processCPU() - cpuStart) / float64(n)
	r.measureSteady(n, gossipBytes.Load)
	victim := n / 2
	counted := counting(n-1, victim)
	mls[victim].Shutdown() // no leave: it just stops
	if r.crash, r.note = awaitAll(t, "crash removal (plain memberlist)", n, counted); r.note != "" {
		return r
	}
	t.Logf("N=%d (plain memberlist): converged %s after the last join; crash removed everywhere in %s", n, r.converge.Round(time.Millisecond), r.crash.Round(time.Millisecond))
	return r
}

// awaitAll polls done until it counts all n members, and returns how long
// that took, or a note saying how many were done when waitBudget ran out.
// done(true) may log what holds the rest back; it is asked once a second
// in debug runs.
func awaitAll(t *testing.T, what string, n int, done func(describe bool) int) (time.Duration, string) {
	start := time.Now()
	lastLog := start
	for {
		describe := debug && time.Since(lastLog) >= time.Second
		d := done(describe)
		if d == n {
			return time.Since(start), ""
		}
		if describe {
			lastLog = time.Now()
			t.Logf("%s +%s: %d/%d done", what, time.Since(start).Round(time.Millisecond), d, n)
		}
		if time.Since(start) > waitBudget {
			note := fmt.Sprintf("%s: %d of %d complete after %s", what, d, n, waitBudget)
			t.Logf("N=%d: %s", n, note)
			return 0, note
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// measureSteady records the process's CPU, heap and gossip traffic per
// member over 10 s of steady state. It first lets 10 s pass: the gossip
// that the last joins set off (retransmissions, newcomers' follow-up
// exchanges, the member list written once more) goes on for seconds after
// convergence, and measured at once it tripled the figure at N = 100.
func (r *scaleResult) measureSteady(n int, gossipBytes func() int64) {
	time.Sleep(settle)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r.heap = ms.HeapInuse / uint64(n)
	cpu0, bytes0, t0 := processCPU(), gossipBytes(), time.Now()
	time.Sleep(steadyWindow)
	el := time.Since(t0).Seconds()
	r.cpuPct = 100 * (processCPU() - cpu0) / el / float64(n)
	r.gossipBps = float64(gossipBytes()-bytes0) / el / float64(n)
}

func maxSize() int {
	m := 0
	for _, f := range strings.Split(os.Getenv("SKYBRIDGE_BENCH_SIZES"), ",") {
		if v, _ := strconv.Atoi(f); v > m {
			m = v
		}
	}
	if m == 0 {
		m = 1000
	}
	return m
}

func processCPU() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// scaleTuning is the memberlist tuning under test (nil: the LAN profile
// as is), adjusted from SKYBRIDGE_BENCH_TUNE, e.g.
// "gossip=200ms,nodes=3,probe=1s,ptimeout=500ms,susp=4,notcp".
var scaleTuning func(*memberlist.Config) = envTuning()

func envTuning() func(*memberlist.Config) {
	v := os.Getenv("SKYBRIDGE_BENCH_TUNE")
	if v == "" {
		return nil
	}
	return func(c *memberlist.Config) {
		durations := map[string]*time.Duration{"gossip": &c.GossipInterval, "probe": &c.ProbeInterval, "ptimeout": &c.ProbeTimeout}
		ints := map[string]*int{"nodes": &c.GossipNodes, "susp": &c.SuspicionMult, "retrans": &c.RetransmitMult, "queue": &c.HandoffQueueDepth}
		for _, kv := range strings.Split(v, ",") {
			k, val, _ := strings.Cut(kv, "=")
			var err error
			switch {
			case durations[k] != nil:
				*durations[k], err = time.ParseDuration(val)
			case ints[k] != nil:
				*ints[k], err = strconv.Atoi(val)
			case k == "notcp":
				c.DisableTcpPings = true
			default:
				err = errors.New("unknown setting (known: gossip, probe, ptimeout as durations; nodes, susp, retrans, queue as numbers; notcp)")
			}
			if err != nil {
				panic(fmt.Sprintf("SKYBRIDGE_BENCH_TUNE %q: %v", kv, err))
			}
		}
	}
}
