package migrate

import (
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/policy"
)

// TestMakePlanLeavesOutTheUnreached: a gateway the source's tunnels do
// not reach is no destination, however idle: `migrate apply` could not
// connect to it. A VM no other gateway takes says why it is not reached,
// rather than blaming an empty mesh.
func TestMakePlanLeavesOutTheUnreached(t *testing.T) {
	pol, err := policy.Parse("plan.hcl", []byte(planPolicy))
	if err != nil {
		t.Fatal(err)
	}
	from := &certs.Attributes{Node: "gw-zrh", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	far := planDest("gw-fra", "aws-eu-central-1", "DE", 64, 256, 0, 100e6)
	far.Unreached = "sites onprem-zrh and aws-eu-central-1 handle no data class in common"
	near := planDest("gw-fra2", "aws-eu-central-2", "DE", 64, 256, 5, 100e6)
	vms := []VM{{Name: "crm", Image: "/img/crm.qcow2", Class: "pii-eu", CPU: 2, MemoryGiB: 4}}
	p, err := MakePlan(PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: vms, Destinations: []Destination{far, near}})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Placements) != 1 || p.Placements[0].To != "gw-fra2" {
		t.Errorf("placements %+v: want crm at gw-fra2, the one reached", p.Placements)
	}
	for _, s := range p.Sites {
		if s.Node == "gw-fra" {
			t.Errorf("gw-fra, not reached, among the plan's destinations: %+v", p.Sites)
		}
	}
	p, err = MakePlan(PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: vms, Destinations: []Destination{far}})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Unplaced) != 1 || strings.Join(p.Unplaced[0].Reasons, "; ") != "gw-fra (aws-eu-central-1): not reached from gw-zrh: "+far.Unreached {
		t.Errorf("unplaced %+v: want crm, saying why gw-fra is not reached, and nothing else", p.Unplaced)
	}
}

// TestStandingOf: what an admission rests on, which the planner and
// `migrate run --to` rank alike: an audit-mode pass is last even where an
// exception is named.
func TestStandingOf(t *testing.T) {
	for _, tc := range []struct {
		d    policy.Decision
		want Standing
	}{
		{policy.Decision{Allowed: true}, ByRule},
		{policy.Decision{Allowed: true, Exceptions: []*policy.ExceptionRef{{Name: "e"}}}, ByException},
		{policy.Decision{Allowed: true, Denied: true, Audit: true}, ByAudit},
		{policy.Decision{Allowed: true, Denied: true, Audit: true, Exceptions: []*policy.ExceptionRef{{Name: "e"}}}, ByAudit},
		{policy.Decision{Denied: true}, Refused},
	} {
		if got := StandingOf(&tc.d); got != tc.want {
			t.Errorf("%+v: %d, want %d", tc.d, got, tc.want)
		}
	}
}
