package policy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"regexp"
	"strings"
	"testing"
)

const header = "policy {\n  name = \"t\"\n  version = 1\n}\n" // 4 lines

// TestParseErrors: every mistake is refused with the file and line that
// hold it, so a typo fails closed and is easy to find.
func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, src, want string
	}{
		{"no policy block", `class "a" {}`, `test.hcl:1:1: missing policy block`},
		{"version zero", "policy {\n  name = \"t\"\n  version = 0\n}\n", `test.hcl:3:3: policy version must be 1 or more`},
		{"bad mode", "policy {\n  name = \"t\"\n  version = 1\n  mode = \"lenient\"\n}\n", `test.hcl:4:3: mode "lenient"`},
		{"syntax error", header + "class \"a\" {\n  allow \"store\" {\n", `test.hcl:6:`},
		{"unknown block", header + "klass \"a\" {}\n", `test.hcl:5:1: Unsupported block type`},
		{"unknown attribute in a rule", header + "class \"a\" {\n  allow \"store\" {\n    contry = [\"CH\"]\n  }\n}\n", `test.hcl:7:5: class "a" allow "store": Unsupported argument`},
		{"unknown jurisdiction", header + "class \"a\" {\n  allow \"store\" {\n    jurisdiction = [\"CH\", \"EUR\"]\n  }\n}\n", `test.hcl:7:5: class "a" allow "store": "EUR" is neither`},
		{"lower-case country", header + "class \"a\" {\n  allow \"store\" {\n    jurisdiction = [\"ch\"]\n  }\n}\n", `"ch" is neither`},
		{"unknown country in a group", header + "jurisdiction \"EU\" {\n  countries = [\"DE\", \"XX\"]\n}\n", `test.hcl:6:3: jurisdiction "EU": "XX"`},
		{"group named like a country", header + "jurisdiction \"CH\" {\n  countries = [\"LI\"]\n}\n", `test.hcl:5:1: jurisdiction "CH" is a country code`},
		{"group cycle", header + "jurisdiction \"A1\" {\n  countries = [\"B1\"]\n}\njurisdiction \"B1\" {\n  countries = [\"A1\"]\n}\n", `includes itself`},
		{"bad action", header + "class \"a\" {\n  allow \"delete\" {\n    site = [\"*\"]\n  }\n}\n", `test.hcl:6:3: allow "delete"`},
		{"rule without sites", header + "class \"a\" {\n  allow \"store\" {\n  }\n}\n", `test.hcl:6:3: class "a" allow "store" says no site`},
		{"empty list never matches", header + "class \"a\" {\n  allow \"store\" {\n    provider = []\n  }\n}\n", `test.hcl:7:5: class "a" allow "store": provider = [] can never match`},
		{"deny without reason", header + "class \"a\" {\n  deny \"store\" {\n    site = [\"x\"]\n  }\n}\n", `test.hcl:6:3: class "a" deny "store" needs a reason`},
		{"bad glob", header + "class \"a\" {\n  allow \"store\" {\n    site = [\"[a-\"]\n  }\n}\n", `not a valid glob`},
		{"unknown selector", header + "class \"a\" {\n  allow \"store\" {\n    selector = \"nope\"\n  }\n}\n", `test.hcl:7:5: class "a" allow "store": selector "nope" is not defined`},
		{"duplicate class", header + "class \"a\" {}\nclass \"a\" {}\n", `test.hcl:6:1: class "a" is defined twice`},
		{"max_hops on store", header + "class \"a\" {\n  allow \"store\" {\n    site = [\"*\"]\n    require {\n      max_hops = 2\n    }\n  }\n}\n", `test.hcl:9:7: max_hops only makes sense on a transit rule`},
		{"negative hops", header + "class \"a\" {\n  allow \"transit\" {\n    site = [\"*\"]\n    require {\n      max_hops = 0\n    }\n  }\n}\n", `max_hops must be 1 or more`},
		{"exception without expiry", header + "class \"a\" {}\nexception \"e\" {\n  class = \"a\"\n  action = \"store\"\n  site = [\"x\"]\n  category = \"waiver\"\n  reason = \"r\"\n  approver = \"p\"\n  ticket = \"T-1\"\n}\n", `test.hcl:6:15: Missing required argument: The argument "expires" is required`},
		{"exception with bad date", header + "class \"a\" {}\nexception \"e\" {\n  class = \"a\"\n  action = \"store\"\n  site = [\"x\"]\n  category = \"waiver\"\n  reason = \"r\"\n  approver = \"p\"\n  ticket = \"T-1\"\n  expires = \"31.12.2026\"\n}\n", `test.hcl:14:3: exception "e": expires "31.12.2026"`},
		{"exception for unknown class", header + "exception \"e\" {\n  class = \"b\"\n  action = \"store\"\n  site = [\"x\"]\n  category = \"waiver\"\n  reason = \"r\"\n  approver = \"p\"\n  ticket = \"T-1\"\n  expires = \"2026-12-31\"\n}\n", `test.hcl:6:3: exception "e": class "b" is not defined`},
		{"exception with bad category", header + "class \"a\" {}\nexception \"e\" {\n  class = \"a\"\n  action = \"store\"\n  site = [\"x\"]\n  category = \"yolo\"\n  reason = \"r\"\n  approver = \"p\"\n  ticket = \"T-1\"\n  expires = \"2026-12-31\"\n}\n", `test.hcl:10:3: exception "e": category "yolo"`},
		{"exception without approver", header + "class \"a\" {}\nexception \"e\" {\n  class = \"a\"\n  action = \"store\"\n  site = [\"x\"]\n  category = \"waiver\"\n  reason = \"r\"\n  approver = \" \"\n  ticket = \"T-1\"\n  expires = \"2026-12-31\"\n}\n", `approver must not be empty`},
		{"wrong type", header + "class \"a\" {\n  allow \"store\" {\n    site = \"x\"\n  }\n}\n", `test.hcl:7:`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse("test.hcl", []byte(tt.src))
			if err == nil {
				t.Fatalf("parsed: %+v", p.rev)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error:\n%v\nwant it to contain %q", err, tt.want)
			}
			if p != nil {
				t.Fatal("a policy was returned with the error")
			}
		})
	}
}

