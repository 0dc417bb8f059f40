package certs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// NodeIdentity is a gateway's certificate together with its private key.
// Printing or logging it shows who it is, never the key.
type NodeIdentity struct {
	cert  *x509.Certificate
	key   *ecdsa.PrivateKey
	attrs *Attributes
}

// GenerateNodeKey makes a new gateway key (ECDSA P-256).
func GenerateNodeKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate node key: %w", err)
	}
	return k, nil
}

// NewNodeIdentity pairs a certificate with its key, checking they match.
func NewNodeIdentity(cert *x509.Certificate, key *ecdsa.PrivateKey) (*NodeIdentity, error) {
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("private key does not belong to the certificate")
	}
	attrs, err := AttributesOf(cert)
	if err != nil {
		return nil, err
	}
	return &NodeIdentity{cert: cert, key: key, attrs: attrs}, nil
}

// CreateCSR makes a certificate signing request for attrs with key, for a
// CA that signs CSRs (Vault's pki/sign, or `skybridge ca issue --csr`). The
// key never leaves the gateway.
func CreateCSR(key *ecdsa.PrivateKey, attrs Attributes) ([]byte, error) {
	return createCSR(key, attrs, false)
}

// createCSR is CreateCSR, with the overlay IP in the attribute URI if
// pinIP (Attributes.PinnedURI): Vault checks the CSR's URIs against the
// role too.
func createCSR(key *ecdsa.PrivateKey, attrs Attributes, pinIP bool) ([]byte, error) {
	attrs.Normalize()
	uri := attrs.URI()
	if pinIP {
		uri = attrs.PinnedURI()
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:     pkix.Name{CommonName: attrs.Node},
		URIs:        []*url.URL{uri},
		IPAddresses: []net.IP{attrs.OverlayIP.AsSlice()},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("create CSR: %w", err)
	}
	return encodePEM(pemCSR, der), nil
}

// PrepareCSR is the gateway's half of CSR issuance: it creates the node key
// in dir (0600) unless one is already there, and returns a CSR for attrs
// signed with it. Re-running it never replaces a key.
func PrepareCSR(dir string, attrs Attributes) ([]byte, error) {
	path := filepath.Join(dir, fileNodeKey)
	var key *ecdsa.PrivateKey
	b, err := ReadPrivateFile(path)
	switch {
	case err == nil:
		if key, err = parseKeyPEM(b); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	case errors.Is(err, os.ErrNotExist):
		if key, err = GenerateNodeKey(); err != nil {
			return nil, err
		}
		keyPEM, err := marshalKeyPEM(key)
		if err != nil {
			return nil, err
		}
		if err := MkdirPrivate(dir); err != nil {
			return nil, err
		}
		if err := atomicfile.WriteNew(path, keyPEM, 0o600); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("read node key: %w", err)
	}
	return CreateCSR(key, attrs)
}

