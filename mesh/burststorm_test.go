package mesh

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// stormAsk is one newcomer's enrollment, made before the storm: its
// token and the request it sends.
type stormAsk struct {
	tok  *certs.JoinToken
	body []byte
}

// openStorm opens enough burst sites on hq (MaxBurstGateways each, the
// most one may run) for n newcomers and makes each newcomer's request.
func openStorm(t testing.TB, hq *liveGateway, n int, ttl time.Duration, round int) []stormAsk {
	t.Helper()
	var asks []stormAsk
	for b := 0; len(asks) < n; b++ {
		gws := min(MaxBurstGateways, n-len(asks))
		site := BurstSite{Site: fmt.Sprintf("storm%d-%d", round, b), Provider: "aws", Region: "us-east-2", Jurisdiction: "US",
			Routes: []string{fmt.Sprintf("10.%d.%d.0/24", 100+b/250, b%250)}}
		grant, err := hq.g.BurstUp(context.Background(), BurstRequest{BurstSite: site, TTL: ttl, Gateways: gws})
		if err != nil {
			t.Fatal(err)
		}
		for _, enc := range grant.Tokens {
			tok, err := certs.ParseJoinToken(enc)
			if err != nil {
				t.Fatal(err)
			}
			key, err := certs.GenerateNodeKey()
			if err != nil {
				t.Fatal(err)
			}
			body, err := enrollBody(tok, key)
			if err != nil {
				t.Fatal(err)
			}
			asks = append(asks, stormAsk{tok, body})
		}
	}
	return asks
}

// stormResult is what a storm of enrollments measured.
type stormResult struct {
	wall      time.Duration
	latencies []time.Duration // of those enrolled
	failed    []error
	retried   int64
}

// storm has asks enrolled by conc clients at once, each as Join does it
// (postEnroll: its retries and their backoff), all from 127.0.0.1: one
// cloud NAT address.
func storm(asks []stormAsk, conc int) stormResult {
	var (
		mu      sync.Mutex
		res     stormResult
		next    atomic.Int64
		wg      sync.WaitGroup
		retried atomic.Int64
	)
	log := slog.New(retryCounter{&retried})
	start := time.Now()
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(asks) {
					return
				}
				t0 := time.Now()
				_, err := postEnroll(context.Background(), asks[i].tok, asks[i].body, log)
				took := time.Since(t0)
				mu.Lock()
				if err != nil {
					res.failed = append(res.failed, err)
				} else {
					res.latencies = append(res.latencies, took)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	res.wall, res.retried = time.Since(start), retried.Load()
	return res
}

// retryCounter counts postEnroll's "trying again" warnings.
type retryCounter struct{ n *atomic.Int64 }

func (r retryCounter) Enabled(context.Context, slog.Level) bool { return true }
func (r retryCounter) Handle(_ context.Context, rec slog.Record) error {
	if strings.Contains(rec.Message, "trying again") {
		r.n.Add(1)
	}
	return nil
}
func (r retryCounter) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r retryCounter) WithGroup(string) slog.Handler      { return r }

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return -1
	}
	return fi.Size()
}

func heapMB() float64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return float64(m.HeapAlloc) / (1 << 20)
}

func envInts(name string, def []int) []int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	var out []int
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

