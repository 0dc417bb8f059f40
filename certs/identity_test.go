package certs

import (
	"bytes"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// TestSaveCutShort: a renewal's save cut short after the new key (a full
// disk, a crash) leaves the new key beside the old certificate; the
// identity loads as the old pair, still valid, instead of refusing to
// start. A save that completes leaves no old key behind.
func TestSaveCutShort(t *testing.T) {
	ca := newTestCA(t)
	tb := trust(t, ca)
	dir := filepath.Join(t.TempDir(), "identity")
	a := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	b := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 2*time.Hour)
	if err := a.Save(dir, tb); err != nil {
		t.Fatal(err)
	}
	// The certificate's write fails, as on a full disk.
	writeNodeCert = func(string, []byte, os.FileMode) error { return errors.New("no space left on device") }
	err := b.Save(dir, tb)
	writeNodeCert = atomicfile.WriteFile
	if err == nil {
		t.Fatal("the save with its certificate unwritable succeeded")
	}
	got, err := LoadNodeIdentity(dir)
	if err != nil {
		t.Fatalf("the identity after a save cut short: %v", err)
	}
	if got.Certificate().SerialNumber.Cmp(a.Certificate().SerialNumber) != 0 {
		t.Fatal("loaded something other than the old pair")
	}
	// Cut short again, with another new key: the orphan of the first
	// does not push out the key that fits.
	c := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 3*time.Hour)
	writeNodeCert = func(string, []byte, os.FileMode) error { return errors.New("no space left on device") }
	err = c.Save(dir, tb)
	writeNodeCert = atomicfile.WriteFile
	if err == nil {
		t.Fatal("the second save with its certificate unwritable succeeded")
	}
	if got, err := LoadNodeIdentity(dir); err != nil || got.Certificate().SerialNumber.Cmp(a.Certificate().SerialNumber) != 0 {
		t.Fatalf("the identity after two saves cut short: %v", err)
	}

	if err := b.Save(dir, tb); err != nil {
		t.Fatal(err)
	}
	if got, err := LoadNodeIdentity(dir); err != nil || got.Certificate().SerialNumber.Cmp(b.Certificate().SerialNumber) != 0 {
		t.Fatalf("after a whole save: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, fileNodeKeyPrev)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the replaced key stayed after a whole save: %v", err)
	}
}

// TestSignerSaveCutShort: a policy signer's renewal cut short between its
// key and its certificate leaves the signer it replaces usable, as a
// gateway identity's does.
func TestSignerSaveCutShort(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "signer")
	a, err := ca.NewPolicySigner("release", time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := ca.NewPolicySigner("release", 2*time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Save(dir); err != nil {
		t.Fatal(err)
	}
	writeSignerCert = func(string, []byte, os.FileMode) error { return errors.New("no space left on device") }
	err = b.Save(dir)
	writeSignerCert = atomicfile.WriteFile
	if err == nil {
		t.Fatal("the save with its certificate unwritable succeeded")
	}
	got, err := LoadPolicySigner(dir)
	if err != nil || got.Certificate().SerialNumber.Cmp(a.Certificate().SerialNumber) != 0 {
		t.Fatalf("the signer after a save cut short: %v; want the old pair", err)
	}
	if err := b.Save(dir); err != nil {
		t.Fatal(err)
	}
	if got, err := LoadPolicySigner(dir); err != nil || got.Certificate().SerialNumber.Cmp(b.Certificate().SerialNumber) != 0 {
		t.Fatalf("after a whole save: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, fileSignerKeyPrev)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the replaced key stayed after a whole save: %v", err)
	}
}

// TestIdentityErrorAdvice: a directory this user may not read is not
// damaged, and is not to be replaced. (Tests may run as root, which reads
// anything, so the error is made here.)
func TestIdentityErrorAdvice(t *testing.T) {
	for _, tt := range []struct {
		err       error
		want, not string
	}{
		{&fs.PathError{Op: "open", Path: "id1/node.crt", Err: fs.ErrPermission}, "run this as the gateway's user", "issue a new identity"},
		{errors.New("node.crt: no certificate"), "restore the directory from a backup", "gateway's user"},
	} {
		msg := identityError("id1", tt.err).Error()
		if !strings.Contains(msg, tt.want) || strings.Contains(msg, tt.not) {
			t.Errorf("identityError(%v) = %q; want %q, not %q", tt.err, msg, tt.want, tt.not)
		}
	}
}

// TestMkdirPrivate: a directory for keys is made 0700; one that was there,
// open to other users, keeps its mode (it may be shared) but is said to be
// open, once.
func TestMkdirPrivate(t *testing.T) {
	var logs bytes.Buffer
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil)))
	dir := t.TempDir()
	fresh := filepath.Join(dir, "fresh", "id")
	if err := MkdirPrivate(fresh); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(fresh); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("a new directory for keys: %v %v; want mode 0700", st.Mode(), err)
	}
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chmod(open, 0o755)
	for range 2 {
		if err := MkdirPrivate(open); err != nil {
			t.Fatal(err)
		}
	}
	if st, _ := os.Stat(open); st.Mode().Perm() != 0o755 {
		t.Errorf("an operator's directory changed mode: %v", st.Mode())
	}
	if n := strings.Count(logs.String(), "open to other users"); n != 1 || !strings.Contains(logs.String(), open) || strings.Contains(logs.String(), fresh) {
		t.Errorf("said %d times (want once, of %s alone):\n%s", n, open, logs.String())
	}
}

// TestReaderLeavesSaveBackup: a reader (identity show, the gateway) that
// loads the identity while a save has kept the old key aside and not yet
// written the new one leaves that copy: the save's certificate may still
// fail to be written, and the copy is then the one key that fits the
// certificate there. The reader took it for a leftover and removed it,
// and the identity was lost.
func TestReaderLeavesSaveBackup(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "identity")
	a := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	b := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 2*time.Hour)
	if err := a.Save(dir, trust(t, ca)); err != nil {
		t.Fatal(err)
	}
	// b's save, as replaceKeyPair makes it, with a reader between its
	// first two steps and its certificate's write failing.
	old, err := os.ReadFile(filepath.Join(dir, fileNodeKey))
	if err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, fileNodeKeyPrev), old, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadNodeIdentity(dir); err != nil {
		t.Fatalf("the reader: %v", err)
	}
	newKey, err := marshalKeyPEM(b.key)
	if err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, fileNodeKey), newKey, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := LoadNodeIdentity(dir)
	if err != nil {
		t.Fatalf("the identity after the save failed at its certificate: %v", err)
	}
	if got.Certificate().SerialNumber.Cmp(a.Certificate().SerialNumber) != 0 {
		t.Fatal("loaded something other than the old pair")
	}
	// The next save that completes clears the copy.
	if err := b.Save(dir, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, fileNodeKeyPrev)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the replaced key stayed after a whole save: %v", err)
	}
}
