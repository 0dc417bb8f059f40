package mesh

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/skybridge-mesh/skybridge/policy"
)

// hubsim_test.go follows packets hop by hop through the plans every
// gateway of a mesh computes: one gateway's plan can be right on its own
// and still send traffic where the next gateway drops it, or where no
// gateway routes it on (the host's routes: in clear).

// simMesh is the plans of every gateway of a mesh.
type simMesh struct {
	nodes []Node
	plans map[string]Plan
	by    map[string]*Node
}

// newSim computes each gateway's plan, every other gateway its peer.
func newSim(nodes []Node, mode string, pol *policy.Policy) *simMesh {
	return newSimAway(nodes, nil, mode, pol)
}

// newSimAway is newSim with the gateways of away gone but not retired:
// the plans of those up, each with away as its TopologyInput.Away.
func newSimAway(nodes, away []Node, mode string, pol *policy.Policy) *simMesh {
	w := &simMesh{nodes: nodes, plans: map[string]Plan{}, by: map[string]*Node{}}
	var gone []AwayGateway
	for _, a := range away {
		gone = append(gone, AwayGateway{Node: a})
	}
	for i := range nodes {
		self := nodes[i]
		w.by[self.node()] = &nodes[i]
		peers := append(slices.Clone(nodes[:i]), nodes[i+1:]...)
		w.plans[self.node()] = Compute(TopologyInput{Self: self, Peers: peers, Away: gone, Policy: pol, Mode: mode, Now: now, MeshPrefix: mesh16})
	}
	return w
}

// lookupPeer is the peer WireGuard sends a to: the longest prefix of
// the peers' allowed IPs that holds it.
func lookupPeer(peers []PeerConfig, a netip.Addr) (PeerConfig, bool) {
	best, bits, ok := PeerConfig{}, -1, false
	for _, pc := range peers {
		for _, p := range pc.AllowedIPs {
			if p.Contains(a) && p.Bits() > bits {
				best, bits, ok = pc, p.Bits(), true
			}
		}
	}
	return best, ok
}

// send follows a packet from src, sent at gateway start, to dst. It
// returns the gateways it passed and how it ended: "delivered" (to a
// gateway's overlay address), "lan" (into a site's network), or what
// went wrong where.
func (w *simMesh) send(start string, src, dst netip.Addr) (string, string) {
	cur := start
	path := []string{cur}
	for range 8 {
		n := w.by[cur]
		plan := w.plans[cur]
		if n.Attributes.OverlayIP == dst {
			return strings.Join(path, ">"), "delivered"
		}
		for _, r := range n.Attributes.Routes {
			if r.Contains(dst) {
				return strings.Join(path, ">"), "lan"
			}
		}
		routed := mesh16.Contains(dst)
		for _, r := range plan.Routes {
			routed = routed || r.Contains(dst)
		}
		if !routed {
			return strings.Join(path, ">"), "sent by the host's routes at " + cur
		}
		pc, ok := lookupPeer(plan.Peers, dst)
		if !ok {
			return strings.Join(path, ">"), "no peer for it at " + cur
		}
		// WireGuard at the next gateway takes the packet only from the
		// peer whose allowed IPs hold its source.
		next := pc.Node
		back, ok := lookupPeer(w.plans[next].Peers, src)
		if !ok || back.Node != cur {
			return strings.Join(append(path, next), ">"), fmt.Sprintf("refused at %s: source %s from %s (taken from %q)", next, src, cur, back.Node)
		}
		cur = next
		path = append(path, cur)
	}
	return strings.Join(path, ">"), "loop"
}

// checkRoutes sends from every gateway into each prefix it routes, and
// fails where the packet is not delivered into a site's network (another
// gateway sends it by its host's routes, or drops it), or, under pol,
// goes along a path the policy forbids for every class both ends handle.
func (w *simMesh) checkRoutes(t *testing.T, pol *policy.Policy) {
	t.Helper()
	for _, n := range w.nodes {
		for _, r := range w.plans[n.node()].Routes {
			path, end := w.send(n.node(), n.Attributes.OverlayIP, r.Addr().Next())
			if end != "lan" {
				t.Errorf("%s routes %s: %s, through %s", n.node(), r, end, path)
				continue
			}
			var hops []*Node
			for _, g := range strings.Split(path, ">") {
				hops = append(hops, w.by[g])
			}
			if pol != nil && !admitted(pol, hops) {
				t.Errorf("%s routes %s through %s, which the policy forbids for every class both ends handle", n.node(), r, path)
			}
		}
	}
}

