package vault

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/freeport"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// defaultIssuer is the ID of the PKI mount's default issuer.
func (e *env) defaultIssuer(t *testing.T) string {
	t.Helper()
	s, err := e.root.Logical().Read(e.pki + "/config/issuers")
	if err != nil || s == nil {
		t.Fatalf("read %s/config/issuers: %v", e.pki, err)
	}
	return s.Data["default"].(string)
}

// rotateIssuer makes a new root issuer on the PKI mount, named cn, and
// returns its ID; it becomes the default only if makeDefault.
func (e *env) rotateIssuer(t *testing.T, cn string, makeDefault bool) string {
	t.Helper()
	s, err := e.root.Logical().Write(e.pki+"/root/rotate/internal", map[string]any{
		"common_name": cn, "key_type": "ec", "key_bits": 256, "ttl": "8760h",
	})
	if err != nil {
		t.Fatalf("rotate the root: %v", err)
	}
	id := s.Data["issuer_id"].(string)
	if makeDefault {
		write(t, e.root, e.pki+"/root/replace", map[string]any{"default": id})
	}
	return id
}

// foreignCAPEM is a CA certificate whose key Vault never sees: a bank's
// offline root imported above the mount's issuer, say.
func foreignCAPEM(t *testing.T) string {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "offline root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	must(t, err)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// TestVaultIssuerRotation follows a rotation of the PKI mount's issuer
// step by step, as the trust bundle sees it: the new issuer is trusted
// as soon as it exists, signs once it is the default, each issuer's list
// revokes its own certificates, and a deleted issuer is no longer
// trusted. An issuer without a key (an imported parent) never is.
func TestVaultIssuerRotation(t *testing.T) {
	e := startVault(t)
	ctx := t.Context()
	dir := t.TempDir()
	open := func(name string) *certs.Provider {
		must(t, os.MkdirAll(filepath.Join(dir, name), 0o700))
		cfg, _ := e.approleConfig(t, filepath.Join(dir, name))
		p, err := certs.Open(ctx, cfg, nil)
		must(t, err)
		t.Cleanup(p.Close)
		return p
	}
	pa := open("a")
	oldID, tb, err := pa.Identity(ctx, attrs("gw-a", "site-a", "100.96.0.21"))
	must(t, err)
	if len(tb.CAs()) != 1 || tb.Signing() == nil || !tb.SignedBySigning(oldID.Certificate()) {
		t.Fatalf("before the rotation: %d CAs, signing %v", len(tb.CAs()), tb.Signing())
	}
	trustNow := func() *certs.TrustBundle {
		t.Helper()
		tb, err := pa.Issuer().Trust(ctx)
		must(t, err)
		return tb
	}
	oldIssuer := e.defaultIssuer(t)
	write(t, e.root, e.pki+"/issuers/import/cert", map[string]any{"pem_bundle": foreignCAPEM(t)})
	if tb := trustNow(); len(tb.CAs()) != 1 {
		t.Fatalf("an issuer imported without its key is trusted: %d CAs", len(tb.CAs()))
	}

	// A new issuer, not yet the default: trusted, not signing.
	newIssuer := e.rotateIssuer(t, "bank mesh root, next", false)
	tb = trustNow()
	if len(tb.CAs()) != 2 || !tb.SignedBySigning(oldID.Certificate()) {
		t.Fatalf("new issuer not the default yet: %d CAs, old certificate from the signing CA %v", len(tb.CAs()), tb.SignedBySigning(oldID.Certificate()))
	}

	// The default now: it signs new certificates, the old CA's stay valid.
	write(t, e.root, e.pki+"/root/replace", map[string]any{"default": newIssuer})
	newID, _, err := open("b").Identity(ctx, attrs("gw-b", "site-b", "100.96.0.22"))
	must(t, err)
	tb = trustNow()
	if got := newID.Certificate().Issuer.CommonName; got != "bank mesh root, next" {
		t.Fatalf("a certificate issued after the replace comes from %q", got)
	}
	if tb.SignedBySigning(oldID.Certificate()) || !tb.SignedBySigning(newID.Certificate()) {
		t.Error("the bundle does not name the new default issuer as the signing CA")
	}
	for _, id := range []*certs.NodeIdentity{oldID, newID} {
		if _, err := tb.VerifyCertificate(id.Certificate(), time.Now()); err != nil {
			t.Errorf("%s during the rotation: %v", id.Attributes().Node, err)
		}
	}

	// A certificate of the old issuer revoked: on the old issuer's own list.
	write(t, e.root, e.pki+"/revoke", map[string]any{"serial_number": certs.FormatSerial(oldID.Certificate().SerialNumber)})
	tb = trustNow()
	if _, err := tb.VerifyCertificate(oldID.Certificate(), time.Now()); !errors.Is(err, certs.ErrRevoked) {
		t.Errorf("the old issuer's certificate after its revocation: %v, want revoked", err)
	}
	if len(tb.CRLs()) != 2 {
		t.Errorf("%d revocation lists, want one per issuer", len(tb.CRLs()))
	}

	// The old issuer deleted: no longer trusted.
	if _, err := e.root.Logical().Delete(e.pki + "/issuer/" + oldIssuer); err != nil {
		t.Fatal(err)
	}
	tb = trustNow()
	if len(tb.CAs()) != 1 {
		t.Fatalf("after the old issuer's deletion: %d CAs", len(tb.CAs()))
	}
	if _, err := tb.VerifyCertificate(oldID.Certificate(), time.Now()); !errors.Is(err, certs.ErrUnknownCA) {
		t.Errorf("the deleted issuer's certificate: %v, want unknown CA", err)
	}
	if _, err := tb.VerifyCertificate(newID.Certificate(), time.Now()); err != nil {
		t.Errorf("the new issuer's certificate: %v", err)
	}

	// An issuer revoked (a compromised key) keeps its key in Vault but is
	// no longer trusted.
	spare := e.rotateIssuer(t, "bank mesh root, spare", false)
	if tb := trustNow(); len(tb.CAs()) != 2 {
		t.Fatalf("a spare issuer: %d CAs, want 2", len(tb.CAs()))
	}
	write(t, e.root, e.pki+"/issuer/"+spare+"/revoke", nil)
	if tb := trustNow(); len(tb.CAs()) != 1 || tb.Signing() == nil || !tb.SignedBySigning(newID.Certificate()) {
		t.Fatalf("after the spare issuer's revocation: %d CAs, want the default one only", len(tb.CAs()))
	}

	// A gateway whose policy does not let it read the issuers (one written
	// for an earlier release) still tells keyed issuers from the imported
	// one by the list, and says once that it cannot see revocations.
	pol, err := e.root.Sys().GetPolicy("gateway-" + strings.TrimPrefix(e.pki, "pki-"))
	must(t, err)
	narrow := strings.ReplaceAll(pol, `path "`+e.pki+`/issuer/+"   { capabilities = ["read"] }`, "")
	if narrow == pol {
		t.Fatal("the gateway policy has no issuer read to take away")
	}
	must(t, e.root.Sys().PutPolicy("narrow-"+e.pki, narrow))
	tok, err := e.root.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"narrow-" + e.pki}, TTL: "1h"})
	must(t, err)
	tokFile := filepath.Join(dir, "narrow-token")
	must(t, os.WriteFile(tokFile, []byte(tok.Auth.ClientToken), 0o600))
	var logs syncbuf.Buffer
	cfg := e.config(filepath.Join(dir, "narrow"), certs.VaultAuth{Method: "token", TokenFile: tokFile})
	pn, err := certs.Open(ctx, cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	must(t, err)
	defer pn.Close()
	for range 2 {
		tb, err := pn.Issuer().Trust(ctx)
		must(t, err)
		if len(tb.CAs()) != 2 || !tb.SignedBySigning(newID.Certificate()) {
			t.Fatalf("without read on the issuers: %d CAs (want the default and the revoked spare, not the imported one)", len(tb.CAs()))
		}
	}
	if n := strings.Count(logs.String(), "stays trusted until it is deleted"); n != 1 {
		t.Errorf("the missing permission said %d times, want once:\n%s", n, logs.String())
	}
}

