package mesh

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/migrate"
	"github.com/skybridge-mesh/skybridge/policy"
)

// residencyPolicy lets pii-eu rest in Switzerland, and at a site in
// Germany by an exception until expires.
func residencyPolicy(t *testing.T, version int, expires time.Time, mode string) *policy.Policy {
	t.Helper()
	src := `policy {
  name    = "t"
  version = ` + strconv.Itoa(version) + `
  mode    = "` + mode + `"
}
class "pii-eu" {
  allow "store" {
    jurisdiction = ["CH"]
    reason       = "Swiss racks"
  }
}
class "risk-batch" {
  allow "store" {
    jurisdiction = ["CH", "DE"]
  }
}
exception "fra-migration-window" {
  class    = "pii-eu"
  action   = "store"
  site     = ["fra-dc"]
  category = "mitigated"
  reason   = "data centre move"
  approver = "CDO"
  ticket   = "GRC-7"
  expires  = "` + expires.UTC().Format(time.RFC3339) + `"
}
`
	p, err := policy.Parse("t.hcl", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestJudgeStored: stored images are judged under the policy in force;
// leaving the policy and coming back into it are logged and audited once
// each, for the image as stored (a new version is judged anew), and the
// loop is told when the next verdict can change by itself.
func TestJudgeStored(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	id, err := ca.IssueIdentity(certs.Attributes{Node: "gw-fra", Site: "fra-dc", Region: "eu-central-1", Provider: "onprem", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr("100.64.0.9")}, 7*24*time.Hour, time.Now()) // the test's clock runs two days on
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Truncate(time.Second)
	expires := now.Add(time.Hour)
	var logs bytes.Buffer
	g := &Gateway{now: func() time.Time { return now }, log: slog.New(slog.NewTextHandler(&logs, nil))}
	g.id.Store(id)
	g.mig = &migrations{audit: audit.Open(filepath.Join(dir, "audit.log")), atRest: atRestState{kick: make(chan struct{}, 1)}}
	adopt := func(p *policy.Policy) { g.policy.Store(&adoptedPolicy{p: p}) }
	img := func(name, class string, root byte) migrate.ImageRecord {
		return migrate.ImageRecord{Name: name, Class: class, Format: migrate.FormatRaw, Root: migrate.Hash{root}}
	}
	imgs := []migrate.ImageRecord{img("crm", "pii-eu", 1), img("risk", "risk-batch", 2)}
	seen := map[string]atRestSeen{}
	records := func() []audit.Record {
		b, err := os.ReadFile(filepath.Join(dir, "audit.log"))
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		tb, _ := ca.TrustBundle()
		if _, err := audit.Verify(bytes.NewReader(b), tb); err != nil {
			t.Fatal(err)
		}
		var out []audit.Record
		for line := range bytes.Lines(b) {
			var r audit.Record
			if err := json.Unmarshal(line, &r); err != nil {
				t.Fatal(err)
			}
			out = append(out, r)
		}
		return out
	}
	step := func(what string, wantOutside int, wantActions ...string) time.Time {
		t.Helper()
		before := len(records())
		next := g.judgeStored(imgs, seen)
		var got []string
		for _, r := range records()[before:] {
			if r.Event != "image" {
				t.Fatalf("%s: an audit record of event %q", what, r.Event)
			}
			got = append(got, r.Fields["action"].(string)+" "+r.Fields["name"].(string))
		}
		if strings.Join(got, ",") != strings.Join(wantActions, ",") {
			t.Fatalf("%s: audited %q, want %q", what, got, wantActions)
		}
		stored, outside := g.mig.atRest.counts()
		if stored["pii-eu"] != 1 || stored["risk-batch"] != 1 || outside["pii-eu"]+outside["risk-batch"] != wantOutside {
			t.Fatalf("%s: counts %v, outside %v; want %d outside", what, stored, outside, wantOutside)
		}
		return next
	}

	// No policy: nothing judged.
	if next := step("no policy", 0); !next.IsZero() {
		t.Fatalf("no policy: next change %v", next)
	}
	// The exception lets crm rest here, and its end is the next change.
	adopt(residencyPolicy(t, 1, expires, "enforce"))
	if next := step("under the exception", 0); !next.Equal(expires) {
		t.Fatalf("next change %v, want the exception's end %v", next, expires)
	}
	l := g.judged(imgs)
	if l[0].AtRest == nil || !l[0].AtRest.Allowed || l[0].AtRest.Exception != "fra-migration-window" || !l[0].AtRest.Until.Equal(expires) {
		t.Fatalf("listing under the exception: %+v", l[0].AtRest)
	}
	// It expires: crm is outside the policy, said once.
	now = expires.Add(time.Second)
	step("the exception expired", 1, "out-of-policy crm")
	step("judged again", 1)
	if !strings.Contains(logs.String(), "outside the residency policy") {
		t.Fatalf("not logged:\n%s", logs.String())
	}
	// A new version stored under the same name is judged anew.
	imgs[0].Root = migrate.Hash{3}
	step("a new version", 1, "out-of-policy crm")
	// A policy that extends the exception brings it back.
	adopt(residencyPolicy(t, 2, now.Add(24*time.Hour), "enforce"))
	step("exception extended", 0, "in-policy crm")
	// Audit mode lets everything through but the breach is still one.
	now = now.Add(48 * time.Hour)
	adopt(residencyPolicy(t, 3, now.Add(-time.Hour), "audit"))
	step("audit mode", 1, "out-of-policy crm")
	recs := records()
	last := recs[len(recs)-1].Fields
	if last["class"] != "pii-eu" || last["site"] != "fra-dc" || last["jurisdiction"] != "DE" || last["root"] != imgs[0].Root.String() || !strings.HasPrefix(last["policy"].(string), "v3-") {
		t.Fatalf("audit record: %v", last)
	}
	// Removed: forgotten, and nothing said of it.
	imgs = imgs[1:]
	g.judgeStored(imgs, seen)
	if _, ok := seen["crm"]; ok {
		t.Fatal("a removed image is still remembered")
	}
}

// TestJudgeStoredRecordRefused: an image leaving the policy while the
// audit log cannot take a record (a damaged end, a full disk) has its
// record written once the log takes it, not lost while the gateway runs;
// the gateway's log says the verdict and the refusal once, not at every
// pass the log still refuses.
func TestJudgeStoredRecordRefused(t *testing.T) {
	var logs bytes.Buffer
	now := time.Now().Truncate(time.Second)
	expires := now.Add(time.Hour)
	g, ca, logPath := atRestGateway(t, &now, expires, &logs)
	imgs := []migrate.ImageRecord{{Name: "crm", Class: "pii-eu", Format: migrate.FormatRaw, Root: migrate.Hash{1}}}
	seen := map[string]atRestSeen{}
	g.judgeStored(imgs, seen) // allowed by the exception: nothing to record

	// The exception runs out while the log's last line is damaged.
	if err := os.WriteFile(logPath, []byte("not a record\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	now = expires.Add(time.Second)
	for range 3 {
		g.judgeStored(imgs, seen)
		now = now.Add(time.Minute)
	}
	if n := strings.Count(logs.String(), "verdict is not recorded"); n != 1 {
		t.Fatalf("the refusal logged %d times over three passes; want once:\n%s", n, logs.String())
	}
	os.Remove(logPath) // repaired
	for range 3 {
		g.judgeStored(imgs, seen)
		now = now.Add(time.Minute)
	}
	got := lateActions(t, logPath, ca)
	if len(got) != 1 || got[0] != "out-of-policy" {
		t.Fatalf("records %q; want the one out-of-policy record, once the log took it", got)
	}
	if n := strings.Count(logs.String(), "outside the residency policy"); n != 1 {
		t.Fatalf("the verdict logged %d times; want once:\n%s", n, logs.String())
	}
}

// TestJudgeStoredRecordRefusedBackInPolicy: an image that leaves the
// policy while the audit log refuses its record, and comes back before
// the log takes one, has both records written once it does, in order:
// the out-of-policy record owed, marked recovered, then the in-policy one.
func TestJudgeStoredRecordRefusedBackInPolicy(t *testing.T) {
	now := time.Now().Truncate(time.Second)
	expires := now.Add(time.Hour)
	g, ca, logPath := atRestGateway(t, &now, expires, io.Discard)
	imgs := []migrate.ImageRecord{{Name: "crm", Class: "pii-eu", Format: migrate.FormatRaw, Root: migrate.Hash{1}}}
	seen := map[string]atRestSeen{}
	g.judgeStored(imgs, seen)

	// Out of the policy, then back in it, while the log refuses.
	if err := os.WriteFile(logPath, []byte("not a record\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	now = expires.Add(time.Second)
	g.judgeStored(imgs, seen)
	now = now.Add(time.Minute)
	g.policy.Store(&adoptedPolicy{p: residencyPolicy(t, 2, now.Add(24*time.Hour), "enforce")})
	g.judgeStored(imgs, seen)
	os.Remove(logPath) // repaired
	for range 2 {
		now = now.Add(time.Minute)
		g.judgeStored(imgs, seen)
	}
	got := lateActions(t, logPath, ca)
	if len(got) != 2 || got[0] != "out-of-policy" || got[1] != "in-policy" {
		t.Fatalf("records %q; want out-of-policy, then in-policy", got)
	}
}

// TestAtRestMetrics: the stored images and those outside the policy, by
// class, as the residency loop last counted them.
func TestAtRestMetrics(t *testing.T) {
	g := &Gateway{mig: &migrations{atRest: atRestState{kick: make(chan struct{}, 1)}}}
	reg := prometheus.NewRegistry()
	reg.MustRegister(atRestCollector{g: g})
	if fams, err := reg.Gather(); err != nil || len(fams) != 0 {
		t.Fatalf("before the first judgement: %v, %v", fams, err)
	}
	g.mig.atRest.publish(map[string]int{"pii-eu": 3, "risk-batch": 1}, map[string]int{"pii-eu": 2})
	want := `
# HELP skybridge_images_outside_policy Images this gateway stores that the residency policy in force no longer lets rest at its site (in audit mode too), by data class.
# TYPE skybridge_images_outside_policy gauge
skybridge_images_outside_policy{class="pii-eu"} 2
skybridge_images_outside_policy{class="risk-batch"} 0
# HELP skybridge_images_stored Images this gateway stores, by data class.
# TYPE skybridge_images_stored gauge
skybridge_images_stored{class="pii-eu"} 3
skybridge_images_stored{class="risk-batch"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Fatal(err)
	}
	// Without migrations (no store), nothing.
	g.mig = nil
	if fams, err := reg.Gather(); err != nil || len(fams) != 0 {
		t.Fatalf("without a store: %v, %v", fams, err)
	}
}

// TestRecentSendsCached: the dashboard's list of sends is read from the
// journal again only when a migration has begun or ended since.
func TestRecentSendsCached(t *testing.T) {
	j, err := migrate.OpenJournal(filepath.Join(t.TempDir(), "migrate.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	m := &migrations{journal: j, running: map[string]*runningMigration{}}
	if _, err := m.begin(migrate.SendRecord{ID: "a1", Name: "vm", To: "gw-fra"}, func() {}); err != nil {
		t.Fatal(err)
	}
	first, err := m.recentSends()
	if err != nil || len(first) != 1 || first[0].ID != "a1" {
		t.Fatalf("after a begin: %+v, %v", first, err)
	}
	again, _ := m.recentSends()
	if &again[0] != &first[0] {
		t.Fatal("read again with nothing begun or ended")
	}
	if _, err := m.begin(migrate.SendRecord{ID: "b2", Name: "vm2", To: "gw-fra"}, func() {}); err != nil {
		t.Fatal(err)
	}
	after, _ := m.recentSends()
	if len(after) != 2 {
		t.Fatalf("after a second begin: %+v", after)
	}
	m.finished("b2") // ended before it wrote a record
	if ended, _ := m.recentSends(); len(ended) != 1 {
		t.Fatalf("after an end: %+v", ended)
	}
}

// lateActions verifies the audit log at logPath and returns the actions
// of its records, each of which must say it was written late.
func lateActions(t *testing.T, logPath string, ca *certs.CA) []string {
	t.Helper()
	b, _ := os.ReadFile(logPath)
	tb, _ := ca.TrustBundle()
	if _, err := audit.Verify(bytes.NewReader(b), tb); err != nil {
		t.Fatal(err)
	}
	var got []string
	for line := range bytes.Lines(b) {
		var r audit.Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatal(err)
		}
		got = append(got, r.Fields["action"].(string))
		if r.Fields["recovered"] == nil {
			t.Errorf("a record written late does not say so: %v", r.Fields)
		}
	}
	return got
}

// atRestGateway is a gateway of site fra-dc for the residency loop alone,
// on the clock *now, logging to w, with its audit log (at the path
// returned) and a policy whose exception for pii-eu at fra-dc runs out
// at expires.
func atRestGateway(t *testing.T, now *time.Time, expires time.Time, w io.Writer) (*Gateway, *certs.CA, string) {
	t.Helper()
	dir := t.TempDir()
	ca := meshCA(t, dir)
	id, err := ca.IssueIdentity(certs.Attributes{Node: "gw-fra", Site: "fra-dc", Region: "eu-central-1", Provider: "onprem", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr("100.64.0.9")}, 7*24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	g := &Gateway{now: func() time.Time { return *now }, log: slog.New(slog.NewTextHandler(w, nil))}
	g.id.Store(id)
	logPath := filepath.Join(dir, "audit.log")
	g.mig = &migrations{audit: audit.Open(logPath), atRest: atRestState{kick: make(chan struct{}, 1)}}
	g.policy.Store(&adoptedPolicy{p: residencyPolicy(t, 1, expires, "enforce")})
	return g, ca, logPath
}
