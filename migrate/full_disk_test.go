package migrate

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/internal/smalldisk"
)

// fullDiskPair is a pair whose receiving gateway keeps its images, journal
// and audit log on one tmpfs of the given size (mount(8)'s "96m"), as a
// gateway keeps them in its state directory (images/, migrate.db,
// audit.log); tweak, if set, makes a last change to the receiver's
// configuration, state being the tmpfs. It returns the pair and state.
func fullDiskPair(t *testing.T, size string, tweak func(c *ReceiverConfig, state string)) (*pair, string) {
	t.Helper()
	mount := tmpfsStore(t, size) // skips without root
	var state string
	var j *Journal
	var lg *audit.Log
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		state = filepath.Join(filepath.Dir(c.StoreDir), "state")
		mount(&ReceiverConfig{StoreDir: state})
		var err error
		if j, err = OpenJournal(filepath.Join(state, "migrate.db")); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { j.Close() }) // before the tmpfs is unmounted
		lg = audit.Open(filepath.Join(state, "audit.log"))
		c.StoreDir, c.Journal, c.Audit = filepath.Join(state, "images"), j, lg
		if tweak != nil {
			tweak(c, state)
		}
	})
	p.recvJ.Close()
	p.recvJ, p.recvAudit, p.store = j, lg, filepath.Join(state, "images")
	return p, state
}

// serveAgain serves r on a new listener until the test ends.
func serveAgain(t *testing.T, r *Receiver) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- r.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		<-served
	})
}

// cataloged is the root the catalog itself records for name (Image gives a
// version in place before the catalog has it).
func cataloged(t *testing.T, j *Journal, name string) Hash {
	t.Helper()
	cat, err := j.Catalog()
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range cat {
		if img.Name == name {
			return img.Root
		}
	}
	return Hash{}
}

// TestReceiverStartsWithAnImageItCannotRecord: a gateway that starts with
// an image in place that its journal cannot record (a full disk) starts
// all the same: the image stays staged, and is recorded once the journal
// takes it. Meanwhile Image gives the version the path holds, which
// verifies, and an offer or a removal of its name is refused, saying why:
// a commit would replace a version the catalog never knew, a removal
// record the one before it. Before, NewReceiver failed, and with it the
// gateway, tunnels and all.
func TestReceiverStartsWithAnImageItCannotRecord(t *testing.T) {
	var rcfg ReceiverConfig
	var stop, fail atomic.Bool
	full := &fs.PathError{Op: "write", Path: "migrate.db", Err: syscall.ENOSPC}
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			if stop.Load() {
				return errStopHere
			}
			return nil
		}
		c.recordFails = func() error {
			if fail.Load() {
				return full
			}
			return nil
		}
		rcfg = *c
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 4096})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	first := cataloged(t, p.recvJ, "vm")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 4096, 5 * mib: 64 << 10})
	stop.Store(true)
	second, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err == nil {
		t.Fatal("the receiver stopped while storing, yet the send succeeded")
	}
	stop.Store(false)

	fail.Store(true)
	rcfg.afterRename = nil
	r, err := NewReceiver(rcfg)
	if err != nil {
		t.Fatalf("a start with an image in place the journal cannot record: %v", err)
	}
	if !strings.Contains(p.recvLog.String(), "an image in place is not recorded in the catalog yet: the disk is full: free space on it") {
		t.Errorf("not logged as a full disk:\n%s", p.recvLog.String())
	}
	if cataloged(t, p.recvJ, "vm") != first {
		t.Fatal("the catalog changed though its record failed")
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
		t.Fatalf("verify of the image in place, not yet recorded: %+v %v", rep, err)
	}
	// Offers go to the pair's receiver, which did not start on this
	// journal: it learns of the image as a start does.
	if left, err := p.recv.recoverStores(true); err != nil || len(left) != 1 {
		t.Fatalf("the pair's receiver finds %d images waiting (%v); want the one", len(left), err)
	}
	waiting := fmt.Sprintf("the version migration %s stored here is not recorded in the receiving gateway's catalog yet", second.ID)
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err == nil || !strings.Contains(err.Error(), waiting) {
		t.Fatalf("an offer of the name: %v; want it refused until the image is recorded", err)
	}
	if _, err := r.RemoveImage("vm", "CHG-1"); err == nil || !strings.Contains(err.Error(), "is kept: its newest version, stored by migration "+second.ID+", is not recorded in the catalog yet") {
		t.Fatalf("a removal of the name: %v; want it refused until the image is recorded", err)
	}
	if _, err := os.Stat(img.Path); err != nil {
		t.Fatal(err)
	}

	// The journal takes it again: the receiver's loop records it.
	fail.Store(false)
	serveAgain(t, r)
	waitFor(t, "the image and its audit record to be recorded", func() bool {
		owed, err := p.recvJ.auditOwed()
		return err == nil && len(owed) == 0 && cataloged(t, p.recvJ, "vm") == img.Root
	})
	if staged, _ := p.recvJ.stagedImages(); len(staged) != 0 {
		t.Errorf("still staged: %+v", staged)
	}
	done := 0
	for _, rec := range p.recvRecords(t) {
		if rec.Fields["migration_id"] == second.ID && rec.Fields["outcome"] == "done" && rec.Fields["recovered"] != nil {
			done++
		}
	}
	if done != 1 {
		t.Errorf("%d records of the image stored, want 1, marked recovered", done)
	}
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatalf("an offer of the name once its image is recorded: %v", err)
	}
	p.stored(raw)
}

