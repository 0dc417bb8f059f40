package mesh

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/throttle"
	"github.com/skybridge-mesh/skybridge/policy"
)

// Gateway is one running skybridge gateway.
type Gateway struct {
	s     *Settings
	log   *slog.Logger
	now   func() time.Time
	state stateDir

	prov    *certs.Provider
	id      atomic.Pointer[certs.NodeIdentity]
	trust   atomic.Pointer[certs.TrustBundle]
	trustMu sync.Mutex // serialises adoptTrust and adoptLists
	// trustAsked is when the issuer was asked for the answer in force.
	trustAsked time.Time
	// warnInbox says when a full inbox is worth logging again: anyone
	// holding the gossip key can fill it.
	warnInbox throttle.PerSecond
	// sendsQueued counts goSend's sends waiting or under way.
	sendsQueued atomic.Int64
	// sent is each peer's transmit counter as last read (by a reconcile
	// or a status), and when it last grew (noteSent).
	sentMu sync.Mutex
	sent   map[certs.WGPublicKey]sentMark
	// policyMu serialises AdoptPolicy: gossip and the control socket
	// adopt concurrently, and an older policy stored after a newer one
	// would replace it in memory, on disk and in the gossip queue.
	policyMu sync.Mutex
	// withdrawn is the newest policy that was in force and gave way
	// because its signer was revoked (guarded by policyMu, kept in the
	// state directory): no version up to it may come back by gossip or
	// publish, or a replay of an older, laxer one the mesh had moved past
	// would take its place.
	withdrawn withdrawnPolicy

	wgMu    sync.Mutex // guards wgKey and wgNext, which a rotation changes
	wgKey   certs.WGPrivateKey
	wgNext  certs.WGPrivateKey // zero unless a rotation has advertised it
	keyring *memberlist.Keyring
	// keyringMu is held while the live keyring changes and the change is
	// stored (applyKeyringOp), by catchUpKeyring around its check and
	// adoption, and by joinUnderAnyKey around each swap of its primary,
	// never across the join itself.
	keyringMu sync.Mutex
	keyTrial  *keyTrial // a join's trial of another key (guarded by keyringMu)
	dev       Device

	ml      *memberlist.Memberlist
	gossip  *gossipTransport
	traffic gossipTraffic // counted by the gossip transport
	queue   *memberlist.TransmitLimitedQueue
	members *membership
	policy  atomic.Pointer[adoptedPolicy]
	advert  atomic.Pointer[[]byte]
	self    atomic.Pointer[Node]
	// advertBy is the identity that signed advert, and formerID the one
	// that signed the adverts before the last certificate change, for a
	// while (leave.go): peers check what this gateway signs against the
	// certificate its advert named when it reached them.
	advertBy atomic.Pointer[certs.NodeIdentity]
	formerID atomic.Pointer[formerIdentity]

	inbox chan []byte // gossip messages, from the wire: the quick ones (enqueue)
	bulk  chan []byte // and the blobs and the large ones
	// inboxBytes is what inbox and bulk hold, bounded (maxInboxBytes).
	inboxBytes atomic.Int64
	// fetch names members whose certificates the worker should ask for:
	// a channel of its own, so that nothing from the wire can pose as a
	// job of ours.
	fetch chan string
	kick  chan struct{}
	sends chan struct{} // semaphore of sendAsync

	opt     options
	joined  chan struct{} // closed once the first join (to the seeds) returned
	crashed atomic.Bool   // stopped without leaving (tests and benchmarks)
	leaving atomic.Bool   // Run is stopping: no more news to gossip
	// issuerAnswered is the Unix time of the issuer's last answer to
	// refreshTrust (0: none yet), for the metric; lists Vault serves
	// without a login, while it refuses the gateway's, are no answer.
	issuerAnswered atomic.Int64
	// runCtx is Run's context, for work the worker does on its behalf
	// (a keyring write to Vault) that must not hold up a stop.
	runCtx context.Context
	// afterRotationStep, in tests, runs after each step of a gossip key
	// rotation this gateway starts.
	afterRotationStep func(step string)

	// Owned by the reconcile loop.
	lastApplied map[certs.WGPublicKey]PeerConfig
	// routeConflicts: the routes last left out because the host routes
	// them itself (leaveOutHostRoutes), to say so only when they change.
	routeConflicts string
	heldRoutes     string                         // Plan.Held as last logged
	greetings      map[certs.WGPublicKey]greeting // new peers we are handshaking with (greet.go)
	greetTimer     *time.Timer                    // wakes the reconcile loop when a greeting is due
	savedAt        time.Time                      // members last written to the state directory
	savedGen       uint64                         // the membership generation then
	savePending    atomic.Bool                    // a pass to save a newer membership is scheduled
	planKey        planKey                        // the inputs of the last plan applied
	links          LinkMemo                       // residency decisions of the last plan
	plan           atomic.Pointer[Plan]
	// held is the plan's held routes as applied: less those the host
	// routes itself (status shows these).
	held  atomic.Pointer[map[string][]netip.Prefix]
	stats reconcileStats

	// Owned by the worker.
	certAsked    map[string]time.Time
	blobAsked    map[string]time.Time // by member and kind: when we last asked, or will
	blobAnswered map[string]time.Time // by requester and kind: when we last answered, or will

	metrics      *metrics
	graph        graphCache
	operatorAddr atomic.Pointer[net.Addr]
	operator     atomic.Pointer[operator] // the endpoint's, while it runs (tests reach its sessions)
	operatorTok  atomic.Pointer[string]
	wgRotation   sync.Mutex                      // one WireGuard key rotation at a time
	wgRotated    atomic.Int64                    // last WireGuard key rotation, Unix ns (0: not known yet)
	advertMu     sync.Mutex                      // serialises signAdvert
	wgProofs     map[wgProofKey]certs.WGProof    // under advertMu: proofs of our WireGuard keys, per certificate
	down         atomic.Pointer[map[string]bool] // gateways our data plane does not reach (health.go)
	healthGen    atomic.Uint64                   // counts changes of down
	wgAck        atomic.Pointer[wgAckWaiter]
	nextAcked    map[certs.WGPublicKey]time.Time // owned by the reconcile loop: when each peer's next key was last acknowledged
	// dropWGAcks: tests lose this many next-key acknowledgements on
	// arrival, as the network may.
	dropWGAcks  atomic.Int32
	mig         *migrations
	load        atomic.Uint32 // migrations being received, advertised
	readvertise chan struct{}

	enroll      *enrollment   // the burst sites we enrol (CA-holding gateways only)
	burst       *Enrollment   // how we joined, if we are a burst gateway
	revokedSelf chan struct{} // closed when a burst gateway sees its own certificate revoked
	// renewNow asks the renewal loop to renew at once; newCA is what
	// refreshTrust knows of an issuer that signs with a new CA.
	renewNow    chan struct{}
	newCA       issuerRotation
	revokedOnce sync.Once

	started  time.Time
	stopOnce sync.Once
	rotation sync.Mutex // one gossip key rotation at a time
	acks     chan keyringAck
	ops      opLog // keyring operations seen, against replays
}

