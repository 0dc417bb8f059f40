package migrate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
	"github.com/lima-vm/go-qcow2reader/image"
	"github.com/lima-vm/go-qcow2reader/image/qcow2"
	qcowlog "github.com/lima-vm/go-qcow2reader/log"
	"golang.org/x/sys/unix"
)

// Formats of images.
const (
	FormatRaw   = "raw"
	FormatQcow2 = "qcow2"
)

// Extent is a byte range of an image that may hold data; everything
// outside the extents reads as zeros and is never read.
type Extent struct{ Off, Len int64 }

// Source is an image to migrate. ReadAt must be safe for concurrent use.
type Source interface {
	io.ReaderAt
	Format() string
	Size() int64 // virtual size in bytes
	// Extents lists the allocated ranges in order. The cost of a
	// migration grows with their total length, not with Size.
	Extents() ([]Extent, error)
	Close() error
}

var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

func init() {
	// The reader's warnings (a dirty bit it reads past, as qemu-img
	// does) went to standard error beside the gateway's log, as
	// WARNINGs, for images that migrate correctly.
	qcowlog.SetWarnFunc(func(s string) { slog.Debug("qcow2 reader: " + s) })
	// The reader asks a compressed cluster's decompressor for its bytes
	// with one Read and takes an error, io.EOF included, as the read's
	// end: flate returns a cluster that fits its 32 KiB window with
	// io.EOF, and either decompressor may return less than asked. Each is
	// wrapped to fill what it is asked for.
	qcow2.SetDecompressor(qcow2.CompressionTypeZlib, func(r io.Reader) (io.ReadCloser, error) {
		return fullReads{flate.NewReader(compressedInput(r))}, nil // raw deflate, no zlib header
	})
	qcow2.SetDecompressor(qcow2.CompressionTypeZstd, func(r io.Reader) (io.ReadCloser, error) {
		// A compressed cluster decompresses to one cluster (2 MiB at
		// most): a frame that asks for a larger window is not one, and
		// would have each read allocate what it asks (512 MiB for 25
		// bytes of a crafted image).
		d, err := zstd.NewReader(compressedInput(r), zstd.WithDecoderMaxWindow(qcowMaxCluster), zstd.WithDecoderMaxMemory(2*qcowMaxCluster),
			zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
		if err != nil {
			return nil, err
		}
		return fullReads{d.IOReadCloser()}, nil
	})
}

// fullReads reads until p is full, and says nothing of an end reached
// with it: only a cluster that decompresses short is an error, and not an
// end of the image (the reader asks for no more than the cluster holds).
type fullReads struct{ io.ReadCloser }

func (r fullReads) Read(p []byte) (int, error) {
	n, err := io.ReadFull(r.ReadCloser, p)
	if err != nil {
		err = fmt.Errorf("%w: %w", errCompressedCluster, err)
	}
	return n, err
}

// errCompressedCluster is a compressed cluster that does not decompress
// to a whole cluster from the bytes its L2 entry gives it.
var errCompressedCluster = errors.New("compressed cluster does not decompress to a whole cluster from the bytes its L2 entry gives it")

// compressedInput is what qemu decompresses a compressed cluster from:
// the sectors its L2 entry's size field counts, from its offset on
// (qcow2_parse_compressed_l2_entry). The reader hands the decompressor a
// whole cluster more than that, so a cluster whose size field is too
// small read here as data, where qemu fails to read it. The section it
// hands over says where the data starts, and its length the size field:
// a cluster, and 512 bytes for each sector the field counts past the
// first.
func compressedInput(r io.Reader) io.Reader {
	sr, ok := r.(*io.SectionReader)
	if !ok {
		return r
	}
	ra, off, n := sr.Outer()
	f, ok := ra.(*qcowFile)
	if !ok {
		return r
	}
	extra := n - int64(1)<<f.clusterBits
	return io.NewSectionReader(ra, off, extra+qcowSector-off%qcowSector)
}

// OpenSource opens a raw or qcow2 image, detecting the format by content,
// as qemu-img does, and refuses one whose first bytes say it is of
// another format qemu-img knows (VMDK, VHDX, VDI, ...). Only for an image
// whose format nobody recorded: a guest writes what it likes into sector
// 0 of a raw disk, a qcow2 header included, and its disk would then be
// read as the image that header describes. OpenSourceAs opens an image as
// a format known otherwise.
func OpenSource(path string) (Source, error) { return OpenSourceAs(path, "") }

// OpenSourceAs opens an image as format: raw is read as raw whatever its
// first bytes hold; qcow2 must start with the qcow2 magic; "" detects the
// format by content (OpenSource). Only raw opens an image whose first
// bytes name another format.
func OpenSourceAs(path, format string) (Source, error) {
	if err := checkSourceFormat(format); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open image: %w", err)
	}
	// Past a short file's end the bytes probed stay zeros, as qemu-img's
	// do.
	head := make([]byte, probeSize)
	f.ReadAt(head, 0)
	hasMagic := bytes.HasPrefix(head, qcow2Magic)
	// qemu-img takes the magic for qcow2 only with a version of 2 or more
	// (1 is qcow's, which foreignFormat names): with version 0 it reads
	// the image as raw, and so do we, or a raw disk whose guest wrote
	// such bytes would be refused here and read by qemu.
	isQcow2 := hasMagic && binary.BigEndian.Uint32(head[4:8]) >= 2
	if name := foreignFormat(head); name != "" && format != FormatRaw {
		f.Close()
		return nil, foreignFormatError(path, name)
	}
	switch {
	case format == FormatQcow2 && !hasMagic:
		f.Close()
		return nil, fmt.Errorf("%s does not start with the qcow2 magic: it is not a qcow2 image; open it as raw if it is a raw disk", path)
	case format == FormatQcow2, format == "" && isQcow2:
		return openQcow2(path, f)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if st.Size() > MaxImageSize {
		f.Close()
		return nil, fmt.Errorf("%s: %d bytes, more than the %d a migration can describe", path, st.Size(), int64(MaxImageSize))
	}
	return &rawSource{f: f, size: st.Size()}, nil
}

// probeSize is how much of an image qemu-img reads to tell its format.
const probeSize = 512

// foreignFormat names the format other than raw and qcow2 that head (an
// image's first probeSize bytes) says the image is, by the signatures
// qemu-img tells formats by, or "". Read as raw, such an image migrates
// as a disk holding the container, not the guest's disk: the VMDK
// qemu-img makes of a 64 MiB disk arrives as a 64 KiB one, verified
// intact. A fixed VHD, its footer at the end, qemu-img reads as raw, and
// it is one: the guest's disk followed by a 512-byte sector. A LUKS
// container (qemu-img reads version 1 as LUKS, version 2 as raw) is read
// as raw too: its bytes are the image, and move as they are, encrypted;
// converted, it would travel and rest decrypted. qemu-img also takes a
// file named *.dmg for a DMG image: a name is no content.
func foreignFormat(head []byte) string {
	le, be := binary.LittleEndian, binary.BigEndian
	at := func(off int, s string) bool { return bytes.HasPrefix(head[off:], []byte(s)) }
	has := func(s string) bool { return at(0, s) }
	switch {
	case has("QFI\xfb") && be.Uint32(head[4:8]) == 1:
		return "qcow (version 1)"
	case has("KDMV"), has("COWD"), vmdkDescriptor(head), has("# Disk DescriptorFile"):
		// The last is how VMware starts a descriptor, which qemu-img
		// takes only when the version line follows.
		return "VMDK"
	case has("vhdxfile"):
		return "VHDX"
	case le.Uint32(head[0x40:0x44]) == 0xbeda107f:
		return "VDI"
	case has("conectix"):
		return "VHD"
	case has("QED\x00"):
		return "QED"
	case (has("WithoutFreeSpace") || has("WithouFreSpacExt")) && le.Uint32(head[16:20]) == 2:
		return "Parallels"
	case has("Bochs Virtual HD Image\x00") && at(32, "Redolog\x00") && at(48, "Growing\x00") &&
		(le.Uint32(head[64:68]) == 0x20000 || le.Uint32(head[64:68]) == 0x10000):
		return "Bochs"
	case has("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"):
		return "cloop"
	}
	return ""
}

// vmdkDescriptor says whether head is a VMDK descriptor as qemu-img tells
// one: comment and blank lines, then a version line.
func vmdkDescriptor(head []byte) bool {
	for p := head; len(p) > 0; {
		switch p[0] {
		case '#':
			_, p, _ = bytes.Cut(p, []byte("\n"))
			continue
		case ' ':
			p = bytes.TrimLeft(p, " ")
			p = bytes.TrimPrefix(p, []byte("\r"))
			if len(p) == 0 || p[0] != '\n' {
				return false
			}
			p = p[1:]
			continue
		}
		for _, v := range []string{"version=1", "version=2", "version=3"} {
			if rest, ok := bytes.CutPrefix(p, []byte(v)); ok && (bytes.HasPrefix(rest, []byte("\n")) || bytes.HasPrefix(rest, []byte("\r\n"))) {
				return true
			}
		}
		return false
	}
	return false
}

// foreignFormatError refuses an image of a format skybridge does not
// read, saying how to make it one it does.
func foreignFormatError(path, name string) error {
	out := strings.TrimSuffix(path, filepath.Ext(path)) + ".qcow2"
	if out == path {
		out = strings.TrimSuffix(path, ".qcow2") + "-converted.qcow2"
	}
	convert := fmt.Sprintf("qemu-img convert -O qcow2 %s %s", path, out)
	return fmt.Errorf("%s is a %s image, as its first bytes say: skybridge migrates raw and qcow2 images; convert it first, `%s`, and migrate that; or, if it is a raw disk whose guest wrote those bytes at its start, migrate it with its source format named raw (skybridge migrate run --source-format raw)", path, name, convert)
}

// openStored opens a stored image as the format its catalog record says,
// never by content: a raw image whose guest wrote a qcow2 header into its
// first sector is still raw.
func openStored(rec *ImageRecord) (Source, error) {
	if rec.Format != FormatRaw && rec.Format != FormatQcow2 {
		return nil, fmt.Errorf("stored image %q: its catalog record says format %q, neither raw nor qcow2; remove it and migrate it again", rec.Name, rec.Format)
	}
	return OpenSourceAs(rec.Path, rec.Format)
}

// checkSourceFormat refuses a format to open an image as that is neither
// raw nor qcow2 nor "" (detect by content).
func checkSourceFormat(format string) error {
	switch format {
	case "", FormatRaw, FormatQcow2:
		return nil
	}
	return fmt.Errorf("source format %q: use raw or qcow2, or leave it empty to detect the format by content", format)
}

// qcowMaxCluster is the largest cluster qemu makes (cluster_bits 21).
const qcowMaxCluster = 2 << 20

// qcow2L1 is where a qcow2 header places the L1 table, and how many bytes
// of the image one of its entries maps.
type qcow2L1 struct{ off, size, perEntry int64 }

// checkQcow2Header refuses a qcow2 header whose numbers are not an image's
// before the reader sizes its tables by them: it allocates the whole L1
// table the header declares, and panics on cluster sizes qemu never makes.
// The bounds are qemu's own (cluster_bits 9 to 21, an L1 table of at most
// 32 MiB that fits in the file and covers the virtual size), and so are
// the other checks qemu opens an image with, which the reader skips:
// qemu refuses such an image whole, and we read it. It returns the L1
// table it checked.
func checkQcow2Header(hdr []byte, fileSize int64) (qcow2L1, error) {
	be := binary.BigEndian
	bits, size := be.Uint32(hdr[20:24]), be.Uint64(hdr[24:32])
	l1Size, l1Off := uint64(be.Uint32(hdr[36:40])), be.Uint64(hdr[40:48])
	switch {
	case bits < 9 || bits > 21:
		return qcow2L1{}, fmt.Errorf("cluster_bits %d: qemu makes 9 to 21", bits)
	case size > MaxImageSize:
		return qcow2L1{}, fmt.Errorf("virtual size %d: more than the %d a migration can describe", size, int64(MaxImageSize))
	}
	cs := uint64(1) << bits
	switch rtOff, rtClusters := be.Uint64(hdr[48:56]), uint64(be.Uint32(hdr[56:60])); {
	case rtOff%cs != 0:
		return qcow2L1{}, fmt.Errorf("refcount table at %d, not on a cluster boundary", rtOff)
	case rtClusters*cs > 8<<20:
		return qcow2L1{}, fmt.Errorf("refcount table of %d clusters: qemu takes at most 8 MiB", rtClusters)
	case be.Uint64(hdr[8:16]) > cs:
		return qcow2L1{}, fmt.Errorf("backing file name at %d, past the header's cluster", be.Uint64(hdr[8:16]))
	}
	if be.Uint32(hdr[4:8]) >= 3 {
		hlen, order := be.Uint32(hdr[100:104]), be.Uint32(hdr[96:100])
		incompat, autoclear := be.Uint64(hdr[72:80]), be.Uint64(hdr[88:96])
		var ctype byte // zlib, unless the header is long enough to say
		if hlen > 104 {
			ctype = hdr[104]
		}
		bit := "clear"
		if incompat&(1<<qcow2.IncompatibleFeaturesCompressionTypeBit) != 0 {
			bit = "set"
		}
		switch {
		case hlen < 104 || uint64(hlen) > cs:
			return qcow2L1{}, fmt.Errorf("header_length %d: qemu takes 104 bytes up to a cluster (%d)", hlen, cs)
		case order > 6:
			return qcow2L1{}, fmt.Errorf("refcount_order %d: qemu takes at most 6 (64-bit refcounts)", order)
		case (bit == "set") != (ctype != 0):
			return qcow2L1{}, fmt.Errorf("compression type %d with its feature bit %s: qemu takes the bit set for a type other than zlib (0), and only then", ctype, bit)
		case autoclear&(1<<qcow2.AutoclearFeaturesRawExternalBit) != 0 && incompat&(1<<qcow2.IncompatibleFeaturesExternalDataFileBit) == 0:
			return qcow2L1{}, errors.New("raw external data without an external data file")
		}
	}
	perL1 := uint64(1) << (2*bits - 3) // bytes one L2 table maps
	switch need := (size + perL1 - 1) / perL1; {
	case l1Size < need:
		return qcow2L1{}, fmt.Errorf("L1 table of %d entries for a virtual size that needs %d", l1Size, need)
	case l1Size > 4<<20:
		return qcow2L1{}, fmt.Errorf("L1 table of %d entries: qemu makes at most %d", l1Size, 4<<20)
	case l1Off%8 != 0 || l1Off > uint64(fileSize) || l1Size*8 > uint64(fileSize)-l1Off:
		return qcow2L1{}, fmt.Errorf("L1 table at %d (%d entries) lies outside the %d-byte file", l1Off, l1Size, fileSize)
	}
	return qcow2L1{off: int64(l1Off), size: int64(l1Size), perEntry: int64(perL1)}, nil
}

// checkQcow2Extensions refuses the header extensions qemu refuses to open
// an image with, and the reader skips: one that runs past the end of
// their area (the header's cluster, or the backing file's name where one
// starts before), a backing format name of 16 bytes or more, an
// encryption header without encryption. The area is at most a cluster
// (checkQcow2Header bounds the backing file name's offset), so the walk
// is bounded.
func checkQcow2Extensions(f io.ReaderAt, hdr []byte) error {
	be := binary.BigEndian
	off, end := uint64(72), uint64(1)<<be.Uint32(hdr[20:24])
	if be.Uint32(hdr[4:8]) >= 3 {
		off = uint64(be.Uint32(hdr[100:104]))
	}
	if b := be.Uint64(hdr[8:16]); b != 0 {
		end = b
	}
	for off < end {
		var ext [8]byte
		f.ReadAt(ext[:], int64(off)) // past the end zeros, as qemu reads them
		typ, n := be.Uint32(ext[:4]), uint64(be.Uint32(ext[4:]))
		switch off += 8; {
		case off > end || n > end-off:
			return fmt.Errorf("header extension %#x of %d bytes at %d runs past the end of the extensions at %d", typ, n, off-8, end)
		case typ == 0:
			return nil
		case typ == uint32(qcow2.HeaderExtensionTypeBackingFileFormatNameString) && n >= 16:
			return fmt.Errorf("backing file format name of %d bytes: qemu takes at most 15", n)
		case typ == uint32(qcow2.HeaderExtensionTypeFullDiskEncryptionHeaderPointer) && be.Uint32(hdr[32:36]) != 2:
			return errors.New("encryption header extension in an image without LUKS encryption")
		}
		off += (n + 7) &^ 7
	}
	return nil
}

// extentReader reads an image whose data lies in extents (Extents, in
// order) without reading the rest, which it fills with zeros. A chunk
// with 4 KiB of data in a MiB was read whole, its holes through the page
// cache, which zeroes a page for each (1 GiB of holes read at 206 to
// 372 MB/s on this project's test machine): an image whose 200 MiB of
// data lie scattered over 50 GiB was read for 50 GiB at the source,
// again by migrate verify, by a resume reading back what it holds, and
// by a re-sync copying from the stored version. A read in an extent that
// comes back short is the image's end, cut short since, as with ReadAt.
type extentReader struct {
	r       io.ReaderAt
	extents []Extent
}

func (x extentReader) ReadAt(p []byte, off int64) (int, error) {
	at := off // read or zeroed up to here
	for from, to := range within(x.extents, off, off+int64(len(p))) {
		clear(p[at-off : from-off])
		if n, err := x.r.ReadAt(p[from-off:to-off], from); n < int(to-from) {
			if err == nil {
				err = io.EOF
			}
			return int(from-off) + n, err
		}
		at = to
	}
	clear(p[at-off:])
	return len(p), nil
}

// within yields, in order, the parts of extents (sorted, not overlapping,
// as Extents returns them) that lie in [off, end), as from and to.
func within(extents []Extent, off, end int64) iter.Seq2[int64, int64] {
	return func(yield func(int64, int64) bool) {
		k := sort.Search(len(extents), func(k int) bool { return extents[k].Off+extents[k].Len > off })
		for ; k < len(extents) && extents[k].Off < end; k++ {
			e := extents[k]
			if !yield(max(e.Off, off), min(e.Off+e.Len, end)) {
				return
			}
		}
	}
}

// dataIn is how many bytes of [off, off+n) lie in extents: what an
// extentReader reads of them, the rest being zeros it need not read.
func dataIn(extents []Extent, off, n int64) int64 {
	var in int64
	for from, to := range within(extents, off, off+n) {
		in += to - from
	}
	return in
}

// rawSource is a raw image file read sparse-aware: SEEK_DATA/SEEK_HOLE
// find the allocated ranges, so holes are never read.
type rawSource struct {
	f    *os.File
	size int64
}

func (r *rawSource) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }
func (r *rawSource) Format() string                          { return FormatRaw }
func (r *rawSource) Size() int64                             { return r.size }
func (r *rawSource) Close() error                            { return r.f.Close() }

