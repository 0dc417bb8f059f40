package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/mesh"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// fakeGateway: a control socket answering as gateway node/site with policy pol;
// GET /v1/migrations/ID answers with known[ID] (404 if absent); POSTs are
// recorded and answered "done".
func fakeGateway(t *testing.T, node, site, pol string, known map[string]*migrate.SendRecord) (string, func() []string) {
	var mu sync.Mutex
	var posts []string
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/v1/migrations":
			var l mesh.MigrationList
			for _, rec := range known {
				l.Sending = append(l.Sending, *rec)
			}
			json.NewEncoder(w).Encode(l)
		case r.Method == http.MethodGet && r.URL.Path == "/v1/status":
			json.NewEncoder(w).Encode(mesh.Status{Node: node, Site: site, Policy: pol})
		case r.Method == http.MethodGet:
			id := strings.TrimPrefix(r.URL.Path, "/v1/migrations/")
			if rec := known[id]; rec != nil {
				json.NewEncoder(w).Encode(mesh.MigrationStatus{Record: rec})
				return
			}
			http.Error(w, "no migration "+id+" on this gateway", http.StatusNotFound)
		case r.Method == http.MethodPost:
			b, _ := io.ReadAll(r.Body)
			mu.Lock()
			posts = append(posts, string(b))
			mu.Unlock()
			var req mesh.MigrationRequest
			json.Unmarshal(b, &req)
			id := req.ID
			if id == "" {
				id = "bbbbbbbbbbbbbbbb"
			}
			if req.Image == "/img/other.raw" { // refused at once
				json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: "cccccccccccccccc", Error: "open image: no such file"})
				return
			}
			if req.Image == "/img/denied.raw" { // refused by the policy
				json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: id, Error: "denied", Record: &migrate.SendRecord{ID: id, State: migrate.StateDenied, Error: "denied"}})
				return
			}
			json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: id, Record: &migrate.SendRecord{ID: id, State: migrate.StateDone}})
		}
	})
	return sock, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), posts...)
	}
}

func writePlan(t *testing.T, p migrate.Plan, state map[string]*vmState) string {
	plan := filepath.Join(t.TempDir(), "plan.json")
	b, _ := json.Marshal(p)
	os.WriteFile(plan, b, 0o644)
	if state != nil {
		sum := sha256.Sum256(b)
		sb, _ := json.Marshal(applyState{Plan: hex.EncodeToString(sum[:]), VMs: state})
		os.WriteFile(plan+".state", sb, 0o644)
	}
	return plan
}

var auditPlan = migrate.Plan{Created: time.Now().Add(-time.Hour), From: "gw-zrh", FromSite: "onprem-zrh", Policy: "bank v1 (sha256:aaaaaaaaaaaa)",
	Placements: []migrate.Placement{{VM: migrate.VM{Name: "vm1", Image: "/img/vm1.raw", Class: "pii-eu"}, To: "gw-fra", Site: "aws-eu-central-1"}}}

// TestApplyResumesAtTheNewPace: a re-run with a lower --bwlimit (the
// first saturated the link) resumes the interrupted VM at it; the flag
// was dropped for resumes.
func TestApplyResumesAtTheNewPace(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", auditPlan.Policy,
		map[string]*migrate.SendRecord{id: {ID: id, State: migrate.StateFailed, BWLimit: 200e6}})
	plan := writePlan(t, auditPlan, map[string]*vmState{"vm1": {ID: id, To: "gw-fra", State: migrate.StateFailed, Attempts: 1}})
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--bwlimit", "50MB/s", "--streams", "1", "--socket", sock); code != 0 {
		t.Fatalf("exit %d %s", code, errs)
	}
	p := posts()
	if len(p) != 1 || !strings.Contains(p[0], `"bwlimit":50000000`) || !strings.Contains(p[0], `"streams":1`) {
		t.Errorf("resume (POST .../resume) sent body %q; want --bwlimit 50MB/s and --streams 1 in it", p)
	}
}

