package migrate

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestRemoveImage: a stored image is removed with its catalog entry and
// an audit record; not while a new version of it is received, not when
// the removal could not be recorded, and one whose file a stop already
// took is forgotten.
func TestRemoveImage(t *testing.T) {
	// The receiver's clock, moved through an atomic: its background loop
	// reads it meanwhile (a removal kicks it).
	var skew atomic.Int64
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 3 * mib})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	cat, err := p.recvJ.Catalog()
	if err != nil || len(cat) != 1 || cat[0].Name != "vm" || cat[0].Manifest.Size != 8*mib || cat[0].Manifest.Chunks != nil || cat[0].Root.String() == (Hash{}).String() {
		t.Fatalf("catalog %+v, %v; want vm's record without its chunk hashes", cat, err)
	}
	img, _ := p.recvJ.Image("vm")

	// The audit log cannot take a record: the image stays.
	good, err := os.ReadFile(p.recvAudit.Path())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.recvAudit.Path(), append(good, "not a record\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := p.recv.RemoveImage("vm", "test"); err == nil || !strings.Contains(err.Error(), "audit log") {
		t.Fatalf("removal with a damaged audit log: %v", err)
	}
	if _, err := os.Stat(img.Path); err != nil {
		t.Fatalf("the image's file went with a removal that failed: %v", err)
	}
	if err := os.WriteFile(p.recvAudit.Path(), good, 0o600); err != nil {
		t.Fatal(err)
	}

	// The gateway's certificate has expired: its record would be refused,
	// so the image stays.
	skew.Store(int64(time.Until(p.to.Certificate().NotAfter.Add(time.Minute))))
	if _, err := p.recv.RemoveImage("vm", "test"); err == nil || !strings.Contains(err.Error(), "renew") {
		t.Fatalf("removal under an expired certificate: %v", err)
	}
	if _, err := os.Stat(img.Path); err != nil {
		t.Fatalf("the image's file went with a removal its record could not follow: %v", err)
	}
	skew.Store(0)

	got, err := p.recv.RemoveImage("vm", "CHG-1234: pii-eu leaves zrh")
	if err != nil || got.Root != img.Root {
		t.Fatalf("remove: %+v, %v", got, err)
	}
	if _, err := os.Stat(img.Path); !os.IsNotExist(err) {
		t.Errorf("the image's file is still there: %v", err)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Error("the catalog still lists the image")
	}
	if pending, _ := list[removal](p.recvJ, bucketRemoving); len(pending) != 0 {
		t.Errorf("removals left under way: %+v", pending)
	}
	recs := p.recvRecords(t)
	last := recs[len(recs)-1]
	if last.Event != "image" || last.Fields["action"] != "removed" || last.Fields["name"] != "vm" || last.Fields["class"] != "pii-eu" ||
		last.Fields["root"] != img.Root.String() || last.Fields["reason"] != "CHG-1234: pii-eu leaves zrh" {
		t.Errorf("audit record of the removal: %+v", last)
	}
	if _, err := p.recv.RemoveImage("vm", "test"); err == nil || !strings.Contains(err.Error(), "no stored image") {
		t.Errorf("removing it again: %v", err)
	}
	if _, err := p.recv.RemoveImage("../vm", "test"); err == nil || !strings.Contains(err.Error(), "image name") {
		t.Errorf("a path for a name: %v", err)
	}
	if _, err := p.recv.RemoveImage("vm", " "); err == nil || !strings.Contains(err.Error(), "say why") {
		t.Errorf("no reason: %v", err)
	}

	// Stored again, then a stop after its catalog entry was taken out
	// and before the record: the next start records it and removes it.
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	img, _ = p.recvJ.Image("vm")
	if _, err := p.recvJ.takeForRemoval("vm", "CHG-42: decommissioned"); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReceiver(p.recv.cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img.Path); !os.IsNotExist(err) {
		t.Errorf("the file of a removal cut short is still there after a start: %v", err)
	}
	recs = p.recvRecords(t)
	if last := recs[len(recs)-1]; last.Fields["action"] != "removed" || last.Fields["recovered"] != true || last.Fields["root"] != img.Root.String() || last.Fields["reason"] != "CHG-42: decommissioned" {
		t.Errorf("audit record of the removal finished at a start: %+v", last)
	}
	if pending, _ := list[removal](p.recvJ, bucketRemoving); len(pending) != 0 {
		t.Errorf("removals left under way after a start: %+v", pending)
	}

	// The same, with an audit log that cannot take the record at that
	// start: the file stays until a start that records its removal.
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	img, _ = p.recvJ.Image("vm")
	if _, err := p.recvJ.takeForRemoval("vm", "CHG-43"); err != nil {
		t.Fatal(err)
	}
	good, err = os.ReadFile(p.recvAudit.Path())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.recvAudit.Path(), append(slices.Clone(good), "not a record\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReceiver(p.recv.cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img.Path); err != nil {
		t.Fatalf("a removal finished at a start without its record: %v", err)
	}
	if err := os.WriteFile(p.recvAudit.Path(), good, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReceiver(p.recv.cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img.Path); !os.IsNotExist(err) {
		t.Errorf("the file of a removal is still there after a start that could record it: %v", err)
	}
	if recs = p.recvRecords(t); recs[len(recs)-1].Fields["reason"] != "CHG-43" {
		t.Errorf("the removal's record: %+v", recs[len(recs)-1])
	}

	// A removal cut short (its file could not be removed), then a new
	// version stored at the same path: the next start finishes the old
	// removal without taking the new version.
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	if _, err := p.recvJ.takeForRemoval("vm", "CHG-42: decommissioned"); err != nil {
		t.Fatal(err)
	}
	f2, _ := os.OpenFile(raw, os.O_WRONLY, 0) // another version, stored anew
	f2.WriteAt([]byte("v2"), 7*mib)
	f2.Close()
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReceiver(p.recv.cfg); err != nil {
		t.Fatal(err)
	}
	p.stored(raw) // catalog and file: the new version
	if pending, _ := list[removal](p.recvJ, bucketRemoving); len(pending) != 0 {
		t.Errorf("removals left under way: %+v", pending)
	}
	if _, err := p.recv.RemoveImage("vm", "test"); err != nil {
		t.Fatal(err)
	}

	// Stored again, its file lost by other means: forgotten.
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	img, _ = p.recvJ.Image("vm")
	if err := os.Remove(img.Path); err != nil {
		t.Fatal(err)
	}
	if _, err := p.recv.RemoveImage("vm", "test"); err != nil {
		t.Fatalf("removing an image whose file is gone: %v", err)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Error("the catalog still lists the image whose file was gone")
	}

	// No receive of a name opens while it is being removed.
	p.recv.mu.Lock()
	p.recv.removing["vm"] = true
	p.recv.mu.Unlock()
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err == nil || !strings.Contains(err.Error(), "being removed") {
		t.Errorf("a migration of an image being removed: %v", err)
	}
	p.recv.mu.Lock()
	delete(p.recv.removing, "vm")
	p.recv.mu.Unlock()

	// Not while a new version is being received.
	res := p.slowSend(t, 30*time.Millisecond)
	if _, err := p.recv.RemoveImage("vm", "test"); err == nil || !strings.Contains(err.Error(), "being received") {
		t.Errorf("removal during a receive of the name: %v", err)
	}
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	if _, err := p.recvJ.Image("vm"); err != nil {
		t.Errorf("the image received meanwhile: %v", err)
	}
}

