package certs

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// TrustBundle is what a gateway needs to judge other gateways: the mesh CA
// certificate(s), each CA's newest revocation list and the overlay range.
// It holds no secrets. Its methods are pure functions of their arguments
// and the bundle, so verification can be table-tested.
//
// There is one CA but while an issuer is rotated (Vault's root/rotate): the
// old CA's certificates stay valid beside the new one's until they are
// renewed, and each CA revokes its own on a list it numbers itself.
//
// A TrustBundle is immutable; WithCRL returns an updated copy, so one can be
// shared between goroutines and swapped atomically.
type TrustBundle struct {
	cas   []*x509.Certificate
	roots *x509.CertPool
	crls  []*x509.RevocationList // crls[i] is cas[i]'s list in force, or nil
	// behind[i] is the issuer's last list of cas[i] when it is numbered
	// below crls[i] (a Vault restored from a snapshot, the CA imported
	// into another mount or cluster), or nil. Its revocations count as
	// well: the issuer made them, and its numbers may take days to catch
	// up. It is never gossiped, and gossip never brings one. (A delta
	// list an earlier release took from gossip and saved is kept here
	// too, whatever its number, until the issuer answers.)
	behind  []*x509.RevocationList
	revoked map[string]struct{} // serial (decimal) → revoked, on any list
	// signing is the CA that signs new certificates, when the issuer says
	// (Vault's default issuer); a certificate from another is renewed.
	signing    *x509.Certificate
	meshPrefix netip.Prefix
	key        string // changes whenever the CAs or a list do
	// retired holds the newest list of each CA the bundle held and the
	// issuer no longer names (up to maxRetired): an answer that names
	// such a CA again (a stale one, a Vault restored from a backup)
	// brings back its revocations with it.
	retired []*x509.RevocationList
}

// maxRetired bounds the lists of retired CAs a bundle keeps.
const maxRetired = 8

// NewTrustBundle builds a bundle from the CA certificates. meshPrefix may be
// the zero Prefix, in which case it is taken from the CA's IP name
// constraint (the embedded CA writes one); a Vault CA usually has none and
// the configuration supplies it.
func NewTrustBundle(cas []*x509.Certificate, meshPrefix netip.Prefix) (*TrustBundle, error) {
	if len(cas) == 0 {
		return nil, errors.New("trust bundle has no CA certificate")
	}
	tb := &TrustBundle{cas: cas, roots: x509.NewCertPool(), crls: make([]*x509.RevocationList, len(cas)), behind: make([]*x509.RevocationList, len(cas)), meshPrefix: meshPrefix}
	for _, c := range cas {
		if !c.IsCA {
			return nil, fmt.Errorf("certificate %q is not a CA certificate", c.Subject.CommonName)
		}
		tb.roots.AddCert(c)
		// A CA that names a range certifies addresses in it alone: a
		// range outside it would be every gateway's netmask, and the
		// route to it, and certify nothing. One inside it (a mesh under
		// an organisation's wider constraint) is the mesh's.
		if own := meshPrefixOf(c); own.IsValid() && meshPrefix.IsValid() && (own.Bits() > meshPrefix.Bits() || !own.Contains(meshPrefix.Addr())) {
			return nil, fmt.Errorf("the mesh overlay range %s is not inside %s, the range the mesh CA %q certifies addresses in: give the mesh's range, inside it", meshPrefix, own, c.Subject.CommonName)
		}
		if !tb.meshPrefix.IsValid() {
			tb.meshPrefix = meshPrefixOf(c)
		}
	}
	if !tb.meshPrefix.IsValid() {
		return nil, errors.New("mesh overlay range unknown: the CA certificate has no IP name constraint, so set it in the configuration (mesh_cidr)")
	}
	tb.seal()
	return tb, nil
}

