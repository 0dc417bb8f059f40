package migrate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/policy"
)

// TestOpenDamagedJournal: a journal emptied, cut short or overwritten is
// refused with its name and what moving it aside costs — not a panic in
// bbolt, and not, for an emptied one, a new journal in silence (the image
// catalog would be gone without a word).
func TestOpenDamagedJournal(t *testing.T) {
	good := filepath.Join(t.TempDir(), "migrate.db")
	j, err := OpenJournal(good)
	if err != nil {
		t.Fatal(err)
	}
	if err := j.put(bucketImages, "vm", ImageRecord{Name: "vm", Path: "/x/vm.raw"}); err != nil {
		t.Fatal(err)
	}
	// Enough chunks that the file's second half is in use.
	chunks := map[int64]Hash{}
	for i := range int64(20000) {
		chunks[i] = Hash{byte(i), byte(i >> 8)}
	}
	if err := j.addChunks("recv", "0123456789abcdef", chunks); err != nil {
		t.Fatal(err)
	}
	j.Close()
	whole, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string][]byte{
		"emptied":     nil,
		"cut short":   whole[:len(whole)/2+100],
		"overwritten": append(append([]byte(nil), whole[:4096]...), make([]byte, len(whole)-4096)...),
		"garbage":     []byte(strings.Repeat("not a database ", 1000)),
	} {
		path := filepath.Join(t.TempDir(), "migrate.db")
		if err := os.WriteFile(path, content, 0o600); err != nil {
			t.Fatal(err)
		}
		j, err := OpenJournal(path)
		if err == nil {
			// Some damage bbolt cannot see: the catalog must then read.
			_, gerr := j.Image("vm")
			j.Close()
			t.Fatalf("%s: opened (catalog read: %v)", name, gerr)
		}
		if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "move it aside") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestEndInterrupted: sends a stopped gateway left recorded as running end
