package migrate

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestBigThinImagesMigrate: thin images of 2 TiB, past 2^32 sectors,
// migrate in the time and room of their data, raw into qcow2 and qcow2
// of 2 MiB clusters into raw: a size not a whole number of chunks nor of
// sectors, data across a chunk boundary and up to the very end, and the
// stored image what qemu-img reads the source as, and as sparse.
func TestBigThinImagesMigrate(t *testing.T) {
	q := qemuImg(t)
	qio, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("qemu-io not installed")
	}
	p := newPair(t, "DE")
	const size = int64(2)<<40 + 12345
	raw := filepath.Join(p.dir, "thin.raw")
	makeRaw(t, raw, size, map[int64]int{0: 64 << 10, 1<<41 - 100: 300, 1 << 40: mib, size - 4096: 4096})
	qc := filepath.Join(p.dir, "thin.qcow2")
	if out, err := exec.Command(q, "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", qc, "2T").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if out, err := exec.Command(qio, "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", fmt.Sprintf("write -P 2 %d 128k", int64(1)<<41-128<<10),
		"-c", fmt.Sprintf("write -P 3 %d 1m", int64(1)<<40-512<<10), qc).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	for _, tc := range []struct{ src, format string }{{raw, FormatQcow2}, {qc, FormatRaw}} {
		cfg := p.config(tc.src, "pii-eu")
		cfg.Format, cfg.Name = tc.format, filepath.Base(tc.src)+"-to-"+tc.format
		rec, err := Send(context.Background(), cfg)
		if err != nil {
			t.Fatalf("%s → %s: %v", tc.src, tc.format, err)
		}
		img, err := p.recvJ.Image(cfg.Name)
		if err != nil {
			t.Fatal(err)
		}
		compare(t, tc.src, img.Path)
		if tc.format == FormatQcow2 {
			if out, err := exec.Command(q, "check", img.Path).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img check: %v\n%s", err, out)
			}
		}
		if got := diskBytes(t, img.Path); got > 2*mib+512<<10 {
			t.Fatalf("%s → %s: the destination takes %d bytes on disk for under 2 MiB of data", tc.src, tc.format, got)
		}
		if rec.Stats.BytesRead > 8*mib {
			t.Fatalf("%s → %s: %+v; read more than the chunks of its data", tc.src, tc.format, rec.Stats)
		}
		if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
			t.Fatalf("verify: %+v %v", rep, err)
		}
	}
}
