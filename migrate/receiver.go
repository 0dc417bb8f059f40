package migrate

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/internal/throttle"
	"github.com/skybridge-mesh/skybridge/internal/units"
	"github.com/skybridge-mesh/skybridge/policy"
)

// DefaultPort is where gateways receive migrations, on their overlay
// address only.
const DefaultPort = 7443

// ReceiverConfig is what the receiving gateway provides.
type ReceiverConfig struct {
	StoreDir string // images land in StoreDir/NAME.raw|.qcow2
	Journal  *Journal
	Identity func() *certs.NodeIdentity
	Trust    func() *certs.TrustBundle
	Policy   func() *policy.Policy // the receiver's own copy: never trust the sender's verdict
	Audit    *audit.Log
	Log      *slog.Logger
	Observer Observer // nil: nobody watches
	Now      func() time.Time
	// OnLoad, if set, is told the number of migrations being received
	// whenever it changes (the gateway advertises it for placement).
	OnLoad func(n int)
	// OnCatalog, if set, is told whenever an image is stored or removed.
	OnCatalog func()
	// IdleTimeout ends a session whose sender has said nothing for that
	// long before its commit (0: DefaultIdleTimeout).
	IdleTimeout time.Duration
	// Via, if set, names the gateways between a sender and this one
	// that its data passes through, in order (a hub topology's hubs), as
	// this gateway sees the mesh: the policy judges the whole path.
	Via func(from *certs.Attributes) []*certs.Attributes
	// Sources, if valid, is where connections may come from: the mesh's
	// overlay range, which only gateways' addresses are in (WireGuard
	// lets a peer send from its own addresses only, and no site route
	// overlaps the range). Others are closed unread; hosts in the sites
	// reach the overlay too, and senders are gateways.
	Sources netip.Prefix

	// afterRename, in tests, runs once a received image has replaced the
	// stored version. errStopHere stops the receive there, as a crash
	// would; another error is a failure there (a full disk, say).
	afterRename func() error
	// recordFails, in tests, runs before the catalog records a stored
	// image: an error fails the record, as a full disk does the
	// journal's write.
	recordFails func() error
}

// errStopHere, from afterRename, stands for the gateway stopping.
var errStopHere = errors.New("the gateway stopped here (a test)")

// Receiver accepts migrations into a gateway's image store.
type Receiver struct {
	cfg ReceiverConfig
	dec *zstd.Decoder
	// auditMu makes writing the records owed and the next record one
	// step (appendEvent, payOwed).
	auditMu sync.Mutex
	// recordMu makes recording the images in place the catalog lacks one
	// step (recoverStores): two would both record one. recordKick wakes
	// Serve's loop to try again soon after a commit could not record its
	// image.
	recordMu   sync.Mutex
	recordKick chan struct{}

	mu      sync.Mutex
	audited map[string]bool // auditedUnsaid
	// unrecorded names, by migration ID, the images in place the catalog
	// lacks (recoverStores): an offer or removal of one of them waits,
	// and one of no such name reads nothing to know it.
	unrecorded map[string]string
	sessions   map[string]*session
	// opening holds the IDs open is setting up, from before it reads
	// their record until their session is in sessions (or it failed):
	// forgetAbandoned leaves them alone.
	opening map[string]receiveLoad // by ID
	// removing holds the names of stored images being removed: no
	// receive of them opens meanwhile.
	removing map[string]bool
	// serving counts the Serve calls running; when the last ends,
	// stopping is set, and no session opens after.
	serving  int
	stopping bool
	// handlers are the goroutines Serve started, which use the journal.
	handlers sync.WaitGroup
	// unproven counts the connections not yet past their first frame,
	// unprovenFrom the same by source address; warnUnproven says when
	// too many is worth logging again.
	unprovenMu   sync.Mutex
	unproven     atomic.Int64 // atomic for tests to read
	unprovenFrom map[netip.Addr]int
	warnUnproven throttle.PerSecond
	// warnHandshake says when a failed TLS handshake is worth logging
	// again: whoever the port takes connections from can fail one per
	// connection, with bytes that are not TLS or a revoked certificate.
	warnHandshake throttle.PerSecond
	// denials paces the audit records of offers the policy refuses, by
	// sending gateway (paceDenial); denialKick wakes Serve's loop to
	// record the denials counted instead.
	denyMu     sync.Mutex
	denials    map[string]*denialPace
	denialKick chan struct{}
}

// NewReceiver prepares a receiver; Serve accepts connections.
func NewReceiver(cfg ReceiverConfig) (*Receiver, error) {
	cfg.Observer = observer(cfg.Observer)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if err := os.MkdirAll(filepath.Join(cfg.StoreDir, ".incoming"), 0o700); err != nil {
		return nil, fmt.Errorf("image store: %w", err)
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(maxFrame), zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		return nil, err
	}
	r := &Receiver{cfg: cfg, dec: dec, sessions: map[string]*session{}, opening: map[string]receiveLoad{}, removing: map[string]bool{}, unprovenFrom: map[netip.Addr]int{},
		recordKick: make(chan struct{}, 1), denials: map[string]*denialPace{}, denialKick: make(chan struct{}, 1)}
	if _, err := r.recoverStores(true); err != nil {
		return nil, fmt.Errorf("image store: %w", err)
	}
	if err := r.finishRemovals(); err != nil {
		return nil, fmt.Errorf("image store: %w", err)
	}
	r.payOwed() // a failure is logged; the next record tries again
	r.sweepIncoming()
	return r, nil
}

// sweepIncoming removes the incoming files no receive is recorded for: a
// journal moved aside when damaged, or a record forgotten while its file
// could not be removed, leaves files as large as images that nothing
// else would ever remove. Only names the receiver makes are touched.
func (r *Receiver) sweepIncoming() {
	dir := filepath.Join(r.cfg.StoreDir, ".incoming")
	entries, err := os.ReadDir(dir)
	if err != nil {
		r.cfg.Log.Warn("list incoming files", "dir", dir, "err", err)
		return
	}
	recs, err := r.cfg.Journal.Receives()
	if err != nil {
		r.cfg.Log.Warn("list unfinished receives", "err", err)
		return
	}
	keep := make(map[string]bool, len(recs))
	for _, rec := range recs {
		keep[filepath.Base(rec.Temp)] = true
	}
	for _, e := range entries {
		name := e.Name()
		id, ext, _ := strings.Cut(name, ".")
		if keep[name] || !e.Type().IsRegular() || !validID(id) || (ext != FormatRaw && ext != FormatQcow2) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			r.cfg.Log.Warn("remove an incoming file no receive is recorded for", "file", filepath.Join(dir, name), "err", err)
			continue
		}
		r.cfg.Log.Info("removed an incoming file no receive is recorded for", "file", filepath.Join(dir, name))
	}
}

// AbandonedAfter is how long a receive no sender has offered again is
// kept, for a resume, before its incoming file (as large as the image's
// allocated part) and its record go.
const AbandonedAfter = 7 * 24 * time.Hour

// Serve accepts migration connections on ln (the gateway's overlay
// address) until ctx ends, and forgets abandoned receives. The last Serve
// to return does so once nothing the receiver started is running: the
// journal may close then.
func (r *Receiver) Serve(ctx context.Context, ln net.Listener) error {
	context.AfterFunc(ctx, func() { ln.Close() })
	r.mu.Lock()
	r.serving++
	r.stopping = false
	r.mu.Unlock()
	defer r.shutdown()
	// Its own context: Serve also ends when the listener fails, and
	// shutdown waits for it.
	fctx, stopForgetting := context.WithCancel(ctx)
	defer stopForgetting() // before shutdown
	r.handlers.Go(func() {
		var forgot time.Time
		for {
			if time.Since(forgot) >= time.Hour {
				r.forgetAbandoned()
				forgot = time.Now()
			}
			// An image in place the catalog lacks holds its name from
			// migrations and removals: tried often until recorded.
			wait := time.Hour
			if left, err := r.recoverStores(false); err != nil {
				r.cfg.Log.Warn("list the images being stored", "err", err)
			} else if len(left) > 0 {
				wait = stagedRetry
			}
			if r.flushDenials(false) {
				wait = min(wait, denialEvery)
			}
			select {
			case <-fctx.Done():
				return
			case <-r.recordKick:
			case <-r.denialKick:
			case <-time.After(wait):
			}
		}
	})
	tcfg := serverTLS(r.cfg.Identity, r.cfg.Trust, r.cfg.Now)
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors, say: a gateway that stopped
			// receiving would still advertise itself as the least
			// loaded destination. Back off and carry on.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			r.cfg.Log.Warn("accept migration connection", "err", err, "retry_in", delay)
			select {
			case <-time.After(delay):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		delay = 0
		// Until a connection has authenticated and said what it is, it
		// holds a goroutine and a descriptor for up to 50 s. Past the
		// bounds, in all and from one address, a new one is closed at
		// once: one gateway cannot take every place.
		src := remoteAddr(c)
		if why := r.admit(src); why != "" {
			c.Close()
			if ok, dropped := r.warnUnproven.Allow(); ok {
				r.cfg.Log.Warn("closed a migration connection unread: "+why, "remote", src, "max", maxUnproven, "max_per_source", maxUnprovenFrom, "closed_unlogged", dropped)
			}
			continue
		}
		r.handlers.Go(func() { r.handle(ctx, tls.Server(c, tcfg), src) })
	}
}

// remoteAddr is the address a connection comes from, the zero Addr if it
// has none (a pipe in tests).
func remoteAddr(c net.Conn) netip.Addr {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.AddrPort().Addr().Unmap()
	}
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap() // gVisor's netstack
	}
	return netip.Addr{}
}

// admit takes an unproven place for a connection from src, or says why
// not; release gives it back.
func (r *Receiver) admit(src netip.Addr) string {
	if p := r.cfg.Sources; p.IsValid() && !p.Contains(src) {
		return "it does not come from a gateway's overlay address (" + p.String() + ")"
	}
	r.unprovenMu.Lock()
	defer r.unprovenMu.Unlock()
	if r.unproven.Load() >= maxUnproven {
		return "too many connections authenticating at once"
	}
	if r.unprovenFrom[src] >= maxUnprovenFrom {
		return "too many connections authenticating at once from one address"
	}
	r.unproven.Add(1)
	r.unprovenFrom[src]++
	return ""
}

func (r *Receiver) release(src netip.Addr) {
	r.unprovenMu.Lock()
	defer r.unprovenMu.Unlock()
	r.unproven.Add(-1)
	if r.unprovenFrom[src]--; r.unprovenFrom[src] <= 0 {
		delete(r.unprovenFrom, src)
	}
}

// maxUnproven bounds the connections authenticating, or waiting for their
// first frame, at once, and maxUnprovenFrom those from one address: a
// migration opens one per stream (MaxStreams at most), and a handshake
// takes a round trip or two.
const (
	maxUnproven     = 256
	maxUnprovenFrom = 2 * MaxStreams
)

// shutdown ends what the last Serve started. A session whose sender has not
// committed ends (its durable chunks wait for a resume); one that has is
// stored, as its sender waits for the answer; none opens after. A gateway
// that closed its journal under them recorded stored images as failed.
func (r *Receiver) shutdown() {
	r.mu.Lock()
	if r.serving--; r.serving > 0 {
		r.mu.Unlock()
		return
	}
	r.stopping = true
	sessions := slices.Collect(maps.Values(r.sessions))
	r.mu.Unlock()
	for _, s := range sessions {
		s.abortUnlessCommitted()
	}
	r.handlers.Wait()
	r.flushDenials(true) // no offer comes any more: the counts are final
}

