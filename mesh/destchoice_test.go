package mesh

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/migrate"
)

const everywherePolicy = `policy {
  name    = "t"
  version = 1
}
class "pii" {
  allow "store" {
    site = ["*"]
  }
  allow "transit" {
    site = ["*"]
  }
}
class "batch" {
  allow "store" {
    site = ["*"]
  }
  allow "transit" {
    site = ["*"]
  }
}
`

// reachGateway is a gateway self of site zrh (DE) in the topology mode
// given, with the verified peers given as node → site and classes
// label, and the plan its reconcile would have made of them.
func reachGateway(t *testing.T, mode, self, selfClasses string, peers ...[3]string) *Gateway {
	f := newFixture(t)
	host := byte(1)
	issue := func(node, site, classes string) *certs.NodeIdentity {
		host++
		id, err := f.ca.IssueIdentity(certs.Attributes{Node: node, Site: site, Region: "r-" + site, Provider: "aws", Jurisdiction: "DE",
			OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, host}), Labels: map[string]string{ClassesLabel: classes}}, 48*time.Hour, f.now.Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	id := issue(self, "zrh", selfClasses)
	ms := newMembership(self, f.trust(), func() time.Time { return f.now }, func() {})
	for _, p := range peers {
		pid := issue(p[0], p[1], p[2])
		ms.addCert(pid.Certificate().Raw)
		ms.update(p[0], gossipAddr, f.advert(pid, 1))
	}
	g := &Gateway{members: ms, now: func() time.Time { return f.now }, s: &Settings{Topology: mode}}
	g.id.Store(id)
	g.policy.Store(&adoptedPolicy{p: mustPolicy(t, everywherePolicy)})
	g.replan()
	return g
}

// replan stores the plan a reconcile makes of the membership and policy.
func (g *Gateway) replan() {
	plan := Compute(TopologyInput{Self: Node{Attributes: g.id.Load().Attributes()}, Peers: g.members.gateways(), Policy: g.policy.Load().p,
		Mode: g.s.Topology, Now: g.now(), MeshPrefix: mesh16})
	g.plan.Store(&plan)
}

// gatewayDests are the verified gateways as destinations of a plan.
func gatewayDests(g *Gateway) []migrate.Destination {
	var dests []migrate.Destination
	for _, n := range g.members.gateways() {
		dests = append(dests, migrate.Destination{Attributes: n.Attributes, Via: g.via(g.id.Load().Attributes(), n.Attributes)})
	}
	return dests
}

// TestPickDestinationOwnSite: `migrate run --to DE` from a DE site picked
// an idle gateway of our own site, which moves nothing out of it; the
// planner leaves the source's own site out unless named, and so does it
// now.
func TestPickDestinationOwnSite(t *testing.T) {
	g := reachGateway(t, TopologyFullMesh, "gw-self", "pii",
		[3]string{"gw-a-sibling", "zrh", "pii"}, // our own site
		[3]string{"gw-b", "muc", "pii"},
	)
	dest, _, err := g.pickDestination("DE", "pii")
	if err != nil {
		t.Fatal(err)
	}
	if dest.site() == "zrh" {
		t.Errorf("--to DE picked %s, a gateway of our own site %s; the planner leaves it out (a --to naming the jurisdiction does not name the site)", dest.node(), dest.site())
	}
	plan, err := migrate.MakePlan(migrate.PlanInput{From: g.id.Load().Attributes(), Policy: g.policy.Load().p, Now: g.now(), Destinations: gatewayDests(g), To: []string{"DE"},
		VMs: []migrate.VM{{Name: "vm1", Image: "/img/vm1", Class: "pii", CPU: 1, MemoryGiB: 1, Bytes: 1}}})
	if err != nil || len(plan.Placements) != 1 || plan.Placements[0].To != dest.node() {
		t.Errorf("--to DE: migrate run picks %s, the planner %+v (%v)", dest.node(), plan.Placements, err)
	}
	// Named, by the site or the gateway, it is a destination.
	for _, to := range []string{"zrh", "gw-a-sibling"} {
		if dest, _, err := g.pickDestination(to, "pii"); err != nil || dest.node() != "gw-a-sibling" {
			t.Errorf("--to %s: %v, %v; want gw-a-sibling", to, dest, err)
		}
	}
	g = reachGateway(t, TopologyFullMesh, "gw-self", "pii", [3]string{"gw-a-sibling", "zrh", "pii"})
	if _, _, err := g.pickDestination("DE", "pii"); err == nil || !strings.Contains(err.Error(), "own site zrh") {
		t.Errorf("--to DE with only our own site's gateway: %v; want it refused as our own site", err)
	}
}

// TestPickDestinationPrefersExceptionOverRule: `migrate run --to DE`
// picked a gateway only an exception admits (the data rests outside the
// rules, until the exception expires) over one the rules allow; the
// planner, for the same mesh and --to DE, picks the one the rules allow.
func TestPickDestinationPrefersExceptionOverRule(t *testing.T) {
	g := reachGateway(t, TopologyFullMesh, "gw-self", "pii", [3]string{"gw-a", "fra", "pii"}, [3]string{"gw-b", "muc", "pii"})
	pol := mustPolicy(t, `policy {
  name    = "t"
  version = 1
}
class "pii" {
  allow "store" {
    site = ["muc"]
  }
  allow "transit" {
    site = ["*"]
  }
}
exception "fra-for-now" {
  class    = "pii"
  action   = "store"
  site     = ["fra"]
  category = "waiver"
  reason   = "until muc has room"
  approver = "ciso"
  ticket   = "T-1"
  expires  = "2026-12-31"
}
`)
	g.policy.Store(&adoptedPolicy{p: pol})
	g.replan()
	dest, _, err := g.pickDestination("DE", "pii")
	if err != nil {
		t.Fatal(err)
	}
	plan, err := migrate.MakePlan(migrate.PlanInput{From: g.id.Load().Attributes(), Policy: pol, Now: g.now(), Destinations: gatewayDests(g), To: []string{"DE"},
		VMs: []migrate.VM{{Name: "vm1", Image: "/img/vm1", Class: "pii", CPU: 1, MemoryGiB: 1, Bytes: 1}}})
	if err != nil || len(plan.Placements) != 1 || plan.Placements[0].To != dest.node() || dest.node() != "gw-b" {
		t.Errorf("--to DE: migrate run picks %s, the planner %+v (%v); want both gw-b, which the rules allow", dest.node(), plan.Placements, err)
	}
}
