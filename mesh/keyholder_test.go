package mesh

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// What anyone holding the gossip key can do with memberlist itself: run
// a node under a gateway's name, from an address of its own, with
// whatever metadata (a gateway's advert, copied from gossip), and leave
// under that name.

// metaDelegate is a plain memberlist node's delegate: its metadata, and
// nothing else.
type metaDelegate []byte

func (d metaDelegate) NodeMeta(limit int) []byte                { return d }
func (metaDelegate) NotifyMsg([]byte)                           {}
func (metaDelegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (metaDelegate) LocalState(join bool) []byte                { return nil }
func (metaDelegate) MergeRemoteState(buf []byte, join bool)     {}

// keyHolderNode runs a plain memberlist node named name on port (0: a new
// loopback port) with the mesh's gossip keys and meta as its metadata, on
// transport if given.
func keyHolderNode(t *testing.T, keys [][]byte, name string, port int, meta []byte, transport memberlist.Transport) (*memberlist.Memberlist, netip.AddrPort) {
	t.Helper()
	kr, err := memberlist.NewKeyring(keys, keys[0])
	if err != nil {
		t.Fatal(err)
	}
	if port == 0 {
		port = loopbackPort(t)
	}
	cfg := memberlist.DefaultLocalConfig()
	cfg.Name = name
	cfg.BindAddr, cfg.BindPort, cfg.AdvertiseAddr, cfg.AdvertisePort = "127.0.0.1", port, "127.0.0.1", port
	cfg.Keyring, cfg.GossipVerifyIncoming, cfg.GossipVerifyOutgoing = kr, true, true
	cfg.Logger = log.New(io.Discard, "", 0)
	cfg.Delegate = metaDelegate(meta)
	cfg.Transport = transport
	m, err := memberlist.Create(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Shutdown() })
	return m, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
}

// mutedTransport is a memberlist transport that can stop sending: a node
// that hears what is said of it and cannot refute it meanwhile.
type mutedTransport struct {
	*memberlist.NetTransport
	muted atomic.Bool
}

var errMuted = errors.New("muted")

func (t *mutedTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	if t.muted.Load() {
		return time.Now(), nil
	}
	return t.NetTransport.WriteTo(b, addr)
}

func (t *mutedTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if t.muted.Load() {
		return time.Now(), nil
	}
	return t.NetTransport.WriteToAddress(b, a)
}

func (t *mutedTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	if t.muted.Load() {
		return nil, errMuted
	}
	return t.NetTransport.DialTimeout(addr, timeout)
}

func (t *mutedTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if t.muted.Load() {
		return nil, errMuted
	}
	return t.NetTransport.DialAddressTimeout(a, timeout)
}

// memberAt is the gateway's view of member name (zero if unknown).
func memberAt(lg *liveGateway, name string) MemberView {
	for _, m := range lg.g.members.snapshot() {
		if m.Name == name {
			return m
		}
	}
	return MemberView{}
}

