package mesh

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// Status is what `skybridge status` shows.
type Status struct {
	Node         string         `json:"node"`
	Site         string         `json:"site"`
	Region       string         `json:"region"`
	Jurisdiction string         `json:"jurisdiction"`
	OverlayIP    netip.Addr     `json:"overlay_ip"`
	Interface    string         `json:"interface"`
	Mode         string         `json:"mode"`
	PublicKey    string         `json:"public_key"`
	ListenPort   int            `json:"listen_port"`
	Gossip       string         `json:"gossip"`
	Identity     IdentityStatus `json:"identity"`
	Policy       string         `json:"policy"`
	Topology     string         `json:"topology"`
	Uptime       time.Duration  `json:"uptime_ns"`
	Members      []MemberStatus `json:"members"`
	Links        []Link         `json:"links"`
	Conflicts    []string       `json:"conflicts,omitempty"`
	Reconcile    ReconcileStats `json:"reconcile"`
}

// IdentityStatus describes our own certificate.
type IdentityStatus struct {
	Serial    string    `json:"serial"`
	NotAfter  time.Time `json:"not_after"`
	CRLNumber uint64    `json:"crl_number"`
}

// MemberStatus is one member: its verification state and, for peers, the
// tunnel as the WireGuard device reports it.
type MemberStatus struct {
	Node           string         `json:"node"`
	Site           string         `json:"site,omitempty"`
	Region         string         `json:"region,omitempty"`
	Provider       string         `json:"provider,omitempty"`
	Jurisdiction   string         `json:"jurisdiction,omitempty"`
	OverlayIP      string         `json:"overlay_ip,omitempty"`
	State          MemberState    `json:"state"`
	Reason         string         `json:"reason,omitempty"`
	Peer           bool           `json:"peer"` // configured as a WireGuard peer
	Endpoint       string         `json:"endpoint,omitempty"`
	AllowedIPs     []netip.Prefix `json:"allowed_ips,omitempty"`
	LastHandshake  time.Time      `json:"last_handshake,omitzero"`
	RxBytes        int64          `json:"rx_bytes"`
	TxBytes        int64          `json:"tx_bytes"`
	IdentityExpiry time.Time      `json:"identity_expiry,omitzero"`
	PublicKey      string         `json:"public_key,omitempty"`
}

// ReconcileStats count reconcile runs.
type ReconcileStats struct {
	Runs      int           `json:"runs"`
	Errors    int           `json:"errors"`
	LastError string        `json:"last_error,omitempty"`
	Last      time.Time     `json:"last,omitzero"`
	Duration  time.Duration `json:"duration_ns"`
}

// Status reports the gateway's view of the mesh.
func (g *Gateway) Status() (*Status, error) {
	id := g.id.Load()
	a := id.Attributes()
	tb := g.trust.Load()
	st := &Status{
		Node: a.Node, Site: a.Site, Region: a.Region, Jurisdiction: a.Jurisdiction, OverlayIP: a.OverlayIP,
		Interface: g.dev.Name(), Mode: g.dev.Mode(), PublicKey: g.wgKey.Public().String(), ListenPort: g.s.Port,
		Gossip: g.s.GossipAdvertise.String(), Policy: g.policyRevision(), Topology: g.s.Topology, Uptime: time.Since(g.started),
		Identity: IdentityStatus{Serial: certs.FormatSerial(id.Certificate().SerialNumber), NotAfter: id.Certificate().NotAfter, CRLNumber: crlNumber(tb.CRL())},
	}
	g.stats.mu.Lock()
	st.Reconcile = ReconcileStats{Runs: g.stats.runs, Errors: g.stats.errors, LastError: g.stats.lastError, Last: g.stats.last, Duration: g.stats.duration}
	g.stats.mu.Unlock()
	if p := g.plan.Load(); p != nil {
		st.Links, st.Conflicts = p.Links, p.Conflicts
	}
	dev, err := g.dev.Device()
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", g.dev.Name(), err)
	}
	peers := map[certs.WGPublicKey]int{}
	for i, p := range dev.Peers {
		peers[certs.WGPublicKey(p.PublicKey)] = i
	}
	for _, m := range g.members.snapshot() {
		ms := MemberStatus{Node: m.Name, State: m.State, Reason: m.Reason}
		if m.Advert != nil {
			ms.Site, ms.Jurisdiction, ms.Region, ms.Provider = m.Advert.Site, m.Advert.Jurisdiction, m.Advert.Region, m.Advert.Provider
			ms.OverlayIP, ms.PublicKey = m.Advert.OverlayIP.String(), m.Advert.WireGuardKey.String()
		}
		if m.Verified != nil {
			ms.IdentityExpiry = m.Verified.Cert.NotAfter
			if i, ok := peers[m.Verified.Advert.WireGuardKey]; ok {
				p := dev.Peers[i]
				ms.Peer, ms.LastHandshake, ms.RxBytes, ms.TxBytes = true, p.LastHandshakeTime, p.ReceiveBytes, p.TransmitBytes
				if p.Endpoint != nil {
					ms.Endpoint = p.Endpoint.String()
				}
				for _, n := range p.AllowedIPs {
					ms.AllowedIPs = append(ms.AllowedIPs, prefixOf(n))
				}
			}
		}
		st.Members = append(st.Members, ms)
	}
	return st, nil
}

