package mesh

import (
	"cmp"
	"fmt"
	"html"
	"math"
	"slices"
	"strings"
	"sync"
	"time"
)

// MeshGraph is the mesh as a picture shows it: sites as groups, gateways
// as nodes, tunnels as edges. Every gateway can draw the whole mesh
// because the topology is a pure function of the membership it verified;
// only its own tunnels carry a handshake age, since only its own device
// reports one.
type MeshGraph struct {
	Self    string        `json:"self"`
	Sites   []GraphSite   `json:"sites"`
	Tunnels []GraphTunnel `json:"tunnels"`
	// SiteLinks are the tunnels between each pair of sites, counted: the
	// picture of a mesh too large to draw gateway by gateway.
	SiteLinks []GraphSiteLink `json:"site_links"`
	// TunnelsOmitted counts tunnels left out of Tunnels (the dashboard
	// keeps only this gateway's own in a large mesh).
	TunnelsOmitted int `json:"tunnels_omitted,omitempty"`
}

// GraphSiteLink is the tunnels between two sites (A < B).
type GraphSiteLink struct {
	A       string `json:"a"`
	B       string `json:"b"`
	Tunnels int    `json:"tunnels"`
	Health  string `json:"health"` // the worst of this gateway's tunnels among them, else remote
}

// GraphSite is a site and its verified gateways.
type GraphSite struct {
	Name         string         `json:"name"`
	Jurisdiction string         `json:"jurisdiction"`
	Provider     string         `json:"provider"`
	Region       string         `json:"region"`
	Gateways     []GraphGateway `json:"gateways"`
	// Down: no gateway of the site is alive (crashed, stopped, cut off);
	// its gateways as last verified are drawn so, with no tunnels.
	Down bool `json:"down,omitempty"`
}

// GraphGateway is one gateway.
type GraphGateway struct {
	Node      string `json:"node"`
	OverlayIP string `json:"overlay_ip"`
	Self      bool   `json:"self,omitempty"`
	Down      bool   `json:"down,omitempty"` // of a site that is down
}

// Tunnel health, as edges are coloured.
const (
	TunnelFresh  = "fresh"  // handshook within 150 s
	TunnelAgeing = "ageing" // 150-180 s: a re-key is due
	TunnelStale  = "stale"  // older than 180 s (or never, 180 s after it began to send) while sending: broken
	TunnelIdle   = "idle"   // configured, no handshake and nothing sent (or for 180 s at most): WireGuard handshakes on demand
	TunnelRemote = "remote" // between two other gateways: its health is on their dashboards
)

// GraphTunnel is one tunnel; A < B.
type GraphTunnel struct {
	A             string    `json:"a"`
	B             string    `json:"b"`
	Health        string    `json:"health"`
	LastHandshake time.Time `json:"last_handshake,omitzero"`
	AgeSeconds    float64   `json:"age_seconds,omitempty"`
}

// Graph computes the mesh graph from what this gateway verified.
func (g *Gateway) Graph() (*MeshGraph, error) {
	st, err := g.Status()
	if err != nil {
		return nil, err
	}
	return g.graphOf(st, false), nil
}