// forgetAbandoned removes the receives not offered again for
// AbandonedAfter: a sender that comes back after that sends every chunk
// again.
func (r *Receiver) forgetAbandoned() {
	j := r.cfg.Journal
	recs, err := j.Receives()
	if err != nil {
		r.cfg.Log.Warn("list unfinished receives", "err", err)
		return
	}
	now := r.cfg.Now()
	for _, rec := range recs {
		last := lastSign(&rec)
		if now.Sub(last) < AbandonedAfter {
			continue
		}
		active, removed, err := r.forget(rec.ID, rec.Temp)
		if active || err == nil && !removed {
			continue
		}
		if err != nil {
			r.cfg.Log.Warn("forget an abandoned receive", "migration_id", rec.ID, "err", err)
			continue
		}
		r.cfg.Observer.ReceiveDropped(DroppedAbandoned)
		r.cfg.Log.Info("forgot an abandoned receive: its sender has not offered it again", "migration_id", rec.ID, "name", rec.Name, "from", rec.From, "last_offered", last)
	}
}

// lastSign is a receive's last sign of life: the last offer, or the last
// chunk written (a session that ran for days, records of releases that
// did not note the offers).
func lastSign(rec *RecvRecord) time.Time {
	last := rec.Started
	if rec.Attempted.After(last) {
		last = rec.Attempted
	}
	if fi, err := os.Stat(rec.Temp); err == nil && fi.ModTime().After(last) {
		last = fi.ModTime()
	}
	return last
}

// settle keeps for a resume a receive whose session ended before its
// image was stored, unless it holds no chunk: a resume of it would be sent
// every chunk, as a new receive is, so it is forgotten at once, file and
// record, rather than listed as interrupted for AbandonedAfter (an offer
// costs its sender nothing but a handshake, and makes a file as large as
// the image's size). One kept goes beside at most maxInterruptedPerPeer
// of its sender's: the oldest go first.
func (r *Receiver) settle(s *session) {
	s.mu.Lock()
	held := len(s.durable)
	s.mu.Unlock()
	if held > 0 {
		r.trimInterrupted(s.from.Node, s.offer.ID)
		return
	}
	if _, _, err := r.forget(s.offer.ID, s.record.Temp); err != nil {
		s.log.Warn("forget a receive that holds no chunk", "file", s.record.Temp, "err", err)
	}
}

// trimInterrupted forgets node's oldest interrupted receives (by their last
// sign of life) past maxInterruptedPerPeer, counting keep, which stays: it
// has just been interrupted, and is the likeliest to be resumed.
func (r *Receiver) trimInterrupted(node, keep string) {
	recs, err := r.cfg.Journal.Receives()
	if err != nil {
		r.cfg.Log.Warn("list unfinished receives", "err", err)
		return
	}
	type aged struct {
		rec  *RecvRecord
		last time.Time
	}
	var theirs []aged
	r.mu.Lock()
	for i := range recs {
		rec := &recs[i]
		if _, opening := r.opening[rec.ID]; rec.From != node || rec.ID == keep || r.sessions[rec.ID] != nil || opening {
			continue
		}
		theirs = append(theirs, aged{rec: rec})
	}
	r.mu.Unlock()
	over := len(theirs) + 1 - maxInterruptedPerPeer
	if over <= 0 {
		return
	}
	for i := range theirs {
		theirs[i].last = lastSign(theirs[i].rec)
	}
	slices.SortFunc(theirs, func(a, b aged) int { return a.last.Compare(b.last) })
	for _, a := range theirs[:over] {
		active, removed, err := r.forget(a.rec.ID, a.rec.Temp)
		switch {
		case active: // resumed meanwhile
		case err == nil && !removed: // forgotten meanwhile, by another session's trim
		case err != nil:
			r.cfg.Log.Warn("forget an interrupted receive past those kept per gateway", "migration_id", a.rec.ID, "err", err)
		default:
			r.cfg.Observer.ReceiveDropped(DroppedTooMany)
			r.cfg.Log.Info("forgot an interrupted receive: its sender has more interrupted here than are kept for resumes; a resume sends every chunk again",
				"migration_id", a.rec.ID, "name", a.rec.Name, "from", a.rec.From, "last_offered", a.last, "kept", maxInterruptedPerPeer)
		}
	}
}

// forget removes a receive — incoming file, chunks, record — unless it is
// being received or opened; then it reports it active. Under the lock, so
// that an offer of the ID comes after, finds no record and starts over.
// removed says whether the record was there to remove: sessions of one
// sender that end together each trim its receives from one listing, and
// what one forgot is not counted or told again by the others.
func (r *Receiver) forget(id, temp string) (active, removed bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, opening := r.opening[id]; r.sessions[id] != nil || opening {
		return true, false, nil
	}
	removed, err = r.cfg.Journal.hasKey(bucketRecv, id)
	if rerr := os.Remove(temp); !errors.Is(rerr, fs.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return false, removed, errors.Join(err, r.cfg.Journal.dropChunks("recv", id), r.cfg.Journal.deleteKey(bucketRecv, id))
}

// The first frame of a migration connection: an offer or a join.
const maxFirstFrame = 64 << 10

var firstFrameTimeout = 30 * time.Second // var for tests

func (r *Receiver) handle(ctx context.Context, c *tls.Conn, src netip.Addr) {
	defer c.Close()
	proven := sync.OnceFunc(func() { r.release(src) })
	defer proven()
	hctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	err := c.HandshakeContext(hctx)
	cancel()
	if err != nil {
		// Closed before a word: another gateway's reachability probe,
		// every second from each (mesh/health.go), not news.
		if errors.Is(err, io.EOF) {
			r.cfg.Log.Debug("refused migration connection", "remote", c.RemoteAddr().String(), "err", err)
			return
		}
		if ok, dropped := r.warnHandshake.Allow(); ok {
			r.cfg.Log.Info("refused migration connection", "remote", c.RemoteAddr().String(), "err", err, "refused_unlogged", dropped)
		}
		return
	}
	from, err := peerAttributes(c.ConnectionState(), r.cfg.Trust(), r.cfg.Now())
	if err != nil {
		return
	}
	fr, fw := newFrameReader(c), newFrameWriter(c)
	// The first frame — an offer or a join, a few hundred bytes — comes
	// at once and small: a connection that sends nothing, or announces
	// megabytes and trickles them, would otherwise hold its goroutine,
	// buffers and descriptor for good.
	c.SetReadDeadline(time.Now().Add(firstFrameTimeout))
	unwatch := context.AfterFunc(ctx, func() { c.Close() }) // a stopping receiver waits for no one
	typ, p, err := fr.nextMax(nil, maxFirstFrame)
	unwatch()
	proven()
	c.SetReadDeadline(time.Time{})
	if err != nil {
		if refuseFrame(fw, err) {
			r.cfg.Log.Warn("migration connection refused", "peer", from.Node, "reason", err)
		}
		return
	}
	switch typ {
	case frameOffer:
		var o Offer
		if err := jsonUnmarshal(p, &o); err != nil {
			r.cfg.Observer.Ended(RoleReceive, StateFailed, 0)
			fw.frame(frameError, []byte("bad offer"))
			fw.flush()
			return
		}
		r.control(ctx, c, fr, fw, from, &o)
	case frameJoin:
		var j Join
		if err := jsonUnmarshal(p, &j); err != nil {
			return
		}
		r.mu.Lock()
		s := r.sessions[j.ID]
		r.mu.Unlock()
		if s == nil || s.from.Node != from.Node {
			fw.frame(frameError, []byte("no such migration from you"))
			fw.flush()
			return
		}
		if !s.join() {
			fw.frame(frameError, []byte(fmt.Sprintf("migration %s already has the %d data streams it offered", j.ID, s.offer.Streams)))
			fw.flush()
			return
		}
		if !s.attachData(c) {
			fw.frame(frameError, []byte(fmt.Sprintf("migration %s has ended", j.ID)))
			fw.flush()
			return
		}
		s.heard.touch()
		s.data(fr, &lockedWriter{fw: fw})
		s.running.Done()
	}
}

// lockedWriter serializes the acks the syncer and the stream send.
type lockedWriter struct {
	mu sync.Mutex
	fw *frameWriter
}

func (w *lockedWriter) send(typ byte, p []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.fw.frame(typ, p); err != nil {
		return err
	}
	return w.fw.flush()
}

// session is one migration being received.
type session struct {
	r     *Receiver
	log   *slog.Logger
	offer Offer
	from  *certs.Attributes
	temp  *directFile
	at    int64  // where virtual offset 0 is in temp (RecvRecord.DataAt)
	base  Source // the stored version of the image, for incremental re-sync
	baseM map[int64]Hash
	// baseData reads base in its extents only (base itself when they
	// cannot be listed: its chunks are then found unreadable one by one).
	baseData io.ReaderAt
	// baseBad counts the stored version's chunks found unreadable or
	// damaged: the first is logged when found, the count at the end (a
	// qcow2 cut in half is found chunk by chunk, thousands of them).
	baseBad atomic.Int64
	record  *RecvRecord
	start   time.Time
	policy  policy.Decision
	// hold is the session's share of the store's free space; allow is
	// how many chunks may hold data (the offer's Chunks), and newMax how
	// many of them it may write where the file held none at its offer
	// (what hold made room for: all of them after a restart), taking
	// dataMax bytes at most (receiveData), as bytesMax, the offer's
	// Bytes (MaxInt64 if it gives none), bounds them written sparse;
	// fresh are those it has written, nNew of them new, which took
	// newBytes, the others rewrite chunks, held at the offer and found
	// changed, written again in their room; a rewrite chunk whose room
	// the file lost (true: the file was cut short) counts as new, and so
	// does a held chunk with holes in its room (partial) when it is
	// written again all the same.
	hold     *reservation
	allow    int64
	newMax   int64
	nNew     int64
	dataMax  int64
	bytesMax int64
	newBytes int64
	rewrite  map[int64]bool
	partial  map[int64]struct{}
	// blank: the incoming file was empty at the offer, so a chunk
	// written for the first time lands on holes only (clean), and
	// written are the chunks written since (under mu).
	blank   bool
	written map[int64]struct{}
	// received (payload bytes) and nDurable (len(durable)) are what
	// Active reports, kept apart from mu: a commit holds mu for as long
	// as storing the image takes, and Active, on every metrics scrape,
	// must not wait for it.
	received atomic.Int64
	nDurable atomic.Int64

	mu      sync.Mutex
	fresh   map[int64]bool // true: in new room, counted in nNew
	durable map[int64]Hash
	pending map[int64]pendingChunk
	reused  int
	kick    chan struct{}
	stop    chan struct{}
	synced  chan struct{} // closed when the syncer has made its last flush
	closed  chan struct{}
	conns   []net.Conn
	aborted bool
	ctrl    net.Conn // the control stream's, among conns
	streams int      // data streams joined
	// sealed: the commit came; no chunk is taken any more, and running
	// counts the data streams still reading or writing, which the commit
	// waits out before it checks the file (a chunk written after the
	// check would be stored unchecked).
	sealed  bool
	running sync.WaitGroup
	// heard is when the sender was last heard from: a frame on any
	// stream, the offer, the commit. Until the commit, a sender silent
	// for idleTimeout is taken for gone.
	heard     *stamp
	committed atomic.Bool
	// chunkMu serializes, per chunk (striped by index), a chunk's write
	// and its entry in pending: the hash recorded for a chunk is that of
	// the write that landed last, whichever streams carried it.
	chunkMu [64]sync.Mutex
	// flushMu keeps flushes in order: a later batch's hashes must not
	// be overwritten by an earlier one that finished after it.
	flushMu sync.Mutex
	// syncErr is the first failure to make chunks durable: Linux reports
	// a failed writeback to one fdatasync only, and a later one that
	// succeeds says nothing of the pages lost. (Guarded by flushMu.)
	syncErr error
}

// chunkLock is the lock of chunk i's write and record (chunkMu).
func (s *session) chunkLock(i int64) *sync.Mutex {
	return &s.chunkMu[uint64(i)%uint64(len(s.chunkMu))]
}

// DefaultIdleTimeout is how long a receiver waits for a word from a
// sender that has not committed before it ends the session, whose chunks
// then wait for a resume. TCP keepalive on the overlay notices a vanished
// peer sooner (kernel and netstack connections alike), but not a peer
// that answers and stalls; without this such a sender held its session — file,
// goroutines, advertised load — for good. A sender that reads chunks it
// need not send (zeros, chunks the receiver has) says so with Alive frames
// at a quarter of the limit the receiver announced; one of a release
// before those frames says nothing meanwhile, and half an hour is about a
// terabyte of such chunks at disk speed.
const DefaultIdleTimeout = 30 * time.Minute

// recheck reads again the chunks a resumed receive holds durable and
// forgets those that no longer hash as they did: between two attempts the
// incoming file is outside the receiver's hands (cut short, overwritten,
// a failing disk), and a chunk it still counted would be skipped by the
// sender and stored as whatever the file holds now, under a root that
// says otherwise. It costs a read of what was received, once per resume
// that follows a session this process no longer held.
func recheck(f *os.File, rec *RecvRecord, durable map[int64]Hash, j *Journal, log *slog.Logger, stopping func() bool) error {
	_, err := recheckChunks(f, rec, durable, j, log, stopping)
	return err
}

// recheckChunks is recheck, returning the chunks it found changed.
func recheckChunks(f *os.File, rec *RecvRecord, durable map[int64]Hash, j *Journal, log *slog.Logger, stopping func() bool) ([]int64, error) {
	if len(durable) == 0 {
		return nil, nil
	}
	start := time.Now()
	var data io.ReaderAt = f // its chunks are sparse: read in its extents
	if st, err := f.Stat(); err == nil {
		if extents, err := (&rawSource{f: f, size: st.Size()}).Extents(); err == nil {
			data = extentReader{f, extents}
		}
	}
	buf := make([]byte, rec.ChunkSize)
	var bad []int64
	for k, i := range slices.Sorted(maps.Keys(durable)) { // in the file's order
		// Hours for a large image: a stopping gateway does not wait.
		if k%64 == 0 && stopping() {
			return nil, errStopping
		}
		b := buf[:chunkLen(i, rec.Size, rec.ChunkSize)]
		// A chunk that cannot be read (a failing disk) is received
		// again like one that changed, not a resume failing for good.
		if err := readChunk(data, b, rec.DataAt+i*rec.ChunkSize); err != nil || hashChunk(b) != durable[i] {
			bad = append(bad, i)
		}
	}
	log.Info("resumed receive: read back the chunks held", "chunks", len(durable), "bytes", int64(len(durable))*rec.ChunkSize, "took", time.Since(start).Round(time.Millisecond))
	if len(bad) == 0 {
		return nil, nil
	}
	log.Warn("resumed receive: chunks of the incoming file no longer match what was received (changed outside the gateway, or a failing disk); receiving them again",
		"file", rec.Temp, "chunks", len(bad), "of", len(durable))
	for _, i := range bad {
		delete(durable, i)
	}
	return bad, j.removeChunks("recv", rec.ID, bad)
}

// heldRoom sorts the held chunks by the room they keep in the incoming
// file at path. lost: not wholly within the file (cut short); written
// again, they take new room. partial: within it, with holes, which a
// chunk written again may fill: chunks are written sparse (writeSparse),
// so most have some, and a hole punched since looks the same. When the
// file's allocation cannot be read, every held chunk is both: room for
// too many refuses a resume that might fit, room for too few lets it fill
// the disk.
func heldRoom(path string, rec *RecvRecord, durable map[int64]Hash) (lost, partial map[int64]struct{}) {
	lost, partial = map[int64]struct{}{}, map[int64]struct{}{}
	if len(durable) == 0 {
		return lost, partial
	}
	var extents []Extent
	var size int64
	f, err := os.Open(path)
	if err == nil {
		var st os.FileInfo
		if st, err = f.Stat(); err == nil {
			size = st.Size()
			extents, err = (&rawSource{f: f, size: size}).Extents()
		}
		f.Close()
	}
	k := 0
	for _, i := range slices.Sorted(maps.Keys(durable)) { // in the file's order, as the extents are
		from := rec.DataAt + i*rec.ChunkSize
		to := from + chunkLen(i, rec.Size, rec.ChunkSize)
		for k < len(extents) && extents[k].Off+extents[k].Len <= from {
			k++
		}
		if err != nil || to > size {
			lost[i] = struct{}{}
		}
		if err != nil || k == len(extents) || extents[k].Off > from || extents[k].Off+extents[k].Len < to {
			partial[i] = struct{}{}
		}
	}
	return lost, partial
}

// join counts a data stream joining the session, and refuses one beyond
// the number offered: each holds buffers of up to a few chunks.
func (s *session) join() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.streams >= s.offer.Streams {
		return false
	}
	s.streams++
	return true
}

