package certs

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io/fs"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
		{Config{Dir: "/x", RenewFrom: []string{"[2001:db8::1]:7947"}}, ""},
		{Config{Dir: "/x", RenewFrom: []string{"[fe80::1%eth0]:7947"}}, "names a zone (%eth0)"},
		{Config{Dir: "/x", CADir: "/ca", RenewFrom: []string{"198.51.100.1:7947"}}, "renews from its CA"},
		{Config{Dir: "/x", Backend: BackendVault, Vault: &VaultConfig{PKIRole: "r", Auth: VaultAuth{Method: "token"}}, RenewFrom: []string{"198.51.100.1:7947"}}, "renews from Vault"},
	} {
		_, err := tc.cfg.validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%v: %v; want %q", tc.cfg.RenewFrom, err, tc.want)
		}
	}
}

// TestCARenewAgainAfterALostAnswer: a renewal whose answer was lost is
// asked again for the same key (the gateway keeps it until its
// certificate is saved) and answered with the certificate it was issued;
// asked for another key it is a second renewal of a replaced certificate,
// refused.
func TestCARenewAgainAfterALostAnswer(t *testing.T) {
	ca := newTestCA(t)
	life := 30 * 24 * time.Hour
	x := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
	now := t0.Add(life * 2 / 3)
	k, _ := GenerateNodeKey()
	csr, _ := CreateCSR(k, *x.Attributes())
	lost, err := ca.Renew(x.Certificate(), csr, now)
	if err != nil {
		t.Fatal(err)
	}
	again, err := ca.Renew(x.Certificate(), csr, now.Add(time.Minute))
	if err != nil {
		t.Fatalf("the same renewal asked again: %v", err)
	}
	if !again.Equal(lost) {
		t.Fatalf("asked again, certificate %s was issued; want the lost one, %s", FormatSerial(again.SerialNumber), FormatSerial(lost.SerialNumber))
	}
	other, _ := GenerateNodeKey()
	csr2, _ := CreateCSR(other, *x.Attributes())
	if _, err := ca.Renew(x.Certificate(), csr2, now.Add(2*time.Minute)); err == nil || !strings.Contains(err.Error(), "is not its latest") {
		t.Fatalf("a second renewal for another key: %v; want a refusal", err)
	}
}

