package mesh

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/policy"
)

// FuzzEnrollRequest: the body a stranger posts to the enrollment
// endpoint is decoded as the handler does, and its CSR checked, before
// any token is looked up: refused or taken, never a crash; a CSR taken is
// signed by the key it carries.
func FuzzEnrollRequest(f *testing.F) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := certs.CreateCSR(key, certs.Attributes{Node: "n", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE"})
	if err != nil {
		f.Fatal(err)
	}
	good, _ := json.Marshal(enrollRequest{Token: "0123456789abcdef", Secret: make([]byte, 32), CSR: csr})
	f.Add(good)
	f.Add([]byte(`{"token":"0123456789abcdef","secret":"","csr":"LS0tLS1CRUdJTiBDRVJUSUZJQ0FURSBSRVFVRVNULS0tLS0KLS0tLS1FTkQgQ0VSVElGSUNBVEUgUkVRVUVTVC0tLS0tCg=="}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		var req enrollRequest
		if err := json.NewDecoder(io.LimitReader(bytes.NewReader(body), 64<<10)).Decode(&req); err != nil {
			return
		}
		if !validTokenID(req.Token) {
			return
		}
		csr, err := parseEnrollCSR(req.CSR)
		if err != nil {
			if csr != nil {
				t.Fatal("CSR and error")
			}
			return
		}
		if csr.PublicKey == nil || csr.CheckSignature() != nil {
			t.Fatal("a CSR taken that its key did not sign")
		}
	})
}

// FuzzLoadConfig: a gateway configuration file of any content loads or is
// refused with an error, never a crash or a hang; one that loads names a
// state directory and an identity directory.
func FuzzLoadConfig(f *testing.F) {
	f.Add([]byte(goodConfig))
	f.Add([]byte(goodConfig + "policy {\n  file = \"p.hcl\"\n}\nburst {\n  enroll_listen = \"0.0.0.0:7947\"\n}\noperator {\n  listen = \"127.0.0.1:7480\"\n}\n"))
	f.Add([]byte("state_dir = \"x\"\ngossip {\n seeds = [\"[::1]:1\", 3]\n}\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, src []byte) {
		p := filepath.Join(dir, "gateway.hcl")
		if err := os.WriteFile(p, src, 0o644); err != nil {
			t.Fatal(err)
		}
		s, err := LoadConfig(p)
		if err != nil {
			if s != nil {
				t.Fatal("settings and error")
			}
			return
		}
		if s.StateDir == "" || s.Identity.Dir == "" {
			t.Fatalf("loaded without a state or identity directory: %+v", s)
		}
	})
}

// FuzzHandle: whatever a holder of the gossip key sends — the worker's
// messages and push/pull state — a running gateway refuses or takes it,
// and goes on; it neither crashes nor adopts trust, a policy or a
// revocation list that its CA did not sign.
func FuzzHandle(f *testing.F) {
	dir := f.TempDir()
	ca := meshCA(f, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		f.Fatal(err)
	}
	s := liveSettings(f, filepath.Join(dir, "op0"))
	s.Node = provisionGateway(f, ca, tb, certs.Attributes{Node: "op0", Site: "zrh", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.7.1")}, time.Hour, s.Identity.Dir)
	g := runLiveGateway(f, s, io.Discard).g

	// Seeds: every message type, from what the gateway itself sends.
	probe, err := ca.IssueIdentity(certs.Attributes{Node: "probe", Site: "s", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.9.9")}, time.Hour, time.Now())
	if err != nil {
		f.Fatal(err)
	}
	ca.RevokeSerials(nil, "unspecified", time.Now())
	var crl *x509.RevocationList
	if tb2, err := ca.TrustBundle(); err == nil {
		crl = tb2.CRL()
	}
	polSrc := []byte("policy {\n  name    = \"p\"\n  version = 1\n}\n")
	sig, err := policy.Sign("policy.hcl", polSrc, ca.Signer(), "mesh CA", nil, time.Now())
	if err == nil {
		f.Add(encodeMessage(msgBlob, []byte{blobPolicy}, bundle(polSrc, sig.Marshal())))
	}
	if crl != nil {
		f.Add(encodeMessage(msgBlob, []byte{blobCRL}, crl.Raw))
		f.Add(encodeMessage(msgBlob, []byte{blobCRLs}, bundle(crl.Raw, crl.Raw)))
	}
	f.Add(encodeMessage(msgCertRequest, []byte("probe"), probe.Certificate().Raw, []byte("127.0.0.1:9")))
	f.Add(encodeMessage(msgCert, probe.Certificate().Raw))
	f.Add(encodeMessage(msgAnnounce, []byte{blobPolicy}, u64(9), []byte("probe")))
	f.Add(encodeMessage(msgBlobRequest, []byte{blobCRL}, []byte("probe"), []byte("127.0.0.1:9")))
	f.Add(encodeMessage(msgLeaving, []byte("probe"), u64(uint64(time.Now().Unix())), u64(1), []byte("sig")))
	op := &keyringOp{kind: opUseHash, key: make([]byte, 32), id: make([]byte, 16), at: time.Now(), initiator: "probe", certDER: probe.Certificate().Raw, sig: []byte("x")}
	f.Add(op.encode())
	f.Add(encodeMessage(msgKeyringAck, []byte("probe"), make([]byte, 16), []byte("sig")))
	f.Add(encodeMessage(msgWGKeyAck, []byte("probe"), make([]byte, 32), []byte("sig")))
	f.Add(g.localState(true))
	caRaw := ca.Certificate().Raw
	f.Fuzz(func(t *testing.T, b []byte) {
		g.handle(b)
		d := delegate{g: g}
		if len(b) > 0 && b[0] == 0 {
			d.MergeRemoteState(b, true)
		}
		cur := g.trust.Load()
		if cas := cur.CAs(); len(cas) != 1 || !bytes.Equal(cas[0].Raw, caRaw) {
			t.Fatalf("trust changed by gossip: %d CAs", len(cas))
		}
		for _, l := range cur.CRLs() {
			if l.CheckSignatureFrom(ca.Certificate()) != nil {
				t.Fatal("a revocation list the CA did not sign is in force")
			}
		}
		if pol := g.policy.Load(); pol != nil {
			s, err := policy.ParseSignature(pol.sig)
			if err != nil {
				t.Fatalf("policy in force with a bad signature file: %v", err)
			}
			if _, err := policy.Verify("policy.hcl", pol.src, s, cur, time.Now()); err != nil {
				t.Fatalf("policy in force does not verify: %v", err)
			}
		}
	})
}