type adoptedPolicy struct {
	p   *policy.Policy
	src []byte
	sig []byte
	// untrusted: its signer was revoked since, and nothing trusted could
	// take its place (recheckPolicy).
	untrusted bool
}

type reconcileStats struct {
	mu        sync.Mutex
	runs      int
	errors    int
	lastError string
	last      time.Time
	duration  time.Duration
}

// New prepares a gateway: identity, secrets, trust, policy, WireGuard
// device, and the members remembered from the last run (so that a restart
// during a partition keeps their tunnels). Run starts the gossip.
func New(ctx context.Context, s *Settings, logger *slog.Logger) (*Gateway, error) {
	return newGateway(ctx, s, logger, options{})
}

// options let many gateways run in one process (the scale benchmark) or
// with a device that only records (tests). A gateway run by
// `skybridge gateway run` uses none of them.
type options struct {
	device       Device                   // use this instead of opening one
	noControl    bool                     // no control socket
	noMigrations bool                     // no migration journal, receiver or sender
	cache        *certs.VerifyCache       // share verified adverts across gateways
	tune         func(*memberlist.Config) // adjust memberlist after the profile
}

func newGateway(ctx context.Context, s *Settings, logger *slog.Logger, opt options) (*Gateway, error) {
	if logger == nil {
		logger = slog.Default()
	}
	g, err := openGateway(ctx, s, logger, opt)
	if err != nil {
		return nil, endedWhileOff(s, opt, logger, err)
	}
	return g, nil
}

