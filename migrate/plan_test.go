package migrate

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/policy"
)

const planPolicy = `policy {
  name    = "plan"
  version = 1
}
class "risk-batch" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    site = ["*"]
  }
}
class "pii-eu" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    jurisdiction = ["CH", "DE"]
  }
}
`

func planDest(node, site, jur string, cpu int, mem float64, load int, tput float64) Destination {
	a := &certs.Attributes{Node: node, Site: site, Region: site + "-r", Provider: "aws", Jurisdiction: jur, OverlayIP: netip.MustParseAddr("100.96.0.9")}
	if cpu > 0 {
		a.Labels = map[string]string{LabelCapacityCPU: fmt.Sprint(cpu), LabelCapacityMemory: fmt.Sprint(mem)}
	}
	return Destination{Attributes: a, Load: load, Throughput: tput}
}

func TestMakePlan(t *testing.T) {
	pol, err := policy.Parse("plan.hcl", []byte(planPolicy))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	from := &certs.Attributes{Node: "gw-zrh", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	fra := planDest("gw-fra", "aws-eu-central-1", "DE", 16, 64, 0, 100e6)
	fra2 := planDest("gw-fra2", "aws-eu-central-2", "DE", 16, 64, 1, 100e6) // busy: receiving one already
	iad := planDest("gw-iad", "aws-us-east-1", "US", 8, 32, 0, 0)
	self := planDest("gw-zrh", "onprem-zrh", "CH", 64, 256, 0, 0)
	dests := []Destination{iad, fra2, self, fra}
	vm := func(name, class string, cpu int, mem float64) VM {
		return VM{Name: name, Image: "/img/" + name + ".qcow2", Class: class, CPU: cpu, MemoryGiB: mem, Bytes: 1e9}
	}
	for _, tc := range []struct {
		name     string
		vms      []VM
		to       []string
		dests    []Destination
		policy   *policy.Policy
		want     map[string]string // VM → node ("" : unplaced)
		reason   map[string]string // VM → a reason it must give
		estimate time.Duration
	}{
		{
			// a: fra and iad idle, fra left less full; b: iad the only idle
			// one; c: all at one migration, fra2 left least full; d: fra
			// and iad at one, fra half full, iad full.
			name: "least loaded first, then least full, never to itself",
			vms:  []VM{vm("a", "risk-batch", 4, 8), vm("b", "risk-batch", 4, 8), vm("c", "risk-batch", 4, 8), vm("d", "risk-batch", 4, 8)},
			want: map[string]string{"a": "gw-fra", "b": "gw-iad", "c": "gw-fra2", "d": "gw-fra"},
		},
		{
			name:   "policy keeps EU personal data out of the US; the reason says so",
			vms:    []VM{vm("p1", "pii-eu", 2, 4), vm("p2", "pii-eu", 2, 4), vm("p3", "pii-eu", 2, 4)},
			to:     []string{"US"},
			want:   map[string]string{"p1": "", "p2": "", "p3": ""},
			reason: map[string]string{"p1": `gw-iad (aws-us-east-1): site aws-us-east-1 (US, aws aws-us-east-1-r): store of "pii-eu" denied by default`},
		},
		{
			name:     "selectors: a jurisdiction; estimates from measured throughput",
			vms:      []VM{vm("p1", "pii-eu", 2, 4), vm("p2", "pii-eu", 2, 4)},
			to:       []string{"DE"},
			want:     map[string]string{"p1": "gw-fra", "p2": "gw-fra2"}, // fra2's running migration weighs as much as p1 planned on fra
			estimate: 20 * time.Second,
		},
		{
			name:   "capacity: the big VM goes first and only where it fits; one too big for anyone",
			vms:    []VM{vm("small", "risk-batch", 8, 16), vm("big", "risk-batch", 16, 64), vm("huge", "risk-batch", 32, 64)},
			to:     []string{"DE"},
			want:   map[string]string{"big": "gw-fra", "small": "gw-fra2", "huge": ""},
			reason: map[string]string{"huge": "gw-fra (aws-eu-central-1): needs 32 CPU and 64 GiB; 16 CPU and 64 GiB free"}, // placed first, before the others took room
		},
		{
			// The capacity labels are the site's, carried by each of its
			// gateways (a burst site's, an HA pair): counted per gateway,
			// the site would be planned twice full.
			name:   "two gateways of one site share its capacity",
			vms:    []VM{vm("a", "risk-batch", 8, 32), vm("b", "risk-batch", 8, 32)},
			dests:  []Destination{planDest("gw-b1", "burst", "DE", 8, 32, 0, 0), planDest("gw-b2", "burst", "DE", 8, 32, 0, 0)},
			want:   map[string]string{"a": "gw-b1", "b": ""},
			reason: map[string]string{"b": "gw-b2 (burst): needs 8 CPU and 32 GiB; 0 CPU and 0 GiB free at the site"},
		},
		{
			name:   "no gateway matches",
			vms:    []VM{vm("x", "risk-batch", 1, 1)},
			to:     []string{"mars-1"},
			want:   map[string]string{"x": ""},
			reason: map[string]string{"x": "no verified gateway matches mars-1"},
		},
		{
			name:   "no policy: nothing leaves",
			vms:    []VM{vm("x", "risk-batch", 1, 1)},
			policy: nil,
			want:   map[string]string{"x": ""},
			reason: map[string]string{"x": "no residency policy is in force"},
		},
		{
			name:   "one dimension advertised: the other does not limit; a bad label leaves the gateway out",
			vms:    []VM{vm("a", "risk-batch", 100, 1000), vm("b", "risk-batch", 100, 1000)},
			dests:  []Destination{memOnly("gw-m", 4096), badCap("gw-bad", "inf")},
			want:   map[string]string{"a": "gw-m", "b": "gw-m"},
			reason: map[string]string{},
		},
		{
			name:  "unbounded destination: placed by load, noted",
			vms:   []VM{vm("a", "risk-batch", 100, 1000), vm("b", "risk-batch", 100, 1000)},
			dests: []Destination{planDest("gw-x", "x", "DE", 0, 0, 0, 0), planDest("gw-y", "y", "DE", 0, 0, 0, 0)},
			want:  map[string]string{"a": "gw-x", "b": "gw-y"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := PlanInput{From: from, Policy: pol, Now: now, VMs: tc.vms, To: tc.to, Destinations: dests}
			if tc.name == "no policy: nothing leaves" {
				in.Policy = nil
			}
			if tc.dests != nil {
				in.Destinations = tc.dests
			}
			p, err := MakePlan(in)
			if err != nil {
				t.Fatal(err)
			}
			got := map[string]string{}
			reasons := map[string]string{}
			for _, pl := range p.Placements {
				got[pl.Name] = pl.To
				if pl.Rule == "" {
					t.Errorf("%s placed without the rule that admits it", pl.Name)
				}
			}
			for _, u := range p.Unplaced {
				got[u.Name] = ""
				reasons[u.Name] = strings.Join(u.Reasons, "\n")
			}
			for vm, want := range tc.want {
				if g, ok := got[vm]; !ok || g != want {
					t.Errorf("%s → %q, want %q (plan: %+v)", vm, g, want, p)
				}
			}
			for vm, want := range tc.reason {
				if !strings.Contains(reasons[vm], want) {
					t.Errorf("%s: reasons %q lack %q", vm, reasons[vm], want)
				}
			}
			if tc.estimate != 0 && p.Estimate != tc.estimate {
				t.Errorf("estimate %s, want %s", p.Estimate, tc.estimate)
			}
			for i, pl := range p.Placements { // inventory order kept
				if i > 0 && indexOf(tc.vms, pl.Name) < indexOf(tc.vms, p.Placements[i-1].Name) {
					t.Errorf("placements out of inventory order: %s after %s", pl.Name, p.Placements[i-1].Name)
				}
			}
			// Deterministic: the same inputs, the same plan.
			again, _ := MakePlan(in)
			if fmt.Sprint(again.Placements) != fmt.Sprint(p.Placements) {
				t.Error("the same inputs gave another plan")
			}
		})
	}
}

func memOnly(node string, mem float64) Destination {
	d := planDest(node, "m", "DE", 0, 0, 0, 0)
	d.Attributes.Labels = map[string]string{LabelCapacityMemory: fmt.Sprint(mem)}
	return d
}

func badCap(node, v string) Destination {
	d := planDest(node, "bad", "DE", 0, 0, 0, 0)
	d.Attributes.Labels = map[string]string{LabelCapacityCPU: v, LabelCapacityMemory: "8"}
	return d
}

func TestMakePlanNotes(t *testing.T) {
	pol, _ := policy.Parse("plan.hcl", []byte(planPolicy))
	from := &certs.Attributes{Node: "gw-zrh", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	in := PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: []VM{{Name: "a", Image: "/a", Class: "risk-batch", CPU: 1, MemoryGiB: 1}},
		Destinations: []Destination{badCap("gw-bad", "inf"), memOnly("gw-m", 64)}}
	p, err := MakePlan(in)
	if err != nil {
		t.Fatal(err)
	}
	notes := strings.Join(p.Notes, "\n")
	if !strings.Contains(notes, `gw-bad (bad): label capacity_cpu="inf" is not a number of CPUs: left out of the plan`) || !strings.Contains(notes, "gw-m (m) does not advertise all its capacity") {
		t.Errorf("notes:\n%s", notes)
	}
	if len(p.Sites) != 1 || !p.Sites[0].CPUUnbounded || p.Sites[0].MemoryUnbounded || p.Sites[0].MemoryCap != 64 {
		t.Errorf("sites %+v", p.Sites)
	}
	if _, err := json.Marshal(p); err != nil {
		t.Errorf("the plan does not encode: %v", err)
	}
	// Notes in a stable order, whatever order the destinations came in.
	slices.Reverse(in.Destinations)
	again, _ := MakePlan(in)
	if strings.Join(again.Notes, "\n") != notes {
		t.Error("destination order changed the notes")
	}
}

// TestMakePlanAuditModeLast: where a class is in audit mode, a
// destination the policy denies (and lets through only to record it) is
// chosen only if no destination it allows has room, and the placement
// says so.
func TestMakePlanAuditModeLast(t *testing.T) {
	pol, err := policy.Parse("plan.hcl", []byte(`policy {
  name    = "plan"
  version = 1
}
class "pii-eu" {
  mode = "audit"
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    jurisdiction = ["CH", "DE"]
  }
}
`))
	if err != nil {
		t.Fatal(err)
	}
	from := &certs.Attributes{Node: "gw-zrh", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	// The US gateway is idle, the German one busy: load alone would pick
	// the US.
	fra, iad := planDest("gw-fra", "aws-eu-central-1", "DE", 16, 64, 3, 100e6), planDest("gw-iad", "aws-us-east-1", "US", 64, 256, 0, 100e6)
	vms := []VM{{Name: "crm", Image: "/img/crm.qcow2", Class: "pii-eu", CPU: 8, MemoryGiB: 32}, {Name: "erp", Image: "/img/erp.qcow2", Class: "pii-eu", CPU: 8, MemoryGiB: 32}}
	p, err := MakePlan(PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: vms, Destinations: []Destination{fra, iad}})
	if err != nil {
		t.Fatal(err)
	}
	for _, pl := range p.Placements {
		if pl.To != "gw-fra" || pl.Audit {
			t.Errorf("%s placed at %s (audit %v), want gw-fra, which the policy allows and has room for both", pl.Name, pl.To, pl.Audit)
		}
	}
	// A third no longer fits in Germany: it goes where only audit mode
	// lets it, marked, with the rule that denies it.
	vms = append(vms, VM{Name: "hr", Image: "/img/hr.qcow2", Class: "pii-eu", CPU: 8, MemoryGiB: 32})
	p, err = MakePlan(PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: vms, Destinations: []Destination{fra, iad}})
	if err != nil {
		t.Fatal(err)
	}
	audited := 0
	for _, pl := range p.Placements {
		if pl.To == "gw-iad" {
			audited++
			if !pl.Audit || !strings.Contains(pl.Rule, `has no allow "store" rule`) {
				t.Errorf("%s placed in the US: audit %v, rule %q; want it marked, with the denying rule", pl.Name, pl.Audit, pl.Rule)
			}
		}
	}
	if audited != 1 || len(p.Placements) != 3 {
		t.Errorf("placements %+v: want two in Germany and the third, which does not fit there, in the US", p.Placements)
	}
}

