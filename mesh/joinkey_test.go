package mesh

import (
	"bytes"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// TestLiveMemberKeepsItsKeyWhenKnocksFail: a gateway in the mesh whose
// keyring holds a key the mesh no longer has (as joinUnderAnyKey leaves
// it) knocks on members that do not answer (a dead member remembered, a
// seed that is down: maintain does so every rejoinInterval). It must not
// try its other keys then: everything it sent meanwhile would be under a
// key nobody reads, and the mesh would declare it dead.
func TestLiveMemberKeepsItsKeyWhenKnocksFail(t *testing.T) {
	m := startLiveMesh(t)
	a, c := m.gws[0], m.gws[2]
	stale, err := certs.NewGossipKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.g.keyring.AddKey(stale); err != nil { // installed, not primary
		t.Fatal(err)
	}
	meshKey := c.g.keyring.GetPrimaryKey()

	// Members that do not answer: each push/pull waits out TCPTimeout
	// (1 s in the tests' "local" profile; 10 s LAN, 30 s WAN).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close()
		}
	}()
	var addrs []string
	for range 3 {
		addrs = append(addrs, ln.Addr().String())
	}

	var swapped atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.g.join(addrs)
	}()
	droppedPeer := false
	for waiting := true; waiting; {
		select {
		case <-done:
			waiting = false
		case <-time.After(50 * time.Millisecond):
			if !bytes.Equal(c.g.keyring.GetPrimaryKey(), meshKey) {
				swapped.Store(true)
			}
			if len(a.dev.Peers()) < 2 {
				droppedPeer = true
			}
		}
	}
	if swapped.Load() {
		t.Errorf("op2, alive in the mesh, made a key no member holds its primary while it knocked on members that did not answer")
	}
	if droppedPeer {
		t.Errorf("op0 dropped its tunnel to op2 (declared dead) while op2 knocked on members that did not answer")
	}
}
