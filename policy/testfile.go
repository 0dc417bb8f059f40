package policy

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"

	"github.com/skybridge-mesh/skybridge/internal/hclconf"
)

// TestFile is a policy test suite, like `opa test` runs: cases of input
// and expected decision, judged against a policy and an inventory of sites.
//
//	policy    = "residency.hcl"          # relative to the test file
//	inventory = "sites.hcl"              # optional; site blocks may also be inline
//	at        = "2026-11-24T12:00:00Z"   # default time of the cases
//
//	test "swiss banking secrecy never reaches the US" {
//	  class  = "swiss-banking-secret"
//	  action = "store"
//	  sites  = ["aws-us-east-1"]
//	  expect = "deny"                     # allow, deny or audit
//	  expect_rule   = "residency.hcl:46"  # optional: where the deciding rule is
//	  expect_reason = "denied by default" # optional: a substring of the reasons
//	}
type TestFile struct {
	Path      string
	Policy    string // resolved path of the policy
	Inventory Inventory
	At        time.Time
	Cases     []TestCase
}

// TestCase is one case of a TestFile.
type TestCase struct {
	Name            string
	Pos             Position
	Class           string
	Action          Action
	Sites           []string
	At              time.Time
	Expect          string // "allow", "deny" or "audit"
	ExpectRule      string // "file:line", file relative to the policy's directory or just its base name
	ExpectReason    string
	ExpectException string
}

type testFileSyntax struct {
	Policy    string           `hcl:"policy"`
	Inventory string           `hcl:"inventory,optional"`
	At        string           `hcl:"at,optional"`
	Tests     []testCaseSyntax `hcl:"test,block"`
	Sites     []siteSyntax     `hcl:"site,block"`
}

type testCaseSyntax struct {
	Name            string    `hcl:"name,label"`
	Class           string    `hcl:"class"`
	Action          string    `hcl:"action"`
	Sites           []string  `hcl:"sites"`
	At              string    `hcl:"at,optional"`
	Expect          string    `hcl:"expect"`
	ExpectRule      string    `hcl:"expect_rule,optional"`
	ExpectReason    string    `hcl:"expect_reason,optional"`
	ExpectException string    `hcl:"expect_exception,optional"`
	DefRange        hcl.Range `hcl:",def_range"`
}

// LoadTestFile reads a test suite. Times default to now when neither the
// case nor the file says.
func LoadTestFile(path string, now time.Time) (*TestFile, error) {
	// Anything but what a test file holds is refused, as a key given
	// twice is: a misspelt test block or time would otherwise leave a
	// suite passing with fewer cases, or at another time, than written.
	var syn testFileSyntax
	err := hclconf.DecodeFile(path, &syn)
	if err != nil {
		return nil, fmt.Errorf("policy tests: %w", err)
	}
	dir := filepath.Dir(path)
	rel := func(p string) string {
		if filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	tf := &TestFile{Path: path, Policy: rel(syn.Policy), At: now, Inventory: Inventory{}}
	if syn.At != "" {
		if tf.At, err = time.Parse(time.RFC3339, syn.At); err != nil {
			return nil, fmt.Errorf("%s: at %q is not an RFC 3339 time", path, syn.At)
		}
	}
	if syn.Inventory != "" {
		if tf.Inventory, err = LoadInventory(rel(syn.Inventory)); err != nil {
			return nil, err
		}
	}
	inline, err := inventoryOf(syn.Sites)
	if err != nil {
		return nil, err
	}
	for n, s := range inline {
		// A case would judge attributes no gateway of that name has,
		// under its name.
		if _, ok := tf.Inventory[n]; ok {
			return nil, fmt.Errorf("%s: site %q is defined here and in the inventory %s: name the site of the test file otherwise", path, n, syn.Inventory)
		}
		tf.Inventory[n] = s
	}
	for _, ts := range syn.Tests {
		r := ts.DefRange
		where := fmt.Sprintf("%s:%d: test %q", r.Filename, r.Start.Line, ts.Name)
		a, err := ParseAction(ts.Action)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", where, err)
		}
		switch ts.Expect {
		case "allow", "deny", "audit":
		default:
			return nil, fmt.Errorf("%s: expect %q must be allow, deny or audit", where, ts.Expect)
		}
		at := tf.At
		if ts.At != "" {
			if at, err = time.Parse(time.RFC3339, ts.At); err != nil {
				return nil, fmt.Errorf("%s: at %q is not an RFC 3339 time", where, ts.At)
			}
		}
		tf.Cases = append(tf.Cases, TestCase{
			Name: ts.Name, Pos: Position{File: r.Filename, Line: r.Start.Line},
			Class: ts.Class, Action: a, Sites: ts.Sites, At: at, Expect: ts.Expect,
			ExpectRule: ts.ExpectRule, ExpectReason: ts.ExpectReason, ExpectException: ts.ExpectException,
		})
	}
	if len(tf.Cases) == 0 {
		return nil, fmt.Errorf("%s has no test blocks", path)
	}
	return tf, nil
}

