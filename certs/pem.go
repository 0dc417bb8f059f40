package certs

import (
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
)

const (
	pemCert = "CERTIFICATE"
	pemKey  = "PRIVATE KEY"
	pemCRL  = "X509 CRL"
	pemCSR  = "CERTIFICATE REQUEST"
)

func encodePEM(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// ParseCertificatesPEM parses every CERTIFICATE block in b.
func ParseCertificatesPEM(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != pemCert {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block found")
	}
	return out, nil
}

func marshalKeyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return encodePEM(pemKey, der), nil
}

func parseKeyPEM(b []byte) (*ecdsa.PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM block found")
	}
	var (
		k   any
		err error
	)
	switch blk.Type {
	case pemKey:
		k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(blk.Bytes)
	default:
		return nil, fmt.Errorf("PEM block is %q, want %q", blk.Type, pemKey)
	}
	if err != nil {
		return nil, fmt.Errorf("parse private key: %w", err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("private key is %T; skybridge identities use ECDSA P-256", k)
	}
	return ek, nil
}

// MkdirPrivate makes dir, for keys, 0700. A directory that was there
// already keeps its mode (it may be the operator's, and shared), but one
// other users may list or enter is said once a process: the keys in it are
// 0600, their names and number are not.
func MkdirPrivate(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		if _, said := looseDirs.LoadOrStore(dir, true); !said {
			slog.Warn("a directory holding keys is open to other users (the keys in it are not): run chmod 700 on it", "dir", dir, "mode", fmt.Sprintf("%04o", perm))
		}
	}
	return nil
}

var looseDirs sync.Map // of directories said to be open by MkdirPrivate

// ReadPrivateFile reads a file holding a secret and refuses it if other users
// could read it, as ssh does: a key that leaked is no identity.
func ReadPrivateFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%s is accessible by other users (mode %04o): run chmod 600 %s", path, perm, path)
	}
	return io.ReadAll(f)
}

// decodePEMBlock returns the bytes of the first block of type typ, or nil.
func decodePEMBlock(b []byte, typ string) []byte {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil
		}
		if blk.Type == typ {
			return blk.Bytes
		}
	}
}
