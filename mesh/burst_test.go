package mesh

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
	"github.com/skybridge-mesh/skybridge/policy"
)

// amsSite is the burst site the tests open.
var amsSite = BurstSite{Site: "burst-ams", Provider: "aws", Region: "eu-west-1", Jurisdiction: "NL", Routes: []string{"10.77.0.0/24"}}

func TestPickOverlayIP(t *testing.T) {
	p := netip.MustParsePrefix("100.96.0.0/16")
	addrs := func(ss ...string) map[netip.Addr]bool {
		m := map[netip.Addr]bool{}
		for _, s := range ss {
			m[netip.MustParseAddr(s)] = true
		}
		return m
	}
	for _, tc := range []struct {
		name   string
		prefix netip.Prefix
		used   map[netip.Addr]bool
		want   string
	}{
		{"top of the range, not the broadcast address", p, nil, "100.96.255.254"},
		{"skips used addresses", p, addrs("100.96.255.254", "100.96.255.253"), "100.96.255.252"},
		{"small range", netip.MustParsePrefix("10.0.0.0/30"), addrs("10.0.0.2"), "10.0.0.1"},
		{"full", netip.MustParsePrefix("10.0.0.0/30"), addrs("10.0.0.2", "10.0.0.1"), ""},
		{"IPv6", netip.MustParsePrefix("fd00::/64"), nil, "fd00::ffff:ffff:ffff:fffe"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := pickOverlayIP(tc.prefix, tc.used)
			if tc.want == "" {
				if err == nil {
					t.Fatalf("got %s, want an error", got)
				}
				return
			}
			if err != nil || got.String() != tc.want {
				t.Fatalf("got %v, %v; want %s", got, err, tc.want)
			}
		})
	}
}

func TestBurstRequestValidation(t *testing.T) {
	mesh := netip.MustParsePrefix("100.96.0.0/16")
	good := BurstRequest{BurstSite: amsSite, TTL: time.Hour}
	a, err := good.attributes(mesh)
	if err != nil {
		t.Fatalf("valid request refused: %v", err)
	}
	// Its gateways' certificates say they are a burst's.
	if a.Labels[certs.BurstLabel] != "true" {
		t.Fatalf("a burst's attributes lack %s: %v", certs.BurstLabel, a.Labels)
	}
	for _, tc := range []struct {
		name string
		edit func(*BurstRequest)
		want string
	}{
		{"no routes", func(r *BurstRequest) { r.Routes = nil }, "needs --routes"},
		{"bad route", func(r *BurstRequest) { r.Routes = []string{"10.77.0.1/24"} }, "host bits"},
		{"route in the overlay", func(r *BurstRequest) { r.Routes = []string{"100.96.9.0/24"} }, "overlaps the mesh overlay range"},
		{"bad jurisdiction", func(r *BurstRequest) { r.Jurisdiction = "XX" }, "ISO 3166-1"},
		{"bad site", func(r *BurstRequest) { r.Site = "Burst_AMS" }, `site "Burst_AMS" is not valid`},
		{"long site", func(r *BurstRequest) { r.Site = strings.Repeat("a", 60) }, "longer than 58"},
		{"short ttl", func(r *BurstRequest) { r.TTL = time.Second }, "too short"},
		{"long ttl", func(r *BurstRequest) { r.TTL = 30 * 24 * time.Hour }, "too long"},
		{"token ttl", func(r *BurstRequest) { r.TokenTTL = time.Millisecond }, "--token-ttl"},
		{"gateways", func(r *BurstRequest) { r.Gateways = 1000 }, "--gateways 1000"},
		{"skybridge's label", func(r *BurstRequest) { r.Labels = map[string]string{certs.BurstLabel: "false"} }, "set by skybridge"},
		{"labels", func(r *BurstRequest) {
			r.Labels = map[string]string{}
			for i := range certs.MaxLabels {
				r.Labels[fmt.Sprintf("l%d", i)] = "v"
			}
		}, "as skybridge adds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := good
			tc.edit(&r)
			_, err := r.attributes(mesh)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
			if n := strings.Count(err.Error(), "labels given"); n > 1 {
				t.Fatalf("got %v: the labels counted %d times, with different counts", err, n)
			}
		})
	}
}

// TestBurstBook walks tokens through their life: redeemed once, refused
// when used, expired, mistyped or void because the burst ended.
func TestBurstBook(t *testing.T) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 11, 26, 9, 0, 0, 0, time.UTC)
	ep := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:7947")}
	mk := func(exp time.Time) *certs.JoinToken {
		tok, err := certs.NewJoinToken("burst-ams", ca.Certificate(), ep, exp)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	a, b := mk(t0.Add(30*time.Minute)), mk(t0.Add(time.Minute))
	req := BurstRequest{BurstSite: amsSite, TTL: time.Hour}
	attrs, err := req.attributes(netip.MustParsePrefix("100.96.0.0/16"))
	if err != nil {
		t.Fatal(err)
	}
	var bk burstBook
	rec, err := bk.open(req, attrs, []*certs.JoinToken{a, b}, t0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bk.open(req, attrs, nil, t0); err == nil || !strings.Contains(err.Error(), "already open") {
		t.Fatalf("a second open burst of the same site: %v", err)
	}
	other := attrs
	other.Site = "burst-par"
	if _, err := bk.open(BurstRequest{BurstSite: BurstSite{Site: "burst-par"}, TTL: time.Hour}, other, nil, t0); err == nil || !strings.Contains(err.Error(), "overlaps 10.77.0.0/24 of open burst site burst-ams") {
		t.Fatalf("a burst claiming an open burst's routes: %v", err)
	}
	if h := a.SecretHash(); rec.Tokens[0].Hash != hex.EncodeToString(h[:]) {
		t.Fatalf("the book keeps %q for the token, want its SHA-256", rec.Tokens[0].Hash)
	}
	if saved, _ := json.Marshal(&bk); bytes.Contains(saved, []byte(base64.RawURLEncoding.EncodeToString(a.Secret))) ||
		bytes.Contains(saved, []byte(hex.EncodeToString(a.Secret))) {
		t.Fatal("the book holds the token's secret")
	}

	refused := func(id string, secret []byte, at time.Time, want string) {
		t.Helper()
		_, _, _, err := bk.redeem(id, secret, "k1", at)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("redeem %s at %s: %v, want an error saying %q", id, at.Format(time.Kitchen), err, want)
		}
	}
	refused("0123456789abcdef", a.Secret, t0, "not recognised")
	refused(a.ID, b.Secret, t0, "not recognised")
	refused(b.ID, b.Secret, t0.Add(2*time.Minute), "expired")

	r, i, again, err := bk.redeem(a.ID, a.Secret, "k1", t0.Add(time.Minute))
	if err != nil || r != rec || i != 0 || again {
		t.Fatalf("redeem: %v %v %d, again %v", r, err, i, again)
	}
	used := t0.Add(time.Minute)
	rec.Tokens[0].Used, rec.Tokens[0].Node, rec.Tokens[0].Serial, rec.Tokens[0].Key = &used, rec.nodeName(0), "0a", "k0"
	refused(a.ID, a.Secret, t0.Add(2*time.Minute), "already used") // another key
	// The key it was used with asks again (the answer was lost): once
	// more, but only within the token's life and with its secret.
	if _, _, again, err := bk.redeem(a.ID, a.Secret, "k0", t0.Add(2*time.Minute)); err != nil || !again {
		t.Fatalf("the same key asking again: again %v, %v", again, err)
	}
	if _, _, _, err := bk.redeem(a.ID, b.Secret, "k0", t0.Add(2*time.Minute)); err == nil {
		t.Fatal("the same key asking again with the wrong secret was answered")
	}
	if _, _, _, err := bk.redeem(a.ID, a.Secret, "k0", t0.Add(31*time.Minute)); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("the same key asking again after the token's life: %v", err)
	}
	if got := rec.nodeName(0); got != "burst-ams-gw1" {
		t.Fatalf("node name %s", got)
	}

	if d := bk.due(t0.Add(59 * time.Minute)); len(d) != 0 {
		t.Fatalf("due before expiry: %v", d)
	}
	if d := bk.due(t0.Add(time.Hour)); len(d) != 1 {
		t.Fatalf("due at expiry: %v", d)
	}
	if serials := rec.end("ended by burst down", t0.Add(10*time.Minute)); !slices.Equal(serials, []string{"0a"}) {
		t.Fatalf("serials to revoke: %v", serials)
	}
	refused(b.ID, b.Secret, t0.Add(10*time.Minute), "ended")
	// Ended early, the gateway stopped before the CA revoked its
	// certificates: due again, until they are revoked or expire.
	if d := bk.due(t0.Add(20 * time.Minute)); len(d) != 1 || d[0] != rec {
		t.Fatalf("an ended burst whose certificates are not revoked is not due: %v", d)
	}
	if d := bk.due(t0.Add(2 * time.Hour)); len(d) != 0 {
		t.Fatalf("an ended burst whose certificates expired is due: %v", d)
	}
	rec.CertsRevoked = true
	if d := bk.due(t0.Add(20 * time.Minute)); len(d) != 0 {
		t.Fatalf("an ended burst is not due again: %v", d)
	}
	if bk.find("burst-ams") != nil {
		t.Fatal("an ended burst is not open")
	}
	if _, err := bk.open(req, attrs, nil, t0.Add(11*time.Minute)); err != nil {
		t.Fatalf("the site may be opened again once ended: %v", err)
	}
	if !bk.prune(t0.Add(10*time.Minute+endedKept+time.Second)) || len(bk.Bursts) != 1 {
		t.Fatalf("prune kept %d bursts", len(bk.Bursts))
	}
	// An ended Vault burst stays until burst down has removed its Vault
	// objects, however long ago it ended.
	vr := &burstRecord{BurstSite: BurstSite{Site: "burst-v"}, Vault: true}
	vr.end("expired", t0)
	bk.Bursts = append(bk.Bursts, vr)
	if bk.prune(t0.Add(10*endedKept)) || len(bk.Bursts) != 2 {
		t.Fatalf("an ended Vault burst with its Vault objects left was pruned: %d bursts", len(bk.Bursts))
	}
	vr.VaultCleaned = true
	if !bk.prune(t0.Add(10*endedKept)) || len(bk.Bursts) != 1 {
		t.Fatalf("an ended and cleaned Vault burst was kept: %d bursts", len(bk.Bursts))
	}
}

