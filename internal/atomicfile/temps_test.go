package atomicfile

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// TestRemoveTemps: what a write killed before its rename leaves goes, and
// nothing else: not a file that only begins like one, not another file's,
// not a directory or a link; with minAge, not one that may be a write
// under way.
func TestRemoveTemps(t *testing.T) {
	dir := t.TempDir()
	// A write cut short after its temporary file was made, as kill -9
	// leaves it.
	cut, err := writeTemp(filepath.Join(dir, "node.key"), []byte("key"), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cut = filepath.Base(cut)
	gone := []string{cut, ".node.key.tmp-0", ".node.key.tmp-4294967295", ".issued.json.tmp-17"}
	kept := []string{"node.key", ".node.key.tmp-", ".node.key.tmp-12x", ".node.key.tmp-012", ".node.key.tmp-4294967296",
		".node.key.tmp-+5", ".node.key.prev.tmp-5", ".other.tmp-5", "node.key.tmp-5", ".node.key.tmp-5.bak"}
	for _, f := range append(slices.Clone(gone[1:]), kept...) {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, ".node.key.tmp-55"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("node.key", filepath.Join(dir, ".node.key.tmp-66")); err != nil {
		t.Fatal(err)
	}
	kept = append(kept, ".node.key.tmp-55", ".node.key.tmp-66")

	if err := RemoveTemps(dir, 0, "node.key", "issued.json"); err != nil {
		t.Fatal(err)
	}
	for _, f := range gone {
		if _, err := os.Lstat(filepath.Join(dir, f)); !os.IsNotExist(err) {
			t.Errorf("%s, a write's temporary file, is still there (%v)", f, err)
		}
	}
	for _, f := range kept {
		if _, err := os.Lstat(filepath.Join(dir, f)); err != nil {
			t.Errorf("%s, no temporary file of node.key's, was removed (%v)", f, err)
		}
	}

	// Given an age, a temporary file younger than it stays: it may be
	// a write under way.
	young, old := ".crl.pem.tmp-1", ".crl.pem.tmp-2"
	for _, f := range []string{young, old} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	then := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(filepath.Join(dir, old), then, then); err != nil {
		t.Fatal(err)
	}
	if err := RemoveTemps(dir, time.Hour, "crl.pem"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, young)); err != nil {
		t.Errorf("a temporary file written just now was removed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, old)); !os.IsNotExist(err) {
		t.Errorf("a temporary file two hours old is still there (%v)", err)
	}

	if err := RemoveTemps(filepath.Join(dir, "missing"), 0, "node.key"); err != nil {
		t.Errorf("a directory that is not there: %v", err)
	}
}
