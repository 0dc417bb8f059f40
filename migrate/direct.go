package migrate

import (
	"bytes"
	"errors"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// directFile is an incoming image whose chunk writes bypass the page cache
// (O_DIRECT) where the filesystem supports it. Copying a received chunk
// into the page cache was the largest single cost of a migration's
// receiving gateway (13.6 % of both gateways' CPU, more than hashing),
// and the data is made durable right after anyway; bypassing it also
// keeps a gateway from evicting its page cache for every image it
// receives. Everything else — metadata, a short last chunk, copies from a
// stored version, reads, syncs, holes — goes through the ordinary
// descriptor: a direct write drops the cached pages of its range, and
// direct writes are page-aligned, so the two never share a page.
type directFile struct {
	*os.File
	direct  *os.File    // nil: no direct I/O on this file
	mem     uintptr     // required alignment of buffer addresses
	off     int64       // required alignment of file offsets and lengths
	refused atomic.Bool // a direct write was refused: buffered from then on
}

// openDirect opens path for reading and writing, creating it with mode
// 0600, and a second descriptor with O_DIRECT when the filesystem reports
// (statx DIOALIGN) that it supports direct I/O for the file.
func openDirect(path string) (*directFile, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	df := &directFile{File: f}
	mem, off, ok := dioAlign(f)
	if !ok {
		return df, nil
	}
	d, err := os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return df, nil // the filesystem said yes but opening says no: buffered it is
	}
	// Offsets and lengths at least page-aligned: a direct write then never
	// shares a page with a buffered one (a short last chunk, a copy from
	// the stored version), which not every filesystem keeps coherent.
	df.direct, df.mem, df.off = d, uintptr(mem), max(int64(off), int64(os.Getpagesize()))
	return df, nil
}

// dioAlign reports whether f's filesystem offers direct I/O for it, and
// the alignment it requires of buffer addresses and of file offsets.
func dioAlign(f *os.File) (mem, off uint32, ok bool) {
	var st unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st); err != nil ||
		st.Mask&unix.STATX_DIOALIGN == 0 || st.Dio_mem_align == 0 || st.Dio_offset_align == 0 {
		return 0, 0, false
	}
	return st.Dio_mem_align, st.Dio_offset_align, true
}

// writeChunk writes b at off, directly when b's address, off and len(b)
// are aligned as the filesystem requires.
func (f *directFile) writeChunk(b []byte, off int64) error {
	if f.direct != nil && !f.refused.Load() && len(b) > 0 &&
		uintptr(unsafe.Pointer(&b[0]))%f.mem == 0 && off%f.off == 0 && int64(len(b))%f.off == 0 {
		_, err := f.direct.WriteAt(b, off)
		if err == nil || !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EOPNOTSUPP) {
			return err
		}
		// Some filesystems accept the flag and refuse the write; from
		// now on the page cache it is.
		f.refused.Store(true)
	}
	_, err := f.File.WriteAt(b, off)
	return err
}

// A chunk's zeros are left out of the incoming file: written whole, a
// chunk took its full size on disk whatever it held, and an image with
// 4 KiB of data in each MiB (200 MiB of data over 50 GiB, a thin disk's
// file system scattered over it) took 50 GiB at the destination, where
// qemu-img convert keeps it at 200 MiB. sparseBlock is the unit zeros are
// found in (a file system block, and a page: direct writes stay aligned);
// a run of them is a hole from sparseHole on, or at either end of a
// chunk. Shorter runs between data are written: data and zeros taking
// turns by the block would cost a write and a punch each, where the
// whole chunk is one write.
const (
	sparseBlock = 4 << 10
	sparseHole  = 64 << 10
)

var zeroBlock [sparseBlock]byte

// writeSparse writes b at off but for its runs of zeros of sparseHole or
// more, or at its ends, on the file's grid of sparseBlock: it leaves
// them holes, or makes holes of them unless clean says the range holds
// no data yet (a new file). Data goes through writeChunk, or the page
// cache if buffered.
func (f *directFile) writeSparse(b []byte, off int64, clean, buffered bool) (err error) {
	sparseRuns(b, off, func(from, to int, hole bool) bool {
		switch {
		case hole && !clean:
			err = f.punch(b[from:to], off+int64(from))
		case hole:
		case buffered:
			_, err = f.File.WriteAt(b[from:to], off+int64(from))
		default:
			err = f.writeChunk(b[from:to], off+int64(from))
		}
		return err == nil
	})
	return err
}

// sparseSize is what writeSparse(b, off) writes.
func sparseSize(b []byte, off int64) (n int64) {
	sparseRuns(b, off, func(from, to int, hole bool) bool {
		if !hole {
			n += int64(to - from)
		}
		return true
	})
	return n
}

// sparseRuns splits b, to be written at off, into the runs writeSparse
// writes and those it leaves holes, in order, while yield returns true.
func sparseRuns(b []byte, off int64, yield func(from, to int, hole bool) bool) {
	zero := func(p []byte) bool { return bytes.Equal(p, zeroBlock[:len(p)]) }
	from := 0 // the bytes from here on are not yielded yet
	for p := 0; p < len(b); {
		q := min(len(b), p+int(sparseBlock-(off+int64(p))%sparseBlock)) // a block, the first cut at the grid
		if !zero(b[p:q]) {
			p = q
			continue
		}
		for q < len(b) {
			e := min(len(b), q+sparseBlock)
			if !zero(b[q:e]) {
				break
			}
			q = e
		}
		if q-p >= sparseHole || p == 0 || q == len(b) {
			if from < p && !yield(from, p, false) || !yield(p, q, true) {
				return
			}
			from = q
		}
		p = q
	}
	if from < len(b) {
		yield(from, len(b), false)
	}
}

// punch makes zeros of the len(z) bytes at off, a hole where the file
// system can (z is zeros, written where it cannot).
func (f *directFile) punch(z []byte, off int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, int64(len(z)))
	if err != nil {
		_, err = f.File.WriteAt(z, off)
	}
	return err
}

// Close closes both descriptors.
func (f *directFile) Close() error {
	var err error
	if f.direct != nil {
		err = f.direct.Close()
	}
	return errors.Join(err, f.File.Close())
}

// alignedBuffer returns n bytes whose address is aligned for direct I/O
// on any filesystem (4 KiB covers every block device's logical block).
func alignedBuffer(n int) []byte {
	const a = 4096
	b := make([]byte, n+a)
	skip := int(a-uintptr(unsafe.Pointer(&b[0]))%a) % a
	return b[skip : skip+n : skip+n]
}
