package certs

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"syscall"
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
	// A port bound but not listening refuses connections, and no server
	// started meanwhile can take it (a closed listener's port could be).
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	refusing := fmt.Sprintf("http://127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	foreignTLS := httptest.NewUnstartedServer(http.NotFoundHandler()) // its certificate is trusted by nobody here
	foreignTLS.Config.ErrorLog = log.New(io.Discard, "", 0)
	foreignTLS.StartTLS()
	defer foreignTLS.Close()
	// A server this client trusts that wants a client certificate it
	// does not present: refused in the handshake.
	wantsCert := httptest.NewUnstartedServer(http.NotFoundHandler())
	wantsCert.Config.ErrorLog = log.New(io.Discard, "", 0)
	wantsCert.TLS = &tls.Config{ClientAuth: tls.RequireAnyClientCert}
	wantsCert.StartTLS()
	defer wantsCert.Close()
	plain := httptest.NewServer(http.NotFoundHandler()) // plain HTTP where https is asked for
	defer plain.Close()
	// Accepts and hangs up at once: a connection cut under the request.
	hangUp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hangUp.Close()
	go func() {
		for {
			c, err := hangUp.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	for _, tc := range []struct {
		name, addr string
		trust      *httptest.Server
		want       bool
	}{
		{"connection refused", refusing, nil, true},
		{"sealed (503)", status(http.StatusServiceUnavailable), nil, true},
		{"internal error (500)", status(http.StatusInternalServerError), nil, true},
		{"rate limited (429)", status(http.StatusTooManyRequests), nil, true},
		{"permission denied (403)", status(http.StatusForbidden), nil, false},
		{"bad request (400)", status(http.StatusBadRequest), nil, false},
		{"a server whose certificate does not verify", foreignTLS.URL, nil, false},
		{"a client certificate asked for", wantsCert.URL, wantsCert, false},
		{"plain HTTP on the port", "https://" + plain.Listener.Addr().String(), nil, false},
		{"connection closed under the request", "http://" + hangUp.Addr().String(), nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := vault.DefaultConfig()
			cfg.Address = tc.addr
			cfg.MaxRetries = 0
			if tc.trust != nil {
				cfg.HttpClient = tc.trust.Client()
			}
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

// TestLoginRefused: only Vault's own word that a role or SecretID is
// unknown counts as a refused login (a burst taken down), not any 4xx: a
// proxy's 403, a role Vault could not look up.
func TestLoginRefused(t *testing.T) {
	for _, tc := range []struct {
		code int
		msg  string
		want bool
	}{
		{http.StatusBadRequest, "invalid role or secret ID", true},
		{http.StatusBadRequest, "failed to validate credentials: invalid secret id", true},
		{http.StatusBadRequest, "failed to find secondary index for role_id", false},
		{http.StatusForbidden, "permission denied", false},
		{http.StatusInternalServerError, "invalid role or secret ID", false},
	} {
		err := fmt.Errorf("login: %w", &vault.ResponseError{StatusCode: tc.code, Errors: []string{tc.msg}})
		if got := loginRefused(err); got != tc.want {
			t.Errorf("%d %q: refused %v, want %v", tc.code, tc.msg, got, tc.want)
		}
	}
}
