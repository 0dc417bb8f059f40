package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"io/fs"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestInitCAFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := InitCA(dir, InitOptions{Now: t0})
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{fileCAKey: 0o600, fileCACert: 0o644, fileCRL: 0o644, fileIndex: 0o600} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s mode = %04o, want %04o", name, st.Mode().Perm(), want)
		}
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Errorf("CA directory mode = %04o, want 0700", st.Mode().Perm())
	}
	if got := ca.MeshPrefix(); got != DefaultMeshPrefix {
		t.Errorf("mesh prefix = %s, want default %s", got, DefaultMeshPrefix)
	}
	c := ca.Certificate()
	if !c.IsCA || c.PublicKeyAlgorithm != x509.ECDSA || c.SignatureAlgorithm != x509.ECDSAWithSHA256 {
		t.Errorf("CA certificate: IsCA=%v alg=%v sig=%v", c.IsCA, c.PublicKeyAlgorithm, c.SignatureAlgorithm)
	}
	// No temporary directories left beside it.
	ents, _ := os.ReadDir(filepath.Dir(dir))
	if len(ents) != 1 {
		t.Errorf("init left %d entries beside the CA", len(ents))
	}
	if _, err := OpenCA(dir); err != nil {
		t.Fatalf("open new CA: %v", err)
	}
}

func TestInitCARefusesToOverwrite(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := InitCA(dir, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, fileCAKey))
	_, err := InitCA(dir, InitOptions{})
	if err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second init: err = %v, want 'already exists'", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, fileCAKey))
	if string(before) != string(after) {
		t.Fatal("second init changed the CA key")
	}

	other := t.TempDir()
	os.WriteFile(filepath.Join(other, "notes.txt"), []byte("x"), 0o644)
	if _, err := InitCA(other, InitOptions{}); err == nil {
		t.Fatal("init into a non-empty directory succeeded")
	}
	if _, err := InitCA(t.TempDir(), InitOptions{}); err != nil {
		t.Fatalf("init into an empty existing directory: %v", err)
	}
}

func TestOpenCAErrors(t *testing.T) {
	if _, err := OpenCA(t.TempDir()); err == nil || !strings.Contains(err.Error(), "skybridge ca init") {
		t.Errorf("missing CA: err = %v, want a hint to run ca init", err)
	}
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := InitCA(dir, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(dir, fileCAKey)
	os.Chmod(keyPath, 0o644)
	if _, err := OpenCA(dir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("world-readable key: err = %v, want a chmod hint", err)
	}
	os.Chmod(keyPath, 0o600)
	// A ca.crt the trust bundle would be refused for is refused at once,
	// not once something is issued or revoked.
	certPath := filepath.Join(dir, fileCACert)
	os.Chmod(certPath, 0o664)
	if _, err := OpenCA(dir); err == nil || !strings.Contains(err.Error(), "chmod 644") {
		t.Errorf("a ca.crt its group may write: err = %v, want a chmod hint", err)
	}
	os.Chmod(certPath, 0o644)
	os.WriteFile(keyPath, []byte("not a key"), 0o600)
	if _, err := OpenCA(dir); err == nil || !strings.Contains(err.Error(), fileCAKey) {
		t.Errorf("garbage key: err = %v, want it to name the file", err)
	}
	if os.Getuid() != 0 { // root reads mode-000 files anyway
		os.Chmod(keyPath, 0o000)
		if _, err := OpenCA(dir); err == nil {
			t.Error("unreadable key: no error")
		}
	}
}

func TestIssueBindsAttributes(t *testing.T) {
	ca := newTestCA(t)
	a := testAttrs("gw1", "aws-eu-central-1", "100.96.0.10", "fd00:20::/48", "10.20.0.0/16")
	id := issue(t, ca, a, t0, 48*time.Hour)
	c := id.Certificate()
	got, err := AttributesOf(c)
	if err != nil {
		t.Fatal(err)
	}
	a.Normalize()
	if !got.Equal(&a) {
		t.Fatalf("certified attributes differ:\n got %+v\nwant %+v", got, a)
	}
	if c.NotAfter.Sub(t0) != 48*time.Hour {
		t.Errorf("NotAfter = %v, want issue time + TTL", c.NotAfter)
	}
	if c.Subject.CommonName != "gw1" || c.Subject.OrganizationalUnit[0] != "aws-eu-central-1" {
		t.Errorf("subject = %v", c.Subject)
	}
	// A standard verifier (not ours) accepts it under the CA.
	pool := x509.NewCertPool()
	pool.AddCert(ca.Certificate())
	if _, err := c.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: t0, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatalf("x509 verification: %v", err)
	}
	if _, err := trust(t, ca).VerifyCertificate(c, t0); err != nil {
		t.Fatalf("VerifyCertificate: %v", err)
	}
}

