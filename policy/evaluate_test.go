package policy

import (
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// testPolicy exercises every construct of the language; the line numbers
// in the table below refer to it.
const testPolicy = `policy {
  name    = "test"
  version = 3
}
jurisdiction "EU" {
  countries = ["DE", "FR", "IE"]
}
jurisdiction "EEA" {
  countries = ["EU", "NO"]
}
selector "approved" {
  provider = ["aws", "gcp"]
  labels   = { certified = "iso27001" }
}
class "secret" {
  allow "store" {
    jurisdiction = ["CH"]
    provider     = ["onprem"]
    require {
      encryption_at_rest = true
      min_replica_zones  = 2
    }
  }
  allow "transit" {
    jurisdiction = ["CH"]
    require {
      max_hops = 1
    }
  }
}
class "pii" {
  allow "store" {
    jurisdiction = ["EEA"]
    require {
      encryption_at_rest = true
    }
  }
  allow "transit" {
    jurisdiction = ["EEA", "CH"]
    require {
      max_hops = 3
    }
  }
  deny "store" {
    site   = ["*-shared-*"]
    reason = "no shared tenancy"
  }
}
class "batch" {
  allow "store" {
    selector = "approved"
    region   = ["eu-*", "us-east-?"]
  }
  allow "transit" {
    site = ["*"]
  }
}
class "trial" {
  mode = "audit"
  allow "store" {
    jurisdiction = ["DE"]
  }
}
exception "pii-us" {
  class    = "pii"
  action   = "store"
  site     = ["aws-us-east-1"]
  category = "waiver"
  reason   = "DR test"
  approver = "CDO"
  ticket   = "GRC-1"
  expires  = "2026-12-31"
}
exception "pii-shared" {
  class    = "pii"
  action   = "store"
  site     = ["gcp-shared-eu"]
  category = "mitigated"
  reason   = "dedicated host booked"
  approver = "CISO"
  ticket   = "GRC-2"
  expires  = "2026-12-01T00:00:00Z"
}
`

var (
	// What a site's store attests: encryption at rest, zone replicas of
	// its own, or the zone it is in.
	zrh       = Site{Name: "onprem-zrh", Provider: "onprem", Region: "zrh", Jurisdiction: "CH", Labels: map[string]string{LabelEncryptionAtRest: "true", LabelReplicaZones: "2"}}
	gva       = Site{Name: "onprem-gva", Provider: "onprem", Region: "gva", Jurisdiction: "CH", Labels: map[string]string{LabelEncryptionAtRest: "true", LabelZone: "gva-a"}}
	bsl       = Site{Name: "onprem-bsl", Provider: "onprem", Region: "bsl", Jurisdiction: "CH", Labels: map[string]string{LabelEncryptionAtRest: "true", LabelZone: "bsl-a"}}
	bsl2      = Site{Name: "onprem-bsl2", Provider: "onprem", Region: "bsl", Jurisdiction: "CH", Labels: map[string]string{LabelEncryptionAtRest: "true", LabelZone: "bsl-a"}}
	bsl2Upper = Site{Name: "onprem-bsl2", Provider: "onprem", Region: "bsl", Jurisdiction: "CH", Labels: map[string]string{LabelEncryptionAtRest: "true", LabelZone: "BSL-A"}}
	plainZrh  = Site{Name: "onprem-zrh-old", Provider: "onprem", Region: "zrh", Jurisdiction: "CH", Labels: map[string]string{LabelReplicaZones: "2"}}
	gcpZrh    = Site{Name: "gcp-zrh", Provider: "gcp", Region: "europe-west6", Jurisdiction: "CH", Labels: map[string]string{"certified": "iso27001"}}
	fra       = Site{Name: "aws-eu-central-1", Provider: "aws", Region: "eu-central-1", Jurisdiction: "DE", Labels: map[string]string{"certified": "soc2,iso27001", LabelEncryptionAtRest: "true"}}
	upperFra  = Site{Name: "aws-eu-central-1", Provider: "aws", Region: "eu-central-1", Jurisdiction: "DE", Labels: map[string]string{"certified": "SOC2, ISO27001"}}
	plainFra  = Site{Name: "aws-eu-central-1", Provider: "aws", Region: "eu-central-1", Jurisdiction: "DE", Labels: map[string]string{"certified": "soc2,iso27001", LabelEncryptionAtRest: "yes"}}
	osl       = Site{Name: "onprem-osl", Provider: "onprem", Region: "osl", Jurisdiction: "NO", Labels: map[string]string{LabelEncryptionAtRest: "true"}}
	shared    = Site{Name: "gcp-shared-eu", Provider: "gcp", Region: "eu-west-1", Jurisdiction: "IE", Labels: map[string]string{LabelEncryptionAtRest: "true"}}
	plainShd  = Site{Name: "gcp-shared-eu", Provider: "gcp", Region: "eu-west-1", Jurisdiction: "IE"}
	iad       = Site{Name: "aws-us-east-1", Provider: "aws", Region: "us-east-1", Jurisdiction: "US", Labels: map[string]string{"certified": "iso27001", LabelEncryptionAtRest: "true"}}
	plainIad  = Site{Name: "aws-us-east-1", Provider: "aws", Region: "us-east-1", Jurisdiction: "US", Labels: map[string]string{"certified": "iso27001"}}
	iad2      = Site{Name: "aws-us-east-2", Provider: "aws", Region: "us-east-2", Jurisdiction: "US"}
	uncert    = Site{Name: "aws-eu-west-1", Provider: "aws", Region: "eu-west-1", Jurisdiction: "IE"}
	unknownCC = Site{Name: "mystery", Provider: "aws", Region: "eu-central-1", Jurisdiction: "XX"}
	nov24     = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
)

func mustParse(t testing.TB, src string) *Policy {
	t.Helper()
	p, err := Parse("test.hcl", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestEvaluate(t *testing.T) {
	p := mustParse(t, testPolicy)
	tests := []struct {
		name      string
		class     string
		action    Action
		sites     []Site
		at        time.Time
		outcome   string // allow, deny, audit
		line      int    // line of the deciding rule (0: not checked)
		kind      string // kind of the deciding rule ("" not checked)
		reason    string // substring of the reasons
		exception string
		oblig     Obligations
	}{
		// allow rules and their selectors
		{name: "country and provider", class: "secret", action: Store, sites: []Site{zrh}, outcome: "allow", line: 16, kind: "allow",
			oblig: Obligations{EncryptionAtRest: true, MinReplicaZones: 2}},
		{name: "provider mismatch", class: "secret", action: Store, sites: []Site{gcpZrh}, outcome: "deny", kind: "default-deny", reason: "denied by default"},
		{name: "jurisdiction group", class: "pii", action: Store, sites: []Site{fra}, outcome: "allow", line: 32, oblig: Obligations{EncryptionAtRest: true}},
		{name: "nested jurisdiction group", class: "pii", action: Store, sites: []Site{osl}, outcome: "allow", line: 32},
		{name: "outside the group", class: "pii", action: Store, sites: []Site{zrh}, outcome: "deny", kind: "default-deny"},
		{name: "named selector with label list", class: "batch", action: Store, sites: []Site{fra}, outcome: "allow", line: 50},
		{name: "named selector label missing", class: "batch", action: Store, sites: []Site{uncert}, outcome: "deny"},
		{name: "label values compare without case", class: "batch", action: Store, sites: []Site{upperFra}, outcome: "allow", line: 50},
		{name: "region glob ?", class: "batch", action: Store, sites: []Site{iad}, outcome: "allow"},
		{name: "region glob no match", class: "batch", action: Store, sites: []Site{gcpZrh}, outcome: "deny"},
		{name: "site glob *", class: "batch", action: Transit, sites: []Site{iad, fra, zrh}, outcome: "allow", line: 54},
		{name: "unknown jurisdiction at a site", class: "pii", action: Store, sites: []Site{unknownCC}, outcome: "deny", kind: "default-deny"},

		// precedence
		{name: "deny beats allow", class: "pii", action: Store, sites: []Site{shared}, at: time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC), outcome: "deny", line: 44, kind: "deny", reason: "no shared tenancy"},
		{name: "exception beats deny", class: "pii", action: Store, sites: []Site{shared}, outcome: "allow", line: 74, kind: "exception", exception: "pii-shared", oblig: Obligations{EncryptionAtRest: true}},
		{name: "exception where nothing allows", class: "pii", action: Store, sites: []Site{iad}, outcome: "allow", line: 64, exception: "pii-us"},
		{name: "exception last day", class: "pii", action: Store, sites: []Site{iad}, at: time.Date(2026, 12, 31, 23, 59, 59, 0, time.UTC), outcome: "allow", exception: "pii-us"},
		{name: "exception expired", class: "pii", action: Store, sites: []Site{iad}, at: time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC), outcome: "deny", reason: `exception "pii-us" ran until 2026-12-31 and has expired`},
		{name: "exception for another action", class: "pii", action: Transit, sites: []Site{zrh, iad}, outcome: "deny"},
		{name: "exception for another site", class: "pii", action: Store, sites: []Site{iad2}, outcome: "deny"},
		{name: "exception for another class", class: "secret", action: Store, sites: []Site{iad}, outcome: "deny", kind: "default-deny", reason: "denied by default"},
		{name: "an exception for one site of a denied store names none", class: "pii", action: Store, sites: []Site{iad, zrh}, outcome: "deny", kind: "default-deny", reason: "onprem-zrh"},
		{name: "exception expiring at an instant", class: "pii", action: Store, sites: []Site{shared}, at: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC), outcome: "deny", kind: "deny"},

		// transit paths and hops
		{name: "direct tunnel", class: "secret", action: Transit, sites: []Site{zrh, gva}, outcome: "allow", oblig: Obligations{MaxHops: 1}},
		{name: "too many hops", class: "secret", action: Transit, sites: []Site{zrh, bsl, gva}, outcome: "deny", kind: "max-hops", line: 24, reason: "has 2 hops"},
		{name: "path through a forbidden site", class: "pii", action: Transit, sites: []Site{fra, iad, osl}, outcome: "deny", reason: "aws-us-east-1"},
		{name: "transit within its allow's max_hops", class: "pii", action: Transit, sites: []Site{zrh, fra, osl, shared}, outcome: "allow", oblig: Obligations{MaxHops: 3}},
		{name: "multi-site store: all must allow", class: "secret", action: Store, sites: []Site{zrh, gcpZrh}, outcome: "deny", reason: "gcp-zrh"},

		// requirements, met by what the sites' certificates attest
		{name: "encryption not attested", class: "pii", action: Store, sites: []Site{plainFra}, outcome: "deny", line: 32, kind: "requirement",
			reason: `only where data rests encrypted, which the site's certificate does not attest (label encryption_at_rest = "true")`},
		{name: "encryption not attested, zones are", class: "secret", action: Store, sites: []Site{plainZrh}, outcome: "deny", line: 16, kind: "requirement", reason: "does not attest"},
		{name: "one zone of two", class: "secret", action: Store, sites: []Site{gva}, outcome: "deny", line: 16, kind: "requirement",
			reason: "requires replicas in at least 2 zones, and the certificates attest 1"},
		{name: "two sites of one zone", class: "secret", action: Store, sites: []Site{bsl, bsl2}, outcome: "deny", kind: "requirement", reason: "attest 1"},
		{name: "two sites of one zone, written in two cases", class: "secret", action: Store, sites: []Site{bsl, bsl2Upper}, outcome: "deny", kind: "requirement", reason: "attest 1"},
		{name: "replicas in two zones", class: "secret", action: Store, sites: []Site{gva, bsl}, outcome: "allow", line: 16,
			oblig: Obligations{EncryptionAtRest: true, MinReplicaZones: 2}},
		{name: "an exception waives the deny, not the allow's requirement", class: "pii", action: Store, sites: []Site{plainShd}, outcome: "deny", kind: "requirement", line: 32},
		{name: "an exception where nothing allows: the class's requirements hold", class: "pii", action: Store, sites: []Site{plainIad}, outcome: "deny", kind: "requirement", line: 32,
			reason: `allowed by exception "pii-us", which waives where the data may rest, not how: class "pii" allow "store" (test.hcl:32) requires it encrypted`},
		{name: "transit needs no attestation", class: "pii", action: Transit, sites: []Site{plainFra, osl}, outcome: "allow"},

		// modes and defaults
		{name: "audit mode allows a denial", class: "trial", action: Store, sites: []Site{zrh}, outcome: "audit", kind: "default-deny", reason: "audit mode"},
		{name: "audit mode allow", class: "trial", action: Store, sites: []Site{fra}, outcome: "allow"},
		{name: "unknown class", class: "nope", action: Store, sites: []Site{zrh}, outcome: "deny", kind: "default-deny", reason: `class "nope" is not defined`},
		{name: "unknown action", class: "pii", action: "delete", sites: []Site{fra}, outcome: "deny", reason: "not store or transit"},
		{name: "no sites", class: "pii", action: Store, outcome: "deny", reason: "names no site"},
		{name: "no time", class: "pii", action: Store, sites: []Site{fra}, at: time.Time{}.Add(1), outcome: "deny", reason: "no time"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			at := tt.at
			switch {
			case at.IsZero():
				at = nov24
			case at == time.Time{}.Add(1):
				at = time.Time{}
			}
			d := p.Evaluate(Request{Class: tt.class, Action: tt.action, Sites: tt.sites, Time: at})
			reasons := strings.Join(d.Reasons, "\n")
			if got := d.Outcome(); got != tt.outcome {
				t.Fatalf("outcome %s, want %s\n%s", got, tt.outcome, reasons)
			}
			if d.Allowed == d.Denied && !d.Audit {
				t.Fatalf("Allowed=%v Denied=%v", d.Allowed, d.Denied)
			}
			if tt.line != 0 && (d.Rule.Pos.Line != tt.line || d.Rule.Pos.File != "test.hcl") {
				t.Errorf("deciding rule %s, want line %d", d.Rule, tt.line)
			}
			if tt.kind != "" && d.Rule.Kind != tt.kind {
				t.Errorf("deciding rule kind %q, want %q", d.Rule.Kind, tt.kind)
			}
			if !strings.Contains(reasons, tt.reason) || len(d.Reasons) == 0 {
				t.Errorf("reasons do not mention %q:\n%s", tt.reason, reasons)
			}
			if got := ""; d.Exception != nil {
				got = d.Exception.Name
				if got != tt.exception {
					t.Errorf("exception %q, want %q", got, tt.exception)
				}
			} else if tt.exception != "" {
				t.Errorf("no exception used, want %q", tt.exception)
			}
			if tt.outcome != "deny" && d.Obligations != tt.oblig && tt.oblig != (Obligations{}) {
				t.Errorf("obligations %+v, want %+v", d.Obligations, tt.oblig)
			}
			if d.Policy.Version != 3 || d.Policy.SHA256 == "" {
				t.Errorf("decision does not name the policy revision: %+v", d.Policy)
			}
		})
	}
}

