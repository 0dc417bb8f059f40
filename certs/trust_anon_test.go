package certs

import (
	"crypto/x509"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// TestTrustBundleBehindTieRoundTrip: the issuer's list numbered as the held
// one (Vault catching up passes through the held number) is kept behind
// it by Adopt, and still after a save and a load: taken for the list in
// force, the held list's revocations were lost at a restart.
func TestTrustBundleBehindTieRoundTrip(t *testing.T) {
	ca := newTestCA(t)
	a := issue(t, ca, testAttrs("gw-a", "zrh", "100.96.0.1"), t0, 24*time.Hour)
	b := issue(t, ca, testAttrs("gw-b", "zrh", "100.96.0.2"), t0, 24*time.Hour)
	cas := []*x509.Certificate{ca.Certificate()}
	held := bundleOf(t, cas, listOfCA(t, ca, 10, a))
	tie, _ := held.Adopt(bundleOf(t, cas, listOfCA(t, ca, 10, b)))
	if !tie.IsRevoked(a.Certificate().SerialNumber) || !tie.IsRevoked(b.Certificate().SerialNumber) {
		t.Fatal("precondition: Adopt enforces both")
	}
	dir := t.TempDir()
	if err := tie.Save(dir); err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadTrustBundle(dir, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.IsRevoked(a.Certificate().SerialNumber) || !sameCRL(loaded.CRL(), held.CRL()) {
		t.Errorf("after save+load: a (held list) revoked %v, held list in force %v, %d behind; want a revoked, held in force",
			loaded.IsRevoked(a.Certificate().SerialNumber), sameCRL(loaded.CRL(), held.CRL()), len(loaded.BehindCRLs()))
	}
	if loaded.Key() != tie.Key() {
		t.Error("loaded bundle's key differs from the saved one")
	}
}

// TestVaultTrustWithoutLoginAddsNoCA: with a live login, an issuer revoked
// in Vault (still listed, its key kept) is not trusted; once the login
// dies, Trust reads without one and cannot tell it is revoked: its answer
// must not bring that CA back.
func TestVaultTrustWithoutLoginAddsNoCA(t *testing.T) {
	ca1, ca2 := newTestCA(t), newTestCA(t)
	list1, list2 := listOfCA(t, ca1, 1), listOfCA(t, ca2, 1)
	pemOf := func(c *x509.Certificate) string { return string(encodePEM(pemCert, c.Raw)) }
	var alive atomic.Bool
	alive.Store(true)
	answer := func(w http.ResponseWriter, data map[string]any) {
		json.NewEncoder(w).Encode(map[string]any{"data": data})
	}
	deny := func(w http.ResponseWriter) {
		w.WriteHeader(http.StatusForbidden)
		w.Write([]byte(`{"errors":["permission denied"]}`))
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		authed := alive.Load() && r.Header.Get("X-Vault-Token") != ""
		switch p := r.URL.Path; {
		case p == "/v1/pki/issuers":
			answer(w, map[string]any{"keys": []string{"i1", "i2"}, "key_info": map[string]any{
				"i1": map[string]any{"is_default": true, "key_id": "k1"},
				"i2": map[string]any{"is_default": false, "key_id": "k2"}}})
		case p == "/v1/pki/issuer/i1/json":
			answer(w, map[string]any{"certificate": pemOf(ca1.Certificate())})
		case p == "/v1/pki/issuer/i2/json":
			answer(w, map[string]any{"certificate": pemOf(ca2.Certificate())})
		case p == "/v1/pki/issuer/i1/crl":
			answer(w, map[string]any{"crl": string(encodePEM(pemCRL, list1.Raw))})
		case p == "/v1/pki/issuer/i2/crl":
			answer(w, map[string]any{"crl": string(encodePEM(pemCRL, list2.Raw))})
		case p == "/v1/pki/issuer/i1" && authed:
			answer(w, map[string]any{"key_id": "k1", "revoked": false, "certificate": pemOf(ca1.Certificate())})
		case p == "/v1/pki/issuer/i2" && authed:
			answer(w, map[string]any{"key_id": "k2", "revoked": true, "certificate": pemOf(ca2.Certificate())})
		case p == "/v1/auth/token/lookup-self" && authed:
			answer(w, map[string]any{"id": "tok"})
		default:
			deny(w)
		}
	}))
	t.Cleanup(srv.Close)
	cfg := vault.DefaultConfig()
	cfg.Address, cfg.MaxRetries = srv.URL, 0
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken("tok")
	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte("tok"), 0o600)
	v := &Vault{client: c, cfg: &VaultConfig{PKIMount: "pki", Auth: VaultAuth{Method: "token", TokenFile: tokenFile}},
		meshPrefix: ca1.MeshPrefix(), log: quietLog(), fresh: make(chan *vault.Secret, 1)}

	live, err := v.Trust(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	v.held = func() (*TrustBundle, error) { return live, nil }
	if len(live.CAs()) != 1 {
		t.Fatalf("live login: %d CAs, want 1 (i2 revoked)", len(live.CAs()))
	}
	alive.Store(false) // SecretID expired / token past max TTL
	anon, err := v.Trust(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	cur, _ := live.Adopt(anon)
	peer := issue(t, ca2, testAttrs("gw-x", "zrh", "100.96.0.7"), t0, 24*time.Hour)
	if _, err := cur.VerifyCertificate(peer.Certificate(), t0.Add(time.Hour)); err == nil || len(cur.CAs()) != 1 {
		t.Errorf("after the login died: %d CAs trusted, certificate of the revoked issuer accepted: %v", len(cur.CAs()), err == nil)
	}
}
