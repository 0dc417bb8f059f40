package certs

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"testing"

	"filippo.io/edwards25519"
)

func TestWGProof(t *testing.T) {
	certHash := sha256.Sum256([]byte("certificate"))
	other := sha256.Sum256([]byte("another certificate"))
	// Enough keys that both signs of the Edwards point occur: the signer
	// negates its scalar for half of them.
	signs := map[byte]bool{}
	for range 32 {
		k, err := GenerateWGKey()
		if err != nil {
			t.Fatal(err)
		}
		pub := k.Public()
		a, _ := edwards25519.NewScalar().SetBytesWithClamping(k.k[:])
		E := new(edwards25519.Point).ScalarBaseMult(a)
		if !bytes.Equal(E.BytesMontgomery(), pub[:]) {
			t.Fatalf("the Edwards point of the clamped key is not the X25519 public key")
		}
		signs[E.Bytes()[31]>>7] = true

		p, err := ProveWGKey(k, certHash)
		if err != nil {
			t.Fatal(err)
		}
		if err := VerifyWGProof(pub, certHash, p); err != nil {
			t.Fatalf("own proof refused: %v", err)
		}
		if err := VerifyWGProof(pub, other, p); err == nil {
			t.Fatal("proof accepted for another certificate")
		}
		k2, _ := GenerateWGKey()
		if err := VerifyWGProof(k2.Public(), certHash, p); err == nil {
			t.Fatal("proof accepted for another key")
		}
		for _, i := range []int{0, 31, 32, 63} {
			q := p
			q[i] ^= 1
			if err := VerifyWGProof(pub, certHash, q); err == nil {
				t.Fatalf("proof with byte %d flipped accepted", i)
			}
		}
		// The key's holder signing for another encoding of the same u
		// (X25519 ignores the top bit): still one key, so refused.
		hi := pub
		hi[31] |= 0x80
		if q, _ := xeddsaSign(k, wgProofMessage(certHash, hi)); VerifyWGProof(hi, certHash, q) == nil {
			t.Fatal("a proof for a non-canonical encoding of the key was accepted")
		}
		p2, _ := ProveWGKey(k, certHash)
		if p2 == p {
			t.Fatal("two proofs are the same: the nonce takes no randomness")
		}
	}
	if len(signs) != 2 {
		t.Fatalf("32 keys gave Edwards points of one sign only (%v): the negation is untested", signs)
	}
}

func TestWGProofRefusesUnusableKeys(t *testing.T) {
	certHash := sha256.Sum256([]byte("certificate"))
	k, _ := GenerateWGKey()
	p, _ := ProveWGKey(k, certHash)
	pub := k.Public()
	hi := pub
	hi[31] |= 0x80 // the same u for X25519, which ignores the top bit
	for name, key := range map[string]string{
		"zero":                  "0000000000000000000000000000000000000000000000000000000000000000",
		"one (small order)":     "0100000000000000000000000000000000000000000000000000000000000000",
		"minus one":             "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"order 8":               "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
		"p, not canonical":      "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"top bit set":           hex.EncodeToString(hi[:]),
		"p+1, not canonical":    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"all ones, not reduced": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
	} {
		var pk WGPublicKey
		b, _ := hex.DecodeString(key)
		copy(pk[:], b)
		// Asked directly: a proof made by another key fails whatever
		// the key's form, so it would not show the form is refused.
		if A, err := edwardsOf(pk); err == nil {
			t.Errorf("%s: mapped to the Edwards key %x", name, A)
		}
		if err := VerifyWGProof(pk, certHash, p); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := edwardsOf(pub); err != nil {
		t.Errorf("a key made by X25519 refused: %v", err)
	}
}

// TestWGProofRefusesSmallOrderForgery: under a key of small order (u = 0
// maps to the Edwards point (0, -1), of order 2) anyone can make a
// signature that crypto/ed25519 accepts: R the identity and s zero pass
// whenever the hash is even. Such keys must be refused before that.
func TestWGProofRefusesSmallOrderForgery(t *testing.T) {
	var zero WGPublicKey
	A, err := new(edwards25519.Point).SetBytes(append([]byte{0xec}, append(bytes.Repeat([]byte{0xff}, 30), 0x7f)...)) // (0, -1)
	if err != nil {
		t.Fatal(err)
	}
	var forged WGProof
	copy(forged[:32], edwards25519.NewIdentityPoint().Bytes()) // s stays zero
	for i := range 256 {
		certHash := sha256.Sum256([]byte{byte(i)})
		h := sha512.Sum512(append(append(forged[:32:32], A.Bytes()...), wgProofMessage(certHash, zero)...))
		c, _ := edwards25519.NewScalar().SetUniformBytes(h[:])
		if c.Bytes()[0]&1 != 0 {
			continue
		}
		if !ed25519.Verify(A.Bytes(), wgProofMessage(certHash, zero), forged[:]) {
			t.Fatal("the forgery does not pass crypto/ed25519: the test is wrong")
		}
		if err := VerifyWGProof(zero, certHash, forged); err == nil {
			t.Fatal("a forged proof under a small-order key was accepted")
		}
		return
	}
	t.Fatal("no even hash in 256 tries")
}

func BenchmarkWGProof(b *testing.B) {
	certHash := sha256.Sum256([]byte("certificate"))
	k, _ := GenerateWGKey()
	p, _ := ProveWGKey(k, certHash)
	b.Run("prove", func(b *testing.B) {
		for b.Loop() {
			if _, err := ProveWGKey(k, certHash); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("verify", func(b *testing.B) {
		for b.Loop() {
			if err := VerifyWGProof(k.Public(), certHash, p); err != nil {
				b.Fatal(err)
			}
		}
	})
}
