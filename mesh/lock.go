package mesh

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// fileLock is in the state directory while a gateway runs on it.
const fileLock = "gateway.lock"

var stateWords = wayWords{
	what:   "state directory",
	owner:  "that user could replace what the gateway keeps in it; give the gateway a state_dir in a directory of its own, in directories of root's",
	anyone: "one could replace what the gateway keeps in it; run chmod o-w on it, or give the gateway a state_dir in a directory of its own",
	group:  "state directory: it, or one on the way to it, may be written by its group: members could replace what the gateway keeps in it",
}

// LockStateDir claims the state directory for one gateway process until
// release is called (or the process ends). A second gateway on the same
// directory would take over the first one's WireGuard interface, fail on
// the migration journal's lock, and delete the interface as it gave up:
// the first kept gossiping with every tunnel gone. It is refused first.
// So is a directory another user may change, or one on the way to it:
// the lock is the first thing written in it.
func LockStateDir(dir string) (release func(), err error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	}
	// The way to what is there already is checked before any of the rest
	// is made: MkdirAll, run as root, would otherwise make it through a
	// link or in a directory of another user's, and leave it there when
	// refused. What it makes is then ours. Said once, by the check below.
	have, err := existingAncestor(abs)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if _, err := trustedWay(have, os.Geteuid(), false, slog.New(slog.DiscardHandler), stateWords); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	// Checked again, whole, before anything is written in it, by the
	// control socket's rules: what the gateway keeps there (its journal,
	// audit log, stored images, operator token and, by default, identity)
	// is as good as whoever may replace it, and the socket is kept there
	// by default. Another user could have changed the way since.
	at, err := trustedWay(abs, os.Geteuid(), false, slog.Default(), stateWords)
	if err != nil {
		return nil, err
	}
	// Sticky is not enough for the directory itself: anyone could put
	// files there while the gateway is down.
	if fi, err := os.Stat(at); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	} else if fi.Mode().Perm()&0o002 != 0 {
		return nil, fmt.Errorf("state directory %s may be written by any user (mode %v): one could put files of theirs in it while the gateway is down; run chmod o-w on it, or give the gateway a state_dir of its own", dir, fi.Mode().Perm())
	}
	path := filepath.Join(at, fileLock)
	// Not followed if a link: whoever may write the directory could point
	// it at /etc/shadow, which a gateway run as root would then truncate
	// and write its pid in. Nor taken if not a file of its own, alone:
	// a hard link to such a file is another way to the same.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("state directory lock %s is a symbolic link, which a gateway never makes: someone who may write %s put it there; find out who, then remove it", path, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("state directory lock: %w", err)
	}
	if err := ownFile(f, path); err != nil {
		f.Close()
		return nil, fmt.Errorf("state directory lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b := make([]byte, 32)
		n, _ := f.ReadAt(b, 0)
		b = b[:n]
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			who := "another gateway"
			if pid, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil {
				who = fmt.Sprintf("another gateway (pid %d)", pid)
			}
			return nil, fmt.Errorf("state directory %s is in use by %s: stop it first, or give this one a state directory of its own", dir, who)
		}
		return nil, fmt.Errorf("state directory lock %s: %w", path, err)
	}
	// Who holds it, for the message above; the lock itself is the flock.
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return func() { f.Close() }, nil
}

// existingAncestor returns the longest leading part of path, absolute,
// that is there (a link counts, as it is: trustedWay follows it).
func existingAncestor(path string) (string, error) {
	for {
		_, err := os.Lstat(path)
		if err == nil || !errors.Is(err, fs.ErrNotExist) {
			return path, err
		}
		up := filepath.Dir(path)
		if up == path {
			return path, err
		}
		path = up
	}
}

// ownFile refuses an open file a gateway is about to write in place
// unless it is a regular file of this user's with no other name: one of
// another user's, or a hard link, may be anybody's file, put there by
// someone who may write the directory.
func ownFile(f *os.File, path string) error {
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.Mode().IsRegular():
		return fmt.Errorf("%s is a %s, not a file: move it away", path, fileKind(fi.Mode()))
	case !ok:
		return nil
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s belongs to user %d, not to this gateway's (uid %d): that user may have put it there to have it written; find out why, then remove it (or chown it to uid %d)", path, st.Uid, os.Geteuid(), os.Geteuid())
	case st.Nlink != 1:
		return fmt.Errorf("%s has %d names (hard links), which a gateway never makes: another may be a file that matters (/etc/shadow, to a gateway run as root), linked there to have it written; find out who linked it, then remove this name", path, st.Nlink)
	}
	return nil
}
