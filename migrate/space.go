package migrate

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/skybridge-mesh/skybridge/internal/units"
)

// A receive is taken only if the image store has room for what it may
// write: the sender states how many chunks may hold data, and refused at
// the offer, it learns at once what it would have learnt from a full disk
// half-way, with its data and everyone else's migrations spared.

// storeHeadroom is the free space a receive must leave in the image store:
// the journal, the audit log and the gateway's state may share its disk.
const storeHeadroom = 64 << 20

// journalPerChunk is what a receive may add to the journal, which shares
// the store's disk, per chunk that may hold data: the chunk's entry among
// those held durable, its line in the staged and then the catalog
// manifest, and the pages bbolt copies on write and frees only once no
// reader holds them. A receive of 16,384 chunks grew the journal by 258
// bytes a chunk; twice that leaves room for pages that split half full.
// Left to storeHeadroom, shared by every receive, one receive of
// MaxManifestChunks used all of it, and two of 150,000 chunks filled the
// disk and failed a commit.
const journalPerChunk = 512

// receiveNeed is what a receive may add to the store's disk: up to fresh
// new chunks (receiveData), a qcow2 image's metadata, and the journal's
// record of the allow chunks that may hold data (journal, part of need).
// The journal's share stays held until the receive ends: most of it is
// written at the commit.
func receiveNeed(o *Offer, allow, fresh int64) (need, journal int64) {
	journal = allow * journalPerChunk
	need = receiveData(o, fresh) + journal
	if o.Format == FormatQcow2 {
		need += qcowMetaBytes(o.Size, allow, o.ChunkSize)
	}
	return need, journal
}

// receiveData is what up to fresh new chunks of o take on the store's
// disk: each its whole size at most, and all of them no more than the
// offer's Bytes, written sparse. (Chunks written again where they lie
// take no new room.)
func receiveData(o *Offer, fresh int64) int64 {
	n := fresh * o.ChunkSize
	if o.Bytes != nil {
		n = min(n, *o.Bytes)
	}
	return n
}

// reservation is the share of the store's free space a receive may still
// use: what it may write, reckoned at its offer, less what it has written
// since (which the free space already shows).
type reservation struct {
	bytes int64
	wrote atomic.Int64
}

func (v *reservation) remaining() int64 { return max(0, v.bytes-v.wrote.Load()) }

// roomFor says why a store with free bytes free cannot take a receive that
// writes up to need bytes (journal of them to the journal) while others
// may still write held bytes; nil if it can and keeps storeHeadroom spare.
func roomFor(need, journal, free, held int64, others int) error {
	if need+held+storeHeadroom <= free {
		return nil
	}
	of := ""
	if held > 0 {
		of = fmt.Sprintf(", %s of it held for %d other migrations under way,", units.Bytes(held), others)
	}
	return fmt.Errorf("the image needs up to %s in the destination's image store (%s of it for the migration journal's record of its chunks), which has %s free%s and keeps %s spare: free space there, or send the image to another destination",
		units.Bytes(need), units.Bytes(journal), units.Bytes(free), of, units.Bytes(storeHeadroom))
}

// diskFull says whether err is a write refused for want of space. bbolt
// words some of its failures with the errno's text only ("file resize
// error: no space left on device").
func diskFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || strings.Contains(err.Error(), syscall.ENOSPC.Error())
}

// writeFailed is what the sender is told of a write here that failed (what
// was being done, and err): on a full disk, what to do about it too. The
// chunks made durable wait for the resume.
func (s *session) writeFailed(what string, err error) string {
	why := what + ": " + err.Error()
	if diskFull(err) {
		why += ": the destination's disk is full: free space there, then resume the migration (skybridge migrate resume " + s.offer.ID + ")"
	}
	return why
}

