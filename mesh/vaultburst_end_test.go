package mesh

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// TestVaultBurstTakenDownWhileOff: a burst gateway Vault admitted, off
// while its burst was taken down, finds at its next start that Vault
// refuses its SecretID: its burst has ended, and what it holds goes (the
// revocation list that would have told it never reached it).
func TestVaultBurstTakenDownWhileOff(t *testing.T) {
	var refused atomic.Bool // first a proxy's 403, then Vault's own refusal
	vault := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/auth/approle/login" {
			if refused.Load() {
				w.WriteHeader(http.StatusBadRequest)
				w.Write([]byte(`{"errors":["invalid role or secret ID"]}`))
			} else {
				w.WriteHeader(http.StatusForbidden)
				w.Write([]byte(`{"errors":["permission denied"]}`))
			}
			return
		}
		w.WriteHeader(http.StatusNotFound)
	}))
	defer vault.Close()
	s := liveSettings(t, t.TempDir())
	dir := s.Identity.Dir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	node := certs.Attributes{Node: "burst-ams-gw1", Site: "burst-ams", Region: "eu-west-1", Provider: "aws", Jurisdiction: "NL", OverlayIP: netip.MustParseAddr("100.64.255.254")}
	enr := &Enrollment{Site: "burst-ams", Node: node.Node, TokenID: "t1", Enrolled: time.Now().Add(-time.Hour), Expires: time.Now().Add(time.Hour),
		Vault: &VaultEnrollment{Address: vault.URL, AppRoleMount: "approle", PKIMount: "pki", PKIRole: "r", KVMount: "kv", KVPrefix: "sb", MeshCIDR: "100.64.0.0/10", Node: node}}
	if err := saveEnrollment(dir, enr); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{certs.FileVaultRoleID, certs.FileVaultSecretID, certs.FileGossipKeyring, certs.FileWireGuardKey} {
		if err := atomicfile.WriteFile(filepath.Join(dir, f), []byte("secret\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// A refusal that is not Vault's word on the SecretID is a failure to
	// start, which leaves everything in place.
	_, err := newGateway(context.Background(), s, slog.New(slog.DiscardHandler), options{device: NewRecordingDevice("x"), noControl: true, noMigrations: true})
	var ended *BurstEndedError
	if err == nil || errors.As(err, &ended) {
		t.Fatalf("a 403 at the login: %v; want a failure to start, not the burst's end", err)
	}
	if _, err := os.Stat(filepath.Join(dir, certs.FileVaultSecretID)); err != nil {
		t.Fatalf("the SecretID went after a 403: %v", err)
	}
	refused.Store(true)
	_, err = newGateway(context.Background(), s, slog.New(slog.DiscardHandler), options{device: NewRecordingDevice("x"), noControl: true, noMigrations: true})
	if !errors.As(err, &ended) || ended.Site != "burst-ams" {
		t.Fatalf("start after the burst was taken down: %v; want its end", err)
	}
	for _, f := range []string{certs.FileVaultSecretID, certs.FileVaultRoleID, certs.FileGossipKeyring, certs.FileWireGuardKey} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", f, err)
		}
	}
	if e, err := loadEnrollment(dir); err != nil || e.Ended == nil {
		t.Fatalf("the enrollment after its end: %+v, %v; want it recorded as ended", e, err)
	}
}
