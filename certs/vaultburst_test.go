package certs

import (
	"encoding/pem"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	vault "github.com/hashicorp/vault/api"
)

// TestVaultBurstPlace: a changed setting is named with both values, and
// the by-hand removal reaches every object closing a burst would, the
// claim last, in the burst's namespace, for bursts opened with a grant
// per gateway and those opened before. (e2e/vault runs these commands'
// effect against a real Vault.)
func TestVaultBurstPlace(t *testing.T) {
	was := VaultBurstPlace{PKIMount: "pki", AppRoleMount: "approle", KVMount: "kv", KVPrefix: "skybridge", Name: "skybridge-burst-ams"}
	if c := was.Changes(was); c != nil {
		t.Fatalf("no change reported as %v", c)
	}
	now := was
	now.KVPrefix, now.Name, now.Namespace = "sb", "sb-burst-ams", "bank"
	want := []string{`namespace "" → "bank"`, `kv_prefix "skybridge" → "sb"`, `object name "skybridge-burst-ams" → "sb-burst-ams"`}
	if c := was.Changes(now); !slices.Equal(c, want) {
		t.Fatalf("changes:\n got %q\nwant %q", c, want)
	}

	for _, tc := range []struct {
		place VaultBurstPlace
		want  []string
	}{
		{was, []string{
			"vault delete auth/approle/role/skybridge-burst-ams",
			"vault policy delete skybridge-burst-ams",
			"vault delete pki/roles/skybridge-burst-ams",
			"vault kv metadata delete -mount=kv skybridge/nodes/ams-gw1/wireguard",
			"vault kv metadata delete -mount=kv skybridge/nodes/ams-gw2/wireguard",
			"vault kv metadata delete -mount=kv skybridge/bursts/ams",
		}},
		{VaultBurstPlace{Namespace: "bank/eu", PKIMount: "pki-mesh", AppRoleMount: "gw-login", KVMount: "secret", KVPrefix: "mesh/prod", Name: "mesh-prod-burst-ams"}, []string{
			"VAULT_NAMESPACE=bank/eu vault delete auth/gw-login/role/mesh-prod-burst-ams",
			"VAULT_NAMESPACE=bank/eu vault policy delete mesh-prod-burst-ams",
			"VAULT_NAMESPACE=bank/eu vault delete pki-mesh/roles/mesh-prod-burst-ams",
			"VAULT_NAMESPACE=bank/eu vault kv metadata delete -mount=secret mesh/prod/nodes/ams-gw1/wireguard",
			"VAULT_NAMESPACE=bank/eu vault kv metadata delete -mount=secret mesh/prod/nodes/ams-gw2/wireguard",
			"VAULT_NAMESPACE=bank/eu vault kv metadata delete -mount=secret mesh/prod/bursts/ams",
		}},
		// Opened with a grant per gateway: each gateway's AppRole,
		// policy and PKI role, then the site's role.
		{VaultBurstPlace{PKIMount: "pki", AppRoleMount: "approle", KVMount: "kv", KVPrefix: "skybridge", Name: "skybridge-burst-ams",
			Policy: "skybridge-burst-ams-0123456789ab", PerGateway: true}, []string{
			"vault delete auth/approle/role/skybridge-burst-ams-0123456789ab.ams-gw1",
			"vault policy delete skybridge-burst-ams-0123456789ab.ams-gw1",
			"vault delete pki/roles/skybridge-burst-ams-0123456789ab.ams-gw1",
			"vault delete auth/approle/role/skybridge-burst-ams-0123456789ab.ams-gw2",
			"vault policy delete skybridge-burst-ams-0123456789ab.ams-gw2",
			"vault delete pki/roles/skybridge-burst-ams-0123456789ab.ams-gw2",
			"vault delete pki/roles/skybridge-burst-ams",
			"vault kv metadata delete -mount=kv skybridge/nodes/ams-gw1/wireguard",
			"vault kv metadata delete -mount=kv skybridge/nodes/ams-gw2/wireguard",
			"vault kv metadata delete -mount=kv skybridge/bursts/ams",
		}},
	} {
		if got := tc.place.RemovalCommands("ams", []string{"ams-gw1", "ams-gw2"}); !slices.Equal(got, tc.want) {
			t.Errorf("removal of %+v:\n got %q\nwant %q", tc.place, got, tc.want)
		}
	}
}

