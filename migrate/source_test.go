package migrate

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// craftedQcow2 is a version-3 qcow2 header with the given cluster bits, L1
// table size and offset, and virtual size, followed by tail.
func craftedQcow2(clusterBits, l1Size uint32, size, l1Off uint64, tail ...byte) []byte {
	h := make([]byte, 104)
	copy(h, qcow2Magic)
	be := binary.BigEndian
	be.PutUint32(h[4:], 3)
	be.PutUint32(h[20:], clusterBits)
	be.PutUint64(h[24:], size)
	be.PutUint32(h[36:], l1Size)
	be.PutUint64(h[40:], l1Off)
	be.PutUint32(h[96:], 4) // refcount order
	be.PutUint32(h[100:], 104)
	return append(append(h, make([]byte, 8)...), tail...)
}

// TestOpenSourceHostileQcow2: a qcow2 header whose numbers are not an
// image's — crafted to make the reader panic or allocate gigabytes — is
// refused when the image is opened, saying what is wrong.
func TestOpenSourceHostileQcow2(t *testing.T) {
	dir := t.TempDir()
	l1 := []byte{0, 0, 0, 0, 0, 0, 2, 0} // one L1 entry: an L2 table at 512
	for _, tc := range []struct {
		name string
		img  []byte
		want string
	}{
		{"cluster_bits 63", craftedQcow2(63, 1, mib, 112, l1...), "cluster_bits 63"},
		{"cluster_bits 40", craftedQcow2(40, 1, mib, 112, l1...), "cluster_bits 40"},
		{"cluster_bits 8", craftedQcow2(8, 1, mib, 112, l1...), "cluster_bits 8"},
		{"an L1 table of 32 GB", craftedQcow2(16, 0xedff0001, mib, 112, l1...), "L1 table"},
		{"an L1 table past the end", craftedQcow2(16, 1, mib, 1<<40, l1...), "outside"},
		{"an L1 table partly past the end", craftedQcow2(16, 2, mib, 112, l1...), "outside"},
		{"an L1 table too small", craftedQcow2(16, 1, 1<<40, 112, l1...), "needs"},
		{"a virtual size of 2^62", craftedQcow2(16, 1, 1<<62, 112, l1...), "virtual size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_"))
			if err := os.WriteFile(path, tc.img, 0o600); err != nil {
				t.Fatal(err)
			}
			src, err := OpenSource(path)
			if err == nil {
				src.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "not a qcow2 image qemu would make") {
				t.Fatalf("err = %v; want it to name %q", err, tc.want)
			}
		})
	}
	// A well-formed one of the same shape opens and reads.
	good := filepath.Join(dir, "good")
	if err := os.WriteFile(good, craftedQcow2(16, 1, mib, 112, make([]byte, 8)...), 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := OpenSource(good)
	if err != nil {
		t.Fatalf("a well-formed header: %v", err)
	}
	defer src.Close()
	if ext, err := src.Extents(); err != nil || len(ext) != 0 || src.Size() != mib {
		t.Fatalf("an empty 1 MiB image: extents %v, %v, size %d", ext, err, src.Size())
	}
}

// TestOpenSourceCompressedClusters: a qcow2 whose clusters qemu
// compressed reads back as its source, a chunk at a time as a migration
// reads it: zlib, whose reader ends a small cluster's read early, and
// zstd through the bounded decoder.
func TestOpenSourceCompressedClusters(t *testing.T) {
	q := qemuImg(t)
	for _, opts := range []string{"cluster_size=512", "cluster_size=4k", "cluster_size=16k", "cluster_size=64k",
		"compression_type=zstd,cluster_size=4k", "compression_type=zstd,cluster_size=2M"} {
		t.Run(opts, func(t *testing.T) {
			dir := t.TempDir()
			raw, comp := filepath.Join(dir, "c.raw"), filepath.Join(dir, "c.qcow2")
			makeRaw(t, raw, 8*mib, map[int64]int{mib: mib, 4 * mib: 2 * mib})
			if out, err := exec.Command(q, "convert", "-c", "-O", "qcow2", "-o", opts, raw, comp).CombinedOutput(); err != nil {
				t.Fatalf("%v %s", err, out)
			}
			src, err := OpenSource(comp)
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			want, _ := os.ReadFile(raw)
			got := make([]byte, mib)
			for off := int64(0); off < int64(len(want)); off += mib {
				if err := readChunk(src, got, off); err != nil || !bytes.Equal(got, want[off:off+mib]) {
					t.Fatalf("compressed qcow2 read back differently at %d: %v", off, err)
				}
			}
		})
	}
}

