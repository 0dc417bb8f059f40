package certs

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// leave writes the files a process killed mid-write leaves in dir, aged
// by age: temporaries of atomicfile, or, ending in "/", an init's
// directory holding a CA key.
func leave(t *testing.T, dir string, age time.Duration, names ...string) {
	t.Helper()
	then := time.Now().Add(-age)
	for _, n := range names {
		p := filepath.Join(dir, n)
		if d, ok := cutSlash(n); ok {
			p = filepath.Join(dir, d)
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(p, fileCAKey), []byte("a CA key"), 0o600); err != nil {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(p, []byte("a copy of a secret"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, then, then); err != nil {
			t.Fatal(err)
		}
	}
}

func cutSlash(n string) (string, bool) {
	if len(n) > 0 && n[len(n)-1] == '/' {
		return n[:len(n)-1], true
	}
	return n, false
}

func checkLeft(t *testing.T, when, dir string, gone, kept []string) {
	t.Helper()
	for _, n := range gone {
		n, _ = cutSlash(n)
		if _, err := os.Lstat(filepath.Join(dir, n)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: %s, left by a write cut short, is still there (%v)", when, n, err)
		}
	}
	for _, n := range kept {
		n, _ = cutSlash(n)
		if _, err := os.Lstat(filepath.Join(dir, n)); err != nil {
			t.Errorf("%s: %s was removed (%v); want it kept", when, n, err)
		}
	}
}

// TestCALockClearsLeftovers: what `skybridge ca` commands killed mid-write
// left in the CA directory goes at the next operation, under the CA's
// lock, which every writer of the index, the revocation list and the
// archive holds: their temporaries whatever their age (each a copy of
// the index or list). The gossip keyring is written under a lock of its
// own, and the directories of inits beside the CA under none: theirs go
// only once old enough that no write can still be under way.
func TestCALockClearsLeftovers(t *testing.T) {
	ca := newTestCA(t)
	dir, parent := ca.Dir(), filepath.Dir(ca.Dir())
	gone := []string{".issued.json.tmp-1", ".crl.pem.tmp-2", ".issued-archive.jsonl.tmp-3"}
	leave(t, dir, 0, gone...)
	leave(t, dir, 2*time.Hour, ".gossip.keyring.tmp-4")
	leave(t, dir, 0, ".gossip.keyring.tmp-5", ".issued.json.tmp-x")
	leave(t, parent, 2*time.Hour, ".ca.init-6/")
	leave(t, parent, 0, ".ca.init-7/", ".other.init-8/")
	leave(t, parent, 2*time.Hour, ".other.init-9/")

	if err := ca.RefreshCRL(time.Now()); err != nil {
		t.Fatal(err)
	}
	checkLeft(t, "CA directory", dir, append(gone, ".gossip.keyring.tmp-4"), []string{".gossip.keyring.tmp-5", ".issued.json.tmp-x"})
	checkLeft(t, "beside the CA", parent, []string{".ca.init-6/"}, []string{".ca.init-7/", ".other.init-8/", ".other.init-9/"})
	if _, err := OpenCA(dir); err != nil {
		t.Fatalf("the CA after: %v", err)
	}
}

// TestRenewLockClearsNextKeyTemps: a renewal's key is written under the
// renewal lock alone: the temporaries a renewal killed mid-write left go
// when the next takes the lock.
func TestRenewLockClearsNextKeyTemps(t *testing.T) {
	dir := t.TempDir()
	leave(t, dir, 0, ".node.key.next.tmp-1")
	leave(t, dir, 0, ".node.key.tmp-2") // written by others, without the lock
	unlock, err := lockFileContext(context.Background(), filepath.Join(dir, fileRenewLock))
	if err != nil {
		t.Fatal(err)
	}
	unlock()
	checkLeft(t, "after the renewal lock", dir, []string{".node.key.next.tmp-1"}, []string{".node.key.tmp-2"})
}

// TestLoadIdentityClearsStaleTemps: loading an identity removes the
// temporaries of its files that writes killed midway left, copies of its
// keys; as their writers hold no lock in common, only those old enough
// that no write can still be under way.
func TestLoadIdentityClearsStaleTemps(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "identity")
	id := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), time.Now(), time.Hour)
	if err := id.Save(dir, trust(t, ca)); err != nil {
		t.Fatal(err)
	}
	old := []string{".node.key.tmp-1", ".node.key.prev.tmp-2", ".node.key.next.tmp-3", ".node.crt.tmp-4", ".wireguard.key.tmp-5",
		".gossip.keyring.tmp-6", ".vault-secret-id.tmp-7", ".vault-role-id.tmp-8", ".ca.crt.tmp-9", ".crl.pem.tmp-10"}
	leave(t, dir, 2*time.Hour, old...)
	young := []string{".node.key.tmp-11", ".wireguard.key.tmp-12"}
	leave(t, dir, 0, young...)
	leave(t, dir, 2*time.Hour, ".burst.json.tmp-13") // not the identity's
	if _, err := LoadNodeIdentity(dir); err != nil {
		t.Fatal(err)
	}
	checkLeft(t, "after a load", dir, old, append(young, ".burst.json.tmp-13"))
	if _, err := LoadNodeIdentity(dir); err != nil {
		t.Fatalf("the identity after: %v", err)
	}
}