// TestReceiverStartsOnAFullDisk: as TestReceiverStartsWithAnImageItCannotRecord,
// on a disk really full: bbolt's write fails there, as no fake does.
func TestReceiverStartsOnAFullDisk(t *testing.T) {
	var rcfg ReceiverConfig
	var free func()
	p, _ := fullDiskPair(t, "96m", func(c *ReceiverConfig, state string) {
		c.afterRename = func() error {
			free = smalldisk.Fill(t, state)
			return errStopHere
		}
		rcfg = *c
	})
	const chunk, n = 4096, 4096 // a manifest of 4,096 chunks: more than the journal's free pages hold
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, n*chunk, map[int64]int{0: n * chunk})
	cfg := p.config(raw, "pii-eu")
	cfg.ChunkSize = chunk
	if _, err := Send(context.Background(), cfg); err == nil {
		t.Fatal("the receiver stopped while storing, yet the send succeeded")
	}
	p.stopRecv()
	if free == nil {
		t.Fatal("the image was never moved into place")
	}
	staged, err := p.recvJ.stagedImages()
	if err != nil || len(staged) != 1 {
		t.Fatalf("staged: %d, %v; want the image", len(staged), err)
	}
	rcfg.afterRename = nil
	r, err := NewReceiver(rcfg)
	if err != nil {
		t.Fatalf("a start on a full disk: %v", err)
	}
	if !strings.Contains(p.recvLog.String(), "the disk is full: free space on it") {
		t.Errorf("not logged as a full disk:\n%s", p.recvLog.String())
	}
	free()
	serveAgain(t, r)
	for _, st := range staged {
		waitFor(t, "the image to be recorded", func() bool { return cataloged(t, p.recvJ, "vm") == st.Image.Root })
	}
	p.stored(raw)
}