// TestEvaluateDeterministic: same input, same output, whatever map order.
func TestEvaluateDeterministic(t *testing.T) {
	p := mustParse(t, testPolicy)
	req := Request{Class: "pii", Action: Transit, Sites: []Site{zrh, fra, iad, osl}, Time: nov24}
	first := p.Evaluate(req)
	for range 50 {
		p2 := mustParse(t, testPolicy)
		d := p2.Evaluate(req)
		if d.Rule != first.Rule || strings.Join(d.Reasons, "|") != strings.Join(first.Reasons, "|") {
			t.Fatalf("decision changed between runs:\n%+v\n%+v", first, d)
		}
	}
}

func TestNextChange(t *testing.T) {
	p := mustParse(t, testPolicy)
	dec1 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	dec31 := time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC) // expires = "2026-12-31" lasts the whole day
	tests := []struct {
		at, want time.Time
	}{
		{nov24, dec1},
		{dec1.Add(-time.Nanosecond), dec1},
		{dec1, dec31}, // an exception expiring at t has already changed decisions at t
		{dec31.Add(-time.Hour), dec31},
		{dec31, time.Time{}},
	}
	for _, tt := range tests {
		got := p.NextChange(tt.at)
		if !got.Equal(tt.want) {
			t.Errorf("NextChange(%s) = %s, want %s", tt.at, got, tt.want)
		}
	}
	// Decisions made before the next change hold until it.
	req := Request{Class: "pii", Action: Store, Sites: []Site{shared}}
	if p.Evaluate(req.at(nov24)).Allowed != p.Evaluate(req.at(dec1.Add(-time.Second))).Allowed {
		t.Error("a decision changed before NextChange")
	}
}

