package mesh

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/skybridge-mesh/skybridge/certs"
)

// TestGossipKeyRotation rotates the gossip key among three live gateways
// from one of them: every keyring ends with the new key alone, and no
// message of the rotation carries the new key as it is — gossip is
// readable by whoever holds the old key, whose leak is why keys rotate.
func TestGossipKeyRotation(t *testing.T) {
	m := startLiveMesh(t)
	a := m.gws[0]
	old := a.g.keyring.GetPrimaryKey()
	// A key op1 and op2 hold beside the primary — left by an interrupted
	// rotation, or installed by a gateway since revoked — goes too.
	extra, err := certs.NewGossipKey()
	if err != nil {
		t.Fatal(err)
	}
	for _, lg := range m.gws[1:] {
		if err := lg.g.keyring.AddKey(extra); err != nil {
			t.Fatal(err)
		}
	}

	rep, err := a.g.RotateGossipKey(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Members, []string{"op1", "op2"}) {
		t.Fatalf("acknowledged by %v, want op1 and op2", rep.Members)
	}
	nk := a.g.keyring.GetPrimaryKey()
	if bytes.Equal(nk, old) {
		t.Fatal("the primary key did not change")
	}
	// The report says where new gateways' keyring stands: this gateway
	// holds no CA directory, so it names its own file to copy from.
	_, holdsCA := a.g.prov.Issuer().(*certs.CA)
	if holdsCA != (rep.CAKeyring == "ca_dir") || !holdsCA && rep.CAKeyring != "" || rep.Keyring != filepath.Join(a.g.s.Identity.Dir, certs.FileGossipKeyring) {
		t.Errorf("report: CA keyring %q, keyring %q; this gateway holds the CA: %v", rep.CAKeyring, rep.Keyring, holdsCA)
	}
	if b, err := os.ReadFile(rep.Keyring); err != nil {
		t.Error(err)
	} else if kr, err := certs.ParseGossipKeyring(b); err != nil || !bytes.Equal(kr.Primary(), nk) {
		t.Errorf("the keyring the report names does not hold the new key: %v", err)
	}
	for _, lg := range m.gws {
		keys := lg.g.keyring.GetKeys()
		if len(keys) != 1 || !bytes.Equal(keys[0], nk) {
			t.Errorf("%s holds %d keys after the rotation, the new one primary: %v", lg.g.s.Node.Name, len(keys), len(keys) > 0 && bytes.Equal(keys[0], nk))
		}
		b, err := os.ReadFile(filepath.Join(lg.g.s.Identity.Dir, certs.FileGossipKeyring))
		if kr, perr := certs.ParseGossipKeyring(b); err != nil || perr != nil || len(kr.Keys()) != 1 {
			t.Errorf("%s stored keyring after the rotation: %v %v", lg.g.s.Node.Name, err, perr)
		}
	}

	// A member that cannot apply a step says why, and the rotation fails
	// at once naming it, not after waiting out its acknowledgements.
	op2 := m.gws[2].g
	keyring := filepath.Join(op2.s.Identity.Dir, certs.FileGossipKeyring)
	if err := os.Remove(keyring); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(keyring, 0o700); err != nil { // its keyring can no longer be kept
		t.Fatal(err)
	}
	start := time.Now()
	_, err = a.g.RotateGossipKey(context.Background(), false)
	if err == nil || !strings.Contains(err.Error(), "op2 could not apply it") || !strings.Contains(err.Error(), certs.FileGossipKeyring) {
		t.Fatalf("rotation with a member that cannot keep its keyring: %v; want op2's refusal, with its reason", err)
	}
	if took := time.Since(start); took >= keyringAckWait {
		t.Errorf("the refusal took %s, as long as waiting for an acknowledgement", took.Round(time.Millisecond))
	}

	// A step from a gateway whose clock differs by minutes is taken, as
	// its certificate and adverts are; by more, it is refused saying so.
	for i, tc := range []struct {
		off time.Duration
		ok  bool
	}{{-3 * time.Minute, true}, {3 * time.Minute, true}, {-6 * time.Minute, false}, {6 * time.Minute, false}} {
		op := &keyringOp{kind: opInstall, key: nk, id: []byte(fmt.Sprintf("skew-%011d", i)), at: time.Now().Add(tc.off), initiator: "op0", certDER: a.g.id.Load().Certificate().Raw}
		got := received(t, a.g, a.g.id.Load(), op, "op1")
		err := m.gws[1].g.verifyKeyringOp(got)
		if tc.ok && err != nil || !tc.ok && !errors.Is(err, errOpTime) {
			t.Errorf("a step dated %s from op1's clock: %v", tc.off, err)
		}
		// Replayed, it is neither taken nor answered again.
		if err := m.gws[1].g.verifyKeyringOp(got); err == nil || errors.Is(err, errOpTime) {
			t.Errorf("the step dated %s from op1's clock, replayed: %v; want it refused as a replay", tc.off, err)
		}
	}

	// What each step sends a member: the key sealed to it, or its hash.
	for _, kind := range []string{opInstall, opUse, opRemove} {
		op := &keyringOp{kind: kind, key: nk, id: []byte("0123456789abcdef"), at: time.Now(), initiator: "op0", certDER: a.g.id.Load().Certificate().Raw}
		msg, err := a.g.keyringOpFor(a.g.id.Load(), op, "op1", m.gws[1].g.id.Load().Certificate())
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(msg, nk) {
			t.Errorf("the %s step sends the new key as it is", kind)
		}
	}
}

