package migrate

import (
	"bytes"
	"crypto/rand"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDirectFile writes aligned and unaligned pieces and reads them back
// through the ordinary descriptor: whichever way a piece went, the file
// holds it, and on a filesystem that offers direct I/O the aligned
// chunks took that way without being refused.
func TestDirectFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "incoming.raw")
	f, err := openDirect(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Statx_t
	supported := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st) == nil &&
		st.Mask&unix.STATX_DIOALIGN != 0 && st.Dio_offset_align != 0
	if supported != (f.direct != nil) {
		t.Fatalf("filesystem offers direct I/O: %v, direct descriptor: %v", supported, f.direct != nil)
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
		before := f.directWrites.Load()
		if err := f.writeChunk(p.b, p.off); err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
		if went := f.directWrites.Load() > before; went != (p.direct && f.direct != nil) {
			t.Errorf("%s: went direct %v", p.name, went)
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
}
