package mesh

import (
	"context"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// TestBurstDownExpiredLeavesTheList: a burst taken down before its end
// revokes its gateways' certificates, on the list until they expire. Once
// they have, the list no longer names them: it stayed in force until the
// next revocation by anyone, 98 KB for a burst of 2,000 gateways, carried
// by every gateway's state exchange every 15 s.
func TestBurstDownExpiredLeavesTheList(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	var ahead atomic.Int64 // how far the enrolling gateway's clock runs ahead
	s := liveSettings(t, filepath.Join(dir, "op0"))
	s.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "op0", Site: "zrh-dc", Region: "r-zrh-dc", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.7.1")}, time.Hour, s.Identity.Dir)
	s.Identity.CADir = ca.Dir()
	s.EnrollListen = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(loopbackPort(t)))
	s.EnrollAdvertise = s.EnrollListen
	logs := &syncbuf.Buffer{}
	g := runGateway(t, s, NewRecordingDevice("op0"), slog.New(slog.NewJSONHandler(logs, nil)), func(g *Gateway) {
		g.now = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	})
	waitUntil(t, 20*time.Second, "the enrollment endpoint", func() bool { return strings.Contains(logs.String(), "enrolling burst gateways") })

	grant, err := g.BurstUp(context.Background(), BurstRequest{BurstSite: amsSite, TTL: MinBurstTTL})
	if err != nil {
		t.Fatal(err)
	}
	tok, body := burstAsk(t, grant.Tokens[0], filepath.Join(dir, "burst"))
	res, err := postEnroll(context.Background(), tok, body, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	issued, err := certs.ParseCertificatesPEM(res.Certificate)
	if err != nil || len(issued) != 1 {
		t.Fatal(issued, err)
	}
	serial := issued[0].SerialNumber
	if _, err := g.BurstDown(context.Background(), amsSite.Site, ""); err != nil {
		t.Fatal(err)
	}
	if !g.trust.Load().IsRevoked(serial) {
		t.Fatal("burst down did not revoke the burst's certificate")
	}
	before := g.trust.Load().CRL().Number

	// Just past the burst's end, the list is not signed again: a gateway
	// whose clock runs behind the CA's, by up to certs.MaxClockSkew,
	// takes the certificate as valid still.
	e := g.enroll
	ahead.Store(int64(MinBurstTTL + time.Second))
	e.mu.Lock()
	err = g.delistEnded(e, g.now(), map[*burstRecord]bool{})
	e.mu.Unlock()
	if n := g.trust.Load().CRL().Number; err != nil || n.Cmp(before) != 0 || !g.trust.Load().IsRevoked(serial) {
		t.Fatalf("a second past the burst's end: the list is number %v (was %v), names the certificate: %v (%v); want it as it was",
			n, before, g.trust.Load().IsRevoked(serial), err)
	}
	ahead.Store(int64(MinBurstTTL + certs.MaxClockSkew + time.Second))
	waitUntil(t, 10*time.Second, "the expired certificate off the list", func() bool { return !g.trust.Load().IsRevoked(serial) })
	crl := g.trust.Load().CRL()
	if crl.Number.Cmp(before) <= 0 || len(crl.RevokedCertificateEntries) != 0 {
		t.Fatalf("the list in force is number %v with %d entries; want one after %v, with none", crl.Number, len(crl.RevokedCertificateEntries), before)
	}
	// Not signed again with nothing left to drop.
	n := crl.Number
	e.mu.Lock()
	err = g.delistEnded(e, g.now(), map[*burstRecord]bool{})
	e.mu.Unlock()
	if got := g.trust.Load().CRL().Number; err != nil || got.Cmp(n) != 0 {
		t.Errorf("looked at again: the list is number %v, was %v (%v); want it left as it was", got, n, err)
	}
}
