package migrate

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestVerifyQcow2OddSize: an image whose size is no whole number of
// 512-byte sectors is stored as qcow2 rounded up to one, the manifest
// keeping the size sent. migrate verify takes the intact image, and still
// refuses one written in that padding or grown past it.
func TestVerifyQcow2OddSize(t *testing.T) {
	q := qemuImg(t)
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	size := int64(4*mib + 12345)
	makeRaw(t, raw, size, map[int64]int{0: 4096, size - 1000: 1000})
	cfg := p.config(raw, "pii-eu")
	cfg.Format = FormatQcow2
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	compare(t, raw, img.Path)
	rep, err := VerifyImage(context.Background(), img)
	if err != nil || !rep.OK {
		t.Fatalf("migrate verify of the image just stored: %+v, %v", rep, err)
	}

	// The last cluster holds data, so it is mapped where the receiver
	// wrote it: the padding's first byte is at the data's start plus size.
	f, err := os.OpenFile(img.Path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	at := qcowDataStart(size) + size
	if _, err := f.WriteAt([]byte{0x5a}, at); err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyImage(context.Background(), img); err == nil || !strings.Contains(err.Error(), "padding") {
		t.Errorf("a byte written past the manifest's end, in the sector padding: %+v, %v", rep, err)
	}
	if _, err := f.WriteAt([]byte{0}, at); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
		t.Fatalf("the padding zeros again: %+v, %v", rep, err)
	}

	if out, err := exec.Command(q, "resize", "-f", "qcow2", img.Path, "+512").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if rep, err := VerifyImage(context.Background(), img); err == nil || !strings.Contains(err.Error(), "grown") {
		t.Errorf("an image grown a sector past its padding: %+v, %v", rep, err)
	}
}

// TestTinyToQcow2: tiny and empty raw images stored as raw and as qcow2
// are the source, qemu-img check finds the qcow2 ones clean, and migrate
// verify takes them all.
func TestTinyToQcow2(t *testing.T) {
	q := qemuImg(t)
	p := newPair(t, "DE")
	for _, size := range []int64{0, 1, 512, 65536 + 1} {
		for _, f := range []string{FormatRaw, FormatQcow2} {
			name := "tiny-" + f + "-" + string(rune('a'+size%26))
			raw := filepath.Join(p.dir, name+".raw")
			blocks := map[int64]int{}
			if size > 0 {
				blocks[0] = int(min(size, 100))
			}
			makeRaw(t, raw, size, blocks)
			cfg := p.config(raw, "pii-eu")
			cfg.Format, cfg.Name = f, name
			if _, err := Send(context.Background(), cfg); err != nil {
				t.Errorf("size %d as %s: %v", size, f, err)
				continue
			}
			img, err := p.recvJ.Image(name)
			if err != nil {
				t.Fatal(err)
			}
			compare(t, raw, img.Path)
			if f == FormatQcow2 {
				if out, err := exec.Command(q, "check", img.Path).CombinedOutput(); err != nil {
					t.Errorf("check: %v %s", err, out)
				}
			}
			if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
				t.Errorf("size %d as %s: verify: %+v %v", size, f, rep, err)
			}
		}
	}
}