// openGateway is newGateway but for what a burst's end found at the start
// leaves to clean up.
func openGateway(ctx context.Context, s *Settings, logger *slog.Logger, opt options) (*Gateway, error) {
	if err := os.MkdirAll(s.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	s, enr, err := applyEnrollment(s)
	if err != nil {
		return nil, err
	}
	g := &Gateway{
		s: s, now: time.Now, state: stateDir(s.StateDir), opt: opt,
		inbox: make(chan []byte, inboxSize), bulk: make(chan []byte, bulkSize), fetch: make(chan string, inboxSize), kick: make(chan struct{}, 1), sends: make(chan struct{}, maxSends),
		lastApplied: map[certs.WGPublicKey]PeerConfig{}, greetings: map[certs.WGPublicKey]greeting{}, certAsked: map[string]time.Time{},
		blobAsked: map[string]time.Time{}, blobAnswered: map[string]time.Time{}, nextAcked: map[certs.WGPublicKey]time.Time{},
		started: time.Now(), acks: make(chan keyringAck, 1024), readvertise: make(chan struct{}, 1),
		joined: make(chan struct{}), revokedSelf: make(chan struct{}), renewNow: make(chan struct{}, 1), burst: enr,
	}
	// A gateway restarted while Vault is down carries on with what it
	// kept on disk, as a running one rides out the outage.
	if err := g.vaultBurstEnded(); err != nil {
		return nil, err
	}
	idCfg := s.Identity
	idCfg.RideOutOutage = true
	prov, err := certs.Open(ctx, idCfg, logger)
	if enr != nil && enr.Vault != nil && errors.Is(err, certs.ErrVaultLoginRefused) {
		// Vault admitted it and now refuses its SecretID: the burst was
		// taken down while it was off, and the list that revokes it
		// never reached it. What it holds goes, as at any burst's end.
		ended := &BurstEndedError{Site: enr.Site, Node: enr.Node, Reason: "Vault refuses its login: the burst was taken down while this gateway was off (" + err.Error() + ")"}
		g.forgetBurst(ended)
		return nil, ended
	}
	if err != nil {
		return nil, fmt.Errorf("identity back end: %w", err)
	}
	g.prov = prov
	tb, err := prov.Trust(ctx)
	if err != nil {
		prov.Close()
		return nil, err
	}
	attrs, err := g.nodeAttributes(tb)
	if err != nil {
		prov.Close()
		return nil, err
	}
	g.log = logger.With("node", attrs.Node, "site", attrs.Site)
	id, tb, err := prov.Identity(ctx, attrs)
	if err != nil {
		prov.Close()
		return nil, err
	}
	g.id.Store(id)
	g.trust.Store(tb)
	if err := g.loadSecrets(ctx); err != nil {
		prov.Close()
		return nil, err
	}
	g.metrics = newMetrics(g)
	g.members = newMembership(attrs.Node, tb, g.now, g.triggerReconcile)
	g.members.onRefuse = func(name, reason string, err error) {
		g.metrics.rejected(reason)
		g.log.Warn("gateway refused", "peer", name, "reason", reason, "err", err)
	}
	if opt.cache != nil {
		g.members.cache = opt.cache
	}
	if err := g.loadPolicies(); err != nil {
		prov.Close()
		return nil, err
	}
	if err := g.openEnrollment(); err != nil {
		prov.Close()
		return nil, err
	}
	if err := g.signAdvert(); err != nil {
		prov.Close()
		return nil, err
	}
	// A key rotation adds the next key to the advert, and load a figure:
	// too large for gossip is better found out now than at the first
	// scheduled rotation under load.
	if n, err := certs.LargestSize(*g.advert.Load()); err != nil || n > certs.MaxAdvertSize {
		prov.Close()
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("our advert can reach %d bytes (during a WireGuard key rotation, under load), more than the %d gossip carries: advertise fewer endpoints or routes, or use shorter names", n, certs.MaxAdvertSize)
	}
	if g.dev = opt.device; g.dev == nil {
		g.dev, err = OpenDevice(DeviceOptions{
			Name: s.Interface, Mode: s.Mode, Port: s.Port, MTU: s.MTU, PrivateKey: g.wgKey,
			Overlay: attrs.OverlayIP, MeshPrefix: tb.MeshPrefix(), Log: g.log,
		})
		if err != nil {
			prov.Close()
			return nil, err
		}
	}
	g.warnForwarding(tb.MeshPrefix(), attrs.Routes)
	if !opt.noMigrations {
		if err := g.openMigrations(); err != nil {
			g.routesAtStop(false) // an adopted interface's, as at a stop
			g.closeDevice()
			prov.Close()
			return nil, err
		}
	}
	g.restoreMembers()
	g.reconcile()
	return g, nil
}

func (g *Gateway) loadSecrets(ctx context.Context) error {
	sec := g.prov.Secrets()
	k, err := sec.WireGuardKey(ctx, g.id.Load().Attributes().Node)
	if err != nil {
		return fmt.Errorf("WireGuard key: %w", err)
	}
	g.wgKey = k
	kr, err := sec.GossipKeyring(ctx)
	if err != nil {
		return fmt.Errorf("gossip keyring: %w", err)
	}
	keys := kr.Keys()
	g.keyring, err = memberlist.NewKeyring(keys, keys[0])
	if err != nil {
		return fmt.Errorf("gossip keyring: %w", err)
	}
	return nil
}

// signAdvert makes and signs our advert with a fresh version.
func (g *Gateway) signAdvert() error {
	// One at a time: two signers could otherwise store their adverts in
	// the opposite order of their versions, and peers would refuse the
	// older-versioned one that ended up current as a replay.
	g.advertMu.Lock()
	defer g.advertMu.Unlock()
	if g.leaving.Load() && g.self.Load() != nil {
		// Our leave notice names the last version; a newer one would
		// void it.
		return nil
	}
	id := g.id.Load()
	a := id.Attributes()
	var last uint64
	if self := g.self.Load(); self != nil {
		last = self.Advert.Version
	}
	v, warn := g.state.nextAdvertVersion(uint64(g.now().UnixMilli()), last)
	if warn != nil {
		g.log.Warn("advert version not kept; the clock keeps versions rising", "version", v, "err", warn)
	}
	cur, next := g.wgKeys()
	ad := &certs.Advert{
		Version: v, Timestamp: g.now(),
		Node: a.Node, Site: a.Site, Region: a.Region, Provider: a.Provider, Jurisdiction: a.Jurisdiction,
		OverlayIP: a.OverlayIP, Routes: a.Routes, WireGuardKey: cur.Public(), Endpoints: g.s.Endpoints,
		Load: g.load.Load(),
	}
	var err error
	if ad.WireGuardKeyProof, err = g.wgProof(cur, id.Fingerprint()); err != nil {
		return err
	}
	if !next.IsZero() {
		ad.NextWireGuardKey = next.Public()
	}
	raw, err := certs.SignAdvert(ad, id)
	if err != nil {
		return err
	}
	if by := g.advertBy.Load(); by != nil && by != id {
		g.formerID.Store(&formerIdentity{id: by, until: g.now().Add(formerIdentityFor)})
	}
	g.advertBy.Store(id)
	g.advert.Store(&raw)
	g.self.Store(&Node{Attributes: a, Advert: *ad})
	return nil
}

type wgProofKey struct {
	key  certs.WGPublicKey
	cert [32]byte
}

// wgProof proves that we hold k, for the certificate certHash. A proof is
// made once per key and certificate and kept: peers then verify it once,
// not with every advert (certs.VerifyCache).
func (g *Gateway) wgProof(k certs.WGPrivateKey, certHash [32]byte) (certs.WGProof, error) {
	pk := wgProofKey{k.Public(), certHash}
	if p, ok := g.wgProofs[pk]; ok {
		return p, nil
	}
	p, err := certs.ProveWGKey(k, certHash)
	if err != nil {
		return p, err
	}
	if len(g.wgProofs) >= 4 { // keys and certificates change seldom
		clear(g.wgProofs)
	}
	if g.wgProofs == nil {
		g.wgProofs = map[wgProofKey]certs.WGProof{}
	}
	g.wgProofs[pk] = p
	return p, nil
}

// Run joins the gossip and keeps the WireGuard configuration in line with
// the verified membership until ctx ends, then leaves the cluster, removes
// the interface and keeps the state.
func (g *Gateway) Run(parent context.Context) error {
	// A burst gateway's run also ends when its site does (cause
	// *BurstEndedError).
	ctx, stop := context.WithCancelCause(parent)
	defer stop(nil)
	g.runCtx = ctx
	// What start-up has set up, undone in reverse if a later step fails.
	// The routes the first reconcile put into the device are held, as
	// at a stop, rather than dropped with it.
	undo := []func(){g.prov.Close, g.closeDevice, func() { g.routesAtStop(false) }, g.stopMigrations}
	fail := func(err error) error {
		stop(err) // what has started ends with the context
		for _, u := range slices.Backward(undo) {
			u()
		}
		return err
	}
	if err := g.startGossip(); err != nil {
		return fail(err)
	}
	undo = append(undo, func() { g.ml.Shutdown() })
	var ctl io.Closer = closerFunc(func() error { return nil })
	if !g.opt.noControl {
		c, err := g.serveControl()
		if err != nil {
			return fail(err)
		}
		ctl = c
	}
	undo = append(undo, func() { ctl.Close() })
	opEndpoint, err := g.serveOperator(ctx)
	if err != nil {
		return fail(err)
	}
	undo = append(undo, func() { opEndpoint.Close() })
	enrollEndpoint, err := g.serveEnrollment(ctx)
	if err != nil {
		return fail(err)
	}
	undo = append(undo, func() { enrollEndpoint.Close() })
	if g.mig != nil {
		if err := g.serveMigrations(ctx); err != nil {
			return fail(err)
		}
	}
	g.log.Info("gateway running", "interface", g.dev.Name(), "mode", g.dev.Mode(), "gossip", g.s.GossipAdvertise.String(),
		"overlay_ip", g.id.Load().Attributes().OverlayIP.String(), "policy", g.policyRevision())

	var wg sync.WaitGroup
	loop := func(f func(context.Context)) { wg.Go(func() { f(ctx) }) }
	loop(g.reconcileLoop)
	loop(g.worker)
	loop(g.maintain)
	loop(g.advertiseLoad)
	loop(g.rotateOnSchedule)
	loop(g.burstLoop)
	loop(g.refreshTrust)
	loop(g.catchUpKeyring)
	if g.burst != nil {
		loop(func(ctx context.Context) { g.watchBurst(ctx, stop) })
	}
	if g.s.Topology != TopologyHub {
		loop(g.healthLoop) // hubs are chosen from the membership alone
	}
	if g.mig != nil {
		loop(g.residencyLoop)
		loop(g.journalLoop)
	}
	// A burst gateway's certificate lasts exactly as long as its burst.
	if g.prov.CanRenew() && g.burst == nil {
		loop(func(ctx context.Context) {
			if err := g.prov.KeepRenewed(ctx, g.id.Load(), g.renewNow, g.renewed); ctx.Err() == nil {
				g.log.Error("certificate renewal stopped", "err", err)
			}
		})
	}
	// Beside the rest: memberlist's join cannot be cancelled, and a stop
	// must not wait for seeds that do not answer.
	wg.Go(func() {
		g.joinSeeds(g.s.Seeds)
		close(g.joined)
	})
	<-ctx.Done()

	g.leaving.Store(true)
	if !g.crashed.Load() {
		g.log.Info("gateway stopping: leaving the cluster")
		g.announceLeaving()
		if err := g.ml.Leave(3 * time.Second); err != nil {
			g.log.Warn("leave", "err", err)
		}
	}
	g.gossip.abortStreams() // left: joins and exchanges under way end now
	enrollEndpoint.Close()
	opEndpoint.Close()
	g.cancelSends() // before the control socket closes: their clients get the final record
	ctl.Close()
	wg.Wait()
	// A rotation asked for over the control socket may be past its
	// durable point, where no cancellation stops it: the gossip, the
	// device and, at a burst's end, the key in Vault stay until it has
	// switched the key, and no other starts.
	g.wgRotation.Lock()
	defer g.wgRotation.Unlock()
	g.ml.Shutdown()
	g.stopMigrations()
	g.saveMembers()
	var ended *BurstEndedError
	retired := errors.As(context.Cause(ctx), &ended)
	g.routesAtStop(retired)
	g.closeDevice()
	if retired {
		// With Vault, our WireGuard key lives there: delete it while our
		// login still works.
		if d, ok := g.prov.Secrets().(interface {
			DeleteWireGuardKey(context.Context, string) error
		}); ok {
			dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := d.DeleteWireGuardKey(dctx, g.id.Load().Attributes().Node); err != nil {
				g.log.Info("could not delete our WireGuard key from vault (after burst down, burst down deletes it)", "err", err)
			}
			cancel()
		}
		g.prov.Close()
		if r, ok := g.prov.Secrets().(interface{ RevokeLogin(context.Context) error }); ok {
			rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := r.RevokeLogin(rctx); err != nil {
				g.log.Info("could not revoke our vault token (it ends with the burst)", "err", err)
			}
			cancel()
		}
		g.forgetBurst(ended)
		return ended
	}
	g.prov.Close()
	return nil
}

// stopMigrations cancels the migrations we send (they resume later),
// waits for the receiver to have stopped, and closes the journal.
func (g *Gateway) stopMigrations() {
	if g.mig == nil {
		return
	}
	g.cancelSends()
	if g.mig.served != nil { // it ends with Run's context
		<-g.mig.served
	}
	g.mig.journal.Close()
}

// cancelSends cancels the migrations we send, and waits for them to end.
func (g *Gateway) cancelSends() {
	if g.mig == nil {
		return
	}
	g.mig.mu.Lock()
	runs := make([]*runningMigration, 0, len(g.mig.running))
	for _, r := range g.mig.running {
		runs = append(runs, r)
	}
	g.mig.mu.Unlock()
	// All cancelled, then all waited for: one that has committed waits
	// for its receiver's answer (commitGrace), and those would add up.
	for _, r := range runs {
		r.cancel()
	}
	for _, r := range runs {
		<-r.done
	}
}

// advertiseLoad re-signs and re-gossips the advert when the load changes,
// at most every two seconds.
func (g *Gateway) advertiseLoad(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.readvertise:
		}
		if err := g.advertiseNow(); err != nil {
			g.log.Error("re-sign advert", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
}

// crash stops gossip at once, without a leave, as a killed gateway would.
func (g *Gateway) crash() {
	g.crashed.Store(true)
	g.ml.Shutdown()
}

// routesAtStop holds every route into the device, unreachable, while the
// gateway is down (a restart, maintenance, a crash of the gateway
// excepted): the device's own routes go with it, and the host would send
// the mesh's traffic by its other routes, its default route, in clear.
// The next start takes them over (RouteTable.Held). A gateway that
// leaves the mesh for good (a burst's end) frees them all instead.
func (g *Gateway) routesAtStop(retired bool) {
	table, err := g.dev.Routes()
	if err != nil {
		g.log.Warn("read the routes at stop", "err", err)
		return
	}
	// Removed too, not left ahead of the held ones: a persistent TUN's
	// outlive the gateway, and would swallow the traffic in silence.
	c := RouteChange{Hold: table.Own, Del: table.Own}
	if retired {
		c = RouteChange{Del: table.Own, Unhold: table.Held}
	}
	if len(c.Hold)+len(c.Del)+len(c.Unhold) == 0 {
		return
	}
	if err := g.dev.SetRoutes(c); err != nil {
		g.log.Warn("routes at stop", "err", err)
		return
	}
	if !retired {
		g.log.Info("the mesh's routes are held while this gateway is down: traffic to its sites is refused, not sent by the host's other routes; the next start takes them over (ip route flush proto 91 removes them)",
			"routes", len(table.Own)+len(table.Held))
	}
}

// endedWhileOff frees the routes a burst gateway held at its last stop
// when its burst turns out to have ended meanwhile: it will not start
// again to free them. It returns err.
func endedWhileOff(s *Settings, opt options, log *slog.Logger, err error) error {
	var ended *BurstEndedError
	if !errors.As(err, &ended) || opt.device != nil || s.Mode == ModeNetstack {
		return err
	}
	lc := &linkConfig{name: s.Interface}
	table, rerr := lc.routes()
	if rerr == nil && len(table.Held) > 0 {
		rerr = lc.setRoutes(RouteChange{Unhold: table.Held})
	}
	if rerr != nil {
		log.Warn("could not free the routes this gateway held at its last stop (ip route flush proto 91 removes them)", "err", rerr)
	}
	return err
}

func (g *Gateway) closeDevice() {
	g.stopOnce.Do(func() {
		if err := g.dev.Close(); err != nil {
			g.log.Warn("close WireGuard device", "err", err)
		}
	})
}

func (g *Gateway) startGossip() error {
	var cfg *memberlist.Config
	switch g.s.GossipProfile {
	case "wan":
		cfg = memberlist.DefaultWANConfig()
	case "local":
		cfg = memberlist.DefaultLocalConfig()
	default:
		cfg = memberlist.DefaultLANConfig()
		tuneLAN(cfg)
	}
	a := g.id.Load().Attributes()
	cfg.Name = a.Node
	cfg.BindAddr = g.s.GossipBind.Addr().String()
	cfg.BindPort = int(g.s.GossipBind.Port())
	cfg.AdvertiseAddr = g.s.GossipAdvertise.Addr().String()
	cfg.AdvertisePort = int(g.s.GossipAdvertise.Port())
	cfg.Keyring = g.keyring
	cfg.SecretKey = nil
	cfg.GossipVerifyIncoming, cfg.GossipVerifyOutgoing = true, true
	// Adverts are mostly keys and signatures: compressing them saves
	// little, and memberlist's LZW allocates a 16 KiB table per packet,
	// which was the largest cost of gossip in a 300-gateway mesh.
	cfg.EnableCompression = false
	d := delegate{g}
	cfg.Delegate, cfg.Events, cfg.Alive = d, d, d
	cfg.Logger = log.New(&gossipLog{slogWriter: slogWriter{g.log}}, "", 0)
	if g.opt.tune != nil {
		g.opt.tune(cfg)
	}
	t, err := newGossipTransport(g.s.GossipBind, g.log, &g.traffic, g.members.gossipsFrom)
	if err != nil {
		return fmt.Errorf("start gossip: %w", err)
	}
	cfg.Transport = t
	g.gossip = t
	ml, err := memberlist.Create(cfg)
	if err != nil {
		cfg.Transport.Shutdown()
		return fmt.Errorf("start gossip on %s: %w", g.s.GossipBind, err)
	}
	g.ml = ml
	g.queue = &memberlist.TransmitLimitedQueue{NumNodes: ml.NumMembers, RetransmitMult: cfg.RetransmitMult}
	return nil
}

// tuneLAN tightens memberlist's LAN timings so that a crashed gateway
// leaves every WireGuard configuration within seconds: 1.8-3.2 s at 10-100
// gateways in docs/BENCHMARKS.md (larger meshes could not be simulated in
// one 2-core process and are unmeasured). With the defaults a crash takes
// 10-20 s to be declared: a probe a second, then a suspicion that waits
// SuspicionMult·log10(N) probe intervals, stretched up to six-fold until
// enough members confirm it. Here a gateway probes twice a second, needs
// no confirmations (the suspect itself has the whole suspicion timeout to
// refute a false accusation), and news spreads every 100 ms to 4 members,
// which reaches 1,000 members in about 5 rounds. The price is sensitivity
// to starved CPUs: a gateway that cannot answer a probe within 400 ms is
// suspected.
func tuneLAN(cfg *memberlist.Config) {
	cfg.ProbeInterval = 500 * time.Millisecond
	cfg.ProbeTimeout = 400 * time.Millisecond
	cfg.SuspicionMult = 2
	cfg.GossipInterval = 100 * time.Millisecond
	cfg.GossipNodes = 4
	// Anti-entropy twice as often as memberlist's LAN default: our state
	// per member is one small advert, and memberlist scales the interval
	// up with the mesh's size anyway (×3 at 100 members, ×6 at 1,000).
	cfg.PushPullInterval = 15 * time.Second
}

// join knocks on addresses; failures are normal during a partition.
func (g *Gateway) join(addrs []string) {
	if len(addrs) == 0 {
		return
	}
	n, err := g.joinUnderAnyKey(addrs)
	if err != nil && n == 0 {
		g.log.Debug("join found nobody", "addrs", addrs, "err", err)
		return
	}
	g.log.Debug("joined", "contacted", n, "addrs", addrs)
}

// joinSeeds joins through one seed, tried in random order: one push/pull
// brings the whole membership, and if every newcomer exchanged state with
// every seed, the seeds of a large mesh would do little else.
func (g *Gateway) joinSeeds(seeds []string) {
	// A seed that is ourselves would "succeed" (memberlist answers its own
	// push/pull) and leave us an island until the next rejoin round.
	seeds = slices.DeleteFunc(slices.Clone(seeds), func(s string) bool {
		ap, err := parseAddrPort(s, DefaultGossipPort)
		return err == nil && (ap == g.s.GossipAdvertise || ap == g.s.GossipBind)
	})
	for _, i := range rand.Perm(len(seeds)) {
		if n, err := g.joinUnderAnyKey(seeds[i : i+1]); err == nil && n > 0 {
			g.log.Debug("joined", "seed", seeds[i])
			return
		}
	}
	if len(seeds) > 0 && !g.leaving.Load() {
		// Alone until one answers: wrong seeds or gossip key, a firewall.
		g.log.Warn("no seed answered; this gateway is alone until one does (retrying in the background)", "seeds", seeds)
	}
}

func (g *Gateway) triggerReconcile() {
	select {
	case g.kick <- struct{}{}:
	default:
	}
}

// fetchCert has the worker ask a member for its certificate; a job
// dropped here is asked for again by the pending sweep.
func (g *Gateway) fetchCert(name string) {
	select {
	case g.fetch <- name:
	default:
	}
}

// memberUp records a joined or updated member and fetches its certificate
// if we lack it.
func (g *Gateway) memberUp(n *memberlist.Node) {
	if g.members.update(n.Name, nodeAddr(n), n.Meta) {
		g.fetchCert(n.Name)
	}
}

func (g *Gateway) reconcileLoop(ctx context.Context) {
	t := time.NewTicker(reconcileInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.kick:
			// Coalesce a burst of membership events (a cluster joining,
			// a partition healing) into one pass, and never spend more
			// than about a tenth of the time reconciling: in a large mesh
			// that is still joining, events arrive faster than passes.
			g.stats.mu.Lock()
			wait := max(reconcileDebounce, 10*g.stats.duration)
			g.stats.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-time.After(min(wait, time.Second)):
			}
			select {
			case <-g.kick:
			default:
			}
		case <-t.C:
		}
		g.reconcile()
	}
}

