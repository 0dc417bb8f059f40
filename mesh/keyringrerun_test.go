package mesh

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// cutShortAtUse is op0's rotation to a new key cut short at its use step:
// the install reached op1 and op2, the use step op1 alone (op2's message
// lost, or op2 away for the step's wait). op0, which applies each step
// before sending it, and op1 speak the new key; op2 holds it beside its
// primary.
func cutShortAtUse(t *testing.T, m *liveMesh) []byte {
	t.Helper()
	a, op1, op2 := m.gws[0].g, m.gws[1].g, m.gws[2].g
	n1 := newGossipKey(t)
	if err := a.rotationStep(context.Background(), opInstall, n1, []string{"op1", "op2"}); err != nil {
		t.Fatal(err)
	}
	if err := a.rotationStep(context.Background(), opUse, n1, []string{"op1"}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.keyring.GetPrimaryKey(), n1) || !bytes.Equal(op1.keyring.GetPrimaryKey(), n1) || !hasKey(op2.keyring.GetKeys(), n1) {
		t.Fatal("setup: op0 and op1 should speak the new key, op2 hold it")
	}
	return n1
}

// wantOneKey fails unless every gateway of m holds one key, the same.
func wantOneKey(t *testing.T, m *liveMesh) {
	t.Helper()
	nk := m.gws[0].g.keyring.GetPrimaryKey()
	for _, lg := range m.gws {
		if keys := lg.g.keyring.GetKeys(); len(keys) != 1 || !bytes.Equal(keys[0], nk) {
			t.Errorf("%s holds %d keys after the rotation, op0's primary first: %v", lg.g.s.Node.Name, len(keys), len(keys) > 0 && bytes.Equal(keys[0], nk))
		}
	}
}

// TestRotationRunAgainKeepsTheKeyTheMeshSpeaks: after a rotation cut
// short at its use step, a run again that fails (op1 cannot keep its
// keyring) leaves op2 the key op0 and op1 speak, and the run once op1 is
// mended goes through. op2 took the rerun's key in the place of the key
// of the rotation cut short, as the last install of the same initiator
// not followed by its use step: it could read neither op0 nor op1, and
// no later step reached it.
func TestRotationRunAgainKeepsTheKeyTheMeshSpeaks(t *testing.T) {
	m := startLiveMesh(t)
	a, op1, op2 := m.gws[0].g, m.gws[1].g, m.gws[2].g
	n1 := cutShortAtUse(t, m)

	keyring := filepath.Join(op1.s.Identity.Dir, certs.FileGossipKeyring)
	kept, err := os.ReadFile(keyring)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(keyring); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(keyring, 0o700); err != nil { // op1 can no longer keep its keyring
		t.Fatal(err)
	}
	if _, err := a.RotateGossipKey(context.Background(), false); err == nil {
		t.Fatal("the run with op1 unable to keep its keyring went through")
	}
	var n2 []byte // the failed run's key
	for _, k := range a.keyring.GetKeys() {
		if !bytes.Equal(k, n1) && !bytes.Equal(k, op2.keyring.GetPrimaryKey()) {
			n2 = k
		}
	}
	waitUntil(t, 10*time.Second, "op2 to take the failed run's install", func() bool { return hasKey(op2.keyring.GetKeys(), n2) })
	if !hasKey(op2.keyring.GetKeys(), n1) {
		t.Fatal("op2 dropped the key op0 and op1 speak: it can read neither")
	}

	if err := os.Remove(keyring); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyring, kept, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RotateGossipKey(context.Background(), false); err != nil {
		t.Fatalf("the run once op1 is mended: %v", err)
	}
	wantOneKey(t, m)
}

// TestRotationRunAgainAfterMissedUse: a rotation run again after one cut
// short at its use step goes through. op2 dropped, at the install step,
// the key the others speak, and refused the remove step, which names it.
func TestRotationRunAgainAfterMissedUse(t *testing.T) {
	m := startLiveMesh(t)
	cutShortAtUse(t, m)
	if _, err := m.gws[0].g.RotateGossipKey(context.Background(), false); err != nil {
		t.Fatalf("rotation run again after one cut short at its use step: %v (op2 holds %d keys)", err, len(m.gws[2].g.keyring.GetKeys()))
	}
	wantOneKey(t, m)
}

// TestRotationRunAgainAfterInitiatorStoppedMidUse: op0 stops after
// taking its own use step, before sending it (a crash, a restart): it
// speaks the new key, which every member holds beside the old one. Its
// next install leaves the members that key, and its rotation run again
// goes through. Every member dropped it for the install, as the last one
// of the same initiator before its use step.
func TestRotationRunAgainAfterInitiatorStoppedMidUse(t *testing.T) {
	m := startLiveMesh(t)
	a, op1, op2 := m.gws[0].g, m.gws[1].g, m.gws[2].g
	ctx := context.Background()
	n1 := newGossipKey(t)
	if err := a.rotationStep(ctx, opInstall, n1, []string{"op1", "op2"}); err != nil {
		t.Fatal(err)
	}
	if err := a.rotationStep(ctx, opUse, n1, nil); err != nil { // op0 alone
		t.Fatal(err)
	}
	a.ops.Lock()
	a.ops.open.initiator = "" // as after op0's restart
	a.ops.Unlock()
	if err := a.rotationStep(ctx, opInstall, newGossipKey(t), []string{"op1", "op2"}); err != nil {
		t.Fatal(err)
	}
	for _, g := range []*Gateway{op1, op2} {
		if !hasKey(g.keyring.GetKeys(), n1) {
			t.Errorf("%s dropped the key op0 speaks", g.s.Node.Name)
		}
	}
	if _, err := a.RotateGossipKey(ctx, false); err != nil {
		t.Fatalf("rotation run again: %v", err)
	}
	wantOneKey(t, m)
}

// TestRotationRunAgainAndAgain: a rotation failing at its install step
// (op2 cannot keep its keyring), run again past the bound, leaves a key a
// run on the members up to maxGossipKeys, no more (the run that finds a
// keyring full clears it first), and the run once op2 is mended goes
// through, leaving the new key alone.
func TestRotationRunAgainAndAgain(t *testing.T) {
	m := startLiveMesh(t)
	a, op1, op2 := m.gws[0].g, m.gws[1].g, m.gws[2].g
	keyring := filepath.Join(op2.s.Identity.Dir, certs.FileGossipKeyring)
	kept, err := os.ReadFile(keyring)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(keyring); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(keyring, 0o700); err != nil { // op2 can no longer keep its keyring
		t.Fatal(err)
	}
	for run := range maxGossipKeys + 2 {
		if _, err := a.RotateGossipKey(context.Background(), false); err == nil || !strings.Contains(err.Error(), "op2 could not apply it") {
			t.Fatalf("run %d with op2 unable to keep its keyring: %v; want op2's refusal", run, err)
		}
		latest := a.keyring.GetKeys()
		waitUntil(t, 10*time.Second, "op1 to take the run's key", func() bool { return hasKey(op1.keyring.GetKeys(), latest[len(latest)-1]) })
		if n := len(op1.keyring.GetKeys()); n > maxGossipKeys {
			t.Fatalf("run %d: op1 holds %d keys, over %d", run, n, maxGossipKeys)
		}
	}
	if err := os.Remove(keyring); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyring, kept, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RotateGossipKey(context.Background(), false); err != nil {
		t.Fatalf("the run once op2 is mended: %v", err)
	}
	wantOneKey(t, m)
}
