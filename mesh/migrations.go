package mesh

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/migrate"
	"github.com/skybridge-mesh/skybridge/policy"
)

// The gateway moves images: it runs the sending side of migrations started
// through its control socket, and receives migrations from other gateways
// on its overlay address (migrate.DefaultPort), into StateDir/images.

// MigrationRequest starts (or, with ID, resumes) a migration.
type MigrationRequest struct {
	ID     string `json:"id,omitempty"`
	Image  string `json:"image"`
	To     string `json:"to"` // a node, a site, a region or a jurisdiction
	Class  string `json:"class"`
	Name   string `json:"name,omitempty"`
	Format string `json:"format,omitempty"`
	// SourceFormat is what the image is read as (raw, qcow2; "": by
	// content, migrate.SendConfig.SourceFormat).
	SourceFormat string `json:"source_format,omitempty"`
	Streams      int    `json:"streams,omitempty"`
	BWLimit      int64  `json:"bwlimit,omitempty"`
}

type migrations struct {
	journal *migrate.Journal
	recv    *migrate.Receiver
	audit   *audit.Log
	store   string
	// served is closed when the receiver has stopped (nil if it never
	// started): its sessions use the journal until then.
	served chan struct{}

	mu      sync.Mutex
	running map[string]*runningMigration
	// removing holds the files of stored images being removed: no send
	// of one begins meanwhile (RemoveImage).
	removing map[string]bool
	// gen counts the migrations begun and ended: the send records change
	// only then, so the dashboard, which asks every second for each open
	// page, reads the journal (every send ever made) only then.
	gen    uint64
	recent struct {
		gen   uint64
		sends []migrate.SendRecord // nil: not read yet
	}

	atRest         atRestState
	catalogChanged atomic.Bool // since the residency loop last listed the images

	// unended holds the sends a stop cut short that the start could not
	// record as ended (a full disk), by ID, with their start: they read
	// as interrupted, and a resume or the next start records them.
	unended map[string]time.Time
}

type runningMigration struct {
	// first is the migration as requested, shown until the sender's own
	// record reaches the journal: the ID goes to the client at once, and
	// a client that asks about it (or lists migrations) must find it.
	first  migrate.SendRecord
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	last   migrate.Progress
	subs   []chan migrate.Progress
	rec    *migrate.SendRecord
	err    error
	ended  bool // rec and err are final; subs were closed
}

func (r *runningMigration) publish(p migrate.Progress) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.last = p
	for _, c := range r.subs {
		select {
		case c <- p:
		default: // a slow reader skips a snapshot, never blocks the transfer
		}
	}
}

// end records how the run ended and tells every subscriber, those to
// come included.
func (r *runningMigration) end(rec *migrate.SendRecord, err error) {
	r.mu.Lock()
	r.rec, r.err = rec, err
	for _, c := range r.subs {
		close(c)
	}
	r.subs, r.ended = nil, true
	r.mu.Unlock()
	close(r.done)
}

func (r *runningMigration) subscribe() chan migrate.Progress {
	c := make(chan migrate.Progress, 16)
	r.mu.Lock()
	defer r.mu.Unlock()
	c <- r.last
	if r.ended {
		// It ended before we came (a migration that fails at once):
		// nothing will close a channel added now.
		close(c)
		return c
	}
	r.subs = append(r.subs, c)
	return c
}

// resolve fills in a resume request (one that gives only an ID) from the
// interrupted migration's record.
func (m *migrations) resolve(req MigrationRequest) (MigrationRequest, error) {
	if req.ID == "" {
		return req, nil
	}
	if m.busy(req.ID) {
		// Asked before the journal: a migration started a moment ago
		// has no record yet.
		return req, fmt.Errorf("migration %s is already running", req.ID)
	}
	old, err := m.journal.Send(req.ID)
	if err != nil {
		return req, err
	}
	if old.State == migrate.StateDone {
		return req, fmt.Errorf("migration %s is already done", req.ID)
	}
	req.Image, req.To, req.Class, req.Name, req.Format = old.Image, old.To, old.Class, old.Name, old.Format
	if req.Streams == 0 {
		req.Streams = old.Streams
	}
	if req.BWLimit == 0 {
		req.BWLimit = old.BWLimit
	}
	return req, nil
}

