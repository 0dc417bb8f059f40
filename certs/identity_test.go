package certs

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"
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
	// node.crt cannot be replaced: a directory stands in its place
	// while b is saved, as a failed write would leave things.
	crt := filepath.Join(dir, fileNodeCert)
	if err := os.Rename(crt, crt+".aside"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(crt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := b.Save(dir, tb); err == nil {
		t.Fatal("the save with its certificate unwritable succeeded")
	}
	os.Remove(crt)
	if err := os.Rename(crt+".aside", crt); err != nil {
		t.Fatal(err)
	}
	got, err := LoadNodeIdentity(dir)
	if err != nil {
		t.Fatalf("the identity after a save cut short: %v", err)
	}
	if got.Certificate().SerialNumber.Cmp(a.Certificate().SerialNumber) != 0 {
		t.Fatal("loaded something other than the old pair")
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
