package mesh

import (
	"encoding/xml"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/scrape"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
	"github.com/skybridge-mesh/skybridge/policy"
)

func graphNode(name, site string, ip byte) Node {
	return Node{Attributes: &certs.Attributes{Node: name, Site: site, Jurisdiction: "CH", Provider: "onprem", Region: "r",
		OverlayIP: netip.AddrFrom4([4]byte{100, 64, 0, ip})}}
}

func TestBuildGraphTunnelHealth(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	nodes := []Node{graphNode("a", "s1", 1), graphNode("b", "s2", 2), graphNode("c", "s2", 3), graphNode("d", "s3", 4), graphNode("e", "s3", 5), graphNode("f", "s1", 6)}
	edges := map[[2]string]bool{{"a", "b"}: true, {"a", "c"}: true, {"a", "d"}: true, {"a", "e"}: true, {"a", "f"}: true, {"b", "d"}: true}
	members := []MemberStatus{
		{Node: "b", Peer: true, LastHandshake: now.Add(-30 * time.Second), TxBytes: 100},
		{Node: "c", Peer: true, LastHandshake: now.Add(-160 * time.Second), TxBytes: 100},
		{Node: "d", Peer: true, LastHandshake: now.Add(-10 * time.Minute), TxBytes: 100, LastSent: now.Add(-5 * time.Second)},
		{Node: "e", Peer: true}, // configured, never used
		// f: planned, not on the device yet
	}
	g := buildGraph(nodes, edges, "a", members, now, false)
	want := map[[2]string]string{
		{"a", "b"}: TunnelFresh, {"a", "c"}: TunnelAgeing, {"a", "d"}: TunnelStale, {"a", "e"}: TunnelIdle, {"a", "f"}: TunnelIdle, {"b", "d"}: TunnelRemote,
	}
	if len(g.Tunnels) != len(want) {
		t.Fatalf("%d tunnels, want %d", len(g.Tunnels), len(want))
	}
	for _, tn := range g.Tunnels {
		if h := want[[2]string{tn.A, tn.B}]; tn.Health != h {
			t.Errorf("%s-%s: %s, want %s", tn.A, tn.B, tn.Health, h)
		}
	}
	if len(g.Sites) != 3 || g.Sites[0].Name != "s1" || len(g.Sites[1].Gateways) != 2 || !g.Sites[0].Gateways[0].Self {
		t.Errorf("sites: %+v", g.Sites)
	}
	// A stale tunnel that carried nothing is idle, not broken: WireGuard
	// handshakes on demand.
	if h := tunnelHealth(MemberStatus{LastHandshake: now.Add(-time.Hour)}, now); h != TunnelIdle {
		t.Errorf("old handshake, no traffic: %s, want idle", h)
	}
	if h := tunnelHealth(MemberStatus{TxBytes: 148, SentSince: now.Add(-181 * time.Second)}, now); h != TunnelStale {
		t.Errorf("never handshook while sending for 181 s: %s, want stale", h)
	}
	if h := tunnelHealth(MemberStatus{TxBytes: 148, SentSince: now.Add(-time.Second)}, now); h != TunnelIdle {
		t.Errorf("first initiation sent a second ago, unanswered yet: %s, want idle", h)
	}
	// One that carried traffic, then nothing for longer than a session
	// lasts, is idle too: what it sent was before its last handshake.
	used := MemberStatus{LastHandshake: now.Add(-10 * time.Minute), TxBytes: 1 << 30, LastSent: now.Add(-11 * time.Minute)}
	if h := tunnelHealth(used, now); h != TunnelIdle {
		t.Errorf("idle since it was used: %s, want idle", h)
	}
	// Sending since then without a handshake is failing; having sent
	// long ago, after the handshake, and nothing since is not.
	used.LastSent = now.Add(-20 * time.Second)
	if h := tunnelHealth(used, now); h != TunnelStale {
		t.Errorf("sending without a handshake: %s, want stale", h)
	}
	used.LastSent = now.Add(-5 * time.Minute)
	if h := tunnelHealth(used, now); h != TunnelIdle {
		t.Errorf("sent once after the handshake, then nothing for 5 minutes: %s, want idle", h)
	}
}

