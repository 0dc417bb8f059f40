package migrate

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// strictClusterBits is the cluster size of strictFixture's images: 4 KiB,
// so that one L2 table (512 entries) maps all of their 64 KiB.
const strictClusterBits = 12

// strictFixture makes, with qemu-img convert and the options given, a
// 64 KiB qcow2 image of 4 KiB clusters from a raw disk holding data in
// clusters 0, 2-3 and 9-10. Clusters 0 and 9 are half random: compressed,
// they take several sectors, and a size field cut to one sector no longer
// holds them.
func strictFixture(t *testing.T, opts ...string) []byte {
	t.Helper()
	dir := t.TempDir()
	raw, img := filepath.Join(dir, "a.raw"), filepath.Join(dir, "a.qcow2")
	b := make([]byte, 64<<10)
	rng := mrand.NewChaCha8([32]byte{'s', 'k', 'y'})
	for _, c := range []int{0, 9} {
		rng.Read(b[c<<12 : c<<12+2048])
		copy(b[c<<12+2048:(c+1)<<12], bytes.Repeat([]byte("half text "), 205))
	}
	copy(b[2<<12:4<<12], bytes.Repeat([]byte("skybridge compressible block "), 283))
	copy(b[10<<12:11<<12], bytes.Repeat([]byte{0x5a}, 4096))
	if err := os.WriteFile(raw, b, 0o600); err != nil {
		t.Fatal(err)
	}
	args := append(append([]string{"convert"}, opts...), "-O", "qcow2", "-o", "cluster_size=4096", raw, img)
	if out, err := exec.Command(qemuImg(t), args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v %s", args, err, out)
	}
	img2, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return img2
}

// l1Entry and l2Entry address strictFixture's tables: its one L1 entry
// and the entries of the L2 table it maps.
func l1Entry(b []byte) int { return int(binary.BigEndian.Uint64(b[40:48])) }
func l2Entry(b []byte, i int) int {
	return int(binary.BigEndian.Uint64(b[l1Entry(b):])&qcowL1OffsetMask) + 8*i
}

func get64(b []byte, at int) uint64    { return binary.BigEndian.Uint64(b[at:]) }
func put64(b []byte, at int, v uint64) { binary.BigEndian.PutUint64(b[at:], v) }
func put32(b []byte, at int, v uint32) { binary.BigEndian.PutUint32(b[at:], v) }

// compressedWithSectors is the index of an L2 entry of a compressed
// cluster whose size field counts additional sectors.
func compressedWithSectors(t *testing.T, b []byte) int {
	t.Helper()
	x := 62 - (strictClusterBits - 8)
	for i := range 16 {
		e := get64(b, l2Entry(b, i))
		if e&(1<<62) != 0 && (e>>x)&(1<<(strictClusterBits-8)-1) != 0 {
			return i
		}
	}
	t.Fatal("no compressed cluster of more than one sector")
	return 0
}

// putExtension writes a header extension of type typ that says it is n
// bytes long in front of those of a version 3 image.
func putExtension(b []byte, typ, n uint32) []byte {
	hlen := int(binary.BigEndian.Uint32(b[100:104]))
	copy(b[hlen+8:1<<strictClusterBits], b[hlen:])
	put32(b, hlen, typ)
	put32(b, hlen+4, n)
	return b
}

// lastDataCluster is the host offset of the last data cluster of an
// uncompressed strictFixture image, the file's last cluster.
func lastDataCluster(t *testing.T, b []byte) int {
	t.Helper()
	last := 0
	for i := range 16 {
		last = max(last, int(get64(b, l2Entry(b, i))&qcowL1OffsetMask))
	}
	if last+1<<strictClusterBits != len(b) {
		t.Fatalf("the last data cluster at %#x is not the file's last (%d bytes)", last, len(b))
	}
	return last
}

