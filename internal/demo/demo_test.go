package demo

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
)

// TestOwnGateways: a PID from the state file is signalled only if it is
// one of the demo's gateways; never 0 or -1 (process groups, everyone).
func TestOwnGateways(t *testing.T) {
	root := t.TempDir()
	tests := []struct {
		pid  int
		want string
	}{
		{0, "pid 0: not a process ID"},
		{-1, "pid -1: not a process ID"},
		{os.Getpid(), "not a gateway of this demo"}, // the test binary
	}
	for _, tt := range tests {
		procs, skipped := ownGateways([]int{tt.pid}, root)
		if len(procs) != 0 || len(skipped) != 1 || !strings.Contains(skipped[0], tt.want) {
			t.Errorf("pid %d: %d processes to stop, skipped %q; want none, and %q", tt.pid, len(procs), skipped, tt.want)
		}
	}
}

func TestDemoName(t *testing.T) {
	for name, want := range map[string]bool{
		"sbd1a2bwan": true, "sbd1a2bzrh": true, "sbd1a2b1": true,
		"eth0": false, "sbd../../etc/x": false, "sbd1a2b-x": false, "sbd0123456789abcd": false,
	} {
		if got := demoName(name); got != want {
			t.Errorf("demoName(%q) = %v, want %v", name, got, want)
		}
	}
}

// TestAuditWantsItsRecords: the demo's audit check fails when the source
// or the destination recorded nothing: a missing log read as "nothing
// recorded", valid, and the demo passed without its migration's records.
func TestAuditWantsItsRecords(t *testing.T) {
	r := &run{dir: t.TempDir(), sites: demoSites()}
	if err := r.makeIdentities(); err != nil {
		t.Fatal(err)
	}
	if err := r.audit(); err == nil || !strings.Contains(err.Error(), "should hold 2") || !strings.Contains(err.Error(), "should hold 1") {
		t.Fatalf("no audit logs: %v; want the source's and the destination's missing records said", err)
	}
	for i, n := range []int{2, 1} {
		id, err := certs.LoadNodeIdentity(filepath.Join(r.sites[i].Dir, "identity"))
		if err != nil {
			t.Fatal(err)
		}
		l := audit.Open(filepath.Join(r.sites[i].Dir, "audit.log"))
		for range n {
			if _, err := l.Append(id, "migration", nil, time.Now()); err != nil {
				t.Fatal(err)
			}
		}
	}
	r.sum.Audit = nil
	if err := r.audit(); err != nil {
		t.Fatalf("the records there: %v", err)
	}
}