func (r Request) at(t time.Time) Request { r.Time = t; return r }

// TestAdmitMoveShowsTransit: a move that transit allows only by an
// exception, or only in audit mode, has a verdict that says so — its
// audit record must name the exception (ticket, approver) or the mode,
// not only the storage rule.
func TestAdmitMoveShowsTransit(t *testing.T) {
	const src = `policy {
  name    = "t"
  version = 1
}
class "c" {
  allow "store" {
    site = ["*"]
  }
  allow "transit" {
    jurisdiction = ["CH"]
  }
}
exception "us-transit" {
  class    = "c"
  action   = "transit"
  site     = ["aws-us-east-1"]
  category = "waiver"
  reason   = "DR rehearsal"
  approver = "CDO"
  ticket   = "GRC-7"
  expires  = "2026-12-31"
}
`
	p := mustParse(t, src)
	checks, v := p.AdmitMove("c", iad, zrh, nov24)
	if !v.Allowed || v.Exception == nil || v.Exception.Ticket != "GRC-7" || v.Rule != checks[0].Decision.Rule {
		t.Fatalf("a move allowed in transit only by an exception: verdict %+v", v)
	}
	audit := mustParse(t, strings.Replace(strings.Replace(src, "version = 1", "version = 1\n  mode    = \"audit\"", 1), `site     = ["aws-us-east-1"]`, `site     = ["nowhere"]`, 1))
	checks, v = audit.AdmitMove("c", iad, zrh, nov24)
	if !v.Allowed || !v.Audit || !v.Denied {
		t.Fatalf("a move let through only by audit mode: verdict allowed %v, audit %v, denied %v", v.Allowed, v.Audit, v.Denied)
	}
	// What is recorded is the rule that would have refused it.
	if len(checks) != 2 || v.Rule != checks[1].Decision.Rule || v.Rule.Kind == "allow" {
		t.Fatalf("a move let through only by audit mode names rule %+v; want the transit check's, %+v", v.Rule, checks[len(checks)-1].Decision.Rule)
	}
}

