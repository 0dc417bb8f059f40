package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

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

// publicPKIStub plays a Vault whose PKI mount "pki" has one issuer with
// list, and which refuses every token: what it serves to anyone (the
// issuers' list, an issuer's certificate and list) it serves with a
// token or without, the rest it refuses, as a dead token is refused by
// Vault before 1.17. It counts the requests that carried a token.
func publicPKIStub(t *testing.T, ca *CA, list *x509.RevocationList) (addr string, withToken *atomic.Int32) {
	withToken = new(atomic.Int32)
	answer := func(w http.ResponseWriter, data map[string]any) {
		json.NewEncoder(w).Encode(map[string]any{"data": data})
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Vault-Token") != "" {
			withToken.Add(1)
		}
		switch {
		case r.URL.Path == "/v1/pki/issuers" && r.URL.Query().Get("list") == "true" || r.Method == "LIST" && r.URL.Path == "/v1/pki/issuers":
			answer(w, map[string]any{"keys": []string{"i1"}, "key_info": map[string]any{"i1": map[string]any{"is_default": true, "key_id": "k1"}}})
		case r.URL.Path == "/v1/pki/issuer/i1/json":
			answer(w, map[string]any{"certificate": string(encodePEM(pemCert, ca.Certificate().Raw))})
		case r.URL.Path == "/v1/pki/issuer/i1/crl":
			answer(w, map[string]any{"crl": string(encodePEM(pemCRL, list.Raw))})
		default:
			w.WriteHeader(http.StatusForbidden)
			w.Write([]byte(`{"errors":["1 error occurred:\n\t* permission denied\n\n"]}`))
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL, withToken
}

// TestVaultTrustWithoutLogin: while Vault refuses the gateway's login
// Trust reads what Vault serves to anyone, without a token — the CAs and
// the revocation lists — rather than failing, and takes the refusal for
// no policy's. So it does after a start without Vault whose login Vault
// refused once it answered.
func TestVaultTrustWithoutLogin(t *testing.T) {
	ca := newTestCA(t)
	victim := issue(t, ca, testAttrs("gw9", "s", "100.96.0.9"), t0, time.Hour)
	addr, withToken := publicPKIStub(t, ca, listOfCA(t, ca, 7, victim))
	vaultFor := func(token string) *Vault {
		cfg := vault.DefaultConfig()
		cfg.Address, cfg.MaxRetries = addr, 0
		c, err := vault.NewClient(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.SetToken(token)
		tokenFile := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
			t.Fatal(err)
		}
		// What the gateway trusts already: an answer read without a
		// login brings no CA beside it.
		held := func() (*TrustBundle, error) {
			return NewTrustBundle([]*x509.Certificate{ca.Certificate()}, ca.MeshPrefix())
		}
		return &Vault{client: c, cfg: &VaultConfig{PKIMount: "pki", Auth: VaultAuth{Method: "token", TokenFile: tokenFile}},
			meshPrefix: ca.MeshPrefix(), log: quietLog(), fresh: make(chan *vault.Secret, 1), held: held}
	}

	// A token past its max TTL, which no login replaces.
	dead := vaultFor("dead")
	tb, err := dead.Trust(t.Context())
	if err != nil || !tb.IsRevoked(victim.Certificate().SerialNumber) {
		t.Fatalf("Trust with a dead token: %v; want the bundle, revoking gw9", err)
	}
	if dead.issuerReadDenied.Load() != 0 {
		t.Error("the dead token taken for a policy that denies reading issuers")
	}
	if !ReadWithoutLogin(dead) {
		t.Error("a read without a login is not said so: it would count as the issuer answering")
	}

	// A start without Vault, whose login Vault refused since.
	refused := vaultFor("")
	refused.awaiting.Store(true)
	refusal := fmt.Errorf("vault approle login: %w", ErrVaultLoginRefused)
	refused.refused.Store(&refusal)
	withToken.Store(0)
	if tb, err := refused.Trust(t.Context()); err != nil || !tb.IsRevoked(victim.Certificate().SerialNumber) {
		t.Fatalf("Trust after a start whose login Vault refused: %v; want the bundle, revoking gw9", err)
	}
	if n := withToken.Load(); n != 0 {
		t.Errorf("%d requests sent a token the gateway does not hold", n)
	}
	// Before Vault answered at all, it fails at once as every request.
	refused.refused.Store(nil)
	if _, err := refused.Trust(t.Context()); !errors.Is(err, errVaultAwaited) {
		t.Errorf("Trust while Vault has not answered since the start: %v; want errVaultAwaited", err)
	}
}