// TestIssueRefusesOverlappingRoutes: the CA does not certify a route
// that overlaps another site's: the mesh would settle the conflict by
// certificate age, which each renewal resets. A site's own gateways share
// its routes; a gateway's latest certificate is what counts, so a site
// re-issued without a prefix frees it; revoked and ended certificates
// hold nothing; a gateway moving to another site takes its routes along.
func TestIssueRefusesOverlappingRoutes(t *testing.T) {
	ca := newTestCA(t)
	at := t0
	next := func() time.Time { at = at.Add(time.Minute); return at }
	try := func(node, site, overlay string, routes ...string) error {
		_, err := ca.IssueIdentity(testAttrs(node, site, overlay, routes...), time.Hour, next())
		return err
	}
	refused := func(err error, want string) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("err = %v, want it to contain %q", err, want)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(try("gw-a1", "site-a", "100.96.0.1", "10.7.0.0/16"))
	must(try("gw-a2", "site-a", "100.96.0.2", "10.7.0.0/16"))    // a sibling
	must(try("gw-b1", "site-b", "100.96.0.3", "10.8.0.0/16"))    // no overlap
	must(try("gw-short", "site-s", "100.96.0.4", "10.9.0.0/16")) // expires in an hour
	refused(try("gw-b1", "site-b", "100.96.0.3", "10.7.1.0/24"), `route 10.7.1.0/24 overlaps 10.7.0.0/16 of site site-a (node "gw-a1"`)
	refused(try("gw-b2", "site-b", "100.96.0.5", "10.0.0.0/8"), "overlaps 10.7.0.0/16 of site site-a")

	must(try("gw-a1", "site-a", "100.96.0.1")) // re-issued without the prefix
	refused(try("gw-b1", "site-b", "100.96.0.3", "10.7.1.0/24"), `node "gw-a2"`)
	must(try("gw-a2", "site-a", "100.96.0.2")) // the whole site re-issued
	must(try("gw-b1", "site-b", "100.96.0.3", "10.7.1.0/24"))

	id := issue(t, ca, testAttrs("gw-x", "site-x", "100.96.0.7", "10.10.0.0/16"), next(), time.Hour)
	refused(try("gw-y", "site-y", "100.96.0.8", "10.10.1.0/24"), "site site-x")
	if _, err := ca.RevokeSerials([]*big.Int{id.Certificate().SerialNumber}, "keyCompromise", next()); err != nil {
		t.Fatal(err)
	}
	must(try("gw-y", "site-y", "100.96.0.8", "10.10.1.0/24"))

	// Re-issued within the second (NotBefore's precision): the later
	// entry is the latest.
	same := next()
	for _, routes := range [][]netip.Prefix{{netip.MustParsePrefix("10.11.0.0/16")}, nil} {
		a := testAttrs("gw-z", "site-z", "100.96.0.9")
		a.Routes = routes
		if _, err := ca.IssueIdentity(a, time.Hour, same); err != nil {
			t.Fatal(err)
		}
	}
	must(try("gw-w", "site-w", "100.96.0.10", "10.11.1.0/24"))

	must(try("gw-b1", "site-c", "100.96.0.3", "10.7.1.0/24")) // moved, routes and all
	refused(try("gw-d1", "site-d", "100.96.0.6", "10.9.1.0/24"), `site site-s`)
	at = at.Add(2 * time.Hour)
	must(try("gw-d1", "site-d", "100.96.0.6", "10.9.1.0/24")) // gw-short's certificate has ended
}

func TestIssueRejectsBadInput(t *testing.T) {
	ca := newTestCA(t)
	issue(t, ca, testAttrs("gw1", "onprem-zrh", "100.96.0.10"), t0, time.Hour)
	bad := func(mut func(*Attributes)) Attributes {
		a := testAttrs("gw2", "onprem-zrh", "100.96.0.20", "10.1.0.0/16")
		mut(&a)
		return a
	}
	tests := []struct {
		name  string
		attrs Attributes
		ttl   time.Duration
		want  string
	}{
		{"overlay outside mesh", bad(func(a *Attributes) { a.OverlayIP = netip.MustParseAddr("10.0.0.1") }), 0, "outside the mesh overlay range"},
		{"overlay missing", bad(func(a *Attributes) { a.OverlayIP = netip.Addr{} }), 0, "overlay IP is missing"},
		{"overlay held by another node", bad(func(a *Attributes) { a.OverlayIP = netip.MustParseAddr("100.96.0.10") }), 0, "already held by node \"gw1\""},
		{"route with host bits", bad(func(a *Attributes) { a.Routes = []netip.Prefix{netip.MustParsePrefix("10.1.2.3/16")} }), 0, "did you mean 10.1.0.0/16"},
		{"route overlapping mesh", bad(func(a *Attributes) { a.Routes = []netip.Prefix{netip.MustParsePrefix("100.96.4.0/24")} }), 0, "overlaps the mesh overlay range"},
		{"IPv6 default route", bad(func(a *Attributes) { a.Routes = []netip.Prefix{netip.MustParsePrefix("::/0")} }), 0, "is a default route"},
		{"IPv4 route written as IPv6", bad(func(a *Attributes) { a.Routes = []netip.Prefix{netip.MustParsePrefix("::ffff:10.9.0.0/112")} }), 0, "write it as IPv4 (10.9.0.0/16)"},
		{"bad node name", bad(func(a *Attributes) { a.Node = "GW_2" }), 0, "node \"GW_2\" is not valid"},
		{"empty site", bad(func(a *Attributes) { a.Site = "" }), 0, "site \"\" is not valid"},
		{"unknown jurisdiction", bad(func(a *Attributes) { a.Jurisdiction = "EU" }), 0, "not an ISO 3166-1"},
		{"lower-case jurisdiction", bad(func(a *Attributes) { a.Jurisdiction = "ch" }), 0, "not an ISO 3166-1"},
		{"bad label", bad(func(a *Attributes) { a.Labels = map[string]string{"Tier": "gold"} }), 0, "label key \"Tier\""},
		{"label value with separator", bad(func(a *Attributes) { a.Labels = map[string]string{"tier": "gold&x=y"} }), 0, "label tier value"},
		{"TTL beyond CA", bad(func(*Attributes) {}), 20 * 365 * 24 * time.Hour, "outlive the CA"},
		{"negative TTL", bad(func(*Attributes) {}), -time.Hour, "negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ca.IssueIdentity(tt.attrs, tt.ttl, t0)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
			if !errors.Is(err, ErrIssueRefused) {
				t.Errorf("%v: not a refusal (ErrIssueRefused), which asking again would not change", err)
			}
		})
	}
	issued, _ := ca.Issued()
	if len(issued) != 1 {
		t.Fatalf("refused requests changed the index: %d entries", len(issued))
	}
}