// TestGossipKeyRotationAcrossARenewal: a member that renews its
// certificate (a new key) as a rotation begins is sent a key sealed to
// the old one, which it cannot open, and answers with a signature the
// initiator cannot check until gossip brings the new certificate. Once it
// does, the step goes again, sealed to the new one, and the rotation
// completes: it failed, with no acknowledgement from the member.
func TestGossipKeyRotationAcrossARenewal(t *testing.T) {
	m := startLiveMesh(t)
	a, b := m.gws[0].g, m.gws[1].g
	attrs := *b.id.Load().Attributes()
	fresh, err := m.ca.IssueIdentity(attrs, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// Renewed, but not yet re-advertised: the initiator seals to the
	// certificate it holds.
	b.id.Store(fresh)
	done := rotateAsync(a)
	waitUntil(t, 20*time.Second, "op1 to refuse the key sealed to its old certificate", func() bool {
		return strings.Contains(m.logs.String(), "sealed secret does not open")
	})
	tb, err := m.ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	b.renewed(fresh, tb)
	rotatedEverywhere(t, m, <-done, "rotation across a member's renewal")
}

// rotation is how a rotation ended.
type rotation struct {
	rep *RotationReport
	err error
}

// rotateAsync starts a gossip key rotation from g; its outcome comes on
// the channel returned.
func rotateAsync(g *Gateway) <-chan rotation {
	done := make(chan rotation, 1)
	go func() {
		rep, err := g.RotateGossipKey(context.Background(), false)
		done <- rotation{rep, err}
	}()
	return done
}

// rotatedEverywhere checks that rotation r (what) succeeded, acknowledged
// by op1 and op2, and left every gateway of m with the new key alone.
func rotatedEverywhere(t *testing.T, m *liveMesh, r rotation, what string) {
	t.Helper()
	if r.err != nil {
		t.Fatalf("%s: %v", what, r.err)
	}
	if !slices.Equal(r.rep.Members, []string{"op1", "op2"}) {
		t.Errorf("%s: acknowledged by %v, want op1 and op2", what, r.rep.Members)
	}
	nk := m.gws[0].g.keyring.GetPrimaryKey()
	for _, lg := range m.gws {
		if keys := lg.g.keyring.GetKeys(); len(keys) != 1 || !bytes.Equal(keys[0], nk) {
			t.Errorf("%s: %s holds %d keys, the new one primary: %v", what, lg.g.s.Node.Name, len(keys), len(keys) > 0 && bytes.Equal(keys[0], nk))
		}
	}
}

// TestGossipKeyRotationWithNewcomer: a gateway that joins while a
// rotation runs (after its first step, with the keyring as it was) is
// brought through the steps it missed: left out, it kept the old key,
// which the others then dropped, and was cut off for good.
func TestGossipKeyRotationWithNewcomer(t *testing.T) {
	m := startLiveMesh(t)
	a := m.gws[0].g
	var late *liveGateway
	a.afterRotationStep = func(step string) {
		if step != opInstall || late != nil {
			return
		}
		late = startLiveGateway(t, m.ca, m.dir, 3, "late-site", []string{a.s.GossipAdvertise.String()}, m.logs)
		waitUntil(t, 20*time.Second, "the late gateway to be verified by op0", func() bool { return a.members.verified("op3") != nil })
	}
	rep, err := a.RotateGossipKey(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(rep.Members, "op3") {
		t.Fatalf("acknowledged by %v, want op3 among them", rep.Members)
	}
	nk := a.keyring.GetPrimaryKey()
	if keys := late.g.keyring.GetKeys(); len(keys) != 1 || !bytes.Equal(keys[0], nk) {
		t.Fatalf("the late gateway holds %d keys, the new one primary: %v", len(keys), len(keys) > 0 && bytes.Equal(keys[0], nk))
	}
	// And gossip still carries its news.
	advertReaches(t, late.g, a)
}

// advertReaches checks that a new advert of from reaches to by gossip.
func advertReaches(t *testing.T, from, to *Gateway) {
	t.Helper()
	name := from.id.Load().Attributes().Node
	before := to.members.verified(name).Advert.Version
	if err := from.advertiseNow(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 20*time.Second, name+"'s new advert to reach "+to.id.Load().Attributes().Node, func() bool {
		v := to.members.verified(name)
		return v != nil && v.Advert.Version > before
	})
}

// TestGossipKeyRotationWithLateNewcomer: a gateway that takes the keyring
// between the install and use steps (both keys, the old one primary)
// and is verified only after the last step began is brought through
// use and remove, or named left out — never left holding a key no
// member reads while the rotation reports everyone in.
func TestGossipKeyRotationWithLateNewcomer(t *testing.T) {
	m := startLiveMesh(t)
	a := m.gws[0].g
	var midRotation []byte // the stored keyring between install and use
	var late *liveGateway
	a.afterRotationStep = func(step string) {
		switch step {
		case opInstall:
			b, err := os.ReadFile(filepath.Join(a.s.Identity.Dir, certs.FileGossipKeyring))
			if err != nil {
				t.Error(err)
			}
			midRotation = b
		case opUse:
			// It starts now, joins through op1 and is verified by op0
			// only after the remove step's look for newcomers.
			late = startLiveGatewayWith(t, m.ca, m.dir, 3, "late-site", []string{m.gws[1].g.s.GossipAdvertise.String()}, m.logs, func(s *Settings) {
				if err := os.WriteFile(filepath.Join(s.Identity.Dir, certs.FileGossipKeyring), midRotation, 0o600); err != nil {
					t.Error(err)
				}
			})
			waitUntil(t, 10*time.Second, "op3 to join through op1", func() bool {
				return slices.ContainsFunc(m.gws[1].g.ml.Members(), func(n *memberlist.Node) bool { return n.Name == "op3" })
			})
		}
	}
	rep, err := a.RotateGossipKey(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rotation: members %v, left out %v", rep.Members, rep.LeftOut)
	// Whether the rotation brought it through or not, it ends on the
	// mesh's key, and gossip carries its news again.
	nk := a.keyring.GetPrimaryKey()
	waitUntil(t, 30*time.Second, "op3 on the new key and verified by op0", func() bool {
		return bytes.Equal(late.g.keyring.GetPrimaryKey(), nk) && a.members.verified("op3") != nil
	})
	advertReaches(t, late.g, a)
}

// TestJoinUnderTheMeshKey: a gateway started with a keyring taken in the
// middle of a rotation that has since finished (the old key primary, the
// new one beside it) is answered by nobody under its primary, and takes
// up the key the mesh answers under.
func TestJoinUnderTheMeshKey(t *testing.T) {
	m := startLiveMesh(t)
	a := m.gws[0].g
	var midRotation []byte
	a.afterRotationStep = func(step string) {
		if step == opInstall {
			b, err := os.ReadFile(filepath.Join(a.s.Identity.Dir, certs.FileGossipKeyring))
			if err != nil {
				t.Error(err)
			}
			midRotation = b
		}
	}
	if _, err := a.RotateGossipKey(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	late := startLiveGatewayWith(t, m.ca, m.dir, 3, "late-site", []string{m.gws[1].g.s.GossipAdvertise.String()}, m.logs, func(s *Settings) {
		if err := os.WriteFile(filepath.Join(s.Identity.Dir, certs.FileGossipKeyring), midRotation, 0o600); err != nil {
			t.Error(err)
		}
	})
	nk := a.keyring.GetPrimaryKey()
	waitUntil(t, 20*time.Second, "op3 on the new key and verified by op0", func() bool {
		return bytes.Equal(late.g.keyring.GetPrimaryKey(), nk) && a.members.verified("op3") != nil
	})
	// The join stores the key it found answered once it has returned,
	// and op3 can be on it, and verified, while the join still runs: the
	// file read at once missed it (2 in 30 under -race and a busy
	// machine).
	keyring := filepath.Join(late.g.s.Identity.Dir, certs.FileGossipKeyring)
	waitUntil(t, 20*time.Second, "op3's keyring file to have the mesh's key primary, or a restart would cut it off again", func() bool {
		b, err := os.ReadFile(keyring)
		kr, perr := certs.ParseGossipKeyring(b)
		return err == nil && perr == nil && bytes.Equal(kr.Primary(), nk)
	})
}

// TestKeyringStep: a keyring others take theirs from gets the step, not
// the keyring of the member applying it, which may differ (a step of a
// rotation cut short missed).
func TestKeyringStep(t *testing.T) {
	k := func(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }
	ring := func(keys ...[]byte) *certs.GossipKeyring {
		kr, err := certs.NewGossipKeyring(keys)
		if err != nil {
			t.Fatal(err)
		}
		return kr
	}
	sums := func(keys ...[]byte) []byte {
		var b []byte
		for _, k := range keys {
			sum := sha256.Sum256(k)
			b = append(b, sum[:]...)
		}
		return b
	}
	for _, c := range []struct {
		name string
		cur  *certs.GossipKeyring
		kind string
		key  []byte
		live [][]byte
		want *certs.GossipKeyring
	}{
		{"install on the stored keyring", ring(k(1), k(9)), opInstall, k(2), [][]byte{k(1), k(2)}, ring(k(1), k(9), k(2))},
		{"install already there", ring(k(1), k(2)), opInstall, k(2), [][]byte{k(1), k(2)}, ring(k(1), k(2))},
		{"use", ring(k(1), k(2)), opUse, k(2), [][]byte{k(2), k(1)}, ring(k(2), k(1))},
		{"use, stored already so", ring(k(2), k(1)), opUse, k(2), [][]byte{k(2)}, ring(k(2), k(1))},
		{"use of a key the store lacks", ring(k(1)), opUse, k(2), [][]byte{k(2), k(1)}, ring(k(2), k(1))},
		{"clean keeps the stored primary, the initiator's, then the most recent", ring(k(2), k(7), k(1), k(8), k(6)), opClean, sums(k(1)), [][]byte{k(1)}, ring(k(2), k(1), k(6))},
		{"clean, the stored primary the initiator's", ring(k(1), k(7), k(8), k(9), k(6)), opClean, sums(k(1)), [][]byte{k(1)}, ring(k(1), k(6), k(9))},
		{"clean keeps the keys named before the most recent", ring(k(1), k(5), k(7), k(8), k(9)), opClean, sums(k(1), k(4), k(5), k(8)), [][]byte{k(1)}, ring(k(1), k(5), k(8))},
		{"clean of a keyring with room", ring(k(1), k(7)), opClean, sums(k(2)), [][]byte{k(1)}, ring(k(1), k(7))},
		{"remove leaves the live primary alone", ring(k(1), k(2), k(9)), opRemove, k(1), [][]byte{k(2)}, ring(k(2))},
		{"nothing stored", nil, opInstall, k(2), [][]byte{k(1), k(2)}, ring(k(1), k(2))},
	} {
		got, err := keyringStep(c.cur, c.kind, c.key, c.live)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
		} else if !got.Same(c.want) {
			t.Errorf("%s: %v; want %v", c.name, got.Keys(), c.want.Keys())
		}
	}
}

// TestGossipKeyRotationsOneAtATime: a gateway cannot start a gossip key
// rotation while another's is under way (interleaved, their steps could
// leave members on different primary keys), and can once it is done.
func TestGossipKeyRotationsOneAtATime(t *testing.T) {
	m := startLiveMesh(t)
	a, b := m.gws[0].g, m.gws[1].g
	var during error
	a.afterRotationStep = func(step string) {
		if step == opInstall {
			_, during = b.RotateGossipKey(context.Background(), false)
		}
	}
	if _, err := a.RotateGossipKey(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	if during == nil || !strings.Contains(during.Error(), "a gossip key rotation by op0 is under way") {
		t.Fatalf("op1 rotating while op0's rotation runs: %v; want it refused", during)
	}
	rep, err := b.RotateGossipKey(context.Background(), false)
	if err != nil || !slices.Equal(rep.Members, []string{"op0", "op2"}) {
		t.Fatalf("op1 rotating once op0's rotation is done: %+v, %v", rep, err)
	}
	nk := b.keyring.GetPrimaryKey()
	for _, lg := range m.gws {
		if keys := lg.g.keyring.GetKeys(); len(keys) != 1 || !bytes.Equal(keys[0], nk) {
			t.Errorf("%s holds %d keys after both rotations, op1's primary: %v", lg.g.s.Node.Name, len(keys), len(keys) > 0 && bytes.Equal(keys[0], nk))
		}
	}
}

// TestBurstGatewayCannotRotate: a burst gateway (its certificate carries
// certs.BurstLabel, as burst up gives every one) may not change the
// gossip keyring: its steps are refused, and it does not start a rotation.
// A stolen burst identity could otherwise put its own key on every gateway.
func TestBurstGatewayCannotRotate(t *testing.T) {
	ca, lg := lonelyGateway(t)
	g := lg.g
	burst, err := ca.IssueIdentity(certs.Attributes{Node: "burst-ams-gw0", Site: "burst-ams", Region: "r", Provider: "aws", Jurisdiction: "NL",
		OverlayIP: netip.MustParseAddr("100.64.9.20"), Labels: map[string]string{certs.BurstLabel: "true"}}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	op := &keyringOp{kind: opUse, key: g.keyring.GetPrimaryKey(), id: []byte("burst-op-0000001"), at: time.Now(), initiator: "burst-ams-gw0", certDER: burst.Certificate().Raw}
	// Forged (a burst gateway's certificate is public), it is refused as
	// forged, which gets no answer: not as a burst's, which does.
	forged := received(t, g, burst, op, g.s.Node.Name)
	forged.sig = append([]byte(nil), forged.sig...)
	forged.sig[len(forged.sig)-1] ^= 1
	if err := g.verifyKeyringOp(forged); err == nil || errors.Is(err, errBurstRotates) {
		t.Fatalf("a step forged in a burst gateway's name: %v, want it refused as forged", err)
	}
	op.id = []byte("burst-op-0000002")
	if err := g.verifyKeyringOp(received(t, g, burst, op, g.s.Node.Name)); !errors.Is(err, errBurstRotates) {
		t.Fatalf("a step a burst gateway signed: %v, want it refused", err)
	}
	static := g.id.Load()
	g.id.Store(burst)
	_, err = g.RotateGossipKey(context.Background(), false)
	g.id.Store(static)
	if !errors.Is(err, errBurstRotates) {
		t.Fatalf("a rotation started on a burst gateway: %v, want it refused", err)
	}
}

// TestKeyringStepSignedByAMeshGateway: a keyring step carries authority
// only from a gateway the mesh CA certified, in its own name. A
// certificate of another CA is anyone's to make (the signature under it
// proves nothing), and a gateway signing in another's name would pass its
// steps off as that gateway's rotation: the one the members let run, and
// answer. The same gateway in its own name is taken.
func TestKeyringStepSignedByAMeshGateway(t *testing.T) {
	ca, lg := lonelyGateway(t)
	g := lg.g
	me := g.s.Node.Name
	rogue, err := certs.InitCA(filepath.Join(t.TempDir(), "rogue"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	attrs := certs.Attributes{Node: "op9", Site: "far", Region: "r", Provider: "onprem", Jurisdiction: "CH", OverlayIP: netip.MustParseAddr("100.64.9.30")}
	foreign, err := rogue.IssueIdentity(attrs, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	op := &keyringOp{kind: opUse, key: g.keyring.GetPrimaryKey(), id: []byte("foreign-op-00001"), at: time.Now(), initiator: "op9", certDER: foreign.Certificate().Raw}
	if err := g.verifyKeyringOp(received(t, g, foreign, op, me)); certs.ReasonOf(err) != certs.ReasonUnknownCA {
		t.Errorf("a step signed under another CA's certificate: %v; want it refused as unknown_ca", err)
	}

	attrs.Node, attrs.OverlayIP = "probe", netip.MustParseAddr("100.64.9.31")
	member, err := ca.IssueIdentity(attrs, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	op = &keyringOp{kind: opUse, key: g.keyring.GetPrimaryKey(), id: []byte("borrow-op-000001"), at: time.Now(), initiator: "op7", certDER: member.Certificate().Raw}
	if err := g.verifyKeyringOp(received(t, g, member, op, me)); err == nil || !strings.Contains(err.Error(), "claims to come from op7") {
		t.Errorf("a step the mesh gateway probe signed in op7's name: %v; want it refused", err)
	}
	op = &keyringOp{kind: opUse, key: g.keyring.GetPrimaryKey(), id: []byte("own-op-000000001"), at: time.Now(), initiator: "probe", certDER: member.Certificate().Raw}
	if err := g.verifyKeyringOp(received(t, g, member, op, me)); err != nil {
		t.Fatalf("a step the mesh gateway probe signed in its own name: %v", err)
	}
}

// TestRemoveStepSparesThePrimary: a member that missed a rotation's use
// step still has the old key primary when the remove step names it. The
// step is refused and the keyring left as it is: taken, it would keep the
// old key and drop the new one the rest of the mesh now speaks, cutting
// the member off.
func TestRemoveStepSparesThePrimary(t *testing.T) {
	_, lg := lonelyGateway(t)
	g := lg.g
	old := g.keyring.GetPrimaryKey()
	nk, err := certs.NewGossipKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.keyring.AddKey(nk); err != nil { // the install step, taken
		t.Fatal(err)
	}
	if err := g.applyKeyringOp(context.Background(), &keyringOp{kind: opRemove, key: old}); err == nil || !strings.Contains(err.Error(), "primary") {
		t.Errorf("a remove step naming the primary key: %v; want it refused", err)
	}
	if keys := g.keyring.GetKeys(); len(keys) != 2 || !bytes.Equal(keys[0], old) || !bytes.Equal(keys[1], nk) {
		t.Errorf("after the refused remove step: %d keys, the old one primary %v; want both kept", len(keys), len(keys) > 0 && bytes.Equal(keys[0], old))
	}
}

// received is op as member m receives it from g, signed by id.
func received(t *testing.T, g *Gateway, id *certs.NodeIdentity, op *keyringOp, m string) *keyringOp {
	t.Helper()
	var to *x509.Certificate
	if v := g.members.verified(m); v != nil {
		to = v.Cert
	}
	msg, err := g.keyringOpFor(id, op, m, to)
	if err != nil {
		t.Fatal(err)
	}
	dm, err := decodeMessage(msg, maxFields)
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseKeyringOp(dm)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestGossipRotationRefusedWhileAGatewayIsAway: a gateway stopped (or
// declared dead) would come back holding only the old key, unable to read
// the mesh's gossip for good: the rotation is refused, naming it, and with
// force goes on without it, saying so.
func TestGossipRotationRefusedWhileAGatewayIsAway(t *testing.T) {
	m := startLiveMesh(t)
	a := m.gws[0].g
	m.gws[2].stop() // for maintenance, say: it comes back
	waitUntil(t, 30*time.Second, "op0 to see op2 gone", func() bool {
		for _, v := range a.members.snapshot() {
			if v.Name == "op2" {
				return v.State == StateDead
			}
		}
		return false
	})
	before := a.keyring.GetPrimaryKey()
	if _, err := a.RotateGossipKey(context.Background(), false); err == nil || !strings.Contains(err.Error(), "away") || !strings.Contains(err.Error(), "op2 (stopped)") {
		t.Fatalf("rotation with op2 away: %v; want it refused, naming op2", err)
	}
	if !bytes.Equal(a.keyring.GetPrimaryKey(), before) {
		t.Fatal("a refused rotation changed the key")
	}
	rep, err := a.RotateGossipKey(context.Background(), true)
	if err != nil || !slices.Equal(rep.LeftOut, []string{"op2"}) || !slices.Equal(rep.Members, []string{"op1"}) {
		t.Fatalf("forced rotation: %+v, %v; want op1 rotated and op2 left out", rep, err)
	}
}

// TestAwayMembers: what a gossip rotation would leave behind: gateways
// verified once and now declared dead, or stopped; not a burst's (rented
// servers, enrolled anew), nor one never verified, nor one alive.
func TestAwayMembers(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	at := f.now.Add(-time.Hour)
	burst, err := f.ca.IssueIdentity(certs.Attributes{Node: "burst-ams-gw1", Site: "burst-ams", Region: "r", Provider: "aws", Jurisdiction: "NL",
		OverlayIP: netip.MustParseAddr("100.96.0.9"), Labels: map[string]string{certs.BurstLabel: "true"}}, 48*time.Hour, at)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []*certs.NodeIdentity{f.identity("gw-dead", "a", 2, at), f.identity("gw-alive", "b", 3, at), burst} {
		ms.addCert(id.Certificate().Raw)
		ms.update(id.Attributes().Node, gossipAddr, f.advert(id, 1))
	}
	ms.update("stranger", gossipAddr, []byte("not an advert")) // never verified
	ms.leave("gw-dead")
	ms.leave("burst-ams-gw1")
	ms.leave("stranger")
	g := &Gateway{members: ms}
	if got := g.awayMembers(); !slices.Equal(got, []string{"gw-dead"}) {
		t.Fatalf("away: %v; want gw-dead alone", got)
	}
}

// TestAwayMembersAliveUnverified: a gateway alive in gossip whose
// certificate ran out while it runs is refused, not dead, and a rotation
// went without it and left it no key to read the mesh with, for good.
func TestAwayMembersAliveUnverified(t *testing.T) {
	f := newFixture(t)
	clock := f.now
	ms := newMembership("self", f.trust(), func() time.Time { return clock }, func() {})
	late := f.identity("gw-late", "site-late", 3, f.now.Add(-47*time.Hour)) // ends an hour from now
	ms.addCert(late.Certificate().Raw)
	ms.update("gw-late", gossipAddr, f.advert(late, 1))
	clock = clock.Add(2 * time.Hour)
	ms.refresh()
	g := &Gateway{members: ms}
	if got := g.awayMembers(); !slices.Equal(got, []string{"gw-late"}) || slices.Contains(g.rotationMembers(), "gw-late") {
		t.Fatalf("state %s: away %v, rotation members %v; want gw-late away", states(ms)["gw-late"], got, g.rotationMembers())
	}
	// The refusal says why: not "stopped or dead" of a gateway alive.
	if why := g.awayWhy()["gw-late"]; !strings.Contains(why, "alive, not verified") || !strings.Contains(why, "expired") {
		t.Errorf("why gw-late is away: %q", why)
	}
}
