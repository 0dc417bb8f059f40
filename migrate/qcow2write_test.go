package migrate

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
)

// TestQcow2Writers: both ways skybridge writes qcow2 — converting an
// assembled raw image (receptions begun by an older version), and writing
// the metadata in front of data received in place — give images that
// qemu-img checks clean and reads back identical to the raw original,
// for an empty image, a size that is no multiple of a cluster, and data
// across cluster, L2 and chunk boundaries; the in-place image keeps its
// holes.
func TestQcow2Writers(t *testing.T) {
	q := qemuImg(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		name   string
		size   int64
		blocks map[int64]int
	}{
		{"empty", 0, nil},
		{"one sector", 512, map[int64]int{0: 512}},
		{"sparse", 1<<30 + 12345, map[int64]int{0: 4096, 5*mib - 100: 300, 512*mib - 10: 20, 600 * mib: 3 * mib, 1<<30 + 12345 - 1000: 1000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := filepath.Join(dir, tc.name+".raw")
			makeRaw(t, raw, tc.size, tc.blocks)
			src, err := os.Open(raw)
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()

			converted := filepath.Join(dir, tc.name+".converted.qcow2")
			if err := convertToQcow2(src, tc.size, converted); err != nil {
				t.Fatal(err)
			}

			// In place: the data at base + offset, as a receiver writes it.
			inPlace := filepath.Join(dir, tc.name+".inplace.qcow2")
			base := qcowDataStart(tc.size)
			if base%mib != 0 || base <= 0 {
				t.Fatalf("data start %d: want a positive multiple of 1 MiB", base)
			}
			f, err := os.Create(inPlace)
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(base + tc.size); err != nil {
				t.Fatal(err)
			}
			for off, n := range tc.blocks {
				b := make([]byte, n)
				if _, err := src.ReadAt(b, off); err != nil {
					t.Fatal(err)
				}
				if _, err := f.WriteAt(b, base+off); err != nil {
					t.Fatal(err)
				}
			}
			if err := finishQcow2InPlace(f, tc.size, base); err != nil {
				t.Fatal(err)
			}
			var st syscall.Stat_t
			if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if used := st.Blocks * 512; used > 16*mib {
				t.Errorf("the in-place image occupies %d bytes on disk for %d bytes of data: its holes were filled", used, len(tc.blocks)*4*mib)
			}

			for _, img := range []string{converted, inPlace} {
				if out, err := exec.Command(q, "check", img).CombinedOutput(); err != nil || !strings.Contains(string(out), "No errors were found") {
					t.Fatalf("qemu-img check %s: %v\n%s", filepath.Base(img), err, out)
				}
				compare(t, raw, img)
				// And skybridge's own reader (migrate verify, re-sync) reads it.
				s, err := OpenSource(img)
				if err != nil {
					t.Fatal(err)
				}
				if s.Format() != FormatQcow2 || s.Size() < tc.size {
					t.Errorf("%s opens as %s of %d bytes", filepath.Base(img), s.Format(), s.Size())
				}
				s.Close()
			}
		})
	}
	if err := finishQcow2InPlace(nil, 1<<20, 12345); err == nil {
		t.Error("a data start that is not the layout's must be refused")
	}
}

// TestQcow2InPlaceLargeSparse: the metadata of a large image holding
// little data costs memory and writes in proportion to the data, not to
// the virtual size (refcount blocks were made for the whole host file:
// 64 MiB here, 512 MiB for 16 TiB), and qemu-img still checks it clean
// and reads it back identical.
func TestQcow2InPlaceLargeSparse(t *testing.T) {
	q := qemuImg(t)
	dir := t.TempDir()
	const size = 2 << 40
	raw, img, f, base := receivedInPlace(t, dir, "large", size, map[int64]int{0: 4096, 1 << 40: mib, size - 1000: 1000})
	if alloc := finishAllocating(t, f, size, base); alloc > 8*mib {
		t.Errorf("writing the metadata of a %d TiB image holding 3 blocks allocated %d MiB", size>>40, alloc/mib)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 8*mib {
		t.Errorf("the image occupies %d MiB on disk for 3 blocks of data", used/mib)
	}
	// What a receiver makes room for covers it: 3 chunks and their metadata.
	if used, room := st.Blocks*512, 3*mib+qcowMetaBytes(size, 3, mib); used > room {
		t.Errorf("the image occupies %d bytes on disk; a receiver makes room for %d", used, room)
	}
	if out, err := exec.Command(q, "check", img).CombinedOutput(); err != nil || !strings.Contains(string(out), "No errors were found") {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	compare(t, raw, img)
}

// TestQcow2InPlaceScattered: a large disk whose little data is scattered
// over all of it (a file system's metadata every so often) touches an L2
// table and a refcount block per place. They are written as the walk
// passes them, not held: holding them took 128 KiB a place, 2.5 GiB for
// a 16 TiB disk with data every 2 GiB.
func TestQcow2InPlaceScattered(t *testing.T) {
	q := qemuImg(t)
	dir := t.TempDir()
	const size, every = 8 << 40, 8 << 30 // 1,024 places (ext4 holds files below 16 TiB)
	blocks := map[int64]int{}
	for off := int64(0); off < size; off += every {
		blocks[off+every/2] = 4096
	}
	raw, img, f, base := receivedInPlace(t, dir, "scattered", size, blocks)
	if alloc := finishAllocating(t, f, size, base); alloc > 8*mib {
		t.Errorf("writing the metadata of an 8 TiB image with data in 1,024 places allocated %d MiB", alloc/mib)
	}
	if out, err := exec.Command(q, "check", img).CombinedOutput(); err != nil || !strings.Contains(string(out), "No errors were found") {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	compare(t, raw, img)
}

// receivedInPlace makes a raw image NAME.raw of size bytes with data
// blocks, and NAME.qcow2 as a receiver leaves it before its commit: the
// same data at the in-place layout's base, open for finishQcow2InPlace
// until the test ends.
func receivedInPlace(t *testing.T, dir, name string, size int64, blocks map[int64]int) (raw, img string, f *os.File, base int64) {
	t.Helper()
	raw, img = filepath.Join(dir, name+".raw"), filepath.Join(dir, name+".qcow2")
	makeRaw(t, raw, size, blocks)
	src, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if f, err = os.Create(img); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	base = qcowDataStart(size)
	if err := f.Truncate(base + size); err != nil {
		t.Fatal(err)
	}
	for off, n := range blocks {
		b := make([]byte, n)
		if _, err := src.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(b, base+off); err != nil {
			t.Fatal(err)
		}
	}
	return raw, img, f, base
}

// finishAllocating runs finishQcow2InPlace and returns the bytes it
// allocated.
func finishAllocating(t *testing.T, f *os.File, size, base int64) uint64 {
	t.Helper()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if err := finishQcow2InPlace(f, size, base); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}
