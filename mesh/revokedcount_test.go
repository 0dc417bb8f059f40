package mesh

import (
	"context"
	"math/big"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// rejectedRevoked reads skybridge_verification_rejections_total{reason="revoked"}.
func rejectedRevoked(t *testing.T, g *Gateway) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.metrics.rejections.WithLabelValues("revoked").Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// setRevokedGrace sets how long a gateway gives a member it revokes to go
// before its refusal counts.
func setRevokedGrace(g *Gateway, d time.Duration) {
	g.members.mu.Lock()
	g.members.revokedGrace = d
	g.members.mu.Unlock()
}

// enrollerAndPeer starts an enrolling gateway and a static one of
// aws-fra peered with it, both logging to one buffer shown if the test
// fails.
func enrollerAndPeer(t *testing.T) (dir string, ca *certs.CA, hq, fra *liveGateway, logs *syncbuf.Buffer) {
	t.Helper()
	dir = t.TempDir()
	logs = &syncbuf.Buffer{}
	ca = meshCA(t, dir)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs:\n%s", logs.String())
		}
	})
	hq = startEnroller(t, ca, dir, logs)
	fra = startLiveGatewayWith(t, ca, dir, 1, "aws-fra", []string{hq.g.s.GossipAdvertise.String()}, logs, nil)
	waitUntil(t, 20*time.Second, "the two static gateways peer", func() bool { return len(hq.dev.Peers()) == 1 && len(fra.dev.Peers()) == 1 })
	return dir, ca, hq, fra, logs
}