// TestRemoveOnANearlyFullDisk: on a disk with less free than the margin
// a migration's audit record needs (16 MiB), an offer is refused saying
// the disk is short of room, not that the audit log refused; and an image
// is removed, with its record, where before the removal that would free
// the space was refused.
func TestRemoveOnANearlyFullDisk(t *testing.T) {
	p, state := fullDiskPair(t, "72m", nil)
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 6*mib, map[int64]int{0: 6 * mib})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	free := smalldisk.Fill(t, state)
	defer free()
	// Give 8 MiB back: room for thousands of records, half the margin.
	filler := filepath.Join(state, "filler")
	fi, err := os.Stat(filler)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filler, fi.Size()-8*mib); err != nil {
		t.Fatal(err)
	}
	if err := p.recvAudit.Ready(p.to, p.recv.cfg.Now()); err == nil {
		t.Fatal("the audit log takes a migration's record with 8 MiB free; the test needs it to refuse")
	}

	other := filepath.Join(p.dir, "other.raw")
	makeRaw(t, other, 4*mib, map[int64]int{0: mib})
	if _, err := Send(context.Background(), p.config(other, "pii-eu")); err == nil || !strings.Contains(err.Error(), "free space there, or send the image to another destination") {
		t.Fatalf("an offer on a nearly full disk: %v; want it told the disk is short of room", err)
	}

	if _, err := p.recv.RemoveImage("vm", "CHG-1: the disk is full"); err != nil {
		t.Fatalf("a removal on a nearly full disk: %v", err)
	}
	if _, err := os.Stat(img.Path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the image's file is still there: %v", err)
	}
	recs := p.recvRecords(t)
	if last := recs[len(recs)-1]; last.Fields["action"] != "removed" || last.Fields["name"] != "vm" || last.Fields["reason"] != "CHG-1: the disk is full" {
		t.Errorf("last record: %+v; want the removal's", last)
	}
}

// TestReceiverSaysTheStoreIsShortBeforeItsAuditLog: an offer the store
// has no room for, at a receiver whose audit log cannot take a record, is
// told of the room: on a nearly full disk the audit log refuses too, and
// "free space there, or send the image to another destination" is what the
// sender can act on.
func TestReceiverSaysTheStoreIsShortBeforeItsAuditLog(t *testing.T) {
	p := newPair(t, "DE")
	if err := os.WriteFile(p.recvAudit.Path(), []byte("not a record\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := p.dial(t, nil)
	cw, cr := newFrameWriter(c), newFrameReader(c)
	// 16 TiB of data: more than the test's disk has.
	o := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: MaxImageSize, ChunkSize: 32 << 20, Streams: 1, Chunks: new(int64(1 << 19))}
	if err := cw.json(frameOffer, o); err != nil {
		t.Fatal(err)
	}
	typ, b, err := cr.next(nil)
	if err != nil || typ != frameError || !strings.Contains(string(b), "free space there, or send the image to another destination") {
		t.Fatalf("answer: type %d %q, %v; want the store's lack of room", typ, b, err)
	}
}

// TestReceiverSaysToResumeWhenTheDiskFills: a disk filled while a
// migration is received ends it, the sender told the errno, to free space
// and how to resume; its chunks wait, and the resume stores the image.
func TestReceiverSaysToResumeWhenTheDiskFills(t *testing.T) {
	p, state := fullDiskPair(t, "72m", nil)
	raw := filepath.Join(p.dir, "vm.raw")
	const chunk, n = 64 << 10, 60
	blocks := map[int64]int{}
	for i := range int64(n) {
		blocks[i*chunk] = chunk
	}
	makeRaw(t, raw, n*chunk, blocks)
	cfg := p.config(raw, "pii-eu")
	cfg.ChunkSize, cfg.ID = chunk, NewID()
	// The second half of the chunks is read only once the disk is full:
	// held up by no more than reads of 20 ms a chunk, on a busy machine
	// (the race detector, CI) it had all been sent by then, and the disk
	// filled at the commit or after the migration (6 runs in 30).
	spyOn(&cfg, 20*time.Millisecond)
	filled := make(chan struct{})
	fill := sync.OnceFunc(func() { close(filled) })
	t.Cleanup(fill) // a test that fails first leaves no sender waiting
	open := cfg.open
	cfg.open = func(path string) (Source, error) {
		src, err := open(path)
		return &heldSource{Source: src, from: n / 2 * chunk, until: filled}, err
	}
	res := make(chan error, 1)
	go func() {
		_, err := Send(context.Background(), cfg)
		res <- err
	}()
	waitFor(t, "a durable chunk", func() bool {
		a := p.recv.Active()
		return len(a) == 1 && a[0].Durable > 0
	})
	free := smalldisk.Fill(t, state)
	fill()
	toldToResume(t, p, <-res, cfg.ID, "under the receive")
	free()
	id := cfg.ID
	cfg = p.config(raw, "pii-eu")
	cfg.ChunkSize, cfg.ID = chunk, id
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatalf("the resume once space is freed: %v", err)
	}
	p.stored(raw)
}

