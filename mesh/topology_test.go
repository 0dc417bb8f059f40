package mesh

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/policy"
)

var (
	mesh16 = netip.MustParsePrefix("100.96.0.0/16")
	now    = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
)

// gw builds a verified gateway: node, site, jurisdiction, provider, overlay
// host number, classes label, routes.
func gw(node, site, cc, provider string, host byte, classes string, routes ...string) Node {
	a := &certs.Attributes{
		Node: node, Site: site, Region: "r-" + site, Provider: provider, Jurisdiction: cc,
		OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, host}),
		Labels:    map[string]string{ClassesLabel: classes},
	}
	for _, r := range routes {
		a.Routes = append(a.Routes, netip.MustParsePrefix(r))
	}
	var key certs.WGPublicKey
	key[0], key[1] = host, 0xAA
	return Node{Attributes: a, Advert: certs.Advert{
		Node: node, Site: site, OverlayIP: a.OverlayIP, Routes: a.Routes, WireGuardKey: key,
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, host}), 51820), netip.MustParseAddrPort(fmt.Sprintf("[2001:db8::%x]:51820", host))},
	}}
}

var (
	zrh1 = gw("zrh-1", "onprem-zrh", "CH", "onprem", 1, "swiss-banking-secret,pii-eu", "10.1.0.0/16")
	zrh2 = gw("zrh-2", "onprem-zrh", "CH", "onprem", 2, "swiss-banking-secret,pii-eu", "10.1.0.0/16")
	gva1 = gw("gva-1", "onprem-gva", "CH", "onprem", 3, "swiss-banking-secret", "10.4.0.0/16")
	fra1 = gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "pii-eu,risk-batch", "10.2.0.0/16")
	fra2 = gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "pii-eu,risk-batch", "10.2.0.0/16")
	iad1 = gw("iad-1", "aws-us-east-1", "US", "aws", 6, "risk-batch", "10.3.0.0/16")
	sbs1 = gw("sbs-1", "onprem-sbs", "CH", "onprem", 7, "swiss-banking-secret", "10.5.0.0/16")
)

const meshPolicy = `policy {
  name    = "mesh-test"
  version = 1
}
class "swiss-banking-secret" {
  allow "transit" {
    jurisdiction = ["CH"]
  }
  allow "store" {
    jurisdiction = ["CH"]
  }
}
class "pii-eu" {
  allow "transit" {
    jurisdiction = ["CH", "DE", "FR"]
  }
  allow "store" {
    jurisdiction = ["CH", "DE", "FR"]
  }
}
class "risk-batch" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    site = ["*"]
  }
}
`

