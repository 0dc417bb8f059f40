package mesh

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// TestProbeVerdicts: a gateway is unreachable after two misses in a row
// and reachable again only after answering for ten seconds without a miss;
// a new one starts unproven; one miss among answers changes nothing.
func TestProbeVerdicts(t *testing.T) {
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name  string
		start bool   // initially down
		seq   string // one probe a second: + answered, - missed
		want  string // verdict after each probe: U up, D down
	}{
		{"unproven gateway proves itself after ten seconds", true, "+++++++++++++", "DDDDDDDDDDUUU"},
		{"two misses in a row: down", false, "++-+-+--+", "UUUUUUUDD"},
		{"a miss restarts the recovery clock: no flapping", true, "++++++++-++++++++++++", "DDDDDDDDDDDDDDDDDDDUU"},
	} {
		st := &probeState{down: tc.start}
		got := ""
		for i, c := range tc.seq {
			st.observe(c == '+', t0.Add(time.Duration(i)*time.Second))
			got += map[bool]string{true: "D", false: "U"}[st.down]
		}
		if got != tc.want {
			t.Errorf("%s: %s gave %s, want %s", tc.name, tc.seq, got, tc.want)
		}
	}
}

// TestJudge: the published verdicts of probe rounds — a new gateway is
// unreachable until it proves itself, one that fails twice becomes
// unreachable, one that leaves the membership stays unreachable (and must
// prove itself on return), and one long gone is forgotten.
func TestJudge(t *testing.T) {
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	a, b := graphNode("a", "s", 1), graphNode("b", "s", 2)
	states := map[string]*probeState{}
	both := map[string]bool{"a": true, "b": true}
	round := func(i int, targets []Node, members map[string]bool, answered ...bool) map[string]bool {
		down, _ := judge(states, targets, members, nil, answered, t0.Add(time.Duration(i)*time.Second))
		return down
	}
	// Nothing proven in the site yet: those that answer count (the first
	// by name of them carries), rather than all down alike.
	if d := round(0, []Node{a, b}, both, true, true); len(d) != 0 {
		t.Fatalf("new gateways of a site with none proven, both answering: %v, want none down", d)
	}
	for i := 1; i <= 10; i++ {
		round(i, []Node{a, b}, both, true, true)
	}
	if d := round(11, []Node{a, b}, both, true, true); len(d) != 0 {
		t.Fatalf("after ten seconds of answers: %v, want none down", d)
	}
	round(12, []Node{a, b}, both, false, true)
	if d := round(13, []Node{a, b}, both, false, true); !d["a"] || d["b"] {
		t.Fatalf("a missed twice: %v, want a down only", d)
	}
	// a leaves the membership; b is still probed (the site had a choice).
	targets, members := probeTargets("home", []Node{b}, states)
	if len(targets) != 1 || targets[0].node() != "b" {
		t.Fatalf("targets after a left: %v", targets)
	}
	if d := round(14, targets, members, true); !d["a"] || d["b"] {
		t.Fatalf("a gone: %v, want a down, b up", d)
	}
	if d := round(14+int(probeForget/time.Second)+1, targets, members, true); d["a"] || states["a"] != nil {
		t.Fatalf("a gone for longer than probeForget: still judged %v", d)
	}
	// b, its site's only gateway now, leaves nothing to choose: it is
	// judged no more, nor probed.
	if states["b"] != nil {
		t.Fatal("a site's only gateway, its sibling forgotten, is still judged")
	}
	if targets, _ := probeTargets("home", []Node{b}, states); len(targets) != 0 {
		t.Fatalf("a site's only gateway is still probed: %v", targets)
	}

	// A site's only gateway (never probed: no choice) gets a sibling
	// that sorts first: the one carrying the routes starts reachable, the
	// newcomer must prove itself, so the routes stay put.
	only, newcomer := graphNode("z-only", "t", 3), graphNode("a-new", "t", 4)
	fresh := map[string]*probeState{}
	down, _ := judge(fresh, []Node{newcomer, only}, map[string]bool{"z-only": true, "a-new": true}, map[string]bool{"z-only": true},
		[]bool{true, true}, t0)
	if down["z-only"] || !down["a-new"] {
		t.Fatalf("a newcomer beside the carrier: %v, want only the newcomer down", down)
	}
}

