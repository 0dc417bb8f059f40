package mesh

import (
	"context"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// silentSeed accepts gossip connections and never answers them, like a
// seed behind a firewall that lets the handshake through, or a hung
// gateway; it reports each connection it accepts.
func silentSeed(t *testing.T) (string, <-chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan struct{}, 16)
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
			select {
			case accepted <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String(), accepted
}

// TestGatewayStopsDespiteSilentSeeds: a gateway asked to stop while it is
// joining through seeds that never answer stops within seconds. With the
// WAN profile each seed could hold the join for 30 s, twice, and a stop
// used to wait for the join to give up on every one of them.
func TestGatewayStopsDespiteSilentSeeds(t *testing.T) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s := liveSettings(t, dir)
	s.GossipProfile = "wan"
	s.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "gw-stop", Site: "s", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.96.9.1")}, time.Hour, s.Identity.Dir)
	seed1, accepted1 := silentSeed(t)
	seed2, accepted2 := silentSeed(t)
	s.Seeds = []string{seed1, seed2}
	g, err := newGateway(context.Background(), s, slog.New(slog.NewTextHandler(io.Discard, nil)), options{device: NewRecordingDevice("stop"), noControl: true, noMigrations: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	select {
	case <-accepted1:
	case <-accepted2:
	case <-time.After(20 * time.Second):
		t.Fatal("the gateway never knocked on its seeds")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the gateway was still stopping 15 s after it was asked to, held by seeds that do not answer")
	}
}

// TestRotationScheduleFromTheFuture: a last WireGuard rotation recorded
// in the future (the clock was wrong then) is counted from now, not from
// then: scheduled rotation would otherwise wait for the clock to get there.
func TestRotationScheduleFromTheFuture(t *testing.T) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	future := time.Now().Add(365 * 24 * time.Hour).UTC().Truncate(time.Second)
	lg := startLiveGatewayWith(t, ca, dir, 0, "s", nil, io.Discard, func(s *Settings) {
		s.WGRotateEvery = 24 * time.Hour
		if err := os.MkdirAll(s.StateDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := stateDir(s.StateDir).markRotated(future); err != nil {
			t.Fatal(err)
		}
	})
	waitUntil(t, 10*time.Second, "the rotation schedule to count from now", func() bool {
		at, err := lg.g.state.rotatedAt()
		return err == nil && time.Since(at).Abs() < time.Minute
	})
}

// TestRotationScheduleAfterClockWentBack: a rotation made while the clock
// ran ahead is dated then; once the clock is set back, a running gateway
// counts its schedule from now, not from then (no rotation for as long as
// the clock ran ahead).
func TestRotationScheduleAfterClockWentBack(t *testing.T) {
	defer func(d time.Duration) { wgRotationCheck = d }(wgRotationCheck)
	wgRotationCheck = 10 * time.Millisecond
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	lg := startLiveGatewayWith(t, ca, t.TempDir(), 0, "s", nil, io.Discard, func(s *Settings) { s.WGRotateEvery = 24 * time.Hour })
	defer lg.stop() // before wgRotationCheck is put back
	waitUntil(t, 10*time.Second, "the rotation schedule to start", func() bool { return lg.g.wgRotated.Load() != 0 })
	ahead := time.Now().Add(365 * 24 * time.Hour)
	lg.g.wgRotated.Store(ahead.UnixNano()) // rotated while the clock was a year ahead
	waitUntil(t, 10*time.Second, "the rotation schedule to count from now", func() bool {
		at, err := lg.g.state.rotatedAt()
		return time.Since(time.Unix(0, lg.g.wgRotated.Load())).Abs() < time.Minute && err == nil && time.Since(at).Abs() < time.Minute
	})
}

// TestRenewalKeepsTunnels: when a gateway renews its certificate and
// re-advertises, its peers adopt the new certificate without taking its
// tunnel down meanwhile, and the advert proves its WireGuard key under
// the new certificate.
func TestRenewalKeepsTunnels(t *testing.T) {
	m := startLiveMesh(t)
	a := m.gws[0].g
	removed := []int{m.gws[1].dev.Removed(), m.gws[2].dev.Removed()}
	id, err := m.ca.IssueIdentity(*a.id.Load().Attributes(), time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	tb, err := m.ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	a.renewed(id, tb)
	for i, lg := range m.gws[1:] {
		waitUntil(t, 20*time.Second, lg.g.s.Node.Name+" to adopt op0's new certificate", func() bool {
			v := lg.g.members.verified("op0")
			return v != nil && v.Cert.Equal(id.Certificate())
		})
		if n := lg.dev.Removed(); n != removed[i] {
			t.Errorf("%s removed %d peers while op0 renewed", lg.g.s.Node.Name, n-removed[i])
		}
		// Its key is proven anew, for the new certificate (a proof names
		// the certificate; a verified one is a proof that verified).
		if v := lg.g.members.verified("op0"); v == nil || !proven(v) || v.Advert.CertHash != id.Fingerprint() {
			t.Errorf("%s holds op0's renewed advert without a proof of its WireGuard key", lg.g.s.Node.Name)
		}
	}
}

// TestScheduledRotationAfterManual: a scheduled WireGuard rotation that
// waited behind a manual one rotates only if still due once it runs: the
// key just reported to the operator stays.
func TestScheduledRotationAfterManual(t *testing.T) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	g := startLiveGatewayWith(t, ca, t.TempDir(), 0, "s", nil, io.Discard, nil).g
	due := func() bool { return g.now().Sub(time.Unix(0, g.wgRotated.Load())) >= time.Hour }
	g.wgRotation.Lock() // a manual rotation under way
	g.wgRotated.Store(time.Now().Add(-2 * time.Hour).UnixNano())
	if !due() {
		t.Fatal("the schedule should find a rotation due")
	}
	before, _ := g.wgKeys()
	res := make(chan error, 1)
	go func() {
		_, err := g.rotateWireGuardKey(context.Background(), due)
		res <- err
	}()
	g.wgRotated.Store(time.Now().UnixNano()) // the manual rotation is done
	g.wgRotation.Unlock()
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	if after, _ := g.wgKeys(); after != before {
		t.Fatal("the scheduled rotation replaced the key the manual one had just made")
	}
}

// stallingDevice is a recording device whose switch to a new private key,
// once armed, waits for release, as a rotation's would behind a slow
// Vault; closedInSwitch says the device was closed under it.
type stallingDevice struct {
	*RecordingDevice
	armed, inSwitch, closedInSwitch atomic.Bool
	stalled, release                chan struct{}
}

func (d *stallingDevice) Configure(c wgtypes.Config) error {
	if c.PrivateKey != nil && d.armed.CompareAndSwap(true, false) {
		d.inSwitch.Store(true)
		defer d.inSwitch.Store(false)
		close(d.stalled)
		<-d.release
	}
	return d.RecordingDevice.Configure(c)
}

func (d *stallingDevice) Close() error {
	if d.inSwitch.Load() {
		d.closedInSwitch.Store(true)
	}
	return d.RecordingDevice.Close()
}

// TestStopWaitsForRotation: a stop waits for a WireGuard key rotation past
// its durable point (asked for over the control socket, which no stop
// cancels then) before it shuts the gossip and the device, and, at a
// burst's end, deletes the key from Vault: the rotation would then write
// it back.
func TestStopWaitsForRotation(t *testing.T) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	s := liveSettings(t, t.TempDir())
	attrs := certs.Attributes{Node: "gw", Site: "s", Region: "r", Provider: "onprem", Jurisdiction: "CH", OverlayIP: netip.MustParseAddr("100.64.7.1")}
	s.Node = provisionGateway(t, ca, tb, attrs, time.Hour, s.Identity.Dir)
	dev := &stallingDevice{RecordingDevice: NewRecordingDevice("stall"), stalled: make(chan struct{}), release: make(chan struct{})}
	g, err := newGateway(context.Background(), s, slog.New(slog.DiscardHandler), options{device: dev, noControl: true, noMigrations: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- g.Run(ctx) }()
	waitUntil(t, 20*time.Second, "the gateway to start", func() bool { return g.OperatorAddress() != nil })

	dev.armed.Store(true)
	rotated := make(chan error, 1)
	go func() {
		_, err := g.RotateWireGuardKey(context.Background())
		rotated <- err
	}()
	select {
	case <-dev.stalled:
	case <-time.After(20 * time.Second):
		t.Fatal("the rotation never switched the device's key")
	}
	cancel()
	// Everything else stops at once; a Run that does not wait for the
	// rotation returns well within this.
	early := false
	select {
	case err := <-ran:
		early = true
		t.Errorf("Run returned (%v) while a rotation was switching the device's key", err)
	case <-time.After(time.Second):
	}
	close(dev.release)
	if err := <-rotated; err != nil && !early {
		t.Errorf("the rotation: %v", err)
	}
	if !early {
		select {
		case err := <-ran:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("Run did not return after the rotation ended")
		}
	}
	if dev.closedInSwitch.Load() {
		t.Error("the device was closed under the rotation's switch of its key")
	}
}

// TestStatusPlacesRestoredDeadMembers: a member restored dead from the
// state directory has no advert, but its certificate names its site: the
// site is reported unreachable (a crash survives the observer's
// restart), and so is one whose gateway had left on purpose, counted as
// left: a site whose only gateway was stopped is cut off all the same.
func TestStatusPlacesRestoredDeadMembers(t *testing.T) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	g := startLiveGatewayWith(t, ca, t.TempDir(), 0, "home", nil, io.Discard, nil).g
	for i, site := range []string{"crashed", "retired"} {
		id, err := ca.IssueIdentity(certs.Attributes{Node: "gw-" + site, Site: site, Region: "r", Provider: "onprem", Jurisdiction: "CH",
			OverlayIP: netip.AddrFrom4([4]byte{100, 64, 9, byte(i + 1)})}, time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		g.members.rememberDead("gw-"+site, netip.MustParseAddrPort("127.0.0.1:1"), id.Certificate().Raw, site == "retired")
	}
	st, err := g.Status()
	if err != nil {
		t.Fatal(err)
	}
	reachable, left := map[string]bool{}, map[string]int{}
	for _, s := range siteHealth(st, time.Now()) {
		reachable[s.name], left[s.name] = s.reachable, s.count[stateLeft]
	}
	if r, ok := reachable["crashed"]; !ok || r || left["crashed"] != 0 {
		t.Errorf("the crashed member's site: listed %v, reachable %v, left %d; want listed, unreachable, none left (%v)", ok, r, left["crashed"], reachable)
	}
	if r, ok := reachable["retired"]; !ok || r || left["retired"] != 1 {
		t.Errorf("the site of a member that left: listed %v, reachable %v, left %d; want listed, unreachable, one left (%v)", ok, r, left["retired"], reachable)
	}
	if _, ok := reachable[unknownSite]; ok {
		t.Errorf("restored members counted under %s: %v", unknownSite, reachable)
	}
	// The status says the same as the metrics.
	if r, ok := st.Reachable["retired"]; !ok || r || !st.Reachable["home"] || len(st.Reachable) != 3 {
		t.Errorf("status reachable %v; want home, and crashed and retired unreachable", st.Reachable)
	}
}

// TestStoppedGatewayShownAsLeft: a gateway stopped on purpose is shown by
// the others as gone on purpose, not crashed: its leave notice, signed
// with its last advert's version, is accepted.
func TestStoppedGatewayShownAsLeft(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	a := startLiveGateway(t, ca, dir, 0, "home", nil, io.Discard)
	b := startLiveGateway(t, ca, dir, 1, "away", []string{a.g.s.GossipAdvertise.String()}, io.Discard)
	member := func(name string) (MemberView, bool) {
		for _, m := range a.g.members.snapshot() {
			if m.Name == name {
				return m, true
			}
		}
		return MemberView{}, false
	}
	waitUntil(t, 20*time.Second, "op0 to verify op1", func() bool {
		m, ok := member("op1")
		return ok && m.State == StateVerified
	})
	b.stop()
	// The notice and gossip's report of the departure arrive in either
	// order.
	waitUntil(t, 20*time.Second, "op0 to show op1 as left on purpose", func() bool {
		m, _ := member("op1")
		return m.State == StateDead && m.Left && m.Reason == "left the mesh"
	})
}

// TestStoppedSiteRoutesHeld: when a site's only gateway stops, its routes
// are held, unreachable (traffic to the site is refused here, not sent by
// the host's other routes in clear), status and the log say so, and
// revoking the gateway's certificate frees them.
func TestStoppedSiteRoutesHeld(t *testing.T) {
	logs := &syncbuf.Buffer{}
	ca, hq, fra, lan := liveSitePair(t, logs)
	routed := func() bool { return hq.routed(lan) }
	unreachable := func() bool { return hq.held(lan) }
	held := func() []netip.Prefix {
		st, err := hq.g.Status()
		if err != nil {
			t.Fatal(err)
		}
		return st.Held["fra-dc"]
	}
	waitUntil(t, 20*time.Second, "fra-1 a peer", func() bool { return len(hq.dev.Peers()) == 1 })
	if h := held(); h != nil {
		t.Fatalf("held %v while fra-1 is up", h)
	}
	serial := fra.g.id.Load().Certificate().SerialNumber
	fra.stop()
	waitUntil(t, 20*time.Second, "fra-1 gone as a peer, its site's route held", func() bool {
		return len(hq.dev.Peers()) == 0 && slices.Equal(held(), []netip.Prefix{lan})
	})
	if !unreachable() || routed() {
		t.Fatal("the route of a site whose gateway stopped is not held unreachable: its traffic follows the host's other routes")
	}
	if !strings.Contains(logs.String(), "routes held") {
		t.Fatal("the held routes were not logged")
	}
	if v, ok := gauge(t, hq.g, "skybridge_site_routes_held"); !ok || v != 1 {
		t.Fatalf("skybridge_site_routes_held = %v (exported %v), want 1", v, ok)
	}
	// A network the host routes itself is the host's, held or not.
	hq.dev.SetHostRoutes(lan)
	hq.g.triggerReconcile()
	waitUntil(t, 10*time.Second, "the held route given way to the host's own", func() bool { return !unreachable() && held() == nil })
	hq.dev.SetHostRoutes()
	hq.g.triggerReconcile()
	waitUntil(t, 10*time.Second, "the route held again once the host's is gone", func() bool { return unreachable() && held() != nil })
	if _, err := ca.RevokeSerials([]*big.Int{serial}, "cessationOfOperation", time.Now()); err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	if !hq.g.adoptTrust(tb, time.Now()) {
		t.Fatal("the new revocation list was not adopted")
	}
	hq.g.triggerReconcile()
	waitUntil(t, 20*time.Second, "the route freed once fra-1 is revoked", func() bool { return !routed() && !unreachable() && held() == nil })
	if v, ok := gauge(t, hq.g, "skybridge_site_routes_held"); ok {
		t.Fatalf("skybridge_site_routes_held = %v once the routes are freed, want no series", v)
	}
}

// TestStoppedGatewayHoldsItsRoutes: the routes a gateway carried are
// held, unreachable, once it has stopped.
func TestStoppedGatewayHoldsItsRoutes(t *testing.T) {
	_, hq, _, lan := liveSitePair(t, io.Discard)
	hq.stop()
	if rs, _ := hq.dev.Routes(); len(rs.Own) != 0 || !slices.Equal(rs.Held, []netip.Prefix{lan}) {
		t.Fatalf("after the stop: own %v, held %v; want %s held", rs.Own, rs.Held, lan)
	}
}

// TestRoutesAtStop: a gateway that stops holds every route it had into
// its device, unreachable, for the host not to send the mesh's traffic by
// its other routes while it is down; one that leaves the mesh for good (a
// burst's end) frees them all.
func TestRoutesAtStop(t *testing.T) {
	a, b, c := netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("10.2.0.0/16"), netip.MustParsePrefix("10.3.0.0/16")
	for _, retired := range []bool{false, true} {
		dev := NewRecordingDevice("sb0")
		dev.SetRoutes(RouteChange{Add: []netip.Prefix{a, b}, Hold: []netip.Prefix{c}})
		logs := &syncbuf.Buffer{}
		g := &Gateway{dev: dev, log: slog.New(slog.NewTextHandler(logs, nil))}
		g.routesAtStop(retired)
		table, _ := dev.Routes()
		slices.SortFunc(table.Held, comparePrefix)
		switch {
		case retired && (len(table.Own) != 0 || len(table.Held) != 0):
			t.Errorf("retired: own %v, held %v; want every route freed", table.Own, table.Held)
		case !retired && (len(table.Own) != 0 || !slices.Equal(table.Held, []netip.Prefix{a, b, c})):
			t.Errorf("stopped: own %v, held %v; want all three held", table.Own, table.Held)
		case !retired && !strings.Contains(logs.String(), "held while this gateway is down"):
			t.Errorf("the hold at stop is not said: %s", logs.String())
		}
	}
}

// TestRestoreExpiredPeerAsGone: a gateway alive at the last save whose
// certificate expired while this one was down is not a peer again, but
// still a gateway its site misses: its routes stay held after the
// restart, rather than freed by the first reconcile.
func TestRestoreExpiredPeerAsGone(t *testing.T) {
	f := newFixture(t)
	expired := f.identity("gw-x", "site-x", 9, f.now.Add(-49*time.Hour), "10.9.0.0/16") // 48 h certificate: ended an hour ago
	d := stateDir(t.TempDir())
	addr := netip.MustParseAddrPort("192.0.2.9:7946")
	if err := d.saveMembers([]savedMember{{Name: "gw-x", Gossip: addr, Alive: true, Advert: f.advert(expired, 1), Cert: expired.Certificate().Raw}}); err != nil {
		t.Fatal(err)
	}
	g := &Gateway{state: d, members: newMembership("self", f.trust(), func() time.Time { return f.now }, func() {}), log: slog.New(slog.DiscardHandler)}
	g.restoreMembers()
	if len(g.members.gateways()) != 0 {
		t.Fatal("a member whose certificate expired was restored as a peer")
	}
	away := g.members.away()
	if len(away) != 1 || away[0].Attributes.Node != "gw-x" || away[0].Gossip != addr.Addr() {
		t.Fatalf("away after the restart: %+v; want gw-x, its routes held", away)
	}
}

// TestRestartKeepsExpiredMissed: a gateway refused because its
// certificate ran out while it was here, and one restored at a restart
// whose certificate runs out before gossip hears from it, are missed
// (their routes held) across a restart as a dead one is.
func TestRestartKeepsExpiredMissed(t *testing.T) {
	f := newFixture(t)
	clock := f.now
	d := stateDir(t.TempDir())
	open := func() *Gateway {
		return &Gateway{state: d, members: newMembership("self", f.trust(), func() time.Time { return clock }, func() {}), log: slog.New(slog.DiscardHandler)}
	}
	names := func(g *Gateway) (out []string) {
		for _, a := range g.members.away() {
			out = append(out, a.Attributes.Node)
		}
		return out
	}
	g := open()
	late := f.identity("gw-late", "site-late", 3, f.now.Add(-47*time.Hour), "10.3.0.0/16") // 48 h: an hour left
	g.members.addCert(late.Certificate().Raw)
	g.members.update("gw-late", netip.MustParseAddrPort("192.0.2.3:7946"), f.advert(late, 1))
	soon := f.identity("gw-soon", "site-soon", 4, f.now.Add(-47*time.Hour-30*time.Minute), "10.4.0.0/16") // half an hour left
	g.members.addCert(soon.Certificate().Raw)
	g.members.update("gw-soon", netip.MustParseAddrPort("192.0.2.4:7946"), f.advert(soon, 1))
	// gw-soon is saved alive; gw-late is refused once its certificate
	// ran out, then saved.
	g.saveMembers()
	clock = clock.Add(45 * time.Minute)
	g.members.refresh()
	if got := names(g); !slices.Equal(got, []string{"gw-soon"}) {
		t.Fatalf("before the restart: away %v, want gw-soon (refused for its expiry)", got)
	}
	clock = clock.Add(30 * time.Minute)
	g.members.refresh()
	if got := names(g); !slices.Equal(got, []string{"gw-late", "gw-soon"}) {
		t.Fatalf("before the restart: away %v, want both", got)
	}
	g.saveMembers()
	g = open()
	g.restoreMembers()
	if got := names(g); !slices.Equal(got, []string{"gw-late", "gw-soon"}) {
		t.Fatalf("after the restart: away %v, want both still missed", got)
	}
	// Restored alive, its certificate running out before gossip hears
	// from it: still missed, not dropped.
	clock = clock.Add(-75 * time.Minute)
	g = open()
	d2 := stateDir(t.TempDir())
	g.state = d2
	if err := d2.saveMembers([]savedMember{{Name: "gw-soon", Gossip: netip.MustParseAddrPort("192.0.2.4:7946"), Alive: true, Advert: f.advert(soon, 2), Cert: soon.Certificate().Raw}}); err != nil {
		t.Fatal(err)
	}
	g.restoreMembers()
	if len(g.members.gateways()) != 1 {
		t.Fatal("gw-soon, valid at the restart, was not restored as a peer")
	}
	clock = clock.Add(45 * time.Minute)
	g.members.refresh()
	if got := names(g); !slices.Equal(got, []string{"gw-soon"}) {
		t.Fatalf("restored, then expired before gossip heard from it: away %v, want gw-soon", got)
	}
}

// TestFailedStartHoldsItsRoutes: a start that fails after its first
// reconcile (here its gossip port is taken) holds the routes that
// reconcile carried, as a stop does, rather than drop them with the
// device.
func TestFailedStartHoldsItsRoutes(t *testing.T) {
	_, hq, _, lan := liveSitePair(t, io.Discard)
	hq.stop() // fra-1 saved alive: the next start carries its routes at once
	s := *hq.g.s
	taken, err := net.Listen("tcp", s.GossipBind.String())
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	dev := NewRecordingDevice("again")
	g, err := newGateway(context.Background(), &s, slog.New(slog.DiscardHandler), options{device: dev, noControl: true, noMigrations: true})
	if err != nil {
		t.Fatal(err)
	}
	if rs, _ := dev.Routes(); !slices.Equal(rs.Own, []netip.Prefix{lan}) {
		t.Fatalf("the first reconcile's routes: own %v, want %s carried", rs.Own, lan)
	}
	if err := g.Run(context.Background()); err == nil {
		t.Fatal("a gateway whose gossip port is taken started")
	}
	if rs, _ := dev.Routes(); len(rs.Own) != 0 || !slices.Equal(rs.Held, []netip.Prefix{lan}) {
		t.Fatalf("after the failed start: own %v, held %v; want %s held", rs.Own, rs.Held, lan)
	}
}
