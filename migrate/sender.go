package migrate

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/time/rate"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/policy"
)

// Timeouts of the sender: a receiver that for stallTimeout neither takes
// a byte nor acknowledges a chunk is gone (killed, cut off); the
// migration fails and can be resumed. commitTimeout bounds the final
// verification and store.
const commitTimeout = 10 * time.Minute

var stallTimeout = 30 * time.Second // var for tests

// answerTimeout and answerReadRate bound the wait for the answer to an
// offer: answerTimeout, and the time to read back held bytes at
// answerReadRate, a slow disk's pace (a resume's read-back ran at
// 600 MB/s on this project's test machine).
var answerTimeout = commitTimeout // var for tests

const answerReadRate = 10 << 20 // bytes per second

// answerInFlight is what a receiver may hold beyond what it acknowledged:
// chunks written when the last attempt ended, their acknowledgements lost.
var answerInFlight int64 = 1 << 30 // var for tests

// answerWait is how long a receiver that may hold held bytes of the image
// is given to answer an offer.
func answerWait(held int64) time.Duration {
	return answerTimeout + time.Duration(held/answerReadRate)*time.Second
}

// streamWriter is what a data stream's frames are written through. It
// paces the bytes under the bandwidth cap in small pieces, and gives each
// write stallTimeout to go through. The deadline is the receiver's to
// meet by reading, not the frame's: a 32 MiB chunk over a thin link or
// under a cap takes longer than that and is no stall. (Set per frame,
// before a wait for the cap's tokens for the whole chunk, it failed a
// migration of 4 streams at --bwlimit 100KB/s after 33 s; and a capped
// chunk that went out in one burst after its wait left nothing moving,
// to the stall check, for as long as the wait.)
type streamWriter struct {
	ctx     context.Context
	c       net.Conn
	stall   time.Duration
	wrote   *stamp // of the last bytes of chunks the receiver took
	limiter *rate.Limiter
	// piece is the most bytes written at once: an eighth of a second's
	// worth under a cap, else 256 KiB, which any link that is not
	// stalled takes within the deadline.
	piece int
	// quiet: what is written is a keepalive, which the kernel of a
	// receiver whose process is wedged still takes: not progress.
	quiet bool
}

// streamPiece is what a data stream writes at once without a cap.
const streamPiece = 256 << 10

func (w *streamWriter) Write(p []byte) (n int, err error) {
	for len(p) > 0 {
		k := min(len(p), w.piece)
		if w.limiter != nil {
			if err := w.limiter.WaitN(w.ctx, k); err != nil {
				return n, err
			}
		}
		w.c.SetWriteDeadline(time.Now().Add(w.stall))
		m, err := w.c.Write(p[:k])
		n += m
		if m > 0 && !w.quiet {
			w.wrote.touch()
		}
		if err != nil {
			return n, err
		}
		p = p[k:]
	}
	return n, nil
}

// commitGrace is how long a migration cancelled after its commit waits
// for the receiver's answer.
const commitGrace = 30 * time.Second

// Stats count what a migration did.
type Stats struct {
	VirtualBytes   int64         `json:"virtual_bytes"`   // image size
	AllocatedBytes int64         `json:"allocated_bytes"` // bytes in allocated extents (what can hold data)
	Chunks         int           `json:"chunks"`          // chunks overlapping allocated extents
	ChunksDone     int           `json:"chunks_done"`
	ChunksSent     int           `json:"chunks_sent"`    // sent with their data
	ChunksSame     int           `json:"chunks_same"`    // the destination's stored version had them
	ChunksZero     int           `json:"chunks_zero"`    // allocated but all zeros: sent as holes
	ChunksResumed  int           `json:"chunks_resumed"` // acknowledged in an earlier attempt: not even read
	ChunksHad      int           `json:"chunks_had"`     // durable at the destination from an earlier attempt, read here to be sure
	BytesRead      int64         `json:"bytes_read"`     // of the image's data: holes in a chunk are not read
	BytesRaw       int64         `json:"bytes_raw"`      // uncompressed bytes of the chunks sent
	BytesSent      int64         `json:"bytes_sent"`     // chunk payload on the wire (after compression)
	Retries        int           `json:"retries"`
	Duration       time.Duration `json:"duration_ns"`
}

// Progress is a snapshot of a running migration.
type Progress struct {
	ID    string `json:"id"`
	Phase string `json:"phase"` // policy, scan, transfer, commit, done, denied, failed
	Stats Stats  `json:"stats"`
}

// Peer is the destination gateway of a migration.
type Peer struct {
	Attributes *certs.Attributes // verified, from the destination's certificate
	Addr       netip.AddrPort    // its overlay address and migration port
	// Via are the gateways between the sender and this one that the
	// data passes through, in order: in a hub topology, the sites' hubs.
	// Empty: the direct tunnel.
	Via []*certs.Attributes
}

// SendConfig is everything a migration needs on the sending gateway.
type SendConfig struct {
	ID        string // empty: a new migration; an existing ID resumes
	Image     string
	Name      string // name at the destination; default: the image's file name without extension
	Class     string
	Format    string // raw or qcow2 at the destination; default: the source's format
	Streams   int
	BWLimit   int64 // bytes per second, 0 or less: unlimited
	ChunkSize int64 // 0: DefaultChunkSize, or larger for an image with more data than MaxManifestChunks of it hold
	// SourceFormat is what the image is read as: raw or qcow2, or "" to
	// detect it by content, as qemu-img does. Detection takes a raw disk
	// whose guest wrote a qcow2 header into its first sector for the
	// image that header describes: name the format where it is known. A
	// resume reads the image as its first attempt did.
	SourceFormat string

	From   *certs.Attributes // this gateway
	To     Peer
	Policy *policy.Policy // the residency policy in force here
	// Identity is this gateway's identity, read when it is used: a
	// migration that outlasts a renewal signs its end's record with the
	// renewed one, the one it began with having maybe expired, or been
	// revoked, since (a record it signed then would not verify).
	Identity func() *certs.NodeIdentity
	Trust    *certs.TrustBundle
	// TrustNow, if set, is the trust bundle as it changes during the
	// migration (a newer revocation list): a destination revoked
	// meanwhile is sent nothing more, nor the commit.
	TrustNow func() *certs.TrustBundle
	Dial     func(ctx context.Context, addr string) (net.Conn, error)
	Journal  *Journal
	Audit    *audit.Log
	Log      *slog.Logger
	Progress func(Progress)
	Observer Observer // nil: nobody watches
	Now      func() time.Time

	// mangle, in tests, damages a chunk's payload after it was hashed,
	// as a broken disk or memory would.
	mangle func(index int64, payload []byte)
	// open, in tests, opens the source instead of OpenSource.
	open func(path string) (Source, error)
}

