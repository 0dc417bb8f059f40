package certs

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

// distinctKeys returns n gossip keys, all different.
func distinctKeys(n int) [][]byte {
	keys := make([][]byte, n, n+1)
	for i := range keys {
		keys[i] = make([]byte, GossipKeyLen)
		binary.BigEndian.PutUint64(keys[i][GossipKeyLen-8:], uint64(i))
	}
	return keys
}

// TestGossipKeyringDuplicateCheck: a duplicate is found, and named by its
// place, however far down it is. (BenchmarkNewGossipKeyring measures the
// check, which compared every pair: 41 ms a rotation step at 1,000 keys,
// 659 ms at 8,000, on the gossip worker.)
func TestGossipKeyringDuplicateCheck(t *testing.T) {
	const n = 2000
	keys := distinctKeys(n)
	kr, err := NewGossipKeyring(keys)
	if err != nil || kr.Len() != n {
		t.Fatalf("a keyring of %d distinct keys: %v", n, err)
	}
	_, err = NewGossipKeyring(append(keys, bytes.Clone(keys[n/2])))
	if err == nil || !strings.Contains(err.Error(), "gossip key 2001 appears twice") {
		t.Errorf("a keyring with its middle key again at the end: %v", err)
	}
	// Keys are compared whole: an AES-128 key that begins an AES-256
	// key is another key.
	if _, err := NewGossipKeyring([][]byte{keys[0], keys[0][:16]}); err != nil {
		t.Errorf("a 32-byte key and its first 16 bytes: %v; want two keys", err)
	}
}

// BenchmarkNewGossipKeyring builds a keyring of 20,000 keys, as a gateway
// of a release before rotation steps were bounded may hold: linear, tens
// of milliseconds; comparing every pair took seconds.
func BenchmarkNewGossipKeyring(b *testing.B) {
	keys := distinctKeys(20000)
	for b.Loop() {
		if _, err := NewGossipKeyring(keys); err != nil {
			b.Fatal(err)
		}
	}
}