// ParseCSR parses a PEM CSR, checks its self-signature and returns the
// request and the attributes it asks for.
func ParseCSR(b []byte) (*x509.CertificateRequest, *Attributes, error) {
	blk := decodePEMBlock(b, pemCSR)
	if blk == nil {
		return nil, nil, errors.New("no PEM CERTIFICATE REQUEST block found")
	}
	csr, err := x509.ParseCertificateRequest(blk)
	if err != nil {
		return nil, nil, fmt.Errorf("parse CSR: %w", err)
	}
	if err := CheckNodeKey(csr.PublicKey); err != nil {
		return nil, nil, fmt.Errorf("CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, nil, fmt.Errorf("CSR signature does not verify: %w", err)
	}
	tmp := &x509.Certificate{Subject: csr.Subject, URIs: csr.URIs, IPAddresses: csr.IPAddresses}
	attrs, err := AttributesOf(tmp)
	if err != nil {
		return nil, nil, fmt.Errorf("CSR: %w", err)
	}
	return csr, attrs, nil
}

// Certificate returns the gateway certificate.
func (id *NodeIdentity) Certificate() *x509.Certificate { return id.cert }

// Attributes returns the certified attributes.
func (id *NodeIdentity) Attributes() *Attributes { return id.attrs }

// Fingerprint is the SHA-256 of the certificate, which adverts reference.
func (id *NodeIdentity) Fingerprint() [32]byte { return sha256.Sum256(id.cert.Raw) }

// Signer returns the private key as a crypto.Signer, for TLS or signing
// adverts. The signer prints as [redacted].
func (id *NodeIdentity) Signer() crypto.Signer { return signer{k: id.key} }

// TLSCertificate returns the identity for mutual TLS between gateways.
func (id *NodeIdentity) TLSCertificate() tls.Certificate {
	return tls.Certificate{Certificate: [][]byte{id.cert.Raw}, PrivateKey: signer{k: id.key}, Leaf: id.cert}
}

func (id *NodeIdentity) String() string {
	return fmt.Sprintf("node %s of site %s (serial %s, valid until %s)", id.attrs.Node, id.attrs.Site,
		FormatSerial(id.cert.SerialNumber), id.cert.NotAfter.UTC().Format(time.RFC3339))
}

// Format prints the public identity only.
func (id *NodeIdentity) Format(f fmt.State, _ rune) { fmt.Fprint(f, id.String()) }

// LogValue logs the public identity only.
func (id *NodeIdentity) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("node", id.attrs.Node),
		slog.String("site", id.attrs.Site),
		slog.String("serial", FormatSerial(id.cert.SerialNumber)),
		slog.Time("not_after", id.cert.NotAfter),
	)
}

// writeNodeCert writes node.crt; tests make it fail, as a full disk would.
var writeNodeCert = atomicfile.WriteFile

// Save writes the identity into dir: node.crt, node.key (0600) and the CA
// bundle ca.crt (plus crl.pem if tb has one). Each file is replaced
// atomically.
func (id *NodeIdentity) Save(dir string, tb *TrustBundle) error {
	if err := MkdirPrivate(dir); err != nil {
		return fmt.Errorf("create identity directory: %w", err)
	}
	if err := replaceKeyPair(dir, fileNodeCert, fileNodeKey, fileNodeKeyPrev, id.key, id.cert, writeNodeCert); err != nil {
		return err
	}
	if tb != nil {
		if err := tb.Save(dir); err != nil {
			return err
		}
	}
	return nil
}

