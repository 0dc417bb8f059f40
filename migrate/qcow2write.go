package migrate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// A minimal qcow2 (version 3) writer: the receiver assembles images as
// sparse raw files (random-order writes, resumable), and converts to qcow2
// at the end when asked. It writes no compression, no snapshots, no
// backing file: one L1 table, the L2 tables that have data, 16-bit
// refcounts, and the data clusters that are not all zeros. qemu-img reads
// it (and `qemu-img check` finds nothing wrong: tested).
const (
	qcowClusterBits = 16
	qcowCluster     = 1 << qcowClusterBits
	qcowL2Entries   = qcowCluster / 8
	qcowRefPerBlock = qcowCluster / 2 // 16-bit refcounts
	qcowCopied      = uint64(1) << 63
	qcowHeaderLen   = 104
)

// convertToQcow2 writes src (a raw image of size bytes) as qcow2 at dst,
// atomically.
func convertToQcow2(src *os.File, size int64, dst string) error {
	rs := &rawSource{f: src, size: size}
	// qcow2 sizes are whole 512-byte sectors; like qemu-img convert, round
	// up (the tail reads as zeros).
	virtual := (size + 511) &^ 511
	extents, err := rs.Extents()
	if err != nil {
		return err
	}
	// Data clusters: those overlapping data that are not all zeros.
	var data []int64
	buf := make([]byte, qcowCluster)
	for _, c := range candidates(extents, size, qcowCluster) {
		n := chunkLen(c, size, qcowCluster)
		clear(buf)
		if err := readChunk(src, buf[:n], c*qcowCluster); err != nil {
			return err
		}
		if !isZero(buf[:n]) {
			data = append(data, c)
		}
	}
	l1Size := max(1, (chunkCount(virtual, qcowCluster)+qcowL2Entries-1)/qcowL2Entries)
	l2Used := map[int64]int64{} // L1 index → L2 table cluster
	var l2Order []int64
	for _, c := range data {
		if _, ok := l2Used[c/qcowL2Entries]; !ok {
			l2Used[c/qcowL2Entries] = 0
			l2Order = append(l2Order, c/qcowL2Entries)
		}
	}
	l1Clusters := (l1Size*8 + qcowCluster - 1) / qcowCluster
	// The refcount structures cover themselves: grow them until they fit.
	var rtClusters, rbClusters, total int64
	for {
		total = 1 + l1Clusters + rtClusters + rbClusters + int64(len(l2Order)) + int64(len(data))
		needRB := (total + qcowRefPerBlock - 1) / qcowRefPerBlock
		needRT := (needRB*8 + qcowCluster - 1) / qcowCluster
		if needRB == rbClusters && needRT == rtClusters {
			break
		}
		rbClusters, rtClusters = needRB, needRT
	}
	next := int64(1)
	alloc := func(n int64) int64 { off := next; next += n; return off }
	l1Off := alloc(l1Clusters)
	rtOff := alloc(rtClusters)
	rbOff := alloc(rbClusters)
	for _, i := range l2Order {
		l2Used[i] = alloc(1)
	}
	dataOff := alloc(int64(len(data)))

	f, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	w := func(b []byte, cluster int64, within int64) error {
		_, err := f.WriteAt(b, cluster*qcowCluster+within)
		return err
	}

	be := binary.BigEndian
	if err := w(qcowHeader(virtual, l1Size, l1Off, rtOff, rtClusters), 0, 0); err != nil {
		return err
	}

	l1 := make([]byte, l1Clusters*qcowCluster)
	for i, c := range l2Used {
		be.PutUint64(l1[i*8:], uint64(c*qcowCluster)|qcowCopied)
	}
	if err := w(l1, l1Off, 0); err != nil {
		return err
	}
	l2 := map[int64][]byte{}
	for k, c := range data {
		t := c / qcowL2Entries
		if l2[t] == nil {
			l2[t] = make([]byte, qcowCluster)
		}
		be.PutUint64(l2[t][(c%qcowL2Entries)*8:], uint64((dataOff+int64(k))*qcowCluster)|qcowCopied)
		n := chunkLen(c, size, qcowCluster)
		clear(buf)
		if err := readChunk(src, buf[:n], c*qcowCluster); err != nil {
			return err
		}
		if err := w(buf, dataOff+int64(k), 0); err != nil {
			return err
		}
	}
	for t, b := range l2 {
		if err := w(b, l2Used[t], 0); err != nil {
			return err
		}
	}
	rt := make([]byte, rtClusters*qcowCluster)
	for b := int64(0); b < rbClusters; b++ {
		be.PutUint64(rt[b*8:], uint64((rbOff+b)*qcowCluster))
	}
	if err := w(rt, rtOff, 0); err != nil {
		return err
	}
	rb := make([]byte, rbClusters*qcowCluster)
	for c := int64(0); c < total; c++ {
		be.PutUint16(rb[c*2:], 1)
	}
	if err := w(rb, rbOff, 0); err != nil {
		return err
	}
	if err := f.Truncate(total * qcowCluster); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dst, err)
	}
	return atomicfile.SyncDir(dirOf(dst))
}

