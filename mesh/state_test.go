package mesh

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"testing"
)

// TestStatePolicy: the adopted policy and its signature are kept in one
// file, byte for byte; a state directory from before, with the two files,
// is read, and they go once the policy is saved again.
func TestStatePolicy(t *testing.T) {
	d := stateDir(t.TempDir())
	if _, _, err := d.loadPolicy(); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("no policy stored: %v", err)
	}
	os.WriteFile(d.path(filePolicy), []byte("old policy"), 0o644)
	os.WriteFile(d.path(filePolicySig), []byte(`{"old":"sig"}`), 0o644)
	if src, sig, err := d.loadPolicy(); err != nil || string(src) != "old policy" || string(sig) != `{"old":"sig"}` {
		t.Fatalf("the two files of before: %q %q %v", src, sig, err)
	}
	src := []byte("policy \"p\" {\n  version = 2 # \xff not UTF-8\n}\n")
	sig := []byte("{\n  \"format\": \"x\"\n}\n")
	if err := d.savePolicy(src, sig); err != nil {
		t.Fatal(err)
	}
	gotSrc, gotSig, err := d.loadPolicy()
	if err != nil || !bytes.Equal(gotSrc, src) || !bytes.Equal(gotSig, sig) {
		t.Fatalf("stored %q %q, loaded %q %q, %v", src, sig, gotSrc, gotSig, err)
	}
	for _, f := range []string{filePolicy, filePolicySig} {
		if _, err := os.Stat(d.path(f)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s left beside %s: %v", f, fileAdoptedPolicy, err)
		}
	}
}

// TestAdvertVersion: versions rise across calls; a version file that
// cannot be read or kept (damaged, a directory in its place as a full disk
// would refuse the write) still gives a version above the last, said as a
// warning, instead of no advert at all.
func TestAdvertVersion(t *testing.T) {
	d := stateDir(t.TempDir())
	v1, warn := d.nextAdvertVersion(1000, 0)
	if warn != nil || v1 != 1000 {
		t.Fatalf("first version %d, %v", v1, warn)
	}
	if v2, warn := d.nextAdvertVersion(900, 0); warn != nil || v2 != 1001 {
		t.Fatalf("with the clock behind: %d, %v; want 1001", v2, warn)
	}
	os.WriteFile(d.path(fileAdvertVersion), []byte("12x\n"), 0o644)
	if v, warn := d.nextAdvertVersion(2000, 0); warn == nil || v != 2000 {
		t.Fatalf("a damaged version file: %d, %v; want 2000 and a warning", v, warn)
	}
	os.Remove(d.path(fileAdvertVersion))
	os.Mkdir(d.path(fileAdvertVersion), 0o700)
	if v, warn := d.nextAdvertVersion(3000, 0); warn == nil || v != 3000 {
		t.Fatalf("a version that cannot be kept: %d, %v; want 3000 and a warning", v, warn)
	}
	// Not kept, with the clock gone back: above the last this run signed,
	// not the clock's again (peers refuse a version twice as a forgery).
	if v, warn := d.nextAdvertVersion(2500, 3000); warn == nil || v != 3001 {
		t.Fatalf("a version not kept, the clock behind the last signed: %d, %v; want 3001 and a warning", v, warn)
	}
}