// TestLeftGatewayNotBackOnAKeyHoldersWord: a gateway stopped on purpose
// is "left" in memberlist, which takes an alive message for its name from
// any address, whatever its incarnation. Someone holding the gossip key
// alone runs a node under that name with the gateway's last advert (which
// gossip showed every member), at the gateway's own address and at one of
// its own: the gateway stays gone, its site's routes held rather than
// routed into a tunnel nobody answers, and a gossip key rotation does not
// wait for it.
func TestLeftGatewayNotBackOnAKeyHoldersWord(t *testing.T) {
	logs := &syncbuf.Buffer{}
	_, hq, fra, lan := liveSitePair(t, logs)
	last := append([]byte(nil), *fra.g.advert.Load()...)
	own := fra.g.s.GossipAdvertise
	fra.stop()
	waitUntil(t, 20*time.Second, "fra-1 left, its routes held", func() bool {
		m := memberAt(hq, "fra-1")
		return m.State == StateDead && m.Left && hq.held(lan) && len(hq.dev.Peers()) == 0
	})
	keys := hq.g.keyring.GetKeys()
	for _, tc := range []struct {
		where, said string
		port        int
	}{
		{"at its own address", "fra-1 left the mesh on purpose", int(own.Port())},
		{"at another address", `"peer":"fra-1","reason":"replay"`, 0},
	} {
		m, at := keyHolderNode(t, keys, "fra-1", tc.port, last, nil)
		if _, err := m.Join([]string{hq.g.s.GossipAdvertise.String()}); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 20*time.Second, "hq to refuse fra-1 "+tc.where, func() bool {
			if v := memberAt(hq, "fra-1"); v.Alive {
				t.Fatalf("fra-1, gone, is %s and alive at hq again on the word of a gossip-key holder at %s", v.State, at)
			}
			return strings.Contains(logs.String(), tc.said)
		})
		m.Shutdown()
	}
	if v := memberAt(hq, "fra-1"); v.State != StateDead || !v.Left || v.Gossip != own || !hq.held(lan) || hq.routed(lan) || len(hq.dev.Peers()) != 0 {
		t.Fatalf("fra-1 at hq: %s, left %v, at %s (was %s); %s held %v, routed %v; %d peers", v.State, v.Left, v.Gossip, own, lan, hq.held(lan), hq.routed(lan), len(hq.dev.Peers()))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := hq.g.RotateGossipKey(ctx, true); err != nil {
		t.Fatalf("gossip key rotation without the gateway that left: %v", err)
	}
}

// TestVerifiedNameNotMovedByAKeyHolder: a gateway that is up, held by a
// gossip-key holder: a node under its name leaves (memberlist takes that
// as the gateway's own departure, "left", which lets its address move),
// and a second one joins from the key holder's address with the
// gateway's current advert before the gateway can refute. The name stays
// where it was verified: the gateway is heard there again once it can
// answer, rather than ignored for the key holder's address.
func TestVerifiedNameNotMovedByAKeyHolder(t *testing.T) {
	logs := &syncbuf.Buffer{}
	ca := meshCA(t, t.TempDir())
	hq := startLiveGateway(t, ca, t.TempDir(), 0, "zrh-dc", nil, logs)
	id, err := ca.IssueIdentity(certs.Attributes{Node: "fra-1", Site: "fra-dc", Region: "fra", Provider: "onprem", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr("100.64.7.9")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	wg, err := certs.GenerateWGKey()
	if err != nil {
		t.Fatal(err)
	}
	proof, err := certs.ProveWGKey(wg, id.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	a := id.Attributes()
	advert, err := certs.SignAdvert(&certs.Advert{Version: 1, Timestamp: time.Now(), Node: a.Node, Site: a.Site, Region: a.Region, Provider: a.Provider,
		Jurisdiction: a.Jurisdiction, OverlayIP: a.OverlayIP, WireGuardKey: wg.Public(), WireGuardKeyProof: proof}, id)
	if err != nil {
		t.Fatal(err)
	}
	hq.g.members.addCert(id.Certificate().Raw)
	keys := hq.g.keyring.GetKeys()
	port := loopbackPort(t)
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}, BindPort: port, Logger: log.New(io.Discard, "", 0)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &mutedTransport{NetTransport: nt}
	fra, real := keyHolderNode(t, keys, "fra-1", port, advert, tr)
	seed := []string{hq.g.s.GossipAdvertise.String()}
	if _, err := fra.Join(seed); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 20*time.Second, "fra-1 verified and alive at hq", func() bool {
		v := memberAt(hq, "fra-1")
		return v.State == StateVerified && v.Alive && v.Gossip == real
	})

	tr.muted.Store(true)
	// Its metadata is not an advert: refused, and its leave is taken all
	// the same.
	m1, _ := keyHolderNode(t, keys, "fra-1", 0, []byte("not an advert"), nil)
	m1.Join(seed)
	m1.Leave(time.Second)
	m1.Shutdown()
	waitUntil(t, 20*time.Second, "fra-1 gone at hq", func() bool { return !memberAt(hq, "fra-1").Alive })
	m2, at := keyHolderNode(t, keys, "fra-1", 0, advert, nil)
	if _, err := m2.Join(seed); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 20*time.Second, "hq to refuse fra-1 at the key holder's address", func() bool {
		if v := memberAt(hq, "fra-1"); v.Gossip == at {
			t.Fatalf("hq has fra-1 %s, alive %v, at the key holder's address %s (it was verified at %s)", v.State, v.Alive, at, real)
		}
		return strings.Contains(logs.String(), `"peer":"fra-1","reason":"replay"`)
	})

	// The gateway can answer again, and knocks (as its rejoin rounds do).
	tr.muted.Store(false)
	if _, err := fra.Join(seed); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 20*time.Second, "fra-1 verified and alive at hq again, where it is", func() bool {
		v := memberAt(hq, "fra-1")
		return v.State == StateVerified && v.Alive && v.Gossip == real
	})
}