// begin registers a migration as running under its ID, refusing an ID
// already running or an image already being sent to the destination.
func (m *migrations) begin(first migrate.SendRecord, cancel context.CancelFunc) (*runningMigration, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, busy := m.running[first.ID]; busy {
		return nil, fmt.Errorf("migration %s is already running", first.ID)
	}
	// One image name to one destination at a time: two would race to
	// store it, and the receiver takes a second from the same gateway for
	// a first this gateway no longer runs.
	for id, run := range m.running {
		if run.first.Name == first.Name && run.first.To == first.To {
			return nil, fmt.Errorf("image %q is already being sent to %s by migration %s: wait for it, or cancel it", first.Name, first.To, id)
		}
	}
	for path := range m.removing {
		if sameFile(path, first.Image) {
			return nil, fmt.Errorf("%s is a stored image being removed: nothing is sent from it", first.Image)
		}
	}
	run := &runningMigration{first: first, cancel: cancel, done: make(chan struct{}), last: migrate.Progress{ID: first.ID, Phase: "starting"}}
	m.running[first.ID] = run
	m.gen++
	return run, nil
}

// holdForRemoval reserves the file of a stored image for its removal,
// unless a send reads it: removed under a send (an image moved on to a
// site the policy allows, then removed here), it would be stored nowhere
// — the send fails at its check that the source is unchanged, and a
// resume finds no file. release ends the reservation.
func (m *migrations) holdForRemoval(name, path string) (release func(), err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for id, run := range m.running {
		if sameFile(path, run.first.Image) {
			return nil, fmt.Errorf("image %q is being sent to %s by migration %s: remove it once that migration is done (or cancelled)", name, run.first.To, id)
		}
	}
	if m.removing == nil {
		m.removing = map[string]bool{}
	}
	m.removing[path] = true
	return func() {
		m.mu.Lock()
		delete(m.removing, path)
		m.mu.Unlock()
	}, nil
}

