package mesh

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/policy"
)

// ClassesLabel is the site label that lists the data classes a site
// handles, comma-separated. Residency-aware topology links two sites only
// if the policy lets at least one class they both handle travel between
// them.
const ClassesLabel = "classes"

// Keepalive is the persistent keepalive a gateway behind NAT sends, short
// enough for common NAT mapping timeouts (30 s and up).
const Keepalive = 25 * time.Second

// Node is a verified gateway as the topology sees it: what its
// certificate grants and what its advert currently says.
type Node struct {
	Attributes *certs.Attributes // certified
	Advert     certs.Advert      // verified against the certificate
	// Gossip is the address it gossips at (memberlist's, unsigned): like
	// its endpoints, no route into the interface may cover it (dedupe).
	Gossip netip.AddrPort
}

func (g *Node) node() string { return g.Attributes.Node }
func (g *Node) site() string { return g.Attributes.Site }

// TopologyInput is everything the topology depends on. It holds no I/O
// handles: Compute is a pure function of it.
type TopologyInput struct {
	Self       Node
	Peers      []Node         // verified, alive members other than Self
	MeshPrefix netip.Prefix   // the overlay range, routed by the interface address itself
	Policy     *policy.Policy // nil: no residency policy in force, sites link freely
	Memo       *LinkMemo      // optional: residency decisions of earlier plans
	Mode       string         // TopologyFullMesh or TopologyHub
	BehindNAT  bool           // Self needs keepalives to hold its NAT mapping
	Now        time.Time      // decides which policy exceptions are in force
	// Down names gateways this gateway's data plane cannot reach (probes
	// through their tunnels fail): a site's routes go through another of
	// its gateways if it has one.
	Down map[string]bool
	// Away are gateways not up (dead, left, or not verified again yet)
	// but not retired: their certificates still stand (holdRoutes).
	Away []AwayGateway
}

// AwayGateway is a gateway of TopologyInput.Away: its last verified
// certificate and advert (no advert if restored from the state directory
// after a restart), and where it gossiped.
type AwayGateway struct {
	Node
	Gossip netip.Addr
}

// PeerConfig is the WireGuard configuration of one peer.
type PeerConfig struct {
	Node       string            `json:"node"`
	Site       string            `json:"site"`
	PublicKey  certs.WGPublicKey `json:"public_key"`
	Endpoint   netip.AddrPort    `json:"endpoint"`
	AllowedIPs []netip.Prefix    `json:"allowed_ips"`
	Keepalive  time.Duration     `json:"keepalive"`
	// Next marks the entry for the key a peer is rotating to: no allowed
	// IPs until the peer switches, so it routes nothing, but a handshake
	// with the new key succeeds at once.
	Next bool `json:"next,omitempty"`
}

// Link is the residency verdict for a pair of sites.
type Link struct {
	Site    string `json:"site"`
	Allowed bool   `json:"allowed"`
	Class   string `json:"class,omitempty"` // a class the policy lets travel between the sites
	// Audit: the policy denies every shared class, and audit mode lets
	// Class through all the same; the tunnel goes once it is enforced.
	Audit  bool   `json:"audit,omitempty"`
	Reason string `json:"reason"`
}

// LinkMemo carries residency decisions from one plan to the next, so that
// a reconcile in a large mesh evaluates the policy only for sites it has
// not judged yet. Decisions are reused only under the same policy, the same
// own attributes, and until an exception of the policy expires; peers are
// known by their verified attributes, which never change once verified,
// and, in the hub topology, by the hubs between us (via).
// The zero value is ready; a nil *LinkMemo decides afresh every time.
type LinkMemo struct {
	policy     *policy.Policy
	self       *certs.Attributes
	until      time.Time // decisions hold strictly before this; zero: forever
	links, now map[*certs.Attributes]memoLink
	// views are decisions as another gateway judges them (view): in the
	// hub topology, what a hub links to decides what we reach through it.
	// Kept in place, each marked with the last plan that asked for it.
	views map[memoView]viewLink
	plans uint64 // plans done
}

// memoLink is a decision of a LinkMemo, and the hubs it was judged
// through: a site's hub changes with the membership.
type memoLink struct {
	Link
	via hubPath
}

// memoView is what a decision of LinkMemo.view is about: from's link to
// to, through via.
type memoView struct {
	from, to *certs.Attributes
	via      hubPath
}

// viewLink is a decision of LinkMemo.view; done forgets it after a plan
// that did not ask for it (a hub gone, a path changed).
type viewLink struct {
	Link
	plan uint64 // the last plan that asked for it
}

// judging forgets the decisions made under another policy, by another
// certificate of ours, or before an exception of the policy expired.
func (m *LinkMemo) judging(in TopologyInput) {
	if m.policy != in.Policy || m.self != in.Self.Attributes || !m.holds(in.Now) {
		m.policy, m.self, m.links, m.until = in.Policy, in.Self.Attributes, nil, time.Time{}
		clear(m.views)
		if in.Policy != nil {
			m.until = in.Policy.NextChange(in.Now)
		}
	}
}

func (m *LinkMemo) link(in TopologyInput, via hubPath, peer *certs.Attributes) Link {
	if m == nil {
		return residencyPath(in.Policy, in.Self.Attributes, via.slice(), peer, in.Now)
	}
	m.judging(in)
	if m.now == nil {
		m.now = map[*certs.Attributes]memoLink{}
	}
	l, ok := m.links[peer]
	if !ok || l.via != via {
		l = memoLink{residencyPath(in.Policy, in.Self.Attributes, via.slice(), peer, in.Now), via}
	}
	m.now[peer] = l
	return l.Link
}

// reuse is the decision for peer, a gateway with the same place as first
// and reached through the same hubs (via), which was judged in this plan:
// first's, remembered as peer's too.
func (m *LinkMemo) reuse(in TopologyInput, via hubPath, first, peer *certs.Attributes) Link {
	if m == nil {
		return residencyPath(in.Policy, in.Self.Attributes, via.slice(), first, in.Now)
	}
	l := m.now[first]
	m.now[peer] = l
	return l.Link
}

// view is from's link to to through via, as from judges it: ours through
// another hub, or a hub's own (hubLinks, relayed, holdRoutes). Asked at
// every plan of a non-hub, for every other site's hub, it was most of the
// plan's cost.
func (m *LinkMemo) view(in TopologyInput, from *certs.Attributes, via hubPath, to *certs.Attributes) Link {
	if m == nil {
		return residencyPath(in.Policy, from, via.slice(), to, in.Now)
	}
	m.judging(in)
	k := memoView{from, to, via}
	v, ok := m.views[k]
	if !ok {
		v.Link = residencyPath(in.Policy, from, via.slice(), to, in.Now)
		if m.views == nil {
			m.views = map[memoView]viewLink{}
		}
	}
	if !ok || v.plan != m.plans {
		v.plan = m.plans
		m.views[k] = v
	}
	return v.Link
}