// TestCARenewAskedAgainIssuesNothing: the holder of a certificate past
// half its life may send the same renewal (same new key) as often as it
// likes; each was certified anew, and every certificate added to the
// index, which every issue and revocation reads and rewrites whole. The
// answer now is the one certificate, and the index does not grow.
func TestCARenewAskedAgainIssuesNothing(t *testing.T) {
	ca := newTestCA(t)
	life := 30 * 24 * time.Hour
	x := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
	k, _ := GenerateNodeKey()
	csr, _ := CreateCSR(k, *x.Attributes())
	now := t0.Add(life/2 + time.Hour)
	first, err := ca.Renew(x.Certificate(), csr, now)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := ca.Issued()
	for i := range 20 {
		c, err := ca.Renew(x.Certificate(), csr, now.Add(time.Duration(i+1)*time.Minute))
		if err != nil {
			t.Fatalf("ask %d: %v", i+2, err)
		}
		if !c.Equal(first) {
			t.Fatalf("ask %d was certified anew (serial %s, first %s)", i+2, FormatSerial(c.SerialNumber), FormatSerial(first.SerialNumber))
		}
	}
	if after, _ := ca.Issued(); len(after) != len(before) {
		t.Fatalf("20 asks again grew the index from %d to %d entries", len(before), len(after))
	}
	// Once the renewal is revoked, asking again brings back nothing.
	if _, err := ca.RevokeSerials([]*big.Int{first.SerialNumber}, "keyCompromise", now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if c, err := ca.Renew(x.Certificate(), csr, now.Add(2*time.Hour)); err == nil {
		t.Fatalf("a revoked renewal asked again was answered with %s", FormatSerial(c.SerialNumber))
	}
}

// TestCARenewAskedAgainKeepsOnePerGateway: the certificate a renewal
// asked again is answered with is kept while it is its gateway's latest;
// an index written by a release that kept none has the renewal certified
// once more, and that one kept.
func TestCARenewAskedAgainKeepsOnePerGateway(t *testing.T) {
	ca := newTestCA(t)
	life := 30 * 24 * time.Hour
	x := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
	k, _ := GenerateNodeKey()
	csr, _ := CreateCSR(k, *x.Attributes())
	now := t0.Add(life * 2 / 3)
	if _, err := ca.Renew(x.Certificate(), csr, now); err != nil {
		t.Fatal(err)
	}
	if err := ca.updateIndex(now, func(idx *caIndex) error { idx.Renewals = nil; return nil }); err != nil {
		t.Fatal(err)
	}
	reissued, err := ca.Renew(x.Certificate(), csr, now.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if c, err := ca.Renew(x.Certificate(), csr, now.Add(2*time.Minute)); err != nil || !c.Equal(reissued) {
		t.Fatalf("after one certified once more, asked again: %v; want that one", err)
	}
	// The gateway renews its renewal: the earlier one's is not kept.
	k2, _ := GenerateNodeKey()
	csr2, _ := CreateCSR(k2, *x.Attributes())
	y, err := ca.Renew(reissued, csr2, now.Add(life*2/3))
	if err != nil {
		t.Fatal(err)
	}
	idx, err := ca.readIndex()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := idx.Renewals[FormatSerial(y.SerialNumber)]; len(idx.Renewals) != 1 || !ok {
		t.Fatalf("the CA keeps %d renewals' certificates; want the latest's alone", len(idx.Renewals))
	}
}

// TestCARenewPastATakeBack: a certificate `ca issue` took back (its
// output could not be written) is not its gateway's latest: the one the
// gateway runs on still renews.
func TestCARenewPastATakeBack(t *testing.T) {
	ca := newTestCA(t)
	life := 30 * 24 * time.Hour
	x := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
	y := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1", "10.1.0.0/16"), t0.Add(time.Hour), life)
	if err := ca.TakeBack(y.Certificate().SerialNumber, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	k, _ := GenerateNodeKey()
	csr, _ := CreateCSR(k, *x.Attributes())
	if _, err := ca.Renew(x.Certificate(), csr, t0.Add(life*2/3)); err != nil {
		t.Fatalf("renewal past a certificate taken back: %v", err)
	}
	if trust(t, ca).IsRevoked(y.Certificate().SerialNumber) == false {
		t.Fatal("the certificate taken back is not revoked")
	}
}

// TestRevokeSerialRevokesRenewals: revoking a certificate revokes the
// renewals its key had issued, and theirs: a thief who renewed first
// keeps nothing the operator does not know of.
func TestRevokeSerialRevokesRenewals(t *testing.T) {
	ca := newTestCA(t)
	life := 30 * 24 * time.Hour
	x := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
	other := issue(t, ca, testAttrs("gw2", "fra", "100.96.0.2"), t0, life)
	renew := func(c *x509.Certificate, at time.Time) *x509.Certificate {
		k, _ := GenerateNodeKey()
		csr, _ := CreateCSR(k, *x.Attributes())
		got, err := ca.Renew(c, csr, at)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	y := renew(x.Certificate(), t0.Add(life*2/3))
	z := renew(y, t0.Add(life*2/3+life*2/3))
	if _, err := ca.RevokeSerials([]*big.Int{x.Certificate().SerialNumber}, "keyCompromise", t0.Add(2*life)); err != nil {
		t.Fatal(err)
	}
	tb := trust(t, ca)
	for name, c := range map[string]*x509.Certificate{"the certificate": x.Certificate(), "its renewal": y, "the renewal's renewal": z} {
		if !tb.IsRevoked(c.SerialNumber) {
			t.Errorf("%s is not revoked", name)
		}
	}
	if tb.IsRevoked(other.Certificate().SerialNumber) {
		t.Error("another gateway's certificate was revoked with it")
	}
}

// TestVerifyRenewer: only an enrollment endpoint's certificate is taken
// for the renewal endpoint; any gateway's would do for server
// authentication, and one posing as it could refuse every renewal.
func TestVerifyRenewer(t *testing.T) {
	ca := newTestCA(t)
	tb := trust(t, ca)
	now := t0.Add(time.Hour)
	k, _ := GenerateNodeKey()
	enroller, err := ca.IssueEnroller("gw-ca", netip.MustParseAddr("100.96.0.9"), k.Public(), time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	if err := verifyRenewer([][]byte{enroller.Raw, ca.Certificate().Raw}, tb, now); err != nil {
		t.Fatalf("the enrollment endpoint's certificate: %v", err)
	}
	gw := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, time.Hour)
	if err := verifyRenewer([][]byte{gw.Certificate().Raw}, tb, now); err == nil || !strings.Contains(err.Error(), "not an enrollment endpoint's") {
		t.Fatalf("a gateway's certificate: %v; want it refused", err)
	}
	rogue, _ := newTestCA(t).IssueEnroller("gw-ca", netip.MustParseAddr("100.96.0.9"), k.Public(), time.Hour, t0)
	if err := verifyRenewer([][]byte{rogue.Raw}, tb, now); err == nil {
		t.Fatal("another CA's enrollment endpoint taken")
	}
	// Nor a revoked one: its key may be what the one posing as the
	// endpoint holds.
	if _, err := ca.RevokeSerials([]*big.Int{enroller.SerialNumber}, "keyCompromise", t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := verifyRenewer([][]byte{enroller.Raw, ca.Certificate().Raw}, trust(t, ca), now); err == nil || !strings.Contains(err.Error(), "is revoked") {
		t.Fatalf("a revoked enrollment endpoint's certificate: %v; want it refused as revoked", err)
	}
}

// TestRenewerKeepsItsKeyAndTakesUpRenewals: a renewal through a CA holder
// that does not answer keeps the key it asks for, for the next try; and
// an identity renewed meanwhile by another process (`identity request`)
// is taken up instead of asked again, which the CA would refuse.
func TestRenewerKeepsItsKeyAndTakesUpRenewals(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "id")
	now := time.Now()
	attrs := testAttrs("gw1", "fra", "100.96.0.1")
	x := issue(t, ca, attrs, now.Add(-20*time.Hour), 30*time.Hour) // past its renewal time
	if err := x.Save(dir, trust(t, ca)); err != nil {
		t.Fatal(err)
	}
	p, err := Open(context.Background(), Config{Dir: dir, RenewFrom: []string{"127.0.0.1:1"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	pending := func() []byte { b, _ := os.ReadFile(filepath.Join(dir, fileNodeKeyNext)); return b }
	if _, _, err := p.obtain(context.Background(), attrs); err == nil {
		t.Fatal("renewed through an endpoint that is not there")
	}
	first := pending()
	if first == nil {
		t.Fatal("the renewal's key is not kept")
	}
	p.obtain(context.Background(), attrs)
	if !bytes.Equal(pending(), first) {
		t.Fatal("the next try asked for another key")
	}
	// Renewed by another process into the directory.
	y := issue(t, ca, attrs, now, 30*time.Hour)
	if err := y.Save(dir, nil); err != nil {
		t.Fatal(err)
	}
	got, _, err := p.obtain(context.Background(), attrs)
	if err != nil || !got.Certificate().Equal(y.Certificate()) {
		t.Fatalf("obtain with a fresh identity in the directory: %v; want it taken up", err)
	}
}

// TestRevokeSupersededKeepsRenewals: revoking, for any reason but
// keyCompromise, the certificate a renewal replaced (an operator
// retiring it) leaves the renewal its gateway runs on.
func TestRevokeSupersededKeepsRenewals(t *testing.T) {
	ca := newTestCA(t)
	life := 30 * 24 * time.Hour
	x := issue(t, ca, testAttrs("gw1", "fra", "100.96.0.1"), t0, life)
	k, _ := GenerateNodeKey()
	csr, _ := CreateCSR(k, *x.Attributes())
	y, err := ca.Renew(x.Certificate(), csr, t0.Add(life*2/3))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{x.Certificate().SerialNumber}, "superseded", t0.Add(life*2/3+time.Hour)); err != nil {
		t.Fatal(err)
	}
	if trust(t, ca).IsRevoked(y.SerialNumber) {
		t.Fatal("revoking the superseded certificate revoked the renewal its gateway runs on")
	}
}

// TestPendingKeyNotReusedAfterReissue: a renewal key kept from before the
// directory got a new identity (`ca issue --out`, after a compromise) is
// not asked for the new one.
func TestPendingKeyNotReusedAfterReissue(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "id")
	attrs := testAttrs("gw1", "fra", "100.96.0.1")
	if err := issue(t, ca, attrs, t0, time.Hour).Save(dir, nil); err != nil {
		t.Fatal(err)
	}
	k1, err := pendingRenewalKey(dir) // a renewal that failed
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := pendingRenewalKey(dir); !again.PublicKey.Equal(&k1.PublicKey) {
		t.Fatal("the same certificate's renewal asks for another key")
	}
	if err := issue(t, ca, attrs, t0.Add(time.Minute), time.Hour).Save(dir, nil); err != nil {
		t.Fatal(err)
	}
	if k, err := pendingRenewalKey(dir); err != nil || k.PublicKey.Equal(&k1.PublicKey) {
		t.Fatalf("the renewal of the re-issued identity asks for the key kept before: %v", err)
	}
}

// startRenewEndpoint serves CA.Renew as a CA-holding gateway does (its
// enrollment endpoint's certificate, the client's certificate asked for),
// and returns its address.
func startRenewEndpoint(t *testing.T, ca *CA) string {
	t.Helper()
	k, _ := GenerateNodeKey()
	ec, err := ca.IssueEnroller("gw-ca", netip.MustParseAddr("100.96.0.9"), k.Public(), time.Hour, time.Now().Add(-time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req RenewRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || len(r.TLS.PeerCertificates) == 0 {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		c, err := ca.Renew(r.TLS.PeerCertificates[0], req.CSR, time.Now())
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		json.NewEncoder(w).Encode(RenewResponse{Certificate: encodePEM(pemCert, c.Raw)})
	}))
	srv.TLS = &tls.Config{MinVersion: tls.VersionTLS13, ClientAuth: tls.RequestClientCert,
		Certificates: []tls.Certificate{{Certificate: [][]byte{ec.Raw, ca.Certificate().Raw}, PrivateKey: k}}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// TestRenewalsOfOneDirectoryAtOnce: the gateway and `identity request`
// renewing one directory at once get one renewal between them: the
// second takes up what the first wrote. Each asking with its own key, the
// CA refused the second as a copy of the key renewing again.
func TestRenewalsOfOneDirectoryAtOnce(t *testing.T) {
	ca := newTestCA(t)
	ep := startRenewEndpoint(t, ca)
	dir := filepath.Join(t.TempDir(), "id")
	attrs := testAttrs("gw1", "fra", "100.96.0.1")
	x := issue(t, ca, attrs, time.Now().Add(-20*time.Hour), 30*time.Hour) // past its renewal time
	if err := x.Save(dir, trust(t, ca)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	got := make([]*NodeIdentity, 2)
	errs := make([]error, 2)
	for i := range 2 {
		wg.Go(func() {
			p, err := Open(context.Background(), Config{Dir: dir, RenewFrom: []string{ep}}, nil)
			if err != nil {
				errs[i] = err
				return
			}
			defer p.Close()
			got[i], _, errs[i] = p.obtain(context.Background(), attrs)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("renewal %d: %v", i, err)
		}
	}
	if !got[0].Certificate().Equal(got[1].Certificate()) || got[0].Certificate().Equal(x.Certificate()) {
		t.Fatal("two renewals at once did not end on one new certificate")
	}
	issued, _ := ca.Issued()
	var ofGW1 int
	for _, e := range issued {
		if e.Node == "gw1" {
			ofGW1++
		}
	}
	if ofGW1 != 2 {
		t.Fatalf("the CA issued gw1 %d certificates; want the first and one renewal", ofGW1)
	}
	if _, err := os.Stat(filepath.Join(dir, fileNodeKeyNext)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the renewal's key is left beside the certificate it got: %v", err)
	}
}

// TestRenewLockGivesUpWithItsContext: a renewal waiting for another
// process's (stopped with Ctrl-Z, say) gives up when its context ends: a
// gateway stopping does not wait for it.
func TestRenewLockGivesUpWithItsContext(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "id")
	attrs := testAttrs("gw1", "fra", "100.96.0.1")
	if err := issue(t, ca, attrs, time.Now().Add(-20*time.Hour), 30*time.Hour).Save(dir, trust(t, ca)); err != nil {
		t.Fatal(err)
	}
	unlock, err := lockFile(filepath.Join(dir, fileRenewLock)) // the other process's
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	p, err := Open(context.Background(), Config{Dir: dir, RenewFrom: []string{startRenewEndpoint(t, ca)}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { _, _, err := p.obtain(ctx, attrs); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("obtain while another renewal holds the lock: %v; want it given up with its context", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("obtain waited for the lock after its context ended")
	}
}