// qcowHeader is the header cluster of an image of virtual bytes whose L1
// table (l1Size entries) starts at cluster l1Off and whose refcount table
// takes rtN clusters from rtOff.
func qcowHeader(virtual, l1Size, l1Off, rtOff, rtN int64) []byte {
	hdr := make([]byte, qcowCluster)
	be := binary.BigEndian
	copy(hdr, qcow2Magic)
	be.PutUint32(hdr[4:], 3)                // version
	be.PutUint32(hdr[20:], qcowClusterBits) // cluster_bits
	be.PutUint64(hdr[24:], uint64(virtual))
	be.PutUint32(hdr[36:], uint32(l1Size))
	be.PutUint64(hdr[40:], uint64(l1Off*qcowCluster))
	be.PutUint64(hdr[48:], uint64(rtOff*qcowCluster))
	be.PutUint32(hdr[56:], uint32(rtN))
	be.PutUint32(hdr[96:], 4)              // refcount_order: 16-bit refcounts
	be.PutUint32(hdr[100:], qcowHeaderLen) // header_length
	// hdr[104:112] stays zero: the end-of-extensions marker.
	return hdr
}

// Writing qcow2 in place. A receiver that is to store qcow2 writes each
// chunk into its temporary file at base + its virtual offset, and leaves
// [0, base) for the metadata: at the end only the header, L1, L2 and
// refcount tables are written there, and the data clusters are mapped
// where they already are. Converting instead would write every allocated
// byte a second time and flush it (as long again as receiving them, on
// the bench machine). qcow2 allows data clusters at any cluster-aligned
// host offset; the unallocated ones stay holes in the host file too, with
// refcount 0.

// qcowInPlace is the layout of an in-place qcow2 image of a given size.
type qcowInPlace struct {
	virtual  int64 // the image size rounded up to 512-byte sectors
	clusters int64 // virtual clusters
	l1Size   int64 // L1 entries
	l1, l2   int64 // first cluster of the L1 table and of the reserved L2 tables (one per L1 entry)
	rt, rb   int64 // first cluster of the refcount table and of the refcount blocks
	rtN, rbN int64 // their lengths in clusters
	base     int64 // byte offset of virtual offset 0
}

func qcowInPlaceLayout(size int64) qcowInPlace {
	var l qcowInPlace
	l.virtual = (size + 511) &^ 511
	l.clusters = chunkCount(l.virtual, qcowCluster)
	l.l1Size = max(1, (l.clusters+qcowL2Entries-1)/qcowL2Entries)
	l1N := (l.l1Size*8 + qcowCluster - 1) / qcowCluster
	l.l1, l.l2 = 1, 1+l1N
	l.rt = l.l2 + l.l1Size
	// The refcount structures cover the whole host file, themselves
	// included: grow them until they fit.
	for {
		meta := l.rt + l.rtN + l.rbN
		l.base = (meta*qcowCluster + 1<<20 - 1) &^ (1<<20 - 1) // chunk writes stay 1 MiB-aligned
		host := l.base/qcowCluster + l.clusters
		rbN := (host + qcowRefPerBlock - 1) / qcowRefPerBlock
		rtN := (rbN*8 + qcowCluster - 1) / qcowCluster
		if rbN == l.rbN && rtN == l.rtN {
			break
		}
		l.rbN, l.rtN = rbN, rtN
	}
	l.rb = l.rt + l.rtN
	return l
}

// qcowDataStart is where a receiver writes virtual offset 0 of an image of
// size bytes that it will store as qcow2.
func qcowDataStart(size int64) int64 { return qcowInPlaceLayout(size).base }

// qcowMetaBytes bounds what finishQcow2InPlace writes for an image of
// size bytes whose data is in at most chunks chunks of chunkSize bytes:
// the header, L1 and refcount tables whole, and the L2 tables and
// refcount blocks those chunks (and the metadata) can reach.
func qcowMetaBytes(size, chunks, chunkSize int64) int64 {
	l := qcowInPlaceLayout(size)
	reach := func(span int64) int64 { return chunkSize/span + 2 } // tables or blocks one chunk can fall in
	tables := min(l.l1Size, chunks*reach(qcowL2Entries*qcowCluster))
	blocks := min(l.rbN, 2+tables+chunks*reach(qcowRefPerBlock*qcowCluster))
	return (1 + (l.l2 - l.l1) + l.rtN + tables + blocks) * qcowCluster
}