// LoadTrustBundle reads ca.crt and, if present, crl.pem from dir.
func LoadTrustBundle(dir string, meshPrefix netip.Prefix) (*TrustBundle, error) {
	b, err := readCACert(dir)
	if err != nil {
		return nil, fmt.Errorf("read mesh CA certificate: %w", err)
	}
	cas, err := ParseCertificatesPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, fileCACert), err)
	}
	tb, err := NewTrustBundle(cas, meshPrefix)
	if err != nil {
		return nil, err
	}
	crlPEM, err := os.ReadFile(filepath.Join(dir, fileCRL))
	if errors.Is(err, os.ErrNotExist) {
		return tb, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read revocation list: %w", err)
	}
	crls, err := ParseCRLs(crlPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, fileCRL), err)
	}
	if tb, err = tb.WithSavedCRLs(crls); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, fileCRL), err)
	}
	return tb, nil
}

// WithSavedCRLs is tb with the lists of a crl.pem that Save wrote (or a
// copy of it): each CA's list in force first, then the issuer's lists
// numbered behind them, then the lists of CAs no longer held. Each goes
// where it was: read one by one as lists in force, the later of a CA
// would be refused as older, or, numbered as the first, replace it.
func (tb *TrustBundle) WithSavedCRLs(crls []*x509.RevocationList) (*TrustBundle, error) {
	for _, crl := range crls {
		// A delta, saved as a list in force by an earlier release that
		// took it from gossip: what it revokes counts, but it is not
		// the CA's list, which the issuer's next answer, or gossip,
		// brings back. One of a CA no longer held is dropped: kept
		// aside as a retired CA's list, it would be put in force
		// should the CA come back.
		if CheckCompleteCRL(crl) != nil {
			tb = tb.withBehind(crl)
			continue
		}
		// A list of a CA the bundle no longer holds (an issuer retired;
		// or ca.crt written and crl.pem not yet) is kept aside: should
		// the CA be trusted again, its revocations come back with it.
		if tb.signerOf(crl) == nil {
			tb = tb.withRetired(crl)
			continue
		}
		// A list of a CA whose list in force this file gave already,
		// and not newer: the issuer's, kept behind it (Save writes the
		// lists in force first), even when numbered as it.
		if i := tb.index(tb.signerOf(crl)); i >= 0 && tb.crls[i] != nil && !newerCRL(crl, tb.crls[i]) {
			if !sameCRL(crl, tb.crls[i]) {
				tb = tb.withBehind(crl)
			}
			continue
		}
		next, err := tb.WithCRL(crl)
		switch {
		case errors.Is(err, ErrReplay):
			// An older list of a CA after its list in force: the
			// issuer's, numbered behind it, which Save writes there
			// (or, from earlier releases, a CA reissued with its key).
			// Its revocations count too.
			tb = tb.withBehind(crl)
		case err != nil:
			return nil, err
		default:
			tb = next
		}
	}
	return tb, nil
}

// ParseCRLs parses every revocation list in b: PEM blocks, or one DER list.
func ParseCRLs(b []byte) ([]*x509.RevocationList, error) {
	if blk, _ := pem.Decode(b); blk == nil {
		crl, err := ParseCRL(b)
		if err != nil {
			return nil, err
		}
		return []*x509.RevocationList{crl}, nil
	}
	var crls []*x509.RevocationList
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != pemCRL {
			return nil, fmt.Errorf("PEM block is %q, want %q", blk.Type, pemCRL)
		}
		crl, err := x509.ParseRevocationList(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse revocation list: %w", err)
		}
		crls = append(crls, crl)
	}
	return crls, nil
}

func meshPrefixOf(ca *x509.Certificate) netip.Prefix {
	if len(ca.PermittedIPRanges) != 1 {
		return netip.Prefix{}
	}
	r := ca.PermittedIPRanges[0]
	addr, ok := netip.AddrFromSlice(r.IP)
	if !ok {
		return netip.Prefix{}
	}
	ones, _ := r.Mask.Size()
	return netip.PrefixFrom(addr.Unmap(), ones)
}

// MeshPrefix is the overlay range every gateway's overlay IP lies in.
func (tb *TrustBundle) MeshPrefix() netip.Prefix { return tb.meshPrefix }

// CAs returns the CA certificates.
func (tb *TrustBundle) CAs() []*x509.Certificate { return tb.cas }

// Roots returns the CA certificates as a pool, for TLS configurations.
func (tb *TrustBundle) Roots() *x509.CertPool { return tb.roots }

