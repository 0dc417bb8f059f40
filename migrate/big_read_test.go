package migrate

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// bytesRead is what this process has read so far, files and sockets
// (rchar: holes count as what they read as).
func bytesRead(t testing.TB) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		t.Skip("no /proc/self/io: ", err)
	}
	for line := range bytes.Lines(b) {
		if v, ok := bytes.CutPrefix(line, []byte("rchar: ")); ok {
			n, err := strconv.ParseInt(string(bytes.TrimSpace(v)), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Skip("no rchar in /proc/self/io")
	return 0
}

// TestSparseImageReadInItsData: the chunks of an image with a little data
// in each are read in that data only, their holes taken as the zeros they
// are, by the sender, by migrate verify, by a re-sync copying chunks from
// the stored version and by a resume reading back what it holds. Each
// read the whole chunk through the page cache: 64 MiB for the 256 KiB of
// this image, 50 GiB for an image of 200 MiB scattered over 50 GiB.
func TestSparseImageReadInItsData(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "frag.raw")
	fragmented(t, raw, 64*mib)
	const most = 2 * mib // the data, and the frames that carry it, a few times over
	measure := func(what string, f func()) {
		t.Helper()
		before := bytesRead(t)
		f()
		n := bytesRead(t) - before
		if n > most {
			t.Errorf("%s read %d bytes of an image of 64 MiB holding 256 KiB", what, n)
		}
		t.Logf("%s read %d bytes", what, n)
	}

	cfg := p.config(raw, "pii-eu")
	measure("the migration", func() {
		if _, err := Send(context.Background(), cfg); err != nil {
			t.Fatal(err)
		}
	})
	img, err := p.recvJ.Image("frag")
	if err != nil {
		t.Fatal(err)
	}
	compare(t, raw, img.Path)
	measure("migrate verify", func() {
		if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
			t.Fatalf("verify: %+v %v", rep, err)
		}
	})

	// A re-sync: the sender reads the image, the receiver copies all but
	// the changed chunk from the stored version.
	f, err := os.OpenFile(raw, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("changed"), 5*mib+8192)
	f.Close()
	measure("the re-sync", func() {
		rec, err := Send(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if rec.Stats.ChunksSame != 63 {
			t.Fatalf("re-sync: %+v, want 63 chunks copied at the destination", rec.Stats)
		}
	})
	img, _ = p.recvJ.Image("frag")
	compare(t, raw, img.Path)

	// A resume reads back the chunks its receive holds.
	q := newPair(t, "DE")
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 64 * mib, ChunkSize: mib, Streams: 1, Chunks: new(int64(64))}
	rs := q.offerRaw(t, offer)
	chunk := make([]byte, mib)
	for i := range int64(64) {
		chunk[8192] = byte(i + 1)
		if err := rs.dw.frame(frameChunk, chunkHeader(i, hashChunk(chunk), 0, mib), chunk); err != nil {
			t.Fatal(err)
		}
	}
	rs.dw.flush()
	for held := 0; held < 64; {
		typ, b, err := rs.dr.next(nil)
		if err != nil || typ != frameAck {
			t.Fatalf("answer %d %q %v, want acks", typ, b, err)
		}
		idx, _ := parseAck(b)
		held += len(idx)
	}
	rs.ctrl.Close()
	rs.data.Close()
	waitIdle(t, q.recv, offer.ID)
	measure("the resume's read back", func() {
		rs = q.offered(t, offer)
		if len(rs.acc.Have) != 64 {
			t.Fatalf("the resume holds %d chunks, want 64", len(rs.acc.Have))
		}
	})
}
