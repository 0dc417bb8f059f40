package certs

import (
	"bytes"
	"testing"
	"time"
)

// TestSeal: a secret sealed to a gateway's certificate opens with that
// gateway's key and context only, and not once a byte of it changed.
func TestSeal(t *testing.T) {
	ca := newTestCA(t)
	a := issue(t, ca, testAttrs("gw-a", "site-a", "100.96.0.1"), t0, time.Hour)
	b := issue(t, ca, testAttrs("gw-b", "site-b", "100.96.0.2"), t0, time.Hour)
	secret := []byte("0123456789abcdef0123456789abcdef")
	ctx := []byte("gossip key op 1")

	sealed, err := SealTo(a.Certificate(), secret, ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(sealed) != len(secret)+sealedOverhead || bytes.Contains(sealed, secret) {
		t.Fatalf("sealed: %d bytes for a %d-byte secret, or the secret shows", len(sealed), len(secret))
	}
	got, err := a.Open(sealed, ctx)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("open by its recipient: %q, %v", got, err)
	}
	again, _ := SealTo(a.Certificate(), secret, ctx)
	if bytes.Equal(again, sealed) {
		t.Fatal("two sealings of one secret are equal: the fresh key is not fresh")
	}

	if _, err := b.Open(sealed, ctx); err == nil {
		t.Fatal("opened by another gateway")
	}
	if _, err := a.Open(sealed, []byte("gossip key op 2")); err == nil {
		t.Fatal("opened for another context")
	}
	for i := range sealed {
		bad := bytes.Clone(sealed)
		bad[i] ^= 0x01
		if _, err := a.Open(bad, ctx); err == nil {
			t.Fatalf("opened with byte %d changed", i)
		}
	}
	if _, err := a.Open(sealed[:sealedOverhead-1], ctx); err == nil {
		t.Fatal("opened a truncated sealing")
	}
}
