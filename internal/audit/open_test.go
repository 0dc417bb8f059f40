package audit

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLogNotFollowed: what another user who may write the state directory
// could put at the log's path — a symbolic link, a hard link to a file of
// the gateway's user (/etc/shadow, to a gateway run as root), a file of
// their own — is neither appended to nor cut back, by Append or by Ready.
func TestLogNotFollowed(t *testing.T) {
	id, _ := identity(t)
	const precious = "root:...:precious content" // no newline: Ready would cut it off
	plant := map[string]func(t *testing.T, path, victim string){
		"symbolic link": func(t *testing.T, path, victim string) {
			if err := os.Symlink(victim, path); err != nil {
				t.Fatal(err)
			}
		},
		"hard links": func(t *testing.T, path, victim string) {
			if err := os.Link(victim, path); err != nil {
				t.Fatal(err)
			}
		},
	}
	if os.Geteuid() == 0 {
		plant["belongs to user 12345"] = func(t *testing.T, path, victim string) {
			if err := os.WriteFile(path, []byte(precious), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(path, 12345, 12345); err != nil {
				t.Fatal(err)
			}
		}
	}
	for what, put := range plant {
		t.Run(what, func(t *testing.T) {
			dir := t.TempDir()
			victim := filepath.Join(dir, "precious")
			if err := os.WriteFile(victim, []byte(precious), 0o600); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "audit.log")
			put(t, path, victim)
			l := Open(path)
			if err := l.Ready(nil, t0); err == nil || !strings.Contains(err.Error(), what) {
				t.Errorf("Ready: %v; want a refusal saying %q", err, what)
			}
			if _, err := l.Append(id, "migration", map[string]any{"n": 1}, t0); err == nil || !strings.Contains(err.Error(), what) {
				t.Errorf("Append: %v; want a refusal saying %q", err, what)
			}
			for _, p := range []string{victim, path} {
				if b, err := os.ReadFile(p); err == nil && string(b) != precious {
					t.Errorf("%s written through the log: %.60q", p, b)
				}
			}
		})
	}
}
