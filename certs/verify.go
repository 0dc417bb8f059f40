package certs

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"time"
)

// MaxClockSkew is how far in the future an advert's timestamp, or a
// certificate's start of validity, may lie before it is refused. Gateways
// in different clouds disagree about the time by seconds, not minutes.
const MaxClockSkew = 5 * time.Minute

// ValidFrom is the earliest time at which cert is taken as valid: its
// NotBefore less MaxClockSkew. Issuers backdate NotBefore by a minute
// (Vault by 30 s); a gateway whose clock runs further behind its issuer's
// would otherwise refuse its own new certificate, and its peers every
// certificate renewed meanwhile, until the clocks caught up.
func ValidFrom(cert *x509.Certificate) time.Time { return cert.NotBefore.Add(-MaxClockSkew) }

// Seen is what a verifier remembers of the last advert it accepted from a
// node, to refuse replays of older ones.
type Seen struct {
	Version uint64
	// Digest is the SHA-256 of what the advert's signature covers, not of
	// the signature: an ECDSA signature (r, s) verifies as (r, n-s) too,
	// and anyone who holds the gossip key could gossip a gateway's advert
	// so re-signed first, to have the gateway's own taken for a replay.
	// It is not saved: a restart computes it again from the adverts kept.
	Digest [32]byte
}

// Seen is what a verifier remembers of s once it is accepted.
func (s *SignedAdvert) Seen() Seen { return Seen{Version: s.Version, Digest: sha256.Sum256(s.body)} }

// Verified is an advert that passed VerifyAdvert, with the certified
// attributes it was checked against.
type Verified struct {
	Advert     Advert
	Attributes *Attributes
	Cert       *x509.Certificate
	Seen       Seen // remember this to detect replays of older adverts
}

// VerifyAdvert decides whether the mesh accepts raw, an advert signed with
// the key of cert, at time now. last is the previous advert accepted from
// the same node, or nil. It is a pure function: the same arguments always
// give the same answer, and every refusal is a *VerifyError whose Reason
// says why:
//
//   - malformed: the bytes do not decode;
//   - cert_mismatch: the advert names a different certificate;
//   - unknown_ca, expired, not_yet_valid, revoked, bad_certificate: the
//     certificate is not acceptable (see TrustBundle.VerifyCertificate);
//   - bad_signature: the advert was not signed by the certificate's key, or
//     was changed after signing;
//   - attribute_mismatch: the advert claims a node, site, region, provider,
//     jurisdiction, overlay IP or route its certificate does not grant;
//   - unproven_key: the proof that the gateway holds its WireGuard key's
//     private key (ProveWGKey) does not verify;
//   - clock_skew: the advert is dated too far in the future;
//   - replay: the advert is older than last, or has the same version but
//     different content.
func VerifyAdvert(raw []byte, cert *x509.Certificate, tb *TrustBundle, now time.Time, last *Seen) (*Verified, error) {
	v, _, err := verifyAdvert(raw, cert, tb, now, last, uncached{})
	return v, err
}

// checker does the two checks of VerifyAdvert whose answers outlive an
// advert: a gateway's certificate and its WireGuard key's proof change
// seldom, its advert with every new load figure. VerifyCache remembers
// them.
type checker interface {
	// certificate is TrustBundle.verifyCertificate.
	certificate(tb *TrustBundle, cert *x509.Certificate, now time.Time) (*Attributes, time.Time, error)
	proven(key WGPublicKey, certHash [32]byte, p WGProof) error
}

type uncached struct{}

func (uncached) certificate(tb *TrustBundle, cert *x509.Certificate, now time.Time) (*Attributes, time.Time, error) {
	return tb.verifyCertificate(cert, now)
}

func (uncached) proven(key WGPublicKey, certHash [32]byte, p WGProof) error {
	return VerifyWGProof(key, certHash, p)
}

