package certs

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"log/slog"
	"strings"
)

// WGKeyLen is the length of WireGuard (Curve25519) keys.
const WGKeyLen = 32

// WGPrivateKey is a gateway's WireGuard private key. It never prints or logs
// itself; use Base64Secret where the key must be written out on purpose.
type WGPrivateKey struct {
	secret
	k [WGKeyLen]byte
}

// WGPublicKey is a WireGuard public key. It prints as base64, the form `wg`
// shows.
type WGPublicKey [WGKeyLen]byte

// GenerateWGKey makes a new WireGuard private key, clamped as `wg genkey`
// clamps it so that every tool shows the same bytes.
func GenerateWGKey() (WGPrivateKey, error) {
	var k WGPrivateKey
	if _, err := rand.Read(k.k[:]); err != nil {
		return WGPrivateKey{}, fmt.Errorf("generate WireGuard key: %w", err)
	}
	k.k[0] &= 248
	k.k[31] = (k.k[31] & 127) | 64
	return k, nil
}

// ParseWGPrivateKey parses a base64 private key as `wg genkey` writes it.
// The error never contains the input.
func ParseWGPrivateKey(s string) (WGPrivateKey, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != WGKeyLen {
		return WGPrivateKey{}, fmt.Errorf("WireGuard private key is not %d bytes of base64 (as written by `wg genkey`)", WGKeyLen)
	}
	var k WGPrivateKey
	copy(k.k[:], b)
	return k, nil
}

// IsZero reports whether k is unset.
func (k WGPrivateKey) IsZero() bool { return k.k == [WGKeyLen]byte{} }

// Public derives the public key.
func (k WGPrivateKey) Public() WGPublicKey {
	priv, err := ecdh.X25519().NewPrivateKey(k.k[:])
	if err != nil {
		// NewPrivateKey only fails on a wrong length, which the type rules out.
		panic(err)
	}
	var pub WGPublicKey
	copy(pub[:], priv.PublicKey().Bytes())
	return pub
}

// Bytes returns a copy of the raw key for the WireGuard device
// configuration. Treat the result as secret.
func (k WGPrivateKey) Bytes() [WGKeyLen]byte { return k.k }

// Base64Secret returns the key in `wg` format for writing to a 0600 file or
// a secret store. The name is loud on purpose: it is the only way to print
// the key.
func (k WGPrivateKey) Base64Secret() string { return base64.StdEncoding.EncodeToString(k.k[:]) }

// ParseWGPublicKey parses a base64 public key.
func ParseWGPublicKey(s string) (WGPublicKey, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != WGKeyLen {
		return WGPublicKey{}, fmt.Errorf("WireGuard public key %q is not %d bytes of base64", s, WGKeyLen)
	}
	var p WGPublicKey
	copy(p[:], b)
	return p, nil
}

func (p WGPublicKey) String() string { return base64.StdEncoding.EncodeToString(p[:]) }

// LogValue makes slog print the base64 form rather than a byte array.
func (p WGPublicKey) LogValue() slog.Value { return slog.StringValue(p.String()) }

// IsZero reports whether p is unset.
func (p WGPublicKey) IsZero() bool { return p == WGPublicKey{} }

// MarshalText encodes the key as base64, so JSON shows what `wg` shows.
func (p WGPublicKey) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText decodes the base64 form.
func (p *WGPublicKey) UnmarshalText(b []byte) error {
	k, err := ParseWGPublicKey(string(b))
	if err != nil {
		return err
	}
	*p = k
	return nil
}
