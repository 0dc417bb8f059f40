package mesh

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// routeRefusingDevice is a recording device that refuses one prefix as the
// kernel refuses an IPv6 route into a link with IPv6 off, and applies the
// rest of the change, as setRoutes does.
type routeRefusingDevice struct {
	*RecordingDevice
	refuse netip.Prefix
}

func (d routeRefusingDevice) SetRoutes(c RouteChange) error {
	n := len(c.Add)
	c.Add = slices.DeleteFunc(slices.Clone(c.Add), func(p netip.Prefix) bool { return p == d.refuse })
	d.RecordingDevice.SetRoutes(c)
	if len(c.Add) < n {
		return fmt.Errorf("add route %s via %s: %w", d.refuse, d.Name(), syscall.EACCES)
	}
	return nil
}

// TestReconcileAppliedDespiteOneRoute: one remote prefix the kernel will
// not route must not stop every pass short of recording the plan it
// applied: the peers are configured and the other routes in, and the
// carriers (what health probes), the status, the endpoint WireGuard
// learned by roaming and the acknowledgement of next keys all follow from
// that record. The failure is still counted.
func TestReconcileAppliedDespiteOneRoute(t *testing.T) {
	v4, v6 := netip.MustParsePrefix("10.77.0.0/16"), netip.MustParsePrefix("2001:db8:77::/48")
	dir := t.TempDir()
	ca := meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	s := liveSettings(t, filepath.Join(dir, "hq"))
	s.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "hq-1", Site: "zrh-dc", Region: "zrh", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.7.1")}, time.Hour, s.Identity.Dir)
	dev := routeRefusingDevice{NewRecordingDevice("hq"), v6}
	g := runGateway(t, s, dev, slog.New(slog.DiscardHandler), nil)

	fs := liveSettings(t, filepath.Join(dir, "fra"))
	fs.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "fra-1", Site: "fra-dc", Region: "fra", Provider: "onprem", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr("100.64.7.9"), Routes: []netip.Prefix{v4, v6}}, time.Hour, fs.Identity.Dir)
	fs.Seeds = []string{s.GossipAdvertise.String()}
	runLiveGateway(t, fs, &syncbuf.Buffer{})

	runs := func() int { g.stats.mu.Lock(); defer g.stats.mu.Unlock(); return g.stats.runs }
	pass := func() {
		n := runs()
		g.triggerReconcile()
		waitUntil(t, 10*time.Second, "another pass", func() bool { return runs() > n })
	}
	waitUntil(t, 20*time.Second, "fra-1 a peer of hq-1 and its IPv4 network routed", func() bool {
		rs, _ := dev.Routes()
		return len(dev.Peers()) == 1 && slices.Contains(rs.Own, v4)
	})
	pass()
	// WireGuard learns the peer's real address (it roamed, or sits
	// behind a NAT that rewrote its port): a pass must leave it be.
	roamed := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	var key [32]byte
	for k := range dev.Peers() {
		key = k
	}
	if err := dev.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key, UpdateOnly: true, Endpoint: roamed}}}); err != nil {
		t.Fatal(err)
	}
	pass()
	pass()
	// Read by the reconciler, not only when a status looks: when a
	// tunnel last sent is then known to within a pass.
	g.sentMu.Lock()
	_, noted := g.sent[certs.WGPublicKey(key)]
	g.sentMu.Unlock()
	if !noted {
		t.Error("the reconciler did not read the peer's transmit counter")
	}
	st, err := g.Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Reconcile.Errors == 0 || st.Reconcile.LastError == "" {
		t.Errorf("the refused route is not counted: %+v", st.Reconcile)
	}
	if !g.planCarriers()["fra-1"] || st.Carriers["fra-dc"] != "fra-1" {
		t.Errorf("fra-1 is configured and its IPv4 network routed, yet not the carrier of fra-dc: plan %v, status %v", g.planCarriers(), st.Carriers)
	}
	if ep := dev.Peers()[key].Endpoint; ep.String() != roamed.String() {
		t.Errorf("the endpoint WireGuard learned (%v) was overwritten with %v", roamed, ep)
	}
}