// TestAnsweringBeatsDead: in a site where no gateway is judged reachable,
// one that answers carries its routes at once, proven or not yet — not
// the first by name, dead in the data plane, for probeRecovery. Both ways
// there: this gateway starting while the site's first is dead (A), and
// the carrier failing while its sibling proves itself (B).
func TestAnsweringBeatsDead(t *testing.T) {
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	b1, b2 := gw("b1", "s", "DE", "aws", 4, "pii-eu", "10.2.0.0/16"), gw("b2", "s", "DE", "aws", 5, "pii-eu", "10.2.0.0/16")
	members := map[string]bool{"b1": true, "b2": true}
	carrierOf := func(down map[string]bool) string {
		return Compute(TopologyInput{Self: zrh1, Peers: []Node{b1, b2}, Now: now, MeshPrefix: mesh16, Down: down}).Carriers["s"]
	}
	for name, states := range map[string]map[string]*probeState{
		"A: started while b1 is dead": {},
		"B: b1 fails while b2 proves": {"b1": {}, "b2": {down: true}},
	} {
		carriers := map[string]bool{"b1": true}
		var got []string
		for i := range 6 {
			down, _ := judge(states, []Node{b1, b2}, members, carriers, []bool{false, true}, t0.Add(time.Duration(i)*time.Second))
			c := carrierOf(down)
			got = append(got, c)
			carriers = map[string]bool{c: true}
		}
		// Two misses make b1 unreachable; from then on b2 carries.
		if want := []string{"b1", "b2", "b2", "b2", "b2", "b2"}; !slices.Equal(got, want) {
			t.Errorf("%s: carriers %v, want %v", name, got, want)
		}
	}
}

// TestNewcomerDoesNotTakeTheRoutes: a site's only gateway gets a sibling
// that sorts first, and the plan has already moved the routes to it when
// the next probe round runs. The round judges by the carriers of the
// round before: the incumbent starts reachable, the newcomer must prove
// itself, and the routes go back. (Judged by the latest plan, the
// newcomer started reachable and the incumbent unproven.)
func TestNewcomerDoesNotTakeTheRoutes(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("gw-zrh", f.trust(), func() time.Time { return f.now }, func() {})
	for _, id := range []*certs.NodeIdentity{f.identity("fra-1", "fra", 2, f.now.Add(-time.Hour)), f.identity("fra-2", "fra", 3, f.now.Add(-time.Hour))} {
		ms.addCert(id.Certificate().Raw)
		ms.update(id.Attributes().Node, gossipAddr, f.advert(id, 1))
	}
	g := &Gateway{members: ms, dev: NewRecordingDevice("health"), log: slog.New(slog.DiscardHandler), kick: make(chan struct{}, 1)}
	g.metrics = newMetrics(g)
	g.id.Store(f.identity("gw-zrh", "zrh", 1, f.now.Add(-time.Hour)))
	g.plan.Store(&Plan{Carriers: map[string]string{"zrh": "gw-zrh", "fra": "fra-1"}}) // moved to the newcomer
	before := map[string]bool{"gw-zrh": true, "fra-2": true}
	next := g.probeRound(context.Background(), map[string]*probeState{}, before)
	if d := g.downSet(); !d["fra-1"] || d["fra-2"] {
		t.Fatalf("down after the round: %v; want the newcomer fra-1 unproven and fra-2 reachable", d)
	}
	if !next["fra-1"] || next["fra-2"] {
		t.Fatalf("carriers handed to the next round: %v; want the plan's as of this round", next)
	}
}