// graphOf computes the graph; with localOnly, a mesh larger than
// svgDetailLimit keeps only this gateway's own tunnels in Tunnels (the
// others are counted in SiteLinks): what a dashboard needs every second.
// st is the status the caller already read (the device's handshakes).
func (g *Gateway) graphOf(st *Status, localOnly bool) *MeshGraph {
	selfp, pol, trust := g.self.Load(), g.policy.Load(), g.trust.Load()
	key := planKey{gen: g.members.generation(), self: selfp, policy: pol, trust: trust}
	nodes := append([]Node{*selfp}, g.members.gateways()...)
	now := g.now()
	// Drawing the mesh computes every gateway's plan: O(n²) work that a
	// dashboard would otherwise redo every second. The edges are kept
	// while the inputs stand (30 s at most, for the policy's time
	// windows), and, in a large mesh under churn, for a few seconds even
	// if they changed.
	g.graph.mu.Lock()
	defer g.graph.mu.Unlock()
	age := now.Sub(g.graph.at)
	if g.graph.edges == nil || age > graphMaxAge || (g.graph.key != key && (len(nodes) <= svgDetailLimit || age > graphChurnAge)) {
		in := TopologyInput{Mode: g.s.Topology, Now: now, MeshPrefix: trust.MeshPrefix()}
		if pol != nil {
			in.Policy = pol.p
		}
		g.graph.edges, g.graph.key, g.graph.at = meshEdges(nodes, in), key, now
		g.graph.sum = nil
	}
	if !localOnly || len(nodes) <= svgDetailLimit {
		return buildGraph(nodes, g.graph.edges, selfp.node(), st.Members, now, false)
	}
	// A dashboard's picture every second needs this gateway's tunnels
	// and the others counted per pair of sites: summed once per edges and
	// membership, not in a pass over every tunnel each time (a fifth of
	// a second and more at 1,000 gateways).
	if g.graph.sum == nil || g.graph.sumKey != key {
		g.graph.sum, g.graph.sumKey = summarize(nodes, g.graph.edges, selfp.node()), key
	}
	return drawLocal(nodes, g.graph.sum, selfp.node(), st.Members, now)
}

// How long Graph keeps the mesh's edges.
const (
	graphMaxAge   = 30 * time.Second
	graphChurnAge = 5 * time.Second
)

// graphCache holds the edges Graph computed last, and their summary
// for the membership of sumKey.
type graphCache struct {
	mu     sync.Mutex
	key    planKey
	at     time.Time
	edges  map[[2]string]bool
	sum    *edgeSummary
	sumKey planKey
}

// meshEdges computes every gateway's plan, as that gateway would, and
// collects the tunnels (A < B).
func meshEdges(nodes []Node, in TopologyInput) map[[2]string]bool {
	edges := map[[2]string]bool{}
	// Sorted once here, every gateway's peers come sorted, and Compute
	// neither copies nor sorts them: that was half the time and most of
	// the memory at 300 gateways. One buffer serves every gateway, since
	// Compute only reads its peers and nothing of a plan outlives the
	// loop but node names.
	nodes = slices.Clone(nodes)
	slices.SortFunc(nodes, func(a, b Node) int { return cmp.Compare(a.node(), b.node()) })
	peers := make([]Node, 0, len(nodes))
	for i, n := range nodes {
		in.Self = n
		in.Peers = append(append(peers[:0], nodes[:i]...), nodes[i+1:]...)
		for _, pc := range Compute(in).Peers {
			e := [2]string{n.node(), pc.Node}
			if e[0] > e[1] {
				e[0], e[1] = e[1], e[0]
			}
			edges[e] = true
		}
	}
	return edges
}

// buildGraph is the pure part of Graph. With localOnly, Tunnels holds
// only self's tunnels and the others are only counted.
func buildGraph(nodes []Node, edges map[[2]string]bool, self string, members []MemberStatus, now time.Time, localOnly bool) *MeshGraph {
	if localOnly {
		return drawLocal(nodes, summarize(nodes, edges, self), self, members, now)
	}
	g, peer := graphSites(nodes, self, members)
	siteOf := map[string]string{}
	for _, n := range nodes {
		siteOf[n.node()] = n.site()
	}
	links := map[[2]string]*GraphSiteLink{}
	for e := range edges {
		sa, okA := siteOf[e[0]]
		sb, okB := siteOf[e[1]]
		if !okA || !okB {
			continue // computed before the gateway left
		}
		t := selfTunnel(e, self, peer, now)
		g.Tunnels = append(g.Tunnels, t)
		if sa != sb {
			countSiteLink(links, sa, sb, t.Health)
		}
	}
	return finishGraph(g, links)
}

// edgeSummary is what a dashboard's picture needs of the mesh's edges:
// this gateway's tunnels, and the others counted.
type edgeSummary struct {
	mine      [][2]string         // self's tunnels (A < B)
	total     int                 // tunnels between gateways of the membership
	siteLinks map[[2]string][]int // per pair of sites (A < B): the tunnels, then which of mine they hold
}

