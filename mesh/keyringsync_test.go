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

func TestKeyringAfter(t *testing.T) {
	k := make([][]byte, 3)
	for i := range k {
		k[i] = bytes.Repeat([]byte{byte(i + 1)}, 32)
	}
	for _, tc := range []struct {
		name      string
		cur       [][]byte // primary first
		kind      string
		key       []byte
		want      [][]byte // primary first, then in any order
		wantError bool
	}{
		{"install", [][]byte{k[0]}, opInstall, k[1], [][]byte{k[0], k[1]}, false},
		{"install again", [][]byte{k[0], k[1]}, opInstall, k[1], [][]byte{k[0], k[1]}, false},
		{"use", [][]byte{k[0], k[1]}, opUse, k[1], [][]byte{k[1], k[0]}, false},
		{"use a key the store lacks", [][]byte{k[0]}, opUse, k[1], [][]byte{k[1], k[0]}, false},
		{"use the primary", [][]byte{k[0], k[1]}, opUse, k[0], [][]byte{k[0], k[1]}, false},
		{"remove", [][]byte{k[1], k[0]}, opRemove, k[0], [][]byte{k[1]}, false},
		{"remove one gone", [][]byte{k[1]}, opRemove, k[0], [][]byte{k[1]}, false},
		// A gateway behind the mesh applies the step to the mesh's
		// keyring, keeping keys it never had.
		{"install into a keyring ahead", [][]byte{k[2], k[0]}, opInstall, k[1], [][]byte{k[2], k[0], k[1]}, false},
		{"remove the primary", [][]byte{k[0], k[1]}, opRemove, k[0], nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cur, err := certs.NewGossipKeyring(tc.cur)
			if err != nil {
				t.Fatal(err)
			}
			got, err := keyringAfter(cur, tc.kind, tc.key)
			if tc.wantError {
				if err == nil {
					t.Fatalf("got %d keys, want an error", got.Len())
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !sameKeys(got.Keys(), tc.want) {
				t.Errorf("got %x…, want %x…", firstBytes(got.Keys()), firstBytes(tc.want))
			}
			if cur.Len() != len(tc.cur) {
				t.Error("the stored keyring was changed in place")
			}
		})
	}
}

func firstBytes(keys [][]byte) []byte {
	out := make([]byte, len(keys))
	for i, k := range keys {
		out[i] = k[0]
	}
	return out
}
