package migrate

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/audit"
)

// countRecords counts the records of migration id with outcome in recs.
func countRecords(recs []audit.Record, id, outcome string) int {
	n := 0
	for _, r := range recs {
		if r.Event == "migration" && r.Fields["migration_id"] == id && r.Fields["outcome"] == outcome {
			n++
		}
	}
	return n
}

// TestReceiverRecoversAuditedStoreOnce: a receiving gateway stopped after
// its "done" record was appended, before its journal marked it written,
// finds the record in its log when it starts and does not write it again:
// written twice, the audit trail counted the migration twice.
func TestReceiverRecoversAuditedStoreOnce(t *testing.T) {
	rcfg, stop := new(ReceiverConfig), new(atomic.Bool)
	var p *pair
	p = newPairWith(t, "DE", func(c *ReceiverConfig) {
		// Run once the record is appended and the journal says so: the
		// journal is put back as the append left it, then the gateway
		// stops.
		c.recordFails = func() error {
			if !stop.Load() {
				return nil
			}
			staged, err := p.recvJ.stagedImages()
			if err != nil || len(staged) != 1 {
				t.Errorf("staged: %+v, %v; want the image being stored", staged, err)
				return errStopHere
			}
			for id, st := range staged {
				if !st.Audited {
					t.Error("the journal does not say the record was written")
				}
				st.Audited = false
				if err := p.recvJ.put(bucketStoring, id, &st); err != nil {
					t.Error(err)
				}
			}
			return errStopHere
		}
		*rcfg = *c
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4096, mib: 64 << 10})
	stop.Store(true)
	rec, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err == nil {
		t.Fatal("the receiver stopped while storing, yet the send succeeded")
	}
	if n := countRecords(p.recvRecords(t), rec.ID, "done"); n != 1 {
		t.Fatalf("%d done records before the restart; want the one appended", n)
	}

	// A gateway starting on the same journal, store and log.
	rcfg.recordFails = nil
	if _, err := NewReceiver(*rcfg); err != nil {
		t.Fatal(err)
	}
	if _, err := p.recvJ.Image("vm"); err != nil {
		t.Fatalf("the image is not in the catalog after the start: %v", err)
	}
	recs := p.recvRecords(t)
	if n := countRecords(recs, rec.ID, "done"); n != 1 {
		t.Fatalf("%d done records of migration %s after the start; want 1", n, rec.ID)
	}
	for _, r := range recs {
		if r.Fields["recovered"] != nil {
			t.Errorf("a record written late, though the log had it: %+v", r.Fields)
		}
	}
	if owed, _ := p.recvJ.auditOwed(); len(owed) != 0 {
		t.Errorf("still owed: %+v", owed)
	}
	if !strings.Contains(p.recvLog.String(), "not written again") {
		t.Errorf("not logged:\n%s", p.recvLog.String())
	}
}

// TestOwedRecordRecoveredOnce: an owed record written late, by a gateway
// stopped before the journal forgot it, is not written again at the next
// start.
func TestOwedRecordRecoveredOnce(t *testing.T) {
	p, owed, good := pairOwingARecord(t)
	p.recv.cfg.afterRename = nil
	if err := os.WriteFile(p.recvAudit.Path(), good, 0o600); err != nil {
		t.Fatal(err)
	}
	if !p.recv.payOwed() {
		t.Fatal("the owed record is not written")
	}
	// As the stop leaves it: written, and still owed.
	if err := p.recvJ.put(bucketAuditOwed, owed.key, owed.Fields); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReceiver(p.recv.cfg); err != nil {
		t.Fatal(err)
	}
	if n := countRecords(p.recvRecords(t), owed.ID, "done"); n != 1 {
		t.Fatalf("%d done records of migration %s; want 1", n, owed.ID)
	}
	if owed, _ := p.recvJ.auditOwed(); len(owed) != 0 {
		t.Errorf("still owed: %+v", owed)
	}
}

// TestSenderRecoversAuditedEndOnce: a sending gateway stopped after its
// record of a migration's end was appended, before its journal cleared
// AuditPending, finds the record in its log when it starts: one record,
// not two.
func TestSenderRecoversAuditedEndOnce(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4096})
	r, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err != nil || r.State != StateDone {
		t.Fatalf("send: %+v, %v", r, err)
	}
	recs := p.records(t, p.sendAudit)
	if len(recs) != 1 {
		t.Fatalf("%d records; want the send's", len(recs))
	}
	// As the stop leaves it: the journal holds the record owed as made
	// before the append, which is what the log took.
	rec, err := p.sendJ.Send(r.ID)
	if err != nil {
		t.Fatal(err)
	}
	rec.AuditPending, rec.AuditOwed = true, recs[0].Fields
	if err := p.sendJ.put(bucketSend, rec.ID, rec); err != nil {
		t.Fatal(err)
	}
	ended, err := p.sendJ.EndInterrupted(time.Now())
	if err != nil || len(ended) != 1 {
		t.Fatalf("ended: %+v, %v; want the send whose record is pending", ended, err)
	}
	if err := AuditInterrupted(p.sendJ, p.sendAudit, p.from, &ended[0], time.Now()); err != nil {
		t.Fatal(err)
	}
	if n := countRecords(p.records(t, p.sendAudit), r.ID, StateDone); n != 1 {
		t.Fatalf("%d done records of migration %s; want 1", n, r.ID)
	}
	if again, _ := p.sendJ.EndInterrupted(time.Now()); len(again) != 0 {
		t.Fatalf("still pending: %+v", again)
	}
}
