package migrate

import (
	"errors"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// directFile is an incoming image whose chunk writes bypass the page cache
// (O_DIRECT) where the filesystem supports it. Copying a received chunk
// into the page cache was the largest single cost of a migration's
// receiving gateway (a sixth of both gateways' CPU, more than hashing),
// and the data is made durable right after anyway; it also kept a gateway
// from evicting its whole page cache for every image it receives.
// Everything else — metadata, a short last chunk, reads, syncs, holes —
// goes through the ordinary descriptor; Linux keeps the two coherent
// (a direct write drops the cached pages of its range).
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
	var st unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st); err != nil ||
		st.Mask&unix.STATX_DIOALIGN == 0 || st.Dio_mem_align == 0 || st.Dio_offset_align == 0 {
		return df, nil
	}
	d, err := os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return df, nil // the filesystem said yes but opening says no: buffered it is
	}
	df.direct, df.mem, df.off = d, uintptr(st.Dio_mem_align), int64(st.Dio_offset_align)
	return df, nil
}

// writeChunk writes b at off, directly when b's address, off and len(b)
// are aligned as the filesystem requires.
func (f *directFile) writeChunk(b []byte, off int64) error {
	if f.direct != nil && !f.refused.Load() && len(b) > 0 &&
		uintptr(unsafe.Pointer(&b[0]))%f.mem == 0 && off%f.off == 0 && int64(len(b))%f.off == 0 {
		_, err := f.direct.WriteAt(b, off)
		if !errors.Is(err, unix.EINVAL) {
			return err
		}
		// Some filesystems accept the flag and refuse the write; from
		// now on the page cache it is.
		f.refused.Store(true)
	}
	_, err := f.File.WriteAt(b, off)
	return err
}

// Close closes both descriptors.
func (f *directFile) Close() error {
	if f.direct != nil {
		f.direct.Close()
	}
	return f.File.Close()
}

// alignedBuffer returns n bytes whose address is aligned for direct I/O
// on any filesystem (4 KiB covers every block device's logical block).
func alignedBuffer(n int) []byte {
	const a = 4096
	b := make([]byte, n+a)
	skip := int(a-uintptr(unsafe.Pointer(&b[0]))%a) % a
	return b[skip : skip+n : skip+n]
}