// TestReceiverSaysToResumeWhenTheDiskFillsAtCommit: a disk that fills
// once every chunk is durable fails the commit (the qcow2 metadata, the
// journal's record), not a chunk. The sender is told to free space and
// resume, as when it fills under the transfer; the receiver audits no
// failure, since nothing failed verification and the migration is not
// over; and the resume commits the chunks it holds, sending none again.
// Before, the sender was told the errno alone and the receiver logged and
// audited "failed verification".
func TestReceiverSaysToResumeWhenTheDiskFillsAtCommit(t *testing.T) {
	qemuImg(t)
	// The audit log on another disk, as a gateway may keep it: on the
	// full one, no record of the commit could be written anyway.
	logs := audit.Open(filepath.Join(t.TempDir(), "audit.log"))
	var ends endings
	p, state := fullDiskPair(t, "72m", func(c *ReceiverConfig, _ string) { c.Audit, c.Observer = logs, &ends })
	raw := filepath.Join(p.dir, "vm.raw")
	const chunk, n = 64 << 10, 40
	blocks := map[int64]int{}
	for i := range int64(n) {
		blocks[i*chunk] = chunk
	}
	makeRaw(t, raw, (n+1)*chunk, blocks)
	// The last chunk is zeros written out: read (it is data to SEEK_DATA),
	// then sent as a hole. Its read is held until the disk is full, so
	// the commit follows the filling and no chunk does.
	f, err := os.OpenFile(raw, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, chunk), n*chunk); err != nil {
		t.Fatal(err)
	}
	f.Close()
	cfg := p.config(raw, "pii-eu")
	cfg.ChunkSize, cfg.ID, cfg.Format = chunk, NewID(), FormatQcow2
	filled := make(chan struct{})
	fill := sync.OnceFunc(func() { close(filled) })
	t.Cleanup(fill)
	cfg.open = func(path string) (Source, error) {
		src, err := OpenSource(path)
		return &heldSource{Source: src, from: n * chunk, until: filled}, err
	}
	res := make(chan error, 1)
	go func() {
		_, err := Send(context.Background(), cfg)
		res <- err
	}()
	waitFor(t, "every chunk with data durable", func() bool {
		a := p.recv.Active()
		return len(a) == 1 && a[0].Durable == n
	})
	free := smalldisk.Fill(t, state)
	fill()
	err = <-res
	if err == nil || !strings.HasPrefix(err.Error(), "commit: receiver: store the image: ") {
		t.Fatalf("the sender's error on a disk filled at the commit: %v; want the commit's, saying what failed once", err)
	}
	toldToResume(t, p, err, cfg.ID, "at the commit")
	free()
	id := cfg.ID
	cfg = p.config(raw, "pii-eu")
	cfg.ChunkSize, cfg.ID, cfg.Format = chunk, id, FormatQcow2
	rec, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatalf("the resume once space is freed: %v", err)
	}
	if rec.Stats.ChunksSent != 0 {
		t.Errorf("the resume sent %d chunks; every one was durable at the destination", rec.Stats.ChunksSent)
	}
	p.stored(raw)
	// It ended once, done: the commit on a full disk was no end.
	ends.mu.Lock()
	seen := slices.Clone(ends.seen)
	ends.mu.Unlock()
	if !slices.Equal(seen, []string{RoleReceive + "/" + StateDone}) {
		t.Errorf("the receive's ends for the metrics: %v; want one, done", seen)
	}
	// Its one record says done.
	b, err := os.ReadFile(logs.Path())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(b), `"migration_id":"`+id+`"`) != 1 || !strings.Contains(string(b), `"outcome":"done"`) || strings.Contains(string(b), `"outcome":"failed"`) {
		t.Errorf("the receiver's audit log after the resume, want one record of the migration, done:\n%s", b)
	}
}

