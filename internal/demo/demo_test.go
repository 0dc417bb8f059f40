package demo

import (
	"os"
	"strings"
	"testing"
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
