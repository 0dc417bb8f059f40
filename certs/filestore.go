package certs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// Files of the file secret store.
const (
	FileWireGuardKey  = "wireguard.key"
	FileGossipKeyring = "gossip.keyring"
	// The AppRole login a Vault burst join leaves (the SecretID 0600).
	FileVaultRoleID   = "vault-role-id"
	FileVaultSecretID = "vault-secret-id"
)

// HasNodeCertificate reports whether dir holds a gateway certificate.
func HasNodeCertificate(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, fileNodeCert))
	return err == nil
}

// DirSecrets is the file-backed SecretStore: 0600 files in a gateway's
// state directory. The gossip keyring is shared by the whole mesh, so it is
// never invented here; `skybridge ca init` creates it and `skybridge ca
// issue` hands it out with each identity.
type DirSecrets struct{ Dir string }

var _ SecretStore = DirSecrets{}

// WireGuardKey implements SecretStore.
func (d DirSecrets) WireGuardKey(_ context.Context, node string) (WGPrivateKey, error) {
	path := filepath.Join(d.Dir, FileWireGuardKey)
	for range 2 {
		b, err := ReadPrivateFile(path)
		if err == nil {
			k, err := ParseWGPrivateKey(string(b))
			if err != nil {
				return WGPrivateKey{}, fmt.Errorf("%s: %w; restore it from a backup, or move it aside for a new key (peers learn it from the gateway's next advert; `skybridge keys rotate-wg` is the way without a gap)", path, err)
			}
			return k, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return WGPrivateKey{}, fmt.Errorf("read WireGuard key: %w", err)
		}
		k, err := GenerateWGKey()
		if err != nil {
			return WGPrivateKey{}, err
		}
		if err := MkdirPrivate(d.Dir); err != nil {
			return WGPrivateKey{}, err
		}
		// WriteNew: if another process created the key meanwhile, loop
		// and use theirs, so one node never ends up with two keys.
		err = atomicfile.WriteNew(path, []byte(k.Base64Secret()+"\n"), 0o600)
		if err == nil {
			return k, nil
		}
		if !errors.Is(err, os.ErrExist) {
			return WGPrivateKey{}, fmt.Errorf("store WireGuard key: %w", err)
		}
	}
	return WGPrivateKey{}, fmt.Errorf("WireGuard key %s keeps changing under us", path)
}

// SetWireGuardKey implements SecretStore: the file is replaced atomically
// (0600), never left half-written.
func (d DirSecrets) SetWireGuardKey(_ context.Context, _ string, k WGPrivateKey) error {
	if err := atomicfile.WriteFile(filepath.Join(d.Dir, FileWireGuardKey), []byte(k.Base64Secret()+"\n"), 0o600); err != nil {
		return fmt.Errorf("store WireGuard key: %w", err)
	}
	return nil
}

// GossipKeyring implements SecretStore.
func (d DirSecrets) GossipKeyring(context.Context) (*GossipKeyring, error) {
	path := filepath.Join(d.Dir, FileGossipKeyring)
	b, err := ReadPrivateFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no gossip keyring at %s: every gateway of a mesh needs the same one; `skybridge ca issue --out %s` copies it from the CA directory", path, d.Dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read gossip keyring: %w", err)
	}
	kr, err := ParseGossipKeyring(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return kr, nil
}

// UpdateGossipKeyring implements SecretStore.
func (d DirSecrets) UpdateGossipKeyring(ctx context.Context, update func(*GossipKeyring) (*GossipKeyring, error)) error {
	unlock, err := lockFile(filepath.Join(d.Dir, ".gossip.lock"))
	if err != nil {
		return err
	}
	defer unlock()
	cur, err := d.GossipKeyring(ctx)
	if err != nil {
		return err
	}
	next, err := update(cur)
	if err != nil {
		return err
	}
	if next.Same(cur) {
		return nil
	}
	return atomicfile.WriteFile(filepath.Join(d.Dir, FileGossipKeyring), next.MarshalSecret(), 0o600)
}