// TestLongReadsEnd: re-reading a stored image (verify) ends with its
// context, and reading back a resumed receive with the receiver's stop:
// both read every byte, hours for a large image.
func TestLongReadsEnd(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 3 * mib})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	img, _ := p.recvJ.Image("vm")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := VerifyImage(ctx, img); !errors.Is(err, context.Canceled) {
		t.Fatalf("verify with its context ended: %v", err)
	}
	if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
		t.Fatalf("verify: %+v %v", rep, err)
	}

	f, err := os.Open(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rec := &RecvRecord{ID: "r1", Size: img.Manifest.Size, ChunkSize: img.Manifest.ChunkSize}
	held := func() map[int64]Hash { return maps.Clone(img.Manifest.Chunks) }
	if err := recheck(f, rec, held(), p.recvJ, p.recv.cfg.Log, func() bool { return true }); !errors.Is(err, errStopping) {
		t.Fatalf("read-back with the receiver stopping: %v", err)
	}
	durable := held()
	if err := recheck(f, rec, durable, p.recvJ, p.recv.cfg.Log, func() bool { return false }); err != nil || len(durable) != len(img.Manifest.Chunks) {
		t.Fatalf("read-back: %v, %d of %d chunks kept", err, len(durable), len(img.Manifest.Chunks))
	}
}