func mustPolicy(t testing.TB, src string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("mesh.hcl", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// summary renders a plan compactly: "node=allowed,ips@endpoint" per peer.
func summary(p Plan) string {
	var parts []string
	for _, pc := range p.Peers {
		ips := make([]string, len(pc.AllowedIPs))
		for i, a := range pc.AllowedIPs {
			ips[i] = a.String()
		}
		s := pc.Node + "=" + strings.Join(ips, ",")
		if pc.Keepalive > 0 {
			s += "+ka"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, " ")
}

func TestCompute(t *testing.T) {
	pol := mustPolicy(t, meshPolicy)
	tests := []struct {
		name      string
		self      Node
		peers     []Node
		policy    *policy.Policy
		mode      string
		nat       bool
		down      []string // gateways the data plane does not reach
		carriers  string   // site=node,... (only checked when set)
		want      string   // summary
		routes    string   // comma-joined
		refused   []string // sites refused by residency
		conflicts int
	}{
		{
			name: "alone", self: zrh1, want: "",
		},
		{
			name: "full mesh without policy", self: zrh1, peers: []Node{iad1, fra1},
			want:   "fra-1=10.2.0.0/16,100.96.0.4/32 iad-1=10.3.0.0/16,100.96.0.6/32",
			routes: "10.2.0.0/16,10.3.0.0/16",
		},
		{
			name: "residency: swiss-only site never links to the US", self: iad1, peers: []Node{gva1, fra1, zrh1}, policy: pol,
			want: "fra-1=10.2.0.0/16,100.96.0.4/32", routes: "10.2.0.0/16", refused: []string{"onprem-gva", "onprem-zrh"},
		},
		{
			name: "residency: shared class pii-eu links Zurich and Frankfurt", self: zrh1, peers: []Node{fra1, gva1, iad1}, policy: pol,
			want:   "fra-1=10.2.0.0/16,100.96.0.4/32 gva-1=10.4.0.0/16,100.96.0.3/32",
			routes: "10.2.0.0/16,10.4.0.0/16", refused: []string{"aws-us-east-1"},
		},
		{
			name: "residency: a site without classes links to nothing", self: zrh1,
			peers:  []Node{gw("x-1", "lab", "CH", "onprem", 9, "", "10.9.0.0/16")},
			policy: pol, want: "", refused: []string{"lab"},
		},
		{
			name: "same site always links, routes carried once", self: fra1, peers: []Node{fra2, zrh1, zrh2},
			want:   "fra-2=100.96.0.5/32 zrh-1=10.1.0.0/16,100.96.0.1/32 zrh-2=100.96.0.2/32",
			routes: "10.1.0.0/16",
		},
		{
			name: "the second gateway of a site does not carry its own site's routes to itself", self: fra2, peers: []Node{fra1, iad1},
			want:   "fra-1=100.96.0.4/32 iad-1=10.3.0.0/16,100.96.0.6/32",
			routes: "10.3.0.0/16",
		},
		{
			name: "HA: a site's first gateway unreachable, its routes go through the next", self: zrh1, peers: []Node{fra2, fra1, iad1}, down: []string{"fra-1"},
			want:     "fra-1=100.96.0.4/32 fra-2=10.2.0.0/16,100.96.0.5/32 iad-1=10.3.0.0/16,100.96.0.6/32",
			routes:   "10.2.0.0/16,10.3.0.0/16",
			carriers: "aws-eu-central-1=fra-2,aws-us-east-1=iad-1,onprem-zrh=zrh-1",
		},
		{
			name: "HA: every gateway of a site unreachable, the routes stay with the first", self: zrh1, peers: []Node{fra2, fra1}, down: []string{"fra-1", "fra-2"},
			want:     "fra-1=10.2.0.0/16,100.96.0.4/32 fra-2=100.96.0.5/32",
			routes:   "10.2.0.0/16",
			carriers: "aws-eu-central-1=fra-1,onprem-zrh=zrh-1",
		},
		{
			name: "HA: hub mode chooses hubs from the membership alone, as everyone must agree", self: zrh2, peers: []Node{zrh1, fra1, fra2, iad1}, down: []string{"zrh-1", "fra-1"}, mode: TopologyHub,
			want:     "zrh-1=10.2.0.0/16,10.3.0.0/16,100.96.0.1/32,100.96.0.4/32,100.96.0.5/32,100.96.0.6/32",
			routes:   "10.2.0.0/16,10.3.0.0/16",
			carriers: "aws-eu-central-1=fra-1,aws-us-east-1=iad-1,onprem-zrh=zrh-1",
		},
		{
			name: "behind NAT: keepalive on every peer", self: zrh1, peers: []Node{fra1}, nat: true,
			want: "fra-1=10.2.0.0/16,100.96.0.4/32+ka", routes: "10.2.0.0/16",
		},
		{
			name: "route claimed by two sites: first by name keeps it", self: zrh1,
			peers:  []Node{gw("b-1", "site-b", "DE", "aws", 10, "", "10.7.0.0/16"), gw("a-1", "site-a", "DE", "aws", 11, "", "10.7.0.0/24")},
			want:   "a-1=10.7.0.0/24,100.96.0.11/32 b-1=100.96.0.10/32",
			routes: "10.7.0.0/24", conflicts: 1,
		},
		{
			name: "peer route overlapping our own site is dropped", self: zrh1,
			peers: []Node{gw("b-1", "site-b", "DE", "aws", 10, "", "10.1.2.0/24")},
			want:  "b-1=100.96.0.10/32", conflicts: 1,
		},
		{
			name: "hub mode: hub peers with remote hubs and its own site", self: zrh1, peers: []Node{zrh2, fra1, fra2, iad1}, mode: TopologyHub,
			want:   "fra-1=10.2.0.0/16,100.96.0.4/32,100.96.0.5/32 iad-1=10.3.0.0/16,100.96.0.6/32 zrh-2=100.96.0.2/32",
			routes: "10.2.0.0/16,10.3.0.0/16",
		},
		{
			name: "hub mode: non-hub peers only with its hub, which relays everything", self: zrh2, peers: []Node{zrh1, fra1, fra2, iad1}, mode: TopologyHub,
			want:   "zrh-1=10.2.0.0/16,10.3.0.0/16,100.96.0.1/32,100.96.0.4/32,100.96.0.5/32,100.96.0.6/32",
			routes: "10.2.0.0/16,10.3.0.0/16",
		},
		{
			// zrh-2's re-issued certificate adds risk-batch, which may
			// go to the US; zrh-1, its hub, does not have it yet, and
			// does not link there: zrh-2 does not route iad-1 through it,
			// and shows no link to its site.
			name: "hub mode: a non-hub reaches only what its hub links to", mode: TopologyHub, policy: pol,
			self:  gw("zrh-2", "onprem-zrh", "CH", "onprem", 2, "swiss-banking-secret,pii-eu,risk-batch", "10.1.0.0/16"),
			peers: []Node{zrh1, fra1, fra2, iad1},
			want:  "zrh-1=10.2.0.0/16,100.96.0.1/32,100.96.0.4/32,100.96.0.5/32", routes: "10.2.0.0/16", conflicts: 1,
			refused: []string{"aws-us-east-1"},
		},
		{
			name: "hub mode respects residency", self: iad1, peers: []Node{zrh1, zrh2, fra1, fra2}, mode: TopologyHub, policy: pol,
			want: "fra-1=10.2.0.0/16,100.96.0.4/32,100.96.0.5/32", routes: "10.2.0.0/16", refused: []string{"onprem-zrh"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := TopologyInput{Self: tt.self, Peers: tt.peers, Policy: tt.policy, Mode: tt.mode, BehindNAT: tt.nat, Now: now, MeshPrefix: mesh16}
			if tt.down != nil {
				in.Down = map[string]bool{}
				for _, n := range tt.down {
					in.Down[n] = true
				}
			}
			plan := Compute(in)
			if tt.carriers != "" {
				var cs []string
				for _, s := range sortedKeys(plan.Carriers) {
					cs = append(cs, s+"="+plan.Carriers[s])
				}
				if got := strings.Join(cs, ","); got != tt.carriers {
					t.Errorf("carriers %s, want %s", got, tt.carriers)
				}
			}
			if got := summary(plan); got != tt.want {
				t.Errorf("peers:\n got %s\nwant %s", got, tt.want)
			}
			var routes []string
			for _, r := range plan.Routes {
				routes = append(routes, r.String())
			}
			if got := strings.Join(routes, ","); got != tt.routes {
				t.Errorf("routes %s, want %s", got, tt.routes)
			}
			var refused []string
			for _, l := range plan.Links {
				if !l.Allowed {
					refused = append(refused, l.Site)
					if l.Reason == "" {
						t.Errorf("refused link to %s has no reason", l.Site)
					}
				}
			}
			if !slices.Equal(refused, tt.refused) {
				t.Errorf("refused links %v, want %v", refused, tt.refused)
			}
			if len(plan.Conflicts) != tt.conflicts {
				t.Errorf("conflicts %v, want %d", plan.Conflicts, tt.conflicts)
			}
			for _, pc := range plan.Peers {
				if !pc.Endpoint.Addr().Is4() {
					t.Errorf("%s: endpoint %s is not of our (IPv4) family", pc.Node, pc.Endpoint)
				}
			}
			// Order of arrival must not matter.
			rev := slices.Clone(tt.peers)
			slices.Reverse(rev)
			in.Peers = rev
			if again := summary(Compute(in)); again != summary(plan) {
				t.Errorf("peer order changed the plan:\n%s\n%s", again, summary(plan))
			}
		})
	}
}

// TestComputeIsSymmetric: in a full mesh, if A peers with B then B peers
// with A — otherwise a tunnel would be half-configured.
func TestComputeIsSymmetric(t *testing.T) {
	pol := mustPolicy(t, meshPolicy)
	// zrh-3's certificate was re-issued with risk-batch, its siblings'
	// not yet (a label rollout): it links to the US site, they do not,
	// and the US gateway agrees with each.
	zrh3 := gw("zrh-3", "onprem-zrh", "CH", "onprem", 8, "pii-eu,risk-batch", "10.1.0.0/16")
	all := []Node{zrh1, zrh2, zrh3, gva1, fra1, fra2, iad1, sbs1}
	peersOf := map[string]map[string]bool{}
	for i, self := range all {
		others := append(slices.Clone(all[:i]), all[i+1:]...)
		plan := Compute(TopologyInput{Self: self, Peers: others, Policy: pol, Now: now, MeshPrefix: mesh16})
		peersOf[self.node()] = map[string]bool{}
		for _, pc := range plan.Peers {
			peersOf[self.node()][pc.Node] = true
		}
	}
	for a, ps := range peersOf {
		for b := range ps {
			if !peersOf[b][a] {
				t.Errorf("%s peers with %s but not the other way round", a, b)
			}
		}
	}
	if peersOf["iad-1"]["sbs-1"] || peersOf["sbs-1"]["iad-1"] {
		t.Error("US site linked to a swiss-banking-secret-only site")
	}
	if !peersOf["iad-1"]["zrh-3"] || peersOf["iad-1"]["zrh-1"] {
		t.Errorf("the US gateway's peers %v: want zrh-3, which handles risk-batch, and not zrh-1", peersOf["iad-1"])
	}
	// And Zurich's routes go through the one it links to.
	plan := Compute(TopologyInput{Self: iad1, Peers: []Node{zrh1, zrh2, zrh3}, Policy: pol, Now: now, MeshPrefix: mesh16})
	if c := plan.Carriers["onprem-zrh"]; c != "zrh-3" || !slices.Contains(plan.Routes, netip.MustParsePrefix("10.1.0.0/16")) {
		t.Errorf("from the US: Zurich carried by %s, routes %v; want zrh-3 and 10.1.0.0/16", c, plan.Routes)
	}
}

func TestAnyOverlap(t *testing.T) {
	pc := func(prefixes ...string) PeerConfig {
		var p PeerConfig
		for _, s := range prefixes {
			p.AllowedIPs = append(p.AllowedIPs, netip.MustParsePrefix(s))
		}
		return p
	}
	tests := []struct {
		name  string
		peers []PeerConfig
		want  bool
	}{
		{"none", nil, false},
		{"disjoint", []PeerConfig{pc("100.96.0.1/32", "10.1.0.0/16"), pc("100.96.0.2/32", "10.2.0.0/16")}, false},
		{"adjacent, not overlapping", []PeerConfig{pc("10.0.0.0/25"), pc("10.0.0.128/25")}, false},
		{"equal", []PeerConfig{pc("10.1.0.0/16"), pc("10.1.0.0/16")}, true},
		{"contained, later peer", []PeerConfig{pc("10.1.0.0/16"), pc("10.1.7.0/24")}, true},
		{"container, later peer", []PeerConfig{pc("10.1.7.0/24"), pc("10.0.0.0/8")}, true},
		{"contained, not adjacent in order", []PeerConfig{pc("10.0.0.0/8", "100.96.0.1/32"), pc("10.200.0.0/16"), pc("10.9.0.0/16")}, true},
		{"IPv6 inside IPv6", []PeerConfig{pc("fd00::/48"), pc("fd00:0:0:1::/64")}, true},
		{"IPv4 and IPv6 never overlap", []PeerConfig{pc("0.0.0.0/0"), pc("::/0")}, false},
		{"IPv4 default route contains everything", []PeerConfig{pc("192.0.2.1/32"), pc("0.0.0.0/0")}, true},
		{"IPv4 stack pops, then a container", []PeerConfig{pc("10.0.0.0/24"), pc("10.0.2.0/24"), pc("10.0.3.5/32"), pc("10.0.3.0/24")}, true},
		{"IPv4 neighbours at the top of the range", []PeerConfig{pc("255.255.255.254/32"), pc("255.255.255.255/32"), pc("255.255.255.0/25")}, false},
	}
	for _, tt := range tests {
		if got := anyOverlap(tt.peers); got != tt.want {
			t.Errorf("%s: anyOverlap = %v, want %v", tt.name, got, tt.want)
		}
	}
	// Which overlap: only they are settled against each other.
	got := overlapping([]PeerConfig{pc("10.0.0.0/8", "100.96.0.1/32"), pc("10.200.0.0/16", "192.0.2.0/24"), pc("10.9.0.0/16", "fd00::/48"), pc("fd00:0:0:1::/64", "fd01::/48")})
	var names []string
	for p := range got {
		names = append(names, p.String())
	}
	slices.Sort(names)
	if want := []string{"10.0.0.0/8", "10.200.0.0/16", "10.9.0.0/16", "fd00:0:0:1::/64", "fd00::/48"}; !slices.Equal(names, want) {
		t.Errorf("overlapping = %v, want %v", names, want)
	}
}

// BenchmarkCompute1000 is one reconcile's planning in a 1,000-gateway
// full mesh under a residency policy.
func BenchmarkCompute1000(b *testing.B) {
	pol := mustPolicy(b, meshPolicy)
	var peers []Node
	for i := range 1000 {
		n := gw(fmt.Sprintf("gw%04d", i), fmt.Sprintf("site-%d", i), "CH", "onprem", 0, "swiss-banking-secret", fmt.Sprintf("10.%d.%d.0/24", i/256, i%256))
		n.Attributes.OverlayIP = netip.AddrFrom4([4]byte{100, 96, byte(i / 256), byte(i%256 + 1)})
		n.Advert.OverlayIP = n.Attributes.OverlayIP
		n.Advert.WireGuardKey[0], n.Advert.WireGuardKey[1] = byte(i), byte(i>>8)
		peers = append(peers, n)
	}
	for _, memo := range []bool{false, true} {
		b.Run(fmt.Sprintf("memo=%v", memo), func(b *testing.B) {
			in := TopologyInput{Self: sbs1, Peers: peers, Policy: pol, Now: now, MeshPrefix: netip.MustParsePrefix("100.96.0.0/12")}
			if memo {
				in.Memo = &LinkMemo{}
			}
			b.ReportAllocs()
			for b.Loop() {
				if p := Compute(in); len(p.Peers) != 1000 {
					b.Fatalf("%d peers", len(p.Peers))
				}
			}
		})
	}
}

// BenchmarkComputeHub1000 is one reconcile's planning in hub mode: 250
// sites of four gateways under a residency policy, planned by a site's
// hub and by one of its other gateways (which judges each link along the
// hubs its data passes, and settles the other sites' claims as its hub).
func BenchmarkComputeHub1000(b *testing.B) {
	pol := mustPolicy(b, meshPolicy)
	var nodes []Node
	for i := range 1000 {
		site := i / 4
		n := gw(fmt.Sprintf("s%03d-%c", site, 'a'+i%4), fmt.Sprintf("site-%d", site), "CH", "onprem", 0, "swiss-banking-secret", fmt.Sprintf("10.%d.%d.0/24", site/256, site%256))
		n.Attributes.OverlayIP = netip.AddrFrom4([4]byte{100, 96, byte(i / 256), byte(i%256 + 1)})
		n.Advert.OverlayIP = n.Attributes.OverlayIP
		n.Advert.WireGuardKey[0], n.Advert.WireGuardKey[1] = byte(i), byte(i>>8)
		n.Advert.Endpoints = []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, byte(100 + i/256), byte(i % 256)}), 51820)}
		nodes = append(nodes, n)
	}
	for _, self := range []int{0, 1} {
		for _, memo := range []bool{false, true} {
			b.Run(fmt.Sprintf("hub=%v/memo=%v", self == 0, memo), func(b *testing.B) {
				peers := slices.Delete(slices.Clone(nodes), self, self+1)
				in := TopologyInput{Self: nodes[self], Peers: peers, Mode: TopologyHub, Policy: pol, Now: now, MeshPrefix: netip.MustParsePrefix("100.96.0.0/12")}
				if memo {
					in.Memo = &LinkMemo{}
				}
				b.ReportAllocs()
				for b.Loop() {
					if p := Compute(in); len(p.Peers) == 0 {
						b.Fatal("no peers")
					}
				}
			})
		}
	}
}