func (r *rawSource) Extents() ([]Extent, error) {
	fd := int(r.f.Fd())
	var out []Extent
	for off := int64(0); off < r.size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data after off
		}
		if errors.Is(err, unix.EINVAL) {
			// File system without SEEK_DATA: everything is data.
			return []Extent{{0, r.size}}, nil
		}
		if err != nil {
			return nil, fmt.Errorf("find data in image: %w", err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("find hole in image: %w", err)
		}
		hole = min(hole, r.size)
		if hole > data {
			out = append(out, Extent{data, hole - data})
		}
		off = hole
	}
	return out, nil
}

// qcow2Source reads a qcow2 image natively: only allocated clusters.
type qcow2Source struct {
	f    *os.File
	r    *qcowFile // what the reader reads
	img  *qcow2.Qcow2
	path string
	l1   qcow2L1 // as checkQcow2Header bounded it
	size int64   // the virtual size, in whole sectors
	v3   bool    // version 3, which has zero clusters
}

func openQcow2(path string, f *os.File) (Source, error) {
	hdr := make([]byte, 112) // version 3's header and its compression type
	if _, err := f.ReadAt(hdr[:80], 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: truncated qcow2 header: %w", path, err)
	}
	f.ReadAt(hdr[80:], 80) // past the end zeros, as qemu reads them
	// qemu reads versions 2 and 3, and refuses an image of another whole;
	// the reader takes any from 2 on as version 3.
	version := binary.BigEndian.Uint32(hdr[4:8])
	if version < 2 || version > 3 {
		f.Close()
		return nil, fmt.Errorf("%s: qcow2 version %d, which qemu does not read either (it reads versions 2 and 3); if it is a raw disk whose guest wrote these bytes at its start, migrate it with its source format named raw (skybridge migrate run --source-format raw)", path, version)
	}
	var incompat uint64 // version 2 has no feature bits
	if version >= 3 {
		incompat = binary.BigEndian.Uint64(hdr[72:80])
	}
	// qemu sets the corrupt bit when it finds the image's metadata
	// inconsistent, and refuses to write it until repaired. The reader
	// only logs it: read anyway, the image would be stored clean and
	// verified at the destination, whatever the inconsistency lost.
	if incompat&(1<<qcow2.IncompatibleFeaturesCorruptBit) != 0 {
		f.Close()
		return nil, fmt.Errorf("%s is marked corrupt by qemu, its metadata found inconsistent: repair it first with `qemu-img check -r all %s` (on a copy if in doubt), then migrate it", path, path)
	}
	// Extended L2 entries (subclusters) halve what an L2 table maps,
	// which the extents' walk of the L1 table (checkQcow2Header's span
	// per entry) does not reckon with, and the reader's support for them
	// is experimental: such an image was sent with data missing. qemu
	// makes them only when asked to.
	if incompat&(1<<qcow2.IncompatibleFeaturesExtendedL2EntriesBit) != 0 {
		f.Close()
		return nil, fmt.Errorf("%s has extended L2 entries (subclusters), which skybridge does not read: convert it first with `qemu-img convert -O qcow2 -o extended_l2=off %s plain.qcow2`", path, path)
	}
	// A migration carries the active layer only: internal snapshots would
	// be gone at the destination without a word, and one may be the state
	// someone means to go back to.
	if n := binary.BigEndian.Uint32(hdr[60:64]); n != 0 {
		f.Close()
		return nil, fmt.Errorf("%s holds internal snapshots (%d), which a migration does not carry: delete them (`qemu-img snapshot -l` lists them, `qemu-img snapshot -d NAME %s` deletes one), or migrate a copy of the current state alone, `qemu-img convert -O qcow2 %s flat.qcow2`", path, n, path, path)
	}
	// Refuse backing files before the reader tries to open one: a chain
	// of images is not something to move piecemeal across jurisdictions.
	// An offset with a name of no bytes is no backing file to qemu (and
	// qcowFile hides it from the reader).
	if off, n := binary.BigEndian.Uint64(hdr[8:16]), binary.BigEndian.Uint32(hdr[16:20]); off != 0 && n != 0 {
		name := make([]byte, min(n, 1023))
		f.ReadAt(name, int64(off))
		f.Close()
		return nil, fmt.Errorf("%s has a backing file (%q): skybridge moves self-contained images; flatten it first with `qemu-img convert -O qcow2 %s flat.qcow2`", path, name, path)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	l1, err := checkQcow2Header(hdr, st.Size())
	if err == nil {
		err = checkQcow2Extensions(f, hdr)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: not a qcow2 image qemu would make: %w", path, err)
	}
	// qemu takes the virtual size in whole 512-byte sectors, rounded down
	// (qemu-img info says 65024 bytes of a header's 65436): the disk a
	// guest saw under qemu, and what qemu-img convert writes. Read to the
	// header's size, the destination would hold a larger disk than the
	// guest's, ending in bytes no guest could read or write.
	size := int64(binary.BigEndian.Uint64(hdr[24:32])) &^ (qcowSector - 1)
	if size == 0 {
		// qemu-img makes an empty image without an L1 table (offset 0),
		// which the reader refuses; there is nothing in it to read.
		return &emptyQcow2{f: f}, nil
	}
	r := &qcowFile{f: f, size: st.Size(), clusterBits: binary.BigEndian.Uint32(hdr[20:24])}
	img, err := qcow2.Open(r, nil)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: not a readable qcow2 image: %w", path, err)
	}
	if err := img.Readable(); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: qcow2 feature not supported: %w", path, err)
	}
	return &qcow2Source{f: f, r: r, img: img, path: path, l1: l1, size: size, v3: version >= 3}, nil
}