// Save writes ca.crt and, if the bundle has one, crl.pem into dir.
func (tb *TrustBundle) Save(dir string) error {
	if err := MkdirPrivate(dir); err != nil {
		return fmt.Errorf("create identity directory: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, fileCACert), tb.CAPEM(), 0o644); err != nil {
		return err
	}
	// After ca.crt: a crash between the two leaves lists of CAs the
	// bundle no longer holds, which loading keeps aside, rather than a CA
	// without its list. The lists of retired CAs are kept too, after the
	// others.
	if crls := append(tb.CRLs(), tb.RetiredCRLs()...); len(crls) > 0 {
		var b []byte
		for _, c := range crls {
			b = append(b, encodePEM(pemCRL, c.Raw)...)
		}
		if err := atomicfile.WriteFile(filepath.Join(dir, fileCRL), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// SaveCertificate writes a certificate signed for a CSR (whose key stays
// where the CSR was made) into dir, with the trust bundle.
func SaveCertificate(dir string, cert *x509.Certificate, tb *TrustBundle) error {
	if tb != nil {
		if err := tb.Save(dir); err != nil {
			return err
		}
	}
	return atomicfile.WriteFile(filepath.Join(dir, fileNodeCert), encodePEM(pemCert, cert.Raw), 0o644)
}

// CheckKeyFor refuses a directory whose node key is not the one pub
// belongs to: a certificate for a CSR made elsewhere, saved there, would
// sit beside a key that cannot use it, and the identity in it would be
// lost. A directory without a key is fine: the key stays where the CSR
// was made.
func CheckKeyFor(dir string, pub crypto.PublicKey) error {
	path := filepath.Join(dir, fileNodeKey)
	b, err := ReadPrivateFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read node key: %w", err)
	}
	key, err := parseKeyPEM(b)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if !key.PublicKey.Equal(pub) {
		return fmt.Errorf("%s holds a node key that is not the CSR's: the certificate would not fit it, and the identity there would be lost; name the directory the CSR was made in, or an empty one", dir)
	}
	return nil
}

// NodeCertifiedIn names the node whose certificate dir holds (node.crt),
// or is "" when it holds none that parses. It reads the certificate alone:
// a key that cannot be read beside it (a mode too loose, a key kept where
// its CSR was made) says nothing of whose directory it is.
func NodeCertifiedIn(dir string) string {
	c := certificateIn(dir, fileNodeCert)
	if c == nil {
		return ""
	}
	if a, err := AttributesOf(c); err == nil {
		return a.Node
	}
	return c.Subject.CommonName
}

// SignerCertifiedIn names the policy signer whose certificate dir holds
// (signer.crt), as NodeCertifiedIn does for a node.
func SignerCertifiedIn(dir string) string {
	if c := certificateIn(dir, fileSignerCert); c != nil {
		return c.Subject.CommonName
	}
	return ""
}

func certificateIn(dir, file string) *x509.Certificate {
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return nil
	}
	cs, err := ParseCertificatesPEM(b)
	if err != nil || len(cs) == 0 {
		return nil
	}
	return cs[0]
}

// Holds reports whether cert is the certificate in dir: whether a save
// that failed had delivered it anyway.
func Holds(dir string, cert *x509.Certificate) bool {
	c := certificateIn(dir, fileNodeCert)
	return c != nil && c.Equal(cert)
}

// Fingerprint is the SHA-256 of a certificate in hex, as `openssl x509
// -fingerprint -sha256` shows it (without colons).
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return hex.EncodeToString(sum[:])
}

// replaceKeyPair writes a key and its certificate into dir. The key goes
// first, the one it replaces kept in prevFile until the certificate
// follows: a crash or a full disk between the two writes leaves the new
// key beside the old certificate, and loadSavedKeyPair then takes the old
// pair, still valid, rather than leave a certificate whose key was lost.
func replaceKeyPair(dir, certFile, keyFile, prevFile string, key *ecdsa.PrivateKey, cert *x509.Certificate, writeCert func(string, []byte, os.FileMode) error) error {
	keyPEM, err := marshalKeyPEM(key)
	if err != nil {
		return err
	}
	keyPath, prevPath := filepath.Join(dir, keyFile), filepath.Join(dir, prevFile)
	// Only a key that fits the certificate beside it is worth keeping: an
	// orphan of an earlier cut-short save is not, and would push out the
	// one that is.
	if _, old, err := loadKeyPair(dir, certFile, keyFile); err == nil && !old.Equal(key) {
		oldPEM, err := marshalKeyPEM(old)
		if err != nil {
			return err
		}
		if err := atomicfile.WriteFile(prevPath, oldPEM, 0o600); err != nil {
			return fmt.Errorf("keep the key being replaced: %w", err)
		}
	}
	if err := atomicfile.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		return err
	}
	if err := writeCert(filepath.Join(dir, certFile), encodePEM(pemCert, cert.Raw), 0o644); err != nil {
		return err
	}
	if err := os.Remove(prevPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove the replaced key: %w", err)
	}
	return nil
}

// loadSavedKeyPair reads a pair written by replaceKeyPair: certFile and
// keyFile — or, if a save was cut short between the key and the
// certificate, certFile and the key it replaced. It leaves prevFile, even
// beside a pair that fits: a save may have written it and not yet the
// new key, and it is all that save leaves to fall back on should its
// certificate then fail. The next save replaces one a crash left.
func loadSavedKeyPair(dir, certFile, keyFile, prevFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cert, key, err := loadKeyPair(dir, certFile, keyFile)
	if errors.Is(err, errKeyMismatch) {
		if c, k, perr := loadKeyPair(dir, certFile, prevFile); perr == nil {
			slog.Warn(keyFile+" does not fit "+certFile+" (a save was cut short): using the key it was to replace, which does; a renewal replaces both", "dir", dir)
			return c, k, nil
		}
	}
	return cert, key, err
}

