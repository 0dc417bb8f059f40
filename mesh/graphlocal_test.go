package mesh

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"
)

// TestDrawLocalAgreesWithWholeGraph checks the dashboard's picture, drawn
// from the edges' summary, against the whole graph over random meshes:
// the same sites and site links (counts and this gateway's worst health
// among them), this gateway's tunnels alone, the rest counted. Edges of
// gateways that have left since they were computed are in the mix.
func TestDrawLocalAgreesWithWholeGraph(t *testing.T) {
	now := time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	r := rand.New(rand.NewPCG(7, 28))
	healths := map[string]int{}
	for round := range 300 {
		var nodes []Node
		sites := 1 + r.IntN(6)
		for s := range sites {
			for g := range 1 + r.IntN(8) {
				nodes = append(nodes, graphNode(fmt.Sprintf("gw-%d-%d", s, g), fmt.Sprintf("site-%d", s), byte(len(nodes)+1)))
			}
		}
		names := make([]string, 0, len(nodes)+3)
		for _, n := range nodes {
			names = append(names, n.node())
		}
		names = append(names, "gone-1", "gone-2", "gone-3") // left since the edges were computed
		edges := map[[2]string]bool{}
		for i := range names {
			for j := i + 1; j < len(names); j++ {
				if r.IntN(3) > 0 {
					edges[[2]string{min(names[i], names[j]), max(names[i], names[j])}] = true
				}
			}
		}
		self := nodes[r.IntN(len(nodes))].node()
		var members []MemberStatus
		for _, n := range nodes {
			m := MemberStatus{Node: n.node(), Peer: r.IntN(4) > 0, TxBytes: int64(r.IntN(2)) * 100}
			if r.IntN(2) == 0 {
				m.LastHandshake = now.Add(-time.Duration(r.IntN(400)) * time.Second)
			}
			members = append(members, m)
		}

		whole := buildGraph(nodes, edges, self, members, now, false)
		local := drawLocal(nodes, summarize(nodes, edges, self), self, members, now)
		var mine []GraphTunnel
		for _, tn := range whole.Tunnels {
			if tn.A == self || tn.B == self {
				mine = append(mine, tn)
				healths[tn.Health]++
			}
		}
		if !reflect.DeepEqual(local.Sites, whole.Sites) || !reflect.DeepEqual(local.SiteLinks, whole.SiteLinks) {
			t.Fatalf("round %d: sites or site links differ:\nlocal %+v\n      %+v\nwhole %+v\n      %+v", round, local.Sites, local.SiteLinks, whole.Sites, whole.SiteLinks)
		}
		if len(mine) == 0 {
			mine = []GraphTunnel{}
		}
		if !reflect.DeepEqual(local.Tunnels, mine) || local.TunnelsOmitted != len(whole.Tunnels)-len(mine) {
			t.Fatalf("round %d: tunnels %+v, %d omitted; want %+v, %d omitted", round, local.Tunnels, local.TunnelsOmitted, mine, len(whole.Tunnels)-len(mine))
		}
	}
	// The meshes drew this gateway's tunnels in every state, so a site
	// link's health was judged among several.
	for _, h := range []string{TunnelFresh, TunnelAgeing, TunnelStale, TunnelIdle} {
		if healths[h] == 0 {
			t.Errorf("no tunnel of this gateway was %s in 300 meshes: %v", h, healths)
		}
	}
}
