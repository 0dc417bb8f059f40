package migrate

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/policy"
)

// TestResumeSeesSourceRewrittenWithMtimeKept: an image rewritten in place
// between an interrupted attempt and its resume, its mtime then put back
// (`touch -r`, `rsync -t --inplace`), keeps its size, mtime, inode and
// device. Trusted, the resume would skip the chunks acknowledged before,
// unread, and the destination would store a mix of both versions under a
// root both ends agree on. Its ctime, which no program sets back, tells.
func TestResumeSeesSourceRewrittenWithMtimeKept(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
	before, err := os.Stat(raw)
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := p.interrupted(raw, 8)
	acked, err := p.sendJ.chunks("send", rec.ID)
	if err != nil || len(acked) == 0 {
		t.Fatalf("%d chunks acknowledged (%v)", len(acked), err)
	}
	f, err := os.OpenFile(raw, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := range acked {
		b := make([]byte, rec.ChunkSize)
		rand.Read(b)
		if _, err := f.WriteAt(b, i*rec.ChunkSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(raw, before.ModTime(), before.ModTime()); err != nil {
		t.Fatal(err)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	rec2, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	if rec2.Stats.ChunksResumed != 0 {
		t.Errorf("the resume skipped %d chunks of the rewritten image unread", rec2.Stats.ChunksResumed)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	a, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Errorf("migration %s is %s, but the stored image is not the source", rec2.ID, rec2.State)
	}
}

// TestVerifyImageOfAnotherSize: a stored image longer than its manifest
// is not the image stored; what lies past the manifest's end was never
// checked. One shorter is truncated, though all it lost was a hole (its
// data intact, read as the manifest's chunks): the disk a VM boots from
// is smaller than the one sent.
func TestVerifyImageOfAnotherSize(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: mib})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img.Path, 2*mib); err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyImage(context.Background(), img); err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Errorf("a stored image cut from 4 to 2 MiB, over its hole: %+v, %v; want it said truncated", rep, err)
	}
	if err := os.Truncate(img.Path, 4*mib); err != nil { // the hole back
		t.Fatal(err)
	}
	if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
		t.Fatalf("the image with its hole back: %+v, %v", rep, err)
	}
	f, err := os.OpenFile(img.Path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(bytes.Repeat([]byte("appended"), 1<<17)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if rep, err := VerifyImage(context.Background(), img); err == nil || !strings.Contains(err.Error(), "grown") {
		t.Errorf("a stored image 1 MiB longer than its manifest: %+v, %v", rep, err)
	}
}

// ackingReceiver answers an offer, acknowledges every chunk at once and
// answers the commit with the root it was sent; at a data stream's end it
// calls onEOF, which may block, as a wedged receiver does.
func (p *pair) ackingReceiver(t *testing.T, onEOF func()) netip.AddrPort {
	t.Helper()
	return p.standInWith(t, func(fw *frameWriter, fr *frameReader) {
		fw.json(frameAccept, Accept{})
		fw.flush()
		for {
			typ, payload, err := fr.next(nil)
			if err != nil {
				return
			}
			if typ == frameCommit {
				var cm Commit
				jsonUnmarshal(payload, &cm)
				fw.json(frameDone, Done{Name: "vm", Root: cm.Root})
				fw.flush()
			}
		}
	}, func(fw *frameWriter, fr *frameReader) {
		for {
			typ, payload, err := fr.next(nil)
			if err != nil {
				onEOF()
				return
			}
			if typ == frameChunk || typ == frameSame {
				i, _, _, _ := splitIndex(payload)
				fw.frame(frameAck, ackFrame([]int64{i}))
				fw.flush()
			}
		}
	})
}

// TestSenderDoesNotWaitForStreamsForEver: once every chunk is durable the
// sender half-closes its data streams and waits for the receiver to close
// them. A receiver that never does (its process wedged, its host gone
// where no keepalive tells) must not hold the migration for ever.
func TestSenderDoesNotWaitForStreamsForEver(t *testing.T) {
	// The stall timeout bounds each write and the wait for
	// acknowledgements as well: 300 ms failed the transfer itself when
	// the fake receiver went unscheduled that long (2 runs in 55).
	stallAfter(t, 2*time.Second)
	p := newPair(t, "DE")
	wedged := make(chan struct{})
	t.Cleanup(func() { close(wedged) })
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4 * mib})
	cfg := p.config(raw, "pii-eu")
	cfg.To.Addr = p.ackingReceiver(t, func() { <-wedged })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	res := make(chan error, 1)
	go func() {
		_, err := Send(ctx, cfg)
		res <- err
	}()
	select {
	case err := <-res:
		if err != nil {
			t.Fatalf("every chunk acknowledged and the commit answered: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("the sender still waits for its streams to close 10 s after every chunk was acknowledged (stall timeout 2 s)")
		cancel()
		<-res
	}
}

// TestCancelAfterCommitKeepsReceiversAnswer: a migration cancelled once
// its commit is sent waits for the receiver's answer, so that both ends
// record the same outcome. A denial at the commit (the policy changed
// meanwhile) is that outcome, not "cancelled".
func TestCancelAfterCommitKeepsReceiversAnswer(t *testing.T) {
	v2, err := policy.Parse("v2.hcl", []byte(strings.Replace(strings.Replace(testPolicy, "version = 1", "version = 2", 1),
		`jurisdiction = ["DE", "CH"]`, `jurisdiction = ["CH"]`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	committing, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	var p *pair
	p = newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.Policy = func() *policy.Policy {
			if calls.Add(1) == 2 { // the decision at the commit
				close(committing)
				<-release
				return v2
			}
			return p.pol
		}
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{mib: 4096})
	rec, err := p.cancelAfterCommit(raw, committing, release)
	var denied *DeniedError
	if !errors.As(err, &denied) || !denied.AtCommit || rec.State != StateDenied {
		t.Errorf("the receiver denied the migration at the commit; the sender records %q: %v", rec.State, err)
	}
}

// TestParseAckDoesNotTrustItsCount: an acknowledgement frame's count is
// the sender's peer's word; what parseAck allocates follows the indices
// it reads, not that count.
func TestParseAckDoesNotTrustItsCount(t *testing.T) {
	const n = 8 << 20
	p := binary.AppendUvarint(nil, n-4) // one index per byte left
	p = append(p, make([]byte, n-len(p))...)
	for i := range p[4:] {
		p[4+i] = 0x80 // no index ends
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := parseAck(p)
	runtime.ReadMemStats(&after)
	if err == nil {
		t.Fatal("a frame of unfinished indices parsed")
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 1<<20 {
		t.Errorf("an invalid %d-byte acknowledgement made parseAck allocate %d bytes", len(p), alloc)
	}
	if _, err := parseAck(binary.AppendUvarint(nil, 3)); err == nil {
		t.Error("an acknowledgement claiming 3 indices and holding none parsed")
	}
	got, err := parseAck(ackFrame([]int64{0, 5, 1 << 40}))
	if err != nil || len(got) != 3 || got[2] != 1<<40 {
		t.Errorf("a valid acknowledgement: %v, %v", got, err)
	}
}

// TestUnfinishedListsInterruptedReceives: a receive whose sender stopped
// keeps part of an image of its class here until it is resumed or
// forgotten; the destination lists it, not only the sessions running.
func TestUnfinishedListsInterruptedReceives(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
	rec, _ := p.interrupted(raw, 4)
	if len(p.recv.Active()) != 0 {
		t.Fatalf("sessions still running: %+v", p.recv.Active())
	}
	got, err := p.recv.Unfinished()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].ID != rec.ID || !got[0].Interrupted || got[0].Class != "pii-eu" || got[0].Received < 4*mib {
		t.Fatalf("unfinished receives: %+v; want migration %s, interrupted, with at least 4 MiB held", got, rec.ID)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	if got, err := p.recv.Unfinished(); err != nil || len(got) != 0 {
		t.Errorf("once stored: %+v, %v", got, err)
	}
}

// TestResumeOfARecordWithoutCTime: a migration interrupted under a release
// before SourceID.CTime, its source untouched, resumes as it would have:
// its acknowledged chunks skipped, not the image read again and the
// receiver asked for room for all of it (Restarted).
func TestResumeOfARecordWithoutCTime(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
	rec, _ := p.interrupted(raw, 8)
	// The record as the release before wrote it.
	sr, err := p.sendJ.Send(rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	sr.Source.CTime = time.Time{}
	if err := p.sendJ.put(bucketSend, rec.ID, sr); err != nil {
		t.Fatal(err)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	rec2, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	if rec2.Stats.ChunksResumed == 0 {
		t.Errorf("the resume after the upgrade skipped no acknowledged chunk of an unchanged source (it read all %d again)", rec2.Stats.ChunksDone)
	}
	if rec2.Restarted {
		t.Errorf("an unchanged source's migration is marked Restarted after the upgrade: the receiver reserves room for every chunk from now on")
	}
	var rr RecvRecord
	if err := p.recvJ.get(bucketRecv, rec.ID, &rr); err == nil && rr.Restarted {
		t.Errorf("the receiver's record says Restarted")
	}
}
