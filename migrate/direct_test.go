package migrate

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// cached reports how many of the pages of f's range [off, off+n) are in
// the page cache (mincore over a read-only mapping), and how many there
// are: a direct write leaves its range uncached, a buffered one cached.
func cached(t *testing.T, f *os.File, off, n int64) (in, pages int) {
	t.Helper()
	ps := int64(os.Getpagesize())
	start := off &^ (ps - 1)
	m, err := unix.Mmap(int(f.Fd()), start, int(off+n-start), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+int(ps)-1)/int(ps))
	// x/sys/unix has no wrapper for mincore(2) on Linux.
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	for _, v := range vec {
		in += int(v & 1)
	}
	return in, len(vec)
}

// noDirectIO reports a temporary directory without direct I/O (tmpfs):
// in CI that would leave the direct path untested, so it fails there.
func noDirectIO(t *testing.T, what string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("the temporary directory (%s) offers no direct I/O, so %s: set TMPDIR to a disk filesystem (ext4, xfs)", os.TempDir(), what)
	}
	t.Log("no direct I/O on this filesystem: " + what)
}

// TestDirectFile writes aligned and unaligned pieces: on a filesystem
// that offers direct I/O, aligned chunks bypass the page cache and the
// rest go through it; either way the file holds what was written.
func TestDirectFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "incoming.raw")
	f, err := openDirect(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, _, supported := dioAlign(f.File)
	if supported != (f.direct != nil) {
		t.Fatalf("filesystem offers direct I/O: %v, direct descriptor: %v", supported, f.direct != nil)
	}
	if !supported {
		noDirectIO(t, "only the buffered path is tested")
	}
	if err := f.Truncate(8 * mib); err != nil {
		t.Fatal(err)
	}
	aligned := alignedBuffer(mib)
	rand.Read(aligned)
	if uintptr(len(aligned)) != mib || cap(aligned) != mib {
		t.Fatalf("aligned buffer of %d bytes, capacity %d", len(aligned), cap(aligned))
	}
	odd := alignedBuffer(mib + 1)[1:] // certainly not aligned
	rand.Read(odd)
	pieces := []struct {
		name   string
		b      []byte
		off    int64
		direct bool // where the filesystem offers direct I/O
	}{
		{"aligned chunk", aligned, 2 * mib, true},
		{"unaligned address", odd, 4 * mib, false},
		{"unaligned offset", aligned, 6*mib + 1, false},
		{"offset aligned for the device but not to a page", aligned[:8192], 7*mib + 512, false},
		{"short tail", aligned[:12345], 8*mib - 12345, false},
		{"buffered over a direct write", odd, 2 * mib, false},
		{"direct over a buffered write", aligned, 4 * mib, true},
	}
	for _, p := range pieces {
		if err := f.writeChunk(p.b, p.off); err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
		in, pages := cached(t, f.File, p.off, int64(len(p.b)))
		if direct := p.direct && supported; direct && in != 0 || !direct && in != pages {
			t.Errorf("%s: %d of %d pages in the page cache, want direct %v", p.name, in, pages, direct)
		}
		got := make([]byte, len(p.b))
		if _, err := f.ReadAt(got, p.off); err != nil {
			t.Fatalf("%s: read back: %v", p.name, err)
		}
		if !bytes.Equal(got, p.b) {
			t.Fatalf("%s: read back differs", p.name)
		}
	}
	if f.direct != nil && f.refused.Load() {
		t.Fatal("the filesystem offered direct I/O and refused an aligned write")
	}
	if !supported {
		return
	}
	// A filesystem that refuses a write it was told would do: here, as
	// if it had said any address will do, an unaligned buffer. The write
	// lands through the page cache, and so do the ones after it.
	f.mem = 1
	rand.Read(odd)
	if err := f.writeChunk(odd, 2*mib); err != nil {
		t.Fatalf("a refused direct write: %v", err)
	}
	got := make([]byte, len(odd))
	if _, err := f.ReadAt(got, 2*mib); err != nil || !bytes.Equal(got, odd) || !f.refused.Load() {
		t.Fatalf("a refused direct write: read back %v, equal %v, refused %v", err, bytes.Equal(got, odd), f.refused.Load())
	}
	if err := f.writeChunk(aligned, 4*mib); err != nil {
		t.Fatal(err)
	}
	if in, pages := cached(t, f.File, 4*mib, mib); in != pages {
		t.Errorf("after a refusal, an aligned chunk: %d of %d pages in the page cache, want all", in, pages)
	}
}
