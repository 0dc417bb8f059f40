package mesh

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
	"github.com/skybridge-mesh/skybridge/policy"
)

// TestAdoptPolicyConcurrently: gossip and the control socket adopt
// policies at the same time. Whatever the order they arrive in, the newest
// is the one in force, on disk and announced; an older one checked against
// the same current policy must not be stored after it.
func TestAdoptPolicyConcurrently(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	lg := startLiveGateway(t, ca, dir, 0, "zrh-dc", nil, &syncbuf.Buffer{})
	<-lg.g.joined // gossip up: adopting announces
	const newest = 40
	type signed struct{ src, sig []byte }
	versions := make([]signed, newest)
	for v := 1; v <= newest; v++ {
		src := fmt.Appendf(nil, "policy {\n  name    = \"concurrent\"\n  version = %d\n}\nclass \"risk-batch\" {\n  allow \"store\" {\n    jurisdiction = [\"CH\"]\n  }\n}\n", v)
		sig, err := policy.Sign("policy.hcl", src, ca.Signer(), "mesh CA", nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		versions[v-1] = signed{src, sig.Marshal()}
	}
	for round := range 5 {
		rand.Shuffle(len(versions), func(i, j int) { versions[i], versions[j] = versions[j], versions[i] })
		var wg sync.WaitGroup
		start := make(chan struct{})
		for _, v := range versions {
			wg.Go(func() {
				<-start
				lg.g.AdoptPolicy(v.src, v.sig) // older ones are refused
			})
		}
		close(start)
		wg.Wait()
		if got := lg.g.policy.Load().p.Revision().Version; got != newest {
			t.Fatalf("round %d: version %d in force after adopting 1 to %d concurrently", round, got, newest)
		}
		src, _, err := lg.g.state.loadPolicy()
		if err != nil {
			t.Fatal(err)
		}
		p, err := policy.Parse("policy.hcl", src)
		if err != nil || p.Revision().Version != newest {
			t.Fatalf("round %d: version %v stored, %v; want %d", round, p.Revision().Version, err, newest)
		}
		// The next round starts from nothing adopted in memory, so that
		// every round races afresh.
		lg.g.policy.Store(nil)
	}
}

// TestRevokedSignersPolicyLeaves: a policy whose signer is revoked after
// it was adopted is no longer in force once the revocation list arrives,
// as it would not be after a restart; the configured policy takes its
// place.
func TestRevokedSignersPolicyLeaves(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	version := func(v int) []byte {
		return fmt.Appendf(nil, "policy {\n  name    = \"revoked\"\n  version = %d\n}\nclass \"risk-batch\" {\n  allow \"store\" {\n    jurisdiction = [\"CH\"]\n  }\n}\n", v)
	}
	cfgPolicy, cfgSig := filepath.Join(dir, "policy.hcl"), filepath.Join(dir, "policy.hcl.sig")
	sig, err := policy.Sign("policy.hcl", version(1), ca.Signer(), "mesh CA", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgPolicy, version(1), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgSig, sig.Marshal(), 0o600); err != nil {
		t.Fatal(err)
	}
	lg := startLiveGatewayWith(t, ca, dir, 0, "zrh-dc", nil, &syncbuf.Buffer{}, func(s *Settings) {
		s.PolicyFile, s.PolicySignature = cfgPolicy, cfgSig
	})
	<-lg.g.joined // gossip up: adopting announces
	inForce := func() int64 {
		if p := lg.g.policy.Load(); p != nil {
			return p.p.Revision().Version
		}
		return 0
	}
	if v := inForce(); v != 1 {
		t.Fatalf("at start: version %d in force, want the configured 1", v)
	}
	// adoptThenRevoke has g adopt version 2 from a new delegated signer,
	// then the revocation list that revokes that signer.
	adoptThenRevoke := func(g *Gateway, signerName string) {
		t.Helper()
		signer, err := ca.NewPolicySigner(signerName, time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		sig2, err := policy.Sign("policy.hcl", version(2), signer.Signer(), signer.Name(), signer.Certificate(), time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := g.AdoptPolicy(version(2), sig2.Marshal()); !ok || err != nil {
			t.Fatalf("version 2 from delegated signer %s: %v, %v", signerName, ok, err)
		}
		if _, err := ca.RevokeSerials([]*big.Int{signer.Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
			t.Fatal(err)
		}
		tb, err := ca.TrustBundle()
		if err != nil {
			t.Fatal(err)
		}
		if !g.adoptTrust(tb, time.Now()) {
			t.Fatal("the new revocation list was not adopted")
		}
	}
	adoptThenRevoke(lg.g, "compliance")
	if v := inForce(); v != 1 {
		t.Fatalf("after its signer was revoked: version %d in force, want the configured 1", v)
	}
	// Nor may a version up to the withdrawn one come back by gossip or
	// publish: a replay of one the mesh had moved past (here a version 2
	// the CA signed, laxer for all we know) would take its place. The
	// withdrawn version is kept for later runs; above it, one comes in.
	sig2, err := policy.Sign("policy.hcl", version(2), ca.Signer(), "mesh CA", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := lg.g.AdoptPolicy(version(2), sig2.Marshal()); ok || err == nil || !strings.Contains(err.Error(), "not above version 2, which was in force until its signer was revoked") {
		t.Fatalf("a version 2 after the version 2 in force was withdrawn: adopted %v, %v; want it refused", ok, err)
	}
	if w, err := lg.g.state.loadWithdrawn(); err != nil || w.version() != "revoked v2" {
		t.Fatalf("the withdrawn version kept for later runs: %+v, %v", w, err)
	}

	// With no configured policy to take its place it stays in force
	// (none would lift every residency limit on the tunnels), until a
	// trusted policy above it is published.
	bare := startLiveGateway(t, ca, dir, 1, "fra-dc", nil, &syncbuf.Buffer{})
	<-bare.g.joined
	if ok, err := bare.g.AdoptPolicy(version(1), sig.Marshal()); !ok || err != nil {
		t.Fatalf("version 1: %v, %v", ok, err)
	}
	adoptThenRevoke(bare.g, "compliance-2")
	if p := bare.g.policy.Load(); p == nil || p.p.Revision().Version != 2 || !p.untrusted {
		t.Fatalf("with nothing to take its place: %+v; want version 2 kept, marked untrusted", p)
	}
	sig3, err := policy.Sign("policy.hcl", version(3), ca.Signer(), "mesh CA", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := bare.g.AdoptPolicy(version(3), sig3.Marshal()); !ok || err != nil || bare.g.policy.Load().untrusted {
		t.Fatalf("a trusted version 3: %v, %v", ok, err)
	}
}

// TestUntrustedPolicyKeptAcrossRestart: a policy kept in force after its
// signer was revoked, with nothing trusted to take its place, is still in
// force after a restart: the state directory's copy no longer verifies,
// and starting with none would lift every residency limit on the tunnels.
func TestUntrustedPolicyKeptAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	src := []byte("policy {\n  name    = \"revoked\"\n  version = 2\n}\nclass \"risk-batch\" {\n  allow \"store\" {\n    jurisdiction = [\"CH\"]\n  }\n}\n")
	open := restartable(t, dir, ca, tb)
	g := open()
	signer, err := ca.NewPolicySigner("compliance", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// Signed a little ahead (within the clock skew allowed), so that a
	// version signed before it can be made below.
	sig, err := policy.Sign("policy.hcl", src, signer.Signer(), signer.Name(), signer.Certificate(), time.Now().Add(4*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := g.AdoptPolicy(src, sig.Marshal()); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{signer.Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	if tb, err = ca.TrustBundle(); err != nil || !g.adoptTrust(tb, time.Now()) {
		t.Fatalf("the revocation list was not adopted: %v", err)
	}
	if p := g.policy.Load(); p == nil || !p.untrusted {
		t.Fatalf("running: %+v, want version 2 kept, marked untrusted", p)
	}
	g.prov.Close()
	g.closeDevice()
	g = open()
	if p := g.policy.Load(); p == nil || p.p.Revision().Version != 2 || !p.untrusted {
		t.Fatalf("after a restart: policy %s in force, want version 2 kept, marked untrusted", g.policyRevision())
	}
	if g.withdrawn.version() != "revoked v2" {
		t.Fatalf("after a restart: withdrawn %+v, want version 2", g.withdrawn)
	}
	// Kept with its signing time: a newer version dated back before it
	// (a key that has run out, signing into its past) is refused, as
	// without the restart.
	v3 := bytes.Replace(src, []byte("version = 2"), []byte("version = 3"), 1)
	other, err := ca.NewPolicySigner("compliance-2", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	early, err := policy.Sign("policy.hcl", v3, other.Signer(), other.Name(), other.Certificate(), time.Now().Add(-2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := g.AdoptPolicy(v3, early.Marshal()); ok || !errors.Is(err, policy.ErrBackdated) {
		t.Fatalf("a version 3 signed before the kept version 2: adopted %v, %v; want it refused as backdated", ok, err)
	}
	// One whose signer the CA never certified is not kept: only a
	// revocation is overlooked.
	foreign, err := certs.InitCA(filepath.Join(dir, "other-ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := foreign.NewPolicySigner("stranger", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	forged, err := policy.Sign("policy.hcl", v3, stranger.Signer(), stranger.Name(), stranger.Certificate(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := g.state.savePolicy(v3, forged.Marshal()); err != nil {
		t.Fatal(err)
	}
	g.prov.Close()
	g.closeDevice()
	g = open()
	if p := g.policy.Load(); p != nil {
		t.Fatalf("a stored policy of a signer this mesh's CA never certified: %s in force, want none", g.policyRevision())
	}
	if g.withdrawn.version() != "revoked v2" {
		t.Fatalf("read back from the state directory: withdrawn %+v, want version 2", g.withdrawn)
	}
}

// TestRetiredCAsPolicyKeptAcrossRestart: a policy whose signer was
// certified by a CA the mesh retired while the gateway ran (a Vault issuer
// deleted) stays in force, marked, after a restart as before it: the CA is
// no longer in the trust bundle to check the signer against, and starting
// with no policy would lift every residency limit on the tunnels. The
// state directory's word alone keeps nothing: a policy this gateway did
// not withdraw itself, of the same signer, is not kept.
func TestRetiredCAsPolicyKeptAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	retiring, err := certs.InitCA(filepath.Join(dir, "ca-retiring"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	both, err := certs.NewTrustBundle([]*x509.Certificate{ca.Certificate(), retiring.Certificate()}, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	after, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	src := []byte("policy {\n  name    = \"retired\"\n  version = 4\n}\nclass \"risk-batch\" {\n  allow \"store\" {\n    jurisdiction = [\"CH\"]\n  }\n}\n")
	signer, err := retiring.NewPolicySigner("compliance", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	sig, err := policy.Sign("policy.hcl", src, signer.Signer(), signer.Name(), signer.Certificate(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	open := restartable(t, dir, ca, both)
	g := open()
	if ok, err := g.AdoptPolicy(src, sig.Marshal()); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if !g.adoptTrust(after, time.Now()) {
		t.Fatal("the bundle without the retired CA was not adopted")
	}
	if p := g.policy.Load(); p == nil || !p.untrusted || g.withdrawn.version() != "retired v4" {
		t.Fatalf("running: %+v, withdrawn %+v; want version 4 kept, marked untrusted, and withdrawn", p, g.withdrawn)
	}
	g.prov.Close()
	g.closeDevice()
	g = open()
	if p := g.policy.Load(); p == nil || p.p.Revision().Version != 4 || !p.untrusted {
		t.Fatalf("after a restart: policy %s in force, want version 4 kept, marked untrusted", g.policyRevision())
	}
	// Withdrawn by an earlier release, which wrote no hash: kept on name
	// and version, and the hash filled in.
	if err := g.state.saveWithdrawn(withdrawnPolicy{Name: "retired", Version: 4}); err != nil {
		t.Fatal(err)
	}
	g.prov.Close()
	g.closeDevice()
	g = open()
	if p := g.policy.Load(); p == nil || !p.untrusted || g.withdrawn.SHA256 != p.p.Revision().SHA256 {
		t.Fatalf("withdrawn by an earlier release: policy %s in force, withdrawn %+v; want version 4 kept, its hash filled in", g.policyRevision(), g.withdrawn)
	}
	// Another policy of the same signer in the state directory, never in
	// force here, of the next version or of the same one: not kept.
	for _, other := range [][]byte{
		bytes.Replace(src, []byte("version = 4"), []byte("version = 5"), 1),
		append(bytes.Clone(src), "# not the one withdrawn\n"...),
	} {
		osig, err := policy.Sign("policy.hcl", other, signer.Signer(), signer.Name(), signer.Certificate(), time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if err := g.state.savePolicy(other, osig.Marshal()); err != nil {
			t.Fatal(err)
		}
		g.prov.Close()
		g.closeDevice()
		g = open()
		if p := g.policy.Load(); p != nil {
			t.Fatalf("a stored policy this gateway did not withdraw, its signer's CA retired: %s in force, want none", g.policyRevision())
		}
	}
}

// TestConfiguredPolicyMustBeInForce: a gateway whose configuration names
// a policy does not start without one in force — the file missing,
// unsigned or refused — since it would link every verified gateway; the
// policy it adopted in an earlier run is one.
func TestConfiguredPolicyMustBeInForce(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	src := []byte("policy {\n  name    = \"configured\"\n  version = 1\n}\nclass \"risk-batch\" {\n  allow \"store\" {\n    jurisdiction = [\"CH\"]\n  }\n}\n")
	pol := filepath.Join(dir, "residency.hcl")
	s := liveSettings(t, filepath.Join(dir, "gw"))
	s.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "gw", Site: "zrh-dc", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.7.1")}, time.Hour, s.Identity.Dir)
	s.PolicyFile, s.PolicySignature = pol, pol+".sig"
	start := func() error {
		g, err := newGateway(context.Background(), s, slog.New(slog.DiscardHandler), options{device: NewRecordingDevice("p"), noControl: true, noMigrations: true})
		if err == nil {
			g.prov.Close()
			g.closeDevice()
		}
		return err
	}
	for _, tc := range []struct {
		name  string
		setUp func()
		want  string
	}{
		{"missing", func() {}, "no such file"},
		{"unsigned", func() { os.WriteFile(pol, src, 0o644) }, "not signed"},
		{"signed by another CA", func() {
			other := meshCA(t, t.TempDir())
			sig, _ := policy.Sign("policy.hcl", src, other.Signer(), "other CA", nil, time.Now())
			os.WriteFile(pol+".sig", sig.Marshal(), 0o644)
		}, "does not verify"},
	} {
		tc.setUp()
		if err := start(); err == nil || !strings.Contains(err.Error(), "cannot be put in force") || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "skybridge policy sign") {
			t.Errorf("%s: %v; want a refusal to start saying %q and how to sign it", tc.name, err, tc.want)
		}
	}
	sig, err := policy.Sign("policy.hcl", src, ca.Signer(), "mesh CA", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(pol+".sig", sig.Marshal(), 0o644)
	lg := runLiveGateway(t, s, &syncbuf.Buffer{})
	lg.stop()
	if lg.err != nil {
		t.Fatal(lg.err)
	}
	// Adopted once, it is in force at the next start whatever the file.
	os.Remove(pol + ".sig")
	if err := start(); err != nil {
		t.Fatalf("with the policy adopted last run in the state directory: %v", err)
	}
	// Without a policy file the gateway starts and waits for the mesh's.
	s.PolicyFile, s.PolicySignature = "", ""
	s.StateDir = filepath.Join(dir, "fresh")
	if err := start(); err != nil {
		t.Fatalf("with no policy configured: %v", err)
	}
}

// TestPolicyTooLargeForGossip: a policy gossip could not carry is refused
// when published, not adopted here and dropped by every other gateway.
func TestPolicyTooLargeForGossip(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	g := startLiveGateway(t, ca, dir, 0, "zrh-dc", nil, &syncbuf.Buffer{}).g
	src := append([]byte("policy {\n  name    = \"large\"\n  version = 1\n}\nclass \"risk-batch\" {\n  allow \"store\" {\n    jurisdiction = [\"CH\"]\n  }\n}\n"), bytes.Repeat([]byte("# padding\n"), MaxPolicyBytes/10)...)
	sig, err := policy.Sign("policy.hcl", src, ca.Signer(), "mesh CA", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := g.AdoptPolicy(src, sig.Marshal()); ok || err == nil || !strings.Contains(err.Error(), "gossip carries at most") {
		t.Fatalf("a policy of %d bytes: adopted %v, %v", len(src), ok, err)
	}
}

// TestGatewayRefusesAdvertTooLargeToRotate: a gateway whose advert fits
// but would not during a WireGuard key rotation under load refuses to
// start, rather than fail its first scheduled rotation. The site's name
// grows a byte at a time, so the first refusal comes at the first size
// too large, which also shows the advert and the rotation's key alone
// would have fitted: the load figure and the longest signature count.
func TestGatewayRefusesAdvertTooLargeToRotate(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	last := 0 // the advert of the last gateway that started
	for n := 1; n <= 60; n++ {
		s := liveSettings(t, filepath.Join(dir, fmt.Sprintf("gw%d", n)))
		s.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "gw", Site: "s" + strings.Repeat("x", n), Region: "r-" + strings.Repeat("y", 60),
			Provider: "onprem", Jurisdiction: "CH", OverlayIP: netip.MustParseAddr("100.64.7.1")}, time.Hour, s.Identity.Dir)
		for i := range 5 {
			s.Endpoints = append(s.Endpoints, netip.AddrPortFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i + 1)}), 51820))
		}
		g, err := newGateway(context.Background(), s, slog.New(slog.DiscardHandler), options{device: NewRecordingDevice("p"), noControl: true, noMigrations: true})
		if err == nil {
			last = len(*g.advert.Load())
			g.prov.Close()
			g.closeDevice()
			continue
		}
		if last == 0 || !strings.Contains(err.Error(), "during a WireGuard key rotation") {
			t.Fatalf("site name of %d bytes: %v; want a refusal to start naming the rotation, after a start with a shorter name", n+1, err)
		}
		if last+1+certs.NextWGKeySize > certs.MaxAdvertSize {
			t.Fatalf("the refused advert would not have fitted with the next key alone (%d+1 bytes before): the test does not show the load and signature count", last)
		}
		return
	}
	t.Fatal("a 61-byte site name started: the test's advert is too small")
}

// restartable provisions gateway gw of site zrh-dc under ca in dir, and
// returns what opens it (again: a restart), with no control socket nor
// migrations.
func restartable(t *testing.T, dir string, ca *certs.CA, tb *certs.TrustBundle) func() *Gateway {
	t.Helper()
	s := liveSettings(t, filepath.Join(dir, "gw"))
	s.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "gw", Site: "zrh-dc", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.7.1")}, time.Hour, s.Identity.Dir)
	return func() *Gateway {
		g, err := newGateway(context.Background(), s, slog.New(slog.DiscardHandler), options{device: NewRecordingDevice("p"), noControl: true, noMigrations: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.prov.Close(); g.closeDevice() })
		return g
	}
}

// version names w's policy and version, whatever its hash.
func (w withdrawnPolicy) version() string { return fmt.Sprintf("%s v%d", w.Name, w.Version) }
