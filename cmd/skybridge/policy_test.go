package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/skybridge-mesh/skybridge/mesh"
)

const (
	examplePolicy    = "../../docs/examples/residency.hcl"
	exampleInventory = "../../docs/examples/sites.hcl"
	exampleTests     = "../../docs/examples/residency_test.hcl"
	beforeExpiry     = "2026-11-24T12:00:00Z"
)

// TestPolicyCheckExitCodes: 0 allow, 1 deny, 2 could not decide.
func TestPolicyCheckExitCodes(t *testing.T) {
	check := func(extra ...string) []string {
		return append([]string{"policy", "check", "--policy", examplePolicy, "--inventory", exampleInventory, "--at", beforeExpiry}, extra...)
	}
	tests := []struct {
		name string
		args []string
		code int
		out  string // in stdout
		err  string // in stderr
	}{
		{"allowed", check("--class", "pii-eu", "--action", "store", "--site", "aws-eu-central-1"), 0, "obligations: encryption at rest", ""},
		{"denied", check("--class", "swiss-banking-secret", "--action", "store", "--site", "aws-us-east-1"), 1, "residency.hcl:46", ""},
		{"transit path", check("--class", "swiss-banking-secret", "--action", "transit", "--site", "onprem-zrh", "--site", "onprem-gva"), 0, "onprem-zrh → onprem-gva", ""},
		{"exception", check("--class", "pii-eu", "--action", "store", "--site", "aws-us-east-1"), 0, "ticket GRC-2041", ""},
		{"exception expired", []string{"policy", "check", "--policy", examplePolicy, "--inventory", exampleInventory, "--at", "2027-01-02T00:00:00Z", "--class", "pii-eu", "--action", "store", "--site", "aws-us-east-1"}, 1, "has expired", ""},
		{"unknown class", check("--class", "pii-ue", "--action", "store", "--site", "aws-eu-central-1"), 2, "", `unknown class "pii-ue" (known: pii-eu, public, risk-batch, swiss-banking-secret`},
		{"unknown class, explained", []string{"policy", "explain", "--policy", examplePolicy, "--inventory", exampleInventory, "--class", "pii-ue"}, 2, "", `unknown class "pii-ue" (known: pii-eu`},
		{"unknown site", check("--class", "pii-eu", "--action", "store", "--site", "atlantis"), 2, "", `"atlantis" is not in the inventory`},
		{"bad action", check("--class", "pii-eu", "--action", "keep", "--site", "onprem-zrh"), 2, "", `action "keep"`},
		{"missing policy", []string{"policy", "check", "--policy", "nope.hcl", "--class", "a", "--action", "store", "--site", "x", "--site-attrs", "provider=aws"}, 2, "", "read policy"},
		{"no site attributes", []string{"policy", "check", "--policy", examplePolicy, "--class", "a", "--action", "store", "--site", "x"}, 2, "", "give --inventory"},
		{"site attributes", []string{"policy", "check", "--policy", examplePolicy, "--class", "pii-eu", "--action", "store", "--site", "aws-eu-west-3",
			"--site-attrs", "provider=aws", "--site-attrs", "region=eu-west-3", "--site-attrs", "jurisdiction=FR", "--site-attrs", "label.tenancy=shared"}, 1, "shared-tenancy", ""},
		// Attributes no certificate could carry are a mistake, not a
		// site the policy denies.
		{"site attributes no gateway could have", []string{"policy", "check", "--policy", examplePolicy, "--class", "pii-eu", "--action", "store", "--site", "x",
			"--site-attrs", "provider=aws", "--site-attrs", "jurisdiction=Germany"}, 2, "", `jurisdiction "GERMANY" is not an ISO 3166-1`},
		{"site attributes without a region", []string{"policy", "check", "--policy", examplePolicy, "--class", "pii-eu", "--action", "store", "--site", "x",
			"--site-attrs", "provider=aws", "--site-attrs", "jurisdiction=DE"}, 2, "", `region "" is not valid`},
		// The last of two decided, in silence.
		{"a site attribute given twice", []string{"policy", "check", "--policy", examplePolicy, "--class", "pii-eu", "--action", "store", "--site", "x",
			"--site-attrs", "provider=aws", "--site-attrs", "region=eu-west-3", "--site-attrs", "jurisdiction=CH", "--site-attrs", "jurisdiction=US"}, 2, "", `--site-attrs jurisdiction is given twice`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errs, code := runCLI(t, tt.args...)
			if code != tt.code || !strings.Contains(out, tt.out) || !strings.Contains(errs, tt.err) {
				t.Fatalf("exit %d (want %d)\nstdout:\n%s\nstderr:\n%s\nwant %q / %q", code, tt.code, out, errs, tt.out, tt.err)
			}
		})
	}

	// --json prints an OPA-shaped decision record.
	out, _, code := runCLI(t, check("--class", "swiss-banking-secret", "--action", "store", "--site", "aws-us-east-1", "--json")...)
	var rec struct {
		DecisionID string `json:"decision_id"`
		Result     struct {
			Allowed bool     `json:"allowed"`
			Reasons []string `json:"reasons"`
		} `json:"result"`
		Bundles map[string]struct{ Revision string } `json:"bundles"`
	}
	if err := json.Unmarshal([]byte(out), &rec); err != nil || code != 1 || rec.DecisionID == "" || rec.Result.Allowed || len(rec.Result.Reasons) == 0 || rec.Bundles["acme-bank-residency"].Revision == "" {
		t.Fatalf("check --json: exit %d, %+v, %v\n%s", code, rec, err, out)
	}
}

