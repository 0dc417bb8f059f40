// Package audit keeps a tamper-evident log of what a gateway did: an
// append-only file of JSON records, each signed with the gateway's mesh
// identity and chained to the previous one by hash, so a deleted, changed
// or reordered record breaks verification.
package audit

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// Record is one audit entry. Fields carries the event's details (for a
// migration: source, destination, sites, jurisdictions, class, policy
// revision and rule, image root hash, bytes, start, end, outcome).
type Record struct {
	Seq    uint64         `json:"seq"`
	Time   time.Time      `json:"time"`
	Node   string         `json:"node"`
	Event  string         `json:"event"`
	Fields map[string]any `json:"fields"`
	Prev   string         `json:"prev"` // hex SHA-256 of the previous line, "" for the first
	Cert   []byte         `json:"cert"` // the signer's certificate (DER)
	Sig    []byte         `json:"sig,omitempty"`
}

const domain = "skybridge audit v1\x00"

func (r *Record) digest() ([]byte, error) {
	c := *r
	c.Sig = nil
	b, err := json.Marshal(&c)
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	h.Write([]byte(domain))
	h.Write(b)
	return h.Sum(nil), nil
}

// Log is an audit log file.
type Log struct {
	path string
	// tidied: the head's temporaries a writer killed before its rename
	// left are gone (once a process: only a crash leaves them).
	tidied atomic.Bool
}

// Open returns the log at path (created on first append).
func Open(path string) *Log { return &Log{path: path} }

// Path is the file of the log.
func (l *Log) Path() string { return l.path }

// Append signs and appends a record. Appends from several processes are
// serialized by a file lock; the record is fsynced before Append returns.
// It refuses a record, writing nothing, when id's certificate is not
// valid at the record's time: Verify would refuse it, and the records
// chained after it.
func (l *Log) Append(id *certs.NodeIdentity, event string, fields map[string]any, now time.Time) (*Record, error) {
	// Again after the log was put aside, by this writer or another: a
	// few times at most, unless something keeps replacing the file.
	for range 8 {
		r, again, err := l.append(id, event, fields, now)
		if !again {
			return r, err
		}
	}
	return nil, fmt.Errorf("audit log %s: replaced again and again while a record was written (is another program moving it?)", l.path)
}

// append is Append; again says that the log was another gateway's and is
// now put aside, so the record goes to a new one.
func (l *Log) append(id *certs.NodeIdentity, event string, fields map[string]any, now time.Time) (_ *Record, again bool, _ error) {
	// Whatever refuses the record refuses it before the log is touched
	// (created, put aside): a new log's first record is dated by the
	// clock; after a record, by the later of the two (appendTo), which
	// may be valid when the clock is not (stepped back).
	f, err := l.open(0)
	if errors.Is(err, fs.ErrNotExist) {
		if err := l.validAt(id.Certificate(), now.UTC()); err != nil {
			return nil, false, err
		}
		f, err = l.open(os.O_CREATE)
	}
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return nil, false, fmt.Errorf("lock audit log: %w", err)
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	// The file locked must still be the log: another writer may have
	// put it aside while this one waited for the lock, and a record
	// appended to it would land in the other gateway's log (and a
	// second put-aside would move the new log over it).
	held, err := f.Stat()
	if err != nil {
		return nil, false, fmt.Errorf("audit log: %w", err)
	}
	switch cur, err := os.Stat(l.path); {
	case errors.Is(err, fs.ErrNotExist):
		return nil, true, nil
	case err != nil:
		return nil, false, fmt.Errorf("audit log: %w", err)
	case !os.SameFile(held, cur):
		return nil, true, nil
	}
	if !l.tidied.Load() {
		// Every writer of the head holds this lock.
		if atomicfile.RemoveTemps(filepath.Dir(l.path), 0, filepath.Base(l.path)+headSuffix) == nil {
			l.tidied.Store(true)
		}
	}
	last, seq, err := l.lastLine(f, id.Certificate().Raw)
	var unknown *unknownTail
	if errors.As(err, &unknown) {
		// Neither cut (it may be an acknowledged record of this gateway,
		// under a certificate since renewed) nor chained after (it may be
		// anyone's): the log goes aside whole, for verify to judge.
		if err := l.validAt(id.Certificate(), now.UTC()); err != nil {
			return nil, false, err
		}
		if err := l.putAside(unknown.node, unknown.seq, "it ends in a record without its newline, under a certificate not the record's before it nor the writer's"); err != nil {
			return nil, false, err
		}
		return nil, true, nil
	}
	if err != nil {
		return nil, false, err
	}
	if err := l.checkHead(last, seq); err != nil {
		return nil, false, err
	}
	// A log is one gateway's (Verify holds it to that). A state
	// directory that goes on under another name — a burst server
	// enrolled into a later burst, a gateway renamed — puts the old
	// log aside, whole and verifiable, and starts a new one.
	var prev Record
	if last != nil {
		if err := json.Unmarshal(last, &prev); err != nil {
			return nil, false, err
		}
		if node := id.Attributes().Node; prev.Node != node {
			if err := l.validAt(id.Certificate(), now.UTC()); err != nil {
				return nil, false, err
			}
			if err := l.putAside(prev.Node, seq, "the state directory goes on as "+node); err != nil {
				return nil, false, err
			}
			return nil, true, nil
		}
		// A record dated past the end of the certificate that signs now
		// was dated by a clock that ran ahead (under a longer
		// certificate). Dated after it, this record would be refused
		// until the clock caught up; dated by the clock, before it, it
		// would be out of order, and a revocation of this certificate
		// after all its records would still have Verify refuse them
		// (judged by the latest record before them). A new log starts
		// at the clock's time, and the old one stays whole beside it.
		if cert := id.Certificate(); prev.Time.After(cert.NotAfter) {
			if err := l.validAt(cert, now.UTC()); err != nil {
				return nil, false, err
			}
			why := fmt.Sprintf("its last record is dated %s, past the end of the certificate %s that signs now (%s): a clock ran ahead",
				prev.Time.UTC().Format(time.RFC3339), certs.FormatSerial(cert.SerialNumber), cert.NotAfter.UTC().Format(time.RFC3339))
			if err := l.putAside(prev.Node, seq, why); err != nil {
				return nil, false, err
			}
			return nil, true, nil
		}
	}
	r, err := l.appendTo(f, id, event, fields, now, last, &prev, seq)
	return r, false, err
}