// hubMesh is three sites: one of three gateways, one of two, one of one.
func hubMesh() []Node {
	return []Node{
		gw("a-1", "site-a", "DE", "aws", 11, "x", "10.11.0.0/16"),
		gw("a-2", "site-a", "DE", "aws", 12, "x", "10.11.0.0/16"),
		gw("a-3", "site-a", "DE", "aws", 13, "x", "10.11.0.0/16"),
		gw("b-1", "site-b", "DE", "aws", 21, "x", "10.21.0.0/16"),
		gw("b-2", "site-b", "DE", "aws", 22, "x", "10.21.0.0/16"),
		gw("c-1", "site-c", "DE", "aws", 31, "x", "10.31.0.0/16"),
	}
}

// TestHubSimDelivers: in the hub topology every gateway reaches every
// other one, both ways, and the hubs each other's networks.
func TestHubSimDelivers(t *testing.T) {
	w := newSim(hubMesh(), TopologyHub, nil)
	for _, a := range w.nodes {
		for _, b := range w.nodes {
			if a.node() == b.node() {
				continue
			}
			if path, r := w.send(a.node(), a.Attributes.OverlayIP, b.Attributes.OverlayIP); r != "delivered" {
				t.Errorf("%s -> %s: %s, through %s", a.node(), b.node(), r, path)
			}
		}
	}
	w.checkRoutes(t, nil)
	for _, s := range []struct{ from, to string }{{"a-1", "10.21.0.9"}, {"b-1", "10.31.0.9"}, {"c-1", "10.11.0.9"}} {
		src := w.by[s.from].Attributes.Routes[0].Addr().Next()
		if path, r := w.send(s.from, src, netip.MustParseAddr(s.to)); r != "lan" {
			t.Errorf("%s -> %s: %s, through %s", s.from, s.to, r, path)
		}
	}
}

// TestHubDeadHubRoutesHeld: a site's hub goes away, and its new hub does
// not advertise all it did (certificates re-issued one gateway at a
// time): what the old one carried is held, at a hub and at a non-hub as
// in a full mesh, not left to the host's routes.
func TestHubDeadHubRoutesHeld(t *testing.T) {
	b1 := gw("b-1", "site-b", "DE", "aws", 21, "x", "10.21.0.0/16", "10.22.0.0/16") // the hub, away
	b2 := gw("b-2", "site-b", "DE", "aws", 22, "x", "10.21.0.0/16")                 // up, re-issued without 10.22/16
	a1 := gw("a-1", "site-a", "DE", "aws", 11, "x", "10.11.0.0/16")
	a2 := gw("a-2", "site-a", "DE", "aws", 12, "x", "10.11.0.0/16")
	for _, mode := range []string{TopologyFullMesh, TopologyHub} {
		for _, self := range []Node{a1, a2} {
			sibling := a2
			if self.node() == "a-2" {
				sibling = a1
			}
			up := Compute(TopologyInput{Self: self, Peers: []Node{sibling, b1, b2}, Mode: mode, Now: now, MeshPrefix: mesh16})
			if got := planState(up, "10.22.0.0/16"); got != "routed" {
				t.Fatalf("%s, %s: setup: 10.22.0.0/16 is %s while b-1 is up", mode, self.node(), got)
			}
			gone := Compute(TopologyInput{Self: self, Peers: []Node{sibling, b2}, Away: []AwayGateway{{Node: b1}}, Mode: mode, Now: now, MeshPrefix: mesh16})
			if got := planState(gone, "10.22.0.0/16"); got != "held" {
				t.Errorf("%s, seen from %s: b-1 away, its 10.22.0.0/16 is %s, want held", mode, self.node(), got)
			}
			if got := planState(gone, "10.21.0.0/16"); got != "routed" {
				t.Errorf("%s, seen from %s: 10.21.0.0/16, which b-2 carries, is %s", mode, self.node(), got)
			}
		}
	}
}