// DeniedError is returned when the policy refuses a migration: before
// anything was sent, or at the commit (AtCommit).
type DeniedError struct {
	By      string   `json:"by"` // "sender" or "receiver"
	Rule    string   `json:"rule"`
	Reasons []string `json:"reasons"`
	// AtCommit: the receiver refused to store what it had received (the
	// policy in force then no longer allowed it) and removed it.
	AtCommit bool `json:"at_commit,omitempty"`
}

func (e *DeniedError) Error() string {
	when := ""
	if e.AtCommit {
		when = " when the image was to be stored (what was sent is removed)"
	}
	return fmt.Sprintf("migration refused by the residency policy at the %s%s (%s): %s", e.By, when, e.Rule, strings.Join(e.Reasons, "; "))
}

// NewID makes a migration ID.
func NewID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Send runs (or resumes) a migration and returns its record.
func Send(ctx context.Context, cfg SendConfig) (rec *SendRecord, err error) {
	cfg.Observer = observer(cfg.Observer)
	// One that fails before it has a journal record (no such image, a
	// name that cannot be stored, a resume refused) is a failed
	// migration to the metrics all the same: the CLI alone would say so.
	begun := false
	defer func() {
		if err != nil && !begun && !errors.Is(err, ErrAlreadyDone) {
			cfg.Observer.Ended(RoleSend, StateFailed, 0)
		}
	}()
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Progress == nil {
		cfg.Progress = func(Progress) {}
	}
	if cfg.ChunkSize != 0 && (cfg.ChunkSize < MinChunkSize || cfg.ChunkSize > maxChunkSize) {
		return nil, fmt.Errorf("chunk size %d: want %d to %d bytes", cfg.ChunkSize, MinChunkSize, maxChunkSize)
	}
	if cfg.Streams <= 0 {
		cfg.Streams = 4
	}
	if cfg.Streams > MaxStreams {
		return nil, fmt.Errorf("%d streams: at most %d", cfg.Streams, MaxStreams)
	}
	if err := checkSourceFormat(cfg.SourceFormat); err != nil {
		return nil, err
	}
	if err := resumedSourceFormat(&cfg); err != nil {
		return nil, err
	}
	open := cfg.open
	if open == nil {
		open = func(path string) (Source, error) { return OpenSourceAs(path, cfg.SourceFormat) }
	}
	// Its identity first: a write after this point, even one that lands
	// before the extents are listed (a hole filled, not read), is seen
	// when the transfer ends.
	sid, err := sourceID(cfg.Image)
	if err != nil {
		return nil, fmt.Errorf("open image: %w", err)
	}
	src, err := open(cfg.Image)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	// What it was read as, for a resume to read it so again.
	cfg.SourceFormat = src.Format()
	if cfg.Format == "" {
		cfg.Format = src.Format()
	}
	if cfg.Format != FormatRaw && cfg.Format != FormatQcow2 {
		return nil, fmt.Errorf("format %q: use raw or qcow2", cfg.Format)
	}
	// The chunk size is settled before the record, which a resume
	// compares it with: it follows from where the image holds data.
	extents, err := src.Extents()
	if err != nil {
		return nil, fmt.Errorf("find the data in %s: %w", cfg.Image, err)
	}
	if cfg.ChunkSize == 0 {
		if cfg.ChunkSize, err = chunkSizeFor(extents, src.Size()); err != nil {
			return nil, fmt.Errorf("%s: %w", cfg.Image, err)
		}
	} else if err := checkChunkCount(extents, src.Size(), cfg.ChunkSize); err != nil {
		return nil, fmt.Errorf("%s: %w", cfg.Image, err)
	}
	if cfg.Name == "" {
		cfg.Name = DefaultName(cfg.Image)
	}
	if err := checkName(cfg.Name); err != nil {
		return nil, err
	}
	rec, err = startRecord(&cfg, sid)
	if err != nil {
		return nil, err
	}
	begun = true // finish reports its end from here on
	s := &sender{cfg: cfg, src: src, data: extentReader{src, extents}, extents: extents, rec: rec, start: cfg.Now()}
	s.stats.VirtualBytes = src.Size()
	err = s.run(ctx)
	if err != nil && ctx.Err() != nil && !s.answered {
		// Cancelling closes the connections under the transfer: what
		// surfaces first may be a stream failing on its closed socket,
		// which is the cancellation, not a fault to report.
		err = ctx.Err()
	}
	s.finish(err)
	if err != nil {
		return s.rec, err
	}
	return s.rec, nil
}

// ErrAlreadyDone refuses to resume a migration that is done: not a
// failed migration, nothing to do.
var ErrAlreadyDone = errors.New("already done")

// DefaultName is the name an image is stored under when none is given:
// its file name without the extension.
func DefaultName(image string) string {
	return strings.TrimSuffix(filepath.Base(image), filepath.Ext(image))
}

// CheckStoredName checks the name of an image already stored, which an
// earlier release may have taken with characters new names may not hold.
func CheckStoredName(n string) error { return checkStoredName(n) }

func checkName(n string) error {
	if err := checkStoredName(n); err != nil {
		return err
	}
	// Names reach operators' terminals (`migrate list`) and audit
	// records: no escape sequences, no invisible reordering.
	// The rule the CLI escapes by (cmd/skybridge printable): a name
	// accepted here is printed as it is.
	for _, r := range n {
		if !unicode.IsGraphic(r) || unicode.Is(unicode.Cf, r) {
			return fmt.Errorf("image name %q holds a control or invisible character: use letters, digits, '.', '-' and '_'", n)
		}
	}
	if !utf8.ValidString(n) {
		return fmt.Errorf("image name %q is not UTF-8: use letters, digits, '.', '-' and '_'", n)
	}
	return nil
}

// checkStoredName is what names of images already stored must be: a
// file name in the store. Earlier releases stored any such name, and
// they can still be verified and removed.
func checkStoredName(n string) error {
	if n == "" || len(n) > 128 || strings.ContainsAny(n, "/\\\x00") || strings.HasPrefix(n, ".") {
		return fmt.Errorf("image name %q: use letters, digits, '.', '-' and '_', not starting with '.'", n)
	}
	return nil
}

func sourceID(path string) (SourceID, error) {
	st, err := os.Stat(path)
	if err != nil {
		return SourceID{}, err
	}
	id := SourceID{Size: st.Size(), MTime: st.ModTime()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		id.Inode, id.Dev = sys.Ino, uint64(sys.Dev)
		id.CTime = time.Unix(sys.Ctim.Sec, sys.Ctim.Nsec)
	}
	return id, nil
}

