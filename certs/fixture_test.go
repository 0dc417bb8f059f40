package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"testing"
	"time"
)

// t0 is a fixed clock for deterministic tests.
var t0 = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

func testAttrs(node, site, overlay string, routes ...string) Attributes {
	a := Attributes{
		Node: node, Site: site, Region: "eu-central-1", Provider: "aws", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr(overlay),
		Labels:    map[string]string{"classes": "pii-eu,risk-batch", "tier": "gold"},
	}
	for _, r := range routes {
		a.Routes = append(a.Routes, netip.MustParsePrefix(r))
	}
	return a
}

func newTestCA(t testing.TB) *CA {
	t.Helper()
	ca, err := InitCA(filepath.Join(t.TempDir(), "ca"), InitOptions{Now: t0.Add(-24 * time.Hour), MeshPrefix: netip.MustParsePrefix("100.96.0.0/16")})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func issue(t testing.TB, ca *CA, a Attributes, now time.Time, ttl time.Duration) *NodeIdentity {
	t.Helper()
	id, err := ca.IssueIdentity(a, ttl, now)
	if err != nil {
		t.Fatalf("issue %s: %v", a.Node, err)
	}
	return id
}

func trust(t testing.TB, ca *CA) *TrustBundle {
	t.Helper()
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	return tb
}

func advertFor(id *NodeIdentity, version uint64, at time.Time) *Advert {
	a := id.Attributes()
	wg, _ := GenerateWGKey()
	proof, _ := ProveWGKey(wg, id.Fingerprint())
	return &Advert{
		Version: version, Timestamp: at,
		Node: a.Node, Site: a.Site, Region: a.Region, Provider: a.Provider, Jurisdiction: a.Jurisdiction,
		OverlayIP: a.OverlayIP, Routes: a.Routes, WireGuardKey: wg.Public(), WireGuardKeyProof: proof,
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.10:51820"), netip.MustParseAddrPort("[2001:db8::10]:51820")},
	}
}

// rotating gives a a next WireGuard key, as during a key rotation.
func rotating(a *Advert) *Advert {
	next, _ := GenerateWGKey()
	a.NextWireGuardKey = next.Public()
	return a
}

func sign(t testing.TB, a *Advert, id *NodeIdentity) []byte {
	t.Helper()
	raw, err := SignAdvert(a, id)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// certifyUnchecked is a gateway certificate of ca for a, signed with none
// of the checks of issuing: what an issuer that checks less (or a
// release that did) may have signed.
func certifyUnchecked(t testing.TB, ca *CA, a Attributes, notBefore, notAfter time.Time) *NodeIdentity {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(77), Subject: pkix.Name{CommonName: a.Node}, NotBefore: notBefore, NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true, URIs: []*url.URL{a.URI()}, IPAddresses: []net.IP{a.OverlayIP.AsSlice()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	id, err := NewNodeIdentity(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return id
}