// toldToResume checks that a send that failed with err, on a disk that
// filled at the destination (where), was told to free space and resume
// migration id, stored nothing, and left the receive for that resume.
func toldToResume(t *testing.T, p *pair, err error, id, where string) {
	t.Helper()
	if err == nil || !strings.Contains(err.Error(), "no space left on device") || !strings.Contains(err.Error(), "free space there, then resume the migration (skybridge migrate resume "+id+")") {
		t.Fatalf("the sender's error on a disk filled %s: %v; want the errno and what to do", where, err)
	}
	if _, err := p.recvJ.Image("vm"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the image is in the catalog: %v", err)
	}
	waitIdle(t, p.recv, id)
}

// heldSource holds the reads of its source from offset from on until
// until is closed.
type heldSource struct {
	Source
	from  int64
	until <-chan struct{}
}

func (h *heldSource) ReadAt(p []byte, off int64) (int, error) {
	if off >= h.from {
		<-h.until
	}
	return h.Source.ReadAt(p, off)
}

// TestWriteFailedSaysWhatToDo: what a sender is told of a write here
// that failed for want of space says to free it and resume, whether the
// errno came as such or as bbolt's text; other failures are told as they
// are.
func TestWriteFailedSaysWhatToDo(t *testing.T) {
	s := &session{offer: Offer{ID: "0123456789abcdef"}}
	hint := "the destination's disk is full: free space there, then resume the migration (skybridge migrate resume 0123456789abcdef)"
	for _, tc := range []struct {
		err  error
		full bool
	}{
		{&fs.PathError{Op: "write", Path: "/store/.incoming/0123456789abcdef.raw", Err: syscall.ENOSPC}, true},
		{&fs.PathError{Op: "write", Path: "/store/.incoming/0123456789abcdef.raw", Err: syscall.EDQUOT}, true},
		{fmt.Errorf("file resize error: %s", syscall.ENOSPC), true},
		{&fs.PathError{Op: "write", Path: "/store/.incoming/0123456789abcdef.raw", Err: syscall.EIO}, false},
	} {
		got := s.writeFailed("write", tc.err)
		if !strings.HasPrefix(got, "write: "+tc.err.Error()) || strings.Contains(got, hint) != tc.full {
			t.Errorf("%v: %q; want the error, and what to do if the disk is full (%v)", tc.err, got, tc.full)
		}
	}
}

// TestRecoveredStoreReadAgain: recoverStores, which runs beside sessions
// (Serve's loop, every offer and removal), reads each staged image again
// once its session is known to be over. Recorded from the list it read
// before, an image a session stored meanwhile, record and all, was
// recorded a second time, with a second "done" audit record.
func TestRecoveredStoreReadAgain(t *testing.T) {
	type gate struct{ entered, release chan struct{} }
	var failAll atomic.Bool
	var blockOnce atomic.Pointer[gate]
	var onRename atomic.Pointer[func()]
	full := &fs.PathError{Op: "write", Path: "migrate.db", Err: syscall.ENOSPC}
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			if f := onRename.Swap(nil); f != nil {
				(*f)()
			}
			return nil
		}
		c.recordFails = func() error {
			if g := blockOnce.Swap(nil); g != nil {
				close(g.entered)
				<-g.release
				return full
			}
			if failAll.Load() {
				return full
			}
			return nil
		}
	})
	// Images in place whose record the journal could not take.
	failAll.Store(true)
	for i := range 3 {
		raw := filepath.Join(p.dir, fmt.Sprintf("a%d.raw", i))
		makeRaw(t, raw, 4*mib, map[int64]int{0: 4096})
		if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err == nil {
			t.Fatal("a send whose record fails succeeded")
		}
	}
	for attempt := range 8 {
		raw := filepath.Join(p.dir, fmt.Sprintf("b%d.raw", attempt))
		makeRaw(t, raw, 4*mib, map[int64]int{0: 4096})
		cfg := p.config(raw, "pii-eu")
		cfg.ID = NewID()
		g := &gate{entered: make(chan struct{}), release: make(chan struct{})}
		recovered := make(chan struct{})
		f := func() {
			// b is staged and in place, its audit record not written:
			// a recoverStores (any offer's or the loop's) reads it now
			// and stalls on another image's record.
			blockOnce.Store(g)
			go func() {
				defer close(recovered)
				p.recv.recoverStores(false)
			}()
			<-g.entered
			failAll.Store(false) // b's own record goes through
		}
		onRename.Store(&f)
		if _, err := Send(context.Background(), cfg); err != nil {
			t.Fatal(err)
		}
		waitIdle(t, p.recv, cfg.ID) // b's session has closed
		close(g.release)
		<-recovered
		failAll.Store(true)
		done := 0
		for _, rec := range p.recvRecords(t) {
			if rec.Fields["migration_id"] == cfg.ID && rec.Fields["outcome"] == "done" {
				done++
			}
		}
		if done != 1 {
			t.Fatalf("attempt %d: %d \"done\" audit records of migration %s, want 1", attempt, done, cfg.ID)
		}
	}
}