// TestAdmitMove: storage at the destination is decided first, then
// transit; the first denial is the verdict and nothing after it is asked;
// when both allow, the storage decision is the verdict (its rule admitted
// the data, its obligations apply at rest).
// TestAdmitPathAuditNamesNoException: a move the policy denies and its
// audit mode lets through names no exception and no obligations, though
// an exception admitted the transit: nothing admitted the move.
func TestAdmitPathAuditNamesNoException(t *testing.T) {
	p, err := Parse("a.hcl", []byte(`policy {
  name    = "a"
  version = 1
}
class "c" {
  mode = "audit"
  allow "store" {
    jurisdiction = ["DE"]
  }
  allow "transit" {
    jurisdiction = ["DE"]
    require {
      max_hops = 2
    }
  }
}
exception "t" {
  class    = "c"
  action   = "transit"
  site     = ["us-1"]
  category = "waiver"
  reason   = "test"
  approver = "CDO"
  ticket   = "T-1"
  expires  = "2027-01-01"
}
`))
	if err != nil {
		t.Fatal(err)
	}
	de := Site{Name: "de-1", Provider: "aws", Region: "eu-central-1", Jurisdiction: "DE"}
	us := Site{Name: "us-1", Provider: "aws", Region: "us-east-1", Jurisdiction: "US"}
	checks, v := p.AdmitPath("c", []Site{de, us}, nov24)
	if !v.Allowed || !v.Denied || !v.Audit || v.Exception != nil || !v.Obligations.IsZero() {
		t.Fatalf("store denied at us-1, transit there by an exception, audit mode: %+v; want let through, with no exception or obligations", v)
	}
	if len(checks) != 2 || checks[1].Decision.Exception == nil {
		t.Fatalf("the transit check should still show the exception it used: %+v", checks)
	}
}

