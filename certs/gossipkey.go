package certs

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"slices"
	"strings"
)

// GossipKeyLen is the AES-256 key length used for new gossip keys. memberlist
// also accepts 16 and 24 byte keys, and ParseGossipKeyring does too.
const GossipKeyLen = 32

// GossipKeyring holds the symmetric keys that encrypt gossip. The first key
// is the primary one (used to encrypt); the others are still accepted for
// decryption, which is what lets a rotation proceed without a restart. It
// never prints or logs the keys.
type GossipKeyring struct {
	secret
	keys [][]byte
}

// GenerateGossipKeyring makes a keyring with one fresh primary key.
func GenerateGossipKeyring() (*GossipKeyring, error) {
	k, err := NewGossipKey()
	if err != nil {
		return nil, err
	}
	return &GossipKeyring{keys: [][]byte{k}}, nil
}

// NewGossipKey makes one random AES-256 gossip key.
func NewGossipKey() ([]byte, error) {
	k := make([]byte, GossipKeyLen)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("generate gossip key: %w", err)
	}
	return k, nil
}

// NewGossipKeyring builds a keyring from keys, the first being primary.
func NewGossipKeyring(keys [][]byte) (*GossipKeyring, error) {
	if len(keys) == 0 {
		return nil, fmt.Errorf("gossip keyring is empty: it needs at least one key")
	}
	kr := &GossipKeyring{keys: make([][]byte, 0, len(keys))}
	// A set, not a comparison of every pair: a keyring read from a file
	// or Vault may hold thousands of keys (written before rotation steps
	// were bounded), and each rotation step rebuilds it.
	seen := make(map[string]struct{}, len(keys))
	for i, k := range keys {
		switch len(k) {
		case 16, 24, 32:
		default:
			return nil, fmt.Errorf("gossip key %d is %d bytes; keys must be 16, 24 or 32 bytes (AES-128/192/256)", i+1, len(k))
		}
		if _, dup := seen[string(k)]; dup {
			return nil, fmt.Errorf("gossip key %d appears twice in the keyring", i+1)
		}
		seen[string(k)] = struct{}{}
		kr.keys = append(kr.keys, bytes.Clone(k))
	}
	return kr, nil
}

// Same reports whether k and o hold the same keys with the same primary
// (the others in any order).
func (k *GossipKeyring) Same(o *GossipKeyring) bool {
	if k == nil || o == nil || len(k.keys) != len(o.keys) || !bytes.Equal(k.keys[0], o.keys[0]) {
		return false
	}
	for _, key := range k.keys[1:] {
		if !slices.ContainsFunc(o.keys, func(ok []byte) bool { return bytes.Equal(ok, key) }) {
			return false
		}
	}
	return true
}

// ParseGossipKeyring reads the text form written by MarshalSecret: one
// base64 key per line, primary first. Blank lines and #-comments are
// ignored. Errors never contain key material.
func ParseGossipKeyring(b []byte) (*GossipKeyring, error) {
	var keys [][]byte
	lines := strings.Split(string(b), "\n")
	for i, line := range lines {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("gossip keyring line %d is not base64", i+1)
		}
		if i == len(lines)-1 && len(k) == 24 {
			// A last line without its end may be cut short (copies
			// through shell variables lose the newline, so that alone is
			// fine). The one cut of skybridge's 32-byte keys that still
			// decodes — 32 of its 44 characters — gives a 24-byte key,
			// which would partition the gateway in silence.
			return nil, fmt.Errorf("gossip keyring line %d holds a 24-byte key and no line end: the file looks cut short (skybridge's keys are 32 bytes); if the key is whole, end the line with a newline", i+1)
		}
		keys = append(keys, k)
	}
	return NewGossipKeyring(keys)
}

// MarshalSecret returns the keyring in its file form. Treat it as secret.
func (kr *GossipKeyring) MarshalSecret() []byte {
	var b strings.Builder
	b.WriteString("# skybridge gossip keyring: base64 keys, primary first\n")
	for _, k := range kr.keys {
		b.WriteString(base64.StdEncoding.EncodeToString(k))
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

// Primary returns a copy of the key that encrypts outgoing gossip.
func (kr *GossipKeyring) Primary() []byte { return bytes.Clone(kr.keys[0]) }

// Keys returns copies of all keys, primary first, in the shape
// memberlist.NewKeyring wants (keys, primary).
func (kr *GossipKeyring) Keys() [][]byte {
	out := make([][]byte, len(kr.keys))
	for i, k := range kr.keys {
		out[i] = bytes.Clone(k)
	}
	return out
}

// Len is the number of keys in the ring.
func (kr *GossipKeyring) Len() int { return len(kr.keys) }