// resumedSourceFormat has a resume read the image as its first attempt
// did: the chunks it acknowledged are of the image read so, and whoever
// resumes (the gateway, from the record) need not say how. One that says
// otherwise is refused.
func resumedSourceFormat(cfg *SendConfig) error {
	if cfg.ID == "" {
		return nil
	}
	old, err := cfg.Journal.Send(cfg.ID)
	if err != nil || old.SourceFormat == "" { // a new migration, or a record of a release that detected it every time
		return nil
	}
	switch cfg.SourceFormat {
	case "":
		cfg.SourceFormat = old.SourceFormat
	case old.SourceFormat:
	default:
		return fmt.Errorf("migration %s read %s as %s; it cannot resume reading it as %s: resume it without a source format, or start a new migration", cfg.ID, old.Image, old.SourceFormat, cfg.SourceFormat)
	}
	return nil
}

// startRecord creates the journal record, or picks up the one of the
// migration being resumed — refusing if the source changed meanwhile,
// since chunks acknowledged then would not belong to the image now.
func startRecord(cfg *SendConfig, sid SourceID) (*SendRecord, error) {
	if cfg.ID != "" {
		old, err := cfg.Journal.Send(cfg.ID)
		if err == nil {
			if old.State == StateDone {
				return nil, fmt.Errorf("migration %s is %w", cfg.ID, ErrAlreadyDone)
			}
			if old.Image != cfg.Image || old.To != cfg.To.Attributes.Node || old.Name != cfg.Name {
				return nil, fmt.Errorf("migration %s was %s → %s as %s; it cannot resume as something else", cfg.ID, old.Image, old.To, old.Name)
			}
			if old.State == StateRunning {
				// Nothing runs it (the gateway refuses to resume a migration
				// that runs): an attempt a stop cut short, which the start
				// could not record as ended (EndInterrupted on a full disk).
				// Its end is journalled before its audit record is written,
				// as EndInterrupted does: a record written, then a journal
				// that refused the rest, would be written again at the next
				// resume under another end, not found as the same.
				old.State, old.Error, old.Finished, old.AuditPending = StateFailed, Interrupted, cfg.Now(), true
				if err := cfg.Journal.put(bucketSend, old.ID, old); err != nil {
					return nil, fmt.Errorf("migration %s: its interrupted attempt cannot be recorded as ended (%v); it resumes once the journal takes it: free space on the disk", cfg.ID, err)
				}
			}
			// How the earlier attempt ended is recorded before this one
			// overwrites it: its record is owed when a stop, or an audit
			// log that could not take it then, left it unwritten.
			if old.AuditPending && cfg.Audit != nil {
				if err := AuditInterrupted(cfg.Journal, cfg.Audit, cfg.Identity(), old, cfg.Now()); err != nil {
					return nil, fmt.Errorf("migration %s: the audit record of its earlier attempt cannot be written (%v); it resumes once the audit log takes it: check the error: the log (skybridge audit verify), the disk's free space, or the gateway's certificate, which must be valid at the record's time (renew the identity, or set the clock right)", cfg.ID, err)
				}
			}
			// What the journal holds of the attempt must go when it no
			// longer describes the source: kept, its zeros would be
			// skipped unread and its acknowledgements taken as sent, and
			// the image stored as a mix under a root that verifies.
			restarted := false
			drop := func(why string, attrs ...any) error {
				if err := cfg.Journal.dropSent(cfg.ID); err != nil {
					return fmt.Errorf("migration %s: %s, and what its interrupted attempt sent cannot be forgotten: %w", cfg.ID, why, err)
				}
				cfg.Log.Warn(why+" since the interrupted attempt; starting its chunks over", append([]any{"migration_id", cfg.ID}, attrs...)...)
				restarted = true
				return nil
			}
			switch {
			case !old.Source.Same(sid):
				if err := drop("source image changed"); err != nil {
					return nil, err
				}
			case old.ChunkSize != 0 && old.ChunkSize != cfg.ChunkSize:
				// Chunk i is other bytes now. (Records of releases
				// before chunk_size hold no zeros, and the receiver
				// checks acknowledged chunks by hash.)
				if err := drop("chunk size changed", "chunk_size", cfg.ChunkSize, "was", old.ChunkSize); err != nil {
					return nil, err
				}
			}
			old.State, old.Error, old.Reasons, old.Source, old.ChunkSize = StateRunning, "", nil, sid, cfg.ChunkSize
			// A record of a release before the eighth of 2026-11-27 does not
			// say whether an attempt restarted: one may have, so room for
			// every chunk is asked for.
			old.Restarted = old.Restarted || restarted || old.SourceFormat == ""
			old.SourceFormat = cfg.SourceFormat // as resumedSourceFormat kept it
			// As this attempt runs: the destination's site as its
			// certificate says now (re-issued, it is judged anew), and the
			// pace asked for. Listings, plans, the audit record of an
			// attempt cut short and the next resume read them here.
			old.ToSite, old.Streams, old.BWLimit = cfg.To.Attributes.Site, cfg.Streams, cfg.BWLimit
			old.Started, old.Finished = cfg.Now(), time.Time{}
			return old, cfg.Journal.put(bucketSend, old.ID, old)
		}
	} else {
		cfg.ID = NewID()
	}
	rec := &SendRecord{
		ID: cfg.ID, Image: cfg.Image, Source: sid, SourceFormat: cfg.SourceFormat, ChunkSize: cfg.ChunkSize, Name: cfg.Name, Class: cfg.Class, Format: cfg.Format,
		To: cfg.To.Attributes.Node, ToSite: cfg.To.Attributes.Site, Streams: cfg.Streams, BWLimit: cfg.BWLimit,
		State: StateRunning, Started: cfg.Now(),
	}
	return rec, cfg.Journal.put(bucketSend, rec.ID, rec)
}

type sender struct {
	cfg     SendConfig
	src     Source
	data    io.ReaderAt // src, read in its extents only
	extents []Extent    // where src holds data, read once at the start
	rec     *SendRecord
	start   time.Time
	// destSerial is the serial of the certificate the destination
	// authenticated with.
	destSerial *big.Int
	// answered: the receiver's answer to the commit was read. Whatever
	// it said is the outcome, even if the migration was cancelled while
	// the receiver judged the commit: both ends must record the same.
	answered bool

	mu       sync.Mutex
	manifest Manifest
	decision policy.Decision
	stats    Stats
}

func (s *sender) progress(phase string) {
	s.mu.Lock()
	st := s.stats
	s.mu.Unlock()
	st.Duration = s.cfg.Now().Sub(s.start)
	s.cfg.Progress(Progress{ID: s.rec.ID, Phase: phase, Stats: st})
}