func TestPolicyExplainTestLint(t *testing.T) {
	out := mustRun(t, "policy", "explain", "--policy", examplePolicy, "--class", "swiss-banking-secret", "--inventory", exampleInventory, "--at", beforeExpiry)
	_, table, _ := strings.Cut(out, "STORE DECIDED BY\n")
	rows := strings.Split(strings.TrimSpace(table), "\n")
	if len(rows) != 6 {
		t.Fatalf("explain printed %d site rows, want 6:\n%s", len(rows), out)
	}
	for _, line := range rows {
		f := strings.Fields(line)
		if want := map[bool]string{true: "allow", false: "deny"}[strings.HasPrefix(f[0], "onprem-")]; f[4] != want {
			t.Errorf("explain: %s store = %s, want %s", f[0], f[4], want)
		}
	}

	out = mustRun(t, "policy", "test", exampleTests)
	if !strings.Contains(out, "17 passed, 0 failed") {
		t.Fatalf("policy test:\n%s", out)
	}
	// A failing case fails the command.
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad_test.hcl")
	abs, _ := filepath.Abs(examplePolicy)
	os.WriteFile(bad, []byte(`policy = "`+abs+`"
site "x" {
  provider = "aws"
  region = "us-east-1"
  jurisdiction = "US"
}
test "wishful" {
  class = "swiss-banking-secret"
  action = "store"
  sites = ["x"]
  expect = "allow"
}
`), 0o644)
	out, _, code := runCLI(t, "policy", "test", bad)
	if code != 1 || !strings.Contains(out, "FAIL  wishful") || !strings.Contains(out, "expected allow, got deny") {
		t.Fatalf("failing test: exit %d\n%s", code, out)
	}
	// Every file given is run, and one failing fails the command, first
	// or last; one that cannot be read is an error, not a pass.
	for _, files := range [][]string{{exampleTests, bad}, {bad, exampleTests}} {
		out, _, code := runCLI(t, append([]string{"policy", "test"}, files...)...)
		if code != 1 || !strings.Contains(out, "17 passed, 0 failed") || !strings.Contains(out, "FAIL  wishful") || !strings.Contains(out, "in all: 17 passed, 1 failed in 2 files") {
			t.Errorf("policy test %v: exit %d\n%s", files, code, out)
		}
		var res []struct{ Pass bool }
		out, _, code = runCLI(t, append([]string{"policy", "test", "--json"}, files...)...)
		if err := json.Unmarshal([]byte(out), &res); err != nil || code != 1 || len(res) != 18 {
			t.Errorf("policy test --json %v: exit %d, %d results, %v", files, code, len(res), err)
		}
	}
	if _, errs, code := runCLI(t, "policy", "test", exampleTests, filepath.Join(dir, "nope.hcl")); code != 2 || !strings.Contains(errs, "nope.hcl") {
		t.Errorf("policy test with a missing second file: exit %d, %q", code, errs)
	}

	out = mustRun(t, "policy", "lint", "--policy", examplePolicy, "--inventory", exampleInventory, "--at", beforeExpiry)
	if !strings.Contains(out, "no findings") {
		t.Fatalf("lint of the example:\n%s", out)
	}
	out = mustRun(t, "policy", "lint", "--policy", examplePolicy, "--at", "2027-03-01T00:00:00Z", "--json")
	var fs []struct{ Check string }
	if err := json.Unmarshal([]byte(out), &fs); err != nil || len(fs) != 2 || fs[0].Check != "expired-exception" {
		t.Fatalf("lint after expiry: %v %s", err, out)
	}
	if _, errs, code := runCLI(t, "policy", "lint", "--policy", exampleTests); code != 2 || !strings.Contains(errs, "residency_test.hcl:") {
		t.Fatalf("lint of a non-policy: exit %d %s", code, errs)
	}
}