// Graph renders the mesh as Graphviz: sites as clusters, gateways as
// nodes, tunnels as edges. Every gateway can draw the whole mesh because
// the topology is a pure function of the membership it verified; our own
// tunnels are labelled with their handshake age.
func (g *Gateway) Graph() (string, error) {
	st, err := g.Status()
	if err != nil {
		return "", err
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
	hs := map[string]time.Time{}
	for _, m := range st.Members {
		if m.Peer {
			hs[m.Node] = m.LastHandshake
		}
	}
	return renderDot(nodes, edges, self.node(), hs, g.now()), nil
}

func renderDot(nodes []Node, edges map[[2]string]bool, self string, handshakes map[string]time.Time, now time.Time) string {
	var b strings.Builder
	b.WriteString("graph skybridge {\n  layout=dot; node [shape=box, style=rounded];\n")
	bySite := map[string][]Node{}
	for _, n := range nodes {
		bySite[n.site()] = append(bySite[n.site()], n)
	}
	for i, site := range sortedKeys(bySite) {
		a := bySite[site][0].Attributes
		fmt.Fprintf(&b, "  subgraph cluster_%d {\n    label=%q;\n", i, fmt.Sprintf("%s (%s, %s %s)", site, a.Jurisdiction, a.Provider, a.Region))
		for _, n := range bySite[site] {
			attrs := ""
			if n.node() == self {
				attrs = ", penwidth=2"
			}
			fmt.Fprintf(&b, "    %q [label=%q%s];\n", n.node(), fmt.Sprintf("%s\n%s", n.node(), n.Attributes.OverlayIP), attrs)
		}
		b.WriteString("  }\n")
	}
	keys := make([][2]string, 0, len(edges))
	for e := range edges {
		keys = append(keys, e)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i][0]+keys[i][1] < keys[j][0]+keys[j][1] })
	for _, e := range keys {
		label := ""
		other := ""
		switch self {
		case e[0]:
			other = e[1]
		case e[1]:
			other = e[0]
		}
		if other != "" {
			if t, ok := handshakes[other]; ok && !t.IsZero() {
				label = fmt.Sprintf(" [label=%q, color=%s]", "handshake "+now.Sub(t).Round(time.Second).String()+" ago", handshakeColour(now.Sub(t)))
			} else {
				label = ` [label="no handshake", color=grey, style=dashed]`
			}
		}
		fmt.Fprintf(&b, "  %q -- %q%s;\n", e[0], e[1], label)
	}
	b.WriteString("}\n")
	return b.String()
}

// handshakeColour: WireGuard re-handshakes every 2 minutes on a live
// tunnel; older than 3 means stale.
func handshakeColour(age time.Duration) string {
	switch {
	case age < 150*time.Second:
		return "darkgreen"
	case age < 180*time.Second:
		return "orange"
	}
	return "red"
}
