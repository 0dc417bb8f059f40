package mesh

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// TestBurstPendingKeyGoesOnceEnrolled: a burst gateway killed between
// its enrollment record and the removal of the key it kept for the
// enrollment finds the key at its next start, with or without its join
// token, and removes it, with the temporaries of its writes: it was left
// on disk, a second copy of the node's private key, for the whole burst.
func TestBurstPendingKeyGoesOnceEnrolled(t *testing.T) {
	dir := t.TempDir()
	if err := saveEnrollment(dir, &Enrollment{Site: "burst-ams", Node: "burst-ams-gw1", TokenID: "t1", Expires: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	left := []string{filePendingEnrollment, "." + filePendingEnrollment + ".tmp-7"}
	leftovers := func() {
		for _, f := range left {
			if err := os.WriteFile(filepath.Join(dir, f), []byte("the node's key"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	gone := func(when string) {
		t.Helper()
		for _, f := range left {
			if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s: %s, a copy of the node's key, is still there (%v)", when, f, err)
			}
		}
		if enr, err := loadEnrollment(dir); err != nil || enr == nil || enr.Ended != nil {
			t.Fatalf("%s: the enrollment %+v, %v; want it kept, live", when, enr, err)
		}
	}
	leftovers()
	s := &Settings{Identity: certs.Config{Dir: dir}}
	if enr, err := Join(context.Background(), s, "sbj1.never-read", nil); err != nil || enr == nil || enr.TokenID != "t1" {
		t.Fatalf("a start with the token after the enrollment: %+v, %v; want the enrollment kept", enr, err)
	}
	gone("after a start with the token")
	leftovers()
	if _, enr, err := applyEnrollment(s); err != nil || enr == nil {
		t.Fatalf("a start without the token: %+v, %v", enr, err)
	}
	gone("after a start without the token")
}
