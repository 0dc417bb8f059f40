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
	"path/filepath"
	"sync"
	"syscall"
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
// another user could change is refused (see keyDir), and one others may
// list or enter is said once a process: the keys in it are 0600, their
// names and number are not.
func MkdirPrivate(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if err := keyDir(dir, st); err != nil {
		return err
	}
	// One its group may write is said by keyDir, once is enough.
	if perm := st.Mode().Perm(); perm&0o077 != 0 && !groupWritable(st) {
		if _, said := looseDirs.LoadOrStore(dir, true); !said {
			slog.Warn("a directory holding keys is open to other users: they may see which keys it holds, though not read them (each is 0600, and refused if not); run chmod o-rwx on it, and g-rwx unless the gateway reads it through its group", "dir", dir, "mode", fmt.Sprintf("%04o", perm))
		}
	}
	return nil
}

var looseDirs sync.Map // of directories said to be open by MkdirPrivate

// keyDir refuses a directory of keys, or of the CA certificates they are
// trusted by, that another user could change: one any user may write
// (unless sticky, where only the owner of a file may replace it), or one
// of a user other than root or this one. Whoever may replace the files
// in it chooses the gateway's keys and the CAs it trusts. One its group
// may write is only said, once a process, as a state directory is: root's
// with the gateway's group, 0770, is how a service user is commonly let
// write its keys, and chmod 700 would lock it out. st is the directory's
// Stat.
func keyDir(dir string, st os.FileInfo) error {
	uid := os.Geteuid()
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Uid != 0 && int(sys.Uid) != uid {
		return fmt.Errorf("directory %s, which holds keys, belongs to user %d, neither this user's (uid %d) nor root: that user could replace the keys in it, and the CA certificate; run chown -R %d %s if the keys are this user's, or run this as user %d", dir, sys.Uid, uid, uid, dir, sys.Uid)
	}
	perm := st.Mode().Perm()
	if perm&0o002 != 0 && st.Mode()&os.ModeSticky == 0 {
		return fmt.Errorf("directory %s, which holds keys, may be written by any user (mode %04o): one could replace the keys in it, and the CA certificate; run chmod o-w %s", dir, perm, dir)
	}
	if groupWritable(st) {
		if _, said := groupDirs.LoadOrStore(dir, true); !said {
			slog.Warn("a directory holding keys may be written by its group: its members could replace the keys in it, and the CA certificate; run chmod g-w on it unless its group is the gateway's alone", "dir", dir, "mode", fmt.Sprintf("%04o", perm))
		}
	}
	return nil
}

var groupDirs sync.Map // of directories said by keyDir to be written by their group

// groupWritable says whether st, a directory, may be written by its
// group, to replace what is in it (not only add to it, if sticky).
func groupWritable(st os.FileInfo) bool {
	return st.Mode().Perm()&0o020 != 0 && st.Mode()&os.ModeSticky == 0
}

// ReadPrivateFile reads a file holding a secret and refuses it if other users
// could read it, as ssh does: a key that leaked is no identity. Its owner
// is judged only where others may write its directory: a secret may be
// another user's to write (Vault agent rewrites its token, 0600 and its
// own, for a gateway run as root), and whether a key could have been put
// there by another user is otherwise its directory's question (keyDir),
// which a gateway asks as it reads its trust bundle, before its keys. Nor
// need it be a file: a pipe (--join-token-file <(…), /dev/stdin) keeps a
// secret off the disk.
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
	// In a directory its group may write (only warned about, so that a
	// service group may write a root gateway's keys), the group's other
	// members could have put a secret of theirs there: one of a user
	// other than root or this one is refused. Sticky or not: that keeps
	// others from replacing a file, not from making one under a name not
	// there yet. The directory of the file itself too, where path is a
	// link.
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && st.Mode().IsRegular() && sys.Uid != 0 && int(sys.Uid) != os.Geteuid() {
		dirs := []string{filepath.Dir(path)}
		if real, err := filepath.EvalSymlinks(path); err == nil && filepath.Dir(real) != dirs[0] {
			dirs = append(dirs, filepath.Dir(real))
		}
		for _, dir := range dirs {
			if dst, err := os.Stat(dir); err != nil || dst.Mode().Perm()&0o022 != 0 {
				mode := "unknown"
				if err == nil {
					mode = fmt.Sprintf("%04o", dst.Mode().Perm())
				}
				return nil, fmt.Errorf("%s belongs to user %d, and others than its owner may write its directory %s (mode %s): whoever wrote it may have chosen it; chown it to the user that reads it (uid %d), or keep it in a directory its group and others may not write",
					path, sys.Uid, dir, mode, os.Geteuid())
			}
		}
	}
	return io.ReadAll(f)
}

// readCACert reads dir's ca.crt, which says which CAs the gateway trusts:
// whoever may change it, or replace it in its directory, adds theirs. So
// the directory is held to the rules of one of keys (keyDir), and the
// file must be root's or this user's, and written by its owner alone.
// (crl.pem needs no such care: a list counts only signed by a CA here.)
func readCACert(dir string) ([]byte, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	if err := keyDir(dir, st); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, fileCACert)
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st, err = f.Stat(); err != nil {
		return nil, err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	switch perm := st.Mode().Perm(); {
	case !st.Mode().IsRegular():
		return nil, fmt.Errorf("%s is not a file (mode %v)", path, st.Mode())
	case ok && sys.Uid != 0 && int(sys.Uid) != os.Geteuid():
		return nil, fmt.Errorf("%s belongs to user %d, neither this user's (uid %d) nor root: that user could put a CA of theirs in it; chown it to uid %d if it is meant for this user, or run as user %d", path, sys.Uid, os.Geteuid(), os.Geteuid(), sys.Uid)
	case perm&0o022 != 0:
		return nil, fmt.Errorf("%s may be written by users other than its owner (mode %04o): they could put a CA of theirs in it; run chmod 644 %s", path, perm, path)
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
