package vault

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// issueOnMount has root issue a gateway certificate of the mesh on mount.
func (e *env) issueOnMount(t *testing.T, mount string, a certs.Attributes) *x509.Certificate {
	t.Helper()
	s, err := e.root.Logical().Write(mount+"/issue/"+e.role, map[string]any{
		"common_name": a.Node, "uri_sans": a.URI().String(), "ip_sans": a.OverlayIP.String(),
		"exclude_cn_from_sans": true, "ttl": "1h",
	})
	must(t, err)
	certPEM, _ := s.Data["certificate"].(string)
	blk, _ := pem.Decode([]byte(certPEM))
	if blk == nil {
		t.Fatalf("%s/issue: no certificate", mount)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	must(t, err)
	return c
}

// revokeOnMount revokes c on mount by the certificate itself, which a
// mount that did not issue it (nor stores what it issues) takes too.
func (e *env) revokeOnMount(t *testing.T, mount string, c *x509.Certificate) {
	t.Helper()
	write(t, e.root, mount+"/revoke", map[string]any{"certificate": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))})
}

// TestVaultTrustListNumberBehind: the mesh CA moves to a mount whose
// revocation list is numbered afresh, below the one the gateways hold (a
// Vault restored from a snapshot is the same case). What is revoked
// there is enforced at once, beside the list held, which stays in force
// (gossip cannot roll it back); the gateway says so at every refresh, and
// what it says to do brings Vault's list into force.
func TestVaultTrustListNumberBehind(t *testing.T) {
	e := startVault(t)
	ctx := t.Context()
	dir := t.TempDir()
	pkiA, pkiB := e.pki+"-a", e.pki+"-b"
	for _, m := range []string{pkiA, pkiB} {
		must(t, e.root.Sys().Mount(m, &api.MountInput{Type: "pki", Config: api.MountConfigInput{MaxLeaseTTL: "87600h"}}))
		t.Cleanup(func() { e.root.Sys().Unmount(m) })
	}
	gen, err := e.root.Logical().Write(pkiA+"/root/generate/exported", map[string]any{"common_name": "bank mesh root", "key_type": "ec", "key_bits": 256, "ttl": "8760h"})
	must(t, err)
	role := map[string]any{
		"allow_any_name": true, "enforce_hostnames": false, "allow_ip_sans": true,
		"allowed_uri_sans": "skybridge://*", "key_type": "ec", "key_bits": 256,
		"server_flag": true, "client_flag": true, "max_ttl": "72h", "not_before_duration": "1s",
	}
	write(t, e.root, pkiA+"/roles/"+e.role, role)
	tokenFile := filepath.Join(dir, "token")
	must(t, os.WriteFile(tokenFile, []byte(e.root.Token()), 0o600))
	cfg := e.config(filepath.Join(dir, "id"), certs.VaultAuth{Method: "token", TokenFile: tokenFile})
	cfg.Vault.PKIMount = pkiA

	p, err := certs.Open(ctx, cfg, slog.New(slog.DiscardHandler))
	must(t, err)
	if _, _, err := p.Identity(ctx, attrs("gw-a", "site-a", "100.96.1.5")); err != nil {
		t.Fatal(err)
	}
	// A few revocations on the CA's first mount: its list number grows.
	var old []*x509.Certificate
	for i, ip := range []string{"100.96.2.1", "100.96.2.2", "100.96.2.3"} {
		c := e.issueOnMount(t, pkiA, attrs(fmt.Sprintf("old-%d", i), "site-a", ip))
		e.revokeOnMount(t, pkiA, c)
		old = append(old, c)
	}
	peer := e.issueOnMount(t, pkiA, attrs("gw-b", "site-a", "100.96.1.6"))
	// And the rebuilds of a few days (auto_rebuild, each revocation).
	for range 5 {
		_, err := e.root.Logical().Read(pkiA + "/crl/rotate")
		must(t, err)
	}
	held, err := p.Trust(ctx)
	must(t, err)
	p.Close()

	// The CA moves: the same certificate and key, a list numbered afresh.
	// Vault revokes the peer there.
	write(t, e.root, pkiB+"/issuers/import/bundle", map[string]any{
		"pem_bundle": gen.Data["private_key"].(string) + "\n" + gen.Data["certificate"].(string)})
	write(t, e.root, pkiB+"/roles/"+e.role, role)
	e.revokeOnMount(t, pkiB, peer)

	cfg.Vault.PKIMount = pkiB
	var logs syncbuf.Buffer
	p2, err := certs.Open(ctx, cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	must(t, err)
	defer p2.Close()
	vtb, err := p2.Issuer().Trust(ctx)
	must(t, err)
	if !vtb.IsRevoked(peer.SerialNumber) || vtb.CRL().Number.Cmp(held.CRL().Number) >= 0 {
		t.Fatalf("setup: Vault's list %v revokes the peer %v; want it revoked, numbered below the held %v", vtb.CRL().Number, vtb.IsRevoked(peer.SerialNumber), held.CRL().Number)
	}
	t.Logf("held list number %v, Vault's now %v", held.CRL().Number, vtb.CRL().Number)

	tb, err := p2.Trust(ctx)
	must(t, err)
	kept, err := certs.LoadTrustBundle(cfg.Dir, meshPrefix)
	must(t, err)
	for name, b := range map[string]*certs.TrustBundle{"Provider.Trust": tb, "kept on disk": kept} {
		if !b.IsRevoked(peer.SerialNumber) {
			t.Errorf("%s: the peer Vault revoked is trusted", name)
		}
		for _, c := range old {
			if !b.IsRevoked(c.SerialNumber) {
				t.Errorf("%s: %s, revoked on the list held, is trusted", name, c.Subject.CommonName)
			}
		}
		if b.CRL().Number.Cmp(held.CRL().Number) != 0 {
			t.Errorf("%s: list %v in force; want the one held, %v, which the mesh gossips", name, b.CRL().Number, held.CRL().Number)
		}
	}
	// The gateway's own adoption of an answer (its refresh) is the same.
	if next, changed := held.Adopt(vtb); !changed || !next.IsRevoked(peer.SerialNumber) {
		t.Errorf("the held bundle adopting Vault's answer: changed %v, peer revoked %v", changed, next.IsRevoked(peer.SerialNumber))
	}
	// Gossip cannot roll back: a lower-numbered list from a peer is not taken.
	if _, took := held.WithNewerCRLs(vtb.CRLs()); took {
		t.Error("Vault's lower-numbered list taken from gossip")
	}

	// Said at every refresh, with what to do.
	const said = "numbered below (or as) the mesh's"
	n := strings.Count(logs.String(), said)
	if n == 0 || !strings.Contains(logs.String(), "missing_count=3") || !strings.Contains(logs.String(), pkiB+"/crl/rotate") {
		t.Fatalf("the gateway does not say that Vault's list is behind, what Vault lacks and what to do:\n%s", logs.String())
	}
	_, err = p2.Issuer().Trust(ctx)
	must(t, err)
	if again := strings.Count(logs.String(), said); again != n+1 {
		t.Errorf("said %d times after one more refresh, was %d: want once per refresh", again, n)
	}

	// Done as said: what Vault lacks revoked again there, its list
	// rotated until its number passes the mesh's. Its list is then the
	// one in force, and nothing more is said.
	for _, c := range old {
		e.revokeOnMount(t, pkiB, c)
	}
	for rotated := 0; ; rotated++ {
		vtb, err = p2.Issuer().Trust(ctx)
		must(t, err)
		if vtb.CRL().Number.Cmp(held.CRL().Number) > 0 {
			t.Logf("Vault's list passed the mesh's after %d rotations: %v", rotated, vtb.CRL().Number)
			break
		}
		if rotated == 0 && strings.Count(logs.String(), said) != n+2 {
			t.Errorf("not said while Vault's list (%v) is still behind the mesh's (%v)", vtb.CRL().Number, held.CRL().Number)
		}
		if rotated > 20 {
			t.Fatalf("Vault's list still at %v after %d rotations", vtb.CRL().Number, rotated)
		}
		_, err := e.root.Logical().Read(pkiB + "/crl/rotate")
		must(t, err)
	}
	before := strings.Count(logs.String(), said)
	tb, err = p2.Trust(ctx)
	must(t, err)
	if tb.CRL().Number.Cmp(held.CRL().Number) <= 0 || len(tb.BehindCRLs()) != 0 {
		t.Errorf("after the rotations: list %v in force (held %v), %d behind; want Vault's in force alone", tb.CRL().Number, held.CRL().Number, len(tb.BehindCRLs()))
	}
	for _, c := range append(old, peer) {
		if !tb.IsRevoked(c.SerialNumber) {
			t.Errorf("after the rotations: %s is trusted", c.Subject.CommonName)
		}
	}
	if after := strings.Count(logs.String(), said); after != before {
		t.Errorf("still said once Vault's list is in force:\n%s", logs.String())
	}
}

// TestVaultTrustWithoutLogin: Vault serves the CAs and revocation lists
// to anyone, so a gateway whose login Vault refuses (its SecretID
// destroyed, its token revoked) goes on learning the revocations made
// there: read without a token, with no policy denial taken for it. So
// does one that started without Vault and whose login Vault refused
// once it answered.
func TestVaultTrustWithoutLogin(t *testing.T) {
	e := startVault(t)
	proxy := newCutProxy(t, e.addr)
	ctx := t.Context()
	dir := t.TempDir()
	cfg, secretFile := e.approleConfig(t, dir)
	cfg.Vault.Address = proxy.url()
	var logs syncbuf.Buffer
	p, err := certs.Open(ctx, cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	must(t, err)
	defer p.Close()
	a := attrs("gw-a", "site-a", "100.96.1.5")
	if _, _, err := p.Identity(ctx, a); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Issuer().Trust(ctx); err != nil {
		t.Fatalf("trust with a live login: %v", err)
	}
	peer := e.issueOnMount(t, e.pki, attrs("gw-b", "site-a", "100.96.1.6"))

	// The login dies: SecretID destroyed (as one past its secret_id_ttl),
	// the gateway's token revoked.
	sid, err := os.ReadFile(secretFile)
	must(t, err)
	write(t, e.root, "auth/"+e.approleMount+"/role/gateway/secret-id/destroy", map[string]any{"secret_id": strings.TrimSpace(string(sid))})
	e.eachToken(t, func(accessor any, tok map[string]any) {
		if tok["path"] == "auth/"+e.approleMount+"/login" {
			write(t, e.root, "auth/token/revoke-accessor", map[string]any{"accessor": accessor})
		}
	})
	write(t, e.root, e.pki+"/revoke", map[string]any{"serial_number": certs.FormatSerial(peer.SerialNumber)})

	for range 2 { // the second refresh as the first
		tb, err := p.Issuer().Trust(ctx)
		if err != nil {
			t.Fatalf("Vault.Trust with a dead login: %v", err)
		}
		if !tb.IsRevoked(peer.SerialNumber) {
			t.Fatal("Vault.Trust with a dead login: the peer Vault revoked is trusted")
		}
	}
	if tb, err := p.Trust(ctx); err != nil || !tb.IsRevoked(peer.SerialNumber) {
		t.Fatalf("Provider.Trust with a dead login: %v (peer revoked: %v)", err, err == nil && tb.IsRevoked(peer.SerialNumber))
	}
	if strings.Contains(logs.String(), "policy does not let it read") {
		t.Errorf("a dead login taken for the policy's refusal:\n%s", logs.String())
	}
	if n := strings.Count(logs.String(), "are read without it"); n != 1 {
		t.Errorf("reading without the login said %d times, want once:\n%s", n, logs.String())
	}
	// A renewal meets the refused login, which it waits out longer.
	if _, err := p.Issuer().Sign(ctx, nil, a, time.Hour); !errors.Is(err, certs.ErrVaultLoginRefused) {
		t.Errorf("a renewal with the login refused: %v; want ErrVaultLoginRefused in it", err)
	}

	// A start without Vault, whose login Vault refuses once it answers:
	// its trust bundle is still read.
	proxy.down()
	ride := cfg
	ride.RideOutOutage = true
	var rideLogs syncbuf.Buffer
	pr, err := certs.Open(ctx, ride, slog.New(slog.NewTextHandler(&rideLogs, nil)))
	must(t, err)
	defer pr.Close()
	proxy.up()
	for deadline := time.Now().Add(time.Minute); ; {
		tb, err := pr.Issuer().Trust(ctx)
		if err == nil && tb.IsRevoked(peer.SerialNumber) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the trust bundle is not read once Vault answers, refusing the login: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(rideLogs.String(), "vault answers but refuses") {
		t.Errorf("the login was not refused:\n%s", rideLogs.String())
	}
}