// sameFile reports whether paths a and b name one file.
func sameFile(a, b string) bool {
	if filepath.Clean(a) == filepath.Clean(b) {
		return true
	}
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

// recentSends is sends, read again only when a migration has begun or
// ended since the last read. The caller must not modify what it returns.
func (m *migrations) recentSends() ([]migrate.SendRecord, error) {
	m.mu.Lock()
	gen, cached := m.gen, m.recent.sends
	if cached != nil && m.recent.gen == gen {
		m.mu.Unlock()
		return cached, nil
	}
	m.mu.Unlock()
	sends, err := m.sends()
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.recent.gen, m.recent.sends = gen, sends // a change meanwhile bumped gen: read again next time
	m.mu.Unlock()
	return sends, nil
}

// finished forgets a migration that has ended.
func (m *migrations) finished(id string) {
	m.mu.Lock()
	delete(m.running, id)
	m.gen++
	m.mu.Unlock()
}

func (m *migrations) busy(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.running[id] != nil
}

// lookup returns a migration's record, and its live progress if it runs.
func (m *migrations) lookup(id string) (*migrate.SendRecord, *migrate.Progress, error) {
	m.mu.Lock()
	run := m.running[id]
	m.mu.Unlock()
	rec, err := m.journal.Send(id)
	if err != nil && (run == nil || !errors.Is(err, migrate.ErrNotFound)) {
		return nil, nil, err
	}
	if run == nil {
		m.asEnded(rec)
		return rec, nil, nil
	}
	run.mu.Lock()
	p := run.last
	run.mu.Unlock()
	if err != nil {
		first := run.first // running, its record not written yet
		rec = &first
	} else if rec.Started.Before(run.first.Started) {
		// A resume whose record is still its last attempt's (the source
		// is opened and read first): shown running, not as that attempt
		// ended.
		rec.State, rec.Error, rec.Reasons, rec.Stats = migrate.StateRunning, "", nil, p.Stats
	}
	return rec, &p, nil
}

// sends lists the migrations sent, oldest first: the journal's records and
// those just started whose record is not written yet.
func (m *migrations) sends() ([]migrate.SendRecord, error) {
	m.mu.Lock()
	firsts := make([]migrate.SendRecord, 0, len(m.running))
	for _, run := range m.running {
		firsts = append(firsts, run.first)
	}
	m.mu.Unlock()
	// The journal is read after the running set: a migration that
	// writes its record in between is then found in the journal.
	sends, err := m.journal.Sends()
	if err != nil {
		return nil, err
	}
	for i := range sends {
		if !slices.ContainsFunc(firsts, func(f migrate.SendRecord) bool { return f.ID == sends[i].ID }) {
			m.asEnded(&sends[i])
		}
	}
	for _, f := range firsts {
		if !slices.ContainsFunc(sends, func(r migrate.SendRecord) bool { return r.ID == f.ID }) {
			sends = append(sends, f)
		}
	}
	slices.SortFunc(sends, func(a, b migrate.SendRecord) int { return a.Started.Compare(b.Started) })
	return sends, nil
}

// asEnded shows a send that does not run as EndInterrupted would have
// recorded it, if the start could not (unended): not as running.
func (m *migrations) asEnded(r *migrate.SendRecord) {
	if started, ok := m.unended[r.ID]; ok && r.State == migrate.StateRunning && r.Started.Equal(started) {
		r.State, r.Error = migrate.StateFailed, migrate.Interrupted
	}
}

// forgetStaleSends drops from j the chunks of unfinished sends not resumed
// for AbandonedAfter and the records of sends ended over SendsKept ago.
func forgetStaleSends(j *migrate.Journal, now time.Time, log *slog.Logger) {
	chunks, records, err := j.ForgetStaleSends(now)
	if err != nil {
		log.Warn("journal: forget old migrations", "err", err)
		return
	}
	if chunks > 0 {
		log.Info("journal: forgot the chunks of unfinished migrations not resumed for a week; a resume sends them again", "migrations", chunks)
	}
	if records > 0 {
		log.Info("journal: forgot the records of migrations that ended over 90 days ago (the audit log keeps them)", "migrations", records)
	}
}

// journalLoop forgets old sends once a day, as the start does: a gateway
// may run for months.
func (g *Gateway) journalLoop(ctx context.Context) {
	t := time.NewTicker(24 * time.Hour)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			forgetStaleSends(g.mig.journal, g.now(), g.log)
			g.mig.mu.Lock()
			g.mig.gen++ // the records read again
			g.mig.mu.Unlock()
		}
	}
}