// TestPolicyWithoutClasses: a policy of only its policy block denies
// every request; lint warns of it (sign still signs, as for every
// warning), and explain says the policy defines no class rather than
// list none.
func TestPolicyWithoutClasses(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	pol := filepath.Join(dir, "only.hcl")
	os.WriteFile(pol, []byte("policy {\n  name = \"only\"\n  version = 1\n}\n"), 0o644)
	if out := mustRun(t, "policy", "lint", "--policy", pol); !strings.Contains(out, "warning: policy only defines no class") || strings.Contains(out, "no findings") {
		t.Fatalf("lint of a policy without classes:\n%s", out)
	}
	if _, errs, code := runCLI(t, "policy", "sign", "--policy", pol, "--ca", ca); code != 0 || !strings.Contains(errs, "defines no class: in force it denies every request") {
		t.Errorf("sign of a policy without classes: exit %d, %q; want it signed, with a warning", code, errs)
	}
	if out, errs, code := runCLI(t, "policy", "explain", "--policy", pol, "--inventory", exampleInventory, "--class", "x"); code != 2 || !strings.Contains(errs, "only.hcl defines no class") || strings.Contains(errs, "known: ,") {
		t.Fatalf("explain of a policy without classes: exit %d, %q %q", code, out, errs)
	}
}

