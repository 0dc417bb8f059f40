package mesh

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/scrape"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// TestKeptAliveNeverHandshookFails: a gateway behind NAT keeps every
// tunnel alive (persistent keepalive 25 s). One that has never
// handshaken, whose transmit counter stands still because the host lets
// none of its packets out (wireguard-go counts a packet only when the
// socket takes it), fails 180 s on, as it would had it handshaken once:
// it read idle for ever, its site reachable, and nothing paged.
func TestKeptAliveNeverHandshookFails(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	var logs syncbuf.Buffer
	// op1: an ordinary gateway of site aws-fra.
	b := startLiveGateway(t, ca, dir, 1, "aws-fra", nil, &logs)

	// op0: behind NAT, with a clock we can move forward (set before Run,
	// so no goroutine races the assignment).
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	gdir := filepath.Join(dir, "op0")
	attrs := certs.Attributes{Node: "op0", Site: "zrh-dc", Region: "r-zrh-dc", Provider: "onprem", Jurisdiction: "CH", OverlayIP: netip.AddrFrom4([4]byte{100, 64, 7, 1})}
	s := liveSettings(t, gdir)
	s.Node = provisionGateway(t, ca, tb, attrs, time.Hour, s.Identity.Dir)
	s.Seeds = []string{b.g.s.GossipAdvertise.String()}
	s.BehindNAT = true
	dev := NewRecordingDevice("op0")
	var skew atomic.Int64
	g := runGateway(t, s, dev, slog.New(slog.NewJSONHandler(&logs, nil)), func(g *Gateway) {
		g.now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	})

	waitUntil(t, 20*time.Second, "op0 peers with op1 with a keepalive", func() bool {
		for _, p := range dev.Peers() {
			if p.PersistentKeepaliveInterval == Keepalive {
				return true
			}
		}
		return false
	})
	waitUntil(t, 10*time.Second, "the operator endpoint", func() bool { return g.OperatorAddress() != nil })
	lg := &liveGateway{g: g}
	tok := lg.token(t)
	client := &http.Client{Timeout: 10 * time.Second}
	get := func() scrape.Families {
		fam, err := scrape.Get(context.Background(), client, fmt.Sprintf("http://%s/metrics", g.OperatorAddress()), tok)
		if err != nil {
			t.Fatal(err)
		}
		return fam
	}
	get() // the first look at the peer's counters

	// Ten minutes on: kept alive (every 25 s), not one handshake, nothing
	// let out.
	skew.Store(int64(10 * time.Minute))
	fam := get()
	failing, ok := fam.Value("skybridge_peer_tunnel_failing", map[string]string{"peer": "op1"})
	reach, _ := fam.Value("skybridge_site_reachable", map[string]string{"site": "aws-fra"})
	age, _ := fam.Value("skybridge_peer_handshake_age_seconds", map[string]string{"peer": "op1"})
	t.Logf("tunnel kept alive 10 min, never handshaken: failing=%v (exported %v), aws-fra reachable=%v, handshake age=%v", failing, ok, reach, age)
	if !ok || failing != 1 {
		t.Errorf("skybridge_peer_tunnel_failing{peer=op1} = %v (exported %v), want 1: a kept-alive tunnel with no handshake in 10 minutes", failing, ok)
	}
	if reach != 0 {
		t.Errorf("skybridge_site_reachable{site=aws-fra} = %v, want 0: its only tunnel from here has never worked", reach)
	}

	// Contrast: the same tunnel, had it handshaken once 10 minutes ago.
	m := MemberStatus{Peer: true, Keepalive: Keepalive, LastHandshake: g.now().Add(-10 * time.Minute)}
	if h := tunnelHealth(m, g.now()); h != TunnelStale {
		t.Errorf("after one handshake: %s, want stale", h)
	}
}
