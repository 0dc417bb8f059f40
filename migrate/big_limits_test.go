package migrate

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestImageLargerThanTheStoreTakes: an image larger than the store's file
// system takes in one file (ext4: 16 TiB less 4 KiB) is refused saying
// so and what to do, not "file too large", and leaves no receive behind
// to be listed as interrupted for a week.
func TestImageLargerThanTheStoreTakes(t *testing.T) {
	q := qemuImg(t)
	qio, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("qemu-io not installed")
	}
	p := newPair(t, "DE")
	const size = int64(17) << 40
	probe := filepath.Join(p.store, "probe")
	if f, err := os.Create(probe); err != nil {
		t.Fatal(err)
	} else {
		err = f.Truncate(size)
		f.Close()
		os.Remove(probe)
		if !errors.Is(err, syscall.EFBIG) {
			t.Skipf("the store's file system takes a file of 17 TiB (%v)", err)
		}
	}
	img := filepath.Join(p.dir, "huge.qcow2")
	if out, err := exec.Command(q, "create", "-q", "-f", "qcow2", img, fmt.Sprint(size)).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if out, err := exec.Command(qio, "-f", "qcow2", "-c", fmt.Sprintf("write -P 7 %d 65536", int64(1)<<40), img).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	for _, format := range []string{FormatRaw, FormatQcow2} {
		cfg := p.config(img, "pii-eu")
		cfg.Format = format
		_, err := Send(context.Background(), cfg)
		if err == nil || !strings.Contains(err.Error(), "on a file system that takes no file of 17.0 TiB") || !strings.Contains(err.Error(), "or send it to another destination") ||
			fileSystemNote(p.store) != "" && !strings.Contains(err.Error(), fileSystemNote(p.store)) {
			t.Fatalf("%s: %v; want a refusal saying the store's file system takes no file that large, and what to do", format, err)
		}
		if u, err := p.recv.Unfinished(); err != nil || len(u) != 0 {
			t.Fatalf("%s: receives left behind: %+v %v", format, u, err)
		}
		if left, _ := os.ReadDir(filepath.Join(p.store, ".incoming")); len(left) != 0 {
			t.Fatalf("%s: incoming files left behind: %v", format, left)
		}
	}
}

// TestFileSystemNote: the refusal names ext4's limit only on ext4, and
// says nothing of a file system it cannot tell.
func TestFileSystemNote(t *testing.T) {
	for _, tc := range []struct {
		magic int64
		want  string
	}{
		{unix.EXT4_SUPER_MAGIC, "it is ext4 (or ext2/3), which takes 16 TiB less 4 KiB at most"},
		{unix.XFS_SUPER_MAGIC, "it is XFS"},
		{unix.TMPFS_MAGIC, "it is tmpfs"},
		{unix.NFS_SUPER_MAGIC, "it is NFS, whose server's file system sets the limit"},
		{0x12345678, ""},
	} {
		if got := fileSystemNoteOf(tc.magic); got != tc.want {
			t.Errorf("file system %#x: %q, want %q", tc.magic, got, tc.want)
		}
		if tc.magic != unix.EXT4_SUPER_MAGIC && strings.Contains(fileSystemNoteOf(tc.magic), "16 TiB") {
			t.Errorf("file system %#x is said to take 16 TiB at most", tc.magic)
		}
	}
}