// attach records a connection of the session, to close it on abort, and
// reports false if the session was aborted already: nothing would close
// the connection then.
func (s *session) attach(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.aborted {
		return false
	}
	s.conns = append(s.conns, c)
	return true
}

// attachData is attach for a data stream, which it counts as running
// (the caller calls s.running.Done when the stream is done); none is
// taken once the session is sealed.
func (s *session) attachData(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.aborted || s.sealed {
		return false
	}
	s.conns = append(s.conns, c)
	s.running.Add(1)
	return true
}

// seal ends the data streams once the commit has come, and waits until
// none reads or writes any more.
func (s *session) seal() {
	s.mu.Lock()
	s.sealed = true
	var data []net.Conn
	for _, c := range s.conns {
		if c != s.ctrl {
			data = append(data, c)
		}
	}
	s.mu.Unlock()
	for _, c := range data {
		c.Close()
	}
	s.running.Wait()
}

// takeOver ends a session another offer replaces, and reports whether it
// ended within 10 s.
func (s *session) takeOver() bool {
	s.abort()
	select {
	case <-s.closed:
		return true
	case <-time.After(10 * time.Second):
		return false
	}
}

// abortUnlessCommitted aborts a session whose sender has not committed;
// one that has is left to store its image. (Under s.mu, as the commit is
// taken: the two cannot both happen.)
func (s *session) abortUnlessCommitted() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.committed.Load() {
		return
	}
	s.aborted = true
	for _, c := range s.conns {
		c.Close()
	}
}

// abort closes the session's connections; its goroutines then end and
// close it.
func (s *session) abort() {
	s.mu.Lock()
	s.aborted = true
	for _, c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
}

type pendingChunk struct {
	hash Hash
	to   *lockedWriter
}

func (r *Receiver) control(ctx context.Context, c *tls.Conn, fr *frameReader, fw *frameWriter, from *certs.Attributes, o *Offer) {
	log := r.cfg.Log.With("migration_id", o.ID, "peer", from.Node, "peer_site", from.Site, "class", o.Class)
	if err := checkOffer(o); err != nil {
		// Failed before it started, as the sender counts it too.
		r.cfg.Observer.Ended(RoleReceive, StateFailed, 0)
		fw.json(frameError, "bad offer: "+err.Error())
		return
	}
	// The receiver decides with its own policy copy, along the path it
	// sees now; the decision at the commit judges the same path, which
	// the data took, whatever the mesh has become since.
	var via []*certs.Attributes
	if r.cfg.Via != nil {
		via = r.cfg.Via(from)
	}
	d, ok := r.decide(o, from, via)
	if !ok {
		r.cfg.Observer.OfferDenied(denialReason(d))
		if r.paceDenial(o, from) {
			log.Warn("migration refused by the residency policy", "rule", d.Rule.String(), "reason", strings.Join(d.Reasons, "; "))
			r.audit(o, from, d, "denied", Hash{}, 0, r.cfg.Now(), r.cfg.Now(), "")
		}
		r.cfg.Observer.Ended(RoleReceive, StateDenied, 0)
		fw.json(frameDeny, Deny{Rule: d.Rule.String(), Reasons: d.Reasons})
		return
	}
	s, acc, err := r.open(o, from, d, log)
	if err != nil {
		if !errors.Is(err, errAuditNotReady) { // logged with its cause
			log.Error("cannot receive migration", "err", err)
		}
		r.cfg.Observer.Ended(RoleReceive, StateFailed, 0)
		fw.json(frameError, err.Error())
		return
	}
	closeSession := sync.OnceFunc(s.close)
	// Unless its image is stored, or what came removed, the receive is
	// kept for a resume once its session has ended (settle).
	kept := true
	defer func() {
		closeSession()
		if kept {
			r.settle(s)
		}
	}()
	if !s.attach(c) { // ended by a stopping receiver as it opened
		r.cfg.Observer.Ended(RoleReceive, StateFailed, 0)
		fw.json(frameError, errStopping.Error())
		return
	}
	s.mu.Lock()
	s.ctrl = c
	s.mu.Unlock()
	// Obligations are what the image store must live up to (encryption
	// at rest, zone replicas). The policy let them through because this
	// site's certificate attests them — or, in audit mode, recorded that
	// it does not; the audit record says which.
	log.Info("receiving migration", "name", o.Name, "size", o.Size, "resumed_chunks", len(acc.Have), "base_chunks", len(acc.Base), "obligations", d.Obligations.String())
	if err := fw.json(frameAccept, acc); err != nil {
		return
	}
	var cm Commit
	err = fr.jsonMax(frameCommit, &cm, commitMax(o))
	s.mu.Lock()
	aborted := s.aborted
	s.committed.Store(true) // or gone: either way no longer waited for
	s.mu.Unlock()
	if err == nil && aborted {
		// Ended (a stopping receiver, a new attempt) as the commit came:
		// its sender is told nothing was stored, so nothing is.
		err = errors.New("the session was ended as its commit came")
	}
	if err != nil {
		if refuseFrame(fw, err) {
			log.Warn("migration refused: its commit does not parse; its durable chunks wait for a resume", "reason", err)
		} else {
			s.mu.Lock()
			streams, durable, pending, received := s.streams, len(s.durable), len(s.pending), s.received.Load()
			s.mu.Unlock()
			log.Info("migration interrupted; its durable chunks wait for a resume", "err", err,
				"streams_joined", streams, "of", o.Streams, "durable_chunks", durable, "pending_chunks", pending, "received_bytes", received,
				"last_heard", s.heard.age().Round(time.Millisecond))
		}
		return
	}
	// No chunk may land once the file is checked: the data streams end
	// first (the sender needs them no more).
	s.seal()
	// The sender is judged again too: revoked while the image came (a
	// gateway decommissioned, a key compromised), what it sent is not
	// stored. (Expiry is not judged again: a long migration outlives the
	// certificate its connection began with, renewed meanwhile.)
	if peer := c.ConnectionState().PeerCertificates; len(peer) > 0 && r.cfg.Trust().IsRevoked(peer[0].SerialNumber) {
		why := fmt.Sprintf("the sending gateway's certificate %s was revoked while the image came", certs.FormatSerial(peer[0].SerialNumber))
		log.Warn("migration refused at commit: " + why + "; the received data is removed")
		kept = false
		closeSession()
		if _, _, err := r.forget(o.ID, s.record.Temp); err != nil {
			log.Error("remove the data of a migration from a revoked sender", "file", s.record.Temp, "err", err)
		}
		r.audit(o, from, d, "denied", cm.Root, s.received.Load(), s.start, r.cfg.Now(), why)
		r.cfg.Observer.Ended(RoleReceive, StateDenied, r.cfg.Now().Sub(s.start))
		fw.json(frameError, why)
		return
	}
	// Decided again with the policy and time of now: a newer policy, or
	// an exception that ran out, while the image came may forbid storing
	// it here. Then what came is removed rather than stored.
	if d, ok = r.decide(o, from, via); !ok {
		log.Warn("migration refused at commit: the residency policy no longer allows it here; the received data is removed", "rule", d.Rule.String(), "reason", strings.Join(d.Reasons, "; "), "policy", d.Policy.RevisionString())
		kept = false
		closeSession() // its syncer and file done with, the data can go
		if _, _, err := r.forget(o.ID, s.record.Temp); err != nil {
			log.Error("remove the data of a migration the policy no longer allows here", "file", s.record.Temp, "err", err)
		}
		r.audit(o, from, d, "denied", cm.Root, s.received.Load(), s.start, r.cfg.Now(), "denied at commit")
		r.cfg.Observer.Ended(RoleReceive, StateDenied, r.cfg.Now().Sub(s.start))
		fw.json(frameDeny, Deny{Rule: d.Rule.String(), Reasons: d.Reasons})
		return
	}
	done, err := s.finish(&cm, d)
	var stored *storedError
	if errors.As(err, &stored) {
		kept = false // the image is in place
		if errors.Is(err, errStopHere) {
			return
		}
		// The image is in place: recorded now if what failed has
		// passed, else later (recoverStores); never audited as failed.
		if rerr := r.completeStore(o.ID, stored.st); rerr != nil {
			log.Error("migration stored and verified, but not recorded in the catalog: the gateway tries again every minute, and when it starts again", "err", err, "again", rerr)
			r.cfg.Observer.Ended(RoleReceive, StateFailed, r.cfg.Now().Sub(s.start))
			fw.json(frameError, "the image was stored, but the receiving gateway could not record it yet (it tries again every minute, and when it starts again): "+err.Error())
			r.setUnrecorded(o.ID, o.Name) // before its session goes: an offer of the name waits from now
			closeSession()                // first: the image of a session under way is its own to record
			select {
			case r.recordKick <- struct{}{}:
			default:
			}
			return
		}
		log.Warn("migration stored; recording it failed once, and succeeded when tried again", "err", err)
		done, err = stored.done, nil
	}
	if err != nil && diskFull(err) {
		// Nothing failed verification: the chunks are durable, and a
		// resume once there is room commits them, sending none again.
		// Not audited as failed: the migration is not over.
		// Nor counted as ended (skybridge_migration_duration_seconds),
		// as a receive interrupted under the transfer is not.
		log.Error("migration interrupted at its commit: the image store's disk is full; its durable chunks wait for a resume", "err", err)
		fw.json(frameError, s.writeFailed("store the image", err)) // the sender says "commit"
		return
	}
	if err != nil {
		log.Error("migration failed verification", "err", err)
		r.audit(o, from, d, "failed", cm.Root, s.received.Load(), s.start, r.cfg.Now(), err.Error())
		r.cfg.Observer.Ended(RoleReceive, StateFailed, r.cfg.Now().Sub(s.start))
		fw.json(frameError, err.Error())
		return
	}
	kept = false
	log.Info("migration stored and verified", "name", done.Name, "root", done.Root.String(), "received_bytes", done.Received, "reused_chunks", done.Reused)
	if n := s.baseBad.Load(); n > 0 {
		log.Warn("the stored version of the image had bad chunks, fetched from the sender instead", "name", done.Name, "bad_chunks", n)
	}
	r.cfg.Observer.Ended(RoleReceive, StateDone, r.cfg.Now().Sub(s.start))
	fw.json(frameDone, done)
}