// TestNoFlapOnSingleMisses: two gateways of a site, neither proven, each
// losing one probe in four but never two in a row: the routes stay with
// the first, rather than follow every lost probe.
func TestNoFlapOnSingleMisses(t *testing.T) {
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	b1, b2 := gw("b1", "s", "DE", "aws", 4, "pii-eu", "10.2.0.0/16"), gw("b2", "s", "DE", "aws", 5, "pii-eu", "10.2.0.0/16")
	members := map[string]bool{"b1": true, "b2": true}
	states := map[string]*probeState{"b1": {down: true}, "b2": {down: true}}
	carriers := map[string]bool{"b1": true}
	moves, last := 0, "b1"
	for i := range 40 {
		answered := []bool{i%4 != 1, i%4 != 3} // b1 misses at 1, 5, 9…; b2 at 3, 7, 11…
		down, _ := judge(states, []Node{b1, b2}, members, carriers, answered, t0.Add(time.Duration(i)*time.Second))
		c := Compute(TopologyInput{Self: zrh1, Peers: []Node{b1, b2}, Now: now, MeshPrefix: mesh16, Down: down}).Carriers["s"]
		if c != last {
			moves++
			last = c
		}
		carriers = map[string]bool{c: true}
	}
	if moves != 0 {
		t.Errorf("the routes moved %d times in 40 rounds of single misses; want them kept with b1", moves)
	}
}

// scriptedDials answers the probe's connection attempts in turn: "lost"
// (no answer: the SYN or its reply dropped), "refused" (an answer), or
// "unreachable" (failed at once, no route).
type scriptedDials struct {
	*RecordingDevice
	mu     sync.Mutex
	script []string
	n      int
}

func (d *scriptedDials) Dial(ctx context.Context, addr string) (net.Conn, error) {
	d.mu.Lock()
	what := d.script[min(d.n, len(d.script)-1)]
	d.n++
	d.mu.Unlock()
	switch what {
	case "refused":
		return nil, fmt.Errorf("dial tcp %s: %w", addr, syscall.ECONNREFUSED)
	case "unreachable":
		return nil, fmt.Errorf("dial tcp %s: %w", addr, syscall.ENETUNREACH)
	}
	<-ctx.Done()
	return nil, ctx.Err()
}

// TestProbeTriesAgain: a probe whose connection attempt goes unanswered
// (a lost packet, which the kernel would send again only after a second)
// tries again within the probe, three attempts in all; only when none is
// answered within the timeout is the probe missed.
//
// The probe runs on synctest's clock: its attempts are 250 ms apart
// within 800 ms, and on the real clock a probe starved for a few hundred
// ms (the race detector, a busy CI machine) lost a tick of its stagger and
// made two attempts where the case wants three.
func TestProbeTriesAgain(t *testing.T) {
	for _, tc := range []struct {
		script   []string
		answered bool
		attempts int
	}{
		{[]string{"refused"}, true, 1},
		{[]string{"lost", "refused"}, true, 2},
		{[]string{"lost", "lost", "refused"}, true, 3},
		{[]string{"lost", "lost", "lost", "refused"}, false, 3},
		{[]string{"unreachable", "refused"}, true, 2},
		{[]string{"unreachable", "unreachable", "unreachable", "refused"}, false, 3},
		{[]string{"lost", "unreachable", "unreachable", "refused"}, false, 3},
	} {
		t.Run(fmt.Sprint(tc.script), func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				d := &scriptedDials{RecordingDevice: NewRecordingDevice("probe"), script: tc.script}
				g := &Gateway{dev: d, log: slog.New(slog.DiscardHandler)}
				start := time.Now()
				answered, attempts := g.probe(context.Background(), netip.MustParseAddr("100.96.0.2"))
				if answered != tc.answered || attempts != tc.attempts {
					t.Errorf("answered %v after %d attempts, want %v after %d", answered, attempts, tc.answered, tc.attempts)
				}
				// Exact on this clock: no slack for a slow machine is needed.
				if took := time.Since(start); took > probeTimeout {
					t.Errorf("the probe took %s, past its %s", took, probeTimeout)
				}
				d.mu.Lock()
				defer d.mu.Unlock()
				if d.n != tc.attempts {
					t.Errorf("%d dials, want %d", d.n, tc.attempts)
				}
			})
		})
	}
}

// unanswered answers the probe's connection attempts at once (refused),
// but never those to the addresses in lost.
type unanswered struct {
	*RecordingDevice
	lost map[string]bool
}

