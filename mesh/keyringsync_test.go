package mesh

import (
	"bytes"
	"sync"
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
// a key before the last shifts the rest in place, a data race -race
// reports), and the keys kept stay, in their order.
func TestRemoveKeysUnderReaders(t *testing.T) {
	k := make([][]byte, 5)
	for i := range k {
		k[i] = bytes.Repeat([]byte{byte(i + 1)}, 32)
	}
	for round := range 50 {
		live, err := memberlist.NewKeyring(k, k[0])
		if err != nil {
			t.Fatal(err)
		}
		stop, reading := make(chan struct{}), make(chan struct{})
		var wg sync.WaitGroup
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
				n := 0
				for _, key := range live.GetKeys() { // as decryptPayload does
					n += len(key)
				}
				if n%32 != 0 {
					t.Errorf("a torn key: %d bytes in all", n)
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
		var got []byte
		for _, key := range live.GetKeys() {
			got = append(got, key[0])
		}
		if !bytes.Equal(got, []byte{1, 3, 5}) {
			t.Fatalf("round %d: keys %v, want 1, 3, 5, primary first", round, got)
		}
	}
	// The primary is never taken out, whatever drop says.
	live, _ := memberlist.NewKeyring(k[:2], k[0])
	if err := removeKeys(live, func([]byte) bool { return true }); err != nil || len(live.GetKeys()) != 1 || live.GetKeys()[0][0] != 1 {
		t.Errorf("drop all: %v, %d keys left; want the primary alone", err, len(live.GetKeys()))
	}
}
