package mesh

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// knockedSeed takes gossip connections and answers none, like a seed
// behind a firewall that lets the handshake through or a hung gateway.
// It closes the first closeFirst at once, so that a join knocking there
// fails without waiting out memberlist's TCP timeout, and holds the rest
// until release (or the test's end). accepted counts them all.
func knockedSeed(t *testing.T, closeFirst int32) (addr string, accepted *atomic.Int32, release func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted = new(atomic.Int32)
	var mu sync.Mutex
	var held []net.Conn
	released := false
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if accepted.Add(1) <= closeFirst || released {
				c.Close()
			} else {
				held = append(held, c)
			}
			mu.Unlock()
		}
	}()
	release = func() {
		mu.Lock()
		defer mu.Unlock()
		released = true
		for _, c := range held {
			c.Close()
		}
		held = nil
	}
	t.Cleanup(func() {
		ln.Close()
		release()
	})
	return ln.Addr().String(), accepted, release
}

// startTwoKeyGateway starts a gateway alone (no seeds: nothing knocks
// but the test), under memberlist's LAN profile (TCP timeout 10 s), with
// a second key installed beside its primary: a rotation's install step
// taken, or a rotation cut short.
func startTwoKeyGateway(t *testing.T) (lg *liveGateway, ca *certs.CA, primary, second []byte) {
	t.Helper()
	dir := t.TempDir()
	ca = meshCA(t, dir)
	lg = startLiveGatewayWith(t, ca, dir, 0, "zrh-dc", nil, &syncbuf.Buffer{}, func(s *Settings) {
		s.GossipProfile = ""
		path := filepath.Join(s.Identity.Dir, certs.FileGossipKeyring)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		kr, err := certs.ParseGossipKeyring(b)
		if err != nil {
			t.Fatal(err)
		}
		if second, err = certs.NewGossipKey(); err != nil {
			t.Fatal(err)
		}
		kr2, err := certs.NewGossipKeyring(append(kr.Keys(), second))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, kr2.MarshalSecret(), 0o600); err != nil {
			t.Fatal(err)
		}
	})
	if n := len(lg.g.keyring.GetKeys()); n != 2 {
		t.Fatalf("keyring has %d keys; want 2", n)
	}
	return lg, ca, lg.g.keyring.GetPrimaryKey(), second
}

// TestKeyringStepDuringJoinUnderOtherKey: a gateway cut off, with two
// keys, tries its other key on a seed that takes the connection and
// never answers. A sibling's rotation step, and the gossip behind it,
// must be handled meanwhile: the gossip worker applies keyring steps,
// and it waited for the join (up to the TCP timeout an address, 30 s a
// rejoin round on a LAN), past the initiator's keyringAckWait. And the
// step must stand once the join gives up: putting back the primary it
// set aside would undo it.
func TestKeyringStepDuringJoinUnderOtherKey(t *testing.T) {
	lg, ca, primary, second := startTwoKeyGateway(t)
	g := lg.g
	seed, accepted, release := knockedSeed(t, 1) // under the primary: refused at once
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.joinUnderAnyKey([]string{seed})
	}()
	t.Cleanup(func() { release(); <-done }) // before the gateway stops
	waitUntil(t, 20*time.Second, "a join under the other key", func() bool {
		return accepted.Load() >= 2 && bytes.Equal(g.keyring.GetPrimaryKey(), second)
	})

	sib, err := ca.IssueIdentity(certs.Attributes{Node: "op5", Site: "zrh-dc", Region: "r-zrh-dc", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.7.50")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	id := make([]byte, opIDLen)
	rand.Read(id)
	op := &keyringOp{kind: opUse, key: second, id: id, at: time.Now(), initiator: "op5", certDER: sib.Certificate().Raw}
	msg, err := g.keyringOpFor(sib, op, g.s.Node.Name, nil)
	if err != nil {
		t.Fatal(err)
	}
	probe, err := ca.IssueIdentity(certs.Attributes{Node: "probe", Site: "s", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.9.9")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	d := delegate{g: g}
	d.NotifyMsg(msg)
	d.NotifyMsg(encodeMessage(msgCert, probe.Certificate().Raw))
	sum := sha256.Sum256(probe.Certificate().Raw)
	// Well inside the 10 s the held connection keeps the join waiting.
	waitUntil(t, 5*time.Second, "the worker to take the keyring step and the certificate behind it while the join waits", func() bool {
		ms := g.members
		ms.mu.Lock()
		defer ms.mu.Unlock()
		_, ok := ms.certs[sum]
		return ok
	})

	release()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the join under the other key did not return once its seed closed the connection")
	}
	if got := g.keyring.GetPrimaryKey(); !bytes.Equal(got, second) {
		t.Errorf("primary key after the join: the one it set aside (%t), not the one the use step made primary", bytes.Equal(got, primary))
	}
	if n := len(g.keyring.GetKeys()); n != 2 {
		t.Errorf("keyring has %d keys after the join; want 2", n)
	}
}

// TestNoJoinUnderOtherKeyWhileRotating: while a rotation is under way
// here, a cut-off gateway whose join finds nobody does not try its other
// keys: the steps reach it, and its answers must go under the key the
// initiator reads. Once none is, it tries them again.
func TestNoJoinUnderOtherKeyWhileRotating(t *testing.T) {
	lg, _, primary, _ := startTwoKeyGateway(t)
	g := lg.g
	seed, accepted, _ := knockedSeed(t, 1<<30) // every connection refused at once

	g.ops.Lock()
	g.ops.open.initiator, g.ops.open.until = "op5", g.now().Add(rotationOpenFor)
	g.ops.Unlock()
	if n, _ := g.joinUnderAnyKey([]string{seed}); n != 0 {
		t.Fatalf("joined %d through a seed that answers nothing", n)
	}
	if got := accepted.Load(); got != 1 {
		t.Errorf("%d knocks with a rotation under way; want 1, under the primary key only", got)
	}

	g.ops.Lock()
	g.ops.open.initiator = ""
	g.ops.Unlock()
	before := accepted.Load()
	g.joinUnderAnyKey([]string{seed})
	if got := accepted.Load() - before; got != 2 {
		t.Errorf("%d knocks with no rotation under way; want 2, under each key", got)
	}
	if !bytes.Equal(g.keyring.GetPrimaryKey(), primary) {
		t.Error("the primary key did not come back after nobody answered under the other key")
	}
}