// TestBenchBurstStorm measures one enrolling gateway (the embedded,
// file-backed CA on this disk, real TLS, real CSRs) enrolling a burst's
// newcomers in a row and many at once, all from one address, then the
// burst's end, and what stays behind, over repeated bursts.
//
//	SKYBRIDGE_BENCH=1 go test -count=1 -v -run TestBenchBurstStorm ./mesh/
//	knobs: SKYBRIDGE_BENCH_ENROLLS=100,500,2000 SKYBRIDGE_BENCH_CONCURRENCY=1,64 SKYBRIDGE_BENCH_ROUNDS=1
func TestBenchBurstStorm(t *testing.T) {
	if os.Getenv("SKYBRIDGE_BENCH") == "" {
		t.Skip("SKYBRIDGE_BENCH=1 runs it")
	}
	rounds := envInts("SKYBRIDGE_BENCH_ROUNDS", []int{1})[0]
	for _, n := range envInts("SKYBRIDGE_BENCH_ENROLLS", []int{100, 500, 2000}) {
		for _, conc := range envInts("SKYBRIDGE_BENCH_CONCURRENCY", []int{1, 64}) {
			t.Run(fmt.Sprintf("n=%d,conc=%d", n, conc), func(t *testing.T) {
				dir := t.TempDir()
				ca := meshCA(t, dir)
				hq := startEnroller(t, ca, dir, &syncbuf.Buffer{})
				waitUntil(t, 10*time.Second, "the enrollment endpoint", func() bool { return hq.g.enroll != nil })
				heap0 := heapMB()
				for r := range rounds {
					asks := openStorm(t, hq, n, time.Hour, r)
					res := storm(asks, conc)
					heap1 := heapMB()
					t.Logf("round %d: %d enrolments, %d at once: wall %s, %.1f/s, per-op %.2f ms; latency p50 %s p99 %s max %s; failed %d, retries %d; heap %.1f MB (+%.1f)",
						r+1, n, conc, res.wall.Round(time.Millisecond), float64(len(res.latencies))/res.wall.Seconds(), float64(res.wall.Microseconds())/1000/float64(n),
						pct(res.latencies, .5).Round(time.Millisecond), pct(res.latencies, .99).Round(time.Millisecond), slices.Max(append(res.latencies, 0)).Round(time.Millisecond),
						len(res.failed), res.retried, heap1, heap1-heap0)
					if len(res.failed) > 0 {
						t.Logf("  first failure: %v", res.failed[0])
					}
					t.Logf("  files: issued.json %d B, bursts.json %d B, crl.pem %d B", fileSize(filepath.Join(ca.Dir(), "issued.json")),
						fileSize(hq.g.state.path(fileBursts)), fileSize(filepath.Join(ca.Dir(), "crl.pem")))
					start := time.Now()
					for b := 0; b*MaxBurstGateways < n; b++ {
						if _, err := hq.g.BurstDown(context.Background(), fmt.Sprintf("storm%d-%d", r, b), ""); err != nil {
							t.Fatal(err)
						}
					}
					tb := hq.g.trust.Load()
					crlLen := 0
					if c := tb.CRL(); c != nil {
						crlLen = len(c.Raw)
					}
					t.Logf("  burst down of all: %s; then issued.json %d B, bursts.json %d B, CRL %d B (%d entries); heap %.1f MB",
						time.Since(start).Round(time.Millisecond), fileSize(filepath.Join(ca.Dir(), "issued.json")), fileSize(hq.g.state.path(fileBursts)),
						crlLen, len(tb.CRL().RevokedCertificateEntries), heapMB())
				}
			})
		}
	}
}

// goroutinesIn counts the goroutines whose stack holds fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte(fn)) {
			count++
		}
	}
	return count
}

// TestEnrollmentTokenOnceUnderRace: a token presented many times at once,
// by the gateway it was given to and by others (a copied token), in one
// batch or several, enrols one key once: the asks with that key get the
// same certificate, the others hear it used, and the CA issued one
// certificate a token.
func TestEnrollmentTokenOnceUnderRace(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	hq := startEnroller(t, ca, dir, &syncbuf.Buffer{})
	const tokens, keys, asksPerKey = 4, 3, 3
	asks := openStorm(t, hq, tokens, time.Hour, 0)
	type ask struct {
		token, key int
		body       []byte
	}
	var all []ask
	for ti, a := range asks {
		for k := range keys {
			key, err := certs.GenerateNodeKey()
			if err != nil {
				t.Fatal(err)
			}
			body, err := enrollBody(a.tok, key)
			if err != nil {
				t.Fatal(err)
			}
			for range asksPerKey {
				all = append(all, ask{ti, k, body})
			}
		}
	}
	// Held while they come, so that many meet in one batch.
	e := hq.g.enroll
	e.mu.Lock()
	res := make([]*enrollResponse, len(all))
	errs := make([]error, len(all))
	var wg sync.WaitGroup
	for i, a := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i], errs[i] = postEnroll(context.Background(), asks[a.token].tok, a.body, slog.New(slog.DiscardHandler))
		}()
	}
	// At most maxEnrollPerSource are served at once from one address:
	// the others are turned away and come again.
	waitUntil(t, 10*time.Second, "enrollments waiting in the gateway", func() bool { return goroutinesIn("mesh.(*Gateway).enrol(") >= maxEnrollPerSource })
	e.mu.Unlock()
	wg.Wait()

	for ti := range tokens {
		winner := -1
		var cert []byte
		for i, a := range all {
			if a.token != ti {
				continue
			}
			switch err := errs[i]; {
			case err == nil && winner == -1:
				winner, cert = a.key, res[i].Certificate
			case err == nil && (a.key != winner || !bytes.Equal(res[i].Certificate, cert)):
				t.Errorf("token %d enrolled key %d and key %d, or one key twice with different certificates", ti, winner, a.key)
			case err != nil && !strings.Contains(err.Error(), "already used"):
				t.Errorf("token %d, key %d: %v; want it enrolled or refused as used", ti, a.key, err)
			}
		}
		if winner == -1 {
			t.Errorf("token %d enrolled no one", ti)
		}
		for i, a := range all {
			if a.token == ti && a.key == winner && errs[i] != nil {
				t.Errorf("token %d: the key it enrolled, asking again: %v", ti, errs[i])
			}
		}
	}
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range issued {
		if c.Site == "storm0-0" {
			n++
		}
	}
	if n != tokens {
		t.Errorf("the CA issued %d certificates for %d tokens", n, tokens)
	}
}