// TestHubPlanAllocs: a non-hub's plan with a warm memo allocates less
// than once per site, whatever the policy lets it reach: what its hub
// links to (relayed) was judged afresh for every other site's hub at
// every plan (26,584 allocations at 500 sites under max_hops = 1, 92 in
// a full mesh), and the hubs between it and each peer (hubVia) and each
// site's entry at the hub were allocated one by one.
func TestHubPlanAllocs(t *testing.T) {
	const sites = 250
	var peers []Node
	for i := range 2 * sites {
		n := gw(fmt.Sprintf("gw%04d", i), fmt.Sprintf("site-%03d", i/2), "CH", "onprem", 0, "pii", fmt.Sprintf("10.%d.%d.0/24", i/256, i%256))
		n.Attributes.OverlayIP = netip.AddrFrom4([4]byte{100, 96, byte(i / 256), byte(i%256 + 1)})
		n.Advert.OverlayIP = n.Attributes.OverlayIP
		n.Advert.WireGuardKey[0], n.Advert.WireGuardKey[1] = byte(i), byte(i>>8)
		peers = append(peers, n)
	}
	self := peers[1] // gw0001, site-000's non-hub
	others := append([]Node{peers[0]}, peers[2:]...)
	for _, c := range []struct{ name, policy string }{{"open", openPolicy}, {"max_hops = 1", oneHopPolicy}} {
		in := TopologyInput{Self: self, Peers: others, Policy: mustPolicy(t, c.policy), Mode: TopologyHub, Now: now, MeshPrefix: netip.MustParsePrefix("100.96.0.0/12"), Memo: &LinkMemo{}}
		Compute(in)
		if allocs := testing.AllocsPerRun(3, func() { Compute(in) }); allocs >= sites {
			t.Errorf("%s: %.0f allocations a plan of a non-hub, %d sites", c.name, allocs, sites)
		}
	}
}

// BenchmarkComputeContested: a thousand peers of 32 routes each, two of
// which claim overlapping prefixes: only the overlapping claims are
// settled against each other (every prefix was checked against every one
// kept before it, once any overlap was found: seconds per plan).
func BenchmarkComputeContested(b *testing.B) {
	var peers []Node
	for i := range 1000 {
		var routes []string
		for r := range 32 {
			routes = append(routes, fmt.Sprintf("10.%d.%d.0/24", 100+i/8, (i%8)*32+r))
		}
		if i == 999 {
			routes[31] = "10.100.0.0/23" // overlaps gw0000's first two
		}
		n := gw(fmt.Sprintf("gw%04d", i), fmt.Sprintf("site-%d", i), "CH", "onprem", 0, "swiss-banking-secret", routes...)
		n.Attributes.OverlayIP = netip.AddrFrom4([4]byte{100, 97, byte(i / 256), byte(i%256 + 1)})
		n.Advert.OverlayIP = n.Attributes.OverlayIP
		n.Advert.WireGuardKey[0], n.Advert.WireGuardKey[1] = byte(i), byte(i>>8)
		peers = append(peers, n)
	}
	in := TopologyInput{Self: sbs1, Peers: peers, Now: now, MeshPrefix: netip.MustParsePrefix("100.96.0.0/12")}
	b.ReportAllocs()
	for b.Loop() {
		if p := Compute(in); len(p.Conflicts) != 1 {
			b.Fatalf("conflicts %q", p.Conflicts)
		}
	}
}

// BenchmarkComputeAway: a thousand gateways of 32 routes, of which a
// hundred are away (a cloud region down): what holding their routes adds
// to a plan of the other nine hundred.
func BenchmarkComputeAway(b *testing.B) {
	var nodes []Node
	var gossip []netip.Addr
	for i := range 1000 {
		var routes []string
		for r := range 32 {
			routes = append(routes, fmt.Sprintf("10.%d.%d.0/24", 100+i/8, (i%8)*32+r))
		}
		n := gw(fmt.Sprintf("gw%04d", i), fmt.Sprintf("site-%d", i), "CH", "onprem", 0, "swiss-banking-secret", routes...)
		n.Attributes.OverlayIP = netip.AddrFrom4([4]byte{100, 97, byte(i / 256), byte(i%256 + 1)})
		n.Advert.OverlayIP = n.Attributes.OverlayIP
		n.Advert.WireGuardKey[0], n.Advert.WireGuardKey[1] = byte(i), byte(i>>8)
		a := netip.AddrFrom4([4]byte{198, 18, byte(i / 256), byte(i % 256)})
		n.Advert.Endpoints = []netip.AddrPort{netip.AddrPortFrom(a, 51820)}
		gossip = append(gossip, a)
		nodes = append(nodes, n)
	}
	for _, away := range []int{0, 100} {
		b.Run(fmt.Sprintf("away=%d", away), func(b *testing.B) {
			var gone []AwayGateway
			for i, n := range nodes[:away] {
				gone = append(gone, AwayGateway{Node: n, Gossip: gossip[i]})
			}
			in := TopologyInput{Self: sbs1, Peers: nodes[away:], Away: gone, Now: now, MeshPrefix: netip.MustParsePrefix("100.96.0.0/12")}
			b.ReportAllocs()
			for b.Loop() {
				if p := Compute(in); len(p.Held) != away {
					b.Fatalf("%d sites held, want %d", len(p.Held), away)
				}
			}
		})
	}
}

