package certs

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
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
// in such a directory. ReadPrivateFile does not judge the key's owner:
// the directory is refused as a gateway starts (its trust bundle is read,
// or saved, before its identity and secrets), with or without a CA.
func TestForeignKeyInOpenDirAccepted(t *testing.T) {
	asRoot(t)
	ca := newTestCA(t)
	attrs := testAttrs("gw1", "s", "100.96.0.1")
	ctx := context.Background()
	for _, caDir := range []string{"", ca.Dir()} {
		dir := filepath.Join(t.TempDir(), "identity")
		if err := issue(t, ca, attrs, time.Now(), time.Hour).Save(dir, trust(t, ca)); err != nil {
			t.Fatal(err)
		}
		if err := ca.CopyGossipKeyring(ctx, dir); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, 0o777); err != nil {
			t.Fatal(err)
		}
		if err := MkdirPrivate(dir); err == nil || !strings.Contains(err.Error(), "which holds keys, may be written by any user") {
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
		// As mesh.NewGateway: the provider's trust, identity, secrets.
		err := func() error {
			prov, err := Open(ctx, Config{Dir: dir, CADir: caDir, TTL: "1h"}, quietLog())
			if err != nil {
				return err
			}
			defer prov.Close()
			if _, err := prov.Trust(ctx); err != nil {
				return err
			}
			if _, _, err := prov.Identity(ctx, attrs); err != nil {
				return err
			}
			k, err := prov.Secrets().WireGuardKey(ctx, attrs.Node)
			if err == nil && k.Public() == planted.Public() {
				t.Fatalf("ca_dir %q: a wireguard.key owned by uid %d in a world-writable identity directory was taken as the gateway's key", caDir, otherUser)
			}
			return err
		}()
		if err == nil || !strings.Contains(err.Error(), "directory "+dir+", which holds keys, may be written by") {
			t.Errorf("ca_dir %q: a gateway starting on a world-writable identity directory: %v; want it refused for the directory", caDir, err)
		}
	}
}

// TestReadPrivateFileOwner: a secret's owner is not judged, only who may
// read it: Vault agent writes the token (0600, its own) a gateway run as
// root reads at every login, and a secret may come through a pipe.
func TestReadPrivateFileOwner(t *testing.T) {
	asRoot(t)
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, otherUser, otherUser); err != nil {
		t.Fatal(err)
	}
	if b, err := ReadPrivateFile(p); err != nil || string(b) != "secret\n" {
		t.Errorf("a 0600 secret of another user's: %q, %v", b, err)
	}
	os.Chmod(p, 0o640)
	if _, err := ReadPrivateFile(p); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a secret its group may read: %v", err)
	}
}

// TestReadPrivateFilePipe: --join-token-file <(…) names a pipe, which is
// the process's own and 0600.
func TestReadPrivateFilePipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := w.WriteString("secret\n"); err != nil {
		t.Fatal(err)
	}
	w.Close()
	path := fmt.Sprintf("/dev/fd/%d", r.Fd())
	if b, err := ReadPrivateFile(path); err != nil || string(b) != "secret\n" {
		t.Errorf("a secret from a pipe (%s): %q, %v", path, b, err)
	}
}

// TestKeyDirOthersMayChange: a directory of keys another user could
// change — written by any user without the sticky bit, or owned by a
// user other than root or ours — is refused, whether keys are made in it
// or its CA certificate read (whoever may replace ca.crt adds their CA);
// one others may only read, or its group write, is said, not refused.
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
		{"its group may write it", 0o770, -1, ""},
		{"anyone may write it", 0o777, -1, "may be written by any user"},
		{"anyone but its group may write it", 0o707, -1, "may be written by any user"},
		{"root's", 0o755, 0, ""},
		{"root's, its group may write it", 0o770, 0, ""},
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

// TestKeyDirGroupMayWrite: a directory of keys its group may write, as
// root's 0770 with the gateway's group is, is said once, not refused, and
// the advice is not chmod 700, which would lock the gateway out.
func TestKeyDirGroupMayWrite(t *testing.T) {
	var logs bytes.Buffer
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil)))
	dir := filepath.Join(t.TempDir(), "identity")
	if err := trust(t, newTestCA(t)).Save(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o770); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := MkdirPrivate(dir); err != nil {
			t.Errorf("MkdirPrivate: %v", err)
		}
		if _, err := LoadTrustBundle(dir, netip.Prefix{}); err != nil {
			t.Errorf("LoadTrustBundle: %v", err)
		}
	}
	if n := strings.Count(logs.String(), "may be written by its group"); n != 1 || strings.Contains(logs.String(), "chmod 700") || strings.Contains(logs.String(), "open to other users") {
		t.Errorf("said %d times (want once, without chmod 700):\n%s", n, logs.String())
	}
}

// TestReadPrivateFileInGroupWritableDir: a secret of another user's is
// read where only its owner could have put it (Vault agent's token, for a
// gateway run as root), but not from a directory its group may write,
// which is only warned about: another member could have chosen it.
func TestReadPrivateFileInGroupWritableDir(t *testing.T) {
	asRoot(t)
	for _, tt := range []struct {
		dirMode os.FileMode
		owner   int
		ok      bool
	}{
		{0o700, otherUser, true},
		{0o770, os.Geteuid(), true},
		{0o770, 0, true},
		{0o770, otherUser, false},
		{0o777 | os.ModeSticky, otherUser, false}, // anyone may make it
	} {
		dir := filepath.Join(t.TempDir(), "secrets")
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "token")
		if err := os.WriteFile(path, []byte("s3cret"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(path, tt.owner, tt.owner); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, tt.dirMode); err != nil {
			t.Fatal(err)
		}
		_, err := ReadPrivateFile(path)
		if (err == nil) != tt.ok || err != nil && !strings.Contains(err.Error(), "chown it to the user that reads it") {
			t.Errorf("directory %v, file of uid %d: %v; want read %v", tt.dirMode, tt.owner, err, tt.ok)
		}
		// Through a link from a directory of the reader's alone, the
		// file's own directory counts.
		safe := filepath.Join(t.TempDir(), "safe")
		if err := os.Mkdir(safe, 0o700); err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(safe, "token")
		if err := os.Symlink(path, link); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadPrivateFile(link); (err == nil) != tt.ok {
			t.Errorf("directory %v, file of uid %d, through a link: %v; want read %v", tt.dirMode, tt.owner, err, tt.ok)
		}
	}
}
