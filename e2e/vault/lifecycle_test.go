package vault

import (
	"bytes"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// TestVaultIssuerOnTheSameKey: a second issuer made on the mesh CA's key
// under another name (pki/issuers/generate/root/existing, a rotation
// that keeps the key) numbers its revocation list apart. Each list is its
// own issuer's: the refresh from Vault goes on taking Vault's answer, and
// a revocation made before stays in force. (Matched by the key alone, the
// new issuer's list was refused as a replay of the old one's, and every
// refresh failed from then on.)
func TestVaultIssuerOnTheSameKey(t *testing.T) {
	e := startVault(t)
	ctx := t.Context()
	p := e.gatewayProvider(t)
	id, _, err := p.Identity(ctx, attrs("gw-a", "site-a", "100.96.1.5"))
	must(t, err)
	serial := id.Certificate().SerialNumber
	must(t, p.Issuer().Revoke(ctx, serial))
	def, err := e.root.Logical().Read(e.pki + "/issuer/default")
	must(t, err)
	for i := range 2 {
		_, err := e.root.Logical().Write(e.pki+"/issuers/generate/root/existing", map[string]any{
			"key_ref": def.Data["key_id"], "common_name": fmt.Sprintf("bank mesh root, same key %d", i), "ttl": "8760h"})
		must(t, err)
		tb, err := p.Issuer().Trust(ctx)
		if err != nil {
			t.Fatalf("Vault's trust bundle after issuer %d on the same key: %v", i+1, err)
		}
		if !tb.IsRevoked(serial) {
			t.Fatalf("after issuer %d on the same key: the revocation made before is not in force", i+1)
		}
	}
}

// TestVaultGossipKeyringPutBack: a gateway that kept the mesh's gossip
// keyring finds none in Vault (deleted, or Vault restored from an older
// backup): it puts its own back, rather than make a new one that would cut
// it, and every gateway started after it, off from the mesh's gossip.
func TestVaultGossipKeyringPutBack(t *testing.T) {
	e := startVault(t)
	ctx := t.Context()
	p := e.gatewayProvider(t)
	first, err := p.Secrets().GossipKeyring(ctx)
	must(t, err)
	must(t, e.root.KVv2(e.kv).DeleteMetadata(ctx, "skybridge/gossip"))
	again, err := p.Secrets().GossipKeyring(ctx)
	must(t, err)
	if !bytes.Equal(again.MarshalSecret(), first.MarshalSecret()) {
		t.Fatal("a new gossip keyring was made where the gateway kept the mesh's")
	}
	s, err := e.root.KVv2(e.kv).Get(ctx, "skybridge/gossip")
	must(t, err)
	if str, _ := s.Data["keyring"].(string); str != string(first.MarshalSecret()) {
		t.Fatal("Vault does not hold the keyring put back")
	}
}

// TestVaultBurstDownSparesSameNamedSite: a burst opened under the name of
// a lasting site whose gateways are away (the mesh cannot see them) is
// closed without revoking those gateways' certificates: burst down revokes
// its own gateways', nodes it issued, alone.
func TestVaultBurstDownSparesSameNamedSite(t *testing.T) {
	e := startVault(t)
	ctx := t.Context()
	p := e.gatewayProvider(t)
	lasting, _, err := p.Identity(ctx, attrs("gw-x-1", "site-x", "100.96.1.5"))
	must(t, err)
	v := p.Issuer().(*certs.Vault)
	spec := certs.VaultBurstSpec{Site: "site-x", Nodes: []certs.Attributes{attrs("site-x-gw1", "site-x", "100.96.9.1")},
		Expires: time.Now().Add(time.Hour), TokenTTL: 10 * time.Minute, OpenedBy: "gw-zrh"}
	vb, err := v.OpenBurst(ctx, e.root.Token(), spec)
	must(t, err)
	closed, err := v.CloseBurst(ctx, e.root.Token(), "site-x", vb.Nodes(), vb.Claim, "gw-zrh")
	must(t, err)
	serial := lasting.Certificate().SerialNumber
	if slices.Contains(closed.Revoked, certs.FormatSerial(serial)) {
		t.Fatalf("burst down revoked %v, the lasting site's gateway's certificate among them", closed.Revoked)
	}
	tb, err := p.Trust(ctx)
	must(t, err)
	if tb.IsRevoked(serial) {
		t.Fatal("the lasting site's gateway is revoked after the same-named burst's down")
	}
}

// TestVaultDeletedVersionSaid: the latest version of a gateway's secret
// deleted in Vault (vault kv delete, or a mount's delete_version_after) is
// said as such, with the command that brings it back, and one destroyed
// as gone for good; read as a secret of nothing, it was "not 32 bytes" and
// "empty", which pointed nowhere.
func TestVaultDeletedVersionSaid(t *testing.T) {
	e := startVault(t)
	ctx := t.Context()
	p := e.gatewayProvider(t)
	_, err := p.Secrets().GossipKeyring(ctx)
	must(t, err)
	_, err = p.Secrets().WireGuardKey(ctx, "gw-a")
	must(t, err)
	must(t, e.root.KVv2(e.kv).Delete(ctx, "skybridge/gossip"))
	must(t, e.root.KVv2(e.kv).Destroy(ctx, "skybridge/nodes/gw-a/wireguard", []int{1}))
	if _, err := p.Secrets().GossipKeyring(ctx); err == nil || !strings.Contains(err.Error(), "its latest version, 1, is deleted: `vault kv undelete -mount="+e.kv+" -versions=1 skybridge/gossip`") {
		t.Errorf("the keyring's latest version deleted: %v", err)
	}
	// Destroyed, it cannot come back: the secret goes, and a new one comes.
	if _, err := p.Secrets().WireGuardKey(ctx, "gw-a"); err == nil || !strings.Contains(err.Error(), "is destroyed and cannot come back: `vault kv metadata delete -mount="+e.kv+" skybridge/nodes/gw-a/wireguard`") {
		t.Errorf("the WireGuard key's latest version destroyed: %v", err)
	}
}

// gatewayProvider opens, for a gateway logging in with an AppRole, the
// Vault back end, closed with the test.
func (e *env) gatewayProvider(t *testing.T) *certs.Provider {
	t.Helper()
	cfg, _ := e.approleConfig(t, t.TempDir())
	p, err := certs.Open(t.Context(), cfg, slog.New(slog.DiscardHandler))
	must(t, err)
	t.Cleanup(func() { p.Close() })
	return p
}