func (s *sender) finish(err error) {
	s.mu.Lock()
	s.stats.Duration = s.cfg.Now().Sub(s.start)
	s.rec.Stats = s.stats
	s.mu.Unlock()
	s.rec.Finished = s.cfg.Now()
	var denied *DeniedError
	switch {
	case err == nil:
		s.rec.State = StateDone
	case errors.As(err, &denied):
		s.rec.State, s.rec.Reasons = StateDenied, denied.Reasons
		s.rec.Error = err.Error()
	case errors.Is(err, context.Canceled):
		s.rec.State, s.rec.Error = StateCancelled, "cancelled"
	default:
		s.rec.State, s.rec.Error = StateFailed, err.Error()
	}
	// The record is kept with the end until the audit log has it: a
	// stop, or a log that refuses it now, leaves it to be written whole
	// (its decision too) at the next start or resume.
	var f map[string]any
	if s.cfg.Audit != nil {
		f = s.auditFields(denied)
		s.rec.AuditPending, s.rec.AuditOwed = true, f
	}
	if perr := s.cfg.Journal.put(bucketSend, s.rec.ID, s.rec); perr != nil {
		s.cfg.Log.Error("journal", "err", perr)
	}
	if f != nil {
		if _, err := s.cfg.Audit.Append(s.cfg.Identity(), "migration", f, s.cfg.Now()); err != nil {
			s.cfg.Log.Error("audit log: the migration's record is kept in the journal and written at the next start or resume; check the error: the log (skybridge audit verify), the disk's free space, or the gateway's certificate, which must be valid at the record's time (renew the identity, or set the clock right)", "err", err)
		} else {
			s.rec.AuditPending, s.rec.AuditOwed = false, nil
			if perr := s.cfg.Journal.put(bucketSend, s.rec.ID, s.rec); perr != nil {
				s.cfg.Log.Error("journal", "err", perr)
			}
		}
	}
	s.cfg.Observer.Ended(RoleSend, s.rec.State, s.rec.Stats.Duration)
	s.progress(map[string]string{StateDone: "done", StateDenied: "denied", StateCancelled: "cancelled", StateFailed: "failed"}[s.rec.State])
}

// auditFields is the migration's record for the sender's audit log;
// denied, if set, is the policy's refusal, whose rule and reasons the
// record carries rather than those of the sender's own decision to go
// ahead.
func (s *sender) auditFields(denied *DeniedError) map[string]any {
	f := sendAuditFields(s.rec, s.cfg.From)
	to := s.cfg.To.Attributes // as judged now (the record's may be of an earlier attempt)
	f["destination_node"], f["destination_site"], f["destination_jurisdiction"] = to.Node, to.Site, to.Jurisdiction
	f["policy"], f["rule"] = s.decision.Policy.RevisionString(), s.decision.Rule.String()
	decisionFields(f, &s.decision)
	if denied != nil {
		f["rule"], f["reasons"], f["denied_by"] = denied.Rule, denied.Reasons, denied.By
		delete(f, "obligations") // of an allow that did not stand
		if denied.AtCommit {
			f["denied_at_commit"] = true
		}
	}
	return f
}

// AuditInterrupted appends the audit record a send ended by a stop did
// not write (EndInterrupted found it): its start, its end as found, and
// what its journal holds; then its journal record is no longer pending
// it. Who decided what is in the records of the attempt's receiver, and
// of the resume. A record the log holds already (the stop came after its
// append, before the journal said so) is not written again.
func AuditInterrupted(j *Journal, log *audit.Log, id *certs.NodeIdentity, r *SendRecord, now time.Time) error {
	f := r.AuditOwed // as the sender made it, decision and all
	if f == nil {    // a stop before it was made: what the journal holds
		f = sendAuditFields(r, id.Attributes())
	}
	// A log that cannot be read back is written to all the same: the
	// record twice, which shows, rather than a resume refused for good.
	if written, _ := auditWritten(log, id.Attributes().Node, f); !written {
		f["recovered"] = "recorded late: the gateway stopped, or its audit log refused the record, as the migration ended"
		if _, err := log.Append(id, "migration", f, now); err != nil {
			return err
		}
	}
	r.AuditPending, r.AuditOwed = false, nil
	return j.put(bucketSend, r.ID, r)
}

// auditWritten reports whether log holds migration record f, signed by
// node, already: a stop between its append and the journal's note that
// it was written leaves it owed, and the log, fsynced first, says whether
// it was. f is compared whole but for "recovered", which a record written
// late carries: its start and end, to the nanosecond, tell one attempt's
// record from another's. The log is read back only to a little before
// f's end, which was taken before the record was appended: by as much as
// the mesh allows a clock to be off, as one set back in between dates
// the record before its end.
func auditWritten(log *audit.Log, node string, f map[string]any) (bool, error) {
	// As the log holds fields: through JSON (times as text, numbers as
	// floats), and encoded again with their keys sorted.
	canon := func(f map[string]any) ([]byte, error) {
		f = maps.Clone(f)
		delete(f, "recovered")
		return json.Marshal(f)
	}
	b, err := canon(f)
	if err != nil {
		return false, err
	}
	var want map[string]any
	if err := json.Unmarshal(b, &want); err != nil {
		return false, err
	}
	if b, err = canon(want); err != nil {
		return false, err
	}
	var since time.Time // unknown: back as far as Find reads
	if end, ok := want["end"].(string); ok {
		if t, err := time.Parse(time.RFC3339Nano, end); err == nil {
			since = t.Add(-certs.MaxClockSkew)
		}
	}
	rec, err := log.Find(node, since, func(r *audit.Record) bool {
		if r.Event != "migration" || r.Fields["migration_id"] != want["migration_id"] {
			return false
		}
		got, err := canon(r.Fields)
		return err == nil && bytes.Equal(got, b)
	})
	return rec != nil, err
}

// sendAuditFields are the fields of a sender's audit record that its
// journal record and its own identity give.
func sendAuditFields(r *SendRecord, from *certs.Attributes) map[string]any {
	f := map[string]any{
		"migration_id": r.ID, "role": "sender", "image": r.Image, "name": r.Name, "class": r.Class,
		"source_node": from.Node, "source_site": from.Site, "source_jurisdiction": from.Jurisdiction,
		"destination_node": r.To, "destination_site": r.ToSite, "outcome": r.State,
		"root": r.Root.String(), "bytes_sent": r.Stats.BytesSent, "bytes_read": r.Stats.BytesRead,
		"start": r.Started, "end": r.Finished,
	}
	if r.Error != "" {
		f["error"] = r.Error
	}
	return f
}