// TestVaultBurstRemoveByHand: what a refused burst up tells the operator
// to do by hand about a burst left in Vault ends it as burst down would:
// its certificates revoked (deleting its roles leaves them valid until
// the burst's end) and the CRL rebuilt, the claim last.
func TestVaultBurstRemoveByHand(t *testing.T) {
	v := &Vault{cfg: &VaultConfig{PKIMount: "pki-mesh", KVMount: "kv", KVPrefix: "skybridge"}}
	msg := v.claimRefusal("ams", siteClaim{Nonce: "n", Gateway: "gw-zrh"}).Error()
	revoke := "`vault write pki-mesh/revoke serial_number=<serial>` for each certificate of site ams in `vault list pki-mesh/certs`, then `vault read pki-mesh/crl/rotate`"
	roles, rev, claim := strings.Index(msg, "the PKI role skybridge-burst-ams"), strings.Index(msg, revoke), strings.Index(msg, "`vault kv metadata delete kv/skybridge/bursts/ams`")
	if roles < 0 || rev < 0 || claim < 0 || !(roles < rev && rev < claim) {
		t.Fatalf("by-hand removal, want the roles deleted, then %s, then the claim:\n%s", revoke, msg)
	}
}

// TestVaultClientConfig: secrets cross the Vault connection, so plain http
// is refused off loopback, and VAULT_SKIP_VERIFY does not turn off the
// check of Vault's certificate.
func TestVaultClientConfig(t *testing.T) {
	for addr, ok := range map[string]bool{
		"https://vault.example.com:8200": true,
		"http://127.0.0.1:8200":          true,
		"http://[::1]:8200":              true,
		"http://localhost:8200":          true,
		"http://vault.example.com:8200":  false,
		"http://192.0.2.10:8200":         false,
		"vault.example.com:8200":         false,
		"":                               false,
	} {
		if err := checkVaultAddress(addr); (err == nil) != ok {
			t.Errorf("%q: %v, want accepted %v", addr, err, ok)
		}
	}
	t.Setenv("VAULT_SKIP_VERIFY", "true")
	vc, err := vaultClientConfig("https://vault.example.com:8200", &vault.TLSConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if vc.HttpClient.Transport.(*http.Transport).TLSClientConfig.InsecureSkipVerify {
		t.Error("VAULT_SKIP_VERIFY turned off the check of Vault's certificate")
	}
	if _, err := vaultClientConfig("http://vault.example.com:8200", &vault.TLSConfig{}); err == nil {
		t.Error("plain http to a remote Vault accepted")
	}
	// An agent's address or an SRV lookup in the environment would have
	// the client dial another host than the one checked and handed out.
	t.Setenv("VAULT_AGENT_ADDR", "http://10.1.2.3:8100")
	t.Setenv("VAULT_SRV_LOOKUP", "true")
	vc, err = vaultClientConfig("https://vault.example.com:8200", &vault.TLSConfig{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := vault.NewClient(vc)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Address(); got != "https://vault.example.com:8200" || vc.SRVLookup {
		t.Errorf("the client dials %s (SRV lookup %v), want the configured https://vault.example.com:8200", got, vc.SRVLookup)
	}
}

// roundTripper is an http.RoundTripper made of a function.
type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestVaultPlainHTTPStaysOnHost: plain http to a Vault on loopback is
// allowed because it stays on the host, and so it does: through no proxy
// the environment names (the Vault client's own variables proxy loopback
// too), and not to where a redirect (a standby's, to its active node)
// points, which the client followed with the token.
func TestVaultPlainHTTPStaysOnHost(t *testing.T) {
	t.Setenv("VAULT_PROXY_ADDR", "http://192.0.2.3:3128")
	vc, err := vaultClientConfig("http://127.0.0.1:8200", &vault.TLSConfig{})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1:8200/v1/auth/token/lookup-self", nil)
	if proxy := vc.HttpClient.Transport.(*http.Transport).Proxy; proxy != nil {
		if p, _ := proxy(req); p != nil {
			t.Errorf("a request to the Vault on loopback goes through the proxy %s, in the clear", p)
		}
	}

	var sent []string
	vc.HttpClient.Transport = roundTripper(func(r *http.Request) (*http.Response, error) {
		sent = append(sent, r.URL.Host+" "+r.Header.Get("X-Vault-Token"))
		if r.URL.Hostname() == "127.0.0.1" {
			h := http.Header{"Location": {"http://vault-active.example.com:8200" + r.URL.Path}}
			return &http.Response{StatusCode: http.StatusTemporaryRedirect, Header: h, Body: http.NoBody, Request: r}, nil
		}
		return &http.Response{StatusCode: http.StatusForbidden, Header: http.Header{}, Body: http.NoBody, Request: r}, nil
	})
	vc.MaxRetries = 0
	c, err := vault.NewClient(vc)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken("hvs.the-gateways-token")
	c.Auth().Token().LookupSelfWithContext(t.Context())
	if len(sent) != 1 || !strings.HasPrefix(sent[0], "127.0.0.1:8200 ") {
		t.Errorf("requests sent: %q; want the one to loopback only, its redirect not followed", sent)
	}

	// Over https the proxies and redirects stay as Vault's client has
	// them: what crosses is encrypted, to a certificate checked.
	vc, err = vaultClientConfig("https://vault.example.com:8200", &vault.TLSConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if vc.DisableRedirects {
		t.Error("redirects refused over https too")
	}
}

// TestVaultJoinCarriesTheEnvironmentsCA: a gateway that trusts Vault by
// the Vault CLI's variables, not ca_cert, hands burst gateways (fresh VMs,
// which have neither) that CA in their join tokens; ca_cert, set, wins.
func TestVaultJoinCarriesTheEnvironmentsCA(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t)
	pemOf := func(ca *CA) []byte {
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Certificate().Raw})
	}
	pemA, pemB := pemOf(ca), pemOf(newTestCA(t))
	fileA, fileB := filepath.Join(dir, "a.pem"), filepath.Join(dir, "b.pem")
	os.WriteFile(fileA, pemA, 0o600)
	os.WriteFile(fileB, pemB, 0o600)
	c, err := vault.NewClient(&vault.Config{Address: "https://vault.example.com:8200"})
	if err != nil {
		t.Fatal(err)
	}
	joinCA := func(cfg *VaultConfig) string {
		t.Helper()
		vj, err := (&Vault{client: c, cfg: cfg, meshPrefix: ca.MeshPrefix()}).VaultJoinFor(&VaultBurst{})
		if err != nil {
			t.Fatal(err)
		}
		return vj.CACert
	}
	for _, tc := range []struct {
		env, value string
		want       []string
	}{
		{vault.EnvVaultCACertBytes, string(pemA), []string{string(pemA)}},
		{vault.EnvVaultCACert, fileB, []string{string(pemB)}},
		{vault.EnvVaultCAPath, dir, []string{string(pemA), string(pemB)}},
	} {
		t.Run(tc.env, func(t *testing.T) {
			t.Setenv(tc.env, tc.value)
			got := joinCA(&VaultConfig{})
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("$%s set: the join token's CA lacks one this gateway trusts Vault by (%d bytes)", tc.env, len(got))
				}
			}
			if got := joinCA(&VaultConfig{CACert: fileA}); got != string(pemA) {
				t.Errorf("ca_cert set with $%s: the join token carries %d bytes, not ca_cert's", tc.env, len(got))
			}
		})
	}
	if got := joinCA(&VaultConfig{}); got != "" {
		t.Errorf("no CA configured: the join token carries %q", got)
	}
}