// samePlace reports whether two gateways of one site have the place and
// labels the residency decision reads.
func samePlace(a, b *certs.Attributes) bool {
	return a.Jurisdiction == b.Jurisdiction && a.Provider == b.Provider && a.Region == b.Region && maps.Equal(a.Labels, b.Labels)
}

// holds reports whether the decisions made so far still stand at now (no
// exception of the policy has expired since).
func (m *LinkMemo) holds(now time.Time) bool {
	return m.until.IsZero() || now.Before(m.until)
}

// done keeps the decisions of this plan only: departed peers are forgotten.
func (m *LinkMemo) done() {
	if m != nil {
		m.links, m.now = m.now, nil
		for k, v := range m.views {
			if v.plan != m.plans {
				delete(m.views, k)
			}
		}
		m.plans++
	}
}

// Plan is the WireGuard configuration Self should have.
type Plan struct {
	Peers  []PeerConfig   `json:"peers"`  // sorted by node, then the next keys of rotating peers
	Routes []netip.Prefix `json:"routes"` // site prefixes to route into the interface
	Links  []Link         `json:"links"`  // one per remote site, sorted by site
	// Carriers names, per site, the gateway its routes go through.
	Carriers map[string]string `json:"carriers"`
	// Held lists, per site, the routes of gateways that are away (no
	// gateway of the site up) and that no peer carries: installed as
	// unreachable routes, so that their traffic is refused rather than
	// sent in clear by the host's other routes (holdRoutes).
	Held map[string][]netip.Prefix `json:"held,omitempty"`
	// Conflicts lists claims the plan had to drop: a prefix claimed by
	// gateways of two sites, or a gateway's routes shadowed by another
	// gateway of its own site (only one gateway per site carries them).
	Conflicts []string `json:"conflicts,omitempty"`
}

// Compute derives the WireGuard configuration of in.Self from the verified
// membership and the residency policy. It is pure and deterministic: the
// same membership gives every gateway the same view of who links to whom,
// whatever order the members arrived in.
func Compute(in TopologyInput) Plan {
	var plan Plan
	byName := func(a, b Node) int { return cmp.Compare(a.node(), b.node()) }
	peers := in.Peers // read only
	if !slices.IsSortedFunc(peers, byName) {
		peers = slices.Clone(peers)
		slices.SortFunc(peers, byName)
	}

	// A peer with a key already taken goes before anything is chosen
	// from the peers: kept to be dropped later, it could be chosen to
	// carry its site's routes, which would then go nowhere.
	peers = dropSharedKeys(peers, in.Self, &plan)

	// Residency: which gateways of other sites may we link to at all?
	// Judged per gateway, on its own certificate's place and labels as on
	// ours, so that two gateways agree whoever asks: judged per site from
	// its first gateway, a site whose gateways' labels differ (during a
	// rollout of re-issued certificates) got one-sided tunnels, a gateway
	// peering with one that, judging its site by a sibling, did not peer
	// back. Gateways of a site with the same place share one judgement.
	// The plan shows a site's link as allowed if any of its gateways is.
	//
	// In the hub topology data to a gateway passes the hubs between us
	// (hubVia), and is judged along that path, each hub's site and
	// max_hops included, as a migration is: judged as one tunnel, a
	// class went through a remote hub whose site the policy forbids it.
	// A site's hub is reached by a shorter path than its other gateways,
	// and shares no judgement with them.
	var hubs map[string]*certs.Attributes
	if in.Mode == TopologyHub {
		hubs = hubsOf(&in.Self, peers)
	}
	// One entry per site, which a mesh of many gateways a site has far
	// fewer of than peers: sized by the peers, these were a third of the
	// memory every gateway's plan took at 300 gateways of 30 sites.
	links := map[string]Link{}
	firsts := map[string]*Node{}
	allowed := make([]bool, len(peers))
	for i := range peers {
		p := &peers[i]
		s := p.site()
		if s == in.Self.site() {
			allowed[i] = true
			continue
		}
		var via hubPath
		if hubs != nil {
			via = hubsBetween(hubs, in.Self.Attributes, p.Attributes)
		}
		f := firsts[s]
		if f != nil && samePlace(f.Attributes, p.Attributes) {
			allowed[i] = in.Memo.reuse(in, via, f.Attributes, p.Attributes).Allowed
			continue
		}
		l := in.Memo.link(in, via, p.Attributes)
		allowed[i] = l.Allowed
		if f == nil && (hubs == nil || hubs[s] != p.Attributes) {
			firsts[s] = p
		}
		if cur, ok := links[s]; !ok || l.Allowed && !cur.Allowed {
			links[s] = l
		}
	}
	for _, s := range sortedKeys(links) {
		plan.Links = append(plan.Links, links[s])
	}

	// Routes of a site are carried by exactly one of its gateways: the
	// first by name that our data plane reaches (the first by name if it
	// reaches none, so that the routes stay somewhere). In a full mesh
	// that is each gateway's own choice; hubs must be the same for
	// everyone (a hub peers only with hubs), so they are chosen from the
	// membership alone (hubsOf), and a hub we do not link to leaves its
	// site unreached from here, as it leaves us unreached from there.
	carrier := make(map[string]string, len(links)+1) // site → node
	better := func(a, b string) bool {               // a should carry rather than b
		if in.Down[a] != in.Down[b] {
			return !in.Down[a]
		}
		return a < b
	}
	if in.Mode == TopologyHub {
		for s, h := range hubs {
			carrier[s] = h.Node
		}
	} else {
		carrier[in.Self.site()] = in.Self.node()
		for i := range peers {
			g := &peers[i]
			if !allowed[i] { // only a gateway we link to can carry here
				continue
			}
			if c, ok := carrier[g.site()]; !ok || better(g.node(), c) {
				carrier[g.site()] = g.node()
			}
		}
	}
	plan.Carriers = carrier
	if in.Mode == TopologyHub {
		hubLinks(in, peers, hubs, allowed, &plan)
	}

	members := make([]*Node, 0, len(peers)) // the linked ones (pointers: a Node is a few hundred bytes)
	for i := range peers {
		if allowed[i] {
			members = append(members, &peers[i])
		}
	}

	switch in.Mode {
	case TopologyHub:
		plan.Peers = hubPeers(in, peers, allowed, members, carrier, &plan)
	default:
		orphans := orphanRoutes(members, carrier, in.Self.site(), better)
		plan.Peers = make([]PeerConfig, 0, len(members))
		for _, p := range members {
			pc := peerConfig(&in, p)
			pc.AllowedIPs = []netip.Prefix{overlayPrefix(p)}
			if carrier[p.site()] == p.node() && p.site() != in.Self.site() {
				pc.AllowedIPs = append(pc.AllowedIPs, p.Advert.Routes...)
			}
			pc.AllowedIPs = append(pc.AllowedIPs, orphans[p.node()]...)
			plan.Peers = append(plan.Peers, pc)
		}
	}
	dedupe(&plan, in.Self, in.MeshPrefix, members)
	holdRoutes(in, &plan)
	addNextKeys(&plan, in.Self, members)
	in.Memo.done()
	return plan
}

