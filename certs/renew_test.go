package certs

import (
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"
)

func TestCARenew(t *testing.T) {
	life := 30 * 24 * time.Hour
	due := t0.Add(life/2 + time.Hour) // past half its life
	csrFor := func(t *testing.T, a Attributes) []byte {
		t.Helper()
		k, err := GenerateNodeKey()
		if err != nil {
			t.Fatal(err)
		}
		csr, err := CreateCSR(k, a)
		if err != nil {
			t.Fatal(err)
		}
		return csr
	}
	burst := testAttrs("gw-burst", "burst-1", "100.96.0.9")
	burst.Labels = map[string]string{BurstLabel: "true"}
	tests := []struct {
		name string
		// setup issues what the case needs and returns the certificate
		// presented, the request and when it is made.
		setup func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time)
		want  string // part of the refusal; "" for a renewal
	}{
		{"past half its life", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1", "10.1.0.0/16"), t0, life)
			return id.Certificate(), csrFor(t, *id.Attributes()), due
		}, ""},
		{"in the first half of its life", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
			return id.Certificate(), csrFor(t, *id.Attributes()), t0.Add(life/2 - time.Hour)
		}, "half way through its life"},
		{"expired", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
			return id.Certificate(), csrFor(t, *id.Attributes()), t0.Add(life + time.Second)
		}, "an expired certificate cannot be renewed"},
		{"revoked", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
			if _, err := ca.RevokeSerials([]*big.Int{id.Certificate().SerialNumber}, "keyCompromise", t0.Add(time.Hour)); err != nil {
				t.Fatal(err)
			}
			return id.Certificate(), csrFor(t, *id.Attributes()), due
		}, "is revoked"},
		{"replaced by a later certificate of the gateway", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			old := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1", "10.1.0.0/16", "10.2.0.0/16"), t0, life)
			issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1", "10.1.0.0/16"), t0.Add(time.Hour), life)
			return old.Certificate(), csrFor(t, *old.Attributes()), due
		}, "is not its latest"},
		{"a burst gateway's", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, ca, burst, t0, life)
			return id.Certificate(), csrFor(t, *id.Attributes()), due
		}, "burst gateway"},
		{"another CA's", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, newTestCA(t), testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
			return id.Certificate(), csrFor(t, *id.Attributes()), due
		}, "not one of this CA's"},
		{"a request for other attributes", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1", "10.1.0.0/16"), t0, life)
			return id.Certificate(), csrFor(t, testAttrs("gw1", "fra", "100.96.0.1", "10.0.0.0/8")), due
		}, "asks for others"},
		{"a request for the same key", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
			csr, err := CreateCSR(id.key, *id.Attributes())
			if err != nil {
				t.Fatal(err)
			}
			return id.Certificate(), csr, due
		}, "certifies a new key"},
		{"a policy signer's", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			k, _ := GenerateNodeKey()
			c, err := ca.IssuePolicySigner("compliance", k.Public(), life, t0)
			if err != nil {
				t.Fatal(err)
			}
			return c, csrFor(t, testAttrs("compliance", "fra", "100.96.0.1")), due
		}, "not a gateway certificate"},
		{"a malformed request", func(t *testing.T, ca *CA) (*x509.Certificate, []byte, time.Time) {
			id := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
			return id.Certificate(), []byte("not a CSR"), due
		}, "CERTIFICATE REQUEST"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ca := newTestCA(t)
			cur, csr, now := tc.setup(t, ca)
			before, err := ca.Issued()
			if err != nil {
				t.Fatal(err)
			}
			got, err := ca.Renew(cur, csr, now)
			if tc.want != "" {
				if !errors.Is(err, ErrIssueRefused) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Renew: %v; want a refusal saying %q", err, tc.want)
				}
				if after, _ := ca.Issued(); len(after) != len(before) {
					t.Fatalf("a refused renewal left %d entries in the index, want %d", len(after), len(before))
				}
				return
			}
			if err != nil {
				t.Fatalf("Renew: %v", err)
			}
			// The same attributes, the new key, the same life, and the
			// mesh accepts it.
			a, err := trust(t, ca).VerifyCertificate(got, now)
			if err != nil {
				t.Fatalf("renewed certificate refused: %v", err)
			}
			want, _ := AttributesOf(cur)
			if !a.Equal(want) {
				t.Fatalf("renewed attributes differ: %v", a.Differences(want))
			}
			req, _, _ := ParseCSR(csr)
			if !req.PublicKey.(*ecdsa.PublicKey).Equal(got.PublicKey) {
				t.Fatal("renewed certificate is not for the requested key")
			}
			if l := got.NotAfter.Sub(got.NotBefore); l != cur.NotAfter.Sub(cur.NotBefore) {
				t.Fatalf("renewed life %s, want the renewed certificate's %s", l, cur.NotAfter.Sub(cur.NotBefore))
			}
			// It is now the gateway's latest: the one it replaced cannot
			// be renewed again.
			if _, err := ca.Renew(cur, csrFor(t, *want), now); err == nil || !strings.Contains(err.Error(), "is not its latest") {
				t.Fatalf("second renewal of the replaced certificate: %v; want a refusal", err)
			}
		})
	}
}

func TestCARenewEndsWithTheCA(t *testing.T) {
	ca := newTestCA(t) // valid from t0-24h for DefaultCAValidity
	life := 360 * 24 * time.Hour
	at := ca.Certificate().NotAfter.Add(-life)
	id := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), at, life-time.Hour)
	now := at.Add(life / 2)
	k, _ := GenerateNodeKey()
	csr, _ := CreateCSR(k, *id.Attributes())
	got, err := ca.Renew(id.Certificate(), csr, now)
	if err != nil {
		t.Fatal(err)
	}
	if !got.NotAfter.Equal(ca.Certificate().NotAfter) {
		t.Fatalf("renewed until %s; want the CA's end %s", got.NotAfter, ca.Certificate().NotAfter)
	}
}

func TestRenewFromConfig(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Dir: "/x", RenewFrom: []string{"198.51.100.1:7947", "ca.bank.example:7947"}}, ""},
		{Config{Dir: "/x", RenewFrom: []string{"198.51.100.1"}}, "not host:port"},
		{Config{Dir: "/x", RenewFrom: []string{"198.51.100.1:http"}}, "not host:port"},
		{Config{Dir: "/x", RenewFrom: []string{":7947"}}, "not host:port"},
		{Config{Dir: "/x", CADir: "/ca", RenewFrom: []string{"198.51.100.1:7947"}}, "renews from its CA"},
		{Config{Dir: "/x", Backend: BackendVault, Vault: &VaultConfig{PKIRole: "r", Auth: VaultAuth{Method: "token"}}, RenewFrom: []string{"198.51.100.1:7947"}}, "renews from Vault"},
	} {
		_, err := tc.cfg.validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%v: %v; want %q", tc.cfg.RenewFrom, err, tc.want)
		}
	}
}