// CRL returns the revocation list in force of the CA that signs (the
// only CA, but during an issuer rotation), or nil.
func (tb *TrustBundle) CRL() *x509.RevocationList {
	if i := tb.index(tb.signing); i >= 0 {
		return tb.crls[i]
	}
	return tb.crls[0]
}

// CRLs returns every CA's revocation list in force, in the order of CAs.
func (tb *TrustBundle) CRLs() []*x509.RevocationList {
	var out []*x509.RevocationList
	for _, c := range tb.crls {
		if c != nil {
			out = append(out, c)
		}
	}
	return out
}

// CRLFor returns the list in force of the bundle's CA that signed cert,
// or nil: none of its CAs did, or that one has no list here.
func (tb *TrustBundle) CRLFor(cert *x509.Certificate) *x509.RevocationList {
	for i, ca := range tb.cas {
		if bytes.Equal(cert.RawIssuer, ca.RawSubject) && cert.CheckSignatureFrom(ca) == nil {
			return tb.crls[i]
		}
	}
	return nil
}

// RetiredCRLs returns the lists the bundle keeps beside those in force,
// which Save writes after them: the issuer's lists numbered below those
// (BehindCRLs), then those of CAs the bundle no longer holds.
func (tb *TrustBundle) RetiredCRLs() []*x509.RevocationList {
	if b := tb.BehindCRLs(); len(b) > 0 {
		return append(b, tb.retired...)
	}
	return tb.retired
}

// BehindCRLs returns the issuer's lists numbered below the lists in force
// of their CAs, whose revocations the bundle enforces as well.
func (tb *TrustBundle) BehindCRLs() []*x509.RevocationList {
	var out []*x509.RevocationList
	for _, c := range tb.behind {
		if c != nil {
			out = append(out, c)
		}
	}
	return out
}

// CRLVersion sums the numbers of the lists in force. Each CA numbers its
// own lists upwards, so the sum grows with every newer list, and with a
// single CA it is that CA's list number, as gateways before issuer
// rotation announced it.
func (tb *TrustBundle) CRLVersion() uint64 {
	var v uint64
	for _, c := range tb.crls {
		if c != nil && c.Number != nil && c.Number.IsUint64() {
			v += c.Number.Uint64()
		}
	}
	return v
}

// Key identifies what the bundle judges by: it changes when a CA comes or
// goes or a list changes, and so keys caches of its verdicts.
func (tb *TrustBundle) Key() string { return tb.key }

// Signing returns the CA that signs new certificates, if the issuer said
// which (nil otherwise).
func (tb *TrustBundle) Signing() *x509.Certificate { return tb.signing }

// WithSigning returns a copy of the bundle that names ca, one of its CAs,
// as the one that signs new certificates.
func (tb *TrustBundle) WithSigning(ca *x509.Certificate) (*TrustBundle, error) {
	if tb.index(ca) < 0 {
		return nil, fmt.Errorf("CA %q is not in the trust bundle", ca.Subject.CommonName)
	}
	n := *tb
	n.signing = ca
	n.seal()
	return &n, nil
}

// SignedBySigning reports whether cert was signed by the CA that signs
// new certificates; true when the bundle does not know which that is.
func (tb *TrustBundle) SignedBySigning(cert *x509.Certificate) bool {
	return tb.signing == nil || cert.CheckSignatureFrom(tb.signing) == nil
}

// index is the position of ca among the bundle's CAs, or -1.
func (tb *TrustBundle) index(ca *x509.Certificate) int {
	if ca == nil {
		return -1
	}
	for i, c := range tb.cas {
		if bytes.Equal(c.Raw, ca.Raw) {
			return i
		}
	}
	return -1
}

// SignedByCA reports whether one of the bundle's CAs signed crl.
func (tb *TrustBundle) SignedByCA(crl *x509.RevocationList) bool { return tb.signerOf(crl) != nil }

// signerOf is the first of the bundle's CAs that signed crl, or nil.
func (tb *TrustBundle) signerOf(crl *x509.RevocationList) *x509.Certificate {
	for _, ca := range tb.cas {
		if listOf(crl, ca) {
			return ca
		}
	}
	return nil
}

