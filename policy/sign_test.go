package policy

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

func testCA(t *testing.T) *certs.CA {
	t.Helper()
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{Now: nov24.Add(-time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func trustOf(t *testing.T, ca *certs.CA) *certs.TrustBundle {
	t.Helper()
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	return tb
}

func TestSignVerify(t *testing.T) {
	ca := testCA(t)
	other := testCA(t)
	src := []byte(testPolicy)
	sig, err := Sign("test.hcl", src, ca.Signer(), "mesh CA", nil, nov24)
	if err != nil {
		t.Fatal(err)
	}
	// The signature survives its file format.
	sig, err = ParseSignature(sig.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	tb := trustOf(t, ca)
	p, err := Verify("test.hcl", src, sig, tb, nov24)
	if err != nil {
		t.Fatalf("genuine policy refused: %v", err)
	}
	if p.Revision().Version != 3 {
		t.Fatalf("verified policy version %d", p.Revision().Version)
	}

	tampered := []byte(strings.Replace(testPolicy, `jurisdiction = ["CH"]`, `jurisdiction = ["US"]`, 1))
	forged := *sig
	forged.Signature = append([]byte(nil), sig.Signature...)
	forged.Signature[len(forged.Signature)-1] ^= 1
	resigned := *sig
	resigned.SignedAt = sig.SignedAt.Add(time.Second)
	foreign, _ := Sign("test.hcl", src, other.Signer(), "other CA", nil, nov24)
	// A day ahead of the verifier's clock, beyond any skew allowed: a
	// signature that could be dated ahead would outrank, in Adopt, every
	// policy signed until then.
	ahead, err := Sign("test.hcl", src, ca.Signer(), "mesh CA", nil, nov24.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		src  []byte
		sig  *Signature
		want error
	}{
		{"unsigned", src, nil, ErrUnsigned},
		{"tampered policy", tampered, sig, ErrBadSignature},
		{"forged signature", src, &forged, ErrBadSignature},
		{"signing time changed", src, &resigned, ErrBadSignature},
		{"signed by another mesh's CA", src, foreign, ErrBadSignature},
		{"signed in the future", src, ahead, ErrBadSignature},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Verify("test.hcl", tt.src, tt.sig, tb, nov24)
			if !errors.Is(err, tt.want) || p != nil {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}

	// Another CA's signature says whose it is, not only "changed".
	if _, err := Verify("test.hcl", src, foreign, tb, nov24); err == nil || !strings.Contains(err.Error(), `names its signer "other CA"`) {
		t.Fatalf("another mesh's CA: %v", err)
	}
	if _, err := Sign("bad.hcl", []byte("policy {"), ca.Signer(), "mesh CA", nil, nov24); err == nil || !strings.Contains(err.Error(), "refusing to sign") {
		t.Fatalf("signing an invalid policy: %v", err)
	}
}

// TestDelegatedSigner: a policy signer certified by the CA can sign; once
// revoked, its signatures are refused; a gateway certificate cannot sign.
func TestDelegatedSigner(t *testing.T) {
	ca := testCA(t)
	src := []byte(testPolicy)
	signer, err := ca.NewPolicySigner("compliance", 24*time.Hour, nov24)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := Sign("test.hcl", src, signer.Signer(), signer.Name(), signer.Certificate(), nov24)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Verify("test.hcl", src, sig, trustOf(t, ca), nov24); err != nil {
		t.Fatalf("delegated signature refused: %v", err)
	}
	// Still valid after the signer's certificate expired: it is judged at
	// signing time.
	if _, err := Verify("test.hcl", src, sig, trustOf(t, ca), nov24.Add(30*24*time.Hour)); err != nil {
		t.Fatalf("signature refused after signer expiry: %v", err)
	}
	// But not one dated after the certificate ended: the CA vouched for
	// the key only until then, and a key kept (or leaked) past it could
	// otherwise go on signing policies. Sign refuses to make one, so it
	// is made here by hand.
	late := *sig
	late.SignedAt = signer.Certificate().NotAfter.Add(48 * time.Hour).UTC().Truncate(time.Second)
	digest, err := signDigest(late.Policy.SHA256, late.SignedAt)
	if err != nil {
		t.Fatal(err)
	}
	if late.Signature, err = signer.Signer().Sign(rand.Reader, digest, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify("test.hcl", src, &late, trustOf(t, ca), late.SignedAt); !errors.Is(err, ErrUntrustedSigner) {
		t.Fatalf("a signature dated after its signer's certificate ended: %v; want an untrusted signer", err)
	}

	// Signed on a machine whose clock runs 3 minutes behind the CA's,
	// right after the signer was made: within the skew gateways allow.
	behind, err := Sign("test.hcl", src, signer.Signer(), signer.Name(), signer.Certificate(), nov24.Add(-3*time.Minute))
	if err != nil {
		t.Fatalf("signing 3 minutes behind the CA's clock: %v", err)
	}
	if _, err := Verify("test.hcl", src, behind, trustOf(t, ca), nov24); err != nil {
		t.Fatalf("a signature made 3 minutes behind the CA's clock refused: %v", err)
	}
	// Further off, or after the certificate ran out: every gateway would
	// refuse the signature, so it is not made.
	for _, at := range []time.Time{nov24.Add(-10 * time.Minute), nov24.Add(25 * time.Hour)} {
		if _, err := Sign("test.hcl", src, signer.Signer(), signer.Name(), signer.Certificate(), at); err == nil || !strings.Contains(err.Error(), "this machine's clock says "+at.Format(time.RFC3339)) {
			t.Errorf("signing at %s with a signer valid %s to %s: %v; want a refusal naming the clock", at, signer.Certificate().NotBefore, signer.Certificate().NotAfter, err)
		}
	}

	gw, err := ca.IssueIdentity(certs.Attributes{Node: "gw1", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE",
		OverlayIP: certs.DefaultMeshPrefix.Addr().Next()}, time.Hour, nov24)
	if err != nil {
		t.Fatal(err)
	}
	gwSig, _ := Sign("test.hcl", src, gw.Signer(), "gw1", gw.Certificate(), nov24)
	if _, err := Verify("test.hcl", src, gwSig, trustOf(t, ca), nov24); !errors.Is(err, ErrUntrustedSigner) {
		t.Fatalf("gateway-signed policy: err = %v, want untrusted signer", err)
	}

	if _, err := ca.RevokeSerials([]*big.Int{signer.Certificate().SerialNumber}, "keyCompromise", nov24); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify("test.hcl", src, sig, trustOf(t, ca), nov24); !errors.Is(err, ErrUntrustedSigner) {
		t.Fatalf("revoked signer: err = %v", err)
	}
}

func TestAdopt(t *testing.T) {
	v3 := mustParse(t, testPolicy)
	v4 := mustParse(t, strings.Replace(testPolicy, "version = 3", "version = 4", 1))
	v3b := mustParse(t, strings.Replace(testPolicy, `reason   = "DR test"`, `reason   = "DR test!"`, 1))
	// Newer, so that only its name can refuse it.
	other := mustParse(t, strings.Replace(strings.Replace(testPolicy, `name    = "test"`, `name    = "other"`, 1), "version = 3", "version = 4", 1))
	for _, tc := range []struct {
		name      string
		cur, cand *Policy
		adopt     bool
		err       error
	}{
		{"first policy", nil, v3, true, nil},
		{"newer", v3, v4, true, nil},
		{"same", v3, v3, false, nil},
		{"older", v4, v3, false, ErrRollback},
		{"same version, other content", v3, v3b, false, ErrEquivocation},
	} {
		adopt, err := Adopt(tc.cur, tc.cand)
		if adopt != tc.adopt || !errors.Is(err, tc.err) {
			t.Errorf("%s: Adopt = %v, %v; want %v, %v", tc.name, adopt, err, tc.adopt, tc.err)
		}
	}
	if adopt, err := Adopt(v3, other); adopt || err == nil || !strings.Contains(err.Error(), `policy "other" cannot replace policy "test"`) {
		t.Errorf("a newer policy of another name: Adopt = %v, %v; want it refused for its name", adopt, err)
	}

	// Signed versions: a newer one dated before the policy in force is
	// refused (an expired signer's key could date one back into its
	// validity), unless within clock skew.
	ca := testCA(t)
	tb := trustOf(t, ca)
	signed := func(src string, at time.Time) *Policy {
		sig, err := Sign("test.hcl", []byte(src), ca.Signer(), "mesh CA", nil, at)
		if err != nil {
			t.Fatal(err)
		}
		p, err := Verify("test.hcl", []byte(src), sig, tb, nov24)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	v4src := strings.Replace(testPolicy, "version = 3", "version = 4", 1)
	s3 := signed(testPolicy, nov24.Add(-time.Hour))
	for _, tc := range []struct {
		name string
		at   time.Time
		err  error
	}{
		{"signed after", nov24, nil},
		{"signed a minute before, within clock skew", nov24.Add(-time.Hour - time.Minute), nil},
		{"signed a day before", nov24.Add(-25 * time.Hour), ErrBackdated},
	} {
		adopt, err := Adopt(s3, signed(v4src, tc.at))
		if adopt != (tc.err == nil) || !errors.Is(err, tc.err) {
			t.Errorf("version 4 %s version 3: Adopt = %v, %v; want %v", tc.name, adopt, err, tc.err)
		}
	}
}

// TestDuplicateKeyNotSigned: a key given twice in one object of a policy
// (two values for one label of a selector) is read as HCL reads it, the
// last, so that a policy an earlier release signed still parses; lint says
// it and sign refuses it, where it is.
func TestDuplicateKeyNotSigned(t *testing.T) {
	src, err := os.ReadFile("../docs/examples/residency.hcl")
	if err != nil {
		t.Fatal(err)
	}
	dup := []byte(strings.Replace(string(src), `labels      = { certified = "iso27001" }`, `labels      = { certified = "iso27001", certified = "none" }`, 1))
	if bytes.Equal(dup, src) {
		t.Fatal("the example's selector labels moved: update this test")
	}
	p, err := Parse("residency.hcl", dup)
	if err != nil {
		t.Fatalf("a policy with a key given twice no longer parses: %v", err)
	}
	found := false
	for _, f := range Lint(p, nil, nov24) {
		found = found || f.Check == "duplicate-key" && f.Severity == "error" && f.Pos.Line == 36 && strings.Contains(f.Message, `key "certified" given twice`)
	}
	if !found {
		t.Errorf("lint does not report the key given twice at line 36: %+v", Lint(p, nil, nov24))
	}
	if _, err := Sign("residency.hcl", dup, testCA(t).Signer(), "mesh CA", nil, nov24); err == nil || !strings.Contains(err.Error(), `residency.hcl:36: key "certified" given twice`) {
		t.Errorf("Sign of a policy with a key given twice: %v; want it refused, with its place", err)
	}
}

// TestVerifyWithdrawnKeyUsage: with its chain no longer checked (its CA
// retired), a signer certificate still must be one for code signing, as
// x509 verification judged it: one naming no usage may sign, one naming
// only others may not.
func TestVerifyWithdrawnKeyUsage(t *testing.T) {
	tb := trustOf(t, testCA(t))
	src := []byte(testPolicy)
	for _, tt := range []struct {
		usage []x509.ExtKeyUsage
		ok    bool
	}{
		{nil, true},
		{[]x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}, true},
		{[]x509.ExtKeyUsage{x509.ExtKeyUsageAny}, true},
		{[]x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, false},
	} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "compliance"},
			NotBefore: nov24.Add(-time.Hour), NotAfter: nov24.Add(time.Hour), ExtKeyUsage: tt.usage}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		cert, _ := x509.ParseCertificate(der)
		sig, err := Sign("test.hcl", src, key, "compliance", cert, nov24)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := VerifyWithdrawn("test.hcl", src, sig, tb, nov24); (err == nil) != tt.ok {
			t.Errorf("usage %v: %v; want accepted %v", tt.usage, err, tt.ok)
		}
	}
}