// reconcile computes the plan from the verified membership and applies the
// difference to the device.
func (g *Gateway) reconcile() {
	start := time.Now()
	self := g.self.Load()
	pol := g.policy.Load()
	trust := g.trust.Load()
	now := g.now()
	// The plan is a pure function of these inputs (and of time only where
	// the policy has time windows): when none changed, the last plan
	// stands and this pass only repairs drift on the device. In a large
	// mesh that is most passes, and Compute is the costly part.
	key := planKey{gen: g.members.generation(), health: g.healthGen.Load(), self: self, policy: pol, trust: trust}
	var plan Plan
	if last := g.plan.Load(); last != nil && g.planKey == key && g.links.holds(now) {
		plan = *last
	} else {
		in := TopologyInput{Self: *self, Peers: g.members.gateways(), Mode: g.s.Topology, BehindNAT: g.s.BehindNAT, Now: now, MeshPrefix: trust.MeshPrefix(), Memo: &g.links, Down: g.downSet()}
		in.Away = g.members.away()
		if pol != nil {
			in.Policy = pol.p
		}
		plan = Compute(in)
	}
	err := g.apply(plan)
	g.stats.mu.Lock()
	g.stats.runs++
	g.stats.last, g.stats.duration = time.Now(), time.Since(start)
	if err != nil {
		g.stats.errors++
		g.stats.lastError = err.Error()
	}
	g.stats.mu.Unlock()
	g.metrics.reconciled(time.Since(start), err)
	if err != nil {
		g.log.Error("reconcile", "err", err)
		if _, partial := errors.AsType[*routesError](err); !partial {
			return
		}
	}
	g.plan.Store(&plan)
	g.planKey = key
	g.ackNextKeys(plan)
	if g.savedGen != key.gen {
		if wait := saveInterval - time.Since(g.savedAt); wait <= 0 {
			g.savedGen = key.gen
			g.saveMembers()
		} else if g.savePending.CompareAndSwap(false, true) {
			// Saved too recently: come back when it is due rather than at
			// the next periodic pass, so the file never lags long.
			time.AfterFunc(wait, func() {
				g.savePending.Store(false)
				g.triggerReconcile()
			})
		}
	}
}