// ReadAt reads the virtual disk up to its size in whole sectors.
func (q *qcow2Source) ReadAt(p []byte, off int64) (int, error) {
	if off >= q.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	end := false
	if int64(len(p)) > q.size-off {
		p, end = p[:q.size-off], true
	}
	n, err := q.img.ReadAt(p, off)
	if errors.Is(err, errCompressedCluster) {
		// qemu-img check finds nothing to repair here: the data is lost.
		err = fmt.Errorf("%s: %w; the image is corrupt there, and qemu fails to read it as well (`qemu-img convert -O raw %s /dev/null` stops at it): migrate the image from a backup", q.path, err, q.path)
	}
	if err == nil && end {
		err = io.EOF
	}
	return n, err
}

func (q *qcow2Source) Format() string { return FormatQcow2 }
func (q *qcow2Source) Size() int64    { return q.size }
func (q *qcow2Source) Close() error   { return q.f.Close() }

// qcowFile is an image file as the reader reads it, and as qemu reads its
// own: a cluster the end of the file (as it was when opened) cuts short
// reads as ending in zeros, where the reader failed to read it (qemu-img
// check allows less than a cluster past the end). A cluster wholly past
// the end, which qemu reads as zeros too, Extents refuses first, and
// reading one stays an error: a stored image cut short is found so,
// chunk by chunk. The header's backing file offset reads as 0: one with
// a name is refused before the reader opens the image, and one without a
// name is no backing file to qemu, while the reader would open the
// image's directory as one.
type qcowFile struct {
	f           *os.File
	size        int64 // the file's, when opened
	clusterBits uint32
}

