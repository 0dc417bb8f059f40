package mesh

import (
	"bytes"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/memberlist"

	"github.com/skybridge-mesh/skybridge/certs"
)

func TestAdoptKeyring(t *testing.T) {
	k := make([][]byte, 4)
	for i := range k {
		k[i] = bytes.Repeat([]byte{byte(i + 1)}, 32)
	}
	for _, tc := range []struct {
		name        string
		live, vault [][]byte // primary first
		changed     bool
	}{
		{"the same", [][]byte{k[0], k[1]}, [][]byte{k[0], k[1]}, false},
		{"the same in another order", [][]byte{k[0], k[1], k[2]}, [][]byte{k[0], k[2], k[1]}, false},
		{"a key installed", [][]byte{k[0]}, [][]byte{k[0], k[1]}, true},
		{"a new primary", [][]byte{k[0], k[1]}, [][]byte{k[1], k[0]}, true},
		{"a whole rotation missed", [][]byte{k[0]}, [][]byte{k[1]}, true},
		{"old keys removed, a new one in", [][]byte{k[0], k[1], k[2]}, [][]byte{k[3], k[0]}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			live, err := memberlist.NewKeyring(tc.live, tc.live[0])
			if err != nil {
				t.Fatal(err)
			}
			kr, err := certs.NewGossipKeyring(tc.vault)
			if err != nil {
				t.Fatal(err)
			}
			changed, err := adoptKeyring(live, kr)
			if err != nil {
				t.Fatal(err)
			}
			if changed != tc.changed {
				t.Errorf("changed = %v, want %v", changed, tc.changed)
			}
			got := live.GetKeys()
			if !bytes.Equal(got[0], tc.vault[0]) {
				t.Errorf("primary %x, want %x", got[0][:1], tc.vault[0][:1])
			}
			if len(got) != len(tc.vault) {
				t.Fatalf("%d keys, want %d", len(got), len(tc.vault))
			}
			for _, w := range tc.vault {
				found := false
				for _, g := range got {
					found = found || bytes.Equal(g, w)
				}
				if !found {
					t.Errorf("key %x missing", w[:1])
				}
			}
		})
	}
}

// TestRemoveKeysUnderReaders: keys leave the live keyring while
// memberlist's decryption goes through the keys it was handed, without the
// keyring's lock: nothing it holds is written (memberlist's RemoveKey of
// a key before the last shifts the rest in place), and the keys kept stay,
// in their order. Written, the keys a decryption holds are no longer the
// keyring it was handed: one key twice and a key still installed skipped,
// a datagram under it unread. -race reports the write as a data race; the
// keys are compared too, so that the test fails without it.
func TestRemoveKeysUnderReaders(t *testing.T) {
	k := make([][]byte, 5)
	for i := range k {
		k[i] = bytes.Repeat([]byte{byte(i + 1)}, 32)
	}
	// intact reports whether keys, read as decryptPayload reads them, are
	// a keyring: the primary first, then keys of k each once, in order.
	intact := func(keys [][]byte) bool {
		last := -1
		for _, key := range keys {
			i := slices.IndexFunc(k, func(x []byte) bool { return bytes.Equal(x, key) })
			if i <= last || last < 0 && i != 0 {
				return false
			}
			last = i
		}
		return true
	}
	for round := range 50 {
		live, err := memberlist.NewKeyring(k, k[0])
		if err != nil {
			t.Fatal(err)
		}
		// Handed out before the removal, as to a decryption under way
		// through it: it must still read as it did.
		held := live.GetKeys()
		stop, reading := make(chan struct{}), make(chan struct{})
		var wg sync.WaitGroup
		var written atomic.Int64
		wg.Go(func() {
			for i := 0; ; i++ {
				if i == 1 {
					close(reading)
				}
				select {
				case <-stop:
					return
				default:
				}
				if !intact(live.GetKeys()) {
					written.Add(1)
				}
			}
		})
		<-reading
		drop := map[byte]bool{2: true, 4: true} // k[1] and k[3], neither last
		err = removeKeys(live, func(key []byte) bool { return drop[key[0]] })
		close(stop)
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		if n := written.Load(); n > 0 {
			t.Fatalf("round %d: a reader found keys written under it %d times", round, n)
		}
		if !slices.EqualFunc(held, k, bytes.Equal) {
			t.Fatalf("round %d: the keys handed out before the removal now read %v, want 1 to 5", round, firstBytes(held))
		}
		if got := firstBytes(live.GetKeys()); !bytes.Equal(got, []byte{1, 3, 5}) {
			t.Fatalf("round %d: keys %v, want 1, 3, 5, primary first", round, got)
		}
	}
	// The primary is never taken out, whatever drop says.
	live, _ := memberlist.NewKeyring(k[:2], k[0])
	if err := removeKeys(live, func([]byte) bool { return true }); err != nil || len(live.GetKeys()) != 1 || live.GetKeys()[0][0] != 1 {
		t.Errorf("drop all: %v, %d keys left; want the primary alone", err, len(live.GetKeys()))
	}
}

// firstBytes names each key by its first byte.
func firstBytes(keys [][]byte) []byte {
	var b []byte
	for _, key := range keys {
		b = append(b, key[0])
	}
	return b
}