// readAsSent reads an image as a send does: opened with its format told
// from its first bytes, its extents listed, and only they read; what
// lies outside them is zeros.
func readAsSent(path string) ([]byte, error) {
	src, err := OpenSource(path)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	ext, err := src.Extents()
	if err != nil {
		return nil, err
	}
	out := make([]byte, src.Size())
	for _, e := range ext {
		if err := readChunk(src, out[e.Off:e.Off+e.Len], e.Off); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// TestQcow2ReadAsQemu: qcow2 images qemu refuses to read, or reads as
// other bytes than skybridge did, or whose metadata `qemu-img check`
// finds corrupt, crafted from images qemu-img made. Each is either
// refused, saying what is wrong and with the image's name, or read as
// exactly the bytes `qemu-img convert -O raw` makes of it (with the
// format told from the first bytes, as a send does). A refusal is only
// of an image qemu-img refuses to convert or finds corrupt.
func TestQcow2ReadAsQemu(t *testing.T) {
	q := qemuImg(t)
	bases := map[string][]byte{
		"v3":   strictFixture(t),
		"v2":   strictFixture(t, "-o", "compat=0.10"),
		"zlib": strictFixture(t, "-c"),
		"zstd": strictFixture(t, "-c", "-o", "compression_type=zstd"),
	}
	// What a refusal of corrupt metadata says, and the refusals that are.
	const corrupt = "qemu-img check -r all"
	corruptions := []string{"not cluster-aligned", "zero flag", "header's cluster", "past the end", "copied flag", "reserved bits"}
	far := uint64(1 << 30) // a cluster well past the end of every file here
	for _, c := range []struct {
		name, base string
		patch      func(t *testing.T, b []byte) []byte
		want       string // "": read as qemu reads it; else in the refusal
	}{
		{"as made", "v3", nil, ""},
		{"as made, version 2", "v2", nil, ""},
		{"as made, zlib", "zlib", nil, ""},
		{"as made, zstd", "zstd", nil, ""},

		// What qemu finds corrupt when it reads.
		{"L2 table not cluster-aligned", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l1Entry(b), get64(b, l1Entry(b))+512)
			return b
		}, "not cluster-aligned"},
		{"data cluster not cluster-aligned", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 0), get64(b, l2Entry(b, 0))+512)
			return b
		}, "not cluster-aligned"},
		{"zero cluster not cluster-aligned", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 1), get64(b, l2Entry(b, 0))&qcowL1OffsetMask+512|1)
			return b
		}, "not cluster-aligned"},
		{"zero flag in version 2", "v2", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 0), get64(b, l2Entry(b, 0))|1)
			return b
		}, "zero flag"},
		{"compressed size too small, zlib", "zlib", func(t *testing.T, b []byte) []byte {
			i := compressedWithSectors(t, b)
			put64(b, l2Entry(b, i), get64(b, l2Entry(b, i))&^(1<<62-1<<(62-(strictClusterBits-8))))
			return b
		}, "does not decompress"},
		{"compressed size too small, zstd", "zstd", func(t *testing.T, b []byte) []byte {
			i := compressedWithSectors(t, b)
			put64(b, l2Entry(b, i), get64(b, l2Entry(b, i))&^(1<<62-1<<(62-(strictClusterBits-8))))
			return b
		}, "does not decompress"},
		{"compressed data in the header's cluster", "zlib", func(t *testing.T, b []byte) []byte {
			i := compressedWithSectors(t, b)
			put64(b, l2Entry(b, i), get64(b, l2Entry(b, i))&^(1<<(62-(strictClusterBits-8))-1)|0x100)
			return b
		}, "header's cluster"},

		// What `qemu-img check` finds corrupt, and qemu reads as zeros
		// or reads as if it were not there.
		{"compressed data past the end", "zlib", func(t *testing.T, b []byte) []byte {
			i := compressedWithSectors(t, b)
			put64(b, l2Entry(b, i), get64(b, l2Entry(b, i))&^(1<<(62-(strictClusterBits-8))-1)|far)
			return b
		}, "past the end"},
		{"compressed cluster with the copied flag", "zlib", func(t *testing.T, b []byte) []byte {
			i := compressedWithSectors(t, b)
			put64(b, l2Entry(b, i), get64(b, l2Entry(b, i))|1<<63)
			return b
		}, "copied flag"},
		{"L1 entry with reserved bits", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l1Entry(b), get64(b, l1Entry(b))|2)
			return b
		}, "reserved bits"},
		{"L2 entry with reserved bits", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 0), get64(b, l2Entry(b, 0))|2)
			return b
		}, "reserved bits"},
		{"unallocated L2 entry with reserved bits", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 1), 2)
			return b
		}, "reserved bits"},
		{"L2 entry with a reserved high bit", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 0), get64(b, l2Entry(b, 0))|1<<56)
			return b
		}, "reserved bits"},
		{"L2 table past the end", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l1Entry(b), 1<<63|far)
			return b
		}, "past the end"},
		{"data cluster past the end", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 10), 1<<63|far)
			return b
		}, "past the end"},
		{"zero cluster past the end", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 1), far|1)
			return b
		}, "past the end"},
		{"last data cluster cut off", "v3", func(t *testing.T, b []byte) []byte {
			return b[:lastDataCluster(t, b)]
		}, "past the end"},
		{"L2 table mapped twice", "v3", func(t *testing.T, b []byte) []byte {
			// Two L1 entries, for a 4 MiB image: the table has room.
			put64(b, 24, 4<<20)
			put32(b, 36, 2)
			put64(b, l1Entry(b)+8, get64(b, l1Entry(b)))
			return b
		}, "same L2 table"},

		// What qemu reads, and so must skybridge.
		{"last data cluster cut short", "v3", func(t *testing.T, b []byte) []byte {
			return b[:lastDataCluster(t, b)+100] // qemu reads the rest as zeros
		}, ""},
		{"zero flag over a data cluster", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 0), get64(b, l2Entry(b, 0))|1)
			return b
		}, ""},
		{"copied flag alone", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, l2Entry(b, 1), 1<<63)
			return b
		}, ""},
		{"backing file offset without a name", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, 8, 0x200)
			put32(b, 16, 0)
			return b
		}, ""},
		{"dirty", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, 72, get64(b, 72)|1)
			return b
		}, ""},
		{"virtual size not whole sectors", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, 24, 64<<10-100) // qemu: 65024 bytes
			return b
		}, ""},
		{"virtual size under a sector", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, 24, 100) // qemu: none
			return b
		}, ""},
		{"version 0", "v3", func(t *testing.T, b []byte) []byte {
			put32(b, 4, 0) // qemu-img: raw
			return b
		}, ""},

		// Headers qemu refuses to open.
		{"version 4", "v3", func(t *testing.T, b []byte) []byte { put32(b, 4, 4); return b }, "--source-format raw"},
		{"version 5, version 2's header", "v2", func(t *testing.T, b []byte) []byte { put32(b, 4, 5); return b }, "version 5"},
		{"header_length 72 in version 3", "v3", func(t *testing.T, b []byte) []byte { put32(b, 100, 72); return b }, "header_length 72"},
		{"header_length past its cluster", "v3", func(t *testing.T, b []byte) []byte { put32(b, 100, 8192); return b }, "header_length 8192"},
		{"refcount_order 7", "v3", func(t *testing.T, b []byte) []byte { put32(b, 96, 7); return b }, "refcount_order 7"},
		{"compression type bit on zlib", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, 72, get64(b, 72)|1<<3)
			return b
		}, "compression type"},
		{"zstd without the compression type bit", "zstd", func(t *testing.T, b []byte) []byte {
			put64(b, 72, get64(b, 72)&^(1<<3))
			return b
		}, "compression type"},
		{"raw external data without a data file", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, 88, get64(b, 88)|2)
			return b
		}, "external data"},
		{"refcount table not cluster-aligned", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, 48, get64(b, 48)+512)
			return b
		}, "refcount table"},
		{"header extension past its cluster", "v3", func(t *testing.T, b []byte) []byte {
			return putExtension(b, 0x12345678, 1<<strictClusterBits)
		}, "header extension 0x12345678"},
		{"backing format name of 16 bytes", "v3", func(t *testing.T, b []byte) []byte {
			return putExtension(b, 0xe2792aca, 16)
		}, "backing file format"},
		{"encryption header without encryption", "v3", func(t *testing.T, b []byte) []byte {
			return putExtension(b, 0x0537be77, 16)
		}, "encryption header"},
		{"backing file offset past the header's cluster", "v3", func(t *testing.T, b []byte) []byte {
			put64(b, 8, 1<<40)
			put32(b, 16, 0)
			return b
		}, "backing file name at"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := slices.Clone(bases[c.base])
			if c.patch != nil {
				b = c.patch(t, b)
			}
			dir := t.TempDir()
			img, raw := filepath.Join(dir, "vm.qcow2"), filepath.Join(dir, "vm.raw")
			if err := os.WriteFile(img, b, 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := readAsSent(img)
			convOut, convErr := exec.Command(q, "convert", "-O", "raw", img, raw).CombinedOutput()
			if c.want == "" {
				if convErr != nil {
					t.Fatalf("qemu-img convert: %v %s", convErr, convOut)
				}
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				want, err := os.ReadFile(raw)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					i := 0
					for i < min(len(got), len(want)) && got[i] == want[i] {
						i++
					}
					t.Fatalf("read %d bytes, qemu-img %d: they differ from byte %d", len(got), len(want), i)
				}
				return
			}
			if err == nil {
				t.Fatalf("read %d bytes (qemu-img convert: %v %s)", len(got), convErr, bytes.TrimSpace(convOut))
			}
			for _, w := range []string{c.want, img} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("refused with %q; want it to say %q", err, w)
				}
			}
			if slices.Contains(corruptions, c.want) && !strings.Contains(err.Error(), corrupt) {
				t.Errorf("refused with %q; want it to say how to repair it (%s)", err, corrupt)
			}
			// A shared L2 table is no corruption once the refcounts
			// say so, which a repair makes them: a copy is flattened.
			if c.want == "same L2 table" && (strings.Contains(err.Error(), corrupt) || !strings.Contains(err.Error(), "qemu-img convert -O qcow2")) {
				t.Errorf("refused with %q; want it to say to flatten a copy, not to repair it", err)
			}
			// Refused only what qemu refuses, or finds corrupt.
			if convErr == nil {
				chk, err := exec.Command(q, "check", img).CombinedOutput()
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() != 2 {
					t.Errorf("qemu-img reads it, and its check finds no corruption (%v):\n%s", err, chk)
				}
			}
		})
	}
}

