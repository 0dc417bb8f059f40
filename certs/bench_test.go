package certs

import (
	"crypto/sha256"
	"testing"
	"time"
)

// Benchmarks of the admission path. Every gateway verifies every other
// gateway's advert whenever it changes, so at 1,000 gateways these figures
// times 1,000 are the CPU a full membership refresh costs one gateway.
//
//	go test -run '^$' -bench . -benchmem ./certs/

func benchSetup(b *testing.B) (*NodeIdentity, *TrustBundle, []byte) {
	ca := newTestCA(b)
	id := issue(b, ca, testAttrs("gw1", "aws-eu-central-1", "100.96.0.10", "10.20.0.0/16", "fd00:20::/48"), t0, 24*time.Hour)
	raw := sign(b, advertFor(id, 1, t0), id)
	return id, trust(b, ca), raw
}

func BenchmarkSignAdvert(b *testing.B) {
	id, _, _ := benchSetup(b)
	a := advertFor(id, 1, t0)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := SignAdvert(a, id); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeAdvert(b *testing.B) {
	_, _, raw := benchSetup(b)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeAdvert(raw); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyAdvert is the full check: decode, X.509 chain, revocation,
// signature, claims, replay.
func BenchmarkVerifyAdvert(b *testing.B) {
	id, tb, raw := benchSetup(b)
	cert := id.Certificate()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := VerifyAdvert(raw, cert, tb, t0, nil); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyCertificate(b *testing.B) {
	id, tb, _ := benchSetup(b)
	cert := id.Certificate()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := tb.VerifyCertificate(cert, t0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyAdvertNewVersion is a gateway's usual case: a member it
// has verified before sends a new advert (a load figure changed), under
// the same certificate and WireGuard key. The cache has the certificate
// and the key's proof; the advert's own signature is checked anew.
func BenchmarkVerifyAdvertNewVersion(b *testing.B) {
	id, tb, _ := benchSetup(b)
	cert := id.Certificate()
	a := advertFor(id, 1, t0)
	cache := NewVerifyCache()
	adverts := make([][]byte, 64)
	keys := make([]verifyKey, len(adverts))
	for i := range adverts {
		a.Version, a.Load = uint64(i+1), uint32(i+1)
		adverts[i] = sign(b, a, id)
		keys[i] = verifyKey{advert: sha256.Sum256(adverts[i]), cert: id.Fingerprint(), trust: tb.Key()}
	}
	if _, err := cache.VerifyAdvert(adverts[0], cert, tb, t0, nil); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		j := i % len(adverts)
		delete(cache.m, keys[j]) // the advert itself is new
		if _, err := cache.VerifyAdvert(adverts[j], cert, tb, t0, nil); err != nil {
			b.Fatal(err)
		}
		i++
	}
}
