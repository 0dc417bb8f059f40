package certs

import (
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
