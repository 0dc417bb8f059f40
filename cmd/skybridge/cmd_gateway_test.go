package main

import (
	"strings"
	"testing"
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
