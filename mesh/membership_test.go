package mesh

import (
	"bytes"
	"crypto"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

type fixture struct {
	t       *testing.T
	ca      *certs.CA
	now     time.Time
	caFiles map[string][]byte // the CA directory as it began
}

func newFixture(t *testing.T) *fixture {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := certs.InitCA(dir, certs.InitOptions{Now: now.Add(-24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if files[e.Name()], err = os.ReadFile(filepath.Join(dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	return &fixture{t: t, ca: ca, now: now, caFiles: files}
}

// blind is the same CA (key, certificate) with an index of its own, as
// f.ca's was when the fixture began: it certifies claims that overlap
// those f.ca issued, as a Vault PKI role that lets gateways choose their
// routes does, so that the membership's handling of such conflicts can
// be tested.
func (f *fixture) blind() *certs.CA {
	dir := f.t.TempDir()
	for name, b := range f.caFiles {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			f.t.Fatal(err)
		}
	}
	ca, err := certs.OpenCA(dir)
	if err != nil {
		f.t.Fatal(err)
	}
	return ca
}

func (f *fixture) trust() *certs.TrustBundle {
	tb, err := f.ca.TrustBundle()
	if err != nil {
		f.t.Fatal(err)
	}
	return tb
}

// identity issues a gateway identity at time at.
func (f *fixture) identity(node, site string, host byte, at time.Time, routes ...string) *certs.NodeIdentity {
	return f.identityBy(f.ca, node, site, host, at, routes...)
}

func (f *fixture) identityBy(ca *certs.CA, node, site string, host byte, at time.Time, routes ...string) *certs.NodeIdentity {
	a := certs.Attributes{Node: node, Site: site, Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, host})}
	for _, r := range routes {
		a.Routes = append(a.Routes, netip.MustParsePrefix(r))
	}
	id, err := ca.IssueIdentity(a, 48*time.Hour, at)
	if err != nil {
		f.t.Fatal(err)
	}
	return id
}

func (f *fixture) advert(id *certs.NodeIdentity, version uint64) []byte {
	wg, _ := certs.GenerateWGKey()
	return f.advertWithKeys(id, version, wg, certs.WGPublicKey{})
}

// advertWithKeys is an advert with the WireGuard keys given (next: zero
// unless rotating), the current one proven.
func (f *fixture) advertWithKeys(id *certs.NodeIdentity, version uint64, key certs.WGPrivateKey, next certs.WGPublicKey) []byte {
	proof, err := certs.ProveWGKey(key, id.Fingerprint())
	if err != nil {
		f.t.Fatal(err)
	}
	return f.advertClaiming(id, version, key.Public(), proof, next)
}

// advertClaiming is an advert claiming the WireGuard key given, with the
// proof given: a gateway's own, or one it copied from another's advert.
func (f *fixture) advertClaiming(id *certs.NodeIdentity, version uint64, key certs.WGPublicKey, proof certs.WGProof, next certs.WGPublicKey) []byte {
	a := id.Attributes()
	raw, err := certs.SignAdvert(&certs.Advert{Version: version, Timestamp: f.now, Node: a.Node, Site: a.Site, Region: a.Region,
		Provider: a.Provider, Jurisdiction: a.Jurisdiction, OverlayIP: a.OverlayIP, Routes: a.Routes,
		WireGuardKey: key, WireGuardKeyProof: proof, NextWireGuardKey: next}, id)
	if err != nil {
		f.t.Fatal(err)
	}
	return raw
}

func states(ms *membership) map[string]MemberState {
	out := map[string]MemberState{}
	for _, m := range ms.snapshot() {
		out[m.Name] = m.State
	}
	return out
}

var gossipAddr = netip.MustParseAddrPort("192.0.2.1:7946")

func TestMembershipVerifiesBeforeAdmitting(t *testing.T) {
	f := newFixture(t)
	changes := 0
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() { changes++ })
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	meta := f.advert(a, 5)

	// Unknown certificate: in as pending, never a peer; the caller must
	// fetch the certificate.
	if err := ms.admit("gw-a", gossipAddr, meta); err != nil {
		t.Fatalf("admit with unknown certificate: %v", err)
	}
	if !ms.update("gw-a", gossipAddr, meta) {
		t.Fatal("update did not ask for the certificate")
	}
	if states(ms)["gw-a"] != StatePending || len(ms.gateways()) != 0 {
		t.Fatalf("state %v, gateways %d", states(ms), len(ms.gateways()))
	}
	if err := ms.addCert(a.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	if states(ms)["gw-a"] != StateVerified || len(ms.gateways()) != 1 || changes == 0 {
		t.Fatalf("after the certificate: %v", states(ms))
	}

	// Refused at the door: garbage, a name that is not the advert's, a
	// replay of an older advert.
	for name, tc := range map[string]struct {
		node string
		meta []byte
	}{
		"garbage":       {"gw-a", []byte("nonsense")},
		"name mismatch": {"gw-b", meta},
		"replay":        {"gw-a", f.advert(a, 4)},
	} {
		if err := ms.admit(tc.node, gossipAddr, tc.meta); err == nil {
			t.Errorf("%s admitted", name)
		}
	}

	// Gossip declares it dead: no longer a peer.
	ms.leave("gw-a")
	if states(ms)["gw-a"] != StateDead || len(ms.gateways()) != 0 {
		t.Fatalf("after leave: %v", states(ms))
	}
}

// rogueCase is a membership trusting the mesh CA of f, counting its
// refusals, and gw-r, an identity from another CA.
func rogueCase(t *testing.T) (f, rogueCA *fixture, ms *membership, r *certs.NodeIdentity, refusals *int) {
	f, rogueCA = newFixture(t), newFixture(t)
	ms = newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	refusals = new(int)
	ms.onRefuse = func(string, string, error) { *refusals++ }
	return f, rogueCA, ms, rogueCA.identity("gw-r", "site-a", 9, f.now.Add(-time.Hour)), refusals
}

// TestMembershipRefusesForeignIdentity: the rogue of the e2e test, in
// miniature — a certificate from another CA is refused, and from then on
// its alive messages too.
func TestMembershipRefusesForeignIdentity(t *testing.T) {
	f, rogueCA, ms, r, refusals := rogueCase(t)
	meta := rogueCA.advert(r, 1)
	ms.update("gw-r", gossipAddr, meta)
	if err := ms.addCert(r.Certificate().Raw); err == nil {
		t.Fatal("foreign certificate accepted")
	}
	if states(ms)["gw-r"] != StateRefused || len(ms.gateways()) != 0 {
		t.Fatalf("rogue state %v", states(ms))
	}
	if err := ms.admit("gw-r", gossipAddr, meta); err == nil {
		t.Fatal("rogue's alive message admitted after its certificate was refused")
	}
	// Gone, it stays refused with its reason: not a dead member to knock
	// on or save (nor after the periodic re-judging, which does not count
	// or log the same refusal again).
	counted := *refusals
	ms.leave("gw-r")
	for range 3 {
		ms.refresh()
	}
	found := false
	for _, v := range ms.snapshot() {
		if v.Name == "gw-r" {
			found = true
			if v.State != StateRefused || !strings.Contains(v.Reason, "certificate") {
				t.Fatalf("rogue after leaving: %s (%s)", v.State, v.Reason)
			}
		}
	}
	if !found || *refusals != counted {
		t.Fatalf("rogue after leaving and 3 re-judgements: listed %v, refusals counted %d → %d", found, counted, *refusals)
	}
	// An hour after its refusal it is forgotten.
	f.now = f.now.Add(refusedKept)
	ms.refresh()
	if _, ok := states(ms)["gw-r"]; ok {
		t.Fatalf("gone refused member still listed after %s: %v", refusedKept, states(ms))
	}
	checkCounts(t, ms)
}

// TestMembershipListsRefusedStranger: the other order of the rogue's
// race — its certificate is refused before its first alive message, which
// memberlist then never takes in. Status lists it as refused all the
// same, counted once, never a peer; and strangers are listed up to a
// bound, so trying names cannot fill memory.
func TestMembershipListsRefusedStranger(t *testing.T) {
	f, rogueCA, ms, r, refusals := rogueCase(t)
	if err := ms.addCert(r.Certificate().Raw); err == nil {
		t.Fatal("foreign certificate accepted")
	}
	meta := rogueCA.advert(r, 1)
	for range 3 {
		if err := ms.admit("gw-r", gossipAddr, meta); err == nil {
			t.Fatal("rogue admitted")
		}
	}
	ms.refresh()
	var got []MemberView
	for _, v := range ms.snapshot() {
		if v.Name == "gw-r" {
			got = append(got, v)
		}
	}
	if len(got) != 1 || got[0].State != StateRefused || !strings.Contains(got[0].Reason, "not signed by the mesh CA") || got[0].Gossip != gossipAddr {
		t.Fatalf("rogue refused before it was ever alive: listed %+v", got)
	}
	if *refusals != 1 || len(ms.gateways()) != 0 {
		t.Fatalf("refusals counted %d (want 1), gateways %d", *refusals, len(ms.gateways()))
	}
	// Expiry is checked before the chain: an impostor's expired
	// certificate is no former member's.
	old := rogueCA.identity("gw-old-rogue", "site-a", 11, f.now.Add(-50*time.Hour))
	ms.addCert(old.Certificate().Raw)
	if err := ms.admit("gw-old-rogue", gossipAddr, rogueCA.advert(old, 1)); certs.ReasonOf(err) != certs.ReasonExpired || states(ms)["gw-old-rogue"] != StateRefused {
		t.Fatalf("an impostor with an expired certificate: %v, listed %v", err, states(ms))
	}
	ms.mu.Lock()
	ms.dropLocked("gw-old-rogue")
	ms.mu.Unlock()
	for i := range maxStrangers + 10 {
		ms.admit(fmt.Sprintf("junk-%d", i), gossipAddr, []byte("not an advert"))
	}
	if n := len(states(ms)); n != maxStrangers || len(ms.refusedMsg) > n {
		t.Fatalf("%d members listed after %d strangers tried, want the bound %d; %d refusals remembered", n, maxStrangers+11, maxStrangers, len(ms.refusedMsg))
	}
	// One in gossip after all is no stranger any more: it leaves room.
	ms.update("junk-0", gossipAddr, []byte("not an advert"))
	ms.admit("one-more", gossipAddr, []byte("not an advert"))
	if _, listed := states(ms)["one-more"]; !listed || ms.strangers != maxStrangers {
		t.Fatalf("after one stranger came alive: one more listed %v, strangers counted %d", listed, ms.strangers)
	}
	ms.leave("junk-0")
	f.now = f.now.Add(refusedKept)
	ms.refresh()
	if n := len(states(ms)); n != 0 || len(ms.refusedMsg) != 0 || ms.strangers != 0 {
		t.Fatalf("strangers still listed %s later: %d (refusals remembered: %d, counted %d)", refusedKept, n, len(ms.refusedMsg), ms.strangers)
	}
	checkCounts(t, ms)
}

// TestMembershipGossipsFrom: the transport lets a member's address hold
// more incoming streams than a stranger's; only an alive member counts,
// and an IPv6 one by its /64, as sourceOf counts the streams.
func TestMembershipGossipsFrom(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	v4, v6 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8:1:2::7")
	if ms.gossipsFrom(v4) {
		t.Fatal("no member yet, but an address counted as a member's")
	}
	ms.update("gw-a", gossipAddr, []byte("not an advert"))
	ms.update("gw-b", netip.AddrPortFrom(v6, 7946), []byte("not an advert"))
	if !ms.gossipsFrom(v4) || !ms.gossipsFrom(sourceOf(netip.MustParseAddr("2001:db8:1:2::99"))) {
		t.Fatal("members' addresses not counted as theirs")
	}
	if ms.gossipsFrom(netip.MustParseAddr("192.0.2.2")) || ms.gossipsFrom(sourceOf(netip.MustParseAddr("2001:db8:1:3::7"))) {
		t.Fatal("another address counted as a member's")
	}
	ms.leave("gw-a")
	if ms.gossipsFrom(v4) {
		t.Fatal("a member gone still counts")
	}
}

// TestMembershipPrunesCertificates: certificates are kept while a member's
// advert names them; expired ones no advert names, and refused ones, are
// dropped, and refused ones are bounded between prunes — a burst's
// gateways and a flood of junk do not grow the gateway for ever.
func TestMembershipPrunesCertificates(t *testing.T) {
	f := newFixture(t)
	rogueCA := newFixture(t)
	clock := f.now
	ms := newMembership("self", f.trust(), func() time.Time { return clock }, func() {})
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour)) // expires in 47 h
	ms.addCert(a.Certificate().Raw)
	ms.update("gw-a", gossipAddr, f.advert(a, 1))
	r := rogueCA.identity("gw-r", "site-r", 9, f.now.Add(-time.Hour))
	ms.addCert(r.Certificate().Raw)
	rMeta := rogueCA.advert(r, 1)
	ms.update("gw-r", gossipAddr, rMeta)
	rSum := sha256.Sum256(r.Certificate().Raw)
	ms.maxBadCerts = 4
	for i := range 10 {
		ms.addCert(fmt.Appendf(nil, "junk %d", i))
	}
	if _, kept := ms.badCert[rSum]; !kept || len(ms.badCert) > ms.maxBadCerts {
		t.Fatalf("after a flood of junk: %d refused certificates remembered (bound %d), the rogue's kept: %v", len(ms.badCert), ms.maxBadCerts, kept)
	}
	// Junk fills the bound, but a member's refused certificate is still
	// remembered (the junk is dropped for it): otherwise the member would
	// be waiting for its certificate, and fetch it, for ever.
	p := rogueCA.identity("gw-p", "site-p", 10, f.now.Add(-time.Hour))
	ms.update("gw-p", gossipAddr, rogueCA.advert(p, 1))
	ms.addCert(p.Certificate().Raw)
	if got := states(ms)["gw-p"]; got != StateRefused {
		t.Fatalf("a refused certificate arriving with the bound full of junk: member %s, want refused", got)
	}
	ms.leave("gw-p")
	// Members naming refused certificates fill the bound: a newcomer is
	// refused all the same, but not remembered.
	for i := range ms.maxBadCerts - 2 { // with gw-r's and gw-p's
		o := rogueCA.identity(fmt.Sprintf("gw-o%d", i), "site-o", byte(20+i), f.now.Add(-time.Hour))
		ms.update(o.Attributes().Node, gossipAddr, rogueCA.advert(o, 1))
		ms.addCert(o.Certificate().Raw)
	}
	if err := ms.addCert([]byte("one more")); err == nil || len(ms.badCert) > ms.maxBadCerts {
		t.Fatalf("bound full of named certificates: err %v, %d remembered (bound %d)", err, len(ms.badCert), ms.maxBadCerts)
	}
	// That forced prune freed nothing: the next junk is refused without
	// another (each would rescan every member under the lock, a cost for
	// anyone with the gossip key to multiply), though a member naming
	// another certificate has made room since; the next regular prune
	// frees it.
	o2 := rogueCA.identity("gw-o0", "site-o", 40, f.now.Add(-time.Hour))
	ms.update("gw-o0", gossipAddr, rogueCA.advert(o2, 2))
	err := ms.addCert([]byte("two more"))
	if _, kept := ms.badCert[sha256.Sum256([]byte("two more"))]; err == nil || kept {
		t.Fatalf("junk with the bound full after a fruitless forced prune: err %v, remembered %v (a forced prune ran again)", err, kept)
	}
	for i := range ms.maxBadCerts - 2 {
		ms.leave(fmt.Sprintf("gw-o%d", i))
	}
	clock = clock.Add(refusedKept)
	ms.refresh()
	if len(ms.badCert) != 1 || len(ms.certs) != 1 || ms.badCertFull {
		t.Fatalf("after refresh: %d refused and %d known certificates, want the rogue's and gw-a's (bound still taken for full: %v)", len(ms.badCert), len(ms.certs), ms.badCertFull)
	}
	if err := ms.admit("gw-r", gossipAddr, rMeta); err == nil {
		t.Fatal("rogue admitted after pruning")
	}

	// gw-a's certificate expires while it is alive: kept while named.
	clock = clock.Add(48 * time.Hour)
	ms.refresh()
	if states(ms)["gw-a"] != StateRefused || len(ms.certs) != 1 {
		t.Fatalf("expired while alive: %v, %d known certificates", states(ms), len(ms.certs))
	}
	ms.leave("gw-a")
	ms.leave("gw-r")
	// Its site misses it a while yet (TestMembershipExpiredWhileHere),
	// its certificate with it; then nothing is left.
	clock = clock.Add(refusedKept)
	ms.refresh()
	if st := states(ms); len(st) != 1 || st["gw-a"] != StateRefused || len(ms.certs) != 1 {
		t.Fatalf("gone: listed %v, %d known certificates; want gw-a still, named", st, len(ms.certs))
	}
	clock = clock.Add(expiredKept)
	ms.refresh()
	if len(states(ms)) != 0 || len(ms.certs) != 0 || len(ms.badCert) != 0 {
		t.Fatalf("all gone: listed %v, %d known and %d refused certificates remembered", states(ms), len(ms.certs), len(ms.badCert))
	}
}

// TestMembershipRetriesNotYetValid: a certificate refused because it is not
// valid yet (clocks differ) is judged again once it is, both for a member
// in gossip and for one refused at the door — whether the certificate
// comes again before the periodic refresh or after it (which makes the
// member in gossip pending, so its certificate is fetched, and forgets
// the one refused at the door, so its next alive message gets in).
func TestMembershipRetriesNotYetValid(t *testing.T) {
	for _, fetchFirst := range []bool{false, true} {
		f := newFixture(t)
		clock := f.now
		changes := 0
		ms := newMembership("self", f.trust(), func() time.Time { return clock }, func() { changes++ })
		// Issued 10 minutes ahead: valid from 9 minutes ahead (the CA's
		// backdate), taken as valid from 4 (the skew allowed).
		early := f.identity("gw-early", "site-e", 1, f.now.Add(10*time.Minute))
		door := f.identity("gw-door", "site-d", 2, f.now.Add(10*time.Minute))
		earlyMeta, doorMeta := f.advert(early, 1), f.advert(door, 1)
		ms.update("gw-early", gossipAddr, earlyMeta)
		ms.addCert(early.Certificate().Raw)
		ms.addCert(door.Certificate().Raw)
		if err := ms.admit("gw-door", gossipAddr, doorMeta); certs.ReasonOf(err) != certs.ReasonNotYetValid {
			t.Fatalf("a certificate valid in 9 minutes at the door: %v", err)
		}
		want := map[string]MemberState{"gw-early": StateRefused, "gw-door": StateRefused}
		ms.refresh()
		if got := states(ms); !maps.Equal(got, want) {
			t.Fatalf("before their certificates are valid: %v, want %v", got, want)
		}
		clock = clock.Add(6 * time.Minute)
		if !fetchFirst {
			ms.refresh()
			if got := states(ms); !maps.Equal(got, map[string]MemberState{"gw-early": StatePending}) || ms.strangers != 0 {
				t.Fatalf("refreshed once valid: %v (strangers %d), want gw-early pending and gw-door forgotten", got, ms.strangers)
			}
		}
		if err := ms.admit("gw-door", gossipAddr, doorMeta); err != nil {
			t.Fatalf("fetch first %v: gw-door's next alive message: %v", fetchFirst, err)
		}
		ms.update("gw-door", gossipAddr, doorMeta)
		before := changes
		for _, id := range []*certs.NodeIdentity{early, door} {
			ms.addCert(id.Certificate().Raw) // fetched again
		}
		if len(ms.badCert) != 0 {
			t.Fatalf("fetch first %v: refusals kept for certificates now known: %d", fetchFirst, len(ms.badCert))
		}
		ms.refresh()
		if got := states(ms); !maps.Equal(got, map[string]MemberState{"gw-early": StateVerified, "gw-door": StateVerified}) || len(ms.gateways()) != 2 || changes == before {
			t.Fatalf("fetch first %v: after fetching their certificates again: %v, %d gateways, %d changes", fetchFirst, got, len(ms.gateways()), changes-before)
		}
	}
}

// TestMembershipConflicts: the older certificate keeps a contested claim,
// whatever order the adverts arrive in; gateways of one site may share
// routes.
func TestMembershipConflicts(t *testing.T) {
	f := newFixture(t)
	old := f.identity("gw-old", "site-a", 1, f.now.Add(-3*time.Hour), "10.7.0.0/16")
	young := f.identityBy(f.blind(), "gw-young", "site-b", 2, f.now.Add(-time.Hour), "10.7.1.0/24")
	sibling := f.identity("gw-sibling", "site-a", 3, f.now.Add(-time.Hour), "10.7.0.0/16")
	for _, order := range [][]*certs.NodeIdentity{{old, young, sibling}, {young, sibling, old}, {sibling, young, old}} {
		ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
		for _, id := range order {
			ms.addCert(id.Certificate().Raw)
			ms.update(id.Attributes().Node, gossipAddr, f.advert(id, 1))
		}
		got := states(ms)
		want := map[string]MemberState{"gw-old": StateVerified, "gw-sibling": StateVerified, "gw-young": StateRefused}
		for n, s := range want {
			if got[n] != s {
				t.Errorf("order %s,%s,%s: %s is %s, want %s", order[0].Attributes().Node, order[1].Attributes().Node, order[2].Attributes().Node, n, got[n], s)
			}
		}
		// Once the incumbent is gone, the newcomer's claim stands.
		ms.leave("gw-old")
		ms.leave("gw-sibling")
		ms.refresh()
		if states(ms)["gw-young"] != StateVerified {
			t.Errorf("gw-young still refused after the incumbents left: %v", states(ms))
		}
	}
}

// TestMembershipWireGuardKeyConflicts: a WireGuard key is a claim like an
// overlay address, which only its holder can make. A gateway advertising
// another's key with a copy of the holder's proof (which names the
// holder's certificate) is refused; one advertising it with no proof at
// all, as an earlier release does, loses the key to the holder, however
// old its certificate: a renewal, which makes the holder's certificate
// the younger, must not hand the key to whoever is older. Two gateways
// that both prove one key (a cloned disk), or both prove none, are a
// conflict that the older certificate wins whatever the order. A next
// key is never contested (the topology leaves out one that is taken).
func TestMembershipWireGuardKeyConflicts(t *testing.T) {
	f := newFixture(t)
	key := func() certs.WGPrivateKey { k, _ := certs.GenerateWGKey(); return k }
	held, cloned, legacyKey := key(), key(), key()
	owner := f.identity("gw-owner", "site-a", 1, f.now.Add(-time.Hour)) // renewed an hour ago
	ownerAd := f.advertWithKeys(owner, 1, held, certs.WGPublicKey{})
	sa, err := certs.DecodeAdvert(ownerAd)
	if err != nil {
		t.Fatal(err)
	}
	old := f.now.Add(-3 * time.Hour)
	thief := f.identity("gw-thief", "site-b", 2, old)
	unproven := f.identity("gw-unproven", "site-b", 3, old)
	clone := f.identity("gw-clone", "site-b", 4, old)
	original := f.identity("gw-original", "site-c", 5, f.now.Add(-time.Hour))
	rotating := f.identity("gw-rotating", "site-c", 6, old)
	honest := f.identity("gw-honest", "site-d", 7, old)
	legacyOld := f.identity("gw-legacy-old", "site-e", 8, old)
	legacyNew := f.identity("gw-legacy-new", "site-e", 9, f.now.Add(-time.Hour))
	metas := map[*certs.NodeIdentity][]byte{
		owner:     ownerAd,
		thief:     f.advertClaiming(thief, 1, held.Public(), sa.WireGuardKeyProof, certs.WGPublicKey{}),
		unproven:  f.advertClaiming(unproven, 1, held.Public(), certs.WGProof{}, certs.WGPublicKey{}),
		clone:     f.advertWithKeys(clone, 1, cloned, certs.WGPublicKey{}),
		original:  f.advertWithKeys(original, 1, cloned, certs.WGPublicKey{}),
		rotating:  f.advertWithKeys(rotating, 1, key(), held.Public()),
		honest:    f.advertWithKeys(honest, 1, key(), certs.WGPublicKey{}),
		legacyOld: f.advertClaiming(legacyOld, 1, legacyKey.Public(), certs.WGProof{}, certs.WGPublicKey{}),
		legacyNew: f.advertClaiming(legacyNew, 1, legacyKey.Public(), certs.WGProof{}, certs.WGPublicKey{}),
	}
	ids := []*certs.NodeIdentity{owner, thief, unproven, clone, original, rotating, honest, legacyOld, legacyNew}
	backward := slices.Clone(ids)
	slices.Reverse(backward)
	for _, order := range [][]*certs.NodeIdentity{ids, backward} {
		ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
		for _, id := range order {
			ms.addCert(id.Certificate().Raw)
			ms.update(id.Attributes().Node, gossipAddr, metas[id])
		}
		// A verified gateway that takes the key up later.
		ms.update("gw-honest", gossipAddr, f.advertClaiming(honest, 2, held.Public(), sa.WireGuardKeyProof, certs.WGPublicKey{}))
		want := map[string]struct {
			state MemberState
			why   string
		}{
			"gw-owner":      {StateVerified, ""},
			"gw-thief":      {StateRefused, "without holding it"},
			"gw-unproven":   {StateRefused, "WireGuard key"},
			"gw-clone":      {StateVerified, ""},
			"gw-original":   {StateRefused, "WireGuard key"},
			"gw-rotating":   {StateVerified, ""},
			"gw-honest":     {StateRefused, "without holding it"},
			"gw-legacy-old": {StateVerified, ""},
			"gw-legacy-new": {StateRefused, "WireGuard key"},
		}
		for _, v := range ms.snapshot() {
			w := want[v.Name]
			if v.State != w.state || !strings.Contains(v.Reason, w.why) {
				t.Errorf("order starting %s: %s is %s (%s), want %s (%q)", order[0].Attributes().Node, v.Name, v.State, v.Reason, w.state, w.why)
			}
		}
		if got := ms.verified("gw-owner"); got == nil || got.Advert.WireGuardKey != held.Public() {
			t.Errorf("order starting %s: gw-owner lost its key", order[0].Attributes().Node)
		}
	}
}

func TestMembershipRevocation(t *testing.T) {
	f := newFixture(t)
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	b := f.identity("gw-b", "site-b", 2, f.now.Add(-time.Hour))
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	for _, id := range []*certs.NodeIdentity{a, b} {
		ms.addCert(id.Certificate().Raw)
		ms.update(id.Attributes().Node, gossipAddr, f.advert(id, 1))
	}
	if _, err := f.ca.RevokeSerials([]*big.Int{a.Certificate().SerialNumber}, "keyCompromise", f.now); err != nil {
		t.Fatal(err)
	}
	held := ms.cache.Len()
	ms.setTrust(f.trust())
	if got := states(ms); got["gw-a"] != StateRefused || got["gw-b"] != StateVerified {
		t.Fatalf("after revocation: %v", got)
	}
	// The verdicts under the old list go: none is looked up again, and in
	// a large mesh each list adopted left a copy of every member's.
	if n := ms.cache.Len(); n >= held {
		t.Errorf("%d verdicts cached after the new list, %d before; want the old list's gone", n, held)
	}
	var names []string
	for _, g := range ms.gateways() {
		names = append(names, g.Attributes.Node)
		if g.Gossip != gossipAddr {
			t.Errorf("%s gossips at %s; want %s, which the topology keeps out of the tunnels", g.Attributes.Node, g.Gossip, gossipAddr)
		}
	}
	if !slices.Equal(names, []string{"gw-b"}) {
		t.Fatalf("peers after revocation: %v", names)
	}
	// The revoked certificate is no longer one the gateway knows: offered
	// again (a join's exchange, a fetch) it is refused, not taken as known.
	if err := ms.addCert(a.Certificate().Raw); !errors.Is(err, certs.ErrRevoked) {
		t.Fatalf("the revoked certificate offered again: %v; want it refused as revoked", err)
	}
}

func TestMembershipRemember(t *testing.T) {
	f := newFixture(t)
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	if err := ms.remember("gw-a", gossipAddr, f.advert(a, 3), a.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	if len(ms.gateways()) != 1 || !ms.snapshot()[0].Remembered {
		t.Fatal("remembered member is not a peer")
	}
	// A remembered member whose certificate has expired stays out.
	expired := f.identity("gw-x", "site-x", 5, f.now.Add(-72*time.Hour))
	if err := ms.remember("gw-x", gossipAddr, f.advert(expired, 3), expired.Certificate().Raw); err == nil {
		t.Fatal("expired member remembered")
	}
	d := f.identity("gw-d", "site-d", 6, f.now.Add(-time.Hour))
	ms.rememberDead("gw-d", gossipAddr, d.Certificate().Raw, false)
	ms.rememberDead("gw-n", gossipAddr, nil, false) // saved by an older version, without its certificate
	if st := states(ms); st["gw-d"] != StateDead || st["gw-n"] != StateDead || len(ms.gateways()) != 1 {
		t.Fatalf("dead members: %v", st)
	}
	// Its certificate is what lets the membership forget it once it has
	// ended; one that had ended by the restart is not restored at all.
	for _, v := range ms.snapshot() {
		if v.Name == "gw-d" && (v.CertSite != "site-d" || !bytes.Equal(v.LastCert, d.Certificate().Raw)) {
			t.Fatalf("restored dead member keeps site %q and %d certificate bytes", v.CertSite, len(v.LastCert))
		}
	}
	ms.rememberDead("gw-e", gossipAddr, expired.Certificate().Raw, false)
	if _, ok := states(ms)["gw-e"]; !ok {
		t.Fatal("a dead member whose certificate expired a day ago was not restored: its site would be forgotten")
	}
	long := f.identity("gw-long", "site-long", 7, f.now.Add(-48*time.Hour-expiredKept))
	ms.rememberDead("gw-long", gossipAddr, long.Certificate().Raw, false)
	if _, ok := states(ms)["gw-long"]; ok {
		t.Fatalf("a dead member whose certificate expired over %s ago was restored", expiredKept)
	}
	// A remembered member gossip never reports again (a burst gateway
	// terminated while this one restarted) is forgotten once its
	// certificate ends, like a dead one — not kept, and knocked on, for
	// the gateway's lifetime.
	f.now = f.now.Add(48*time.Hour + expiredKept)
	ms.refresh()
	if st := states(ms); len(st) != 0 {
		t.Fatalf("%s after every certificate ended: %v, want none (gw-n, saved without one, goes after %s)", expiredKept, st, refusedKept)
	}
	checkCounts(t, ms)
}

// TestMembershipGeneration: the reconciler reuses its last plan while the
// generation stands still, so every change must move it, and the periodic
// re-judging must not move it (nor reset when members last changed) when
// nothing changed — but must when a certificate expires.
func TestMembershipGeneration(t *testing.T) {
	f := newFixture(t)
	clock := f.now
	ms := newMembership("self", f.trust(), func() time.Time { return clock }, func() {})
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	g0 := ms.generation()
	ms.update("gw-a", gossipAddr, f.advert(a, 1))
	g1 := ms.generation()
	// Announced, still waiting for its certificate, and re-advertising:
	// nothing a plan is made of has changed, so no gateway should
	// recompute.
	if g1 != g0 {
		t.Fatalf("a pending newcomer moved the generation %d→%d", g0, g1)
	}
	ms.update("gw-a", gossipAddr, f.advert(a, 2))
	if g := ms.generation(); g != g1 {
		t.Fatalf("a pending member's new advert moved the generation %d→%d", g1, g)
	}
	if err := ms.addCert(a.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	g2 := ms.generation()
	if g2 == g1 || states(ms)["gw-a"] != StateVerified {
		t.Fatalf("verification: generation %d→%d, state %s", g1, g2, states(ms)["gw-a"])
	}
	if gw := ms.gateways(); len(gw) != 1 || gw[0].Advert.Version != 2 {
		t.Fatalf("gateways after verification: %+v", gw)
	}
	meta3 := f.advert(a, 3)
	ms.update("gw-a", gossipAddr, meta3)
	g2b := ms.generation()
	if g2b == g2 || ms.gateways()[0].Advert.Version != 3 {
		t.Fatalf("a verified member's new advert: generation %d→%d, gateways hold version %d", g2, g2b, ms.gateways()[0].Advert.Version)
	}
	ms.update("gw-a", gossipAddr, meta3) // the same advert, gossiped again
	if g := ms.generation(); g != g2b {
		t.Fatalf("the same advert again moved the generation %d→%d", g2b, g)
	}
	g2 = g2b
	changedAt := ms.snapshot()[0].Since
	clock = clock.Add(time.Minute)
	ms.refresh()
	if g := ms.generation(); g != g2 {
		t.Fatalf("re-judging an unchanged membership moved the generation %d→%d", g2, g)
	}
	if got := ms.snapshot()[0].Since; !got.Equal(changedAt) {
		t.Fatalf("re-judging reset the change time: %s → %s", changedAt, got)
	}
	clock = f.now.Add(72 * time.Hour) // past the certificate's 48 h
	ms.refresh()
	g3 := ms.generation()
	if g3 == g2 || states(ms)["gw-a"] == StateVerified {
		t.Fatalf("expiry: generation %d→%d, state %s", g2, g3, states(ms)["gw-a"])
	}
	ms.leave("gw-a")
	if g := ms.generation(); g == g3 {
		t.Fatal("a departure did not move the generation")
	}
}

// TestLeaveNotice: a gateway that leaves on purpose is told from one that
// crashed only by its signed notice, whichever arrives first, the notice
// or gossip's report; a notice signed by anyone else, stale, dated ahead
// (taken, one dated far ahead could be replayed against that run of the
// gateway until its date), or from an earlier run of the gateway counts
// for nothing.
func TestLeaveNotice(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	g := &Gateway{members: ms, now: func() time.Time { return f.now }}
	ids := map[string]*certs.NodeIdentity{}
	for i, name := range []string{"early", "late", "crashed", "forged", "replayed", "restarted"} {
		id := f.identity(name, "site-"+name, byte(i+1), f.now.Add(-time.Hour))
		ids[name] = id
		meta := f.advert(id, 10)
		ms.update(name, gossipAddr, meta)
		if err := ms.addCert(id.Certificate().Raw); err != nil {
			t.Fatal(err)
		}
	}
	notice := func(name string, signer *certs.NodeIdentity, at time.Time, version uint64) message {
		sig, err := signer.Signer().Sign(rand.Reader, leavingDigest(name, at.Unix(), version), crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		return message{typ: msgLeaving, fields: [][]byte{[]byte(name), binary.BigEndian.AppendUint64(nil, uint64(at.Unix())),
			binary.BigEndian.AppendUint64(nil, version), sig}}
	}
	if err := g.handleLeaving(notice("early", ids["early"], f.now, 10)); err != nil {
		t.Fatal(err)
	}
	// Members are judged again (a new revocation list, the periodic
	// refresh) between the notice and the departure: the notice stands.
	ms.setTrust(f.trust())
	ms.refresh()
	ms.leave("early")
	ms.leave("late")
	if err := g.handleLeaving(notice("late", ids["late"], f.now, 10)); err != nil {
		t.Fatal(err)
	}
	if err := g.handleLeaving(notice("forged", ids["crashed"], f.now, 10)); err == nil {
		t.Error("a notice signed by another gateway was accepted")
	}
	if err := g.handleLeaving(notice("forged", ids["forged"], f.now.Add(-10*time.Minute), 10)); err == nil {
		t.Error("a stale notice was accepted")
	}
	if err := g.handleLeaving(notice("forged", ids["forged"], f.now.Add(10*time.Minute), 10)); err == nil || !strings.Contains(err.Error(), "dated") {
		t.Errorf("a notice dated 10 minutes ahead: %v; want it refused", err)
	}
	// A genuine notice, replayed against the gateway's next run (a newer
	// advert), which then crashes: a crash, not a departure.
	old := notice("replayed", ids["replayed"], f.now, 10)
	if err := g.handleLeaving(old); err != nil {
		t.Fatal(err)
	}
	ms.leave("replayed")
	ms.update("replayed", gossipAddr, f.advert(ids["replayed"], 11))
	if err := g.handleLeaving(old); err == nil || !strings.Contains(err.Error(), "earlier run") {
		t.Errorf("a notice from an earlier run: %v, want refused as a replay", err)
	}
	// Without the version, the notice of the earlier release cannot be
	// told from a replay.
	v1 := old
	v1.fields = [][]byte{old.fields[0], old.fields[1], old.fields[3]}
	if err := g.handleLeaving(v1); err == nil || !strings.Contains(err.Error(), "earlier release") {
		t.Errorf("a notice without an advert version: %v, want refused as an earlier release's", err)
	}
	// Restarted before gossip noticed it go: its newer advert ends the
	// notice, so a crash soon after is one.
	if err := g.handleLeaving(notice("restarted", ids["restarted"], f.now, 10)); err != nil {
		t.Fatal(err)
	}
	ms.update("restarted", gossipAddr, f.advert(ids["restarted"], 12))
	for _, name := range []string{"crashed", "forged", "replayed", "restarted"} {
		ms.leave(name)
	}
	want := map[string]bool{"early": true, "late": true, "crashed": false, "forged": false, "replayed": false, "restarted": false}
	for _, v := range ms.snapshot() {
		if v.State != StateDead || v.Left != want[v.Name] {
			t.Errorf("%s: %s, left %v; want dead, left %v", v.Name, v.State, v.Left, want[v.Name])
		}
	}
	checkCounts(t, ms)
}

// TestMembershipForgetsEnded: a member that is gone is forgotten once its
// last certificate has been revoked, or expired expiredKept ago (a burst
// gateway's: expired), and not before; one that is still alive is kept
// (and refused) whatever its certificate.
func TestMembershipForgetsEnded(t *testing.T) {
	f := newFixture(t)
	clock := f.now
	expiring := f.identity("gw-expiring", "site-a", 1, f.now.Add(-47*time.Hour)) // 48 h certificates: one hour left
	revoked := f.identity("gw-revoked", "site-b", 2, f.now.Add(-time.Hour))
	lasting := f.identity("gw-lasting", "site-c", 3, f.now.Add(-time.Hour))
	alive := f.identity("gw-alive", "site-d", 4, f.now.Add(-time.Hour))
	// A burst gateway's certificate lasts exactly its burst: forgotten
	// when it ends.
	burst, err := f.ca.IssueIdentity(certs.Attributes{Node: "gw-burst", Site: "site-e", Region: "r", Provider: "aws", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr("100.96.0.5"), Labels: map[string]string{certs.BurstLabel: "true"}}, 48*time.Hour, f.now.Add(-47*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	ms := newMembership("self", f.trust(), func() time.Time { return clock }, func() {})
	adverts := map[string][]byte{}
	for _, id := range []*certs.NodeIdentity{expiring, revoked, lasting, alive, burst} {
		ms.addCert(id.Certificate().Raw)
		adverts[id.Attributes().Node] = f.advert(id, 1)
		ms.update(id.Attributes().Node, gossipAddr, adverts[id.Attributes().Node])
	}
	for _, n := range []string{"gw-expiring", "gw-revoked", "gw-lasting", "gw-burst"} {
		ms.leave(n)
	}
	known := func() []string {
		var out []string
		for _, m := range ms.snapshot() {
			out = append(out, m.Name)
		}
		return out
	}
	if got := known(); len(got) != 5 {
		t.Fatalf("members forgotten while their certificates are valid: %v", got)
	}
	if _, err := f.ca.RevokeSerials([]*big.Int{revoked.Certificate().SerialNumber, alive.Certificate().SerialNumber}, "cessationOfOperation", f.now); err != nil {
		t.Fatal(err)
	}
	ms.setTrust(f.trust())
	if got := known(); !slices.Equal(got, []string{"gw-alive", "gw-burst", "gw-expiring", "gw-lasting"}) {
		t.Fatalf("after revoking gw-revoked (gone) and gw-alive (still there): %v", got)
	}
	if states(ms)["gw-alive"] != StateRefused {
		t.Fatal("a revoked member still alive must stay known, and refused")
	}
	// Members that have not seen it go still gossip it as alive: refused
	// at the door (after the periodic pruning too), again and again, and
	// neither listed again as a refused stranger nor reported again (a
	// log line and a metric per echo).
	ms.refresh()
	reported := 0
	ms.onRefuse = func(name, _ string, _ error) {
		if name != "gw-alive" { // revoked and still here: counted once its grace is over
			reported++
		}
	}
	for range 3 {
		if err := ms.admit("gw-revoked", gossipAddr, adverts["gw-revoked"]); certs.ReasonOf(err) != certs.ReasonRevoked {
			t.Fatalf("a revoked member's advert at the door: %v, want refused as revoked", err)
		}
	}
	if reported != 0 {
		t.Fatalf("echoes of the forgotten revoked member reported %d times", reported)
	}
	if got := known(); !slices.Equal(got, []string{"gw-alive", "gw-burst", "gw-expiring", "gw-lasting"}) {
		t.Fatalf("an echo of the forgotten revoked member listed it again: %v", got)
	}
	// Expired while gone, not revoked: remembered a while yet (a site
	// down for longer than its gateways' certificates last is still
	// missed), but for a burst's gateway.
	clock = clock.Add(2 * time.Hour)
	ms.refresh()
	if got := known(); !slices.Equal(got, []string{"gw-alive", "gw-expiring", "gw-lasting"}) || states(ms)["gw-expiring"] != StateDead {
		t.Fatalf("just after the certificates of gw-expiring and gw-burst expired: %v, %v; want gw-expiring still known, dead, and gw-burst forgotten", got, states(ms))
	}
	ms.setTrust(f.trust()) // a new CRL does not make it an impostor's
	ms.refresh()
	if err := ms.admit("gw-burst", gossipAddr, adverts["gw-burst"]); certs.ReasonOf(err) != certs.ReasonExpired {
		t.Fatalf("an expired member's advert at the door: %v, want refused as expired", err)
	}
	if reported != 0 {
		t.Fatalf("an echo of the forgotten expired member reported %d times", reported)
	}
	if got := known(); !slices.Equal(got, []string{"gw-alive", "gw-expiring", "gw-lasting"}) {
		t.Fatalf("an echo of the forgotten expired member listed it again: %v", got)
	}
	clock = clock.Add(expiredKept)
	ms.refresh()
	if got := known(); !slices.Equal(got, []string{"gw-alive", "gw-lasting"}) {
		t.Fatalf("%s after gw-expiring's certificate expired: %v", expiredKept, got)
	}
	checkCounts(t, ms)
}

// TestMembershipForgetsStrangers: gone members that never became peers —
// refused for an advert that does not decode, restored without a
// certificate — are listed for refusedKept, then forgotten, not saved and
// knocked on for ever; one gone before its certificate came is dropped at
// once (TestMembershipDropsTheNeverVerifiedGone).
func TestMembershipForgetsStrangers(t *testing.T) {
	f := newFixture(t)
	clock := f.now
	ms := newMembership("self", f.trust(), func() time.Time { return clock }, func() {})
	ms.onRefuse = func(string, string, error) {}
	ms.update("gw-junk", gossipAddr, []byte("not an advert"))
	ms.admit("gw-junk", gossipAddr, []byte("not an advert"))
	pending := f.identity("gw-pending", "site-p", 7, f.now.Add(-time.Hour))
	ms.update("gw-pending", gossipAddr, f.advert(pending, 1)) // its certificate never comes
	ms.rememberDead("gw-old", gossipAddr, nil, false)
	ms.leave("gw-junk")
	ms.leave("gw-pending")
	ms.refresh()
	want := map[string]MemberState{"gw-junk": StateRefused, "gw-old": StateDead}
	if got := states(ms); !maps.Equal(got, want) {
		t.Fatalf("gone strangers: %v, want %v", got, want)
	}
	clock = clock.Add(refusedKept)
	ms.refresh()
	if got := states(ms); len(got) != 0 || len(ms.refusedMsg) != 0 {
		t.Fatalf("after %s: still listed %v, refusals remembered %d", refusedKept, got, len(ms.refusedMsg))
	}
	checkCounts(t, ms)
}

// checkCounts checks the membership's counts of strangers and of members
// never verified against its members.
func checkCounts(t *testing.T, ms *membership) {
	t.Helper()
	ms.mu.Lock()
	defer ms.mu.Unlock()
	strangers, unverified := 0, 0
	for _, m := range ms.members {
		switch {
		case m.stranger:
			strangers++
		case m.lastVerified == nil:
			unverified++
		}
	}
	if strangers != ms.strangers || unverified != ms.unverified {
		t.Fatalf("counted %d strangers and %d never verified, of %d and %d listed", ms.strangers, ms.unverified, strangers, unverified)
	}
}

// madeUpAdvert is an advert that decodes and names node, signed with a
// certificate the gateway is never sent: all one holding the gossip key
// needs (its signature is not checked while its certificate is unknown).
func madeUpAdvert(t *testing.T, signer *certs.NodeIdentity, node string, host byte) []byte {
	t.Helper()
	wg, err := certs.GenerateWGKey()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := certs.SignAdvert(&certs.Advert{Version: 1, Timestamp: time.Now(), Node: node, Site: "x", Region: "r", Provider: "p",
		Jurisdiction: "DE", OverlayIP: netip.AddrFrom4([4]byte{100, 96, 9, host}), WireGuardKey: wg.Public()}, signer)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// TestMembershipDropsTheNeverVerifiedGone: a member never verified that
// gossip reports gone (dead, or left: one holding the gossip key can send
// either right after its alive message) is dropped at once, not kept
// dead, saved and knocked on, outside maxPending, which counts those in
// gossip: made-up names, each alive then dead, would grow the membership
// without end. One refused while in gossip is listed a while yet, among
// the strangers and within their bound.
func TestMembershipDropsTheNeverVerifiedGone(t *testing.T) {
	f, rogueCA := newFixture(t), newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	ms.onRefuse = func(string, string, error) {}
	signer := rogueCA.identity("whoever", "x", 1, f.now.Add(-time.Hour))
	for i := range 3 {
		name := fmt.Sprintf("made-up-%d", i)
		meta := madeUpAdvert(t, signer, name, byte(i))
		at := netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), 7946)
		if err := ms.admit(name, at, meta); err != nil {
			t.Fatal(err)
		}
		ms.update(name, at, meta)
		ms.leave(name)
	}
	if got := states(ms); len(got) != 0 {
		t.Fatalf("made-up names gone from gossip still listed: %v", got)
	}
	r := rogueCA.identity("gw-r", "site-r", 9, f.now.Add(-time.Hour))
	meta := rogueCA.advert(r, 1)
	ms.admit("gw-r", gossipAddr, meta)
	ms.update("gw-r", gossipAddr, meta)
	ms.addCert(r.Certificate().Raw)
	ms.leave("gw-r")
	if got := states(ms); !maps.Equal(got, map[string]MemberState{"gw-r": StateRefused}) || ms.strangers != 1 {
		t.Fatalf("an impostor refused, then gone: %v, strangers %d", got, ms.strangers)
	}
	checkCounts(t, ms)
	g := &Gateway{members: ms, s: &Settings{}, state: stateDir(t.TempDir()), log: slog.New(slog.DiscardHandler)}
	ms.rememberDead("gw-old", netip.MustParseAddrPort("198.51.100.1:7946"), nil, false) // an earlier release's save
	if got := g.rejoinTargets(); len(got) != 0 {
		t.Fatalf("knocking on %v, named only for members never verified", got)
	}
	g.saveMembers()
	if saved, err := g.state.loadMembers(); err != nil || len(saved) != 0 {
		t.Fatalf("saved %+v (%v), of members never verified", saved, err)
	}
}

// TestRejoinTargets: a rejoin round knocks on at most rejoinFanout
// addresses it does not count alive, one of them a seed when a seed is
// missing, never itself (by the address it advertises or the one it
// binds, behind NAT), never twice.
func TestRejoinTargets(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	self, bind := netip.MustParseAddrPort("192.0.2.1:7946"), netip.MustParseAddrPort("[2001:db8:a::10]:7946")
	seeds := []string{self.String(), bind.String()}
	for i := range 4 {
		seeds = append(seeds, fmt.Sprintf("192.0.2.%d:7946", 10+i))
	}
	dead := map[string]bool{}
	for i := range 10 {
		a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i)}), 7946)
		id := f.identity(fmt.Sprintf("gw-%d", i), "site-a", byte(10+i), f.now.Add(-time.Hour))
		ms.rememberDead(fmt.Sprintf("gw-%d", i), a, id.Certificate().Raw, false)
		dead[a.String()] = true
	}
	g := &Gateway{s: &Settings{Seeds: seeds, GossipAdvertise: self, GossipBind: bind}, members: ms}
	for range 20 {
		got := g.rejoinTargets()
		if len(got) != rejoinFanout || !slices.Contains(seeds[2:], got[0]) {
			t.Fatalf("targets %v: want %d, a seed first", got, rejoinFanout)
		}
		seen := map[string]bool{}
		for _, a := range got {
			if seen[a] || a == self.String() || a == bind.String() || !dead[a] && !slices.Contains(seeds, a) {
				t.Fatalf("targets %v: duplicate, self or unknown %s", got, a)
			}
			seen[a] = true
		}
	}
	g.s.Seeds = nil
	ms2 := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	x := f.identity("gw-x", "site-x", 99, f.now.Add(-time.Hour))
	ms2.rememberDead("gw-x", netip.MustParseAddrPort("198.51.100.99:7946"), x.Certificate().Raw, false)
	g.members = ms2
	if got := g.rejoinTargets(); len(got) != 1 || got[0] != "198.51.100.99:7946" {
		t.Fatalf("one dead member, no seeds: %v", got)
	}
}

// TestMembershipRefusesHugeCertificates: a gossiped certificate far larger
// than any gateway's is refused before it is parsed, and what is kept of
// the refusal is small: refusals are remembered by the thousand, and one
// holding the gossip key could otherwise send certificates of a megabyte.
func TestMembershipRefusesHugeCertificates(t *testing.T) {
	_, _, ms, _, _ := rogueCase(t)
	huge := make([]byte, 1<<20)
	err := ms.addCert(huge)
	if err == nil || !strings.Contains(err.Error(), "larger than any gateway certificate") {
		t.Fatalf("a certificate of 1 MiB: %v", err)
	}
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if len(ms.badCert) != 1 {
		t.Fatalf("%d refusals kept, want 1", len(ms.badCert))
	}
	for _, rc := range ms.badCert {
		if n := len(rc.err.Error()); n > 200 {
			t.Errorf("the refusal kept is %d bytes", n)
		}
	}
}

// TestMembershipBoundsPending: members whose certificate is not known yet
// are let in up to maxPending; past that a new one is refused (one
// holding the gossip key could otherwise make up names without end, each
// spread to every gateway, kept and asked for its certificate). One
// already listed is still admitted, and one gone leaves room.
func TestMembershipBoundsPending(t *testing.T) {
	f, rogueCA := newFixture(t), newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	ms.onRefuse = func(string, string, error) {}
	signer := rogueCA.identity("whoever", "x", 1, f.now.Add(-time.Hour))
	for i := range maxPending {
		name := fmt.Sprintf("made-up-%d", i)
		meta := madeUpAdvert(t, signer, name, byte(i))
		if err := ms.admit(name, gossipAddr, meta); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		ms.update(name, gossipAddr, meta)
	}
	id := f.identity("gw-new", "site-a", 7, f.now.Add(-time.Hour))
	meta := f.advert(id, 1) // its certificate never sent: pending
	// Twice: the second time it is listed, as refused.
	for range 2 {
		if err := ms.admit("gw-new", gossipAddr, meta); err == nil || !strings.Contains(err.Error(), "waiting for their certificate") {
			t.Fatalf("a new member past %d pending: %v; want it refused", maxPending, err)
		}
	}
	if err := ms.admit("made-up-1", gossipAddr, madeUpAdvert(t, signer, "made-up-1", 1)); err != nil {
		t.Fatalf("one listed already, past the bound: %v", err)
	}
	ms.leave("made-up-0")
	if err := ms.admit("gw-new", gossipAddr, meta); err != nil {
		t.Fatalf("below the bound: %v", err)
	}
	checkCounts(t, ms)
}

// TestMembershipRenewal: a member that renews its certificate stays
// verified, on the advert verified last, until its new certificate is
// fetched (pending, it dropped out of every peer's plan at each renewal);
// its certificate is asked for meanwhile. Not if the old certificate is
// revoked: then it waits as any newcomer does.
func TestMembershipRenewal(t *testing.T) {
	f := newFixture(t)
	changes := 0
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() { changes++ })
	old := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	ms.addCert(old.Certificate().Raw)
	oldAdvert := f.advert(old, 1)
	ms.update("gw-a", gossipAddr, oldAdvert)
	if got := states(ms); got["gw-a"] != StateVerified {
		t.Fatalf("before renewal: %v", got)
	}
	renewed := f.identity("gw-a", "site-a", 1, f.now)
	if !ms.update("gw-a", gossipAddr, f.advert(renewed, 2)) {
		t.Fatal("the renewed certificate was not asked for")
	}
	gws := ms.gateways()
	if got := states(ms); got["gw-a"] != StateVerified || len(gws) != 1 || gws[0].Advert.Version != 1 {
		t.Fatalf("renewed, new certificate not fetched yet: %v, gateways %+v; want verified on the advert verified last", got, gws)
	}
	if p := ms.pending(); !slices.Equal(p, []string{"gw-a"}) {
		t.Fatalf("certificates to fetch: %v, want gw-a's", p)
	}
	// What a restart restores is the advert verified, with its
	// certificate: the newer one names a certificate not known then.
	if v := ms.snapshot()[0]; !bytes.Equal(v.VerifiedMeta, oldAdvert) || !v.Verified.Cert.Equal(old.Certificate()) {
		t.Fatal("renewing: the advert kept for a restart is not the one verified")
	}
	ms.refresh()
	if got := states(ms); got["gw-a"] != StateVerified {
		t.Fatalf("renewing, re-judged: %v", got)
	}
	ms.addCert(renewed.Certificate().Raw)
	if gws := ms.gateways(); len(gws) != 1 || gws[0].Advert.Version != 2 || len(ms.pending()) != 0 {
		t.Fatalf("new certificate fetched: gateways %+v, pending %v; want the new advert", gws, ms.pending())
	}

	// Renewed again while the certificate it had is revoked: no longer
	// a certificate to stand on.
	again := f.identity("gw-a", "site-a", 1, f.now.Add(time.Minute))
	if _, err := f.ca.RevokeSerials([]*big.Int{renewed.Certificate().SerialNumber}, "keyCompromise", f.now); err != nil {
		t.Fatal(err)
	}
	ms.setTrust(f.trust())
	ms.update("gw-a", gossipAddr, f.advert(again, 3))
	if got := states(ms); got["gw-a"] != StatePending || len(ms.gateways()) != 0 {
		t.Fatalf("renewed with its last certificate revoked: %v, %d gateways; want pending", got, len(ms.gateways()))
	}
}

