package migrate

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestBigImageFigures measures migrations of large images in process,
// sender and receiver over loopback: the heap's peak above where it
// started (both ends together) and the wall time of each step, with the
// destination's room on disk, for docs/BENCHMARKS.md. It prints figures
// and asserts nothing but that each image arrives whole. Not in the
// suite: SKYBRIDGE_BIG names the images, comma-separated:
//
//	raw64g raw1t raw4t             thin raw, 17 runs of 256 KiB (4 TiB + 12345 bytes for raw4t)
//	qcow64g qcow1t qcow4t qcow4t2m the same as qcow2, 64 KiB clusters (2 MiB for qcow4t2m)
//	frag                           raw, 4 KiB of data in each MiB of 50 GiB (200 MiB in 51,200 extents)
//	fragsmall                      the same over 2 GiB
//	dense4k                        1 GiB of random data in 4 KiB chunks: the most chunks a migration carries
//
// SKYBRIDGE_BIG_TO=raw or qcow2 stores them in one format only;
// SKYBRIDGE_BIG_RESUME=1 interrupts each migration at half its chunks
// and measures the resume. For example:
//
//	SKYBRIDGE_BIG=raw4t,qcow4t,frag go test -run TestBigImageFigures -v -timeout 30m ./migrate/
func TestBigImageFigures(t *testing.T) {
	if os.Getenv("SKYBRIDGE_BIG") == "" {
		t.Skip("SKYBRIDGE_BIG names no image to measure")
	}
	q := qemuImg(t)
	const gib, tib = int64(1) << 30, int64(1) << 40
	type image struct {
		name, format string
		size         int64
		blocks       map[int64]int // offset → length of data
		cluster      string        // qcow2's
		chunk        int64         // set: skybridge's choice overridden, and every chunk data
	}
	scattered := func(size int64) map[int64]int {
		b := map[int64]int{size - 256<<10: 256 << 10} // an extent ending at the very end
		for k := range int64(16) {
			b[(size/16*k+k*12345%mib)&^4095] = 256 << 10
		}
		return b
	}
	everyMiB := func(size int64) map[int64]int {
		b := map[int64]int{}
		for off := int64(0); off < size; off += mib {
			b[off+8192] = 4096
		}
		return b
	}
	var images []image
	for _, name := range strings.Split(os.Getenv("SKYBRIDGE_BIG"), ",") {
		switch name {
		case "raw64g", "raw1t", "raw4t":
			size := map[string]int64{"raw64g": 64 * gib, "raw1t": tib, "raw4t": 4*tib + 12345}[name]
			images = append(images, image{name: name, format: FormatRaw, size: size, blocks: scattered(size)})
		case "qcow64g", "qcow1t", "qcow4t", "qcow4t2m":
			size := map[string]int64{"qcow64g": 64 * gib, "qcow1t": tib, "qcow4t": 4 * tib, "qcow4t2m": 4 * tib}[name]
			cluster := map[bool]string{false: "64K", true: "2M"}[name == "qcow4t2m"]
			images = append(images, image{name: name, format: FormatQcow2, size: size, blocks: scattered(size), cluster: cluster})
		case "frag":
			images = append(images, image{name: name, format: FormatRaw, size: 50 * gib, blocks: everyMiB(50 * gib)})
		case "fragsmall":
			images = append(images, image{name: name, format: FormatRaw, size: 2 * gib, blocks: everyMiB(2 * gib)})
		case "dense4k":
			images = append(images, image{name: name, format: FormatRaw, size: MaxManifestChunks * 4096, chunk: 4096})
		default:
			t.Fatalf("SKYBRIDGE_BIG: no image %q", name)
		}
	}
	formats := []string{FormatRaw, FormatQcow2}
	if to := os.Getenv("SKYBRIDGE_BIG_TO"); to != "" {
		formats = strings.Split(to, ",")
	}
	for _, im := range images {
		t.Run(im.name, func(t *testing.T) {
			p := newPair(t, "DE")
			path := filepath.Join(p.dir, im.name+"."+im.format)
			switch {
			case im.chunk != 0:
				randomFile(t, path, im.size)
			case im.format == FormatRaw:
				makeRaw(t, path, im.size, im.blocks)
			default:
				if out, err := exec.Command(q, "create", "-q", "-f", "qcow2", "-o", "cluster_size="+im.cluster, path, fmt.Sprint(im.size)).CombinedOutput(); err != nil {
					t.Fatalf("%v %s", err, out)
				}
				var cmds []string
				for off, n := range im.blocks {
					cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 1+off%200, off, n))
				}
				qemuIO(t, path, cmds)
			}
			src, err := OpenSource(path)
			if err != nil {
				t.Fatal(err)
			}
			h, start := watchHeap(), time.Now()
			extents, err := src.Extents()
			if err != nil {
				t.Fatal(err)
			}
			tList, hList := time.Since(start), h.end()
			h, start = watchHeap(), time.Now()
			chunk, err := chunkSizeFor(extents, src.Size())
			if err != nil {
				t.Fatal(err)
			}
			if im.chunk != 0 {
				chunk = im.chunk
			}
			cands := candidates(extents, src.Size(), chunk)
			room := sparseBytes(extents, src.Size(), chunk)
			tPlan, hPlan := time.Since(start), h.end()
			src.Close()
			t.Logf("%s: %d bytes virtual, %d on disk; %d extents listed in %s (heap +%d KiB); %d chunks of %d, %d bytes of room, planned in %s (heap +%d KiB)",
				im.name, im.size, diskBytes(t, path), len(extents), tList.Round(time.Microsecond), hList>>10, len(cands), chunk, room, tPlan.Round(time.Microsecond), hPlan>>10)

			for _, to := range formats {
				cfg := p.config(path, "pii-eu")
				cfg.Format, cfg.Name, cfg.ChunkSize = to, im.name+"-"+to, im.chunk
				if os.Getenv("SKYBRIDGE_BIG_RESUME") != "" {
					first := cfg
					ctx, cancel := context.WithCancel(context.Background())
					first.Progress = func(pr Progress) {
						if pr.Stats.ChunksDone >= len(cands)/2 {
							cancel()
						}
					}
					rec, err := Send(ctx, first)
					cancel()
					if err == nil {
						t.Fatal("the migration was not interrupted")
					}
					waitIdle(t, p.recv, rec.ID)
					cfg.ID = rec.ID
				}
				var mu sync.Mutex
				at := map[string]time.Time{}
				cfg.Progress = func(pr Progress) {
					mu.Lock()
					defer mu.Unlock()
					if _, ok := at[pr.Phase]; !ok {
						at[pr.Phase] = time.Now()
					}
				}
				h, start = watchHeap(), time.Now()
				rec, err := Send(context.Background(), cfg)
				tSend, hSend := time.Since(start), h.end()
				if err != nil {
					t.Fatalf("%s → %s: %v", im.name, to, err)
				}
				img, err := p.recvJ.Image(cfg.Name)
				if err != nil {
					t.Fatal(err)
				}
				start = time.Now()
				compare(t, path, img.Path)
				tCompare := time.Since(start)
				h, start = watchHeap(), time.Now()
				rep, err := VerifyImage(context.Background(), img)
				tVerify, hVerify := time.Since(start), h.end()
				if err != nil || !rep.OK {
					t.Fatalf("verify: %+v %v", rep, err)
				}
				mu.Lock()
				t.Logf("%s → %s: %s (answer to the offer %s, transfer %s, commit at the receiver %s), heap +%d MiB; stored on %d bytes of disk (qemu-img compare: identical, %s); verify %s, heap +%d KiB; %d chunks sent, %d resumed",
					im.name, to, tSend.Round(time.Millisecond), at["transfer"].Sub(at["offered"]).Round(time.Millisecond), at["commit"].Sub(at["transfer"]).Round(time.Millisecond),
					at["done"].Sub(at["commit"]).Round(time.Millisecond), hSend>>20, diskBytes(t, img.Path), tCompare.Round(time.Millisecond), tVerify.Round(time.Millisecond), hVerify>>10,
					rec.Stats.ChunksSent, rec.Stats.ChunksResumed)
				mu.Unlock()
				os.Remove(img.Path) // the disk is shared
			}
		})
	}
}