func (r *qcowFile) ReadAt(p []byte, off int64) (int, error) {
	want := len(p)
	if off+int64(len(p)) > r.size && off&^(int64(1)<<r.clusterBits-1) < r.size {
		want = int(max(r.size-off, 0))
	}
	n, err := r.f.ReadAt(p[:want], off)
	if n < want {
		return n, err
	}
	clear(p[n:])
	if off < 16 && off+int64(len(p)) > 8 {
		clear(p[max(8-off, 0):min(16-off, int64(len(p)))])
	}
	return len(p), nil
}

// emptyQcow2 is a qcow2 image of virtual size 0.
type emptyQcow2 struct{ f *os.File }

func (e *emptyQcow2) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return 0, io.EOF
}
func (e *emptyQcow2) Format() string             { return FormatQcow2 }
func (e *emptyQcow2) Size() int64                { return 0 }
func (e *emptyQcow2) Extents() ([]Extent, error) { return nil, nil }
func (e *emptyQcow2) Close() error               { return e.f.Close() }

// Bits of qcow2 L1 and L2 entries: the host offset of a table or a
// cluster, and the bits qemu reserves, which qemu-img check finds corrupt
// when set (in a compressed cluster's entry, the copied flag).
const (
	qcowL1OffsetMask = 0x00fffffffffffe00
	qcowL1Reserved   = 0x7f000000000001ff
	qcowL2OffsetMask = 0x00fffffffffffe00
	qcowL2Reserved   = 0x3f000000000001fe
	qcowCompressed   = 1 << 62
	qcowZero         = 1
	qcowSector       = 512
)