// openBurst runs a gateway that holds the embedded CA in dir and opens
// an hour's burst of amsSite on it, whose tokens name its enrollment
// endpoint.
func openBurst(t *testing.T) (dir string, ca *certs.CA, grant *BurstGrant) {
	t.Helper()
	dir = t.TempDir()
	ca = meshCA(t, dir)
	hq := startEnroller(t, ca, dir, &syncbuf.Buffer{})
	grant, err := hq.g.BurstUp(context.Background(), BurstRequest{BurstSite: amsSite, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return dir, ca, grant
}

// TestBurstEnrollmentAskedAgain: a burst gateway whose enrollment answer
// was lost — the network dropped it, or the gateway crashed with part of
// the identity stored — asks again with the key it kept and gets the
// certificate it was issued, with its name and address; the token stays
// spent for every other key.
func TestBurstEnrollmentAskedAgain(t *testing.T) {
	dir, ca, grant := openBurst(t)
	bs := liveSettings(t, filepath.Join(dir, "burst"))
	// The first ask, as Join makes it; its answer never arrives, but
	// the certificate in it was stored before the crash.
	tok, body := burstAsk(t, grant.Tokens[0], bs.Identity.Dir)
	lost, err := postEnroll(context.Background(), tok, body, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bs.Identity.Dir, "node.crt"), lost.Certificate, 0o644); err != nil {
		t.Fatal(err)
	}
	lostCerts, err := certs.ParseCertificatesPEM(lost.Certificate)
	if err != nil || len(lostCerts) != 1 {
		t.Fatal(lostCerts, err)
	}
	lostCert := lostCerts[0]

	enr, err := Join(context.Background(), bs, grant.Tokens[0], nil)
	if err != nil {
		t.Fatalf("asking again after a lost answer: %v", err)
	}
	id, err := certs.LoadNodeIdentity(bs.Identity.Dir)
	if err != nil {
		t.Fatal(err)
	}
	got := id.Certificate()
	if enr.Node != "burst-ams-gw1" || !got.Equal(lostCert) || !id.Attributes().OverlayIP.IsValid() {
		t.Fatalf("enrollment %+v with serial %s; want the lost one, %s", enr, got.SerialNumber, lostCert.SerialNumber)
	}
	if valid, err := ca.SerialsOfNode("burst-ams-gw1", time.Now()); err != nil || len(valid) != 1 || valid[0].Cmp(lostCert.SerialNumber) != 0 {
		t.Fatalf("the gateway's valid certificates: %v, %v; want the lost one alone", valid, err)
	}
	if _, err := os.Stat(filepath.Join(bs.Identity.Dir, filePendingEnrollment)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the pending enrollment's key stayed after the identity was stored: %v", err)
	}
	if _, err := Join(context.Background(), liveSettings(t, t.TempDir()), grant.Tokens[0], nil); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("the spent token with another key: %v", err)
	}
	// Revoked by the operator (its key stolen with the token), the
	// gateway's certificate is not replaced by asking again.
	if _, err := ca.RevokeNode("burst-ams-gw1", "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := postEnroll(context.Background(), tok, body, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "is revoked") {
		t.Fatalf("a revoked gateway's key and token asking again: %v, want a refusal", err)
	}
	if valid, err := ca.SerialsOfNode("burst-ams-gw1", time.Now()); err == nil {
		t.Fatalf("the revoked gateway holds a valid certificate again: %v", valid)
	}
}

// TestBurstEnrollmentAskedAgainIssuesNothing: the holder of a spent token
// and of the key it enrolled (an enrolled burst gateway) may ask again as
// often as it likes until the token expires. Each ask was answered with a
// new certificate and the previous one revoked as superseded, on the
// mesh's revocation list until the burst's end: one burst server could
// grow the list every gateway gossips past what gossip carries. Asked
// again, the enrolling gateway now sends the certificate it issued.
func TestBurstEnrollmentAskedAgainIssuesNothing(t *testing.T) {
	dir, ca, grant := openBurst(t)
	bs := liveSettings(t, filepath.Join(dir, "burst"))
	tok, body := burstAsk(t, grant.Tokens[0], bs.Identity.Dir)
	log := slog.New(slog.DiscardHandler)
	first, err := postEnroll(context.Background(), tok, body, log)
	if err != nil {
		t.Fatal(err)
	}
	crlBefore := crlEntries(t, ca)
	issuedBefore, _ := ca.Issued()
	for i := range 20 {
		res, err := postEnroll(context.Background(), tok, body, log)
		if err != nil {
			t.Fatalf("ask %d: %v", i+2, err)
		}
		if !bytes.Equal(res.Certificate, first.Certificate) {
			t.Fatalf("ask %d was answered with another certificate", i+2)
		}
	}
	if n := crlEntries(t, ca); n != crlBefore {
		t.Errorf("20 asks again put %d certificates on the revocation list", n-crlBefore)
	}
	if issued, _ := ca.Issued(); len(issued) != len(issuedBefore) {
		t.Errorf("20 asks again had the CA issue %d certificates", len(issued)-len(issuedBefore))
	}
}

