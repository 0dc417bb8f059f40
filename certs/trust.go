package certs

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// TrustBundle is what a gateway needs to judge other gateways: the mesh CA
// certificate(s), the CA's newest revocation list and the overlay range.
// It holds no secrets. Its methods are pure functions of their arguments
// and the bundle, so verification can be table-tested.
//
// A TrustBundle is immutable; WithCRL returns an updated copy, so one can be
// shared between goroutines and swapped atomically.
type TrustBundle struct {
	cas        []*x509.Certificate
	roots      *x509.CertPool
	crl        *x509.RevocationList
	revoked    map[string]struct{} // serial (decimal) → revoked
	meshPrefix netip.Prefix
}

// NewTrustBundle builds a bundle from the CA certificates. meshPrefix may be
// the zero Prefix, in which case it is taken from the CA's IP name
// constraint (the embedded CA writes one); a Vault CA usually has none and
// the configuration supplies it.
func NewTrustBundle(cas []*x509.Certificate, meshPrefix netip.Prefix) (*TrustBundle, error) {
	if len(cas) == 0 {
		return nil, errors.New("trust bundle has no CA certificate")
	}
	tb := &TrustBundle{cas: cas, roots: x509.NewCertPool(), meshPrefix: meshPrefix}
	for _, c := range cas {
		if !c.IsCA {
			return nil, fmt.Errorf("certificate %q is not a CA certificate", c.Subject.CommonName)
		}
		tb.roots.AddCert(c)
		if !tb.meshPrefix.IsValid() {
			tb.meshPrefix = meshPrefixOf(c)
		}
	}
	if !tb.meshPrefix.IsValid() {
		return nil, errors.New("mesh overlay range unknown: the CA certificate has no IP name constraint, so set it in the configuration (mesh_cidr)")
	}
	return tb, nil
}

// LoadTrustBundle reads ca.crt and, if present, crl.pem from dir.
func LoadTrustBundle(dir string, meshPrefix netip.Prefix) (*TrustBundle, error) {
	b, err := os.ReadFile(filepath.Join(dir, fileCACert))
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
	crl, err := ParseCRL(crlPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, fileCRL), err)
	}
	return tb.WithCRL(crl)
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

// CRL returns the revocation list in force, or nil.
func (tb *TrustBundle) CRL() *x509.RevocationList { return tb.crl }

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
// signed by one of the bundle's CAs and must not be older (lower CRL number)
// than the one in force: revocations only ever accumulate, so an attacker
// replaying an old list cannot un-revoke anybody.
func (tb *TrustBundle) WithCRL(crl *x509.RevocationList) (*TrustBundle, error) {
	if crl == nil {
		return nil, errors.New("no revocation list given")
	}
	var signer *x509.Certificate
	for _, ca := range tb.cas {
		if crl.CheckSignatureFrom(ca) == nil {
			signer = ca
			break
		}
	}
	if signer == nil {
		return nil, refuse(ReasonUnknownCA, "revocation list is not signed by the mesh CA")
	}
	if tb.crl != nil && crl.Number != nil && tb.crl.Number != nil && crl.Number.Cmp(tb.crl.Number) < 0 {
		return nil, refuse(ReasonReplay, "revocation list number %s is older than the one in force (%s)", crl.Number, tb.crl.Number)
	}
	n := *tb
	n.crl = crl
	n.revoked = make(map[string]struct{}, len(crl.RevokedCertificateEntries))
	for _, e := range crl.RevokedCertificateEntries {
		n.revoked[e.SerialNumber.String()] = struct{}{}
	}
	return &n, nil
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
	if cert == nil {
		return nil, refuse(ReasonMalformed, "no certificate")
	}
	// Check the validity window first: x509.Verify folds expiry and
	// not-yet-valid into one error and we want to tell them apart.
	if now.After(cert.NotAfter) {
		return nil, refuse(ReasonExpired, "certificate of %q expired at %s", nameOf(cert), cert.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(ValidFrom(cert)) {
		return nil, refuse(ReasonNotYetValid, "certificate of %q is valid only from %s (this clock says %s; %s of difference are allowed)",
			nameOf(cert), cert.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), MaxClockSkew)
	}
	at := now
	if at.Before(cert.NotBefore) { // within the skew allowed
		at = cert.NotBefore
	}
	_, err := cert.Verify(x509.VerifyOptions{
		Roots:       tb.roots,
		CurrentTime: at,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		var inv x509.CertificateInvalidError
		if errors.As(err, &inv) && inv.Reason == x509.Expired {
			return nil, refuse(ReasonExpired, "mesh CA certificate is not valid at %s", now.UTC().Format(time.RFC3339))
		}
		var ua x509.UnknownAuthorityError
		if errors.As(err, &ua) {
			return nil, refuse(ReasonUnknownCA, "certificate of %q is not signed by the mesh CA", nameOf(cert))
		}
		return nil, refuse(ReasonBadCertificate, "certificate of %q: %v", nameOf(cert), err)
	}
	if tb.IsRevoked(cert.SerialNumber) {
		return nil, refuse(ReasonRevoked, "certificate %s of %q is revoked", FormatSerial(cert.SerialNumber), nameOf(cert))
	}
	a, err := AttributesOf(cert)
	if err != nil {
		return nil, refuse(ReasonBadCertificate, "%v", err)
	}
	if err := a.Validate(tb.meshPrefix); err != nil {
		return nil, refuse(ReasonBadCertificate, "certificate of %q: %v", nameOf(cert), err)
	}
	return a, nil
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