func TestIssueRejectsForeignKeys(t *testing.T) {
	ca := newTestCA(t)
	k384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	_, err := ca.Issue(IssueRequest{Attributes: testAttrs("gw1", "s", "100.96.0.1"), PublicKey: k384.Public(), Now: t0})
	if err == nil || !strings.Contains(err.Error(), "P-256") {
		t.Fatalf("P-384 key: err = %v", err)
	}
}

// TestNameConstraint: even a certificate the CA key signed outside of
// Issue (a bug, a stolen-but-constrained intermediate) cannot carry an
// overlay IP outside the mesh range, because the CA's name constraint is
// enforced by X.509 verification itself.
func TestNameConstraint(t *testing.T) {
	ca := newTestCA(t)
	a := testAttrs("gw1", "s", "100.96.0.1")
	key, _ := GenerateNodeKey()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(99), Subject: pkix.Name{CommonName: "gw1"},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:        nil, IPAddresses: []net.IP{net.ParseIP("10.9.9.9")},
	}
	tmpl.URIs = append(tmpl.URIs, a.URI())
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	_, err = trust(t, ca).VerifyCertificate(c, t0)
	if ReasonOf(err) != ReasonBadCertificate {
		t.Fatalf("err = %v, want bad_certificate", err)
	}
}

// TestGatewayCertificateNeedsClientAuth: a certificate the CA signed for
// serving only (the enrollment endpoint's, say), however complete its
// attributes, is not a gateway's.
func TestGatewayCertificateNeedsClientAuth(t *testing.T) {
	ca := newTestCA(t)
	a := testAttrs("gw1", "s", "100.96.0.1")
	key, _ := GenerateNodeKey()
	certFor := func(eku x509.ExtKeyUsage) *x509.Certificate {
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(100 + eku)), Subject: pkix.Name{CommonName: "gw1"},
			NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{eku},
			URIs:        []*url.URL{a.PinnedURI()}, IPAddresses: []net.IP{net.ParseIP("100.96.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c
	}
	if _, err := trust(t, ca).VerifyCertificate(certFor(x509.ExtKeyUsageClientAuth), t0); err != nil {
		t.Fatalf("client authentication: %v", err)
	}
	if _, err := trust(t, ca).VerifyCertificate(certFor(x509.ExtKeyUsageServerAuth), t0); ReasonOf(err) != ReasonBadCertificate {
		t.Fatalf("server authentication only: err = %v, want bad_certificate", err)
	}
}

// RevokeNode takes every valid certificate of the node, a renewal's
// too, and nothing of another node's.
func TestRevokeNode(t *testing.T) {
	ca := newTestCA(t)
	first := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	renewed := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0.Add(time.Minute), time.Hour)
	other := issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, time.Hour)
	done, err := ca.RevokeNode("gw1", "keyCompromise", t0.Add(2*time.Minute))
	if err != nil || len(done) != 2 {
		t.Fatalf("RevokeNode = %+v, %v; want both of gw1's certificates", done, err)
	}
	tb := trust(t, ca)
	for _, id := range []*NodeIdentity{first, renewed} {
		if _, err := tb.VerifyCertificate(id.Certificate(), t0.Add(3*time.Minute)); !errors.Is(err, ErrRevoked) {
			t.Fatalf("gw1's certificate %s: err = %v, want revoked", FormatSerial(id.Certificate().SerialNumber), err)
		}
	}
	if _, err := tb.VerifyCertificate(other.Certificate(), t0.Add(3*time.Minute)); err != nil {
		t.Fatalf("gw2's certificate refused: %v", err)
	}
	if _, err := ca.RevokeNode("gw1", "keyCompromise", t0.Add(3*time.Minute)); err == nil || !strings.Contains(err.Error(), "no valid certificate") {
		t.Fatalf("second RevokeNode: err = %v, want no valid certificate", err)
	}
	if _, err := ca.RevokeNode("gw2", "because", t0); err == nil || !strings.Contains(err.Error(), "keyCompromise") {
		t.Fatalf("unknown reason: err = %v", err)
	}
}

func TestRevoke(t *testing.T) {
	ca := newTestCA(t)
	id1 := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	id2 := issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, time.Hour)
	tbBefore := trust(t, ca)

	serials, err := ca.SerialsOfNode("gw1", t0)
	if err != nil || len(serials) != 1 || serials[0].Cmp(id1.Certificate().SerialNumber) != 0 {
		t.Fatalf("SerialsOfNode = %v, %v", serials, err)
	}
	done, err := ca.RevokeSerials(serials, "keyCompromise", t0)
	if err != nil || len(done) != 1 || done[0].Reason != "keyCompromise" {
		t.Fatalf("Revoke = %+v, %v", done, err)
	}
	tbAfter := trust(t, ca)
	if _, err := tbAfter.VerifyCertificate(id1.Certificate(), t0); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked cert: err = %v", err)
	}
	if _, err := tbAfter.VerifyCertificate(id2.Certificate(), t0); err != nil {
		t.Fatalf("unrevoked cert refused: %v", err)
	}
	if tbAfter.CRL().Number.Cmp(tbBefore.CRL().Number) <= 0 {
		t.Fatal("CRL number did not increase")
	}
	// An older list cannot replace a newer one: no un-revoking by replay.
	if _, err := tbAfter.WithCRL(tbBefore.CRL()); !errors.Is(err, ErrReplay) {
		t.Fatalf("older CRL accepted: %v", err)
	}
	// A list from another CA is refused.
	other := trust(t, newTestCA(t))
	if _, err := tbAfter.WithCRL(other.CRL()); !errors.Is(err, ErrUnknownCA) {
		t.Fatalf("foreign CRL accepted: %v", err)
	}
	// Revoking again is idempotent; unknown serials and reasons are errors.
	if _, err := ca.RevokeSerials(serials, "", t0); err != nil {
		t.Fatalf("repeat revoke: %v", err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{big.NewInt(12345)}, "", t0); err == nil || !strings.Contains(err.Error(), "not issued by this CA") {
		t.Fatalf("unknown serial: %v", err)
	}
	if _, err := ca.RevokeSerials(serials, "because", t0); err == nil || !strings.Contains(err.Error(), "keyCompromise") {
		t.Fatalf("unknown reason: %v", err)
	}
	if _, err := ca.SerialsOfNode("gw1", t0); err == nil {
		t.Fatal("revoked node still has valid serials")
	}
	// The overlay IP of a revoked certificate may be reused.
	issue(t, ca, testAttrs("gw9", "s", "100.96.0.1"), t0, time.Hour)
}