// open opens the log to write it (with flag os.O_CREATE, making it if it
// is not there). The log is written in place, as the gateway's user, in a
// directory someone else may have written: a symbolic link or a second
// name (a hard link) at its path may lead to any file of this user's
// (/etc/shadow, to a gateway run as root), and a file of another user's
// is theirs to change. None of them is written.
func (l *Log) open(flag int) (*os.File, error) {
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_APPEND|syscall.O_NOFOLLOW|syscall.O_CLOEXEC|flag, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("audit log %s is a symbolic link, which a gateway never makes: someone who may write %s put it there; find out who, then move it away (a gateway starts a new log)", l.path, filepath.Dir(l.path))
	}
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("audit log: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.Mode().IsRegular():
		err = fmt.Errorf("audit log %s is not a file (mode %v): move it away", l.path, fi.Mode())
	case !ok:
	case int(st.Uid) != os.Geteuid():
		err = fmt.Errorf("audit log %s belongs to user %d, not to this gateway's (uid %d): that user may have put it there to have it written; find out why, then chown it to uid %d if it is the gateway's log, or move it away", l.path, st.Uid, os.Geteuid(), os.Geteuid())
	case st.Nlink != 1:
		err = fmt.Errorf("audit log %s has %d names (hard links), which a gateway never makes: another may be a file that matters, linked there to be appended to; find out who linked it, and keep a copy of the log rather than a link", l.path, st.Nlink)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// putAside renames the log, and its head, to names that say whose they
// are and how long: PATH.NODE.SEQ. The log says where it went, and why:
// whoever checks the log at its path finds a new one there.
func (l *Log) putAside(node string, seq uint64, why string) error {
	if !certs.ValidName(node) {
		node = "unknown"
	}
	// Never over another log put aside: the same gateway name may come
	// back to the directory and leave as long a log again. (A head
	// without its log there is this one's, from a put-aside cut short.)
	aside := fmt.Sprintf("%s.%s.%d", l.path, node, seq)
	for i := 1; ; i++ {
		_, err := os.Lstat(aside)
		if errors.Is(err, fs.ErrNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("put aside the audit log of %s: %w", node, err)
		}
		aside = fmt.Sprintf("%s.%s.%d.%d", l.path, node, seq, i)
	}
	// The head first: a writer that opens the path after the log moved
	// starts a new log, and must not find the old head beside it.
	if err := os.Rename(l.path+headSuffix, aside+headSuffix); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("put aside the audit log head of %s: %w", node, err)
	}
	if err := os.Rename(l.path, aside); err != nil {
		return fmt.Errorf("put aside the audit log of %s: %w", node, err)
	}
	if err := atomicfile.SyncDir(filepath.Dir(l.path)); err != nil {
		return err
	}
	slog.Warn("audit log put aside, whole, and a new one started", "log", l.path, "aside", aside, "records", seq, "why", why)
	return nil
}

