package migrate

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/policy"
)

// TestNoChunkLandsAfterTheCommit: once the commit comes, the data streams
// end before the file is checked and stored. A chunk whose frame had begun
// (claimed, its body still coming) would otherwise be written into the
// stored file after the check: an image that does not match the root the
// catalog and the audit record name.
func TestNoChunkLandsAfterTheCommit(t *testing.T) {
	dataOpen := make(chan error, 1)
	var data interface{ Read([]byte) (int, error) }
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			// The image is in place: its data stream must be closed by
			// now (reads reach its end, not the deadline; acks may come
			// before it).
			buf := make([]byte, 4096)
			for {
				if _, err := data.Read(buf); err != nil {
					dataOpen <- err
					return nil
				}
			}
		}
	})
	const cs, n = 64 << 10, 4
	ctrl := p.dial(t, nil)
	cw, cr := newFrameWriter(ctrl), newFrameReader(ctrl)
	all := int64(n)
	offer := Offer{ID: "sealed0000000001", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: cs * n, ChunkSize: cs, Streams: 1, Chunks: &all}
	if err := cw.json(frameOffer, offer); err != nil {
		t.Fatal(err)
	}
	var acc Accept
	if err := cr.json(frameAccept, &acc); err != nil {
		t.Fatal(err)
	}
	dc := p.dial(t, nil)
	data = dc
	dw, dr := newFrameWriter(dc), newFrameReader(dc)
	if err := dw.json(frameJoin, Join{ID: offer.ID}); err != nil {
		t.Fatal(err)
	}
	m := Manifest{Size: offer.Size, ChunkSize: cs, Chunks: map[int64]Hash{}}
	for i := range int64(n - 1) { // the last chunk is a hole
		b := make([]byte, cs)
		rand.Read(b)
		m.Chunks[i] = hashChunk(b)
		dw.frame(frameChunk, chunkHeader(i, m.Chunks[i], 0, cs), b)
	}
	dw.flush()
	for acked := 0; acked < n-1; {
		typ, b, err := dr.next(nil)
		if err != nil || typ != frameAck {
			t.Fatalf("ack: frame %d %v", typ, err)
		}
		idx, _ := parseAck(b)
		acked += len(idx)
	}
	// A chunk for the hole begins, and its body stops half-way.
	evil := bytes.Repeat([]byte("EVIL"), cs/4)
	dw.frame(frameChunk, chunkHeader(n-1, hashChunk(evil), 0, cs), evil[:cs/2])
	dw.flush()
	dc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := cw.json(frameCommit, Commit{Manifest: m, Root: m.Root()}); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := cr.next(nil); err != nil || typ != frameDone {
		t.Fatalf("the commit: frame %d %q %v", typ, b, err)
	}
	if err := <-dataOpen; err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the data stream as the image was stored: %v; want it ended by the receiver", err)
	}
	dc.Write(evil[cs/2:]) // the rest of the chunk, to nobody
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
		t.Fatalf("the stored image against its root: %+v %v", rep, err)
	}
}

