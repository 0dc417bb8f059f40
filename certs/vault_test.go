package certs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
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

// TestVaultUnreachable: what a start on the copies kept on disk is
// allowed for. The errors are the api client's own, from servers that
// answer so or from none at all.
func TestVaultUnreachable(t *testing.T) {
	status := func(code int) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(code)
			w.Write([]byte(`{"errors":["as told"]}`))
		}))
		t.Cleanup(srv.Close)
		return srv.URL
	}
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close()
	foreignTLS := httptest.NewUnstartedServer(http.NotFoundHandler()) // its certificate is trusted by nobody here
	foreignTLS.Config.ErrorLog = log.New(io.Discard, "", 0)
	foreignTLS.StartTLS()
	defer foreignTLS.Close()
	for _, tc := range []struct {
		name, addr string
		want       bool
	}{
		{"connection refused", closed.URL, true},
		{"sealed (503)", status(http.StatusServiceUnavailable), true},
		{"internal error (500)", status(http.StatusInternalServerError), true},
		{"rate limited (429)", status(http.StatusTooManyRequests), true},
		{"permission denied (403)", status(http.StatusForbidden), false},
		{"bad request (400)", status(http.StatusBadRequest), false},
		{"a server whose certificate does not verify", foreignTLS.URL, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := vault.DefaultConfig()
			cfg.Address = tc.addr
			cfg.MaxRetries = 0
			c, err := vault.NewClient(cfg)
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.Logical().Read("pki/cert/ca")
			if err == nil {
				t.Fatal("no error")
			}
			if got := VaultUnreachable(fmt.Errorf("wrapped: %w", err)); got != tc.want {
				t.Errorf("VaultUnreachable(%v) = %v, want %v", err, got, tc.want)
			}
		})
	}
	for err, want := range map[error]bool{
		nil:                      false,
		context.Canceled:         false,
		context.DeadlineExceeded: true,
		errVaultAwaited:          true,
		errors.New("vault approle secret_id_file: no such file"): false,
	} {
		if got := VaultUnreachable(err); got != want {
			t.Errorf("VaultUnreachable(%v) = %v, want %v", err, got, want)
		}
	}
}