// TestCommitOnAFullDiskAuditedOnce: on a disk that fills as an image is
// stored, the "done" record is appended (a few hundred bytes fit) but the
// journal's note that it was does not, nor the catalog record. Recorded
// later (Serve's loop, the next offer), the image was owed its record a
// second time.
func TestCommitOnAFullDiskAuditedOnce(t *testing.T) {
	var filler string
	p, _ := fullDiskPair(t, "96m", func(c *ReceiverConfig, state string) {
		c.afterRename = func() error {
			smalldisk.Fill(t, state)
			filler = filepath.Join(state, "filler")
			fi, err := os.Stat(filler)
			if err != nil {
				t.Fatal(err)
			}
			// Room for the audit record, not for the journal's pages.
			return os.Truncate(filler, fi.Size()-4096)
		}
	})
	const chunk, n = 4096, 4096
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, n*chunk, map[int64]int{0: n * chunk})
	cfg := p.config(raw, "pii-eu")
	cfg.ChunkSize, cfg.ID = chunk, NewID()
	_, err := Send(context.Background(), cfg)
	if err == nil {
		t.Fatal("a send stored on a disk too full to record it succeeded")
	}
	waitIdle(t, p.recv, cfg.ID)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if _, err := p.recv.recoverStores(false); err != nil { // as the next offer, or the loop
		t.Fatal(err)
	}
	done := 0
	for _, rec := range p.recvRecords(t) {
		if rec.Fields["migration_id"] == cfg.ID && rec.Fields["outcome"] == "done" {
			done++
		}
	}
	if done != 1 {
		t.Errorf("%d \"done\" audit records of migration %s, want 1\nreceiver log:\n%s", done, cfg.ID, p.recvLog.String())
	}
}

// TestOfferWaitsForTheImageJustUnrecorded: in a running gateway, an offer
// of a name whose new version is in place, its record failed a moment
// ago, waits for it at once: not only once the receiver's loop has tried
// to record it (its commit would replace a version the catalog never had,
// and lose its record).
func TestOfferWaitsForTheImageJustUnrecorded(t *testing.T) {
	var fail atomic.Bool
	full := &fs.PathError{Op: "write", Path: "migrate.db", Err: syscall.ENOSPC}
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.recordFails = func() error {
			if fail.Load() {
				return full
			}
			return nil
		}
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4096})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4096, 2 * mib: 4096})
	fail.Store(true)
	second, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err == nil {
		t.Fatal("a send whose record failed succeeded")
	}
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4096, 3 * mib: 4096})
	waiting := fmt.Sprintf("the version migration %s stored here is not recorded in the receiving gateway's catalog yet", second.ID)
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err == nil || !strings.Contains(err.Error(), waiting) {
		t.Fatalf("an offer of the name right after: %v; want it to wait for the image in place", err)
	}
}
