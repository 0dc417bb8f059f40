package mesh

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// exportedCounts is the named counter's series as the gateway's registry
// exports them, by their labels ("name=value,..."), the ones at zero
// left out; series counts them all.
func exportedCounts(t *testing.T, g *Gateway, name string) (nonzero map[string]float64, series int) {
	t.Helper()
	fams, err := g.metrics.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	nonzero = map[string]float64{}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			series++
			if v := m.GetCounter().GetValue(); v != 0 {
				var vals []string
				for _, l := range m.GetLabel() {
					vals = append(vals, l.GetName()+"="+l.GetValue())
				}
				nonzero[strings.Join(vals, ",")] = v
			}
		}
	}
	return nonzero, series
}

// counts is c's series by their labels, as exportedCounts has them, the
// ones at zero left out: for gateways too incomplete for their registry's
// gathering (migGateway).
func counts(t *testing.T, c *prometheus.CounterVec) map[string]float64 {
	t.Helper()
	ch := make(chan prometheus.Metric)
	go func() {
		c.Collect(ch)
		close(ch)
	}()
	out := map[string]float64{}
	for m := range ch {
		var d dto.Metric
		if err := m.Write(&d); err != nil {
			t.Fatal(err)
		}
		if v := d.GetCounter().GetValue(); v != 0 {
			var vals []string
			for _, l := range d.GetLabel() {
				vals = append(vals, l.GetName()+"="+l.GetValue())
			}
			out[strings.Join(vals, ",")] = v
		}
	}
	return out
}

// TestRefusalMetricsExported: the counters of what a gateway refuses or
// drops are exported from the start, every series at zero, so that an
// alert's increase() sees the first.
func TestRefusalMetricsExported(t *testing.T) {
	_, lg := lonelyGateway(t)
	for name, n := range map[string]int{
		"skybridge_gossip_keyring_steps_refused_total": len(keyringSteps) * len(keyringRefusals),
		"skybridge_migration_offers_denied_total":      len(migrate.DenialReasons),
		"skybridge_migration_receives_dropped_total":   len(migrate.DropReasons),
	} {
		if got, series := exportedCounts(t, lg.g, name); series != n || len(got) != 0 {
			t.Errorf("%s before anything was refused: %d series, %v not at zero; want %d at zero", name, series, got, n)
		}
	}
}

// overlayConn is a loopback connection that says it comes from an
// overlay address, as connections through the tunnel do.
type overlayConn struct {
	net.Conn
	from net.Addr
}

func (c overlayConn) RemoteAddr() net.Addr { return c.from }

type overlayListener struct {
	net.Listener
	from net.Addr
}

func (l overlayListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return overlayConn{c, l.from}, nil
}

// loopbackDevice reaches the overlay over loopback: Listen hands out ln,
// and Dial, whatever the overlay address, reaches to.
type loopbackDevice struct {
	*RecordingDevice
	ln net.Listener
	to string
}

func (d *loopbackDevice) Listen(netip.AddrPort) (net.Listener, error) { return d.ln, nil }

func (d *loopbackDevice) Dial(ctx context.Context, _ string) (net.Conn, error) {
	var nd net.Dialer
	return nd.DialContext(ctx, "tcp", d.to)
}

