package certs

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// rotationFixture is a mesh in the middle of an issuer rotation: the old
// CA and the new one, one gateway certified by each.
type rotationFixture struct {
	old, new     *CA
	oldID, newID *NodeIdentity
	both         *TrustBundle // both CAs, each with its list, the new one signing
}

func newRotation(t *testing.T) *rotationFixture {
	t.Helper()
	f := &rotationFixture{old: newTestCA(t), new: newTestCA(t)}
	f.oldID = issue(t, f.old, testAttrs("gw-old", "zrh", "100.96.0.1"), t0, 24*time.Hour)
	f.newID = issue(t, f.new, testAttrs("gw-new", "fra", "100.96.0.2"), t0, 24*time.Hour)
	tb := bundleOf(t, []*x509.Certificate{f.old.Certificate(), f.new.Certificate()}, trust(t, f.old).CRL(), trust(t, f.new).CRL())
	var err error
	if f.both, err = tb.WithSigning(f.new.Certificate()); err != nil {
		t.Fatal(err)
	}
	return f
}

// bundleOf is a bundle of cas with lists in force.
func bundleOf(t *testing.T, cas []*x509.Certificate, lists ...*x509.RevocationList) *TrustBundle {
	t.Helper()
	tb, err := NewTrustBundle(cas, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range lists {
		if tb, err = tb.WithCRL(l); err != nil {
			t.Fatal(err)
		}
	}
	return tb
}

// revoke revokes id at ca and returns the CA's new list.
func revoke(t *testing.T, ca *CA, id *NodeIdentity) *x509.RevocationList {
	t.Helper()
	if _, err := ca.RevokeSerials([]*big.Int{id.Certificate().SerialNumber}, "keyCompromise", t0); err != nil {
		t.Fatal(err)
	}
	return trust(t, ca).CRL()
}

// TestTrustBundleTwoCAs: during a rotation both CAs' certificates are
// accepted, each CA's list revokes its own, a list is judged against the
// list in force of the CA that signed it, and the bundle knows which CA
// signs new certificates.
func TestTrustBundleTwoCAs(t *testing.T) {
	f := newRotation(t)
	for _, id := range []*NodeIdentity{f.oldID, f.newID} {
		if _, err := f.both.VerifyCertificate(id.Certificate(), t0.Add(time.Hour)); err != nil {
			t.Errorf("%s refused during the rotation: %v", id.Attributes().Node, err)
		}
	}
	if f.both.SignedBySigning(f.oldID.Certificate()) || !f.both.SignedBySigning(f.newID.Certificate()) {
		t.Error("SignedBySigning does not tell the old CA's certificate from the new one's")
	}
	if got := f.both.CRL(); got == nil || got.CheckSignatureFrom(f.new.Certificate()) != nil {
		t.Error("CRL() is not the signing CA's list")
	}
	v0 := f.both.CRLVersion()

	// The old CA revokes its gateway: its list, numbered on its own, is
	// taken though the new CA's list may carry a higher number.
	oldList := revoke(t, f.old, f.oldID)
	tb, err := f.both.WithCRL(oldList)
	if err != nil {
		t.Fatalf("the old CA's newer list: %v", err)
	}
	if _, err := tb.VerifyCertificate(f.oldID.Certificate(), t0.Add(time.Hour)); !errors.Is(err, ErrRevoked) {
		t.Errorf("the old CA's gateway after its revocation: %v, want revoked", err)
	}
	if _, err := tb.VerifyCertificate(f.newID.Certificate(), t0.Add(time.Hour)); err != nil {
		t.Errorf("the new CA's gateway after the old CA revoked another: %v", err)
	}
	if len(tb.CRLs()) != 2 || tb.CRLVersion() <= v0 || tb.Key() == f.both.Key() {
		t.Errorf("after a newer list: %d lists, version %d (was %d), key changed %v", len(tb.CRLs()), tb.CRLVersion(), v0, tb.Key() != f.both.Key())
	}
	// Replaying the old CA's earlier list is refused, whatever the other
	// CA's numbers.
	if _, err := tb.WithCRL(trust(t, f.old).CRL()); err != nil {
		t.Fatalf("the same list again: %v", err)
	}
	if _, err := tb.WithCRL(f.both.CRLs()[0]); !errors.Is(err, ErrReplay) {
		t.Errorf("the old CA's earlier list replayed: %v, want a replay refusal", err)
	}
	// A list of a third CA is not taken.
	if _, err := tb.WithCRL(trust(t, newTestCA(t)).CRL()); !errors.Is(err, ErrUnknownCA) {
		t.Errorf("a stranger CA's list: %v, want unknown CA", err)
	}
}

// TestTrustBundleAdopt: an issuer's answer adds and retires CAs and names
// the signing one, but never brings back an older list than the one in
// force for a CA both bundles hold.
func TestTrustBundleAdopt(t *testing.T) {
	f := newRotation(t)
	oldOnly := trust(t, f.old)

	// The issuer's new CA appears beside the old one.
	next, changed := oldOnly.Adopt(f.both)
	if !changed || len(next.CAs()) != 2 || next.Signing() == nil {
		t.Fatalf("a new CA: changed %v, %d CAs, signing %v", changed, len(next.CAs()), next.Signing())
	}
	if _, again := next.Adopt(f.both); again {
		t.Error("the same answer twice counts as a change")
	}

	// The gateway holds a newer list of the old CA (gossip) than the
	// issuer's answer: it is kept.
	held, err := next.WithCRL(revoke(t, f.old, f.oldID))
	if err != nil {
		t.Fatal(err)
	}
	kept, changed := held.Adopt(f.both)
	if changed || !kept.IsRevoked(f.oldID.Certificate().SerialNumber) {
		t.Errorf("a stale answer: changed %v, revocation kept %v; want no change and the revocation kept", changed, kept.IsRevoked(f.oldID.Certificate().SerialNumber))
	}

	// The old CA retired: its certificates are refused, and the bundle
	// changed even though no list is newer.
	newOnly := bundleOf(t, []*x509.Certificate{f.new.Certificate()}, trust(t, f.new).CRL())
	retired, changed := held.Adopt(newOnly)
	if !changed || len(retired.CAs()) != 1 {
		t.Fatalf("the old CA retired: changed %v, %d CAs", changed, len(retired.CAs()))
	}
	if _, err := retired.VerifyCertificate(f.oldID.Certificate(), t0.Add(time.Hour)); !errors.Is(err, ErrUnknownCA) {
		t.Errorf("the old CA's gateway once it is retired: %v, want unknown CA", err)
	}
	if retired.IsRevoked(f.oldID.Certificate().SerialNumber) {
		t.Error("a retired CA's list still counts")
	}
	if retired.Key() == held.Key() {
		t.Error("the key did not change with the CAs")
	}
}

// TestTrustBundleSaveLoadTwoCAs: both CAs and both lists survive a
// restart; a list of a CA no longer in ca.crt (the two files are written
// one after the other) is skipped, while a single CA's foreign list is
// still an error.
func TestTrustBundleSaveLoadTwoCAs(t *testing.T) {
	f := newRotation(t)
	tb, err := f.both.WithCRL(revoke(t, f.old, f.oldID))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := tb.Save(dir); err != nil {
		t.Fatal(err)
	}
	back, err := LoadTrustBundle(dir, f.old.MeshPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(back.CAs()) != 2 || len(back.CRLs()) != 2 || back.CRLVersion() != tb.CRLVersion() || !back.IsRevoked(f.oldID.Certificate().SerialNumber) {
		t.Fatalf("loaded: %d CAs, %d lists, version %d (saved %d)", len(back.CAs()), len(back.CRLs()), back.CRLVersion(), tb.CRLVersion())
	}

	// ca.crt already without the old CA, crl.pem still with its list.
	if err := os.WriteFile(filepath.Join(dir, fileCACert), encodePEM(pemCert, f.new.Certificate().Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	back, err = LoadTrustBundle(dir, f.old.MeshPrefix())
	if err != nil || len(back.CAs()) != 1 || len(back.CRLs()) != 1 {
		t.Fatalf("a retired CA's list left in crl.pem: %v", err)
	}

	// One CA, and only another CA's list (ca.crt already written for a
	// rotation, crl.pem not yet): the list is kept aside, not an error
	// that would stop a start while the issuer is unreachable.
	if err := os.WriteFile(filepath.Join(dir, fileCRL), encodePEM(pemCRL, trust(t, f.old).CRL().Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	back, err = LoadTrustBundle(dir, f.old.MeshPrefix())
	if err != nil || len(back.CRLs()) != 0 || len(back.RetiredCRLs()) != 1 {
		t.Fatalf("a list of a CA not in ca.crt: %v", err)
	}
}

// TestTrustBundleRetiredCAComesBack: a CA the issuer stops naming keeps
// its newest list aside — across a save and a load too — so an answer
// that names it again (a stale one, a Vault restored from a backup) does
// not bring it back with an older list that lacks a revocation.
func TestTrustBundleRetiredCAComesBack(t *testing.T) {
	f := newRotation(t)
	stale := f.both // the old CA's list before the revocation
	held, err := f.both.WithCRL(revoke(t, f.old, f.oldID))
	if err != nil {
		t.Fatal(err)
	}
	retired, _ := held.Adopt(bundleOf(t, []*x509.Certificate{f.new.Certificate()}))
	dir := t.TempDir()
	if err := retired.Save(dir); err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadTrustBundle(dir, f.new.MeshPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for name, tb := range map[string]*TrustBundle{"in memory": retired, "loaded": loaded} {
		back, changed := tb.Adopt(stale)
		if !changed || len(back.CAs()) != 2 {
			t.Fatalf("%s: the stale answer: changed %v, %d CAs", name, changed, len(back.CAs()))
		}
		if _, err := back.VerifyCertificate(f.oldID.Certificate(), t0.Add(time.Hour)); !errors.Is(err, ErrRevoked) {
			t.Errorf("%s: the old CA named again by a stale answer: its revoked gateway %v, want revoked", name, err)
		}
	}
}

// TestTrustBundleWithNewerCRLs: of the lists gossip brings, only those
// newer than the list in force of a CA the bundle holds are taken.
func TestTrustBundleWithNewerCRLs(t *testing.T) {
	f := newRotation(t)
	if _, took := f.both.WithNewerCRLs(f.both.CRLs()); took {
		t.Error("the lists in force taken again")
	}
	if _, took := f.both.WithNewerCRLs([]*x509.RevocationList{trust(t, newTestCA(t)).CRL()}); took {
		t.Error("a stranger CA's list taken")
	}
	newer := revoke(t, f.old, f.oldID)
	tb, took := f.both.WithNewerCRLs([]*x509.RevocationList{trust(t, newTestCA(t)).CRL(), newer, f.both.CRLs()[1]})
	if !took || !tb.IsRevoked(f.oldID.Certificate().SerialNumber) || len(tb.CAs()) != 2 {
		t.Errorf("a newer list among others: took %v, revoked %v, %d CAs", took, tb.IsRevoked(f.oldID.Certificate().SerialNumber), len(tb.CAs()))
	}
	if _, took := tb.WithNewerCRLs(f.both.CRLs()); took {
		t.Error("an older list taken over a newer one")
	}
}

// TestTrustBundleReissuedCA: a CA reissued with its key signs the lists
// of both certificates. Once the first certificate is retired its older
// list is not kept aside as a retired CA's — the reissued CA's own list
// would refuse it as a replay, and a crl.pem holding both would not load.
func TestTrustBundleReissuedCA(t *testing.T) {
	ca := newTestCA(t)
	tmpl := *ca.Certificate()
	tmpl.SerialNumber = big.NewInt(4242)
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, ca.key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	reissued, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	first := trust(t, ca).CRL()
	if err := ca.RefreshCRL(t0); err != nil {
		t.Fatal(err)
	}
	second := trust(t, ca).CRL()
	if _, err := trust(t, ca).WithCRL(first); err == nil {
		t.Fatal("an older list taken") // sanity: first is older
	}
	held := bundleOf(t, []*x509.Certificate{ca.Certificate()}, first)
	next := bundleOf(t, []*x509.Certificate{reissued}, second)
	adopted, changed := held.Adopt(next)
	if !changed || len(adopted.RetiredCRLs()) != 0 {
		t.Fatalf("the reissued CA: changed %v, %d lists kept aside, want none", changed, len(adopted.RetiredCRLs()))
	}
	dir := t.TempDir()
	if err := adopted.Save(dir); err != nil {
		t.Fatal(err)
	}
	// And a crl.pem that holds both lists of the key loads, with the newer.
	if err := os.WriteFile(filepath.Join(dir, fileCRL), append(encodePEM(pemCRL, second.Raw), encodePEM(pemCRL, first.Raw)...), 0o644); err != nil {
		t.Fatal(err)
	}
	back, err := LoadTrustBundle(dir, ca.MeshPrefix())
	if err != nil || back.CRL().Number.Cmp(second.Number) != 0 {
		t.Fatalf("both lists of one key in crl.pem: %v", err)
	}
}

// TestProviderKeepsRetiredLists: the issuer's answer at a start or a
// renewal holds no retired CA's list; the one kept in the identity
// directory survives it, in memory and on disk.
func TestProviderKeepsRetiredLists(t *testing.T) {
	f := newRotation(t)
	held, err := f.both.WithCRL(revoke(t, f.new, f.newID))
	if err != nil {
		t.Fatal(err)
	}
	oldOnly := trust(t, f.old)
	retired, _ := held.Adopt(oldOnly) // the new CA retired, its list kept aside
	dir := t.TempDir()
	if err := retired.Save(dir); err != nil {
		t.Fatal(err)
	}
	p, err := Open(t.Context(), Config{Dir: dir, CADir: f.old.Dir()}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	tb, err := p.Trust(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadTrustBundle(dir, f.old.MeshPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(tb.RetiredCRLs()) != 1 || len(loaded.RetiredCRLs()) != 1 {
		t.Fatalf("after the issuer's answer: %d retired lists in memory, %d on disk, want 1", len(tb.RetiredCRLs()), len(loaded.RetiredCRLs()))
	}
}

// TestTrustBundleCRLFor: the list of the CA that signed a certificate,
// not any list the bundle holds.
func TestTrustBundleCRLFor(t *testing.T) {
	f := newRotation(t)
	oldOnly := bundleOf(t, []*x509.Certificate{f.old.Certificate(), f.new.Certificate()}, trust(t, f.old).CRL())
	if oldOnly.CRLFor(f.oldID.Certificate()) == nil || oldOnly.CRLFor(f.newID.Certificate()) != nil {
		t.Error("CRLFor does not tell which CA's list is here")
	}
	if f.both.CRLFor(trust(t, newTestCA(t)).CAs()[0]) != nil {
		t.Error("a list for a certificate of a stranger CA")
	}
}

// TestIssuersSharingAKeyKeepTheirLists: two issuers on one key under
// different names (Vault's pki/root/rotate/existing) number their lists
// apart; each list applies to its own issuer only. Matched by the key
// alone, the second's list number 1 was refused as a replay of the
// first's 5, and every refresh from Vault failed from then on.
func TestIssuersSharingAKeyKeepTheirLists(t *testing.T) {
	key, err := GenerateNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	ca := func(cn string) *x509.Certificate {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour)}
		return createCert(t, tmpl, tmpl, key)
	}
	a, b := ca("mesh CA"), ca("mesh CA rotated")
	list := func(issuer *x509.Certificate, n int64, revoked ...int64) *x509.RevocationList {
		var entries []x509.RevocationListEntry
		for _, s := range revoked {
			entries = append(entries, x509.RevocationListEntry{SerialNumber: big.NewInt(s), RevocationTime: t0})
		}
		der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(n), ThisUpdate: t0, NextUpdate: t0.Add(time.Hour), RevokedCertificateEntries: entries}, issuer, key)
		if err != nil {
			t.Fatal(err)
		}
		crl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		return crl
	}
	tb, err := NewTrustBundle([]*x509.Certificate{a, b}, netip.MustParsePrefix("100.96.0.0/16"))
	if err != nil {
		t.Fatal(err)
	}
	if tb, err = tb.WithCRL(list(a, 5, 7)); err != nil {
		t.Fatal(err)
	}
	if tb, err = tb.WithCRL(list(b, 1, 9)); err != nil {
		t.Fatalf("the second issuer's list after the first's: %v", err)
	}
	crls := tb.CRLs()
	if len(crls) != 2 || crls[0].Number.Int64() != 5 || crls[1].Number.Int64() != 1 {
		t.Fatalf("lists in force: %d, want each issuer's own", len(crls))
	}
	if !tb.IsRevoked(big.NewInt(7)) || !tb.IsRevoked(big.NewInt(9)) {
		t.Fatal("a revocation of either issuer's list is not in force")
	}
}

// listOfCA is a revocation list ca signs, numbered number, that revokes
// the certificates of ids: what an issuer that numbers its lists afresh
// (a Vault restored from a snapshot, the CA imported into another mount)
// makes.
func listOfCA(t *testing.T, ca *CA, number int64, ids ...*NodeIdentity) *x509.RevocationList {
	t.Helper()
	return signList(t, ca, &x509.RevocationList{Number: big.NewInt(number), ThisUpdate: t0, NextUpdate: t0.Add(24 * time.Hour)}, ids)
}

// signList is tmpl, revoking the certificates of ids, signed by ca.
func signList(t *testing.T, ca *CA, tmpl *x509.RevocationList, ids []*NodeIdentity) *x509.RevocationList {
	t.Helper()
	for _, id := range ids {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: id.Certificate().SerialNumber, RevocationTime: t0})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, ca.Certificate(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	return crl
}

// TestTrustBundleIssuerListBehind: an issuer's list numbered below the
// one held (its numbering went back) is not dropped: its revocations are
// enforced beside the list held, which stays in force (gossip spreads it),
// across a save and a load, and until the issuer's numbers overtake it.
// Gossip cannot bring a lower-numbered list, nor take the issuer's away.
func TestTrustBundleIssuerListBehind(t *testing.T) {
	ca := newTestCA(t)
	a := issue(t, ca, testAttrs("gw-a", "zrh", "100.96.0.1"), t0, 24*time.Hour)
	b := issue(t, ca, testAttrs("gw-b", "zrh", "100.96.0.2"), t0, 24*time.Hour)
	cas := []*x509.Certificate{ca.Certificate()}
	held := bundleOf(t, cas, listOfCA(t, ca, 10, a))
	issued := listOfCA(t, ca, 3, b) // the issuer revokes b, numbering from 3
	revokes := func(tb *TrustBundle, ids ...*NodeIdentity) bool {
		for _, id := range ids {
			if !tb.IsRevoked(id.Certificate().SerialNumber) {
				return false
			}
		}
		return true
	}

	got, changed := held.Adopt(bundleOf(t, cas, issued))
	if !changed || !revokes(got, a, b) {
		t.Fatalf("the issuer's lower-numbered list: changed %v, a and b revoked %v; want a change revoking both", changed, revokes(got, a, b))
	}
	if got.CRL().Number.Int64() != 10 || len(got.BehindCRLs()) != 1 || got.Key() == held.Key() {
		t.Errorf("in force %v, %d lists behind, key changed %v; want 10 in force and the issuer's behind it", got.CRL().Number, len(got.BehindCRLs()), got.Key() != held.Key())
	}
	if gaps := held.listsBehind(bundleOf(t, cas, issued)); len(gaps) != 1 || len(gaps[0].missingAtIssuer) != 1 || gaps[0].missingAtIssuer[0].Cmp(a.Certificate().SerialNumber) != 0 || len(gaps[0].onlyAtIssuer) != 1 {
		t.Errorf("what the issuer lacks: %+v; want a, and b only there", gaps)
	}
	if _, again := got.Adopt(bundleOf(t, cas, issued)); again {
		t.Error("the same answer twice counts as a change")
	}
	// The issuer revokes more, still numbered below: its newer list
	// takes the place of its last one.
	c := issue(t, ca, testAttrs("gw-c", "zrh", "100.96.0.3"), t0, 24*time.Hour)
	got, changed = got.Adopt(bundleOf(t, cas, listOfCA(t, ca, 4, b, c)))
	if !changed || !revokes(got, a, b, c) || len(got.BehindCRLs()) != 1 {
		t.Fatalf("the issuer's next list: changed %v, revoked %v, %d behind", changed, revokes(got, a, b, c), len(got.BehindCRLs()))
	}

	// Saved and loaded: both lists, the held one in force.
	dir := t.TempDir()
	if err := got.Save(dir); err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadTrustBundle(dir, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if !revokes(loaded, a, b, c) || loaded.CRL().Number.Int64() != 10 || loaded.Key() != got.Key() {
		t.Errorf("loaded: revoked %v, in force %v, same key %v", revokes(loaded, a, b, c), loaded.CRL().Number, loaded.Key() == got.Key())
	}

	// Gossip: the issuer's list is not taken over the held one, and a
	// newer list from gossip leaves the issuer's enforced.
	if tb, took := held.WithNewerCRLs([]*x509.RevocationList{issued}); took || revokes(tb, b) {
		t.Errorf("a lower-numbered list from gossip: took %v, b revoked %v; want it refused", took, revokes(tb, b))
	}
	d := issue(t, ca, testAttrs("gw-d", "zrh", "100.96.0.4"), t0, 24*time.Hour)
	gossiped, took := loaded.WithNewerCRLs([]*x509.RevocationList{listOfCA(t, ca, 11, a, d)})
	if !took || !revokes(gossiped, a, b, c, d) {
		t.Errorf("a newer list from gossip: took %v, all revoked %v", took, revokes(gossiped, a, b, c, d))
	}

	// As many but not the same: the list held stays in force (gossip
	// spread it), the issuer's is enforced beside it.
	tie, _ := held.Adopt(bundleOf(t, cas, listOfCA(t, ca, 10, b)))
	if !revokes(tie, a, b) || !sameCRL(tie.CRL(), held.CRL()) {
		t.Errorf("a different list of the same number: a and b revoked %v, held list in force %v", revokes(tie, a, b), sameCRL(tie.CRL(), held.CRL()))
	}

	// An answer that only lags (its list part of the one held) adds
	// nothing, and changes nothing.
	if lag, changed := held.Adopt(bundleOf(t, cas, listOfCA(t, ca, 9, a))); changed || len(lag.BehindCRLs()) != 0 {
		t.Errorf("a lagging answer: changed %v, %d behind", changed, len(lag.BehindCRLs()))
	}

	// The issuer's numbers overtake: its list is in force alone.
	over, changed := gossiped.Adopt(bundleOf(t, cas, listOfCA(t, ca, 12, a, b, c)))
	if !changed || over.CRL().Number.Int64() != 12 || len(over.BehindCRLs()) != 0 || !revokes(over, a, b, c) || revokes(over, d) {
		t.Errorf("the issuer's list numbered above: changed %v, in force %v, %d behind, d revoked %v", changed, over.CRL().Number, len(over.BehindCRLs()), revokes(over, d))
	}
}

// listWithExtension is listOfCA with ext among the list's extensions.
func listWithExtension(t *testing.T, ca *CA, number int64, ext pkix.Extension, ids ...*NodeIdentity) *x509.RevocationList {
	t.Helper()
	return signList(t, ca, &x509.RevocationList{Number: big.NewInt(number), ThisUpdate: t0, NextUpdate: t0.Add(24 * time.Hour), ExtraExtensions: []pkix.Extension{ext}}, ids)
}

// deltaIndicator is the critical extension of a delta CRL that follows
// the complete list numbered base, as Vault signs one with enable_delta.
func deltaIndicator(t *testing.T, base int64) pkix.Extension {
	t.Helper()
	v, err := asn1.Marshal(big.NewInt(base))
	if err != nil {
		t.Fatal(err)
	}
	return pkix.Extension{Id: oidDeltaCRLIndicator, Critical: true, Value: v}
}

// TestTrustBundleRefusesDeltaCRL: a delta CRL of the mesh CA lists only
// what was revoked since the complete list it follows, and is numbered
// above it. Taken as the CA's list, gossiped by anyone holding the
// gossip key (Vault serves deltas to anyone), it undid every revocation
// it did not repeat. Nor is a list with a critical extension not read
// here (an issuing distribution point, which narrows what the list
// covers) taken; one with an extension that is not critical is.
func TestTrustBundleRefusesDeltaCRL(t *testing.T) {
	ca := newTestCA(t)
	victim := issue(t, ca, testAttrs("gw-a", "site-a", "100.96.0.10", "10.1.0.0/16"), t0, 24*time.Hour)
	bystander := issue(t, ca, testAttrs("gw-b", "site-b", "100.96.0.11", "10.2.0.0/16"), t0, 24*time.Hour)
	tb := bundleOf(t, []*x509.Certificate{ca.Certificate()}, listOfCA(t, ca, 10, victim))
	now := t0.Add(time.Hour)
	raw := sign(t, advertFor(victim, 1, now), victim)

	delta := listWithExtension(t, ca, 11, deltaIndicator(t, 10), bystander)
	if got, took := tb.WithNewerCRLs([]*x509.RevocationList{delta}); took || !got.IsRevoked(victim.Certificate().SerialNumber) {
		t.Errorf("a delta CRL from gossip: took %v, revocation kept %v", took, got.IsRevoked(victim.Certificate().SerialNumber))
	}
	_, err := tb.WithCRL(delta)
	if ReasonOf(err) != ReasonMalformed || !strings.Contains(err.Error(), "delta CRL") || !strings.Contains(err.Error(), "since list number 10") {
		t.Errorf("WithCRL of a delta CRL: %v, want it refused as a delta, naming the list it follows", err)
	}
	if _, err := VerifyAdvert(raw, victim.Certificate(), tb, now, nil); ReasonOf(err) != ReasonRevoked {
		t.Errorf("the revoked gateway's advert: %v, want revoked", err)
	}

	idp := listWithExtension(t, ca, 11, pkix.Extension{Id: oidIssuingDistributionPoint, Critical: true, Value: []byte{0x30, 0x03, 0x81, 0x01, 0xff}}, bystander)
	if _, err := tb.WithCRL(idp); ReasonOf(err) != ReasonMalformed || !strings.Contains(err.Error(), "issuing distribution point") {
		t.Errorf("WithCRL of a list with a critical issuing distribution point: %v, want refused", err)
	}
	freshest := listWithExtension(t, ca, 11, pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 46}, Value: []byte{0x30, 0x00}}, victim, bystander)
	if got, err := tb.WithCRL(freshest); err != nil || !got.IsRevoked(bystander.Certificate().SerialNumber) {
		t.Errorf("WithCRL of a complete list with a freshest CRL pointer (not critical): %v", err)
	}
}

// TestTrustBundleLoadsSavedDeltaBehind: an earlier release took a delta
// CRL from gossip and saved it as the list in force. It still loads: its
// revocations count, beside no list in force, until the issuer's answer
// puts the complete list back.
func TestTrustBundleLoadsSavedDeltaBehind(t *testing.T) {
	ca := newTestCA(t)
	victim := issue(t, ca, testAttrs("gw-a", "site-a", "100.96.0.10"), t0, 24*time.Hour)
	bystander := issue(t, ca, testAttrs("gw-b", "site-b", "100.96.0.11"), t0, 24*time.Hour)
	dir := t.TempDir()
	if err := trust(t, ca).Save(dir); err != nil {
		t.Fatal(err)
	}
	delta := listWithExtension(t, ca, 11, deltaIndicator(t, 10), bystander)
	if err := os.WriteFile(filepath.Join(dir, fileCRL), encodePEM(pemCRL, delta.Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadTrustBundle(dir, netip.Prefix{})
	if err != nil {
		t.Fatalf("a crl.pem holding a delta: %v, want it loaded", err)
	}
	if loaded.CRL() != nil || !loaded.IsRevoked(bystander.Certificate().SerialNumber) {
		t.Errorf("loaded: list in force %v, the delta's revocation kept %v; want none in force, and it kept", loaded.CRL() != nil, loaded.IsRevoked(bystander.Certificate().SerialNumber))
	}
	// The issuer answers with the complete list the delta follows (Vault
	// rebuilds its complete list late): the delta's revocation stays.
	lagging := listOfCA(t, ca, 10, victim)
	answered, _ := loaded.Adopt(bundleOf(t, []*x509.Certificate{ca.Certificate()}, lagging))
	if !sameCRL(answered.CRL(), lagging) || !answered.IsRevoked(bystander.Certificate().SerialNumber) || !answered.IsRevoked(victim.Certificate().SerialNumber) {
		t.Errorf("after the issuer's answer of list 10: list 10 in force %v, the delta's revocation kept %v", sameCRL(answered.CRL(), lagging), answered.IsRevoked(bystander.Certificate().SerialNumber))
	}
	// A complete list numbered above the delta takes its place.
	complete := listOfCA(t, ca, 12, victim, bystander)
	answered, _ = answered.Adopt(bundleOf(t, []*x509.Certificate{ca.Certificate()}, complete))
	if !sameCRL(answered.CRL(), complete) || len(answered.BehindCRLs()) != 0 || !answered.IsRevoked(victim.Certificate().SerialNumber) {
		t.Errorf("after the issuer's answer: complete list in force %v, %d behind", sameCRL(answered.CRL(), complete), len(answered.BehindCRLs()))
	}
}
