package mesh

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLockStateDir: one gateway at a time on a state directory; the
// second is told which process holds it, and gets it once that one lets
// go.
func TestLockStateDir(t *testing.T) {
	dir := t.TempDir()
	release, err := LockStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := LockStateDir(dir); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("in use by another gateway (pid %d)", os.Getpid())) {
		t.Fatalf("a second gateway on the directory: %v; want a refusal naming the first", err)
	}
	release()
	again, err := LockStateDir(dir)
	if err != nil {
		t.Fatalf("once the first let go: %v", err)
	}
	again()
}

// TestLockStateDirWay: a state directory another user may change, or one
// on the way to it, is refused before anything is written in it (the
// control socket's rules: whoever may replace what the gateway keeps
// there — its journal, audit log, stored images, operator token,
// identity — is as good as the gateway); one of the gateway's user in a
// sticky directory, or its group may write, is not.
func TestLockStateDirWay(t *testing.T) {
	try := func(t *testing.T, dir string) error {
		t.Helper()
		release, err := LockStateDir(dir)
		if err == nil {
			release()
		} else if _, serr := os.Lstat(filepath.Join(dir, fileLock)); serr == nil {
			t.Errorf("refused (%v), but wrote %s", err, fileLock)
		}
		return err
	}
	chmod := func(t *testing.T, dir string, mode os.FileMode) string {
		t.Helper()
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	t.Run("anyone may write it", func(t *testing.T) {
		if err := try(t, chmod(t, t.TempDir(), 0o777)); err == nil || !strings.Contains(err.Error(), "may be written by any user") {
			t.Errorf("a state directory anyone may write: %v", err)
		}
	})
	t.Run("sticky, anyone may write it", func(t *testing.T) {
		if err := try(t, chmod(t, t.TempDir(), 0o777|os.ModeSticky)); err == nil || !strings.Contains(err.Error(), "may be written by any user") {
			t.Errorf("a sticky state directory anyone may write (/tmp): %v", err)
		}
	})
	t.Run("in a directory anyone may write", func(t *testing.T) {
		open := chmod(t, t.TempDir(), 0o777)
		if err := try(t, filepath.Join(open, "state")); err == nil || !strings.Contains(err.Error(), "directory "+open+" may be written by any user") {
			t.Errorf("a state directory whose parent anyone may write: %v", err)
		}
	})
	// Nothing is made on a way refused: MkdirAll, as root, would make the
	// directory in one of another user's, or through their link.
	t.Run("made in a directory anyone may write", func(t *testing.T) {
		open := chmod(t, t.TempDir(), 0o777)
		if err := try(t, filepath.Join(open, "state", "gw")); err == nil || !strings.Contains(err.Error(), "directory "+open+" may be written by any user") {
			t.Errorf("a state directory to make in one anyone may write: %v", err)
		}
		if _, err := os.Lstat(filepath.Join(open, "state")); err == nil {
			t.Errorf("refused, but made %s", filepath.Join(open, "state"))
		}
	})
	t.Run("made in another user's directory", func(t *testing.T) {
		asRoot(t)
		theirs := t.TempDir()
		if err := os.Chown(theirs, otherUser, otherUser); err != nil {
			t.Fatal(err)
		}
		if err := try(t, filepath.Join(theirs, "state")); err == nil || !strings.Contains(err.Error(), "directory "+theirs+" belongs to user 12345") {
			t.Errorf("a state directory to make in another user's: %v", err)
		}
		if _, err := os.Lstat(filepath.Join(theirs, "state")); err == nil {
			t.Errorf("refused, but made %s", filepath.Join(theirs, "state"))
		}
	})
	t.Run("made through another user's link", func(t *testing.T) {
		asRoot(t)
		base, target := t.TempDir(), t.TempDir()
		link := filepath.Join(base, "var")
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(link, otherUser, otherUser); err != nil {
			t.Fatal(err)
		}
		if err := try(t, filepath.Join(link, "state")); err == nil || !strings.Contains(err.Error(), "symbolic link "+link+" belongs to user 12345") {
			t.Errorf("a state directory to make through another user's link: %v", err)
		}
		if _, err := os.Lstat(filepath.Join(target, "state")); err == nil {
			t.Errorf("refused, but made %s", filepath.Join(target, "state"))
		}
	})
	t.Run("ours in a sticky directory", func(t *testing.T) {
		if err := try(t, filepath.Join(chmod(t, t.TempDir(), 0o777|os.ModeSticky), "state")); err != nil {
			t.Errorf("a state directory of ours in a sticky one (/tmp/skybridge): %v", err)
		}
	})
	t.Run("its group may write it", func(t *testing.T) {
		if err := try(t, chmod(t, t.TempDir(), 0o770)); err != nil {
			t.Errorf("a state directory its group may write (umask 002): %v", err)
		}
	})
	t.Run("another user's", func(t *testing.T) {
		asRoot(t)
		theirs := t.TempDir()
		if err := os.Chown(theirs, otherUser, otherUser); err != nil {
			t.Fatal(err)
		}
		if err := try(t, theirs); err == nil || !strings.Contains(err.Error(), "directory "+theirs+" belongs to user 12345") {
			t.Errorf("a state directory of another user's: %v", err)
		}
	})
}