// TestBurstDownCountsNoRevokedGateway: burst down revokes the burst's
// gateways, and they leave once they see it; the gateway that ran it, and
// others by a race, adopt the revocation while they are still here. That
// is no intrusion: skybridge_verification_rejections_total{reason="revoked"}
// feeds the critical SkybridgeIdentityRejected alert, which every burst
// down set off.
func TestBurstDownCountsNoRevokedGateway(t *testing.T) {
	dir, _, hq, fra, logs := enrollerAndPeer(t)
	grant, err := hq.g.BurstUp(context.Background(), BurstRequest{BurstSite: amsSite, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	bs := liveSettings(t, filepath.Join(dir, "burst1"))
	if _, err := Join(context.Background(), bs, grant.Tokens[0], nil); err != nil {
		t.Fatal(err)
	}
	burst := runLiveGateway(t, bs, logs)
	waitUntil(t, 20*time.Second, "both static gateways peer with the burst gateway", func() bool { return len(hq.dev.Peers()) == 2 && len(fra.dev.Peers()) == 2 })
	if _, err := hq.g.BurstDown(context.Background(), amsSite.Site, ""); err != nil {
		t.Fatal(err)
	}
	select {
	case <-burst.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the burst gateway did not leave")
	}
	for _, lg := range []*liveGateway{hq, fra} {
		waitUntil(t, 20*time.Second, "the burst gateway forgotten", func() bool {
			for _, m := range lg.g.members.snapshot() {
				if m.Name == "burst-ams-gw1" {
					return false
				}
			}
			return len(lg.dev.Peers()) == 1
		})
		// Past its grace now: a refusal only put off would be counted.
		setRevokedGrace(lg.g, 0)
		lg.g.members.refresh()
	}
	for _, lg := range []*liveGateway{hq, fra} {
		if n := rejectedRevoked(t, lg.g); n != 0 {
			t.Errorf("%s counted %v revoked identities after a burst down, as intrusions", lg.g.s.Node.Name, n)
		}
	}
	if strings.Contains(logs.String(), `"msg":"gateway refused"`) {
		t.Error("a gateway logged the burst's gateway refused (a warning), as an intrusion")
	}
}

// TestRevokedGatewayThatStaysIsCounted: a gateway revoked while it runs
// that does not go (its key stolen, say) is refused at once, and counted
// as the intrusion it is once its grace is over.
func TestRevokedGatewayThatStaysIsCounted(t *testing.T) {
	_, ca, hq, fra, logs := enrollerAndPeer(t)
	if _, err := ca.RevokeSerials([]*big.Int{fra.g.id.Load().Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	if !hq.g.adoptTrust(tb, time.Now()) {
		t.Fatal("the new revocation list was not adopted")
	}
	if hq.g.members.verified("op1") != nil {
		t.Fatal("the revoked gateway is still verified")
	}
	if n := rejectedRevoked(t, hq.g); n != 0 {
		t.Fatalf("the revoked gateway counted %v times at once, before its grace to go", n)
	}
	setRevokedGrace(hq.g, 0)
	waitUntil(t, 20*time.Second, "the revoked gateway, still here, counted", func() bool {
		hq.g.members.refresh() // as the gateway does every 30 s
		return rejectedRevoked(t, hq.g) == 1
	})
	if !slices.ContainsFunc(strings.Split(logs.String(), "\n"), func(l string) bool {
		return strings.Contains(l, `"msg":"gateway refused"`) && strings.Contains(l, `"peer":"op1","reason":"revoked"`)
	}) {
		t.Error("the revoked gateway still here was not logged refused")
	}
	hq.g.members.refresh()
	if n := rejectedRevoked(t, hq.g); n != 1 {
		t.Errorf("the revoked gateway counted %v times, want once", n)
	}
}

// TestRevokedGatewayBackAfterGoingIsCounted: a gateway revoked while here
// that goes within the grace (a lost probe, or leaving once it sees its
// revocation) and knocks again with a newer advert is counted, once: the
// grace put its count off, and the door counts no member already
// refused. An echo of its old advert (gossip from members that have not
// seen it go, as after every burst down) is not counted.
func TestRevokedGatewayBackAfterGoingIsCounted(t *testing.T) {
	r := revokedWhileHere(t)
	f, ms, a, old, clock := r.f, r.ms, r.a, r.advert, &r.clock
	*clock = clock.Add(10 * time.Second)
	ms.leave("gw-a") // gone within the grace
	*clock = clock.Add(20 * time.Second)
	if err := ms.admit("gw-a", gossipAddr, old); certs.ReasonOf(err) != certs.ReasonRevoked {
		t.Fatalf("an echo of the revoked gateway's advert: %v", err)
	}
	if r.refused != 0 {
		t.Fatalf("an echo of the advert it had when revoked counted %d times; want none", r.refused)
	}
	for i := range 3 { // back, again and again
		if err := ms.admit("gw-a", gossipAddr, f.advert(a, uint64(2+i))); certs.ReasonOf(err) != certs.ReasonRevoked {
			t.Fatalf("the revoked gateway at the door: %v", err)
		}
		*clock = clock.Add(time.Minute)
		ms.refresh()
	}
	if r.refused != 1 {
		t.Errorf("a revoked gateway that went within the grace and knocked again three times counted %d times; want once", r.refused)
	}
}

// TestRevokedGatewayEchoOfItsLastAdvertNotCounted: a gateway whose
// revocation was adopted while it was here re-signs its advert (a load
// change) before it sees the revocation, then leaves within the grace;
// members that had not adopted it yet echo that advert after it went. It
// is the gateway's own, not a return: not counted.
func TestRevokedGatewayEchoOfItsLastAdvertNotCounted(t *testing.T) {
	r := revokedWhileHere(t)
	f, ms, a, clock := r.f, r.ms, r.a, &r.clock
	*clock = clock.Add(2 * time.Second)
	resigned := f.advert(a, 2)
	if err := ms.admit("gw-a", gossipAddr, resigned); certs.ReasonOf(err) != certs.ReasonRevoked {
		t.Fatalf("its advert re-signed in the grace, at the door: %v", err)
	}
	*clock = clock.Add(5 * time.Second)
	ms.leave("gw-a")
	*clock = clock.Add(5 * time.Second)
	if err := ms.admit("gw-a", gossipAddr, resigned); certs.ReasonOf(err) != certs.ReasonRevoked {
		t.Fatalf("its echo: %v", err)
	}
	if r.refused != 0 {
		t.Errorf("an echo of the advert it signed before it went counted %d times; want none", r.refused)
	}
}

// graceRevoked is a membership that verified gw-a (its advert, version 1)
// and then adopted a list revoking it while it was here: its count put
// off. The membership's clock is clock; refused counts what it counted.
type graceRevoked struct {
	f       *fixture
	ms      *membership
	a       *certs.NodeIdentity
	advert  []byte
	clock   time.Time
	refused int
}

func revokedWhileHere(t *testing.T) *graceRevoked {
	t.Helper()
	r := &graceRevoked{f: newFixture(t)}
	r.clock = r.f.now
	r.a = r.f.identity("gw-a", "site-a", 1, r.f.now.Add(-time.Hour))
	r.ms = newMembership("self", r.f.trust(), func() time.Time { return r.clock }, func() {})
	r.ms.onRefuse = func(string, string, error) { r.refused++ }
	r.ms.addCert(r.a.Certificate().Raw)
	r.advert = r.f.advert(r.a, 1)
	r.ms.update("gw-a", gossipAddr, r.advert)
	if states(r.ms)["gw-a"] != StateVerified {
		t.Fatalf("gw-a not verified: %v", states(r.ms))
	}
	if _, err := r.f.ca.RevokeSerials([]*big.Int{r.a.Certificate().SerialNumber}, "keyCompromise", r.f.now); err != nil {
		t.Fatal(err)
	}
	r.ms.setTrust(r.f.trust())
	return r
}