// TestHubDeadHubResidencyHeld: a site's hub goes away, and the gateway
// left is one residency does not link us to (labels rolled out one
// gateway at a time): the site's routes are held.
func TestHubDeadHubResidencyHeld(t *testing.T) {
	pol := mustPolicy(t, meshPolicy)
	zrh := gw("zrh-1", "onprem-zrh", "CH", "onprem", 1, "pii-eu", "10.1.0.0/16")
	f1 := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "pii-eu", "10.2.0.0/16")     // linked, the hub, away
	f2 := gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "risk-batch", "10.2.0.0/16") // up, not linked
	for _, mode := range []string{TopologyFullMesh, TopologyHub} {
		up := Compute(TopologyInput{Self: zrh, Peers: []Node{f1, f2}, Policy: pol, Mode: mode, Now: now, MeshPrefix: mesh16})
		if got := planState(up, "10.2.0.0/16"); got != "routed" {
			t.Fatalf("%s: setup: 10.2.0.0/16 is %s while fra-1 is up", mode, got)
		}
		gone := Compute(TopologyInput{Self: zrh, Peers: []Node{f2}, Away: []AwayGateway{{Node: f1}}, Policy: pol, Mode: mode, Now: now, MeshPrefix: mesh16})
		if got := planState(gone, "10.2.0.0/16"); got != "held" {
			t.Errorf("%s: fra-1 away, 10.2.0.0/16 is %s, want held", mode, got)
		}
	}
}

// admitted reports whether the policy lets a class both ends of path
// handle travel along it (the sites of the gateways passed, in order).
func admitted(pol *policy.Policy, path []*Node) bool {
	from, to := path[0].Attributes, path[len(path)-1].Attributes
	sites := make([]policy.Site, len(path))
	for i, n := range path {
		sites[i] = policy.SiteOf(n.Attributes)
	}
	for _, c := range sharedClasses(from.Labels[ClassesLabel], to.Labels[ClassesLabel]) {
		if d := pol.Evaluate(policy.Request{Class: c, Action: policy.Transit, Sites: sites, Time: now}); d.Allowed {
			return true
		}
	}
	return false
}

// checkPolicy sends between every two gateways of different sites, and
// fails where one is delivered along a path the policy forbids for every
// class both ends handle. It returns the pairs delivered.
func (w *simMesh) checkPolicy(t *testing.T, pol *policy.Policy) map[string]bool {
	t.Helper()
	delivered := map[string]bool{}
	for _, a := range w.nodes {
		for _, b := range w.nodes {
			if a.site() == b.site() {
				continue
			}
			path, r := w.send(a.node(), a.Attributes.OverlayIP, b.Attributes.OverlayIP)
			if r != "delivered" {
				continue
			}
			delivered[a.node()+">"+b.node()] = true
			var hops []*Node
			for _, n := range strings.Split(path, ">") {
				hops = append(hops, w.by[n])
			}
			if !admitted(pol, hops) {
				t.Errorf("%s -> %s is delivered through %s, which the policy forbids for every class both handle", a.node(), b.node(), path)
			}
		}
	}
	return delivered
}

const relayPolicy = `policy {
  name    = "relay-test"
  version = 1
}
class "pii" {
  allow "transit" {
    labels = { certified = "iso27001" }
  }
  allow "store" {
    labels = { certified = "iso27001" }
  }
}
class "batch" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    site = ["*"]
  }
}
`

// labelled is n with these labels, and no others, on its certificate.
func labelled(n Node, kv ...string) Node {
	a := *n.Attributes
	a.Labels = map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		a.Labels[kv[i]] = kv[i+1]
	}
	n.Attributes = &a
	return n
}

// relayMesh: site-b's certificates are being re-issued one gateway at a
// time. b-2's new one attests iso27001 and handles pii alone; b-1, its
// hub, still has the old one, which may not carry pii.
func relayMesh() []Node {
	return []Node{
		labelled(gw("a-1", "site-a", "DE", "aws", 11, "", "10.11.0.0/16"), ClassesLabel, "pii,batch", "certified", "iso27001"),
		labelled(gw("a-2", "site-a", "DE", "aws", 12, "", "10.11.0.0/16"), ClassesLabel, "pii,batch", "certified", "iso27001"),
		labelled(gw("b-1", "site-b", "DE", "aws", 21, "", "10.21.0.0/16"), ClassesLabel, "batch"),
		labelled(gw("b-2", "site-b", "DE", "aws", 22, "", "10.21.0.0/16"), ClassesLabel, "pii", "certified", "iso27001"),
	}
}

// TestHubRelayThroughForbiddenRemoteHub: in the hub topology a link to
// another site's gateway that is not its hub is judged through that hub,
// as a migration is (hubVia): whatever reaches b-2 is pii, which b-1 may
// not pass on. Judged as a direct tunnel, it was relayed through b-1.
func TestHubRelayThroughForbiddenRemoteHub(t *testing.T) {
	pol := mustPolicy(t, relayPolicy)
	w := newSim(relayMesh(), TopologyHub, pol)
	delivered := w.checkPolicy(t, pol)
	for _, pair := range []string{"a-1>b-1", "b-1>a-1", "a-2>b-1", "b-1>a-2"} {
		if !delivered[pair] {
			t.Errorf("%s, batch between any sites, is not delivered", pair)
		}
	}
	for _, l := range w.plans["a-1"].Links {
		if l.Site == "site-b" && !l.Allowed {
			t.Errorf("a-1 shows no link to site-b, though it links to b-1: %s", l.Reason)
		}
	}
}