// decisionFields adds to an audit record what the decision rested on
// beyond its rule: the reasons, the exception (with its ticket and
// approver) or audit mode that let it through, and the obligations that
// come with it.
func decisionFields(f map[string]any, d *policy.Decision) {
	if len(d.Reasons) > 0 {
		f["reasons"] = d.Reasons
	}
	exc := func(e *policy.ExceptionRef) map[string]any {
		return map[string]any{"name": e.Name, "category": e.Category, "ticket": e.Ticket, "approver": e.Approver, "expires": e.Expires}
	}
	if e := d.Exception; e != nil {
		f["exception"] = exc(e)
	}
	if len(d.Exceptions) > 1 {
		// A move that rests on two waivers (where it is stored, where it
		// passes) names both, for a search by either's ticket.
		all := make([]map[string]any, len(d.Exceptions))
		for i, e := range d.Exceptions {
			all[i] = exc(e)
		}
		f["exceptions"] = all
	}
	if d.Audit {
		f["audit_mode"] = true // denied by the policy, let through by its audit mode
	}
	if !d.Obligations.IsZero() {
		f["obligations"] = d.Obligations.String()
	}
}

// check asks the residency policy before anything is sent: store at the
// destination, transit along the path.
func (s *sender) check() error {
	if s.cfg.Policy == nil {
		return &DeniedError{By: "sender", Rule: "no policy", Reasons: []string{"no residency policy is in force on this gateway: nothing may leave it"}}
	}
	checks, verdict := s.cfg.Policy.AdmitPath(s.cfg.Class, policy.PathOf(s.cfg.From, s.cfg.To.Via, s.cfg.To.Attributes), s.cfg.Now())
	for _, c := range checks {
		s.cfg.Observer.Decided(RoleSend, s.rec.ID, c.Request, c.Decision)
	}
	s.decision = verdict
	if !verdict.Allowed {
		return &DeniedError{By: "sender", Rule: verdict.Rule.String(), Reasons: verdict.Reasons}
	}
	return nil
}

// dialTimeout bounds reaching and authenticating the receiver: a gateway
// whose kernel completes the connection but whose receiver never answers
// (hung, stopped accepting) would otherwise hold the migration for good.
var dialTimeout = stallTimeout

func (s *sender) dial(ctx context.Context) (*tls.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	raw, err := s.cfg.Dial(dctx, s.cfg.To.Addr.String())
	if err != nil {
		return nil, fmt.Errorf("reach %s at %s: %w", s.cfg.To.Attributes.Node, s.cfg.To.Addr, err)
	}
	c := tls.Client(raw, clientTLS(s.cfg.Identity(), s.cfg.Trust, s.cfg.To.Attributes, s.cfg.Now))
	if err := c.HandshakeContext(dctx); err != nil {
		raw.Close()
		if ctx.Err() == nil && dctx.Err() != nil {
			return nil, fmt.Errorf("authenticate %s at %s: no answer within %s (is its gateway running?)", s.cfg.To.Attributes.Node, s.cfg.To.Addr, dialTimeout)
		}
		return nil, fmt.Errorf("authenticate %s: %w", s.cfg.To.Attributes.Node, err)
	}
	return c, nil
}

func (s *sender) run(ctx context.Context) error {
	s.progress("policy")
	if err := s.check(); err != nil {
		return err
	}
	// The record is written when the migration ends: not possible then,
	// the migration does not start.
	if s.cfg.Audit != nil {
		if err := s.cfg.Audit.Ready(s.cfg.Identity(), s.cfg.Now()); err != nil {
			return fmt.Errorf("no migration without its audit record: %w", err)
		}
	}
	size, chunk := s.src.Size(), s.cfg.ChunkSize
	cands := candidates(s.extents, size, chunk)
	s.mu.Lock()
	for _, e := range s.extents {
		s.stats.AllocatedBytes += e.Len
	}
	s.stats.Chunks = len(cands)
	s.mu.Unlock()
	s.manifest = Manifest{Size: size, ChunkSize: chunk, Chunks: map[int64]Hash{}}
	acked, err := s.cfg.Journal.chunks("send", s.rec.ID)
	if err != nil {
		return err
	}
	zeros, err := s.cfg.Journal.chunks(sideSendZeros, s.rec.ID)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ctrl, err := s.dial(ctx)
	if err != nil {
		return err
	}
	defer ctrl.Close()
	stopClose := context.AfterFunc(ctx, func() { ctrl.Close() })
	cw, cr := newFrameWriter(ctrl), newFrameReader(ctrl)
	offer := Offer{ID: s.rec.ID, Name: s.rec.Name, Class: s.rec.Class, Format: s.rec.Format, Size: size, ChunkSize: chunk,
		Streams: s.cfg.Streams, Policy: s.decision.Policy.RevisionString(), Chunks: new(int64(len(cands))), Bytes: new(sparseBytes(s.extents, size, chunk)),
		Restarted: s.rec.Restarted}
	if err := cw.json(frameOffer, offer); err != nil {
		return err
	}
	// The answer may take long: a receiver resuming reads back and
	// hashes every chunk it holds first, saying nothing meanwhile — the
	// chunks it acknowledged before, and those that were on their way
	// when the last attempt ended (answerInFlight). A receiver hung, or
	// whose host vanished where no keepalive tells, must not
	// hold the migration for good. (Chunks of zeros were never sent:
	// the receiver holds none of them to read back.)
	s.progress("offered")
	ctrl.SetReadDeadline(time.Now().Add(answerWait(int64(len(acked))*chunk + answerInFlight)))
	typ, payload, err := cr.next(nil)
	if err != nil {
		return fmt.Errorf("offer: %w", err)
	}
	ctrl.SetReadDeadline(time.Time{})
	var acc Accept
	switch typ {
	case frameAccept:
		if err := jsonUnmarshal(payload, &acc); err != nil {
			return err
		}
	case frameDeny:
		var d Deny
		jsonUnmarshal(payload, &d)
		return &DeniedError{By: "receiver", Rule: d.Rule, Reasons: d.Reasons}
	case frameError:
		return fmt.Errorf("receiver: %s", errorText(payload))
	default:
		return fmt.Errorf("unexpected answer %d to the offer", typ)
	}

	s.destSerial = ctrl.ConnectionState().PeerCertificates[0].SerialNumber
	if err := s.transfer(ctx, cands, acked, zeros, &acc); err != nil {
		return err
	}
	if err := s.destinationRevoked(); err != nil {
		return err
	}

	// What was read is one version of the image only if nothing wrote
	// to it meanwhile (a running VM does): a mix of two would be stored
	// and verified as if it were an image.
	now, err := sourceID(s.cfg.Image)
	if err != nil {
		return fmt.Errorf("check the source is unchanged: %w", err)
	}
	if !now.Same(s.rec.Source) {
		return fmt.Errorf("%s changed while it was read (is a VM running on it?); nothing was stored: stop the VM (or pause its writes) until the migration is done; `skybridge migrate resume %s` then sends only the chunks that differ from those already sent", s.cfg.Image, s.rec.ID)
	}
	s.progress("commit")
	s.rec.Root = s.manifest.Root()
	// Once the commit is sent the receiver stores the image whatever we
	// do: a cancel (migrate cancel, the gateway stopping) from here on
	// waits commitGrace for its answer rather than record as cancelled a
	// migration the destination records as done.
	if stopClose() {
		context.AfterFunc(ctx, func() { time.AfterFunc(commitGrace, func() { ctrl.Close() }) })
	}
	if err := cw.json(frameCommit, Commit{Manifest: s.manifest, Root: s.rec.Root}); err != nil {
		return err
	}
	// Verifying and storing (qcow2 conversion included) is local work at
	// the receiver; give it time, but not forever.
	ctrl.SetReadDeadline(time.Now().Add(commitTimeout))
	var done Done
	typ, payload, err = cr.next(nil)
	s.answered = err == nil
	switch {
	case err != nil:
		return fmt.Errorf("commit: %w", err)
	case typ == frameDeny:
		// The receiver decides again at the commit: the policy in
		// force then may no longer allow the image there.
		var d Deny
		jsonUnmarshal(payload, &d)
		return &DeniedError{By: "receiver", Rule: d.Rule, Reasons: d.Reasons, AtCommit: true}
	case typ == frameError:
		return fmt.Errorf("commit: receiver: %s", errorText(payload))
	case typ != frameDone:
		return fmt.Errorf("commit: unexpected answer %d", typ)
	}
	if err := jsonUnmarshal(payload, &done); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	if done.Root != s.rec.Root {
		return fmt.Errorf("receiver stored root %s, expected %s", done.Root, s.rec.Root)
	}
	s.cfg.Journal.dropSent(s.rec.ID)
	return nil
}