// TestRevokeIndexBehindCRL: a revocation list written without its index
// (a crash or a full disk between the two) is carried on: the next list
// has a new number — gateways ignore a list whose number they hold — and
// keeps the revocation the index lost, which the index takes back.
func TestRevokeIndexBehindCRL(t *testing.T) {
	ca := newTestCA(t)
	id1 := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	id2 := issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, time.Hour)
	index := filepath.Join(ca.Dir(), fileIndex)
	before, err := os.ReadFile(index)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{id1.Certificate().SerialNumber}, "keyCompromise", t0); err != nil {
		t.Fatal(err)
	}
	lost := trust(t, ca).CRL()
	if err := os.WriteFile(index, before, 0o600); err != nil { // the index as if its write never happened
		t.Fatal(err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{id2.Certificate().SerialNumber}, "", t0); err != nil {
		t.Fatal(err)
	}
	tb := trust(t, ca)
	if tb.CRL().Number.Cmp(lost.Number) <= 0 {
		t.Fatalf("the next list is number %v, the one written without its index %v: reused", tb.CRL().Number, lost.Number)
	}
	for _, id := range []*NodeIdentity{id1, id2} {
		if _, err := tb.VerifyCertificate(id.Certificate(), t0); !errors.Is(err, ErrRevoked) {
			t.Errorf("%s after the next revocation: %v, want revoked", id.Attributes().Node, err)
		}
	}
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range issued {
		if e.Node == "gw1" && (e.RevokedAt == nil || e.Reason != "keyCompromise") {
			t.Errorf("the index after the next revocation: gw1 %+v, want revoked for keyCompromise", e)
		}
	}
}

// TestRevokeIndexFromOlderBackup: an index restored from a backup older
// than a certificate and its revocation does not know them; the next list
// carries the revocation on all the same.
func TestRevokeIndexFromOlderBackup(t *testing.T) {
	ca := newTestCA(t)
	index := filepath.Join(ca.Dir(), fileIndex)
	backup, err := os.ReadFile(index)
	if err != nil {
		t.Fatal(err)
	}
	id1 := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	id2 := issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{id1.Certificate().SerialNumber}, "keyCompromise", t0); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(index, backup, 0o600); err != nil { // restored: knows neither gateway
		t.Fatal(err)
	}
	// Twice: the second list is signed from an index in step again.
	for range 2 {
		if err := ca.RefreshCRL(t0.Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	tb := trust(t, ca)
	if _, err := tb.VerifyCertificate(id1.Certificate(), t0.Add(time.Minute)); !errors.Is(err, ErrRevoked) {
		t.Fatalf("gw1, revoked before the index was restored: %v, want revoked", err)
	}
	if _, err := tb.VerifyCertificate(id2.Certificate(), t0.Add(time.Minute)); err != nil {
		t.Fatalf("gw2, never revoked: %v", err)
	}
}

// TestArchivedRevocationLeaves: a revoked burst certificate that expired
// and was archived before any list was signed without it (an issue
// archives, only a revocation signs) leaves the next list all the same —
// only an index behind the list has its unknown entries carried on.
func TestArchivedRevocationLeaves(t *testing.T) {
	ca := newTestCA(t)
	burst := issue(t, ca, testAttrs("burst-gw1", "burst-ams", "100.96.0.1"), t0, time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{burst.Certificate().SerialNumber}, "cessationOfOperation", t0.Add(30*time.Minute)); err != nil {
		t.Fatal(err)
	}
	later := t0.Add(archiveAfter + 2*time.Hour)
	next := issue(t, ca, testAttrs("burst-gw2", "burst-ams", "100.96.0.2"), later, time.Hour) // archives the first
	if _, err := ca.RevokeSerials([]*big.Int{next.Certificate().SerialNumber}, "cessationOfOperation", later); err != nil {
		t.Fatal(err)
	}
	for _, e := range trust(t, ca).CRL().RevokedCertificateEntries {
		if e.SerialNumber.Cmp(burst.Certificate().SerialNumber) == 0 {
			t.Fatal("the archived, expired revocation is carried on the list")
		}
	}
}

// TestCRLDropsExpiredGateways: a revoked gateway certificate leaves the
// revocation list once it has expired (refused as expired from then on),
// so a CA that ends bursts every day does not sign an ever longer list;
// a revoked policy signer stays on it, since its policies are judged at
// their signing time.
func TestCRLDropsExpiredGateways(t *testing.T) {
	ca := newTestCA(t)
	short := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	long := issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, 48*time.Hour)
	stolen := issue(t, ca, testAttrs("gw3", "s", "100.96.0.3"), t0, time.Hour)
	signer, err := ca.NewPolicySigner("compliance", time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	serials := []*big.Int{short.Certificate().SerialNumber, long.Certificate().SerialNumber, signer.Certificate().SerialNumber}
	if _, err := ca.RevokeSerials(serials, "cessationOfOperation", t0); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{stolen.Certificate().SerialNumber}, "keyCompromise", t0); err != nil {
		t.Fatal(err)
	}
	if n := len(trust(t, ca).CRL().RevokedCertificateEntries); n != 4 {
		t.Fatalf("%d entries while all four are valid, want 4", n)
	}
	// Checked again past the archive's horizon, twice: a refresh signs
	// the list before it archives, so it is the next one that is made
	// from the archived index — what the list keeps, the index must keep.
	for _, at := range []time.Time{t0.Add(2 * time.Hour), t0.Add(archiveAfter + 2*time.Hour), t0.Add(archiveAfter + 3*time.Hour)} {
		if err := ca.RefreshCRL(at); err != nil {
			t.Fatal(err)
		}
		tb := trust(t, ca)
		listed := func(id interface{ Certificate() *x509.Certificate }) bool {
			return tb.IsRevoked(id.Certificate().SerialNumber)
		}
		wantLong := at.Before(long.Certificate().NotAfter)
		if listed(short) || listed(long) != wantLong || !listed(stolen) || !listed(signer) {
			t.Fatalf("at %s: gw1 listed %v, gw2 %v (want %v), gw3 (key compromised) %v, signer %v; want the compromised key and the signer kept",
				at, listed(short), listed(long), wantLong, listed(stolen), listed(signer))
		}
	}
	tb := trust(t, ca)
	if _, err := tb.VerifyCertificate(short.Certificate(), t0.Add(2*time.Hour)); err == nil {
		t.Fatal("the expired, unlisted certificate is accepted")
	}
	names := indexedNodes(t, ca)
	if !slices.Equal(names, []string{"compliance", "gw2", "gw3"}) {
		t.Fatalf("index past the archive's horizon: %v, want gw1 archived, the signer and the compromised gw3 kept (and gw2, not 30 days past its end)", names)
	}
}