// TestImageNames: names of new images hold no control or invisible
// characters (they reach operators' terminals and audit records) and are
// UTF-8; names stored by earlier releases, which allowed them, can still
// be removed. No name, new or stored, holds a path separator: it names a
// file in the store, and "vm/../../tmp/x" (which the rule against a
// leading '.' lets through) would name one anywhere.
func TestImageNames(t *testing.T) {
	for name, ok := range map[string]bool{
		"vm-01.qcow2":    true,
		"Zürich-db":      true,
		"vm\x1b[2K":      false,
		"vm\u202egpj":    false,
		"vm\xff":         false,
		"../vm":          false,
		".hidden":        false,
		"vm/../../tmp/x": false,
		"a/b":            false,
		`a\b`:            false,
	} {
		if err := checkName(name); (err == nil) != ok {
			t.Errorf("checkName(%q) = %v, want ok %v", name, err, ok)
		}
	}
	if err := checkStoredName("vm\x1b[2K"); err != nil {
		t.Errorf("a name an earlier release stored cannot be removed: %v", err)
	}
	if err := checkStoredName("vm/../../tmp/x"); err == nil {
		t.Error("a stored name holding a path separator is taken: its removal would remove a file outside the store")
	}
}

// TestRemovalUnderWayKeepsANewerVersion: a removal left under way (its
// start could not record it, or its last steps failed after the file
// went) is finished at a later start, and takes only the file it began
// with: not a newer version stored at the path meanwhile, which the file
// system may have given the old file's inode number.
func TestRemovalUnderWayKeepsANewerVersion(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 3 * mib})
	version := func(v byte) *ImageRecord {
		t.Helper()
		f, err := os.OpenFile(raw, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte{'v', v}, 7*mib)
		f.Close()
		if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
			t.Fatal(err)
		}
		img, err := p.recvJ.Image("vm")
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	restart := func() {
		t.Helper()
		if _, err := NewReceiver(p.recv.cfg); err != nil {
			t.Fatal(err)
		}
	}
	kept := func(what string) {
		t.Helper()
		if _, err := p.recvJ.Image("vm"); err != nil {
			t.Fatalf("%s: catalog: %v", what, err)
		}
		if _, err := os.Stat(filepath.Join(p.store, "vm.raw")); err != nil {
			t.Fatalf("%s: the catalog lists vm, but the start that finished the old removal took its file: %v", what, err)
		}
	}

	// Stored again over a removal whose file is still there (a stop
	// before its record, and a start whose audit log refused it): the
	// old file went with the rename, and the removal has none left.
	version('1')
	rm, err := p.recvJ.takeForRemoval("vm", "CHG-7")
	if err != nil || rm.File == nil {
		t.Fatalf("removal %+v, %v; want the file's identity in it", rm, err)
	}
	version('2')
	pending, _ := list[removal](p.recvJ, bucketRemoving)
	if len(pending) != 1 || pending[0].Inode != 0 || pending[0].File != nil {
		t.Fatalf("removal under way after its path was stored again: %+v; want no file left to it", pending)
	}
	restart()
	kept("stored again")

	// A removal whose file could not be removed (its error says the next
	// start removes it), and the operator's fix (a chmod, which changes
	// the file's ctime, not its content): the next start removes it.
	old := version('3')
	if _, err := p.recvJ.takeForRemoval("vm", "CHG-9"); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(old.Path, 0o640); err != nil {
		t.Fatal(err)
	}
	restart()
	if _, err := os.Stat(old.Path); !os.IsNotExist(err) {
		t.Fatalf("a removal whose file's mode changed since it began: the file is still there (%v)", err)
	}

	// A removal whose file went, its entry left (the directory's sync
	// failed), and a newer version given that file's inode number: told
	// apart by the rest of its identity.
	old = version('4')
	rm, err = p.recvJ.takeForRemoval("vm", "CHG-8")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(old.Path); err != nil {
		t.Fatal(err)
	}
	version('5')
	now, err := sourceID(old.Path)
	if err != nil {
		t.Fatal(err)
	}
	reused := *rm.File
	reused.Inode, reused.Dev = now.Inode, now.Dev
	rm.File, rm.Inode = &reused, now.Inode
	if err := p.recvJ.put(bucketRemoving, "vm", rm); err != nil {
		t.Fatal(err)
	}
	restart()
	kept("inode number given out again")
	if pending, _ := list[removal](p.recvJ, bucketRemoving); len(pending) != 0 {
		t.Errorf("removals left under way after a start: %+v", pending)
	}
}