// TestGraphKeepsDownSites: a site none of whose gateways is alive stays in
// the picture, down, with its gateways as last verified and no tunnel;
// before, it vanished from the graph and the dashboard while the metrics
// reported it unreachable. A dead gateway of a site with one alive is not
// drawn, nor is a member no certificate placed.
func TestGraphKeepsDownSites(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	nodes := []Node{graphNode("a", "s1", 1), graphNode("b", "s2", 2)}
	members := []MemberStatus{
		{Node: "b", Site: "s2", SiteVerified: true, State: StateVerified, Peer: true, LastHandshake: now.Add(-time.Second)},
		{Node: "b2", Site: "s2", SiteVerified: true, State: StateDead},
		{Node: "z2", Site: "s0", Jurisdiction: "US", Provider: "aws", Region: "us-east-1", OverlayIP: "100.96.0.9", SiteVerified: true, State: StateDead, Left: true},
		{Node: "z1", Site: "s0", Jurisdiction: "US", Provider: "aws", Region: "us-east-1", OverlayIP: "100.96.0.8", SiteVerified: true, State: StateDead},
		{Node: "liar", Site: "s9", State: StateDead},
	}
	g := buildGraph(nodes, map[[2]string]bool{{"a", "b"}: true}, "a", members, now, false)
	if len(g.Sites) != 3 || g.Sites[0].Name != "s0" || !g.Sites[0].Down || g.Sites[1].Down || g.Sites[2].Down {
		t.Fatalf("sites: %+v; want s0 down first, then s1 and s2", g.Sites)
	}
	if gws := g.Sites[0].Gateways; len(gws) != 2 || gws[0].Node != "z1" || !gws[0].Down || gws[1].OverlayIP != "100.96.0.9" || g.Sites[0].Jurisdiction != "US" {
		t.Fatalf("the down site's gateways: %+v", g.Sites[0])
	}
	if len(g.Sites[2].Gateways) != 1 || len(g.Tunnels) != 1 {
		t.Fatalf("a dead gateway of a live site, or a tunnel to a down one, drawn: %+v %+v", g.Sites[2], g.Tunnels)
	}
	svg, dot := g.SVG(), g.DOT()
	for _, want := range []string{`data-node="z1" data-down="true"`, "US · aws us-east-1 · DOWN", `data-node="b" data-down="false"`} {
		if !strings.Contains(svg, want) {
			t.Errorf("svg lacks %s", want)
		}
	}
	if !strings.Contains(dot, `s0 (US, aws us-east-1) DOWN`) || !strings.Contains(dot, `"z1" [label="z1\n100.96.0.8", style="rounded,dashed"`) {
		t.Errorf("dot:\n%s", dot)
	}
}

// TestNoteSent: a peer's transmit counter counts as sending when it grows
// between two looks, dated to the earlier look; what it holds when first
// seen is no sending of any known time.
func TestNoteSent(t *testing.T) {
	clock := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	g := &Gateway{now: func() time.Time { return clock }}
	var k wgtypes.Key
	k[0] = 1
	look := func(tx int64) time.Time {
		return g.noteSent([]wgtypes.Peer{{PublicKey: k, TransmitBytes: tx}})[certs.WGPublicKey(k)].at
	}
	if at := look(100); !at.IsZero() {
		t.Fatalf("first look at 100 bytes: %v, want zero (not known when it was sent)", at)
	}
	clock = clock.Add(time.Minute)
	if at := look(100); !at.IsZero() {
		t.Fatalf("unchanged: %v, want zero", at)
	}
	before := clock
	clock = clock.Add(time.Minute)
	if at := look(148); !at.Equal(before) {
		t.Fatalf("grown: %v, want the look before (%v)", at, before)
	}
	clock = clock.Add(time.Minute)
	if at := look(10); !at.Equal(before) {
		t.Fatalf("counter lower (peer configured anew, or an older read): %v, want the last growth kept (%v)", at, before)
	}
	// An older read noted late, then the current count again: no sending.
	clock = clock.Add(time.Minute)
	if at := look(148); !at.Equal(before) {
		t.Fatalf("back to the count already seen after a lower one: %v, want no new sending (%v)", at, before)
	}
	grew := clock
	clock = clock.Add(time.Minute)
	if at := look(149); !at.Equal(grew) {
		t.Fatalf("grown again: %v, want the look before (%v)", at, grew)
	}
	if g.noteSent(nil); len(g.sent) != 0 {
		t.Fatalf("peers gone are remembered: %v", g.sent)
	}
}