// TestListedZeroChunkIsAHole: a sender that sends a chunk of zeros as
// data and lists it in its manifest (ours leave such chunks out) has the
// image stored with the chunk as a hole, left out of the stored manifest
// under the same root: kept there, VerifyImage, which reads zeros as a
// hole, would report the intact image damaged. A catalog record that does
// list one, from before, verifies too.
func TestListedZeroChunkIsAHole(t *testing.T) {
	p := newPair(t, "DE")
	const cs, n = 64 << 10, 4
	held := int64(3)
	offer := Offer{ID: "zerochunk0000001", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: cs * n, ChunkSize: cs, Streams: 1, Chunks: &held}
	rs := p.offerRaw(t, offer)
	cw, cr, dw, dr := rs.cw, rs.cr, rs.dw, rs.dr
	m := Manifest{Size: offer.Size, ChunkSize: cs, Chunks: map[int64]Hash{}}
	for _, i := range []int64{0, 1, 3} { // 1 all zeros, 2 a hole
		b := make([]byte, cs)
		if i != 1 {
			rand.Read(b)
		}
		m.Chunks[i] = hashChunk(b)
		dw.frame(frameChunk, chunkHeader(i, m.Chunks[i], 0, cs), b)
	}
	dw.flush()
	for acked := 0; acked < 3; {
		typ, b, err := dr.next(nil)
		if err != nil || typ != frameAck {
			t.Fatalf("ack: frame %d %q %v", typ, b, err)
		}
		idx, _ := parseAck(b)
		acked += len(idx)
	}
	if err := cw.json(frameCommit, Commit{Manifest: m, Root: m.Root()}); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := cr.next(nil); err != nil || typ != frameDone {
		t.Fatalf("the commit: frame %d %q %v", typ, b, err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	if _, listed := img.Manifest.Chunks[1]; listed || len(img.Manifest.Chunks) != 2 || img.Root != m.Root() || img.Manifest.Root() != m.Root() {
		t.Errorf("stored manifest lists %d chunks (the zero one: %v), root %s; want chunks 0 and 3 under the sender's root %s", len(img.Manifest.Chunks), listed, img.Manifest.Root(), m.Root())
	}
	legacy := *img
	legacy.Manifest.Chunks = maps.Clone(img.Manifest.Chunks)
	legacy.Manifest.Chunks[1] = m.Chunks[1]
	for _, tc := range []struct {
		name string
		rec  *ImageRecord
	}{
		{"as stored", img},
		{"listing the zero chunk", &legacy},
	} {
		if rep, err := VerifyImage(context.Background(), tc.rec); err != nil || !rep.OK {
			t.Errorf("verify the intact image, its record %s: %+v %v", tc.name, rep, err)
		}
	}
}

// TestCommitHeldToWhatWasReceived: a commit is stored only if it agrees
// with the offer and with the chunks received: its manifest of the
// offered size, its root the manifest's, each chunk it lists the one
// that arrived intact. A sender's commit is its word for what the image
// is, and the catalog, VerifyImage and the audit record take that root
// as the image's.
func TestCommitHeldToWhatWasReceived(t *testing.T) {
	p := newPair(t, "DE")
	for n, tc := range []struct {
		name string
		bend func(m *Manifest, root *Hash)
		want string
	}{
		{"a manifest of another size than offered", func(m *Manifest, root *Hash) { m.Size *= 2; *root = m.Root() }, "manifest does not match the offer"},
		{"a manifest of another chunk size than offered", func(m *Manifest, root *Hash) { m.ChunkSize /= 2; *root = m.Root() }, "manifest does not match the offer"},
		{"a root that is not the manifest's", func(m *Manifest, root *Hash) { root[0] ^= 1 }, "differs from the announced root"},
		{"a manifest naming another chunk than the one received", func(m *Manifest, root *Hash) {
			m.Chunks[0] = hashChunk([]byte("other"))
			*root = m.Root()
		}, "chunk 0 was never received intact"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			offer := Offer{ID: fmt.Sprintf("badcommit%07d", n), Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 2 * mib, ChunkSize: mib, Streams: 1}
			rs := p.offerRaw(t, offer)
			defer func() {
				rs.ctrl.Close()
				rs.data.Close()
				waitIdle(t, p.recv, offer.ID)
			}()
			chunk := make([]byte, mib)
			rand.Read(chunk)
			m := Manifest{Size: offer.Size, ChunkSize: mib, Chunks: map[int64]Hash{0: hashChunk(chunk)}}
			rs.dw.frame(frameChunk, chunkHeader(0, m.Chunks[0], 0, mib), chunk)
			rs.dw.flush()
			if typ, b, err := rs.dr.next(nil); err != nil || typ != frameAck {
				t.Fatalf("chunk 0: frame %d %q %v", typ, b, err)
			}
			root := m.Root()
			tc.bend(&m, &root)
			if err := rs.cw.json(frameCommit, Commit{Manifest: m, Root: root}); err != nil {
				t.Fatal(err)
			}
			if typ, b, err := rs.cr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), tc.want) {
				t.Fatalf("the commit: frame %d %q %v; want an error saying %q", typ, b, err, tc.want)
			}
			if img, err := p.recvJ.Image("vm"); err == nil {
				t.Fatalf("the image was stored: %+v", img)
			}
		})
	}
}