// planKey identifies the inputs of a plan, but for time.
type planKey struct {
	gen    uint64
	health uint64
	self   *Node
	policy *adoptedPolicy
	trust  *certs.TrustBundle
}

func (g *Gateway) apply(plan Plan) error {
	dev, err := g.dev.Device()
	if err != nil {
		return fmt.Errorf("read %s: %w", g.dev.Name(), err)
	}
	// Read at every pass, so that when a tunnel last sent is known to
	// within a pass, not from whenever a status last looked.
	g.noteSent(dev.Peers)
	// A remote site's route to a network the host routes itself (one of
	// its LANs) is left out, of the kernel's table and of the peer's
	// allowed IPs: routed in, it would take the host's traffic there.
	// Asked at every pass: a LAN may come up after the gateway.
	table, err := g.dev.Routes()
	if err != nil {
		return err
	}
	var left []netip.Prefix
	plan.Peers, plan.Routes, left = leaveOutHostRoutes(plan.Peers, plan.Routes, table.Host)
	held := slices.DeleteFunc(plan.heldRoutes(), func(p netip.Prefix) bool {
		if table.Host[p] {
			left = append(left, p)
			return true
		}
		return false
	})
	if key := fmt.Sprint(left); key != g.routeConflicts {
		g.routeConflicts = key // said once, not at every pass
		if len(left) > 0 {
			g.log.Warn("routes left out: this host routes them itself (not through skybridge), so traffic to them does not go into the mesh; keep those networks out of the mesh, or remove the host's routes", "routes", left)
		}
	}
	peers, ch := DiffPeers(dev.Peers, plan.Peers, g.lastApplied)
	if len(peers) > 0 {
		if err := g.dev.Configure(wgtypes.Config{Peers: peers}); err != nil {
			return fmt.Errorf("configure %s: %w", g.dev.Name(), err)
		}
	}
	ch.RoutesAdded, ch.RoutesRemoved = DiffRoutes(table.Own, plan.Routes)
	ch.RoutesHeld, ch.RoutesFreed = DiffRoutes(table.Held, held)
	// A route that would not go in (IPv6 off on the link, a netlink
	// error) leaves the peers configured and every other route in place:
	// the pass is recorded as applied, and the next one tries the route
	// again, rather than every pass from then on stopping short of
	// recording the plan, acknowledging next keys and saving members.
	var routesErr error
	if err := g.dev.SetRoutes(RouteChange{Add: ch.RoutesAdded, Del: ch.RoutesRemoved, Hold: ch.RoutesHeld, Unhold: ch.RoutesFreed}); err != nil {
		routesErr = &routesError{err}
	}
	// Greeting only hastens a first handshake (WireGuard would start one
	// itself): its failure must not hold the configuration back.
	if err := g.greet(dev.Peers, peers, plan.Peers); err != nil {
		g.log.Warn("greet new peers", "err", err)
	}
	applied := make(map[certs.WGPublicKey]PeerConfig, len(plan.Peers))
	for _, p := range plan.Peers {
		applied[p.PublicKey] = p
	}
	g.lastApplied = applied
	if !ch.Empty() {
		g.log.Info("WireGuard configuration changed", "added", ch.Added, "removed", ch.Removed, "updated", ch.Updated,
			"routes_added", ch.RoutesAdded, "routes_removed", ch.RoutesRemoved, "routes_held", ch.RoutesHeld, "routes_freed", ch.RoutesFreed, "peers", len(plan.Peers))
	}
	for _, c := range plan.Conflicts {
		g.log.Warn("topology conflict", "detail", c)
	}
	shown := plan.Held
	if len(left) > 0 && len(shown) > 0 {
		shown = map[string][]netip.Prefix{}
		for s, ps := range plan.Held {
			if ps = slices.DeleteFunc(slices.Clone(ps), func(p netip.Prefix) bool { return table.Host[p] }); len(ps) > 0 {
				shown[s] = ps
			}
		}
	}
	g.held.Store(&shown)
	if key := fmt.Sprint(shown); key != g.heldRoutes {
		g.heldRoutes = key // said at each change, not at every pass
		for _, s := range sortedKeys(shown) {
			g.log.Warn("routes held: the site's gateways that routed them are away; traffic to them is refused here, not sent outside the mesh, until one is back or their certificates are revoked", "site", s, "routes", shown[s])
		}
	}
	return routesErr
}