// hopsPolicy lets pii travel one tunnel only (max_hops = 1: between
// hubs), and batch anywhere.
const hopsPolicy = `policy {
  name    = "hops"
  version = 1
}
class "pii" {
  allow "transit" {
    site = ["*"]
    require {
      max_hops = 1
    }
  }
  allow "store" {
    site = ["*"]
  }
}
class "batch" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    site = ["*"]
  }
}
`

// TestHubRelayMaxHops: max_hops counts the tunnels of the hub topology's
// path, as a migration's do: pii (max_hops = 1) goes between hubs only.
func TestHubRelayMaxHops(t *testing.T) {
	pol := mustPolicy(t, hopsPolicy)
	w := newSim([]Node{
		gw("a-1", "site-a", "DE", "aws", 11, "pii", "10.11.0.0/16"),
		gw("a-2", "site-a", "DE", "aws", 12, "pii", "10.11.0.0/16"),
		gw("b-1", "site-b", "DE", "aws", 21, "pii", "10.21.0.0/16"),
		gw("b-2", "site-b", "DE", "aws", 22, "pii", "10.21.0.0/16"),
	}, TopologyHub, pol)
	delivered := w.checkPolicy(t, pol)
	if !delivered["a-1>b-1"] || !delivered["b-1>a-1"] {
		t.Errorf("the hubs do not reach each other: delivered %v", delivered)
	}
	l := w.plans["a-2"].Links
	if len(l) != 1 || l[0].Allowed || !strings.Contains(l[0].Reason, "has 2 hops") || !strings.Contains(l[0].Reason, "through hub a-1") {
		t.Errorf("a-2's links %+v: want site-b refused, as 2 hops through a-1", l)
	}
}

// TestHubLinkMemo: a memoized decision is one judged through the same
// hubs: b-2's link, refused through b-1, stands once b-1 leaves and b-2
// is its site's hub.
func TestHubLinkMemo(t *testing.T) {
	pol := mustPolicy(t, relayPolicy)
	nodes := relayMesh()
	var memo LinkMemo
	for _, peers := range [][]Node{nodes[1:], {nodes[1], nodes[3]}, nodes[1:]} {
		in := TopologyInput{Self: nodes[0], Peers: peers, Policy: pol, Mode: TopologyHub, Now: now, MeshPrefix: mesh16}
		fresh := Compute(in)
		in.Memo = &memo
		if a, b := fmt.Sprint(fresh), fmt.Sprint(Compute(in)); a != b {
			t.Errorf("peers %d: memoized plan differs:\n fresh %s\n memo  %s", len(peers), a, b)
		}
	}
}

// TestHubContestedPrefixAsTheHubSettles: a prefix two sites claim goes
// to the first site by name at a non-hub as at its hub. All of a
// non-hub's routes go to its hub, and settled as that one peer's claims,
// the longer prefix was dropped; the non-hub routed 10.7.0.0/16 to a hub
// that sends all of it but 10.7.128.0/24 by its host's routes.
func TestHubContestedPrefixAsTheHubSettles(t *testing.T) {
	w := newSim([]Node{
		gw("a-1", "site-a", "DE", "aws", 11, "", "10.11.0.0/16"),
		gw("a-2", "site-a", "DE", "aws", 12, "", "10.11.0.0/16"),
		gw("b-1", "site-b", "DE", "aws", 21, "", "10.7.128.0/24"), // the first site by name keeps its claim
		gw("c-1", "site-c", "DE", "aws", 31, "", "10.7.0.0/16"),
	}, TopologyHub, nil)
	w.checkRoutes(t, nil)
	if hub, non := w.plans["a-1"], w.plans["a-2"]; !slices.Equal(hub.Routes, non.Routes) || !slices.Equal(hub.Conflicts, non.Conflicts) {
		t.Errorf("the hub a-1 routes %v (%q), its non-hub a-2 %v (%q)", hub.Routes, hub.Conflicts, non.Routes, non.Conflicts)
	}
}

