package certs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// Files of a policy signer directory.
const (
	fileSignerCert = "signer.crt"
	fileSignerKey  = "signer.key"
	// fileSignerKeyPrev is the signer key being replaced, until its new
	// certificate is written.
	fileSignerKeyPrev = "signer.key.prev"
)

// PolicySigner is a key the CA certified for signing residency policies,
// with its certificate. It prints only its name.
type PolicySigner struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// NewPolicySigner makes a key, has the CA certify it as a policy signer
// called name, and returns it.
func (ca *CA) NewPolicySigner(name string, ttl time.Duration, now time.Time) (*PolicySigner, error) {
	key, err := GenerateNodeKey()
	if err != nil {
		return nil, err
	}
	cert, err := ca.IssuePolicySigner(name, key.Public(), ttl, now)
	if err != nil {
		return nil, err
	}
	return &PolicySigner{cert: cert, key: key}, nil
}

// Certificate returns the signer's certificate.
func (s *PolicySigner) Certificate() *x509.Certificate { return s.cert }

// Signer returns the key as a crypto.Signer that prints as [redacted].
func (s *PolicySigner) Signer() crypto.Signer { return signer{k: s.key} }

// Name is the signer's name (its certificate's common name).
func (s *PolicySigner) Name() string { return s.cert.Subject.CommonName }

func (s *PolicySigner) String() string {
	return fmt.Sprintf("policy signer %s (serial %s)", s.Name(), FormatSerial(s.cert.SerialNumber))
}

// Format prints the public identity only.
func (s *PolicySigner) Format(f fmt.State, _ rune) { fmt.Fprint(f, s.String()) }

// Save writes signer.crt and signer.key (0600) into dir; a signer it
// replaces stays usable if the save is cut short (replaceKeyPair).
func (s *PolicySigner) Save(dir string) error {
	if err := MkdirPrivate(dir); err != nil {
		return err
	}
	return replaceKeyPair(dir, fileSignerCert, fileSignerKey, fileSignerKeyPrev, s.key, s.cert, writeSignerCert)
}

// writeSignerCert writes signer.crt; tests make it fail, as a full disk
// would.
var writeSignerCert = atomicfile.WriteFile

// LoadPolicySigner reads a signer directory written by Save.
func LoadPolicySigner(dir string) (*PolicySigner, error) {
	cert, key, err := loadSavedKeyPair(dir, fileSignerCert, fileSignerKey, fileSignerKeyPrev)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no policy signer in %s: create one with `skybridge ca issue-signer --out %s`", dir, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("policy signer in %s: %w", dir, err)
	}
	return &PolicySigner{cert: cert, key: key}, nil
}
