package e2e

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// TestRevokeLiveGateway revokes a gateway that keeps running: the
// operator's answer to a stolen key, where the thief's gateway will not
// leave on its own. `skybridge ca revoke` runs on the CA directory only;
// Zurich, which holds the CA, reads the new list at its next refresh and
// gossips it, and every other gateway must then refuse Frankfurt, drop
// its tunnel and its route, and carry no more traffic to it, while
// Frankfurt goes on gossiping.
func TestRevokeLiveGateway(t *testing.T) {
	l := newLab(t)
	defer l.dumpLogs()
	caDir, sites := l.signedSites([]byte(policyV1), [3]string{"pii-eu,risk-batch", "pii-eu,risk-batch", "pii-eu,risk-batch"})
	zrh, fra, iad := sites[0], sites[1], sites[2]
	// Zurich holds the CA and reads it every second, not every minute:
	// the revocation then reaches the mesh as it would in production,
	// through the issuer and gossip, with nothing pushed by hand.
	cfg, _ := os.ReadFile(zrh.cfg)
	withCA := strings.Replace(string(cfg), "identity {\n", fmt.Sprintf("identity {\n  ca_dir  = %q\n  refresh = \"1s\"\n", caDir), 1)
	if err := os.WriteFile(zrh.cfg, []byte(withCA), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, s := range sites {
		l.start(s.ns, "echo-"+s.short, []string{helperEnv + "=echo 0.0.0.0:7000"}, os.Args[0])
		l.startGateway(s, 1)
	}
	dial := func(from, to *meshSite) error {
		out, err := l.nsexec(from.ns, "env", helperEnv+"=dial "+to.overlay+":7000", os.Args[0])
		if err != nil {
			return fmt.Errorf("%v: %s", err, strings.TrimSpace(out))
		}
		return nil
	}
	var fraKey string
	waitFor(t, 60*time.Second, "Frankfurt a WireGuard peer of Zurich and N. Virginia, reachable over the overlay", func() (bool, string) {
		st, err := status(fra.socket)
		if err != nil {
			return false, err.Error()
		}
		fraKey = st.PublicKey
		for _, s := range []*meshSite{zrh, iad} {
			peers, err := l.wgDump(s.ns, s.ifname)
			if err != nil {
				return false, err.Error()
			}
			if _, ok := peers[fraKey]; !ok {
				return false, "not yet a peer of gw-" + s.short
			}
			if err := dial(s, fra); err != nil {
				return false, fmt.Sprintf("gw-%s → gw-2: %v", s.short, err)
			}
		}
		return true, ""
	})

	revoked := time.Now()
	sb(t, 0, "ca", "revoke", "--ca", caDir, "--node", "gw-"+fra.short, "--reason", "keyCompromise")
	for _, s := range []*meshSite{zrh, iad} {
		took := waitFor(t, 30*time.Second, "gw-2 refused and cut off by gw-"+s.short, func() (bool, string) {
			return l.revokedOn(s, "gw-"+fra.short, fraKey, fra.route)
		})
		t.Logf("gw-%s refused the revoked gw-2 and dropped its tunnel and route %.2f s after the revocation (%.2f s of waiting here)",
			s.short, time.Since(revoked).Seconds(), took.Seconds())
	}
	for _, s := range []*meshSite{zrh, iad} {
		if err := dial(s, fra); err == nil {
			t.Errorf("gw-%s still reaches the revoked gw-2 over the overlay", s.short)
		}
	}
	// Nothing above came of Frankfurt leaving: it still answers on its
	// control socket, which a stopped gateway closes.
	if _, err := status(fra.socket); err != nil {
		t.Fatalf("the revoked gateway no longer answers on its control socket (%v): the test must revoke one that stays", err)
	}
	// The tunnel between the two others is untouched.
	if err := dial(zrh, iad); err != nil {
		t.Fatalf("gw-1 → gw-3 after gw-2's revocation: %v", err)
	}
}

// revokedOn reports whether s refuses the live gateway node as revoked
// and keeps no way to it: no WireGuard peer, no route to its network
// (neither through the tunnel nor held: a revoked gateway is retired),
// or what it still keeps.
func (l *lab) revokedOn(s *meshSite, node, key, route string) (bool, string) {
	st, err := status(s.socket)
	if err != nil {
		return false, err.Error()
	}
	member := ""
	for _, m := range st.Members {
		if m.Node == node {
			member = m.State + ": " + m.Reason
			if m.State != "refused" || !strings.Contains(m.Reason, "revoked") {
				return false, "member " + member
			}
			if m.Peer {
				return false, "refused, yet planned as a peer"
			}
		}
	}
	if member == "" {
		// A live gateway is not forgotten: the operator must see it
		// refused, not gone.
		return false, "not listed as a member"
	}
	peers, err := l.wgDump(s.ns, s.ifname)
	if err != nil {
		return false, err.Error()
	}
	if _, ok := peers[key]; ok {
		return false, "still a WireGuard peer in wg show"
	}
	if r := strings.TrimSpace(l.nsip(s.ns, "route", "show", route)); r != "" {
		return false, "route left: " + r
	}
	return true, ""
}