// TestLinkMemo: plans computed with a memo equal plans computed afresh,
// across membership changes, a new policy, an exception expiring, and our
// own certificate renewed with other classes (a link judged for the
// classes we carried is not the link for those we carry now).
func TestLinkMemo(t *testing.T) {
	withException := meshPolicy + `
exception "iad-dr" {
  class    = "swiss-banking-secret"
  action   = "transit"
  site     = ["aws-us-east-1"]
  category = "waiver"
  reason   = "DR rehearsal"
  approver = "CISO"
  ticket   = "GRC-7"
  expires  = "2026-11-30T00:00:00Z"
}`
	polA, polB := mustPolicy(t, meshPolicy), mustPolicy(t, withException)
	iadRisk := gw("iad-9", "aws-us-east-1", "US", "aws", 9, "swiss-banking-secret", "10.9.0.0/16")
	zrhRisk := gw("zrh-9", "onprem-zrh", "CH", "onprem", 8, "swiss-banking-secret", "10.1.0.0/16")
	zrhBatch := gw("zrh-9", "onprem-zrh", "CH", "onprem", 8, "risk-batch", "10.1.0.0/16") // zrh-9 renewed
	expired := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	steps := []struct {
		name   string
		self   Node
		peers  []Node
		policy *policy.Policy
		at     time.Time
	}{
		{"first plan", zrhRisk, []Node{zrh2, fra1, iad1}, polA, now},
		{"a member joins", zrhRisk, []Node{zrh2, fra1, fra2, iad1, gva1}, polA, now},
		{"a member leaves", zrhRisk, []Node{zrh2, fra2, gva1}, polA, now},
		{"a new policy with an exception", zrhRisk, []Node{zrh2, fra1, iadRisk, gva1}, polB, now},
		{"the exception expires", zrhRisk, []Node{zrh2, fra1, iadRisk, gva1}, polB, expired},
		{"our certificate renewed with other classes", zrhBatch, []Node{zrh2, fra1, iadRisk, gva1}, polB, expired},
	}
	var memo LinkMemo
	for _, st := range steps {
		in := TopologyInput{Self: st.self, Peers: st.peers, Policy: st.policy, Now: st.at, MeshPrefix: mesh16}
		fresh := Compute(in)
		in.Memo = &memo
		memoized := Compute(in)
		if a, b := fmt.Sprint(fresh), fmt.Sprint(memoized); a != b {
			t.Errorf("%s: memoized plan differs:\n fresh %s\n memo  %s", st.name, a, b)
		}
	}
	// The exception matters: without the memo noticing its expiry, the
	// last two steps would agree.
	in := TopologyInput{Self: zrhRisk, Peers: []Node{iadRisk}, Policy: polB, MeshPrefix: mesh16}
	in.Now = now
	before := Compute(in)
	in.Now = expired
	after := Compute(in)
	if before.Links[0].Allowed == after.Links[0].Allowed {
		t.Fatalf("test policy: the exception changes nothing (%v / %v)", before.Links, after.Links)
	}
	// The renewal matters too: fra-1 shares a class with zrh-9 only after
	// it.
	in = TopologyInput{Self: zrhRisk, Peers: []Node{fra1}, Policy: polB, Now: expired, MeshPrefix: mesh16}
	before = Compute(in)
	in.Self = zrhBatch
	after = Compute(in)
	if before.Links[0].Allowed == after.Links[0].Allowed {
		t.Fatalf("test policy: the renewal changes nothing (%v / %v)", before.Links, after.Links)
	}
}

// TestNextKeys: a peer rotating its key gets a second entry for the next
// key, with no allowed IPs; a next key that is already someone's key (a
// peer's, one of ours) is left out, and one that two peers name is left
// out for both, so that no member can take over another's entry. Next
// keys carry no proof of possession: this is what protects them.
func TestNextKeys(t *testing.T) {
	rotating, thief := fra1, iad1
	rotating.Advert.NextWireGuardKey = certs.WGPublicKey{0x42}
	thief.Advert.NextWireGuardKey = zrh2.Advert.WireGuardKey // another peer's key
	selfThief := fra2
	selfThief.Advert.NextWireGuardKey = zrh1.Advert.WireGuardKey // ours
	nextThief := sbs1
	nextThief.Advert.NextWireGuardKey = certs.WGPublicKey{0x77} // ours, the one we are rotating to
	victim, copycat := zrh2, gva1                               // gva-1 comes first by name
	victim.Advert.NextWireGuardKey = certs.WGPublicKey{0x55}
	copycat.Advert.NextWireGuardKey = victim.Advert.NextWireGuardKey
	self := zrh1
	self.Advert.NextWireGuardKey = certs.WGPublicKey{0x77}
	plan := Compute(TopologyInput{Self: self, Peers: []Node{rotating, thief, victim, selfThief, nextThief, copycat}, Now: now, MeshPrefix: mesh16})
	var next []PeerConfig
	for _, pc := range plan.Peers {
		if pc.Next {
			next = append(next, pc)
		}
	}
	if len(next) != 1 || next[0].Node != "fra-1" || next[0].PublicKey != (certs.WGPublicKey{0x42}) || len(next[0].AllowedIPs) != 0 {
		t.Fatalf("next-key entries %+v, want only fra-1's, routing nothing", next)
	}
	if len(plan.Conflicts) != 5 {
		t.Errorf("conflicts %v, want the three taken keys and the twice-named one (twice) reported", plan.Conflicts)
	}
	for _, pc := range plan.Peers {
		if pc.Node == "zrh-2" && pc.PublicKey != zrh2.Advert.WireGuardKey {
			t.Errorf("zrh-2's entry was taken over: %+v", pc)
		}
	}
}

// TestSharedKeysDropped: a peer advertising a current WireGuard key that
// is ours or an earlier peer's is no peer (WireGuard keeps one entry per
// key, and the second would take over the first's allowed IPs and
// endpoint); the others' entries stand and the clash is reported.
func TestSharedKeysDropped(t *testing.T) {
	decoy, thief, selfThief := fra1, iad1, fra2
	thief.Advert.WireGuardKey = zrh2.Advert.WireGuardKey
	selfThief.Advert.WireGuardKey = zrh1.Advert.WireGuardKey
	// Keys are indexed by their first bytes: one that shares them with
	// zrh-2's, and comes first, is another key.
	decoy.Advert.WireGuardKey = zrh2.Advert.WireGuardKey
	decoy.Advert.WireGuardKey[31] ^= 1
	fra1 := decoy
	plan := Compute(TopologyInput{Self: zrh1, Peers: []Node{fra1, thief, zrh2, selfThief}, Now: now, MeshPrefix: mesh16})
	byKey := map[certs.WGPublicKey][]string{}
	for _, pc := range plan.Peers {
		byKey[pc.PublicKey] = append(byKey[pc.PublicKey], pc.Node)
	}
	if got := byKey[zrh2.Advert.WireGuardKey]; !slices.Equal(got, []string{"iad-1"}) && !slices.Equal(got, []string{"zrh-2"}) {
		t.Fatalf("entries for zrh-2's key: %v, want exactly one", got)
	}
	if got := byKey[zrh1.Advert.WireGuardKey]; len(got) != 0 {
		t.Fatalf("a peer holds our own key: %v", got)
	}
	if _, ok := byKey[fra1.Advert.WireGuardKey]; !ok || len(plan.Conflicts) != 2 {
		t.Fatalf("fra-1 kept %v; conflicts %v, want the two shared keys reported", ok, plan.Conflicts)
	}
}