// holdRoutes fills plan.Held: the routes of gateways gone but not
// retired (in.Away) that we would link to and that no gateway up here
// carries — all of a site's when none of its gateways is up. Withdrawn from the kernel, they would follow the host's other
// routes (its default route: the internet, in clear) the moment a site's
// last gateway stopped or crashed; held, they are unreachable routes, and
// the kernel answers "no route to host". Only a gateway's retirement frees
// its routes (its certificate revoked, or expired a while ago: retiredAt);
// a route it withdrew while up is free at once. A site we would not link
// to (residency, or our hub does not) was never routed here, and is not
// held either: its traffic goes wherever the host sends it, as while it
// was up. Behind a hub, what we reached through a hub of our own site
// now away and the new one does not reach is held, up or not.
//
// A held prefix gives way to the away site's own gateways' addresses
// (their endpoints and gossip addresses): holding them would drop the
// gossip and the handshakes that bring the site back. Anyone else's
// endpoint inside it gives way to the prefix, as inside a routed one
// (dedupe): endpoints are only advertised, routes are certified, and an
// endpoint inside another site's network must not free that network.
// Nor is a prefix held that overlaps ours, lies inside the overlay range,
// or is covered by a route a peer carries.
func holdRoutes(in TopologyInput, plan *Plan) {
	if len(in.Away) == 0 {
		return
	}
	var hub *certs.Attributes // ours, where we reach other sites through it
	for i := range in.Peers {
		p := &in.Peers[i]
		if in.Mode == TopologyHub && p.site() == in.Self.site() && plan.Carriers[p.site()] == p.node() {
			hub = p.Attributes
		}
	}
	own := append([]netip.Prefix{overlayPrefix(&in.Self)}, in.Self.Advert.Routes...)
	// plan.Routes is sorted (dedupe): a prefix covering p is looked up
	// at each length the routes have, not put in a map first (a
	// thousand gateways of 32 routes made that most of the cost).
	var lengths [129]bool
	for _, r := range plan.Routes {
		lengths[r.Bits()] = true
	}
	covered := func(p netip.Prefix) bool {
		for b := p.Bits(); b >= 0; b-- {
			if !lengths[b] {
				continue
			}
			if _, ok := slices.BinarySearchFunc(plan.Routes, netip.PrefixFrom(p.Addr(), b).Masked(), comparePrefix); ok {
				return true
			}
		}
		return false
	}
	ways := map[string][]netip.Addr{} // site → its gateways' addresses, away or up
	for i := range in.Peers {
		// A live sibling's way in: held, its tunnel's own packets would
		// be refused (a gateway numbered inside its site's network).
		p := &in.Peers[i]
		for _, e := range p.Advert.Endpoints {
			ways[p.site()] = append(ways[p.site()], e.Addr().Unmap())
		}
	}
	for i := range in.Away {
		a := &in.Away[i]
		for _, e := range a.Advert.Endpoints {
			ways[a.site()] = append(ways[a.site()], e.Addr().Unmap())
		}
		if a.Gossip.IsValid() {
			ways[a.site()] = append(ways[a.site()], a.Gossip.Unmap())
		}
	}
	// Behind a hub, an away gateway of our own site that sorts before it
	// may have been our hub: what we reached through it, the new hub may
	// not reach (a certificate re-issued with a label residency judges
	// otherwise), and the routes of the remote hubs it linked us to must
	// not fall to the host's routes either. Any of them may have been
	// ours (which went first is not known here), so each is judged. A
	// hub ourselves, we reach directly all we reached through one.
	var formers []*certs.Attributes
	if hub != nil {
		for i := range in.Away {
			if a := &in.Away[i]; a.site() == in.Self.site() && a.node() < hub.Node {
				formers = append(formers, a.Attributes)
			}
		}
	}
	// through reports whether we link to q, as its site's hub, when h is
	// our hub (nil: none, we are ours or in a full mesh).
	through := func(h, q *certs.Attributes) bool {
		if h == nil {
			return in.Memo.view(in, in.Self.Attributes, hubPath{}, q).Allowed
		}
		return in.Memo.view(in, in.Self.Attributes, hubPath{h}, q).Allowed && in.Memo.view(in, h, hubPath{}, q).Allowed
	}
	hold := func(site string, routes []netip.Prefix) {
		for _, p := range routes {
			p = p.Masked()
			if _, ok := overlapsAny(p, own); ok || (in.MeshPrefix.Contains(p.Addr()) && p.Bits() >= in.MeshPrefix.Bits()) || covered(p) {
				continue
			}
			if slices.ContainsFunc(ways[site], p.Contains) || slices.Contains(plan.Held[site], p) {
				continue
			}
			if plan.Held == nil {
				plan.Held = map[string][]netip.Prefix{}
			}
			plan.Held[site] = append(plan.Held[site], p)
		}
	}
	for i := range in.Away {
		a := &in.Away[i]
		// A live gateway of its site does not stand for it: it may not
		// route what this one did (a certificate re-issued with other
		// routes, a label residency judges otherwise), and a prefix
		// routed here until now must not fall to the host's other
		// routes. What a live peer carries is left (covered). Our own
		// site's are the host's to route. Behind a hub, a site with a
		// gateway up is as its hub (its first by name) routes it: one
		// away that sorts after the hub never carried the site's routes
		// here, but one that sorts before it may have been the hub (any
		// of them: which went first is not known here), and what it
		// carried the hub in its place may not (left unheld, they went
		// to the host's routes once any gateway of the site was up).
		if a.site() == in.Self.site() {
			continue
		}
		if h := plan.Carriers[a.site()]; in.Mode == TopologyHub && h != "" && h < a.node() {
			continue
		}
		// Judged as while it was up: in the hub topology as its site's
		// hub, reached through ours, or through one we had.
		if !through(hub, a.Attributes) && !slices.ContainsFunc(formers, func(g *certs.Attributes) bool { return through(g, a.Attributes) }) {
			continue
		}
		routes := a.Advert.Routes
		if a.Advert.Node == "" {
			// Known by its certificate alone (restored from the state
			// directory after a restart): what it may route stands for
			// what it routed.
			routes = a.Attributes.Routes
		}
		hold(a.site(), routes)
	}
	for i := 0; len(formers) > 0 && i < len(in.Peers); i++ {
		q := &in.Peers[i] // a remote hub up, reached through one we had
		if q.site() == in.Self.site() || plan.Carriers[q.site()] != q.node() {
			continue
		}
		if slices.ContainsFunc(formers, func(g *certs.Attributes) bool { return through(g, q.Attributes) }) {
			hold(q.site(), q.Advert.Routes)
		}
	}
	if len(plan.Held) == 0 {
		return
	}
	// Rare: whose endpoints lie inside is looked at only when one does.
	under := underlayOf(plan.Peers, nil, netip.Prefix{})
	for _, s := range sortedKeys(plan.Held) {
		slices.SortFunc(plan.Held[s], comparePrefix)
		for _, p := range plan.Held[s] {
			if !under.in(p) {
				continue
			}
			for i := range plan.Peers {
				pc := &plan.Peers[i]
				if a := pc.Endpoint.Addr().Unmap(); a.IsValid() && p.Contains(a) {
					plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("endpoint %s of %s is inside %s, held for site %s (its gateway that routed it away); not dialled", pc.Endpoint, pc.Node, p, s))
					pc.Endpoint = netip.AddrPort{}
				}
			}
		}
	}
}