// freeBytes is the space unprivileged writers may still use on dir's
// filesystem (the gateway need not run as root).
func freeBytes(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("free space of the image store: %w", err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// reserve takes a share of the store's free space for receive id, being
// opened (in r.opening), which may write up to need bytes, journal of them
// to the journal. The shares are those of the receives under way and being
// opened: one goes with its receive, an earlier attempt's with the ID.
func (r *Receiver) reserve(id string, need, journal int64) (*reservation, error) {
	free, err := freeBytes(r.cfg.StoreDir)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	held, others := r.heldLocked(id)
	if err := roomFor(need, journal, free, held, others); err != nil {
		return nil, err
	}
	v := &reservation{bytes: need}
	l := r.opening[id]
	l.hold = v
	r.opening[id] = l
	return v, nil
}

// heldLocked is what the receives under way and being opened, but for
// receive except, may still write, and how many of them may. r.mu is
// held.
func (r *Receiver) heldLocked(except string) (held int64, others int) {
	byID := map[string]*reservation{} // a session replacing an attempt is briefly both
	for _, l := range r.loadsLocked() {
		if l.hold != nil && l.id != except {
			byID[l.id] = l.hold
		}
	}
	for _, v := range byID {
		if rem := v.remaining(); rem > 0 {
			held += rem
			others++
		}
	}
	return held, others
}

// restoreRoom allocates the holes of a receive's held chunks that are to
// be written again where they lie (found changed when read back): written
// sparse, or punched since, such a chunk holds less than its room, which
// its writing again may fill, and the receive's reservation counted it as
// there. Taken under r.mu, as reserve takes a share: the others' shares,
// and this receive's own, still count on the free space.
func (r *Receiver) restoreRoom(f *directFile, rec *RecvRecord, chunks []int64) error {
	if len(chunks) == 0 {
		return nil
	}
	free, err := freeBytes(r.cfg.StoreDir)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	held, _ := r.heldLocked("")
	need := int64(len(chunks)) * rec.ChunkSize // at most: some of it is allocated
	if need+held+storeHeadroom > free {
		return fmt.Errorf("%d chunks held from the migration's earlier attempt changed since, and are received again where they lie, which takes up to %s more in the destination's image store; it has %s free, %s of it held for the migrations under way, and keeps %s spare: free space there, then resume the migration",
			len(chunks), units.Bytes(need), units.Bytes(free), units.Bytes(held), units.Bytes(storeHeadroom))
	}
	for _, i := range chunks {
		off, n := rec.DataAt+i*rec.ChunkSize, chunkLen(i, rec.Size, rec.ChunkSize)
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
			// Its bytes are to be replaced: zeros take its room as well.
			if _, werr := f.WriteAt(make([]byte, n), off); werr != nil {
				return fmt.Errorf("make room for chunk %d, held and changed since, in the incoming image: %w", i, werr)
			}
		}
	}
	return nil
}

// What the receives under way hold of the receiver besides disk space:
// one gateway sends at most maxSessionsPerPeer migrations here at once,
// and all of them together hold at most maxReceiveBuffers of stream
// buffers. An authenticated peer (or a careless `migrate apply
// --parallel`) could otherwise open receives until memory ran out: a
// receive of 32 streams of 32 MiB chunks holds 3 GiB.
const (
	maxSessionsPerPeer = 32
	maxReceiveBuffers  = 1 << 30
)

// maxInterruptedPerPeer bounds the interrupted receives kept for one
// gateway's resumes (each holds at least a chunk; those that hold none
// are forgotten as they end): kept for AbandonedAfter, each with its
// record, its line in `migrate list` and its incoming file, they would
// otherwise pile up without end from a gateway that offers and hangs up.
// Four times as many as it may run at once.
const maxInterruptedPerPeer = 4 * maxSessionsPerPeer

// receiveLoad is a receive under way, or one being opened.
type receiveLoad struct {
	id, name, from string
	buffers        int64
	hold           *reservation // its share of the store's free space, once taken
}

// streamBuffers is what a receive's streams may hold: two chunk buffers
// each (one being received while the other is written) and one for a
// compressed frame.
func streamBuffers(o *Offer) int64 {
	return int64(o.Streams)*3*o.ChunkSize + int64(commitMax(o))
}

// commitMax bounds the commit frame of a migration: its manifest lists a
// chunk in at most 82 bytes of JSON (a 12-digit index, the largest a
// pebibyte of 4 KiB chunks has, and 64 hex digits), bounded at 96, and no
// more chunks than the offer said may hold data (or, from senders that do
// not say, than the image has). It is read whole, so it counts with the
// buffers.
func commitMax(o *Offer) int {
	n := chunkCount(o.Size, o.ChunkSize)
	if o.Chunks != nil {
		n = min(n, *o.Chunks)
	}
	if n <= maxOfferChunks {
		return 4096 + manifestEntryMax*int(n)
	}
	return maxFrame
}

// maxOfferChunks is the most chunks an offer may say hold data: a commit
// listing that many is sure to fit a frame. Senders of this release keep
// to half of it (MaxManifestChunks), for the answer's two lists; those of
// earlier ones sent 1 MiB chunks of any image.
const maxOfferChunks = (maxFrame - 4096) / manifestEntryMax

// manifestEntryMax bounds a chunk's entry in a manifest's JSON.
const manifestEntryMax = 96

// admitLoad says why a receive cannot start beside those under way. Those
// it replaces do not count: an earlier attempt of its migration, and
// another of its image from the same gateway (which supersedes it).
func admitLoad(under []receiveLoad, l receiveLoad) error {
	peer, buffers := 0, l.buffers
	for _, u := range under {
		if u.id == l.id || u.name == l.name && u.from == l.from {
			continue
		}
		buffers += u.buffers
		if u.from == l.from {
			peer++
		}
	}
	switch {
	case peer >= maxSessionsPerPeer:
		return fmt.Errorf("%s already sends %d migrations here, as many as one gateway may at once: send fewer at a time (migrate apply --parallel)", l.from, peer)
	case l.buffers > maxReceiveBuffers:
		return fmt.Errorf("the migration's streams would hold %s of buffers at the destination, more than all migrations there may (%s): use fewer streams", units.Bytes(l.buffers), units.Bytes(maxReceiveBuffers))
	case buffers > maxReceiveBuffers:
		return fmt.Errorf("the destination is receiving as many migrations as its buffers allow (%s): try again when one has ended, or send with fewer streams", units.Bytes(maxReceiveBuffers))
	}
	return nil
}

// fileSystemNote names the file system of dir for a refusal of a file it
// cannot hold, with its limit where that is what refused it: ext4 (with
// 4 KiB blocks) is the common case, but the store may be on any other.
// Empty if the file system cannot be told.
func fileSystemNote(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return ""
	}
	return fileSystemNoteOf(int64(st.Type))
}

// fileSystemNoteOf is fileSystemNote for statfs(2)'s f_type.
func fileSystemNoteOf(magic int64) string {
	switch magic {
	case unix.EXT4_SUPER_MAGIC: // ext2 and ext3 too
		return "it is ext4 (or ext2/3), which takes 16 TiB less 4 KiB at most"
	case unix.XFS_SUPER_MAGIC:
		return "it is XFS"
	case unix.BTRFS_SUPER_MAGIC:
		return "it is Btrfs"
	case unix.TMPFS_MAGIC:
		return "it is tmpfs"
	case unix.NFS_SUPER_MAGIC:
		return "it is NFS, whose server's file system sets the limit"
	case unix.FUSE_SUPER_MAGIC:
		return "it is a FUSE file system"
	}
	return ""
}
