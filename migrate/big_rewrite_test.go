package migrate

import (
	"bytes"
	"path/filepath"
	"testing"
	"time"
)

// TestRewriteInFlushWindow: a blank session's chunk written once, then
// again while flush has taken it out of pending but not yet into durable
// (pending is swapped out before the fdatasync and the journal's write,
// durable set only after). The second write must not be taken for the
// first into empty room: it would skip its zero runs, and the first
// write's bytes would stay where the second has zeros, under the second's
// hash.
func TestRewriteInFlushWindow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "in.raw")
	f, err := openDirect(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const chunk = 1 << 20
	if err := f.Truncate(chunk); err != nil {
		t.Fatal(err)
	}
	s := &session{temp: f, blank: true, durable: map[int64]Hash{}, pending: map[int64]pendingChunk{}}

	a := alignedBuffer(chunk)[:chunk]
	for i := range a {
		a[i] = 0xAA
	}
	if err := s.temp.writeSparse(a, 0, s.clean(0), false); err != nil {
		t.Fatal(err)
	}
	s.pending[0] = pendingChunk{hash: hashChunk(a)} // s.add

	// flush, up to its fdatasync and journal write.
	s.mu.Lock()
	batch := s.pending
	s.pending = map[int64]pendingChunk{}
	s.mu.Unlock()
	_ = batch

	b := alignedBuffer(chunk)[:chunk]
	clear(b)
	copy(b, bytes.Repeat([]byte{0xBB}, 4096))
	clean := s.clean(0)
	if err := s.temp.writeSparse(b, 0, clean, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, chunk)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if hashChunk(got) != hashChunk(b) {
		t.Fatalf("clean=%v: chunk 0 recorded as %x holds other bytes: byte 8192 is %#x, want 0 (the first write's data left behind)", clean, hashChunk(b), got[8192])
	}
}

// TestWriteSparseOverOldData: writeSparse into room that holds data
// (clean false) leaves exactly the new chunk, its zeros included, direct
// and through the page cache.
func TestWriteSparseOverOldData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "in.raw")
	f, err := openDirect(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const chunk = 1<<20 + 5000
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xAA}, 2*chunk), 0); err != nil {
		t.Fatal(err)
	}
	for _, buffered := range []bool{false, true} {
		b := alignedBuffer(1 << 21)[:chunk]
		clear(b)
		copy(b[300000:], bytes.Repeat([]byte{7}, 5000))
		copy(b[370000:], bytes.Repeat([]byte{7}, 10))
		if err := f.writeSparse(b, chunk, false, buffered); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, chunk)
		if _, err := f.ReadAt(got, chunk); err != nil {
			t.Fatal(err)
		}
		if i := bytes.IndexByte(got, 0xAA); i >= 0 || !bytes.Equal(got, b) {
			t.Fatalf("buffered=%v: the chunk written differs from what the file holds (old data at %d)", buffered, i)
		}
	}
}

// TestSameChunkTwiceStoresTheSecond drives the real receiver: a sender
// writes chunk 0 (all data), then, while the syncer's flush has taken it
// out of pending and waits for the journal (held here by an open bbolt
// write transaction, as a slow disk would), writes chunk 0 again with
// 4 KiB of data and zeros. Both are acknowledged, and the session holds
// the second's hash: the file must hold the second's bytes, since the
// commit builds its root from the hashes held, not the file.
func TestSameChunkTwiceStoresTheSecond(t *testing.T) {
	p := newPair(t, "DE")
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: mib, ChunkSize: mib, Streams: 1,
		Chunks: new(int64(1))}
	rs := p.offerRaw(t, offer)
	a := bytes.Repeat([]byte{0xAA}, mib)
	b := make([]byte, mib)
	copy(b, bytes.Repeat([]byte{0xBB}, 4096))

	tx, err := p.recvJ.db.Begin(true) // the journal is slow: flush waits in addChunks
	if err != nil {
		t.Fatal(err)
	}
	if err := rs.dw.frame(frameChunk, chunkHeader(0, hashChunk(a), 0, mib), a); err != nil {
		t.Fatal(err)
	}
	rs.dw.flush()
	p.recv.mu.Lock()
	s := p.recv.sessions[offer.ID]
	p.recv.mu.Unlock()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		s.mu.Lock()
		_, pend := s.pending[0]
		s.mu.Unlock()
		if !pend && s.received.Load() > 0 { // written, then taken by flush
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("chunk 0 never reached the flush")
		}
	}
	if err := rs.dw.frame(frameChunk, chunkHeader(0, hashChunk(b), 0, mib), b); err != nil {
		t.Fatal(err)
	}
	rs.dw.flush()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		s.mu.Lock()
		_, pend := s.pending[0]
		s.mu.Unlock()
		if pend {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("second chunk 0 never written")
		}
	}
	tx.Rollback()
	for range 2 {
		typ, body, err := rs.dr.next(nil)
		if err != nil || typ != frameAck {
			t.Fatalf("answer %d %q %v, want an ack", typ, body, err)
		}
	}
	// Acknowledged once durable: the second's hash is held now.
	s.mu.Lock()
	held := s.durable[0]
	s.mu.Unlock()
	if held != hashChunk(b) {
		t.Fatalf("chunk 0 held as %x, want the second's hash %x", held, hashChunk(b))
	}
	got := make([]byte, mib)
	if _, err := s.temp.ReadAt(got, s.at); err != nil {
		t.Fatal(err)
	}
	if hashChunk(got) != held {
		t.Fatalf("chunk 0 held as the second chunk's hash; the file holds other bytes (byte 8192 = %#x, want 0)", got[8192])
	}
}
