package mesh

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// insider is a gateway of the mesh (not a burst's, not revoked) that
// signs keyring steps of its own, handed to g as gossip hands them over.
type insider struct {
	t  *testing.T
	g  *Gateway
	id *certs.NodeIdentity
}

func newInsider(t *testing.T, ca *certs.CA, g *Gateway) *insider {
	t.Helper()
	id, err := ca.IssueIdentity(certs.Attributes{Node: "probe", Site: "cloud", Region: "r", Provider: "aws", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.9.9")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &insider{t: t, g: g, id: id}
}

// step sends one step under a fresh ID, the key sealed (install) or named
// by its SHA-256 (use), as this release sends them, and returns what g
// made of it.
func (in *insider) step(kind string, key []byte) error {
	in.t.Helper()
	op := &keyringOp{kind: kind, key: key, id: make([]byte, opIDLen), at: time.Now(), initiator: "probe", certDER: in.id.Certificate().Raw}
	rand.Read(op.id)
	me := in.g.id.Load()
	switch kind {
	case opInstall:
		sealed, err := certs.SealTo(me.Certificate(), key, sealContext(op.id, me.Attributes().Node))
		if err != nil {
			in.t.Fatal(err)
		}
		op.kind, op.key = opInstallSealed, sealed
	case opUse:
		sum := sha256.Sum256(key)
		op.kind, op.key = opUseHash, sum[:]
	}
	sig, err := in.id.Signer().Sign(rand.Reader, op.digest(), crypto.SHA256)
	if err != nil {
		in.t.Fatal(err)
	}
	op.sig = sig
	m, err := decodeMessage(op.encode(), maxFields)
	if err != nil {
		in.t.Fatal(err)
	}
	return in.g.handleKeyringOp(m)
}

func newGossipKey(t *testing.T) []byte {
	t.Helper()
	k, err := certs.NewGossipKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// storedKeys is the keyring file in dir.
func storedKeys(t *testing.T, dir string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, certs.FileGossipKeyring))
	if err != nil {
		t.Fatal(err)
	}
	kr, err := certs.ParseGossipKeyring(b)
	if err != nil {
		t.Fatal(err)
	}
	return kr.Keys()
}

// TestKeyringInstallBound: an install step into a keyring holding
// maxGossipKeys keys is refused, saying why, and neither the keyring nor
// its files (the gateway's and the CA directory's copy) change. Without
// the bound a gateway of the mesh grew every keyring without end (making
// each key it installed primary, so that the next went beside it): each
// step rewrote the whole keyring, and memberlist tries every key on each
// packet the primary does not open. The refusals are logged at most once
// a second. A keyring already past the bound (written by a release before
// it) is left as it is by a refused step: no write of its thousand keys.
func TestKeyringInstallBound(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	logs := &syncbuf.Buffer{}
	lg := startLiveGatewayWith(t, ca, dir, 0, "zrh-dc", nil, logs, func(s *Settings) { s.Identity.CADir = ca.Dir() })
	g := lg.g
	if _, ok := g.prov.Issuer().(*certs.CA); !ok {
		t.Fatal("the gateway does not hold the CA directory")
	}
	in := newInsider(t, ca, g)
	// The CA directory's copy is bound too: it is what `ca issue` hands
	// to new gateways, and each step writes it whole. A live keyring with
	// room takes the key; the copy, full, refuses it.
	primary := g.keyring.GetPrimaryKey()
	full := [][]byte{primary}
	for len(full) < maxGossipKeys {
		full = append(full, newGossipKey(t))
	}
	if err := ca.Secrets().UpdateGossipKeyring(t.Context(), func(*certs.GossipKeyring) (*certs.GossipKeyring, error) { return certs.NewGossipKeyring(full) }); err != nil {
		t.Fatal(err)
	}
	ownBefore := storedKeys(t, g.s.Identity.Dir)
	if err := in.step(opInstall, newGossipKey(t)); !errors.Is(err, errKeyringFull) || !strings.Contains(err.Error(), "the CA directory's gossip keyring") {
		t.Fatalf("install step with the CA directory's copy full: %v; want it refused as full", err)
	}
	if n := len(storedKeys(t, ca.Dir())); n != maxGossipKeys {
		t.Fatalf("the CA directory's copy holds %d keys, want %d", n, maxGossipKeys)
	}
	// Refused, it is not taken here either: the key was live, and in the
	// gateway's own file, though its initiator was told otherwise.
	if keys := g.keyring.GetKeys(); len(keys) != 1 || !bytes.Equal(keys[0], primary) {
		t.Errorf("an install step refused for the CA directory's copy left %d keys live", len(keys))
	}
	if own := storedKeys(t, g.s.Identity.Dir); len(own) != len(ownBefore) {
		t.Errorf("an install step refused for the CA directory's copy left %d keys in the gateway's file, %d before", len(own), len(ownBefore))
	}
	if err := ca.Secrets().UpdateGossipKeyring(t.Context(), func(*certs.GossipKeyring) (*certs.GossipKeyring, error) { return certs.NewGossipKeyring(full[:1]) }); err != nil {
		t.Fatal(err)
	}

	for len(g.keyring.GetKeys()) < maxGossipKeys {
		k := newGossipKey(t)
		if err := in.step(opInstall, k); err != nil {
			t.Fatalf("install step with %d keys: %v", len(g.keyring.GetKeys()), err)
		}
		if err := in.step(opUse, k); err != nil {
			t.Fatal(err)
		}
	}
	files := func() (own, caCopy []byte) {
		var err error
		if own, err = os.ReadFile(filepath.Join(g.s.Identity.Dir, certs.FileGossipKeyring)); err != nil {
			t.Fatal(err)
		}
		if caCopy, err = os.ReadFile(filepath.Join(ca.Dir(), certs.FileGossipKeyring)); err != nil {
			t.Fatal(err)
		}
		return own, caCopy
	}
	own, caCopy := files()
	if n := len(storedKeys(t, ca.Dir())); n > maxGossipKeys {
		t.Fatalf("the CA directory's copy holds %d keys, over %d", n, maxGossipKeys)
	}
	const past = 5
	for i := range past {
		if err := in.step(opInstall, newGossipKey(t)); !errors.Is(err, errKeyringFull) {
			t.Fatalf("install step %d past the bound: %v; want it refused as full", i, err)
		}
	}
	if n := len(g.keyring.GetKeys()); n != maxGossipKeys {
		t.Errorf("the keyring holds %d keys past the bound, want %d", n, maxGossipKeys)
	}
	if o, c := files(); !bytes.Equal(o, own) || !bytes.Equal(c, caCopy) {
		t.Error("a refused step changed the keyring files")
	}
	if n := strings.Count(logs.String(), "refused gossip keyring operation"); n == 0 || n > 2 {
		t.Errorf("%d refused steps within a second logged %d times; want once, or twice across a second's edge", past, n)
	}
	if !strings.Contains(logs.String(), "gossip keyring full") {
		t.Error("the log does not say the keyring is full")
	}

	// Past the bound, as a keyring of a release before it may be.
	for len(g.keyring.GetKeys()) < 1000 {
		if err := g.keyring.AddKey(newGossipKey(t)); err != nil {
			t.Fatal(err)
		}
	}
	live := g.keyring.GetKeys()
	if err := g.prov.Secrets().UpdateGossipKeyring(t.Context(), func(*certs.GossipKeyring) (*certs.GossipKeyring, error) { return certs.NewGossipKeyring(live) }); err != nil {
		t.Fatal(err)
	}
	own, _ = files()
	if err := in.step(opInstall, newGossipKey(t)); !errors.Is(err, errKeyringFull) {
		t.Fatalf("install step into a keyring of 1000 keys: %v; want it refused as full", err)
	}
	if o, _ := files(); len(g.keyring.GetKeys()) != 1000 || !bytes.Equal(o, own) {
		t.Errorf("a step refused changed a keyring of 1000 keys: %d keys now", len(g.keyring.GetKeys()))
	}
}

// TestRotationClearsFullKeyrings: a rotation goes through with keyrings
// full. Keys left over (by rotations cut short, by a gateway since
// revoked, by an older release's install) fill the members' keyrings, or
// every keyring past the bound after an upgrade from a release without
// it; the install step is refused as full, and the rotation clears the
// keys left over (each member keeps its primary and the initiator's) and
// installs again. Within the bound, it installs beside them as before.
// Without the clearing, no rotation could install again: nothing else
// removes keys.
func TestRotationClearsFullKeyrings(t *testing.T) {
	m := startLiveMesh(t)
	fill := func(g *Gateway, n int) {
		t.Helper()
		for len(g.keyring.GetKeys()) < n {
			if err := g.keyring.AddKey(newGossipKey(t)); err != nil {
				t.Fatal(err)
			}
		}
	}
	rotate := func(from *Gateway) []byte {
		t.Helper()
		if _, err := from.RotateGossipKey(context.Background(), false); err != nil {
			t.Fatal(err)
		}
		nk := from.keyring.GetPrimaryKey()
		for _, lg := range m.gws {
			if keys := lg.g.keyring.GetKeys(); len(keys) != 1 || !bytes.Equal(keys[0], nk) {
				t.Errorf("%s holds %d keys after the rotation, the new one primary: %v", lg.g.s.Node.Name, len(keys), len(keys) > 0 && bytes.Equal(keys[0], nk))
			}
			if stored := storedKeys(t, lg.g.s.Identity.Dir); len(stored) != 1 || !bytes.Equal(stored[0], nk) {
				t.Errorf("%s's keyring file holds %d keys after the rotation", lg.g.s.Node.Name, len(stored))
			}
		}
		return nk
	}
	const cleared = "keyring is full; clearing"

	// Room for one more: a key left by a rotation cut short and one an
	// older release installed, beside the primary.
	fill(m.gws[1].g, maxGossipKeys-1)
	rotate(m.gws[0].g)
	if strings.Contains(m.logs.String(), cleared) {
		t.Error("keyrings with room for the new key were cleared first")
	}

	// Full members, the initiator not.
	fill(m.gws[1].g, maxGossipKeys)
	fill(m.gws[2].g, maxGossipKeys)
	rotate(m.gws[0].g)
	if !strings.Contains(m.logs.String(), cleared) {
		t.Error("the rotation did not say it cleared full keyrings")
	}

	// Every keyring past the bound, the initiator's too.
	for _, lg := range m.gws {
		fill(lg.g, 3*maxGossipKeys)
	}
	old := rotate(m.gws[1].g)

	// A rotation cut short after its use step reached op1 and op2 but
	// not op0, which rotates now, op1 full: op0 keeps the key op1 and
	// op2 speak, and hears their answers through the clearing.
	cut := newGossipKey(t)
	for _, lg := range m.gws {
		if err := lg.g.keyring.AddKey(cut); err != nil {
			t.Fatal(err)
		}
	}
	for _, lg := range m.gws[1:] {
		if err := lg.g.keyring.UseKey(cut); err != nil {
			t.Fatal(err)
		}
	}
	fill(m.gws[1].g, maxGossipKeys)
	if !bytes.Equal(m.gws[0].g.keyring.GetPrimaryKey(), old) {
		t.Fatal("op0 does not speak the key before the rotation cut short")
	}
	rotate(m.gws[0].g)
}

// TestRotationClearsOnlyFullKeyrings: the clearing before an install goes
// to the members that refused it as full, and keeps the keys other
// members speak. op1 speaks K (it took the use step of a rotation cut
// short; op0 and op2 did not), and op2's keyring is full of keys
// installed after K. op2 kept its primary and op0's alone, and could no
// longer read op1; op1, with room, was cleared too, of keys a member
// (one cut off for a time) may still speak.
func TestRotationClearsOnlyFullKeyrings(t *testing.T) {
	m := startLiveMesh(t)
	a, op1, op2 := m.gws[0].g, m.gws[1].g, m.gws[2].g
	k := newGossipKey(t)
	for _, lg := range m.gws {
		if err := lg.g.keyring.AddKey(k); err != nil {
			t.Fatal(err)
		}
	}
	if err := op1.keyring.UseKey(k); err != nil {
		t.Fatal(err)
	}
	for len(op2.keyring.GetKeys()) < maxGossipKeys {
		if err := op2.keyring.AddKey(newGossipKey(t)); err != nil {
			t.Fatal(err)
		}
	}
	spare := newGossipKey(t)
	if err := op1.keyring.AddKey(spare); err != nil {
		t.Fatal(err)
	}
	nk := newGossipKey(t)
	if err := a.rotationStepRoom(context.Background(), opInstall, nk, []string{"op1", "op2"}); err != nil {
		t.Fatalf("install with op2 full: %v", err)
	}
	if keys := op2.keyring.GetKeys(); !hasKey(keys, k) || !hasKey(keys, a.keyring.GetPrimaryKey()) || !hasKey(keys, nk) || len(keys) != maxGossipKeys {
		t.Errorf("op2 holds %d keys after the clearing and the install; want %d, op1's primary (%t), op0's (%t) and the new key (%t) among them",
			len(keys), maxGossipKeys, hasKey(keys, k), hasKey(keys, a.keyring.GetPrimaryKey()), hasKey(keys, nk))
	}
	if keys := op1.keyring.GetKeys(); !hasKey(keys, spare) || !hasKey(keys, nk) {
		t.Errorf("op1, with room, was cleared: it holds %d keys", len(keys))
	}
	if !strings.Contains(m.logs.String(), "keyring is full; clearing") {
		t.Error("the rotation did not say it cleared full keyrings")
	}
}
