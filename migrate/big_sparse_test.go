package migrate

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// diskBytes is what path takes on its disk.
func diskBytes(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// fragmented writes a raw image of size bytes holding 4 KiB of data 8 KiB
// into each MiB: a thin disk whose file system scattered its blocks, one
// extent a chunk.
func fragmented(t testing.TB, path string, size int64) {
	t.Helper()
	blocks := map[int64]int{}
	for off := int64(0); off+mib <= size; off += mib {
		blocks[off+8192] = 4096
	}
	makeRaw(t, path, size, blocks)
}

// TestStoredImageStaysSparse: an image with a little data in each chunk
// takes at the destination about what it takes at the source, raw or
// qcow2, sent whole or re-synced from the stored version. Chunks were
// written whole: 4 KiB of data a MiB took a MiB, a 200 MiB image
// scattered over 50 GiB took 50 GiB.
func TestStoredImageStaysSparse(t *testing.T) {
	q := qemuImg(t)
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "frag.raw")
	// Not a multiple of the chunk size: the last chunk is short, and ends
	// in a block cut short.
	const size = 64*mib + 5000
	fragmented(t, raw, size)
	have := diskBytes(t, raw) // 256 KiB
	for _, format := range []string{FormatRaw, FormatQcow2} {
		t.Run(format, func(t *testing.T) {
			cfg := p.config(raw, "pii-eu")
			cfg.Format, cfg.Name = format, "frag-"+format
			if _, err := Send(context.Background(), cfg); err != nil {
				t.Fatal(err)
			}
			img, err := p.recvJ.Image(cfg.Name)
			if err != nil {
				t.Fatal(err)
			}
			compare(t, raw, img.Path)
			// qcow2 adds its header, L1, an L2 table and refcounts.
			if got := diskBytes(t, img.Path); got > have+512<<10 {
				t.Fatalf("the destination takes %d bytes on disk for %d at the source", got, have)
			}
			if format == FormatQcow2 {
				if out, err := exec.Command(q, "check", img.Path).CombinedOutput(); err != nil {
					t.Fatalf("qemu-img check: %v\n%s", err, out)
				}
			}

			// Re-synced, the unchanged chunks are copied from the stored
			// version, and stay sparse too.
			f, err := os.OpenFile(raw, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt([]byte("changed"), 3*mib+8192)
			f.Close()
			rec, err := Send(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if rec.Stats.ChunksSame < 60 {
				t.Fatalf("re-sync: %+v, want the unchanged chunks copied at the destination", rec.Stats)
			}
			img, err = p.recvJ.Image(cfg.Name)
			if err != nil {
				t.Fatal(err)
			}
			compare(t, raw, img.Path)
			if got := diskBytes(t, img.Path); got > have+512<<10 {
				t.Fatalf("re-synced, the destination takes %d bytes on disk for %d at the source", got, have)
			}
			if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
				t.Fatalf("verify: %+v %v", rep, err)
			}
		})
	}
}

// TestResentHeldChunkFillsItsHoles: a chunk held from an earlier attempt
// holds only its data's room, its zeros left holes; a sender that writes
// it again, unchanged as far as the receiver knows, may fill them, and it
// is held to the room reserved as for a new chunk. One found changed when
// read back has its holes allocated before the transfer, as its room.
func TestResentHeldChunkFillsItsHoles(t *testing.T) {
	p := newPair(t, "DE")
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1, Chunks: new(int64(2))}
	chunk := make([]byte, mib)
	send := func(rs *rawSession, i int64, dense bool) (byte, string) {
		t.Helper()
		clear(chunk)
		chunk[0] = byte(i + 1)
		if dense {
			for k := range chunk {
				chunk[k] = byte(k%251 + 1)
			}
		}
		if err := rs.dw.frame(frameChunk, chunkHeader(i, hashChunk(chunk), 0, mib), chunk); err != nil {
			t.Fatal(err)
		}
		rs.dw.flush()
		typ, b, err := rs.dr.next(nil)
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		return typ, string(b)
	}
	attempt := func() *rawSession {
		rs := p.offerRaw(t, offer)
		t.Cleanup(func() { rs.ctrl.Close(); rs.data.Close() })
		return rs
	}
	end := func(rs *rawSession) {
		rs.ctrl.Close()
		rs.data.Close()
		waitIdle(t, p.recv, offer.ID)
	}

	rs := attempt()
	for _, i := range []int64{0, 1} {
		if typ, b := send(rs, i, false); typ != frameAck {
			t.Fatalf("chunk %d: answer %d %q, want an ack", i, typ, b)
		}
	}
	end(rs)
	incoming := filepath.Join(p.store, ".incoming", offer.ID+".raw")
	if got := diskBytes(t, incoming); got > 64<<10 {
		t.Fatalf("two chunks of 4 KiB of data take %d bytes in the incoming file", got)
	}

	// Both are held; the resume has no room for more. Chunk 0 written
	// again, filled, would take a MiB nobody made room for.
	rs = attempt()
	if len(rs.acc.Have) != 2 {
		t.Fatalf("the resume holds %d chunks, want 2", len(rs.acc.Have))
	}
	if typ, b := send(rs, 0, true); typ != frameError || !strings.Contains(b, "more new chunks than the 0 the store made room for") {
		t.Fatalf("a held chunk filled, no room made for it: answer %d %q; want it refused", typ, b)
	}
	end(rs)

	// Chunk 1 changed where it lies, in one of its holes: read back, it
	// is found changed, and its room is made whole before it comes again.
	f, err := os.OpenFile(incoming, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("scribbled"), mib+mib/2)
	f.Close()
	before := diskBytes(t, incoming)
	rs = attempt()
	if _, held := rs.acc.Have[1]; held {
		t.Fatal("chunk 1, changed, is still offered as held")
	}
	if got := diskBytes(t, incoming); got < before+mib-64<<10 {
		t.Fatalf("the incoming file takes %d bytes, %d before the resume: chunk 1's holes were not given back as its room", got, before)
	}
	if typ, b := send(rs, 1, true); typ != frameAck {
		t.Fatalf("chunk 1 again, filled, in its own room: answer %d %q, want an ack", typ, b)
	}
	end(rs)
}