// FuzzOpenSource: whatever bytes an image file holds, opening it, listing
// its extents and reading them neither panics nor runs out of memory, and
// the extents lie in order within the image.
func FuzzOpenSource(f *testing.F) {
	f.Add(craftedQcow2(16, 1, mib, 112, 0, 0, 0, 0, 0, 0, 2, 0))
	f.Add(craftedQcow2(16, 1, mib, 112, 0x40, 0, 0, 0, 0, 0, 0, 0x80))
	f.Add(craftedQcow2(9, 4, 64<<10, 112, make([]byte, 32)...))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		path := filepath.Join(dir, "img")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		src, err := OpenSource(path)
		if err != nil {
			return
		}
		defer src.Close()
		if src.Size() > 1<<40 {
			return // valid, but its extents take a while to list
		}
		ext, err := src.Extents()
		if err != nil {
			return
		}
		var last int64
		for _, e := range ext {
			if e.Off < last || e.Len <= 0 || e.Off+e.Len > src.Size() {
				t.Fatalf("extents %v of a %d-byte image", ext, src.Size())
			}
			last = e.Off + e.Len
		}
		p := make([]byte, 64<<10)
		for _, e := range ext[:min(len(ext), 4)] {
			src.ReadAt(p[:min(int64(len(p)), e.Len)], e.Off) // errors are fine; panics are not
		}
	})
}

// thinSize is the virtual size of thinQcow2's image.
const thinSize = 4 << 40

// thinQcow2 opens a thin 4 TiB qcow2 image (64 KiB clusters, made by
// qemu-img from a sparse raw file) holding a 1 MiB block at 3 MiB and a
// 64 KiB one 2 MiB before its end.
func thinQcow2(tb testing.TB) *qcow2Source {
	tb.Helper()
	q := qemuImg(tb)
	dir := tb.TempDir()
	raw, img := filepath.Join(dir, "thin.raw"), filepath.Join(dir, "thin.qcow2")
	makeRaw(tb, raw, thinSize, map[int64]int{3 * mib: mib, thinSize - 2*mib: 64 << 10})
	if out, err := exec.Command(q, "convert", "-O", "qcow2", raw, img).CombinedOutput(); err != nil {
		tb.Fatalf("%v %s", err, out)
	}
	src, err := OpenSource(img)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { src.Close() })
	return src.(*qcow2Source)
}