// listOf reports whether crl is ca's: signed by its key and naming it as
// the issuer. Two issuers may share a key under different names (Vault
// makes one with pki/root/rotate/existing), and each numbers its own
// lists: the key alone would put one's list in the other's place, refused
// there as a replay of an older one, or taking the place of a newer one.
func listOf(crl *x509.RevocationList, ca *x509.Certificate) bool {
	return bytes.Equal(crl.RawIssuer, ca.RawSubject) && crl.CheckSignatureFrom(ca) == nil
}

// seal computes the bundle's key once it is complete.
func (tb *TrustBundle) seal() {
	h := sha256.New()
	for i, c := range tb.cas {
		h.Write(c.Raw)
		if tb.crls[i] != nil {
			h.Write(tb.crls[i].Raw)
		}
		h.Write([]byte{0})
		if tb.behind[i] != nil {
			h.Write(tb.behind[i].Raw)
		}
		h.Write([]byte{0})
	}
	if tb.signing != nil {
		h.Write(tb.signing.Raw)
	}
	tb.key = string(h.Sum(nil)[:16])
}

// CAPEM returns the CA certificates in PEM, for writing next to an identity.
func (tb *TrustBundle) CAPEM() []byte {
	var b bytes.Buffer
	for _, c := range tb.cas {
		pem.Encode(&b, &pem.Block{Type: pemCert, Bytes: c.Raw})
	}
	return b.Bytes()
}

// ParseCRL parses a PEM or DER X.509 revocation list.
func ParseCRL(b []byte) (*x509.RevocationList, error) {
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != pemCRL {
			return nil, fmt.Errorf("PEM block is %q, want %q", blk.Type, pemCRL)
		}
		b = blk.Bytes
	}
	crl, err := x509.ParseRevocationList(b)
	if err != nil {
		return nil, fmt.Errorf("parse revocation list: %w", err)
	}
	return crl, nil
}

// WithCRL returns a copy of the bundle that enforces crl. The list must be
// signed by one of the bundle's CAs, be that CA's complete list
// (CheckCompleteCRL) and must not be older (lower CRL number) than the one
// in force for that CA: revocations only ever accumulate, so an attacker
// replaying an old list cannot un-revoke anybody.
func (tb *TrustBundle) WithCRL(crl *x509.RevocationList) (*TrustBundle, error) {
	if crl == nil {
		return nil, errors.New("no revocation list given")
	}
	if err := CheckCompleteCRL(crl); err != nil {
		return nil, err
	}
	n := *tb
	n.crls = slices.Clone(tb.crls)
	signed := false
	// CAs that share a key and a name (an issuer reissued as it was)
	// share lists.
	for i, ca := range tb.cas {
		if !listOf(crl, ca) {
			continue
		}
		signed = true
		if cur := tb.crls[i]; cur != nil && crl.Number != nil && cur.Number != nil && crl.Number.Cmp(cur.Number) < 0 {
			return nil, refuse(ReasonReplay, "revocation list number %s is older than the one in force (%s)", crl.Number, cur.Number)
		}
		n.crls[i] = crl
	}
	if !signed {
		return nil, refuse(ReasonUnknownCA, "revocation list is not signed by the mesh CA")
	}
	n.indexRevoked()
	n.seal()
	return &n, nil
}

var (
	oidAuthorityKeyID           = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidCRLNumber                = asn1.ObjectIdentifier{2, 5, 29, 20}
	oidDeltaCRLIndicator        = asn1.ObjectIdentifier{2, 5, 29, 27}
	oidIssuingDistributionPoint = asn1.ObjectIdentifier{2, 5, 29, 28}
)