// appendTo writes the record after last (numbered seq, prev decoded).
func (l *Log) appendTo(f *os.File, id *certs.NodeIdentity, event string, fields map[string]any, now time.Time, last []byte, prev *Record, seq uint64) (*Record, error) {
	var err error
	// The fields as Verify will read them back (numbers as floats, bytes
	// that are not UTF-8 as U+FFFD): signed as anything else, the record
	// would not verify.
	if fields, err = roundTrip(fields); err != nil {
		return nil, fmt.Errorf("audit record fields: %w", err)
	}
	event = strings.ToValidUTF8(event, "\uFFFD") // the event's name likewise
	cert := id.Certificate()
	r := &Record{Seq: seq + 1, Time: now.UTC(), Node: id.Attributes().Node, Event: event, Fields: fields, Cert: cert.Raw}
	if last != nil {
		sum := sha256.Sum256(last)
		r.Prev = hex.EncodeToString(sum[:])
		// Records are in time order, whatever the clock did (a step
		// back): Verify holds a revoked key's records to it. A record
		// dated past the end of the certificate that signs started a
		// new log instead (append).
		if prev.Time.After(r.Time) {
			r.Time = prev.Time
		}
	}
	// Signed by a certificate not valid at its time, a record never
	// verifies, nor does the chain through it to the records after it:
	// refused, for the caller to keep and write once the identity is
	// renewed or the clock is right.
	if err := l.validAt(cert, r.Time); err != nil {
		return nil, err
	}
	d, err := r.digest()
	if err != nil {
		return nil, err
	}
	if r.Sig, err = id.Signer().Sign(rand.Reader, d, crypto.SHA256); err != nil {
		return nil, fmt.Errorf("sign audit record: %w", err)
	}
	line, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	if _, err := f.Write(append(line, '\n')); err != nil {
		return nil, fmt.Errorf("append audit record: %w", err)
	}
	if err := syncFile(f); err != nil {
		// Refused, the record must not be in the log: the page cache
		// would still show it (Find takes it as written, and the record
		// owed is dropped) while the disk may never hold it.
		if terr := f.Truncate(st.Size()); terr == nil {
			f.Sync()
		}
		return nil, fmt.Errorf("append audit record: %w", err)
	}
	// The record is kept; a head left behind (its write failed) is one
	// the log is ahead of, which checkHead allows, and the next append
	// writes it again.
	sum := sha256.Sum256(line)
	atomicfile.WriteJSON(l.path+headSuffix, head{Seq: r.Seq, SHA256: hex.EncodeToString(sum[:])}, 0o600)
	return r, nil
}

// validAt says whether cert is valid at t as Verify judges it: from its
// NotBefore less the clock skew allowed, to its NotAfter.
func (l *Log) validAt(cert *x509.Certificate, t time.Time) error {
	serial := certs.FormatSerial(cert.SerialNumber)
	if t.After(cert.NotAfter) {
		return fmt.Errorf("audit log %s: the gateway's certificate %s expired at %s, before the record's time %s, and a record it signed would not verify: renew the gateway's identity (or set its clock right, if that is what is wrong)",
			l.path, serial, cert.NotAfter.UTC().Format(time.RFC3339), t.Format(time.RFC3339))
	}
	if t.Before(certs.ValidFrom(cert)) {
		return fmt.Errorf("audit log %s: the gateway's certificate %s is valid only from %s (%s earlier allowed), after the record's time %s, and a record it signed would not verify: set the gateway's clock right",
			l.path, serial, cert.NotBefore.UTC().Format(time.RFC3339), certs.MaxClockSkew, t.Format(time.RFC3339))
	}
	return nil
}

// roundTrip is fields encoded and decoded again by encoding/json.
func roundTrip(fields map[string]any) (map[string]any, error) {
	if fields == nil {
		return nil, nil
	}
	b, err := json.Marshal(fields)
	if err != nil {
		return nil, err
	}
	var out map[string]any
	return out, json.Unmarshal(b, &out)
}

// syncFile is f.Sync; a variable for tests of a disk that refuses it.
var syncFile = (*os.File).Sync

// headSuffix names the file beside the log that holds its last record's
// sequence number and hash: the log emptied, cut back or replaced by an
// older copy still verifies as a chain — a shorter one — and only the head
// says records are missing.
const headSuffix = ".head"

type head struct {
	Seq    uint64 `json:"seq"`
	SHA256 string `json:"sha256"` // of the record's line
}

// checkHead compares the log's last record (last, numbered seq; nil and 0
// for an empty log) with the head beside it. A log ahead of its head is
// fine (the head's write after an append failed); one behind is not.
func (l *Log) checkHead(last []byte, seq uint64) error {
	h, found, err := l.readHead()
	switch {
	case err != nil:
		return err
	case !found || seq > h.Seq:
		return nil
	case seq < h.Seq:
		return fmt.Errorf("audit log %s ends at record %d, but record %d was written: records were removed, or the log was replaced by an older copy; restore it from a backup (`skybridge audit verify` checks it), or move it and %s aside to start a new log", l.path, seq, h.Seq, l.path+headSuffix)
	}
	if sum := sha256.Sum256(last); hex.EncodeToString(sum[:]) != h.SHA256 {
		return fmt.Errorf("audit log %s: its last record (%d) is not the one written: the log was replaced; restore it from a backup, or move it and %s aside to start a new log", l.path, seq, l.path+headSuffix)
	}
	return nil
}

