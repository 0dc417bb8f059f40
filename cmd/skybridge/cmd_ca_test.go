package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// validIssued counts the certificates ca list calls valid.
func validIssued(t *testing.T, ca string) int {
	t.Helper()
	var list []struct {
		State string `json:"state"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "ca", "list", "--ca", ca, "--json")), &list); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range list {
		if e.State == "valid" {
			n++
		}
	}
	return n
}

// TestIssueRefusesBeforeSigningWhatItCannotHandOut: a CA directory whose
// trust bundle cannot be read (crl.pem gone, a ca.crt its group may
// write) has ca issue refused before it signs. It signed first, and the
// certificate it could not hand out stayed valid, held the overlay IP and
// was the node's latest: the gateway's own renewal was refused as that of
// a copied key.
func TestIssueRefusesBeforeSigningWhatItCannotHandOut(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(ca string)
		mend   func(ca string)
		want   string
	}{
		{"crl.pem missing",
			func(ca string) { os.Rename(filepath.Join(ca, "crl.pem"), filepath.Join(ca, "crl.pem.away")) },
			func(ca string) { os.Rename(filepath.Join(ca, "crl.pem.away"), filepath.Join(ca, "crl.pem")) },
			"ca crl --refresh"},
		{"ca.crt its group may write",
			func(ca string) { os.Chmod(filepath.Join(ca, "ca.crt"), 0o664) },
			func(ca string) { os.Chmod(filepath.Join(ca, "ca.crt"), 0o644) },
			"chmod 644"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca, gw := caWithGateway(t)
			before, _ := os.ReadFile(filepath.Join(gw, "node.crt"))

			tc.break_(ca)
			_, errs, code := runCLI(t, issueArgs(ca, gw, "gw1", "100.96.0.1", "--label", "tier=gold")...)
			if code == 0 || !strings.Contains(errs, tc.want) {
				t.Fatalf("issue: exit %d, %q; want refused, saying %q", code, errs, tc.want)
			}
			tc.mend(ca)
			if after, _ := os.ReadFile(filepath.Join(gw, "node.crt")); !bytes.Equal(before, after) {
				t.Fatal("the directory's certificate was replaced")
			}
			if n := validIssued(t, ca); n != 1 {
				t.Fatalf("%d valid certificates after the refused issue; want the delivered one alone", n)
			}

			// The gateway renews the certificate it holds.
			id, err := certs.LoadNodeIdentity(gw)
			if err != nil {
				t.Fatal(err)
			}
			c, err := certs.OpenCA(ca)
			if err != nil {
				t.Fatal(err)
			}
			k, _ := certs.GenerateNodeKey()
			csr, _ := certs.CreateCSR(k, *id.Attributes())
			if _, err := c.Renew(id.Certificate(), csr, id.Certificate().NotBefore.Add(20*24*time.Hour)); err != nil {
				t.Fatalf("renewal of the delivered identity: %v", err)
			}
		})
	}
}

// TestIssueKeepsNewerCRLOfItsDirectory: ca issue --out a directory whose
// crl.pem is newer than the CA's (the CA directory restored from a
// backup) keeps it, rather than roll back a revocation there, and the CA
// takes it back: its next list is numbered after it, and revokes what it
// did.
func TestIssueKeepsNewerCRLOfItsDirectory(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	gw1, gw2 := filepath.Join(dir, "gw1"), filepath.Join(dir, "gw2")
	mustRun(t, "ca", "init", "--dir", ca)
	mustRun(t, issueArgs(ca, gw1, "gw1", "100.96.0.1")...)
	backupCRL, _ := os.ReadFile(filepath.Join(ca, "crl.pem"))
	backupIdx, _ := os.ReadFile(filepath.Join(ca, "issued.json"))
	mustRun(t, issueArgs(ca, gw2, "gw2", "100.96.0.2")...)
	mustRun(t, "ca", "revoke", "--ca", ca, "--node", "gw2", "--reason", "keyCompromise")
	newer, _ := os.ReadFile(filepath.Join(ca, "crl.pem"))
	os.WriteFile(filepath.Join(gw1, "crl.pem"), newer, 0o644) // as gossip brought it
	os.WriteFile(filepath.Join(ca, "crl.pem"), backupCRL, 0o644)
	os.WriteFile(filepath.Join(ca, "issued.json"), backupIdx, 0o600)

	_, errs, code := runCLI(t, issueArgs(ca, gw1, "gw1", "100.96.0.1", "--label", "tier=gold")...)
	if code != 0 {
		t.Fatalf("issue into a directory with a newer list: exit %d, %q", code, errs)
	}
	id2, err := certs.LoadNodeIdentity(gw2)
	if err != nil {
		t.Fatal(err)
	}
	serial := id2.Certificate().SerialNumber
	tb, err := certs.LoadTrustBundle(gw1, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if !tb.IsRevoked(serial) {
		t.Fatalf("gw1's crl.pem is #%s and no longer revokes gw2 (it held #2, which did)", tb.CRL().Number)
	}
	if !strings.Contains(errs, "newer than the CA directory's #1") {
		t.Errorf("issue said %q; want it to say the CA directory's list was older", errs)
	}
	var crl crlOutput
	json.Unmarshal([]byte(mustRun(t, "ca", "crl", "--ca", ca, "--refresh", "--json")), &crl)
	if crl.Number != "3" || !slices.Contains(crl.Revoked, certs.FormatSerial(serial)) {
		t.Fatalf("the CA's next list: %+v; want #3, revoking gw2", crl)
	}
}

// TestRevokeSaysWhatWasDone: ca revoke is refused, before it revokes,
// for what would have failed after (a ca.crt its group may write); and
// what fails once it revoked (here, a ca.crt the trust bundle refuses for
// a certificate appended to it) says the revocation was made. It said
// only what failed, and the revocation was taken for one not made.
func TestRevokeSaysWhatWasDone(t *testing.T) {
	ca, gw := caWithGateway(t)
	caCert := filepath.Join(ca, "ca.crt")
	good, _ := os.ReadFile(caCert)

	os.Chmod(caCert, 0o664)
	_, errs, code := runCLI(t, "ca", "revoke", "--ca", ca, "--node", "gw1")
	os.Chmod(caCert, 0o644)
	if code == 0 || !strings.Contains(errs, "chmod 644") {
		t.Fatalf("revoke with a ca.crt its group may write: exit %d, %q; want refused, saying chmod 644", code, errs)
	}
	if n := validIssued(t, ca); n != 1 {
		t.Fatalf("the refused revoke revoked: %d valid certificates left", n)
	}

	nodeCert, _ := os.ReadFile(filepath.Join(gw, "node.crt"))
	os.WriteFile(caCert, append(slices.Clone(good), nodeCert...), 0o644)
	out, errs, code := runCLI(t, "ca", "revoke", "--ca", ca, "--node", "gw1")
	os.WriteFile(caCert, good, 0o644)
	id, err := certs.LoadNodeIdentity(gw)
	if err != nil {
		t.Fatal(err)
	}
	serial := certs.FormatSerial(id.Certificate().SerialNumber)
	if validIssued(t, ca) != 0 {
		t.Fatal("the certificate was not revoked")
	}
	if code == 0 || !strings.Contains(errs, "revoked "+serial+", on the revocation list written to") || !strings.Contains(errs, "; but the CA's trust bundle cannot be read back") {
		t.Errorf("revoke that failed after revoking: exit %d, stderr %q; want it to say what it revoked, and what failed", code, errs)
	}
	if !strings.Contains(out, "revoked "+serial+" (node gw1") {
		t.Errorf("revoke that failed after revoking printed %q; want the revocation", out)
	}
}

// TestRevokeAgain: a certificate revoked already is said to be, under
// the reason it keeps, and no new list is signed for it; a serial given
// twice is revoked once; a reason changed to keyCompromise is a change,
// and signed.
func TestRevokeAgain(t *testing.T) {
	ca, gw := caWithGateway(t)
	id, err := certs.LoadNodeIdentity(gw)
	if err != nil {
		t.Fatal(err)
	}
	serial := certs.FormatSerial(id.Certificate().SerialNumber)
	crl := func() string { b, _ := os.ReadFile(filepath.Join(ca, "crl.pem")); return string(b) }
	revoke := func(extra ...string) string {
		return mustRun(t, append([]string{"ca", "revoke", "--ca", ca, "--serial", serial}, extra...)...)
	}

	if out := revoke("--serial", serial); strings.Count(out, serial) != 1 || !strings.Contains(out, "revoked "+serial+" (node gw1, site onprem-zrh, reason unspecified)") || !strings.Contains(out, "written to") {
		t.Fatalf("a serial given twice:\n%s", out)
	}
	first := crl()
	if out := revoke("--reason", "superseded"); !strings.Contains(out, "already revoked "+serial+" (node gw1, site onprem-zrh, reason unspecified)") || strings.Contains(out, "written to") || crl() != first {
		t.Fatalf("revoked again: a new list signed, or not said to be revoked already:\n%s", out)
	}
	if out := revoke("--reason", "keyCompromise"); strings.Contains(out, "already") || !strings.Contains(out, "reason keyCompromise") || !strings.Contains(out, "written to") || crl() == first {
		t.Fatalf("a reason changed to keyCompromise, not signed:\n%s", out)
	}
	// A serial not issued is named as it was typed.
	if _, errs, code := runCLI(t, "ca", "revoke", "--ca", ca, "--serial", "00:11"); code != 1 || !strings.Contains(errs, "serial 00:11 was not issued") {
		t.Errorf("revoke of a serial not issued, typed with a leading zero: exit %d, %q", code, errs)
	}
	second := crl()
	var res struct {
		Revoked []struct {
			Reason         string `json:"revocation_reason"`
			AlreadyRevoked bool   `json:"already_revoked"`
		} `json:"revoked"`
	}
	if out := revoke("--reason", "keyCompromise", "--json"); json.Unmarshal([]byte(out), &res) != nil || len(res.Revoked) != 1 || !res.Revoked[0].AlreadyRevoked || res.Revoked[0].Reason != "keyCompromise" || crl() != second {
		t.Fatalf("revoked again for keyCompromise, --json:\n%s", out)
	}
}

// TestInitValidityOutlivesADefaultCertificate: the shortest --validity
// ca init takes leaves a CA that issues a certificate of the default
// life; 720h, the default life itself, was taken, and every default ca
// issue after it refused as outliving the CA.
func TestInitValidityOutlivesADefaultCertificate(t *testing.T) {
	dir := t.TempDir()
	_, errs, code := runCLI(t, "ca", "init", "--dir", filepath.Join(dir, "short"), "--validity", certs.DefaultNodeTTL.String())
	if code != 2 || !strings.Contains(errs, "give at least "+minCAValidity.String()) {
		t.Errorf("ca init --validity %s: exit %d, %q; want a usage error naming %s", certs.DefaultNodeTTL, code, errs, minCAValidity)
	}
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca, "--validity", minCAValidity.String())
	mustRun(t, issueArgs(ca, filepath.Join(dir, "gw1"), "gw1", "100.96.0.1")...)
}

// TestRevokeNodeNamesWhatItRevokes: ca revoke --node takes the gateway's
// certificates and its enrollment endpoint's, each named for what it is,
// and leaves a policy signer of the same name valid; --signer takes that.
func TestRevokeNodeNamesWhatItRevokes(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	mustRun(t, issueArgs(ca, filepath.Join(dir, "gw1"), "gw1", "100.96.0.1")...)
	mustRun(t, "ca", "issue-signer", "--ca", ca, "--name", "gw1", "--out", filepath.Join(dir, "signer"))
	c, err := certs.OpenCA(ca)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := certs.GenerateNodeKey()
	if _, err := c.IssueEnroller("gw1", netip.MustParseAddr("100.96.0.1"), k.Public(), time.Hour, time.Now()); err != nil {
		t.Fatal(err)
	}

	out := mustRun(t, "ca", "revoke", "--ca", ca, "--node", "gw1")
	if !strings.Contains(out, "(node gw1, site onprem-zrh,") || !strings.Contains(out, "(enrollment endpoint of node gw1,") || strings.Contains(out, "policy signer") {
		t.Errorf("ca revoke --node gw1 printed:\n%s\nwant the gateway's and its enrollment endpoint's certificates, not the policy signer's", out)
	}
	var list []certs.IssuedCert
	json.Unmarshal([]byte(mustRun(t, "ca", "list", "--ca", ca, "--json")), &list)
	for _, e := range list {
		if e.Kind == certs.KindPolicySigner && e.RevokedAt != nil {
			t.Errorf("the policy signer gw1 was revoked with the node gw1: %+v", e)
		}
	}

	if _, errs, code := runCLI(t, "ca", "revoke", "--ca", ca, "--node", "gw1", "--signer", "gw1"); code != 2 || !strings.Contains(errs, "give either") {
		t.Errorf("ca revoke --node and --signer: exit %d, %q; want a usage error", code, errs)
	}
	if out := mustRun(t, "ca", "revoke", "--ca", ca, "--signer", "gw1"); !strings.Contains(out, "(policy signer gw1,") {
		t.Errorf("ca revoke --signer gw1 printed:\n%s\nwant the policy signer's certificate", out)
	}
	if n := validIssued(t, ca); n != 0 {
		t.Errorf("%d certificates left valid; want none", n)
	}
}

// TestIssueKeepsRevocationsOfBothLists: the CA directory is restored
// from a backup and a gateway revoked there (list #2); then ca issue
// --out a directory holding the mesh's #3 (from before the restore). The
// CA takes #3 back and signs #4 with the revocations of both, in its
// directory and the one issued: #3 alone had the revocation made since
// the restore on no list.
func TestIssueKeepsRevocationsOfBothLists(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	gw1, gw2, gw3 := filepath.Join(dir, "gw1"), filepath.Join(dir, "gw2"), filepath.Join(dir, "gw3")
	mustRun(t, "ca", "init", "--dir", ca)
	mustRun(t, issueArgs(ca, gw1, "gw1", "100.96.0.1")...)
	mustRun(t, issueArgs(ca, gw3, "gw3", "100.96.0.3")...)
	backupCRL, _ := os.ReadFile(filepath.Join(ca, "crl.pem"))
	backupIdx, _ := os.ReadFile(filepath.Join(ca, "issued.json"))
	mustRun(t, issueArgs(ca, gw2, "gw2", "100.96.0.2")...)
	mustRun(t, "ca", "revoke", "--ca", ca, "--node", "gw2", "--reason", "keyCompromise") // #2
	mustRun(t, "ca", "crl", "--ca", ca, "--refresh")                                     // #3
	newer, _ := os.ReadFile(filepath.Join(ca, "crl.pem"))
	os.WriteFile(filepath.Join(gw1, "crl.pem"), newer, 0o644)
	os.WriteFile(filepath.Join(ca, "crl.pem"), backupCRL, 0o644)
	os.WriteFile(filepath.Join(ca, "issued.json"), backupIdx, 0o600)
	mustRun(t, "ca", "revoke", "--ca", ca, "--node", "gw3", "--reason", "keyCompromise") // #2 again, revoking gw3

	if _, errs, code := runCLI(t, issueArgs(ca, gw1, "gw1", "100.96.0.1", "--label", "tier=gold")...); code != 0 {
		t.Fatalf("issue: %d %s", code, errs)
	}
	id3, err := certs.LoadNodeIdentity(gw3)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{gw1, ca} {
		tb, err := certs.LoadTrustBundle(d, netip.Prefix{})
		if err != nil {
			t.Fatal(err)
		}
		if !tb.IsRevoked(id3.Certificate().SerialNumber) {
			t.Errorf("%s: crl.pem #%s does not revoke gw3, revoked by the CA before this issue", filepath.Base(d), tb.CRL().Number)
		}
	}
}

// caWithGateway makes a CA and issues gateway gw1 into a directory of its
// own, and returns both directories.
func caWithGateway(t *testing.T) (ca, gw string) {
	t.Helper()
	dir := t.TempDir()
	ca, gw = filepath.Join(dir, "ca"), filepath.Join(dir, "gw1")
	mustRun(t, "ca", "init", "--dir", ca)
	mustRun(t, issueArgs(ca, gw, "gw1", "100.96.0.1")...)
	return ca, gw
}