// TestCAArchivesEnded: gateway certificates that ended over 30 days ago
// leave the index (rewritten whole on every issue) for the archive, where
// they stay on record; policy signers stay in the index, which the
// revocation list is made from.
func TestCAArchivesEnded(t *testing.T) {
	ca := newTestCA(t)
	old := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	if _, err := ca.NewPolicySigner("compliance", time.Hour, t0); err != nil {
		t.Fatal(err)
	}
	later := t0.Add(archiveAfter + 2*time.Hour)
	issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), later, time.Hour)
	names := indexedNodes(t, ca)
	if !slices.Equal(names, []string{"compliance", "gw2"}) {
		t.Fatalf("index after the archive: %v, want the signer and gw2", names)
	}
	b, err := os.ReadFile(filepath.Join(ca.Dir(), fileArchive))
	if err != nil || !strings.Contains(string(b), FormatSerial(old.Certificate().SerialNumber)) || strings.Count(string(b), "\n") != 1 {
		t.Fatalf("archive: %v\n%s", err, b)
	}
	if fi, _ := os.Stat(filepath.Join(ca.Dir(), fileArchive)); fi.Mode().Perm() != 0o600 {
		t.Errorf("archive mode %04o", fi.Mode().Perm())
	}
	if _, err := ca.RevokeSerials([]*big.Int{old.Certificate().SerialNumber}, "", later); err == nil || !strings.Contains(err.Error(), "issued-archive.jsonl") {
		t.Fatalf("revoking an archived certificate: %v", err)
	}

	// An append cut short left half a line: the next archive does not
	// join its entries to it.
	f, _ := os.OpenFile(filepath.Join(ca.Dir(), fileArchive), os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString(`{"serial":"0x1","no`)
	f.Close()
	issue(t, ca, testAttrs("gw3", "s", "100.96.0.3"), later.Add(archiveAfter+2*time.Hour), time.Hour)
	b, _ = os.ReadFile(filepath.Join(ca.Dir(), fileArchive))
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("archive after a cut-short append and another archive: %d lines\n%s", len(lines), b)
	}
	for _, l := range lines {
		var c IssuedCert
		if err := json.Unmarshal([]byte(l), &c); err != nil || c.Serial == "" {
			t.Fatalf("archive line %q: %v", l, err)
		}
	}
}