// LoadNodeIdentity reads node.crt and node.key from dir — or, if a save
// was cut short between the key and the certificate, node.crt and the key
// it replaced.
func LoadNodeIdentity(dir string) (*NodeIdentity, error) {
	clearStaleTemps(dir)
	cert, key, err := loadSavedKeyPair(dir, fileNodeCert, fileNodeKey, fileNodeKeyPrev)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no node identity in %s: issue one with `skybridge ca issue ... --out %s`", dir, dir)
	}
	if err != nil {
		return nil, identityError(dir, err)
	}
	return NewNodeIdentity(cert, key)
}

// clearStaleTemps removes the temporaries of the identity's files that
// writes killed midway (kill -9, a crash) left in dir: copies of its keys
// that nothing else removed but a burst's end. Their writers hold no lock
// in common (the gateway obtaining its certificate, `ca issue --out`, an
// enrollment, a copy of Vault's secrets), so only those staleTemp old go,
// which no write under way can be. A removal that fails is said, unless
// refused (a reader that is not the owner: the owner's next load clears
// them); the identity is read all the same.
func clearStaleTemps(dir string) {
	err := atomicfile.RemoveTemps(dir, staleTemp, append([]string{fileCACert, fileCRL}, identitySecrets...)...)
	if err != nil && !errors.Is(err, fs.ErrPermission) {
		slog.Warn("files a write cut short left in the identity directory could not be removed, copies of its keys: remove them by hand", "dir", dir, "err", err)
	}
}

// identityError says what to do about an identity directory that could
// not be read. Not being allowed to read it is no sign of damage: the
// advice for damage (replace what is there) would destroy a good identity.
func identityError(dir string, err error) error {
	if errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("identity in %s: %w: check the owner and mode of the directory and its files, or run this as the gateway's user", dir, err)
	}
	return fmt.Errorf("identity in %s: %w; restore the directory from a backup, or issue a new identity into it (`skybridge ca issue ... --out %s`; a gateway with an issuer configured obtains one itself once node.crt and node.key are moved aside)", dir, err, dir)
}

var errKeyMismatch = errors.New("a key that is not the certificate's")

// loadKeyPair reads a PEM certificate and its 0600 private key from dir and
// checks that they belong together. A missing certificate is reported as
// os.ErrNotExist so callers can say how to create one.
func loadKeyPair(dir, certFile, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, certFile))
	if err != nil {
		return nil, nil, err
	}
	certs, err := ParseCertificatesPEM(certPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", certFile, err)
	}
	keyPEM, err := ReadPrivateFile(filepath.Join(dir, keyFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("%s is missing next to %s", keyFile, certFile)
		}
		return nil, nil, err
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", keyFile, err)
	}
	if !key.PublicKey.Equal(certs[0].PublicKey) {
		return nil, nil, fmt.Errorf("%s does not belong to %s: %w", keyFile, certFile, errKeyMismatch)
	}
	return certs[0], key, nil
}

// IssueIdentity generates a key, has the CA sign it, and returns the
// identity: the embedded CA's one-step path for `skybridge ca issue`.
func (ca *CA) IssueIdentity(attrs Attributes, ttl time.Duration, now time.Time) (*NodeIdentity, error) {
	key, err := GenerateNodeKey()
	if err != nil {
		return nil, err
	}
	cert, err := ca.Issue(IssueRequest{Attributes: attrs, PublicKey: key.Public(), TTL: ttl, Now: now})
	if err != nil {
		return nil, err
	}
	return NewNodeIdentity(cert, key)
}
