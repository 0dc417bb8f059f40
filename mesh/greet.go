package mesh

import (
	"bytes"
	"fmt"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
)

// A tunnel to a new peer carries nothing until a handshake completes, and
// WireGuard starts one only when a packet needs it. Two things then cost
// five seconds (REKEY_TIMEOUT, after which an unanswered initiation is
// retried): a first packet whose initiation reaches a peer that has not
// added us yet is dropped; and initiations from both ends that cross on
// the wire void each other (each side's handshake state is replaced by
// the other's, so both responses are refused). That is most of the time a
// gateway newly in the mesh (a burst gateway, a restarted one) would
// otherwise wait before its first packet passes.
//
// So one side greets: the one with the lower public key sends a handshake
// initiation 100 ms after it adds the peer (switching on persistent
// keepalive sends one at once, in the kernel and in wireguard-go alike,
// and switching it off again costs nothing), unless a handshake happened
// meanwhile. If none has completed a quarter of a second later, it greets
// again with the peer re-created, since WireGuard will not initiate twice
// within five seconds for the same peer object; then after 0.5, 1 and 2
// seconds.

type greeting struct {
	due   time.Time // when to greet (again)
	tries int       // greetings sent
}

const (
	// greetFirst lets the peer add us too (both learn of each other from
	// the same gossip, within milliseconds) before the first greeting,
	// which would otherwise be dropped and need a re-creation, losing any
	// packet WireGuard had queued for the peer.
	greetFirst = 100 * time.Millisecond
	greetWait  = 250 * time.Millisecond // for an answer; doubled each try
	greetTries = 5
)

// greeter reports whether we start the handshake with peer.
func greeter(own, peer certs.WGPublicKey) bool { return bytes.Compare(own[:], peer[:]) < 0 }

// greet runs after each applied configuration, in the reconcile loop:
// before is the device's peers as this pass found them, applied what it
// changed, plan the peers wanted.
func (g *Gateway) greet(before []wgtypes.Peer, applied []wgtypes.PeerConfig, plan []PeerConfig) error {
	if g.dev.Mode() == modeRecord {
		return nil // a recording device never handshakes
	}
	cur, _ := g.wgKeys()
	own := cur.Public()
	now := g.now()
	for _, p := range applied {
		if k := certs.WGPublicKey(p.PublicKey); !p.UpdateOnly && !p.Remove && greeter(own, k) {
			g.greetings[k] = greeting{due: now.Add(greetFirst)}
		}
	}
	if len(g.greetings) == 0 {
		return nil
	}
	want := make(map[certs.WGPublicKey]PeerConfig, len(plan))
	for _, pc := range plan {
		want[pc.PublicKey] = pc
	}
	shook := make(map[certs.WGPublicKey]bool, len(before))
	for _, p := range before {
		shook[certs.WGPublicKey(p.PublicKey)] = !p.LastHandshakeTime.IsZero()
	}
	var next time.Time
	for k, gr := range g.greetings {
		pc, wanted := want[k]
		switch {
		case !wanted || shook[k] || gr.tries >= greetTries:
			delete(g.greetings, k)
			continue
		case !now.Before(gr.due):
			if gr.tries > 0 {
				g.log.Debug("no handshake yet with a new peer: greeting it again", "peer", pc.Node, "try", gr.tries+1)
				if err := g.dev.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: wgtypes.Key(k), Remove: true}, newPeer(pc)}}); err != nil {
					return fmt.Errorf("configure %s: %w", g.dev.Name(), err)
				}
			}
			if err := g.kickHandshake(pc); err != nil {
				return err
			}
			gr = greeting{due: now.Add(greetWait << gr.tries), tries: gr.tries + 1}
			g.greetings[k] = gr
		}
		if next.IsZero() || gr.due.Before(next) {
			next = gr.due
		}
	}
	// Come back when the next greeting is due.
	if !next.IsZero() {
		d := max(next.Sub(now), time.Millisecond)
		if g.greetTimer == nil {
			g.greetTimer = time.AfterFunc(d, g.triggerReconcile)
		} else {
			g.greetTimer.Reset(d)
		}
	}
	return nil
}

// kickHandshake makes WireGuard send pc's peer a handshake initiation now.
// A peer with persistent keepalive sent one when it was configured.
func (g *Gateway) kickHandshake(pc PeerConfig) error {
	if pc.Keepalive != 0 {
		return nil
	}
	key := wgtypes.Key(pc.PublicKey)
	for _, ka := range []time.Duration{time.Second, 0} {
		if err := g.dev.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key, UpdateOnly: true, PersistentKeepaliveInterval: ptr(ka)}}}); err != nil {
			return fmt.Errorf("configure %s: %w", g.dev.Name(), err)
		}
	}
	return nil
}