// TestAdmitPathNamesEveryException: a move admitted by one exception for
// where it is stored and another for where it passes names both, so a
// search of the audit records by either ticket finds it.
func TestAdmitPathNamesEveryException(t *testing.T) {
	p, err := Parse("a.hcl", []byte(`policy {
  name    = "a"
  version = 1
}
class "c" {
  allow "store" {
    jurisdiction = ["CH"]
  }
  allow "transit" {
    jurisdiction = ["CH"]
  }
}
exception "us-store" {
  class    = "c"
  action   = "store"
  site     = ["us-1"]
  category = "waiver"
  reason   = "test"
  approver = "CDO"
  ticket   = "GRC-1"
  expires  = "2027-01-01"
}
exception "us-transit" {
  class    = "c"
  action   = "transit"
  site     = ["us-1"]
  category = "waiver"
  reason   = "test"
  approver = "CISO"
  ticket   = "GRC-2"
  expires  = "2027-01-01"
}
`))
	if err != nil {
		t.Fatal(err)
	}
	ch := Site{Name: "ch-1", Provider: "onprem", Region: "zrh", Jurisdiction: "CH"}
	us := Site{Name: "us-1", Provider: "aws", Region: "us-east-1", Jurisdiction: "US"}
	_, v := p.AdmitMove("c", ch, us, nov24)
	var tickets []string
	for _, e := range v.Exceptions {
		tickets = append(tickets, e.Ticket)
	}
	if !v.Allowed || !slices.Equal(tickets, []string{"GRC-1", "GRC-2"}) || v.Exception == nil || v.Exception.Ticket != "GRC-1" {
		t.Fatalf("move by two exceptions: allowed %v, exceptions %v, first %+v; want both, the store's first", v.Allowed, tickets, v.Exception)
	}
}