// TestNewTunnelGrace: a tunnel that never handshook fails once it has
// been seen sending for over 180 s, not at its first initiation: the
// wait is counted from the look that first saw its transmit counter
// above zero, whether the peer is new or was idle until then. A greeting
// that re-creates the peer (its counter falls) is the same wait; a peer
// gone is forgotten, and a new key, or the same one configured again,
// waits anew.
func TestNewTunnelGrace(t *testing.T) {
	clock := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	g := &Gateway{now: func() time.Time { return clock }}
	key := func(b byte) wgtypes.Key { var k wgtypes.Key; k[0] = b; return k }
	look := func(peers map[wgtypes.Key]int64) {
		var ps []wgtypes.Peer
		for k, tx := range peers {
			ps = append(ps, wgtypes.Peer{PublicKey: k, TransmitBytes: tx})
		}
		g.noteSent(ps)
	}
	// As Status judges the peer with key k, sending tx bytes.
	judge := func(k wgtypes.Key, tx int64) (health string, reachable bool) {
		sent := g.noteSent([]wgtypes.Peer{{PublicKey: k, TransmitBytes: tx}})[certs.WGPublicKey(k)]
		ms := MemberStatus{Node: "b1", Site: "b", SiteVerified: true, State: StateVerified, Peer: true, TxBytes: tx, LastSent: sent.at, SentSince: sent.since}
		for _, s := range siteHealth(&Status{Site: "a", Members: []MemberStatus{ms}}, clock) {
			if s.name == "b" {
				reachable = s.reachable
			}
		}
		return tunnelHealth(ms, clock), reachable
	}
	start := clock
	expect := func(what string, k wgtypes.Key, tx int64, want string) {
		t.Helper()
		h, reachable := judge(k, tx)
		if h != want || reachable != (want != TunnelStale) {
			t.Errorf("%s, %s after the wait began: %q, site reachable %v; want %q", what, clock.Sub(start), h, reachable, want)
		}
	}

	expect("a new peer's first initiation", key(1), 148, TunnelIdle)
	clock = clock.Add(time.Second)
	expect("greeted again", key(1), 2*148, TunnelIdle)
	clock = clock.Add(time.Second)
	expect("greeted again, the peer re-created", key(1), 148, TunnelIdle)
	clock = start.Add(staleHandshake)
	expect("retried for 180 s", key(1), 148*37, TunnelIdle)
	clock = clock.Add(time.Second)
	expect("retried for over 180 s, the greeting's re-creation included", key(1), 148*38, TunnelStale)

	// The peer is gone, then back with a new key: a new wait.
	look(nil)
	if len(g.sent) != 0 {
		t.Fatalf("peers gone are remembered: %v", g.sent)
	}
	start = clock
	expect("a new key's first initiation", key(2), 148, TunnelIdle)
	clock = clock.Add(time.Minute)
	expect("a new key, a minute on", key(2), 148*13, TunnelIdle)
	// The same key configured again after it was gone for 3 minutes: a
	// new wait too.
	look(nil)
	clock = clock.Add(3 * time.Minute)
	start = clock
	expect("a peer configured again", key(2), 148, TunnelIdle)

	// A peer idle since it was configured, an hour ago, starts sending.
	look(map[wgtypes.Key]int64{key(3): 0})
	clock = clock.Add(time.Hour)
	look(map[wgtypes.Key]int64{key(3): 0})
	start = clock
	clock = clock.Add(10 * time.Second)
	expect("an idle peer's first initiation", key(3), 148, TunnelIdle)
	clock = start.Add(staleHandshake + 10*time.Second + time.Second)
	expect("its initiations unanswered for over 180 s", key(3), 148*19, TunnelStale)
}