// verifyAdvert is VerifyAdvert, and says until when its verdict holds as
// far as the validity of the certificate's chain goes.
func verifyAdvert(raw []byte, cert *x509.Certificate, tb *TrustBundle, now time.Time, last *Seen, c checker) (*Verified, time.Time, error) {
	sa, err := DecodeAdvert(raw)
	if err != nil {
		return nil, time.Time{}, err
	}
	if cert == nil {
		return nil, time.Time{}, refuse(ReasonCertMismatch, "no certificate for advert of %q", sa.Node)
	}
	if sha256.Sum256(cert.Raw) != sa.CertHash {
		return nil, time.Time{}, refuse(ReasonCertMismatch, "advert of %q names another certificate", sa.Node)
	}
	attrs, until, err := c.certificate(tb, cert, now)
	if err != nil {
		return nil, time.Time{}, err
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !ecdsa.VerifyASN1(pub, advertDigest(sa.body), sa.sig) {
		return nil, time.Time{}, refuse(ReasonBadSignature, "advert of %q does not verify with its certificate key", sa.Node)
	}
	if err := checkClaims(&sa.Advert, attrs); err != nil {
		return nil, time.Time{}, err
	}
	if err := checkKey(&sa.Advert, c); err != nil {
		return nil, time.Time{}, err
	}
	seen := sa.Seen()
	if err := checkFreshness(&sa.Advert, now, last, seen); err != nil {
		return nil, time.Time{}, err
	}
	return &Verified{Advert: sa.Advert, Attributes: attrs, Cert: cert, Seen: seen}, until, nil
}

// checkFreshness refuses an advert dated in the future or older than the
// last one accepted from its node.
func checkFreshness(a *Advert, now time.Time, last *Seen, seen Seen) error {
	if a.Timestamp.After(now.Add(MaxClockSkew)) {
		return refuse(ReasonClockSkew, "advert of %q is dated %s, more than %s ahead", a.Node, a.Timestamp.Format(time.RFC3339), MaxClockSkew)
	}
	if last != nil {
		switch {
		case a.Version < last.Version:
			return refuse(ReasonReplay, "advert of %q has version %d, older than %d already accepted", a.Node, a.Version, last.Version)
		case a.Version == last.Version && seen.Digest != last.Digest:
			return refuse(ReasonReplay, "advert of %q reuses version %d with different content", a.Node, a.Version)
		}
	}
	return nil
}

// checkKey refuses an advert whose proof of its WireGuard key does not
// verify. An advert without one is let in (a gateway of a release from
// before proofs, during an upgrade); the membership lets it win no
// contested claim from a gateway that proves it holds its key.
func checkKey(a *Advert, c checker) error {
	if a.WireGuardKeyProof.IsZero() {
		return nil
	}
	if err := c.proven(a.WireGuardKey, a.CertHash, a.WireGuardKeyProof); err != nil {
		return refuse(ReasonUnprovenKey, "advert of %q claims WireGuard key %s without holding it (%v)", a.Node, a.WireGuardKey, err)
	}
	return nil
}

// checkClaims binds an advert to its certificate: everything it says about
// where the gateway is and what it routes must be certified.
func checkClaims(a *Advert, c *Attributes) error {
	for _, f := range []struct{ name, claim, cert string }{
		{"node", a.Node, c.Node},
		{"site", a.Site, c.Site},
		{"region", a.Region, c.Region},
		{"provider", a.Provider, c.Provider},
		{"jurisdiction", a.Jurisdiction, c.Jurisdiction},
		{"overlay IP", a.OverlayIP.String(), c.OverlayIP.String()},
	} {
		if f.claim != f.cert {
			return refuse(ReasonAttributeMismatch, "advert of %q claims %s %q but its certificate grants %q", c.Node, f.name, f.claim, f.cert)
		}
	}
	for _, r := range a.Routes {
		if !c.Grants(r) {
			return refuse(ReasonAttributeMismatch, "advert of %q claims route %s which its certificate does not grant (granted: %v)", c.Node, r, c.Routes)
		}
	}
	return nil
}