// TestPolicySignVerify: sign with the CA and with a delegated signer;
// verification refuses unsigned and tampered policies and a revoked signer.
func TestPolicySignVerify(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	src, _ := os.ReadFile(examplePolicy)
	pol := filepath.Join(dir, "residency.hcl")
	os.WriteFile(pol, src, 0o644)
	verify := func() (string, int) {
		out, _, code := runCLI(t, "policy", "verify", "--policy", pol, "--ca-cert", filepath.Join(ca, "ca.crt"), "--crl", filepath.Join(ca, "crl.pem"))
		return out, code
	}

	if out, code := verify(); code != 1 || !strings.Contains(out, "not signed") {
		t.Fatalf("unsigned: exit %d %s", code, out)
	}
	mustRun(t, "policy", "sign", "--policy", pol, "--ca", ca)
	if out, code := verify(); code != 0 || !strings.Contains(out, "valid: acme-bank-residency v1") {
		t.Fatalf("CA-signed: exit %d %s", code, out)
	}
	// Signed again over its signature; never over the policy or a key.
	mustRun(t, "policy", "sign", "--policy", pol, "--ca", ca)
	key, _ := os.ReadFile(filepath.Join(ca, "ca.key"))
	for _, out := range []string{pol, filepath.Join(ca, "ca.key")} {
		if _, errs, code := runCLI(t, "policy", "sign", "--policy", pol, "--ca", ca, "--out", out); code != 2 || !strings.Contains(errs, "it would be overwritten") {
			t.Errorf("--out %s: exit %d %q; want it refused", out, code, errs)
		}
	}
	if now, _ := os.ReadFile(pol); !bytes.Equal(now, src) {
		t.Fatal("the policy was overwritten")
	}
	if now, _ := os.ReadFile(filepath.Join(ca, "ca.key")); !bytes.Equal(now, key) {
		t.Fatal("the CA key was overwritten")
	}
	os.WriteFile(pol, []byte(strings.Replace(string(src), `jurisdiction = ["CH"]`, `jurisdiction = ["CH", "US"]`, 1)), 0o644)
	if out, code := verify(); code != 1 || !strings.Contains(out, "changed after signing") {
		t.Fatalf("tampered: exit %d %s", code, out)
	}
	os.WriteFile(pol, src, 0o644)
	// A damaged signature is a verdict (1); a signature file named on
	// the command line and missing is a mistake (2), said as such.
	good, _ := os.ReadFile(pol + ".sig")
	os.WriteFile(pol+".sig", good[:len(good)/2], 0o644)
	if out, code := verify(); code != 1 || !strings.Contains(out, "INVALID") || !strings.Contains(out, ".sig") {
		t.Fatalf("a damaged signature: exit %d %s", code, out)
	}
	os.WriteFile(pol+".sig", good, 0o644)
	if out, errs, code := runCLI(t, "policy", "verify", "--policy", pol, "--sig", pol+".nope", "--ca-cert", filepath.Join(ca, "ca.crt")); code != 2 || strings.Contains(out, "INVALID") || !strings.Contains(errs, "nope") {
		t.Fatalf("a missing --sig file: exit %d %q %q", code, out, errs)
	}

	signer := filepath.Join(dir, "compliance")
	mustRun(t, "ca", "issue-signer", "--ca", ca, "--name", "compliance", "--out", signer)
	if st, _ := os.Stat(filepath.Join(signer, "signer.key")); st == nil || st.Mode().Perm() != 0o600 {
		t.Fatal("signer key missing or not 0600")
	}
	mustRun(t, "policy", "sign", "--policy", pol, "--signer", signer)
	if out, code := verify(); code != 0 || !strings.Contains(out, "signed by compliance at") || strings.Contains(out, "note:") {
		t.Fatalf("signer-signed: exit %d %s", code, out)
	}
	// The signature's "signer" is not what it signs: a name written into
	// it is not shown as the signer.
	signed, _ := os.ReadFile(pol + ".sig")
	renamed := regexp.MustCompile(`"signer":\s*"compliance"`).ReplaceAll(signed, []byte(`"signer": "chief-compliance-officer"`))
	if bytes.Equal(renamed, signed) {
		t.Fatalf("no signer name in the signature:\n%s", signed)
	}
	os.WriteFile(pol+".sig", renamed, 0o644)
	if out, code := verify(); code != 0 || !strings.Contains(out, "signed by compliance at") || !strings.Contains(out, `calls its signer "chief-compliance-officer", which its certificate does not vouch for`) {
		t.Fatalf("a renamed signer: exit %d %s", code, out)
	}
	os.WriteFile(pol+".sig", signed, 0o644)
	// Without the CA's list a revoked signer would pass as well: said.
	unchecked := []string{"policy", "verify", "--policy", pol, "--ca-cert", filepath.Join(ca, "ca.crt")}
	if out := mustRun(t, unchecked...); !strings.Contains(out, "signed by compliance at") || !strings.Contains(out, "note: revocations were not checked: give the CA's revocation list with --crl") {
		t.Fatalf("verified without --crl:\n%s", out)
	}
	var res struct {
		Valid              bool `json:"valid"`
		RevocationsChecked bool `json:"revocations_checked"`
	}
	if out := mustRun(t, append(unchecked, "--json")...); json.Unmarshal([]byte(out), &res) != nil || !res.Valid || res.RevocationsChecked {
		t.Fatalf("verified without --crl, --json:\n%s", out)
	}
	if out := mustRun(t, append(unchecked, "--json", "--crl", filepath.Join(ca, "crl.pem"))...); json.Unmarshal([]byte(out), &res) != nil || !res.Valid || !res.RevocationsChecked {
		t.Fatalf("verified with --crl, --json:\n%s", out)
	}
	mustRun(t, "ca", "revoke", "--ca", ca, "--signer", "compliance")
	if out, code := verify(); code != 1 || !strings.Contains(out, "revoked") {
		t.Fatalf("revoked signer: exit %d %s", code, out)
	}

	// An invalid policy is never signed.
	os.WriteFile(pol, []byte("policy {"), 0o644)
	if _, errs, code := runCLI(t, "policy", "sign", "--policy", pol, "--ca", ca); code == 0 || !strings.Contains(errs, "refusing to sign") {
		t.Fatalf("signing garbage: exit %d %s", code, errs)
	}
	// Nor one too large for gossip to carry.
	before, _ := os.ReadFile(pol + ".sig")
	os.WriteFile(pol, bytes.Repeat([]byte("# padding\n"), mesh.MaxPolicyBytes/10), 0o644)
	if _, errs, code := runCLI(t, "policy", "sign", "--policy", pol, "--ca", ca); code != 1 || !strings.Contains(errs, "gossip carries at most") {
		t.Fatalf("signing a policy of over 1 MiB: exit %d %s", code, errs)
	}
	if after, _ := os.ReadFile(pol + ".sig"); !bytes.Equal(before, after) {
		t.Fatal("a signature was written")
	}
}
