package certs

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"time"
)

// TestGossipKeyringDuplicateCheckScales: a keyring of many keys is built
// in time linear in its keys. Gateways of releases before rotation steps
// were bounded may hold thousands (one insider's install steps), and
// every step rebuilt the keyring comparing every pair of keys: 41 ms a
// step at 1,000 keys, 659 ms at 8,000, on the gossip worker. A duplicate
// is still found, and named by its place, however far down it is.
func TestGossipKeyringDuplicateCheckScales(t *testing.T) {
	const n = 20000 // 200 million pairs to compare: seconds
	keys := make([][]byte, n, n+1)
	for i := range keys {
		keys[i] = make([]byte, GossipKeyLen)
		binary.BigEndian.PutUint64(keys[i][GossipKeyLen-8:], uint64(i))
	}
	start := time.Now()
	kr, err := NewGossipKeyring(keys)
	took := time.Since(start)
	if err != nil || kr.Len() != n {
		t.Fatalf("a keyring of %d distinct keys: %v", n, err)
	}
	// Linear takes tens of milliseconds; every pair, seconds.
	if took > time.Second {
		t.Errorf("building a keyring of %d keys took %v: the duplicate check is not linear", n, took.Round(time.Millisecond))
	}
	_, err = NewGossipKeyring(append(keys, bytes.Clone(keys[n/2])))
	if err == nil || !strings.Contains(err.Error(), "gossip key 20001 appears twice") {
		t.Errorf("a keyring with its middle key again at the end: %v", err)
	}
	// Keys are compared whole: an AES-128 key that begins an AES-256
	// key is another key.
	if _, err := NewGossipKeyring([][]byte{keys[0], keys[0][:16]}); err != nil {
		t.Errorf("a 32-byte key and its first 16 bytes: %v; want two keys", err)
	}
}