// openMigrations opens the journal, the audit log and the receiver.
func (g *Gateway) openMigrations() error {
	j, err := migrate.OpenJournal(filepath.Join(g.s.StateDir, "migrate.db"))
	if err != nil {
		return err
	}
	// Sends a stopped gateway left running: said once, and no client
	// waits on them for ever.
	ended, err := j.EndInterrupted(g.now())
	var unended map[string]time.Time
	if err != nil {
		// A full disk must not keep the gateway, and the site's tunnels,
		// down: what the journal could not record is read instead, and a
		// resume or the next start records it.
		all, rerr := j.Sends()
		if rerr != nil {
			j.Close()
			return fmt.Errorf("journal %s: %w", filepath.Join(g.s.StateDir, "migrate.db"), err)
		}
		unended = map[string]time.Time{}
		for _, r := range all {
			if r.State == migrate.StateRunning {
				unended[r.ID] = r.Started
				ended = append(ended, r)
			}
		}
		g.log.Error("journal: the migrations a stop cut short cannot be recorded as ended, nor their audit records written (free space on the disk); they show as interrupted, and a resume or the next start records them",
			"path", filepath.Join(g.s.StateDir, "migrate.db"), "migrations", len(unended), "err", err)
	}
	forgetStaleSends(j, g.now(), g.log)
	m := &migrations{journal: j, audit: audit.Open(filepath.Join(g.s.StateDir, "audit.log")),
		store: filepath.Join(g.s.StateDir, "images"), running: map[string]*runningMigration{}, atRest: atRestState{kick: make(chan struct{}, 1)},
		unended: unended}
	for _, r := range ended {
		if unended != nil || r.Error == migrate.Interrupted && r.AuditOwed == nil {
			g.log.Warn("a migration was interrupted when the gateway stopped: resume it", "migration_id", r.ID, "name", r.Name, "to", r.To)
		}
		if unended != nil {
			continue // recorded, with its audit record, at its resume or the next start
		}
		if err := migrate.AuditInterrupted(j, m.audit, g.id.Load(), &r, g.now()); err != nil {
			g.log.Error("audit log: a migration's record is still not written; the next start or its resume tries again: check the error: the log (skybridge audit verify), the disk's free space, or the gateway's certificate, which must be valid at the record's time (renew the identity, or set the clock right)", "migration_id", r.ID, "err", err)
			continue
		}
		g.log.Warn("wrote the audit record of a migration that ended without it (the gateway stopped, or its audit log refused it then)", "migration_id", r.ID, "name", r.Name, "to", r.To, "state", r.State)
	}
	m.recv, err = migrate.NewReceiver(migrate.ReceiverConfig{
		StoreDir: m.store, Journal: j, Identity: g.id.Load, Trust: g.trust.Load, Audit: m.audit, Log: g.log, Observer: g.metrics,
		Policy: func() *policy.Policy {
			if p := g.policy.Load(); p != nil {
				return p.p
			}
			return nil
		},
		OnLoad:  g.setLoad,
		Sources: g.trust.Load().MeshPrefix(),
		Via:     func(from *certs.Attributes) []*certs.Attributes { return g.via(from, g.id.Load().Attributes()) },
		OnCatalog: func() {
			m.catalogChanged.Store(true)
			m.atRest.trigger()
		},
	})
	if err != nil {
		j.Close()
		return err
	}
	g.mig = m
	return nil
}

// serveMigrations receives migrations on the overlay address only.
func (g *Gateway) serveMigrations(ctx context.Context) error {
	addr := netip.AddrPortFrom(g.id.Load().Attributes().OverlayIP, migrate.DefaultPort)
	ln, err := g.dev.Listen(addr)
	if err != nil {
		return fmt.Errorf("listen for migrations on %s: %w", addr, err)
	}
	served := make(chan struct{})
	g.mig.served = served
	go func() {
		defer close(served)
		if err := g.mig.recv.Serve(ctx, ln); err != nil {
			g.log.Error("migration receiver stopped", "err", err)
		}
	}()
	return nil
}

// setLoad advertises how many migrations we are receiving, so senders
// that name a region or jurisdiction pick the least loaded gateway.
func (g *Gateway) setLoad(n int) {
	g.load.Store(uint32(n))
	select {
	case g.readvertise <- struct{}{}:
	default:
	}
}