// TestRoutesCoveringTheUnderlay: a site prefix that holds a peer's
// endpoint (a private WAN whose cloud gateway sits inside its site's
// network) is not routed into the interface, where the tunnel's own
// packets would loop; other prefixes of the peer are.
func TestRoutesCoveringTheUnderlay(t *testing.T) {
	fra := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "pii-eu", "10.2.0.0/16", "192.0.0.0/8", "2001:db8::/64", "203.0.113.0/24")
	iad := gw("iad-1", "aws-us-east-1", "US", "aws", 6, "pii-eu", "10.3.0.0/16")
	plan := Compute(TopologyInput{Self: zrh1, Peers: []Node{fra, iad}, Now: now, MeshPrefix: mesh16})
	// fra-1 is dialled at its IPv4 endpoint; its IPv6 one, inside its
	// IPv6 prefix, keeps that prefix out too (WireGuard moves the tunnel
	// there once fra-1 sends from it).
	if got, want := summary(plan), "fra-1=10.2.0.0/16,100.96.0.4/32,203.0.113.0/24 iad-1=10.3.0.0/16,100.96.0.6/32"; got != want {
		t.Fatalf("plan %s\nwant %s", got, want)
	}
	if want := []string{
		"192.0.0.0/8 of fra-1 covers 192.0.2.4, the underlay address of fra-1's tunnel; not routed to it",
		"2001:db8::/64 of fra-1 covers 2001:db8::4, an underlay address fra-1 advertises (its tunnel moves there once it sends from it); not routed to it",
	}; !slices.Equal(plan.Conflicts, want) {
		t.Fatalf("conflicts %q\nwant %q", plan.Conflicts, want)
	}
	for _, r := range plan.Routes {
		if r.Contains(netip.MustParseAddr("192.0.2.4")) || r.Contains(netip.MustParseAddr("192.0.2.6")) {
			t.Fatalf("route %s into the interface covers a peer's endpoint", r)
		}
	}
	// The same over IPv6: a gateway with only an IPv6 endpoint.
	self6 := zrh1
	self6.Advert.Endpoints = self6.Advert.Endpoints[1:]
	plan = Compute(TopologyInput{Self: self6, Peers: []Node{fra}, Now: now, MeshPrefix: mesh16})
	if got, want := summary(plan), "fra-1=10.2.0.0/16,100.96.0.4/32,203.0.113.0/24"; got != want || len(plan.Conflicts) != 2 ||
		!strings.Contains(plan.Conflicts[1], "2001:db8::/64 of fra-1 covers 2001:db8::4, the underlay address of fra-1's tunnel") {
		t.Fatalf("over IPv6: plan %s, conflicts %q\nwant %s", got, plan.Conflicts, want)
	}
}

