package certs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// Files of a policy signer directory.
const (
	fileSignerCert = "signer.crt"
	fileSignerKey  = "signer.key"
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

// Save writes signer.crt and signer.key (0600) into dir.
func (s *PolicySigner) Save(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	keyPEM, err := marshalKeyPEM(s.key)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, fileSignerKey), keyPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, fileSignerCert), encodePEM(pemCert, s.cert.Raw), 0o644)
}

// LoadPolicySigner reads a signer directory written by Save.
func LoadPolicySigner(dir string) (*PolicySigner, error) {
	cert, key, err := loadKeyPair(dir, fileSignerCert, fileSignerKey)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no policy signer in %s: create one with `skybridge ca issue-signer --out %s`", dir, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("policy signer in %s: %w", dir, err)
	}
	return &PolicySigner{cert: cert, key: key}, nil
}
