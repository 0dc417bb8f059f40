package policy

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// SignatureFormat names the signature file format.
const SignatureFormat = "skybridge-policy-signature/v1"

// signDomain separates policy signatures from every other use of the CA
// or signer key.
const signDomain = "skybridge policy v1\x00"

// Signature is a detached signature of a policy file (FILE.sig, JSON). It
// is made by the mesh CA's key, or by a policy-signer certificate the CA
// issued (so a compliance team can sign policies without holding the CA).
type Signature struct {
	Format            string    `json:"format"`
	Policy            Revision  `json:"policy"`
	SignedAt          time.Time `json:"signed_at"`
	Signer            string    `json:"signer"`
	SignerCertificate string    `json:"signer_certificate,omitempty"` // PEM; empty when the CA itself signed
	Signature         []byte    `json:"signature"`
}

// Errors of Verify and Adopt, for errors.Is.
var (
	ErrUnsigned        = errors.New("policy is not signed")
	ErrBadSignature    = errors.New("policy signature does not verify")
	ErrUntrustedSigner = errors.New("policy signer is not trusted by the mesh CA")
	ErrRollback        = errors.New("policy is older than the one in force")
	ErrEquivocation    = errors.New("policy has the version of the one in force but different content")
	ErrBackdated       = errors.New("policy is signed earlier than the one in force it would replace")
)

func signDigest(policySHA256 string, signedAt time.Time) ([]byte, error) {
	sum, err := hex.DecodeString(policySHA256)
	if err != nil || len(sum) != sha256.Size {
		return nil, fmt.Errorf("bad policy hash %q", policySHA256)
	}
	h := sha256.New()
	h.Write([]byte(signDomain))
	h.Write(sum)
	binary.Write(h, binary.BigEndian, signedAt.UnixNano())
	return h.Sum(nil), nil
}

// Sign signs policy source with signer. signerCert is nil when signer is
// the mesh CA's own key, or the policy-signer certificate that belongs to
// signer. The policy must compile: an invalid policy is never signed.
func Sign(file string, src []byte, signer crypto.Signer, signerName string, signerCert *x509.Certificate, now time.Time) (*Signature, error) {
	p, err := Parse(file, src)
	if err != nil {
		return nil, fmt.Errorf("refusing to sign a policy that does not compile:\n%w", err)
	}
	if len(p.never) > 0 {
		msgs := make([]string, len(p.never))
		for i, f := range p.never {
			msgs[i] = fmt.Sprintf("%s:%d: %s", f.Pos.File, f.Pos.Line, f.Message)
		}
		return nil, fmt.Errorf("refusing to sign a policy with what cannot take effect as written:\n%s", strings.Join(msgs, "\n"))
	}
	sig := &Signature{Format: SignatureFormat, Policy: p.rev, SignedAt: now.UTC().Truncate(time.Second), Signer: signerName}
	if signerCert != nil {
		// Gateways judge the signer as of the signing time: a signature
		// made outside its certificate's validity is refused everywhere.
		if c := signerCert; sig.SignedAt.Before(certs.ValidFrom(c)) || sig.SignedAt.After(c.NotAfter) {
			return nil, fmt.Errorf("the signer certificate is valid from %s (%s with the %s of clock skew gateways allow) to %s, and this machine's clock says %s: every gateway would refuse the signature; check the clock, or use a current signer certificate",
				c.NotBefore.UTC().Format(time.RFC3339), certs.ValidFrom(c).UTC().Format(time.RFC3339), certs.MaxClockSkew, c.NotAfter.UTC().Format(time.RFC3339), sig.SignedAt.Format(time.RFC3339))
		}
		sig.SignerCertificate = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: signerCert.Raw}))
	}
	digest, err := signDigest(sig.Policy.SHA256, sig.SignedAt)
	if err != nil {
		return nil, err
	}
	if sig.Signature, err = signer.Sign(rand.Reader, digest, crypto.SHA256); err != nil {
		return nil, fmt.Errorf("sign policy: %w", err)
	}
	return sig, nil
}