// TestHubRemoteHubEndpointInsideItsRoutes: a site's routes over its hub's
// own endpoint are not routed at another site's hub (its tunnel's packets
// would loop into the tunnel), nor at that hub's non-hubs, which routed
// them to a hub that does not route them on.
func TestHubRemoteHubEndpointInsideItsRoutes(t *testing.T) {
	nodes := hubMesh()
	nodes[3].Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("10.21.0.1:51820")} // b-1, numbered in its site's network
	w := newSim(nodes, TopologyHub, nil)
	w.checkRoutes(t, nil)
	for _, n := range []string{"a-1", "a-2", "a-3"} {
		if got := planState(w.plans[n], "10.21.0.0/16"); got != "neither" {
			t.Errorf("%s: 10.21.0.0/16 is %s; conflicts %q", n, got, w.plans[n].Conflicts)
		}
	}
}

// TestHubClaimOfASiteOnlyTheHubLinks: a site our hub links to and we do
// not (pii, max_hops = 1, goes between hubs only) still has its claims
// settled here as at the hub: the other site's overlapping prefix, which
// the hub does not route, is not routed here either.
func TestHubClaimOfASiteOnlyTheHubLinks(t *testing.T) {
	pol := mustPolicy(t, hopsPolicy)
	w := newSim([]Node{
		gw("a-1", "site-a", "DE", "aws", 11, "pii,batch", "10.11.0.0/16"),
		gw("a-2", "site-a", "DE", "aws", 12, "pii,batch", "10.11.0.0/16"),
		gw("b-1", "site-b", "DE", "aws", 21, "pii", "10.7.128.0/24"),
		gw("c-1", "site-c", "DE", "aws", 31, "batch", "10.7.0.0/16"),
	}, TopologyHub, pol)
	w.checkRoutes(t, pol)
	w.checkPolicy(t, pol)
	if got := planState(w.plans["a-1"], "10.7.128.0/24"); got != "routed" {
		t.Fatalf("setup: the hub a-1 does not route b-1's 10.7.128.0/24 (%s): %q", got, w.plans["a-1"].Conflicts)
	}
	if got := planState(w.plans["a-2"], "10.7.0.0/16"); got != "neither" {
		t.Errorf("a-2: c-1's 10.7.0.0/16, which its hub does not route, is %s", got)
	}
}

// TestHubOwnHubAwayRoutesHeld: our own site's hub goes away, and the
// gateway that becomes our hub is one the policy keeps from site-b
// (certificates re-issued one gateway at a time): site-b's routes, routed
// here through the old hub, are held, whether site-b's hub is up or away
// too, not left to the host's routes. One of our gateways away that
// sorts after our hub was never our hub and holds nothing.
func TestHubOwnHubAwayRoutesHeld(t *testing.T) {
	pol := mustPolicy(t, relayPolicy)
	a1 := labelled(gw("a-1", "site-a", "DE", "aws", 11, "", "10.11.0.0/16"), ClassesLabel, "pii", "certified", "iso27001") // our hub, goes away
	a2 := labelled(gw("a-2", "site-a", "DE", "aws", 12, "", "10.11.0.0/16"), ClassesLabel, "pii")                          // old certificate
	a3 := labelled(gw("a-3", "site-a", "DE", "aws", 13, "", "10.11.0.0/16"), ClassesLabel, "pii", "certified", "iso27001") // self
	a4 := labelled(gw("a-4", "site-a", "DE", "aws", 14, "", "10.11.0.0/16"), ClassesLabel, "pii", "certified", "iso27001")
	b1 := labelled(gw("b-1", "site-b", "DE", "aws", 21, "", "10.21.0.0/16"), ClassesLabel, "pii", "certified", "iso27001")
	in := func(peers []Node, away ...Node) TopologyInput {
		var aw []AwayGateway
		for _, n := range away {
			aw = append(aw, AwayGateway{Node: n})
		}
		return TopologyInput{Self: a3, Peers: peers, Away: aw, Policy: pol, Mode: TopologyHub, Now: now, MeshPrefix: mesh16}
	}
	if got := planState(Compute(in([]Node{a1, a2, b1})), "10.21.0.0/16"); got != "routed" {
		t.Fatalf("setup: 10.21.0.0/16 is %s at a-3 while a-1 is up", got)
	}
	if got := planState(Compute(in([]Node{a2, b1})), "10.21.0.0/16"); got != "neither" {
		t.Fatalf("setup: 10.21.0.0/16 is %s at a-3 with a-2 its hub: a-2 must not reach site-b", got)
	}
	for _, c := range []struct {
		name string
		in   TopologyInput
		want string
	}{
		{"a-1 away, b-1 up", in([]Node{a2, b1}, a1), "held"},
		{"a-1 and b-1 away", in([]Node{a2}, a1, b1), "held"},
		{"a-4 away, sorting after our hub", in([]Node{a1, b1}, a4), "routed"},
	} {
		p := Compute(c.in)
		if got := planState(p, "10.21.0.0/16"); got != c.want {
			t.Errorf("%s: 10.21.0.0/16 is %s at a-3, want %s; links %+v", c.name, got, c.want, p.Links)
		}
	}
	// Our own site's routes stay the host's to route.
	if p := Compute(in([]Node{a2, b1}, a1)); len(p.Held["site-a"]) > 0 {
		t.Errorf("our own site's routes are held: %v", p.Held)
	}
}