// TestIdleTunnelNotStaleAfterQuietLooks: a tunnel that carried traffic an
// hour ago and has been idle since is idle, whether the first look at its
// counter comes after that hour or the look before came hours before it;
// one sending now, with its handshake as old, is still found failing by
// the next look.
func TestIdleTunnelNotStaleAfterQuietLooks(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	clock := now
	var k wgtypes.Key
	k[0] = 7
	used := now.Add(-time.Hour) // last traffic and handshake
	health := func(g *Gateway, tx int64) MemberStatus {
		sent := g.noteSent([]wgtypes.Peer{{PublicKey: k, TransmitBytes: tx, LastHandshakeTime: used}})
		ms := MemberStatus{Node: "b1", Site: "b", SiteVerified: true, State: StateVerified, Peer: true, LastHandshake: used, TxBytes: tx, LastSent: sent[certs.WGPublicKey(k)].at}
		ms.Health = tunnelHealth(ms, clock)
		return ms
	}
	unreachable := func(ms MemberStatus) bool {
		for _, s := range siteHealth(&Status{Site: "a", Members: []MemberStatus{ms}}, clock) {
			if s.name == "b" {
				return !s.reachable
			}
		}
		return true
	}

	g := &Gateway{now: func() time.Time { return clock }}
	if ms := health(g, 1<<20); ms.Health != TunnelIdle || unreachable(ms) {
		t.Errorf("first look, after an idle hour: %q (LastSent %v, site unreachable %v), want idle", ms.Health, ms.LastSent, unreachable(ms))
	}

	g = &Gateway{now: func() time.Time { return clock }}
	clock = now.Add(-3 * time.Hour)
	health(g, 1024)
	clock = now // the traffic came an hour ago, between the two looks
	if ms := health(g, 1<<20); ms.Health != TunnelIdle || unreachable(ms) {
		t.Errorf("looks 3 h apart, traffic an hour ago: %q (LastSent %v, site unreachable %v), want idle", ms.Health, ms.LastSent, unreachable(ms))
	}

	clock = clock.Add(10 * time.Second) // the reconciler's next look
	if ms := health(g, 1<<20+148); ms.Health != TunnelStale || !unreachable(ms) {
		t.Errorf("sending an hour after the last handshake: %q (LastSent %v), want stale, the site unreachable", ms.Health, ms.LastSent)
	}
}

// TestGraphSVG checks that the picture is well-formed XML, names every
// site, gateway and tunnel, and escapes what a certificate could carry.
func TestGraphSVG(t *testing.T) {
	for n := 1; n <= 7; n++ {
		var nodes []Node
		edges := map[[2]string]bool{}
		for i := range n {
			nodes = append(nodes, graphNode(string(rune('a'+i)), "site-"+string(rune('a'+i)), byte(i+1)))
			if i > 0 {
				edges[[2]string{"a", string(rune('a' + i))}] = true
			}
		}
		nodes[0].Attributes.Site = `<script>alert("x")</script>&`
		svg := buildGraph(nodes, edges, "a", nil, time.Now(), false).SVG()
		dec := xml.NewDecoder(strings.NewReader(svg))
		for {
			if _, err := dec.Token(); err == io.EOF {
				break
			} else if err != nil {
				t.Fatalf("n=%d: not well-formed: %v\n%s", n, err, svg)
			}
		}
		if strings.Contains(svg, "<script") {
			t.Fatalf("n=%d: a site name reached the SVG unescaped", n)
		}
		if got := strings.Count(svg, `class="site"`); got != n {
			t.Errorf("n=%d: %d sites drawn", n, got)
		}
		if got := strings.Count(svg, `class="tunnel"`); got != n-1 {
			t.Errorf("n=%d: %d tunnels drawn, want %d", n, got, n-1)
		}
		if strings.Contains(svg, "style=") || strings.Contains(svg, "NaN") {
			t.Errorf("n=%d: style attributes (blocked by the dashboard's CSP) or NaN coordinates", n)
		}
	}
}