// TestRoutesCoveringAnEndpointNotDialled: a site prefix that holds any
// endpoint a gateway of that site advertises stays out of the interface,
// not only one holding the endpoint dialled. A cloud site routes its
// VPC's IPv6 range, which holds its gateway's own IPv6 address (no NAT in
// IPv6); dialled at its IPv4 endpoint, the gateway still sends from its
// IPv6 one when it dials us there, WireGuard moves our peer entry to it,
// and nothing moves it back (the advertised endpoints did not change):
// routed into the interface, the range then took the tunnel's own packets.
// The address a gateway gossips at counts too: routed into the interface,
// gossip to it arrived through the tunnel, from an address the gateway
// does not take from us, and it flapped dead and alive. Endpoints of other
// sites' gateways, and advertised ones inside the overlay range, still
// never unroute a certified prefix.
func TestRoutesCoveringAnEndpointNotDialled(t *testing.T) {
	self := zrh1
	self.Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:51820"), netip.MustParseAddrPort("[2001:db8:a::1]:51820")}
	at := func(n Node, endpoints ...string) Node {
		n.Advert.Endpoints = nil
		for _, e := range endpoints {
			n.Advert.Endpoints = append(n.Advert.Endpoints, netip.MustParseAddrPort(e))
		}
		return n
	}
	gossipAt := func(n Node, a string) Node {
		n.Gossip = netip.MustParseAddrPort(a)
		return n
	}
	vpc := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "risk-batch", "10.2.0.0/16", "2001:db8:b::/56")
	for _, tc := range []struct {
		name     string
		peers    []Node
		mode     string
		want     string // summary
		dialled  string // fra-1's endpoint
		conflict string // "": none
	}{
		{"its own IPv6 address, IPv6 listed first", []Node{at(vpc, "[2001:db8:b::5]:51820", "198.51.100.5:51820")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32", "198.51.100.5:51820",
			"2001:db8:b::/56 of fra-1 covers 2001:db8:b::5, an underlay address fra-1 advertises (its tunnel moves there once it sends from it); not routed to it"},
		{"its own IPv6 address, through hubs", []Node{at(vpc, "198.51.100.5:51820", "[2001:db8:b::5]:51820")}, TopologyHub,
			"fra-1=10.2.0.0/16,100.96.0.4/32", "198.51.100.5:51820",
			"2001:db8:b::/56 of fra-1 covers 2001:db8:b::5, an underlay address fra-1 advertises (its tunnel moves there once it sends from it); not routed to it"},
		{"a sibling's IPv6 address", []Node{at(vpc, "198.51.100.5:51820"), at(fra2, "198.51.100.6:51820", "[2001:db8:b::6]:51820")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32 fra-2=100.96.0.5/32", "198.51.100.5:51820",
			"2001:db8:b::/56 of fra-1 covers 2001:db8:b::6, an underlay address fra-2 advertises (its tunnel moves there once it sends from it); not routed to it"},
		{"another site's gateway advertises an address inside", []Node{at(vpc, "198.51.100.5:51820"), at(iad1, "198.51.100.6:51820", "[2001:db8:b::6]:51820")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32,2001:db8:b::/56 iad-1=10.3.0.0/16,100.96.0.6/32", "198.51.100.5:51820", ""},
		{"a sibling advertises an overlay address", []Node{at(vpc, "198.51.100.5:51820"), at(fra2, "198.51.100.6:51820", "100.96.0.4:51820")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32,2001:db8:b::/56 fra-2=100.96.0.5/32", "198.51.100.5:51820", ""},
		{"its gossip address", []Node{gossipAt(at(vpc, "198.51.100.5:51820"), "[2001:db8:b::7]:7946")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32", "198.51.100.5:51820",
			"2001:db8:b::/56 of fra-1 covers 2001:db8:b::7, the address fra-1 gossips at (its gossip must not go through the tunnel); not routed to it"},
		{"another site's gateway gossips inside", []Node{at(vpc, "198.51.100.5:51820"), gossipAt(at(iad1, "198.51.100.6:51820"), "[2001:db8:b::7]:7946")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32,2001:db8:b::/56 iad-1=10.3.0.0/16,100.96.0.6/32", "198.51.100.5:51820", ""},
	} {
		plan := Compute(TopologyInput{Self: self, Peers: tc.peers, Now: now, MeshPrefix: mesh16, Mode: tc.mode})
		if got := summary(plan); got != tc.want {
			t.Errorf("%s: plan %s\nwant %s", tc.name, got, tc.want)
		}
		var want []string
		if tc.conflict != "" {
			want = []string{tc.conflict}
		}
		if !slices.Equal(plan.Conflicts, want) {
			t.Errorf("%s: conflicts %q\nwant %q", tc.name, plan.Conflicts, want)
		}
		for _, pc := range plan.Peers {
			if pc.Node == "fra-1" && pc.Endpoint.String() != tc.dialled {
				t.Errorf("%s: fra-1 dialled at %v, want %s", tc.name, pc.Endpoint, tc.dialled)
			}
		}
		// Wherever WireGuard follows a gateway of the site, its tunnel's
		// packets must not be routed into the interface.
		for _, p := range tc.peers {
			for _, e := range append(slices.Clone(p.Advert.Endpoints), p.Gossip) {
				for _, r := range plan.Routes {
					if p.site() == "aws-eu-central-1" && e.IsValid() && !mesh16.Contains(e.Addr()) && r.Contains(e.Addr()) {
						t.Errorf("%s: route %s into the interface covers %s, where %s may send from", tc.name, r, e.Addr(), p.node())
					}
				}
			}
		}
	}
}

// TestForeignEndpointIsNotDialled: an endpoint is only advertised, a
// site's routes and overlay addresses are certified. A gateway that
// advertises an endpoint inside another site's network, or at another
// gateway's overlay address, is not dialled there; the other site's
// prefix stays routed (before, it was unrouted for every gateway: one
// insider could take any site out of the mesh). A site's routes that
// cover its own gateways' underlay (a private WAN) still give way.
func TestForeignEndpointIsNotDialled(t *testing.T) {
	at := func(n Node, endpoint string) Node {
		n.Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort(endpoint)}
		return n
	}
	for _, tc := range []struct {
		name      string
		peers     []Node
		mode      string
		want      string // summary
		undialled string // the peer whose endpoint is not used
		conflict  string
	}{
		{"inside another site's routes", []Node{fra1, at(iad1, "10.2.0.1:51820")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32 iad-1=10.3.0.0/16,100.96.0.6/32", "iad-1",
			"endpoint 10.2.0.1:51820 of iad-1 is inside 10.2.0.0/16 of fra-1, another site's; not dialled"},
		{"at another gateway's overlay address", []Node{fra1, at(iad1, "100.96.0.4:51820")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32 iad-1=10.3.0.0/16,100.96.0.6/32", "iad-1",
			"endpoint 100.96.0.4:51820 of iad-1 is inside the mesh overlay range 100.96.0.0/16; not dialled"},
		{"at a sibling's overlay address", []Node{fra1, at(fra2, "100.96.0.4:51820")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32 fra-2=100.96.0.5/32", "fra-2",
			"endpoint 100.96.0.4:51820 of fra-2 is inside the mesh overlay range 100.96.0.0/16; not dialled"},
		{"inside its own site's routes (a private WAN)", []Node{fra1, at(fra2, "10.2.0.9:51820")}, TopologyFullMesh,
			"fra-1=100.96.0.4/32 fra-2=100.96.0.5/32", "",
			"10.2.0.0/16 of fra-1 covers 10.2.0.9, the underlay address of fra-2's tunnel; not routed to it"},
		{"inside a prefix not routed (it overlaps another's): dialled", []Node{fra1, gw("gva-1", "onprem-gva", "CH", "onprem", 3, "pii-eu", "10.2.0.0/15"),
			at(gw("iad-1", "aws-us-east-1", "US", "aws", 6, "pii-eu", "10.30.0.0/16"), "10.3.0.1:51820")}, TopologyFullMesh,
			"fra-1=10.2.0.0/16,100.96.0.4/32 gva-1=100.96.0.3/32 iad-1=10.30.0.0/16,100.96.0.6/32", "",
			"10.2.0.0/15 of gva-1 overlaps 10.2.0.0/16 of fra-1; not routed to it"},
		{"inside another site's routes, through hubs", []Node{at(fra1, "10.3.0.1:51820"), iad1}, TopologyHub,
			"fra-1=10.2.0.0/16,100.96.0.4/32 iad-1=10.3.0.0/16,100.96.0.6/32", "fra-1",
			"endpoint 10.3.0.1:51820 of fra-1 is inside 10.3.0.0/16 of iad-1, another site's; not dialled"},
	} {
		plan := Compute(TopologyInput{Self: zrh1, Peers: tc.peers, Now: now, MeshPrefix: mesh16, Mode: tc.mode})
		if got := summary(plan); got != tc.want {
			t.Errorf("%s: plan %s\nwant %s", tc.name, got, tc.want)
		}
		if len(plan.Conflicts) != 1 || plan.Conflicts[0] != tc.conflict {
			t.Errorf("%s: conflicts %q\nwant %q", tc.name, plan.Conflicts, tc.conflict)
		}
		for _, pc := range plan.Peers {
			if dialled := pc.Endpoint.IsValid(); dialled == (pc.Node == tc.undialled) {
				t.Errorf("%s: %s's endpoint %v", tc.name, pc.Node, pc.Endpoint)
			}
		}
	}
}

// TestContestedPrefixSameSiteWhateverTheView: a prefix two sites claim
// goes to the same site from every gateway, whichever of that site's
// gateways each sees carrying it. (Settled by gateway name, a viewer that
// judged site-a's first gateway down gave the prefix to site-b, while its
// sibling, seeing all up, gave it to site-a: asymmetric routes.)
func TestContestedPrefixSameSiteWhateverTheView(t *testing.T) {
	a1, x1 := gw("a-1", "site-a", "DE", "aws", 10, "pii-eu", "10.7.0.0/16"), gw("x-1", "site-a", "DE", "aws", 11, "pii-eu", "10.7.0.0/16")
	m1 := gw("m-1", "site-b", "DE", "aws", 12, "pii-eu", "10.7.0.0/16")
	c1, c2 := gw("c-1", "site-c", "DE", "aws", 20, "pii-eu"), gw("c-2", "site-c", "DE", "aws", 21, "pii-eu")
	owner := func(self Node, down map[string]bool) string {
		plan := Compute(TopologyInput{Self: self, Peers: []Node{a1, c1, c2, m1, x1}, Now: now, MeshPrefix: mesh16, Down: down})
		for _, pc := range plan.Peers {
			if slices.Contains(pc.AllowedIPs, netip.MustParsePrefix("10.7.0.0/16")) {
				return pc.Site
			}
		}
		return ""
	}
	if o1, o2 := owner(c1, nil), owner(c2, map[string]bool{"a-1": true}); o1 != "site-a" || o2 != "site-a" {
		t.Errorf("10.7.0.0/16 goes to %q from c-1 (all up) and to %q from c-2 (a-1 down); want site-a from both", o1, o2)
	}
}

// TestMappedSelfEndpointIsIPv4: our own endpoint written as an
// IPv4-mapped IPv6 address is an IPv4 underlay: peers are dialled at
// their IPv4 endpoints, not over IPv6 (which an IPv4-only underlay
// cannot carry).
func TestMappedSelfEndpointIsIPv4(t *testing.T) {
	self := zrh1
	self.Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("[::ffff:192.0.2.1]:51820")}
	plan := Compute(TopologyInput{Self: self, Peers: []Node{fra1}, Now: now, MeshPrefix: mesh16})
	if len(plan.Peers) != 1 || plan.Peers[0].Endpoint != netip.MustParseAddrPort("192.0.2.4:51820") {
		t.Fatalf("peers %+v; want fra-1 dialled at its IPv4 endpoint", plan.Peers)
	}
}

// TestSharedKeyNeverCarries: a peer dropped for advertising a key already
// taken (ours here) is not chosen to carry its site's routes, which would
// then go nowhere: its sibling carries them.
func TestSharedKeyNeverCarries(t *testing.T) {
	for _, mode := range []string{TopologyFullMesh, TopologyHub} {
		fra0 := gw("fra-0", "aws-eu-central-1", "DE", "aws", 9, "pii-eu", "10.2.0.0/16")
		fra0.Advert.WireGuardKey = zrh1.Advert.WireGuardKey
		plan := Compute(TopologyInput{Self: zrh1, Peers: []Node{fra0, fra1}, Now: now, MeshPrefix: mesh16, Mode: mode})
		if c := plan.Carriers["aws-eu-central-1"]; c != "fra-1" {
			t.Errorf("%s: the site's routes go through %s, want fra-1 (fra-0 is no peer)", mode, c)
		}
		if got, want := summary(plan), "fra-1=10.2.0.0/16,100.96.0.4/32"; got != want {
			t.Errorf("%s: plan %s, want %s", mode, got, want)
		}
		if len(plan.Conflicts) != 1 || !strings.Contains(plan.Conflicts[0], "fra-0 advertises the WireGuard key of zrh-1") {
			t.Errorf("%s: conflicts %q", mode, plan.Conflicts)
		}
	}
}

// TestSiblingsRouteWhatTheCarrierDoesNot: a site whose gateways advertise
// different routes (a rollout of re-issued certificates, one at a time)
// has every prefix routed: the carrier's through it, one only a sibling
// advertises through the best such sibling — the one up before one down.
// A sibling's prefix that overlaps the carrier's stays with the carrier.
func TestSiblingsRouteWhatTheCarrierDoesNot(t *testing.T) {
	b1 := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "pii-eu", "10.2.0.0/16")
	b2 := gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "pii-eu", "10.2.0.0/16", "10.6.0.0/16", "10.2.7.0/24")
	b3 := gw("fra-3", "aws-eu-central-1", "DE", "aws", 6, "pii-eu", "10.6.0.0/16")
	bare := gw("fra-0", "aws-eu-central-1", "DE", "aws", 3, "pii-eu")
	for _, tc := range []struct {
		name  string
		peers []Node
		down  map[string]bool
		want  string
	}{
		{"the carrier lacks a prefix", []Node{b1, b2}, nil, "fra-1=10.2.0.0/16,100.96.0.4/32 fra-2=10.6.0.0/16,100.96.0.5/32"},
		{"the best sibling takes it", []Node{b1, b2, b3}, nil, "fra-1=10.2.0.0/16,100.96.0.4/32 fra-2=10.6.0.0/16,100.96.0.5/32 fra-3=100.96.0.6/32"},
		{"one up before one down", []Node{b1, b2, b3}, map[string]bool{"fra-2": true}, "fra-1=10.2.0.0/16,100.96.0.4/32 fra-2=100.96.0.5/32 fra-3=10.6.0.0/16,100.96.0.6/32"},
		{"a carrier with no routes", []Node{bare, b1}, nil, "fra-0=100.96.0.3/32 fra-1=10.2.0.0/16,100.96.0.4/32"},
		{"the same routes everywhere", []Node{b1, gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "pii-eu", "10.2.0.0/16")}, nil, "fra-1=10.2.0.0/16,100.96.0.4/32 fra-2=100.96.0.5/32"},
	} {
		plan := Compute(TopologyInput{Self: zrh1, Peers: tc.peers, Now: now, MeshPrefix: mesh16, Down: tc.down})
		if got := summary(plan); got != tc.want || len(plan.Conflicts) != 0 {
			t.Errorf("%s: plan %s, conflicts %q\nwant %s", tc.name, got, plan.Conflicts, tc.want)
		}
	}
}

// TestHeldRoutes: the routes of a site whose gateways are all away are
// held (unreachable), so that their traffic is refused rather than sent
// by the host's other routes; but never where holding them would cut the
// site's own way back, take what is ours or carried, or refuse what was
// never routed here (residency, our hub's links, a site still up).
func TestHeldRoutes(t *testing.T) {
	away := func(n Node, gossip string) AwayGateway {
		a := AwayGateway{Node: n}
		if gossip != "" {
			a.Gossip = netip.MustParseAddr(gossip)
		}
		return a
	}
	at := func(n Node, endpoint string) Node {
		n.Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort(endpoint)}
		return n
	}
	restored := gw("par-1", "onprem-par", "FR", "onprem", 20, "", "10.20.0.0/16")
	restored.Advert = certs.Advert{} // known by its certificate alone (after a restart)
	pol := mustPolicy(t, meshPolicy)
	zrhBank := gw("zrh-1", "onprem-zrh", "CH", "onprem", 1, "swiss-banking-secret", "10.1.0.0/16")
	tests := []struct {
		name      string
		self      Node
		mode      string
		policy    *policy.Policy
		peers     []Node
		away      []AwayGateway
		want      string // site=prefixes;…
		routes    string
		conflicts []string
	}{
		{name: "nobody away", peers: []Node{fra1, iad1}, routes: "10.2.0.0/16,10.3.0.0/16"},
		{name: "a site's only gateway away", peers: []Node{fra1}, away: []AwayGateway{away(iad1, "192.0.2.6")},
			want: "aws-us-east-1=10.3.0.0/16", routes: "10.2.0.0/16"},
		{name: "a site with a gateway up: what it carries is routed, the rest held", peers: []Node{fra2},
			away: []AwayGateway{away(gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "", "10.2.0.0/16", "10.12.0.0/16"), "")},
			want: "aws-eu-central-1=10.12.0.0/16", routes: "10.2.0.0/16"},
		{name: "our own site's gateways are the host's to route",
			away: []AwayGateway{away(gw("zrh-2", "onprem-zrh", "CH", "onprem", 2, "", "10.1.0.0/16", "10.11.0.0/16"), "")}},
		{name: "overlapping our own routes", away: []AwayGateway{away(gw("b-1", "site-b", "DE", "aws", 10, "", "10.1.2.0/24", "10.9.0.0/16"), "")},
			want: "site-b=10.9.0.0/16"},
		{name: "inside the overlay range", away: []AwayGateway{away(gw("b-1", "site-b", "DE", "aws", 10, "", "100.96.9.0/24"), "")}},
		{name: "covered by a route a peer carries", peers: []Node{fra1},
			away: []AwayGateway{away(gw("b-1", "site-b", "DE", "aws", 10, "", "10.2.7.0/24", "10.2.0.0/15"), "")},
			want: "site-b=10.2.0.0/15", routes: "10.2.0.0/16"},
		{name: "its own endpoint inside (numbered in its own network)", away: []AwayGateway{away(at(iad1, "10.3.0.1:51820"), "")}},
		{name: "its own gossip address inside", away: []AwayGateway{away(iad1, "10.3.200.1")}},
		{name: "a sibling's address inside", away: []AwayGateway{away(iad1, ""), away(gw("iad-2", "aws-us-east-1", "US", "aws", 16, "", "10.3.0.0/16"), "10.3.0.2")}},
		{name: "its own IPv6 gossip address inside", away: []AwayGateway{away(gw("b-1", "site-b", "DE", "aws", 10, "", "2001:db8:b::/48"), "2001:db8:b::1")}},
		{name: "another gateway's endpoint inside gives way (it cannot free the site)",
			peers: []Node{at(fra1, "10.3.255.254:51820")}, away: []AwayGateway{away(iad1, "")},
			want: "aws-us-east-1=10.3.0.0/16", routes: "10.2.0.0/16",
			conflicts: []string{"endpoint 10.3.255.254:51820 of fra-1 is inside 10.3.0.0/16, held for site aws-us-east-1 (its gateway that routed it away); not dialled"}},
		{name: "restored from the state directory: its certified routes", away: []AwayGateway{away(restored, "")},
			want: "onprem-par=10.20.0.0/16"},
		{name: "two gateways away, one site, one hold", away: []AwayGateway{away(fra1, ""), away(fra2, ""), away(iad1, "")},
			want: "aws-eu-central-1=10.2.0.0/16;aws-us-east-1=10.3.0.0/16"},
		{name: "a site residency keeps us from is not held", self: zrhBank, policy: pol,
			away: []AwayGateway{away(iad1, ""), away(gw("gva-1", "onprem-gva", "CH", "onprem", 3, "swiss-banking-secret", "10.4.0.0/16"), "")},
			want: "onprem-gva=10.4.0.0/16"},
		{name: "a site residency keeps us from, with a gateway up and one away", self: zrhBank, policy: pol,
			peers: []Node{iad1}, away: []AwayGateway{away(gw("iad-2", "aws-us-east-1", "US", "aws", 16, "risk-batch", "10.3.0.0/16"), "")}},
		{name: "hub mode: a site our hub does not link to is not held", mode: TopologyHub, policy: pol,
			self:  gw("zrh-2", "onprem-zrh", "CH", "onprem", 2, "swiss-banking-secret,pii-eu,risk-batch", "10.1.0.0/16"),
			peers: []Node{zrh1}, away: []AwayGateway{away(iad1, ""), away(fra1, "")},
			want: "aws-eu-central-1=10.2.0.0/16"},
		{name: "hub mode: a site's hub away, what the hub now does not advertise is held", mode: TopologyHub,
			peers: []Node{fra2}, away: []AwayGateway{away(gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "", "10.2.0.0/16", "10.12.0.0/16"), "")},
			want: "aws-eu-central-1=10.12.0.0/16"},
		{name: "hub mode: a gateway away that was not its site's hub was never routed here", mode: TopologyHub,
			peers: []Node{fra1}, away: []AwayGateway{away(gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "", "10.2.0.0/16", "10.12.0.0/16"), "")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			self := tt.self
			if self.Attributes == nil {
				self = zrh1
			}
			in := TopologyInput{Self: self, Peers: tt.peers, Away: tt.away, Policy: tt.policy, Mode: tt.mode, Now: now, MeshPrefix: mesh16}
			plan := Compute(in)
			var held []string
			for _, s := range sortedKeys(plan.Held) {
				var ps []string
				for _, p := range plan.Held[s] {
					ps = append(ps, p.String())
				}
				held = append(held, s+"="+strings.Join(ps, ","))
			}
			if got := strings.Join(held, ";"); got != tt.want {
				t.Errorf("held %q, want %q", got, tt.want)
			}
			var routes []string
			for _, r := range plan.Routes {
				routes = append(routes, r.String())
			}
			if got := strings.Join(routes, ","); got != tt.routes && tt.mode == "" {
				t.Errorf("routes %q, want %q", got, tt.routes)
			}
			if tt.conflicts != nil && !slices.Equal(plan.Conflicts, tt.conflicts) {
				t.Errorf("conflicts %q, want %q", plan.Conflicts, tt.conflicts)
			}
			var flat []netip.Prefix
			for _, ps := range plan.Held {
				flat = append(flat, ps...)
			}
			slices.SortFunc(flat, comparePrefix)
			if got := plan.heldRoutes(); !slices.Equal(got, flat) {
				t.Errorf("held routes %v, want every site's %v", got, flat)
			}
			for _, pc := range plan.Peers {
				for _, p := range flat {
					if slices.Contains(pc.AllowedIPs, p) {
						t.Errorf("held %s is carried by %s", p, pc.Node)
					}
					if a := pc.Endpoint.Addr(); a.IsValid() && p.Contains(a) {
						t.Errorf("held %s covers %s's endpoint %s, still dialled", p, pc.Node, pc.Endpoint)
					}
				}
			}
		})
	}
}

// planState says whether plan routes p into the tunnel, holds it
// unreachable, or neither (the host's other routes: its default route).
func planState(plan Plan, p string) string {
	pp := netip.MustParsePrefix(p)
	switch {
	case slices.Contains(plan.Routes, pp):
		return "routed"
	case slices.Contains(plan.heldRoutes(), pp):
		return "held"
	}
	return "neither"
}

// TestHeldRoutesFailClosedWithASiblingUp: a prefix routed here through one
// gateway of a site is held when that gateway goes away, though another
// gateway of the site is up, where that one does not carry it — it
// advertises other routes (certificates re-issued one at a time), or
// residency does not link us to it (labels rolled out one at a time).
// Left to the host's routes, the site's traffic would leave in clear.
func TestHeldRoutesFailClosedWithASiblingUp(t *testing.T) {
	t.Run("routes re-issued on one gateway", func(t *testing.T) {
		fraOld := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "pii-eu", "10.2.0.0/16", "10.12.0.0/16")
		fraNew := gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "pii-eu", "10.2.0.0/16")
		up := Compute(TopologyInput{Self: zrh1, Peers: []Node{fraOld, fraNew}, Now: now, MeshPrefix: mesh16})
		gone := Compute(TopologyInput{Self: zrh1, Peers: []Node{fraNew}, Away: []AwayGateway{{Node: fraOld}}, Now: now, MeshPrefix: mesh16})
		if planState(up, "10.12.0.0/16") != "routed" {
			t.Fatalf("setup: 10.12.0.0/16 is %s while fra-1 is up", planState(up, "10.12.0.0/16"))
		}
		if got := planState(gone, "10.12.0.0/16"); got != "held" {
			t.Errorf("fra-1, the only gateway advertising 10.12.0.0/16, is away: it is %s, want held", got)
		}
		if got := planState(gone, "10.2.0.0/16"); got != "routed" {
			t.Errorf("10.2.0.0/16, which fra-2 carries, is %s", got)
		}
	})
	t.Run("residency links one gateway of the site", func(t *testing.T) {
		pol := mustPolicy(t, meshPolicy)
		self := gw("zrh-1", "onprem-zrh", "CH", "onprem", 1, "pii-eu", "10.1.0.0/16")
		linked := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "pii-eu", "10.2.0.0/16")
		unlinked := gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "risk-batch", "10.2.0.0/16")
		up := Compute(TopologyInput{Self: self, Policy: pol, Peers: []Node{linked, unlinked}, Now: now, MeshPrefix: mesh16})
		gone := Compute(TopologyInput{Self: self, Policy: pol, Peers: []Node{unlinked}, Away: []AwayGateway{{Node: linked}}, Now: now, MeshPrefix: mesh16})
		if planState(up, "10.2.0.0/16") != "routed" {
			t.Fatalf("setup: 10.2.0.0/16 is %s while fra-1 is up", planState(up, "10.2.0.0/16"))
		}
		if got := planState(gone, "10.2.0.0/16"); got != "held" {
			t.Errorf("the only gateway of the site we link to is away: 10.2.0.0/16 is %s, want held", got)
		}
	})
}

