package main

import (
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/mesh"
)

// TestGatewayRunHelpSignals: the help names every signal that stops a
// gateway, SIGHUP included.
func TestGatewayRunHelpSignals(t *testing.T) {
	out, errs, code := runCLI(t, "gateway", "run", "--help")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, sig := range []string{"SIGINT", "SIGTERM", "SIGHUP"} {
		if !strings.Contains(out, sig) {
			t.Errorf("gateway run --help does not name %s:\n%s", sig, out)
		}
	}
}

// TestGossipRotationSummary: a rotation no other gateway took part in says so,
// rather than end its line on a colon naming no one.
func TestGossipRotationSummary(t *testing.T) {
	for _, tc := range []struct {
		rep  mesh.RotationReport
		want string
	}{
		{mesh.RotationReport{Elapsed: 11 * time.Millisecond}, "gossip key rotated on this gateway alone in 11ms: no other gateway took part"},
		{mesh.RotationReport{Members: []string{"ams-gw1", "fra-gw1"}, Elapsed: 1234567 * time.Microsecond}, "gossip key rotated on 2 other gateways in 1.235s: ams-gw1, fra-gw1"},
	} {
		if got := gossipRotationSummary(&tc.rep); got != tc.want {
			t.Errorf("got %q, want %q", got, tc.want)
		}
	}
}
