package certs

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// otherUser is a uid no file of the test's belongs to (nobody).
const otherUser = 65534

// asRoot skips a test that gives files to another user where it cannot;
// CI runs as root, where it must.
func asRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root to give files to another user (CI runs as root)")
		}
		t.Skip("needs root to give files to another user")
	}
}

// TestForeignKeyInOpenDirAccepted: in an identity directory any user may
// write, another user can put a wireguard.key of their own (mode 0600,
// their uid): the gateway must not take it as its key, nor make its keys
// in such a directory.
func TestForeignKeyInOpenDirAccepted(t *testing.T) {
	asRoot(t)
	dir := filepath.Join(t.TempDir(), "identity")
	if err := os.Mkdir(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o777)
	if err := MkdirPrivate(dir); err == nil || !strings.Contains(err.Error(), "may be written by users other than its owner") {
		t.Errorf("MkdirPrivate on a directory any user may write: %v", err)
	}
	planted, _ := GenerateWGKey() // the other user knows this one
	p := filepath.Join(dir, FileWireGuardKey)
	if err := os.WriteFile(p, []byte(planted.Base64Secret()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, otherUser, otherUser); err != nil {
		t.Fatal(err)
	}
	k, err := (DirSecrets{Dir: dir}).WireGuardKey(context.Background(), "gw1")
	if err == nil && k.Public() == planted.Public() {
		t.Fatalf("a wireguard.key owned by uid %d in a world-writable identity directory was taken as the gateway's key", otherUser)
	}
	if err == nil || !strings.Contains(err.Error(), "belongs to user 65534") {
		t.Errorf("a wireguard.key of another user's: %v; want it refused, naming its owner", err)
	}
}

// TestReadPrivateFileOwner: a secret is taken from its owner alone, as
// the operator token is: root's too, to another user (who could read it
// only with the privilege to read anyone's files).
func TestReadPrivateFileOwner(t *testing.T) {
	asRoot(t)
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadPrivateFile(p); err != nil || string(b) != "secret\n" {
		t.Fatalf("a secret of our own: %q, %v", b, err)
	}
	if err := os.Chown(p, otherUser, otherUser); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadPrivateFile(p); err == nil || !strings.Contains(err.Error(), "belongs to user 65534") || !strings.Contains(err.Error(), "chown") {
		t.Errorf("a secret of another user's: %v", err)
	}
}

// TestKeyDirOthersMayChange: a directory of keys another user could
// change — written by its group or others without the sticky bit, or
// owned by a user other than root or ours — is refused, whether keys are
// made in it or its CA certificate read (whoever may replace ca.crt adds
// their CA); one others may only read is said, not refused.
func TestKeyDirOthersMayChange(t *testing.T) {
	tb := trust(t, newTestCA(t))
	prepare := func(t *testing.T, mode os.FileMode, owner int) string {
		t.Helper()
		dir := filepath.Join(t.TempDir(), "identity")
		if err := tb.Save(dir); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		if owner >= 0 {
			if err := os.Chown(dir, owner, owner); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	for _, tc := range []struct {
		name  string
		mode  os.FileMode
		owner int
		want  string // "" for allowed
	}{
		{"ours", 0o700, -1, ""},
		{"others may read it", 0o755, -1, ""},
		{"sticky, others may write it", 0o777 | os.ModeSticky, -1, ""},
		{"its group may write it", 0o770, -1, "may be written by users other than its owner"},
		{"anyone may write it", 0o777, -1, "may be written by users other than its owner"},
		{"root's", 0o755, 0, ""},
		{"another user's", 0o700, otherUser, "belongs to user 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.owner >= 0 {
				asRoot(t)
			}
			dir := prepare(t, tc.mode, tc.owner)
			_, lerr := LoadTrustBundle(dir, netip.Prefix{})
			merr := MkdirPrivate(dir)
			for what, err := range map[string]error{"LoadTrustBundle": lerr, "MkdirPrivate": merr} {
				if tc.want == "" && err != nil {
					t.Errorf("%s: %v", what, err)
				}
				if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
					t.Errorf("%s: %v; want a refusal saying %q", what, err, tc.want)
				}
			}
		})
	}
}

// TestCACertOthersMayChange: a ca.crt another user owns, or others may
// write, is refused though its directory is ours: they could put a CA
// of theirs in it. Root's is not.
func TestCACertOthersMayChange(t *testing.T) {
	ca := newTestCA(t)
	tb := trust(t, ca)
	dir := filepath.Join(t.TempDir(), "identity")
	if err := tb.Save(dir); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, fileCACert)
	os.Chmod(path, 0o666)
	if _, err := LoadTrustBundle(dir, netip.Prefix{}); err == nil || !strings.Contains(err.Error(), "chmod 644") {
		t.Errorf("a ca.crt others may write: %v", err)
	}
	os.Chmod(path, 0o644)
	if os.Geteuid() != 0 {
		return
	}
	if err := os.Chown(path, otherUser, otherUser); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadTrustBundle(dir, netip.Prefix{}); err == nil || !strings.Contains(err.Error(), "belongs to user 65534") {
		t.Errorf("a ca.crt of another user's: %v", err)
	}
	// The identity issued beside it, and saved again: ca.crt replaced,
	// ours again.
	if err := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour).Save(dir, tb); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadTrustBundle(dir, netip.Prefix{}); err != nil {
		t.Errorf("ca.crt saved again: %v", err)
	}
}