// CheckCompleteCRL refuses a revocation list that is not all its CA
// revokes. The bundle holds one list per CA and a newer number replaces
// it, so a list that covers less would undo every revocation it leaves
// out. A delta CRL is such a list: it holds only what was revoked since
// a complete one, and shares its numbers (RFC 5280 5.2.3), so it is
// numbered above the list it follows. Vault serves its deltas to anyone
// (pki/crl/delta, with enable_delta), and Go parses them as any other
// list. A critical extension not understood here may narrow the list as
// well (an issuing distribution point that covers some certificates
// only), and RFC 5280 says not to use such a list at all.
func CheckCompleteCRL(crl *x509.RevocationList) error {
	for _, e := range crl.Extensions {
		switch {
		case e.Id.Equal(oidDeltaCRLIndicator):
			base := "another"
			var n *big.Int
			if _, err := asn1.Unmarshal(e.Value, &n); err == nil {
				base = "number " + n.String()
			}
			return refuse(ReasonMalformed, "revocation list number %s is a delta CRL, of what was revoked since list %s: it would replace the CA's complete list and undo every revocation it does not repeat; a mesh takes complete lists only (Vault: pki/crl or pki/issuer/<id>/crl, not crl/delta)", crl.Number, base)
		case e.Critical && !e.Id.Equal(oidAuthorityKeyID) && !e.Id.Equal(oidCRLNumber):
			what := ""
			if e.Id.Equal(oidIssuingDistributionPoint) {
				what = " (an issuing distribution point: the list may cover only some of the CA's certificates)"
			}
			return refuse(ReasonMalformed, "revocation list number %s has critical extension %s%s, which the mesh does not read: it cannot stand for all its CA revokes; have the CA publish complete lists without it", crl.Number, e.Id, what)
		}
	}
	return nil
}

// indexRevoked rebuilds the set of revoked serials from the lists.
func (tb *TrustBundle) indexRevoked() {
	tb.revoked = map[string]struct{}{}
	for _, c := range slices.Concat(tb.crls, tb.behind) {
		if c == nil {
			continue
		}
		for _, e := range c.RevokedCertificateEntries {
			tb.revoked[e.SerialNumber.String()] = struct{}{}
		}
	}
}

// Adopt returns next with, for each CA both hold, the newer of the two
// lists — an issuer's answer never takes back a revocation the bundle in
// force knows of, nor does one that names again a CA it had retired — and
// whether the result differs from tb: a CA came or went, the signing CA
// changed, or a list is newer. The CAs are next's: only an issuer's answer
// may be adopted, never a bundle built from what gossip brought.
//
// The answer's list, where the one kept is newer (or as new) and the
// answer's revokes what it does not, is enforced beside it (BehindCRLs)
// rather than dropped: the issuer numbers its lists afresh (a Vault
// restored from a snapshot, the CA imported into another mount or
// cluster), and what it revokes must not wait days for its numbers to
// overtake the mesh's. The list kept stays in force — the one the mesh
// gossips — until they do. (An answer that only lags, its list a part of
// the one kept, adds nothing.)
func (tb *TrustBundle) Adopt(next *TrustBundle) (*TrustBundle, bool) {
	n := *next
	n.crls = slices.Clone(next.crls)
	n.behind = make([]*x509.RevocationList, len(next.cas))
	n.retired = nil
	changed := len(next.cas) != len(tb.cas) || !sameCert(next.signing, tb.signing)
	for i, ca := range next.cas {
		held, heldBehind := tb.retiredOf(ca), (*x509.RevocationList)(nil)
		if j := tb.index(ca); j >= 0 {
			held, heldBehind = tb.crls[j], tb.behind[j]
		} else {
			changed = true
		}
		// The issuer's own list: next's in force, unless next kept a
		// newer one itself (a bundle Provider.Trust merged).
		issued := next.crls[i]
		if next.behind[i] != nil {
			issued = next.behind[i]
		}
		if held != nil && (n.crls[i] == nil || !newerCRL(n.crls[i], held)) {
			// A tie keeps the list held too: it is the one gossip
			// spread, and gossip takes none of the same number.
			n.crls[i] = held
		}
		switch {
		case issued == nil:
			n.behind[i] = heldBehind // the answer said nothing of the list
		case revokesBeyond(issued, n.crls[i]):
			n.behind[i] = issued
		case heldBehind != nil && CheckCompleteCRL(heldBehind) != nil && heldBehind.Number != nil && n.crls[i] != nil &&
			n.crls[i].Number != nil && heldBehind.Number.Cmp(n.crls[i].Number) > 0:
			// A delta an earlier release put in force: what it revoked
			// is on no complete list numbered below it (Vault rebuilds
			// its complete list late), and stays enforced until one
			// numbered above it comes.
			n.behind[i] = heldBehind
		}
		if !sameCRL(n.crls[i], held) || !sameCRL(n.behind[i], heldBehind) {
			changed = true
		}
	}
	for j, ca := range tb.cas {
		// Not a list a CA still held signed (one reissued with the same
		// key): it is that CA's, and older than its list in force.
		if next.index(ca) < 0 && tb.crls[j] != nil && n.signerOf(tb.crls[j]) == nil {
			n.retired = append(n.retired, tb.crls[j])
		}
	}
	for _, r := range tb.retired {
		if n.signerOf(r) == nil && !slices.Contains(n.retired, r) {
			n.retired = append(n.retired, r)
		}
	}
	if len(n.retired) > maxRetired {
		n.retired = n.retired[:maxRetired] // the ones retired last come first
	}
	n.indexRevoked()
	n.seal()
	return &n, changed
}