// randomFile writes size bytes of random data at path, a few MiB at a
// time.
func randomFile(t testing.TB, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4*mib)
	for off := int64(0); off < size; off += int64(len(buf)) {
		rand.Read(buf)
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
			t.Fatal(err)
		}
	}
}

// heapPeak is the live heap's peak, sampled every few milliseconds.
type heapPeak struct {
	stop       chan struct{}
	done       sync.WaitGroup
	base, peak uint64
}

func heapNow() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// watchHeap starts sampling the heap, from a collection.
func watchHeap() *heapPeak {
	runtime.GC()
	h := &heapPeak{stop: make(chan struct{}), base: heapNow()}
	h.peak = h.base
	h.done.Go(func() {
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-h.stop:
				return
			case <-t.C:
				h.peak = max(h.peak, heapNow())
			}
		}
	})
	return h
}

// end stops the sampling and returns the peak above the start, in bytes.
func (h *heapPeak) end() int64 {
	close(h.stop)
	h.done.Wait()
	h.peak = max(h.peak, heapNow())
	return int64(h.peak) - int64(h.base)
}

// qemuIO runs the qemu-io commands on a qcow2 image, a few thousand at a
// time.
func qemuIO(t testing.TB, img string, cmds []string) {
	t.Helper()
	io, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("qemu-io not installed")
	}
	for len(cmds) > 0 {
		n := min(len(cmds), 2000)
		args := []string{"-f", "qcow2"}
		for _, c := range cmds[:n] {
			args = append(args, "-c", c)
		}
		if out, err := exec.Command(io, append(args, img)...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-io: %v\n%s", err, out)
		}
		cmds = cmds[n:]
	}
}