// undelivered lists what goes wrong in w: a packet a gateway sends into
// the interface, to a prefix it routes or to the overlay address of a
// gateway it has a peer for, that is not delivered, or is delivered
// along a path pol forbids for every class both ends handle.
func (w *simMesh) undelivered(pol *policy.Policy) []string {
	var out []string
	for _, n := range w.nodes {
		plan := w.plans[n.node()]
		for _, r := range plan.Routes {
			if path, end := w.send(n.node(), n.Attributes.OverlayIP, r.Addr().Next()); end != "lan" {
				out = append(out, fmt.Sprintf("%s routes %s: %s, through %s", n.node(), r, end, path))
			}
		}
		for _, m := range w.nodes {
			if m.node() == n.node() {
				continue
			}
			if _, ok := lookupPeer(plan.Peers, m.Attributes.OverlayIP); !ok {
				continue
			}
			path, end := w.send(n.node(), n.Attributes.OverlayIP, m.Attributes.OverlayIP)
			if end != "delivered" {
				out = append(out, fmt.Sprintf("%s sends to %s: %s, through %s", n.node(), m.node(), end, path))
				continue
			}
			var hops []*Node
			for _, g := range strings.Split(path, ">") {
				hops = append(hops, w.by[g])
			}
			if pol != nil && n.site() != m.site() && !admitted(pol, hops) {
				out = append(out, fmt.Sprintf("%s sends to %s through %s, which the policy forbids", n.node(), m.node(), path))
			}
		}
	}
	return out
}

// openPolicy lets pii and batch go anywhere, through any hubs.
const openPolicy = `policy {
  name    = "open"
  version = 1
}
class "pii" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    site = ["*"]
  }
}
class "batch" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    site = ["*"]
  }
}
`

// oneHopPolicy lets pii go anywhere in one tunnel: between hubs only.
const oneHopPolicy = `policy {
  name    = "one-hop"
  version = 1
}
class "pii" {
  allow "transit" {
    site = ["*"]
    require {
      max_hops = 1
    }
  }
  allow "store" {
    site = ["*"]
  }
}
`

// TestHubRemoteHubTakesOnlyWhatItLinks: a remote hub takes from our hub
// only the sources it links to itself (the hubs need not handle a class
// to pass it on, but b-1 shares none with a-2). a-2 linked b-2 on its own
// and its hub's judgement, routed to it through a-1 and b-1, and b-1
// refused the packets, while b-2, narrowing by its hub, did not route to
// a-2 at all. Both ends now leave each other out, and a-2 shows site-b
// as not linked.
func TestHubRemoteHubTakesOnlyWhatItLinks(t *testing.T) {
	pol := mustPolicy(t, openPolicy)
	w := newSim([]Node{
		labelled(gw("a-1", "site-a", "DE", "aws", 11, "", "10.11.0.0/16"), ClassesLabel, "pii,batch"),
		labelled(gw("a-2", "site-a", "DE", "aws", 12, "", "10.11.0.0/16"), ClassesLabel, "pii"),
		labelled(gw("b-1", "site-b", "DE", "aws", 21, "", "10.21.0.0/16"), ClassesLabel, "batch"),
		labelled(gw("b-2", "site-b", "DE", "aws", 22, "", "10.21.0.0/16"), ClassesLabel, "pii"),
	}, TopologyHub, pol)
	for _, p := range w.undelivered(pol) {
		t.Error(p)
	}
	for _, pr := range [][2]string{{"a-2", "b-2"}, {"b-2", "a-2"}} {
		if _, ok := lookupPeer(w.plans[pr[0]].Peers, w.by[pr[1]].Attributes.OverlayIP); ok {
			t.Errorf("%s routes %s's address", pr[0], pr[1])
		}
	}
	// b-1 passes on what it links to itself: pii from a-1 to b-2.
	for _, pr := range [][2]string{{"a-1", "b-2"}, {"b-2", "a-1"}} {
		if path, r := w.send(pr[0], w.by[pr[0]].Attributes.OverlayIP, w.by[pr[1]].Attributes.OverlayIP); r != "delivered" {
			t.Errorf("%s -> %s: %s, through %s", pr[0], pr[1], r, path)
		}
	}
	for _, l := range w.plans["a-2"].Links {
		if l.Site == "site-b" && (l.Allowed || !strings.Contains(l.Reason, "its hub b-1 does not link to us")) {
			t.Errorf("a-2's link to site-b, none of whose gateways it reaches: %+v", l)
		}
	}
}