// TestReceiverFrameBounds: frames read whole are bounded by what they can
// hold before they are read. A Same frame is a chunk index and a hash; a
// commit lists at most the image's chunks. Announcing 64 MiB in either
// would make the receiver hold that much per stream, past the buffers a
// migration is admitted with.
func TestReceiverFrameBounds(t *testing.T) {
	p := newPair(t, "DE")
	open := func(id string) (*frameWriter, *frameReader) {
		c := p.dial(t, nil)
		cw, cr := newFrameWriter(c), newFrameReader(c)
		if err := cw.json(frameOffer, Offer{ID: id, Name: "vm-" + id[:4], Class: "pii-eu", Format: FormatRaw, Size: 8 * mib, ChunkSize: mib, Streams: 1}); err != nil {
			t.Fatal(err)
		}
		var acc Accept
		if err := cr.json(frameAccept, &acc); err != nil {
			t.Fatal(err)
		}
		return cw, cr
	}
	announce := func(w *frameWriter, typ byte, n uint64) {
		w.w.Write(binary.AppendUvarint([]byte{typ}, n))
		w.w.Write(make([]byte, 16)) // a start of its body, no more
		w.flush()
	}
	open("same000000000001")
	dc := p.dial(t, nil)
	dw, dr := newFrameWriter(dc), newFrameReader(dc)
	if err := dw.json(frameJoin, Join{ID: "same000000000001"}); err != nil {
		t.Fatal(err)
	}
	announce(dw, frameSame, 64<<20)
	if typ, b, err := dr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "Same frame of") {
		t.Errorf("a Same frame announcing 64 MiB: frame %d %q %v; want it refused before it is read", typ, b, err)
	}
	cw, cr := open("cmit000000000001")
	announce(cw, frameCommit, 64<<20)
	if typ, b, err := cr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "at most") {
		t.Errorf("a commit announcing 64 MiB for an image of 8 chunks: frame %d %q %v; want it refused before it is read", typ, b, err)
	}
}

// TestOfferWithoutChunksReservesAll: an offer that does not say how many
// chunks hold data may fill every one, so the store must have room for the
// whole image; a sender leaving the count out must not get past the check
// a count would have failed.
func TestOfferWithoutChunksReservesAll(t *testing.T) {
	p := newPair(t, "DE")
	free, err := freeBytes(p.store)
	if err != nil {
		t.Fatal(err)
	}
	size := (free + 20<<30) &^ (mib - 1)
	c := p.dial(t, nil)
	cw, cr := newFrameWriter(c), newFrameReader(c)
	if err := cw.json(frameOffer, Offer{ID: "nocount000000001", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: size, ChunkSize: mib, Streams: 1}); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := cr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "needs up to") {
		t.Fatalf("an offer of %d GiB without a chunk count, %d GiB free: frame %d %q %v; want it refused for room", size>>30, free>>30, typ, b, err)
	}
}