// routesError is apply's error when only routes failed: the plan's peers
// are configured, and it stands as applied.
type routesError struct{ err error }

func (e *routesError) Error() string { return e.err.Error() }
func (e *routesError) Unwrap() error { return e.err }

// maintain heals partitions (knocks on seeds and known members that are
// not alive), fetches missing certificates, and re-judges members as time
// passes (expiry).
func (g *Gateway) maintain(ctx context.Context) {
	// The fetch tick also drives rejoining: every rejoinInterval, or every
	// tick while we are alone (just started before our seeds, or cut off).
	fetch := time.NewTicker(time.Second)
	refresh := time.NewTicker(30 * time.Second)
	defer fetch.Stop()
	defer refresh.Stop()
	lastJoin := time.Now()
	// A newcomer's one push/pull gets its seed's view, which may lack a
	// member the seed suspected at that instant (memberlist ignores
	// suspicions of strangers), and the member's refutation may have
	// finished spreading before we arrived: without help, such a member
	// stays unknown to us until periodic push/pull (up to minutes in a
	// large mesh). Two more exchanges with random members shortly after
	// starting close that gap.
	settle := []time.Duration{time.Second, 3 * time.Second}
	var rejoining atomic.Bool // a rejoin round is knocking
	var rejoins sync.WaitGroup
	defer rejoins.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-fetch.C:
			for _, name := range g.members.pending() {
				g.fetchCert(name)
			}
			if len(settle) > 0 && time.Since(lastJoin) >= settle[0] && g.ml.NumMembers() > 1 {
				settle = settle[1:]
				g.syncWithRandomMember()
			}
			if (g.ml.NumMembers() <= 1 || time.Since(lastJoin) >= rejoinInterval) && rejoining.CompareAndSwap(false, true) {
				lastJoin = time.Now()
				// On its own goroutine: memberlist dials the targets one
				// after the other, each up to its TCP timeout, and members
				// that are gone for good would hold up the certificate
				// sweep and the expiry refresh for as long.
				targets := g.rejoinTargets()
				rejoins.Go(func() {
					defer rejoining.Store(false)
					g.join(targets)
				})
			}
		case <-refresh.C:
			g.members.refresh()
		}
	}
}

// syncWithRandomMember exchanges full state (memberlist push/pull) with
// one live member other than ourselves.
//
// Addresses come from our membership, copied inside memberlist's
// callbacks: the nodes memberlist.Members returns point into its own
// state, which it goes on updating, so reading them races with it.
func (g *Gateway) syncWithRandomMember() {
	var others []string
	for _, m := range g.members.snapshot() {
		if m.Alive && m.Gossip.IsValid() {
			others = append(others, m.Gossip.String())
		}
	}
	if len(others) > 0 {
		i := rand.IntN(len(others))
		g.join(others[i : i+1])
	}
}

// rejoinTargets are up to rejoinFanout of the seeds and the members we
// verified once (from gossip or the state directory) that gossip does not
// currently count as alive: one seed if any is missing, the rest picked at
// random (a seed is where a lone gateway is most likely to find the mesh).
func (g *Gateway) rejoinTargets() []string {
	alive := map[string]bool{}
	members := g.members.snapshot()
	for _, m := range members {
		if m.Alive {
			alive[m.Gossip.String()] = true
		}
	}
	var out []string
	seen := map[string]bool{}
	add := func(a string) {
		// Not ourselves, by either address (as joinSeeds): behind NAT a
		// seed list shared by all names the bind address.
		if !alive[a] && !seen[a] && a != g.s.GossipAdvertise.String() && a != g.s.GossipBind.String() {
			seen[a] = true
			out = append(out, a)
		}
	}
	for _, s := range g.s.Seeds {
		if ap, err := parseAddrPort(s, DefaultGossipPort); err == nil {
			add(ap.String())
		}
	}
	seeds := len(out)
	for _, m := range members {
		// Not at an address only gossip named, for a member never
		// verified: anyone holding the gossip key names any.
		if m.State == StateDead && m.LastCert != nil || m.Remembered {
			add(m.Gossip.String())
		}
	}
	if len(out) <= rejoinFanout {
		return out
	}
	// One random missing seed first, then a random pick of the rest.
	if seeds > 0 {
		i := rand.IntN(seeds)
		out[0], out[i] = out[i], out[0]
	}
	rest := out[min(seeds, 1):]
	rand.Shuffle(len(rest), func(i, j int) { rest[i], rest[j] = rest[j], rest[i] })
	return out[:rejoinFanout]
}