// TestHubRandomMeshesDeliver: random hub meshes of three sites, of
// labels rolled out one gateway at a time, routes that differ and
// overlap, endpoints inside routes and gateways away: whatever a gateway
// sends into the interface is delivered, along a path the policy allows.
// The seeds are fixed; a failure names its seed and mesh.
func TestHubRandomMeshesDeliver(t *testing.T) {
	pols := []*policy.Policy{nil, mustPolicy(t, relayPolicy), mustPolicy(t, openPolicy), mustPolicy(t, oneHopPolicy)}
	labels := [][]string{
		{ClassesLabel, "pii,batch", "certified", "iso27001"},
		{ClassesLabel, "pii", "certified", "iso27001"},
		{ClassesLabel, "batch"},
		{ClassesLabel, "pii,batch"},
	}
	routes := []string{"10.10.0.0/16", "10.11.0.0/16", "10.10.128.0/24", "10.12.0.0/16", "10.0.0.0/8", "198.18.0.0/24", "198.18.0.0/25"}
	failed := 0
	for seed := range uint64(400) {
		r := rand.New(rand.NewPCG(seed, 3))
		var nodes []Node
		host := byte(10)
		for s := range 3 {
			for g := range 1 + r.IntN(3) {
				host++
				var rs []string
				for range 1 + r.IntN(2) {
					rs = append(rs, routes[r.IntN(len(routes))])
				}
				slices.Sort(rs)
				n := labelled(gw(fmt.Sprintf("%c-%d", 'a'+s, g+1), fmt.Sprintf("site-%c", 'a'+s), "DE", "aws", host, "", slices.Compact(rs)...), labels[r.IntN(len(labels))]...)
				if r.IntN(3) == 0 {
					n.Advert.Endpoints = []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, host}), 51820)}
				}
				nodes = append(nodes, n)
			}
		}
		pol := pols[r.IntN(len(pols))]
		var up, away []Node
		for _, n := range nodes {
			if r.IntN(5) == 0 {
				away = append(away, n)
			} else {
				up = append(up, n)
			}
		}
		probs := newSimAway(up, away, TopologyHub, pol).undelivered(pol)
		if len(probs) == 0 {
			continue
		}
		var mesh strings.Builder
		for _, n := range nodes {
			fmt.Fprintf(&mesh, "\n  %s %s %v %v", n.node(), n.site(), n.Attributes.Labels, n.Attributes.Routes)
		}
		t.Errorf("seed %d, policy %d, away %d: %s%s", seed, slices.Index(pols, pol), len(away), strings.Join(probs, "; "), mesh.String())
		if failed++; failed == 3 {
			t.FailNow()
		}
	}
}

// TestHubSecondAwayMayHaveBeenTheHub: two gateways of a site away that
// sort before its first one up were each perhaps its hub: b-1 went
// first, b-2 was the hub and carried 10.23.0.0/16 (a certificate
// re-issued with it), then went too. Which went first is not in the
// membership, so b-2's routes are held, though with b-2 gone first it
// was never the hub and they were never routed here: refused where the
// host's routes sent them until then, rather than sent in clear where
// they were routed.
func TestHubSecondAwayMayHaveBeenTheHub(t *testing.T) {
	a1 := gw("a-1", "site-a", "DE", "aws", 11, "x", "10.11.0.0/16")
	b1 := gw("b-1", "site-b", "DE", "aws", 21, "x", "10.21.0.0/16")
	b2 := gw("b-2", "site-b", "DE", "aws", 22, "x", "10.21.0.0/16", "10.23.0.0/16")
	b3 := gw("b-3", "site-b", "DE", "aws", 23, "x", "10.21.0.0/16")
	in := func(peers []Node, away ...Node) TopologyInput {
		var aw []AwayGateway
		for _, n := range away {
			aw = append(aw, AwayGateway{Node: n})
		}
		return TopologyInput{Self: a1, Peers: peers, Away: aw, Mode: TopologyHub, Now: now, MeshPrefix: mesh16}
	}
	if got := planState(Compute(in([]Node{b2, b3}, b1)), "10.23.0.0/16"); got != "routed" {
		t.Fatalf("setup: b-1 away, b-2 the hub: 10.23.0.0/16 is %s", got)
	}
	if got := planState(Compute(in([]Node{b3}, b1, b2)), "10.23.0.0/16"); got != "held" {
		t.Errorf("b-1 then b-2 away: 10.23.0.0/16, routed through b-2, is %s, want held", got)
	}
}