// TestApplyOnSiblingAfterFailover: through the planning gateway's sibling
// (which apply allows after a failover), a VM interrupted on the first
// gateway is sent anew; it was reported forgotten and never sent.
func TestApplyOnSiblingAfterFailover(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	sock, posts := fakeGateway(t, "gw-zrh-2", "onprem-zrh", auditPlan.Policy, nil)
	plan := writePlan(t, auditPlan, map[string]*vmState{"vm1": {ID: id, From: "gw-zrh", To: "gw-fra", State: migrate.StateRunning, Attempts: 1}})
	out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock)
	if code != 0 || len(posts()) != 1 {
		t.Errorf("exit %d, %d sends; out %s err %s; want vm1 sent from gw-zrh-2", code, len(posts()), out, errs)
	}
}

// TestApplyFollowsSendOfASiblingBehind: an apply cut short after it
// started a VM's send, before it saved its ID, finds the send again at the
// next run, also when the gateway applying it (a sibling, after a
// failover) runs a minute behind the clock that dated the plan; it was
// taken for an older send, and the VM sent again.
func TestApplyFollowsSendOfASiblingBehind(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	pl := auditPlan.Placements[0]
	p := auditPlan
	p.Created = time.Now()
	sock, posts := fakeGateway(t, "gw-zrh-2", "onprem-zrh", auditPlan.Policy, map[string]*migrate.SendRecord{
		id: {ID: id, Image: pl.Image, Name: pl.Name, To: pl.To, State: migrate.StateDone, Started: p.Created.Add(-time.Minute)}})
	plan := writePlan(t, p, map[string]*vmState{"vm1": {To: pl.To}})
	out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock)
	if code != 0 || len(posts()) != 0 {
		t.Errorf("exit %d, sends %q; out %s err %s; want the send started before the cut followed, nothing sent again", code, posts(), out, errs)
	}
}

// TestApplyTakesNoSendBeforeThePlan: through the gateway that made the
// plan (one clock), a send of the VM that began before the plan (a trial
// a few minutes earlier) is not the plan's: the VM is sent. The clock
// allowance for a sibling took it for the plan's, and sent nothing.
func TestApplyTakesNoSendBeforeThePlan(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	pl := auditPlan.Placements[0]
	p := auditPlan
	p.Created = time.Now()
	sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", auditPlan.Policy, map[string]*migrate.SendRecord{
		id: {ID: id, Image: pl.Image, Name: pl.Name, To: pl.To, State: migrate.StateDone, Started: p.Created.Add(-3 * time.Minute)}})
	plan := writePlan(t, p, nil)
	out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock)
	if code != 0 || len(posts()) != 1 {
		t.Errorf("exit %d, sends %q; out %s err %s; want vm1 sent (the earlier send is not the plan's)", code, posts(), out, errs)
	}
}

// TestApplyUnderAnotherPolicy: a plan made under policy v1 is not applied
// under v2 unless asked to: its ranking of destinations was v1's.
func TestApplyUnderAnotherPolicy(t *testing.T) {
	sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", "bank v2 (sha256:bbbbbbbbbbbb)", nil)
	plan := writePlan(t, auditPlan, nil)
	out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock)
	if len(posts()) != 0 || code == 0 || !strings.Contains(errs, "not started yet (vm1)") {
		t.Errorf("exit %d, %d sends, %s %s; want it refused (plan made under v1, gateway enforces v2)", code, len(posts()), out, errs)
	}
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--policy-changed-ok", "--socket", sock); code != 0 || len(posts()) != 1 {
		t.Errorf("with --policy-changed-ok: exit %d, %d sends, %s", code, len(posts()), errs)
	}
}

// TestApplyDeniedUnderAnotherPolicy: a VM denied under the plan's policy
// is sent anew, so under another policy it is held to the plan's ranking
// as one not started is, whether or not the gateway still lists the
// denied send (it did, and the VM went out on the old ranking).
func TestApplyDeniedUnderAnotherPolicy(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	pl := auditPlan.Placements[0]
	for _, known := range []map[string]*migrate.SendRecord{
		{id: {ID: id, Image: pl.Image, Name: pl.Name, To: pl.To, State: migrate.StateDenied, Started: time.Now()}},
		nil, // forgotten by the gateway
	} {
		sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", "bank v2 (sha256:bbbbbbbbbbbb)", known)
		plan := writePlan(t, auditPlan, map[string]*vmState{"vm1": {ID: id, From: "gw-zrh", To: "gw-fra", State: migrate.StateDenied, Attempts: 1}})
		out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock)
		if len(posts()) != 0 || code == 0 || !strings.Contains(errs, "not started yet (vm1)") {
			t.Errorf("listed %v: exit %d, %d sends, out %q err %q; want it refused without --policy-changed-ok", known != nil, code, len(posts()), out, errs)
		}
	}
}

