package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"math/big"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestVerifyAdvert is the table that guards admission to the mesh. Every
// row must fail if the corresponding check in VerifyAdvert is removed.
func TestVerifyAdvert(t *testing.T) {
	ca := newTestCA(t)
	other := newTestCA(t) // a different mesh CA with the same shape
	now := t0

	good := issue(t, ca, testAttrs("gw1", "aws-eu-central-1", "100.96.0.10", "10.20.0.0/16", "fd00:20::/48"), now.Add(-time.Hour), 24*time.Hour)
	expired := issue(t, ca, testAttrs("gw2", "aws-eu-central-1", "100.96.0.11"), now.Add(-48*time.Hour), time.Hour)
	future := issue(t, ca, testAttrs("gw3", "aws-eu-central-1", "100.96.0.12"), now.Add(2*time.Hour), 24*time.Hour)
	revoked := issue(t, ca, testAttrs("gw4", "aws-eu-central-1", "100.96.0.13"), now.Add(-time.Hour), 24*time.Hour)
	foreign := issue(t, other, testAttrs("gw1", "aws-eu-central-1", "100.96.0.10", "10.20.0.0/16"), now.Add(-time.Hour), 24*time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{revoked.Certificate().SerialNumber}, "keyCompromise", now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	tb := trust(t, ca)

	goodAd := func() *Advert { return advertFor(good, 7, now.Add(-time.Second)) }
	signed := func(mut func(*Advert), id *NodeIdentity) []byte {
		a := goodAd()
		if mut != nil {
			mut(a)
		}
		if id != good {
			// keep the advert consistent with the signing identity so
			// that only the property under test differs
			ia := id.Attributes()
			a.Node, a.OverlayIP, a.Routes = ia.Node, ia.OverlayIP, ia.Routes
			wg, _ := GenerateWGKey()
			a.WireGuardKey = wg.Public()
			a.WireGuardKeyProof, _ = ProveWGKey(wg, id.Fingerprint())
		}
		return sign(t, a, id)
	}
	const proofField = 2 + WGProofLen // tag, one-byte length, proof
	someKey := func() WGPrivateKey { k, _ := GenerateWGKey(); return k }
	goodRaw := signed(nil, good)
	goodSA, err := DecodeAdvert(goodRaw)
	if err != nil {
		t.Fatal(err)
	}
	goodSeen := Seen{Version: 7, Digest: sha256.Sum256(goodSA.body)} // what is signed, not the signature
	// Another gateway in good standing naming good's key with good's
	// proof, which names good's certificate. After good's advert, so
	// that the shared cache has the proof (for good's certificate).
	bystander := issue(t, ca, testAttrs("gw5", "aws-eu-central-1", "100.96.0.14"), now.Add(-time.Hour), 24*time.Hour)
	copied := func() []byte {
		sa, err := DecodeAdvert(goodRaw)
		if err != nil {
			t.Fatal(err)
		}
		a := advertFor(bystander, 7, now.Add(-time.Second))
		a.WireGuardKey, a.WireGuardKeyProof = sa.WireGuardKey, sa.WireGuardKeyProof
		return sign(t, a, bystander)
	}()

	// Certificates the CA key signed without the checks of issuing (an
	// issuer that checks less, or a release that did): what they grant
	// is judged again on admission, or one gateway could draw the mesh's
	// traffic, or its overlay, to itself.
	unchecked := func(node, overlay string, routes ...string) *NodeIdentity {
		return certifyUnchecked(t, ca, testAttrs(node, "aws-eu-central-1", overlay, routes...), now.Add(-time.Hour), now.Add(time.Hour))
	}
	defaultRoute := unchecked("gw6", "100.96.0.15", "0.0.0.0/0")
	overlayRoute := unchecked("gw7", "100.96.0.16", "100.96.7.0/24")
	mappedRoute := unchecked("gw8", "100.96.0.17", "::ffff:10.1.0.0/112")
	outsideMesh := unchecked("gw9", "100.96.9.9")
	// A mesh_cidr inside the CA's name constraint: as with a CA that has
	// none (Vault's), x509 lets the overlay IP through and only the
	// attributes' check keeps it in the mesh.
	narrow, err := NewTrustBundle(tb.CAs(), netip.MustParsePrefix("100.96.0.0/24"))
	if err != nil {
		t.Fatal(err)
	}

	tampered := append([]byte(nil), goodRaw...)
	// Flip a bit inside the endpoint port: the advert still decodes, so
	// only the signature can catch it.
	sa, _ := DecodeAdvert(goodRaw)
	idx := len(sa.body) - 35 - proofField // last byte of the endpoints field, before the certificate hash and key proof fields
	tampered[idx] ^= 0x01

	tests := []struct {
		name string
		raw  []byte
		cert *NodeIdentity
		tb   *TrustBundle
		now  time.Time
		last *Seen
		want Reason // "" = accept
	}{
		{name: "valid", raw: goodRaw, cert: good},
		{name: "valid first advert after restart", raw: goodRaw, cert: good, last: nil},
		{name: "same advert again is idempotent", raw: goodRaw, cert: good, last: &goodSeen},
		{name: "newer version", raw: signed(func(a *Advert) { a.Version = 8 }, good), cert: good, last: &goodSeen},
		{name: "advertising a sub-prefix of a certified route", raw: signed(func(a *Advert) { a.Routes = []netip.Prefix{netip.MustParsePrefix("10.20.5.0/24")} }, good), cert: good},
		{name: "advertising no routes", raw: signed(func(a *Advert) { a.Routes = nil }, good), cert: good},

		{name: "wrong CA", raw: signed(nil, foreign), cert: foreign, want: ReasonUnknownCA},
		{name: "expired", raw: signed(nil, expired), cert: expired, want: ReasonExpired},
		{name: "expires a second later", raw: goodRaw, cert: good, now: good.Certificate().NotAfter.Add(time.Second), want: ReasonExpired},
		{name: "not yet valid", raw: signed(nil, future), cert: future, want: ReasonNotYetValid},
		{name: "revoked", raw: signed(nil, revoked), cert: revoked, want: ReasonRevoked},
		{name: "CA expired", raw: goodRaw, cert: good, now: ca.Certificate().NotAfter.Add(time.Hour), want: ReasonExpired},

		{name: "claims another site", raw: signed(func(a *Advert) { a.Site = "onprem-zrh" }, good), cert: good, want: ReasonAttributeMismatch},
		{name: "claims another node", raw: signed(func(a *Advert) { a.Node = "gw9" }, good), cert: good, want: ReasonAttributeMismatch},
		{name: "claims another region", raw: signed(func(a *Advert) { a.Region = "us-east-1" }, good), cert: good, want: ReasonAttributeMismatch},
		{name: "claims another provider", raw: signed(func(a *Advert) { a.Provider = "onprem" }, good), cert: good, want: ReasonAttributeMismatch},
		{name: "claims another jurisdiction", raw: signed(func(a *Advert) { a.Jurisdiction = "US" }, good), cert: good, want: ReasonAttributeMismatch},
		{name: "claims another overlay IP", raw: signed(func(a *Advert) { a.OverlayIP = netip.MustParseAddr("100.96.0.99") }, good), cert: good, want: ReasonAttributeMismatch},
		{name: "claims a route not granted", raw: signed(func(a *Advert) { a.Routes = append(a.Routes, netip.MustParsePrefix("10.30.0.0/16")) }, good), cert: good, want: ReasonAttributeMismatch},
		{name: "claims a super-prefix of a granted route", raw: signed(func(a *Advert) { a.Routes = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")} }, good), cert: good, want: ReasonAttributeMismatch},
		{name: "claims default route", raw: signed(func(a *Advert) { a.Routes = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")} }, good), cert: good, want: ReasonAttributeMismatch},

		{name: "certified a default route", raw: signed(nil, defaultRoute), cert: defaultRoute, want: ReasonBadCertificate},
		{name: "certified a route into the overlay", raw: signed(nil, overlayRoute), cert: overlayRoute, want: ReasonBadCertificate},
		{name: "certified a route written as IPv4-in-IPv6", raw: signed(nil, mappedRoute), cert: mappedRoute, want: ReasonBadCertificate},
		{name: "certified an overlay IP outside mesh_cidr", raw: signed(nil, outsideMesh), cert: outsideMesh, tb: narrow, want: ReasonBadCertificate},

		{name: "valid mid-rotation", raw: signed(func(a *Advert) { rotating(a) }, good), cert: good},
		{name: "claims a WireGuard key it does not hold", raw: signed(func(a *Advert) { a.WireGuardKey = someKey().Public() }, good), cert: good, want: ReasonUnprovenKey},
		{name: "proves its WireGuard key for another certificate", raw: signed(func(a *Advert) {
			k := someKey()
			a.WireGuardKey = k.Public()
			a.WireGuardKeyProof, _ = ProveWGKey(k, revoked.Fingerprint())
		}, good), cert: good, want: ReasonUnprovenKey},
		{name: "names another's WireGuard key with that one's proof", raw: copied, cert: bystander, want: ReasonUnprovenKey},
		{name: "no proof of its WireGuard key (an earlier release)", raw: signed(func(a *Advert) { a.WireGuardKeyProof = WGProof{} }, good), cert: good},

		{name: "replayed older version", raw: goodRaw, cert: good, last: &Seen{Version: 8}, want: ReasonReplay},
		{name: "same version different content", raw: signed(func(a *Advert) { a.Endpoints = a.Endpoints[:1] }, good), cert: good, last: &goodSeen, want: ReasonReplay},
		{name: "dated in the future", raw: signed(func(a *Advert) { a.Timestamp = now.Add(time.Hour) }, good), cert: good, want: ReasonClockSkew},

		{name: "tampered after signing", raw: tampered, cert: good, want: ReasonBadSignature},
		{name: "signed by another identity's key", raw: resign(t, goodRaw, revoked), cert: good, want: ReasonBadSignature},
		{name: "presented with another certificate", raw: goodRaw, cert: expired, want: ReasonCertMismatch},
		{name: "no certificate", raw: goodRaw, cert: nil, want: ReasonCertMismatch},

		{name: "empty", raw: nil, cert: good, want: ReasonMalformed},
		{name: "truncated in the signature", raw: goodRaw[:len(goodRaw)-5], cert: good, want: ReasonMalformed},
		{name: "signature stripped", raw: goodRaw[:len(sa.body)], cert: good, want: ReasonMalformed},
		{name: "truncated to one byte", raw: goodRaw[:1], cert: good, want: ReasonMalformed},
		{name: "garbage", raw: []byte("GET / HTTP/1.1\r\nHost: skybridge\r\n\r\n"), cert: good, want: ReasonMalformed},
		{name: "oversized", raw: make([]byte, MaxAdvertSize+1), cert: good, want: ReasonMalformed},
	}
	cache := NewVerifyCache() // shared by all rows, as by a gateway's members
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tt.tb
			if b == nil {
				b = tb
			}
			at := tt.now
			if at.IsZero() {
				at = now
			}
			v, err := VerifyAdvert(tt.raw, certOf(tt.cert), b, at, tt.last)
			if got := ReasonOf(err); got != tt.want {
				t.Fatalf("reason = %q (err %v), want %q", got, err, tt.want)
			}
			if tt.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				sa, _ := DecodeAdvert(tt.raw)
				if v.Attributes.Site != "aws-eu-central-1" || v.Seen.Digest != sha256.Sum256(sa.body) {
					t.Fatalf("accepted advert has wrong attributes or digest: %+v", v)
				}
			} else if v != nil {
				t.Fatal("refusal returned a verified advert")
			}
			// The cache gives the same answer, the first time and when it
			// hits.
			for range 2 {
				if _, err := cache.VerifyAdvert(tt.raw, certOf(tt.cert), b, at, tt.last); ReasonOf(err) != tt.want {
					t.Fatalf("cached: reason = %q (err %v), want %q", ReasonOf(err), err, tt.want)
				}
			}
		})
	}
}

func certOf(id *NodeIdentity) *x509.Certificate {
	if id == nil {
		return nil
	}
	return id.Certificate()
}

// resign replaces the signature of raw with one made by another identity.
func resign(t *testing.T, raw []byte, by *NodeIdentity) []byte {
	t.Helper()
	sa, err := DecodeAdvert(raw)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := by.Signer().Sign(rand.Reader, advertDigest(sa.body), nil)
	if err != nil {
		t.Fatal(err)
	}
	return appendField(append([]byte(nil), sa.body...), tagSignature, sig)
}

// TestRefusalNamesAreShort: a refused certificate's name is cut short in
// the error: certificates arrive from the network, and refusals are kept.
func TestRefusalNamesAreShort(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: strings.Repeat("x", 10000)},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	tb, err := newTestCA(t).TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	_, err = tb.VerifyCertificate(cert, t0)
	if err == nil || len(err.Error()) > 200 {
		t.Fatalf("a certificate from another CA with a name of 10,000 characters: error of %d bytes", len(fmt.Sprint(err)))
	}
}

// TestVerifyCertificateClockSkew: a clock up to MaxClockSkew behind the
// issuer's takes a certificate issued moments ago as valid, with and
// without the cache; further behind, it is refused as not yet valid and
// the refusal says what this clock reads.
func TestVerifyCertificateClockSkew(t *testing.T) {
	ca := newTestCA(t)
	tb := trust(t, ca)
	id := issue(t, ca, testAttrs("gw1", "aws-eu-central-1", "100.96.0.10"), t0, time.Hour)
	from := id.Certificate().NotBefore // t0 less the CA's backdate
	for _, tc := range []struct {
		name string
		at   time.Time
		ok   bool
	}{
		{"the issuer's time", t0, true},
		{"3 minutes behind", t0.Add(-3 * time.Minute), true},
		{"behind by the skew allowed", from.Add(-MaxClockSkew), true},
		{"a second more", from.Add(-MaxClockSkew - time.Second), false},
		{"an hour behind", t0.Add(-time.Hour), false},
	} {
		for _, cache := range []*VerifyCache{nil, NewVerifyCache()} {
			if cache != nil { // filled while valid, then asked again
				if _, err := cache.VerifyCertificate(tb, id.Certificate(), t0); err != nil {
					t.Fatal(err)
				}
			}
			_, err := cache.VerifyCertificate(tb, id.Certificate(), tc.at)
			switch {
			case tc.ok && err != nil:
				t.Errorf("%s (cache %v): %v", tc.name, cache != nil, err)
			case !tc.ok && (ReasonOf(err) != ReasonNotYetValid || !strings.Contains(err.Error(), "this clock says "+tc.at.Format(time.RFC3339))):
				t.Errorf("%s (cache %v): %v; want not yet valid, saying what this clock reads", tc.name, cache != nil, err)
			}
		}
	}
}

// TestVerifyCacheEndsWithCA: a verdict is kept until the first
// certificate of the chain ends, not the gateway's: an issuer may let a
// leaf outlast itself (Vault's leaf_not_after_behavior=permit). Kept
// until the leaf's end, the cache went on accepting the advert and the
// certificate the CA no longer vouched for, which VerifyAdvert refuses.
func TestVerifyCacheEndsWithCA(t *testing.T) {
	ca, err := InitCA(filepath.Join(t.TempDir(), "ca"), InitOptions{Now: t0.Add(-24 * time.Hour), Validity: 48 * time.Hour, MeshPrefix: mustPrefix("100.96.0.0/16")})
	if err != nil {
		t.Fatal(err)
	}
	// The CA ends at t0+24h, the gateway's certificate ten days later.
	id := certifyUnchecked(t, ca, testAttrs("gw-a", "site-a", "100.96.0.10", "10.1.0.0/16"), t0.Add(-time.Minute), t0.Add(10*24*time.Hour))
	cert := id.Certificate()
	tb := trust(t, ca)
	raw := sign(t, advertFor(id, 1, t0), id)
	cache := NewVerifyCache()
	if _, err := cache.VerifyAdvert(raw, cert, tb, t0, nil); err != nil {
		t.Fatalf("while the CA is valid: %v", err)
	}
	after := ca.Certificate().NotAfter.Add(time.Second)
	if _, err := VerifyAdvert(raw, cert, tb, after, nil); ReasonOf(err) != ReasonExpired {
		t.Fatalf("after the CA's end, uncached: %v, want expired", err)
	}
	if _, err := cache.VerifyAdvert(raw, cert, tb, after, nil); ReasonOf(err) != ReasonExpired {
		t.Errorf("after the CA's end, the advert through the cache: %v, want expired", err)
	}
	if _, err := cache.VerifyCertificate(tb, cert, after); ReasonOf(err) != ReasonExpired {
		t.Errorf("after the CA's end, the certificate through the cache: %v, want expired", err)
	}
}

// TestVerifyAdvertReencodedSignatureIsNoReplay: an ECDSA signature
// (r, s) verifies as (r, n-s) too, so anyone can write a gateway's
// signed advert a second way. Same version, same signed content: not a
// replay, whichever encoding came first.
func TestVerifyAdvertReencodedSignatureIsNoReplay(t *testing.T) {
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw-a", "site-a", "100.96.0.10", "10.1.0.0/16"), t0, 24*time.Hour)
	tb := trust(t, ca)
	now := t0.Add(time.Hour)
	raw := sign(t, advertFor(id, 7, now), id)
	sa, err := DecodeAdvert(raw)
	if err != nil {
		t.Fatal(err)
	}
	var sig struct{ R, S *big.Int }
	if _, err := asn1.Unmarshal(sa.sig, &sig); err != nil {
		t.Fatal(err)
	}
	sig.S.Sub(elliptic.P256().Params().N, sig.S)
	resig, err := asn1.Marshal(sig)
	if err != nil {
		t.Fatal(err)
	}
	copied := appendField(append([]byte(nil), sa.body...), tagSignature, resig)
	for _, cache := range []*VerifyCache{nil, NewVerifyCache()} {
		first, err := cache.VerifyAdvert(copied, id.Certificate(), tb, now, nil)
		if err != nil {
			t.Fatalf("the re-encoded advert: %v", err)
		}
		if _, err := cache.VerifyAdvert(raw, id.Certificate(), tb, now, &first.Seen); err != nil {
			t.Errorf("the gateway's own advert after the re-encoded one (cache %v): %v", cache != nil, err)
		}
		other := sign(t, advertFor(id, 7, now), id) // another WireGuard key
		if _, err := cache.VerifyAdvert(other, id.Certificate(), tb, now, &first.Seen); ReasonOf(err) != ReasonReplay {
			t.Errorf("other content under version 7 (cache %v): %v, want a replay", cache != nil, err)
		}
	}
}