// Marshal encodes the signature file.
func (s *Signature) Marshal() []byte {
	b, _ := json.MarshalIndent(s, "", "  ")
	return append(b, '\n')
}

// ParseSignature decodes a signature file.
func ParseSignature(b []byte) (*Signature, error) {
	var s Signature
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("policy signature is not valid JSON: %w", err)
	}
	if s.Format != SignatureFormat {
		return nil, fmt.Errorf("policy signature format %q is not %q", s.Format, SignatureFormat)
	}
	return &s, nil
}

// Verify checks that sig is a valid signature of src by the mesh CA of tb
// (or a policy signer it certified, valid at signing time and not revoked)
// and returns the compiled policy. now bounds how far in the future the
// signing time may lie.
func Verify(file string, src []byte, sig *Signature, tb *certs.TrustBundle, now time.Time) (*Policy, error) {
	return verify(file, src, sig, tb, now, overlookNothing)
}

// VerifyRevokedSigner is Verify for a policy whose signer the mesh has
// revoked since: its signature must still verify, by a signer the CA
// certified, and only the revocation is overlooked. It is what a gateway
// keeps in force, marked, when nothing trusted can take its place.
func VerifyRevokedSigner(file string, src []byte, sig *Signature, tb *certs.TrustBundle, now time.Time) (*Policy, error) {
	return verify(file, src, sig, tb, now, overlookRevocation)
}

// VerifyWithdrawn is VerifyRevokedSigner for the policy a gateway withdrew
// itself while it was in force there: the CA that certified its signer may
// be retired since (a Vault issuer deleted), and the chain to it is not
// checked again, the gateway having checked it when it adopted the policy.
// The signature must still be the signer certificate's. Whether the gateway
// withdrew this very policy is its caller's to know.
func VerifyWithdrawn(file string, src []byte, sig *Signature, tb *certs.TrustBundle, now time.Time) (*Policy, error) {
	return verify(file, src, sig, tb, now, overlookChain)
}

// overlook is what a verification of a policy overlooks in its signer.
type overlook uint8

const (
	overlookNothing    overlook = iota
	overlookRevocation          // its certificate's revocation
	overlookChain               // its revocation, and whether a CA of the mesh still certifies it
)

func verify(file string, src []byte, sig *Signature, tb *certs.TrustBundle, now time.Time, ov overlook) (*Policy, error) {
	if sig == nil {
		return nil, ErrUnsigned
	}
	sum := sha256.Sum256(src)
	if hex.EncodeToString(sum[:]) != sig.Policy.SHA256 {
		return nil, fmt.Errorf("%w: the policy was changed after signing (it is not the file signed)", ErrBadSignature)
	}
	digest, err := signDigest(sig.Policy.SHA256, sig.SignedAt)
	if err != nil {
		return nil, err
	}
	if sig.SignedAt.After(now.Add(certs.MaxClockSkew)) {
		return nil, fmt.Errorf("%w: signed in the future (%s)", ErrBadSignature, sig.SignedAt.Format(time.RFC3339))
	}
	keys, err := signerKeys(sig, tb, ov)
	if err != nil {
		return nil, err
	}
	signedBy := ""
	for _, k := range keys {
		if ecdsa.VerifyASN1(k.key, digest, sig.Signature) {
			signedBy = k.name
			break
		}
	}
	if signedBy == "" {
		// The policy is the file signed (its hash matched): the
		// signature itself is not from the key it names.
		if sig.SignerCertificate == "" {
			return nil, fmt.Errorf("%w against this mesh's CA: it names its signer %q — another mesh's CA, or the signature was altered", ErrBadSignature, sig.Signer)
		}
		return nil, fmt.Errorf("%w: the signature was altered, or not made with the key of the signer certificate it carries", ErrBadSignature)
	}
	p, err := Parse(file, src)
	if err != nil {
		return nil, fmt.Errorf("signed policy does not compile: %w", err)
	}
	if p.rev != sig.Policy {
		return nil, fmt.Errorf("%w: signature is for %s, policy is %s", ErrBadSignature, sig.Policy, p.rev)
	}
	p.signedAt, p.signedBy = sig.SignedAt, signedBy
	return p, nil
}