// TestQcow2ExtentsSkipUnmapped: the extents of a thin 4 TiB qcow2 image
// holding two blocks are those blocks, found through the L1 table: the
// stretches it maps no L2 table for are never asked about, cluster by
// cluster, and the answer equals the reader's own walk of the whole image.
func TestQcow2ExtentsSkipUnmapped(t *testing.T) {
	src := thinQcow2(t)
	got, err := src.Extents()
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{{3 * mib, mib}, {thinSize - 2*mib, 64 << 10}}
	if !slices.Equal(got, want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
	if testing.Short() {
		return
	}
	whole, err := src.extentsIn(nil, 0, src.Size())
	if err != nil || !slices.Equal(whole, want) {
		t.Fatalf("the reader's walk of the whole image: %v, %v", whole, err)
	}
}

// BenchmarkQcow2Extents: listing the extents of a thin 4 TiB qcow2 (64 KiB
// clusters) holding two blocks, through the L1 table and by the reader's
// walk of every cluster.
func BenchmarkQcow2Extents(b *testing.B) {
	q2 := thinQcow2(b)
	b.Run("l1", func(b *testing.B) {
		for b.Loop() {
			if _, err := q2.Extents(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("every-cluster", func(b *testing.B) {
		for b.Loop() {
			if _, err := q2.extentsIn(nil, 0, q2.Size()); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// rawWithQcow2Header writes a 32 MiB raw disk whose first 4 KiB are the
// header of an empty qcow2 image, as a guest may write into its sector 0,
// and whose data lies from 4 MiB on.
func rawWithQcow2Header(t *testing.T, dir string) string {
	t.Helper()
	hdr := filepath.Join(dir, "header.qcow2")
	if out, err := exec.Command(qemuImg(t), "create", "-f", "qcow2", hdr, "32M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	b, err := os.ReadFile(hdr)
	if err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{4 * mib: 28 * mib})
	f, err := os.OpenFile(raw, os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteAt(b[:4096], 0)
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// TestOpenSourceAs: a format named is the format read, whatever the
// image's first bytes say; content decides only when none is named.
func TestOpenSourceAs(t *testing.T) {
	dir := t.TempDir()
	disguised := rawWithQcow2Header(t, dir)
	plain := filepath.Join(dir, "plain.raw")
	makeRaw(t, plain, mib, map[int64]int{0: 4096})
	qcow := filepath.Join(dir, "real.qcow2")
	if out, err := exec.Command(qemuImg(t), "create", "-f", "qcow2", qcow, "1M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	for _, tc := range []struct {
		path, as, want, err string
	}{
		{disguised, "", FormatQcow2, ""}, // what detection makes of it
		{disguised, FormatRaw, FormatRaw, ""},
		{qcow, FormatQcow2, FormatQcow2, ""},
		{qcow, FormatRaw, FormatRaw, ""},
		{plain, "", FormatRaw, ""},
		{plain, FormatQcow2, "", "not a qcow2 image"},
		{plain, "vmdk", "", "use raw or qcow2"},
	} {
		src, err := OpenSourceAs(tc.path, tc.as)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s as %q: %v, want an error saying %q", filepath.Base(tc.path), tc.as, err, tc.err)
			}
			if err == nil {
				src.Close()
			}
			continue
		}
		if err != nil {
			t.Errorf("%s as %q: %v", filepath.Base(tc.path), tc.as, err)
			continue
		}
		if got := src.Format(); got != tc.want {
			t.Errorf("%s as %q: read as %s, want %s", filepath.Base(tc.path), tc.as, got, tc.want)
		}
		src.Close()
	}
}

// TestOpenSourceRefusesSnapshotsAndCorrupt: a qcow2 source with internal
// snapshots, which a migration would drop without a word, or one qemu
// marked corrupt, which it would store clean and verified, is refused
// before the reader opens it, saying how to make it one that migrates;
// and a migration of it stores nothing.
func TestOpenSourceRefusesSnapshotsAndCorrupt(t *testing.T) {
	q := qemuImg(t)
	p := newPair(t, "DE")
	run := qemuImgRunner(t, q)
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 64 << 10, 3 * mib: 4096})
	image := func(name string, opts ...string) string {
		t.Helper()
		path := filepath.Join(p.dir, name+".qcow2")
		run(append(append([]string{"convert", "-O", "qcow2"}, opts...), raw, path)...)
		return path
	}

	snap := image("snap")
	run("snapshot", "-c", "before-upgrade", snap)
	snapV2 := image("snap-v2", "-o", "compat=0.10")
	run("snapshot", "-c", "before-upgrade", snapV2)
	corrupt := image("corrupt")
	b, err := os.ReadFile(corrupt)
	if err != nil {
		t.Fatal(err)
	}
	b[79] |= 1 << 1 // incompatible_features: corrupt
	if err := os.WriteFile(corrupt, b, 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct{ path, want string }{
		{snap, "qemu-img snapshot -d"},
		{snapV2, "qemu-img convert -O qcow2"},
		{corrupt, "qemu-img check -r all"},
	} {
		name := strings.TrimSuffix(filepath.Base(tc.path), ".qcow2")
		if src, err := OpenSource(tc.path); err == nil || !strings.Contains(err.Error(), tc.want) {
			if err == nil {
				src.Close()
			}
			t.Errorf("%s: opened with %v; want a refusal saying %q", name, err, tc.want)
		}
		cfg := p.config(tc.path, "pii-eu")
		cfg.Format = FormatQcow2
		if _, err := Send(context.Background(), cfg); err == nil {
			t.Errorf("%s: migrated", name)
		}
		if img, err := p.recvJ.Image(name); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: stored as %+v (%v)", name, img, err)
		}
	}
	// The same image without its snapshot migrates.
	run("snapshot", "-d", "before-upgrade", snap)
	cfg := p.config(snap, "pii-eu")
	cfg.Format = FormatQcow2
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatalf("with its snapshot deleted: %v", err)
	}
	img, err := p.recvJ.Image("snap")
	if err != nil {
		t.Fatal(err)
	}
	compare(t, raw, img.Path)
}

// TestZeroLengthQcow2: qemu-img makes an empty qcow2 image without an L1
// table (offset 0), which the reader refuses; it opens as an empty image,
// and migrates, to raw and to qcow2, as one that verify takes.
func TestZeroLengthQcow2(t *testing.T) {
	q := qemuImg(t)
	p := newPair(t, "DE")
	src := filepath.Join(p.dir, "zero.qcow2")
	if out, err := exec.Command(q, "create", "-f", "qcow2", src, "0").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	s, err := OpenSource(src)
	if err != nil {
		t.Fatalf("a 0-byte qcow2 image made by qemu-img: %v", err)
	}
	ext, err := s.Extents()
	if err != nil || len(ext) != 0 || s.Size() != 0 || s.Format() != FormatQcow2 {
		t.Errorf("opened as a %s image of %d bytes, extents %v, %v", s.Format(), s.Size(), ext, err)
	}
	s.Close()
	for _, f := range []string{FormatRaw, FormatQcow2} {
		cfg := p.config(src, "pii-eu")
		cfg.Format, cfg.Name = f, "zero-"+f
		if _, err := Send(context.Background(), cfg); err != nil {
			t.Fatalf("as %s: %v", f, err)
		}
		img, err := p.recvJ.Image(cfg.Name)
		if err != nil {
			t.Fatal(err)
		}
		compare(t, src, img.Path)
		if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
			t.Errorf("as %s: verify: %+v, %v", f, rep, err)
		}
	}
}

// TestOpenSourceRefusesOtherFormats: an image qemu-img made in a format
// other than raw and qcow2 is refused when its format is told from its
// first bytes (or named qcow2), naming the format and how to convert it;
// the conversion it names makes an image that migrates, holding the same
// disk, and a migration of it as it is stores nothing. Named raw, it is
// read as raw. A fixed VHD and a LUKS2 container qemu-img reads as raw,
// and so do we; a LUKS1 container too, which moves encrypted as it is.
func TestOpenSourceRefusesOtherFormats(t *testing.T) {
	q := qemuImg(t)
	p := newPair(t, "DE")
	run := qemuImgRunner(t, q)
	raw := filepath.Join(p.dir, "disk.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 64 << 10, 3 * mib: 4096})
	image := func(name, format string, opts ...string) string {
		t.Helper()
		path := filepath.Join(p.dir, name)
		run(append(append([]string{"convert", "-O", format}, opts...), raw, path)...)
		return path
	}
	cases := []struct{ path, format string }{
		{image("sparse.vmdk", "vmdk"), "VMDK"},
		{image("descriptor.vmdk", "vmdk", "-o", "subformat=monolithicFlat"), "VMDK"},
		{image("stream.vmdk", "vmdk", "-o", "subformat=streamOptimized"), "VMDK"},
		{image("vm.vhdx", "vhdx"), "VHDX"},
		{image("vm.vdi", "vdi"), "VDI"},
		{image("vm.vhd", "vpc"), "VHD"},
		{image("vm.qed", "qed"), "QED"},
		{image("vm.hdd", "parallels"), "Parallels"},
		{image("vm.qcow", "qcow"), "qcow (version 1)"},
	}
	for _, tc := range cases {
		name := filepath.Base(tc.path)
		if out, err := exec.Command(q, "info", tc.path).CombinedOutput(); err != nil || strings.Contains(string(out), "file format: raw") {
			t.Fatalf("%s: qemu-img info says %v\n%s", name, err, out)
		}
		for _, as := range []string{"", FormatQcow2} {
			src, err := OpenSourceAs(tc.path, as)
			if err == nil {
				t.Errorf("%s as %q: opened as a %s image of %d bytes", name, as, src.Format(), src.Size())
				src.Close()
				continue
			}
			for _, want := range []string{"is a " + tc.format + " image", "qemu-img convert", "-O qcow2", "--source-format raw"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("%s as %q: %v; want it to say %q", name, as, err, want)
				}
			}
		}
		src, err := OpenSourceAs(tc.path, FormatRaw)
		if err != nil || src.Format() != FormatRaw {
			t.Errorf("%s named raw: %v", name, err)
		} else {
			src.Close()
		}
		cfg := p.config(tc.path, "pii-eu")
		cfg.Name = strings.ReplaceAll(name, ".", "-")
		if _, err := Send(context.Background(), cfg); err == nil {
			t.Errorf("%s: migrated", name)
		}
		if img, err := p.recvJ.Image(cfg.Name); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: stored as %+v (%v)", name, img, err)
		}
	}

	// The conversion the refusal names, run as it says, makes a qcow2
	// image of the same disk.
	for _, tc := range []struct{ path, converted string }{
		{cases[0].path, filepath.Join(p.dir, "sparse.qcow2")},
		{cases[3].path, filepath.Join(p.dir, "vm.qcow2")},
	} {
		_, err := OpenSource(tc.path)
		_, cmd, ok := strings.Cut(err.Error(), "`")
		cmd, _, ok2 := strings.Cut(cmd, "`")
		if !ok || !ok2 {
			t.Fatalf("%s: no command in %v", tc.path, err)
		}
		args := strings.Fields(cmd)
		if args[0] != "qemu-img" {
			t.Fatalf("%s: %q is no qemu-img command", tc.path, cmd)
		}
		run(args[1:]...)
		src, err := OpenSource(tc.converted)
		if err != nil || src.Format() != FormatQcow2 {
			t.Fatalf("%s, converted as told to %s: %v", tc.path, tc.converted, err)
		}
		src.Close()
		compare(t, raw, tc.converted)
	}

	// What qemu-img reads as raw is raw: a fixed VHD (its footer at the
	// end), and a LUKS2 container, such as a guest encrypting its disk
	// whole makes. And a LUKS1 container, qemu-img's "luks": moved as it
	// is, it stays encrypted. (Their headers are written here: qemu-img
	// times its key derivation, and on a busy machine refused to make
	// one, "Unable to get accurate CPU usage".)
	fixed := image("fixed.vhd", "vpc", "-o", "subformat=fixed")
	luks := func(name string, version uint16) string {
		b := make([]byte, mib)
		copy(b, "LUKS\xba\xbe")
		binary.BigEndian.PutUint16(b[6:8], version)
		copy(b[8:], "aes")
		path := filepath.Join(p.dir, name)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	luks1, luks2 := luks("vm.luks", 1), luks("luks2.raw", 2)
	for _, path := range []string{fixed, luks2} {
		if out, err := exec.Command(q, "info", path).CombinedOutput(); err != nil || !strings.Contains(string(out), "file format: raw") {
			t.Fatalf("%s: qemu-img info says %v\n%s", path, err, out)
		}
	}
	for _, path := range []string{fixed, luks2, luks1} {
		src, err := OpenSource(path)
		if err != nil {
			t.Errorf("%s: %v", filepath.Base(path), err)
			continue
		}
		if st, _ := os.Stat(path); src.Format() != FormatRaw || src.Size() != st.Size() {
			t.Errorf("%s: read as %s of %d bytes; want raw, the whole file", filepath.Base(path), src.Format(), src.Size())
		}
		src.Close()
	}
}

// TestForeignFormatSignatures: the signatures of formats qemu-img reads
// but does not make (Bochs, cloop), and the limits of those it makes,
// tell a format as qemu-img's probes do.
func TestForeignFormatSignatures(t *testing.T) {
	le := binary.LittleEndian
	head := func(parts ...any) []byte {
		b := make([]byte, probeSize)
		for i := 0; i < len(parts); i += 2 {
			off := parts[i].(int)
			switch v := parts[i+1].(type) {
			case string:
				copy(b[off:], v)
			case uint32:
				le.PutUint32(b[off:], v)
			}
		}
		return b
	}
	for _, tc := range []struct {
		name, want string
		head       []byte
	}{
		{"bochs", "Bochs", head(0, "Bochs Virtual HD Image", 32, "Redolog", 48, "Growing", 64, uint32(0x20000))},
		{"bochs v1", "Bochs", head(0, "Bochs Virtual HD Image", 32, "Redolog", 48, "Growing", 64, uint32(0x10000))},
		{"bochs flat", "", head(0, "Bochs Virtual HD Image", 32, "Redolog", 48, "Flat", 64, uint32(0x20000))},
		{"cloop", "cloop", head(0, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")},
		{"shell script", "", head(0, "#!/bin/sh\necho hello\n")},
		{"vmdk descriptor, CRLF", "VMDK", head(0, "# comment\r\n   \r\nversion=2\r\nCID=1\r\n")},
		{"vmdk descriptor, VMware's", "VMDK", head(0, "# Disk DescriptorFile\n\nversion=1\n")},
		{"comment, then text", "", head(0, "# notes\nhello\n")},
		{"parallels version 3", "", head(0, "WithoutFreeSpace", 16, uint32(3))},
		{"parallels", "Parallels", head(0, "WithoutFreeSpace", 16, uint32(2))},
		{"vdi", "VDI", head(0x40, uint32(0xbeda107f))},
		{"zeros", "", head()},
	} {
		if got := foreignFormat(tc.head); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestQcow2ReaderWarningsInOurLog: the qcow2 reader's warnings (here, a
// dirty bit lazy refcounts left, which it reads past as qemu-img does) go
// to the gateway's log at debug level, not to standard error beside it
// as WARNINGs for an image that migrates correctly.
func TestQcow2ReaderWarningsInOurLog(t *testing.T) {
	q := qemuImg(t)
	img := filepath.Join(t.TempDir(), "dirty.qcow2")
	if out, err := exec.Command(q, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "4M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var bits [8]byte
	f.ReadAt(bits[:], 72)
	binary.BigEndian.PutUint64(bits[:], binary.BigEndian.Uint64(bits[:])|1) // dirty
	f.WriteAt(bits[:], 72)
	f.Close()
	var ours, stderr bytes.Buffer
	was := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&ours, &slog.HandlerOptions{Level: slog.LevelDebug})))
	log.SetOutput(&stderr) // after: slog.SetDefault sends the log package's output to it
	defer func() {
		slog.SetDefault(was)
		log.SetOutput(os.Stderr)
	}()
	src, err := OpenSource(img)
	if err != nil {
		t.Fatal(err)
	}
	src.Close()
	if stderr.Len() != 0 {
		t.Errorf("written beside the log: %q", stderr.String())
	}
	if !strings.Contains(ours.String(), "dirty bit") {
		t.Errorf("the reader's warning is not in the log: %q", ours.String())
	}
}

// qemuImgRunner runs qemu-img (q) with the arguments given, failing the
// test if it fails.
func qemuImgRunner(t *testing.T, q string) func(args ...string) {
	return func(args ...string) {
		t.Helper()
		if out, err := exec.Command(q, args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v %s", args, err, out)
		}
	}
}

// extentsIn appends the allocated ranges of [from, to) to out, as the
// reader finds them, a cluster at a time, joining one that continues the
// last: the walk Extents replaced (and BenchmarkQcow2Extents times
// against it), and the oracle tests compare Extents with.
func (q *qcow2Source) extentsIn(out []Extent, from, to int64) ([]Extent, error) {
	for off := from; off < to; {
		e, err := q.img.Extent(off, to-off)
		if err != nil {
			return nil, fmt.Errorf("qcow2 allocation map at %d: %w", off, err)
		}
		if e.Length <= 0 {
			return nil, fmt.Errorf("qcow2 allocation map stalls at %d", off)
		}
		if end := e.Start + e.Length; end > to {
			e.Length = to - e.Start // the next stretch is asked on its own
		}
		if e.Allocated && !e.Zero {
			if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len == e.Start {
				out[n-1].Len += e.Length
			} else {
				out = append(out, Extent{e.Start, e.Length})
			}
		}
		off = e.Start + e.Length
	}
	return out, nil
}
