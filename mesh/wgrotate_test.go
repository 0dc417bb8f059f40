package mesh

import (
	"context"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// TestWireGuardKeyRotation rotates one gateway's key among three live
// gateways: the others acknowledge the advertised next key before the
// switch, then route the gateway's overlay address to the new key only;
// the new key is stored for restarts and shows in the status, and op0's
// advert proves that it holds the new key.
func TestWireGuardKeyRotation(t *testing.T) {
	m := startLiveMesh(t)
	a, b, c := m.gws[0], m.gws[1], m.gws[2]
	old := wgtypes.Key(a.g.wgKey.Public())
	aIP := netip.MustParsePrefix(a.g.id.Load().Attributes().OverlayIP.String() + "/32")

	rep, err := a.g.RotateWireGuardKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Ready, []string{"op1", "op2"}) || len(rep.Late) != 0 {
		t.Errorf("ready %v, late %v: both peers should have added the next key before the switch", rep.Ready, rep.Late)
	}
	newKey := wgtypes.Key(a.g.wgKey.Public())
	if newKey == old || rep.NewKey != certs.WGPublicKey(newKey).String() {
		t.Fatalf("key not replaced: %s → %s (report %s)", old, newKey, rep.NewKey)
	}
	for _, lg := range []*liveGateway{b, c} {
		waitUntil(t, 10*time.Second, lg.g.s.Node.Name+" holds op0's advert of its new key, proven", func() bool {
			v := lg.g.members.verified("op0")
			return v != nil && wgtypes.Key(v.Advert.WireGuardKey) == newKey && proven(v)
		})
		waitUntil(t, 10*time.Second, lg.g.s.Node.Name+" routes op0 to its new key only", func() bool {
			peers := lg.dev.Peers()
			p, ok := peers[newKey]
			_, stale := peers[old]
			routed := false
			for _, n := range p.AllowedIPs {
				routed = routed || prefixOf(n) == aIP
			}
			return ok && !stale && routed && len(peers) == 2
		})
	}
	stored, err := a.g.prov.Secrets().WireGuardKey(context.Background(), "op0")
	if err != nil || wgtypes.Key(stored.Public()) != newKey {
		t.Errorf("stored key %v (err %v), want the new one: a restart must keep it", stored.Public(), err)
	}
	if st, err := a.g.Status(); err != nil {
		t.Errorf("status: %v", err)
	} else if st.PublicKey != rep.NewKey {
		t.Errorf("status public key %q, want %s", st.PublicKey, rep.NewKey)
	}
	if _, err := a.g.state.rotatedAt(); err != nil {
		t.Errorf("rotation time not recorded: %v", err)
	}
}

// TestWireGuardRotationAckLost: a peer's acknowledgement of the next key
// is one datagram; lost, the peer sends it again at a later pass while
// the next key is advertised, and the rotation counts it ready rather
// than late.
func TestWireGuardRotationAckLost(t *testing.T) {
	m := startLiveMesh(t)
	a := m.gws[0]
	a.g.dropWGAcks.Store(2) // both peers' first
	rep, err := a.g.RotateWireGuardKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Ready, []string{"op1", "op2"}) || len(rep.Late) != 0 || a.g.dropWGAcks.Load() > 0 {
		t.Errorf("ready %v, late %v (acknowledgements still to lose: %d): a lost acknowledgement is sent again", rep.Ready, rep.Late, a.g.dropWGAcks.Load())
	}
}

// TestWireGuardAckCountsOnlyForAPeerWaitedFor: the rotation waits for the
// peers of its plan as it began. An acknowledgement from any other member
// (one verified since, which is no peer of that plan) counts for nothing:
// counted, it could end the wait before a peer holds the next key, and
// the switch would cut that peer off until gossip brought it the new key.
func TestWireGuardAckCountsOnlyForAPeerWaitedFor(t *testing.T) {
	ca, lg := lonelyGateway(t)
	g := lg.g
	d := delegate{g: g}
	peer := verifiedMember(t, g, ca, "peer", "100.64.9.9", netip.MustParseAddrPort("127.0.0.2:9"))
	waitUntil(t, 10*time.Second, "peer in the plan", func() bool {
		p := g.plan.Load()
		return p != nil && slices.ContainsFunc(p.Peers, func(pc PeerConfig) bool { return pc.Node == "peer" })
	})
	type result struct {
		rep *WGRotationReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := g.RotateWireGuardKey(context.Background())
		done <- result{rep, err}
	}()
	waitUntil(t, 10*time.Second, "the rotation waiting for acknowledgements", func() bool { return g.wgAck.Load() != nil })
	next := g.wgAck.Load().key
	newcomer := verifiedMember(t, g, ca, "newcomer", "100.64.9.10", netip.MustParseAddrPort("127.0.0.3:9"))
	// The worker takes them in order: the newcomer's first.
	for _, id := range []*certs.NodeIdentity{newcomer, peer} {
		from := &Gateway{}
		from.id.Store(id)
		ack, err := from.signedAck(msgWGKeyAck, next[:])
		if err != nil {
			t.Fatal(err)
		}
		d.NotifyMsg(ack)
	}
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatal(r.err)
		}
		if !slices.Equal(r.rep.Ready, []string{"peer"}) || len(r.rep.Late) != 0 {
			t.Errorf("ready %v, late %v; want the peer ready, and the newcomer's acknowledgement not counted", r.rep.Ready, r.rep.Late)
		}
	case <-time.After(wgAckWait + 10*time.Second):
		t.Fatal("the rotation did not end")
	}
}

