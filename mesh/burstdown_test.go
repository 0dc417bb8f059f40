package mesh

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestBurstDownAgain: burst down of a burst that has ended and been
// cleaned up already (an earlier burst down whose answer was lost, a
// script run again, or its TTL) succeeds, saying it had ended, rather
// than failing as for a site never opened.
func TestBurstDownAgain(t *testing.T) {
	t0 := time.Now().Add(-2 * time.Hour)
	ended := t0.Add(time.Hour)
	vaultBurst := &burstRecord{BurstSite: amsSite, BurstLife: BurstLife{Created: t0, Expires: t0.Add(3 * time.Hour), Ended: &ended, EndReason: "ended by burst down"},
		Tokens: []burstToken{{ID: "0123456789abcdef", Node: "burst-ams-gw1", OverlayIP: "100.127.255.254"}}, Vault: true, VaultCleaned: true}
	fra := amsSite
	fra.Site, fra.Routes = "burst-fra", []string{"10.78.0.0/24"}
	embedded := &burstRecord{BurstSite: fra, BurstLife: BurstLife{Created: t0, Expires: ended, Ended: &ended, EndReason: "expired"}, CertsRevoked: true}
	g := &Gateway{now: time.Now, state: stateDir(t.TempDir()), log: slog.New(slog.DiscardHandler),
		enroll: &enrollment{book: &burstBook{Bursts: []*burstRecord{vaultBurst, embedded}}}}
	for _, r := range []*burstRecord{vaultBurst, embedded} {
		bi, err := g.BurstDown(context.Background(), r.Site, "")
		if err != nil {
			t.Fatalf("burst down of %s, ended and cleaned up already: %v", r.Site, err)
		}
		if !bi.AlreadyEnded || bi.Site != r.Site || bi.EndReason != r.EndReason || len(bi.Revoked) != 0 {
			t.Fatalf("burst down of %s, ended already: %+v", r.Site, bi)
		}
	}
	if _, err := g.BurstDown(context.Background(), "burst-never", ""); err == nil || !strings.Contains(err.Error(), "no open burst site") {
		t.Fatalf("burst down of a site never opened: %v", err)
	}
}
