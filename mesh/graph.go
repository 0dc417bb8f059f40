package mesh

import (
	"cmp"
	"fmt"
	"html"
	"math"
	"slices"
	"strings"
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
}

// GraphSite is a site and its verified gateways.
type GraphSite struct {
	Name         string         `json:"name"`
	Jurisdiction string         `json:"jurisdiction"`
	Provider     string         `json:"provider"`
	Region       string         `json:"region"`
	Gateways     []GraphGateway `json:"gateways"`
}

// GraphGateway is one gateway.
type GraphGateway struct {
	Node      string `json:"node"`
	OverlayIP string `json:"overlay_ip"`
	Self      bool   `json:"self,omitempty"`
}

// Tunnel health, as edges are coloured.
const (
	TunnelFresh  = "fresh"  // handshook within 150 s
	TunnelAgeing = "ageing" // 150-180 s: a re-key is due
	TunnelStale  = "stale"  // older than 180 s (or never) while sending: broken
	TunnelIdle   = "idle"   // configured, no handshake and nothing sent: WireGuard handshakes on demand
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
	self := *g.self.Load()
	nodes := append([]Node{self}, g.members.gateways()...)
	in := TopologyInput{Mode: g.s.Topology, Now: g.now(), MeshPrefix: g.trust.Load().MeshPrefix()}
	if p := g.policy.Load(); p != nil {
		in.Policy = p.p
	}
	edges := map[[2]string]bool{}
	for i, n := range nodes {
		in.Self = n
		in.Peers = append(append([]Node(nil), nodes[:i]...), nodes[i+1:]...)
		for _, pc := range Compute(in).Peers {
			e := [2]string{n.node(), pc.Node}
			if e[0] > e[1] {
				e[0], e[1] = e[1], e[0]
			}
			edges[e] = true
		}
	}
	return buildGraph(nodes, edges, self.node(), st.Members, g.now()), nil
}

// buildGraph is the pure part of Graph.
func buildGraph(nodes []Node, edges map[[2]string]bool, self string, members []MemberStatus, now time.Time) *MeshGraph {
	g := &MeshGraph{Self: self}
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
	peer := map[string]MemberStatus{}
	for _, m := range members {
		if m.Peer {
			peer[m.Node] = m
		}
	}
	for e := range edges {
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
		g.Tunnels = append(g.Tunnels, t)
	}
	slices.SortFunc(g.Tunnels, func(a, b GraphTunnel) int { return cmp.Or(cmp.Compare(a.A, b.A), cmp.Compare(a.B, b.B)) })
	return g
}

func tunnelHealth(m MemberStatus, now time.Time) string {
	if m.LastHandshake.IsZero() {
		if m.TxBytes > 0 {
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
	if m.TxBytes == 0 {
		return TunnelIdle
	}
	return TunnelStale
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
	return fmt.Sprintf("%s (%s, %s %s)", s.Name, s.Jurisdiction, s.Provider, s.Region)
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
	svgGatewayW = 180.0
	svgGatewayH = 40.0
	svgSitePad  = 14.0
	svgSiteHead = 40.0
	svgGap      = 10.0
)

type svgBox struct{ x, y, w, h float64 }

// SVG renders the graph as a standalone SVG document: sites on a circle
// (so every pair of sites has a clear line of sight), their gateways
// stacked inside, tunnels drawn between gateway centres. Every element
// carries data-* attributes naming what it shows, for scripts and tests.
// It uses presentation attributes only (no style attributes or scripts),
// so a strict Content-Security-Policy page can inline it.
func (g *MeshGraph) SVG() string {
	n := len(g.Sites)
	siteW := svgGatewayW + 2*svgSitePad
	boxes := make([]svgBox, n)
	maxH := 0.0
	for i, s := range g.Sites {
		h := svgSiteHead + float64(len(s.Gateways))*(svgGatewayH+svgGap) + svgSitePad - svgGap
		boxes[i] = svgBox{w: siteW, h: h}
		maxH = max(maxH, h)
	}
	// Place the site centres on a circle wide enough that the boxes do
	// not overlap: neighbours are 2r·sin(π/n) apart.
	r := 0.0
	if n > 1 {
		r = (math.Hypot(siteW, maxH) + 60) / (2 * math.Sin(math.Pi/float64(n)))
		if n == 2 {
			r = (siteW + 120) / 2
		}
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
	// Crop to the boxes: a circle of three sites leaves its lower part
	// empty.
	const margin, legend = 20.0, 34.0
	width := max(maxX-minX+2*margin, 540)
	for i := range boxes {
		boxes[i].x += width/2 - (minX+maxX)/2
		boxes[i].y += margin - minY
	}
	height := maxY - minY + 2*margin + legend
	centre := map[string][2]float64{}
	for i, s := range g.Sites {
		for j, gw := range s.Gateways {
			centre[gw.Node] = [2]float64{boxes[i].x + boxes[i].w/2, boxes[i].y + svgSiteHead + float64(j)*(svgGatewayH+svgGap) + svgGatewayH/2}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %.0f %.0f" width="%.0f" height="%.0f" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12" role="img" aria-label="skybridge mesh">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="#ffffff"/>`+"\n")
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
		fmt.Fprintf(&b, `<g class="site" data-site="%s">`+"\n", esc(s.Name))
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" rx="10" fill="#f6f8fa" stroke="#57606a" stroke-width="1.2"/>`+"\n", bx.x, bx.y, bx.w, bx.h)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-weight="bold" font-size="13" fill="#24292f">%s</text>`+"\n", bx.x+svgSitePad, bx.y+18, esc(s.Name))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11" fill="#57606a">%s</text>`+"\n", bx.x+svgSitePad, bx.y+32, esc(fmt.Sprintf("%s · %s %s", s.Jurisdiction, s.Provider, s.Region)))
		for j, gw := range s.Gateways {
			y := bx.y + svgSiteHead + float64(j)*(svgGatewayH+svgGap)
			stroke, sw := "#57606a", 1.0
			if gw.Self {
				stroke, sw = "#0969da", 2.5
			}
			fmt.Fprintf(&b, `<g class="gateway" data-node="%s"><rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" rx="6" fill="#ffffff" stroke="%s" stroke-width="%.1f"/>`, esc(gw.Node), bx.x+svgSitePad, y, svgGatewayW, svgGatewayH, stroke, sw)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" fill="#24292f">%s</text><text x="%.1f" y="%.1f" font-size="11" fill="#57606a">%s</text></g>`+"\n",
				bx.x+svgSitePad+10, y+17, esc(gw.Node), bx.x+svgSitePad+10, y+32, esc(gw.OverlayIP))
		}
		b.WriteString("</g>\n")
	}
	// Legend.
	x := 20.0
	for _, h := range []string{TunnelFresh, TunnelAgeing, TunnelStale, TunnelIdle, TunnelRemote} {
		fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="%s" stroke-width="3"/><text x="%.0f" y="%.0f" font-size="11" fill="#57606a">%s</text>`+"\n",
			x, height-15, x+24, height-15, healthColour[h], x+30, height-11, h)
		x += 100
	}
	b.WriteString("</svg>\n")
	return b.String()
}

func esc(s string) string { return html.EscapeString(s) }