// TestMakePlanExceptionAfterRules: a destination an exception admits, for
// a time, comes after one the class's rules allow, however idle: placed
// there, the data rests outside the policy once the exception expires.
// (They ranked alike, and the idle US site took pii-eu data under a
// disaster-recovery waiver while Germany had room.)
func TestMakePlanExceptionAfterRules(t *testing.T) {
	pol, err := policy.Parse("plan.hcl", []byte(`policy {
  name    = "plan"
  version = 1
}
class "pii-eu" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    jurisdiction = ["CH", "DE"]
  }
}
exception "dr-rehearsal-us-store" {
  class    = "pii-eu"
  action   = "store"
  site     = ["aws-us-east-1"]
  category = "mitigated"
  reason   = "DR rehearsal, pseudonymised"
  approver = "CDO"
  ticket   = "GRC-1"
  expires  = "2099-12-31"
}
`))
	if err != nil {
		t.Fatal(err)
	}
	from := &certs.Attributes{Node: "gw-zrh", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	fra, iad := planDest("gw-fra", "aws-eu-central-1", "DE", 16, 64, 3, 100e6), planDest("gw-iad", "aws-us-east-1", "US", 64, 256, 0, 100e6)
	vms := []VM{{Name: "crm", Image: "/img/crm.qcow2", Class: "pii-eu", CPU: 8, MemoryGiB: 32}, {Name: "erp", Image: "/img/erp.qcow2", Class: "pii-eu", CPU: 8, MemoryGiB: 32},
		{Name: "hr", Image: "/img/hr.qcow2", Class: "pii-eu", CPU: 8, MemoryGiB: 32}}
	p, err := MakePlan(PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: vms, Destinations: []Destination{fra, iad}})
	if err != nil {
		t.Fatal(err)
	}
	at := map[string]string{}
	for _, pl := range p.Placements {
		at[pl.Name] = pl.To + " " + pl.Rule
	}
	// Two fit in Germany; the third goes to the US, under the exception.
	if !strings.HasPrefix(at["crm"], "gw-fra ") || !strings.HasPrefix(at["erp"], "gw-fra ") || !strings.Contains(at["hr"], `gw-iad exception "dr-rehearsal-us-store"`) {
		t.Errorf("placements %v: want crm and erp in Germany, hr in the US under the exception", at)
	}
}