func TestAdmitMove(t *testing.T) {
	p := mustParse(t, testPolicy)
	tests := []struct {
		name     string
		class    string
		from, to Site
		checks   int // decisions taken
		allowed  bool
		action   Action // of the verdict
		line     int    // of the verdict's rule
	}{
		{name: "both allow", class: "pii", from: osl, to: fra, checks: 2, allowed: true, action: Store, line: 32},
		{name: "storage denied: transit not asked", class: "pii", from: fra, to: zrh, checks: 1, action: Store},
		{name: "transit denied", class: "secret", from: fra, to: zrh, checks: 2, action: Transit},
		{name: "unknown class", class: "nope", from: zrh, to: fra, checks: 1, action: Store},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			checks, v := p.AdmitMove(tc.class, tc.from, tc.to, nov24)
			if len(checks) != tc.checks || v.Allowed != tc.allowed {
				t.Fatalf("%d checks, allowed %v; want %d, %v (%v)", len(checks), v.Allowed, tc.checks, tc.allowed, v.Reasons)
			}
			last := checks[len(checks)-1]
			if last.Request.Class != tc.class {
				t.Fatalf("last request %+v", last.Request)
			}
			if !tc.allowed && last.Request.Action != tc.action {
				t.Errorf("denied by %s; want %s", last.Request.Action, tc.action)
			}
			// The verdict is the denying decision, or storage's (its rule
			// admitted the data) with transit's reasons added.
			if !tc.allowed && (!reflect.DeepEqual(v, last.Decision) || v.Allowed || len(v.Reasons) == 0) {
				t.Errorf("verdict %+v; want %+v", v, last.Decision)
			}
			if tc.allowed && (v.Rule != checks[0].Decision.Rule || len(v.Reasons) != len(checks[0].Decision.Reasons)+len(checks[1].Decision.Reasons)) {
				t.Errorf("verdict %+v; want storage's rule and both checks' reasons", v)
			}
			if tc.allowed && (checks[0].Request.Action != Store || v.Rule.Pos.Line != tc.line) {
				t.Errorf("verdict from %s, rule line %d; want the storage decision, line %d", checks[0].Request.Action, v.Rule.Pos.Line, tc.line)
			}
			if got := checks[len(checks)-1].Request.Sites; checks[len(checks)-1].Request.Action == Transit && (len(got) != 2 || got[0].Name != tc.from.Name || got[1].Name != tc.to.Name) {
				t.Errorf("transit path %v; want %s → %s", got, tc.from.Name, tc.to.Name)
			}
		})
	}
}

// TestExceptionKeepsMaxHops: a path whose sites are admitted in transit
// by an exception alone is still held to the class's transit max_hops:
// an exception waives where data may pass, not how.
func TestExceptionKeepsMaxHops(t *testing.T) {
	p := mustParse(t, `policy {
  name    = "t"
  version = 1
}
class "c" {
  allow "transit" {
    jurisdiction = ["CH"]
    require {
      max_hops = 1
    }
  }
}
exception "us-transit" {
  class    = "c"
  action   = "transit"
  jurisdiction = ["US"]
  category = "waiver"
  reason   = "DR rehearsal"
  approver = "CDO"
  ticket   = "GRC-7"
  expires  = "2026-12-31"
}
`)
	if d := p.Evaluate(Request{Class: "c", Action: Transit, Sites: []Site{iad, iad2}, Time: nov24}); !d.Allowed || d.Exception == nil {
		t.Fatalf("one hop through excepted sites: %+v", d)
	}
	d := p.Evaluate(Request{Class: "c", Action: Transit, Sites: []Site{iad, iad2, iad}, Time: nov24})
	if d.Allowed || d.Rule.Kind != "max-hops" {
		t.Fatalf("two hops through excepted sites, with max_hops = 1: allowed %v by %+v (%v)", d.Allowed, d.Rule, d.Reasons)
	}
}

