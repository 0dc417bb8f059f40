package mesh

import (
	"bytes"
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
