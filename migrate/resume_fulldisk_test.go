package migrate

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/smalldisk"
)

// TestResumeOnAFullJournalRecordsTheAttemptOnce: a send a stop cut short,
// still running in a journal the start could not write (a full disk), is
// resumed while the disk is full, then again once it has room: its
// interrupted attempt gets one audit record. Its end was stamped anew at
// each resume and written to the audit log before the journal refused the
// rest, so each resume wrote one more.
func TestResumeOnAFullJournalRecordsTheAttemptOnce(t *testing.T) {
	state := t.TempDir()
	smalldisk.Mount(t, state, "4m")
	j, err := OpenJournal(filepath.Join(state, "migrate.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })

	p := newPair(t, "DE")
	// A long path: the record outgrows the journal's free pages, so that
	// writing it needs the disk's room.
	dir := smalldisk.DeepDir(t, p.dir)
	raw := filepath.Join(dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 16 * mib})
	// Interrupted in the pair's journal; its record, as a stop leaves
	// it, goes into a journal of its own on the small disk, whose few
	// free pages a record of this size outgrows.
	rec, _ := p.interrupted(raw, 8)
	cfg := p.config(raw, "pii-eu")
	cfg.Journal = j
	rec.State, rec.Error, rec.Finished, rec.AuditPending = StateRunning, "", time.Time{}, false
	if err := j.put(bucketSend, rec.ID, rec); err != nil {
		t.Fatal(err)
	}

	free := smalldisk.Fill(t, state)
	cfg.ID = rec.ID
	for i := range 2 {
		if _, err := Send(context.Background(), cfg); err == nil {
			t.Fatalf("resume %d on a full journal succeeded", i+1)
		}
	}
	free()
	if r, err := Send(context.Background(), cfg); err != nil || r.State != StateDone {
		t.Fatalf("resume with room: %v", err)
	}
	if n := countRecords(p.records(t, p.sendAudit), rec.ID, StateFailed); n != 1 {
		t.Fatalf("%d records of the one interrupted attempt; want 1", n)
	}
}
