package audit

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestLogNotFollowed: what another user who may write the state directory
// could put at the log's path — a symbolic link, a hard link to a file of
// the gateway's user (/etc/shadow, to a gateway run as root), a file of
// their own, a FIFO — is neither appended to nor cut back, by Append or
// by Ready, and the refusal says what it found in the project's words:
// the kernel's own for a link ("too many levels of symbolic links") does
// not say who put it there or what to do.
func TestLogNotFollowed(t *testing.T) {
	id, _ := identity(t)
	const precious = "root:...:precious content" // no newline: Ready would cut it off
	type plant struct {
		what string
		put  func(t *testing.T, path, victim string)
		want string // in the refusal
	}
	plants := []plant{
		{"symbolic link", func(t *testing.T, path, victim string) {
			if err := os.Symlink(victim, path); err != nil {
				t.Fatal(err)
			}
		}, "is a symbolic link, which a gateway never makes"},
		{"hard links", func(t *testing.T, path, victim string) {
			if err := os.Link(victim, path); err != nil {
				t.Fatal(err)
			}
		}, "has 2 names (hard links), which a gateway never makes"},
		// Not a file: writing to it would block the gateway, or feed
		// whoever reads it.
		{"FIFO", func(t *testing.T, path, victim string) {
			if err := syscall.Mkfifo(path, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "is not a file"},
	}
	if os.Geteuid() == 0 {
		plants = append(plants, plant{"belongs to user 12345", func(t *testing.T, path, victim string) {
			if err := os.WriteFile(path, []byte(precious), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(path, 12345, 12345); err != nil {
				t.Fatal(err)
			}
		}, "belongs to user 12345"})
	}
	for _, p := range plants {
		t.Run(p.what, func(t *testing.T) {
			dir := t.TempDir()
			victim := filepath.Join(dir, "precious")
			if err := os.WriteFile(victim, []byte(precious), 0o600); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "audit.log")
			p.put(t, path, victim)
			l := Open(path)
			if err := l.Ready(nil, t0); err == nil || !strings.Contains(err.Error(), p.want) {
				t.Errorf("Ready: %v; want a refusal saying %q", err, p.want)
			}
			if _, err := l.Append(id, "migration", map[string]any{"n": 1}, t0); err == nil || !strings.Contains(err.Error(), p.want) {
				t.Errorf("Append: %v; want a refusal saying %q", err, p.want)
			}
			for _, f := range []string{victim, path} {
				// A FIFO is not read: that would wait for a writer.
				if fi, err := os.Stat(f); err != nil || !fi.Mode().IsRegular() {
					continue
				}
				if b, err := os.ReadFile(f); err == nil && string(b) != precious {
					t.Errorf("%s written through the log: %.60q", f, b)
				}
			}
		})
	}
}