func TestGraphDOT(t *testing.T) {
	now := time.Now()
	g := buildGraph([]Node{graphNode("a", "s1", 1), graphNode("b", "s2", 2)}, map[[2]string]bool{{"a", "b"}: true}, "a",
		[]MemberStatus{{Node: "b", Peer: true, LastHandshake: now.Add(-5 * time.Second)}}, now, false)
	dot := g.DOT()
	for _, want := range []string{`label="s1 (CH, onprem r)"`, `"a" [label="a\n100.64.0.1", penwidth=2]`, `"a" -- "b" [label="handshake 5s ago", color="#1a7f37"]`} {
		if !strings.Contains(dot, want) {
			t.Errorf("dot lacks %s:\n%s", want, dot)
		}
	}
}

func TestSiteHealth(t *testing.T) {
	now := time.Now()
	st := &Status{Site: "home", Members: []MemberStatus{
		{Node: "h2", Site: "home", SiteVerified: true, State: StateVerified},
		{Node: "ok", Site: "up", SiteVerified: true, State: StateVerified, Peer: true, LastHandshake: now.Add(-time.Minute), TxBytes: 10},
		{Node: "broken", Site: "cut", SiteVerified: true, State: StateVerified, Peer: true, LastHandshake: now.Add(-time.Hour), TxBytes: 10, LastSent: now.Add(-10 * time.Second)},
		{Node: "used", Site: "rested", SiteVerified: true, State: StateVerified, Peer: true, LastHandshake: now.Add(-time.Hour), TxBytes: 10, LastSent: now.Add(-time.Hour - time.Minute)},
		{Node: "idle", Site: "quiet", SiteVerified: true, State: StateVerified, Peer: true},
		{Node: "gone", Site: "lost", SiteVerified: true, State: StateDead},
		{Node: "stopped", Site: "closed", SiteVerified: true, State: StateDead, Left: true}, // stopped on purpose: missed all the same
		{Node: "muted", Site: "egress-cut", SiteVerified: true, State: StateVerified, Peer: true, Keepalive: 25 * time.Second,
			LastHandshake: now.Add(-4 * time.Minute), TxBytes: 10, LastSent: now.Add(-5 * time.Minute)}, // keepalives the host let not out
		{Node: "hub-only", Site: "spoke", SiteVerified: true, State: StateVerified},
		{Node: "x", State: StatePending},
		{Node: "liar", Site: "evil", State: StateRefused}, // a claim, never verified
	}}
	want := map[string]bool{"home": true, "up": true, "cut": false, "rested": true, "quiet": true, "lost": false, "closed": false, "egress-cut": false, "spoke": true, unknownSite: false}
	got := siteHealth(st, now)
	if len(got) != len(want) {
		t.Fatalf("%d sites, want %d: %+v", len(got), len(want), got)
	}
	for _, s := range got {
		if s.reachable != want[s.name] {
			t.Errorf("site %s reachable %v, want %v", s.name, s.reachable, want[s.name])
		}
	}
	if got[1].name != "closed" || got[1].count[stateLeft] != 1 || got[1].count[StateDead] != 0 || got[4].name != "home" || got[4].count[StateVerified] != 2 { // sorted; home has us and h2
		t.Errorf("order or counts: %+v", got[:5])
	}
	if u := got[0]; u.name != unknownSite || u.count[StatePending] != 1 || u.count[StateRefused] != 1 {
		t.Errorf("unverified members: %+v, want the pending one and the liar under %s", u, unknownSite)
	}
}

// TestSiteNamedUnknown: a site may be named "unknown" (and a class too);
// the bucket of members no certificate places has a name neither may
// carry, so such a site is not merged with strangers, and gets a
// reachability (an alert when its gateways die).
func TestSiteNamedUnknown(t *testing.T) {
	if !certs.ValidName("unknown") {
		t.Fatal(`"unknown" is no longer a valid site name: the test stands for nothing`)
	}
	if certs.ValidName(unknownSite) {
		t.Errorf("%q is a valid site name: a site of that name would be merged with the unverified members", unknownSite)
	}
	now := time.Now()
	st := &Status{Site: "zrh", Members: []MemberStatus{
		{Node: "u1", Site: "unknown", SiteVerified: true, State: StateDead}, // the only gateway of site "unknown"
		{Node: "evil", Site: "unknown", State: StateRefused},                // a stranger claiming it
	}}
	found := false
	for _, s := range siteHealth(st, now) {
		if s.name == "unknown" {
			found = true
			if s.count[StateRefused] != 0 || s.count[StateDead] != 1 || s.reachable {
				t.Errorf("site \"unknown\": counts %v, reachable %v; want its dead gateway alone, unreachable", s.count, s.reachable)
			}
		}
	}
	if !found {
		t.Error(`site "unknown" is not among the sites`)
	}
	// What Status and the metrics export: every site's reachability.
	reachable := map[string]bool{}
	for _, s := range siteHealth(st, now) {
		if s.name != unknownSite {
			reachable[s.name] = s.reachable
		}
	}
	if r, ok := reachable["unknown"]; !ok || r {
		t.Errorf("site \"unknown\", its only gateway dead: reachable %v (listed %v), want listed unreachable (skybridge_site_reachable 0)", r, ok)
	}
}

