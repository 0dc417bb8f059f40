package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// FuzzVerifySignature: a policy and signature as gossip delivers them
// (the two parts of a policy blob) verify or are refused, never crash;
// a signature file parses back to itself once marshalled; and whatever
// verifies is the file signed, of the revision the signature names.
func FuzzVerifySignature(f *testing.F) {
	ca, err := certs.InitCA(filepath.Join(f.TempDir(), "ca"), certs.InitOptions{Now: nov24.Add(-time.Hour)})
	if err != nil {
		f.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		f.Fatal(err)
	}
	src := []byte(testPolicy)
	byCA, err := Sign("test.hcl", src, ca.Signer(), "mesh CA", nil, nov24)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(src, byCA.Marshal())
	signer, err := ca.NewPolicySigner("compliance", 24*time.Hour, nov24)
	if err != nil {
		f.Fatal(err)
	}
	bySigner, err := Sign("test.hcl", src, signer.Signer(), signer.Name(), signer.Certificate(), nov24)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(src, bySigner.Marshal())
	f.Add([]byte("policy {"), []byte(`{"format":"skybridge-policy-signature/v1","policy":{},"signature":""}`))
	f.Fuzz(func(t *testing.T, src, sigFile []byte) {
		sig, err := ParseSignature(sigFile)
		if err != nil {
			return
		}
		again, err := ParseSignature(sig.Marshal())
		if err != nil {
			t.Fatalf("signature file does not parse once marshalled: %v", err)
		}
		if again.Format != sig.Format || again.Policy != sig.Policy || !again.SignedAt.Equal(sig.SignedAt) || again.Signer != sig.Signer ||
			again.SignerCertificate != sig.SignerCertificate || !bytes.Equal(again.Signature, sig.Signature) {
			t.Fatalf("signature file changed by marshalling:\n%+v\n%+v", *sig, *again)
		}
		p, err := Verify("test.hcl", src, sig, tb, nov24)
		if err != nil {
			if p != nil {
				t.Fatal("policy and error")
			}
			return
		}
		sum := sha256.Sum256(src)
		if hex.EncodeToString(sum[:]) != sig.Policy.SHA256 || p.Revision() != sig.Policy {
			t.Fatalf("verified policy %v is not the signed %v", p.Revision(), sig.Policy)
		}
		if _, err := Verify("test.hcl", src, again, tb, nov24); err != nil {
			t.Fatalf("verifies, but not once its signature file is written again: %v", err)
		}
	})
}