// TestQcow2ExtentsFromL2Tables: the extents read from the L2 tables are
// the reader's own, cluster by cluster, for images with compressed,
// zero and unallocated clusters, and a last cluster the virtual size
// cuts.
func TestQcow2ExtentsFromL2Tables(t *testing.T) {
	zeros := filepath.Join(t.TempDir(), "zeros.qcow2")
	if err := os.WriteFile(zeros, strictFixture(t), 0o600); err != nil {
		t.Fatal(err)
	}
	// A zero cluster over data, keeping its cluster, and one that frees
	// it.
	if qio, err := exec.LookPath("qemu-io"); err == nil {
		if out, err := exec.Command(qio, "-f", "qcow2", "-c", "write -z 0 4k", "-c", "write -z -u 36k 4k", zeros).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io: %v %s", err, out)
		}
	}
	cut := filepath.Join(t.TempDir(), "cut.qcow2")
	b := strictFixture(t)
	put64(b, 24, 10<<12+1024) // in the middle of cluster 10
	if err := os.WriteFile(cut, b, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, img := range []string{zeros, cut, writeFile(t, "zlib.qcow2", strictFixture(t, "-c")), writeFile(t, "v2.qcow2", strictFixture(t, "-o", "compat=0.10"))} {
		src, err := OpenSource(img)
		if err != nil {
			t.Fatal(err)
		}
		q2 := src.(*qcow2Source)
		got, err := q2.Extents()
		if err != nil {
			t.Fatalf("%s: %v", img, err)
		}
		want, err := q2.extentsIn(nil, 0, q2.Size())
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("%s: extents %v; the reader's walk %v, %v", filepath.Base(img), got, want, err)
		}
		src.Close()
	}
}

