package certs

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha512"
	"errors"
	"fmt"

	"filippo.io/edwards25519"
	fe "filippo.io/edwards25519/field"
)

// A WireGuard key in an advert is a claim like an overlay address: every
// device keeps one peer per public key, so whoever advertises a key takes
// its peer entry. The advert's certificate signature shows who claims the
// key, not that the claimant holds it; any gateway could advertise another
// gateway's public key (it is gossiped to all) and, with the older
// certificate, push that gateway out of every plan. So each advertised key
// comes with a proof of possession: a signature by the WireGuard private key
// itself over the certificate it is claimed under.
//
// WireGuard keys are X25519 keys, which cannot sign as they are. XEdDSA
// (Signal's construction, https://signal.org/docs/specifications/xeddsa/)
// signs with one: the Montgomery key maps to the Edwards point with the same
// y and a zero sign bit, and a signature is then an ordinary Ed25519
// signature under that point, which crypto/ed25519 verifies.

// WGProofLen is the length of a WireGuard key's proof of possession.
const WGProofLen = ed25519.SignatureSize

// wgProofDomain separates these signatures from any other use of a
// WireGuard key.
const wgProofDomain = "skybridge wireguard key v1\x00"

// WGProof is a signature by a WireGuard private key over the certificate
// the key is claimed under.
type WGProof [WGProofLen]byte

// IsZero reports whether p is unset: an advert without a proof.
func (p WGProof) IsZero() bool { return p == WGProof{} }

func wgProofMessage(certHash [32]byte, pub WGPublicKey) []byte {
	m := make([]byte, 0, len(wgProofDomain)+64)
	m = append(m, wgProofDomain...)
	m = append(m, certHash[:]...)
	return append(m, pub[:]...)
}

// ProveWGKey signs, with k, that k's public key is claimed under the
// certificate whose SHA-256 is certHash.
func ProveWGKey(k WGPrivateKey, certHash [32]byte) (WGProof, error) {
	return xeddsaSign(k, wgProofMessage(certHash, k.Public()))
}

func xeddsaSign(k WGPrivateKey, msg []byte) (WGProof, error) {
	// The Edwards key pair (A, a) of the Montgomery private key: A = aB
	// with A's sign bit zero, negating a where kB has it set, because the
	// Montgomery public key does not say which of the two points it is.
	a, err := edwards25519.NewScalar().SetBytesWithClamping(k.k[:])
	if err != nil {
		return WGProof{}, fmt.Errorf("WireGuard key proof: %w", err)
	}
	A := new(edwards25519.Point).ScalarBaseMult(a).Bytes()
	if A[31]&0x80 != 0 {
		a.Negate(a)
		A[31] &^= 0x80
	}

	// r = hash1(a || M || Z) with 64 random bytes Z, as XEdDSA has it:
	// the nonce depends on the secret, the message and fresh randomness.
	var z [64]byte
	if _, err := rand.Read(z[:]); err != nil {
		return WGProof{}, fmt.Errorf("WireGuard key proof: %w", err)
	}
	h := sha512.New()
	var prefix [32]byte // 2^256 - 2, little-endian: hash1's domain
	for i := range prefix {
		prefix[i] = 0xff
	}
	prefix[0] = 0xfe
	h.Write(prefix[:])
	h.Write(a.Bytes())
	h.Write(msg)
	h.Write(z[:])
	r, err := edwards25519.NewScalar().SetUniformBytes(h.Sum(nil))
	if err != nil {
		return WGProof{}, fmt.Errorf("WireGuard key proof: %w", err)
	}
	R := new(edwards25519.Point).ScalarBaseMult(r).Bytes()

	h.Reset()
	h.Write(R)
	h.Write(A)
	h.Write(msg)
	c, err := edwards25519.NewScalar().SetUniformBytes(h.Sum(nil))
	if err != nil {
		return WGProof{}, fmt.Errorf("WireGuard key proof: %w", err)
	}
	s := edwards25519.NewScalar().MultiplyAdd(c, a, r)

	var p WGProof
	copy(p[:32], R)
	copy(p[32:], s.Bytes())
	return p, nil
}

var errWGKeyForm = errors.New("not a usable Curve25519 public key")

// canonicalKey reports whether pub is a u-coordinate below p with the top
// bit clear, as X25519 makes public keys. X25519 takes other encodings of
// the same u (top bit set, u + p) for the same key, while WireGuard and
// the mesh tell peers apart by the 32 bytes: one key written two ways
// would be two peers.
func canonicalKey(pub WGPublicKey) bool {
	u, err := new(fe.Element).SetBytes(pub[:])
	return err == nil && bytes.Equal(u.Bytes(), pub[:])
}

// VerifyWGProof reports whether p proves possession of pub's private key
// for the certificate whose SHA-256 is certHash.
func VerifyWGProof(pub WGPublicKey, certHash [32]byte, p WGProof) error {
	A, err := edwardsOf(pub)
	if err != nil {
		return err
	}
	if !ed25519.Verify(A, wgProofMessage(certHash, pub), p[:]) {
		return errors.New("signature does not verify")
	}
	return nil
}

// edwardsOf maps a Montgomery u-coordinate to the Edwards public key with
// y = (u-1)/(u+1) and a zero sign bit. Non-canonical encodings (u ≥ p or
// the top bit set) and points of small order are refused: a small-order
// key has no secret to prove, and signatures under it can be forged.
func edwardsOf(pub WGPublicKey) (ed25519.PublicKey, error) {
	if !canonicalKey(pub) {
		return nil, errWGKeyForm
	}
	u, _ := new(fe.Element).SetBytes(pub[:])
	// u = -1 has no Edwards image: Invert(0) is 0, y = 0, a point of
	// order 4, which the cofactor check below refuses.
	one := new(fe.Element).One()
	y := new(fe.Element).Multiply(new(fe.Element).Subtract(u, one), new(fe.Element).Invert(new(fe.Element).Add(u, one)))
	A := y.Bytes() // sign bit zero: Bytes is canonical, below 2^255
	P, err := new(edwards25519.Point).SetBytes(A)
	if err != nil {
		return nil, errWGKeyForm
	}
	if new(edwards25519.Point).MultByCofactor(P).Equal(edwards25519.NewIdentityPoint()) == 1 {
		return nil, errWGKeyForm
	}
	return ed25519.PublicKey(A), nil
}
