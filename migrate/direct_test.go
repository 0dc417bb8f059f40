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
	odd := make([]byte, mib+1)
	rand.Read(odd)
	pieces := []struct {
		name string
		b    []byte
		off  int64
	}{
		{"aligned chunk", aligned, 2 * mib},
		{"unaligned address", odd[1:], 4 * mib},
		{"unaligned offset", aligned, 6*mib + 512},
		{"short tail", aligned[:12345], 8*mib - 12345},
		{"overwrite through the other descriptor", odd[:mib], 2 * mib},
	}
	for _, p := range pieces {
		if err := f.writeChunk(p.b, p.off); err != nil {
			t.Fatalf("%s: %v", p.name, err)
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