// TestGatewayBackAtANewAddress: a gateway restarted with another gossip
// address is taken there, after it left on purpose, on the newer advert
// its start signs: with the certificate it had, and with one renewed
// while it was down, which hq learns from it there.
func TestGatewayBackAtANewAddress(t *testing.T) {
	ca, hq, fra, lan := liveSitePair(t, io.Discard)
	for _, renew := range []bool{false, true} {
		s := *fra.g.s // a copy each time: the gateway stopped keeps its own
		fra.stop()
		waitUntil(t, 20*time.Second, "fra-1 left", func() bool { return memberAt(hq, "fra-1").Left })
		p := loopbackPort(t)
		ap := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(p))
		s.GossipBind, s.GossipAdvertise, s.Port, s.Endpoints = ap, ap, p, []netip.AddrPort{ap}
		if renew {
			tb, err := ca.TrustBundle()
			if err != nil {
				t.Fatal(err)
			}
			provisionGateway(t, ca, tb, *fra.g.id.Load().Attributes(), time.Hour, s.Identity.Dir)
		}
		fra = runLiveGateway(t, &s, io.Discard)
		cert := fra.g.id.Load().Certificate()
		waitUntil(t, 20*time.Second, "fra-1 verified at its new address, its site routed", func() bool {
			v := memberAt(hq, "fra-1")
			return v.State == StateVerified && v.Gossip == ap && v.Verified.Cert.Equal(cert) && hq.routed(lan)
		})
	}
}

// TestKeyHolderNodesLeaveNothingBehind: nodes of someone holding the
// gossip key alone, each under a made-up name with an advert whose
// certificate never comes, join and leave: the gateway forgets each as it
// goes, rather than keep it (and save it, and knock on its address) for
// an hour outside the bound on those waiting for their certificate.
func TestKeyHolderNodesLeaveNothingBehind(t *testing.T) {
	_, lg := lonelyGateway(t)
	signer := newFixture(t).identity("whoever", "x", 1, time.Now().Add(-time.Hour))
	keys := lg.g.keyring.GetKeys()
	for i := range 3 {
		name := fmt.Sprintf("made-up-%d", i)
		m, _ := keyHolderNode(t, keys, name, 0, madeUpAdvert(t, signer, name, byte(i)), nil)
		if _, err := m.Join([]string{lg.g.s.GossipAdvertise.String()}); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 20*time.Second, name+" pending", func() bool { return memberAt(lg, name).State == StatePending })
		m.Leave(time.Second)
		m.Shutdown()
		waitUntil(t, 20*time.Second, name+" forgotten once gone", func() bool { return memberAt(lg, name).Name == "" })
	}
}