func (r *Receiver) decide(o *Offer, from *certs.Attributes, via []*certs.Attributes) (policy.Decision, bool) {
	p := r.cfg.Policy()
	self := r.cfg.Identity().Attributes()
	if p == nil {
		return policy.Decision{Rule: ruleNoPolicy, Reasons: []string{"no residency policy is in force on the receiving gateway"}}, false
	}
	checks, verdict := p.AdmitPath(o.Class, policy.PathOf(from, via, self), r.cfg.Now())
	for _, c := range checks {
		r.cfg.Observer.Decided(RoleReceive, o.ID, c.Request, c.Decision)
	}
	return verdict, verdict.Allowed
}

// ruleNoPolicy is the rule of a denial by a receiver with no policy.
var ruleNoPolicy = policy.RuleRef{Kind: "default-deny", Name: "no policy"}

// denialReason names what denied an offer for OfferDenied, one of
// DenialReasons: a kind of rule not named here counts as a default
// denial rather than make up a label value.
func denialReason(d policy.Decision) string {
	switch {
	case d.Rule == ruleNoPolicy:
		return DeniedNoPolicy
	case d.Rule.Kind == "deny":
		return DeniedByRule
	case d.Rule.Kind == "requirement":
		return DeniedRequirement
	case d.Rule.Kind == "max-hops":
		return DeniedMaxHops
	}
	return DeniedByDefault
}

func (r *Receiver) audit(o *Offer, from *certs.Attributes, d policy.Decision, outcome string, root Hash, bytes int64, start, end time.Time, errText string) {
	r.appendAudit(r.auditFields(o, from, d, outcome, root, bytes, start, end, errText))
}

// appendAudit appends a migration record to the receiver's audit log and
// reports whether it did.
func (r *Receiver) appendAudit(f map[string]any) bool { return r.appendEvent("migration", f) }

// appendEvent appends a record of event to the receiver's audit log and
// reports whether it did.
func (r *Receiver) appendEvent(event string, f map[string]any) bool {
	if r.cfg.Audit == nil {
		return true
	}
	// One writer at a time: two would each write the records owed.
	r.auditMu.Lock()
	defer r.auditMu.Unlock()
	if !r.payOwedLocked() {
		return false
	}
	if _, err := r.cfg.Audit.Append(r.cfg.Identity(), event, f, r.cfg.Now()); err != nil {
		r.cfg.Log.Error("audit log", "err", err)
		return false
	}
	return true
}

// payOwed writes the audit records of images stored while the audit log
// could not take them, oldest first, and reports whether none is owed
// any more: a later record does not go before them.
func (r *Receiver) payOwed() bool {
	r.auditMu.Lock()
	defer r.auditMu.Unlock()
	return r.payOwedLocked()
}

func (r *Receiver) payOwedLocked() bool {
	if r.cfg.Audit == nil {
		return true
	}
	owed, err := r.cfg.Journal.auditOwed()
	if err != nil {
		r.cfg.Log.Error("journal: audit records owed", "err", err)
		return false
	}
	for _, o := range owed {
		// Owed by a stop after the append and before the journal said
		// so (finish, completeStore, or here before the key went), the
		// record is in the log, which is fsynced first: written again,
		// the image would be stored twice in the audit trail. A log
		// that cannot be read back is written to all the same: twice
		// shows; never does not.
		id := r.cfg.Identity()
		written, err := auditWritten(r.cfg.Audit, id.Attributes().Node, o.Fields)
		if err != nil {
			r.cfg.Log.Warn("audit log: cannot read back whether a stored image's record was written before a stop; writing it (it may be there twice)", "migration_id", o.ID, "err", err)
		}
		if !written {
			if o.Fields["recovered"] == nil {
				o.Fields["recovered"] = "recorded late: the audit log did not take it when the image was stored"
			}
			if _, err := r.cfg.Audit.Append(id, "migration", o.Fields, r.cfg.Now()); err != nil {
				r.cfg.Log.Error("audit log: a stored image's record is still owed", "migration_id", o.ID, "err", err)
				return false
			}
		}
		if err := r.cfg.Journal.deleteKey(bucketAuditOwed, o.key); err != nil {
			r.cfg.Log.Error("journal: an owed audit record is written but not marked so: the next try finds it in the audit log", "migration_id", o.ID, "err", err)
			return false
		}
		if written {
			r.cfg.Log.Warn("the audit record of a stored image was written before the gateway stopped, though its journal did not say so: not written again", "migration_id", o.ID)
			continue
		}
		r.cfg.Log.Warn("wrote the audit record of an image stored while the audit log could not take it", "migration_id", o.ID)
	}
	return true
}

func (r *Receiver) auditFields(o *Offer, from *certs.Attributes, d policy.Decision, outcome string, root Hash, bytes int64, start, end time.Time, errText string) map[string]any {
	self := r.cfg.Identity().Attributes()
	f := map[string]any{
		"migration_id": o.ID, "role": "receiver", "name": o.Name, "class": o.Class,
		"source_node": from.Node, "source_site": from.Site, "source_jurisdiction": from.Jurisdiction,
		"destination_node": self.Node, "destination_site": self.Site, "destination_jurisdiction": self.Jurisdiction,
		"policy": d.Policy.RevisionString(), "rule": d.Rule.String(), "outcome": outcome, "root": root.String(),
		"bytes_received": bytes, "start": start, "end": end,
	}
	if errText != "" {
		f["error"] = errText
	}
	decisionFields(f, &d)
	return f
}

// A denied offer moves nothing and costs its sender a handshake; its
// record costs the receiver some 2.5 KiB of audit log, signed, fsynced
// and kept for good. A gateway that offers without pause (compromised, or
// a script in a loop) gets a hundred a second denied, 20 GiB of log a
// day, and the receiver refuses every migration once its disk has less
// than 16 MiB free. So one sending gateway's denials are recorded one by
// one up to denialBurst in a row (a plan sent with --parallel, all of it
// refused), then one per denialEvery; those past that are counted, and
// the count, their classes and when they came are recorded with its next
// record, or within denialEvery of the first counted. Their migration IDs
// and names are not recorded here: the sender's own audit log records
// each denial it is told of, and the metrics count every one (OfferDenied,
// and the decisions).
const (
	denialBurst      = maxSessionsPerPeer
	denialEvery      = time.Minute
	maxDenialClasses = 8 // the classes a count names, the first ones denied
)

// denialPace is one sending gateway's pace of denial records: the
// records it may have written now (up to denialBurst) as of at, and the
// denials counted since its last.
type denialPace struct {
	tokens float64
	at     time.Time
	counted
}

// counted is the denials of one gateway's offers not recorded one by one.
type counted struct {
	from        *certs.Attributes
	n           int64
	classes     []string
	moreClasses bool
	first, last time.Time
}

func (p *denialPace) refill(now time.Time) {
	// A clock stepped back refills nothing, and the refill counts on
	// from there: counted denials wait a minute, not the whole step.
	if d := now.Sub(p.at); d > 0 {
		p.tokens = min(denialBurst, p.tokens+float64(d)/float64(denialEvery))
	}
	p.at = now
}

// take returns the denials counted, and counts from zero again.
func (p *denialPace) take() counted {
	c := p.counted
	p.counted = counted{from: c.from}
	return c
}

// paceDenial reports whether the policy's refusal of o, from from, is to
// be recorded now; if not, it is counted. The denials counted before a
// recorded one are recorded first.
func (r *Receiver) paceDenial(o *Offer, from *certs.Attributes) bool {
	now := r.cfg.Now()
	r.denyMu.Lock()
	p := r.denials[from.Node]
	if p == nil {
		p = &denialPace{tokens: denialBurst, at: now}
		r.denials[from.Node] = p
	}
	p.from = from
	p.refill(now)
	if p.tokens < 1 {
		if p.n == 0 {
			p.first = now
		}
		p.n++
		p.last = now
		if !slices.Contains(p.classes, o.Class) {
			if len(p.classes) < maxDenialClasses {
				p.classes = append(p.classes, o.Class)
			} else {
				p.moreClasses = true
			}
		}
		first := p.n == 1
		r.denyMu.Unlock()
		if first {
			r.cfg.Log.Warn("offers refused by the residency policy come from one gateway faster than they are recorded one by one: counted, and the count recorded within a minute",
				"peer", from.Node, "peer_site", from.Site, "recorded_in_a_row", denialBurst, "then_one_every", denialEvery)
			select {
			case r.denialKick <- struct{}{}:
			default:
			}
		}
		return false
	}
	p.tokens--
	c := p.take()
	r.denyMu.Unlock()
	r.recordDenials(&c)
	return true
}

// flushDenials records the denials counted of each gateway whose pace
// allows a record again (of all, when the receiver stops), and reports
// whether any are left counted.
func (r *Receiver) flushDenials(all bool) (left bool) {
	now := r.cfg.Now()
	var due []counted
	r.denyMu.Lock()
	for node, p := range r.denials {
		p.refill(now)
		if p.n > 0 && (all || p.tokens >= 1) {
			p.tokens = max(0, p.tokens-1)
			due = append(due, p.take())
		}
		if p.n > 0 {
			left = true
		} else if p.tokens >= denialBurst {
			delete(r.denials, node) // as if it had never offered
		}
	}
	r.denyMu.Unlock()
	for i := range due {
		r.recordDenials(&due[i])
	}
	return left
}