func TestExamplePolicyParses(t *testing.T) {
	p, _, err := Load("../docs/examples/residency.hcl")
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Classes(); strings.Join(got, ",") != "pii-eu,public,risk-batch,swiss-banking-secret" {
		t.Fatalf("classes = %v", got)
	}
}

var posRE = regexp.MustCompile(`(?m)^fuzz\.hcl:\d+`)

// FuzzParse: whatever the file holds, Parse either refuses it with a
// file:line on every error line, or returns a policy whose every allowing
// decision is traceable to a rule or exception written in the file: never
// a panic, never a silent allow.
func FuzzParse(f *testing.F) {
	f.Add([]byte(testPolicy))
	f.Add([]byte(header + "class \"a\" {\n  allow \"store\" {\n    site = [\"*\"]\n  }\n}\n"))
	f.Add([]byte(header))
	f.Add([]byte("policy {"))
	sites := []Site{zrh, fra, iad, shared, unknownCC, {}}
	f.Fuzz(func(t *testing.T, src []byte) {
		p, err := Parse("fuzz.hcl", src)
		if err != nil {
			for _, line := range strings.Split(err.Error(), "\n") {
				if !posRE.MatchString(line) {
					t.Fatalf("error line without file:line: %q", line)
				}
			}
			return
		}
		lines := strings.Count(string(src), "\n") + 1
		for _, cls := range append(p.Classes(), "unknown") {
			for _, a := range []Action{Store, Transit} {
				for i := range sites {
					d := p.Evaluate(Request{Class: cls, Action: a, Sites: sites[i : i+1], Time: nov24})
					if d.Denied {
						continue
					}
					k := d.Rule.Kind
					if (k != "allow" && k != "exception") || d.Rule.Pos.File != "fuzz.hcl" || d.Rule.Pos.Line < 1 || d.Rule.Pos.Line > lines {
						t.Fatalf("allow without a rule in the file: %+v", d.Rule)
					}
				}
			}
		}
	})
}

// TestGlobMatchesSomeName: a site or region glob is refused only when no
// certified name can match it.
func TestGlobMatchesSomeName(t *testing.T) {
	for g, want := range map[string]bool{
		"*": true, "zrh": true, "z": true, "a-b": true, "onprem-*": true, "*-zrh": true, "aws-??-*": true,
		"[a-c]*": true, "[!x]*": true, "[^0-9]?": true, "eu-*-1": true, "[ab]": true,
		"": false, "-": false, "onprem-": false, "-*": false, "*-": false, "[z-a]*": false, "[^a-z0-9]*": false,
	} {
		if got := globMatchesSomeName(g); got != want {
			t.Errorf("%q: %v, want %v", g, got, want)
		}
	}
}