// TestClassNamedUnknown: a class the policy defines named "unknown"
// counts its own decisions; those on classes it does not define go to a
// label value no class may be named.
func TestClassNamedUnknown(t *testing.T) {
	src := `policy {
  name    = "t"
  version = 1
}
class "unknown" {
  allow "store" {
    jurisdiction = ["CH"]
  }
}
`
	if _, err := policy.Parse("t.hcl", []byte(src)); err != nil {
		t.Fatalf("a class named unknown: %v", err)
	}
	if _, err := policy.Parse("t.hcl", []byte(strings.ReplaceAll(src, `"unknown"`, `"`+undefinedClass+`"`))); err == nil {
		t.Errorf("a policy may define a class %q: its decisions would be counted with the undefined classes'", undefinedClass)
	}
	m := newMetrics(&Gateway{})
	m.classes([]string{"unknown"})
	m.Decided("send", "m1", policy.Request{Class: "unknown", Action: policy.Store}, policy.Decision{Denied: true})
	m.Decided("send", "m2", policy.Request{Class: "whatever", Action: policy.Store}, policy.Decision{Denied: true})
	m.Decided("send", "m3", policy.Request{Class: "whatever-else", Action: policy.Store}, policy.Decision{Denied: true})
	if n := testutil.ToFloat64(m.decisions.WithLabelValues("unknown", "store", "denied")); n != 1 {
		t.Errorf("class \"unknown\": %v denials counted, want its own one", n)
	}
	if n := testutil.ToFloat64(m.decisions.WithLabelValues(undefinedClass, "store", "denied")); n != 2 {
		t.Errorf("classes not defined: %v denials counted, want 2", n)
	}
}

func TestDecisionLog(t *testing.T) {
	m := &metrics{recent: &decisionLog{max: 3}}
	l := m.recent
	for i := range 5 {
		l.add(DecisionRecord{MigrationID: string(rune('a' + i))})
	}
	got := l.newest()
	if len(got) != 3 || got[0].MigrationID != "e" || got[2].MigrationID != "c" {
		t.Errorf("newest: %+v", got)
	}
	for _, tc := range []struct {
		d    policy.Decision
		want string
	}{
		{policy.Decision{Allowed: true}, "allowed"},
		{policy.Decision{Denied: true}, "denied"},
		{policy.Decision{Allowed: true, Denied: true, Audit: true}, "audit"},
	} {
		if got := decisionOutcome(tc.d); got != tc.want {
			t.Errorf("%+v: %s, want %s", tc.d, got, tc.want)
		}
	}
}

