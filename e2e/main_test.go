// Package e2e runs the real skybridge binary the way operators do, against
// real tools (openssl, wireguard-tools) and, in later suites, real network
// namespaces.
package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// skybridge is the path of the binary built for this test run.
var skybridge string

func TestMain(m *testing.M) {
	if h := os.Getenv(helperEnv); h != "" {
		os.Exit(runHelper(h))
	}
	// Before any lab of ours: what a run killed by its -timeout left.
	sweepLabs()
	dir, err := os.MkdirTemp("", "skybridge-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	skybridge = filepath.Join(dir, "skybridge")
	if b := os.Getenv("SKYBRIDGE_E2E_BINARY"); b != "" {
		// Another build, for a benchmark to compare with (an older one).
		skybridge = b
	} else {
		build := exec.Command("go", "build", "-o", skybridge, "../cmd/skybridge")
		build.Stdout, build.Stderr = os.Stdout, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build skybridge:", err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// sb runs the binary and returns stdout; it fails the test on a non-zero
// exit unless wantCode says otherwise.
func sb(t *testing.T, wantCode int, args ...string) (string, string) {
	t.Helper()
	cmd := exec.Command(skybridge, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	if code != wantCode {
		t.Fatalf("skybridge %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, wantCode, out.String(), errb.String())
	}
	return out.String(), errb.String()
}

// tool finds a Debian tool the test needs; under CI its absence is a
// failure, since the test command installs it.
func tool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not installed; scripts/test.sh installs it", name)
		}
		t.Skipf("%s is not installed (scripts/test.sh installs it)", name)
	}
	return p
}