// heldRoutes is the held prefixes of every site, in a new slice.
func (p *Plan) heldRoutes() []netip.Prefix {
	var out []netip.Prefix
	for _, ps := range p.Held {
		out = append(out, ps...)
	}
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out)
}

// orphanRoutes gives each prefix that another gateway of a remote site
// advertises, apart from all of its carrier's routes, to the best of
// those that advertise it (better). During a rollout of re-issued
// certificates a site's gateways advertise different routes, and the
// carrier's alone would leave a new prefix unrouted until the carrier was
// re-issued too. Usually there is none: a site's gateways advertise the
// same routes.
func orphanRoutes(members []*Node, carrier map[string]string, self string, better func(a, b string) bool) map[string][]netip.Prefix {
	var candidates []*Node
	for _, m := range members {
		if m.site() != self && carrier[m.site()] != m.node() && len(m.Advert.Routes) > 0 {
			candidates = append(candidates, m)
		}
	}
	if len(candidates) == 0 {
		return nil // a gateway per site: a plan of a thousand pays nothing more
	}
	carried := map[string][]netip.Prefix{} // site → its carrier's routes
	for _, m := range members {
		if carrier[m.site()] == m.node() {
			carried[m.site()] = m.Advert.Routes
		}
	}
	slices.SortStableFunc(candidates, func(a, b *Node) int {
		switch {
		case better(a.node(), b.node()):
			return -1
		case better(b.node(), a.node()):
			return 1
		}
		return 0
	})
	out := map[string][]netip.Prefix{}
	given := map[string][]netip.Prefix{} // site → orphans given out
	for _, m := range candidates {
		s := m.site()
		for _, r := range m.Advert.Routes {
			// Apart from what the site's carrier, or a better sibling,
			// routes already: an overlap would be a contest (dedupe).
			if _, ok := overlapsAny(r, carried[s]); ok {
				continue
			}
			if _, ok := overlapsAny(r, given[s]); ok {
				continue
			}
			out[m.node()] = append(out[m.node()], r)
			given[s] = append(given[s], r)
		}
	}
	return out
}

// dropSharedKeys removes each peer whose key is ours or an earlier
// peer's (peers are sorted by name): WireGuard keeps one peer per public
// key, and a second entry would take over the first one's allowed IPs and
// endpoint. Membership refuses all but one claimant of a key (wins);
// this keeps the device sane whatever reaches it. The peers are copied
// only if one goes.
//
// It runs at every plan of a thousand peers: keys are indexed by their
// first 8 bytes (random for a real key), and whole keys are compared
// only when those match.
func dropSharedKeys(peers []Node, self Node, plan *Plan) []Node {
	head := func(k certs.WGPublicKey) uint64 { return binary.LittleEndian.Uint64(k[:8]) }
	seen := make(map[uint64]struct{}, len(peers)+1)
	seen[head(self.Advert.WireGuardKey)] = struct{}{}
	var kept []Node // nil until a peer goes
	for i := range peers {
		p := &peers[i]
		k := p.Advert.WireGuardKey
		if _, hit := seen[head(k)]; hit {
			holder := ""
			if k == self.Advert.WireGuardKey {
				holder = self.node()
			}
			for j := 0; holder == "" && j < i; j++ {
				if peers[j].Advert.WireGuardKey == k && (kept == nil || slices.ContainsFunc(kept, func(n Node) bool { return n.node() == peers[j].node() })) {
					holder = peers[j].node()
				}
			}
			if holder != "" {
				plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("%s advertises the WireGuard key of %s; not a peer", p.node(), holder))
				if kept == nil {
					kept = append(make([]Node, 0, len(peers)-1), peers[:i]...)
				}
				continue
			}
		}
		seen[head(k)] = struct{}{}
		if kept != nil {
			kept = append(kept, *p)
		}
	}
	if kept == nil {
		return peers
	}
	return kept
}

// addNextKeys adds an entry for each peer's next key (a rotation in
// progress), beside its current one.
// A next key that is already someone's key (one of ours, or a peer's
// current one) is left out: WireGuard keys peers by public key, and a
// second entry with that key would take over the other peer's. So is a
// next key that two peers name, for both: next keys carry no proof of
// possession (certs.Advert), and the first by name would otherwise take
// the entry, and the acknowledgement, of the one rotating to it.
func addNextKeys(plan *Plan, self Node, members []*Node) {
	next := map[string]*Node{}
	claims := map[certs.WGPublicKey]int{}
	for _, m := range members {
		if k := m.Advert.NextWireGuardKey; k != (certs.WGPublicKey{}) && k != m.Advert.WireGuardKey {
			next[m.node()] = m
			claims[k]++
		}
	}
	if len(next) == 0 {
		return
	}
	taken := map[certs.WGPublicKey]bool{self.Advert.WireGuardKey: true, self.Advert.NextWireGuardKey: true}
	for _, pc := range plan.Peers {
		taken[pc.PublicKey] = true
	}
	n := len(plan.Peers)
	for _, pc := range plan.Peers[:n] {
		m, ok := next[pc.Node]
		if !ok {
			continue
		}
		switch k := m.Advert.NextWireGuardKey; {
		case taken[k]:
			plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("%s advertises %s as its next WireGuard key, which is already in use; ignored", pc.Node, k))
		case claims[k] > 1:
			plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("%s advertises %s as its next WireGuard key, as another gateway does; ignored for both", pc.Node, k))
		default:
			plan.Peers = append(plan.Peers, PeerConfig{Node: pc.Node, Site: pc.Site, PublicKey: k, Endpoint: pc.Endpoint, Keepalive: pc.Keepalive, Next: true})
		}
	}
}