// TestMembershipCountsRefusalsOfMembersHere: revoking a gateway that has
// gone (a burst taken down, a gateway decommissioned) refuses it without
// counting a refusal, which alerts as an intrusion; so does revoking one
// that goes within revokedGrace (a burst's gateways leave once they see
// their own revocation, after the gateway that ran burst down adopted it).
// One still here after that is counted then, once: when gossip brings it
// again, or at the periodic refresh.
func TestMembershipCountsRefusalsOfMembersHere(t *testing.T) {
	f := newFixture(t)
	var refused []string
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	ms.onRefuse = func(name, reason string, _ error) { refused = append(refused, name+":"+reason) }
	adverts := map[string][]byte{}
	var serials []*big.Int
	for i, name := range []string{"gw-gone", "gw-leaving", "gw-here", "gw-gossiping"} {
		id := f.identity(name, "site-"+name, byte(i+1), f.now.Add(-time.Hour))
		adverts[name] = f.advert(id, 1)
		serials = append(serials, id.Certificate().SerialNumber)
		ms.addCert(id.Certificate().Raw)
		ms.update(name, gossipAddr, adverts[name])
	}
	ms.leave("gw-gone")
	if _, err := f.ca.RevokeSerials(serials, "cessationOfOperation", f.now); err != nil {
		t.Fatal(err)
	}
	ms.setTrust(f.trust())
	if got := states(ms); got["gw-here"] != StateRefused || got["gw-leaving"] != StateRefused {
		t.Fatalf("after the revocation: %v; want the members still here refused", got)
	}
	f.now = f.now.Add(ms.revokedGrace - time.Second)
	ms.leave("gw-leaving")
	ms.refresh()
	if err := ms.admit("gw-gossiping", gossipAddr, adverts["gw-gossiping"]); certs.ReasonOf(err) != certs.ReasonRevoked {
		t.Fatalf("the revoked member's advert: %v, want refused as revoked", err)
	}
	if len(refused) != 0 {
		t.Fatalf("refusals counted within the grace: %v, want none yet", refused)
	}
	f.now = f.now.Add(2 * time.Second)
	ms.admit("gw-gossiping", gossipAddr, adverts["gw-gossiping"])
	ms.refresh()
	ms.admit("gw-gossiping", gossipAddr, adverts["gw-gossiping"])
	ms.refresh()
	if !slices.Equal(refused, []string{"gw-gossiping:revoked", "gw-here:revoked"}) {
		t.Fatalf("refusals counted: %v, want those of the two members still here past the grace, once each", refused)
	}
}