// TestDeniedOffersCounted: every offer a gateway's policy denies is
// counted in skybridge_migration_offers_denied_total, by the kind of rule
// that denied it, those its audit log counts rather than records one by
// one (past 32 in a row from one gateway) included. The audit log's count of a gateway's denials comes a minute late at the
// soonest, and the decisions metric counts no offer when no policy is in
// force.
func TestDeniedOffersCounted(t *testing.T) {
	f := newFixture(t)
	f.now = time.Now() // the certificates meet real TLS
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	// gw-zrh (migGateway) sends from its overlay address 100.96.0.1.
	from := &net.TCPAddr{IP: net.IPv4(100, 96, 0, 1), Port: 40000}
	dst, _ := migGateway(t, f, &loopbackDevice{RecordingDevice: NewRecordingDevice("dst"), ln: overlayListener{ln, from}})
	dstID := f.identity("gw-fra", "fra", 2, f.now.Add(-time.Hour))
	dst.id.Store(dstID)
	dst.s.StateDir, dst.mig = t.TempDir(), nil
	dst.policy.Store(&adoptedPolicy{p: mustPolicy(t, `policy {
  name    = "dst"
  version = 1
}
class "c" {
  allow "store" {
    site = ["*"]
  }
  allow "transit" {
    site = ["*"]
  }
  deny "store" {
    site   = ["fra"]
    reason = "not at fra"
  }
}
`)})
	if err := dst.openMigrations(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := dst.serveMigrations(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		<-dst.mig.served
		dst.mig.journal.Close()
	})
	src, ms := migGateway(t, f, &loopbackDevice{RecordingDevice: NewRecordingDevice("src"), to: ln.Addr().String()})
	ms.addCert(dstID.Certificate().Raw)
	ms.update("gw-fra", gossipAddr, f.advert(dstID, 1))
	img := filepath.Join(t.TempDir(), "vm07.raw")
	if err := os.WriteFile(img, []byte(strings.Repeat("x", 1<<20)), 0o600); err != nil {
		t.Fatal(err)
	}
	offer := func() {
		t.Helper()
		run, id, err := src.StartMigration(MigrationRequest{Image: img, To: "gw-fra", Class: "c"})
		if err != nil {
			t.Fatal(err)
		}
		waitEnd(t, run)
		run.mu.Lock()
		err = run.err
		run.mu.Unlock()
		var denied *migrate.DeniedError
		if !errors.As(err, &denied) || denied.By != "receiver" {
			t.Fatalf("migration %s: %v; want it denied by the receiver", id, err)
		}
	}
	const byRule = 32 + 2 // the last two counted, not recorded, in the audit log
	for range byRule {
		offer()
	}
	dst.policy.Store(nil)
	offer()

	got := counts(t, dst.metrics.offersDenied)
	want := map[string]float64{"reason=" + migrate.DeniedByRule: byRule, "reason=" + migrate.DeniedNoPolicy: 1}
	if !maps.Equal(got, want) {
		t.Errorf("skybridge_migration_offers_denied_total: %v, want %v", got, want)
	}
	if got := counts(t, src.metrics.offersDenied); len(got) != 0 {
		t.Errorf("the sender counted offers denied: %v", got)
	}
}

// TestReceivesDroppedCounted: what the receiver says it forgot with the
// chunks it held lands in skybridge_migration_receives_dropped_total, by
// reason. (migrate's TestDroppedReceivesObserved has the receiver say
// it; TestDeniedOffersCounted, that the gateway's receiver tells its
// metrics.)
func TestReceivesDroppedCounted(t *testing.T) {
	var o migrate.Observer = newMetrics(&Gateway{})
	o.ReceiveDropped(migrate.DroppedTooMany)
	o.ReceiveDropped(migrate.DroppedTooMany)
	o.ReceiveDropped(migrate.DroppedAbandoned)
	got := counts(t, o.(*metrics).receivesDropped)
	want := map[string]float64{"reason=" + migrate.DroppedTooMany: 2, "reason=" + migrate.DroppedAbandoned: 1}
	if !maps.Equal(got, want) {
		t.Errorf("skybridge_migration_receives_dropped_total: %v, want %v", got, want)
	}
}