// TestApplyDeniedSaysSo: a VM denied again is not one a re-run resumes,
// and the command says so rather than to run it again.
func TestApplyDeniedSaysSo(t *testing.T) {
	sock, _ := fakeGateway(t, "gw-zrh", "onprem-zrh", auditPlan.Policy, nil)
	p := auditPlan
	p.Placements = []migrate.Placement{{VM: migrate.VM{Name: "vm1", Image: "/img/denied.raw", Class: "pii-eu"}, To: "gw-fra", Site: "aws-eu-central-1"}}
	_, errs, code := runCLI(t, "migrate", "apply", writePlan(t, p, nil), "--socket", sock)
	if code != 1 || !strings.Contains(errs, "denied by the residency policy") || strings.Contains(errs, "to resume them") {
		t.Errorf("exit %d, %s; want exit 1 saying the VM was denied, not to run the command again to resume it", code, errs)
	}
}

// TestApplyRefusesANameTwice: two placements of one name (plans merged
// by hand) shared one state entry, and one's failure read as done.
func TestApplyRefusesANameTwice(t *testing.T) {
	sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", auditPlan.Policy, nil)
	p := auditPlan
	p.Placements = append([]migrate.Placement{}, p.Placements[0], p.Placements[0])
	p.Placements[1].Image = "/img/other.raw"
	plan := writePlan(t, p, nil)
	out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock)
	if code == 0 || len(posts()) != 0 || !strings.Contains(errs, `places VM "vm1" twice`) {
		t.Errorf("a plan listing vm1 twice: exit %d, %d sends\n%s%s", code, len(posts()), out, errs)
	}
}

// TestApplyFollowsAMigrationWhoseStreamBroke: the progress stream of a
// migration breaking (the control socket's connection cut) is not the
// migration failing: apply follows it on the gateway to its end, holding
// its place in --parallel, rather than record it failed and start the
// next VM beside it.
func TestApplyFollowsAMigrationWhoseStreamBroke(t *testing.T) {
	const id = "dddddddddddddddd"
	var polls atomic.Int32
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/v1/migrations":
			json.NewEncoder(w).Encode(mesh.MigrationList{})
		case r.Method == http.MethodGet && r.URL.Path == "/v1/status":
			json.NewEncoder(w).Encode(mesh.Status{Node: "gw-zrh", Site: "onprem-zrh", Policy: auditPlan.Policy})
		case r.Method == http.MethodGet:
			// Running for two looks, then done.
			if polls.Add(1) <= 2 {
				json.NewEncoder(w).Encode(mesh.MigrationStatus{Record: &migrate.SendRecord{ID: id, State: migrate.StateRunning}, Progress: &migrate.Progress{ID: id}})
				return
			}
			json.NewEncoder(w).Encode(mesh.MigrationStatus{Record: &migrate.SendRecord{ID: id, State: migrate.StateDone}})
		case r.Method == http.MethodPost:
			// The first event, then the connection cut mid-stream.
			json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: id, Progress: &migrate.Progress{ID: id}})
			w.(http.Flusher).Flush()
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
		}
	})
	plan := writePlan(t, auditPlan, nil)
	out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock)
	if code != 0 || polls.Load() < 3 || !strings.Contains(out, "1 of 1 VMs migrated") {
		t.Fatalf("exit %d after %d looks; out %s err %s; want the migration followed to its end", code, polls.Load(), out, errs)
	}
}