// TestMakePlanLeavesTheSourceSite: the source's sibling gateway, idle
// beside it, is no destination unless asked for by name: VMs "moved" to
// it would not leave the datacenter.
func TestMakePlanLeavesTheSourceSite(t *testing.T) {
	pol, err := policy.Parse("plan.hcl", []byte(planPolicy))
	if err != nil {
		t.Fatal(err)
	}
	from := &certs.Attributes{Node: "gw-zrh-1", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	sib, fra := planDest("gw-zrh-2", "onprem-zrh", "CH", 64, 256, 0, 100e6), planDest("gw-fra", "aws-eu-central-1", "DE", 64, 256, 3, 100e6)
	vms := []VM{{Name: "crm", Image: "/img/crm.qcow2", Class: "pii-eu", CPU: 2, MemoryGiB: 4}}
	for _, tc := range []struct {
		to   []string
		want string
	}{
		{nil, "gw-fra"},
		{[]string{"onprem-zrh"}, "gw-zrh-2"},
		{[]string{"gw-zrh-2"}, "gw-zrh-2"},
		{[]string{"CH"}, ""}, // a jurisdiction names no site of its own
	} {
		p, err := MakePlan(PlanInput{From: from, To: tc.to, Policy: pol, Now: time.Now(), VMs: vms, Destinations: []Destination{sib, fra}})
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		if len(p.Placements) == 1 {
			got = p.Placements[0].To
		}
		if got != tc.want {
			t.Errorf("--to %v: placed at %q, want %q (notes %q)", tc.to, got, tc.want, p.Notes)
		}
		if tc.want == "" && (len(p.Unplaced) != 1 || !strings.Contains(strings.Join(p.Unplaced[0].Reasons, " "), "only gateways of the source's own site onprem-zrh match")) {
			t.Errorf("--to %v: unplaced %+v; want the reason to name the source's own site", tc.to, p.Unplaced)
		}
	}
}

// TestPlanReasonWhenLabelBad: a VM left unplaced names the gateways left
// out for a capacity label that is no number, rather than blaming an empty
// mesh, the source's own site alone, or only the gateways weighed.
func TestPlanReasonWhenLabelBad(t *testing.T) {
	pol, err := policy.Parse("plan.hcl", []byte(planPolicy))
	if err != nil {
		t.Fatal(err)
	}
	from := &certs.Attributes{Node: "gw-zrh-1", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	sib := planDest("gw-zrh-2", "onprem-zrh", "CH", 64, 256, 0, 100e6)
	iad := planDest("gw-iad", "aws-us-east-1", "US", 64, 256, 0, 100e6) // the policy keeps pii-eu out
	fra := planDest("gw-fra", "aws-eu-central-1", "DE", 64, 256, 0, 100e6)
	fra.Attributes.Labels[LabelCapacityCPU] = "64 cores"
	vms := []VM{{Name: "crm", Image: "/img/crm.qcow2", Class: "pii-eu", CPU: 2, MemoryGiB: 4}}
	for _, tc := range []struct {
		name  string
		dests []Destination
		want  []string
		not   string
	}{
		{"alone", []Destination{fra}, nil, "no other verified gateway"},
		{"beside the own site's", []Destination{sib, fra}, []string{"the other gateways that match are of the source's own site onprem-zrh"}, "only gateways of the source's own site"},
		{"beside one the policy refuses", []Destination{iad, fra}, []string{"gw-iad (aws-us-east-1)"}, ""},
	} {
		p, err := MakePlan(PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: vms, Destinations: tc.dests})
		if err != nil {
			t.Fatal(err)
		}
		if len(p.Unplaced) != 1 {
			t.Errorf("%s: placed %+v", tc.name, p.Placements)
			continue
		}
		reasons := strings.Join(p.Unplaced[0].Reasons, "\n")
		for _, w := range append(tc.want, `gw-fra (aws-eu-central-1): label capacity_cpu="64 cores" is not a number of CPUs: left out of the plan`) {
			if !strings.Contains(reasons, w) {
				t.Errorf("%s: the VM's reasons do not say %q:\n%s", tc.name, w, reasons)
			}
		}
		if tc.not != "" && strings.Contains(reasons, tc.not) {
			t.Errorf("%s: the VM's reasons say %q, which is not so:\n%s", tc.name, tc.not, reasons)
		}
	}
}

func indexOf(vms []VM, name string) int {
	for i, vm := range vms {
		if vm.Name == name {
			return i
		}
	}
	return -1
}

func TestParseInventory(t *testing.T) {
	good := "# the monthly risk run\nname,image,class,cpu,memory_gib,bytes\nrisk-001,/img/r1.qcow2,risk-batch,8,32,1048576\nrisk-002, /img/r2.raw ,risk-batch,4,16,\n"
	vms, err := ParseInventory(strings.NewReader(good))
	if err != nil {
		t.Fatal(err)
	}
	if len(vms) != 2 || vms[0].Bytes != 1<<20 || vms[1].Bytes != 0 || vms[1].CPU != 4 || vms[1].MemoryGiB != 16 || vms[1].Image != "/img/r2.raw" {
		t.Errorf("parsed %+v", vms)
	}
	// A spreadsheet's "CSV UTF-8" export: a byte-order mark (before a
	// quoted header or a comment too), CRLF.
	for _, src := range []string{
		"\ufeffname,image,class,cpu,memory_gib\r\nweb1,/i,risk-batch,1,4\r\n",
		"\ufeff\"name\",\"image\",\"class\",\"cpu\",\"memory_gib\"\n\"web1\",\"/i\",\"risk-batch\",\"1\",\"4\"\n",
		"\ufeff# exported\nname,image,class,cpu,memory_gib\nweb1,/i,risk-batch,1,4\n",
	} {
		if vms, err := ParseInventory(strings.NewReader(src)); err != nil || len(vms) != 1 || vms[0].Name != "web1" {
			t.Errorf("%q: %+v %v", src, vms, err)
		}
	}
	for _, tc := range []struct{ src, want string }{
		{"name,image,class,cpu\n", `column "memory_gib" is missing`},
		{"name,image,class,cpu,memory_gib,colour\n", `unknown column "colour"`},
		{"name,image,class,cpu,memory_gib,CPU\nweb1,/i,risk-batch,32,64,2\n", `column "cpu" is named twice (columns 4 and 6)`},
		{"name,image,class,cpu,memory_gib\nvm1,/i,risk-batch,eight,4\n", `line 2: cpu "eight" is not a whole number`},
		{"name,image,class,cpu,memory_gib\nvm1,/i,risk-batch,99999999999999999999,4\n", `line 2: cpu "99999999999999999999" is out of range`},
		{"name,image,class,cpu,memory_gib,bytes\nvm1,/i,risk-batch,1,4,99999999999999999999\n", `line 2: bytes "99999999999999999999" is out of range`},
		{"name,image,class,cpu,memory_gib\nvm1,/i,risk-batch,1,4\nvm1,/j,risk-batch,1,4\n", `VM "vm1": listed twice`},
		{"name,image,class,cpu,memory_gib\nvm1,/i,,1,4\n", `no data class`},
		{"name,image,class,cpu,memory_gib\n../etc,/i,risk-batch,1,4\n", `VM "../etc"`},
		{"name,image,class,cpu,memory_gib\n", "lists no VM"},
		{"", "inventory is empty: its first line names the columns"},
		{"name,image,class,cpu,memory_gib\nvm1,/i,risk-batch,1\n", "inventory line 2: 4 columns, but the header names 5"},
		// A space after a name made another VM, stored under a name
		// that reads the same.
		{"name,image,class,cpu,memory_gib\nweb1 ,/a,risk-batch,1,4\nweb1,/b,risk-batch,1,4\n", `VM "web1": listed twice`},
	} {
		if _, err := ParseInventory(strings.NewReader(tc.src)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err %v, want %q", tc.src, err, tc.want)
		}
	}
}

// TestInventoryBounds: a VM with more than any VM has (a typo, a damaged
// export) is refused, and no plan total wraps around.
func TestInventoryBounds(t *testing.T) {
	for _, vm := range []VM{
		{Name: "a", Image: "i", Class: "c", CPU: 1 << 17},
		{Name: "a", Image: "i", Class: "c", MemoryGiB: 1 << 21},
		{Name: "a", Image: "i", Class: "c", Bytes: MaxImageSize + 1},
	} {
		if err := ValidateInventory([]VM{vm}); err == nil || !strings.Contains(err.Error(), "more than any VM has") {
			t.Errorf("%+v: %v; want it refused", vm, err)
		}
	}
	if err := ValidateInventory([]VM{{Name: "a", Image: "i", Class: "c", CPU: 1 << 16, MemoryGiB: 1 << 20, Bytes: MaxImageSize}}); err != nil {
		t.Errorf("the largest VM allowed: %v", err)
	}
	for _, c := range []struct{ a, b, want int64 }{
		{1, 2, 3},
		{math.MaxInt64 - 1, 1, math.MaxInt64},
		{math.MaxInt64 - 1, 5, math.MaxInt64},
		{math.MaxInt64, math.MaxInt64, math.MaxInt64},
		{5, 0, 5},
	} {
		if got := addCapped(c.a, c.b); got != c.want {
			t.Errorf("addCapped(%d, %d) = %d, want %d", c.a, c.b, got, c.want)
		}
	}
}

// TestPlanNamesTheExceptions: a destination reached only through a
// transit exception names it, though the rule that admits the store is
// an allow: the placement lasts as long as the exception.
func TestPlanNamesTheExceptions(t *testing.T) {
	pol, err := policy.Parse("plan.hcl", []byte(`policy {
  name    = "plan"
  version = 1
}
class "pii-eu" {
  allow "transit" {
    jurisdiction = ["CH"]
  }
  allow "store" {
    jurisdiction = ["CH", "DE"]
  }
}
exception "fra-link" {
  class    = "pii-eu"
  action   = "transit"
  site     = ["aws-eu-central-1"]
  category = "mitigated"
  reason   = "temporary"
  approver = "CDO"
  ticket   = "GRC-2"
  expires  = "2099-12-31"
}
`))
	if err != nil {
		t.Fatal(err)
	}
	from := &certs.Attributes{Node: "gw-zrh", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	p, err := MakePlan(PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: []VM{{Name: "crm", Image: "/i", Class: "pii-eu", CPU: 1, MemoryGiB: 1}},
		Destinations: []Destination{planDest("gw-fra", "aws-eu-central-1", "DE", 16, 64, 0, 0)}})
	if err != nil || len(p.Placements) != 1 {
		t.Fatalf("%v %+v", err, p)
	}
	if e := p.Placements[0].Exceptions; !slices.Equal(e, []string{"fra-link"}) {
		t.Errorf("placed only by exception fra-link (transit); the placement names %v", e)
	}
}
