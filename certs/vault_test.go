package certs

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	vault "github.com/hashicorp/vault/api"
)

// TestTokenRefusedBefore117: Vault before 1.17 answers a dead token with
// a bare "permission denied", as it answers a missing permission; a
// lookup of the token itself, which every live token may make, tells the
// two apart. (The in-process Vault of e2e/vault is newer and says
// "invalid token", so this answer is played by a stub.)
func TestTokenRefusedBefore117(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/auth/token/lookup-self" && r.Header.Get("X-Vault-Token") == "live" {
			w.Write([]byte(`{"data":{"id":"live","ttl":3600}}`))
			return
		}
		w.WriteHeader(http.StatusForbidden)
		w.Write([]byte(`{"errors":["1 error occurred:\n\t* permission denied\n\n"]}`))
	}))
	defer srv.Close()
	cfg := vault.DefaultConfig()
	cfg.Address = srv.URL
	cfg.MaxRetries = 0
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	v := &Vault{client: c}
	for token, want := range map[string]bool{"live": false, "revoked": true} {
		c.SetToken(token)
		_, err := c.Logical().Read("pki/cert/ca")
		if isInvalidToken(err) || !isForbidden(err) {
			t.Fatalf("%s: %v; want a bare permission denied", token, err)
		}
		if got := v.tokenRefused(context.Background(), token); got != want {
			t.Errorf("tokenRefused(%s) = %v, want %v", token, got, want)
		}
	}
}