// Extents lists the allocated ranges, from the L2 tables the L1 table
// maps over the virtual size, each read once. The reader's walk asked
// about every cluster an L2 table maps: a 6 MiB image whose 2048 L1
// entries all mapped one L2 table of zeros took 41 s of CPU. The tables
// lie in the file, and one mapped twice is refused (no qemu tool makes
// one): the cost is at most a read of the file. Every entry is checked as
// qemu checks it reading the image, or qemu-img check does, and an image
// with one they find corrupt is refused before a send reads anything:
// the reader would read it from other bytes than qemu returns, or as
// zeros (an L2 table 512 bytes into its cluster migrated as an empty
// disk, and verified).
func (q *qcow2Source) Extents() ([]Extent, error) {
	be := binary.BigEndian
	l1 := make([]byte, q.l1.size*8)
	if _, err := q.f.ReadAt(l1, q.l1.off); err != nil {
		return nil, fmt.Errorf("qcow2 L1 table: %w", err)
	}
	cs, per := int64(1)<<q.r.clusterBits, q.l1.perEntry
	table := make([]byte, cs)
	mapped := map[int64]int64{} // L2 tables by offset: the L1 entry of each
	var out []Extent
	for i := int64(0); i < q.l1.size && i*per < q.size; i++ {
		e := be.Uint64(l1[i*8:])
		l2 := int64(e & qcowL1OffsetMask)
		switch {
		case e&qcowL1Reserved != 0:
			return nil, q.corrupt(fmt.Errorf("L1 entry %d (%#x) has reserved bits set", i, e))
		case l2 == 0:
			continue // no L2 table: unallocated, zeros without a backing file
		case l2%cs != 0:
			return nil, q.corrupt(fmt.Errorf("the L2 table of L1 entry %d, at %#x, is not cluster-aligned", i, l2))
		case l2 >= q.r.size:
			return nil, q.corrupt(fmt.Errorf("the L2 table of L1 entry %d, at %#x, lies %w", i, l2, q.pastEnd()))
		}
		if j, ok := mapped[l2]; ok {
			// Not corruption when the refcounts say the table is
			// shared (qemu-img check -r all makes them say so), but
			// no qemu tool makes such an image, and read once per
			// entry that maps it, a table would cost as much as the
			// entries mapping it, whatever the file holds.
			return nil, fmt.Errorf("%s: L1 entries %d and %d map the same L2 table, at %#x, which qemu may read but skybridge does not: flatten a copy with `qemu-img convert -O qcow2 %s COPY` and migrate the copy", q.path, j, i, l2, q.path)
		}
		mapped[l2] = i
		// Only the entries over the virtual size: qemu reads no others.
		n := min(cs/8, (q.size-i*per+cs-1)/cs)
		t := table[:n*8]
		if _, err := q.r.ReadAt(t, l2); err != nil {
			return nil, fmt.Errorf("qcow2 L2 table at %#x: %w", l2, err)
		}
		for j := range n {
			off := i*per + j*cs
			data, err := q.checkL2Entry(be.Uint64(t[j*8:]))
			if err != nil {
				return nil, q.corrupt(fmt.Errorf("the L2 entry of virtual offset %d (entry %d of the L2 table at %#x) maps %w", off, j, l2, err))
			}
			if !data {
				continue
			}
			if k := len(out); k > 0 && out[k-1].Off+out[k-1].Len == off {
				out[k-1].Len += min(cs, q.size-off)
			} else {
				out = append(out, Extent{off, min(cs, q.size-off)})
			}
		}
	}
	return out, nil
}