// hubLinks narrows the remote gateways we link to in the hub topology to
// those the hubs between us link to as well: we reach them only through
// the hubs, which peer only where the policy lets them.
//
// At a gateway that is not its site's hub, to those its hub links to:
// judged on the gateway's own labels alone, a gateway whose labels
// differ from its hub's (a rollout of re-issued certificates) routed
// addresses to the hub that the hub does not route on: lost. Nothing to
// narrow where the two have the same place, as a site's gateways have
// but for a rollout: our path is then the hub's and one tunnel more.
//
// And, at any gateway, a remote gateway that is not its site's hub to
// one whose hub links to us: that hub takes from ours only the sources it
// links to itself (hubPeers). Judged from our end alone, a gateway routed
// to another site's gateway whose hub dropped its packets, while that
// gateway, narrowing by its own hub, did not route back. Nothing to ask
// where the gateway has its hub's place: our path to it is then the
// hub's path to us and one tunnel more.
//
// A site of which nothing is left shows as not linked, with why.
func hubLinks(in TopologyInput, peers []Node, hubs map[string]*certs.Attributes, allowed []bool, plan *Plan) {
	h := hubs[in.Self.site()]
	narrow := h != in.Self.Attributes && !samePlace(in.Self.Attributes, h)
	var refused map[string]string // site → why the first of its gateways refused here is
	for i := range peers {
		p := &peers[i]
		if !allowed[i] || p.site() == in.Self.site() {
			continue
		}
		why := ""
		if far := hubs[p.site()]; far != p.Attributes && !samePlace(far, p.Attributes) {
			if l := in.Memo.view(in, far, hubsBetween(hubs, far, in.Self.Attributes), in.Self.Attributes); !l.Allowed {
				why = fmt.Sprintf("%s is not reached: its hub %s does not link to us (%s), though our own certificate would", p.node(), far.Node, l.Reason)
			}
		}
		if why == "" && narrow {
			if l := in.Memo.view(in, h, hubsBetween(hubs, h, p.Attributes), p.Attributes); !l.Allowed {
				why = fmt.Sprintf("%s is not reached: our hub %s does not link to it (%s), though our own certificate would", p.node(), h.Node, l.Reason)
			}
		}
		if why == "" {
			continue
		}
		allowed[i] = false
		plan.Conflicts = append(plan.Conflicts, why)
		if refused == nil {
			refused = map[string]string{}
		}
		if _, ok := refused[p.site()]; !ok {
			refused[p.site()] = why
		}
	}
	if refused == nil {
		return
	}
	for i := range peers {
		if allowed[i] {
			delete(refused, peers[i].site())
		}
	}
	for i := range plan.Links {
		if l := &plan.Links[i]; l.Allowed && refused[l.Site] != "" {
			*l = Link{Site: l.Site, Reason: refused[l.Site]}
		}
	}
}

// hubsOf names each site's hub in the hub topology: its first gateway by
// name (peers are sorted by name), self's site's included. The carriers
// of Compute and the paths of migrations (Gateway.via) choose the same.
func hubsOf(self *Node, peers []Node) map[string]*certs.Attributes {
	hubs := map[string]*certs.Attributes{self.site(): self.Attributes}
	for i := range peers {
		p := &peers[i]
		if h, ok := hubs[p.site()]; !ok || p.node() < h.Node {
			hubs[p.site()] = p.Attributes
		}
	}
	return hubs
}

// hubVia is the gateways data from one gateway to another passes through
// in the hub topology, in order: the hub of each end's site, where that end
// is not the hub itself (once, for two gateways of one site). hubs names
// each site's hub (none for a site with no gateway in view).
func hubVia(hubs map[string]*certs.Attributes, from, to *certs.Attributes) []*certs.Attributes {
	via := hubsBetween(hubs, from, to)
	return append([]*certs.Attributes(nil), via.slice()...)
}

// hubPath is the hubs between two gateways (hubVia), nil past the last:
// there are two at most, and a plan asks for them for every peer, as a
// value it need not allocate.
type hubPath [2]*certs.Attributes

// slice is the hubs of v, in order.
func (v *hubPath) slice() []*certs.Attributes {
	n := 0
	for n < len(v) && v[n] != nil {
		n++
	}
	return v[:n]
}

// hubsBetween is hubVia as a hubPath.
func hubsBetween(hubs map[string]*certs.Attributes, from, to *certs.Attributes) hubPath {
	var via hubPath
	n := 0
	for _, h := range [2]*certs.Attributes{hubs[from.Site], hubs[to.Site]} {
		if h == nil || h.Node == from.Node || h.Node == to.Node || n > 0 && via[n-1].Node == h.Node {
			continue
		}
		via[n] = h
		n++
	}
	return via
}

// hubPeers builds the hub topology: each site's hub (its route carrier)
// peers with the other sites' hubs and with its own site's gateways; every
// other gateway peers only with its site's hub, which relays for it.
// peers and allowed are Compute's, members the peers we link to.
func hubPeers(in TopologyInput, peers []Node, allowed []bool, members []*Node, hub map[string]string, plan *Plan) []PeerConfig {
	selfIsHub := hub[in.Self.site()] == in.Self.node()
	var out []PeerConfig
	if !selfIsHub {
		for _, p := range members {
			if p.node() != hub[in.Self.site()] {
				continue
			}
			pc := peerConfig(&in, p)
			// Everything else in the mesh is reached through the hub:
			// our site's gateways, and the other sites' as the hub has
			// them (relayed).
			for _, q := range members {
				if q.site() == in.Self.site() {
					pc.AllowedIPs = append(pc.AllowedIPs, overlayPrefix(q))
				}
			}
			pc.AllowedIPs = append(pc.AllowedIPs, relayed(in, p, peers, allowed, members, hub, plan)...)
			out = append(out, pc)
		}
		return out
	}
	bySite := map[string][]*Node{}
	for _, p := range members {
		bySite[p.site()] = append(bySite[p.site()], p)
	}
	for _, p := range members {
		switch {
		case p.site() == in.Self.site():
			pc := peerConfig(&in, p)
			pc.AllowedIPs = []netip.Prefix{overlayPrefix(p)}
			out = append(out, pc)
		case hub[p.site()] == p.node():
			pc := peerConfig(&in, p)
			for _, q := range bySite[p.site()] {
				pc.AllowedIPs = append(pc.AllowedIPs, overlayPrefix(q))
			}
			pc.AllowedIPs = append(pc.AllowedIPs, p.Advert.Routes...)
			out = append(out, pc)
		}
	}
	return out
}