// TestAcceptIsACopy: the answer to an offer lists the chunks held from an
// earlier attempt; the session's own set of them is written by its syncer
// while the answer is encoded (it runs once registered), so the answer
// holds a copy. Encoding the live map as it is written ends the process.
func TestAcceptIsACopy(t *testing.T) {
	p := newPair(t, "DE")
	from := p.from.Attributes()
	id := "copy000000000001"
	// Started now: the receiver forgets receives abandoned for long (it
	// looks as it starts serving, maybe just now), and a record without a
	// start looks abandoned since 1970.
	rec := RecvRecord{ID: id, Name: "vm", From: from.Node, FromSite: from.Site, Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib,
		Temp: filepath.Join(p.store, ".incoming", id+".raw"), State: StateRunning, Started: time.Now()}
	if err := p.recvJ.put(bucketRecv, id, &rec); err != nil {
		t.Fatal(err)
	}
	zero := make([]byte, mib)
	if err := os.WriteFile(rec.Temp, append(zero, zero...), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.recvJ.addChunks("recv", id, map[int64]Hash{0: hashChunk(zero)}); err != nil {
		t.Fatal(err)
	}
	s, acc, err := p.recv.open(&Offer{ID: id, Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1},
		from, policy.Decision{Allowed: true}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	if len(acc.Have) != 1 {
		t.Fatalf("the answer lists %d chunks held, want 1", len(acc.Have))
	}
	s.mu.Lock()
	s.durable[3] = Hash{3}
	s.mu.Unlock()
	if len(acc.Have) != 1 {
		t.Fatal("the answer's chunks are the session's own map")
	}
}

// TestClearedChunksAreNoLongerHeld: a chunk held from an earlier attempt
// that the commit's manifest leaves out (the source has zeros there now)
// is cleared from the incoming file and forgotten with it. When the image
// then cannot be stored, the resume neither offers it as held nor reads it
// back as changed by someone else.
func TestClearedChunksAreNoLongerHeld(t *testing.T) {
	p := newPair(t, "DE")
	const cs = 64 << 10
	held := int64(2)
	offer := Offer{ID: "clearedchunk0001", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * cs, ChunkSize: cs, Streams: 1, Chunks: &held}
	rs := p.offerRaw(t, offer)
	m := Manifest{Size: offer.Size, ChunkSize: cs, Chunks: map[int64]Hash{}}
	for _, i := range []int64{0, 1} {
		b := make([]byte, cs)
		rand.Read(b)
		m.Chunks[i] = hashChunk(b)
		rs.dw.frame(frameChunk, chunkHeader(i, m.Chunks[i], 0, cs), b)
	}
	rs.dw.flush()
	for acked := 0; acked < 2; {
		typ, b, err := rs.dr.next(nil)
		if err != nil || typ != frameAck {
			t.Fatalf("ack: frame %d %q %v", typ, b, err)
		}
		idx, _ := parseAck(b)
		acked += len(idx)
	}
	// Chunk 1 is zeros by the commit; the image cannot go into place (a
	// directory holds its name).
	delete(m.Chunks, 1)
	if err := os.MkdirAll(filepath.Join(p.store, "vm.raw", "in-the-way"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := rs.cw.json(frameCommit, Commit{Manifest: m, Root: m.Root()}); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := rs.cr.next(nil); err != nil || typ != frameError {
		t.Fatalf("the commit of an image that cannot go into place: frame %d %q %v; want an error", typ, b, err)
	}
	rs.ctrl.Close()
	rs.data.Close()
	waitIdle(t, p.recv, offer.ID)
	if have, err := p.recvJ.chunks("recv", offer.ID); err != nil || len(have) != 1 || have[0] != m.Chunks[0] {
		t.Fatalf("held after the failed store: %v, %v; want chunk 0 alone (chunk 1 was cleared)", have, err)
	}
	rs = p.offerRaw(t, offer)
	defer func() {
		rs.ctrl.Close()
		rs.data.Close()
		waitIdle(t, p.recv, offer.ID)
	}()
	if _, ok := rs.acc.Have[1]; ok || len(rs.acc.Have) != 1 {
		t.Errorf("the resume is told the receiver holds %v; want chunk 0 alone", rs.acc.Have)
	}
	if log := p.recvLog.String(); strings.Contains(log, "no longer match what was received") {
		t.Errorf("the receiver took the chunk it cleared for one changed outside the gateway:\n%s", log)
	}
}
