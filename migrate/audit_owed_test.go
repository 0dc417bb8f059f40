package migrate

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// TestResumeWritesTheEarlierAttemptsRecord: a send interrupted by a stop
// whose record the start could not write, resumed before the next start,
// still gets that record, written before the resume overwrites how the
// attempt ended.
func TestResumeWritesTheEarlierAttemptsRecord(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 16 * mib})
	rec, _ := p.interrupted(raw, 8)
	// As a stop mid-send leaves it.
	rec.State, rec.Error, rec.Finished, rec.AuditPending = StateRunning, "", time.Time{}, false
	if err := p.sendJ.put(bucketSend, rec.ID, rec); err != nil {
		t.Fatal(err)
	}
	ended, err := p.sendJ.EndInterrupted(time.Now())
	if err != nil || len(ended) != 1 {
		t.Fatal(ended, err)
	}
	good, _ := os.ReadFile(p.sendAudit.Path())
	os.WriteFile(p.sendAudit.Path(), append(slices.Clone(good), "not a record\n"...), 0o600)
	if err := AuditInterrupted(p.sendJ, p.sendAudit, p.from, &ended[0], time.Now()); err == nil {
		t.Fatal("written to a damaged log")
	}
	os.WriteFile(p.sendAudit.Path(), good, 0o600) // repaired; the send is resumed
	cfg := p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	if r, err := Send(context.Background(), cfg); err != nil || r.State != StateDone {
		t.Fatal(r, err)
	}
	if again, _ := p.sendJ.EndInterrupted(time.Now()); len(again) != 0 {
		t.Errorf("handed back at the next start: %+v", again)
	}
	recs := p.records(t, p.sendAudit)
	n := 0
	for _, r := range recs {
		if r.Fields["migration_id"] == rec.ID && r.Fields["error"] == Interrupted {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("records of the interrupted attempt: %d; want 1", n)
	}
}

// TestResumeEndsWhatTheStartCouldNot: a send a stop cut short, which the
// start could not record as ended (a full disk), is still running in the
// journal when it is resumed: the resume records the attempt's end, once.
func TestResumeEndsWhatTheStartCouldNot(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 16 * mib})
	rec, _ := p.interrupted(raw, 8)
	rec.State, rec.Error, rec.Finished, rec.AuditPending = StateRunning, "", time.Time{}, false
	if err := p.sendJ.put(bucketSend, rec.ID, rec); err != nil {
		t.Fatal(err)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	if r, err := Send(context.Background(), cfg); err != nil || r.State != StateDone {
		t.Fatal(r, err)
	}
	n := 0
	for _, r := range p.records(t, p.sendAudit) {
		if r.Fields["migration_id"] == rec.ID && r.Fields["error"] == Interrupted {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("records of the interrupted attempt: %d; want 1", n)
	}
}

// TestOwedRecordWrittenOnce: records written at once (sessions, a
// removal) write an owed record once, not once each.
func TestOwedRecordWrittenOnce(t *testing.T) {
	p, owed, good := pairOwingARecord(t)
	os.WriteFile(p.recvAudit.Path(), good, 0o600)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() { p.recv.appendEvent("image", map[string]any{"action": "x"}) })
	}
	wg.Wait()
	n := 0
	for _, r := range p.recvRecords(t) {
		if r.Fields["migration_id"] == owed.ID && r.Fields["outcome"] == "done" {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("the owed record written %d times; want once", n)
	}
}

// TestSendSignsItsEndWithTheIdentityOfThen: a send that outlasts its
// gateway's certificate, renewed meanwhile, signs its record with the
// renewed one: signed with the one it began with, the record would not
// verify, nor any after it. Without a renewal the log refuses the record,
// which the journal keeps owed for the next start or resume.
func TestSendSignsItsEndWithTheIdentityOfThen(t *testing.T) {
	for _, renew := range []bool{true, false} {
		p := newPair(t, "CH")
		var current atomic.Pointer[certs.NodeIdentity]
		current.Store(p.from)
		var skew atomic.Int64
		res := p.slowSendWith(t, 30*time.Millisecond, func(c *SendConfig) {
			c.Identity = current.Load
			c.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
		})
		// Under way, the transfer ends after the certificate it began
		// with: the clock moved on as hours of transfer would.
		renewed, err := p.ca.IssueIdentity(*p.from.Attributes(), 3*time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if renew {
			current.Store(renewed)
		}
		skew.Store(int64(time.Until(p.from.Certificate().NotAfter) + time.Minute))
		if err := <-res; err != nil {
			t.Fatalf("send: %v", err)
		}
		sends, err := p.sendJ.Sends()
		if err != nil || len(sends) != 1 {
			t.Fatal(sends, err)
		}
		if !renew {
			if !sends[0].AuditPending {
				t.Fatal("a record the log refused is not kept owed")
			}
			if err := AuditInterrupted(p.sendJ, p.sendAudit, renewed, &sends[0], time.Now().Add(time.Duration(skew.Load()))); err != nil {
				t.Fatal(err)
			}
		}
		recs := p.records(t, p.sendAudit) // verified
		if len(recs) != 1 || !bytes.Equal(recs[0].Cert, renewed.Certificate().Raw) {
			t.Fatalf("renewed %v: %d records; want 1, signed with the renewed certificate", renew, len(recs))
		}
	}
}
