package certs

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
)

// Sealing a secret to one gateway: ECDH between a fresh P-256 key and the
// key of the gateway's certificate, HKDF-SHA256 over the shared secret
// (salted with both public keys, bound to a caller's context), AES-256-GCM.
// What gossip carries is readable by anyone holding the gossip key; a
// secret sealed this way only by the gateway whose certificate it names —
// a new gossip key handed out because the old one leaked, say.

const sealInfo = "skybridge seal v1\x00"

// sealedOverhead is what sealing adds: the fresh public key and GCM's tag.
const sealedOverhead = 65 + 16

// SealTo encrypts secret so that only the holder of cert's private key can
// open it, for context (what the secret is for, and an ID that makes it
// unique: Open must be given the same).
func SealTo(cert *x509.Certificate, secret, context []byte) ([]byte, error) {
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("seal to %s: its certificate's key is not ECDSA", cert.Subject.CommonName)
	}
	to, err := pub.ECDH()
	if err != nil {
		return nil, fmt.Errorf("seal to %s: %w", cert.Subject.CommonName, err)
	}
	eph, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	shared, err := eph.ECDH(to)
	if err != nil {
		return nil, err
	}
	aead, err := sealAEAD(shared, eph.PublicKey(), to, context)
	if err != nil {
		return nil, err
	}
	// The key is used once (a fresh ephemeral key each time): a zero
	// nonce is safe.
	return aead.Seal(eph.PublicKey().Bytes(), make([]byte, aead.NonceSize()), secret, nil), nil
}

// Open decrypts what SealTo sealed to this identity's certificate for
// context.
func (id *NodeIdentity) Open(sealed, context []byte) ([]byte, error) {
	if len(sealed) < sealedOverhead {
		return nil, errors.New("sealed secret too short")
	}
	eph, err := ecdh.P256().NewPublicKey(sealed[:65])
	if err != nil {
		return nil, fmt.Errorf("sealed secret: %w", err)
	}
	own, err := id.key.ECDH()
	if err != nil {
		return nil, err
	}
	shared, err := own.ECDH(eph)
	if err != nil {
		return nil, fmt.Errorf("sealed secret: %w", err)
	}
	aead, err := sealAEAD(shared, eph, own.PublicKey(), context)
	if err != nil {
		return nil, err
	}
	secret, err := aead.Open(nil, make([]byte, aead.NonceSize()), sealed[65:], nil)
	if err != nil {
		return nil, errors.New("sealed secret does not open with this gateway's key: sealed to another gateway (or another of its certificates), or damaged")
	}
	return secret, nil
}

// sealAEAD derives the AEAD of one sealing from its ECDH shared secret,
// salted with the sealing's fresh public key and the recipient's.
func sealAEAD(shared []byte, eph, recipient *ecdh.PublicKey, context []byte) (cipher.AEAD, error) {
	salt := append(eph.Bytes(), recipient.Bytes()...)
	key, err := hkdf.Key(sha256.New, shared, salt, sealInfo+string(context), 32)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}