// summarize sums edges over the gateways in nodes; edges of a gateway
// that has left since they were computed are left out.
func summarize(nodes []Node, edges map[[2]string]bool, self string) *edgeSummary {
	siteOf := make(map[string]string, len(nodes))
	for _, n := range nodes {
		siteOf[n.node()] = n.site()
	}
	s := &edgeSummary{siteLinks: map[[2]string][]int{}}
	for e := range edges {
		sa, okA := siteOf[e[0]]
		sb, okB := siteOf[e[1]]
		if !okA || !okB {
			continue
		}
		s.total++
		mine := e[0] == self || e[1] == self
		if mine {
			s.mine = append(s.mine, e)
		}
		if sa == sb {
			continue
		}
		k := [2]string{min(sa, sb), max(sa, sb)}
		l := s.siteLinks[k]
		if l == nil {
			l = []int{0}
		}
		l[0]++
		if mine {
			l = append(l, len(s.mine)-1)
		}
		s.siteLinks[k] = l
	}
	return s
}

// drawLocal is buildGraph with localOnly, from the edges' summary: only
// this gateway's tunnels are looked at.
func drawLocal(nodes []Node, sum *edgeSummary, self string, members []MemberStatus, now time.Time) *MeshGraph {
	g, peer := graphSites(nodes, self, members)
	tunnels := make([]GraphTunnel, len(sum.mine))
	for i, e := range sum.mine {
		tunnels[i] = selfTunnel(e, self, peer, now)
	}
	g.Tunnels = append(g.Tunnels, tunnels...)
	g.TunnelsOmitted = sum.total - len(sum.mine)
	links := make(map[[2]string]*GraphSiteLink, len(sum.siteLinks))
	for k, l := range sum.siteLinks {
		sl := &GraphSiteLink{A: k[0], B: k[1], Tunnels: l[0], Health: TunnelRemote}
		for _, i := range l[1:] {
			if h := tunnels[i].Health; sl.Health == TunnelRemote || healthRank[h] > healthRank[sl.Health] {
				sl.Health = h
			}
		}
		links[k] = sl
	}
	return finishGraph(g, links)
}

// selfTunnel is the tunnel e as this gateway sees it: its own with the
// device's health, others remote.
func selfTunnel(e [2]string, self string, peer map[string]MemberStatus, now time.Time) GraphTunnel {
	t := GraphTunnel{A: e[0], B: e[1], Health: TunnelRemote}
	other := ""
	switch self {
	case e[0]:
		other = e[1]
	case e[1]:
		other = e[0]
	}
	if m, ok := peer[other]; ok {
		t.Health, t.LastHandshake = tunnelHealth(m, now), m.LastHandshake
		if !m.LastHandshake.IsZero() {
			t.AgeSeconds = math.Round(now.Sub(m.LastHandshake).Seconds())
		}
	} else if other != "" {
		t.Health = TunnelIdle // planned, not yet on the device
	}
	return t
}

// countSiteLink counts a tunnel of the given health between sites sa and
// sb in links.
func countSiteLink(links map[[2]string]*GraphSiteLink, sa, sb, health string) {
	k := [2]string{min(sa, sb), max(sa, sb)}
	l := links[k]
	if l == nil {
		l = &GraphSiteLink{A: k[0], B: k[1], Health: TunnelRemote}
		links[k] = l
	}
	l.Tunnels++
	if health != TunnelRemote && (l.Health == TunnelRemote || healthRank[health] > healthRank[l.Health]) {
		l.Health = health
	}
}

// finishGraph sorts g's tunnels and adds the site links.
func finishGraph(g *MeshGraph, links map[[2]string]*GraphSiteLink) *MeshGraph {
	slices.SortFunc(g.Tunnels, func(a, b GraphTunnel) int { return cmp.Or(cmp.Compare(a.A, b.A), cmp.Compare(a.B, b.B)) })
	for _, l := range links {
		g.SiteLinks = append(g.SiteLinks, *l)
	}
	slices.SortFunc(g.SiteLinks, func(a, b GraphSiteLink) int { return cmp.Or(cmp.Compare(a.A, b.A), cmp.Compare(a.B, b.B)) })
	return g
}