// TestHeldGivesWayToALiveSibling: a site with a gateway up may have
// prefixes held (those of a sibling away that it does not carry); a held
// prefix gives way to the live gateway's own address, or its tunnel's
// packets would be refused and the site's live gateway cut off.
func TestHeldGivesWayToALiveSibling(t *testing.T) {
	live := gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "", "10.2.0.0/16")
	live.Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("10.12.0.5:51820")}
	t.Run("away gateway last seen advertising", func(t *testing.T) {
		old := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "", "10.2.0.0/16", "10.12.0.0/16")
		old.Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.51.100.4:51820")}
		// While both are up, 10.12.0.0/16 is not routed (it covers the
		// sibling's endpoint: dedupe), and fra-2 is dialled.
		up := Compute(TopologyInput{Self: zrh1, Peers: []Node{old, live}, Now: now, MeshPrefix: mesh16})
		for _, pc := range up.Peers {
			if pc.Node == "fra-2" && !pc.Endpoint.IsValid() {
				t.Fatalf("setup: fra-2 not dialled while both up: %q", up.Conflicts)
			}
		}
		gone := Compute(TopologyInput{Self: zrh1, Peers: []Node{live}, Away: []AwayGateway{{Node: old}}, Now: now, MeshPrefix: mesh16})
		for _, pc := range gone.Peers {
			if pc.Node == "fra-2" && !pc.Endpoint.IsValid() {
				t.Errorf("fra-1 away: the site's live gateway fra-2 is no longer dialled; held %v, conflicts %q", gone.Held, gone.Conflicts)
			}
		}
	})
	t.Run("away gateway known by its certificate alone", func(t *testing.T) {
		old := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "", "10.2.0.0/16", "10.8.0.0/13")
		old.Advert = certs.Advert{}
		gone := Compute(TopologyInput{Self: zrh1, Peers: []Node{live}, Away: []AwayGateway{{Node: old}}, Now: now, MeshPrefix: mesh16})
		for _, pc := range gone.Peers {
			if pc.Node == "fra-2" && !pc.Endpoint.IsValid() {
				t.Errorf("fra-1 away: the site's live gateway fra-2 is no longer dialled; held %v, conflicts %q", gone.Held, gone.Conflicts)
			}
		}
	})
	t.Run("same routes, the live one numbered inside its own network", func(t *testing.T) {
		live := gw("fra-2", "aws-eu-central-1", "DE", "aws", 5, "", "10.2.0.0/16")
		live.Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("10.2.0.10:51820")}
		old := gw("fra-1", "aws-eu-central-1", "DE", "aws", 4, "", "10.2.0.0/16")
		old.Advert.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.51.100.4:51820")}
		gone := Compute(TopologyInput{Self: zrh1, Peers: []Node{live}, Away: []AwayGateway{{Node: old}}, Now: now, MeshPrefix: mesh16})
		for _, pc := range gone.Peers {
			if pc.Node == "fra-2" && !pc.Endpoint.IsValid() {
				t.Errorf("fra-1 away: the site's live gateway fra-2 is no longer dialled; held %v, conflicts %q", gone.Held, gone.Conflicts)
			}
		}
	})
}