// recordDenials writes the audit record of the denials c counted, if any.
// (Like a single denial's, a record the log refuses is only logged.)
func (r *Receiver) recordDenials(c *counted) {
	if c.n == 0 {
		return
	}
	self := r.cfg.Identity().Attributes()
	f := map[string]any{
		"role": "receiver", "outcome": "denied", "denials": c.n, "classes": c.classes, "first": c.first, "last": c.last,
		"source_node": c.from.Node, "source_site": c.from.Site, "source_jurisdiction": c.from.Jurisdiction,
		"destination_node": self.Node, "destination_site": self.Site, "destination_jurisdiction": self.Jurisdiction,
		"note": fmt.Sprintf("offers refused by the residency policy, counted rather than recorded one by one: one gateway's are recorded %d in a row, then one every %s", denialBurst, denialEvery),
	}
	if c.moreClasses {
		f["more_classes"] = true
	}
	if !r.appendEvent("migration-denials", f) {
		r.cfg.Log.Warn("offers refused by the residency policy, counted: the audit log did not take their record", "peer", c.from.Node, "peer_site", c.from.Site,
			"denials", c.n, "classes", strings.Join(c.classes, ","), "first", c.first, "last", c.last)
	}
}

func (r *Receiver) isStopping() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stopping
}

var errStopping = errors.New("the receiving gateway is stopping: resume the migration when it is back")

// errAuditNotReady is what a sender is told of an audit log that cannot
// take the migration's record: why is the receiving gateway's to know.
var errAuditNotReady = errors.New("the receiving gateway's audit log cannot take the migration's record (its log says why); nothing was received")

// open creates or resumes the session's temporary image.
func (r *Receiver) open(o *Offer, from *certs.Attributes, d policy.Decision, log *slog.Logger) (*session, *Accept, error) {
	r.mu.Lock()
	if r.stopping {
		r.mu.Unlock()
		return nil, nil, errStopping
	}
	old := r.sessions[o.ID]
	if _, busy := r.opening[o.ID]; busy {
		// An earlier offer is still being opened (reading back what a
		// resume holds can take a while): two would both register.
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("migration %s is still being opened for an earlier offer; resume again in a moment", o.ID)
	}
	// Two migrations storing one name would race at the end: the
	// catalog could record one's root beside the other's file, or, in
	// two formats, each remove the other's. A gateway sends an image to
	// a destination once at a time, so another migration of the name from
	// the same gateway is one it no longer runs (it crashed, and the
	// image is sent anew): superseded, like an old attempt below.
	if r.removing[o.Name] {
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("image %q is being removed here; send it again in a moment", o.Name)
	}
	id, sess := r.receivingName(o)
	if id != "" && (sess == nil || sess.from.Node != from.Node) {
		r.mu.Unlock()
		// Not its ID: that is the other sender's, whose resume it names.
		return nil, nil, fmt.Errorf("image %q is being received from another gateway; send it again when that migration has ended", o.Name)
	}
	load := receiveLoad{id: o.ID, name: o.Name, from: from.Node, buffers: streamBuffers(o)}
	if err := admitLoad(r.loadsLocked(), load); err != nil {
		r.mu.Unlock()
		return nil, nil, err
	}
	r.opening[o.ID] = load
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.opening, o.ID)
		r.mu.Unlock()
	}()
	if sess != nil {
		log.Warn("another migration of the image from the same gateway is superseded", "name", o.Name, "superseded", id)
		if !sess.takeOver() {
			return nil, nil, fmt.Errorf("image %q: migration %s, which this one supersedes, does not let go", o.Name, id)
		}
	}
	if old != nil {
		// A sender runs one attempt of a migration at a time: a new offer
		// from the same gateway means the old attempt's connections are
		// dead but not yet noticed. Drop them and take over.
		if old.from.Node != from.Node {
			return nil, nil, fmt.Errorf("migration %s is being received from another gateway", o.ID)
		}
		if !old.takeOver() {
			return nil, nil, fmt.Errorf("migration %s: the previous attempt does not let go", o.ID)
		}
	}
	// A version of the name in place that the catalog lacks (its journal
	// write failed: a full disk) is recorded first, or the offer waits.
	if sid, err := r.waitingRecord(o.ID, o.Name); err != nil {
		return nil, nil, err
	} else if sid != "" {
		return nil, nil, fmt.Errorf("image %q: the version migration %s stored here is not recorded in the receiving gateway's catalog yet (its disk is full, or its journal failed: its log says which); it is recorded within a minute of the journal taking it: free space there, then send it again", o.Name, sid)
	}
	// A stored image is replaced only by one of its own class: a sender
	// the policy lets store some class here could otherwise overwrite
	// another class's image, or (given its chunk hashes for the re-sync)
	// copy its data into an image recorded under its own, laxer class.
	// (Read once: the record holds every chunk's hash, megabytes for a
	// large image; it is the re-sync's base below. Read once the sessions
	// this offer supersedes have let go: one of them may have stored the
	// name as it ended.)
	stored, err := r.cfg.Journal.Image(o.Name)
	if errors.Is(err, ErrNotFound) {
		stored = nil
	} else if err != nil {
		return nil, nil, fmt.Errorf("the stored image %q: %w", o.Name, err)
	}
	if stored != nil && stored.Class != o.Class {
		return nil, nil, fmt.Errorf("image %q is stored here as class %q: a migration of class %q may not replace it; send it under another name", o.Name, stored.Class, o.Class)
	}
	// Nor by another site's gateway: every site the policy lets store a
	// class here could otherwise overwrite the others' images of that
	// class, and be told their chunk hashes for the re-sync. A site's own
	// gateways (a failover) may.
	if stored != nil && !sameSender(stored.From, stored.FromSite, from) {
		return nil, nil, fmt.Errorf("image %q is stored here from %s: a migration from site %s may not replace it; send it under another name", o.Name, storedFrom(stored), from.Site)
	}
	j := r.cfg.Journal
	temp := filepath.Join(r.cfg.StoreDir, ".incoming", o.ID+".raw")
	var rec RecvRecord
	resumed := j.get(bucketRecv, o.ID, &rec) == nil
	if resumed && !sameSender(rec.From, rec.FromSite, from) {
		// Migration IDs are the senders' to choose: another site's
		// offer under this one must not empty its chunks or take its
		// place.
		return nil, nil, fmt.Errorf("migration %s was offered by another site; choose another ID", o.ID)
	}
	if resumed && (rec.Size != o.Size || rec.ChunkSize != o.ChunkSize || rec.Name != o.Name || rec.From != from.Node || rec.Format != o.Format) {
		resumed = false // a different migration under an old ID: start over
	}
	if _, err := os.Stat(temp); resumed && errors.Is(err, fs.ErrNotExist) {
		// The chunks the journal holds were in that file (lost to a
		// crash as the image was stored, or removed by hand): resumed
		// into a new, empty one, the sender would skip them and the
		// image would be stored with holes of zeros.
		log.Warn("the incoming file of a resumed migration is gone; receiving every chunk again", "file", temp)
		resumed = false
	}
	if !resumed {
		// Nothing of an earlier attempt under this ID counts — another
		// migration's, one whose file is gone, or one whose record was
		// lost with a journal moved aside: no chunk is held, and the
		// file is emptied when it is opened below.
		if err := j.dropChunks("recv", o.ID); err != nil {
			return nil, nil, err
		}
		rec = RecvRecord{ID: o.ID, Name: o.Name, From: from.Node, FromSite: from.Site, Class: o.Class, Format: o.Format,
			Size: o.Size, ChunkSize: o.ChunkSize, Temp: temp, State: StateRunning, Started: r.cfg.Now()}
		if o.Format == FormatQcow2 {
			rec.DataAt = qcowDataStart(o.Size)
		}
	}
	durable, err := j.chunks("recv", o.ID)
	if err != nil {
		return nil, nil, err
	}
	// Held chunks whose room the file no longer has: cut short. Read back
	// below, they are found changed and written again in new room. Found
	// here, from the file's size and before the read back, so that a
	// resume short of room is refused at once, not after reading what it
	// held. (Those with holes in their room are most of them, written
	// sparse: found changed, their holes are filled below.)
	var lost, partial map[int64]struct{}
	if resumed {
		lost, partial = heldRoom(temp, &rec, durable)
		if old != nil {
			lost = nil // the file of a session this process had open never left its hands
		}
	}
	// Room for what may still come, before anything is written: the
	// chunks that may hold data, less those the file holds from an
	// earlier attempt (written again, a chunk that no longer matches
	// takes no new room, unless the file lost its room). A sender that
	// started its chunks over (its source changed) may write all of them
	// beside the old ones, which stay until the commit clears them: room
	// for them all. Past what was made room for, claim refuses, saying
	// so. (A sender of a release before the eighth of 2026-11-27 says
	// nothing of a restart: its resume of a changed source is refused,
	// where it used to overrun its room by the chunks held. One that does
	// not say how many chunks hold data may fill every one: room for them
	// all.) The journal's record of every chunk that may hold data comes
	// on top: it shares the store's disk.
	allow := chunkCount(o.Size, o.ChunkSize)
	if o.Chunks != nil {
		allow = *o.Chunks
	}
	// Once restarted, for good: the next attempt's source is unchanged
	// since that one, but the stale chunks are still held.
	rec.Restarted = rec.Restarted || o.Restarted
	fresh := allow
	if !rec.Restarted {
		fresh = max(0, allow-int64(len(durable)-len(lost)))
	}
	need, journal := receiveNeed(o, allow, fresh)
	hold, err := r.reserve(o.ID, need, journal)
	if err != nil {
		return nil, nil, err
	}
	// After the room: the audit log shares the store's disk, and refuses
	// when it is nearly full, where the sender is better told what
	// reserve says (free space there, or another destination) than that
	// the log refused.
	if r.cfg.Audit != nil {
		if err := r.cfg.Audit.Ready(r.cfg.Identity(), r.cfg.Now()); err != nil {
			log.Error("cannot receive migration: its audit record could not be written", "err", err)
			return nil, nil, errAuditNotReady
		}
	}
	rec.Attempted = r.cfg.Now()
	if err := j.put(bucketRecv, o.ID, &rec); err != nil {
		return nil, nil, err
	}
	f, err := openDirect(temp)
	if err != nil {
		return nil, nil, err
	}
	if !resumed {
		if err := f.Truncate(0); err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("empty the incoming image: %w", err)
		}
	}
	if err := f.Truncate(rec.DataAt + o.Size); err != nil {
		f.Close()
		if !errors.Is(err, syscall.EFBIG) {
			return nil, nil, fmt.Errorf("size the incoming image: %w", err)
		}
		// No attempt of it can be received here: not kept as one to
		// resume, listed as interrupted for a week. (Being opened, it is
		// this offer's alone.)
		if !resumed {
			if ferr := errors.Join(j.deleteKey(bucketRecv, o.ID), os.Remove(temp)); ferr != nil {
				log.Warn("forget a receive the store's file system cannot hold", "file", temp, "err", ferr)
			}
		}
		what := "the image"
		if rec.DataAt > 0 {
			what = fmt.Sprintf("the image and %s in front for its qcow2 metadata", units.Bytes(rec.DataAt))
		}
		if fsys := fileSystemNote(filepath.Dir(temp)); fsys != "" {
			what += "; " + fsys
		}
		return nil, nil, fmt.Errorf("the destination's image store is on a file system that takes no file of %s (%s): store images this large on one that takes them (XFS), or send it to another destination", units.Bytes(rec.DataAt+o.Size), what)
	}
	// The file of a session this process had open never left its hands.
	rewrite := map[int64]bool{} // held, found changed: written again where they are
	if old == nil {
		bad, err := recheckChunks(f.File, &rec, durable, j, log, r.isStopping)
		if err != nil {
			f.Close()
			return nil, nil, err
		}
		var restore []int64
		for _, i := range bad {
			_, rewrite[i] = lost[i]
			if _, holes := partial[i]; holes && !rewrite[i] {
				restore = append(restore, i)
			}
			delete(partial, i)
		}
		if err := r.restoreRoom(f, &rec, restore); err != nil {
			f.Close()
			return nil, nil, err
		}
	}
	s := &session{r: r, log: log, offer: *o, from: from, temp: f, at: rec.DataAt, record: &rec, start: r.cfg.Now(), policy: d,
		hold: hold, allow: allow, newMax: fresh, dataMax: receiveData(o, fresh), bytesMax: math.MaxInt64, rewrite: rewrite, partial: partial, blank: !resumed, fresh: map[int64]bool{}, durable: durable, pending: map[int64]pendingChunk{}, kick: make(chan struct{}, 1), heard: newStamp(), stop: make(chan struct{}), synced: make(chan struct{}), closed: make(chan struct{})}
	if o.Bytes != nil {
		s.bytesMax = *o.Bytes
	}
	s.nDurable.Store(int64(len(durable)))
	// A copy: the session's own map is written by its syncer while the
	// answer is encoded, and the session is running by then.
	acc := &Accept{Have: maps.Clone(durable), IdleMS: r.cfg.IdleTimeout.Milliseconds()}
	if img := stored; img != nil && img.Manifest.ChunkSize == o.ChunkSize {
		if base, err := openStored(img); err == nil {
			chunks := img.Manifest.Chunks
			if have := base.Size(); have < img.Manifest.Size {
				// Cut short: what is past its end is not offered at
				// all, rather than found unreadable chunk by chunk.
				log.Warn("stored version of the image is shorter than it was stored: only the chunks it holds whole are reused", "name", o.Name, "path", img.Path, "bytes", have, "stored_bytes", img.Manifest.Size)
				chunks = maps.Clone(chunks)
				maps.DeleteFunc(chunks, func(i int64, _ Hash) bool {
					return i*img.Manifest.ChunkSize+chunkLen(i, img.Manifest.Size, img.Manifest.ChunkSize) > have
				})
			}
			s.base, s.baseM, s.baseData = base, chunks, base
			if extents, err := base.Extents(); err == nil {
				s.baseData = extentReader{base, extents}
			}
			acc.Base = chunks
		}
	}
	r.mu.Lock()
	if r.stopping { // after shutdown looked for sessions to end
		r.mu.Unlock()
		f.Close()
		if base := s.base; base != nil {
			base.Close()
		}
		return nil, nil, errStopping
	}
	r.sessions[o.ID] = s
	n := len(r.sessions)
	r.mu.Unlock()
	r.load(n)
	s.heard.touch()
	go s.syncer()
	return s, acc, nil
}