// TestConcurrentIssue: parallel operators must not lose index entries.
func TestConcurrentIssue(t *testing.T) {
	ca := newTestCA(t)
	var wg sync.WaitGroup
	const n = 12
	for i := range n {
		wg.Go(func() {
			other, err := OpenCA(ca.Dir()) // as a separate `skybridge ca issue` would
			if err != nil {
				t.Error(err)
				return
			}
			a := testAttrs("gw"+string(rune('a'+i)), "s", netip.AddrFrom4([4]byte{100, 96, 1, byte(i + 1)}).String())
			if _, err := other.IssueIdentity(a, time.Hour, t0); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	issued, err := ca.Issued()
	if err != nil || len(issued) != n {
		t.Fatalf("index has %d entries (%v), want %d", len(issued), err, n)
	}
}

func TestSerialFormat(t *testing.T) {
	s := big.NewInt(0x1a2b3c)
	if got := FormatSerial(s); got != "1a:2b:3c" {
		t.Fatalf("FormatSerial = %q", got)
	}
	for _, in := range []string{"1a:2b:3c", "0x1a2b3c", "1715004"} {
		got, err := ParseSerial(in)
		if err != nil || got.Cmp(s) != 0 {
			t.Errorf("ParseSerial(%q) = %v, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "zz", "-5", "0", "0x"} {
		if _, err := ParseSerial(in); err == nil {
			t.Errorf("ParseSerial(%q) accepted", in)
		}
	}
}

// TestInitCANegativeValidity: a negative validity is refused, not taken
// for "the default" (ten years).
func TestInitCANegativeValidity(t *testing.T) {
	if _, err := InitCA(filepath.Join(t.TempDir(), "ca"), InitOptions{Validity: -time.Hour}); err == nil || !strings.Contains(err.Error(), "negative") {
		t.Fatalf("InitCA with validity -1h: %v", err)
	}
}

// indexedNodes lists, sorted, the nodes the CA's index holds.
func indexedNodes(t *testing.T, ca *CA) []string {
	t.Helper()
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range issued {
		names = append(names, c.Node)
	}
	slices.Sort(names)
	return names
}

// TestCopyGossipKeyring: a gateway directory keeps the keyring it holds
// (newer than the CA's after a rotation) unless its certificate is another
// CA's: re-issued into by a new mesh, it takes that mesh's keyring.
func TestCopyGossipKeyring(t *testing.T) {
	ctx := context.Background()
	read := func(dir string) *GossipKeyring {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, FileGossipKeyring))
		if err != nil {
			t.Fatal(err)
		}
		kr, err := ParseGossipKeyring(b)
		if err != nil {
			t.Fatal(err)
		}
		return kr
	}
	old, next := newTestCA(t), newTestCA(t)
	dir := filepath.Join(t.TempDir(), "gw1")
	if err := issue(t, old, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour).Save(dir, trust(t, old)); err != nil {
		t.Fatal(err)
	}
	if err := old.CopyGossipKeyring(ctx, dir); err != nil {
		t.Fatal(err)
	}
	oldKR, err := old.Secrets().GossipKeyring(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !read(dir).Same(oldKR) {
		t.Fatal("a new directory did not get the CA's keyring")
	}
	rotated, err := GenerateGossipKeyring()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, FileGossipKeyring), rotated.MarshalSecret(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := old.CopyGossipKeyring(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if !read(dir).Same(rotated) {
		t.Fatal("the CA's keyring replaced the gateway's newer one")
	}
	if err := next.CopyGossipKeyring(ctx, dir); err != nil {
		t.Fatal(err)
	}
	nextKR, err := next.Secrets().GossipKeyring(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !read(dir).Same(nextKR) {
		t.Fatal("a directory issued by another CA kept that mesh's keyring")
	}
}

// TestOpenCAWithoutCertificate: a CA directory that lost its certificate
// but holds its key is damaged, not absent: the error says to restore the
// certificate, not to run `ca init`, which would refuse the directory.
func TestOpenCAWithoutCertificate(t *testing.T) {
	ca := newTestCA(t)
	if err := os.Remove(filepath.Join(ca.Dir(), fileCACert)); err != nil {
		t.Fatal(err)
	}
	_, err := OpenCA(ca.Dir())
	if err == nil || !strings.Contains(err.Error(), "restore ca.crt") || strings.Contains(err.Error(), "ca init") {
		t.Fatalf("err = %v; want advice to restore ca.crt", err)
	}
	if _, err := OpenCA(t.TempDir()); err == nil || !strings.Contains(err.Error(), "ca init") {
		t.Fatalf("an empty directory: err = %v; want advice to run ca init", err)
	}
}

// TestInitCARemovesCrashedInits: a CA key left by an init that crashed
// (its temporary directory) goes with the next init of the directory; a
// recent one, perhaps an init still running, stays.
func TestInitCARemovesCrashedInits(t *testing.T) {
	parent := t.TempDir()
	crashed, running := filepath.Join(parent, ".ca.init-111"), filepath.Join(parent, ".ca.init-222")
	for _, d := range []string{crashed, running} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, fileCAKey), []byte("a key"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	long := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(crashed, long, long); err != nil {
		t.Fatal(err)
	}
	if _, err := InitCA(filepath.Join(parent, "ca"), InitOptions{MeshPrefix: netip.MustParsePrefix("100.96.0.0/16")}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(crashed); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the crashed init's directory: %v; want it removed", err)
	}
	if _, err := os.Stat(running); err != nil {
		t.Errorf("the recent init's directory: %v; want it kept", err)
	}
}

// TestRevokeAgainAsKeyCompromise: a certificate revoked as superseded and
// then found to have a stolen key is revoked again as keyCompromise: the
// reason changes (the time stays), and its entry stays on the list after
// the certificate expires. Any other second reason leaves the first.
func TestRevokeAgainAsKeyCompromise(t *testing.T) {
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	serial := []*big.Int{id.Certificate().SerialNumber}
	first, err := ca.RevokeSerials(serial, "superseded", t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if again, err := ca.RevokeSerials(serial, "affiliationChanged", t0.Add(2*time.Minute)); err != nil || again[0].Reason != "superseded" {
		t.Fatalf("revoked again for another reason: %+v, %v; want superseded kept", again, err)
	}
	again, err := ca.RevokeSerials(serial, "keyCompromise", t0.Add(3*time.Minute))
	if err != nil || again[0].Reason != "keyCompromise" || !again[0].RevokedAt.Equal(*first[0].RevokedAt) {
		t.Fatalf("revoked again as keyCompromise: %+v, %v; want the reason changed, the time kept", again, err)
	}
	// Long after it expired, the entry is still on the list.
	if err := ca.RefreshCRL(t0.Add(48 * time.Hour)); err != nil {
		t.Fatal(err)
	}
	if !trust(t, ca).IsRevoked(id.Certificate().SerialNumber) {
		t.Fatal("a compromised key's certificate left the list once expired")
	}
}

// TestInitCAInDirectoryThere: an empty directory that is there and that
// rename(2) will not replace (".", a mount point) gets the CA made inside
// it. The CA was written beside it, its key on the parent's filesystem,
// and then could not be moved in.
func TestInitCAInDirectoryThere(t *testing.T) {
	made := func(t *testing.T, dir string) {
		t.Helper()
		if _, err := InitCA(dir, InitOptions{Now: t0}); err != nil {
			t.Fatalf("init: %v", err)
		}
		if _, err := OpenCA(dir); err != nil {
			t.Fatalf("open the new CA: %v", err)
		}
		if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
			t.Errorf("CA directory mode = %04o, want 0700", st.Mode().Perm())
		}
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), initPrefix) {
				t.Errorf("init left %s in the CA", e.Name())
			}
		}
	}
	t.Run("the working directory", func(t *testing.T) {
		t.Chdir(t.TempDir())
		made(t, ".")
	})
	t.Run("a mount point", func(t *testing.T) {
		asRoot(t)
		parent := t.TempDir()
		dir := filepath.Join(parent, "ca")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
			t.Skipf("bind mount: %v", err)
		}
		t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
		made(t, dir)
		if ents, _ := os.ReadDir(parent); len(ents) != 1 {
			t.Errorf("init left %d entries beside the CA", len(ents))
		}
	})
	// A fresh ext file system's root holds an empty lost+found: taken
	// for empty, and left. One with something in it is not.
	t.Run("with lost+found", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.Mkdir(filepath.Join(dir, "lost+found"), 0o700); err != nil {
			t.Fatal(err)
		}
		made(t, dir)
		if _, err := os.Stat(filepath.Join(dir, "lost+found")); err != nil {
			t.Errorf("lost+found is gone: %v", err)
		}
		other := t.TempDir()
		if err := os.MkdirAll(filepath.Join(other, "lost+found", "#1234"), 0o700); err != nil {
			t.Fatal(err)
		}
		if _, err := InitCA(other, InitOptions{Now: t0}); err == nil || !strings.Contains(err.Error(), "not empty") {
			t.Errorf("init over a lost+found with something in it: %v; want it refused", err)
		}
	})
}

// TestInitCAInDirectoryThereCutShort: an init of a directory that was
// there, cut short as it moved the CA in (ca.key last), left no CA, and
// the next init makes one there; a directory holding a ca.crt no init
// left is still refused.
func TestInitCAInDirectoryThereCutShort(t *testing.T) {
	dir := t.TempDir()
	left := filepath.Join(dir, initPrefix+"123")
	if err := os.Mkdir(left, 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(left, fileCAKey), []byte("a key"), 0o600)
	for _, f := range initMoves[:len(initMoves)-1] {
		os.WriteFile(filepath.Join(dir, f), []byte("moved"), 0o600)
	}
	os.WriteFile(filepath.Join(dir, fileLock), nil, 0o600)
	if _, err := OpenCA(dir); err == nil {
		t.Fatal("a CA cut short opens")
	}
	if _, err := InitCA(dir, InitOptions{Now: t0}); err != nil {
		t.Fatalf("init after one cut short: %v", err)
	}
	if _, err := OpenCA(dir); err != nil {
		t.Fatalf("open the CA: %v", err)
	}
	if _, err := os.Stat(left); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("what the init cut short left: %v; want it removed", err)
	}

	copied := t.TempDir()
	os.WriteFile(filepath.Join(copied, fileCACert), []byte("a copy"), 0o644)
	if _, err := InitCA(copied, InitOptions{Now: t0}); err == nil || !strings.Contains(err.Error(), "no CA key") {
		t.Fatalf("init of a directory holding a ca.crt: %v", err)
	}
}

