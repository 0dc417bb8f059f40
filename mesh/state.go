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
	filePolicy        = "policy.hcl"
	filePolicySig     = "policy.hcl.sig"
)

// stateDir is the gateway's persistent state.
type stateDir string

func (d stateDir) path(name string) string { return filepath.Join(string(d), name) }

// nextAdvertVersion returns a version strictly above any used before,
// even across restarts and lost state files: the larger of the stored
// version + 1 and the current time in milliseconds.
func (d stateDir) nextAdvertVersion(nowMillis uint64) (uint64, error) {
	var last uint64
	if b, err := os.ReadFile(d.path(fileAdvertVersion)); err == nil {
		last, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	} else if !errors.Is(err, os.ErrNotExist) {
		return 0, err
	}
	v := max(last+1, nowMillis)
	if err := atomicfile.WriteFile(d.path(fileAdvertVersion), []byte(strconv.FormatUint(v, 10)+"\n"), 0o644); err != nil {
		return 0, err
	}
	return v, nil
}

// savedMember is a member as persisted: enough to re-verify it and to knock
// on its door after a restart.
type savedMember struct {
	Name   string         `json:"name"`
	Gossip netip.AddrPort `json:"gossip"`
	Alive  bool           `json:"alive"` // verified and alive when saved: keep its tunnel across a restart
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

func (d stateDir) savePolicy(src, sig []byte) error {
	if err := atomicfile.WriteFile(d.path(filePolicySig), sig, 0o644); err != nil {
		return err
	}
	return atomicfile.WriteFile(d.path(filePolicy), src, 0o644)
}

func (d stateDir) loadPolicy() (src, sig []byte, err error) {
	src, err = os.ReadFile(d.path(filePolicy))
	if err != nil {
		return nil, nil, err
	}
	sig, err = os.ReadFile(d.path(filePolicySig))
	return src, sig, err
}