// lockFile takes an exclusive advisory lock, for read-modify-write cycles
// shared with other processes (two `skybridge` commands at once). It
// blocks in the kernel, so that the CA's index, locked for every
// certificate a burst's enrolments issue, passes from one to the next at
// once; lockFileContext polls, to give up. Once held, what a holder
// killed mid-write left goes (clearLeftovers).
func lockFile(path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	clearLeftovers(path)
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

// lockFileContext is lockFile that gives up when ctx ends: the lock's
// holder may be a process stopped (Ctrl-Z) or waiting for an issuer that
// does not answer, and a gateway stopping must not wait for it.
func lockFileContext(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			clearLeftovers(path)
			return func() {
				syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("another renewal of this identity holds %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// staleTemp is the age past which a write's temporary file is taken for
// one a crash left: a write lasts as long as an fsync, and one stalled
// longer (its process stopped) only fails at its rename, leaving the file
// it was to replace as it was.
const staleTemp = time.Hour

// clearLeftovers removes, once the lock at path is held, what holders of
// it killed mid-write (kill -9, a crash) left beside it, which nothing
// else removes: the temporaries of the files that are written under that
// lock alone, so that none can be a write under way — the CA's index,
// revocation list and archive under the CA's lock (a copy of the index
// each), a renewal's key under the renewal lock. The CA directory's
// gossip keyring is written under a lock of its own: its temporaries go
// once staleTemp old. A removal that fails is said; the lock's holder
// goes on.
func clearLeftovers(lock string) {
	dir := filepath.Dir(lock)
	var err error
	switch filepath.Base(lock) {
	case fileLock:
		err = errors.Join(atomicfile.RemoveTemps(dir, 0, fileIndex, fileCRL, fileArchive),
			atomicfile.RemoveTemps(dir, staleTemp, FileGossipKeyring), removeDeadInits(dir))
	case fileRenewLock:
		err = atomicfile.RemoveTemps(dir, 0, fileNodeKeyNext)
	}
	if err != nil {
		slog.Warn("files a write cut short left could not be removed, copies of what they were to replace: remove them by hand", "dir", dir, "err", err)
	}
}

// removeDeadInits removes the directories `ca init --dir DIR` writes a
// new CA in beside DIR (.DIR.init-N), left by inits killed before they
// moved it into place: each holds the key of a CA that never was.
// InitCA removes them at the next init of DIR, which never comes once
// DIR holds a CA (it is refused). Once it does, no init of DIR can finish
// (its rename fails on a directory that is not empty): one beside it is
// dead, or doomed; those staleTemp old go, which no init still runs in.
func removeDeadInits(dir string) error {
	if _, err := os.Lstat(filepath.Join(dir, fileCAKey)); err != nil {
		return nil
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil
	}
	parent, prefix := filepath.Dir(abs), "."+filepath.Base(abs)+".init-"
	ents, err := os.ReadDir(parent)
	if err != nil {
		return nil // a parent we may not list holds nothing of ours we could see
	}
	var errs []error
	for _, e := range ents {
		n, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok || n == "" || strings.Trim(n, "0123456789") != "" || !e.IsDir() {
			continue
		}
		if fi, err := e.Info(); err != nil || time.Since(fi.ModTime()) < staleTemp {
			continue
		}
		if err := os.RemoveAll(filepath.Join(parent, e.Name())); err != nil {
			errs = append(errs, fmt.Errorf("remove %s, left by a `ca init` that never finished: %w", filepath.Join(parent, e.Name()), err))
		}
	}
	return errors.Join(errs...)
}

// ForgetIdentity removes a gateway's identity and secrets from dir (node
// key and certificate, WireGuard key, gossip keyring): what a burst
// gateway does when its site ends, so nothing that could rejoin the mesh
// is left on a rented server. The CA certificate and CRL stay; they are
// public. Missing files are not an error. Temporary files a crash left
// while writing one of them go too: they may hold the same secrets.
func ForgetIdentity(dir string) error {
	var errs []error
	for _, name := range identitySecrets {
		temps, _ := filepath.Glob(filepath.Join(dir, atomicfile.TempPattern(name)))
		for _, path := range append(temps, filepath.Join(dir, name)) {
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) == 0 {
		if err := atomicfile.SyncDir(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// identitySecrets are the files of an identity directory that hold a
// secret, or say whose it is.
var identitySecrets = []string{fileNodeKey, fileNodeKeyPrev, fileNodeKeyNext, fileNodeCert, FileWireGuardKey, FileGossipKeyring, FileVaultSecretID, FileVaultRoleID}

// SaveGossipKeyring writes the mesh's gossip keyring into dir (0600), as
// an enrolled gateway receives it.
func SaveGossipKeyring(dir string, kr *GossipKeyring) error {
	if err := MkdirPrivate(dir); err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(dir, FileGossipKeyring), kr.MarshalSecret(), 0o600)
}