// TestHubLinkMemoChurn: with a memo, a plan is the plan computed afresh
// through random memberships, gateways coming and going, away or up,
// which move the hubs, and policies replaced: a decision is reused only
// as judged by the same gateway through the same hubs under the same
// policy, ours as the hubs' (LinkMemo.view).
func TestHubLinkMemoChurn(t *testing.T) {
	pols := []*policy.Policy{mustPolicy(t, relayPolicy), mustPolicy(t, openPolicy), mustPolicy(t, oneHopPolicy)}
	labels := [][]string{
		{ClassesLabel, "pii,batch", "certified", "iso27001"},
		{ClassesLabel, "pii", "certified", "iso27001"},
		{ClassesLabel, "batch"},
		{ClassesLabel, "pii,batch"},
	}
	for seed := range uint64(200) {
		r := rand.New(rand.NewPCG(seed, 9))
		var nodes []Node
		host := byte(10)
		for s := range 3 {
			for g := range 1 + r.IntN(3) {
				host++
				n := gw(fmt.Sprintf("%c-%d", 'a'+s, g+1), fmt.Sprintf("site-%c", 'a'+s), "DE", "aws", host, "", fmt.Sprintf("10.%d.0.0/16", 10+s), fmt.Sprintf("10.%d.%d.0/24", 20+s, g))
				nodes = append(nodes, labelled(n, labels[r.IntN(len(labels))]...))
			}
		}
		pol := pols[r.IntN(len(pols))]
		self := nodes[r.IntN(len(nodes))]
		var memo LinkMemo
		for step := range 6 {
			if r.IntN(4) == 0 {
				pol = pols[r.IntN(len(pols))]
			}
			var peers []Node
			var away []AwayGateway
			for _, n := range nodes {
				switch {
				case n.node() == self.node():
				case r.IntN(3) != 0:
					peers = append(peers, n)
				case r.IntN(2) == 0:
					away = append(away, AwayGateway{Node: n})
				}
			}
			in := TopologyInput{Self: self, Peers: peers, Away: away, Policy: pol, Mode: TopologyHub, Now: now, MeshPrefix: mesh16}
			fresh := fmt.Sprint(Compute(in))
			in.Memo = &memo
			if got := fmt.Sprint(Compute(in)); got != fresh {
				t.Fatalf("seed %d, step %d, %s: the memoized plan differs:\n fresh %s\n memo  %s", seed, step, self.node(), fresh, got)
			}
		}
	}
}

// TestHubRefusedLinkNamesItsRule: a link refused along a hub path names
// the rule that decided, as one refused direct does (README: every
// decision explainable). Through a hub the reason gave the policy's
// words alone, with no rule and no file:line.
func TestHubRefusedLinkNamesItsRule(t *testing.T) {
	pol := mustPolicy(t, `policy {
  name    = "t"
  version = 1
}
class "x" {
  allow "transit" {
    jurisdiction = ["DE"]
  }
}
`)
	a1 := gw("a-1", "site-a", "DE", "aws", 11, "x", "10.11.0.0/16")
	a2 := gw("a-2", "site-a", "DE", "aws", 12, "x", "10.11.0.0/16")
	b1 := gw("b-1", "site-b", "US", "aws", 21, "x", "10.21.0.0/16")
	for _, mode := range []string{TopologyFullMesh, TopologyHub} {
		plan := Compute(TopologyInput{Self: a2, Peers: []Node{a1, b1}, Policy: pol, Mode: mode, Now: now, MeshPrefix: mesh16})
		found := false
		for _, l := range plan.Links {
			if l.Site != "site-b" {
				continue
			}
			found = true
			if l.Allowed || !strings.Contains(l.Reason, "mesh.hcl:") {
				t.Errorf("%s: the link to site-b, refused, does not name the rule that refused it: %+v", mode, l)
			}
			if mode == TopologyHub && !strings.Contains(l.Reason, "through hub a-1") {
				t.Errorf("hub: the reason does not say the path goes through the hub: %s", l.Reason)
			}
		}
		if !found {
			t.Errorf("%s: no link to site-b in the plan", mode)
		}
	}
}
