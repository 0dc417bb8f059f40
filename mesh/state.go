package mesh

import (
	"encoding/json"
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

// readJSON decodes file into v; found is false (and v untouched) if there
// is no such file. A file that does not decode is reported as damaged.
func readJSON(file string, v any) (found bool, err error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return true, fmt.Errorf("%s is %w: %w", file, errDamaged, err)
	}
	return true, nil
}

// errDamaged marks a state file that was read but does not decode: what
// to do about it (rewrite, repair) is advice only for that case, not for
// a file that could not be read at all.
var errDamaged = errors.New("damaged")

// writeJSON writes v to file durably (temporary name, fsync, rename),
// readable by the owner only.
func writeJSON(file string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(file, append(b, '\n'), 0o600)
}

func (d stateDir) saveMembers(ms []savedMember) error { return writeJSON(d.path(fileMembers), ms) }

func (d stateDir) loadMembers() ([]savedMember, error) {
	var ms []savedMember
	if _, err := readJSON(d.path(fileMembers), &ms); errors.Is(err, errDamaged) {
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