// graphSites starts the graph: its sites and gateways, those of sites
// that are down included; and the device's peers by node.
func graphSites(nodes []Node, self string, members []MemberStatus) (*MeshGraph, map[string]MemberStatus) {
	g := &MeshGraph{Self: self, Sites: []GraphSite{}, Tunnels: []GraphTunnel{}, SiteLinks: []GraphSiteLink{}} // [] not null in JSON
	bySite := map[string][]Node{}
	for _, n := range nodes {
		bySite[n.site()] = append(bySite[n.site()], n)
	}
	for _, name := range sortedKeys(bySite) {
		ns := bySite[name]
		slices.SortFunc(ns, func(a, b Node) int { return cmp.Compare(a.node(), b.node()) })
		a := ns[0].Attributes
		s := GraphSite{Name: name, Jurisdiction: a.Jurisdiction, Provider: a.Provider, Region: a.Region}
		for _, n := range ns {
			s.Gateways = append(s.Gateways, GraphGateway{Node: n.node(), OverlayIP: n.Attributes.OverlayIP.String(), Self: n.node() == self})
		}
		g.Sites = append(g.Sites, s)
	}
	// A site with no gateway alive stays in the picture, down, as the
	// metrics keep it, unreachable: gone from it, it could be missed.
	down := map[string]*GraphSite{}
	for _, m := range members {
		if m.State != StateDead || !m.SiteVerified || bySite[m.Site] != nil {
			continue
		}
		d := down[m.Site]
		if d == nil {
			d = &GraphSite{Name: m.Site, Jurisdiction: m.Jurisdiction, Provider: m.Provider, Region: m.Region, Down: true}
			down[m.Site] = d
		}
		d.Gateways = append(d.Gateways, GraphGateway{Node: m.Node, OverlayIP: m.OverlayIP, Down: true})
	}
	for _, d := range down {
		slices.SortFunc(d.Gateways, func(a, b GraphGateway) int { return cmp.Compare(a.Node, b.Node) })
		g.Sites = append(g.Sites, *d)
	}
	slices.SortFunc(g.Sites, func(a, b GraphSite) int { return cmp.Compare(a.Name, b.Name) })
	peer := map[string]MemberStatus{}
	for _, m := range members {
		if m.Peer {
			peer[m.Node] = m
		}
	}
	return g, peer
}

// healthRank orders this gateway's tunnel states from good to bad.
var healthRank = map[string]int{TunnelIdle: 0, TunnelFresh: 1, TunnelAgeing: 2, TunnelStale: 3}

// gateways counts the gateways in the graph.
func (g *MeshGraph) gateways() int {
	n := 0
	for _, s := range g.Sites {
		n += len(s.Gateways)
	}
	return n
}

func tunnelHealth(m MemberStatus, now time.Time) string {
	if m.LastHandshake.IsZero() {
		// Failing once it has sent for over 180 s unanswered, as a tunnel
		// that handshook: a new peer sends its first initiation at once
		// (the greeting), an idle one with its first packet, and the
		// answer comes a round trip later, or a retry 5 s on. A tunnel
		// kept alive sends from its first look, even when the host lets
		// none of its packets out (the counter grows only when one
		// leaves). A status that does not say when it began to send
		// (SentSince zero) is judged by the counter alone.
		if (m.TxBytes > 0 || m.Keepalive > 0 && !m.SentSince.IsZero()) && (m.SentSince.IsZero() || now.Sub(m.SentSince) > staleHandshake) {
			return TunnelStale
		}
		return TunnelIdle
	}
	switch age := now.Sub(m.LastHandshake); {
	case age < 150*time.Second:
		return TunnelFresh
	case age <= staleHandshake:
		return TunnelAgeing
	}
	// No handshake for over 180 s: failing if it sends meanwhile (a
	// WireGuard peer with traffic to send handshakes every 2 minutes, and
	// retries every 5 s when unanswered), idle if it has not sent since.
	// A tunnel with a persistent keepalive always has something to send;
	// its transmit counter is no witness, for WireGuard counts only what
	// the host let out (a firewall dropping our packets freezes it).
	if m.Keepalive > 0 || !m.LastSent.IsZero() && now.Sub(m.LastSent) <= staleHandshake && m.LastSent.After(m.LastHandshake) {
		return TunnelStale
	}
	return TunnelIdle
}

