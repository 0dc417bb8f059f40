// Package smalldisk gives tests a small file system of their own, to
// fill: what a gateway does when its disk is full is tested on a real
// one (tmpfs), not on an error made up for the test.
package smalldisk

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Mount mounts a tmpfs of the given size (mount(8)'s "72m") on dir,
// created if need be, until the test ends. It needs root: without, the
// test is skipped, or fails under CI, which has it.
func Mount(t testing.TB, dir, size string) {
	t.Helper()
	NeedRoot(t)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size+",mode=0700"); err != nil {
		t.Fatalf("mount a tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
}

// NeedRoot skips the test without root, or fails it under CI, which has
// it: for a test to say so before it sets up what Mount comes after.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("mounting a small file system needs root, which CI has")
		}
		t.Skip("needs root to mount a small file system")
	}
}

// Fill writes a file into dir until its file system is full, to the last
// byte, and returns a function that removes it.
func Fill(t testing.TB, dir string) (free func()) {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for _, n := range []int{len(buf), 4096, 1} {
		for {
			if _, err := f.Write(buf[:n]); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					t.Fatal(err)
				}
				break
			}
		}
	}
	return func() {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
	}
}

// DeepDir makes a directory below base whose path is near PATH_MAX, and
// returns it: a journal record naming a file there outgrows the free
// pages a small journal holds, so that writing it needs the disk's room.
func DeepDir(t testing.TB, base string) string {
	t.Helper()
	dir := base
	for range 12 {
		dir = filepath.Join(dir, strings.Repeat("d", 250))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}
