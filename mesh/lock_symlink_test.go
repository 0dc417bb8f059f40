package mesh

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLockStateDirFollowsSymlink: a gateway.lock that is a symbolic link
// (planted by whoever may write the state directory) is not followed:
// the file it names would be truncated and overwritten with our pid.
func TestLockStateDirFollowsSymlink(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(victim, []byte("root:...:precious content\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(dir, fileLock)); err != nil {
		t.Fatal(err)
	}
	release, err := LockStateDir(dir)
	if err == nil {
		defer release()
	}
	got, _ := os.ReadFile(victim)
	if string(got) != "root:...:precious content\n" {
		t.Fatalf("LockStateDir (err %v) followed %s -> %s and rewrote it: now %q", err, fileLock, victim, got)
	}
	if err == nil || !strings.Contains(err.Error(), "is a symbolic link") {
		t.Errorf("a lock that is a symbolic link: %v; want it refused, saying so", err)
	}
}

// TestLockStateDirHardLink: nor is a gateway.lock that is another name of
// a file (a hard link to one the gateway's user owns, as /etc/shadow is
// root's) truncated.
func TestLockStateDirHardLink(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "precious")
	if err := os.WriteFile(victim, []byte("precious content\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(victim, filepath.Join(dir, fileLock)); err != nil {
		t.Fatal(err)
	}
	release, err := LockStateDir(dir)
	if err == nil {
		release()
	}
	if got, _ := os.ReadFile(victim); string(got) != "precious content\n" || err == nil || !strings.Contains(err.Error(), "hard links") {
		t.Errorf("a lock hard-linked to another file: %v; that file now %q", err, got)
	}
}

// TestLockStateDirOthersLock: a gateway.lock of another user's, which
// they could have linked to any file, is refused.
func TestLockStateDirOthersLock(t *testing.T) {
	asRoot(t)
	dir := t.TempDir()
	path := filepath.Join(dir, fileLock)
	if err := os.WriteFile(path, []byte("1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, otherUser, otherUser); err != nil {
		t.Fatal(err)
	}
	release, err := LockStateDir(dir)
	if err == nil {
		release()
	}
	if err == nil || !strings.Contains(err.Error(), "belongs to user 12345") {
		t.Errorf("a lock of another user's: %v", err)
	}
}