// TestApplyResumeKeepsItsPaceUnlessTold: a run again without --streams
// or --bwlimit resumes a migration at its own pace; the default of
// --streams was sent as if asked.
func TestApplyResumeKeepsItsPaceUnlessTold(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", auditPlan.Policy,
		map[string]*migrate.SendRecord{id: {ID: id, State: migrate.StateFailed, Streams: 8, BWLimit: 200e6}})
	plan := writePlan(t, auditPlan, map[string]*vmState{"vm1": {ID: id, From: "gw-zrh", To: "gw-fra", State: migrate.StateFailed, Attempts: 1}})
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock); code != 0 {
		t.Fatalf("exit %d %s", code, errs)
	}
	if p := posts(); len(p) != 1 || strings.Contains(p[0], `"streams"`) || strings.Contains(p[0], `"bwlimit"`) {
		t.Errorf("resume body %q; want no pace asked", p)
	}
	// --bwlimit none lifts the cap it had.
	os.Remove(plan + ".state")
	plan = writePlan(t, auditPlan, map[string]*vmState{"vm1": {ID: id, From: "gw-zrh", To: "gw-fra", State: migrate.StateFailed, Attempts: 1}})
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--bwlimit", "none", "--socket", sock); code != 0 {
		t.Fatalf("apply --bwlimit none: exit %d %s", code, errs)
	}
	if p := posts(); len(p) != 2 || !strings.Contains(p[1], `"bwlimit":-1`) {
		t.Errorf("resume body with --bwlimit none: %q; want the cap lifted (-1)", p)
	}
}

// TestApplyLegacyStateOnSibling: a state file of an earlier release does
// not say which gateway ran a migration; through a sibling of the
// plan's gateway, which does not know it, the VM is sent anew rather
// than reported forgotten at every run.
func TestApplyLegacyStateOnSibling(t *testing.T) {
	sock, posts := fakeGateway(t, "gw-zrh-2", "onprem-zrh", auditPlan.Policy, nil)
	plan := writePlan(t, auditPlan, map[string]*vmState{"vm1": {ID: "aaaaaaaaaaaaaaaa", To: "gw-fra", State: migrate.StateRunning, Attempts: 1}})
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock); code != 0 || len(posts()) != 1 {
		t.Errorf("exit %d, %d sends, %s; want vm1 sent from the sibling", code, len(posts()), errs)
	}
}

// TestApplyUnderAnotherPolicyFollowsWhatRuns: a plan whose VMs have all
// started goes on under a new policy (the gateway judges each resume);
// only VMs not started yet are held to the plan's policy.
func TestApplyUnderAnotherPolicyFollowsWhatRuns(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", "bank v2 (sha256:bbbbbbbbbbbb)",
		map[string]*migrate.SendRecord{id: {ID: id, State: migrate.StateFailed}})
	plan := writePlan(t, auditPlan, map[string]*vmState{"vm1": {ID: id, From: "gw-zrh", To: "gw-fra", State: migrate.StateFailed, Attempts: 1}})
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock); code != 0 || len(posts()) != 1 {
		t.Errorf("exit %d, %d sends, %s; want the started VM resumed", code, len(posts()), errs)
	}
}

// controlSocket serves h as a gateway's control socket until the test
// ends, and returns its path: a stand-in for the gateway when only the
// CLI's logic is under test.
func controlSocket(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "control.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// TestMigrateCancelSaysHowItEnded: `migrate cancel` reports the state the
// migration ended in, not "cancelled" whatever it was: one refused at its
// commit while the cancel waited was removed at the destination, and is
// no migration to resume.
func TestMigrateCancelSaysHowItEnded(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	for _, c := range []struct {
		state, want, not string
	}{
		{migrate.StateCancelled, "cancelled; `skybridge migrate resume " + id + "` continues it", "ended"},
		{migrate.StateDone, "already committed", "resume"},
		{migrate.StateDenied, "ended denied before the cancel took: refused at the commit", "resume"},
	} {
		sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost {
				json.NewEncoder(w).Encode(map[string]string{})
				return
			}
			json.NewEncoder(w).Encode(mesh.MigrationStatus{Record: &migrate.SendRecord{ID: id, To: "gw-fra", State: c.state, Error: "refused at the commit"}})
		})
		out, errs, code := runCLI(t, "migrate", "cancel", id, "--socket", sock)
		if code != 0 || !strings.Contains(out, c.want) || strings.Contains(out, c.not) {
			t.Errorf("%s: exit %d, %q %s; want %q", c.state, code, out, errs, c.want)
		}
	}
}