// as failed when it starts again, saying so; the others are untouched.
func TestEndInterrupted(t *testing.T) {
	j, err := OpenJournal(filepath.Join(t.TempDir(), "migrate.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	started := time.Date(2026, 11, 26, 9, 0, 0, 0, time.UTC)
	for id, state := range map[string]string{"aaaaaaaaaaaaaaaa": StateRunning, "bbbbbbbbbbbbbbbb": StateDone, "cccccccccccccccc": StateRunning, "dddddddddddddddd": StateCancelled} {
		if err := j.put(bucketSend, id, SendRecord{ID: id, Name: "vm-" + id[:1], State: state, Started: started}); err != nil {
			t.Fatal(err)
		}
	}
	now := started.Add(time.Hour)
	ended, err := j.EndInterrupted(now)
	if err != nil {
		t.Fatal(err)
	}
	if len(ended) != 2 || ended[0].ID != "aaaaaaaaaaaaaaaa" || ended[1].ID != "cccccccccccccccc" {
		t.Fatalf("ended %+v; want the two running", ended)
	}
	for id, want := range map[string]string{"aaaaaaaaaaaaaaaa": StateFailed, "bbbbbbbbbbbbbbbb": StateDone, "cccccccccccccccc": StateFailed, "dddddddddddddddd": StateCancelled} {
		r, err := j.Send(id)
		if err != nil || r.State != want {
			t.Fatalf("%s: %+v %v; want %s", id, r, err, want)
		}
		if want == StateFailed && (r.Error != Interrupted || !r.Finished.Equal(now) || r.Name != "vm-"+id[:1]) {
			t.Errorf("%s: %+v; want it ended at %s as interrupted, the rest kept", id, r, now)
		}
	}
	// Until their audit records are written, a start hands them back as
	// they ended.
	again, err := j.EndInterrupted(now.Add(time.Hour))
	if err != nil || len(again) != 2 || !again[0].Finished.Equal(now) || !again[0].AuditPending {
		t.Fatalf("a second start before the records were written: %+v, %v; want both again, ended at %s", again, err, now)
	}
	log := audit.Open(filepath.Join(t.TempDir(), "audit.log"))
	id := testIdentity(t) // valid now, not when the sends ended: recorded now
	for i := range again {
		if err := AuditInterrupted(j, log, id, &again[i], time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	if again, err := j.EndInterrupted(now); err != nil || len(again) != 0 {
		t.Errorf("a start after the records were written ended %+v, %v", again, err)
	}
}

// TestEndInterruptedAuditPending: a send whose end was journalled but not
// yet audited when its gateway stopped is handed back, as it ended, for
// its audit record — once.
func TestEndInterruptedAuditPending(t *testing.T) {
	j, err := OpenJournal(filepath.Join(t.TempDir(), "migrate.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	started := time.Date(2026, 11, 26, 9, 0, 0, 0, time.UTC)
	for id, pending := range map[string]bool{"aaaaaaaaaaaaaaaa": true, "bbbbbbbbbbbbbbbb": false} {
		if err := j.put(bucketSend, id, SendRecord{ID: id, State: StateDone, Started: started, AuditPending: pending}); err != nil {
			t.Fatal(err)
		}
	}
	ended, err := j.EndInterrupted(started.Add(time.Hour))
	if err != nil || len(ended) != 1 || ended[0].ID != "aaaaaaaaaaaaaaaa" || ended[0].State != StateDone || ended[0].Error != "" {
		t.Fatalf("ended %+v, %v; want the done send whose audit was pending, still done", ended, err)
	}
	// Its record not written (the audit log damaged): handed back again
	// at the next start, not dropped.
	log := audit.Open(filepath.Join(t.TempDir(), "audit.log"))
	if err := os.WriteFile(log.Path(), []byte("not a record\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	id := testIdentity(t) // valid now, not when the send ended: recorded now
	if err := AuditInterrupted(j, log, id, &ended[0], time.Now()); err == nil {
		t.Fatal("a record appended to a damaged log")
	}
	again, err := j.EndInterrupted(started.Add(time.Hour))
	if err != nil || len(again) != 1 || again[0].ID != "aaaaaaaaaaaaaaaa" {
		t.Fatalf("the next start handed back %+v, %v; want the send whose record is still owed", again, err)
	}
	os.Remove(log.Path())
	if err := AuditInterrupted(j, log, id, &again[0], time.Now()); err != nil {
		t.Fatal(err)
	}
	if again, err := j.EndInterrupted(started.Add(time.Hour)); err != nil || len(again) != 0 {
		t.Errorf("a start after its record was written handed back %+v, %v", again, err)
	}
}

// TestSendAuditPendingCleared: a send's journal record is not left
// pending its audit once the audit record is written, and is when the
// audit log refuses it.
func TestSendAuditPendingCleared(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: mib})
	rec, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err != nil {
		t.Fatal(err)
	}
	if r, err := p.sendJ.Send(rec.ID); err != nil || r.AuditPending || r.State != StateDone {
		t.Fatalf("journal after a migration: %+v, %v; want done, audited", r, err)
	}
	// The audit log damaged after the start: the end cannot be recorded.
	ctx, cancel := context.WithCancel(context.Background())
	cfg := p.config(raw, "pii-eu")
	cfg.Name, cfg.BWLimit = "vm2", mib
	cfg.Progress = func(pr Progress) {
		if pr.Stats.ChunksDone >= 1 {
			os.WriteFile(p.sendAudit.Path(), []byte("not a record\n"), 0o600)
			cancel()
		}
	}
	rec, err = Send(ctx, cfg)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("send: %v", err)
	}
	r, err := p.sendJ.Send(rec.ID)
	if err != nil || !r.AuditPending || r.State != StateCancelled {
		t.Fatalf("journal after a migration whose end could not be audited: %+v, %v; want cancelled, audit pending", r, err)
	}
	// Written at the next start, it is the record the sender made: its
	// decision with it, not only the outcome the journal holds.
	os.Remove(p.sendAudit.Path())
	os.Remove(p.sendAudit.Path() + ".head")
	if err := AuditInterrupted(p.sendJ, p.sendAudit, p.from, r, time.Now()); err != nil {
		t.Fatal(err)
	}
	recs := p.records(t, p.sendAudit)
	if len(recs) != 1 {
		t.Fatalf("records: %d", len(recs))
	}
	if f := recs[0].Fields; f["migration_id"] != rec.ID || f["outcome"] != StateCancelled || f["rule"] == nil || f["policy"] == nil || f["recovered"] == nil {
		t.Errorf("the late record: %v; want the sender's, decision and all, marked recovered", f)
	}
	if r, _ := p.sendJ.Send(rec.ID); r.AuditPending || r.AuditOwed != nil {
		t.Errorf("journal after the late record: %+v; want nothing owed", r)
	}
}

// TestAuditInterrupted: the send a stop interrupted gets the audit record
// it did not write, signed and chained like the others.
func TestAuditInterrupted(t *testing.T) {
	p := newPair(t, "DE")
	r := SendRecord{ID: "aaaaaaaaaaaaaaaa", Image: "/img/vm.raw", Name: "vm", Class: "pii-eu", To: "gw-dst", ToSite: "dst-site",
		State: StateFailed, Error: Interrupted, Started: time.Now().Add(-time.Hour), Finished: time.Now()}
	if err := AuditInterrupted(p.sendJ, p.sendAudit, p.from, &r, time.Now()); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p.sendAudit.Path())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := audit.Verify(bytes.NewReader(b), p.tb); err != nil {
		t.Fatalf("the record does not verify: %v", err)
	}
	var rec audit.Record
	if err := json.Unmarshal(bytes.TrimSpace(b), &rec); err != nil {
		t.Fatal(err)
	}
	f := rec.Fields
	if rec.Event != "migration" || f["migration_id"] != r.ID || f["outcome"] != StateFailed || f["error"] != Interrupted || f["role"] != "sender" || f["source_node"] != "gw-zrh" || f["destination_node"] != "gw-dst" {
		t.Errorf("record %+v", rec)
	}
}

// TestForgetStaleSends: the chunk journals of sends that ended unfinished
// over AbandonedAfter ago go; those of recent or running sends stay. The
// records of sends that ended over SendsKept ago go too; the others, and
// running ones however old, stay.
func TestForgetStaleSends(t *testing.T) {
	j, err := OpenJournal(filepath.Join(t.TempDir(), "migrate.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	now := time.Date(2026, 11, 26, 9, 0, 0, 0, time.UTC)
	old, recent, ancient := now.Add(-AbandonedAfter-time.Hour), now.Add(-time.Hour), now.Add(-SendsKept-time.Hour)
	sends := []SendRecord{
		{ID: "failedold", State: StateFailed, Finished: old},
		{ID: "cancelledold", State: StateCancelled, Finished: old},
		{ID: "failedrecent", State: StateFailed, Finished: recent},
		{ID: "running", State: StateRunning, Started: ancient},
		{ID: "doneancient", State: StateDone, Finished: ancient},
		{ID: "deniedancient", State: StateDenied, Finished: ancient},
		{ID: "donerecent", State: StateDone, Finished: recent},
	}
	for _, r := range sends {
		if err := errors.Join(j.put(bucketSend, r.ID, r), j.addChunks("send", r.ID, map[int64]Hash{0: {1}}), j.addChunks(sideSendZeros, r.ID, map[int64]Hash{1: {}})); err != nil {
			t.Fatal(err)
		}
	}
	chunks, records, err := j.ForgetStaleSends(now)
	if err != nil || chunks != 3 || records != 2 {
		t.Fatalf("ForgetStaleSends = %d, %d, %v; want the chunks of the 3 old unfinished sends and the records of the 2 ended long ago", chunks, records, err)
	}
	for _, r := range sends {
		acked, err := j.chunks("send", r.ID)
		if err != nil {
			t.Fatal(err)
		}
		zeros, err := j.chunks(sideSendZeros, r.ID)
		if err != nil {
			t.Fatal(err)
		}
		gone := r.Finished.Equal(ancient)
		unfinishedOld := r.State != StateDone && r.State != StateRunning && !r.Finished.After(old)
		if forgot := len(acked) == 0 && len(zeros) == 0; forgot != (gone || unfinishedOld) {
			t.Errorf("%s: %d acknowledged and %d zero chunks left", r.ID, len(acked), len(zeros))
		}
		if _, err := j.Send(r.ID); (err != nil) != gone {
			t.Errorf("%s: record: %v; want it gone: %v", r.ID, err, gone)
		}
	}
}

// testIdentity is a gateway identity of a CA of its own, for records.
func testIdentity(t *testing.T) *certs.NodeIdentity {
	t.Helper()
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	id, err := ca.IssueIdentity(certs.Attributes{Node: "gw-zrh", Site: "zrh", Region: "zrh-dc1", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.96.0.1")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestDecisionFieldsNameEveryException: a record of a move that rested on
// two exceptions (where it is stored, where it passes) names both, so a
// search by either ticket finds it; one exception is named as before.
func TestDecisionFieldsNameEveryException(t *testing.T) {
	store, transit := &policy.ExceptionRef{Name: "us-store", Ticket: "GRC-1"}, &policy.ExceptionRef{Name: "us-transit", Ticket: "GRC-2"}
	f := map[string]any{}
	decisionFields(f, &policy.Decision{Exception: store, Exceptions: []*policy.ExceptionRef{store, transit}})
	all, _ := f["exceptions"].([]map[string]any)
	if len(all) != 2 || all[0]["ticket"] != "GRC-1" || all[1]["ticket"] != "GRC-2" || f["exception"].(map[string]any)["ticket"] != "GRC-1" {
		t.Fatalf("fields %v; want both exceptions, the first also as exception", f)
	}
	f = map[string]any{}
	decisionFields(f, &policy.Decision{Exception: store, Exceptions: []*policy.ExceptionRef{store}})
	if _, ok := f["exceptions"]; ok || f["exception"] == nil {
		t.Fatalf("fields %v; want the one exception as before", f)
	}
}