// restoreMembers brings back the members verified and alive at the last
// save, so their tunnels are configured before gossip has even started,
// and those gone then as gone.
func (g *Gateway) restoreMembers() {
	saved, err := g.state.loadMembers()
	if err != nil {
		g.log.Warn("cannot restore members", "err", err)
		return
	}
	n := 0
	for _, m := range saved {
		if !m.Alive {
			g.members.rememberGone(m.Name, m.Gossip, m.Advert, m.Cert, m.Left)
			continue
		}
		if err := g.members.remember(m.Name, m.Gossip, m.Advert, m.Cert); err != nil {
			// Not a peer again (its certificate expired while we were
			// down, say): still a gateway its site misses, whose routes
			// stay held, until it is retired (rememberDead decides).
			g.log.Info("not restoring member as a peer; remembered as gone", "peer", m.Name, "err", err)
			g.members.rememberGone(m.Name, m.Gossip, m.Advert, m.Cert, false)
			continue
		}
		n++
	}
	if n > 0 {
		g.log.Info("restored members from the last run; their tunnels stay up while gossip reconnects", "members", n)
	}
}

func (g *Gateway) saveMembers() {
	var out []savedMember
	for _, m := range g.members.snapshot() {
		sm := savedMember{Name: m.Name, Gossip: m.Gossip}
		switch m.State {
		case StateVerified:
			sm.Alive, sm.Advert, sm.Cert = true, m.VerifiedMeta, m.Verified.Cert.Raw
		case StateDead:
			if m.LastCert == nil {
				continue // never verified: restored without a certificate, from an earlier release's save
			}
			sm.Cert, sm.Left = m.LastCert, m.Left // so that a restart can tell when it has ended, and that it is not missed
			sm.Advert = m.LastMeta                // and what a newer advert must outdo, and where
		case StateRefused:
			// Refused once verified (its certificate ran out while it
			// was here, say): restored as gone, its site missed and its
			// routes held until it is retired, as before the restart.
			if m.LastCert == nil {
				continue
			}
			sm.Cert, sm.Advert = m.LastCert, m.LastMeta
		default:
			continue
		}
		out = append(out, sm)
	}
	g.savedAt = time.Now()
	if err := g.state.saveMembers(out); err != nil {
		g.log.Warn("save members", "err", err)
	}
}

// renewed re-advertises a renewed identity: new certificate, new advert
// version, same WireGuard key, so tunnels do not drop.
func (g *Gateway) renewed(id *certs.NodeIdentity, tb *certs.TrustBundle) {
	g.id.Store(id)
	g.storedImagesAffected() // the site's attested labels may have changed
	if g.prov.Issuer() == nil {
		// Renewed through a CA-holding gateway: the bundle is the one kept
		// in the identity directory, whose CAs are not an issuer's answer.
		g.adoptLists(tb.CRLs())
	} else {
		g.adoptTrust(tb, time.Time{})
	}
	if s := tb.Signing(); s != nil && !tb.SignedBySigning(id.Certificate()) {
		g.log.Warn("the issuer renewed this gateway's certificate with a CA other than its default issuer: the PKI role pins an issuer (set its issuer_ref to \"default\" to follow rotations)",
			"issued_by", id.Certificate().Issuer.CommonName, "default_issuer", s.Subject.CommonName)
	}
	if err := g.advertiseNow(); err != nil {
		g.log.Error("re-sign advert after renewal", "err", err)
		return
	}
	g.log.Info("identity renewed and re-advertised", "identity", id)
}

// adoptTrust adopts the issuer's answer to a request made at asked: its
// CAs (an issuer rotated or retired) and, for each CA, the newer of its
// list and the one in force, so that a stale answer revokes nothing less.
// An answer to a request older than the one whose answer is in force
// gives its lists only: a refresh that overtook it may already have
// retired a CA it still names. (A renewal's bundle comes with a zero
// asked: its lists only, the CAs come from refreshTrust.)
func (g *Gateway) adoptTrust(tb *certs.TrustBundle, asked time.Time) bool {
	// Gossip, renewal, the issuer poll and burst ends all call this or
	// adoptLists: one at a time, so an older list never replaces a newer
	// one, nor an older answer a newer one's CAs.
	g.trustMu.Lock()
	defer g.trustMu.Unlock()
	if asked.Before(g.trustAsked) {
		return g.adoptListsLocked(tb.CRLs())
	}
	g.trustAsked = asked
	cur := g.trust.Load()
	next, changed := cur.Adopt(tb)
	if !changed {
		return false
	}
	g.switchTrustLocked(cur, next)
	return true
}

// adoptLists takes, of revocation lists gossip brought, each newer than
// the one in force for its CA. Gossip carries lists, never CAs: a list of
// a CA this gateway does not trust is passed over.
func (g *Gateway) adoptLists(crls []*x509.RevocationList) bool {
	g.trustMu.Lock()
	defer g.trustMu.Unlock()
	return g.adoptListsLocked(crls)
}

func (g *Gateway) adoptListsLocked(crls []*x509.RevocationList) bool {
	cur := g.trust.Load()
	next, took := cur.WithNewerCRLs(crls)
	if !took {
		return false
	}
	g.switchTrustLocked(cur, next)
	return true
}

// switchTrustLocked puts next in force in place of cur, under trustMu.
func (g *Gateway) switchTrustLocked(cur, next *certs.TrustBundle) {
	g.trust.Store(next)
	g.members.setTrust(next)
	if err := g.prov.SaveTrust(next); err != nil {
		g.log.Warn("save trust bundle", "err", err)
	}
	g.announce(blobCRL, next.CRLVersion(), nil)
	if names := caNames(next); !slices.Equal(names, caNames(cur)) {
		g.log.Info("trusted CAs changed", "cas", names, "was", caNames(cur))
	}
	revoked := 0
	for _, c := range next.CRLs() {
		revoked += len(c.RevokedCertificateEntries)
	}
	g.log.Info("adopted revocation list", "number", next.CRLVersion(), "revoked", revoked)
	if own := g.id.Load().Certificate(); next.IsRevoked(own.SerialNumber) {
		if g.burst != nil {
			g.revokedOnce.Do(func() { close(g.revokedSelf) })
		} else if !cur.IsRevoked(own.SerialNumber) {
			// The mesh refuses it from now on; said here too, or its
			// own operator sees peers that stay "verified" from this
			// side only.
			g.log.Error("this gateway's own certificate is revoked: the other gateways refuse it and drop their tunnels to it; give it a new identity (skybridge ca issue, or let its issuer renew it) and restart it",
				"serial", certs.FormatSerial(own.SerialNumber))
		}
	}
	g.recheckPolicy()
}