// healthColour is a tunnel's colour in both renderings.
var healthColour = map[string]string{
	TunnelFresh: "#1a7f37", TunnelAgeing: "#d97706", TunnelStale: "#cf222e", TunnelIdle: "#8c959f", TunnelRemote: "#6e7781",
}

func (t GraphTunnel) label() string {
	switch t.Health {
	case TunnelRemote:
		return ""
	case TunnelIdle:
		if t.LastHandshake.IsZero() {
			return "idle: no handshake yet"
		}
	}
	if t.LastHandshake.IsZero() {
		return "no handshake"
	}
	return fmt.Sprintf("handshake %s ago", (time.Duration(t.AgeSeconds) * time.Second).String())
}

func (s GraphSite) label() string {
	l := fmt.Sprintf("%s (%s, %s %s)", s.Name, s.Jurisdiction, s.Provider, s.Region)
	if s.Down {
		l += " DOWN"
	}
	return l
}

// DOT renders the graph in Graphviz dot.
func (g *MeshGraph) DOT() string {
	var b strings.Builder
	b.WriteString("graph skybridge {\n  layout=dot; node [shape=box, style=rounded];\n")
	for i, s := range g.Sites {
		fmt.Fprintf(&b, "  subgraph cluster_%d {\n    label=%q;\n", i, s.label())
		for _, gw := range s.Gateways {
			attrs := ""
			if gw.Self {
				attrs = ", penwidth=2"
			}
			if gw.Down {
				attrs = `, style="rounded,dashed", color="#8c959f", fontcolor="#8c959f"`
			}
			fmt.Fprintf(&b, "    %q [label=%q%s];\n", gw.Node, gw.Node+"\n"+gw.OverlayIP, attrs)
		}
		b.WriteString("  }\n")
	}
	for _, t := range g.Tunnels {
		attrs := ""
		if l := t.label(); l != "" {
			style := ""
			if t.Health == TunnelIdle || t.Health == TunnelStale {
				style = ", style=dashed"
			}
			attrs = fmt.Sprintf(" [label=%q, color=%q%s]", l, healthColour[t.Health], style)
		}
		fmt.Fprintf(&b, "  %q -- %q%s;\n", t.A, t.B, attrs)
	}
	b.WriteString("}\n")
	return b.String()
}

// SVG geometry.
const (
	svgDetailLimit = 48 // more gateways than this: sites only, tunnels counted between them

	svgGatewayW = 180.0
	svgGatewayH = 40.0
	svgSitePad  = 14.0
	svgSiteHead = 40.0
	svgGap      = 10.0
)

type svgBox struct{ x, y, w, h float64 }