// checkL2Entry says whether an L2 entry maps data, or what in it qemu
// finds corrupt: reading the image (a cluster not cluster-aligned, a zero
// flag in a version 2 image) or checking it (reserved bits, a cluster
// past the end of the file, which it reads as zeros).
func (q *qcow2Source) checkL2Entry(e uint64) (data bool, err error) {
	cs := int64(1) << q.r.clusterBits
	if e&qcowCompressed != 0 {
		// qemu's split of the rest: the offset, then how many sectors
		// past the first the compressed data takes.
		x := 62 - (q.r.clusterBits - 8)
		off := int64(e & (1<<x - 1))
		size := int64((e>>x)&(1<<(q.r.clusterBits-8)-1)+1)*qcowSector - off%qcowSector
		switch {
		case e&qcowCopied != 0:
			return false, errors.New("a compressed cluster with the copied flag, which qemu never sets on one")
		case off < cs:
			return false, fmt.Errorf("compressed data at %#x, in the header's cluster", off)
		case off >= q.r.size || off+size-q.r.size >= cs:
			return false, fmt.Errorf("compressed data at %#x (%d bytes), %w", off, size, q.pastEnd())
		}
		return true, nil
	}
	off, zero := int64(e&qcowL2OffsetMask), e&qcowZero != 0
	switch {
	case e&qcowL2Reserved != 0:
		return false, fmt.Errorf("a cluster with reserved bits set (%#x)", e)
	case zero && !q.v3:
		return false, errors.New("a zero cluster (the zero flag), which version 2 images do not have")
	case off == 0:
		return false, nil // unallocated, or zeros
	case off%cs != 0:
		return false, fmt.Errorf("a cluster at %#x, not cluster-aligned", off)
	case off >= q.r.size:
		return false, fmt.Errorf("a cluster at %#x, %w", off, q.pastEnd())
	}
	return !zero, nil
}

// corrupt refuses the image for metadata qemu finds corrupt: what, and
// what to do.
func (q *qcow2Source) corrupt(what error) error {
	const repair = "repair a copy of it with `qemu-img check -r all COPY`, see what the repair kept, and migrate the copy"
	var past *pastEndError
	if errors.As(what, &past) {
		// Most likely a copy cut short, which a repair would not mend.
		return fmt.Errorf("%s is shorter than its size says (truncated?): %v, which qemu reads as zeros, or fails to, and qemu-img check takes for corruption; copy the image again whole, or if it is whole, %s", q.path, what, repair)
	}
	return fmt.Errorf("%s: its qcow2 metadata is corrupt: %v. qemu takes it for corruption too (reading the image, or in `qemu-img check`): %s", q.path, what, repair)
}

// pastEndError is metadata that points past the end of the image file.
type pastEndError struct{ size int64 }

func (e *pastEndError) Error() string { return fmt.Sprintf("past the end of the %d-byte file", e.size) }

func (q *qcow2Source) pastEnd() error { return &pastEndError{q.r.size} }

var _ image.Image = (*qcow2.Qcow2)(nil)