// TestStrictestRequirementHolds: where two allows of a class admit the
// same sites, the stricter requirement of the two holds (the fewest
// max_hops, the most min_replica_zones): an allow written broadly for
// other sites must not loosen what a narrower one requires where both
// match.
func TestStrictestRequirementHolds(t *testing.T) {
	p := mustParse(t, header+`class "c" {
  allow "transit" {
    jurisdiction = ["CH"]
    require {
      max_hops = 1
    }
  }
  allow "transit" {
    site = ["*"]
    require {
      max_hops = 3
    }
  }
  allow "store" {
    jurisdiction = ["CH"]
    require {
      min_replica_zones = 2
    }
  }
  allow "store" {
    site = ["*"]
    require {
      min_replica_zones = 1
    }
  }
}
`)
	d := p.Evaluate(Request{Class: "c", Action: Transit, Sites: []Site{zrh, gva, bsl}, Time: nov24})
	if d.Allowed || d.Rule.Kind != "max-hops" || d.Rule.Pos.Line != 6 {
		t.Errorf("2 hops where one admitting allow permits 1 and another 3: %s by %s (%v); want denied by the allow at line 6", d.Outcome(), d.Rule, d.Reasons)
	}
	d = p.Evaluate(Request{Class: "c", Action: Store, Sites: []Site{gva}, Time: nov24})
	if d.Allowed || d.Rule.Kind != "requirement" || d.Rule.Pos.Line != 18 {
		t.Errorf("a store in 1 zone where one admitting allow requires 2 and another 1: %s by %s (%v); want denied by the allow at line 18", d.Outcome(), d.Rule, d.Reasons)
	}
}

// TestAuditModeJudgesOnlyRules: audit mode, of the policy or of a class,
// lets through what the class's rules would refuse, and says which is in
// audit mode. A class that says mode = "enforce" is enforced under a
// policy in audit mode: its owners asked for it, and a policy rolled out
// in audit mode must not quietly stop enforcing it. A request it cannot
// judge (a class the policy does not define, a misspelt one; no site; no
// time) is refused in every mode: a policy rolled out in audit mode must
// not let any class through.
func TestAuditModeJudgesOnlyRules(t *testing.T) {
	p := mustParse(t, strings.Replace(strings.Replace(testPolicy, "version = 3", "version = 3\n  mode    = \"audit\"", 1),
		`class "secret" {`, `class "secret" {`+"\n  mode = \"enforce\"", 1))
	for _, tc := range []struct {
		name    string
		req     Request
		outcome string
		reason  string
	}{
		{"a class's denial", Request{Class: "pii", Action: Store, Sites: []Site{zrh}, Time: nov24}, "audit", `allowed anyway: policy test is in audit mode`},
		{"a class in audit mode of its own", Request{Class: "trial", Action: Store, Sites: []Site{zrh}, Time: nov24}, "audit", `allowed anyway: class "trial" is in audit mode`},
		{"a class in enforce mode of its own", Request{Class: "secret", Action: Store, Sites: []Site{gcpZrh}, Time: nov24}, "deny", "denied by default"},
		{"an undefined class", Request{Class: "piii", Action: Store, Sites: []Site{fra}, Time: nov24}, "deny", `class "piii" is not defined`},
		{"an unknown action", Request{Class: "pii", Action: "delete", Sites: []Site{fra}, Time: nov24}, "deny", "not store or transit"},
		{"no site", Request{Class: "pii", Action: Store, Time: nov24}, "deny", "names no site"},
		{"no time", Request{Class: "pii", Action: Store, Sites: []Site{fra}}, "deny", "no time"},
	} {
		d := p.Evaluate(tc.req)
		if got, reasons := d.Outcome(), strings.Join(d.Reasons, "\n"); got != tc.outcome || !strings.Contains(reasons, tc.reason) {
			t.Errorf("%s: %s, want %s with %q\n%s", tc.name, got, tc.outcome, tc.reason, reasons)
		}
	}
	if _, v := p.AdmitMove("piii", fra, fra, nov24); v.Allowed {
		t.Errorf("a move of an undefined class under an audit-mode policy: %+v", v)
	}
}