// readHead reads the head beside the log; found is false if there is none.
func (l *Log) readHead() (h head, found bool, err error) {
	found, err = atomicfile.ReadJSON(l.path+headSuffix, &h)
	switch {
	case errors.Is(err, atomicfile.ErrDamaged):
		// Written whole or not at all: damaged from outside. What it
		// vouched for is unknown, not disproved.
		return h, false, &UnreadableError{fmt.Errorf("audit log head: %w: check the log with `skybridge audit verify --log %s`; if it is intact, move %s aside (the next record writes a new one)", err, l.path, l.path+headSuffix)}
	case err != nil:
		return h, false, &UnreadableError{fmt.Errorf("audit log head: %w", err)}
	}
	return h, found, nil
}

// HasHead reports whether a head lies beside the log: one was written
// with its first record.
func (l *Log) HasHead() bool {
	_, err := os.Stat(l.path + headSuffix)
	return err == nil
}

// CheckHead says whether the log holds every record its head says was
// written (see headSuffix), without changing either.
func (l *Log) CheckHead() error {
	f, err := os.Open(l.path)
	if err != nil {
		return &UnreadableError{err}
	}
	defer f.Close()
	// Shared with other readers, not with an append: a record written
	// between reading the last one and reading the head would look like
	// records removed from a live log.
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH); err != nil {
		return &UnreadableError{fmt.Errorf("lock audit log: %w", err)}
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	end, err := atomicfile.WholeEnd(f) // an unfinished last record was never acknowledged
	if err != nil {
		return &UnreadableError{err}
	}
	last, seq, err := lastRecord(f, end)
	if err != nil {
		return err
	}
	// The record the head names, whole but for its newline (an editor,
	// a copy), is no record removed: the gateway keeps it, and puts its
	// newline back at its next append (Verify counts it and notes it).
	if tail, err := l.tailAfter(f, end); err != nil {
		return &UnreadableError{err}
	} else if l.headNames(tail, seq+1) {
		last, seq = tail, seq+1
	}
	if err := l.checkHead(last, seq); err != nil {
		return err
	}
	return l.checkHeadRecord(f, end, seq)
}

// tailAfter is what follows the last newline of f (at end), less the
// space around it: nil if nothing does, or more than a record could be.
func (l *Log) tailAfter(f *os.File, end int64) ([]byte, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	if n := fi.Size() - end; n <= 0 || n > atomicfile.MaxLine {
		return nil, nil
	}
	tail := make([]byte, fi.Size()-end)
	if _, err := f.ReadAt(tail, end); err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	return bytes.TrimSpace(tail), nil
}

// headNames reports whether the head names line as record seq; a head
// not read names nothing (checkHead reports it).
func (l *Log) headNames(line []byte, seq uint64) bool {
	h, found, err := l.readHead()
	if err != nil || !found || len(line) == 0 || h.Seq != seq {
		return false
	}
	sum := sha256.Sum256(line)
	return hex.EncodeToString(sum[:]) == h.SHA256
}

// checkHeadRecord checks, for a log ahead of its head (the head's write
// after an append failed), that the record the head names is still the
// one written: what follows it may have been chained to a log cut back
// and continued.
func (l *Log) checkHeadRecord(f *os.File, end int64, seq uint64) error {
	h, found, err := l.readHead()
	if err != nil || !found || seq <= h.Seq || h.Seq == 0 {
		return err
	}
	sc := bufio.NewScanner(io.NewSectionReader(f, 0, end))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var rec struct {
			Seq uint64 `json:"seq"`
		}
		if json.Unmarshal(sc.Bytes(), &rec) != nil || rec.Seq != h.Seq {
			continue
		}
		if sum := sha256.Sum256(sc.Bytes()); hex.EncodeToString(sum[:]) != h.SHA256 {
			return fmt.Errorf("audit log %s: record %d is not the one written: the log was cut back and written on; restore it from a backup", l.path, h.Seq)
		}
		return nil
	}
	if err := sc.Err(); err != nil {
		return &UnreadableError{err}
	}
	return fmt.Errorf("audit log %s: record %d, which its head names, is missing", l.path, h.Seq)
}

// minFree is the free space below which Ready refuses: a record is a few
// KiB, and what ends on the same disk (images) may take the rest.
var minFree uint64 = 16 << 20

// Ready reports whether the log can take a record signed by id at now:
// id's certificate is valid then, the log's end is a whole record (or it
// is empty) and its disk has room. What is recorded when it ends — a
// migration, a removal (ReadyToFree) — must not start when its record
// cannot be written. id is nil when the caller signs nothing itself.
func (l *Log) Ready(id *certs.NodeIdentity, now time.Time) error { return l.ready(id, now, true) }