// caNames names a bundle's CAs for people: subject and serial, as
// `vault list pki/issuers` and `openssl x509` show them.
func caNames(tb *certs.TrustBundle) []string {
	var out []string
	for _, c := range tb.CAs() {
		out = append(out, c.Subject.CommonName+" ("+certs.FormatSerial(c.SerialNumber)+")")
	}
	return out
}

// slogWriter turns memberlist's log lines ("[DEBUG] memberlist: ...")
// into slog records of the matching level.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	lvl, line := memberlistLine(p)
	w.log.Log(context.Background(), lvl, line, "component", "gossip")
	return len(p), nil
}

// memberlistLine is a memberlist log line's level and its text without
// the level's tag.
func memberlistLine(p []byte) (slog.Level, string) {
	line := strings.TrimSpace(string(p))
	lvl := slog.LevelDebug
	switch {
	case strings.HasPrefix(line, "[ERR]"):
		lvl = slog.LevelError
	case strings.HasPrefix(line, "[WARN]"):
		lvl = slog.LevelWarn
	case strings.HasPrefix(line, "[INFO]"):
		lvl = slog.LevelInfo
	}
	if i := strings.Index(line, "] "); i >= 0 {
		line = line[i+2:]
	}
	if strings.HasPrefix(line, "memberlist: ignoring alive message for") || strings.Contains(line, errInboundBudget.Error()) {
		// Our own admission refused it, or our transport ended the
		// stream, and said so at most once a second: memberlist repeats
		// it for every alive message or stream, at a rate anyone
		// holding the gossip key (or reaching the port) chooses.
		lvl = slog.LevelDebug
	}
	return lvl, line
}

// gossipLog is memberlist's logger: a slogWriter that logs the failures
// of a datagram or a stream before its gossip key is checked at most
// once a second of each kind, as a warning with a count of those left
// out. Anyone who reaches the gossip port can cause one per datagram (from
// any source address it cares to forge) or per stream, and memberlist
// logs each as an error; a member with a wrong or old key still shows.
type gossipLog struct {
	slogWriter
	packets, streams throttle.PerSecond
}

// junkPackets and junkStreams begin memberlist's lines for a datagram or
// a stream refused before its gossip key is proven (net.go's ingestPacket
// and handleConn, memberlist v0.7): a label header that cannot be read or
// is not ours, a datagram that does not decrypt, a stream that does not
// (or is not encrypted: "failed to receive"), and the error answer to one
// that closed at once.
var (
	junkPackets = []string{
		"memberlist: Decrypt packet failed",
		"memberlist: discarding packet with unacceptable label",
		"memberlist: unexpected double packet label header",
		"memberlist: cannot decode label; packet has been truncated",
		"memberlist: label header cannot be empty when present",
	}
	junkStreams = []string{
		"memberlist: failed to receive",
		"memberlist: discarding stream with unacceptable label",
		"memberlist: unexpected double stream label header",
		"memberlist: Failed to send error",
	}
)

func (w *gossipLog) Write(p []byte) (int, error) {
	lvl, line := memberlistLine(p)
	var t *throttle.PerSecond
	switch {
	case lvl == slog.LevelDebug:
		// Demoted: our transport ended the stream and said so itself.
	case hasAnyPrefix(line, junkPackets):
		t = &w.packets
	case hasAnyPrefix(line, junkStreams):
		t = &w.streams
	}
	if t == nil {
		w.log.Log(context.Background(), lvl, line, "component", "gossip")
		return len(p), nil
	}
	if ok, dropped := t.Allow(); ok {
		w.log.Warn(line, "component", "gossip", "refused_unlogged", dropped)
	}
	return len(p), nil
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// nodeFor builds the memberlist address of a member to send to: the
// address given (a requester's own), else the one gossip told us.
func (g *Gateway) nodeFor(name string, at netip.AddrPort) *memberlist.Node {
	if !at.IsValid() {
		at = g.members.addr(name)
	}
	if at.IsValid() {
		return &memberlist.Node{Name: name, Addr: net.IP(at.Addr().AsSlice()), Port: at.Port()}
	}
	return nil
}

func (g *Gateway) send(to string, msg []byte) error {
	return g.sendTo(to, netip.AddrPort{}, msg)
}

func (g *Gateway) sendTo(to string, at netip.AddrPort, msg []byte) error {
	return g.sendVia(to, at, msg, len(msg) > maxPacketMsg)
}

// sendStream sends msg on a stream whatever its size: for the messages
// whose loss fails an operation outright, rather than costing a retry (a
// gossip key rotation's steps and their answers).
func (g *Gateway) sendStream(to string, msg []byte) error {
	return g.sendVia(to, netip.AddrPort{}, msg, true)
}

func (g *Gateway) sendVia(to string, at netip.AddrPort, msg []byte, stream bool) error {
	n := g.nodeFor(to, at)
	if n == nil {
		return fmt.Errorf("no address for %s", to)
	}
	if stream {
		return g.ml.SendReliable(n, msg)
	}
	return g.ml.SendBestEffort(n, msg)
}

// maxPacketMsg is the largest user message sent as one gossip datagram
// rather than over a stream: it leaves room for memberlist's encryption
// and framing in its 1,400-byte packets. Certificate requests and answers
// fit, and they are what a join multiplies by the mesh's size: a stream
// each (a TCP handshake, a goroutine on both ends) made a newcomer to a
// mesh of hundreds spend seconds answering. A lost datagram costs one
// retry (certRetry); larger messages travel on streams, and so do those
// of a gossip key rotation (sendStream), which has no retry.
const maxPacketMsg = 1200

// sendAsync sends without holding up the worker: datagrams at once,
// streams (a policy or CRL blob, which a new version makes every member
// request at the same moment) from their own goroutines, at most maxSends
// at a time.
func (g *Gateway) sendAsync(to string, at netip.AddrPort, msg []byte) {
	if len(msg) <= maxPacketMsg {
		if err := g.sendTo(to, at, msg); err != nil {
			g.log.Debug("gossip send", "peer", to, "err", err)
		}
		return
	}
	g.goSend(func() error { return g.sendTo(to, at, msg) }, to)
}

// goSend runs send from a goroutine of its own, at most maxSends at a
// time. It never holds up the worker that calls it: a flood of requests
// naming a member that does not read would otherwise stop certificate
// checks and CRL adoption. Past maxQueuedSends waiting it drops the send
// (the requester asks again).
func (g *Gateway) goSend(send func() error, to string) {
	if g.sendsQueued.Add(1) > maxQueuedSends {
		g.sendsQueued.Add(-1)
		g.log.Debug("gossip send dropped: too many waiting", "peer", to)
		return
	}
	go func() {
		defer g.sendsQueued.Add(-1)
		g.sends <- struct{}{}
		defer func() { <-g.sends }()
		if err := send(); err != nil {
			g.log.Debug("gossip send", "peer", to, "err", err)
		}
	}()
}

// gossipAddr is where other gateways reach our gossip, as text.
func (g *Gateway) gossipAddr() []byte { return []byte(g.s.GossipAdvertise.String()) }

func addrField(b []byte) netip.AddrPort {
	ap, _ := netip.ParseAddrPort(string(b))
	return ap
}
