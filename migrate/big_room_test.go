package migrate

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"
)

// TestFragmentedImageTakesItsDataRoom: a receiver makes room for what an
// image takes written sparse, not for every chunk that touches its data
// whole. On a store with 16 MiB to be had, an image holding 256 KiB in 64
// extents, one a MiB, was refused as needing 64 MiB (an image holding
// 200 MiB in 50,000 extents as needing 50 GiB).
func TestFragmentedImageTakesItsDataRoom(t *testing.T) {
	p := newPairWith(t, "DE", tmpfsStore(t, "80m"))
	raw := filepath.Join(p.dir, "frag.raw")
	fragmented(t, raw, 64*mib)
	for _, format := range []string{FormatRaw, FormatQcow2} {
		cfg := p.config(raw, "pii-eu")
		cfg.Name, cfg.Format = "frag-"+format, format
		if _, err := Send(context.Background(), cfg); err != nil {
			t.Fatalf("%s: %v", format, err)
		}
		img, err := p.recvJ.Image(cfg.Name)
		if err != nil {
			t.Fatal(err)
		}
		compare(t, raw, img.Path)
	}
}

// TestReceiverHoldsSenderToItsBytes: a sender writes no more than the
// bytes its offer said its chunks take written sparse; what it writes
// within them counts as it goes, and the reservation says the rest.
func TestReceiverHoldsSenderToItsBytes(t *testing.T) {
	p := newPair(t, "DE")
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1,
		Chunks: new(int64(4)), Bytes: new(int64(12 << 10))}
	rs := p.offerRaw(t, offer)
	p.recv.mu.Lock()
	hold := p.recv.sessions[offer.ID].hold
	p.recv.mu.Unlock()
	journal := *offer.Chunks * journalPerChunk
	if hold.bytes != 12<<10+journal {
		t.Fatalf("reserved %d bytes, want the offer's 12 KiB and %d for the journal", hold.bytes, journal)
	}
	chunk := make([]byte, mib)
	send := func(i int64, data int) (byte, string) {
		t.Helper()
		clear(chunk)
		for k := range data {
			chunk[8192+k] = byte(k%251 + 1)
		}
		if err := rs.dw.frame(frameChunk, chunkHeader(i, hashChunk(chunk), 0, mib), chunk); err != nil {
			t.Fatal(err)
		}
		rs.dw.flush()
		typ, b, err := rs.dr.next(nil)
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		if wrote := hold.wrote.Load(); wrote > hold.bytes-journal {
			t.Fatalf("the sender was let write %d bytes against a reservation of %d", wrote, hold.bytes-journal)
		}
		return typ, string(b)
	}
	for _, i := range []int64{0, 1} {
		if typ, b := send(i, 4096); typ != frameAck {
			t.Fatalf("chunk %d, 4 KiB of data: answer %d %q, want an ack", i, typ, b)
		}
	}
	if left := hold.remaining(); left != 4<<10+journal {
		t.Fatalf("8 KiB of 12 written: %d left reserved, want 4 KiB and the journal's %d", left, journal)
	}
	if typ, b := send(2, 8192); typ != frameError || !strings.Contains(b, "more data than the 12.0 KiB the offer said its chunks hold") {
		t.Fatalf("chunk 2, 8 KiB of data beyond the 4 left: answer %d %q; want it refused", typ, b)
	}
}

// TestSparseBytesBoundsTheWrites: what an offer says its chunks take is
// at least what the receiver writes of them (sparseSize, chunk by chunk),
// whatever the chunk size, and exactly that when the extents are whole
// blocks of data.
func TestSparseBytesBoundsTheWrites(t *testing.T) {
	const size = 8*mib + 1000
	for seed := range uint64(40) {
		rnd := rand.New(rand.NewPCG(seed, 7))
		img := make([]byte, size)
		var extents []Extent
		aligned := seed%2 == 0
		for off := int64(rnd.IntN(256 << 10)); off < size; {
			n := int64(1 + rnd.IntN(200<<10))
			if aligned {
				off, n = off&^(sparseBlock-1), (n+sparseBlock-1)&^(sparseBlock-1)
			}
			n = min(n, size-off)
			for k := off; k < off+n; k++ {
				// Unaligned extents hold runs of zeros too, as data
				// read back as zeros.
				if aligned || k/3000%4 != 0 {
					img[k] = byte(1 + rnd.IntN(255))
				}
			}
			extents = append(extents, Extent{off, n})
			off += n + int64(rnd.IntN(300<<10))
		}
		for _, chunk := range []int64{4096, 5000, 64 << 10, mib, 3 * mib} {
			at := int64(rnd.IntN(4)) * mib // where the receiver writes virtual offset 0
			var wrote int64
			for i := range chunkCount(size, chunk) {
				wrote += sparseSize(img[i*chunk:i*chunk+chunkLen(i, size, chunk)], at+i*chunk)
			}
			bound := sparseBytes(extents, size, chunk)
			if wrote > bound || aligned && wrote != bound {
				t.Fatalf("seed %d, chunks of %d: %d bytes written sparse, the offer says %d (extents %v)", seed, chunk, wrote, bound, extents)
			}
		}
	}
}