// relayed is what a gateway that is not its site's hub routes to other
// sites through its hub h: the allowed IPs the hub gives each other
// site's hub, of the gateways we link to, settled as the hub settles
// them (dedupe): site by site, against the claims of every hub it links
// to, ours or not. Settled here as the claims of one peer, the hub, a
// prefix two sites claimed went by prefix order, not to the first site
// by name; a site's routes over its hub's own endpoint stayed in; and a
// claim of a site we do not link to counted for nothing. What the hub
// did not route on it sent by its host's routes, in clear.
func relayed(in TopologyInput, h *Node, peers []Node, allowed []bool, members []*Node, hub map[string]string, plan *Plan) []netip.Prefix {
	// Asked at every plan of a non-hub, about every other site: sized
	// from the sites (hub) up front, and the entries' allowed IPs parts of
	// one array, each with room for its own alone (dedupe sorts them in
	// place). Grown one by one, they were most of the plan's allocations.
	hubs := make([]*Node, 0, len(hub))        // the other sites' hubs our hub links to, by name
	settle := make([]PeerConfig, 0, len(hub)) // each one's entry at our hub (no endpoint: we do not dial it)
	linked := make([]bool, 0, len(hub))       // whether we link to that hub ourselves
	at := make(map[string]int, len(hub))      // site → its entry in settle
	for i := range peers {
		q := &peers[i]
		if q.site() == in.Self.site() || hub[q.site()] != q.node() {
			continue
		}
		// As our hub judges it: it links to what we link to (hubLinks).
		if !allowed[i] && !in.Memo.view(in, h.Attributes, hubPath{}, q.Attributes).Allowed {
			continue
		}
		at[q.site()] = len(settle)
		hubs = append(hubs, q)
		settle = append(settle, PeerConfig{Node: q.node(), Site: q.site()})
		linked = append(linked, allowed[i])
	}
	size := make([]int, len(settle)) // each entry's routes and overlay addresses
	for i, q := range hubs {
		size[i] = len(q.Advert.Routes)
	}
	for _, m := range members {
		if i, ok := at[m.site()]; ok {
			size[i]++
		}
	}
	total := 0
	for _, n := range size {
		total += n
	}
	ips := make([]netip.Prefix, total)
	off := 0
	for i, q := range hubs {
		settle[i].AllowedIPs = append(ips[off:off:off+size[i]], q.Advert.Routes...)
		off += size[i]
	}
	for _, m := range members {
		if i, ok := at[m.site()]; ok {
			settle[i].AllowedIPs = append(settle[i].AllowedIPs, overlayPrefix(m))
		}
	}
	settled := Plan{Peers: settle}
	dedupe(&settled, *h, in.MeshPrefix, hubs)
	plan.Conflicts = append(plan.Conflicts, settled.Conflicts...)
	out := make([]netip.Prefix, 0, total)
	for i, pc := range settled.Peers {
		for _, p := range pc.AllowedIPs {
			// The routes of a hub we do not link to were there to be
			// settled against: what we reach of its site is the
			// gateways we link to.
			if !linked[i] && slices.Contains(hubs[i].Advert.Routes, p) {
				continue
			}
			out = append(out, p)
		}
	}
	return out
}

func peerConfig(in *TopologyInput, p *Node) PeerConfig {
	pc := PeerConfig{Node: p.node(), Site: p.site(), PublicKey: p.Advert.WireGuardKey, Endpoint: pickEndpoint(in.Self.Advert.Endpoints, p.Advert.Endpoints)}
	if in.BehindNAT {
		pc.Keepalive = Keepalive
	}
	return pc
}

func overlayPrefix(g *Node) netip.Prefix {
	a := g.Attributes.OverlayIP
	return netip.PrefixFrom(a, a.BitLen())
}

// pickEndpoint prefers a peer endpoint of the same address family as our
// own first endpoint, so an IPv4-only underlay never dials IPv6.
func pickEndpoint(self, peer []netip.AddrPort) netip.AddrPort {
	if len(peer) == 0 {
		return netip.AddrPort{}
	}
	if len(self) > 0 {
		for _, e := range peer {
			// Unmapped: an IPv4 address written as ::ffff:a.b.c.d is an
			// IPv4 underlay, not an IPv6 one.
			if e.Addr().Unmap().Is4() == self[0].Addr().Unmap().Is4() {
				return e
			}
		}
	}
	return peer[0]
}

// residencyPath decides whether two sites may have a tunnel: only if the
// policy lets at least one class both sites handle travel between them,
// directly (via nil) or relayed through the hubs via (hubVia): along the
// whole path, through each hub's site and within max_hops. The hubs need not
// handle the class themselves: they only pass it on, as in a migration
// (policy.AdmitPath).
func residencyPath(p *policy.Policy, self *certs.Attributes, via []*certs.Attributes, peer *certs.Attributes, now time.Time) Link {
	l := Link{Site: peer.Site}
	if p == nil {
		l.Allowed, l.Reason = true, "no residency policy in force"
		return l
	}
	shared := sharedClasses(self.Labels[ClassesLabel], peer.Labels[ClassesLabel])
	if len(shared) == 0 {
		l.Reason = fmt.Sprintf("sites %s and %s handle no data class in common (label %q)", self.Site, peer.Site, ClassesLabel)
		return l
	}
	path := policy.PathOf(self, via, peer)
	through := ""
	if len(via) > 0 {
		names := make([]string, len(via))
		for i, h := range via {
			names[i] = h.Node
		}
		through = " through hub " + strings.Join(names, " and hub ")
	}
	var denials []string
	var audit *Link // the first class audit mode alone lets through
	for _, c := range shared {
		d := p.Evaluate(policy.Request{Class: c, Action: policy.Transit, Sites: path, Time: now})
		switch {
		case d.Allowed && !d.Denied:
			l.Allowed, l.Class = true, c
			l.Reason = fmt.Sprintf("%s may travel between %s and %s%s (%s)", c, self.Site, peer.Site, through, d.Rule)
			return l
		case d.Allowed && audit == nil:
			// Not the reason yet: a class further on may be allowed
			// outright, and the link must not read as resting on the
			// rule that denies this one.
			audit = &Link{Site: peer.Site, Allowed: true, Class: c, Audit: true,
				Reason: fmt.Sprintf("audit mode lets %s travel between %s and %s%s, which the policy denies (%s): the tunnel goes when the class is enforced", c, self.Site, peer.Site, through, d.Rule)}
		}
		why := d.Rule.String()
		if through != "" && len(d.Reasons) > 0 {
			// The rule alone does not say which hub or how many
			// tunnels: the reasons do, and the rule still says
			// which part of the policy decided.
			why += ": " + strings.Join(d.Reasons, "; ")
		}
		denials = append(denials, fmt.Sprintf("%s: %s", c, why))
	}
	if audit != nil {
		return *audit
	}
	l.Reason = fmt.Sprintf("policy %s lets none of the shared classes travel between %s and %s%s (%s)",
		p.Revision(), self.Site, peer.Site, through, strings.Join(denials, "; "))
	return l
}

