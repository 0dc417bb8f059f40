package e2e

import (
	"os/exec"
	"strings"
	"testing"
)

// TestQuickstart runs the README's first command as a newcomer would, so
// it cannot rot.
func TestQuickstart(t *testing.T) {
	out, err := exec.Command("../scripts/quickstart.sh").CombinedOutput()
	if err != nil {
		t.Fatalf("quickstart failed: %v\n%s", err, out)
	}
	for _, want := range []string{
		"REFUSED: identity refused (revoked)",
		"valid: acme-bank-residency v1",
		"ALLOW  pii-eu store aws-eu-central-1",
		"DENY  swiss-banking-secret store aws-us-east-1",
		"quickstart finished",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("quickstart output lacks %q", want)
		}
	}
}
