package mesh

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// wayWords are what a refusal of a directory on a way says, after naming
// it: what it is for, and what its owner, or anyone, could do there and
// how to have a way of root's and the gateway's instead.
type wayWords struct {
	what   string // "control socket directory"
	owner  string // after "belongs to user N, neither this gateway's nor root: "
	anyone string // after "may be written by any user (mode M): "
	group  string // the warning for a directory its group may write
}

var controlWords = wayWords{
	what:   "control socket directory",
	owner:  "that user could take the socket's place; set control { socket = \"…\" } in a directory of the gateway's own, in directories of root's",
	anyone: "one could take the socket's place; run chmod o-w on it, or set control { socket = \"…\" } in a directory of the gateway's own",
	group:  "control socket: its directory, or one on the way to it, may be written by its group: members could take the socket's place",
}

// trustedWay checks the way to dir, every directory and symbolic link on
// it from /, and returns the directory as the links lead to it. Each must
// be root's or owner's (their owner may replace what they hold), and no
// directory may be written by others unless sticky (/tmp), where only the
// owner of an entry may replace it: a link in /tmp is then as good as its
// owner. One its group may write is only said.
//
// strict also refuses a directory its group or, sticky, others may
// write: there another user could have made the way.
func trustedWay(dir string, owner int, strict bool, log *slog.Logger, w wayWords) (string, error) {
	links := 0
	var walk func(at, rel string) (string, error)
	walk = func(at, rel string) (string, error) {
		for c := range strings.SplitSeq(rel, "/") {
			switch c {
			case "", ".":
				continue
			case "..":
				at = filepath.Dir(at) // at holds no link: its parent is the real one
				continue
			}
			next := filepath.Join(at, c)
			fi, err := os.Lstat(next)
			if err != nil {
				return "", fmt.Errorf("%s: %w", w.what, err)
			}
			if err := trustedStep(next, fi, owner, strict, log, w); err != nil {
				return "", err
			}
			switch {
			case fi.Mode().Type() == os.ModeSymlink:
				if links++; links > 40 {
					return "", fmt.Errorf("%s %s: too many symbolic links", w.what, dir)
				}
				to, err := os.Readlink(next)
				if err != nil {
					return "", fmt.Errorf("%s: %w", w.what, err)
				}
				from := at
				if filepath.IsAbs(to) {
					from = "/"
				}
				if at, err = walk(from, to); err != nil {
					return "", err
				}
			case fi.IsDir():
				at = next
			default:
				return "", fmt.Errorf("%s %s: %s is a %s, not a directory", w.what, dir, next, fileKind(fi.Mode()))
			}
		}
		return at, nil
	}
	fi, err := os.Lstat("/")
	if err != nil {
		return "", fmt.Errorf("%s: %w", w.what, err)
	}
	if err := trustedStep("/", fi, owner, strict, log, w); err != nil {
		return "", err
	}
	return walk("/", dir)
}

// trustedStep checks one directory or link on a way; fi is its Lstat.
func trustedStep(path string, fi os.FileInfo, owner int, strict bool, log *slog.Logger, w wayWords) error {
	what := "directory"
	if fi.Mode().Type() == os.ModeSymlink {
		what = "symbolic link"
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != owner && st.Uid != 0 {
		return fmt.Errorf("%s: %s %s belongs to user %d, neither this gateway's nor root: %s", w.what, what, path, st.Uid, w.owner)
	}
	if strict && fi.IsDir() && fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("directory %s may be written by users other than its owner (mode %v)", path, fi.Mode().Perm())
	}
	if !fi.IsDir() || fi.Mode()&os.ModeSticky != 0 {
		return nil
	}
	if fi.Mode().Perm()&0o002 != 0 {
		return fmt.Errorf("%s: %s %s may be written by any user (mode %v): %s", w.what, what, path, fi.Mode().Perm(), w.anyone)
	}
	if fi.Mode().Perm()&0o020 != 0 {
		log.Warn(w.group, "dir", path, "mode", fi.Mode().Perm().String())
	}
	return nil
}