func sharedClasses(a, b string) []string {
	set := map[string]bool{}
	for _, c := range strings.Split(a, ",") {
		if c = strings.TrimSpace(c); c != "" {
			set[c] = true
		}
	}
	var out []string
	for _, c := range strings.Split(b, ",") {
		if c = strings.TrimSpace(c); c != "" && set[c] {
			out = append(out, c)
			set[c] = false
		}
	}
	sort.Strings(out)
	return out
}

// dedupe sorts each peer's allowed IPs, drops any prefix that overlaps one
// already given to another peer (WireGuard routes an address to exactly
// one peer; the peer of the first site by name keeps it), that covers our own overlay
// address or routes, or that covers an underlay endpoint of a gateway of
// the same site, and derives the routes: every allowed prefix outside the
// mesh overlay range. members, sorted by node, holds the peers' adverts.
//
// Any endpoint the gateway advertises counts, not only the one dialled:
// WireGuard moves a peer's endpoint to wherever an authenticated packet
// from it came from, and nothing moves it back while the advertised
// endpoints stand (DiffPeers). A dual-stack cloud gateway numbered inside
// its site's IPv6 range, dialled at its IPv4 address, had the range
// routed here; once it sent from its IPv6 address, our tunnel's packets
// to it went into the tunnel itself. holdRoutes counts them all too.
//
// An endpoint is only advertised, where a site's routes and overlay
// addresses are certified: an endpoint inside another site's routed
// prefix (or inside the overlay range) is not dialled, rather than the
// prefix unrouted. Otherwise any gateway could take another site's
// network out of every tunnel by advertising an endpoint inside it. A
// gateway whose real address lies elsewhere can still reach us first
// (WireGuard then learns where it is); one really numbered inside another
// site's network has no tunnel from here, as packets to it would loop
// into that site's: it needs an address outside other sites' prefixes.
func dedupe(plan *Plan, self Node, mesh netip.Prefix, members []*Node) {
	own := append([]netip.Prefix{overlayPrefix(&self)}, self.Advert.Routes...)
	for i := range plan.Peers {
		pc := &plan.Peers[i]
		if a := pc.Endpoint.Addr().Unmap(); a.IsValid() && mesh.Contains(a) {
			plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("endpoint %s of %s is inside the mesh overlay range %s; not dialled", pc.Endpoint, pc.Node, mesh))
			pc.Endpoint = netip.AddrPort{}
		}
	}
	under := underlayOf(plan.Peers, members, mesh)
	var foreign map[string]string // node → the other site's prefix its endpoint is inside
	for i := range plan.Peers {
		pc := &plan.Peers[i]
		slices.SortFunc(pc.AllowedIPs, comparePrefix)
		pc.AllowedIPs = slices.Compact(pc.AllowedIPs)
	}
	// Claims of different peers almost never overlap; finding which do
	// costs a sort, while settling who keeps what costs a comparison with
	// every prefix kept (a thousand-gateway mesh spent most of its
	// reconcile time there, and with one overlap anywhere, 32 routes per
	// gateway took seconds), so only those that overlap are settled.
	contested := overlapping(plan.Peers)
	var taken []netip.Prefix
	owner := map[netip.Prefix]string{}
	// Claims are settled site by site (the first by name keeps a prefix
	// claimed twice), then gateway by gateway: which gateway of a site
	// carries its routes is each gateway's own view (its probes), and by
	// gateway name alone one gateway could give a prefix to one site and
	// its sibling, seeing another carrier, to the other.
	order := make([]int, len(plan.Peers))
	for i := range order {
		order[i] = i
	}
	if contested != nil {
		slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(plan.Peers[a].Site, plan.Peers[b].Site) })
	}
	for _, i := range order {
		pc := &plan.Peers[i]
		kept := pc.AllowedIPs[:0]
		for _, p := range pc.AllowedIPs {
			var others []string // gateways of other sites whose endpoint p covers
			if q, ok := overlapsAny(p, own); ok {
				plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("%s of %s overlaps our own %s; not routed to it", p, pc.Node, q))
				continue
			}
			if under.in(p) {
				// Routed into the interface, the tunnel's own packets to
				// that address would loop inside it: the handshake
				// fails, the peer is declared gone and comes back, for
				// ever. Rare: whose endpoints they are is looked at only
				// now.
				var a netip.Addr
				var node, why string
				if a, node, why, others = endpointsIn(plan.Peers, members, mesh, p, pc.Site); node != "" {
					switch why {
					case underTunnel:
						plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("%s of %s covers %s, the underlay address of %s's tunnel; not routed to it", p, pc.Node, a, node))
					case underEndpoint:
						plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("%s of %s covers %s, an underlay address %s advertises (its tunnel moves there once it sends from it); not routed to it", p, pc.Node, a, node))
					default:
						plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("%s of %s covers %s, the address %s gossips at (its gossip must not go through the tunnel); not routed to it", p, pc.Node, a, node))
					}
					continue
				}
			}
			if contested[p] {
				if q, ok := overlapsAny(p, taken); ok {
					plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("%s of %s overlaps %s of %s; not routed to it", p, pc.Node, q, owner[q]))
					continue
				}
				taken = append(taken, p)
				owner[p] = pc.Node
			}
			// Routed: the endpoints inside it are the ones that give way.
			for _, o := range others {
				if _, ok := foreign[o]; !ok {
					if foreign == nil {
						foreign = map[string]string{}
					}
					foreign[o] = fmt.Sprintf("%s of %s", p, pc.Node)
				}
			}
			kept = append(kept, p)
			if !(mesh.Contains(p.Addr()) && p.Bits() >= mesh.Bits()) {
				plan.Routes = append(plan.Routes, p)
			}
		}
		pc.AllowedIPs = kept
	}
	for i := range plan.Peers {
		pc := &plan.Peers[i]
		if in := foreign[pc.Node]; in != "" {
			plan.Conflicts = append(plan.Conflicts, fmt.Sprintf("endpoint %s of %s is inside %s, another site's; not dialled", pc.Endpoint, pc.Node, in))
			pc.Endpoint = netip.AddrPort{}
		}
	}
	slices.SortFunc(plan.Routes, comparePrefix)
	plan.Routes = slices.Compact(plan.Routes)
}

// What of a gateway's underlay a prefix covers (endpointsIn).
const (
	underTunnel   = "tunnel"   // the endpoint dialled
	underEndpoint = "endpoint" // another endpoint it advertises
	underGossip   = "gossip"   // the address it gossips at
)