// TestInitCAConcurrentInDirectoryThere: of inits racing for a directory
// that is there, one makes the CA and the others find it.
func TestInitCAConcurrentInDirectoryThere(t *testing.T) {
	dir := t.TempDir()
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		won []*CA
	)
	for range 6 {
		wg.Go(func() {
			ca, err := InitCA(dir, InitOptions{Now: t0})
			if err != nil {
				if !strings.Contains(err.Error(), "already exists") {
					t.Errorf("an init that lost: %v; want the CA found", err)
				}
				return
			}
			mu.Lock()
			won = append(won, ca)
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(won) != 1 {
		t.Fatalf("%d inits made the CA", len(won))
	}
	ca, err := OpenCA(dir)
	if err != nil || !ca.Certificate().Equal(won[0].Certificate()) {
		t.Fatalf("the CA in the directory: %v; want the one init made", err)
	}
}

// TestRevokeNodeLeavesPolicySigner: RevokeNode takes the gateway's
// certificates and its enrollment endpoint's, not those of a policy
// signer of the same name, another holder's (it took them all), which
// RevokeSigner takes. A name only a signer bears is refused, saying so.
func TestRevokeNodeLeavesPolicySigner(t *testing.T) {
	ca := newTestCA(t)
	gw := issue(t, ca, testAttrs("compliance", "s", "100.96.0.1"), t0, time.Hour)
	k, _ := GenerateNodeKey()
	enroller, err := ca.IssueEnroller("compliance", netip.MustParseAddr("100.96.0.1"), k.Public(), time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ca.NewPolicySigner("compliance", time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.NewPolicySigner("treasury", time.Hour, t0); err != nil {
		t.Fatal(err)
	}
	done, err := ca.RevokeNode("compliance", "keyCompromise", t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, e := range done {
		kinds = append(kinds, e.Kind)
	}
	slices.Sort(kinds)
	if !slices.Equal(kinds, []string{KindEnroller, KindGateway}) {
		t.Errorf("RevokeNode revoked %v; want the gateway's and its enrollment endpoint's", kinds)
	}
	tb := trust(t, ca)
	for what, c := range map[string]*x509.Certificate{"gateway": gw.Certificate(), "enrollment endpoint": enroller} {
		if !tb.IsRevoked(c.SerialNumber) {
			t.Errorf("the %s's certificate is not revoked", what)
		}
	}
	if tb.IsRevoked(signer.Certificate().SerialNumber) {
		t.Error("the policy signer of the node's name was revoked with it")
	}
	if _, err := ca.RevokeNode("treasury", "keyCompromise", t0.Add(time.Minute)); err == nil || !strings.Contains(err.Error(), "ca revoke --signer treasury") {
		t.Errorf("RevokeNode of a policy signer's name: %v; want refused, saying to revoke it as a signer", err)
	}
	done, err = ca.RevokeSigner("compliance", "keyCompromise", t0.Add(time.Minute))
	if err != nil || len(done) != 1 || done[0].Kind != KindPolicySigner {
		t.Fatalf("RevokeSigner = %+v, %v; want the policy signer's certificate alone", done, err)
	}
	if !trust(t, ca).IsRevoked(signer.Certificate().SerialNumber) {
		t.Error("the policy signer is not revoked")
	}
}

// TestTakeNewerCRLSettles: a newer list that names every revocation the
// CA's index holds is taken as it is, not signed again under a number of
// the CA's own: two copies of a CA directory taking each other's lists
// would otherwise outbid each other for ever.
func TestTakeNewerCRLSettles(t *testing.T) {
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), time.Now(), time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{id.Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	restored, err := ca.CRLPEM()
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.RefreshCRL(time.Now()); err != nil {
		t.Fatal(err)
	}
	b, _ := ca.CRLPEM()
	newer, err := ParseCRL(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ca.Dir(), "crl.pem"), restored, 0o644); err != nil {
		t.Fatal(err)
	}
	took, err := ca.TakeNewerCRL(newer)
	if err != nil || !took {
		t.Fatalf("took %v, %v; want the newer list taken", took, err)
	}
	b, _ = ca.CRLPEM()
	if got, err := ParseCRL(b); err != nil || got.Number.Cmp(newer.Number) != 0 {
		t.Errorf("the CA's list after taking #%s: %v (%v); want that list, not one signed after it", newer.Number, got.Number, err)
	}
}

// TestIssueRefusesRangeEnds: a new gateway is not given the first or the
// last address of an IPv4 mesh range: on its interface, with the whole
// range, the last is the broadcast address, which no peer can connect
// to. The addresses next to them are given.
func TestIssueRefusesRangeEnds(t *testing.T) {
	ca := newTestCA(t)
	p := ca.MeshPrefix()
	if !p.Addr().Is4() {
		t.Fatalf("the test CA's range %s is not IPv4", p)
	}
	first := p.Masked().Addr()
	last := first
	for next := last.Next(); p.Contains(next); next = next.Next() {
		last = next
	}
	for ip, want := range map[netip.Addr]string{first: "first address", last: "broadcast address", first.Next(): "", last.Prev(): ""} {
		_, err := ca.IssueIdentity(testAttrs("gw-"+strings.ReplaceAll(ip.String(), ".", "-"), "s", ip.String()), time.Hour, time.Now())
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("overlay IP %s: %v; want %q", ip, err, want)
		}
	}

	// A gateway that has the address already (certified before) keeps
	// it, renewed by whatever way: through ca_dir (Sign), or issued again.
	a := testAttrs("gw-old", "s", last.String())
	k, _ := GenerateNodeKey()
	if _, err := ca.issueGateway(IssueRequest{Attributes: a, PublicKey: k.Public(), TTL: time.Hour}, "01", nil); err != nil {
		t.Fatal(err)
	}
	k2, _ := GenerateNodeKey()
	csr, err := createCSR(k2, a, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Sign(context.Background(), csr, a, time.Hour); err != nil {
		t.Errorf("a gateway renewing through ca_dir the address it holds: %v", err)
	}
	if _, err := ca.IssueIdentity(a, time.Hour, time.Now()); err != nil {
		t.Errorf("a gateway issued again at the address it holds: %v", err)
	}
}

// TestIssueRefusesIPv6SubnetRouterAnycast: of an IPv6 mesh range the
// first address, the Subnet-Router anycast address that Linux delivers
// locally on every gateway with forwarding on, is refused to a new
// gateway; the next and the last are given.
func TestIssueRefusesIPv6SubnetRouterAnycast(t *testing.T) {
	ca, err := InitCA(filepath.Join(t.TempDir(), "ca"), InitOptions{MeshPrefix: netip.MustParsePrefix("fd5b::/64")})
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct{ ip, want string }{{"fd5b::", "Subnet-Router anycast"}, {"fd5b::1", ""}, {"fd5b::ffff:ffff:ffff:ffff", ""}} {
		ip, want := c.ip, c.want
		_, err := ca.IssueIdentity(testAttrs("gw-"+string(rune('a'+i)), "s", ip), time.Hour, time.Now())
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("overlay IP %s: %v; want %q", ip, err, want)
		}
	}
}

// TestCADirectoryWithDelta: a CA directory whose crl.pem is a delta (one
// an earlier release took from gossip and wrote back) is refused for
// holding no complete list, said as such, and ca crl --refresh mends it.
func TestCADirectoryWithDelta(t *testing.T) {
	ca := newTestCA(t)
	delta := listWithExtension(t, ca, 10, deltaIndicator(t, 9))
	if err := os.WriteFile(filepath.Join(ca.Dir(), fileCRL), encodePEM(pemCRL, delta.Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.TrustBundle(); err == nil || !strings.Contains(err.Error(), "holds a delta list") || !strings.Contains(err.Error(), "ca crl --refresh") {
		t.Errorf("a CA directory whose list is a delta: %v; want it said, and ca crl --refresh", err)
	}
	if err := ca.RefreshCRL(time.Now()); err != nil {
		t.Fatal(err)
	}
	if tb, err := ca.TrustBundle(); err != nil || tb.CRL().Number.Int64() != 11 {
		t.Errorf("after ca crl --refresh: %v, %v; want list 11 in force", tb, err)
	}
}