// chunkDone counts a chunk dealt with, whichever way (s.mu held): it is
// progress even when nothing crosses the wire, as in a re-sync of an
// unchanged image, which reads for as long as the image takes to read.
func (s *sender) chunkDone() {
	s.stats.ChunksDone++
	s.cfg.Observer.Done(RoleSend, 1)
}

// destinationRevoked says so if the destination's certificate has been
// revoked since the migration began: a gateway decommissioned or whose key
// was stolen is sent nothing more (the receiver judges the sender the same
// way at the commit).
func (s *sender) destinationRevoked() error {
	if s.cfg.TrustNow == nil || s.destSerial == nil || !s.cfg.TrustNow().IsRevoked(s.destSerial) {
		return nil
	}
	return fmt.Errorf("the destination %s's certificate %s was revoked during the migration: nothing more is sent, and nothing is stored there", s.cfg.To.Attributes.Node, certs.FormatSerial(s.destSerial))
}

// receiverError is what the receiver said when it ended a transfer.
type receiverError string

func (e receiverError) Error() string { return "receiver: " + string(e) }

// preferReceiver returns the receiver's reason for ending a transfer when
// one follows err shortly. A receiver says why, then hangs up: a write
// can fail on the closed connection before another stream has read the
// reason, and "broken pipe" would be reported instead of it.
func preferReceiver(err error, errc <-chan error) error {
	var re receiverError
	if errors.As(err, &re) {
		return err
	}
	t := time.NewTimer(time.Second)
	defer t.Stop()
	for {
		select {
		case e := <-errc:
			if errors.As(e, &re) {
				return e
			}
		case <-t.C:
			return err
		}
	}
}

// errorText is the text of an Error frame: the receiver sends some as a
// JSON string, some as they are.
func errorText(p []byte) string {
	var s string
	if json.Unmarshal(p, &s) == nil {
		return s
	}
	return string(p)
}