// StartMigration resolves the destination and starts sending in the
// background; progress goes to the returned run.
func (g *Gateway) StartMigration(req MigrationRequest) (*runningMigration, string, error) {
	m := g.mig
	req, err := m.resolve(req)
	if err != nil {
		return nil, "", err
	}
	if req.Image == "" || req.To == "" || req.Class == "" {
		return nil, "", errors.New("a migration needs an image, a destination and a data class")
	}
	dest, alsoRefused, err := g.pickDestination(req.To, req.Class)
	if err != nil {
		return nil, "", err
	}
	id := req.ID
	if id == "" {
		id = migrate.NewID()
	}
	name := req.Name
	if name == "" {
		name = migrate.DefaultName(req.Image)
	}
	ctx, cancel := context.WithCancel(context.Background())
	run, err := m.begin(migrate.SendRecord{
		ID: id, Image: req.Image, Name: name, Class: req.Class, Format: req.Format,
		To: dest.Attributes.Node, ToSite: dest.Attributes.Site, Streams: req.Streams, BWLimit: req.BWLimit,
		State: migrate.StateRunning, Started: g.now(),
	}, cancel)
	if err != nil {
		cancel()
		return nil, "", err
	}

	var pol *policy.Policy
	if p := g.policy.Load(); p != nil {
		pol = p.p
	}
	log := g.log.With("migration_id", id, "class", req.Class, "peer", dest.Attributes.Node, "peer_site", dest.Attributes.Site)
	cfg := migrate.SendConfig{
		ID: id, Image: req.Image, Name: req.Name, Class: req.Class, Format: req.Format, SourceFormat: req.SourceFormat, Streams: req.Streams, BWLimit: req.BWLimit,
		From: g.id.Load().Attributes(), To: migrate.Peer{Attributes: dest.Attributes, Addr: netip.AddrPortFrom(dest.Attributes.OverlayIP, migrate.DefaultPort),
			Via: g.via(g.id.Load().Attributes(), dest.Attributes)},
		Policy: pol, Identity: g.id.Load, Trust: g.trust.Load(), TrustNow: g.trust.Load, Dial: g.dev.Dial,
		Journal: m.journal, Audit: m.audit, Log: log, Progress: run.publish, Observer: g.metrics,
	}
	go func() {
		defer cancel()
		rec, err := migrate.Send(ctx, cfg)
		var denied *migrate.DeniedError
		if errors.As(err, &denied) && denied.By == "sender" && len(alsoRefused) > 0 {
			// The refusal names the gateway tried; the others that "to"
			// matched were refused too, and the operator should see why.
			more := fmt.Sprintf("the other gateways matching %q are refused too: %s", req.To, strings.Join(alsoRefused, "; "))
			denied.Reasons = append(slices.Clone(denied.Reasons), more)
			if rec != nil {
				rec.Reasons = append(slices.Clone(rec.Reasons), more)
			}
		}
		// Out of the running set before anyone waiting is told it ended:
		// a `migrate resume` right after `migrate cancel` returned was
		// refused as still running.
		m.finished(id)
		run.end(rec, err)
		switch {
		case errors.As(err, &denied):
			log.Warn("migration refused by the residency policy", "by", denied.By, "rule", denied.Rule, "reason", strings.Join(denied.Reasons, "; "))
		case err != nil:
			log.Warn("migration ended", "err", err)
		default:
			log.Info("migration done", "root", rec.Root.String(), "bytes_sent", rec.Stats.BytesSent, "duration", rec.Stats.Duration.Round(time.Millisecond))
		}
	}()
	return run, id, nil
}

// via is the gateways data from one gateway to another passes through:
// in the hub topology the sites' hubs (hubVia), chosen as the topology
// chooses them, the first gateway of each site by name; none in a full
// mesh.
func (g *Gateway) via(from, to *certs.Attributes) []*certs.Attributes {
	if g.s.Topology != TopologyHub {
		return nil
	}
	return hubVia(hubsOf(&Node{Attributes: g.id.Load().Attributes()}, g.members.gateways()), from, to)
}

