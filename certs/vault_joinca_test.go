package certs

import (
	"crypto/x509"
	"encoding/pem"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	vault "github.com/hashicorp/vault/api"
)

// TestVaultJoinCAIsTheClientsCA: a join token carries the CA this
// gateway's own Vault client trusts, as the client reads its environment:
// VAULT_CACERT before VAULT_CACERT_BYTES, and VAULT_CAPATH walked whole.
// Another, and the burst gateway would not trust Vault.
func TestVaultJoinCAIsTheClientsCA(t *testing.T) {
	pemOf := func(ca *CA) []byte {
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Certificate().Raw})
	}
	ownPool := func(t *testing.T) *x509.CertPool {
		t.Helper()
		vc, err := vaultClientConfig("https://vault.example.com:8200", &vault.TLSConfig{}) // ca_cert unset: as NewVault
		if err != nil {
			t.Fatal(err)
		}
		return transportRoots(t, vc)
	}
	burstPool := func(t *testing.T) *x509.CertPool {
		t.Helper()
		c, err := vault.NewClient(&vault.Config{Address: "https://vault.example.com:8200"})
		if err != nil {
			t.Fatal(err)
		}
		vj, err := (&Vault{client: c, cfg: &VaultConfig{}}).VaultJoinFor(&VaultBurst{})
		if err != nil {
			t.Fatal(err)
		}
		// What a burst gateway builds from the token (UnwrapSecretID), in
		// an environment of its own (a fresh VM: none of the variables).
		for _, v := range []string{vault.EnvVaultCACert, vault.EnvVaultCACertBytes, vault.EnvVaultCAPath} {
			old, had := os.LookupEnv(v)
			os.Unsetenv(v)
			if had {
				defer os.Setenv(v, old)
			}
		}
		vc, err := vaultClientConfig("https://vault.example.com:8200", &vault.TLSConfig{CACertBytes: []byte(vj.CACert)})
		if err != nil {
			t.Fatal(err)
		}
		return transportRoots(t, vc)
	}

	caA, caB := newTestCA(t), newTestCA(t)
	dir := t.TempDir()
	fileB := filepath.Join(dir, "b.pem")
	os.WriteFile(fileB, pemOf(caB), 0o600)

	t.Run("both VAULT_CACERT and VAULT_CACERT_BYTES", func(t *testing.T) {
		t.Setenv(vault.EnvVaultCACertBytes, string(pemOf(caA)))
		t.Setenv(vault.EnvVaultCACert, fileB)
		own, burst := ownPool(t), burstPool(t)
		if !trusts(own, caB) || trusts(own, caA) {
			t.Fatalf("premise: the gateway's own client trusts B (VAULT_CACERT) only")
		}
		if !trusts(burst, caB) {
			t.Errorf("the join token's CA is VAULT_CACERT_BYTES' (A), not VAULT_CACERT's (B), which the gateway's client trusts Vault by: the burst gateway does not trust Vault")
		}
	})
	t.Run("VAULT_CAPATH with a subdirectory", func(t *testing.T) {
		capath := t.TempDir()
		os.WriteFile(filepath.Join(capath, "a.pem"), pemOf(caA), 0o600)
		os.Mkdir(filepath.Join(capath, "sub"), 0o700)
		os.WriteFile(filepath.Join(capath, "sub", "b.pem"), pemOf(caB), 0o600)
		t.Setenv(vault.EnvVaultCAPath, capath)
		own, burst := ownPool(t), burstPool(t)
		if !trusts(own, caB) {
			t.Fatalf("premise: the gateway's own client trusts the CA in the subdirectory")
		}
		if !trusts(burst, caB) {
			t.Errorf("the join token lacks the CA in a subdirectory of VAULT_CAPATH, which the gateway's client trusts Vault by")
		}
	})
	// A system's CA directory holds each CA under several names: its
	// file, a hash link to it, and a bundle of them all.
	t.Run("VAULT_CAPATH holding each CA more than once", func(t *testing.T) {
		capath := t.TempDir()
		for _, err := range []error{
			os.WriteFile(filepath.Join(capath, "a.pem"), pemOf(caA), 0o600),
			os.WriteFile(filepath.Join(capath, "b.pem"), pemOf(caB), 0o600),
			os.Symlink("a.pem", filepath.Join(capath, "1a2b3c4d.0")),
			os.WriteFile(filepath.Join(capath, "bundle.crt"), append(pemOf(caA), pemOf(caB)...), 0o600),
		} {
			if err != nil {
				t.Fatal(err)
			}
		}
		t.Setenv(vault.EnvVaultCAPath, capath)
		c, err := vault.NewClient(&vault.Config{Address: "https://vault.example.com:8200"})
		if err != nil {
			t.Fatal(err)
		}
		vj, err := (&Vault{client: c, cfg: &VaultConfig{}}).VaultJoinFor(&VaultBurst{})
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(vj.CACert, "-----BEGIN CERTIFICATE-----"); n != 2 {
			t.Errorf("the join token carries %d certificates for the 2 CAs of VAULT_CAPATH (%d bytes): each should go once", n, len(vj.CACert))
		}
		if burst := burstPool(t); !trusts(burst, caA) || !trusts(burst, caB) {
			t.Errorf("the join token lacks a CA of VAULT_CAPATH")
		}
	})
}

func transportRoots(t *testing.T, vc *vault.Config) *x509.CertPool {
	t.Helper()
	return vc.HttpClient.Transport.(*http.Transport).TLSClientConfig.RootCAs
}

func trusts(p *x509.CertPool, ca *CA) bool {
	if p == nil {
		return false
	}
	_, err := ca.Certificate().Verify(x509.VerifyOptions{Roots: p})
	return err == nil
}
