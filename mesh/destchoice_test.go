package mesh

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
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

// routed reports whether the gateway's plan routes node's overlay
// address into a tunnel.
func routed(g *Gateway, node string) bool {
	for _, n := range g.members.gateways() {
		if n.node() == node {
			for _, pc := range g.plan.Load().Peers {
				for _, p := range pc.AllowedIPs {
					if p.Contains(n.Attributes.OverlayIP) {
						return true
					}
				}
			}
		}
	}
	return false
}

// TestPickDestinationIgnoresTopology: `migrate run --to DE --class pii`
// went to a gateway this one has no tunnel to (its site handles no class
// in common with ours), though another DE gateway the policy allows just
// as well is linked: the migration failed to connect. Named, the
// unlinked one is refused with the link's reason, before any dial.
func TestPickDestinationIgnoresTopology(t *testing.T) {
	g := reachGateway(t, TopologyFullMesh, "gw-self", "pii",
		[3]string{"gw-a", "fra", "batch"}, // policy allows pii there; no tunnel (no shared class)
		[3]string{"gw-b", "muc", "pii"},   // policy allows pii there; linked
	)
	if routed(g, "gw-a") || !routed(g, "gw-b") {
		t.Fatalf("setup: routed gw-a %v, gw-b %v", routed(g, "gw-a"), routed(g, "gw-b"))
	}
	dest, _, err := g.pickDestination("DE", "pii")
	if err != nil {
		t.Fatal(err)
	}
	if dest.node() != "gw-b" {
		t.Errorf("--to DE picked %s (site %s), to which this gateway has no tunnel; gw-b, linked and allowed, was passed over", dest.node(), dest.site())
	}
	if _, _, err := g.pickDestination("gw-a", "pii"); err == nil || !strings.Contains(err.Error(), "no data class in common") {
		t.Errorf("gw-a named: %v; want it refused with why there is no tunnel", err)
	}
	// A class the policy refuses there is refused by the sender, and
	// recorded, as it was: nothing is dialled for that either.
	if dest, _, err := g.pickDestination("gw-a", "secret"); err != nil || dest.node() != "gw-a" {
		t.Errorf("gw-a named for a class the policy refuses: %v, %v; want it for the sender to refuse", dest, err)
	}
	if _, _, err := g.pickDestination("fra", "pii"); err == nil || !strings.Contains(err.Error(), "gw-a (site fra) is not reached: sites zrh and fra handle no data class in common") {
		t.Errorf("site fra: %v; want it refused with the link's reason", err)
	}
}

// TestPickDestinationThroughHub: behind a hub, a gateway of another site
// is reached through the hubs, not a peer of ours; one whose own hub
// does not link to us is not reached at all, and says which hub.
func TestPickDestinationThroughHub(t *testing.T) {
	g := reachGateway(t, TopologyHub, "zrh-2", "pii", // zrh-1 is our hub
		[3]string{"zrh-1", "zrh", "pii"},
		[3]string{"fra-1", "fra", "pii"},
		[3]string{"fra-2", "fra", "pii"},
		[3]string{"muc-1", "muc", "batch"}, // muc's hub: no class in common with us
		[3]string{"muc-2", "muc", "pii"},
	)
	if dest, _, err := g.pickDestination("fra-2", "pii"); err != nil || dest.node() != "fra-2" {
		t.Errorf("fra-2, reached through zrh-1 and fra-1: %v, %v", dest, err)
	}
	if dest, _, err := g.pickDestination("muc-2", "pii"); err == nil || !strings.Contains(err.Error(), "its hub muc-1 does not link to us") {
		t.Errorf("muc-2, whose hub does not link to us: %v, %v; want it refused, naming the hub", dest, err)
	}
	if dest, _, err := g.pickDestination("muc", "pii"); err == nil || !strings.Contains(err.Error(), "muc-1 (site muc) is not reached: sites zrh and muc handle no data class in common") ||
		!strings.Contains(err.Error(), "muc-2 (site muc) is not reached: its hub muc-1 does not link to us") {
		t.Errorf("site muc: %v, %v; want it refused, saying why each of its gateways is not reached", dest, err)
	}
}