// pickDestination resolves "to" — a node, a site, a region or a
// jurisdiction — to one verified gateway the policy lets this class reach,
// chosen as the planner chooses (migrate.MakePlan): not a gateway of our
// own site unless "to" names it or the site, nor one our tunnels do not
// reach; of those the rules allow before those only an exception admits,
// and those only audit mode lets through last (migrate.StandingOf); within
// each, the least loaded (ties: by name). A gateway's name is that gateway
// alone, whatever else it could be read as (a node named like a country
// code): `migrate apply` names the gateway its plan chose. If the policy
// permits none, the first it refuses is returned so that the migration is
// refused (and recorded) with the policy's reasons, before any dial. If it
// permits only gateways our tunnels do not reach, the migration is refused
// here with why they are not, rather than dialled until the connection
// times out.
func (g *Gateway) pickDestination(to, class string) (dest *Node, alsoRefused []string, err error) {
	self := g.id.Load().Attributes()
	var matched []Node
	for _, n := range g.members.gateways() {
		a := n.Attributes
		if a.Node == to {
			matched = []Node{n}
			break
		}
		if migrate.Matches(a, to) {
			matched = append(matched, n)
		}
	}
	if len(matched) == 0 {
		if self.Node == to || migrate.Matches(self, to) {
			return nil, nil, fmt.Errorf("%q is this gateway (%s, site %s) and no other verified gateway: a migration goes to another gateway; name it, or its site, region or jurisdiction (see skybridge status)", to, self.Node, self.Site)
		}
		return nil, nil, fmt.Errorf("no verified gateway matches %q (a node, site, region or jurisdiction): see skybridge status", to)
	}
	// A gateway of our own site moves nothing out of it, and idle beside
	// us it would be the least loaded: only when named, as in a plan.
	if matched = slices.DeleteFunc(matched, func(n Node) bool {
		return n.site() == self.Site && to != n.node() && to != n.site()
	}); len(matched) == 0 {
		return nil, nil, fmt.Errorf("only gateways of this gateway's own site %s match %q, and they are no destination unless named: name one, or the site, to move the image within the site", self.Site, to)
	}
	slices.SortFunc(matched, func(a, b Node) int {
		if c := cmp.Compare(a.Advert.Load, b.Advert.Load); c != 0 {
			return c
		}
		return cmp.Compare(a.node(), b.node())
	})
	p := g.policy.Load()
	if p == nil {
		return &matched[0], nil, nil // Send refuses: no policy
	}
	// The policy first: a move it refuses is refused by Send, and
	// recorded, before anything is dialled, whether our tunnels reach
	// there or not.
	now := g.now()
	best, bestStanding := -1, migrate.Refused
	refusedAt := -1 // the first the policy refuses: tried if none may take it
	unreachedWhy := ""
	type why struct{ site, line string }
	var whys []why // the others', one line per site and reason
	said := map[[2]string]bool{}
	for i := range matched {
		a := matched[i].Attributes
		_, verdict := p.p.AdmitPath(class, policy.PathOf(self, g.via(self, a), a), now)
		st := migrate.StandingOf(&verdict)
		if st == migrate.Refused {
			if refusedAt < 0 {
				refusedAt = i
			}
			if line := fmt.Sprintf("site %s (%s): %s", a.Site, a.Jurisdiction, strings.Join(verdict.Reasons, ", ")); !said[[2]string{a.Site, line}] {
				said[[2]string{a.Site, line}] = true
				whys = append(whys, why{a.Site, line})
			}
			continue
		}
		reason := g.unreached(a)
		if reason == "" {
			if st < bestStanding {
				best, bestStanding = i, st
			}
			if st == migrate.ByRule {
				break // the least loaded of the best standing
			}
			continue
		}
		unreachedWhy = cmp.Or(unreachedWhy, reason)
		if !said[[2]string{a.Site, reason}] { // the first of its site named
			said[[2]string{a.Site, reason}] = true
			whys = append(whys, why{"", fmt.Sprintf("%s (site %s) is not reached: %s", a.Node, a.Site, reason)})
		}
	}
	if best >= 0 {
		return &matched[best], nil, nil
	}
	for _, w := range whys {
		// The refusal of the one tried says its own site's reasons.
		if refusedAt < 0 || w.site != matched[refusedAt].site() {
			alsoRefused = append(alsoRefused, w.line)
		}
	}
	switch {
	case refusedAt >= 0:
		return &matched[refusedAt], alsoRefused, nil
	case matched[0].node() == to:
		return nil, nil, fmt.Errorf("%s (site %s) is not reached from this gateway, so a migration to it could not connect: %s; send it to a gateway this one reaches (skybridge status says which sites it has no tunnel to, and why)",
			to, matched[0].site(), unreachedWhy)
	}
	return nil, nil, fmt.Errorf("no gateway matching %q is reached from this gateway, so a migration there could not connect: %s; send it to a gateway this one reaches (skybridge status says which sites it has no tunnel to, and why)", to, strings.Join(alsoRefused, "; "))
}

