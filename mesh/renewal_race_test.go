package mesh

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
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
	done := rotateAsync(a)
	waitUntil(t, 20*time.Second, "op1 to take the remove step", func() bool {
		return b.id.Load() == fresh && len(b.keyring.GetKeys()) == 1
	})
	b.renewed(fresh, tb)
	rotatedEverywhere(t, m, <-done, "rotation across a renewal after the remove step")
}

// TestLeaveNoticeAcrossARenewal: a gateway that renewed its certificate
// and stops before its peers hold the new one (its advert on its way,
// or, renewed as it stops, never re-signed) signed its leave notice with
// the new key only: the peers, checking it against the certificate they
// hold, threw it away and reported the gateway declared dead, not gone
// on purpose.
func TestLeaveNoticeAcrossARenewal(t *testing.T) {
	m := startLiveMesh(t)
	b := m.gws[1]
	fresh, err := m.ca.IssueIdentity(*b.g.id.Load().Attributes(), time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	b.g.id.Store(fresh) // renewed, not re-advertised
	b.stop()
	waitUntil(t, 20*time.Second, "op0 to record op1 as gone on purpose", func() bool {
		v := memberAt(m.gws[0], "op1")
		return v.State == StateDead && v.Left
	})
	if v := memberAt(m.gws[0], "op1"); v.Reason != "left the mesh" {
		t.Errorf("op1 at op0: %q, want left the mesh", v.Reason)
	}
}

// TestLeaveNoticeSignedForTheCertificateBefore: after a renewal, re-
// advertised, a gateway's leave notice is signed with the key its peers
// still check it against until they hold the new certificate too.
func TestLeaveNoticeSignedForTheCertificateBefore(t *testing.T) {
	m := startLiveMesh(t)
	b := m.gws[1].g
	old := b.id.Load()
	fresh, err := m.ca.IssueIdentity(*old.Attributes(), time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	tb, err := m.ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	b.renewed(fresh, tb)
	version := b.self.Load().Advert.Version
	signedBy := map[*certs.NodeIdentity]bool{}
	for _, raw := range b.leaveNotices(version) {
		msg, err := decodeMessage(raw, maxFields)
		if err != nil {
			t.Fatal(err)
		}
		if len(msg.fields) != 4 || string(msg.fields[0]) != "op1" || binary.BigEndian.Uint64(msg.fields[2]) != version {
			t.Fatalf("leave notice %q, want op1's naming version %d", msg.fields, version)
		}
		at := int64(binary.BigEndian.Uint64(msg.fields[1]))
		for _, id := range []*certs.NodeIdentity{old, fresh} {
			if ecdsa.VerifyASN1(id.Certificate().PublicKey.(*ecdsa.PublicKey), leavingDigest("op1", at, version), msg.fields[3]) {
				signedBy[id] = true
			}
		}
	}
	if !signedBy[old] || !signedBy[fresh] {
		t.Fatalf("leave notices signed for the certificate before the renewal: %v, for the new one: %v; want both", signedBy[old], signedBy[fresh])
	}
}

// TestGossipKeyRotationStepOutlivesTheInitiatorsCertificate: a step is
// sent again to a member that renewed meanwhile (rotationStep), later in
// the step. Signed with the identity the step began with, the initiator's
// certificate before a renewal of its own, it was refused unanswered by
// the member once that certificate had ended, and the rotation failed
// with no acknowledgement: certificates of a minute or less end within a
// step's wait of their renewal.
func TestGossipKeyRotationStepOutlivesTheInitiatorsCertificate(t *testing.T) {
	m := startLiveMesh(t)
	a, b := m.gws[0].g, m.gws[1].g
	tb, err := m.ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	freshB, err := m.ca.IssueIdentity(*b.id.Load().Attributes(), time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	renewedA, err := m.ca.IssueIdentity(*a.id.Load().Attributes(), time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// The step begins under a certificate of the initiator's that ends
	// within it (the members take the certificate the step carries):
	// late enough that the step's first sends arrive before, on a busy
	// machine, and early enough to leave the step's wait for the send
	// again after it.
	ending, err := m.ca.IssueIdentity(*a.id.Load().Attributes(), 7*time.Second, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a.id.Store(ending)
	b.id.Store(freshB) // renewed, not yet re-advertised
	done := rotateAsync(a)
	waitUntil(t, 20*time.Second, "op1 to refuse the key sealed to its old certificate", func() bool {
		return strings.Contains(m.logs.String(), "sealed secret does not open")
	})
	a.renewed(renewedA, tb)
	waitUntil(t, 20*time.Second, "the initiator's certificate before its renewal to end", func() bool {
		return time.Now().After(ending.Certificate().NotAfter)
	})
	b.renewed(freshB, tb)
	rotatedEverywhere(t, m, <-done, "rotation across a member's renewal, after the initiator's certificate the step began with ended")
}

// TestRemoveStepTakenAgainStoresTheKeyring: a remove step sent again to
// a member whose live keyring already holds the new key alone is
// acknowledged, and its stored keyring brought to the same: the first
// step may have changed the live keyring and failed to store it (refused
// then), and the acknowledgement of the second must not leave the old key
// in the file the gateway loads when it starts again.
func TestRemoveStepTakenAgainStoresTheKeyring(t *testing.T) {
	m := startLiveMesh(t)
	b := m.gws[1].g
	old := b.keyring.GetPrimaryKey()
	nk, err := certs.NewGossipKey()
	if err != nil {
		t.Fatal(err)
	}
	// Live: the new key alone. Stored: both, as a remove step whose
	// store write failed leaves them.
	if err := b.keyring.AddKey(nk); err != nil {
		t.Fatal(err)
	}
	if err := b.keyring.UseKey(nk); err != nil {
		t.Fatal(err)
	}
	if err := b.keyring.RemoveKey(old); err != nil {
		t.Fatal(err)
	}
	both := func(*certs.GossipKeyring) (*certs.GossipKeyring, error) {
		return certs.NewGossipKeyring([][]byte{nk, old})
	}
	if err := b.prov.Secrets().UpdateGossipKeyring(context.Background(), both); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(old)
	op := &keyringOp{kind: opRemoveHash, key: sum[:], id: []byte("remove-again-016"), at: time.Now(), initiator: "op0"}
	if err := b.applyKeyringOp(context.Background(), op); err != nil {
		t.Fatalf("the remove step sent again: %v; want it taken", err)
	}
	raw, err := os.ReadFile(filepath.Join(b.s.Identity.Dir, certs.FileGossipKeyring))
	if err != nil {
		t.Fatal(err)
	}
	kr, err := certs.ParseGossipKeyring(raw)
	if err != nil {
		t.Fatal(err)
	}
	if keys := kr.Keys(); len(keys) != 1 || !bytes.Equal(keys[0], nk) {
		t.Errorf("stored keyring after the remove step taken again: %d keys, the new one first: %v; want the new key alone", len(keys), len(keys) > 0 && bytes.Equal(keys[0], nk))
	}
}