// TestStartMigrationRefusesUnreachedNode: a migration named to a
// gateway this one has no tunnel to is refused before anything is
// dialled or recorded, with the link's reason.
func TestStartMigrationRefusesUnreachedNode(t *testing.T) {
	f := newFixture(t)
	dev := &dialCounter{RecordingDevice: NewRecordingDevice("mig")}
	g, ms := migGateway(t, f, dev)
	fra := f.identity("gw-fra", "fra", 2, f.now.Add(-2*time.Hour)) // no classes label: no tunnel under a policy
	ms.addCert(fra.Certificate().Raw)
	ms.update("gw-fra", gossipAddr, f.advert(fra, 1))
	g.replan()
	img := filepath.Join(t.TempDir(), "vm.raw")
	if err := os.WriteFile(img, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := g.StartMigration(MigrationRequest{Image: img, To: "gw-fra", Class: "c"})
	if err == nil || !strings.Contains(err.Error(), "is not reached") || !strings.Contains(err.Error(), "no data class in common") {
		t.Fatalf("StartMigration to gw-fra: %v; want it refused as not reached, with the link's reason", err)
	}
	if n := dev.dials.Load(); n != 0 {
		t.Errorf("%d dials to a gateway known not reached", n)
	}
	if sends, err := g.mig.sends(); err != nil || len(sends) != 0 {
		t.Errorf("sends recorded: %d, %v; want none", len(sends), err)
	}
}

type dialCounter struct {
	*RecordingDevice
	dials atomic.Int32
}

func (d *dialCounter) Dial(ctx context.Context, addr string) (net.Conn, error) {
	d.dials.Add(1)
	return d.RecordingDevice.Dial(ctx, addr)
}

// TestPlanIgnoresTopology: the planner placed a VM at a gateway this one
// has no tunnel to, while one it is linked to, with room, is allowed
// too; with only the unlinked one, the VM is unplaced, with the link's
// reason.
func TestPlanIgnoresTopology(t *testing.T) {
	g := reachGateway(t, TopologyFullMesh, "gw-self", "pii",
		[3]string{"gw-a", "fra", "batch"},
		[3]string{"gw-b", "muc", "pii"},
	)
	vms := []migrate.VM{{Name: "vm1", Image: "/img/vm1", Class: "pii", CPU: 1, MemoryGiB: 1, Bytes: 1}}
	for _, to := range []string{"DE", "fra"} {
		plan, err := migrate.MakePlan(migrate.PlanInput{From: g.id.Load().Attributes(), Policy: g.policy.Load().p, Now: g.now(),
			Destinations: g.destinations(nil), To: []string{to}, VMs: vms})
		if err != nil {
			t.Fatal(err)
		}
		for _, pl := range plan.Placements {
			if !routed(g, pl.To) {
				t.Errorf("--to %s: plan places %s (%s) at %s, to which this gateway has no tunnel (rule %s); migrate apply cannot reach it", to, pl.Name, pl.Class, pl.To, pl.Rule)
			}
		}
		if to == "fra" && (len(plan.Unplaced) != 1 || !strings.Contains(strings.Join(plan.Unplaced[0].Reasons, " "), "gw-a (fra): not reached from gw-self: sites zrh and fra handle no data class in common")) {
			t.Errorf("--to fra: unplaced %+v; want vm1, with the link's reason", plan.Unplaced)
		}
	}
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
	plan, err := migrate.MakePlan(migrate.PlanInput{From: g.id.Load().Attributes(), Policy: g.policy.Load().p, Now: g.now(), Destinations: g.destinations(nil), To: []string{"DE"},
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
	plan, err := migrate.MakePlan(migrate.PlanInput{From: g.id.Load().Attributes(), Policy: pol, Now: g.now(), Destinations: g.destinations(nil), To: []string{"DE"},
		VMs: []migrate.VM{{Name: "vm1", Image: "/img/vm1", Class: "pii", CPU: 1, MemoryGiB: 1, Bytes: 1}}})
	if err != nil || len(plan.Placements) != 1 || plan.Placements[0].To != dest.node() || dest.node() != "gw-b" {
		t.Errorf("--to DE: migrate run picks %s, the planner %+v (%v); want both gw-b, which the rules allow", dest.node(), plan.Placements, err)
	}
}