// TestVaultIssuerRotationMesh rotates the issuer under two running
// gateways: each renews onto the new issuer by itself, neither stops
// being the other's peer meanwhile, and once the old issuer is deleted
// they trust the new one only, still peered.
func TestVaultIssuerRotationMesh(t *testing.T) {
	e := startVault(t)
	bin := buildSkybridge(t)
	dir := t.TempDir()
	ports, err := freeport.Loopback(4)
	must(t, err)
	gw := func(name, node, ip string, i int, seed string) (cfg, sock string) {
		gdir := filepath.Join(dir, name)
		must(t, os.MkdirAll(gdir, 0o700))
		roleFile, secretFile := e.appRole(t, gdir, false)
		var seeds []string
		if seed != "" {
			seeds = []string{seed}
		}
		cfg = filepath.Join(dir, name+".hcl")
		must(t, os.WriteFile(cfg, []byte(e.gatewayHCL(staticGateway{
			stateDir: gdir, node: node, site: "site-" + name, region: "r-" + name, jurisdiction: "CH",
			overlay: ip, routes: "[]", iface: "sbir" + name, refresh: "1s",
			vaultAddr: e.addr, roleFile: roleFile, secretFile: secretFile, gossipPort: ports[2*i], wgPort: ports[2*i+1], seeds: seeds,
		})), 0o644))
		return cfg, filepath.Join(gdir, "control.sock")
	}
	cfgA, sockA := gw("a", "gw-a", "100.96.0.31", 0, "")
	cfgB, sockB := gw("b", "gw-b", "100.96.0.32", 1, fmt.Sprintf("127.0.0.1:%d", ports[0]))
	a := startGW(t, bin, nil, "gateway", "run", "--config", cfgA)
	b := startGW(t, bin, nil, "gateway", "run", "--config", cfgB)
	peered := func(sock, node string) (bool, *statusView, string) {
		st, err := gwStatus(bin, sock)
		if err != nil {
			return false, nil, err.Error()
		}
		for _, m := range st.Members {
			if m.Node == node {
				return m.State == "verified" && m.Peer, st, m.State
			}
		}
		return false, st, "not a member"
	}
	both := func() (ok bool, stA, stB *statusView, why string) {
		okA, stA, whyA := peered(sockA, "gw-b")
		okB, stB, whyB := peered(sockB, "gw-a")
		return okA && okB, stA, stB, "gw-a sees gw-b " + whyA + ", gw-b sees gw-a " + whyB
	}
	waitCond(t, 60*time.Second, "gw-a and gw-b verified peers", func() (bool, string) {
		ok, _, _, why := both()
		return ok, why
	})

	const next = "bank mesh root, next"
	oldIssuer := e.defaultIssuer(t)
	e.rotateIssuer(t, next, true)
	replaced := time.Now()
	waitCond(t, 60*time.Second, "both gateways renewed onto the new issuer, peered throughout", func() (bool, string) {
		ok, stA, stB, why := both()
		if !ok {
			t.Fatalf("the gateways stopped being peers during the rotation: %s", why)
		}
		// Three refreshes (1 s here) after a gateway first sees the new
		// default, so that every gateway trusts it first.
		if (stA.Identity.IssuedBy == next || stB.Identity.IssuedBy == next) && time.Since(replaced) < 2500*time.Millisecond {
			t.Fatalf("a gateway renewed onto the new issuer %s after it became the default, before every gateway had time to trust it", time.Since(replaced))
		}
		return stA.Identity.IssuedBy == next && stB.Identity.IssuedBy == next,
			fmt.Sprintf("gw-a issued by %q, gw-b by %q", stA.Identity.IssuedBy, stB.Identity.IssuedBy)
	})
	for _, g := range []*gwProc{a, b} {
		if !strings.Contains(g.log.String(), "the issuer signs with a new CA") {
			t.Errorf("a gateway renewed without saying why:\n%s", g.log.String())
		}
	}

	if _, err := e.root.Logical().Delete(e.pki + "/issuer/" + oldIssuer); err != nil {
		t.Fatal(err)
	}
	waitCond(t, 30*time.Second, "both gateways trust the new issuer only", func() (bool, string) {
		_, stA, stB, why := both()
		if stA == nil || stB == nil {
			return false, why
		}
		return len(stA.Identity.CAs) == 1 && len(stB.Identity.CAs) == 1, fmt.Sprintf("gw-a trusts %v, gw-b %v", stA.Identity.CAs, stB.Identity.CAs)
	})
	// Still peers, over three more refreshes.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		if ok, _, _, why := both(); !ok {
			t.Fatalf("the gateways stopped being peers once the old issuer was deleted: %s", why)
		}
	}
}