// sameSender reports whether a migration or image received from node of
// site (empty in records of earlier releases) is from's to resume or
// replace: the same gateway, or one of its site.
func sameSender(node, site string, from *certs.Attributes) bool {
	return node == from.Node || site != "" && site == from.Site
}

// storedFrom names where an image came from: its site, or its gateway in
// records of earlier releases, which left the site out.
func storedFrom(img *ImageRecord) string {
	if img.FromSite == "" {
		return "gateway " + img.From
	}
	return "site " + img.FromSite
}

// loadsLocked lists the receives under way and being opened. r.mu is held.
func (r *Receiver) loadsLocked() []receiveLoad {
	out := make([]receiveLoad, 0, len(r.sessions)+len(r.opening))
	for _, l := range r.opening {
		out = append(out, l)
	}
	for id, s := range r.sessions {
		out = append(out, receiveLoad{id: id, name: s.offer.Name, from: s.from.Node, buffers: streamBuffers(&s.offer), hold: s.hold})
	}
	return out
}

// receivingName finds another migration receiving o's image name: its ID
// and, unless it is still being opened, its session. r.mu is held.
func (r *Receiver) receivingName(o *Offer) (string, *session) {
	for id, l := range r.opening {
		if l.name == o.Name && id != o.ID {
			return id, nil
		}
	}
	for id, s := range r.sessions {
		if s.offer.Name == o.Name && id != o.ID {
			return id, s
		}
	}
	return "", nil
}

func (r *Receiver) load(n int) {
	if r.cfg.OnLoad != nil {
		r.cfg.OnLoad(n)
	}
}

// Active lists the migrations being received: ID, sender, name, bytes so
// far. It takes no session's lock, which a commit holds while it stores
// its image: called on every metrics scrape, it would wait for the commit
// with r.mu held, and every offer, stream join and stop with it.
func (r *Receiver) Active() []Incoming {
	r.mu.Lock()
	sessions := maps.Clone(r.sessions)
	r.mu.Unlock()
	out := make([]Incoming, 0, len(sessions))
	for id, s := range sessions {
		out = append(out, Incoming{ID: id, Name: s.offer.Name, Class: s.offer.Class, From: s.from.Node, FromSite: s.from.Site,
			Size: s.offer.Size, Durable: int(s.nDurable.Load()), Received: s.received.Load(), Started: s.start})
	}
	return out
}

// Unfinished is Active and the receives interrupted since (their sender
// stopped, cancelled or lost the link): each keeps what it received, part
// of an image of its class at rest here, until its sender resumes it or
// it is forgotten AbandonedAfter after its last sign of life.
func (r *Receiver) Unfinished() ([]Incoming, error) {
	out := r.Active()
	recs, err := r.cfg.Journal.Receives()
	if err != nil {
		return out, fmt.Errorf("list unfinished receives: %w", err)
	}
	// A set, not a search of out for each record: out grows with the
	// records, and a lookup in it for each was quadratic.
	active := make(map[string]bool, len(out))
	for _, in := range out {
		active[in.ID] = true
	}
	for _, rec := range recs {
		if active[rec.ID] {
			continue
		}
		in := Incoming{ID: rec.ID, Name: rec.Name, Class: rec.Class, From: rec.From, FromSite: rec.FromSite, Size: rec.Size, Started: rec.Started, Interrupted: true}
		if fi, err := os.Stat(rec.Temp); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				in.Received = st.Blocks * 512 // what the disk holds of it
			}
		}
		out = append(out, in)
	}
	return out, nil
}

// Incoming is a migration being received.
type Incoming struct {
	ID       string    `json:"id"`
	Name     string    `json:"name"`
	Class    string    `json:"class"`
	From     string    `json:"from"`
	FromSite string    `json:"from_site"`
	Size     int64     `json:"size"`
	Durable  int       `json:"durable_chunks"`
	Received int64     `json:"received_bytes"`
	Started  time.Time `json:"started"`
	// Interrupted: no session receives it now; Received is what its
	// incoming file holds on disk (Unfinished).
	Interrupted bool `json:"interrupted,omitempty"`
}

func (s *session) close() {
	// Its data streams end with it: one stalled in the middle of a frame
	// would otherwise hold its goroutines and chunk buffers for good,
	// with no syncer left to time it out. None joins any more, and the
	// file is closed only once none writes: a write still under way
	// would otherwise land after a later session's write of the same
	// chunk (a takeover, a resume that rereads what is held). The
	// control stream may still have a last word.
	s.seal()
	close(s.stop)
	<-s.synced // the last flush still uses the file
	s.r.mu.Lock()
	if s.r.sessions[s.offer.ID] == s {
		delete(s.r.sessions, s.offer.ID)
	}
	n := len(s.r.sessions)
	s.r.mu.Unlock()
	s.r.load(n)
	s.temp.Close()
	if s.base != nil {
		s.base.Close()
	}
	close(s.closed)
}

// data receives chunks on one stream: each is decompressed, checked against
// its hash and length, and only then written; a bad one is refused (and the
// sender sends it again), never written.
func (s *session) data(fr *frameReader, w *lockedWriter) {
	o := &s.offer
	var buf []byte
	nack := func(i int64, h Hash, why string) {
		w.send(frameNack, append(indexFrame(i, h), why...))
	}
	// A frame that cannot be parsed ends the stream; the sender is told
	// why, and so is this gateway's log.
	refuse := func(why string) {
		s.log.Warn("migration stream refused", "reason", why)
		w.send(frameError, []byte(why))
	}
	// A read error that is a bad frame is refused; a broken connection
	// just ends the stream.
	refuseBad := func(err error) {
		var bad badFrame
		if errors.As(err, &bad) {
			refuse(string(bad))
		}
	}
	inImage := func(i int64) bool { return i >= 0 && i < chunkCount(o.Size, o.ChunkSize) }
	// Chunks are assembled in buffers aligned for direct I/O (raw ones
	// read straight into one, compressed ones decompressed into one),
	// and written by a writer of their own: with direct I/O a write
	// waits for the device, and meanwhile the next chunk arrives.
	spare := make(chan []byte, 2)
	for range cap(spare) {
		spare <- nil // allocated when first needed: a stream may carry no data
	}
	takeSpare := func() []byte {
		if b := <-spare; b != nil {
			return b
		}
		return alignedBuffer(int(o.ChunkSize))
	}
	type write struct {
		chunk []byte // a spare buffer, data at its start
		index int64
		hash  Hash
		wire  int64
	}
	writes := make(chan write, 1)
	var failed atomic.Bool
	written := make(chan struct{})
	go func() {
		defer close(written)
		for wr := range writes {
			if !failed.Load() {
				cm := s.chunkLock(wr.index)
				cm.Lock()
				at := s.at + wr.index*o.ChunkSize
				if !s.spend(wr.index, sparseSize(wr.chunk, at)) {
					failed.Store(true)
					refuse(s.overSpent())
				} else if err := s.temp.writeSparse(wr.chunk, at, s.clean(wr.index), false); err != nil {
					failed.Store(true)
					refuse(s.writeFailed("write", err))
				} else {
					s.add(wr.index, wr.hash, w, wr.wire, false)
				}
				cm.Unlock()
			}
			spare <- wr.chunk[:cap(wr.chunk)]
		}
	}()
	defer func() {
		close(writes)
		<-written
	}()
	for !failed.Load() {
		typ, n, err := fr.head()
		if err != nil {
			refuseBad(err)
			return
		}
		s.heard.touch()
		switch typ {
		case frameChunk:
			c, err := fr.chunkHead(n)
			if err != nil {
				refuseBad(err)
				return
			}
			i, h := c.index, c.hash
			compressed := c.flags&flagZstd != 0
			why := ""
			switch {
			case !inImage(i):
				why = "chunk outside the image"
			case int64(c.rawLen) != chunkLen(i, o.Size, o.ChunkSize) || (!compressed && c.dataLen != c.rawLen) || (compressed && c.dataLen >= c.rawLen):
				// A compressed chunk is smaller than its data (the
				// sender sends the data as it is otherwise), which also
				// bounds the buffer it is read into.
				why = "chunk of the wrong length"
			}
			if why != "" {
				if fr.skip(c.dataLen) != nil {
					return
				}
				nack(i, h, why)
				continue
			}
			if !s.claim(i) {
				if fr.skip(c.dataLen) == nil { // read, so that the refusal is not lost to a reset
					refuse(s.overClaimed())
				}
				return
			}
			chunk := takeSpare()
			var data []byte
			if compressed {
				p, err := fr.body(c.dataLen, buf)
				if err != nil {
					return
				}
				buf = p[:0]
				// The decoder stops at the buffer's capacity (the chunk
				// size): a frame that would inflate beyond it fails.
				if data, err = s.r.dec.DecodeAll(p, chunk[:0]); err != nil || len(data) != c.rawLen {
					spare <- chunk
					nack(i, h, "does not decompress")
					continue
				}
			} else if data, err = fr.body(c.dataLen, chunk); err != nil {
				return
			}
			if hashChunk(data) != h {
				spare <- chunk
				nack(i, h, "hash mismatch")
				continue
			}
			writes <- write{chunk: data, index: i, hash: h, wire: int64(c.dataLen)}
		case frameSame:
			if n > maxIndexFrame {
				refuse(fmt.Sprintf("Same frame of %d bytes where at most %d are expected", n, maxIndexFrame))
				return
			}
			p, err := fr.body(n, buf)
			if err != nil {
				return
			}
			buf = p[:0]
			i, h, err := parseIndexFrame(p)
			if err != nil {
				refuse(err.Error())
				return
			}
			if !inImage(i) {
				nack(i, h, "chunk outside the image")
				continue
			}
			if !s.claim(i) {
				refuse(s.overClaimed())
				return
			}
			chunk := takeSpare()
			cm := s.chunkLock(i)
			cm.Lock()
			why, err := s.copyFromBase(i, h, chunk)
			if err == nil && why == "" {
				s.add(i, h, w, 0, true)
			}
			cm.Unlock()
			spare <- chunk
			switch {
			case errors.Is(err, errOverSpent):
				failed.Store(true)
				refuse(s.overSpent())
				return
			case err != nil:
				failed.Store(true)
				refuse(s.writeFailed("write", err))
				return
			case why != "":
				nack(i, h, why)
				continue
			}
		case frameAlive:
			// Its arrival is the news (heard, above); a later release
			// may say more in it.
			if fr.skip(n) != nil {
				return
			}
		default:
			refuse(fmt.Sprintf("unexpected frame type %d on a data stream", typ))
			return
		}
	}
}

