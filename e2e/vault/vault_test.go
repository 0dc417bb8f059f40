package vault

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/builtin/credential/approle"
	"github.com/hashicorp/vault/builtin/logical/pki"
	vaulthttp "github.com/hashicorp/vault/http"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/vault"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

var meshPrefix = netip.MustParsePrefix("100.96.0.0/16")

// env is one Vault set up for skybridge: a PKI mount with a root CA and a
// gateway role, a KV v2 mount, and an AppRole for gateways.
type env struct {
	addr, caFile string
	root         *api.Client
	pki, kv      string // mount paths, unique per test so an external Vault is shared safely
	approleMount string
	role         string
}

// startVault returns a Vault to test against and says which one.
func startVault(t *testing.T) *env {
	t.Helper()
	e := &env{}
	if addr, tok := os.Getenv("VAULT_ADDR"), os.Getenv("VAULT_TOKEN"); addr != "" && tok != "" {
		t.Logf("using external Vault at %s (VAULT_ADDR/VAULT_TOKEN are set)", addr)
		c, err := api.NewClient(api.DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		e.addr, e.caFile, e.root = addr, os.Getenv("VAULT_CACERT"), c
	} else {
		cluster := vault.NewTestCluster(t, &vault.CoreConfig{
			LogicalBackends:    map[string]logical.Factory{"pki": pki.Factory},
			CredentialBackends: map[string]logical.Factory{"approle": approle.Factory},
		}, &vault.TestClusterOptions{HandlerFunc: vaulthttp.Handler, NumCores: 1, Logger: quietHCLog()})
		cluster.Start()
		t.Cleanup(cluster.Cleanup)
		vault.TestWaitActive(t, cluster.Cores[0].Core)
		core := cluster.Cores[0]
		t.Logf("using in-process Vault core v1.19.5 at %s", core.Client.Address())
		e.addr, e.caFile, e.root = core.Client.Address(), cluster.CACertPEMFile, core.Client
	}
	suffix := randHex(4)
	e.pki, e.kv, e.approleMount, e.role = "pki-"+suffix, "kv-"+suffix, "approle-"+suffix, "skybridge-gateway"
	t.Cleanup(func() {
		e.root.Sys().Unmount(e.pki)
		e.root.Sys().Unmount(e.kv)
		e.root.Sys().DisableAuth(e.approleMount)
	})
	must(t, e.root.Sys().Mount(e.pki, &api.MountInput{Type: "pki", Config: api.MountConfigInput{MaxLeaseTTL: "87600h"}}))
	must(t, e.root.Sys().Mount(e.kv, &api.MountInput{Type: "kv", Options: map[string]string{"version": "2"}}))
	must(t, e.root.Sys().EnableAuthWithOptions(e.approleMount, &api.EnableAuthOptions{Type: "approle"}))
	write(t, e.root, e.pki+"/root/generate/internal", map[string]any{"common_name": "bank mesh root " + suffix, "key_type": "ec", "key_bits": 256, "ttl": "8760h"})
	e.setRole(t, "skybridge://*")
	policy := fmt.Sprintf(`
path "%[1]s/sign/%[2]s" { capabilities = ["update"] }
path "%[1]s/cert/*"     { capabilities = ["read"] }
path "%[1]s/issuer/+"   { capabilities = ["read"] }
path "%[1]s/revoke"     { capabilities = ["update"] }
path "%[3]s/data/skybridge/*"     { capabilities = ["create", "read", "update"] }
path "%[3]s/metadata/skybridge/*" { capabilities = ["read"] }
`, e.pki, e.role, e.kv)
	must(t, e.root.Sys().PutPolicy("gateway-"+suffix, policy))
	t.Cleanup(func() { e.root.Sys().DeletePolicy("gateway-" + suffix) })
	write(t, e.root, "auth/"+e.approleMount+"/role/gateway", map[string]any{"token_policies": "gateway-" + suffix, "token_ttl": "1h", "token_max_ttl": "4h"})
	return e
}

// setRole (re)writes the PKI role; allowedURIs limits which attribute URIs
// (sites) the role will certify.
func (e *env) setRole(t *testing.T, allowedURIs string) {
	write(t, e.root, e.pki+"/roles/"+e.role, map[string]any{
		"allow_any_name": true, "enforce_hostnames": false, "allow_ip_sans": true,
		"allowed_uri_sans": allowedURIs, "key_type": "ec", "key_bits": 256,
		"server_flag": true, "client_flag": true, "max_ttl": "72h", "not_before_duration": "1s",
	})
}

// appRole returns a role ID file and a secret ID file for the gateway
// AppRole; wrapped makes the secret ID a one-time response-wrapping token.
func (e *env) appRole(t *testing.T, dir string, wrapped bool) (roleFile, secretFile string) {
	s, err := e.root.Logical().Read("auth/" + e.approleMount + "/role/gateway/role-id")
	if err != nil {
		t.Fatal(err)
	}
	roleFile = filepath.Join(dir, "role-id")
	os.WriteFile(roleFile, []byte(s.Data["role_id"].(string)), 0o600)
	c, err := e.root.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(e.root.Token())
	if wrapped {
		c.SetWrappingLookupFunc(func(string, string) string { return "5m" })
	}
	s, err = c.Logical().Write("auth/"+e.approleMount+"/role/gateway/secret-id", nil)
	if err != nil {
		t.Fatal(err)
	}
	val := ""
	if wrapped {
		val = s.WrapInfo.Token
	} else {
		val = s.Data["secret_id"].(string)
	}
	secretFile = filepath.Join(dir, "secret-id")
	os.WriteFile(secretFile, []byte(val), 0o600)
	return roleFile, secretFile
}

// approleConfig is the identity configuration of a gateway that logs in
// with an AppRole SecretID of its own, unwrapped, kept in dir (secretFile,
// for tests that take it away).
func (e *env) approleConfig(t *testing.T, dir string) (cfg certs.Config, secretFile string) {
	roleFile, secretFile := e.appRole(t, dir, false)
	return e.config(filepath.Join(dir, "id"), certs.VaultAuth{Method: "approle", RoleIDFile: roleFile, SecretIDFile: secretFile}), secretFile
}

// eachToken calls f with the accessor and lookup of every token Vault
// holds (a token gone meanwhile is skipped).
func (e *env) eachToken(t *testing.T, f func(accessor any, tok map[string]any)) {
	t.Helper()
	list, err := e.root.Logical().List("auth/token/accessors")
	must(t, err)
	for _, a := range list.Data["keys"].([]any) {
		tok, err := e.root.Logical().Write("auth/token/lookup-accessor", map[string]any{"accessor": a})
		if err == nil && tok != nil {
			f(a, tok.Data)
		}
	}
}

func (e *env) config(dir string, auth certs.VaultAuth) certs.Config {
	auth.Mount = e.approleMount
	return certs.Config{
		Backend: certs.BackendVault, Dir: dir, MeshCIDR: meshPrefix.String(), TTL: "24h",
		Vault: &certs.VaultConfig{Address: e.addr, CACert: e.caFile, PKIMount: e.pki, PKIRole: e.role, KVMount: e.kv, KVPrefix: "skybridge", Auth: auth},
	}
}

func attrs(node, site, overlay string) certs.Attributes {
	return certs.Attributes{
		Node: node, Site: site, Region: "eu-central-1", Provider: "aws", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr(overlay), Routes: []netip.Prefix{netip.MustParsePrefix("10.20.0.0/16")},
		Labels: map[string]string{"classes": "pii-eu"},
	}
}

func TestVaultIdentityLifecycle(t *testing.T) {
	e := startVault(t)
	ctx := t.Context()
	dir := t.TempDir()
	roleFile, secretFile := e.appRole(t, dir, true)
	idDir := filepath.Join(dir, "identity")
	cfg := e.config(idDir, certs.VaultAuth{Method: "approle", RoleIDFile: roleFile, SecretIDFile: secretFile, Wrapped: true})

	p, err := certs.Open(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("open with wrapped AppRole secret ID: %v", err)
	}
	defer p.Close()

	// A wrapped secret ID is single use: a second login with it fails.
	if _, err := certs.Open(ctx, cfg, slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("wrapped secret ID was accepted twice")
	}

	a := attrs("gw-fra-1", "aws-eu-central-1", "100.96.1.1")
	id, tb, err := p.Identity(ctx, a)
	if err != nil {
		t.Fatalf("identity from Vault PKI: %v", err)
	}
	cert := id.Certificate()
	if got := id.Attributes(); !got.Equal(&a) {
		t.Fatalf("Vault certified %+v, asked %+v", got, a)
	}
	if life := cert.NotAfter.Sub(cert.NotBefore); life < 23*time.Hour || life > 25*time.Hour {
		t.Errorf("certificate lifetime %v, want about the configured 24h", life)
	}
	if tb.CAs()[0].Subject.CommonName == "" || !strings.HasPrefix(tb.CAs()[0].Subject.CommonName, "bank mesh root") {
		t.Errorf("trust bundle CA = %q", tb.CAs()[0].Subject.CommonName)
	}
	// The identity is cached on disk with the key at 0600, so a restart
	// while Vault is down keeps the gateway's identity.
	st, err := os.Stat(filepath.Join(idDir, "node.key"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("cached key: %v %v", st, err)
	}
	again, _, err := p.Identity(ctx, a)
	if err != nil || again.Fingerprint() != id.Fingerprint() {
		t.Fatalf("second Identity call re-issued (%v)", err)
	}

	// The same verifier that serves the embedded CA accepts a Vault-issued
	// identity's signed advert.
	wg, err := p.Secrets().WireGuardKey(ctx, a.Node)
	if err != nil {
		t.Fatal(err)
	}
	proof, err := certs.ProveWGKey(wg, id.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := certs.SignAdvert(&certs.Advert{
		Version: 1, Timestamp: time.Now(), Node: a.Node, Site: a.Site, Region: a.Region, Provider: a.Provider,
		Jurisdiction: a.Jurisdiction, OverlayIP: a.OverlayIP, Routes: a.Routes, WireGuardKey: wg.Public(), WireGuardKeyProof: proof,
	}, id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certs.VerifyAdvert(raw, cert, tb, time.Now(), nil); err != nil {
		t.Fatalf("advert of a Vault identity refused: %v", err)
	}

	// Secrets live in KV v2 and are stable: the same WireGuard key on every
	// call, one gossip keyring for the whole mesh.
	wg2, err := p.Secrets().WireGuardKey(ctx, a.Node)
	if err != nil || wg2.Public() != wg.Public() {
		t.Fatalf("WireGuard key changed between calls: %v", err)
	}
	kr, err := p.Secrets().GossipKeyring(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := e.root.KVv2(e.kv).Get(ctx, "skybridge/nodes/gw-fra-1/wireguard")
	if err != nil || kv.Data["private_key"] != wg.Base64Secret() {
		t.Fatalf("WireGuard key not in KV v2 where documented: %v", err)
	}
	// A rotation stores the new key as a new version; the gateway's next
	// start reads it.
	rotated, err := certs.GenerateWGKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Secrets().SetWireGuardKey(ctx, a.Node, rotated); err != nil {
		t.Fatal(err)
	}
	if got, err := p.Secrets().WireGuardKey(ctx, a.Node); err != nil || got.Public() != rotated.Public() {
		t.Fatalf("after a rotation the stored key is %v (err %v), want the new one", got.Public(), err)
	}
	if v, err := e.root.KVv2(e.kv).GetVersionsAsList(ctx, "skybridge/nodes/gw-fra-1/wireguard"); err != nil || len(v) != 2 {
		t.Errorf("KV versions after one rotation: %d (err %v), want 2", len(v), err)
	}

	// A second gateway (token auth this time) shares the keyring, and a
	// rotation by one is seen by the other.
	tokFile := filepath.Join(dir, "token")
	os.WriteFile(tokFile, []byte(e.root.Token()), 0o600)
	p2, err := certs.Open(ctx, e.config(filepath.Join(dir, "id2"), certs.VaultAuth{Method: "token", TokenFile: tokFile}), nil)
	if err != nil {
		t.Fatalf("token auth: %v", err)
	}
	defer p2.Close()
	kr2, err := p2.Secrets().GossipKeyring(ctx)
	if err != nil || string(kr2.Primary()) != string(kr.Primary()) {
		t.Fatalf("second gateway got another gossip keyring: %v", err)
	}
	newKey, _ := certs.NewGossipKey()
	err = p2.Secrets().UpdateGossipKeyring(ctx, func(cur *certs.GossipKeyring) (*certs.GossipKeyring, error) {
		return certs.NewGossipKeyring(append(cur.Keys(), newKey))
	})
	if err != nil {
		t.Fatal(err)
	}
	kr, err = p.Secrets().GossipKeyring(ctx)
	if err != nil || kr.Len() != 2 {
		t.Fatalf("rotation not visible to the first gateway: %d keys, %v", kr.Len(), err)
	}

	// Revocation through Vault reaches the trust bundle and the verifier.
	if err := p.Issuer().Revoke(ctx, cert.SerialNumber); err != nil {
		t.Fatal(err)
	}
	tb2, err := p.Trust(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certs.VerifyAdvert(raw, cert, tb2, time.Now(), nil); !errors.Is(err, certs.ErrRevoked) {
		t.Fatalf("advert of a revoked Vault identity: err = %v, want revoked", err)
	}
	// ...and the provider replaces the revoked identity with a new one.
	fresh, _, err := p.Identity(ctx, a)
	if err != nil || fresh.Certificate().SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Fatalf("revoked identity not replaced: %v", err)
	}
}

// TestVaultRoleLimitsSites: a role that only certifies one site refuses a
// gateway asking for another, so a compromised AppRole of one site cannot
// impersonate another; one that pins the site's place refuses a gateway
// of the site claiming another jurisdiction.
func TestVaultRoleLimitsSites(t *testing.T) {
	e := startVault(t)
	e.setRole(t, "skybridge://onprem-zrh/*")
	ctx := t.Context()
	dir := t.TempDir()
	cfg, secretFile := e.approleConfig(t, dir)
	// A SecretID others may read is refused, as a key would be.
	must(t, os.Chmod(secretFile, 0o640))
	if _, err := certs.Open(ctx, cfg, nil); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a secret_id_file others may read: %v", err)
	}
	must(t, os.Chmod(secretFile, 0o600))
	p, err := certs.Open(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, _, err := p.Identity(ctx, attrs("gw-zrh-1", "onprem-zrh", "100.96.0.1")); err != nil {
		t.Fatalf("own site refused: %v", err)
	}
	_, _, err = p.Identity(ctx, attrs("gw-zrh-1", "aws-us-east-1", "100.96.0.1"))
	if err == nil || !strings.Contains(err.Error(), "URI") {
		t.Fatalf("other site: err = %v, want Vault to refuse the URI SAN", err)
	}
	// A pattern that pins the site's place too (the canonical URI puts
	// provider, region and jurisdiction first, and nothing else can hold
	// a '?'): a gateway of the site cannot claim another jurisdiction.
	e.setRole(t, "skybridge://onprem-zrh/*?provider=aws&region=eu-central-1&jurisdiction=DE*")
	if _, _, err := p.Identity(ctx, attrs("gw-zrh-2", "onprem-zrh", "100.96.0.2")); err != nil {
		t.Fatalf("own site and place refused: %v", err)
	}
	elsewhere := attrs("gw-zrh-2", "onprem-zrh", "100.96.0.2")
	elsewhere.Jurisdiction = "CH"
	if _, _, err := p.Identity(ctx, elsewhere); err == nil || !strings.Contains(err.Error(), "URI") {
		t.Fatalf("own site in another jurisdiction: err = %v, want Vault to refuse the URI SAN", err)
	}
}

// TestVaultRenewal: certificates renew at about two thirds of their
// lifetime, and the AppRole token is renewed and then re-obtained by a new
// login when it reaches its maximum TTL, without the caller noticing.
func TestVaultRenewal(t *testing.T) {
	e := startVault(t)
	write(t, e.root, "auth/"+e.approleMount+"/role/gateway", map[string]any{"token_ttl": "2s", "token_max_ttl": "4s"})
	ctx := t.Context()
	dir := t.TempDir()
	cfg, _ := e.approleConfig(t, dir)
	cfg.TTL = "10s" // the shortest a configuration may ask for
	var logs syncbuf.Buffer
	p, err := certs.Open(ctx, cfg, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	id, _, err := p.Identity(ctx, attrs("gw-fra-2", "aws-eu-central-1", "100.96.1.2"))
	if err != nil {
		t.Fatal(err)
	}
	obtained := time.Now() // no earlier than the provider's own record of it
	start := obtained
	renewed := make(chan *certs.NodeIdentity, 8)
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go p.KeepRenewed(rctx, id, nil, func(n *certs.NodeIdentity, _ *certs.TrustBundle) { renewed <- n })

	// The documented rule, worked out here rather than asked of
	// certs.RenewalTime, the function under test: at about two thirds
	// (62-72 %, spread so a fleet does not renew at once) of the
	// certificate's life, counted from when it was obtained (Vault
	// backdates NotBefore). So between the rule applied from NotBefore
	// at 62 % and from the test's obtained, which is no earlier, at
	// 72 %. A renewal arriving before the first came surely early: it
	// cannot arrive before it is made. Arriving after the second, it is
	// late by more than a renewal takes (2 s allowed for a loaded
	// machine; in-process Vault signs in tens of milliseconds).
	at := func(from, notAfter time.Time, frac float64) time.Time {
		return from.Add(time.Duration(frac * float64(notAfter.Sub(from))))
	}
	// Three renewals of an 11 s certificate take more than twice the
	// token's 4 s maximum TTL, so they only succeed if re-login works.
	prev := id
	deadline := time.After(45 * time.Second)
	for i := range 3 {
		select {
		case n := <-renewed:
			arrived := time.Now()
			pc := prev.Certificate()
			if n.Fingerprint() == prev.Fingerprint() {
				t.Fatal("renewal returned the same certificate")
			}
			earliest, latest := at(pc.NotBefore, pc.NotAfter, 0.62), at(obtained, pc.NotAfter, 0.72).Add(2*time.Second)
			if arrived.Before(earliest) || arrived.After(latest) {
				t.Errorf("renewal %d arrived %s after the previous certificate's NotBefore, outside %s-%s (62-72 %% of its %s life, counted from when it was obtained)",
					i+1, arrived.Sub(pc.NotBefore).Round(time.Millisecond), earliest.Sub(pc.NotBefore).Round(time.Millisecond), latest.Sub(pc.NotBefore).Round(time.Millisecond), pc.NotAfter.Sub(pc.NotBefore))
			}
			if arrived.After(pc.NotAfter) {
				t.Errorf("renewal %d came after the previous certificate expired", i+1)
			}
			prev, obtained = n, arrived
		case <-deadline:
			t.Fatalf("only %d renewals within 45 s", i)
		}
	}
	// The renewals could also have gone through on logins made when
	// Vault refused the expired token: the watcher's own renewal and
	// login again at the maximum TTL are what is tested here.
	if !strings.Contains(logs.String(), "vault token renewed") {
		t.Errorf("the token was never renewed within its maximum TTL:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "vault login renewed by logging in again") {
		t.Errorf("no login again at the token's maximum TTL, %s into the test (4 s allowed):\n%s", time.Since(start).Round(time.Second), logs.String())
	}
}

// TestVaultReloginWhenTokenRefused: a token revoked (or expired) before
// its watcher notices is refused by Vault; the request that met the
// refusal logs in again at once and succeeds, instead of failing until
// the watcher catches up — a certificate renewal must not wait for it. A
// login that fails leaves the old token, and a later request recovers.
func TestVaultReloginWhenTokenRefused(t *testing.T) {
	e := startVault(t)
	ctx := t.Context()
	dir := t.TempDir()
	cfg, secretFile := e.approleConfig(t, dir)
	var logs syncbuf.Buffer
	p, err := certs.Open(ctx, cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	// Revoke the tokens logged in through this test's AppRole mount (an
	// external Vault has others, not ours to touch): the gateway's
	// hour-long token is then invalid, and its watcher would not renew it
	// for 40 minutes.
	revokeGateway := func() {
		revoked := 0
		e.eachToken(t, func(accessor any, tok map[string]any) {
			if tok["path"] != "auth/"+e.approleMount+"/login" {
				return // not ours
			}
			write(t, e.root, "auth/token/revoke-accessor", map[string]any{"accessor": accessor})
			revoked++
		})
		if revoked == 0 {
			t.Fatal("no gateway token to revoke")
		}
	}
	relogins := func() int { return strings.Count(logs.String(), "vault refused the token: logged in again") }

	// Issuing signs with Vault's PKI, which needs the token.
	revokeGateway()
	id, _, err := p.Identity(ctx, attrs("gw-fra-3", "aws-eu-central-1", "100.96.1.3"))
	if err != nil {
		t.Fatalf("identity with a revoked token: %v", err)
	}
	if id.Attributes().Node != "gw-fra-3" {
		t.Fatalf("certified %+v", id.Attributes())
	}
	if n := relogins(); n != 1 {
		t.Fatalf("logged in again %d times, want once:\n%s", n, logs.String())
	}
	// KV too: the WireGuard key, with the login made above revoked.
	revokeGateway()
	if _, err := p.Secrets().WireGuardKey(ctx, "gw-fra-3"); err != nil {
		t.Fatalf("WireGuard key with a revoked token: %v", err)
	}
	if n := relogins(); n != 2 {
		t.Fatalf("logged in again %d times, want twice:\n%s", n, logs.String())
	}
	// A login that fails (the SecretID file is gone) leaves the client
	// its old token rather than none, so the next refused request logs
	// in again once the file is back.
	revokeGateway()
	must(t, os.Rename(secretFile, secretFile+".away"))
	if _, err := p.Secrets().WireGuardKey(ctx, "gw-fra-3"); err == nil || !strings.Contains(err.Error(), "and logging in again") {
		t.Fatalf("WireGuard key with a revoked token and no SecretID: %v", err)
	}
	must(t, os.Rename(secretFile+".away", secretFile))
	if _, err := p.Secrets().WireGuardKey(ctx, "gw-fra-3"); err != nil {
		t.Fatalf("WireGuard key once the SecretID is back: %v", err)
	}
	if n := relogins(); n != 3 {
		t.Fatalf("logged in again %d times, want three times:\n%s", n, logs.String())
	}
	// Requests refused together log in again once.
	revokeGateway()
	errs := make(chan error, 5)
	for range cap(errs) {
		go func() {
			_, err := p.Secrets().WireGuardKey(ctx, "gw-fra-3")
			errs <- err
		}()
	}
	for range cap(errs) {
		if err := <-errs; err != nil {
			t.Fatalf("WireGuard key, five at once with a revoked token: %v", err)
		}
	}
	if n := relogins(); n != 4 {
		t.Fatalf("five requests refused together logged in again %d times, want once:\n%s", n-3, logs.String())
	}
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func write(t *testing.T, c *api.Client, path string, data map[string]any) {
	t.Helper()
	if _, err := c.Logical().Write(path, data); err != nil {
		t.Fatalf("vault write %s: %v", path, err)
	}
}

// quietHCLog keeps Vault's own logging out of test output unless -v is
// combined with SKYBRIDGE_VAULT_LOG=1.
func quietHCLog() hclog.Logger {
	if os.Getenv("SKYBRIDGE_VAULT_LOG") != "" {
		return hclog.New(&hclog.LoggerOptions{Level: hclog.Debug})
	}
	return hclog.NewNullLogger()
}

// TestVaultKVVersion1Refused: a kv_mount of KV version 1 is refused when
// the back end opens, saying what to do, rather than failing later on
// every secret with errors about paths the mount does not have.
func TestVaultKVVersion1Refused(t *testing.T) {
	e := startVault(t)
	kv1 := e.kv + "-v1"
	must(t, e.root.Sys().Mount(kv1, &api.MountInput{Type: "kv", Options: map[string]string{"version": "1"}}))
	t.Cleanup(func() { e.root.Sys().Unmount(kv1) })
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	must(t, os.WriteFile(tokenFile, []byte(e.root.Token()), 0o600))
	cfg := e.config(filepath.Join(dir, "id"), certs.VaultAuth{Method: "token", TokenFile: tokenFile})
	cfg.Vault.KVMount = kv1
	if p, err := certs.Open(t.Context(), cfg, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "KV version 1") || !strings.Contains(err.Error(), "enable-versioning") {
		if p != nil {
			p.Close()
		}
		t.Fatalf("a KV version 1 mount: %v; want it refused, with what to do", err)
	}
	cfg.Vault.KVMount = e.kv
	p, err := certs.Open(t.Context(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("a KV version 2 mount: %v", err)
	}
	p.Close()
}
