package migrate

import (
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/policy"
)

// FuzzPlanInventory: an inventory CSV of any content is refused or read
// into valid VMs, and a plan of them accounts for every VM once, keeps
// within the sites' capacity and adds up no negative figures.
func FuzzPlanInventory(f *testing.F) {
	pol, err := policy.Parse("plan.hcl", []byte("policy {\n  name    = \"plan\"\n  version = 1\n}\nclass \"c\" {\n  allow \"transit\" {\n    site = [\"*\"]\n  }\n  allow \"store\" {\n    site = [\"*\"]\n  }\n}\n"))
	if err != nil {
		f.Fatal(err)
	}
	from := &certs.Attributes{Node: "gw-zrh", Site: "onprem-zrh", Region: "zrh", Provider: "onprem", Jurisdiction: "CH"}
	dests := []Destination{planDest("gw-fra", "aws-eu-central-1", "DE", 16, 64, 0, 100e6), planDest("gw-iad", "aws-us-east-1", "US", 0, 0, 1, 100e6)}
	f.Add("# the monthly risk run\nname,image,class,cpu,memory_gib,bytes\nrisk-001,/img/r1.qcow2,c,8,32,1048576\nrisk-002, /img/r2.raw ,c,4,16,\n")
	f.Add("name,image,class,cpu,memory_gib,bytes\na,i,c,9223372036854775807,1,9223372036854775807\nb,i,c,9223372036854775807,1e308,9223372036854775807\n")
	f.Add("cpu,memory_gib,name,image,class\n\"1\",\"2\",\"x\ny\",i,c\n")
	f.Fuzz(func(t *testing.T, csv string) {
		vms, err := ParseInventory(strings.NewReader(csv))
		if err != nil {
			return
		}
		if len(vms) > strings.Count(csv, "\n")+1 {
			t.Fatalf("%d VMs from %d lines", len(vms), strings.Count(csv, "\n")+1)
		}
		if err := ValidateInventory(vms); err != nil {
			t.Fatalf("read an invalid inventory: %v", err)
		}
		for i := range vms {
			vms[i].Class = "c"
		}
		p, err := MakePlan(PlanInput{From: from, Policy: pol, Now: time.Now(), VMs: vms, Destinations: dests})
		if err != nil {
			return
		}
		if len(p.Placements)+len(p.Unplaced) != len(vms) {
			t.Fatalf("%d placed and %d unplaced of %d VMs", len(p.Placements), len(p.Unplaced), len(vms))
		}
		if p.Bytes < 0 || p.Estimate < 0 {
			t.Fatalf("plan of %d bytes, estimate %s", p.Bytes, p.Estimate)
		}
		for _, s := range p.Sites {
			if s.CPU < 0 || s.Bytes < 0 || s.MemoryGiB < 0 {
				t.Fatalf("site %s: %d CPU, %g GiB, %d bytes", s.Node, s.CPU, s.MemoryGiB, s.Bytes)
			}
			if !s.CPUUnbounded && float64(s.CPU) > s.CPUCap || !s.MemoryUnbounded && s.MemoryGiB > s.MemoryCap+1e-6 {
				t.Fatalf("site %s over capacity: %d/%g CPU, %g/%g GiB", s.Node, s.CPU, s.CPUCap, s.MemoryGiB, s.MemoryCap)
			}
		}
	})
}
