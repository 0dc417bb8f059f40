package mesh

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// Files in the state directory. Everything is written atomically; the
// directory survives restarts and SIGTERM.
const (
	fileAdvertVersion = "advert.version"
	fileMembers       = "members.json"
	fileAdoptedPolicy = "policy.adopted.json"
	fileWithdrawn     = "policy.withdrawn.json"
	filePolicy        = "policy.hcl"     // before policy.adopted.json
	filePolicySig     = "policy.hcl.sig" // before policy.adopted.json
)

// stateDir is the gateway's persistent state.
type stateDir string

func (d stateDir) path(name string) string { return filepath.Join(string(d), name) }

// nextAdvertVersion returns a version strictly above any used before,
// even across restarts and lost state files: the largest of the stored
// version + 1, last + 1 (the last this run signed) and the current time in
// milliseconds. Always a version: a stored one that cannot be read or
// written (a damaged file, a full disk) is reported in warn, and last and
// the clock keep versions rising — refusing to sign instead would leave
// the advert, and a renewed certificate in it, unannounced. (Without last,
// a file not kept and a clock gone back gave one version twice, which
// peers refuse as a forgery.)
func (d stateDir) nextAdvertVersion(nowMillis, last uint64) (v uint64, warn error) {
	var stored uint64
	b, err := os.ReadFile(d.path(fileAdvertVersion))
	switch {
	case err == nil:
		if stored, err = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err != nil {
			warn = fmt.Errorf("%s is damaged: %w", d.path(fileAdvertVersion), err)
		}
	case !errors.Is(err, os.ErrNotExist):
		warn = err
	}
	v = max(stored+1, last+1, nowMillis)
	if err := atomicfile.WriteFile(d.path(fileAdvertVersion), []byte(strconv.FormatUint(v, 10)+"\n"), 0o644); err != nil {
		warn = errors.Join(warn, err)
	}
	return v, warn
}

// savedMember is a member as persisted: enough to re-verify it and to knock
// on its door after a restart.
type savedMember struct {
	Name   string         `json:"name"`
	Gossip netip.AddrPort `json:"gossip"`
	Alive  bool           `json:"alive"`          // verified and alive when saved: keep its tunnel across a restart
	Left   bool           `json:"left,omitempty"` // dead after leaving on purpose: its site is not missed
	Advert []byte         `json:"advert,omitempty"`
	Cert   []byte         `json:"cert,omitempty"`
}

func (d stateDir) saveMembers(ms []savedMember) error {
	return atomicfile.WriteJSON(d.path(fileMembers), ms, 0o600)
}

func (d stateDir) loadMembers() ([]savedMember, error) {
	var ms []savedMember
	if _, err := atomicfile.ReadJSON(d.path(fileMembers), &ms); errors.Is(err, atomicfile.ErrDamaged) {
		return nil, fmt.Errorf("%w; it will be rewritten", err)
	} else if err != nil {
		return nil, err
	}
	return ms, nil
}

// storedPolicy is the policy in force and its signature, kept in one
// file: written as two, a crash between them left a signature beside the
// policy it does not sign, and the gateway started without the policy.
type storedPolicy struct {
	Policy    []byte `json:"policy"`
	Signature []byte `json:"signature"`
}

func (d stateDir) savePolicy(src, sig []byte) error {
	if err := atomicfile.WriteJSON(d.path(fileAdoptedPolicy), storedPolicy{Policy: src, Signature: sig}, 0o644); err != nil {
		return err
	}
	// Where releases before it kept them: never read again.
	os.Remove(d.path(filePolicy))
	os.Remove(d.path(filePolicySig))
	return nil
}

// withdrawnPolicy names the newest policy withdrawn by its signer's
// revocation (Gateway.withdrawn).
type withdrawnPolicy struct {
	Name    string `json:"name"`
	Version int64  `json:"version"`
	// SHA256 is the withdrawn policy's own: the policy this gateway
	// withdrew is the one it may keep after a restart should its
	// signer's CA be retired, not another of the same name and version.
	// Releases before the twelfth of 2026-11-28 wrote none: then name
	// and version are all there is to go by, and the hash is filled in.
	SHA256 string `json:"sha256,omitempty"`
}

func (d stateDir) saveWithdrawn(w withdrawnPolicy) error {
	return atomicfile.WriteJSON(d.path(fileWithdrawn), w, 0o644)
}

func (d stateDir) loadWithdrawn() (w withdrawnPolicy, err error) {
	_, err = atomicfile.ReadJSON(d.path(fileWithdrawn), &w)
	return w, err
}

func (d stateDir) loadPolicy() (src, sig []byte, err error) {
	var sp storedPolicy
	found, err := atomicfile.ReadJSON(d.path(fileAdoptedPolicy), &sp)
	if err != nil {
		return nil, nil, err
	}
	if found {
		return sp.Policy, sp.Signature, nil
	}
	src, err = os.ReadFile(d.path(filePolicy))
	if err != nil {
		return nil, nil, err
	}
	sig, err = os.ReadFile(d.path(filePolicySig))
	return src, sig, err
}