// keyringStepBy is a keyring step of kind signed by id, in its own name
// and dated at, as g receives it over gossip: the key sealed to g
// (install), named by its SHA-256 (use), or as it is (other kinds).
func keyringStepBy(t *testing.T, g *Gateway, id *certs.NodeIdentity, kind string, key []byte, at time.Time) message {
	t.Helper()
	op := &keyringOp{kind: kind, key: key, id: make([]byte, opIDLen), at: at, initiator: id.Attributes().Node, certDER: id.Certificate().Raw}
	rand.Read(op.id)
	me := g.id.Load()
	switch kind {
	case opInstall:
		sealed, err := certs.SealTo(me.Certificate(), key, sealContext(op.id, me.Attributes().Node))
		if err != nil {
			t.Fatal(err)
		}
		op.kind, op.key = opInstallSealed, sealed
	case opUse:
		sum := sha256.Sum256(key)
		op.kind, op.key = opUseHash, sum[:]
	}
	sig, err := id.Signer().Sign(rand.Reader, op.digest(), crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	op.sig = sig
	m, err := decodeMessage(op.encode(), maxFields)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestKeyringRefusalsCounted: every keyring step a gateway does not take
// is counted in skybridge_gossip_keyring_steps_refused_total, by step and
// why; a step taken is not. Before, a forged or replayed step, a burst
// gateway's, or an install into a full keyring (a gateway of the mesh
// installing keys it never removes) showed in the log alone, at most
// once a second.
func TestKeyringRefusalsCounted(t *testing.T) {
	ca, lg := lonelyGateway(t)
	g := lg.g
	issue := func(node string, host byte, labels map[string]string) *certs.NodeIdentity {
		t.Helper()
		id, err := ca.IssueIdentity(certs.Attributes{Node: node, Site: "cloud", Region: "r", Provider: "aws", Jurisdiction: "CH",
			OverlayIP: netip.AddrFrom4([4]byte{100, 64, 9, host}), Labels: labels}, time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	probe, other := issue("probe", 9, nil), issue("probe2", 10, nil)
	burst := issue("burst-ams-gw0", 20, map[string]string{certs.BurstLabel: "true"})
	step := func(m message) error {
		t.Helper()
		return g.handleKeyringOp(m)
	}

	// Taken: no count.
	k := newGossipKey(t)
	if err := step(keyringStepBy(t, g, probe, opInstall, k, time.Now())); err != nil {
		t.Fatalf("install step with room: %v", err)
	}
	// Replayed: refused unanswered, as a forgery is.
	use := keyringStepBy(t, g, probe, opUse, k, time.Now())
	if err := step(use); err != nil {
		t.Fatalf("use step of the key installed: %v", err)
	}
	if err := step(use); err == nil || !strings.Contains(err.Error(), "replayed") {
		t.Fatalf("use step replayed: %v; want it refused", err)
	}
	if err := step(message{typ: msgKeyringOp, fields: [][]byte{[]byte(opUse)}}); err == nil {
		t.Fatal("a keyring step of one field was taken")
	}
	if err := step(keyringStepBy(t, g, probe, opUse, newGossipKey(t), time.Now())); !errors.Is(err, errKeyMissing) {
		t.Fatalf("use step of a key never installed: %v; want it refused as missed", err)
	}
	if err := step(keyringStepBy(t, g, probe, opUse, k, time.Now().Add(-time.Hour))); !errors.Is(err, errOpTime) {
		t.Fatalf("use step dated an hour ago: %v; want it refused", err)
	}
	if err := step(keyringStepBy(t, g, burst, opUse, k, time.Now())); !errors.Is(err, errBurstRotates) {
		t.Fatalf("use step of a burst gateway: %v; want it refused", err)
	}
	if err := step(keyringStepBy(t, g, other, opUse, k, time.Now())); err == nil || !strings.Contains(err.Error(), "is under way") {
		t.Fatalf("use step of probe2 during probe's rotation: %v; want it refused", err)
	}
	if err := step(keyringStepBy(t, g, probe, "frobnicate", k, time.Now())); err == nil || !strings.Contains(err.Error(), "unknown keyring operation") {
		t.Fatalf("a step of a kind no release sends: %v; want it refused", err)
	}
	for len(g.keyring.GetKeys()) < maxGossipKeys {
		if err := g.keyring.AddKey(newGossipKey(t)); err != nil {
			t.Fatal(err)
		}
	}
	if err := step(keyringStepBy(t, g, probe, opInstall, newGossipKey(t), time.Now())); !errors.Is(err, errKeyringFull) {
		t.Fatalf("install step into a full keyring: %v; want it refused as full", err)
	}

	got, _ := exportedCounts(t, g, "skybridge_gossip_keyring_steps_refused_total")
	want := map[string]float64{
		"reason=unverified,step=use":         1, // replayed
		"reason=malformed,step=unknown":      1,
		"reason=missed_step,step=use":        1,
		"reason=clock_skew,step=use":         1,
		"reason=burst_initiator,step=use":    1,
		"reason=rotation_under_way,step=use": 1,
		"reason=failed,step=unknown":         1,
		"reason=keyring_full,step=install":   1,
	}
	if !maps.Equal(got, want) {
		t.Errorf("skybridge_gossip_keyring_steps_refused_total:\n%v\nwant\n%v", got, want)
	}
}
