package certs

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/hclconf"
)

func quietLog() *slog.Logger { return slog.New(slog.DiscardHandler) }

func TestRenewalTime(t *testing.T) {
	nb := t0
	na := t0.Add(24 * time.Hour)
	for _, tc := range []struct {
		jitter  float64
		wantMin time.Duration
		wantMax time.Duration
	}{
		{0, 14*time.Hour + 52*time.Minute, 14*time.Hour + 53*time.Minute},
		{0.5, 16*time.Hour + 4*time.Minute, 16*time.Hour + 5*time.Minute},
		{1, 17*time.Hour + 16*time.Minute, 17*time.Hour + 17*time.Minute},
		{-3, 14*time.Hour + 52*time.Minute, 14*time.Hour + 53*time.Minute}, // clamped
		{7, 17*time.Hour + 16*time.Minute, 17*time.Hour + 17*time.Minute},
	} {
		got := RenewalTime(nb, na, tc.jitter).Sub(nb)
		if got < tc.wantMin || got > tc.wantMax {
			t.Errorf("jitter %v: renew after %v, want %v..%v", tc.jitter, got, tc.wantMin, tc.wantMax)
		}
	}
}

func TestProviderFileOffline(t *testing.T) {
	ca := newTestCA(t)
	attrs := testAttrs("gw1", "onprem-zrh", "100.96.0.1", "10.1.0.0/16")
	dir := filepath.Join(t.TempDir(), "id")
	ctx := context.Background()

	p, err := Open(ctx, Config{Dir: dir}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.Identity(ctx, attrs); err == nil {
		t.Fatal("identity without files or issuer")
	}
	id := issue(t, ca, attrs, time.Now(), time.Hour)
	if err := id.Save(dir, trust(t, ca)); err != nil {
		t.Fatal(err)
	}
	got, _, err := p.Identity(ctx, attrs)
	if err != nil || got.Fingerprint() != id.Fingerprint() {
		t.Fatalf("offline identity: %v", err)
	}
	other := attrs
	other.Site = "aws-eu-central-1"
	if _, _, err := p.Identity(ctx, other); err == nil || !strings.Contains(err.Error(), `(certificate → node block: site "onprem-zrh" → "aws-eu-central-1")`) {
		t.Fatalf("mismatched attributes: err = %v", err)
	}
	if err := p.KeepRenewed(ctx, id, nil, nil); err == nil || !strings.Contains(err.Error(), "cannot renew") {
		t.Fatalf("KeepRenewed without issuer: err = %v", err)
	}
}

// TestRenewalAfterWallClockJump: a renewal is due by the wall clock, which
// a VM's suspension or a step of the clock moves and the timers' monotonic
// clock does not: a gateway that wakes a minute before its certificate
// ends renews at once, not when its timer would have fired (after the end).
func TestRenewalAfterWallClockJump(t *testing.T) {
	defer func(d time.Duration) { wallCheck = d }(wallCheck)
	wallCheck = 10 * time.Millisecond
	ca := newTestCA(t)
	ctx := t.Context()
	p, err := Open(ctx, Config{Dir: filepath.Join(t.TempDir(), "id"), CADir: ca.Dir(), TTL: "1h"}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	id, _, err := p.Identity(ctx, testAttrs("gw1", "onprem-zrh", "100.96.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	var step atomic.Int64
	var read atomic.Bool // the wait has read the clock once
	p.now = func() time.Time {
		read.Store(true)
		return time.Now().Add(time.Duration(step.Load()))
	}
	renewed := make(chan struct{}, 1)
	kctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.KeepRenewed(kctx, id, nil, func(*NodeIdentity, *TrustBundle) {
			select {
			case renewed <- struct{}{}:
			default:
			}
		})
	}()
	defer func() { cancel(); <-done }() // before wallCheck is put back
	deadline := time.Now().Add(10 * time.Second)
	for !read.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	step.Store(int64(time.Until(id.Certificate().NotAfter.Add(-time.Minute))))
	select {
	case <-renewed:
	case <-time.After(10 * time.Second):
		t.Fatal("no renewal after the wall clock moved to a minute before the certificate's end")
	}
}

func TestRenewalRetryWait(t *testing.T) {
	for _, c := range []struct {
		backoff, left time.Duration
		jitter        float64
		want          time.Duration
	}{
		{time.Second, time.Hour, 0, time.Second},                             // far from the end: the backoff
		{5 * time.Minute, time.Hour, 0, 5 * time.Minute},                     // the backoff's cap
		{2 * time.Second, 3 * time.Second, 0, 1500 * time.Millisecond},       // the backoff would reach the end
		{2 * time.Second, 2 * time.Second, 0, time.Second},                   // it would be the end
		{4 * time.Second, 500 * time.Millisecond, 0, 250 * time.Millisecond}, // closer still
		{time.Second, 50 * time.Millisecond, 0, 100 * time.Millisecond},      // not a spin
		{time.Second, -time.Minute, 0, time.Second},                          // expired: the backoff again
		{time.Second, time.Hour, 1, 500 * time.Millisecond},                  // jitter takes up to half off
		{4 * time.Minute, time.Hour, 0.5, 3 * time.Minute},
		{time.Second, -time.Minute, 0.5, 750 * time.Millisecond}, // expired too
		{4 * time.Second, 2 * time.Second, 1, time.Second},       // the end still bounds it
		{time.Second, time.Hour, 7, 500 * time.Millisecond},      // out of range: clamped
		{time.Second, time.Hour, -1, time.Second},
	} {
		if got := renewalRetryWait(c.backoff, c.left, c.jitter); got != c.want {
			t.Errorf("renewalRetryWait(%v, %v, %v) = %v, want %v", c.backoff, c.left, c.jitter, got, c.want)
		}
	}
}

func TestProviderIssuesAndRenews(t *testing.T) {
	ca := newTestCA(t)
	attrs := testAttrs("gw1", "onprem-zrh", "100.96.0.1", "10.1.0.0/16")
	dir := filepath.Join(t.TempDir(), "id")
	ctx := t.Context()

	p, err := Open(ctx, Config{Dir: dir, CADir: ca.Dir(), TTL: "1h"}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	id, tb, err := p.Identity(ctx, attrs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tb.VerifyCertificate(id.Certificate(), time.Now()); err != nil {
		t.Fatal(err)
	}
	// Same attributes again: the stored identity is reused.
	again, _, err := p.Identity(ctx, attrs)
	if err != nil || again.Fingerprint() != id.Fingerprint() {
		t.Fatalf("identity was not reused: %v", err)
	}
	// New attributes: a new certificate is issued.
	moved := attrs
	moved.Routes = append(moved.Routes, mustPrefix("10.2.0.0/16"))
	re, _, err := p.Identity(ctx, moved)
	if err != nil || re.Fingerprint() == id.Fingerprint() || !re.Attributes().Grants(mustPrefix("10.2.0.0/16")) {
		t.Fatalf("attributes change did not re-issue: %v", err)
	}

	// With a 10 s TTL the CA's one-minute backdate puts the certificate
	// past two thirds of its lifetime at once, so KeepRenewed renews
	// straight away, and the renewed one about 7 s after it came.
	p, err = Open(ctx, Config{Dir: dir, CADir: ca.Dir(), TTL: "10s"}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	moved.Labels = map[string]string{"tier": "silver"}
	re, _, err = p.Identity(ctx, moved)
	if err != nil || re.Certificate().NotAfter.Sub(re.Certificate().NotBefore) > 2*time.Minute {
		t.Fatalf("short-lived identity: %v", err)
	}
	var renewals atomic.Int32
	done := make(chan *NodeIdentity, 4)
	rctx, cancel := context.WithCancel(ctx)
	go p.KeepRenewed(rctx, re, nil, func(n *NodeIdentity, _ *TrustBundle) {
		if renewals.Add(1) == 2 {
			cancel()
		}
		done <- n
	})
	deadline := time.After(20 * time.Second)
	for range 2 {
		select {
		case n := <-done:
			if n.Fingerprint() == re.Fingerprint() || !n.Attributes().Equal(re.Attributes()) {
				t.Fatal("renewal returned the old certificate or other attributes")
			}
		case <-deadline:
			t.Fatal("no renewal within 20 s")
		}
	}
	if _, err := LoadNodeIdentity(dir); err != nil {
		t.Fatalf("renewed identity not stored: %v", err)
	}
	if issued, _ := ca.Issued(); len(issued) < 4 {
		t.Fatalf("CA issued %d certificates, want at least 4", len(issued))
	}
}

// TestShortLivedNotRenewedInALoop: a certificate whose life is shorter
// than the issuer's backdate is renewed about two thirds into the time it
// has from its arrival, not at once again and again.
func TestShortLivedNotRenewedInALoop(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	ca, err := InitCA(filepath.Join(dir, "ca"), InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := Open(ctx, Config{Dir: filepath.Join(dir, "id"), CADir: ca.Dir(), TTL: "10s"}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	id, _, err := p.Identity(ctx, Attributes{Node: "gw1", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.MustParseAddr("100.96.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	var renewals atomic.Int32
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	p.KeepRenewed(rctx, id, nil, func(*NodeIdentity, *TrustBundle) { renewals.Add(1) })
	if n := renewals.Load(); n == 0 || n > 2 {
		t.Fatalf("%d renewals of a 10 s certificate in 2 s; want the one its backdate makes due at once, and not another for some 6 s", n)
	}
}

func TestConfigErrorsNameFileAndLine(t *testing.T) {
	src := `
node {
  name = "gw1"
  site = "onprem-zrh"
  region = "zrh-dc1"
  provider = "onprem"
  jurisdiction = "CH"
  overlay_ip = "100.96.0.1"
}
identity {
  backend = "vault"
  dir = "/tmp/x"
  mesh_cidr = "100.96.0.0/33"
  vault {
    pki_role = "gw"
    auth {
      method = "approle"
      role_id = "abc"
    }
  }
}
gossip {
  anything = "left for the gateway"
}
`
	path := filepath.Join(t.TempDir(), "gateway.hcl")
	os.WriteFile(path, []byte(src), 0o644)
	_, err := LoadFile(path)
	if err == nil {
		t.Fatal("bad configuration accepted")
	}
	for _, want := range []string{path + ":13:3: mesh_cidr", path + ":16: secret_id_file"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not contain %q:\n%v", want, err)
		}
	}

	var f File
	err = hclconf.Decode("x.hcl", []byte("identity {\n  dir = 5\n  bogus = 1\n}\n"), &f)
	if err == nil || !strings.Contains(err.Error(), "x.hcl:3:3") {
		t.Errorf("unknown attribute: err = %v", err)
	}

	good := strings.Replace(strings.Replace(src, "100.96.0.0/33", "100.96.0.0/16", 1), `role_id = "abc"`, `role_id = "abc"
      secret_id_env = "SECRET_ID"`, 1)
	os.WriteFile(path, []byte(good), 0o644)
	f2, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	attrs, err := f2.Node.Attributes(mustPrefix("100.96.0.0/16"))
	if err != nil || attrs.Jurisdiction != "CH" {
		t.Fatalf("node block: %+v, %v", attrs, err)
	}
	if _, err := f2.Node.Attributes(mustPrefix("100.97.0.0/16")); err == nil || !strings.Contains(err.Error(), path+":2:") {
		t.Fatalf("overlay outside mesh: err = %v", err)
	}
}

func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// TestProviderKeepsNewerCRL: a CA directory restored from a backup older
// than the gateway's revocation list does not make the gateway forget a
// revocation, and the CA's next list carries on above it.
func TestProviderKeepsNewerCRL(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "id")
	ctx := t.Context()
	backup, err := ca.CRLPEM()
	if err != nil {
		t.Fatal(err)
	}
	indexBackup, err := os.ReadFile(filepath.Join(ca.Dir(), fileIndex))
	if err != nil {
		t.Fatal(err)
	}
	victim := issue(t, ca, testAttrs("gw9", "s", "100.96.0.9"), time.Now(), time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{victim.Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	p, err := Open(ctx, Config{Dir: dir, CADir: ca.Dir(), TTL: "1h"}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Trust(ctx); err != nil { // caches the list with the revocation
		t.Fatal(err)
	}
	// The CA directory restored from the backup: list and index.
	if err := os.WriteFile(filepath.Join(ca.Dir(), fileCRL), backup, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ca.Dir(), fileIndex), indexBackup, 0o600); err != nil {
		t.Fatal(err)
	}
	tb, err := p.Trust(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tb.VerifyCertificate(victim.Certificate(), time.Now()); !errors.Is(err, ErrRevoked) {
		t.Fatalf("the revoked gateway after the CA's list went back: %v, want revoked", err)
	}
	if cached, err := LoadTrustBundle(dir, netip.Prefix{}); err != nil || cached.CRL() == nil || cached.CRL().Number.Cmp(tb.CRL().Number) != 0 {
		t.Fatalf("the cached list was replaced by the older one: %v", err)
	}
	// The CA takes the newer list back, so its next carries on from it
	// (numbered above what the mesh holds) with the revocation.
	other := issue(t, ca, testAttrs("gw8", "s", "100.96.0.8"), time.Now(), time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{other.Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	next, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	if next.CRL().Number.Cmp(tb.CRL().Number) <= 0 {
		t.Fatalf("the CA's next list is number %v, not above the mesh's %v: gateways would ignore it", next.CRL().Number, tb.CRL().Number)
	}
	for _, v := range []*NodeIdentity{victim, other} {
		if _, err := next.VerifyCertificate(v.Certificate(), time.Now()); !errors.Is(err, ErrRevoked) {
			t.Errorf("%s on the CA's next list: %v, want revoked", v.Attributes().Node, err)
		}
	}
}

// TestProviderMeshRangeOfLocalCA: with ca_dir, the configured overlay
// range is checked against the CA's, as the trust bundle read from the
// identity directory checks it: a range the CA does not hold is refused at
// the start, not left to surface as refused addresses.
func TestProviderMeshRangeOfLocalCA(t *testing.T) {
	ca := newTestCA(t) // 100.96.0.0/16
	for cidr, want := range map[string]string{
		"100.96.0.0/16": "",
		"100.64.0.0/10": "is not inside 100.96.0.0/16",
		"10.0.0.0/16":   "is not inside 100.96.0.0/16",
	} {
		p, err := Open(t.Context(), Config{Dir: filepath.Join(t.TempDir(), "id"), CADir: ca.Dir(), TTL: "1h", MeshCIDR: cidr}, quietLog())
		if want == "" {
			if err != nil {
				t.Errorf("mesh_cidr %s, the CA's own: %v", cidr, err)
			} else {
				p.Close()
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "mesh_cidr") {
			t.Errorf("mesh_cidr %s: %v; want it refused (%s)", cidr, err, want)
		}
	}
}

// TestProviderClockBehindIssuer: a gateway whose clock runs 3 minutes
// behind its CA's takes the certificate the CA issues it (valid from a
// minute before the CA's now): it used to refuse every one as not yet
// valid, at every renewal, until its certificate ran out.
func TestProviderClockBehindIssuer(t *testing.T) {
	ca := newTestCA(t)
	ctx := t.Context()
	p, err := Open(ctx, Config{Dir: filepath.Join(t.TempDir(), "id"), CADir: ca.Dir(), TTL: "1h"}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	p.now = func() time.Time { return time.Now().Add(-3 * time.Minute) }
	id, _, err := p.Identity(ctx, testAttrs("gw1", "onprem-zrh", "100.96.0.1"))
	if err != nil {
		t.Fatalf("identity with the clock 3 minutes behind the CA's: %v", err)
	}
	if again, _, err := p.Identity(ctx, testAttrs("gw1", "onprem-zrh", "100.96.0.1")); err != nil || again.Fingerprint() != id.Fingerprint() {
		t.Fatalf("the stored identity, read back on the same clock: %v (reused: %v)", err, err == nil && again.Fingerprint() == id.Fingerprint())
	}
}

// downIssuer is an issuer that cannot be reached, as Vault during an
// outage.
type downIssuer struct{}

func (downIssuer) Sign(context.Context, []byte, Attributes, time.Duration) (*x509.Certificate, error) {
	return nil, errVaultAwaited
}
func (downIssuer) Trust(context.Context) (*TrustBundle, error) { return nil, errVaultAwaited }
func (downIssuer) Revoke(context.Context, *big.Int) error      { return errVaultAwaited }

// TestProviderKeepsCertificateIssuerDown: a gateway that starts while its
// issuer cannot be reached, with a certificate past its renewal time but
// still valid, keeps that certificate (it used to dereference the
// failed renewal's nil bundle).
func TestProviderKeepsCertificateIssuerDown(t *testing.T) {
	ca := newTestCA(t)
	ctx := t.Context()
	attrs := testAttrs("gw1", "onprem-zrh", "100.96.0.1")
	p, err := Open(ctx, Config{Dir: filepath.Join(t.TempDir(), "id"), CADir: ca.Dir(), TTL: "1h"}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	id, _, err := p.Identity(ctx, attrs)
	if err != nil {
		t.Fatal(err)
	}
	p.issuer = downIssuer{}
	p.now = func() time.Time { return id.Certificate().NotBefore.Add(50 * time.Minute) } // past 72 %, before the end
	kept, tb, err := p.Identity(ctx, attrs)
	if err != nil || kept.Fingerprint() != id.Fingerprint() {
		t.Fatalf("identity past its renewal time with the issuer down: %v (kept: %v)", err, err == nil && kept.Fingerprint() == id.Fingerprint())
	}
	if tb == nil {
		t.Fatal("no trust bundle with the kept identity")
	}
	// Past its end, there is nothing to keep.
	p.now = func() time.Time { return id.Certificate().NotAfter.Add(time.Minute) }
	if _, _, err := p.Identity(ctx, attrs); !errors.Is(err, errVaultAwaited) {
		t.Fatalf("identity past its end with the issuer down: %v; want the issuer's error", err)
	}
}

// TestConfigBounds: an identity configuration whose numbers would loop
// (a certificate shorter-lived than its renewal, a refresh of every
// nanosecond) or whose overlay range is no mesh's is refused, saying
// what would do.
func TestConfigBounds(t *testing.T) {
	for _, tc := range []struct {
		c    Config
		want string // "" if accepted
	}{
		{Config{Dir: "/x", TTL: "24h", Refresh: "1m", MeshCIDR: "100.96.0.0/16"}, ""},
		{Config{Dir: "/x", TTL: "9s"}, "too short a certificate life: at least 10s"},
		{Config{Dir: "/x", TTL: "1ns"}, "too short"},
		{Config{Dir: "/x", Refresh: "1ns"}, "between 1s and 1h0m0s"},
		{Config{Dir: "/x", MeshCIDR: "0.0.0.0/0"}, "is not private or shared address space"},
		{Config{Dir: "/x", MeshCIDR: "8.8.0.0/16"}, "is not private or shared address space"},
		{Config{Dir: "/x", MeshCIDR: "127.0.0.0/8"}, "is not private or shared address space"},
		{Config{Dir: "/x", MeshCIDR: "100.96.0.0/31"}, "holds 0 gateway addresses"},
	} {
		_, err := tc.c.validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v, want %q", tc.c, err, tc.want)
		}
	}
	// A range other than the one the CA names certifies nothing.
	ca, err := InitCA(filepath.Join(t.TempDir(), "ca"), InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := LoadTrustBundle(ca.Dir(), netip.MustParsePrefix("10.0.0.0/16")); err == nil || !strings.Contains(err.Error(), "is not inside "+ca.MeshPrefix().String()) {
		t.Fatalf("a configured range outside the CA's: %v", err)
	}
	if _, err := LoadTrustBundle(ca.Dir(), netip.MustParsePrefix("100.64.0.0/10")); err == nil {
		t.Fatal("a configured range wider than the CA's accepted")
	}
	for _, p := range []netip.Prefix{ca.MeshPrefix(), netip.PrefixFrom(ca.MeshPrefix().Addr(), ca.MeshPrefix().Bits()+4)} {
		if tb, err := LoadTrustBundle(ca.Dir(), p); err != nil || tb.MeshPrefix() != p {
			t.Fatalf("a range inside the CA's, %s: %v", p, err)
		}
	}
}

// TestVaultAuthRefusesWhatItsMethodIgnores: AppRole settings beside
// method = "token" were ignored, and the gateway logged in with whatever
// token $VAULT_TOKEN held; token_file beside approle likewise.
func TestVaultAuthRefusesWhatItsMethodIgnores(t *testing.T) {
	for _, tc := range []struct {
		auth VaultAuth
		want string
	}{
		{VaultAuth{Method: "token", RoleID: "r", SecretIDFile: "/run/sid"}, "role_id is for method = \"approle\""},
		{VaultAuth{Method: "token", Wrapped: true}, "wrapped is for method = \"approle\""},
		{VaultAuth{Method: "approle", RoleID: "r", SecretIDFile: "/run/sid", TokenFile: "/t"}, "token_file is for method = \"token\""},
		{VaultAuth{Method: "token", TokenFile: "/t"}, ""},
	} {
		c := Config{Dir: "/x", Backend: BackendVault, Vault: &VaultConfig{PKIRole: "r", Auth: tc.auth}}
		_, err := c.validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v; want %q", tc.auth, err, tc.want)
		}
	}
}

// answerIssuer is an issuer that answers Trust with a fixed bundle.
type answerIssuer struct{ tb *TrustBundle }

func (answerIssuer) Sign(context.Context, []byte, Attributes, time.Duration) (*x509.Certificate, error) {
	return nil, errors.New("not here")
}
func (a answerIssuer) Trust(context.Context) (*TrustBundle, error) { return a.tb, nil }
func (answerIssuer) Revoke(context.Context, *big.Int) error        { return errors.New("not here") }

// TestProviderIssuerListBehind: the issuer answers with a list numbered
// below the one kept (restored from a snapshot) that revokes a gateway:
// Trust revokes it too, keeps the list held in force, and keeps both on
// disk.
func TestProviderIssuerListBehind(t *testing.T) {
	ca := newTestCA(t)
	a := issue(t, ca, testAttrs("gw-a", "zrh", "100.96.0.1"), t0, 24*time.Hour)
	b := issue(t, ca, testAttrs("gw-b", "zrh", "100.96.0.2"), t0, 24*time.Hour)
	cas := []*x509.Certificate{ca.Certificate()}
	dir := t.TempDir()
	if err := bundleOf(t, cas, listOfCA(t, ca, 10, a)).Save(dir); err != nil {
		t.Fatal(err)
	}
	p := &Provider{s: &settings{dir: dir}, issuer: answerIssuer{bundleOf(t, cas, listOfCA(t, ca, 2, b))}, log: quietLog(), now: time.Now}
	tb, err := p.Trust(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadTrustBundle(dir, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	for name, tb := range map[string]*TrustBundle{"answered": tb, "kept on disk": loaded} {
		if !tb.IsRevoked(a.Certificate().SerialNumber) || !tb.IsRevoked(b.Certificate().SerialNumber) || tb.CRL().Number.Int64() != 10 {
			t.Errorf("%s: a revoked %v, b (by the issuer) revoked %v, list in force %v; want both revoked, 10 in force", name,
				tb.IsRevoked(a.Certificate().SerialNumber), tb.IsRevoked(b.Certificate().SerialNumber), tb.CRL().Number)
		}
	}
}

// TestSaveTrustKeepsNewerList: a bundle saved over one with a newer list
// of its CA (Trust's load, merge and save run outside the gateway's lock,
// which may save a list from gossip meanwhile) keeps the newer list.
func TestSaveTrustKeepsNewerList(t *testing.T) {
	ca := newTestCA(t)
	a := issue(t, ca, testAttrs("gw-a", "zrh", "100.96.0.1"), t0, 24*time.Hour)
	cas := []*x509.Certificate{ca.Certificate()}
	dir := t.TempDir()
	p := &Provider{s: &settings{dir: dir}, log: quietLog(), now: time.Now}
	if err := p.SaveTrust(bundleOf(t, cas, listOfCA(t, ca, 5, a))); err != nil {
		t.Fatal(err)
	}
	if err := p.SaveTrust(bundleOf(t, cas, listOfCA(t, ca, 4))); err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadTrustBundle(dir, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if loaded.CRL().Number.Int64() != 5 || !loaded.IsRevoked(a.Certificate().SerialNumber) {
		t.Errorf("after an older bundle was saved: list %v in force, a revoked %v; want 5, revoked", loaded.CRL().Number, loaded.IsRevoked(a.Certificate().SerialNumber))
	}
}

func TestNextRenewalBackoff(t *testing.T) {
	for _, c := range []struct{ backoff, left, want time.Duration }{
		{time.Second, time.Hour, 2 * time.Second},             // doubled
		{4 * time.Minute, 24 * time.Hour, 5 * time.Minute},    // up to 5 minutes
		{time.Minute, 10 * time.Minute, time.Minute},          // a tenth of what is left
		{4 * time.Second, 10 * time.Second, 5 * time.Second},  // not under 5 s
		{4 * time.Second, -time.Second, 8 * time.Second},      // ended: still doubled
		{4 * time.Minute, -time.Hour, 5 * time.Minute},        // ended: up to 5 minutes
		{refusedRenewalWait, -time.Hour, 5 * time.Minute},     // after a refusal's wait
		{refusedRenewalWait, 24 * time.Hour, 5 * time.Minute}, // likewise while valid
	} {
		if got := nextRenewalBackoff(c.backoff, c.left); got != c.want {
			t.Errorf("nextRenewalBackoff(%v, %v) = %v, want %v", c.backoff, c.left, got, c.want)
		}
	}
	// Once ended, the retries come ever less often, not every few
	// seconds for ever.
	backoff := time.Second
	for range 20 {
		backoff = nextRenewalBackoff(backoff, -time.Minute)
	}
	if backoff != 5*time.Minute {
		t.Errorf("backoff after 20 failures past the end: %v, want 5m", backoff)
	}
}

// TestRenewalRefused: a renewal refused for good waits the hour: the CA
// holder's refusal without an issuer, Vault's refusal of the login with
// one, as withLogin words it (the request's error first).
func TestRenewalRefused(t *testing.T) {
	loginRefused := fmt.Errorf("vault pki/sign/r: %w", fmt.Errorf("%w (and logging in again: %w)", errors.New("permission denied"), fmt.Errorf("vault approle login: %w: invalid secret id", ErrVaultLoginRefused)))
	for _, c := range []struct {
		err        error
		withIssuer bool
		want       bool
	}{
		{refusal{errors.New("revoked")}, false, true},
		{errors.New("connection refused"), false, false},
		{loginRefused, true, true},
		{fmt.Errorf("vault refuses this gateway's login: %w", loginRefused), true, true},
		{errVaultAwaited, true, false},
		{refusal{errors.New("revoked")}, true, false}, // an issuer's own refusal is not the CA holder's
	} {
		if got := renewalRefused(c.err, c.withIssuer); got != c.want {
			t.Errorf("renewalRefused(%v, issuer %v) = %v, want %v", c.err, c.withIssuer, got, c.want)
		}
	}
}
