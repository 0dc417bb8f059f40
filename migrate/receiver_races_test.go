package migrate

import (
	"bytes"
	"context"
	"crypto/rand"
	"sync"
	"testing"
	"time"
)

// TestSameChunkOnTwoStreams: one chunk index arriving on two data streams
// at once, with different (each self-consistent) data — not what the
// shipped sender does, but nothing stops a sender from it. The receiver
// must never record as durable a hash that is not what its file holds:
// the commit trusts the recorded hashes and never reads the file again.
// Each stream wrote, then recorded, its own: interleaved, the record
// named one and the file held the other.
func TestSameChunkOnTwoStreams(t *testing.T) {
	p := newPair(t, "DE")
	const cs = 64 << 10
	one := int64(1)
	offer := Offer{ID: "samechunk0000001", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: cs, ChunkSize: cs, Streams: 2, Chunks: &one}
	rs := p.offerRaw(t, offer)
	d2 := p.dial(t, nil)
	w2 := newFrameWriter(d2)
	if err := w2.json(frameJoin, Join{ID: offer.ID}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []interface{ SetDeadline(time.Time) error }{rs.ctrl, rs.data, d2} {
		c.SetDeadline(time.Now().Add(2 * time.Minute))
	}
	x, y := make([]byte, cs), make([]byte, cs)
	rand.Read(x)
	rand.Read(y)
	hx, hy := hashChunk(x), hashChunk(y)
	// Drain whatever the receiver says on the data streams.
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := rs.data.Read(buf); err != nil {
				return
			}
		}
	}()
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := d2.Read(buf); err != nil {
				return
			}
		}
	}()
	p.recv.mu.Lock()
	s := p.recv.sessions[offer.ID]
	p.recv.mu.Unlock()
	const rounds = 200 // it failed within 2–6 before the chunk locks
	for r := range rounds {
		before := s.received.Load()
		var wg sync.WaitGroup
		wg.Go(func() { rs.dw.frame(frameChunk, chunkHeader(0, hx, 0, cs), x); rs.dw.flush() })
		wg.Go(func() { w2.frame(frameChunk, chunkHeader(0, hy, 0, cs), y); w2.flush() })
		wg.Wait()
		for t0 := time.Now(); s.received.Load() < before+2*cs; time.Sleep(50 * time.Microsecond) {
			if time.Since(t0) > 5*time.Second {
				t.Fatalf("round %d: received %d, want %d", r, s.received.Load(), before+2*cs)
			}
		}
		// Both written and added (received counts at add): a flush now
		// runs after any the syncer has under way, so what it leaves is
		// what the commit would find.
		if err := s.flush(); err != nil {
			t.Fatal(err)
		}
		if r < rounds-1 && consistent(t, s, x, y, hx, hy) {
			continue
		}
		break
	}
	if consistent(t, s, x, y, hx, hy) {
		return
	}
	s.mu.Lock()
	h := s.durable[0]
	s.mu.Unlock()
	m := Manifest{Size: cs, ChunkSize: cs, Chunks: map[int64]Hash{0: h}}
	rs.cw.json(frameCommit, Commit{Manifest: m, Root: m.Root()})
	typ, _, err := rs.cr.next(nil)
	img, ierr := p.recvJ.Image("vm")
	var rep *VerifyReport
	if ierr == nil {
		rep, _ = VerifyImage(context.Background(), img)
	}
	t.Fatalf("commit answered frame %d (done is %d) err %v; the stored image, verified against its own catalog root: %+v", typ, frameDone, err, rep)
}

// consistent reports whether chunk 0's recorded hash is what the file holds.
func consistent(t *testing.T, s *session, x, y []byte, hx, hy Hash) bool {
	s.mu.Lock()
	h := s.durable[0]
	s.mu.Unlock()
	b := make([]byte, len(x))
	if _, err := s.temp.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	onDisk := "neither"
	switch {
	case bytes.Equal(b, x):
		onDisk = "x"
	case bytes.Equal(b, y):
		onDisk = "y"
	}
	want := map[Hash]string{hx: "x", hy: "y"}[h]
	if onDisk != want {
		t.Errorf("chunk 0 recorded durable with the hash of %s, the file holds %s", want, onDisk)
		return false
	}
	return true
}

// TestTakeOverDuringCommit: a second offer of a migration whose commit is
// storing the image (after the rename, before the catalog) waits for the
// store, then starts afresh against the stored image: nothing half-done.
func TestTakeOverDuringCommit(t *testing.T) {
	inRename, release := make(chan struct{}), make(chan struct{})
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			select {
			case inRename <- struct{}{}:
				<-release
			default:
			}
			return nil
		}
	})
	const cs, n = 64 << 10, 4
	all := int64(n)
	offer := Offer{ID: "takeover00000001", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: cs * n, ChunkSize: cs, Streams: 1, Chunks: &all}
	rs := p.offerRaw(t, offer)
	m := Manifest{Size: offer.Size, ChunkSize: cs, Chunks: map[int64]Hash{}}
	for i := range int64(n) {
		b := make([]byte, cs)
		rand.Read(b)
		m.Chunks[i] = hashChunk(b)
		rs.dw.frame(frameChunk, chunkHeader(i, m.Chunks[i], 0, cs), b)
	}
	rs.dw.flush()
	for acked := 0; acked < n; {
		typ, b, err := rs.dr.next(nil)
		if err != nil || typ != frameAck {
			t.Fatalf("ack: frame %d %v", typ, err)
		}
		idx, _ := parseAck(b)
		acked += len(idx)
	}
	if err := rs.cw.json(frameCommit, Commit{Manifest: m, Root: m.Root()}); err != nil {
		t.Fatal(err)
	}
	<-inRename
	// The sender, having lost its control stream, resumes.
	c2 := p.dial(t, nil)
	w2, r2 := newFrameWriter(c2), newFrameReader(c2)
	if err := w2.json(frameOffer, offer); err != nil {
		t.Fatal(err)
	}
	// Time for the offer to reach the receiver while the store is under
	// way (arriving after it, the test covers less, and still passes).
	time.Sleep(300 * time.Millisecond)
	close(release)
	var acc Accept
	if err := r2.json(frameAccept, &acc); err != nil {
		t.Fatalf("second offer: %v", err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
		t.Fatalf("stored image: %+v %v", rep, err)
	}
	if len(acc.Have) != 0 || len(acc.Base) != n {
		t.Fatalf("second offer: have %d, base %d; want 0 and %d", len(acc.Have), len(acc.Base), n)
	}
	if st, _ := p.recvJ.stagedImages(); len(st) != 0 {
		t.Fatalf("staged: %+v", st)
	}
}
