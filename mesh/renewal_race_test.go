package mesh

import (
	"bytes"
	"context"
	"slices"
	"testing"
	"time"
)

// TestGossipKeyRotationRemoveStepAcrossARenewal: a member that renews
// its certificate after it took the remove step, before its answer
// reached the initiator, answers with a signature the initiator cannot
// check until gossip brings the new certificate. The step is then sent
// again (rotationStep), and the member, which no longer holds the key it
// names, refused it as a missed install step: the rotation failed though
// every member had taken every step.
func TestGossipKeyRotationRemoveStepAcrossARenewal(t *testing.T) {
	m := startLiveMesh(t)
	a, b := m.gws[0].g, m.gws[1].g
	fresh, err := m.ca.IssueIdentity(*b.id.Load().Attributes(), time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	tb, err := m.ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	// Renewed once the use step is done, not yet re-advertised: its
	// answer to the remove step is signed with a key the initiator does
	// not know yet.
	a.afterRotationStep = func(step string) {
		if step == opUse {
			b.id.Store(fresh)
		}
	}
	type result struct {
		rep *RotationReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := a.RotateGossipKey(context.Background(), false)
		done <- result{rep, err}
	}()
	waitUntil(t, 20*time.Second, "op1 to take the remove step", func() bool {
		return b.id.Load() == fresh && len(b.keyring.GetKeys()) == 1
	})
	b.renewed(fresh, tb)
	r := <-done
	if r.err != nil {
		t.Fatalf("rotation across a renewal after the remove step: %v", r.err)
	}
	if !slices.Equal(r.rep.Members, []string{"op1", "op2"}) {
		t.Errorf("acknowledged by %v, want op1 and op2", r.rep.Members)
	}
	nk := a.keyring.GetPrimaryKey()
	for _, lg := range m.gws {
		if keys := lg.g.keyring.GetKeys(); len(keys) != 1 || !bytes.Equal(keys[0], nk) {
			t.Errorf("%s holds %d keys after the rotation, the new one primary: %v", lg.g.s.Node.Name, len(keys), len(keys) > 0 && bytes.Equal(keys[0], nk))
		}
	}
}