// TestResidencyLinkAudit: a link rests on a class the policy lets travel
// outright when there is one, even if a class audit mode lets through
// sorts before it; one that only audit mode allows says so, and does not
// read as resting on the rule that denies it.
func TestResidencyLinkAudit(t *testing.T) {
	p, err := policy.Parse("p.hcl", []byte(`policy {
  name    = "p"
  version = 1
}
class "alpha" {
  mode = "audit"
  allow "store" {
    jurisdiction = ["CH"]
  }
}
class "beta" {
  allow "store" {
    site = ["*"]
  }
  allow "transit" {
    site = ["*"]
  }
}
class "gamma" {
  allow "store" {
    site = ["*"]
  }
}
`))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 24, 0, 0, 0, 0, time.UTC)
	for _, tt := range []struct {
		classes       string
		allowed, aud  bool
		class, reason string
	}{
		{"alpha,beta", true, false, "beta", "beta may travel between site-a and site-b"},
		{"alpha", true, true, "alpha", "audit mode lets alpha travel between site-a and site-b, which the policy denies"},
		{"alpha,gamma", true, true, "alpha", "audit mode lets alpha"},
		{"gamma", false, false, "", "lets none of the shared classes travel"},
	} {
		a := &certs.Attributes{Node: "a1", Site: "site-a", Region: "r", Provider: "aws", Jurisdiction: "US", Labels: map[string]string{ClassesLabel: tt.classes}}
		b := &certs.Attributes{Node: "b1", Site: "site-b", Region: "r", Provider: "aws", Jurisdiction: "US", Labels: map[string]string{ClassesLabel: tt.classes}}
		l := residencyPath(p, a, nil, b, now)
		if l.Allowed != tt.allowed || l.Audit != tt.aud || l.Class != tt.class || !strings.Contains(l.Reason, tt.reason) {
			t.Errorf("classes %s: %+v; want allowed %v, audit %v, class %q, a reason with %q", tt.classes, l, tt.allowed, tt.aud, tt.class, tt.reason)
		}
	}
}