// signerKey is a key a signature may be checked with, and the name its
// certificate gives its holder: the signature's own "signer" is not
// signed, so only this one is vouched for.
type signerKey struct {
	key  *ecdsa.PublicKey
	name string
}

// signerKeys returns the keys a signature may be checked with: the CA's
// own, or a delegated signer's after checking its certificate.
func signerKeys(sig *Signature, tb *certs.TrustBundle, ov overlook) ([]signerKey, error) {
	if sig.SignerCertificate == "" {
		var keys []signerKey
		for _, ca := range tb.CAs() {
			if k, ok := ca.PublicKey.(*ecdsa.PublicKey); ok {
				keys = append(keys, signerKey{k, ca.Subject.CommonName + " (the mesh CA)"})
			}
		}
		return keys, nil
	}
	cs, err := certs.ParseCertificatesPEM([]byte(sig.SignerCertificate))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUntrustedSigner, err)
	}
	c := cs[0]
	// Judge the signer as of the signing time, so a policy stays valid
	// after its signer's certificate expires; revocation still counts. A
	// signer whose clock ran behind the CA's signed before its
	// certificate's start, by as much as gateways allow for.
	at := sig.SignedAt
	if at.Before(c.NotBefore) && !at.Before(certs.ValidFrom(c)) {
		at = c.NotBefore
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: tb.Roots(), CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}}); err != nil && ov < overlookChain {
		return nil, fmt.Errorf("%w: %v", ErrUntrustedSigner, err)
	}
	// As Verify would judge it: no usage named is any usage.
	if ov == overlookChain && len(c.ExtKeyUsage)+len(c.UnknownExtKeyUsage) > 0 && !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageCodeSigning) && !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageAny) {
		return nil, fmt.Errorf("%w: signer certificate %s is not for code signing", ErrUntrustedSigner, certs.FormatSerial(c.SerialNumber))
	}
	if tb.IsRevoked(c.SerialNumber) && ov < overlookRevocation {
		return nil, fmt.Errorf("%w: signer certificate %s is revoked", ErrUntrustedSigner, certs.FormatSerial(c.SerialNumber))
	}
	k, ok := c.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: signer key is not ECDSA", ErrUntrustedSigner)
	}
	return []signerKey{{k, c.Subject.CommonName}}, nil
}

// Adopt decides whether a verified candidate may replace the policy in
// force (nil if none): only a newer version may, so an attacker replaying
// an old, laxer policy gets nowhere, and only one signed no earlier than
// the policy in force (give or take clock skew). A signer is judged at the
// signing time its signature states, so that a policy outlives its
// signer's certificate; without that rule the key of a signer whose
// certificate has expired (not revoked) could sign a new version dated
// back into its validity. It returns false, nil when candidate is the
// policy already in force.
func Adopt(current, candidate *Policy) (bool, error) {
	if current == nil {
		return true, nil
	}
	c, n := current.rev, candidate.rev
	switch {
	case n.Name != c.Name:
		return false, fmt.Errorf("policy %q cannot replace policy %q", n.Name, c.Name)
	case n.Version < c.Version:
		return false, fmt.Errorf("%w: version %d < %d", ErrRollback, n.Version, c.Version)
	case n.Version == c.Version && n.SHA256 != c.SHA256:
		return false, fmt.Errorf("%w: version %d", ErrEquivocation, n.Version)
	case n.Version == c.Version:
		return false, nil
	case !current.signedAt.IsZero() && candidate.signedAt.Before(current.signedAt.Add(-certs.MaxClockSkew)):
		return false, fmt.Errorf("%w: version %d is signed %s, version %d in force %s; sign version %d again",
			ErrBackdated, n.Version, candidate.signedAt.Format(time.RFC3339), c.Version, current.signedAt.Format(time.RFC3339), n.Version)
	}
	return true, nil
}