func writeFile(t *testing.T, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestQcow2ExtentsCostBoundedByFile: an image of 2 MiB clusters and a
// 1 PiB virtual size whose 2048 L1 entries all map one L2 table of zeros
// (6 MiB on disk) had its extents listed by asking the reader about each
// of its 2^29 clusters (41 s of CPU). An L2 table mapped twice is
// refused, from the L1 table.
func TestQcow2ExtentsCostBoundedByFile(t *testing.T) {
	const cs = 2 << 20
	const size = MaxImageSize
	l1n := uint64(size / (cs / 8 * cs))
	b := make([]byte, 3*cs)
	copy(b, qcow2Magic)
	put32(b, 4, 3)
	put32(b, 20, 21)
	put64(b, 24, size)
	put32(b, 36, uint32(l1n))
	put64(b, 40, cs) // L1 table at cluster 1
	put32(b, 96, 4)
	put32(b, 100, 104)
	for i := range l1n {
		put64(b, int(cs+8*i), 1<<63|2*cs) // L2 table of zeros at cluster 2
	}
	img := writeFile(t, "mapped.qcow2", b)
	src, err := OpenSource(img)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	done := make(chan error, 1)
	go func() {
		_, err := src.Extents()
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "same L2 table") || !strings.Contains(err.Error(), img) {
			t.Fatalf("extents listed with %v; want the L2 table mapped twice refused", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("still listing the extents after 30 s")
	}
}

// TestSendRefusesCorruptQcow2BeforeSending: an image whose L1 table maps
// an L2 table 512 bytes into its cluster read as an empty disk (the L2
// entries read from the wrong place, zeros) and migrated as one, which
// verified. It is refused before the receiver is dialled, with no
// migration recorded.
func TestSendRefusesCorruptQcow2BeforeSending(t *testing.T) {
	p := newPair(t, "DE")
	b := strictFixture(t)
	put64(b, l1Entry(b), get64(b, l1Entry(b))+512)
	img := filepath.Join(p.dir, "vm.qcow2")
	if err := os.WriteFile(img, b, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := p.config(img, "pii-eu")
	dialled := 0
	cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
		dialled++
		return nil, fmt.Errorf("dialled %s", addr)
	}
	rec, err := Send(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "qemu-img check -r all") {
		t.Fatalf("sent with %v; want a refusal saying how to repair the image", err)
	}
	if rec != nil || dialled != 0 {
		t.Fatalf("refused after the migration began: record %+v, %d dials", rec, dialled)
	}
	if sends, err := p.sendJ.Sends(); err != nil || len(sends) != 0 {
		t.Fatalf("journal: %v, %v", sends, err)
	}
}