// SVG renders the graph as a standalone SVG document: sites on a circle
// (so every pair of sites has a clear line of sight), their gateways
// stacked inside, tunnels drawn between gateway centres; a mesh of more
// than svgDetailLimit gateways is drawn by site (see siteSVG). Every element
// carries data-* attributes naming what it shows, for scripts and tests.
// It uses presentation attributes only (no style attributes or scripts),
// so a strict Content-Security-Policy page can inline it.
func (g *MeshGraph) SVG() string {
	if g.gateways() > svgDetailLimit || g.TunnelsOmitted > 0 {
		return g.siteSVG()
	}
	heights := make([]float64, len(g.Sites))
	for i, s := range g.Sites {
		heights[i] = svgSiteHead + float64(len(s.Gateways))*(svgGatewayH+svgGap) + svgSitePad - svgGap
	}
	boxes, width, height := circleLayout(heights)
	centre := map[string][2]float64{}
	for i, s := range g.Sites {
		for j, gw := range s.Gateways {
			centre[gw.Node] = [2]float64{boxes[i].x + boxes[i].w/2, boxes[i].y + svgSiteHead + float64(j)*(svgGatewayH+svgGap) + svgGatewayH/2}
		}
	}
	var b strings.Builder
	svgOpen(&b, width, height)
	b.WriteString(`<g class="tunnels">` + "\n")
	for _, t := range g.Tunnels {
		p, q := centre[t.A], centre[t.B]
		dash := ""
		if t.Health == TunnelIdle || t.Health == TunnelStale {
			dash = ` stroke-dasharray="6 4"`
		}
		w := 3.0
		if t.Health == TunnelRemote {
			w = 1.5
		}
		fmt.Fprintf(&b, `<line class="tunnel" data-a="%s" data-b="%s" data-health="%s" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="%.1f"%s><title>%s</title></line>`+"\n",
			esc(t.A), esc(t.B), t.Health, p[0], p[1], q[0], q[1], healthColour[t.Health], w, dash, esc(t.A+" — "+t.B+": "+cmp.Or(t.label(), "tunnel between two other gateways")))
	}
	b.WriteString("</g>\n")
	for i, s := range g.Sites {
		bx := boxes[i]
		siteHeader(&b, s, bx)
		for j, gw := range s.Gateways {
			y := bx.y + svgSiteHead + float64(j)*(svgGatewayH+svgGap)
			stroke, sw, fill, dash, note := "#57606a", 1.0, "#ffffff", "", ""
			if gw.Self {
				stroke, sw = "#0969da", 2.5
			}
			if gw.Down {
				stroke, fill, dash, note = healthColour[TunnelStale], "#f6f8fa", ` stroke-dasharray="6 4"`, " · down"
			}
			fmt.Fprintf(&b, `<g class="gateway" data-node="%s" data-down="%t"><rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" rx="6" fill="%s" stroke="%s" stroke-width="%.1f"%s/>`, esc(gw.Node), gw.Down, bx.x+svgSitePad, y, svgGatewayW, svgGatewayH, fill, stroke, sw, dash)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" fill="#24292f">%s</text><text x="%.1f" y="%.1f" font-size="11" fill="#57606a">%s</text></g>`+"\n",
				bx.x+svgSitePad+10, y+17, esc(gw.Node), bx.x+svgSitePad+10, y+32, esc(gw.OverlayIP+note))
		}
		b.WriteString("</g>\n")
	}
	svgLegend(&b, height)
	b.WriteString("</svg>\n")
	return b.String()
}

// circleLayout places boxes of the given heights (and the site width) on
// a circle wide enough that neighbours do not overlap (they are
// 2r·sin(π/n) apart), then crops to them: a circle of three sites leaves
// its lower part empty.
func circleLayout(heights []float64) (boxes []svgBox, width, height float64) {
	n := len(heights)
	siteW := svgGatewayW + 2*svgSitePad
	boxes = make([]svgBox, n)
	maxH := 0.0
	for i, h := range heights {
		boxes[i] = svgBox{w: siteW, h: h}
		maxH = max(maxH, h)
	}
	r := 0.0
	switch {
	case n == 2:
		r = (siteW + 120) / 2
	case n > 2:
		r = (math.Hypot(siteW, maxH) + 60) / (2 * math.Sin(math.Pi/float64(n)))
	}
	minX, minY, maxX, maxY := math.Inf(1), math.Inf(1), math.Inf(-1), math.Inf(-1)
	for i := range boxes {
		a := -math.Pi/2 + 2*math.Pi*float64(i)/float64(max(n, 1))
		if n == 2 {
			a = math.Pi * float64(i-1) // left, right
		}
		boxes[i].x = r*math.Cos(a) - boxes[i].w/2
		boxes[i].y = r*math.Sin(a) - boxes[i].h/2
		minX, minY = min(minX, boxes[i].x), min(minY, boxes[i].y)
		maxX, maxY = max(maxX, boxes[i].x+boxes[i].w), max(maxY, boxes[i].y+boxes[i].h)
	}
	const margin, legend = 20.0, 34.0
	width = max(maxX-minX+2*margin, 540)
	for i := range boxes {
		boxes[i].x += width/2 - (minX+maxX)/2
		boxes[i].y += margin - minY
	}
	return boxes, width, maxY - minY + 2*margin + legend
}

