package policy

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestLint(t *testing.T) {
	src := header + `class "a" {
  mode = "audit"
  allow "store" {
    jurisdiction = ["DE"]
  }
  deny "store" {
    jurisdiction = ["DE", "FR"]
    reason = "x"
  }
  allow "transit" {
    provider = ["nowhere"]
  }
}
class "b" {
  allow "transit" {
    site = ["*"]
  }
}
exception "old" {
  class = "a"
  action = "store"
  site = ["x"]
  category = "waiver"
  reason = "r"
  approver = "p"
  ticket = "T-1"
  expires = "2026-01-31"
}
exception "forever" {
  class = "a"
  action = "store"
  site = ["onprem-zrh"]
  category = "waiver"
  reason = "r"
  approver = "p"
  ticket = "T-2"
  expires = "2030-01-01"
}
class "c" {
  allow "store" {
    jurisdiction = ["CH"]
    require {
      encryption_at_rest = true
    }
  }
  allow "store" {
    provider = ["onprem"]
    require {
      encryption_at_rest = true
    }
  }
}
`
	p := mustParse(t, src)
	inv := Inventory{"onprem-zrh": zrh, "aws-eu-central-1": fra, plainZrh.Name: plainZrh}
	got := map[string][]int{}
	for _, f := range Lint(p, inv, nov24) {
		got[f.Check] = append(got[f.Check], f.Pos.Line)
	}
	want := map[string][]int{
		"audit-mode":        {5},
		"shadowed-allow":    {7},
		"matches-no-site":   {14, 23},
		"never-stored":      {18}, // not "a": the exception lets it be stored at onprem-zrh
		"expired-exception": {23},
		"long-exception":    {33},
		// onprem-zrh-old does not attest encryption at rest.
		"unattested-requirement": {44, 50}, // both allows, not only the one a decision names
	}
	for check, lines := range want {
		if fmt.Sprint(got[check]) != fmt.Sprint(lines) {
			t.Errorf("%s at lines %v, want %v", check, got[check], lines)
		}
	}
	for check := range got {
		if _, ok := want[check]; !ok {
			t.Errorf("unexpected finding %s at %v", check, got[check])
		}
	}

	// The shipped example is clean, with and without its inventory.
	ex, _, err := Load("../docs/examples/residency.hcl")
	if err != nil {
		t.Fatal(err)
	}
	exInv, err := LoadInventory("../docs/examples/sites.hcl")
	if err != nil {
		t.Fatal(err)
	}
	for _, inv := range []Inventory{nil, exInv} {
		if fs := Lint(ex, inv, nov24); len(fs) != 0 {
			t.Errorf("example policy has lint findings: %+v", fs)
		}
	}
}

// TestLintNoClasses: a policy of only its policy block compiles, and
// denies every request; lint says so, as a warning.
func TestLintNoClasses(t *testing.T) {
	fs := Lint(mustParse(t, header), nil, nov24)
	if len(fs) != 1 || fs[0].Check != "no-classes" || fs[0].Severity != "warning" || !strings.Contains(fs[0].Message, "defines no class") {
		t.Fatalf("lint of a policy without classes: %+v", fs)
	}
}

func jsonOf(v any) string { b, _ := json.Marshal(v); return string(b) }

// TestExampleSuite runs docs/examples/residency_test.hcl: the bank's policy
// must pass its own tests.
func TestExampleSuite(t *testing.T) {
	tf, err := LoadTestFile("../docs/examples/residency_test.hcl", nov24)
	if err != nil {
		t.Fatal(err)
	}
	p, _, err := Load(tf.Policy)
	if err != nil {
		t.Fatal(err)
	}
	res := RunTests(p, tf.Inventory, tf.Cases)
	if len(res) < 12 {
		t.Fatalf("only %d cases", len(res))
	}
	for _, r := range res {
		if !r.Pass {
			t.Errorf("%s (%s): %v", r.Name, r.Pos, r.Problems)
		}
	}
}