// TestUnmatchableValues: values no certified gateway can carry — capitals
// or other characters in a site, region or provider name or a label key,
// a label value outside the allowed set or empty — never match, which in a
// deny rule's guard lets everything through. Lint reports them as errors
// and `policy sign` refuses them; a policy already signed with one still
// compiles (a gateway upgraded under it must not end up with no policy).
func TestUnmatchableValues(t *testing.T) {
	tests := []struct {
		name, src, want string
	}{
		{"capital site", header + "class \"a\" {\n  deny \"store\" {\n    site = [\"CN-*\"]\n    reason = \"r\"\n  }\n}\n", `"CN-*" can never match: site and region names are lower-case letters, digits and '-' (did you mean "cn-*"?)`},
		{"capital region", header + "class \"a\" {\n  deny \"store\" {\n    region = [\"CN-north-1\"]\n    reason = \"r\"\n  }\n}\n", `"CN-north-1" can never match`},
		{"capital provider", header + "class \"a\" {\n  deny \"store\" {\n    provider = [\"Alibaba\"]\n    reason = \"r\"\n  }\n}\n", `class "a" deny "store": provider "Alibaba" can never match`},
		{"site with a dot", header + "class \"a\" {\n  allow \"store\" {\n    site = [\"zrh.dc1\"]\n  }\n}\n", `"zrh.dc1" can never match`},
		{"capital label key", header + "class \"a\" {\n  deny \"store\" {\n    labels = { Tenancy = \"shared\" }\n    reason = \"r\"\n  }\n}\n", `label key "Tenancy" can never match`},
		{"empty label value", header + "class \"a\" {\n  allow \"store\" {\n    labels = { certified = \"\" }\n  }\n}\n", `label certified = "" would match every site without the label`},
		{"label value with a space", header + "class \"a\" {\n  allow \"store\" {\n    labels = { certified = \"iso 27001\" }\n  }\n}\n", `label certified value "iso 27001" can never match`},
		{"label value with a comma", header + "class \"a\" {\n  deny \"store\" {\n    labels = { tenancy = \"shared,public\" }\n    reason = \"r\"\n  }\n}\n", `label tenancy value "shared,public" holds a comma`},
		{"empty site", header + "class \"a\" {\n  deny \"store\" {\n    site = [\"\"]\n    reason = \"r\"\n  }\n}\n", `"" can never match: site and region names are 1 to 63`},
		{"site ending in a dash", header + "class \"a\" {\n  deny \"store\" {\n    site = [\"onprem-\"]\n    reason = \"r\"\n  }\n}\n", `"onprem-" can never match`},
		{"glob starting with a dash", header + "class \"a\" {\n  deny \"store\" {\n    site = [\"-*\"]\n    reason = \"r\"\n  }\n}\n", `"-*" can never match`},
		{"empty character class", header + "class \"a\" {\n  deny \"store\" {\n    region = [\"[z-a]*\"]\n    reason = \"r\"\n  }\n}\n", `"[z-a]*" can never match`},
		{"site too long", header + "class \"a\" {\n  deny \"store\" {\n    site = [\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"]\n    reason = \"r\"\n  }\n}\n", `can never match: site and region names are 1 to 63`},
		// Not void but inverted: the shell's negation is a member here, so
		// this deny would hit the sites starting with "o" and spare the rest.
		{"class negated with '!'", header + "class \"a\" {\n  deny \"store\" {\n    site = [\"[!o]*\"]\n    reason = \"r\"\n  }\n}\n", `a class negates with '^' here, not '!' ('!' is a character of the class, and no name has one): write "[^o]*"`},
		{"region class negated with '!'", header + "class \"a\" {\n  allow \"store\" {\n    region = [\"eu-[!c]*\"]\n  }\n}\n", `write "eu-[^c]*"`},
		// Not values, but as void: a deny that tells the refused nothing,
		// an exception that audit records cannot tell from another.
		{"blank reason", header + "class \"a\" {\n  deny \"store\" {\n    site = [\"*\"]\n    reason = \"   \"\n  }\n}\n", `has a reason of blanks only`},
		{"exception defined twice", header + "class \"a\" {}\nexception \"e\" {\n  class = \"a\"\n  action = \"store\"\n  site = [\"x\"]\n  category = \"waiver\"\n  reason = \"r\"\n  approver = \"p\"\n  ticket = \"T-1\"\n  expires = \"2026-12-31\"\n}\nexception \"e\" {\n  class = \"a\"\n  action = \"store\"\n  site = [\"x\"]\n  category = \"waiver\"\n  reason = \"r\"\n  approver = \"p\"\n  ticket = \"T-1\"\n  expires = \"2026-12-31\"\n}\n", `exception "e" is defined twice (also at line 6)`},
		// Not a value, but as void: a requirement where it means nothing.
		{"encryption at rest on transit", header + "class \"a\" {\n  allow \"transit\" {\n    site = [\"*\"]\n    require {\n      encryption_at_rest = true\n    }\n  }\n}\n", `encryption_at_rest only means something on a store rule`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse("test.hcl", []byte(tt.src))
			if err != nil {
				t.Fatalf("does not compile: %v", err)
			}
			var found []string
			for _, f := range Lint(p, nil, nov24) {
				if f.Severity == "error" {
					found = append(found, f.Message)
				}
			}
			if len(found) != 1 || !strings.Contains(found[0], tt.want) {
				t.Fatalf("lint: %q, want one error containing %q", found, tt.want)
			}
			key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if _, err := Sign("test.hcl", []byte(tt.src), key, "k", nil, nov24); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("sign: %v, want a refusal naming %q", err, tt.want)
			}
		})
	}
}
