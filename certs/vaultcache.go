package certs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// VaultSecrets is a Vault-backed gateway's SecretStore. Vault holds the
// WireGuard key and the gossip keyring; every value read from it or
// written to it is also kept in the identity directory, in the file
// store's files (0600), beside the node key and certificate that are
// there anyway. A gateway that restarts while Vault cannot be reached
// (VaultUnreachable) starts from those; a refusal from Vault is returned
// as it is, never answered from disk.
//
// The copy on disk adds nothing a reader of the directory could not
// already do: the node key there lets it pass as the gateway.
type VaultSecrets struct {
	*Vault
	dir string
	// fromDisk is set once a value has been served from the directory
	// because Vault could not be reached.
	fromDisk atomic.Bool
}

var _ SecretStore = (*VaultSecrets)(nil)

// ServedFromDisk reports whether a value has been served from the
// identity directory because Vault could not be reached: the gossip
// keyring may then be behind the mesh's, and the gateway reads it again
// (GossipKeyringFromVault) once Vault answers.
func (s *VaultSecrets) ServedFromDisk() bool { return s.fromDisk.Load() }

// WireGuardKey implements SecretStore.
func (s *VaultSecrets) WireGuardKey(ctx context.Context, node string) (WGPrivateKey, error) {
	k, err := s.Vault.WireGuardKey(ctx, node)
	if err == nil {
		s.keep(FileWireGuardKey, []byte(k.Base64Secret()+"\n"))
		return k, nil
	}
	if !VaultUnreachable(err) {
		return WGPrivateKey{}, err
	}
	path := filepath.Join(s.dir, FileWireGuardKey)
	b, rerr := ReadPrivateFile(path)
	if rerr != nil {
		return WGPrivateKey{}, s.noCopy(err, "WireGuard key", rerr)
	}
	k, perr := ParseWGPrivateKey(string(b))
	if perr != nil {
		return WGPrivateKey{}, fmt.Errorf("%w; and the copy kept in %s: %v", err, path, perr)
	}
	s.servedFromDisk("WireGuard key", err)
	return k, nil
}

// SetWireGuardKey implements SecretStore: Vault first, then the copy, so
// that a restart without Vault does not bring back the old key.
func (s *VaultSecrets) SetWireGuardKey(ctx context.Context, node string, k WGPrivateKey) error {
	if err := s.Vault.SetWireGuardKey(ctx, node, k); err != nil {
		return err
	}
	s.keep(FileWireGuardKey, []byte(k.Base64Secret()+"\n"))
	return nil
}

// GossipKeyring implements SecretStore.
func (s *VaultSecrets) GossipKeyring(ctx context.Context) (*GossipKeyring, error) {
	kr, err := s.GossipKeyringFromVault(ctx)
	if err == nil || !VaultUnreachable(err) {
		return kr, err
	}
	kr, rerr := (DirSecrets{Dir: s.dir}).GossipKeyring(ctx)
	if rerr != nil {
		return nil, s.noCopy(err, "gossip keyring", rerr)
	}
	s.servedFromDisk("gossip keyring", err)
	return kr, nil
}

// GossipKeyringFromVault is GossipKeyring without the copy on disk: an
// error when Vault cannot be reached.
func (s *VaultSecrets) GossipKeyringFromVault(ctx context.Context) (*GossipKeyring, error) {
	kept, _ := (DirSecrets{Dir: s.dir}).GossipKeyring(ctx) // none on a first start
	kr, err := s.Vault.gossipKeyring(ctx, kept)
	if err != nil {
		return nil, err
	}
	s.keep(FileGossipKeyring, kr.MarshalSecret())
	return kr, nil
}

// UpdateGossipKeyring implements SecretStore: Vault's check-and-set loop,
// then the copy of what Vault holds at its end.
func (s *VaultSecrets) UpdateGossipKeyring(ctx context.Context, update func(*GossipKeyring) (*GossipKeyring, error)) error {
	var last *GossipKeyring
	err := s.Vault.UpdateGossipKeyring(ctx, func(cur *GossipKeyring) (*GossipKeyring, error) {
		next, err := update(cur)
		last = next
		return next, err
	})
	if err != nil {
		return err
	}
	s.keep(FileGossipKeyring, last.MarshalSecret())
	return nil
}

// keep writes what Vault holds (read, or just written) into the
// directory unless it is there already. Vault has it, so a failure here
// is logged, not returned: it costs only a start without Vault. The old
// copy is removed then, so that such a start fails and says why rather
// than bringing back a key Vault no longer holds.
func (s *VaultSecrets) keep(name string, b []byte) {
	path := filepath.Join(s.dir, name)
	if cur, err := ReadPrivateFile(path); err == nil && bytes.Equal(cur, b) {
		return
	}
	err := MkdirPrivate(s.dir)
	if err == nil {
		err = atomicfile.WriteFile(path, b, 0o600)
	}
	if err == nil {
		return
	}
	if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		s.log.Error("could not update the copy of a vault secret kept on disk, nor remove it: a start while vault is unreachable would use the old value; remove the file", "file", path, "err", err, "remove_err", rerr)
		return
	}
	s.log.Warn("could not keep a copy of a vault secret on disk: a start while vault is unreachable would fail", "file", path, "err", err)
}

func (s *VaultSecrets) servedFromDisk(what string, err error) {
	s.fromDisk.Store(true)
	s.log.Warn("vault unreachable: using the "+what+" kept on disk", "dir", s.dir, "err", err)
}

// noCopy is the error of a value Vault cannot give and the directory
// does not hold.
func (s *VaultSecrets) noCopy(vaultErr error, what string, readErr error) error {
	if errors.Is(readErr, os.ErrNotExist) {
		return fmt.Errorf("%w; no %s is kept in %s either (a gateway keeps one from its first start with vault on), so this start needs vault: bring it back or check the address and network", vaultErr, what, s.dir)
	}
	return fmt.Errorf("%w; and the %s kept in %s: %v", vaultErr, what, s.dir, readErr)
}