// WithNewerCRLs returns a copy of the bundle with each of crls that is
// signed by one of its CAs and newer than that CA's list in force, and
// whether it took any: the lists gossip brings, where one of a CA this
// gateway does not trust (yet), or one it holds already, is nothing to
// act on, and an older one, or one not complete, is refused (it could
// un-revoke). The issuer's lists kept behind those in force stay.
func (tb *TrustBundle) WithNewerCRLs(crls []*x509.RevocationList) (*TrustBundle, bool) {
	took := false
	for _, crl := range crls {
		i := tb.index(tb.signerOf(crl))
		if i < 0 || !newerCRL(crl, tb.crls[i]) && tb.crls[i] != nil {
			continue
		}
		if next, err := tb.WithCRL(crl); err == nil {
			tb, took = next, true
		}
	}
	return tb, took
}

// withRetired returns a copy of the bundle that keeps crl, of a CA it
// does not hold, aside.
func (tb *TrustBundle) withRetired(crl *x509.RevocationList) *TrustBundle {
	n := *tb
	if len(tb.retired) >= maxRetired {
		return tb // the lists come newest first: this one is older
	}
	n.retired = append(slices.Clone(tb.retired), crl)
	return &n
}

// withBehind returns a copy of the bundle that enforces crl, numbered
// below its CA's list in force, beside that list.
func (tb *TrustBundle) withBehind(crl *x509.RevocationList) *TrustBundle {
	n := *tb
	n.behind = slices.Clone(tb.behind)
	for i, ca := range tb.cas {
		if listOf(crl, ca) && !newerCRL(n.behind[i], crl) {
			n.behind[i] = crl
		}
	}
	n.indexRevoked()
	n.seal()
	return &n
}

// crlBehind is a CA whose list in an issuer's answer is numbered below
// (or as) the list held and is not the same, and the serials each of the
// two revokes that the other does not.
type crlBehind struct {
	ca                            *x509.Certificate
	issued, held                  *x509.RevocationList
	onlyAtIssuer, missingAtIssuer []*big.Int
}

// listsBehind lists the CAs whose list in answer, an issuer's, is
// numbered below (or as) the one tb holds in force, and not the same.
func (tb *TrustBundle) listsBehind(answer *TrustBundle) []crlBehind {
	var out []crlBehind
	for i, ca := range answer.cas {
		j := tb.index(ca)
		if j < 0 {
			continue
		}
		issued, held := answer.crls[i], tb.crls[j]
		if issued == nil || held == nil || sameCRL(issued, held) || newerCRL(issued, held) {
			continue
		}
		out = append(out, crlBehind{ca: ca, issued: issued, held: held,
			onlyAtIssuer: serialsBeyond(issued, held), missingAtIssuer: serialsBeyond(held, issued)})
	}
	return out
}

// serialsBeyond returns the serials a revokes that b does not.
func serialsBeyond(a, b *x509.RevocationList) []*big.Int {
	in := map[string]bool{}
	for _, e := range b.RevokedCertificateEntries {
		in[e.SerialNumber.String()] = true
	}
	var out []*big.Int
	for _, e := range a.RevokedCertificateEntries {
		if !in[e.SerialNumber.String()] {
			out = append(out, e.SerialNumber)
		}
	}
	return out
}