func (d *unanswered) Dial(ctx context.Context, addr string) (net.Conn, error) {
	if d.lost[addr] {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return nil, fmt.Errorf("dial tcp %s: %w", addr, syscall.ECONNREFUSED)
}

// TestUnprovenMovesAreCounted: while no gateway of a site is proven, one
// that answers counts, and its second miss moves the site's routes
// without a verdict of its own (it was unproven, down, all along). The
// move is logged and counted as the verdicts are; it was silent, and a
// site whose gateways never stayed answering long enough to be proven
// (a lossy path) moved its routes every few seconds unseen.
func TestUnprovenMovesAreCounted(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("gw-zrh", f.trust(), func() time.Time { return f.now }, func() {})
	fra1, fra2 := f.identity("fra-1", "fra", 2, f.now.Add(-time.Hour)), f.identity("fra-2", "fra", 3, f.now.Add(-time.Hour))
	for _, id := range []*certs.NodeIdentity{fra1, fra2} {
		ms.addCert(id.Certificate().Raw)
		ms.update(id.Attributes().Node, gossipAddr, f.advert(id, 1))
	}
	lost := netip.AddrPortFrom(fra1.Attributes().OverlayIP, migrate.DefaultPort).String()
	var logs bytes.Buffer
	g := &Gateway{members: ms, dev: &unanswered{RecordingDevice: NewRecordingDevice("health"), lost: map[string]bool{lost: true}},
		log: slog.New(slog.NewTextHandler(&logs, nil)), kick: make(chan struct{}, 1)}
	g.metrics = newMetrics(g)
	g.id.Store(f.identity("gw-zrh", "zrh", 1, f.now.Add(-time.Hour)))
	g.plan.Store(&Plan{Carriers: map[string]string{"zrh": "gw-zrh", "fra": "fra-1"}})
	g.down.Store(&map[string]bool{}) // both answering, neither proven
	states := map[string]*probeState{
		"fra-1": {site: "fra", down: true, answered: true, fails: 1, lastSeen: f.now},
		"fra-2": {site: "fra", down: true, answered: true, lastSeen: f.now},
	}
	g.probeRound(context.Background(), states, map[string]bool{"gw-zrh": true, "fra-1": true})
	if d := g.downSet(); !d["fra-1"] || d["fra-2"] {
		t.Fatalf("down after fra-1's second miss: %v; want fra-1, whose answering no longer counts", d)
	}
	if n := testutil.ToFloat64(g.metrics.verdicts.WithLabelValues("unreachable")); n != 1 {
		t.Errorf("unreachable verdicts counted: %v, want 1", n)
	}
	if !strings.Contains(logs.String(), "no gateway of the site proven reachable yet: its routes follow those answering") || !strings.Contains(logs.String(), "peer=fra-1") {
		t.Errorf("the move is not logged:\n%s", logs.String())
	}

	// A move its sibling's verdict makes is not one: fra-2, answering
	// for a minute, is proven this round, and fra-1, answering too but
	// unproven, gives way to it without having missed anything.
	// (A gateway of its own: an attempt of the round above, started late,
	// may still read the first one's device.)
	logs.Reset()
	g = &Gateway{members: ms, dev: &unanswered{RecordingDevice: NewRecordingDevice("health")}, log: slog.New(slog.NewTextHandler(&logs, nil)), kick: make(chan struct{}, 1)}
	g.metrics = newMetrics(g)
	g.id.Store(f.identity("gw-zrh", "zrh", 1, f.now.Add(-time.Hour)))
	g.plan.Store(&Plan{Carriers: map[string]string{"zrh": "gw-zrh", "fra": "fra-1"}})
	g.down.Store(&map[string]bool{})
	states = map[string]*probeState{
		"fra-1": {site: "fra", down: true, answered: true, upSince: time.Now(), lastSeen: f.now},
		"fra-2": {site: "fra", down: true, answered: true, upSince: time.Now().Add(-time.Minute), lastSeen: f.now},
	}
	g.probeRound(context.Background(), states, map[string]bool{"gw-zrh": true, "fra-1": true})
	if d := g.downSet(); !d["fra-1"] || d["fra-2"] {
		t.Fatalf("down after fra-2 is proven: %v; want fra-1, unproven, giving way", d)
	}
	if n := testutil.ToFloat64(g.metrics.verdicts.WithLabelValues("unreachable")); n != 0 {
		t.Errorf("unreachable verdicts counted for a gateway that answered: %v, want 0\n%s", n, logs.String())
	}
	if n := testutil.ToFloat64(g.metrics.verdicts.WithLabelValues("reachable")); n != 1 {
		t.Errorf("reachable verdicts: %v, want fra-2's one", n)
	}
}