// TestMembershipRememberedInTime: a member restored at start stays a peer
// while gossip has not heard from it for rememberedFor (a restart during
// a partition keeps its tunnel), then is dead: memberlist takes no news
// of the death of a node it never saw, and it would otherwise stay a
// peer, its site reachable, until its certificate ended.
func TestMembershipRememberedInTime(t *testing.T) {
	f := newFixture(t)
	clock := f.now
	ms := newMembership("self", f.trust(), func() time.Time { return clock }, func() {})
	id := f.identity("gw-r", "site-r", 1, f.now.Add(-time.Hour))
	if err := ms.remember("gw-r", gossipAddr, f.advert(id, 1), id.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	clock = clock.Add(rememberedFor - time.Minute)
	ms.refresh()
	if got := states(ms); got["gw-r"] != StateVerified || len(ms.gateways()) != 1 {
		t.Fatalf("restored %s ago: %v", rememberedFor-time.Minute, got)
	}
	clock = clock.Add(2 * time.Minute)
	ms.refresh()
	v := ms.snapshot()[0]
	if v.State != StateDead || len(ms.gateways()) != 0 || v.CertSite != "site-r" || v.Reason != "not heard from since the restart" {
		t.Fatalf("restored and not heard from for %s: %s (%q), site %q, %d gateways", rememberedFor+time.Minute, v.State, v.Reason, v.CertSite, len(ms.gateways()))
	}

	// One saved as having left stays so across the restart: its site is
	// not missed.
	ms.rememberDead("gw-left", gossipAddr, id.Certificate().Raw, true)
	for _, v := range ms.snapshot() {
		if v.Name == "gw-left" && (!v.Left || v.Reason != "left the mesh") {
			t.Fatalf("restored after it left: left %v, reason %q", v.Left, v.Reason)
		}
	}
}

// TestGossipLimits: what anyone holding the gossip key can send is bounded
// before it costs the gateway: a message of more fields than any has, a
// user message larger than any blob, a bundle of more parts than any
// state, a join's certificates in state that is not a join's. A join's
// certificates are verified and make their members peers.
func TestGossipLimits(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	g := &Gateway{members: ms, inbox: make(chan []byte, 8), bulk: make(chan []byte, 8), log: slog.New(slog.DiscardHandler)}
	d := delegate{g: g}

	many := make([][]byte, maxFields+1)
	if _, err := decodeMessage(encodeMessage(msgCert, many...), maxFields); err == nil {
		t.Error("a message of more fields than any type has was decoded")
	}
	if m, err := decodeMessage(encodeMessage(msgCert, many[:maxFields]...), maxFields); err != nil || len(m.fields) != maxFields {
		t.Errorf("a message of %d fields: %d, %v", maxFields, len(m.fields), err)
	}
	// Too large for the quick inbox, a message goes to the bulk queue:
	// the bound must hold there, before the message is copied.
	d.NotifyMsg(make([]byte, maxUserMessage+1))
	d.NotifyMsg(nil)
	if n := len(g.inbox) + len(g.bulk); n != 0 || g.inboxBytes.Load() != 0 {
		t.Errorf("%d messages of impossible sizes queued for the worker, %d bytes held", n, g.inboxBytes.Load())
	}
	d.NotifyMsg(append([]byte{msgBlob}, make([]byte, maxUserMessage-1)...))
	if len(g.bulk) != 1 {
		t.Fatalf("a blob of %d bytes, the bound, was not queued", maxUserMessage)
	}
	<-g.bulk
	d.NotifyMsg(encodeMessage(msgAnnounce, []byte{blobCRL}, u64(1), make([]byte, 32)))
	if len(g.inbox) != 1 {
		t.Fatalf("a well-formed message was not queued")
	}
	<-g.inbox

	parts := make([][]byte, maxBundleParts+1)
	for i := range parts {
		parts[i] = encodeMessage(msgAnnounce, []byte{blobCRL}, u64(uint64(i)), make([]byte, 32))
	}
	d.MergeRemoteState(bundle(parts...), false)
	if len(g.inbox) != 0 {
		t.Errorf("a bundle of %d parts gave the worker %d messages", len(parts), len(g.inbox))
	}

	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	if err := ms.admit("gw-a", gossipAddr, f.advert(a, 1)); err != nil {
		t.Fatal(err)
	}
	ms.update("gw-a", gossipAddr, f.advert(a, 1))
	certsMsg := encodeMessage(msgCerts, a.Certificate().Raw, []byte("junk"))
	d.MergeRemoteState(bundle(certsMsg), false)
	if states(ms)["gw-a"] != StatePending {
		t.Fatalf("certificates in state that is not a join's were taken: %v", states(ms))
	}
	d.MergeRemoteState(bundle(certsMsg), true)
	if states(ms)["gw-a"] != StateVerified {
		t.Fatalf("a join's certificates: %v; want gw-a verified", states(ms))
	}
	if ms.refusedLocked(sha256.Sum256([]byte("junk"))) == nil {
		t.Error("a join's junk certificate was not refused")
	}
}

// TestJudgeRefusesAnotherName: a member whose advert names another node
// is refused however it reached the membership, not only through admit.
func TestJudgeRefusesAnotherName(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	if err := ms.addCert(a.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	ms.update("gw-b", gossipAddr, f.advert(a, 1))
	if got := states(ms)["gw-b"]; got != StateRefused || len(ms.gateways()) != 0 {
		t.Fatalf("gw-b with gw-a's advert: %v, %d gateways; want refused, none", got, len(ms.gateways()))
	}
}

// FuzzDecodeMessage: whatever a gossip-key holder sends, a message splits
// into at most the fields allowed, each within the message and the field
// limit, and what splits encodes back to a message that splits the same.
func FuzzDecodeMessage(f *testing.F) {
	f.Add(encodeMessage(msgCertRequest, []byte("gw-a"), []byte("cert"), []byte("192.0.2.1:7946")))
	f.Add(bundle(encodeMessage(msgAnnounce, []byte{blobCRL}, u64(7), make([]byte, 32)), encodeMessage(msgCerts)))
	f.Add([]byte{msgCert, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMessage(b, maxFields)
		if err != nil {
			return
		}
		if len(m.fields) > maxFields {
			t.Fatalf("%d fields, at most %d allowed", len(m.fields), maxFields)
		}
		total := 0
		for _, fl := range m.fields {
			if len(fl) > maxMessageField {
				t.Fatalf("field of %d bytes", len(fl))
			}
			total += len(fl)
		}
		if total > len(b) {
			t.Fatalf("fields of %d bytes from a message of %d", total, len(b))
		}
		again, err := decodeMessage(encodeMessage(m.typ, m.fields...), maxFields)
		if err != nil || again.typ != m.typ || len(again.fields) != len(m.fields) {
			t.Fatalf("re-encoded: %v, %d fields; want %d", err, len(again.fields), len(m.fields))
		}
		for i := range m.fields {
			if !bytes.Equal(again.fields[i], m.fields[i]) {
				t.Fatalf("field %d differs after re-encoding", i)
			}
		}
		if parts, err := unbundle(b); err == nil && len(parts) > maxBundleParts {
			t.Fatalf("bundle of %d parts", len(parts))
		}
	})
}

// TestMembershipTrustsNewCA: a gateway renewed onto the issuer's new CA
// before this one read it is refused as signed by an unknown CA; once the
// bundle trusts the new CA its certificate is asked for and judged anew,
// not left refused until the refusal is pruned.
func TestMembershipTrustsNewCA(t *testing.T) {
	f, next, ms, r, _ := rogueCase(t)
	ms.update("gw-r", gossipAddr, next.advert(r, 1))
	if err := ms.addCert(r.Certificate().Raw); err == nil || states(ms)["gw-r"] != StateRefused {
		t.Fatalf("a certificate of a CA not trusted yet: %v, %v", err, states(ms))
	}
	tb, err := certs.NewTrustBundle([]*x509.Certificate{f.ca.Certificate(), next.ca.Certificate()}, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	ms.setTrust(tb)
	if got := states(ms)["gw-r"]; got != StatePending {
		t.Fatalf("once the new CA is trusted: %s, want pending (its certificate fetched again)", got)
	}
	if err := ms.addCert(r.Certificate().Raw); err != nil || states(ms)["gw-r"] != StateVerified {
		t.Fatalf("its certificate again: %v, %v", err, states(ms))
	}
}

// TestMembershipConflictChain: A (oldest) overlaps B, B overlaps C, and A
// and C do not overlap. B loses to A, so C, B's only rival, keeps its
// claim — when the adverts arrive and at every later judgement, whatever
// the names' order.
func TestMembershipConflictChain(t *testing.T) {
	f := newFixture(t)
	a := f.identity("gw-c", "site-a", 1, f.now.Add(-3*time.Hour), "10.7.0.0/24")
	b := f.identityBy(f.blind(), "gw-b", "site-b", 2, f.now.Add(-2*time.Hour), "10.7.0.0/23")
	c := f.identity("gw-a", "site-c", 3, f.now.Add(-time.Hour), "10.7.1.0/24")
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	for _, id := range []*certs.NodeIdentity{a, b, c} {
		ms.addCert(id.Certificate().Raw)
		ms.update(id.Attributes().Node, gossipAddr, f.advert(id, 1))
	}
	want := map[string]MemberState{"gw-c": StateVerified, "gw-b": StateRefused, "gw-a": StateVerified}
	for pass := range 3 {
		got := states(ms)
		for n, s := range want {
			if got[n] != s {
				t.Fatalf("pass %d: %s is %s, want %s (%v)", pass, n, got[n], s, got)
			}
		}
		ms.refresh()
	}
}

// TestMembershipStandingIsOneOrder: conflicts of different kinds among
// claimants with and without a proof of their WireGuard key. One order
// ranks them all (proof, age, name), so whatever order the adverts arrive
// in, a re-judgement leaves every gateway with the same members, and
// further adverts and re-judgements do not make any of them flap. (With a
// proof ranking first for keys only, and re-judgements by age, the first
// case ended with gw-c refused by gw-a, itself refused.)
func TestMembershipStandingIsOneOrder(t *testing.T) {
	f := newFixture(t)
	key := func() certs.WGPrivateKey { k, _ := certs.GenerateWGKey(); return k }
	type claimant struct {
		id     *certs.NodeIdentity
		key    certs.WGPrivateKey
		proven bool
	}
	cases := []struct {
		name  string
		build func() []claimant
		want  map[string]MemberState
	}{{
		// An unproven elder holds a key a proven youngest holds too, and a
		// route a proven middle one overlaps.
		name: "unproven elder",
		build: func() []claimant {
			k := key()
			return []claimant{
				{f.identity("gw-a", "site-a", 1, f.now.Add(-3*time.Hour), "10.1.0.0/16"), k, false},
				{f.identity("gw-b", "site-b", 2, f.now.Add(-time.Hour)), k, true},
				{f.identityBy(f.blind(), "gw-c", "site-c", 3, f.now.Add(-2*time.Hour), "10.1.0.0/24"), key(), true},
			}
		},
		want: map[string]MemberState{"gw-a": StateRefused, "gw-b": StateVerified, "gw-c": StateVerified},
	}, {
		// A proven middle one overlaps a proven youngest's route, which
		// holds an unproven elder's key: the youngest loses the route, and
		// the elder, rid of its only rival, keeps its key.
		name: "chain",
		build: func() []claimant {
			k := key()
			return []claimant{
				{f.identity("gw-o1", "site-a", 4, f.now.Add(-3*time.Hour)), k, false},
				{f.identity("gw-o2", "site-b", 5, f.now.Add(-2*time.Hour), "10.2.0.0/16"), key(), true},
				{f.identityBy(f.blind(), "gw-v", "site-c", 6, f.now.Add(-time.Hour), "10.2.0.0/24"), k, true},
			}
		},
		want: map[string]MemberState{"gw-o1": StateVerified, "gw-o2": StateVerified, "gw-v": StateRefused},
	}, {
		// Two unproven ones, the elder holding a route the other overlaps
		// and a key a proven youngest holds: the elder loses the key, and
		// the other, rid of its only rival, keeps its route. Taken by age,
		// the other met the elder first and stayed refused by a loser.
		name: "refused by a loser",
		build: func() []claimant {
			k := key()
			return []claimant{
				{f.identity("gw-n", "site-a", 7, f.now.Add(-3*time.Hour), "10.3.0.0/16"), k, false},
				{f.identityBy(f.blind(), "gw-m", "site-b", 8, f.now.Add(-2*time.Hour), "10.3.0.0/24"), key(), false},
				{f.identity("gw-p", "site-c", 9, f.now.Add(-time.Hour)), k, true},
			}
		},
		want: map[string]MemberState{"gw-n": StateRefused, "gw-m": StateVerified, "gw-p": StateVerified},
	}}
	for _, tc := range cases {
		cl := tc.build()
		advert := func(c claimant, version uint64) []byte {
			if c.proven {
				return f.advertWithKeys(c.id, version, c.key, certs.WGPublicKey{})
			}
			return f.advertClaiming(c.id, version, c.key.Public(), certs.WGProof{}, certs.WGPublicKey{})
		}
		for _, order := range [][]int{{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}} {
			ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
			for _, i := range order {
				ms.addCert(cl[i].id.Certificate().Raw)
				ms.update(cl[i].id.Attributes().Node, gossipAddr, advert(cl[i], 1))
			}
			check := func(when string) {
				t.Helper()
				got := states(ms)
				for n, s := range tc.want {
					if got[n] != s {
						t.Fatalf("%s, arrival %v, %s: %s is %s, want %s (%v)", tc.name, order, when, n, got[n], s, got)
					}
				}
			}
			for pass := range 3 {
				ms.refresh()
				check(fmt.Sprintf("re-judgement %d", pass))
				// Each sends a new advert of the same claims.
				for _, i := range order {
					ms.update(cl[i].id.Attributes().Node, gossipAddr, advert(cl[i], uint64(pass+2)))
				}
				check(fmt.Sprintf("new adverts %d", pass))
			}
		}
	}
}

// TestMembershipConflictsJudgedOnceIn: a conflict is judged once a member
// is in, not at memberlist's door, so that a re-judgement meets it again.
// H beats O, O beats X, H and X do not conflict: whatever order their
// alive messages come in, X ends verified. Refused at the door when O
// came first, X stayed refused after O lost to H.
func TestMembershipConflictsJudgedOnceIn(t *testing.T) {
	f := newFixture(t)
	h := f.identity("gw-h", "site-h", 1, f.now.Add(-3*time.Hour), "10.6.0.0/16")
	o := f.identityBy(f.blind(), "gw-o", "site-o", 2, f.now.Add(-2*time.Hour), "10.6.1.0/24", "10.7.0.0/16")
	x := f.identityBy(f.blind(), "gw-x", "site-x", 3, f.now.Add(-time.Hour), "10.7.1.0/24")
	ads := map[string][]byte{"gw-h": f.advert(h, 1), "gw-o": f.advert(o, 1), "gw-x": f.advert(x, 1)}
	for _, order := range [][]string{{"gw-o", "gw-x", "gw-h"}, {"gw-h", "gw-x", "gw-o"}, {"gw-x", "gw-o", "gw-h"}} {
		ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
		for _, id := range []*certs.NodeIdentity{h, o, x} {
			ms.addCert(id.Certificate().Raw)
		}
		for _, n := range order {
			if err := ms.admit(n, gossipAddr, ads[n]); err != nil {
				t.Fatalf("%v: %s refused at the door: %v", order, n, err)
			}
			ms.update(n, gossipAddr, ads[n])
		}
		ms.refresh()
		want := map[string]MemberState{"gw-h": StateVerified, "gw-o": StateRefused, "gw-x": StateVerified}
		if got := states(ms); !maps.Equal(got, want) {
			t.Errorf("arrival %v, after a re-judgement: %v, want %v", order, got, want)
		}
	}
}

// TestMembershipRenewingContested: a member renewing its certificate
// stands on the advert verified last until the new certificate arrives;
// a re-judgement contests that advert like any other. Y beats X on a key,
// X beats R on a route; Y leaves while R renews: X comes back and R is
// refused. (Not re-contested, R used to keep the overlapping route
// beside X.)
func TestMembershipRenewingContested(t *testing.T) {
	f := newFixture(t)
	k, _ := certs.GenerateWGKey()
	y := f.identity("gw-y", "site-y", 1, f.now.Add(-3*time.Hour))
	x := f.identity("gw-x", "site-x", 2, f.now.Add(-2*time.Hour), "10.5.0.0/16")
	r := f.identityBy(f.blind(), "gw-r", "site-r", 3, f.now.Add(-time.Hour), "10.5.1.0/24")
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	for _, id := range []*certs.NodeIdentity{y, r, x} {
		ms.addCert(id.Certificate().Raw)
	}
	ms.update("gw-y", gossipAddr, f.advertWithKeys(y, 1, k, certs.WGPublicKey{}))
	ms.update("gw-r", gossipAddr, f.advert(r, 1))
	ms.update("gw-x", gossipAddr, f.advertWithKeys(x, 1, k, certs.WGPublicKey{}))
	if got := states(ms); got["gw-x"] != StateRefused || got["gw-r"] != StateVerified {
		t.Fatalf("set-up: %v", got)
	}
	renewed := f.identityBy(f.blind(), "gw-r", "site-r", 3, f.now, "10.5.1.0/24")
	ms.update("gw-r", gossipAddr, f.advert(renewed, 2)) // its certificate not fetched yet
	ms.leave("gw-y")
	ms.refresh()
	want := map[string]MemberState{"gw-y": StateDead, "gw-x": StateVerified, "gw-r": StateRefused}
	if got := states(ms); !maps.Equal(got, want) {
		t.Fatalf("after a re-judgement while gw-r renews: %v, want %v", got, want)
	}
	// Refused, it no longer stands on its old advert: its new
	// certificate is judged as any, and still loses the route.
	ms.addCert(renewed.Certificate().Raw)
	ms.refresh()
	if got := states(ms); !maps.Equal(got, want) {
		t.Fatalf("with its new certificate: %v, want %v", got, want)
	}
}

// TestMembershipAway: the gateways whose routes are held are those not up
// (declared dead, restored dead after a restart, back but waiting for a
// re-issued certificate, refused) whose last verified certificate still
// stands: not the verified, the revoked, the expired, one never verified,
// nor one restored with a certificate the mesh's CA did not sign.
func TestMembershipAway(t *testing.T) {
	f := newFixture(t)
	at := f.now.Add(-time.Hour)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	addr := func(i byte) netip.AddrPort { return netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, i}), 7946) }
	upKey, _ := certs.GenerateWGKey()
	for i, id := range []*certs.NodeIdentity{
		f.identity("gw-up", "site-up", 1, at, "10.1.0.0/16"),
		f.identity("gw-dead", "site-dead", 2, at, "10.2.0.0/16"),
		f.identity("gw-revoked", "site-revoked", 3, at, "10.3.0.0/16"),
		f.identity("gw-back", "site-back", 8, at, "10.8.0.0/16"),
	} {
		ms.addCert(id.Certificate().Raw)
		key := upKey
		if i > 0 {
			key, _ = certs.GenerateWGKey()
		}
		ms.update(id.Attributes().Node, addr(byte(id.Attributes().OverlayIP.As4()[3])), f.advertWithKeys(id, 1, key, certs.WGPublicKey{}))
		if id.Attributes().Node == "gw-revoked" {
			if _, err := f.ca.RevokeSerials([]*big.Int{id.Certificate().SerialNumber}, "cessationOfOperation", f.now); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Refused while up (it claimed gw-up's WireGuard key): its site has
	// no gateway up, and its last verified certificate stands.
	thief := f.identity("gw-thief", "site-thief", 7, at, "10.7.0.0/16")
	ms.addCert(thief.Certificate().Raw)
	ms.update("gw-thief", addr(7), f.advert(thief, 1))
	ms.update("gw-thief", addr(7), f.advertClaiming(thief, 2, upKey.Public(), certs.WGProof{}, certs.WGPublicKey{}))
	ms.leave("gw-dead")
	ms.leave("gw-revoked")
	ms.leave("gw-back")
	// Back with a re-issued certificate not fetched yet: pending.
	reissued := f.identity("gw-back", "site-back", 8, at, "10.8.0.0/16", "10.18.0.0/16")
	ms.update("gw-back", addr(8), f.advert(reissued, 2))
	ms.setTrust(f.trust())
	if st := states(ms); st["gw-thief"] != StateRefused || st["gw-back"] != StatePending {
		t.Fatalf("states %v; want gw-thief refused, gw-back pending", st)
	}
	restored := f.identity("gw-restored", "site-restored", 4, at, "10.4.0.0/16")
	ms.rememberDead("gw-restored", addr(4), restored.Certificate().Raw, false)
	ms.rememberDead("gw-nocert", addr(5), nil, false) // saved by an older version, without its certificate
	soon := f.identity("gw-soon", "site-soon", 6, f.now.Add(-47*time.Hour), "10.6.0.0/16")
	ms.rememberDead("gw-soon", addr(6), soon.Certificate().Raw, false)
	foreign := f.identityBy(meshCA(t, t.TempDir()), "gw-foreign", "site-foreign", 9, at, "10.9.0.0/16")
	ms.rememberDead("gw-foreign", addr(9), foreign.Certificate().Raw, false)

	names := func(as []AwayGateway) (out []string) {
		for _, a := range as {
			out = append(out, fmt.Sprintf("%s:%v@%s", a.Attributes.Node, a.Advert.Routes, a.Gossip))
		}
		return out
	}
	gone := ms.away()
	want := []string{"gw-back:[10.8.0.0/16]@192.0.2.8", "gw-dead:[10.2.0.0/16]@192.0.2.2", "gw-restored:[]@192.0.2.4", "gw-soon:[]@192.0.2.6", "gw-thief:[10.7.0.0/16]@192.0.2.7"}
	if got := names(gone); !slices.Equal(got, want) {
		t.Fatalf("away %v, want %v", got, want)
	}
	if gone[2].Attributes.Routes[0] != netip.MustParsePrefix("10.4.0.0/16") {
		t.Fatalf("a restored gateway's certificate: %+v", gone[2].Attributes)
	}
	f.now = f.now.Add(2 * time.Hour) // gw-soon's certificate ends: held a while yet
	if got := names(ms.away()); !slices.Equal(got, want) {
		t.Fatalf("just after a certificate ended: away %v, want %v", got, want)
	}
	f.now = f.now.Add(expiredKept) // retired
	if got, want := names(ms.away()), slices.Delete(slices.Clone(want), 3, 4); !slices.Equal(got, want) {
		t.Fatalf("%s after a certificate ended: away %v, want %v", expiredKept, got, want)
	}
}

// TestMembershipExpiredWhileHere: a gateway whose certificate runs out
// while it is still here is refused, and once gone it is remembered, its
// routes held, as one that died first would be, until expiredKept after
// the expiry — not forgotten refusedKept after it went.
func TestMembershipExpiredWhileHere(t *testing.T) {
	f := newFixture(t)
	clock := f.now
	late := f.identity("gw-late", "site-late", 3, f.now.Add(-47*time.Hour), "10.3.0.0/16") // 48 h: an hour left
	ms := newMembership("self", f.trust(), func() time.Time { return clock }, func() {})
	ms.addCert(late.Certificate().Raw)
	ms.update("gw-late", gossipAddr, f.advert(late, 1))
	clock = clock.Add(2 * time.Hour)
	ms.refresh()
	if st := states(ms)["gw-late"]; st != StateRefused {
		t.Fatalf("gw-late is %s once its certificate ran out, want refused", st)
	}
	ms.leave("gw-late")
	clock = clock.Add(2 * refusedKept)
	ms.refresh()
	if away := ms.away(); len(away) != 1 || away[0].Attributes.Node != "gw-late" {
		t.Fatalf("%s after it went: away %+v; want gw-late still missed, its routes held", 2*refusedKept, away)
	}
	clock = clock.Add(expiredKept)
	ms.refresh()
	if _, ok := states(ms)["gw-late"]; ok {
		t.Fatalf("gw-late still known %s after its certificate ended", expiredKept)
	}
	checkCounts(t, ms)
}

// leaveNotice is the signed notice of a gateway leaving on purpose.
func leaveNotice(t *testing.T, id *certs.NodeIdentity, at time.Time, version uint64) message {
	t.Helper()
	name := id.Attributes().Node
	sig, err := id.Signer().Sign(rand.Reader, leavingDigest(name, at.Unix(), version), crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	return message{typ: msgLeaving, fields: [][]byte{[]byte(name), binary.BigEndian.AppendUint64(nil, uint64(at.Unix())),
		binary.BigEndian.AppendUint64(nil, version), sig}}
}

// TestAdmitBindsAVerifiedName: memberlist takes a node's address and
// liveness from whoever holds the gossip key, and moves a node that left
// to any address. Once verified, a member is taken at another address,
// or back after it left on purpose, only with a newer advert, which only
// the gateway can sign (it signs one at every start); its last advert at
// the address it was verified at still brings it back from a false death.
func TestAdmitBindsAVerifiedName(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	replays := 0
	ms.onRefuse = func(_, reason string, _ error) {
		if reason == string(certs.ReasonReplay) {
			replays++
		}
	}
	here, there, third := gossipAddr, netip.MustParseAddrPort("203.0.113.9:7946"), netip.MustParseAddrPort("198.51.100.3:7946")
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	if err := ms.addCert(a.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	join := func(at netip.AddrPort, meta []byte) {
		t.Helper()
		if err := ms.admit("gw-a", at, meta); err != nil {
			t.Fatalf("at %s: %v", at, err)
		}
		ms.update("gw-a", at, meta)
		if v := ms.snapshot()[0]; v.State != StateVerified || v.Gossip != at {
			t.Fatalf("gw-a %s at %s, want verified at %s", v.State, v.Gossip, at)
		}
	}
	refused := func(at netip.AddrPort, meta []byte, why string) {
		t.Helper()
		if err := ms.admit("gw-a", at, meta); certs.ReasonOf(err) != certs.ReasonReplay {
			t.Fatalf("%s: %v, want refused as a replay", why, err)
		}
	}
	v5 := f.advert(a, 5)
	join(here, v5)
	refused(there, v5, "its advert gossiped at another address")
	refused(there, f.advert(a, 4), "an older advert at another address")
	// Declared dead, as a forged leave makes it too: its refutation
	// carries the same advert, from where it was.
	ms.leave("gw-a")
	if err := ms.admit("gw-a", here, v5); err != nil {
		t.Fatalf("a false death refuted: %v", err)
	}
	refused(there, v5, "declared dead, then its advert at another address")
	// Restarted with a new address: a newer advert, bound there from
	// then on.
	v6 := f.advert(a, 6)
	join(there, v6)
	refused(here, v6, "its advert at the address it had before")
	if replays != 4 {
		t.Fatalf("%d refusals counted as replays, want 4", replays)
	}

	// Renewed while it was down, at a third address: not in as pending
	// (memberlist would put it there), but put off until its certificate,
	// asked for there, once per certRetry, comes; not counted.
	renewed := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Minute))
	v7 := f.advert(renewed, 7)
	for i, ask := range []bool{true, false} {
		err := ms.admit("gw-a", third, v7)
		if first, ok := err.(*certFirstError); !ok || first.ask != ask || first.at != third {
			t.Fatalf("a newer advert elsewhere, its certificate unknown (%d): %v, want put off, asked for at %s: %v", i, err, third, ask)
		}
	}
	f.now = f.now.Add(certRetry)
	if first, ok := ms.admit("gw-a", third, v7).(*certFirstError); !ok || !first.ask {
		t.Fatalf("asked for again after %s: %+v", certRetry, first)
	}
	if err := ms.addCert(renewed.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	join(third, v7)

	// Left on purpose: neither its last advert nor an older one brings it
	// back, here or anywhere; a newer one does. Its last advert where it
	// was is what members that missed the departure gossip for a while:
	// refused, not counted.
	g := &Gateway{members: ms, now: func() time.Time { return f.now }}
	if err := g.handleLeaving(leaveNotice(t, renewed, f.now, 7)); err != nil {
		t.Fatal(err)
	}
	ms.leave("gw-a")
	if err := ms.admit("gw-a", third, v7); err == nil || certs.ReasonOf(err) != "" {
		t.Fatalf("its last advert after it left, where it was: %v, want refused, uncounted", err)
	}
	refused(here, v7, "its last advert after it left, at another address")
	if replays != 5 {
		t.Fatalf("%d refusals counted as replays, want 5", replays)
	}
	join(here, f.advert(renewed, 8))
	if v := ms.snapshot()[0]; v.Left {
		t.Fatal("back with a newer advert, still shown as left")
	}
	checkCounts(t, ms)
}

// TestRestartKeepsAdvertVersions: a member saved gone keeps, across a
// restart, the version of its advert verified last and where it was: an
// older advert is refused as before the restart, not taken as the first.
func TestRestartKeepsAdvertVersions(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	there := netip.MustParseAddrPort("203.0.113.9:7946")
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	ms.addCert(a.Certificate().Raw)
	v5 := f.advert(a, 5)
	ms.admit("gw-a", gossipAddr, v5)
	ms.update("gw-a", gossipAddr, v5)
	ms.leave("gw-a")
	dir := stateDir(t.TempDir())
	(&Gateway{members: ms, state: dir, log: slog.New(slog.DiscardHandler)}).saveMembers()

	restarted := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	restarted.addCert(a.Certificate().Raw) // as a join's state brings it
	(&Gateway{members: restarted, state: dir, log: slog.New(slog.DiscardHandler)}).restoreMembers()
	if err := restarted.admit("gw-a", gossipAddr, f.advert(a, 4)); certs.ReasonOf(err) != certs.ReasonReplay {
		t.Fatalf("an older advert after the restart: %v, want refused as a replay", err)
	}
	if err := restarted.admit("gw-a", there, v5); certs.ReasonOf(err) != certs.ReasonReplay {
		t.Fatalf("its last advert at another address after the restart: %v, want refused as a replay", err)
	}
	if err := restarted.admit("gw-a", gossipAddr, v5); err != nil {
		t.Fatalf("its last advert where it was: %v", err)
	}
	if err := restarted.admit("gw-a", there, f.advert(a, 6)); err != nil {
		t.Fatalf("a newer advert at another address: %v", err)
	}
}

// reencoded is raw with its ECDSA signature (r, s) written as (r, n-s),
// which verifies as well: what anyone holding the gossip key can make of
// a gateway's advert, without its key.
func reencoded(t *testing.T, raw []byte) []byte {
	t.Helper()
	// The signature is the last field: tag 0xff, its length in one byte,
	// then the DER sequence.
	for i := len(raw) - 3; i >= 0; i-- {
		if raw[i] != 0xff || int(raw[i+1]) != len(raw)-i-2 || raw[i+2] != 0x30 {
			continue
		}
		var sig struct{ R, S *big.Int }
		if rest, err := asn1.Unmarshal(raw[i+2:], &sig); err != nil || len(rest) != 0 {
			continue
		}
		sig.S.Sub(elliptic.P256().Params().N, sig.S)
		der, err := asn1.Marshal(sig)
		if err != nil {
			t.Fatal(err)
		}
		return append(append(append([]byte(nil), raw[:i]...), 0xff, byte(len(der))), der...)
	}
	t.Fatal("no signature field found")
	return nil
}

// TestReencodedSignatureIsNoReplay: an advert whose signature is written
// another way is the same advert. Judged by a digest of the whole advert,
// a copy re-encoded and gossiped first had the gateway's own advert, and
// its refutations, refused as "reuses version 5 with different content"
// and counted as intrusions; and once it had left, the copy at its
// address was counted as a replay rather than passed over as its last
// advert, before a restart and after.
func TestReencodedSignatureIsNoReplay(t *testing.T) {
	f := newFixture(t)
	ms := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	refusals := 0
	ms.onRefuse = func(string, string, error) { refusals++ }
	a := f.identity("gw-a", "site-a", 1, f.now.Add(-time.Hour))
	if err := ms.addCert(a.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	v5 := f.advert(a, 5)
	copied := reencoded(t, v5)
	if bytes.Equal(copied, v5) {
		t.Fatal("the copy is the advert")
	}
	for _, meta := range [][]byte{copied, v5, copied} {
		if err := ms.admit("gw-a", gossipAddr, meta); err != nil {
			t.Fatalf("admitted: %v", err)
		}
		ms.update("gw-a", gossipAddr, meta)
		if v := ms.snapshot()[0]; v.State != StateVerified {
			t.Fatalf("gw-a %s (%s), want verified", v.State, v.Reason)
		}
	}

	g := &Gateway{members: ms, now: func() time.Time { return f.now }, state: stateDir(t.TempDir()), log: slog.New(slog.DiscardHandler)}
	if err := g.handleLeaving(leaveNotice(t, a, f.now, 5)); err != nil {
		t.Fatal(err)
	}
	ms.leave("gw-a")
	var departed *departedError
	if err := ms.admit("gw-a", gossipAddr, reencoded(t, copied)); !errors.As(err, &departed) {
		t.Errorf("its last advert, re-encoded, after it left: %v, want passed over as its last", err)
	}
	g.saveMembers()
	restarted := newMembership("self", f.trust(), func() time.Time { return f.now }, func() {})
	restarted.onRefuse = ms.onRefuse
	restarted.addCert(a.Certificate().Raw)
	(&Gateway{members: restarted, state: g.state, log: slog.New(slog.DiscardHandler)}).restoreMembers()
	for _, meta := range [][]byte{v5, copied} {
		if err := restarted.admit("gw-a", gossipAddr, meta); !errors.As(err, &departed) {
			t.Errorf("after a restart, its last advert (re-encoded %v) after it left: %v, want passed over as its last", !bytes.Equal(meta, v5), err)
		}
	}
	if refusals != 0 {
		t.Errorf("%d refusals counted, want none", refusals)
	}
}