// TestWireGuardAckOfAnotherKeyNotCounted: a peer's signed acknowledgement
// counts only for the rotation to the key it names. One of another key
// (an earlier rotation's, which anyone holding the gossip key can replay)
// must not let the gateway switch before the peer holds the new one.
func TestWireGuardAckOfAnotherKeyNotCounted(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	if err := ms.addCert(a.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	ms.update("gw-a", gossipAddr, f.advert(a, 1))
	peer := &Gateway{}
	peer.id.Store(a)
	ack := func(k certs.WGPublicKey) message {
		b, err := peer.signedAck(msgWGKeyAck, k[:])
		if err != nil {
			t.Fatal(err)
		}
		m, err := decodeMessage(b, maxFields)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	next, _ := certs.GenerateWGKey()
	earlier, _ := certs.GenerateWGKey()
	g := &Gateway{members: ms}
	w := &wgAckWaiter{key: next.Public(), ch: make(chan string, 2)}
	g.wgAck.Store(w)
	if err := g.handleWGKeyAck(ack(earlier.Public())); err != nil || len(w.ch) != 0 {
		t.Errorf("gw-a's acknowledgement of another key: %v, %d counted; want none", err, len(w.ch))
	}
	if err := g.handleWGKeyAck(ack(next.Public())); err != nil || len(w.ch) != 1 {
		t.Fatalf("gw-a's acknowledgement of the key rotated to: %v, %d counted; want it", err, len(w.ch))
	}
}

// TestAcksAreSigned: an acknowledgement counts only when the member it
// names signed it — holding the gossip key is not enough to acknowledge a
// keyring step or a next WireGuard key for a gateway that missed it.
func TestAcksAreSigned(t *testing.T) {
	m := startLiveMesh(t)
	a, b := m.gws[0].g, m.gws[1].g
	subject := []byte("operation id")
	good, err := b.signedAck(msgKeyringAck, subject)
	if err != nil {
		t.Fatal(err)
	}
	gm, _ := decodeMessage(good, maxFields)
	if node, got, err := a.checkAck(gm); err != nil || node != "op1" || string(got) != string(subject) {
		t.Fatalf("op1's own acknowledgement: %s %q %v", node, got, err)
	}
	// op2 signing in op1's name, op1's signature over another subject or
	// kind, the unsigned form, and a name that is no member.
	c := m.gws[2].g
	forged, _ := c.signedAck(msgKeyringAck, subject)
	fm, _ := decodeMessage(forged, maxFields)
	fm.fields[0] = []byte("op1")
	other := gm
	other.fields = [][]byte{gm.fields[0], []byte("another operation"), gm.fields[2]}
	asWG := gm
	asWG.typ = msgWGKeyAck
	for name, msg := range map[string]message{
		"signed by op2 in op1's name": fm,
		"op1's signature, another id": other,
		"op1's signature, other kind": asWG,
		"unsigned":                    {typ: msgKeyringAck, fields: [][]byte{[]byte("op1"), subject}},
		"from no member":              {typ: msgKeyringAck, fields: [][]byte{[]byte("op9"), subject, gm.fields[2]}},
	} {
		if _, _, err := a.checkAck(msg); err == nil {
			t.Errorf("%s: acknowledgement accepted", name)
		}
	}
	// Through the handler: a forged keyring acknowledgement reaches no
	// rotation.
	if err := a.handleKeyringAck(fm); err == nil || len(a.acks) != 0 {
		t.Fatalf("forged keyring acknowledgement: %v, %d queued", err, len(a.acks))
	}
}

// TestRotationAfterCallerGaveUp: a rotation asked for by a caller that
// has gone by the time it may run (it waited behind another rotation
// until the CLI's timeout) changes nothing, though no peer is waited for.
func TestRotationAfterCallerGaveUp(t *testing.T) {
	dir := t.TempDir()
	ca, err := certs.InitCA(filepath.Join(dir, "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	lg := startLiveGateway(t, ca, dir, 0, "zrh-dc", nil, &syncbuf.Buffer{})
	before := lg.g.wgPublicKey()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rep, err := lg.g.RotateWireGuardKey(ctx)
	if after := lg.g.wgPublicKey(); err == nil || after != before {
		t.Errorf("rotation for a caller gone: err %v, report %+v, key %s → %s; want it refused and the key kept", err, rep, before, after)
	}
}
