package migrate

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// BenchmarkSendLoopback moves a 256 MiB image of random data (the worst
// case: nothing to skip, nothing to compress) from a sender to a receiver
// over loopback TCP, in process: the engine's own cost (read, BLAKE3,
// the zstd attempt, TLS, the journals, writing and verifying), without
// WireGuard. Profile it with -cpuprofile to see where a migration's CPU
// goes.
func BenchmarkSendLoopback(b *testing.B) {
	p := newPair(b, "DE")
	img := filepath.Join(p.dir, "noise.raw")
	f, err := os.Create(img)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 4*mib)
	const size = 256 * mib
	for off := int64(0); off < size; off += int64(len(buf)) {
		rand.Read(buf)
		f.WriteAt(buf, off)
	}
	f.Close()
	b.SetBytes(size)
	b.ResetTimer()
	cpu0 := processCPU(b)
	for i := range b.N {
		cfg := p.config(img, "pii-eu")
		cfg.Name = fmt.Sprintf("noise%d", i)
		if _, err := Send(context.Background(), cfg); err != nil {
			b.Fatal(err)
		}
	}
	// Both ends run in this process: its CPU time is the engine's whole
	// cost, the figure the migration target (CPU-s per GiB) is about.
	b.ReportMetric((processCPU(b)-cpu0).Seconds()/(float64(b.N)*size/(1<<30)), "cpu-s/GiB")
}

func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