// revokesBeyond reports whether a revokes a serial b does not (b nil:
// any).
func revokesBeyond(a, b *x509.RevocationList) bool {
	if b == nil {
		return len(a.RevokedCertificateEntries) > 0
	}
	return len(serialsBeyond(a, b)) > 0
}

// retiredOf is the newest retired list ca signed, or nil.
func (tb *TrustBundle) retiredOf(ca *x509.Certificate) *x509.RevocationList {
	var out *x509.RevocationList
	for _, r := range tb.retired {
		if listOf(r, ca) && (out == nil || newerCRL(r, out)) {
			out = r
		}
	}
	return out
}

func sameCRL(a, b *x509.RevocationList) bool {
	if a == nil || b == nil {
		return a == b
	}
	return bytes.Equal(a.Raw, b.Raw)
}

func sameCert(a, b *x509.Certificate) bool {
	if a == nil || b == nil {
		return a == b
	}
	return bytes.Equal(a.Raw, b.Raw)
}

// newerCRL reports whether a is a later list than b.
func newerCRL(a, b *x509.RevocationList) bool {
	switch {
	case a == nil || a.Number == nil:
		return false
	case b == nil || b.Number == nil:
		return true
	}
	return a.Number.Cmp(b.Number) > 0
}

// IsRevoked reports whether serial is on the revocation list in force.
func (tb *TrustBundle) IsRevoked(serial *big.Int) bool {
	_, ok := tb.revoked[serial.String()]
	return ok
}

// VerifyCertificate checks that cert is a gateway certificate the mesh
// accepts at time now and returns the attributes it certifies. A clock up
// to MaxClockSkew behind the issuer's is allowed for (ValidFrom). The
// refusal reasons are those of VerifyError.
func (tb *TrustBundle) VerifyCertificate(cert *x509.Certificate, now time.Time) (*Attributes, error) {
	a, _, err := tb.verifyCertificate(cert, now)
	return a, err
}

