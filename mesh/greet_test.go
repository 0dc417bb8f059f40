package mesh

import (
	"fmt"
	"log/slog"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
)

// handshakingDevice records configurations like RecordingDevice but says
// it handshakes, so that the greeter acts on it.
type handshakingDevice struct {
	*RecordingDevice
	configs []wgtypes.Config
}

func (d *handshakingDevice) Mode() string { return ModeTUN }

func (d *handshakingDevice) Configure(c wgtypes.Config) error {
	d.configs = append(d.configs, c)
	return d.RecordingDevice.Configure(c)
}

// TestGreet: only the side with the lower key greets a new peer (an
// immediate initiation, by switching keepalive on and off), greets again
// with the peer re-created while no handshake completes, after waits that
// double, and stops once one does, the peer goes, or after greetTries.
func TestGreet(t *testing.T) {
	var keys []certs.WGPrivateKey
	for range 3 {
		k, err := certs.GenerateWGKey()
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	// Order them: own in the middle, one peer below, one above.
	for i := range keys {
		for j := i + 1; j < len(keys); j++ {
			if !greeter(keys[i].Public(), keys[j].Public()) {
				keys[i], keys[j] = keys[j], keys[i]
			}
		}
	}
	below, own, above := keys[0].Public(), keys[1], keys[2].Public()
	dev := &handshakingDevice{RecordingDevice: NewRecordingDevice("t")}
	// A clock that stands still: a pass is never late for a greeting.
	clock := time.Now()
	g := &Gateway{dev: dev, wgKey: own, log: slog.New(slog.DiscardHandler), greetings: map[certs.WGPublicKey]greeting{}, kick: make(chan struct{}, 1), now: func() time.Time { return clock }}
	plan := []PeerConfig{{Node: "low", PublicKey: below}, {Node: "high", PublicKey: above}}

	pass := func() []wgtypes.Config {
		t.Helper()
		cur, _ := dev.Device()
		added, _ := DiffPeers(cur.Peers, plan, nil)
		dev.configs = nil
		if len(added) > 0 {
			if err := dev.Configure(wgtypes.Config{Peers: added}); err != nil {
				t.Fatal(err)
			}
		}
		if err := g.greet(cur.Peers, added, plan); err != nil {
			t.Fatal(err)
		}
		return dev.configs
	}
	kicked := func(cs []wgtypes.Config, k certs.WGPublicKey) (kicks, recreated int) {
		for _, c := range cs {
			for _, p := range c.Peers {
				if p.PublicKey != wgtypes.Key(k) {
					continue
				}
				if p.Remove {
					recreated++
				}
				if p.UpdateOnly && p.PersistentKeepaliveInterval != nil && *p.PersistentKeepaliveInterval == time.Second {
					kicks++
				}
			}
		}
		return kicks, recreated
	}

	dueNow := func(k certs.WGPublicKey) {
		gr := g.greetings[k]
		gr.due = clock.Add(-time.Millisecond)
		g.greetings[k] = gr
	}
	// The wait before the next greeting: a short pause after the add,
	// then greetWait, doubled each try.
	waits := func(k certs.WGPublicKey, want time.Duration, when string) {
		t.Helper()
		if got := g.greetings[k].due.Sub(clock); got != want {
			t.Fatalf("%s: next greeting in %s, want %s", when, got, want)
		}
	}
	if cs := pass(); len(cs) != 1 || len(g.greetings) != 1 {
		t.Fatalf("adding two peers: %d configurations, %d greetings; want the add alone and one greeting (not yet due)", len(cs), len(g.greetings))
	}
	if _, ok := g.greetings[below]; ok {
		t.Fatal("the peer with the lower key greets us; we must not greet it too (crossing initiations void each other)")
	}
	waits(above, greetFirst, "after the add")
	dueNow(above)
	cs := pass()
	if k, r := kicked(cs, above); k != 1 || r != 0 {
		t.Fatalf("first greeting: %d kicks, %d re-creations; want 1 and 0: %+v", k, r, cs)
	}
	waits(above, greetWait, "after the first greeting")
	if p := dev.Peers()[wgtypes.Key(above)]; p.PersistentKeepaliveInterval != 0 {
		t.Fatalf("keepalive left at %s after the greeting", p.PersistentKeepaliveInterval)
	}
	if cs := pass(); len(cs) != 0 {
		t.Fatalf("greeted again before its time: %+v", cs)
	}
	for try := 2; try <= greetTries; try++ {
		dueNow(above)
		cs := pass()
		if k, r := kicked(cs, above); k != 1 || r != 1 {
			t.Fatalf("try %d: %d greetings, %d re-creations; want 1 and 1", try, k, r)
		}
		if _, ok := dev.Peers()[wgtypes.Key(above)]; !ok {
			t.Fatal("the re-created peer is missing")
		}
		waits(above, greetWait<<(try-1), fmt.Sprintf("after greeting %d", try))
	}
	dueNow(above)
	if cs := pass(); len(cs) != 0 || len(g.greetings) != 0 {
		t.Fatalf("greeted after %d tries: %+v", greetTries, cs)
	}

	// A handshake ends the greeting.
	plan = append(plan, PeerConfig{Node: "late", PublicKey: certs.WGPublicKey{0xff, 0xff}})
	pass()
	if _, ok := g.greetings[certs.WGPublicKey{0xff, 0xff}]; !ok {
		t.Fatal("the newest peer is not being greeted")
	}
	dueNow(certs.WGPublicKey{0xff, 0xff})
	dev.mu.Lock()
	p := dev.peers[wgtypes.Key{0xff, 0xff}]
	p.LastHandshakeTime = time.Now()
	dev.peers[wgtypes.Key{0xff, 0xff}] = p
	dev.mu.Unlock()
	pass()
	if len(g.greetings) != 0 {
		t.Fatal("a peer that completed a handshake is still greeted")
	}
}