// BenchmarkGraph measures what one dashboard snapshot costs in drawing
// the mesh: every gateway's plan (the topology is computed for each, as
// each would) and the SVG. sites×gateways per site.
func BenchmarkGraph(b *testing.B) {
	for _, size := range []struct{ sites, per int }{{3, 1}, {10, 10}, {30, 10}, {100, 10}} {
		var nodes []Node
		for s := range size.sites {
			for g := range size.per {
				i := s*size.per + g
				n := graphNode(fmt.Sprintf("gw-%d-%d", s, g), fmt.Sprintf("site-%02d", s), byte(i))
				n.Attributes.OverlayIP = netip.AddrFrom4([4]byte{100, 64, byte(i / 256), byte(i%256 + 1)})
				n.Advert = certs.Advert{WireGuardKey: certs.WGPublicKey{byte(i), byte(i >> 8), 1}, Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:51820")}}
				nodes = append(nodes, n)
			}
		}
		in := TopologyInput{Mode: TopologyFullMesh, Now: time.Now(), MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")}
		b.Run(fmt.Sprintf("gateways=%d/edges", len(nodes)), func(b *testing.B) {
			for b.Loop() {
				meshEdges(nodes, in)
			}
		})
		edges := meshEdges(nodes, in)
		if n := len(nodes); len(edges) != n*(n-1)/2 {
			b.Fatalf("%d gateways in a full mesh: %d tunnels, want %d", n, len(edges), n*(n-1)/2)
		}
		// As graphOf draws a dashboard's snapshot: the edges' summary is
		// kept with them.
		self := nodes[0].node()
		sum := summarize(nodes, edges, self)
		b.Run(fmt.Sprintf("gateways=%d/svg", len(nodes)), func(b *testing.B) {
			for b.Loop() {
				if len(nodes) <= svgDetailLimit {
					buildGraph(nodes, edges, self, nil, in.Now, false).SVG()
				} else {
					drawLocal(nodes, sum, self, nil, in.Now).SVG()
				}
			}
		})
	}
}

// TestGraphBySite checks the picture of a mesh too large to draw gateway
// by gateway: sites with their counts, tunnels counted between sites,
// coloured by this gateway's worst tunnel among them.
func TestGraphBySite(t *testing.T) {
	now := time.Now()
	var nodes []Node
	edges := map[[2]string]bool{}
	for s := range 5 {
		for g := range 12 {
			nodes = append(nodes, graphNode(fmt.Sprintf("gw-%d-%02d", s, g), fmt.Sprintf("site-%d", s), byte(s*12+g+1)))
		}
	}
	for i := range nodes {
		for j := i + 1; j < len(nodes); j++ {
			edges[[2]string{nodes[i].node(), nodes[j].node()}] = true
		}
	}
	self := nodes[0].node() // gw-0-00
	members := []MemberStatus{
		{Node: "gw-1-00", Peer: true, LastHandshake: now.Add(-time.Second), TxBytes: 1},
		{Node: "gw-1-01", Peer: true, LastHandshake: now.Add(-time.Hour), TxBytes: 1, LastSent: now.Add(-time.Second)}, // broken
		{Node: "gw-2-00", Peer: true, LastHandshake: now.Add(-time.Second), TxBytes: 1},
	}
	g := buildGraph(nodes, edges, self, members, now, false)
	if len(g.SiteLinks) != 10 {
		t.Fatalf("%d site links, want 10 (5 sites, every pair)", len(g.SiteLinks))
	}
	want := map[[2]string]string{{"site-0", "site-1"}: TunnelStale, {"site-0", "site-2"}: TunnelFresh, {"site-0", "site-3"}: TunnelIdle, {"site-1", "site-2"}: TunnelRemote}
	for _, l := range g.SiteLinks {
		if l.Tunnels != 144 {
			t.Errorf("%s-%s: %d tunnels, want 12×12", l.A, l.B, l.Tunnels)
		}
		if h, ok := want[[2]string{l.A, l.B}]; ok && l.Health != h {
			t.Errorf("%s-%s: %s, want %s", l.A, l.B, l.Health, h)
		}
	}
	svg := g.SVG()
	if strings.Count(svg, `class="site-link"`) != 10 || strings.Contains(svg, `class="tunnel"`) || !strings.Contains(svg, "12 gateways, this one: gw-0-00") {
		t.Errorf("a 60-gateway mesh is not drawn by site:\n%.2000s", svg)
	}
	total := len(g.Tunnels)
	local := buildGraph(nodes, edges, self, members, now, true)
	if len(local.Tunnels) != 59 || local.TunnelsOmitted != total-59 {
		t.Errorf("kept %d tunnels (omitted %d of %d), want this gateway's 59", len(local.Tunnels), local.TunnelsOmitted, total)
	}
	if !slices.Equal(local.SiteLinks, g.SiteLinks) || local.SVG() != svg {
		t.Error("dropping the remote tunnels changed the picture")
	}
}

// TestSiteReachableThroughItsTunnels: a site with a tunnel from here is
// reachable through it, not through a sibling that is no peer of ours
// (on a hub, a remote site's other gateways are reached through its hub
// alone); a site with no tunnel from here goes by gossip.
func TestSiteReachableThroughItsTunnels(t *testing.T) {
	clock := time.Now()
	failing := MemberStatus{Node: "s-1", Site: "s", SiteVerified: true, State: StateVerified, Peer: true, LastHandshake: clock.Add(-time.Hour), TxBytes: 10, LastSent: clock.Add(-10 * time.Second)}
	sibling := MemberStatus{Node: "s-2", Site: "s", SiteVerified: true, State: StateVerified}
	behind := MemberStatus{Node: "u-1", Site: "u", SiteVerified: true, State: StateVerified}
	st := &Status{Site: "home", Members: []MemberStatus{failing, sibling, behind}}
	got := map[string]bool{}
	for _, s := range siteHealth(st, clock) {
		got[s.name] = s.reachable
	}
	if got["s"] {
		t.Errorf("site s, whose only tunnel from here is failing (%s), is reachable", tunnelHealth(failing, clock))
	}
	if !got["u"] {
		t.Error("site u, with no tunnel from here and a verified live gateway, is not reachable")
	}
}

// unansweredDevice is a recording device whose peers have each sent a
// handshake initiation (148 bytes) and had no answer yet.
type unansweredDevice struct{ *RecordingDevice }

func (d unansweredDevice) Device() (*wgtypes.Device, error) {
	dev, err := d.RecordingDevice.Device()
	if err == nil {
		for i := range dev.Peers {
			dev.Peers[i].TransmitBytes = 148
		}
	}
	return dev, err
}

// TestNewTunnelNotFailingLive: a gateway that has just peered with
// another, its first initiation unanswered yet, says so in its status
// and metrics: the tunnel idle, not failing, and the other site
// reachable. Unanswered for over 180 s, it would be failing.
func TestNewTunnelNotFailingLive(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	s := liveSettings(t, filepath.Join(dir, "hq"))
	s.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "hq-1", Site: "zrh-dc", Region: "zrh", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.7.1")}, time.Hour, s.Identity.Dir)
	dev := unansweredDevice{NewRecordingDevice("hq")}
	g := runGateway(t, s, dev, slog.New(slog.DiscardHandler), nil)

	fs := liveSettings(t, filepath.Join(dir, "fra"))
	fs.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "fra-1", Site: "fra-dc", Region: "fra", Provider: "onprem", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr("100.64.7.9")}, time.Hour, fs.Identity.Dir)
	fs.Seeds = []string{s.GossipAdvertise.String()}
	runLiveGateway(t, fs, &syncbuf.Buffer{})

	var fra MemberStatus
	waitUntil(t, 20*time.Second, "fra-1 a peer of hq-1", func() bool {
		st, err := g.Status()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range st.Members {
			if m.Node == "fra-1" && m.Peer {
				fra = m
				return true
			}
		}
		return false
	})
	if fra.Health != TunnelIdle || fra.SentSince.IsZero() {
		t.Errorf("fra-1's tunnel, its first initiation unanswered yet: health %q (sent since %v), want idle", fra.Health, fra.SentSince)
	}
	mfs, err := g.metrics.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	fam := scrape.Families{}
	for _, mf := range mfs {
		fam[mf.GetName()] = mf
	}
	if v, ok := fam.Value("skybridge_peer_tunnel_failing", map[string]string{"peer": "fra-1"}); !ok || v != 0 {
		t.Errorf("skybridge_peer_tunnel_failing{peer=\"fra-1\"} = %v (present %v), want 0", v, ok)
	}
	if v, ok := fam.Value("skybridge_site_reachable", map[string]string{"site": "fra-dc"}); !ok || v != 1 {
		t.Errorf("skybridge_site_reachable{site=\"fra-dc\"} = %v (present %v), want 1", v, ok)
	}
	later := fra.SentSince.Add(staleHandshake + time.Second)
	if h := tunnelHealth(fra, later); h != TunnelStale {
		t.Errorf("unanswered for 181 s: %q, want stale", h)
	}
}