// TestRunTestsReportsFailures: a wrong expectation is a failure that says
// what happened, not a pass.
func TestRunTestsReportsFailures(t *testing.T) {
	p := mustParse(t, testPolicy)
	inv := Inventory{"onprem-zrh": zrh, "aws-us-east-1": iad}
	res := RunTests(p, inv, []TestCase{
		{Name: "wrong outcome", Class: "secret", Action: Store, Sites: []string{"aws-us-east-1"}, At: nov24, Expect: "allow"},
		{Name: "wrong rule", Class: "secret", Action: Store, Sites: []string{"onprem-zrh"}, At: nov24, Expect: "allow", ExpectRule: "test.hcl:99"},
		{Name: "unknown site", Class: "secret", Action: Store, Sites: []string{"atlantis"}, At: nov24, Expect: "deny"},
		{Name: "right", Class: "secret", Action: Store, Sites: []string{"onprem-zrh"}, At: nov24, Expect: "allow", ExpectRule: "test.hcl:16", ExpectReason: "allowed by"},
		// Cases the rules do not decide would pass as denials: a class
		// misspelt, no site. A case that means to check the refusal of
		// an undefined class says so by its reason.
		{Name: "misspelt class", Class: "secrets", Action: Store, Sites: []string{"onprem-zrh"}, At: nov24, Expect: "deny"},
		{Name: "no site", Class: "secret", Action: Store, At: nov24, Expect: "deny"},
		{Name: "misspelt class, any reason", Class: "secrets", Action: Store, Sites: []string{"onprem-zrh"}, At: nov24, Expect: "deny", ExpectReason: "secret"},
		{Name: "undefined class, on purpose", Class: "secrets", Action: Store, Sites: []string{"onprem-zrh"}, At: nov24, Expect: "deny", ExpectReason: "not defined"},
	})
	for i, wantPass := range []bool{false, false, false, true, false, false, false, true} {
		if res[i].Pass != wantPass {
			t.Errorf("%s: pass = %v (%v)", res[i].Name, res[i].Pass, res[i].Problems)
		}
	}
	if !strings.Contains(res[0].Problems[0], "expected allow, got deny") || !strings.Contains(res[2].Problems[0], `"atlantis" is not in the inventory`) {
		t.Errorf("problems do not explain: %v / %v", res[0].Problems, res[2].Problems)
	}
	if !strings.Contains(fmt.Sprint(res[4].Problems), `class "secrets" is not a class of policy`) || !strings.Contains(fmt.Sprint(res[5].Problems), "names no site") {
		t.Errorf("problems do not explain: %v / %v", res[4].Problems, res[5].Problems)
	}
}

// TestLintShadowedThroughNamedSelector: an allow written with a named
// selector (as the example policy writes them) that a deny always
// overrides is reported, as one written with its criteria is; one the
// deny leaves a site to is not.
func TestLintShadowedThroughNamedSelector(t *testing.T) {
	src := header + `selector "cloud" {
  provider = ["aws"]
}
selector "eu-cloud" {
  selector     = "cloud"
  jurisdiction = ["DE", "FR"]
}
class "a" {
  allow "store" {
    selector = "cloud"
  }
  allow "store" {
    selector = "eu-cloud"
  }
  allow "store" {
    selector     = "cloud"
    jurisdiction = ["CH", "DE"]
  }
  deny "store" {
    provider = ["aws"]
    jurisdiction = ["DE", "FR"]
    reason   = "x"
  }
}
`
	var lines []int
	for _, f := range Lint(mustParse(t, src), nil, nov24) {
		if f.Check == "shadowed-allow" {
			lines = append(lines, f.Pos.Line)
		}
	}
	if !slices.Equal(lines, []int{16}) {
		t.Errorf("shadowed allows at lines %v; want [16] (eu-cloud: aws in DE or FR, which the deny takes whole)", lines)
	}
}

func TestLoadTestFileErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(s), 0o644)
		return p
	}
	for _, tc := range []struct{ src, want string }{
		{`policy = "p.hcl"`, "has no test blocks"},
		{"policy = \"p.hcl\"\ntest \"a\" {\n  class = \"c\"\n  action = \"keep\"\n  sites = []\n  expect = \"deny\"\n}\n", `:2: test "a": action "keep"`},
		{"policy = \"p.hcl\"\ntest \"a\" {\n  class = \"c\"\n  action = \"store\"\n  sites = []\n  expect = \"maybe\"\n}\n", `expect "maybe"`},
		{"policy = \"p.hcl\"\nsite \"x\" {\n  provider = \"aws\"\n  region = \"r\"\n  jurisdiction = \"EU\"\n}\n", "site \"x\" is no site a gateway's certificate could describe:\njurisdiction \"EU\" is not"},
		// A misspelt block or attribute ran fewer cases, or at another
		// time, than written, and the suite passed.
		{"policy = \"p.hcl\"\ntest \"a\" {\n  class = \"c\"\n  action = \"store\"\n  sites = []\n  expect = \"deny\"\n}\ntests \"b\" {\n  class = \"c\"\n}\n", "Unsupported block type"},
		{"policy = \"p.hcl\"\natx = \"2026-11-24T12:00:00Z\"\ntest \"a\" {\n  class = \"c\"\n  action = \"store\"\n  sites = []\n  expect = \"deny\"\n}\n", "Unsupported argument"},
		{"policy = \"p.hcl\"\nsite \"x\" {\n  provider = \"aws\"\n  region = \"r\"\n  jurisdiction = \"DE\"\n  labels = { tier = \"a\", tier = \"b\" }\n}\n", `key "tier" given twice`},
		// A site of the test file named as one of the inventory judged
		// attributes no gateway of that name has.
		{"policy = \"p.hcl\"\ninventory = \"inv.hcl\"\nsite \"a\" {\n  provider = \"aws\"\n  region = \"r\"\n  jurisdiction = \"CH\"\n}\ntest \"t\" {\n  class = \"c\"\n  action = \"store\"\n  sites = [\"a\"]\n  expect = \"deny\"\n}\n", `site "a" is defined here and in the inventory`},
	} {
		write("inv.hcl", "site \"a\" {\n  provider = \"aws\"\n  region = \"r\"\n  jurisdiction = \"US\"\n}\n")
		if _, err := LoadTestFile(write("t.hcl", tc.src), nov24); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("err = %v, want %q", err, tc.want)
		}
	}
}

var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// TestRecordShape: a decision record has the fields of an OPA decision log
// event, so SIEM parsers for OPA read it.
func TestRecordShape(t *testing.T) {
	p := mustParse(t, testPolicy)
	req := Request{Class: "secret", Action: Store, Sites: []Site{iad}, Time: nov24}
	d := p.Evaluate(req)
	r1 := NewRecord(req, d, map[string]string{"node": "gw1", "site": "onprem-zrh"}, "migration 42", nov24)
	r2 := NewRecord(req, d, nil, "", nov24)
	if !uuidRE.MatchString(r1.DecisionID) || r1.DecisionID == r2.DecisionID {
		t.Fatalf("decision IDs %q, %q", r1.DecisionID, r2.DecisionID)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(jsonOf(r1)), &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"decision_id", "timestamp", "path", "input", "result", "bundles", "labels", "requested_by"} {
		if _, ok := m[k]; !ok {
			t.Errorf("record lacks %q", k)
		}
	}
	rev := m["bundles"].(map[string]any)["test"].(map[string]any)["revision"].(string)
	if !strings.HasPrefix(rev, "v3-sha256:") || !strings.HasSuffix(rev, d.Policy.SHA256) {
		t.Errorf("bundle revision %q", rev)
	}
	res := m["result"].(map[string]any)
	if res["allowed"] != false || res["rule"].(map[string]any)["kind"] != "default-deny" {
		t.Errorf("result = %v", res)
	}
	if m["timestamp"] != nov24.Format(time.RFC3339) {
		t.Errorf("timestamp %v", m["timestamp"])
	}
}

// TestInventoryRefusesStrays: a site inventory holds sites only — a
// typo'd block, or the policy file given by mistake, is an error naming
// it, not an inventory that silently lacks the sites.
func TestInventoryRefusesStrays(t *testing.T) {
	dir := t.TempDir()
	for name, tc := range map[string]struct{ src, want string }{
		"typo'd block": {"site \"a\" {\n  provider = \"aws\"\n  region = \"r\"\n  jurisdiction = \"DE\"\n}\nsitee \"b\" {\n  provider = \"aws\"\n}\n", `Unsupported block type`},
		"empty":        {"", "holds no site block"},
		"a policy":     {"policy {\n  name = \"p\"\n  version = 1\n}\n", `Unsupported block type`},
		// HCL keeps the last of two; which one decides what the site
		// may hold must not be the order of two lines.
		"a label given twice": {"site \"a\" {\n  provider = \"aws\"\n  region = \"r\"\n  jurisdiction = \"DE\"\n  labels = { tenancy = \"shared\", tenancy = \"dedicated\" }\n}\n", `key "tenancy" given twice`},
		// Checked as a certificate's attributes are: a provider in
		// capitals would match no rule and no gateway.
		"a site no certificate could carry": {"site \"a\" {\n  provider = \"AWS\"\n  region = \"r\"\n  jurisdiction = \"DE\"\n  labels = { tier = \"\" }\n}\n",
			`provider "AWS" is not valid`},
	} {
		f := filepath.Join(dir, "inv.hcl")
		os.WriteFile(f, []byte(tc.src), 0o644)
		if _, err := LoadInventory(f); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, tc.want)
		}
	}
}