// finishQcow2InPlace writes the metadata of f, whose data (size bytes of
// image) starts at base, so that f is a qcow2 image. Clusters that hold no
// data in f (holes) are left unallocated.
//
// Its memory does not grow with the data: the data clusters are walked in
// order from the file's extents, each L2 table is written once the walk
// is past it, and so is each refcount block over the data. Only the L1
// and refcount tables are whole, and the blocks over the metadata. (All
// held at once, 8 TiB of data took about 2.3 GiB at the commit, outside
// the receive's budget: a gateway killed for memory after every byte had
// arrived.)
func finishQcow2InPlace(f *os.File, size, base int64) error {
	l := qcowInPlaceLayout(size)
	if l.base != base {
		return fmt.Errorf("in-place qcow2 layout: data at %d, expected %d", base, l.base)
	}
	hostEnd := base + l.clusters*qcowCluster
	if err := f.Truncate(hostEnd); err != nil {
		return err
	}
	extents, err := (&rawSource{f: f, size: hostEnd}).Extents()
	if err != nil {
		return err
	}
	be := binary.BigEndian
	write := func(b []byte, cluster int64) error {
		_, err := f.WriteAt(b, cluster*qcowCluster)
		return err
	}
	// Refcount blocks only where a cluster is in use. A block covers
	// 2 GiB of host file; made for every one, they were the largest
	// allocation of a large, mostly empty image (512 MiB of memory, and
	// of writes, for a 16 TiB image holding one chunk). A table entry of
	// 0 says a block's clusters are all free, as the holes are. The
	// blocks up to the one holding base cover the metadata, which is
	// counted all along: kept to the end. The others are written as the
	// data walk leaves them.
	lastMeta := (base/qcowCluster - 1) / qcowRefPerBlock
	kept := map[int64][]byte{}
	var used []int64 // blocks written as the walk left them
	var cur []byte
	curB := int64(-1)
	flushBlock := func() error {
		if cur == nil {
			return nil
		}
		used = append(used, curB)
		err := write(cur, l.rb+curB)
		clear(cur)
		curB = -1
		return err
	}
	ref := func(hostCluster int64) error {
		b := hostCluster / qcowRefPerBlock
		var blk []byte
		switch {
		case b <= lastMeta:
			if kept[b] == nil {
				kept[b] = make([]byte, qcowCluster)
			}
			blk = kept[b]
		case b == curB:
			blk = cur
		default: // the walk goes up: the block before it is done
			if err := flushBlock(); err != nil {
				return err
			}
			if cur == nil {
				cur = make([]byte, qcowCluster)
			}
			blk, curB = cur, b
		}
		be.PutUint16(blk[(hostCluster%qcowRefPerBlock)*2:], 1)
		return nil
	}
	ref(0)
	for c := l.l1; c < l.l2; c++ {
		ref(c)
	}
	for c := l.rt; c < l.rb; c++ {
		ref(c)
	}
	l1 := make([]byte, (l.l2-l.l1)*qcowCluster)
	var l2 []byte
	curT := int64(-1)
	flushTable := func() error {
		if curT < 0 {
			return nil
		}
		be.PutUint64(l1[curT*8:], uint64((l.l2+curT)*qcowCluster)|qcowCopied)
		if err := ref(l.l2 + curT); err != nil {
			return err
		}
		err := write(l2, l.l2+curT)
		clear(l2)
		curT = -1
		return err
	}
	// The virtual clusters holding data, in order: those the file's data
	// extents overlap, counted from base.
	next := int64(0) // the first cluster not yet walked
	for _, e := range extents {
		end := min(e.Off+e.Len, hostEnd)
		if end <= base {
			continue
		}
		first, last := max((max(e.Off, base)-base)/qcowCluster, next), (end-base-1)/qcowCluster
		for c := first; c <= last; c++ {
			if t := c / qcowL2Entries; t != curT {
				if err := flushTable(); err != nil {
					return err
				}
				if l2 == nil {
					l2 = make([]byte, qcowCluster)
				}
				curT = t
			}
			host := base + c*qcowCluster
			be.PutUint64(l2[(c%qcowL2Entries)*8:], uint64(host)|qcowCopied)
			if err := ref(host / qcowCluster); err != nil {
				return err
			}
		}
		next = max(next, last+1)
	}
	if err := errors.Join(flushTable(), flushBlock()); err != nil {
		return err
	}
	// The blocks in use are clusters in use too, counted in the blocks
	// over the metadata; counting one may need another, so until no new
	// one appears.
	for _, b := range used {
		ref(l.rb + b)
	}
	for counted := map[int64]bool{}; len(counted) < len(kept); {
		for b := range kept {
			if !counted[b] {
				counted[b] = true
				ref(l.rb + b)
			}
		}
	}
	rt := make([]byte, l.rtN*qcowCluster)
	for _, b := range used {
		be.PutUint64(rt[b*8:], uint64((l.rb+b)*qcowCluster))
	}
	for b, blk := range kept {
		be.PutUint64(rt[b*8:], uint64((l.rb+b)*qcowCluster))
		if err := write(blk, l.rb+b); err != nil {
			return err
		}
	}
	if err := errors.Join(write(l1, l.l1), write(rt, l.rt)); err != nil {
		return err
	}
	// The header last: until it is there, the file is no qcow2 image.
	if err := f.Sync(); err != nil {
		return err
	}
	if _, err := f.WriteAt(qcowHeader(l.virtual, l.l1Size, l.l1, l.rt, l.rtN), 0); err != nil {
		return err
	}
	return f.Sync()
}
