package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func issueArgs(ca, out, node, site, jur, overlay string, extra ...string) []string {
	return append([]string{"ca", "issue", "--ca", ca, "--node", node, "--site", site, "--region", "r1",
		"--provider", "onprem", "--jurisdiction", jur, "--overlay-ip", overlay, "--out", out}, extra...)
}

// TestIdentityWithStandardTools: what the CA issues is ordinary X.509 that
// openssl verifies (name constraint included) and revokes, and WireGuard
// keys are those wg derives.
func TestIdentityWithStandardTools(t *testing.T) {
	openssl := tool(t, "openssl")
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	sb(t, 0, "ca", "init", "--dir", ca, "--mesh-cidr", "100.96.0.0/16")
	gw := filepath.Join(dir, "gw1")
	sb(t, 0, issueArgs(ca, gw, "gw1", "onprem-zrh", "CH", "100.96.0.1", "--route", "10.1.0.0/16")...)

	verify := func(crl bool) (string, error) {
		args := []string{"verify", "-CAfile", filepath.Join(ca, "ca.crt"), "-purpose", "sslclient"}
		if crl {
			args = append(args, "-crl_check", "-CRLfile", filepath.Join(ca, "crl.pem"))
		}
		out, err := exec.Command(openssl, append(args, filepath.Join(gw, "node.crt"))...).CombinedOutput()
		return string(out), err
	}
	if out, err := verify(true); err != nil {
		t.Fatalf("openssl verify: %v\n%s", err, out)
	}
	text, err := exec.Command(openssl, "x509", "-in", filepath.Join(gw, "node.crt"), "-noout", "-text").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"URI:skybridge://onprem-zrh/gw1?provider=onprem", "IP Address:100.96.0.1", "ASN1 OID: prime256v1"} {
		if !strings.Contains(string(text), want) {
			t.Errorf("certificate lacks %q", want)
		}
	}

	sb(t, 0, "ca", "revoke", "--ca", ca, "--node", "gw1")
	if out, err := verify(true); err == nil || !strings.Contains(out, "revoked") {
		t.Fatalf("openssl accepted a revoked certificate:\n%s", out)
	}

	// The WireGuard key a gateway will use is the one wg derives.
	wg := tool(t, "wg")
	priv, err := exec.Command(wg, "genkey").Output()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(gw, "wireguard.key"), priv, 0o600)
	cmd := exec.Command(wg, "pubkey")
	cmd.Stdin = strings.NewReader(string(priv))
	pub, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	// The gateway learns of the revocation when the new list reaches it
	// (by gossip, later; by hand here) and then reports itself refused.
	out, _ := sb(t, 0, "identity", "show", "--dir", gw, "--json")
	crl, _ := os.ReadFile(filepath.Join(ca, "crl.pem"))
	os.WriteFile(filepath.Join(gw, "crl.pem"), crl, 0o644)
	out2, _ := sb(t, 1, "identity", "show", "--dir", gw, "--json")
	for i, o := range []string{out, out2} {
		var info struct {
			Accepted     bool   `json:"accepted"`
			Reason       string `json:"refusal_reason"`
			WireGuardKey string `json:"wireguard_public_key"`
		}
		if err := json.Unmarshal([]byte(o), &info); err != nil {
			t.Fatal(err)
		}
		if info.WireGuardKey != strings.TrimSpace(string(pub)) {
			t.Fatalf("identity show reports WireGuard key %q, wg pubkey says %q", info.WireGuardKey, pub)
		}
		if want := i == 0; info.Accepted != want || (!want && info.Reason != "revoked") {
			t.Fatalf("show #%d: accepted=%v reason=%q", i+1, info.Accepted, info.Reason)
		}
	}
}

// TestConcurrentOperators: several `skybridge ca issue` processes at once
// (two operators, a provisioning script) each get a distinct certificate
// and none is lost from the CA's index.
func TestConcurrentOperators(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	sb(t, 0, "ca", "init", "--dir", ca)
	const n = 8
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			node := fmt.Sprintf("gw%d", i)
			out, err := exec.Command(skybridge, issueArgs(ca, filepath.Join(dir, node), node, "aws-eu-central-1", "DE", fmt.Sprintf("100.96.2.%d", i+1))...).CombinedOutput()
			if err != nil {
				t.Errorf("issue %s: %v\n%s", node, err, out)
			}
		})
	}
	wg.Wait()
	out, _ := sb(t, 0, "ca", "list", "--ca", ca, "--json")
	var list []struct{ Serial, Node string }
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatal(err)
	}
	serials := map[string]bool{}
	for _, e := range list {
		serials[e.Serial] = true
	}
	if len(list) != n || len(serials) != n {
		t.Fatalf("index has %d entries with %d distinct serials, want %d", len(list), len(serials), n)
	}
}

// TestNoLeaksInLogs: debug logs of every command never contain key
// material.
func TestNoLeaksInLogs(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	_, e1 := sb(t, 0, "--log-level", "debug", "--log-format", "json", "ca", "init", "--dir", ca)
	gw := filepath.Join(dir, "gw")
	_, e2 := sb(t, 0, "--log-level", "debug", "ca", "issue", "--ca", ca, "--node", "gw", "--site", "s", "--region", "r",
		"--provider", "aws", "--jurisdiction", "US", "--overlay-ip", "100.96.0.5", "--out", gw)
	out3, e3 := sb(t, 0, "--log-level", "debug", "identity", "show", "--dir", gw)
	if err := os.WriteFile(filepath.Join(dir, "commands.log"), []byte(e1+e2+e3+out3), 0o600); err != nil {
		t.Fatal(err)
	}
	noSecretsInLogs(t, dir, nil)
}