// siteSVG draws a large mesh by site: each site with its number of
// gateways (and this gateway, if it is there), one line per pair of sites
// labelled with the number of tunnels between them.
func (g *MeshGraph) siteSVG() string {
	heights := make([]float64, len(g.Sites))
	for i := range heights {
		heights[i] = svgSiteHead + svgGatewayH + svgSitePad
	}
	boxes, width, height := circleLayout(heights)
	index := map[string]int{}
	for i, s := range g.Sites {
		index[s.Name] = i
	}
	var b strings.Builder
	svgOpen(&b, width, height)
	b.WriteString(`<g class="site-links">` + "\n")
	for _, l := range g.SiteLinks {
		p, q := boxes[index[l.A]], boxes[index[l.B]]
		x1, y1, x2, y2 := p.x+p.w/2, p.y+p.h/2, q.x+q.w/2, q.y+q.h/2
		fmt.Fprintf(&b, `<line class="site-link" data-a="%s" data-b="%s" data-tunnels="%d" data-health="%s" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="%.1f"><title>%s</title></line>`+"\n",
			esc(l.A), esc(l.B), l.Tunnels, l.Health, x1, y1, x2, y2, healthColour[l.Health], min(1.5+math.Log2(float64(l.Tunnels)), 8),
			esc(fmt.Sprintf("%s — %s: %d tunnels", l.A, l.B, l.Tunnels)))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11" fill="#57606a" text-anchor="middle">%d</text>`+"\n", (x1+x2)/2, (y1+y2)/2-4, l.Tunnels)
	}
	b.WriteString("</g>\n")
	for i, s := range g.Sites {
		bx := boxes[i]
		siteHeader(&b, s, bx)
		line, stroke, sw := fmt.Sprintf("%d gateways", len(s.Gateways)), "#57606a", 1.0
		for _, gw := range s.Gateways {
			if gw.Self {
				line, stroke, sw = fmt.Sprintf("%d gateways, this one: %s", len(s.Gateways), gw.Node), "#0969da", 2.5
			}
		}
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" rx="6" fill="#ffffff" stroke="%s" stroke-width="%.1f"/><text x="%.1f" y="%.1f" fill="#24292f">%s</text>`+"\n",
			bx.x+svgSitePad, bx.y+svgSiteHead, svgGatewayW, svgGatewayH, stroke, sw, bx.x+svgSitePad+10, bx.y+svgSiteHead+24, esc(line))
		b.WriteString("</g>\n")
	}
	svgLegend(&b, height)
	b.WriteString("</svg>\n")
	return b.String()
}

func svgOpen(b *strings.Builder, width, height float64) {
	fmt.Fprintf(b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %.0f %.0f" width="%.0f" height="%.0f" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12" role="img" aria-label="skybridge mesh">`+"\n", width, height, width, height)
	b.WriteString(`<rect width="100%" height="100%" fill="#ffffff"/>` + "\n")
}

// siteHeader opens a site's group and draws its box and title.
func siteHeader(b *strings.Builder, s GraphSite, bx svgBox) {
	fmt.Fprintf(b, `<g class="site" data-site="%s">`+"\n", esc(s.Name))
	stroke, sub := "#57606a", fmt.Sprintf("%s · %s %s", s.Jurisdiction, s.Provider, s.Region)
	if s.Down {
		stroke, sub = healthColour[TunnelStale], sub+" · DOWN"
	}
	fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" rx="10" fill="#f6f8fa" stroke="%s" stroke-width="1.2"/>`+"\n", bx.x, bx.y, bx.w, bx.h, stroke)
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-weight="bold" font-size="13" fill="#24292f">%s</text>`+"\n", bx.x+svgSitePad, bx.y+18, esc(s.Name))
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="11" fill="#57606a">%s</text>`+"\n", bx.x+svgSitePad, bx.y+32, esc(sub))
}

func svgLegend(b *strings.Builder, height float64) {
	x := 20.0
	for _, h := range []string{TunnelFresh, TunnelAgeing, TunnelStale, TunnelIdle, TunnelRemote} {
		fmt.Fprintf(b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="%s" stroke-width="3"/><text x="%.0f" y="%.0f" font-size="11" fill="#57606a">%s</text>`+"\n",
			x, height-15, x+24, height-15, healthColour[h], x+30, height-11, h)
		x += 100
	}
}

func esc(s string) string { return html.EscapeString(s) }
