package mesh

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http/httptrace"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// renames counts the files renamed into watched directories (how
// atomicfile replaces a file: every write of it), by name.
type renames struct {
	fd    int
	names map[int32]string // watch descriptor: directory
}

func watchRenames(t *testing.T, dirs ...string) *renames {
	t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	r := &renames{fd: fd, names: map[int32]string{}}
	for _, d := range dirs {
		wd, err := syscall.InotifyAddWatch(fd, d, syscall.IN_MOVED_TO)
		if err != nil {
			t.Fatal(err)
		}
		r.names[int32(wd)] = d
	}
	return r
}

// count returns how often each file (directory/name) was renamed into
// place since the last count.
func (r *renames) count(t *testing.T) map[string]int {
	t.Helper()
	out := map[string]int{}
	buf := make([]byte, 64<<10)
	for {
		n, err := syscall.Read(r.fd, buf)
		if errors.Is(err, syscall.EAGAIN) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		for off := 0; off+syscall.SizeofInotifyEvent <= n; {
			ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := buf[off+syscall.SizeofInotifyEvent : off+syscall.SizeofInotifyEvent+int(ev.Len)]
			out[filepath.Join(r.names[ev.Wd], string(bytes.TrimRight(name, "\x00")))]++
			off += syscall.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

// TestEnrollmentsTogetherWrittenTogether: the newcomers of a burst that
// enrol at once have their certificates recorded by one write of the CA's
// index and their tokens' use by one write of the burst record, not one
// of each a newcomer. Both files are written whole, with an fsync, and
// grow with every gateway enrolled: one write each took 2,000 newcomers
// nearly four minutes, and of those behind one address, 16 served at a
// time, over a hundred gave up.
func TestEnrollmentsTogetherWrittenTogether(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	hq := startEnroller(t, ca, dir, &syncbuf.Buffer{})
	const n = maxEnrollPerSource
	asks := openStorm(t, hq, n, time.Hour, 0)
	written := watchRenames(t, ca.Dir(), hq.g.s.StateDir)

	// The enrollments come while the gateway is busy (the test holds
	// what serving one takes), and all wait.
	e := hq.g.enroll
	e.mu.Lock()
	var sent sync.WaitGroup
	sent.Add(n)
	var wg sync.WaitGroup
	res := make([]*enrollResponse, n)
	errs := make([]error, n)
	for i, a := range asks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var once sync.Once
			ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
				WroteRequest: func(httptrace.WroteRequestInfo) { once.Do(sent.Done) },
			})
			res[i], errs[i] = postEnroll(ctx, a.tok, a.body, slog.New(slog.DiscardHandler))
			once.Do(sent.Done)
		}()
	}
	sent.Wait()
	// Sent is not yet received: every request waits in the gateway once
	// its handler is in enrol.
	waitUntil(t, 10*time.Second, "every enrollment to wait in the gateway", func() bool { return goroutinesIn("mesh.(*Gateway).enrol(") == n })
	e.mu.Unlock()
	wg.Wait()

	ips := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("enrollment %d: %v", i, errs[i])
		}
		c, err := certs.ParseCertificatesPEM(res[i].Certificate)
		if err != nil || len(c) != 1 {
			t.Fatal(c, err)
		}
		ips[c[0].IPAddresses[0].String()] = true
	}
	if len(ips) != n {
		t.Fatalf("%d newcomers got %d overlay addresses", n, len(ips))
	}
	got := written.count(t)
	index, book := got[filepath.Join(ca.Dir(), "issued.json")], got[hq.g.state.path(fileBursts)]
	// The first comes alone, while the others are still on their way;
	// the index is also written for the endpoint's own certificate, at
	// the first handshake.
	if index > 3 || book > 2 {
		t.Errorf("%d enrollments at once wrote the CA's index %d times and the burst record %d times; want a few writes each", n, index, book)
	}
	// What the one write recorded is every token's use.
	bk, err := hq.g.state.loadBursts()
	if err != nil {
		t.Fatal(err)
	}
	usedN := 0
	for _, r := range bk.Bursts {
		for _, tk := range r.Tokens {
			if tk.Used != nil && tk.Serial != "" && len(tk.Cert) > 0 {
				usedN++
			}
		}
	}
	if usedN != n {
		t.Errorf("the burst record on disk has %d tokens used, want %d", usedN, n)
	}
}