// verifyCertificate is VerifyCertificate, and says until when its verdict
// holds as far as validity goes: the end of the first certificate of the
// chain to end, cert's or a CA's (an issuer need not end its leaves
// before itself: Vault's leaf_not_after_behavior=permit).
func (tb *TrustBundle) verifyCertificate(cert *x509.Certificate, now time.Time) (*Attributes, time.Time, error) {
	if cert == nil {
		return nil, time.Time{}, refuse(ReasonMalformed, "no certificate")
	}
	// Check the validity window first: x509.Verify folds expiry and
	// not-yet-valid into one error and we want to tell them apart.
	if now.After(cert.NotAfter) {
		return nil, time.Time{}, refuse(ReasonExpired, "certificate of %q expired at %s", nameOf(cert), cert.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(ValidFrom(cert)) {
		return nil, time.Time{}, refuse(ReasonNotYetValid, "certificate of %q is valid only from %s (this clock says %s; %s of difference are allowed)",
			nameOf(cert), cert.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), MaxClockSkew)
	}
	at := now
	if at.Before(cert.NotBefore) { // within the skew allowed
		at = cert.NotBefore
	}
	chains, err := cert.Verify(x509.VerifyOptions{
		Roots:       tb.roots,
		CurrentTime: at,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		var inv x509.CertificateInvalidError
		if errors.As(err, &inv) && inv.Reason == x509.Expired {
			return nil, time.Time{}, refuse(ReasonExpired, "mesh CA certificate is not valid at %s", now.UTC().Format(time.RFC3339))
		}
		var ua x509.UnknownAuthorityError
		if errors.As(err, &ua) {
			return nil, time.Time{}, refuse(ReasonUnknownCA, "certificate of %q is not signed by the mesh CA", nameOf(cert))
		}
		return nil, time.Time{}, refuse(ReasonBadCertificate, "certificate of %q: %v", nameOf(cert), err)
	}
	var until time.Time
	for _, chain := range chains { // any chain that still holds will do
		end := cert.NotAfter
		for _, c := range chain {
			if c.NotAfter.Before(end) {
				end = c.NotAfter
			}
		}
		if end.After(until) {
			until = end
		}
	}
	if tb.IsRevoked(cert.SerialNumber) {
		return nil, time.Time{}, refuse(ReasonRevoked, "certificate %s of %q is revoked", FormatSerial(cert.SerialNumber), nameOf(cert))
	}
	a, err := AttributesOf(cert)
	if err != nil {
		return nil, time.Time{}, refuse(ReasonBadCertificate, "%v", err)
	}
	if err := a.ValidateCertified(tb.meshPrefix); err != nil {
		return nil, time.Time{}, refuse(ReasonBadCertificate, "certificate of %q: %v", nameOf(cert), err)
	}
	return a, until, nil
}

// AttributesOf extracts the attributes a gateway certificate carries,
// without judging whether it is trusted.
func AttributesOf(cert *x509.Certificate) (*Attributes, error) {
	var found []Attributes
	for _, u := range cert.URIs {
		if u.Scheme != AttributeURIScheme {
			continue
		}
		a, err := parseAttributeURI(u)
		if err != nil {
			return nil, fmt.Errorf("certificate of %q: %w", nameOf(cert), err)
		}
		found = append(found, a)
	}
	if len(found) != 1 {
		return nil, fmt.Errorf("certificate of %q carries %d skybridge attribute URIs, want exactly 1", nameOf(cert), len(found))
	}
	a := found[0]
	if len(cert.IPAddresses) != 1 {
		return nil, fmt.Errorf("certificate of %q carries %d IP addresses, want exactly 1 (the overlay IP)", nameOf(cert), len(cert.IPAddresses))
	}
	ip, _ := netip.AddrFromSlice(cert.IPAddresses[0])
	if a.OverlayIP.IsValid() && a.OverlayIP != ip.Unmap() {
		// A CA that pins the URI but cannot pin IP SANs (Vault) would
		// otherwise certify any address the holder asks for.
		return nil, fmt.Errorf("certificate of %q carries IP address %s, but its attribute URI names overlay IP %s", nameOf(cert), ip.Unmap(), a.OverlayIP)
	}
	// Certificates from before the URI named it carry it only here.
	a.OverlayIP = ip.Unmap()
	if nameOf(cert) != a.Node {
		return nil, fmt.Errorf("certificate common name %q differs from its node attribute %q", nameOf(cert), a.Node)
	}
	return &a, nil
}

// FormatSerial prints a serial number the way openssl and Vault do:
// colon-separated hex bytes.
func FormatSerial(s *big.Int) string {
	b := s.Bytes()
	out := make([]byte, 0, len(b)*3)
	const hex = "0123456789abcdef"
	for i, c := range b {
		if i > 0 {
			out = append(out, ':')
		}
		out = append(out, hex[c>>4], hex[c&0xf])
	}
	return string(out)
}

// ParseSerial accepts a serial in colon-hex (Vault, openssl), plain hex with
// a 0x prefix, or decimal.
func ParseSerial(s string) (*big.Int, error) {
	n := new(big.Int)
	var ok bool
	switch {
	case len(s) > 2 && (s[:2] == "0x" || s[:2] == "0X"):
		_, ok = n.SetString(s[2:], 16)
	case bytes.ContainsRune([]byte(s), ':'):
		_, ok = n.SetString(string(bytes.ReplaceAll([]byte(s), []byte(":"), nil)), 16)
	default:
		_, ok = n.SetString(s, 10)
	}
	if !ok || n.Sign() <= 0 {
		return nil, fmt.Errorf("serial %q is not a certificate serial number (colon-separated hex as `skybridge ca list` prints it, 0x-hex, or decimal)", s)
	}
	return n, nil
}

// nameOf is a certificate's common name for an error message, cut short:
// certificates arrive from the network, and one with a name of a megabyte
// would otherwise be copied into every refusal kept of it.
func nameOf(cert *x509.Certificate) string {
	const max = 64
	cn := cert.Subject.CommonName
	if len(cn) <= max {
		return cn
	}
	return strings.ToValidUTF8(cn[:max], "") + "…"
}