// claim admits a write of chunk i: one the session holds already (from an
// earlier attempt, or written by this one), or a new one while fewer than
// the offer's chunks have come. Past them a sender would write more than
// the store made room for.
func (s *session) claim(i int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sealed {
		return false
	}
	if _, ok := s.durable[i]; ok {
		if _, holes := s.partial[i]; !holes {
			return true
		}
		// Held, unchanged, with holes in its room: sent again all the
		// same, it may fill them, as a new chunk does its room.
		if !s.claimNew(i) {
			return false
		}
		delete(s.partial, i)
		return true
	}
	if _, ok := s.fresh[i]; ok {
		return true
	}
	if lostRoom, ok := s.rewrite[i]; ok && !lostRoom {
		s.fresh[i] = false
		return true
	}
	return s.claimNew(i)
}

// claimNew admits chunk i into new room while the offer's chunks leave
// some. (s.mu held.)
func (s *session) claimNew(i int64) bool {
	if s.nNew >= s.newMax {
		return false
	}
	s.fresh[i] = true
	s.nNew++
	s.spent()
	return true
}

// spend admits a write of n bytes of chunk i (sparseSize): one in new
// room while the offer's Bytes, which bound the new room, leave enough.
// A chunk in new room written twice counts twice: its room is then what
// both writes took.
func (s *session) spend(i, n int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.fresh[i] {
		return true
	}
	if n > s.bytesMax-s.newBytes {
		return false
	}
	s.newBytes += n
	s.spent()
	return true
}

// spent keeps what the receive's reservation says it wrote at what it may
// no longer write: of its room for new chunks (dataMax), all but what
// the chunks the offer leaves may take, whole, and what the Bytes left
// may. (s.mu held.)
func (s *session) spent() {
	left := min((s.newMax-s.nNew)*s.offer.ChunkSize, s.bytesMax-s.newBytes)
	s.hold.wrote.Store(s.dataMax - left)
}

func (s *session) overSpent() string {
	return fmt.Sprintf("more data than the %s the offer said its chunks hold, written with their zeros as holes: the store made room for that only", units.Bytes(s.bytesMax))
}

func (s *session) overClaimed() string {
	if s.newMax < s.allow {
		return fmt.Sprintf("more new chunks than the %d the store made room for (the %d the offer said hold data, less those held from the earlier attempt); a sender whose source changed since says so in its offer (one of a release before the eighth of 2026-11-27 does not: start a new migration)", s.newMax, s.allow)
	}
	return fmt.Sprintf("more chunks hold data than the %d the offer said: the store made room for those only", s.allow)
}

// copyFromBase copies chunk i from the stored version, through buf (of
// the chunk size). It says why not when the stored version does not hold
// that chunk intact; an error is a failed write here.
func (s *session) copyFromBase(i int64, h Hash, buf []byte) (why string, err error) {
	if s.base == nil || s.baseM[i] != h {
		return "not in the stored version", nil
	}
	b := buf[:chunkLen(i, s.offer.Size, s.offer.ChunkSize)]
	// Either way the sender sends the chunk itself, and the new version
	// is whole; but the stored one is not, and its owner must hear of it.
	if err := readChunk(s.baseData, b, i*s.offer.ChunkSize); err != nil {
		if s.baseBad.Add(1) == 1 {
			s.log.Warn("stored version of the image unreadable; the chunk is fetched from the sender (the count of such chunks comes at the end)", "name", s.offer.Name, "chunk", i, "err", err)
		}
		return "stored version unreadable: " + err.Error(), nil
	}
	if hashChunk(b) != h { // the stored copy must still be what its manifest says
		if s.baseBad.Add(1) == 1 {
			s.log.Warn("stored version of the image damaged: a chunk does not match its manifest; it is fetched from the sender (the count of such chunks comes at the end)", "name", s.offer.Name, "chunk", i)
		}
		return "stored version damaged", nil
	}
	// Through the page cache: a re-sync copies most of an image this way,
	// and direct writes, each waiting for the device, would put every
	// copy behind the disk.
	at := s.at + i*s.offer.ChunkSize
	if !s.spend(i, sparseSize(b, at)) {
		return "", errOverSpent
	}
	return "", s.temp.writeSparse(b, at, s.clean(i), true)
}

// errOverSpent is a chunk copied from the stored version that the room
// made for the receive does not take (overSpent says why).
var errOverSpent = errors.New("more data than the room made for it")

// clean says whether chunk i's room in the incoming file holds no data
// yet, the file empty at the offer and the chunk not written since, and
// counts it written from now on: a write that skips its zeros leaves
// there whatever an earlier write put. Pending and durable alone could
// not say: a chunk leaves pending for durable only after an fsync and the
// journal's write, and one sent again meanwhile kept the first write's
// bytes where the second had zeros, stored under the second's hash.
// (Under the chunk's lock, which its writes take.)
func (s *session) clean(i int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, durable := s.durable[i]
	_, written := s.written[i]
	if s.written == nil {
		s.written = map[int64]struct{}{}
	}
	s.written[i] = struct{}{}
	return s.blank && !durable && !written
}

func (s *session) add(i int64, h Hash, w *lockedWriter, wire int64, reused bool) {
	s.mu.Lock()
	s.pending[i] = pendingChunk{hash: h, to: w}
	s.received.Add(wire)
	if reused {
		s.reused++
	} else {
		s.r.cfg.Observer.Moved(RoleReceive, 1, wire)
	}
	n := len(s.pending)
	s.mu.Unlock()
	if n >= 32 {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// syncer makes written chunks durable in batches — fdatasync the image,
// then record them in the journal — and only then acknowledges them, so
// an acknowledged chunk survives a crash of either side.
func (s *session) syncer() {
	defer close(s.synced)
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			s.flush()
			return
		case <-t.C:
			if idle := s.r.cfg.IdleTimeout; !s.committed.Load() && s.heard.age() > idle {
				s.log.Warn("the sender has not been heard from in "+idle.String()+"; ending the session, its durable chunks wait for a resume", "from", s.from.Node)
				s.abort()
			}
		case <-s.kick:
		}
		s.flush()
	}
}

func (s *session) flush() error {
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	s.mu.Lock()
	batch := s.pending
	s.pending = map[int64]pendingChunk{}
	s.mu.Unlock()
	if len(batch) == 0 {
		return s.syncErr
	}
	err := s.syncErr
	if err == nil {
		if err = unix.Fdatasync(int(s.temp.Fd())); err != nil {
			s.syncErr = err
		}
	}
	hashes := make(map[int64]Hash, len(batch))
	for i, p := range batch {
		hashes[i] = p.hash
	}
	if err == nil {
		err = s.r.cfg.Journal.addChunks("recv", s.offer.ID, hashes)
	}
	if err != nil {
		// The batch is neither durable nor acknowledged, and will not
		// be: the sender is told why and the session ends, rather than
		// the sender waiting for acknowledgements until it gives up on
		// a receiver it takes for gone. A resume re-reads what is held.
		s.log.Error("could not make received chunks durable; ending the session", "err", err, "chunks", len(batch))
		why := []byte(s.writeFailed("the receiver could not make chunks durable", err))
		sent := map[*lockedWriter]bool{}
		for _, p := range batch {
			if !sent[p.to] {
				sent[p.to] = true
				p.to.send(frameError, why)
			}
		}
		s.abort()
		return err
	}
	s.mu.Lock()
	for i, h := range hashes {
		s.durable[i] = h
	}
	s.nDurable.Store(int64(len(s.durable)))
	s.mu.Unlock()
	byConn := map[*lockedWriter][]int64{}
	for i, p := range batch {
		byConn[p.to] = append(byConn[p.to], i)
	}
	for w, idx := range byConn {
		w.send(frameAck, ackFrame(idx))
	}
	return nil
}

// finish verifies the complete image against the sender's manifest and
// root, and stores it.
func (s *session) finish(cm *Commit, d policy.Decision) (*Done, error) {
	if err := s.flush(); err != nil {
		return nil, err
	}
	o := &s.offer
	m := &cm.Manifest
	if m.Size != o.Size || m.ChunkSize != o.ChunkSize {
		return nil, errors.New("manifest does not match the offer")
	}
	if root := m.Root(); root != cm.Root {
		return nil, fmt.Errorf("manifest root %s differs from the announced root %s", root, cm.Root)
	}
	// A sender that lists a chunk of zeros (ours send them as holes)
	// stores it as one: kept in the stored manifest, it would be a chunk
	// said to hold data that VerifyImage, which reads zeros as a hole,
	// reports damaged on an intact image. Left out, it is cleared below
	// like any hole, and the root is the same.
	m = m.withoutZeroChunks()
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, h := range m.Chunks {
		if d, ok := s.durable[i]; !ok || d != h {
			return nil, fmt.Errorf("chunk %d was never received intact", i)
		}
	}
	if err := s.zeroAbsent(m); err != nil {
		return nil, err
	}
	if err := s.temp.Sync(); err != nil {
		return nil, err
	}
	// The root over what we verified on arrival must be the sender's.
	ours := Manifest{Size: o.Size, ChunkSize: o.ChunkSize, Chunks: map[int64]Hash{}}
	for i := range m.Chunks {
		ours.Chunks[i] = s.durable[i]
	}
	if ours.Root() != cm.Root {
		return nil, errors.New("root over the received chunks differs from the sender's")
	}
	dir := s.r.cfg.StoreDir
	final := filepath.Join(dir, o.Name+"."+o.Format)
	source := s.temp.Name() // what is renamed onto final
	switch {
	case o.Format == FormatQcow2 && s.at > 0:
		if err := finishQcow2InPlace(s.temp.File, o.Size, s.at); err != nil {
			return nil, fmt.Errorf("write qcow2: %w", err)
		}
	case o.Format == FormatQcow2:
		source = filepath.Join(dir, ".incoming", o.ID+".qcow2")
		if err := convertToQcow2(s.temp.File, o.Size, source); err != nil {
			os.Remove(source)
			return nil, fmt.Errorf("write qcow2: %w", err)
		}
	}
	// The image is staged in the journal before it replaces the stored
	// version, and recorded in the catalog with its receive forgotten in
	// one transaction after: a gateway stopped in between finishes the
	// store when it starts (recoverStores), rather than keep a catalog
	// whose root describes the file the image replaced.
	st := stagedImage{Image: ImageRecord{Name: o.Name, Path: final, Format: o.Format, Class: o.Class, From: s.from.Node, FromSite: s.from.Site,
		Migration: o.ID, Received: s.r.cfg.Now(), Root: cm.Root, Manifest: ours}, Source: source, Incoming: s.temp.Name(),
		Audit: s.r.auditFields(o, s.from, d, "done", cm.Root, s.received.Load(), s.start, s.r.cfg.Now(), "")}
	sid, err := sourceID(source)
	if err != nil {
		return nil, err
	}
	st.Inode, st.File = sid.Inode, &sid
	j := s.r.cfg.Journal
	if err := j.put(bucketStoring, o.ID, &st); err != nil {
		return nil, err
	}
	if err := os.Rename(source, final); err != nil {
		j.deleteKey(bucketStoring, o.ID)
		return nil, err
	}
	// From here the image is in place and staged: a failure is not the
	// migration's (storedError), and the gateway's next start completes
	// the store (recoverStores), "done" record included.
	done := &Done{Name: o.Name, Path: final, Format: o.Format, Root: cm.Root, Received: s.received.Load(), Reused: s.reused}
	failed := func(err error) (*Done, error) { return nil, &storedError{err: err, st: &st, done: done} }
	if err := atomicfile.SyncDir(dir); err != nil {
		return failed(err)
	}
	if s.r.cfg.afterRename != nil {
		if err := s.r.cfg.afterRename(); err != nil {
			return failed(err)
		}
	}
	if s.r.appendAudit(st.Audit) {
		// Said before the catalog takes the image: a stop in between
		// must not write the record twice.
		st.Audited = true
		if err := j.put(bucketStoring, o.ID, &st); err != nil {
			s.r.auditedUnsaid(o.ID)
			return failed(err)
		}
	}
	if err := s.r.stored(o.ID, &st); err != nil {
		return failed(err)
	}
	return done, nil
}