// ReadyToFree is Ready for a record of what frees space (an image's
// removal): the log must be whole and the certificate valid, but its disk
// need not have minFree free. A removal is how a full disk is emptied,
// and its record, a few hundred bytes, fits where the margin does not; if
// it does not fit, Append fails and its caller undoes what it began.
func (l *Log) ReadyToFree(id *certs.NodeIdentity, now time.Time) error {
	return l.ready(id, now, false)
}

// ready is Ready, checking the disk's free space only if margin.
func (l *Log) ready(id *certs.NodeIdentity, now time.Time, margin bool) error {
	room := func(at string) error {
		if !margin {
			return nil
		}
		return roomFor(l.path, at)
	}
	// A certificate not valid when the record is dated would have it
	// refused, owed until the identity is renewed (or the clock set
	// right): a removal done by then is in no log. Dated as Append dates
	// it: by the clock, or after the log's last record when the clock
	// stepped back behind it.
	valid := func(last []byte) error {
		if id == nil {
			return nil
		}
		cert, at := id.Certificate(), now.UTC()
		var prev Record
		if last != nil && json.Unmarshal(last, &prev) == nil && prev.Node == id.Attributes().Node && prev.Time.After(at) && !prev.Time.After(cert.NotAfter) {
			at = prev.Time
		}
		return l.validAt(cert, at)
	}
	// Not created here: a gateway's log starts with its first record,
	// and an empty one reads as emptied.
	f, err := l.open(0)
	if errors.Is(err, fs.ErrNotExist) {
		if err := valid(nil); err != nil {
			return err
		}
		return room(filepath.Dir(l.path))
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock audit log: %w", err)
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	last, seq, err := l.lastLine(f, nil)
	if err != nil {
		return err
	}
	if err := l.checkHead(last, seq); err != nil {
		return err
	}
	if err := valid(last); err != nil {
		return err
	}
	return room(l.path)
}

// roomFor reports whether the disk of at (the log, or its directory
// before the first record) has room for a record of the log at path.
func roomFor(path, at string) error {
	var st syscall.Statfs_t
	if err := syscall.Statfs(at, &st); err != nil {
		return fmt.Errorf("audit log %s: free space: %w", path, err)
	}
	if free := st.Bavail * uint64(st.Bsize); free < minFree {
		return fmt.Errorf("audit log %s: its disk has %d KiB free, too little to be sure of a record: free some space", path, free>>10)
	}
	return nil
}

// lastLine returns the last record of the log and its sequence number,
// read from the log's end. Bytes after the last newline are an append cut
// short (a crash, a full disk), never acknowledged, and cut off — left,
// they would make the log's end unreadable, and every later append fail —
// unless they are a whole record that only lost its newline (an editor,
// a copy): that is put back instead (see wholeTail). own is the
// certificate of the writer about to append (nil: none, and a tail whole
// under a certificate it cannot place is left as it is); an
// *unknownTail error says the tail is whole under one own does not
// place.
func (l *Log) lastLine(f *os.File, own []byte) ([]byte, uint64, error) {
	end, err := atomicfile.WholeEnd(f)
	if err != nil {
		return nil, 0, fmt.Errorf("audit log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, fmt.Errorf("audit log: %w", err)
	}
	if size := fi.Size(); end < size {
		whole, err := l.wholeTail(f, end, own)
		var unknown *unknownTail
		switch {
		case errors.As(err, &unknown) && own == nil:
			return lastRecord(f, end) // for the writer to judge
		case err != nil:
			return nil, 0, err
		}
		if whole {
			if _, err := f.Write([]byte{'\n'}); err != nil {
				return nil, 0, fmt.Errorf("put back the newline of the audit log's last record: %w", err)
			}
			if err := f.Sync(); err != nil {
				return nil, 0, fmt.Errorf("put back the newline of the audit log's last record: %w", err)
			}
			end = size + 1
		} else if err := f.Truncate(end); err != nil {
			return nil, 0, fmt.Errorf("cut off the audit log's unfinished last record: %w", err)
		}
	}
	return lastRecord(f, end)
}

// wholeTail reports whether the bytes of f after its last newline (at
// end) are a whole record that lost its newline, to be kept, rather
// than an append cut short, to be cut; an error, with nothing cut, when
// the log's end cannot be judged. With a head: whole only if it is the
// record the head names, next after the whole ones (acknowledged: cut,
// it would be gone); left for checkHead to report if the whole records
// do not reach the head otherwise — the tail may hold the records
// missing (line ends turned to CR). Without a head (a log of an earlier
// release, a first head write that failed), or one the whole records
// reach (a later head write that failed: the record was acknowledged
// all the same): whole if it decodes, is signed by its certificate and
// chains to the last whole record, under the certificate of that record
// or of the writer (own): one signed by any other key is no record of
// this gateway's, and kept, the gateway would chain its records after
// it. JSON decodes only with its closing brace, so an append cut short
// never passes; kept, it is at worst a record whose append failed after
// the write, which its writer writes again (a duplicate, which shows);
// cut, an acknowledged one would be gone without a trace.
func (l *Log) wholeTail(f *os.File, end int64, own []byte) (bool, error) {
	tail, err := l.tailAfter(f, end)
	if err != nil || len(tail) == 0 {
		return false, err
	}
	last, seq, err := lastRecord(f, end)
	if err != nil {
		return false, err
	}
	h, found, err := l.readHead()
	switch {
	case err != nil:
		return false, err
	case found && seq < h.Seq:
		if l.headNames(tail, seq+1) {
			return true, nil
		}
		return false, l.checkHead(last, seq)
	case found:
		if err := l.checkHead(last, seq); err != nil {
			return false, err
		}
		// The whole records reach the head, and the record after them
		// may still be acknowledged: appendTo keeps a record whose head
		// write failed. Judged as without a head.
	}
	var rec Record
	if json.Unmarshal(tail, &rec) != nil || rec.Seq != seq+1 {
		return false, nil
	}
	want, ours := "", own != nil && bytes.Equal(rec.Cert, own)
	node := rec.Node
	if last != nil {
		sum := sha256.Sum256(last)
		want = hex.EncodeToString(sum[:])
		var lr Record
		if json.Unmarshal(last, &lr) == nil {
			ours, node = ours || bytes.Equal(rec.Cert, lr.Cert), lr.Node
		}
	}
	switch {
	case rec.Prev != want || !rec.signed():
		return false, nil
	case !ours:
		return false, &unknownTail{node: node, seq: seq}
	}
	return true, nil
}

// unknownTail is a last record without its newline, chained and signed,
// under a certificate neither the record before it carries nor the
// writer holds: this gateway's under a certificate renewed since, or
// anyone's. The log's node and last whole record's number name it.
type unknownTail struct {
	node string
	seq  uint64
}

func (u *unknownTail) Error() string {
	return "the audit log ends in a record without its newline, signed under a certificate it cannot place"
}

// signed reports whether the record's signature verifies by the
// certificate it carries (trusted or not: that is Verify's to judge).
func (r *Record) signed() bool {
	cert, err := x509.ParseCertificate(r.Cert)
	if err != nil {
		return false
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return false
	}
	d, err := r.digest()
	return err == nil && ecdsa.VerifyASN1(pub, d, r.Sig)
}

// lastRecord is the last record of f before end, and its number.
func lastRecord(f *os.File, end int64) ([]byte, uint64, error) {
	last, err := atomicfile.LastLine(f, end)
	if err != nil || last == nil {
		return nil, 0, err
	}
	var rec Record
	if err := json.Unmarshal(last, &rec); err != nil {
		return nil, 0, fmt.Errorf("audit log %s: its last record is damaged (%v); nothing can be chained to it: check the log with `skybridge audit verify`, and move it aside to start a new one", f.Name(), err)
	}
	return last, rec.Seq, nil
}

// Find returns the last record of the log signed by node, dated at or
// after since, for which match is true; nil when there is none. It is
// for a record a gateway may have written just before it stopped: the
// log is fsynced before the journal says a record was written, so the log
// says whether it was, and a record written again would count its event
// twice. The log is read back from its end, a block at a time, up to the
// first record dated before since (records are in time order) and no
// further than maxFind bytes: a log of years is hundreds of MiB, and it
// is read as the gateway starts. Only whole records count: bytes after
// the last newline were never acknowledged.
func (l *Log) Find(node string, since time.Time, match func(*Record) bool) (*Record, error) {
	f, err := os.Open(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, &UnreadableError{err}
	}
	defer f.Close()
	end, err := atomicfile.WholeEnd(f)
	if err != nil {
		return nil, &UnreadableError{fmt.Errorf("audit log %s: %w", l.path, err)}
	}
	return findIn(f, end, node, since, match)
}

// maxFind bounds how far back Find reads. Records written since the one
// looked for are a few at a stop, but all of them when its journal could
// not say so for long (a full disk), and all since a clock that ran ahead,
// as every record after is dated as that one; past the bound the record
// is taken as not written, and written again at worst: twice, marked
// recovered, rather than never.
var maxFind int64 = 64 << 20

// findIn is Find over the whole lines of r before end.
func findIn(r io.ReaderAt, end int64, node string, since time.Time, match func(*Record) bool) (*Record, error) {
	const block = 64 << 10
	var buf []byte // the bytes read from at, less the lines judged after them
	at := end
	for {
		// The lines whole in buf, last first: a line is whole once the
		// newline before it is read, or the log's start.
		for {
			buf = bytes.TrimRight(buf, "\n")
			i := bytes.LastIndexByte(buf, '\n')
			if i < 0 && at > 0 {
				break
			}
			line := buf[i+1:]
			if rec, stop := judge(line, node, since, match); rec != nil || stop {
				return rec, nil
			}
			if i < 0 {
				return nil, nil // the log's first line
			}
			buf = buf[:i]
		}
		if at == 0 || end-at >= maxFind {
			return nil, nil
		}
		if len(buf) > atomicfile.MaxLine {
			return nil, &UnreadableError{fmt.Errorf("audit log: a line of more than %d MiB before offset %d: not an audit log; check it with `skybridge audit verify`", atomicfile.MaxLine>>20, at+int64(len(buf)))}
		}
		n := min(block, at)
		at -= n
		b := make([]byte, n, n+int64(len(buf)))
		if _, err := r.ReadAt(b, at); err != nil {
			return nil, &UnreadableError{fmt.Errorf("audit log: %w", err)}
		}
		buf = append(b, buf...)
	}
}

// judge says whether line is the record Find looks for (rec), or one
// dated before since, where it stops. A line that is no record, changed
// or damaged, is passed over: it is not the one written.
func judge(line []byte, node string, since time.Time, match func(*Record) bool) (rec *Record, stop bool) {
	line = bytes.TrimSpace(line)
	// Its time and signer first: most records read are passed over.
	var head struct {
		Time time.Time `json:"time"`
		Node string    `json:"node"`
	}
	if len(line) == 0 || json.Unmarshal(line, &head) != nil {
		return nil, false
	}
	if head.Time.Before(since) {
		return nil, true
	}
	if head.Node != node {
		return nil, false
	}
	var r Record
	if json.Unmarshal(line, &r) != nil || !match(&r) || !r.signed() {
		return nil, false
	}
	return &r, false
}

// UnreadableError is an error of Verify or CheckHead that says the log,
// or its head, could not be read: nothing of whether the log is intact.
type UnreadableError struct{ Err error }

func (e *UnreadableError) Error() string { return e.Err.Error() }
func (e *UnreadableError) Unwrap() error { return e.Err }

// Report is the outcome of Verify.
type Report struct {
	Records int       `json:"records"`
	Node    string    `json:"node,omitempty"` // whose log it is: every record's signer
	First   time.Time `json:"first,omitzero"`
	Last    time.Time `json:"last,omitzero"`
	// CutShort: the log ends in part of a record, without its newline:
	// an append cut short (a crash, a full disk), never acknowledged,
	// which the gateway cuts off at its next append. Not counted, and
	// refused where no whole record comes before it.
	CutShort bool `json:"cut_short,omitempty"`
	// NewlineLost: the last record, counted, lost its newline (an
	// editor, a copy); the gateway puts it back at its next append.
	NewlineLost bool `json:"newline_lost,omitempty"`
}

// Verify checks every record: its signature by a certificate the mesh CA
// issued (judged at the record's time; revocation since then does not
// undo history, for records that come before any dated after it), that
// every record is the same gateway's, its sequence number and its link to
// the previous record. The error names the first bad line.
func Verify(r io.Reader, tb *certs.TrustBundle) (*Report, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	rep := &Report{}
	v := verifier{tb: tb, rep: rep}
	line := 0
	for {
		b, err := readLine(br, 16<<20)
		if err == io.EOF {
			tail := bytes.TrimSpace(b)
			var terr error
			if len(tail) > 0 {
				terr = v.record(tail, line+1)
			}
			switch {
			case len(tail) == 0:
			case terr == nil:
				// A record whole but for its newline (an editor, a
				// copy), as the gateway keeps it: counted, as it is
				// at the gateway's next append, which puts it back.
				rep.NewlineLost = true
			case json.Valid(tail):
				// Whole, but not a record as written: changed, or
				// another's, not an append cut short.
				return rep, fmt.Errorf("line %d, without a newline: %w", line+1, terr)
			default:
				rep.CutShort = true
				// After whole records, part of one is an append cut
				// short. Alone, it is all the input holds: taken for
				// that, a file of anything but newlines would be a log
				// with nothing recorded yet.
				if rep.Records == 0 {
					return rep, fmt.Errorf("it holds no whole record, only %d bytes without a newline: %s", len(b), looksLike(tail))
				}
			}
			return rep, nil
		}
		if err != nil {
			return rep, err
		}
		line++
		raw := bytes.TrimSpace(b)
		if len(raw) == 0 {
			continue
		}
		if err := v.record(raw, line); err != nil {
			return rep, err
		}
	}
}

// verifier is Verify's state between records.
type verifier struct {
	tb     *certs.TrustBundle
	rep    *Report
	prev   []byte
	latest time.Time // of the records so far
}

// record checks the record raw, of line, and counts it; on an error the
// report is left as it was.
func (v *verifier) record(raw []byte, line int) error {
	rep := v.rep
	var rec Record
	if err := json.Unmarshal(raw, &rec); err != nil {
		return fmt.Errorf("line %d: not a record: %w", line, err)
	}
	want := ""
	if v.prev != nil {
		sum := sha256.Sum256(v.prev)
		want = hex.EncodeToString(sum[:])
	}
	if rec.Prev != want {
		return fmt.Errorf("line %d: chain broken: a record before it was removed, changed or reordered", line)
	}
	if rec.Seq != uint64(rep.Records)+1 {
		return fmt.Errorf("line %d: sequence %d, expected %d", line, rec.Seq, rep.Records+1)
	}
	cert, err := x509.ParseCertificate(rec.Cert)
	if err != nil {
		return fmt.Errorf("line %d: signer certificate: %w", line, err)
	}
	attrs, err := verifyAt(v.tb, cert, rec.Time, v.latest)
	if err != nil {
		return fmt.Errorf("line %d: signer: %w", line, err)
	}
	if attrs.Node != rec.Node {
		return fmt.Errorf("line %d: signed by %s but claims node %s", line, attrs.Node, rec.Node)
	}
	if rep.Node != "" && rec.Node != rep.Node {
		return fmt.Errorf("line %d: signed by %s, in the log of %s (its first record's signer): a log is one gateway's, so records were put in from another", line, rec.Node, rep.Node)
	}
	d, err := rec.digest()
	if err != nil {
		return err
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !ecdsa.VerifyASN1(pub, d, rec.Sig) {
		return fmt.Errorf("line %d: signature does not verify: the record was changed", line)
	}
	// The signature covers the record as decoded, and decoding drops
	// a key the record does not have, the first of two copies of one,
	// one in other case: the last line, which no next record's link
	// covers, could carry them unseen. Lines are written as the
	// record's own encoding (appendTo), and must read back as it.
	if canon, err := json.Marshal(&rec); err != nil || !bytes.Equal(canon, raw) {
		return fmt.Errorf("line %d: not as the gateway wrote it (a key added, repeated or in other case): the record was changed", line)
	}
	if rep.Records == 0 {
		rep.First = rec.Time
		rep.Node = rec.Node
	}
	rep.Records++
	rep.Last = rec.Time
	if rec.Time.After(v.latest) {
		v.latest = rec.Time
	}
	v.prev = append(v.prev[:0], raw...)
	return nil
}

// looksLike says what bytes without a newline that should be a log look
// like, and what to do.
func looksLike(b []byte) string {
	switch {
	case bytes.HasPrefix(b, []byte{0x1f, 0x8b}):
		return "it is compressed (gzip): verify it uncompressed (zcat FILE | skybridge audit verify --log /dev/stdin ...)"
	case b[0] == '{' && bytes.IndexByte(b, '\r') >= 0:
		return "records whose lines end in CR, not in a newline, as a copy converted for another system leaves them: verify the log the gateway keeps, or this copy with its line ends turned back (tr '\\r' '\\n')"
	case b[0] == '{':
		return "part of a record, or one that does not verify: a first append cut short (a crash, a full disk), which the gateway cuts off at its next record (a whole first record that only lost its newline is counted)"
	}
	return fmt.Sprintf("not an audit log: it begins %q", b[:min(len(b), 32)])
}

// readLine reads one line, its newline included; io.EOF with what is
// left when the input ends without one.
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	var out []byte
	for {
		b, err := br.ReadSlice('\n')
		out = append(out, b...)
		switch {
		case err == bufio.ErrBufferFull && len(out) < max:
			continue
		case err == bufio.ErrBufferFull:
			return nil, fmt.Errorf("a line of more than %d bytes: not an audit log", max)
		case err != nil && err != io.EOF:
			return out, &UnreadableError{err}
		}
		return out, err
	}
}

// verifyAt checks the signer as of the record's time, except that a
// revocation after the fact still counts for records written after it
// (by more than the clocks may differ),
// and for records that come after one dated after it (latest: the latest
// record before): dated back, they are not the gateway's, whose records
// are in time order.
func verifyAt(tb *certs.TrustBundle, cert *x509.Certificate, at, latest time.Time) (*certs.Attributes, error) {
	attrs, err := tb.VerifyCertificate(cert, at)
	if err == nil {
		return attrs, nil
	}
	if errors.Is(err, certs.ErrRevoked) {
		// Every list that revokes it (the issuer's too, numbered behind
		// the mesh's) must date the revocation after the records.
		found, after := false, true
		for _, crl := range append(tb.CRLs(), tb.BehindCRLs()...) {
			for _, e := range crl.RevokedCertificateEntries {
				if e.SerialNumber.Cmp(cert.SerialNumber) == 0 {
					found = true
					// The record is dated by the gateway's clock, the
					// revocation by the CA's: they may differ by as
					// much as the mesh allows between clocks.
					end := e.RevocationTime.Add(certs.MaxClockSkew)
					after = after && at.Before(end) && latest.Before(end)
				}
			}
		}
		if found && after {
			// Judged as one not revoked is, but for the revocation: an
			// address outside the mesh's range is no more its then.
			a, err := certs.AttributesOf(cert)
			if err != nil {
				return nil, err
			}
			if err := a.ValidateCertified(tb.MeshPrefix()); err != nil {
				return nil, fmt.Errorf("certificate of %q: %w", a.Node, err)
			}
			return a, nil
		}
	}
	return nil, err
}