// endpointsIn looks at the peers whose endpoints p covers. If one is of
// site (p's own), it returns the address, the peer's name, and which of
// its addresses it is (underTunnel…): a site's routes may cover its own
// gateways' underlay (a private WAN), and then the prefix gives way, for
// any endpoint the gateway advertises, or the address it gossips at:
// routed into the tunnel, gossip to it would arrive from an address the
// gateway does not take from us, it would be declared dead, its routes
// held back, gossip would recover, and so on (dedupe). Otherwise it returns the
// peers whose dialled endpoint p covers: those endpoints give way. Another
// site's gateway with only an endpoint not dialled inside p is left be:
// an advert cannot unroute another site's network, and its tunnel holds
// as long as it sends from the endpoint dialled.
func endpointsIn(peers []PeerConfig, members []*Node, mesh, p netip.Prefix, site string) (netip.Addr, string, string, []string) {
	var others []string
	for _, x := range peers {
		a := x.Endpoint.Addr().Unmap()
		in := a.IsValid() && p.Contains(a)
		if x.Site != site {
			if in {
				others = append(others, x.Node)
			}
			continue
		}
		if in {
			return a, x.Node, underTunnel, nil
		}
		m := memberNamed(members, x.Node)
		if m == nil {
			continue
		}
		for _, e := range m.Advert.Endpoints {
			if b := e.Addr().Unmap(); !mesh.Contains(b) && p.Contains(b) {
				return b, x.Node, underEndpoint, nil
			}
		}
		if b := m.Gossip.Addr().Unmap(); b.IsValid() && !mesh.Contains(b) && p.Contains(b) {
			return b, x.Node, underGossip, nil
		}
	}
	return netip.Addr{}, "", "", others
}

// memberNamed is node's entry in members (sorted by node), or nil.
func memberNamed(members []*Node, node string) *Node {
	i, ok := slices.BinarySearchFunc(members, node, func(m *Node, n string) int { return cmp.Compare(m.node(), n) })
	if !ok {
		return nil
	}
	return members[i]
}

// underlay is the addresses the tunnels themselves send to, sorted: the
// endpoint of each peer. (Ours need no care: the kernel delivers packets
// to a local address locally, whatever routes cover it.) IPv4 addresses
// are kept as integers, as in anyOverlap: this runs at every plan.
type underlay struct {
	v4 []uint32
	v6 []netip.Addr
}

// underlayOf is the peers' dialled endpoints and, given members (sorted
// by node), every other endpoint they advertise outside mesh, the overlay
// range (never dialled): WireGuard follows a peer to any of them (dedupe);
// and the addresses they gossip at, which gossip must reach outside the
// tunnels.
func underlayOf(peers []PeerConfig, members []*Node, mesh netip.Prefix) underlay {
	u := underlay{v4: make([]uint32, 0, len(peers))}
	add := func(a netip.Addr) {
		if a = a.Unmap(); a.Is4() {
			b := a.As4()
			u.v4 = append(u.v4, binary.BigEndian.Uint32(b[:]))
		} else if a.IsValid() {
			u.v6 = append(u.v6, a)
		}
	}
	for _, pc := range peers {
		add(pc.Endpoint.Addr())
		m := memberNamed(members, pc.Node)
		if m == nil {
			continue
		}
		for _, e := range m.Advert.Endpoints {
			if a := e.Addr().Unmap(); !mesh.Contains(a) {
				add(a)
			}
		}
		if a := m.Gossip.Addr().Unmap(); !mesh.Contains(a) {
			add(a)
		}
	}
	slices.Sort(u.v4)
	slices.SortFunc(u.v6, netip.Addr.Compare)
	return u
}

// in reports whether p covers an address of u.
func (u underlay) in(p netip.Prefix) bool {
	var hit netip.Addr
	if p.Addr().Is4() {
		b := p.Masked().Addr().As4()
		lo := binary.BigEndian.Uint32(b[:])
		i, _ := slices.BinarySearch(u.v4, lo)
		if i == len(u.v4) {
			return false
		}
		var a [4]byte
		binary.BigEndian.PutUint32(a[:], u.v4[i])
		hit = netip.AddrFrom4(a)
	} else {
		i, _ := slices.BinarySearchFunc(u.v6, p.Masked().Addr(), netip.Addr.Compare)
		if i == len(u.v6) {
			return false
		}
		hit = u.v6[i]
	}
	return p.Contains(hit)
}

// anyOverlap reports whether any two allowed prefixes of the peers overlap
// (each peer's own list is already free of duplicates).
func anyOverlap(peers []PeerConfig) bool { return len(overlapping(peers)) > 0 }

// overlapping returns the allowed prefixes of the peers that overlap
// another (nil if none): only they need settling, against each other.
// Sorted by address then length, a prefix overlaps an earlier one only if
// that one contains it, and those containing it are on a stack of the
// prefixes still open. IPv4 prefixes, the usual case, are sorted as
// integers: sorting netip values was most of the cost of a thousand-peer
// plan.
func overlapping(peers []PeerConfig) map[netip.Prefix]bool {
	v4 := make([]uint64, 0, 2*len(peers)) // address << 8 | length
	var v6 []netip.Prefix
	for _, pc := range peers {
		for _, p := range pc.AllowedIPs {
			if p.Addr().Is4() {
				a := p.Addr().As4()
				v4 = append(v4, uint64(a[0])<<32|uint64(a[1])<<24|uint64(a[2])<<16|uint64(a[3])<<8|uint64(p.Bits()))
			} else {
				v6 = append(v6, p)
			}
		}
	}
	var out map[netip.Prefix]bool
	mark := func(p netip.Prefix) {
		if out == nil {
			out = map[netip.Prefix]bool{}
		}
		out[p] = true
	}
	prefix4 := func(k uint64) netip.Prefix {
		a := uint32(k >> 8)
		return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), int(k&0xff))
	}
	slices.Sort(v4)
	var open4 []uint64
	contains := func(q, k uint64) bool { // prefix q contains the address of k
		bits := q & 0xff
		return bits == 0 || (q>>8)>>(32-bits) == (k>>8)>>(32-bits)
	}
	for _, k := range v4 {
		for len(open4) > 0 && !contains(open4[len(open4)-1], k) {
			open4 = open4[:len(open4)-1]
		}
		if len(open4) > 0 {
			mark(prefix4(k))
			for _, q := range open4 {
				mark(prefix4(q))
			}
		}
		open4 = append(open4, k)
	}
	slices.SortFunc(v6, comparePrefix)
	var open []netip.Prefix
	for _, p := range v6 {
		for len(open) > 0 && !open[len(open)-1].Contains(p.Addr()) {
			open = open[:len(open)-1]
		}
		if len(open) > 0 {
			mark(p)
			for _, q := range open {
				mark(q)
			}
		}
		open = append(open, p)
	}
	return out
}

func overlapsAny(p netip.Prefix, set []netip.Prefix) (netip.Prefix, bool) {
	for _, q := range set {
		if p.Overlaps(q) {
			return q, true
		}
	}
	return netip.Prefix{}, false
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