// TestKeyHolderBlobsReleased: blobs of a megabyte from someone holding
// the gossip key, signed by a key of its own, are refused by the worker
// without holding up a certificate sent after them, and without being
// parsed (its signer is checked first), and what the queues held is
// released as they are handled.
func TestKeyHolderBlobsReleased(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "junk"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCRLSign | x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	issuer, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	entries := make([]x509.RevocationListEntry, 30000)
	for i := range entries {
		entries[i] = x509.RevocationListEntry{SerialNumber: new(big.Int).Lsh(big.NewInt(int64(i+1)), 80), RevocationTime: time.Now()}
	}
	list, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(5), ThisUpdate: time.Now(), NextUpdate: time.Now().Add(time.Hour),
		RevokedCertificateEntries: entries}, issuer, k)
	if err != nil {
		t.Fatal(err)
	}
	parses := countParses(t, list) // before the gateway runs, and put back after it stopped
	ca, lg := lonelyGateway(t)
	m, _ := keyHolderNode(t, lg.g.keyring.GetKeys(), "keyholder", 0, nil, nil)
	to := &memberlist.Node{Name: lg.g.id.Load().Attributes().Node, Addr: lg.g.s.GossipAdvertise.Addr().AsSlice(), Port: lg.g.s.GossipAdvertise.Port()}
	blob := encodeMessage(msgBlob, []byte{blobCRL}, list)
	for range 8 {
		if err := m.SendReliable(to, blob); err != nil {
			t.Fatal(err)
		}
	}
	id, err := ca.IssueIdentity(certs.Attributes{Node: "probe", Site: "s", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.9.9")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := m.SendReliable(to, encodeMessage(msgCert, id.Certificate().Raw)); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(id.Certificate().Raw)
	waitUntil(t, 20*time.Second, "the certificate learned, the queues empty", func() bool {
		ms := lg.g.members
		ms.mu.Lock()
		_, ok := ms.certs[sum]
		ms.mu.Unlock()
		return ok && lg.g.inboxBytes.Load() == 0
	})
	if n := parses.Load(); n != 0 {
		t.Fatalf("a list signed by a key of the sender's own was parsed %d times", n)
	}
}

// TestOwnAdvertAheadSaid: a gateway whose advert version went down (its
// advert.version lost) is refused as a replay by peers that hold its
// older run's advert; they say what to do, and so does the gateway,
// once, when it hears that advert gossiped under its name. An advert
// under its name it cannot verify (anyone holding the gossip key can
// gossip one) is not taken for it.
func TestOwnAdvertAheadSaid(t *testing.T) {
	f := newFixture(t)
	trust := f.trust()
	id := f.identity("me", "s", 1, f.now)
	clock := func() time.Time { return f.now }

	// A peer that verified version 200 at another address.
	peer := newMembership("peer", trust, clock, func() {})
	peer.addCert(id.Certificate().Raw)
	at := netip.MustParseAddrPort("192.0.2.1:7946")
	if err := peer.admit("me", at, f.advert(id, 200)); err != nil {
		t.Fatal(err)
	}
	if peer.update("me", at, f.advert(id, 200)); peer.verified("me") == nil {
		t.Fatal("version 200 not verified")
	}
	err := peer.admit("me", netip.MustParseAddrPort("192.0.2.2:7946"), f.advert(id, 100))
	if certs.ReasonOf(err) != certs.ReasonReplay || !strings.Contains(fmt.Sprint(err), "write 200 to advert.version") {
		t.Errorf("the peer refuses version 100 after 200 with %v, want a replay naming advert.version and 200", err)
	}

	var logs bytes.Buffer
	g := &Gateway{log: slog.New(slog.NewTextHandler(&logs, nil)), members: newMembership("me", trust, clock, func() {}), state: stateDir(t.TempDir())}
	g.id.Store(id)
	mine := f.advert(id, 100)
	g.advert.Store(&mine)
	g.self.Store(&Node{Attributes: id.Attributes(), Advert: certs.Advert{Version: 100}})
	d := delegate{g: g}
	other := newFixture(t).identity("me", "s", 1, f.now) // another CA's: no certificate of ours
	for _, meta := range [][]byte{mine, f.advert(id, 50), newFixture(t).advert(other, 900)} {
		if err := d.NotifyAlive(&memberlist.Node{Name: "me", Meta: meta}); err != nil {
			t.Fatal(err)
		}
	}
	if logs.Len() != 0 {
		t.Fatalf("our own advert, an older one or one not ours said: %s", logs.String())
	}
	for range 3 {
		if err := d.NotifyAlive(&memberlist.Node{Name: "me", Meta: f.advert(id, 200)}); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(logs.String(), "level=ERROR"); n != 1 || !strings.Contains(logs.String(), "version 200, above the 100") || !strings.Contains(logs.String(), "write 200 to ") {
		t.Fatalf("our advert of version 200 heard 3 times while we sign 100: %d errors, want one naming both and advert.version: %s", n, logs.String())
	}
}
