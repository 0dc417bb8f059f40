package certs

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBenchCAIssue measures the file-backed CA issuing a burst's
// gateway certificates one at a time (Issue: one read and one write of
// the whole index each) and in batches (IssueMany), on this disk.
//
//	SKYBRIDGE_BENCH=1 go test -count=1 -v -run TestBenchCAIssue ./certs/
//	knobs: SKYBRIDGE_BENCH_ISSUES=2000 SKYBRIDGE_BENCH_BATCH=1,16
func TestBenchCAIssue(t *testing.T) {
	if os.Getenv("SKYBRIDGE_BENCH") == "" {
		t.Skip("SKYBRIDGE_BENCH=1 runs it")
	}
	n := 2000
	if v, err := strconv.Atoi(os.Getenv("SKYBRIDGE_BENCH_ISSUES")); err == nil && v > 0 {
		n = v
	}
	batches := []int{1, 16}
	if v := os.Getenv("SKYBRIDGE_BENCH_BATCH"); v != "" {
		batches = nil
		for _, f := range strings.Split(v, ",") {
			if b, err := strconv.Atoi(f); err == nil && b > 0 {
				batches = append(batches, b)
			}
		}
	}
	key, err := GenerateNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	for _, batch := range batches {
		ca := newTestCA(t)
		ip := netip.MustParseAddr("100.96.200.0")
		start, last, lastN := time.Now(), time.Now(), 0
		marks := map[int]bool{100: true, 500: true, 1000: true, 2000: true, n: true}
		for i := 0; i < n; {
			var reqs []IssueRequest
			for ; len(reqs) < batch && i < n; i++ {
				ip = ip.Next()
				a := testAttrs(fmt.Sprintf("burst%d-gw%d", i/64, i%64+1), fmt.Sprintf("burst%d", i/64), ip.String(), fmt.Sprintf("10.%d.%d.0/24", 100+i/64/250, i/64%250))
				reqs = append(reqs, IssueRequest{Attributes: a, PublicKey: key.Public(), TTL: time.Hour, Now: t0})
			}
			_, errs, err := ca.IssueMany(reqs)
			if err != nil {
				t.Fatal(err)
			}
			for _, err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			for m := range marks {
				if i >= m && lastN < m {
					fi, _ := os.Stat(filepath.Join(ca.Dir(), fileIndex))
					t.Logf("batches of %d: %d issued in %s; the last %d at %.1f ms each; index %d KB",
						batch, i, time.Since(start).Round(time.Millisecond), i-lastN, float64(time.Since(last).Microseconds())/1000/float64(i-lastN), fi.Size()>>10)
					last, lastN = time.Now(), i
				}
			}
		}
	}
}