// nextJob takes a data stream's next job: nil once the queue is closed.
// When none is waiting, what the stream has buffered is flushed first.
// (It used to flush when the queue looked empty just after a write: a
// frame was left in the buffer whenever another stream took the job it
// had seen waiting, and if no job came to this stream again that chunk
// was never sent, never acknowledged, and the receiver taken for gone.)
func nextJob(ctx context.Context, queue <-chan *job, fw *frameWriter) (*job, error) {
	select {
	case j := <-queue:
		return j, nil
	default:
	}
	if err := fw.flush(); err != nil {
		return nil, err
	}
	select {
	case j := <-queue:
		return j, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// job is one chunk on its way.
type job struct {
	index int64
	hash  Hash
	same  bool   // send a Same frame
	had   bool   // the receiver has it durable: nothing to send
	alive bool   // no chunk: an Alive frame, to keep the session
	data  []byte // frame payload parts: header + bytes
	hdr   []byte
	tries int
}

// transfer reads, hashes, compresses and sends the candidate chunks over
// the data streams, and returns when every chunk sent is durable at the
// receiver.
func (s *sender) transfer(ctx context.Context, cands []int64, acked, zeros map[int64]Hash, acc *Accept) error {
	// Whatever ends the transfer — done, an error, a stall — ends every
	// goroutine it started: a writer waiting for the queue holds its
	// stream's buffers, and an attempt given up must not keep them.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.progress("transfer")
	producerCount := max(2, s.cfg.Streams)
	enc, err := newChunkEncoder(producerCount)
	if err != nil {
		return err
	}
	// Read once: what runs on after an attempt fails (its streams are not
	// waited for) must not read it as a test restores it.
	stall := stallTimeout
	var limiter *rate.Limiter
	piece := streamPiece
	if bw := s.cfg.BWLimit; bw > 0 {
		piece = int(min(max(bw/8, 1<<10), 64<<10))
		limiter = rate.NewLimiter(rate.Limit(bw), int(max(int64(piece), bw/10)))
	}

	conns := make([]*tls.Conn, s.cfg.Streams)
	for i := range conns {
		c, err := s.dial(ctx)
		if err != nil {
			return err
		}
		defer c.Close()
		context.AfterFunc(ctx, func() { c.Close() })
		fw := newFrameWriter(c)
		if err := fw.json(frameJoin, Join{ID: s.rec.ID}); err != nil {
			return err
		}
		conns[i] = c
	}

	var (
		pending  atomic.Int64             // chunks queued and not yet durable at the receiver
		settled  = make(chan struct{}, 1) // a chunk became durable
		inflight sync.Map                 // index → *job
		queue    = make(chan *job, 4*len(conns))
		errc     = make(chan error, len(conns)*2+1)
		newAcks  = map[int64]Hash{}
		newZeros = map[int64]Hash{} // chunks found all zeros
		ackMu    sync.Mutex
		done     atomic.Bool
		lastAck  = newStamp() // of the last acknowledgement
		lastSent = newStamp() // of the last frame written
		wrote    = newStamp() // of the last bytes the receiver took
		inFlight atomic.Int64
		// keepAlive: while the producers find nothing to send, a frame
		// this often keeps the receiver from taking the sender for gone.
		keepAlive = max(time.Duration(acc.IdleMS)*time.Millisecond/4, 0)
	)
	if keepAlive > 0 && keepAlive < 50*time.Millisecond {
		keepAlive = 50 * time.Millisecond
	}
	fail := func(err error) {
		select {
		case errc <- err:
		default:
		}
	}
	flushAcks := func() {
		ackMu.Lock()
		batch, zs := newAcks, newZeros
		newAcks, newZeros = map[int64]Hash{}, map[int64]Hash{}
		ackMu.Unlock()
		if err := errors.Join(s.cfg.Journal.addChunks("send", s.rec.ID, batch), s.cfg.Journal.addChunks(sideSendZeros, s.rec.ID, zs)); err != nil {
			fail(err)
		}
	}
	// Whatever ends the transfer, what was acknowledged is recorded, so a
	// resume does not even read it again.
	defer flushAcks()

	// Data streams: one writer and one reader per connection.
	var streams sync.WaitGroup
	for _, c := range conns {
		sw := &streamWriter{ctx: ctx, c: c, stall: stall, wrote: wrote, limiter: limiter, piece: piece}
		fw, fr := newFrameWriter(sw), newFrameReader(c)
		streams.Go(func() {
			for {
				j, err := nextJob(ctx, queue, fw)
				if ctx.Err() != nil {
					return
				}
				if err != nil {
					fail(fmt.Errorf("data stream: %w", err))
					return
				}
				if j == nil { // closed: every chunk is durable
					break
				}
				if j.alive {
					// What a chunk left in the buffer is progress: out
					// first, counted.
					err := fw.flush()
					sw.quiet = true
					if err == nil {
						err = fw.frame(frameAlive)
					}
					if err == nil {
						err = fw.flush()
					}
					sw.quiet = false
					if err != nil {
						fail(fmt.Errorf("data stream: %w", err))
						return
					}
					lastSent.touch()
					continue
				}
				inflight.Store(j.index, j)
				inFlight.Add(1)
				if j.same {
					err = fw.frame(frameSame, indexFrame(j.index, j.hash))
				} else {
					err = fw.frame(frameChunk, j.hdr, j.data)
					if err == nil { // counted as it goes, not as it is prepared
						n := int64(len(j.data))
						s.mu.Lock()
						s.stats.ChunksSent++
						s.stats.BytesSent += n
						s.mu.Unlock()
						s.cfg.Observer.Moved(RoleSend, 1, n)
					}
					// Neither bufio nor TLS keeps the slice
					// once Write returns; a retry reads the
					// chunk anew.
					putChunkBuf(j.data)
					j.data = nil
				}
				if err != nil {
					fail(fmt.Errorf("send chunk %d: %w", j.index, err))
					return
				}
				lastSent.touch()
			}
			fw.flush()
		})
		streams.Go(func() {
			buf := make([]byte, 0, 4096)
			for {
				typ, p, err := fr.nextMax(buf, maxAckFrame)
				if err != nil {
					if !done.Load() {
						fail(fmt.Errorf("data stream: %w", err))
					}
					return
				}
				switch typ {
				case frameAck:
					idx, err := parseAck(p)
					if err != nil {
						fail(err)
						return
					}
					for _, i := range idx {
						v, ok := inflight.LoadAndDelete(i)
						if !ok {
							continue
						}
						inFlight.Add(-1)
						lastAck.touch()
						j := v.(*job)
						ackMu.Lock()
						newAcks[i] = j.hash
						ackMu.Unlock()
						s.mu.Lock()
						s.chunkDone()
						s.mu.Unlock()
						pending.Add(-1)
						select {
						case settled <- struct{}{}:
						default:
						}
					}
				case frameNack:
					i, reason, err := parseNack(p)
					if err != nil {
						fail(err)
						return
					}
					v, ok := inflight.LoadAndDelete(i)
					if !ok {
						continue
					}
					inFlight.Add(-1)
					lastAck.touch()
					j := v.(*job)
					if j.tries >= 3 {
						fail(fmt.Errorf("chunk %d refused by the receiver %d times, last: %s", i, j.tries, reason))
						return
					}
					s.mu.Lock()
					s.stats.Retries++
					s.mu.Unlock()
					s.cfg.Observer.Retried(RoleSend)
					go func() {
						// Re-read and send the full chunk again.
						nj, err := s.prepare(j.index, enc, nil)
						if err != nil {
							fail(err)
							return
						}
						if nj == nil {
							// Zeros now: the source was written
							// meanwhile, and the manifest says hole.
							pending.Add(-1)
							select {
							case settled <- struct{}{}:
							default:
							}
							return
						}
						nj.tries = j.tries + 1
						select {
						case queue <- nj:
						case <-ctx.Done():
						}
					}()
				case frameError:
					fail(receiverError(errorText(p)))
					return
				}
			}
		})
	}

	// Producers: decide per chunk, reading only what must be read.
	work := make(chan int64)
	var producers sync.WaitGroup
	for range producerCount {
		producers.Go(func() {
			for i := range work {
				if _, ok := zeros[i]; ok {
					// Found zeros by an earlier attempt of this
					// unchanged source: a hole, not read again.
					s.mu.Lock()
					s.stats.ChunksZero++
					s.chunkDone()
					s.mu.Unlock()
					continue
				}
				if h, ok := acked[i]; ok {
					if have, held := acc.Have[i]; held && have == h {
						s.mu.Lock()
						s.manifest.Chunks[i] = h
						s.stats.ChunksResumed++
						s.chunkDone()
						s.mu.Unlock()
						continue
					}
				}
				j, err := s.prepare(i, enc, acc)
				if err != nil {
					fail(err)
					return
				}
				if j == nil { // zeros
					// Recorded, so that a resume of this source does
					// not read them again: allocated zeros (a
					// thick-provisioned disk) may be most of an image.
					ackMu.Lock()
					newZeros[i] = Hash{}
					ackMu.Unlock()
					continue
				}
				if j.had {
					// Durable there already: recorded as acknowledged,
					// so the next resume skips it without reading it
					// (it used to read them all again after every
					// interruption).
					ackMu.Lock()
					newAcks[i] = j.hash
					ackMu.Unlock()
					continue
				}
				pending.Add(1)
				select {
				case queue <- j:
				case <-ctx.Done():
					return
				}
			}
		})
	}
	go func() {
		defer close(work)
		for _, i := range cands {
			select {
			case work <- i:
			case <-ctx.Done():
				return
			}
		}
	}()

	tick := 250 * time.Millisecond
	if keepAlive > 0 {
		tick = min(tick, keepAlive)
	}
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	producersDone := make(chan struct{})
	go func() { producers.Wait(); close(producersDone) }()
	// Every chunk is durable once the producers have queued their last
	// and the count of those pending is back to zero (a retried chunk
	// stays pending: it was counted once).
	finished := false
	for {
		select {
		case err := <-errc:
			return preferReceiver(err, errc)
		case <-ctx.Done():
			return ctx.Err()
		case <-ticker.C:
			flushAcks()
			s.progress("transfer")
			if keepAlive > 0 && lastSent.age() > keepAlive {
				select {
				case queue <- &job{alive: true}:
				default: // full: frames are on their way anyway
				}
			}
			if err := s.destinationRevoked(); err != nil {
				return err
			}
			// Bytes still taken mean chunks still arriving: one may
			// take longer than the timeout at a cap or on a thin link.
			if inFlight.Load() > 0 && lastAck.age() > stall && wrote.age() > stall {
				s.mu.Lock()
				acked := s.stats.ChunksDone
				s.mu.Unlock()
				return fmt.Errorf("receiver %s stopped taking data and acknowledging chunks for %s (%d unacknowledged, %d done before); resume the migration when it is back",
					s.cfg.To.Attributes.Node, stall, inFlight.Load(), acked)
			}
			continue
		case <-producersDone:
			producersDone, finished = nil, true
		case <-settled:
		}
		if finished && pending.Load() == 0 {
			done.Store(true)
			close(queue)
			flushAcks()
			for _, c := range conns {
				c.CloseWrite()
				// Every chunk is durable: nothing more is needed from
				// the streams but their end, and a receiver that never
				// closes them must not hold the migration for ever.
				c.SetReadDeadline(time.Now().Add(stall))
			}
			streams.Wait()
			s.progress("transfer")
			select {
			case err := <-errc:
				return err
			default:
			}
			return nil
		}
	}
}

// prepare reads chunk i and decides what to send: nil for zeros, a job
// marked had if the receiver already has exactly this chunk durable.
func (s *sender) prepare(i int64, enc *zstd.Encoder, acc *Accept) (*job, error) {
	size, chunk := s.src.Size(), s.cfg.ChunkSize
	n := chunkLen(i, size, chunk)
	buf := chunkBuf(int(n))
	if err := readChunk(s.data, buf, i*chunk); err != nil {
		return nil, fmt.Errorf("read chunk %d of %s: %w", i, s.cfg.Image, err)
	}
	s.mu.Lock()
	s.stats.BytesRead += dataIn(s.extents, i*chunk, n)
	s.mu.Unlock()
	if isZero(buf) {
		putChunkBuf(buf)
		s.mu.Lock()
		s.stats.ChunksZero++
		s.chunkDone()
		delete(s.manifest.Chunks, i)
		s.mu.Unlock()
		return nil, nil
	}
	h := hashChunk(buf)
	s.mu.Lock()
	s.manifest.Chunks[i] = h
	s.mu.Unlock()
	if acc != nil {
		switch h {
		case acc.Have[i]:
			putChunkBuf(buf)
			s.mu.Lock()
			s.stats.ChunksHad++
			s.chunkDone()
			s.mu.Unlock()
			return &job{index: i, hash: h, had: true}, nil
		case acc.Base[i]:
			putChunkBuf(buf)
			s.mu.Lock()
			s.stats.ChunksSame++
			s.mu.Unlock()
			return &job{index: i, hash: h, same: true}, nil
		}
	}
	j := &job{index: i, hash: h, data: buf}
	flags := byte(0)
	if worthCompressing(enc, buf) {
		if c := enc.EncodeAll(buf, chunkBuf(len(buf))[:0]); len(c) < len(buf)*95/100 {
			j.data, flags = c, flagZstd
			putChunkBuf(buf)
		} else {
			putChunkBuf(c)
		}
	}
	j.hdr = chunkHeader(i, h, flags, len(buf))
	if s.cfg.mangle != nil {
		s.cfg.mangle(i, j.data)
	}
	s.mu.Lock()
	s.stats.BytesRaw += n
	s.mu.Unlock()
	return j, nil
}

// newChunkEncoder is the zstd encoder of a migration's producers: one
// encoder state per producer, or they take turns compressing. No zstd
// checksum: every chunk is verified with its BLAKE3 hash. The fastest
// level leaves data without repeats (random hex, base64, ciphertext
// armoured as text) as it is unless told to entropy-code it: that halves
// such data, and on the benchmark image sends a quarter fewer bytes in
// less time and CPU, since every byte saved is one that WireGuard, TLS
// and both kernels need not handle.
func newChunkEncoder(producers int) (*zstd.Encoder, error) {
	return zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(producers),
		zstd.WithEncoderCRC(false), zstd.WithAllLitEntropyCompression(true))
}

// worthCompressing guesses from two 32 KiB samples (start and middle)
// whether zstd will save at least 5 % of a chunk: encrypted, compressed
// or random data (the bulk of many images) then costs two small probes
// instead of a whole failed compression, which was the largest single
// cost of sending such data. A mixed chunk that samples badly is merely
// sent uncompressed.
func worthCompressing(enc *zstd.Encoder, buf []byte) bool {
	if len(buf) <= 2*probeSample {
		return true
	}
	out := probeBufs.Get().(*[]byte)
	defer probeBufs.Put(out)
	for _, off := range []int{0, len(buf)/2 - probeSample/2} {
		*out = enc.EncodeAll(buf[off:off+probeSample], (*out)[:0])
		if len(*out) < probeSample*95/100 {
			return true
		}
	}
	return false
}

const probeSample = 32 << 10

// probeBufs hold the probes' output: chunks are prepared concurrently, and
// a fresh 64 KiB per chunk is garbage the collector need not see.
var probeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 2*probeSample); return &b }}

// Chunk buffers are recycled: a migration reads, and mostly compresses,
// every chunk into a fresh megabyte otherwise, and the collector then
// clears and scans what a pool keeps warm.
var chunkBufs sync.Pool

func chunkBuf(n int) []byte {
	if b, ok := chunkBufs.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	return make([]byte, n)
}

func putChunkBuf(b []byte) {
	if cap(b) > 0 {
		chunkBufs.Put(&b)
	}
}