// completeStore records an image that is in place and staged, with its
// audit record unless that was written: what recoverStores does at a
// start, done at once after a failure that may have passed.
func (r *Receiver) completeStore(id string, st *stagedImage) error {
	if !st.Audited && r.appendAudit(st.Audit) {
		st.Audited = true
		if err := r.cfg.Journal.put(bucketStoring, id, st); err != nil {
			r.auditedUnsaid(id)
			r.cfg.Log.Error("journal: the image's audit record is written, but not marked so: a start before it is recorded looks for it in the audit log", "migration_id", id, "err", err)
		}
	}
	if err := r.stored(id, st); err != nil {
		return err
	}
	r.setUnrecorded(id, "")
	return nil
}

// auditedUnsaid notes that the "done" record of migration id's image is
// written though the journal could not say so (a full disk): recorded
// later (recoverStores), it is not owed again. Until the gateway stops.
func (r *Receiver) auditedUnsaid(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.audited == nil {
		r.audited = map[string]bool{}
	}
	r.audited[id] = true
}

// storedError is a failure after a received image replaced the stored
// version: the image is in place and staged for recoverStores, so the
// migration is not recorded as failed.
type storedError struct {
	err  error
	st   *stagedImage
	done *Done // the answer, once the image is recorded
}

func (e *storedError) Error() string { return e.err.Error() }
func (e *storedError) Unwrap() error { return e.err }

// zeroAbsent makes every chunk the manifest leaves out, zeros in the
// source, a hole in the incoming file. Not only the chunks held durable
// from an earlier attempt: a chunk written but not yet journalled when the
// receiver stopped, or dropped by recheck, still holds what it held then,
// and the sender, told of no such chunk, never sends it again. The file's
// data extents are walked, so chunks that are holes already cost nothing.
// Those held durable are forgotten first: should the image not be stored
// after all, a resume would otherwise offer them as held, and read them
// back as changed by someone else. (Under s.mu.)
func (s *session) zeroAbsent(m *Manifest) error {
	o := &s.offer
	var stale []int64
	for i := range s.durable {
		if _, ok := m.Chunks[i]; !ok {
			stale = append(stale, i)
		}
	}
	if len(stale) > 0 {
		if err := s.r.cfg.Journal.removeChunks("recv", o.ID, stale); err != nil {
			return fmt.Errorf("forget the chunks the manifest leaves out: %w", err)
		}
		for _, i := range stale {
			delete(s.durable, i)
		}
		s.nDurable.Store(int64(len(s.durable)))
	}
	end := s.at + o.Size
	extents, err := (&rawSource{f: s.temp.File, size: end}).Extents()
	if err != nil {
		return err
	}
	fd := int(s.temp.Fd())
	for _, e := range extents {
		if e.Off+e.Len <= s.at {
			continue
		}
		first := (max(e.Off, s.at) - s.at) / o.ChunkSize
		last := (min(e.Off+e.Len, end) - s.at - 1) / o.ChunkSize
		for i := first; i <= last; i++ {
			if _, ok := m.Chunks[i]; ok {
				continue
			}
			at, n := s.at+i*o.ChunkSize, chunkLen(i, o.Size, o.ChunkSize)
			if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, at, n); err != nil {
				if _, werr := s.temp.WriteAt(make([]byte, n), at); werr != nil {
					return fmt.Errorf("clear chunk %d of the incoming image: %w", i, werr)
				}
			}
		}
	}
	return nil
}

// stored records a staged image, moved into place, in the catalog, and
// removes what is left of its receive and an older version in the other
// format.
func (r *Receiver) stored(id string, st *stagedImage) error {
	owed, err := r.record(id, st)
	if err == nil && owed {
		r.cfg.Log.Error("an image is stored without its audit record, which the audit log did not take: it is written before the next record, or at the next start", "migration_id", id, "name", st.Image.Name)
	}
	return err
}

// record is stored, saying whether the audit record is owed.
func (r *Receiver) record(id string, st *stagedImage) (owed bool, err error) {
	var fields map[string]any
	if !st.Audited && st.Audit != nil && r.cfg.Audit != nil {
		fields = st.Audit
	}
	if r.cfg.recordFails != nil {
		if err := r.cfg.recordFails(); err != nil {
			return false, err
		}
	}
	if err := r.cfg.Journal.storedImage(id, &st.Image, fields); err != nil {
		return false, err
	}
	if st.Incoming != st.Source {
		os.Remove(st.Incoming) // converted to qcow2 beside it
	}
	other := FormatRaw
	if st.Image.Format == FormatRaw {
		other = FormatQcow2
	}
	os.Remove(filepath.Join(r.cfg.StoreDir, st.Image.Name+"."+other))
	r.catalogChanged()
	return fields != nil, nil
}

func (r *Receiver) catalogChanged() {
	if r.cfg.OnCatalog != nil {
		r.cfg.OnCatalog()
	}
}

// movedInPlace says whether at, the file at the image's path, is the
// staged source moved there.
func (st *stagedImage) movedInPlace(at SourceID) bool {
	if st.File != nil {
		return sameContent(at, *st.File)
	}
	return st.Inode != 0 && at.Inode == st.Inode
}

// recoverStores finishes the stores that no session is finishing: those a
// stop interrupted (starting) or whose record the journal could not take
// (a full disk). An image moved into place is recorded; one that was not
// is left to its receive, which the sender's resume completes. An image
// that still cannot be recorded is logged and stays staged, and is
// returned (by migration ID): a gateway on a full disk still starts, and
// the record is tried again every minute while one is left (Serve), at an
// offer or removal (waitingRecord), and at the next start.
func (r *Receiver) recoverStores(starting bool) (left map[string]*stagedImage, err error) {
	r.recordMu.Lock()
	defer r.recordMu.Unlock()
	// Noted before the list is read, so still listed if still staged.
	r.mu.Lock()
	noted := slices.Collect(maps.Keys(r.unrecorded))
	r.mu.Unlock()
	staged, err := r.cfg.Journal.stagedImages()
	if err != nil {
		return nil, err
	}
	for _, id := range noted {
		if _, ok := staged[id]; !ok {
			r.setUnrecorded(id, "") // recorded since, or gone
		}
	}
	left = map[string]*stagedImage{}
	for id := range staged {
		r.mu.Lock()
		storing := r.sessions[id] != nil // its commit records it, or says it could not
		audited := r.audited[id]
		r.mu.Unlock()
		if storing {
			continue
		}
		// Read again now that its session is known to be over: one that
		// ended since the list was read recorded its image (the entry
		// gone), or marked its record written; recorded again from the
		// list, it had a second "done" record.
		var st stagedImage
		if err := r.cfg.Journal.get(bucketStoring, id, &st); errors.Is(err, ErrNotFound) {
			r.setUnrecorded(id, "")
			continue
		} else if err != nil {
			return nil, err
		}
		st.Audited = st.Audited || audited
		if at, err := sourceID(st.Image.Path); err == nil && st.movedInPlace(at) {
			if !st.Audited && st.Audit != nil {
				// Owed in the catalog record's transaction and written
				// after it, not appended before: an append whose record
				// the journal then failed to take would be made again at
				// every try. One appended before the stop is in the log,
				// and payOwed only forgets it.
				st.Audit["recovered"] = "recorded late: the gateway stopped, or its journal could not take the record (a full disk), as the image was stored"
			}
			if _, err := r.record(id, &st); err != nil {
				left[id] = &st
				r.setUnrecorded(id, st.Image.Name)
				what := "the journal cannot take its record (see the error)"
				if diskFull(err) {
					what = "the disk is full: free space on it"
				}
				r.cfg.Log.Error("an image in place is not recorded in the catalog yet: "+what+"; it stays staged, is recorded within a minute of the journal taking it, and takes no migration or removal of its name until then",
					"migration_id", id, "name", st.Image.Name, "path", st.Image.Path, "root", st.Image.Root.String(), "err", err)
				continue
			}
			r.setUnrecorded(id, "")
			if starting {
				r.cfg.Log.Warn("recorded an image stored just before the gateway stopped", "migration_id", id, "name", st.Image.Name, "root", st.Image.Root.String())
			} else {
				r.cfg.Log.Warn("recorded an image stored while the journal could not take its record", "migration_id", id, "name", st.Image.Name, "root", st.Image.Root.String())
			}
			continue
		}
		// Not moved into place: the receive resumes from its file. A
		// qcow2 converted beside it is made again at the next commit.
		if st.Source != st.Incoming {
			os.Remove(st.Source)
		}
		r.setUnrecorded(id, "")
		if err := r.cfg.Journal.deleteKey(bucketStoring, id); err != nil {
			// Harmless meanwhile: nothing replaced the stored version.
			r.cfg.Log.Warn("forget an image staged but not moved into place (tried again later)", "migration_id", id, "name", st.Image.Name, "err", err)
		}
	}
	r.payOwed() // a failure is logged; the next record tries again
	return left, nil
}

// stagedRetry is how often a receiver tries again to record the images in
// place that its journal could not take: their names take no migration or
// removal meanwhile, and an operator who freed space waits no longer.
const stagedRetry = time.Minute

// waitingRecord returns the migration whose image, in place but not in
// the catalog, an offer of name under id, or a removal of name (id ""),
// must wait for; it tries to record such an image first, and reads
// nothing when there is none. Until it is
// recorded, an offer's commit would replace a version the catalog never
// knew, its record lost, and a removal would record the version before it
// as removed.
func (r *Receiver) waitingRecord(id, name string) (string, error) {
	waiting := func() string {
		r.mu.Lock()
		defer r.mu.Unlock()
		for sid, n := range r.unrecorded {
			if sid == id || n == name {
				return sid
			}
		}
		return ""
	}
	if waiting() == "" {
		return "", nil
	}
	if _, err := r.recoverStores(false); err != nil {
		return "", fmt.Errorf("the images being stored: %w", err)
	}
	return waiting(), nil
}

// setUnrecorded notes that migration id's image, name, is in place but not
// in the catalog; an empty name that it is not (recorded, or gone). Its
// note that the audit record is written goes with it.
func (r *Receiver) setUnrecorded(id, name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if name == "" {
		delete(r.unrecorded, id)
		delete(r.audited, id)
		return
	}
	if r.unrecorded == nil {
		r.unrecorded = map[string]string{}
	}
	r.unrecorded[id] = name
}
