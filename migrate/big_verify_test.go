package migrate

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestVerifyCostsTheData: migrate verify of a stored image costs its
// data, not its size in chunks. A qcow2 image of a pebibyte (a 16 MiB
// file), stored in 4 KiB chunks, holds 64 KiB of data: verified, it is
// 16 chunks read, where every one of its 2^38 chunks was compared with the
// manifest, for hours.
func TestVerifyCostsTheData(t *testing.T) {
	q := qemuImg(t)
	qio, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("qemu-io not installed")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "huge.qcow2")
	const size, at = int64(MaxImageSize), int64(1) << 40
	if out, err := exec.Command(q, "create", "-q", "-f", "qcow2", path, fmt.Sprint(size)).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if out, err := exec.Command(qio, "-f", "qcow2", "-c", fmt.Sprintf("write -P 7 %d 4096", at), path).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	block := make([]byte, 4096)
	for k := range block {
		block[k] = 7
	}
	m := Manifest{Size: size, ChunkSize: MinChunkSize, Chunks: map[int64]Hash{at / MinChunkSize: hashChunk(block)}}
	rec := &ImageRecord{Name: "huge", Path: path, Format: FormatQcow2, Root: m.Root(), Manifest: m}

	type result struct {
		rep *VerifyReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := VerifyImage(context.Background(), rec)
		done <- result{rep, err}
	}()
	select {
	case r := <-done:
		if r.err != nil || !r.rep.OK || r.rep.BytesRead != 64<<10 {
			t.Fatalf("verify: %+v %v; want it intact, its 64 KiB cluster read", r.rep, r.err)
		}
	case <-time.After(time.Minute):
		t.Fatal("verify of 64 KiB of data in a pebibyte image of 4 KiB chunks still runs after a minute")
	}

	// A chunk changed is still named, and one the manifest does not list.
	rec.Manifest = Manifest{Size: size, ChunkSize: MinChunkSize, Chunks: map[int64]Hash{at/MinChunkSize + 1: hashChunk(block)}}
	rec.Root = rec.Manifest.Root()
	rep, err := VerifyImage(context.Background(), rec)
	if err != nil || rep.OK || fmt.Sprint(rep.BadChunks) != fmt.Sprint([]int64{at / MinChunkSize, at/MinChunkSize + 1}) {
		t.Fatalf("verify against another manifest: %+v %v; want chunks %d and %d named", rep, err, at/MinChunkSize, at/MinChunkSize+1)
	}
}

// TestDataIn: what a read of a range costs is its bytes in the extents.
func TestDataIn(t *testing.T) {
	ext := []Extent{{Off: 0, Len: 10}, {Off: 20, Len: 5}, {Off: 100, Len: 50}}
	for _, tc := range []struct{ off, n, want int64 }{
		{0, 200, 65},
		{0, 10, 10},
		{5, 20, 10},   // 5..10 and 20..25
		{10, 10, 0},   // the hole between
		{22, 100, 25}, // 22..25 and 100..122
		{140, 60, 10},
		{150, 10, 0},
	} {
		if got := dataIn(ext, tc.off, tc.n); got != tc.want {
			t.Errorf("dataIn(%d, %d) = %d, want %d", tc.off, tc.n, got, tc.want)
		}
	}
	if got := dataIn(nil, 0, 100); got != 0 {
		t.Errorf("no extents: %d", got)
	}
}