// TestMigrateCancelNotFound: a migration the gateway has no record of is
// said to be not found, as migrate status says, not "not running".
func TestMigrateCancelNotFound(t *testing.T) {
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			http.Error(w, "migration nosuchid is not running", http.StatusInternalServerError)
			return
		}
		http.Error(w, "migration nosuchid: not found", http.StatusNotFound)
	})
	_, errs, code := runCLI(t, "migrate", "cancel", "nosuchid", "--socket", sock)
	if code != 1 || !strings.Contains(errs, "not found") || strings.Contains(errs, "not running") {
		t.Errorf("cancel of a migration not known: exit %d, %q; want it not found", code, errs)
	}
	_, status, _ := runCLI(t, "migrate", "status", "nosuchid", "--socket", sock)
	if errs != status {
		t.Errorf("cancel says %q, status %q", errs, status)
	}
}

// TestMigrateRunSaysItsID: the migration runs in the gateway, and goes on
// if the command is stopped: its ID is said at once, so that it can be
// found and cancelled.
func TestMigrateRunSaysItsID(t *testing.T) {
	const id = "bbbbbbbbbbbbbbbb"
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		enc := json.NewEncoder(w)
		enc.Encode(mesh.MigrationEvent{ID: id, Progress: &migrate.Progress{ID: id, Phase: "transfer"}})
		enc.Encode(mesh.MigrationEvent{ID: id, Record: &migrate.SendRecord{ID: id, To: "gw-fra", State: migrate.StateDone}})
	})
	img := filepath.Join(t.TempDir(), "vm.raw")
	if err := os.WriteFile(img, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	_, errs, code := runCLI(t, "migrate", "run", img, "--to", "aws-eu-central-1", "--class", "pii-eu", "--socket", sock)
	if code != 0 || !strings.Contains(errs, "migration "+id+" (it runs in the gateway") || strings.Count(errs, id+" (it runs") != 1 {
		t.Errorf("exit %d, stderr %q: want the ID said once", code, errs)
	}
}

// TestResumeAtANewPace: `migrate resume` sends the pace it is given, and
// none it is not (the gateway then keeps the migration's own). Without
// the flags a migration cancelled for a cap that proved wrong resumed at
// that cap.
func TestResumeAtANewPace(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	known := map[string]*migrate.SendRecord{id: {ID: id, State: migrate.StateCancelled, BWLimit: 200e6, Streams: 4}}
	for _, c := range []struct {
		args      []string
		want, not []string
	}{
		{[]string{"--bwlimit", "50MB/s", "--streams", "1"}, []string{`"bwlimit":50000000`, `"streams":1`}, nil},
		{[]string{"--bwlimit", "none"}, []string{`"bwlimit":-1`}, []string{`"streams"`}},
		{nil, nil, []string{`"bwlimit"`, `"streams"`}},
	} {
		sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", auditPlan.Policy, known)
		if _, errs, code := runCLI(t, append([]string{"migrate", "resume", id, "--socket", sock}, c.args...)...); code != 0 {
			t.Fatalf("%q: exit %d %s", c.args, code, errs)
		}
		p := posts()
		if len(p) != 1 {
			t.Fatalf("%q: %d requests, want 1", c.args, len(p))
		}
		for _, w := range c.want {
			if !strings.Contains(p[0], w) {
				t.Errorf("%q: the resume request %s lacks %s", c.args, p[0], w)
			}
		}
		for _, n := range c.not {
			if strings.Contains(p[0], n) {
				t.Errorf("%q: the resume request %s sets %s, which the gateway then takes over the migration's own", c.args, p[0], n)
			}
		}
	}
	for _, bad := range [][]string{{"--streams", "0"}, {"--bwlimit", "fast"}} {
		sock, posts := fakeGateway(t, "gw-zrh", "onprem-zrh", auditPlan.Policy, known)
		if _, errs, code := runCLI(t, append([]string{"migrate", "resume", id, "--socket", sock}, bad...)...); code != 2 || len(posts()) != 0 || !strings.Contains(errs, bad[0]) {
			t.Errorf("%q: exit %d, %d requests, %s; want a usage error naming the flag, nothing sent", bad, code, len(posts()), errs)
		}
	}
}