// Migration returns a migration's record (and live progress if running).
func (g *Gateway) Migration(id string) (*migrate.SendRecord, *migrate.Progress, error) {
	return g.mig.lookup(id)
}

// CancelMigration stops a running migration; it can be resumed later.
func (g *Gateway) CancelMigration(id string) error {
	g.mig.mu.Lock()
	run := g.mig.running[id]
	g.mig.mu.Unlock()
	if run == nil {
		return fmt.Errorf("migration %s is not running", id)
	}
	run.cancel()
	<-run.done
	return nil
}

// migrationsRunning counts the migrations this gateway sends and receives.
// migrationsRunning counts the migrations sent and received, and of
// those sent the ones waiting for the receiver's answer to their offer.
func (g *Gateway) migrationsRunning() (send, awaiting, recv int) {
	if g.mig == nil {
		return 0, 0, 0
	}
	g.mig.mu.Lock()
	running := slices.Collect(maps.Values(g.mig.running))
	g.mig.mu.Unlock()
	for _, r := range running {
		r.mu.Lock()
		if r.last.Phase == "offered" && !r.ended {
			awaiting++
		}
		r.mu.Unlock()
	}
	return len(running), awaiting, len(g.mig.recv.Active())
}

// MigrationList is what `skybridge migrate list` shows.
type MigrationList struct {
	Sending   []migrate.SendRecord `json:"sending"`
	Receiving []migrate.Incoming   `json:"receiving"`
	Images    []StoredImage        `json:"images"`
}

// Migrations lists sent migrations, migrations being received and stored
// images.
func (g *Gateway) Migrations() (*MigrationList, error) {
	sends, err := g.mig.sends()
	if err != nil {
		return nil, err
	}
	imgs, err := g.storedImages()
	if err != nil {
		return nil, err
	}
	g.mig.live(sends)
	recv, err := g.mig.recv.Unfinished()
	if err != nil {
		return nil, err
	}
	return &MigrationList{Sending: sends, Receiving: recv, Images: imgs}, nil
}

// live puts in each record of a migration running now its progress so
// far, in place of what its record holds (nothing yet, or a resumed one's
// last attempt), and returns the running ones' phases by index.
func (m *migrations) live(sends []migrate.SendRecord) map[int]string {
	m.mu.Lock()
	running := make(map[string]*runningMigration, len(m.running))
	maps.Copy(running, m.running)
	m.mu.Unlock()
	phases := map[int]string{}
	for i := range sends {
		r := running[sends[i].ID]
		if r == nil {
			continue
		}
		r.mu.Lock()
		p := r.last
		r.mu.Unlock()
		// The list is read when a migration begins, which may be before
		// a resume's record is: not its last attempt's end.
		sends[i].State, sends[i].Error, sends[i].Reasons, sends[i].Stats = migrate.StateRunning, "", nil, p.Stats
		phases[i] = p.Phase
	}
	return phases
}

// VerifyImage re-proves a stored image against its recorded root.
func (g *Gateway) VerifyImage(ctx context.Context, name string) (*migrate.VerifyReport, error) {
	rec, err := g.mig.journal.Image(name)
	if errors.Is(err, migrate.ErrNotFound) {
		return nil, fmt.Errorf("no stored image %q on this gateway: an image is stored by the gateway it was migrated to (skybridge migrate list there)", name)
	} else if err != nil {
		return nil, fmt.Errorf("image %q: %w", name, err)
	}
	return migrate.VerifyImage(ctx, rec)
}