// TestBurstEnrollmentAskedAgainOfAnEarlierRelease: a token used before
// the enrolling gateway kept the certificates it issued has its
// certificate issued once more when asked again (the lost one revoked as
// superseded), and that one kept: a second ask issues nothing.
func TestBurstEnrollmentAskedAgainOfAnEarlierRelease(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	hq := startEnroller(t, ca, dir, &syncbuf.Buffer{})
	grant, err := hq.g.BurstUp(context.Background(), BurstRequest{BurstSite: amsSite, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	bs := liveSettings(t, filepath.Join(dir, "burst"))
	tok, body := burstAsk(t, grant.Tokens[0], bs.Identity.Dir)
	log := slog.New(slog.DiscardHandler)
	lost, err := postEnroll(context.Background(), tok, body, log)
	if err != nil {
		t.Fatal(err)
	}
	e := hq.g.enroll
	e.mu.Lock()
	e.book.find(amsSite.Site).Tokens[0].Cert = nil // as an earlier release recorded it
	e.mu.Unlock()
	reissued, err := postEnroll(context.Background(), tok, body, log)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(reissued.Certificate, lost.Certificate) {
		t.Fatal("no certificate kept, yet the lost one was sent")
	}
	lostCerts, err := certs.ParseCertificatesPEM(lost.Certificate)
	if err != nil {
		t.Fatal(err)
	}
	if tb, err := ca.TrustBundle(); err != nil || !tb.IsRevoked(lostCerts[0].SerialNumber) {
		t.Fatalf("the certificate superseded is not revoked: %v", err)
	}
	crlBefore := crlEntries(t, ca)
	for range 3 {
		res, err := postEnroll(context.Background(), tok, body, log)
		if err != nil || !bytes.Equal(res.Certificate, reissued.Certificate) {
			t.Fatalf("asked again after the certificate issued once more: %v; want that one", err)
		}
	}
	if n := crlEntries(t, ca); n != crlBefore {
		t.Errorf("asked again after the certificate issued once more, %d certificates were revoked", n-crlBefore)
	}
}

// crlEntries counts the certificates on the CA's revocation list.
func crlEntries(t *testing.T, ca *certs.CA) int {
	t.Helper()
	b, err := ca.CRLPEM()
	if err != nil {
		t.Fatal(err)
	}
	crl, err := certs.ParseCRL(b)
	if err != nil {
		t.Fatal(err)
	}
	return len(crl.RevokedCertificateEntries)
}

// TestBurstLifecycle runs a CA-holding gateway and a static one, opens a
// burst site of two gateways, enrols one with its token over the real
// enrollment endpoint, and checks that it peers with routes; that the
// token cannot be used twice, a wrong secret or a foreign CA pin gets
// nowhere; and that taking the burst down revokes it, ends the burst
// gateway's run, removes it from every configuration and membership, and
// voids the unused token.
func TestBurstLifecycle(t *testing.T) {
	dir := t.TempDir()
	logs := &syncbuf.Buffer{}
	ca := meshCA(t, dir)
	defer func() {
		if t.Failed() {
			t.Logf("logs:\n%s", logs.String())
		}
	}()
	hq := startEnroller(t, ca, dir, logs)
	seed := []string{hq.g.s.GossipAdvertise.String()}
	fra := startLiveGatewayWith(t, ca, dir, 1, "aws-fra", seed, logs, nil)
	waitUntil(t, 20*time.Second, "the two static gateways peer", func() bool { return len(hq.dev.Peers()) == 1 && len(fra.dev.Peers()) == 1 })

	if _, err := fra.g.BurstUp(context.Background(), BurstRequest{BurstSite: BurstSite{Site: "burst-ams"}}); err == nil || !strings.Contains(err.Error(), "does not open burst sites") {
		t.Fatalf("burst up on a gateway without the CA: %v", err)
	}
	req := BurstRequest{BurstSite: amsSite, TTL: time.Hour, Gateways: 2}
	sameName := BurstRequest{BurstSite: BurstSite{Site: "zrh-dc", Provider: "aws", Region: "x", Jurisdiction: "NL", Routes: []string{"10.78.0.0/24"}}, TTL: time.Hour}
	if _, err := hq.g.BurstUp(context.Background(), sameName); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("a burst named like an existing site: %v", err)
	}
	// A site the CA certified whose gateway is not running: the mesh does
	// not see its routes, the CA would refuse every enrollment.
	if _, err := ca.IssueIdentity(certs.Attributes{Node: "gw-gone", Site: "onprem-gone", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.9.9"), Routes: []netip.Prefix{netip.MustParsePrefix("10.88.0.0/16")}}, time.Hour, time.Now()); err != nil {
		t.Fatal(err)
	}
	offline := BurstRequest{BurstSite: BurstSite{Site: "burst-x", Provider: "aws", Region: "x", Jurisdiction: "NL", Routes: []string{"10.88.1.0/24"}}, TTL: time.Hour}
	if _, err := hq.g.BurstUp(context.Background(), offline); err == nil || !strings.Contains(err.Error(), "overlaps 10.88.0.0/16 of site onprem-gone") {
		t.Fatalf("a burst over an offline site's routes: %v", err)
	}
	// Nor its name: the burst would pass for it, and its end revoke it.
	offlineName := BurstRequest{BurstSite: BurstSite{Site: "onprem-gone", Provider: "aws", Region: "x", Jurisdiction: "US", Routes: []string{"10.89.0.0/24"}}, TTL: time.Hour}
	if _, err := hq.g.BurstUp(context.Background(), offlineName); err == nil || !strings.Contains(err.Error(), "site onprem-gone has a gateway certified by this CA (gw-gone") {
		t.Fatalf("a burst named like an offline site: %v", err)
	}
	grant, err := hq.g.BurstUp(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if len(grant.Tokens) != 2 || grant.Expires.Sub(grant.TokenExpires) < 29*time.Minute {
		t.Fatalf("grant: %+v", grant)
	}
	tokA, tokB := grant.Tokens[0], grant.Tokens[1]

	// Tokens that must get nowhere: a wrong secret, a foreign CA pin.
	other, err := certs.InitCA(filepath.Join(dir, "other-ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := certs.ParseJoinToken(tokA)
	if err != nil {
		t.Fatal(err)
	}
	wrongSecret := *parsed
	wrongSecret.Secret = make([]byte, 32)
	foreignPin := *parsed
	foreignPin.CAPin = certs.CAPin(other.Certificate())
	for _, tc := range []struct{ tok, want string }{
		{wrongSecret.Encode(), "not recognised"},
		{foreignPin.Encode(), "not the one the join token pins"},
		{"sbj1.garbage!", "damaged"},
	} {
		s := liveSettings(t, t.TempDir())
		if _, err := Join(context.Background(), s, tc.tok, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("join with a bad token: %v, want an error saying %q", err, tc.want)
		}
		if _, err := os.Stat(filepath.Join(s.Identity.Dir, "node.key")); err == nil {
			t.Fatal("a refused enrollment left a key behind")
		}
	}

	bs := liveSettings(t, filepath.Join(dir, "burst1"))
	enr, err := Join(context.Background(), bs, tokA, nil)
	if err != nil {
		t.Fatal(err)
	}
	if enr.Node != "burst-ams-gw1" || enr.Site != "burst-ams" || !slices.Contains(enr.Seeds, seed[0]) {
		t.Fatalf("enrollment: %+v", enr)
	}
	for name, mode := range map[string]os.FileMode{"node.key": 0o600, certs.FileGossipKeyring: 0o600} {
		if fi, err := os.Stat(filepath.Join(bs.Identity.Dir, name)); err != nil || fi.Mode().Perm() != mode {
			t.Fatalf("%s: %v %v", name, fi, err)
		}
	}
	// The token is spent: a second gateway cannot use it.
	if _, err := Join(context.Background(), liveSettings(t, t.TempDir()), tokA, nil); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("token reuse: %v", err)
	}
	// A restart with the same token uses the stored identity.
	if again, err := Join(context.Background(), bs, tokA, nil); err != nil || again.Node != enr.Node {
		t.Fatalf("restart of an enrolled gateway: %v %v", again, err)
	}

	burst := runLiveGateway(t, bs, logs)
	routes := netip.MustParsePrefix("10.77.0.0/24")
	carries := func(lg *liveGateway) bool {
		for _, p := range lg.dev.Peers() {
			for _, n := range p.AllowedIPs {
				if prefixOf(n) == routes {
					return true
				}
			}
		}
		return false
	}
	waitUntil(t, 20*time.Second, "both static gateways route the burst site's prefix to it", func() bool { return carries(hq) && carries(fra) })
	waitUntil(t, 20*time.Second, "the burst gateway peers with both", func() bool { return len(burst.dev.Peers()) == 2 })
	if st, err := burst.g.Status(); err != nil || st.BurstUntil == nil || st.BurstUntil.Sub(grant.Expires).Abs() > 5*time.Second {
		t.Fatalf("a burst gateway's status should say when it leaves (%v): %v", grant.Expires, err)
	}
	burstIP := burst.g.id.Load().Attributes().OverlayIP
	if !strings.HasPrefix(burstIP.String(), "100.127.255.") {
		t.Fatalf("burst gateway's overlay IP %s: expected from the top of 100.64.0.0/10", burstIP)
	}
	list, err := hq.g.Bursts()
	if err != nil || len(list) != 1 || len(list[0].Gateways) != 1 || list[0].TokensUnused != 1 || list[0].Gateways[0].Node != "burst-ams-gw1" {
		t.Fatalf("bursts: %+v %v", list, err)
	}

	down, err := hq.g.BurstDown(context.Background(), "burst-ams", "")
	if err != nil {
		t.Fatal(err)
	}
	if len(down.Revoked) != 1 || down.Ended == nil || down.TokensVoided != 1 || down.TokensUnused != 0 || down.TokensVoid != 1 {
		t.Fatalf("burst down: %+v; want one identity revoked, one unused token made void", down)
	}
	// Listed after: the token no gateway used is void, not unused.
	if list, err := hq.g.Bursts(); err != nil || len(list) != 1 || list[0].TokensUnused != 0 || list[0].TokensVoid != 1 {
		t.Fatalf("bursts after burst down: %+v %v; want its unused token void", list, err)
	}
	select {
	case <-burst.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the burst gateway did not leave after its certificate was revoked")
	}
	var ended *BurstEndedError
	if !errors.As(burst.err, &ended) || ended.Site != "burst-ams" {
		t.Fatalf("burst gateway's run ended with %v", burst.err)
	}
	for _, name := range []string{"node.key", "node.crt", certs.FileWireGuardKey, certs.FileGossipKeyring} {
		if _, err := os.Stat(filepath.Join(bs.Identity.Dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind after the burst: %v", name, err)
		}
	}
	for _, lg := range []*liveGateway{hq, fra} {
		waitUntil(t, 20*time.Second, "the burst gateway gone from every configuration and membership", func() bool {
			for _, m := range lg.g.members.snapshot() {
				if m.Name == "burst-ams-gw1" {
					return false
				}
			}
			return len(lg.dev.Peers()) == 1 && !carries(lg)
		})
	}
	if _, err := Join(context.Background(), liveSettings(t, t.TempDir()), tokB, nil); err == nil || !strings.Contains(err.Error(), "ended") {
		t.Fatalf("the unused token of an ended burst: %v", err)
	}
	// A restart of the ended burst gateway does not bring it back, and a
	// supervisor restarting it with its old token gets the end, not an
	// enrollment failure (the command exits 0 on it).
	if _, err := Join(context.Background(), bs, tokA, nil); !errors.As(err, &ended) {
		t.Fatalf("restart with the ended burst's token: %v", err)
	}
	if _, err := newGateway(context.Background(), bs, nil, options{device: NewRecordingDevice("again"), noControl: true, noMigrations: true}); !errors.As(err, &ended) {
		t.Fatalf("restart after the burst ended: %v", err)
	}
}

// TestBurstVaultUnreachable: burst down refuses to close a Vault burst
// whose objects this gateway cannot reach — it is not Vault-backed any
// more, or its Vault settings now put a burst's objects elsewhere, where
// closing would find nothing and report success — and says what to run
// by hand; a gateway whose settings still match, or a record made before
// places were recorded, closes it.
func TestBurstVaultUnreachable(t *testing.T) {
	t0 := time.Date(2026, 11, 26, 9, 0, 0, 0, time.UTC)
	place := certs.VaultBurstPlace{PKIMount: "pki", AppRoleMount: "approle", KVMount: "kv", KVPrefix: "skybridge", Name: "skybridge-burst-ams"}
	moved := place
	moved.KVPrefix, moved.Name = "sb", "sb-burst-ams"
	rec := func(p *certs.VaultBurstPlace, cleaned bool) *burstRecord {
		return &burstRecord{
			BurstSite: BurstSite{Site: "burst-ams"}, BurstLife: BurstLife{Created: t0, Expires: t0.Add(time.Hour)},
			Tokens: []burstToken{{Node: "burst-ams-gw1"}, {Node: "burst-ams-gw2"}},
			Vault:  true, VaultCleaned: cleaned, VaultPlace: p,
		}
	}
	byHand := []string{
		"\n  vault delete auth/approle/role/skybridge-burst-ams\n",
		"\n  vault kv metadata delete -mount=kv skybridge/nodes/burst-ams-gw2/wireguard\n",
		"\n  vault kv metadata delete -mount=kv skybridge/bursts/burst-ams",
	}
	for _, tc := range []struct {
		name string
		r    *burstRecord
		here *certs.VaultBurstPlace
		at   time.Time
		want []string // nil: burst down goes ahead
	}{
		{"settings unchanged", rec(&place, false), &place, t0, nil},
		{"objects already removed", rec(&place, true), nil, t0, nil},
		{"recorded before places were", rec(nil, false), &moved, t0, nil},
		{"not Vault-backed, burst running", rec(&place, false), nil, t0, append([]string{"not Vault-backed now", "valid until 2026-11-26T10:00:00Z", "vault write pki/revoke"}, byHand...)},
		{"not Vault-backed, burst over", rec(&place, false), nil, t0.Add(2 * time.Hour), byHand},
		{"settings changed", rec(&place, false), &moved, t0, append([]string{`kv_prefix "skybridge" → "sb"`, "restore the settings"}, byHand...)},
		{"not Vault-backed, no place recorded", rec(nil, false), nil, t0, []string{"<kv prefix>-burst-burst-ams", "vault kv metadata delete <kv mount>/<kv prefix>/bursts/burst-ams"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.r.vaultUnreachable(tc.here, tc.at)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("burst down would go ahead")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if tc.at.After(tc.r.Expires) && strings.Contains(err.Error(), "revoke") {
				t.Errorf("advice to revoke certificates that have expired:\n%v", err)
			}
		})
	}
}

// TestBurstStrays: ending a burst also revokes what the CA issued for its
// site during the burst that the record does not name (an enrollment
// whose record was never saved), and nothing of other sites, other times
// or already revoked or expired, nor a certificate of another node name.
func TestBurstStrays(t *testing.T) {
	t0 := time.Date(2026, 11, 26, 9, 0, 0, 0, time.UTC)
	ended := t0.Add(30 * time.Minute)
	r := &burstRecord{BurstSite: BurstSite{Site: "burst-ams"}, BurstLife: BurstLife{Created: t0, Expires: t0.Add(time.Hour)},
		Tokens: []burstToken{{Serial: "01"}, {}}}
	revoked := t0.Add(10 * time.Minute)
	cert := func(serial, site string, nb time.Time) certs.IssuedCert {
		return certs.IssuedCert{Kind: certs.KindGateway, Serial: serial, Node: site + "-gw2", Site: site, NotBefore: nb.Add(-time.Minute), NotAfter: t0.Add(time.Hour)}
	}
	lasting := cert("07", "burst-ams", t0.Add(2*time.Minute)) // not a name of the burst's gateways
	lasting.Node = "ams-gw1"
	issued := []certs.IssuedCert{
		cert("01", "burst-ams", t0.Add(time.Minute)),   // named by the record
		cert("02", "burst-ams", t0.Add(2*time.Minute)), // the stray
		cert("03", "burst-par", t0.Add(2*time.Minute)), // another site
		cert("04", "burst-ams", t0.Add(-time.Hour)),    // an earlier burst of the name
		cert("06", "burst-ams", t0.Add(time.Hour+time.Minute)),
		lasting,
	}
	old := cert("05", "burst-ams", t0.Add(3*time.Minute))
	old.RevokedAt = &revoked
	issued = append(issued, old)
	if got := r.strays(issued, t0.Add(20*time.Minute)); !slices.Equal(got, []string{"02", "06"}) {
		t.Fatalf("open burst: strays %v, want 02 and 06 (no later burst of the name while it is open)", got)
	}
	r.Ended = &ended
	if got := r.strays(issued, ended); !slices.Equal(got, []string{"02"}) {
		t.Fatalf("ended burst: strays %v, want 02 (06 is a later burst's)", got)
	}
	if got := r.strays(issued, t0.Add(2*time.Hour)); len(got) != 0 {
		t.Fatalf("after the certificates expired: strays %v, want none", got)
	}
}

// TestEnrollmentEndpointTellsStrangersNothing: the enrollment endpoint
// answers anyone's TLS handshake; the certificate it shows names the
// gateway (what a newcomer checks against its token) but not its site,
// jurisdiction, routes or labels, and the mesh does not take it for a
// gateway's.
func TestEnrollmentEndpointTellsStrangersNothing(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	hq := startEnroller(t, ca, dir, &syncbuf.Buffer{})
	own := hq.g.id.Load().Attributes()
	if own.Jurisdiction == "" || own.Site == "" {
		t.Fatalf("the gateway's own certificate has nothing to hide: %+v", own)
	}
	var shown *x509.Certificate
	waitUntil(t, 10*time.Second, "the enrollment endpoint to answer", func() bool {
		conn, err := tls.Dial("tcp", hq.g.s.EnrollListen.String(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			return false
		}
		defer conn.Close()
		shown = conn.ConnectionState().PeerCertificates[0]
		return true
	})
	a, err := certs.AttributesOf(shown)
	if err != nil {
		t.Fatal(err)
	}
	if a.Node != own.Node || a.Site == own.Site || a.Jurisdiction != "" || len(a.Routes) != 0 || len(a.Labels) != 0 || slices.Contains(shown.Subject.OrganizationalUnit, own.Site) {
		t.Fatalf("a stranger is shown %+v (subject %s); want the gateway's name and nothing of %+v", a, shown.Subject, own)
	}
	if _, err := hq.g.trust.Load().VerifyCertificate(shown, time.Now()); err == nil {
		t.Fatal("the mesh takes the enrollment endpoint's certificate for a gateway's")
	}
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	if e := issued[len(issued)-1]; e.Kind != certs.KindEnroller || e.Serial != certs.FormatSerial(shown.SerialNumber) {
		t.Fatalf("the CA's record of it: %+v", e)
	}
}

// TestEnrollerCertRenewed: the enrollment endpoint's certificate is issued
// again once a third of its life is left, never past the CA's end.
func TestEnrollerCertRenewed(t *testing.T) {
	dir := t.TempDir()
	ca := meshCAFor(t, dir, 30*time.Hour)
	ec := &enrollerCert{ca: ca, log: slog.New(slog.DiscardHandler)}
	ip, now := netip.MustParseAddr("100.64.0.1"), time.Now()
	first, err := ec.get("hq-1", ip, now)
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := ec.get("hq-1", ip, now.Add(enrollerCertTTL/2)); again != first {
		t.Fatal("issued again with half its life left")
	}
	later, err := ec.get("hq-1", ip, now.Add(enrollerCertTTL*2/3+time.Minute))
	if err != nil || later == first {
		t.Fatalf("not issued again with less than a third of its life left: %v", err)
	}
	if end := ca.Certificate().NotAfter; later.Leaf.NotAfter.After(end) {
		t.Fatalf("the renewed certificate runs until %s, past the CA's end %s", later.Leaf.NotAfter, end)
	}
	// A newcomer whose clock is behind by what the mesh allows takes
	// even a certificate issued this second.
	if lag := now.Add(-certs.MaxClockSkew + time.Second); first.Leaf.NotBefore.After(lag) {
		t.Fatalf("the certificate is valid from %s: a newcomer whose clock says %s refuses it", first.Leaf.NotBefore, lag)
	}
	// With less than a third of a day left of the CA, not issued again
	// at every handshake.
	near := ca.Certificate().NotAfter.Add(-6 * time.Hour)
	c1, err := ec.get("hq-1", ip, near)
	if err != nil {
		t.Fatal(err)
	}
	if c2, err := ec.get("hq-1", ip, near.Add(time.Minute)); err != nil || c2 != c1 {
		t.Fatalf("near the CA's end, issued again a minute later: %v", err)
	}
}

// TestEnrollerCertReissuedOnceRevoked: `skybridge ca revoke --node` of
// the CA-holding gateway revokes its enrollment endpoint's certificate
// too; the endpoint kept presenting it until its renewal time (up to 16
// hours), and renewing gateways, which check the revocation list, refused
// it all that while. Once the gateway holds the list that revokes it, the
// endpoint presents a new one.
func TestEnrollerCertReissuedOnceRevoked(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	var tb atomic.Pointer[certs.TrustBundle] // the list the gateway holds
	ec := &enrollerCert{ca: ca, log: slog.New(slog.DiscardHandler), revoked: func(s *big.Int) bool { return tb.Load().IsRevoked(s) }}
	adopt := func() {
		b, err := ca.TrustBundle()
		if err != nil {
			t.Fatal(err)
		}
		tb.Store(b)
	}
	adopt()
	ip, now := netip.MustParseAddr("100.64.0.1"), time.Now()
	first, err := ec.get("hq-1", ip, now)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.RevokeNode("hq-1", "keyCompromise", now); err != nil {
		t.Fatal(err)
	}
	if c, err := ec.get("hq-1", ip, now.Add(time.Minute)); err != nil || c != first {
		t.Fatalf("issued again before the gateway holds the list that revokes it: %v", err)
	}
	adopt()
	later, err := ec.get("hq-1", ip, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if tb.Load().IsRevoked(later.Leaf.SerialNumber) {
		t.Fatalf("an hour after its revocation the endpoint presents certificate %s, which the list revokes", certs.FormatSerial(later.Leaf.SerialNumber))
	}
	if again, _ := ec.get("hq-1", ip, now.Add(2*time.Hour)); again != later {
		t.Fatal("the new certificate was issued again at the next handshake")
	}

	// The running endpoint: once the gateway adopts the list, a
	// handshake is shown a certificate it does not revoke.
	hq := startEnroller(t, ca, dir, &syncbuf.Buffer{})
	shown := func() *x509.Certificate {
		var c *x509.Certificate
		waitUntil(t, 10*time.Second, "the enrollment endpoint to answer", func() bool {
			conn, err := tls.Dial("tcp", hq.g.s.EnrollListen.String(), &tls.Config{InsecureSkipVerify: true})
			if err != nil {
				return false
			}
			defer conn.Close()
			c = conn.ConnectionState().PeerCertificates[0]
			return true
		})
		return c
	}
	served := shown()
	if _, err := ca.RevokeSerials([]*big.Int{served.SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	b, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	hq.g.adoptTrust(b, time.Now())
	if c := shown(); c.SerialNumber.Cmp(served.SerialNumber) == 0 || b.IsRevoked(c.SerialNumber) {
		t.Fatalf("after the gateway adopted the list revoking it, the endpoint still presents certificate %s", certs.FormatSerial(c.SerialNumber))
	}
}

// TestEnrollmentRefusedByTheCA: a certificate the CA refuses at an
// enrollment (the burst's route taken by another site since it opened) is
// a refusal the newcomer is told at once, not a failure it retries for a
// minute and then hears only "try again".
func TestEnrollmentRefusedByTheCA(t *testing.T) {
	dir, ca, grant := openBurst(t)
	if _, err := ca.IssueIdentity(certs.Attributes{Node: "gw-lon", Site: "onprem-lon", Region: "lon", Provider: "onprem", Jurisdiction: "GB",
		OverlayIP: netip.MustParseAddr("100.64.9.9"), Routes: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16")}}, time.Hour, time.Now()); err != nil {
		t.Fatal(err)
	}
	tok, body := burstAsk(t, grant.Tokens[0], filepath.Join(dir, "burst"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Retried, it would run into the context's deadline.
	if _, err := postEnroll(ctx, tok, body, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "overlaps 10.77.0.0/16 of site onprem-lon") {
		t.Fatalf("an enrollment the CA refuses: %v; want the reason, at once", err)
	}
}

// TestBurstOutlivingCARefused: a burst that would run past the CA's end
// is refused when it is opened, not at every enrollment once its tokens
// are out.
func TestBurstOutlivingCARefused(t *testing.T) {
	dir := t.TempDir()
	ca := meshCAFor(t, dir, 3*time.Hour)
	hq := startEnroller(t, ca, dir, &syncbuf.Buffer{})
	if _, err := hq.g.BurstUp(context.Background(), BurstRequest{BurstSite: amsSite, TTL: 6 * time.Hour}); err == nil || !strings.Contains(err.Error(), "past the end of the mesh CA") {
		t.Fatalf("a burst of 6 h under a CA with 3 h left: %v, want it refused", err)
	}
	if _, err := hq.g.BurstUp(context.Background(), BurstRequest{BurstSite: amsSite, TTL: time.Hour}); err != nil {
		t.Fatalf("a burst within the CA's life: %v", err)
	}
}

// TestBurstNamesFree: a burst may not take the name of a site, or of a
// node, that the CA has certified and that is still valid, whether its
// gateways are online or not.
func TestBurstNamesFree(t *testing.T) {
	now := time.Date(2026, 11, 27, 9, 0, 0, 0, time.UTC)
	gw := func(node, site string) certs.IssuedCert {
		return certs.IssuedCert{Serial: "0a", Node: node, Site: site, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}
	}
	revoked, expired, signer := gw("edge-gw1", "edge"), gw("edge-gw1", "edge"), gw("edge", "")
	revoked.RevokedAt = &now
	expired.NotAfter = now
	signer.Kind = certs.KindPolicySigner
	for _, tc := range []struct {
		name   string
		issued []certs.IssuedCert
		want   string // "" if free
	}{
		{"a lasting site of the name", []certs.IssuedCert{gw("gva-1", "edge")}, "site edge has a gateway certified by this CA (gva-1"},
		{"a node of another site named as the burst's second gateway", []certs.IssuedCert{gw("edge-gw2", "zrh")}, "node name edge-gw2"},
		{"a node named as a third gateway, of two", []certs.IssuedCert{gw("edge-gw3", "zrh")}, ""},
		{"the site's certificates revoked (an ended burst)", []certs.IssuedCert{revoked}, ""},
		{"the site's certificates expired", []certs.IssuedCert{expired}, ""},
		{"a policy signer's name", []certs.IssuedCert{signer}, ""},
		{"other sites only", []certs.IssuedCert{gw("zrh-1", "zrh")}, ""},
	} {
		err := burstNamesFree(tc.issued, "edge", 2, now)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}

// TestBurstEndLeftovers: a burst gateway records its burst's end before
// it forgets its identity; an identity a crash left beside an ended
// enrollment is removed at the next start, which then ends quietly, or
// enrols anew with a new join token, instead of refusing the directory as
// holding an identity no token made.
func TestBurstEndLeftovers(t *testing.T) {
	dir := t.TempDir()
	ended := time.Now().UTC()
	if err := saveEnrollment(dir, &Enrollment{Site: "burst-ams", Node: "burst-ams-gw1", TokenID: "t1", Ended: &ended, Reason: "expired"}); err != nil {
		t.Fatal(err)
	}
	leftovers := func() {
		for _, f := range []string{"node.key", "node.crt", filePendingEnrollment, ".node.key.tmp-123", "." + certs.FileGossipKeyring + ".tmp-9", "." + filePendingEnrollment + ".tmp-7"} {
			if err := os.WriteFile(filepath.Join(dir, f), []byte("left by a crash"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	gone := func(when string) {
		t.Helper()
		if certs.HasNodeCertificate(dir) {
			t.Fatalf("%s: the ended burst's identity is still there", when)
		}
		for _, f := range []string{filePendingEnrollment, ".node.key.tmp-123", "." + certs.FileGossipKeyring + ".tmp-9", "." + filePendingEnrollment + ".tmp-7"} {
			if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s: %s, which may hold a key, is still there (%v)", when, f, err)
			}
		}
	}
	leftovers()
	var ended1 *BurstEndedError
	if _, _, err := applyEnrollment(&Settings{Identity: certs.Config{Dir: dir}}); !errors.As(err, &ended1) {
		t.Fatalf("a start after the end: %v, want the burst's end", err)
	}
	gone("after a start")
	leftovers()
	s := &Settings{Identity: certs.Config{Dir: dir}}
	if _, err := Join(context.Background(), s, "sbj1.garbage!", nil); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("a new token after the end: %v, want the token read (and refused as damaged)", err)
	}
	gone("after a new token")
}

// TestEnrollmentTrustsThePinnedCAOnly: the newcomer keeps, of the CAs an
// enrollment answer carries, the one its token pins (and CAs it signed).
// Whoever answered could otherwise plant a CA of its own, whose
// certificates, policies and revocation lists the newcomer would take.
func TestEnrollmentTrustsThePinnedCAOnly(t *testing.T) {
	dir := t.TempDir()
	prefix := netip.MustParsePrefix("100.96.0.0/16")
	ca, err := certs.InitCA(filepath.Join(dir, "ca"), certs.InitOptions{MeshPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	rogue, err := certs.InitCA(filepath.Join(dir, "rogue"), certs.InitOptions{MeshPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	cert, err := ca.Issue(certs.IssueRequest{Attributes: certs.Attributes{Node: "burst-ams-gw1", Site: "burst-ams", Region: "eu-west-1", Provider: "aws",
		Jurisdiction: "NL", OverlayIP: netip.MustParseAddr("100.96.255.254")}, PublicKey: &key.PublicKey, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	tb, _ := ca.TrustBundle()
	rtb, _ := rogue.TrustBundle()
	kr, _ := certs.GenerateGossipKeyring()
	res := &enrollResponse{
		Certificate: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		CAs:         append(tb.CAPEM(), rtb.CAPEM()...), // the mesh's, and one planted
		Keyring:     kr.MarshalSecret(),
	}
	tok := &certs.JoinToken{ID: "tok1", Site: "burst-ams", CAPin: certs.CAPin(ca.Certificate())}
	idDir := filepath.Join(dir, "identity")
	if _, err := storeEnrollment(idDir, "", tok, key, res); err != nil {
		t.Fatal(err)
	}
	stored, err := certs.LoadTrustBundle(idDir, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if cas := stored.CAs(); len(cas) != 1 || !cas[0].Equal(ca.Certificate()) {
		t.Fatalf("the newcomer trusts %d CAs; want the pinned one alone", len(cas))
	}
}

// TestBurstRecordsDamaged: a damaged enrollment record, or pending
// enrollment, stops the gateway with what to do, not a bare "damaged".
func TestBurstRecordsDamaged(t *testing.T) {
	for file, want := range map[string]string{fileEnrollment: "new join token", filePendingEnrollment: "remove it"} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, file), []byte("{not json"), 0o600); err != nil {
			t.Fatal(err)
		}
		var err error
		if file == fileEnrollment {
			_, err = loadEnrollment(dir)
		} else {
			_, err = loadPending(dir)
		}
		if err == nil || !strings.Contains(err.Error(), "damaged") || !strings.Contains(err.Error(), want) {
			t.Errorf("%s damaged: err = %v; want it called damaged, and %q", file, err, want)
		}
	}
}

// TestPendingKeyKeptPrivate: the key kept for an enrollment under way is
// a private key, refused when others may read it (as after a careless
// restore), like node.key.
func TestPendingKeyKeptPrivate(t *testing.T) {
	dir := t.TempDir()
	const id = "0123456789abcdef"
	key, err := pendingKey(dir, nil, id)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, filePendingEnrollment)
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("kept as %v, %v; want mode 0600", fi.Mode(), err)
	}
	p, err := loadPending(dir)
	if err != nil || p == nil || p.TokenID != id {
		t.Fatalf("loadPending: %+v, %v", p, err)
	}
	if again, err := pendingKey(dir, p, id); err != nil || !again.Equal(key) {
		t.Fatalf("the kept key was not used again: %v", err)
	}
	os.Chmod(path, 0o644)
	if p, err := loadPending(dir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a kept key others may read: %+v, %v; want it refused, with chmod 600", p, err)
	}
}

// startEnrollingGateway runs a gateway that holds the embedded CA and
// enrols burst gateways on loopback, and waits for its endpoint.
func startEnrollingGateway(t *testing.T) (*liveGateway, *syncbuf.Buffer) {
	t.Helper()
	dir := t.TempDir()
	logs := &syncbuf.Buffer{}
	ca := meshCA(t, dir)
	hq := startEnroller(t, ca, dir, logs)
	waitUntil(t, 10*time.Second, "the enrollment endpoint", func() bool { return strings.Contains(logs.String(), "enrolling burst gateways") })
	return hq, logs
}

// TestEnrollmentRefusalsAreCheap: anyone who can reach the enrollment
// endpoint can have requests refused. A token ID that cannot be one is
// refused before it is looked up or logged, and refusals of well-formed
// ones are logged at most once a second, so that a client sending them
// back to back cannot fill the gateway's disk with its log. Their
// connections are closed, not kept for the endpoint's slots.
func TestEnrollmentRefusalsAreCheap(t *testing.T) {
	hq, logs := startEnrollingGateway(t)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := certs.CreateCSR(key, certs.Attributes{Node: "x", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "NL", OverlayIP: netip.MustParseAddr("100.64.0.9")})
	if err != nil {
		t.Fatal(err)
	}
	post := func(token string) int {
		body, _ := json.Marshal(enrollRequest{Token: token, Secret: make([]byte, 32), CSR: csr})
		res, err := client.Post("https://"+hq.g.s.EnrollListen.String()+"/v1/enroll", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if !res.Close {
			t.Fatal("an enrollment's answer keeps its connection open: it holds one of the endpoint's slots")
		}
		return res.StatusCode
	}
	huge := strings.Repeat("A", 60<<10)
	for range 20 {
		if code := post(huge); code != http.StatusForbidden {
			t.Fatalf("a 60 KiB token ID: HTTP %d, want 403", code)
		}
	}
	if strings.Contains(logs.String(), "AAAAAAAA") {
		t.Fatal("a malformed token ID was logged")
	}
	start := time.Now()
	const n = 50
	for range n {
		if code := post("0123456789abcdef"); code != http.StatusForbidden {
			t.Fatalf("an unknown token: HTTP %d, want 403", code)
		}
	}
	lines := strings.Count(logs.String(), "enrollment refused")
	if most := int(time.Since(start)/time.Second) + 2; lines > most || lines == 0 {
		t.Fatalf("%d refusals in %s logged %d times, want 1 to %d", n, time.Since(start).Round(time.Millisecond), lines, most)
	}
}

// TestEnrollmentPerSourceLimit: one address holding connections open
// without a word takes at most maxEnrollPerSource of the enrollment
// endpoint's slots; its next is closed at once, and a newcomer from
// another address is served meanwhile.
func TestEnrollmentPerSourceLimit(t *testing.T) {
	hq, logs := startEnrollingGateway(t)
	addr := hq.g.s.EnrollListen.String()
	// post sends an enrollment with an unknown token from source: a 403
	// is an answer, so the connection was served.
	post := func(source string) (int, error) {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}}
		client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: d.DialContext, TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		defer client.CloseIdleConnections()
		body, _ := json.Marshal(enrollRequest{Token: "0123456789abcdef", Secret: make([]byte, 32)})
		res, err := client.Post("https://"+addr+"/v1/enroll", "application/json", bytes.NewReader(body))
		if err != nil {
			return 0, err
		}
		res.Body.Close()
		return res.StatusCode, nil
	}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	var idle []net.Conn
	for range maxEnrollPerSource + 1 {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	// The one past the limit is closed at once (the others wait for a
	// ClientHello until the endpoint's 5 s handshake timeout).
	over := idle[maxEnrollPerSource]
	over.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := over.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection %d from one address: %v; want it closed by the endpoint", maxEnrollPerSource+1, err)
	}
	if code, err := post("127.0.0.1"); err != nil || code != http.StatusForbidden {
		t.Fatalf("an enrollment from another address while one holds its connections: %d %v; want it answered (403)", code, err)
	}
	if !strings.Contains(logs.String(), "enrollment connection turned away") || !strings.Contains(logs.String(), "127.0.0.2") {
		t.Error("the connection turned away was not logged with its address")
	}
	// Its connections closed, the address is served again.
	for _, c := range idle {
		c.Close()
	}
	waitUntil(t, 10*time.Second, "127.0.0.2 served again", func() bool {
		code, err := post("127.0.0.2")
		return err == nil && code == http.StatusForbidden
	})
}

// TestEnrollmentSource: connections count under their IPv4 address, or
// the /64 of an IPv6 one, which one host can spread its connections over.
func TestEnrollmentSource(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.7":               "192.0.2.7",
		"::ffff:192.0.2.7":        "192.0.2.7",
		"2001:db8:1:2:aaaa::1":    "2001:db8:1:2::",
		"2001:db8:1:2:ffff::9999": "2001:db8:1:2::",
		"2001:db8:1:3::1":         "2001:db8:1:3::",
	} {
		if got := sourceOf(netip.MustParseAddr(in)); got.String() != want {
			t.Errorf("%s counts as %s, want %s", in, got, want)
		}
	}
}

// TestBurstEndsByTheWallClock: a burst gateway woken from a suspension
// past its burst's end leaves the mesh at once: its end is judged by the
// wall clock, not by a timer, which the suspension did not move.
func TestBurstEndsByTheWallClock(t *testing.T) {
	defer func(d time.Duration) { burstClockCheck = d }(burstClockCheck)
	burstClockCheck = 10 * time.Millisecond
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	id, err := ca.IssueIdentity(certs.Attributes{Node: "burst-ams-gw1", Site: "burst-ams", Region: "r", Provider: "aws", Jurisdiction: "NL",
		OverlayIP: netip.MustParseAddr("100.64.9.1")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var step atomic.Int64
	g := &Gateway{log: slog.New(slog.DiscardHandler), revokedSelf: make(chan struct{}), burst: &Enrollment{Site: "burst-ams", Node: "burst-ams-gw1"},
		now: func() time.Time { return time.Now().Add(time.Duration(step.Load())) }}
	g.id.Store(id)
	ended := make(chan error, 1)
	go g.watchBurst(t.Context(), func(err error) { ended <- err })
	step.Store(int64(2 * time.Hour))
	select {
	case err := <-ended:
		var e *BurstEndedError
		if !errors.As(err, &e) || e.Reason != "its time is up" {
			t.Fatalf("the burst ended with %v; want its time up", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a burst gateway woken an hour after its burst ended stays on")
	}
}

// TestBurstEndCutShortIsFinished: a burst ended early is recorded as ended
// before its certificates are revoked. A gateway stopped in between finds
// it so: it revokes them then, rather than leave the burst's gateways
// certified until the burst would have expired.
func TestBurstEndCutShortIsFinished(t *testing.T) {
	hq, logs := startEnrollingGateway(t)
	if _, err := hq.g.BurstUp(context.Background(), BurstRequest{BurstSite: amsSite, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	e := hq.g.enroll
	e.mu.Lock()
	r := e.book.find("burst-ams")
	attrs := certs.Attributes{Node: r.nodeName(0), Site: r.Site, Region: r.Region, Provider: r.Provider, Jurisdiction: r.Jurisdiction,
		OverlayIP: netip.MustParseAddr("100.64.255.250")}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := e.ca.Issue(certs.IssueRequest{Attributes: attrs, PublicKey: key.Public(), TTL: time.Hour, Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	serial := certs.FormatSerial(cert.SerialNumber)
	now := time.Now()
	r.Tokens[0].Used, r.Tokens[0].Node, r.Tokens[0].Serial = &now, attrs.Node, serial
	r.end("ended by burst down", now) // and then the gateway stopped: not revoked
	if err := hq.g.state.saveBursts(e.book); err != nil {
		t.Fatal(err)
	}
	e.mu.Unlock()
	waitUntil(t, 10*time.Second, "the burst's certificate revoked", func() bool {
		issued, err := e.ca.Issued()
		if err != nil {
			return false
		}
		for _, c := range issued {
			if c.Serial == serial {
				return c.RevokedAt != nil
			}
		}
		return false
	})
	if !strings.Contains(logs.String(), "its certificates not yet revoked") {
		t.Error("finishing the end was not logged")
	}
}

// TestVaultBurstGatewayEndedWhileOff: a burst gateway Vault admitted,
// started again after its burst ended (stopped as it ended, or off across
// it), finds its certificate expired and forgets the burst before it logs
// in — rather than fail at Vault, again and again, with the mesh's gossip
// key and its SecretID left on a rented server.
func TestVaultBurstGatewayEndedWhileOff(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	s := liveSettings(t, filepath.Join(dir, "gw"))
	idDir := s.Identity.Dir
	attrs := certs.Attributes{Node: "burst-ams-gw1", Site: "burst-ams", Region: "eu-west-1", Provider: "aws", Jurisdiction: "NL",
		OverlayIP: netip.MustParseAddr("100.64.255.254")}
	id, err := ca.IssueIdentity(attrs, time.Hour, time.Now().Add(-3*time.Hour)) // ended two hours ago
	if err != nil {
		t.Fatal(err)
	}
	if err := id.Save(idDir, tb); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(idDir, certs.FileVaultSecretID)
	if err := os.WriteFile(secret, []byte("s.secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	enr := &Enrollment{Site: attrs.Site, Node: attrs.Node, TokenID: "0123456789abcdef", Enrolled: time.Now().Add(-3 * time.Hour),
		Vault: &VaultEnrollment{Address: "https://127.0.0.1:9", PKIMount: "pki", PKIRole: "r", KVMount: "kv", KVPrefix: "skybridge",
			MeshCIDR: "100.64.0.0/10", AppRoleMount: "approle", Node: attrs, PinIP: true}}
	if err := saveEnrollment(idDir, enr); err != nil {
		t.Fatal(err)
	}
	_, err = newGateway(context.Background(), s, slog.New(slog.DiscardHandler), options{device: NewRecordingDevice("x"), noControl: true, noMigrations: true})
	var ended *BurstEndedError
	if !errors.As(err, &ended) || ended.Site != "burst-ams" {
		t.Fatalf("starting after the burst ended: %v; want it ended", err)
	}
	for _, f := range []string{"node.key", "node.crt", certs.FileVaultSecretID} {
		if _, err := os.Stat(filepath.Join(idDir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", f, err)
		}
	}
}

// TestVaultJoinTakenUpAgain: a Vault enrollment cut short after its
// SecretID was unwrapped (Vault answers that once) and stored, before the
// enrollment was recorded, takes the stored SecretID up again with the
// same token instead of finding the token spent. A SecretID beside
// another role ID is not this token's, and the token is unwrapped.
func TestVaultJoinTakenUpAgain(t *testing.T) {
	dir := t.TempDir()
	attrs := certs.Attributes{Node: "burst-ams-gw1", Site: "burst-ams", Region: "eu-west-1", Provider: "aws", Jurisdiction: "NL",
		OverlayIP: netip.MustParseAddr("100.64.255.254")}
	tok := &certs.JoinToken{ID: "0123456789abcdef", Site: "burst-ams", Expires: time.Now().Add(time.Hour),
		Vault: &certs.VaultJoin{Address: "https://127.0.0.1:9", AppRoleMount: "approle", RoleID: "role-of-this-gateway", WrappedSecretID: "hvs.spent",
			PKIMount: "pki", PKIRole: "r", KVMount: "kv", KVPrefix: "skybridge", MeshCIDR: "100.64.0.0/10", Node: attrs, PinIP: true}}
	write := func(name, v string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(certs.FileVaultRoleID, "role-of-another-gateway")
	write(certs.FileVaultSecretID, "s.kept")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := joinVault(ctx, dir, tok, slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("a SecretID beside another role ID was taken for the token's")
	}
	if _, err := os.Stat(filepath.Join(dir, certs.FileVaultSecretID)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the other gateway's SecretID is still there, beside this token's role ID now: %v", err)
	}
	write(certs.FileVaultRoleID, tok.Vault.RoleID)
	write(certs.FileVaultSecretID, "s.kept")
	enr, err := joinVault(ctx, dir, tok, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("the enrollment taken up again: %v (it must not ask Vault, which is not there)", err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, certs.FileVaultSecretID)); string(got) != "s.kept\n" || enr.Node != attrs.Node {
		t.Fatalf("after taking it up again: secret %q, node %s", got, enr.Node)
	}
	if saved, err := loadEnrollment(dir); err != nil || saved == nil || saved.TokenID != tok.ID {
		t.Fatalf("the enrollment recorded: %+v %v", saved, err)
	}
}

// startEnroller runs a gateway of site zrh-dc that holds the CA and
// enrols burst gateways on a loopback port.
func startEnroller(t *testing.T, ca *certs.CA, dir string, logs io.Writer) *liveGateway {
	t.Helper()
	return startLiveGatewayWith(t, ca, dir, 0, "zrh-dc", nil, logs, func(s *Settings) {
		s.Identity.CADir = ca.Dir()
		s.EnrollListen = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(loopbackPort(t)))
		s.EnrollAdvertise = s.EnrollListen
	})
}

// burstAsk is the enrollment request a newcomer with the encoded join
// token makes, as Join makes it, with the key it keeps in identityDir.
func burstAsk(t *testing.T, token, identityDir string) (*certs.JoinToken, []byte) {
	t.Helper()
	tok, err := certs.ParseJoinToken(token)
	if err != nil {
		t.Fatal(err)
	}
	key, err := pendingKey(identityDir, nil, tok.ID)
	if err != nil {
		t.Fatal(err)
	}
	body, err := enrollBody(tok, key)
	if err != nil {
		t.Fatal(err)
	}
	return tok, body
}

// TestBurstClassVerdictsSayAudit: what burst up tells the operator a burst
// site may store says "audit" for a class its rules deny and audit mode
// lets through; before, it said allowed, with no reason.
func TestBurstClassVerdictsSayAudit(t *testing.T) {
	g := &Gateway{}
	g.policy.Store(&adoptedPolicy{p: mustPolicy(t, `policy {
  name    = "t"
  version = 1
}
class "pii-eu" {
  mode = "audit"
  allow "store" {
    jurisdiction = ["DE"]
  }
}
class "risk-batch" {
  allow "store" {
    jurisdiction = ["NL"]
  }
  allow "transit" {
    jurisdiction = ["NL"]
  }
}
class "secret" {
  allow "store" {
    jurisdiction = ["CH"]
  }
}
`)})
	a := certs.Attributes{Node: "burst-ams-gw1", Site: "burst-ams", Region: "eu-west-1", Provider: "aws", Jurisdiction: "NL"}
	got := map[string]ClassVerdict{}
	for _, v := range g.classVerdicts(a, time.Now()) {
		got[v.Class] = v
	}
	if v := got["pii-eu"]; !v.Allowed || !v.Audit || len(v.Reasons) == 0 {
		t.Errorf("pii-eu, denied by its rules, in audit mode: %+v; want allowed, audit, with the reasons", v)
	}
	if v := got["risk-batch"]; !v.Allowed || v.Audit {
		t.Errorf("risk-batch, allowed: %+v", v)
	}
	if v := got["secret"]; v.Allowed || v.Audit {
		t.Errorf("secret, denied: %+v", v)
	}
}

// TestBurstSiteNotOverAnAwaySite: a burst site may not take the name,
// gateway names or prefixes of a site whose gateways are away (crashed, or
// stopped for maintenance): the mesh still knows them by their last
// certificate. (Only gateways alive were checked, and Vault keeps no index
// to ask: a burst opened under the name of a site that was down was taken
// for it when its gateways returned.)
func TestBurstSiteNotOverAnAwaySite(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("gw-zrh", f.trust(), func() time.Time { return f.now }, func() {})
	away := f.identity("gw-dub-1", "dub", 7, f.now.Add(-time.Hour), "10.9.0.0/16")
	ms.rememberDead("gw-dub-1", gossipAddr, away.Certificate().Raw, true)
	g := &Gateway{members: ms, now: func() time.Time { return f.now }}
	g.trust.Store(f.trust())
	g.id.Store(f.identity("gw-zrh", "zrh", 1, f.now.Add(-time.Hour)))
	for _, tc := range []struct {
		site, route string
		want        string
	}{
		{"dub", "10.77.0.0/16", "site dub already exists (gateway gw-dub-1, away now)"},
		{"burst-dub", "10.9.4.0/24", "overlaps 10.9.0.0/16 of site dub (gateway gw-dub-1, away now)"},
		{"burst-dub", "10.77.0.0/16", ""},
	} {
		err := g.checkBurstSite(certs.Attributes{Site: tc.site, Routes: []netip.Prefix{netip.MustParsePrefix(tc.route)}}, 1)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("burst site %s with %s: %v; want %q", tc.site, tc.route, err, tc.want)
		}
	}
	// One whose certificate ended lately is still missed (a Vault site
	// down longer than its day-long certificates): its routes are held,
	// and its name and prefixes are not free.
	g.now = func() time.Time { return f.now.Add(48 * time.Hour) }
	if err := g.checkBurstSite(certs.Attributes{Site: "dub", Routes: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}}, 1); err == nil {
		t.Error("a burst took the site of a gateway whose certificate ended a day ago")
	}
	// Retired (expiredKept after its certificate ended), it will not be
	// back: its site's name is free again. So is at once a burst
	// gateway's, whose certificate lasts exactly its burst.
	g.now = func() time.Time { return f.now.Add(48*time.Hour + expiredKept) }
	if err := g.checkBurstSite(certs.Attributes{Site: "dub", Routes: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}}, 1); err != nil {
		t.Errorf("the site of a gateway retired by its certificate's end: %v", err)
	}
	ended, err := f.ca.IssueIdentity(certs.Attributes{Node: "burst-ams-gw1", Site: "burst-ams", Region: "r", Provider: "aws", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr("100.96.0.8"), Routes: []netip.Prefix{netip.MustParsePrefix("10.8.0.0/16")}, Labels: map[string]string{certs.BurstLabel: "true"}}, time.Hour, f.now.Add(-time.Hour/2))
	if err != nil {
		t.Fatal(err)
	}
	ms.rememberDead("burst-ams-gw1", gossipAddr, ended.Certificate().Raw, true)
	g.now = func() time.Time { return f.now.Add(time.Hour) }
	if err := g.checkBurstSite(certs.Attributes{Site: "burst-ams", Routes: []netip.Prefix{netip.MustParsePrefix("10.8.0.0/16")}}, 1); err != nil {
		t.Errorf("the site of an ended burst: %v", err)
	}
}

// TestEmbeddedBurstOnceTheGatewayUsesVault: a gateway that opened a burst
// with the embedded CA and then moved its identity to Vault (the same
// state directory) holds the burst's record but not the CA. Ending the
// burst must say where its certificates can be revoked rather than
// dereference the CA it no longer has — in burstLoop, a panic that
// stopped the gateway at every start until the burst's expiry.
func TestEmbeddedBurstOnceTheGatewayUsesVault(t *testing.T) {
	now := time.Now()
	used, ended := now.Add(-time.Hour), now.Add(-time.Minute)
	record := func(expires time.Time) *burstRecord {
		return &burstRecord{BurstSite: amsSite, BurstLife: BurstLife{Created: now.Add(-2 * time.Hour), Expires: expires, Ended: &ended, EndReason: "ended by burst down"},
			Tokens: []burstToken{{ID: "0123456789abcdef", Serial: "01:02", Node: "burst-ams-gw1", OverlayIP: "100.127.255.254", Used: &used}}}
	}
	gateway := func(r *burstRecord) *Gateway {
		return &Gateway{now: time.Now, state: stateDir(t.TempDir()), log: slog.New(slog.DiscardHandler),
			enroll: &enrollment{vault: &certs.Vault{}, book: &burstBook{Bursts: []*burstRecord{r}}}} // as openEnrollment makes it on Vault
	}

	// Ended by burst down, still valid: burstLoop finishes it.
	r := record(now.Add(time.Hour))
	g := gateway(r)
	if due := g.enroll.book.due(now); len(due) != 1 {
		t.Fatalf("due: %v", due)
	}
	revoked, err := g.endBurstLocked(r, r.EndReason)
	if err == nil || !strings.Contains(err.Error(), "skybridge ca revoke --ca DIR --reason cessationOfOperation --serial 01:02") || len(revoked) != 0 {
		t.Fatalf("ending an embedded burst on a Vault-backed gateway: %v, revoked %v; want the command that revokes it where the CA is", err, revoked)
	}
	if r.CertsRevoked || !r.info(now).WorkLeft {
		t.Error("the burst whose certificates could not be revoked is not listed as work left")
	}

	// Expired: its certificates ended with it, nothing is left to do.
	r = record(now.Add(-time.Second))
	g = gateway(r)
	if revoked, err := g.endBurstLocked(r, "expired"); err != nil || len(revoked) != 0 {
		t.Fatalf("ending an expired embedded burst on a Vault-backed gateway: %v, revoked %v", err, revoked)
	}
	if !r.CertsRevoked || r.info(now).WorkLeft {
		t.Error("an expired burst whose certificates ended with it is still work left")
	}
}

// TestBurstListSaysWorkLeft: an expired Vault burst whose objects are
// still in Vault holds the site's claim until burst down removes them;
// the list must tell it from one cleaned up.
func TestBurstListSaysWorkLeft(t *testing.T) {
	t0 := time.Now().Add(-2 * time.Hour)
	end := t0.Add(time.Hour)
	rec := func(vault, cleaned, revoked bool) *burstRecord {
		return &burstRecord{BurstSite: amsSite, BurstLife: BurstLife{Created: t0, Expires: end, Ended: &end, EndReason: "expired"},
			Tokens: []burstToken{{ID: "0123456789abcdef", Node: "burst-ams-gw1", OverlayIP: "100.127.255.254"}}, Vault: vault, VaultCleaned: cleaned, CertsRevoked: revoked}
	}
	for _, c := range []struct {
		name string
		r    *burstRecord
		want bool
	}{
		{"Vault, objects left", rec(true, false, false), true},
		{"Vault, cleaned", rec(true, true, false), false},
		{"embedded, not revoked", rec(false, false, false), true},
		{"embedded, revoked", rec(false, false, true), false},
	} {
		b, err := json.Marshal(c.r.info(time.Now()))
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Contains(string(b), `"work_left":true`); got != c.want {
			t.Errorf("%s: %s, want work_left %v", c.name, b, c.want)
		}
	}
	open := &burstRecord{BurstSite: amsSite, BurstLife: BurstLife{Created: t0, Expires: time.Now().Add(time.Hour)}}
	if open.info(time.Now()).WorkLeft {
		t.Error("an open burst is listed as work left")
	}
}

// TestBurstRequestPrintsNoVaultToken: a burst request printed or logged
// leaves out the operator's Vault token it carries, and sends it whole
// as JSON, which is how it reaches the gateway. (So a slice of requests
// logged by slog's JSON handler, which encodes it as JSON, would carry
// the token: none is.)
func TestBurstRequestPrintsNoVaultToken(t *testing.T) {
	const token = "hvs.the-operators-token"
	req := BurstRequest{BurstSite: BurstSite{Site: "burst-ams"}, TTL: time.Hour, VaultToken: token}
	var out bytes.Buffer
	for _, v := range []any{req, &req, []BurstRequest{req}} {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s"} {
			fmt.Fprintf(&out, verb+"\n", v)
		}
		slog.New(slog.NewTextHandler(&out, nil)).Info("m", "v", v)
	}
	for _, v := range []any{req, &req} {
		slog.New(slog.NewJSONHandler(&out, nil)).Info("m", "v", v)
	}
	if strings.Contains(out.String(), token) || !strings.Contains(out.String(), "burst-ams") {
		t.Errorf("printed:\n%s\nwant the site, and not the Vault token", out.String())
	}
	b, err := json.Marshal(req)
	if err != nil || !strings.Contains(string(b), token) {
		t.Errorf("as JSON: %s, %v; want the token in it, for the gateway", b, err)
	}
}

// TestBurstRequestJudgedUnderItsGatewaysNames: a burst request is judged
// under its gateways' longest name (SITE-gwN), which counts in the
// advert's size: judged under a short stand-in, a request whose gateways
// could not be certified was accepted, and every enrollment failed.
func TestBurstRequestJudgedUnderItsGatewaysNames(t *testing.T) {
	site := strings.Repeat("s", burstNameRoom)
	prefix := netip.MustParsePrefix("100.64.0.0/16")
	for n := 1; n <= 32; n++ {
		var routes []string
		for i := range n {
			routes = append(routes, fmt.Sprintf("2001:db8:%x::/48", i+1))
		}
		r := BurstRequest{BurstSite: BurstSite{Site: site, Provider: strings.Repeat("p", 40), Region: strings.Repeat("r", 40), Jurisdiction: "DE", Routes: routes},
			TTL: time.Hour, Gateways: 10}
		a, err := r.attributes(prefix)
		if err != nil {
			continue
		}
		for i := range r.Gateways {
			a.Node = burstNodeName(site, i)
			if err := a.Validate(prefix); err != nil {
				t.Fatalf("%d routes: the burst request is accepted, and its gateway %s's certificate refused: %v", n, a.Node, err)
			}
		}
	}
}

// rsaCSR is a certificate request under an "RSA key" that is a random odd
// modulus of k bytes, with a signature of random bytes: what anyone can
// send without holding a key, at whatever size makes its check costly.
func rsaCSR(t testing.TB, k int) []byte {
	t.Helper()
	n := make([]byte, k)
	rand.Read(n)
	n[0] |= 0x80
	n[k-1] |= 1
	pkcs1, err := asn1.Marshal(struct {
		N *big.Int
		E int
	}{new(big.Int).SetBytes(n), 1<<31 - 1})
	if err != nil {
		t.Fatal(err)
	}
	type spki struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	subject, _ := asn1.Marshal(pkix.Name{}.ToRDNSequence())
	tbs, err := asn1.Marshal(struct {
		Version   int
		Subject   asn1.RawValue
		PublicKey spki
		Attrs     []asn1.RawValue `asn1:"tag:0"`
	}{0, asn1.RawValue{FullBytes: subject},
		spki{pkix.AlgorithmIdentifier{Algorithm: asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 1}, Parameters: asn1.NullRawValue},
			asn1.BitString{Bytes: pkcs1, BitLength: 8 * len(pkcs1)}}, []asn1.RawValue{}})
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, k)
	rand.Read(sig[1:]) // below the modulus
	der, err := asn1.Marshal(struct {
		TBS    asn1.RawValue
		SigAlg pkix.AlgorithmIdentifier
		Sig    asn1.BitString
	}{asn1.RawValue{FullBytes: tbs}, pkix.AlgorithmIdentifier{Algorithm: asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 11}, Parameters: asn1.NullRawValue},
		asn1.BitString{Bytes: sig, BitLength: 8 * k}})
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// TestEnrollCSRKeyBeforeSignature: an enrollment request's key is judged
// by its kind before its signature is checked, which comes before the
// token's secret is: a signature under an RSA modulus of the sender's
// choosing (144,000 bits fit the 64 KiB body and took 1.6 s of CPU to
// check) costs nothing, as no identity has such a key.
func TestEnrollCSRKeyBeforeSignature(t *testing.T) {
	_, err := parseEnrollCSR(rsaCSR(t, 256))
	if err == nil || !strings.Contains(err.Error(), "ECDSA P-256") {
		t.Errorf("a request under an RSA key: %v; want it refused for its key's kind, before its signature is checked", err)
	}
}

// TestEnrollCSRSignatureChecked: an enrollment request proves that its
// sender holds the key it asks to have certified: one of the right kind
// whose signature does not verify is refused. Without the proof, a token
// would get any public key at all certified as the burst gateway's,
// another gateway's among them.
func TestEnrollCSRSignatureChecked(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	good, err := certs.CreateCSR(key, certs.Attributes{Node: "x", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "NL", OverlayIP: netip.MustParseAddr("100.64.0.9")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parseEnrollCSR(good); err != nil {
		t.Fatalf("a request its key signed: %v", err)
	}
	blk, _ := pem.Decode(good)
	der := bytes.Clone(blk.Bytes)
	der[len(der)-1] ^= 1 // the signature's last byte
	bad := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	if _, err := parseEnrollCSR(bad); err == nil || !strings.Contains(err.Error(), "not signed by its key") {
		t.Errorf("a P-256 request whose signature does not verify: %v; want it refused", err)
	}
}

// TestBurstEndKeepsIdentityUntilRecorded: a burst gateway that cannot
// record its burst's end (a full disk) keeps its identity: removed
// without it, the next start was of a live burst with no identity, told
// to run ca issue and restarted for ever; kept, the next start finds the
// end again and records it then.
func TestBurstEndKeepsIdentityUntilRecorded(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"node.key", "node.crt"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	enr := &Enrollment{Site: "burst-ams", Node: "burst-ams-gw1", TokenID: "t1", Expires: time.Now().Add(time.Hour)}
	if err := saveEnrollment(dir, enr); err != nil {
		t.Fatal(err)
	}
	// The record cannot be replaced: a directory where a rename would put
	// it stands for a disk that takes nothing more.
	if err := os.Remove(filepath.Join(dir, fileEnrollment)); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, fileEnrollment, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	var logs syncbuf.Buffer
	g := &Gateway{s: &Settings{Identity: certs.Config{Dir: dir}}, burst: enr, state: stateDir(t.TempDir()), log: slog.New(slog.NewTextHandler(&logs, nil))}
	g.forgetBurst(&BurstEndedError{Site: "burst-ams", Node: "burst-ams-gw1", Reason: "expired"})
	if _, err := os.Stat(filepath.Join(dir, "node.key")); err != nil {
		t.Errorf("the identity went though the burst's end was not recorded: %v", err)
	}
	if enr.Ended != nil || !strings.Contains(logs.String(), "its identity is kept") {
		t.Errorf("ended %v, log %s; want the end not taken as recorded, and said", enr.Ended, logs.String())
	}
}

// TestBurstClassVerdictsJudgeTransit: burst up's table of what the burst
// site may store says denied for a class the policy forbids to travel
// into it, as a migration's sender then judges. It judged the store
// alone: "allowed", and every migration of the class there refused.
func TestBurstClassVerdictsJudgeTransit(t *testing.T) {
	pol := mustPolicy(t, `policy {
  name    = "t"
  version = 1
}
class "pii" {
  allow "store" {
    jurisdiction = ["DE"]
  }
  allow "transit" {
    jurisdiction = ["DE"]
  }
  deny "transit" {
    labels = { "skybridge/burst" = "true" }
    reason = "no personal data over burst links"
  }
}
class "batch" {
  allow "store" {
    jurisdiction = ["DE"]
  }
  allow "transit" {
    jurisdiction = ["DE"]
  }
}
class "logs" {
  allow "store" {
    jurisdiction = ["DE"]
  }
}
class "audited" {
  mode = "audit"
  allow "store" {
    jurisdiction = ["DE"]
  }
}
`)
	g := &Gateway{}
	g.policy.Store(&adoptedPolicy{p: pol})
	req := BurstRequest{BurstSite: BurstSite{Site: "burst-fra", Provider: "aws", Region: "eu-central-1", Jurisdiction: "DE", Routes: []string{"10.9.0.0/16"}, Labels: map[string]string{ClassesLabel: "pii,batch,logs,audited"}}, Gateways: 1, TTL: time.Hour}
	a, err := req.attributes(mesh16)
	if err != nil {
		t.Fatal(err)
	}
	from := &certs.Attributes{Node: "gw-fra", Site: "aws-fra", Region: "eu-central-1", Provider: "aws", Jurisdiction: "DE"}
	burstGW := a
	burstGW.Node = "burst-fra-1"
	for _, v := range g.classVerdicts(a, now) {
		_, sender := pol.AdmitPath(v.Class, policy.PathOf(from, nil, &burstGW), now)
		if v.Allowed != sender.Allowed {
			t.Errorf("%s: burst up's table says allowed %v (%s); a migration's sender there: %s (%s)", v.Class, v.Allowed, v.Rule, sender.Outcome(), sender.Rule)
		}
		if v.Class == "pii" && (!strings.Contains(v.Rule, "transit") || !strings.Contains(strings.Join(v.Reasons, " "), "burst links")) {
			t.Errorf("pii: the table names %q, %q; want the deny transit rule and its reason", v.Rule, v.Reasons)
		}
		// Stored by its rules, carried there by audit mode alone.
		if v.Class == "audited" && (!v.Allowed || !v.Audit || !strings.Contains(v.Rule, "transit")) {
			t.Errorf("audited: %+v; want allowed in audit mode, by the transit rule", v)
		}
	}
}
