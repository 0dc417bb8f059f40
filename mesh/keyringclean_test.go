package mesh

import (
	"context"
	"testing"
)

// TestCleanKeepsTheKeyALaggingMemberSpeaks: op0's rotation is cut short
// at its use step (op0 and op1 speak n1; op2 missed it and speaks the old
// primary P), and two runs again are cut short after their install step
// (keys x, y everywhere), filling every keyring. The next run's install is
// refused by op1 and op2 as full, and its clean step must name P, which
// op0's UseKey left second in its keyring, not only its most recent keys:
// op1 kept n1, y and x and dropped P, and could no longer read op2.
func TestCleanKeepsTheKeyALaggingMemberSpeaks(t *testing.T) {
	m := startLiveMesh(t)
	a, op1, op2 := m.gws[0].g, m.gws[1].g, m.gws[2].g
	ctx := context.Background()
	cutShortAtUse(t, m)
	p := op2.keyring.GetPrimaryKey() // the key op2 speaks
	for range 2 {                    // two runs again, cut short after their install
		if err := a.rotationStep(ctx, opInstall, newGossipKey(t), []string{"op1", "op2"}); err != nil {
			t.Fatal(err)
		}
	}
	if len(op1.keyring.GetKeys()) != maxGossipKeys || len(op2.keyring.GetKeys()) != maxGossipKeys {
		t.Fatal("setup: op1 and op2 should be full")
	}
	if err := a.rotationStepRoom(ctx, opInstall, newGossipKey(t), []string{"op1", "op2"}); err != nil {
		t.Fatalf("install with op1 and op2 full: %v", err)
	}
	if !hasKey(op1.keyring.GetKeys(), p) {
		t.Errorf("op1 was cleaned of the key op2 speaks (op2's primary): op1 can no longer read op2")
	}
}