// TestResult is the outcome of one case.
type TestResult struct {
	Name     string   `json:"name"`
	Pos      Position `json:"position"`
	Pass     bool     `json:"pass"`
	Problems []string `json:"problems,omitempty"`
	Decision Decision `json:"decision"`
}

// RunTests judges every case against p. It is pure.
func RunTests(p *Policy, inv Inventory, cases []TestCase) []TestResult {
	out := make([]TestResult, 0, len(cases))
	for _, tc := range cases {
		res := TestResult{Name: tc.Name, Pos: tc.Pos}
		// A case the policy cannot decide on its rules would pass as a
		// deny whatever the rules say: a class misspelt, say (policy
		// check refuses one). Checking that undefined classes are
		// denied is a case of its own, which says so by its reason.
		if !slices.Contains(p.Classes(), tc.Class) && !strings.Contains(tc.ExpectReason, "not defined") {
			res.Problems = append(res.Problems, fmt.Sprintf("class %q is not a class of policy %s: the case would pass as a deny whatever its rules say (to check that undefined classes are denied, say expect_reason = \"not defined\")", tc.Class, p.Revision()))
		}
		if len(tc.Sites) == 0 {
			res.Problems = append(res.Problems, "the case names no site: it would pass as a deny whatever the rules say")
		}
		if len(res.Problems) > 0 {
			out = append(out, res)
			continue
		}
		sites, err := inv.Lookup(tc.Sites)
		if err != nil {
			res.Problems = append(res.Problems, err.Error())
			out = append(out, res)
			continue
		}
		d := p.Evaluate(Request{Class: tc.Class, Action: tc.Action, Sites: sites, Time: tc.At})
		res.Decision = d
		if got := d.Outcome(); got != tc.Expect {
			res.Problems = append(res.Problems, fmt.Sprintf("expected %s, got %s: %s", tc.Expect, got, strings.Join(d.Reasons, "; ")))
		}
		if tc.ExpectRule != "" && !sameRule(tc.ExpectRule, d.Rule.Pos) {
			res.Problems = append(res.Problems, fmt.Sprintf("expected the rule at %s to decide, but %s did", tc.ExpectRule, d.Rule))
		}
		if tc.ExpectReason != "" && !strings.Contains(strings.Join(d.Reasons, "\n"), tc.ExpectReason) {
			res.Problems = append(res.Problems, fmt.Sprintf("no reason mentions %q: %s", tc.ExpectReason, strings.Join(d.Reasons, "; ")))
		}
		if tc.ExpectException != "" && !slices.ContainsFunc(d.Exceptions, func(e *ExceptionRef) bool { return e.Name == tc.ExpectException }) {
			res.Problems = append(res.Problems, fmt.Sprintf("expected exception %q to apply", tc.ExpectException))
		}
		res.Pass = len(res.Problems) == 0
		out = append(out, res)
	}
	return out
}

// sameRule compares "file:line" with a position, accepting the base name
// of the file.
func sameRule(want string, got Position) bool {
	file, line, ok := strings.Cut(want, ":")
	if !ok {
		return false
	}
	return line == fmt.Sprint(got.Line) && (file == got.File || file == filepath.Base(got.File))
}
