package audit

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// migration matches the records of migration id.
func migration(id string) func(*Record) bool {
	return func(r *Record) bool { return r.Fields["migration_id"] == id }
}

// TestFindForRecovery: Find returns the record a gateway wrote, signed by
// it and whole, and nothing for a record not written, another gateway's,
// one changed since, one dated before since, or an append cut short.
func TestFindForRecovery(t *testing.T) {
	id, _ := identity(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	if rec, err := l.Find("gw1", time.Time{}, migration("a")); rec != nil || err != nil {
		t.Fatalf("no log: %v %v; want nothing", rec, err)
	}
	for i, m := range []string{"a", "b", "c"} {
		if _, err := l.Append(id, "migration", map[string]any{"migration_id": m}, t0.Add(time.Duration(i)*time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	find := func(node string, since time.Time, m string) *Record {
		t.Helper()
		rec, err := l.Find(node, since, migration(m))
		if err != nil {
			t.Fatal(err)
		}
		return rec
	}
	if rec := find("gw1", t0, "b"); rec == nil || rec.Seq != 2 {
		t.Fatalf("found %+v; want record 2", rec)
	}
	if rec := find("gw1", t0, "d"); rec != nil {
		t.Errorf("found %+v for a record not written", rec)
	}
	if rec := find("gw2", t0, "b"); rec != nil {
		t.Errorf("found gw1's record as gw2's: %+v", rec)
	}
	if rec := find("gw1", t0.Add(90*time.Second), "b"); rec != nil {
		t.Errorf("found %+v, dated before since", rec)
	}

	b, _ := os.ReadFile(path)
	changed := strings.Replace(string(b), `"migration_id":"b"`, `"migration_id":"d"`, 1)
	os.WriteFile(path, []byte(changed), 0o600)
	if rec := find("gw1", t0, "d"); rec != nil {
		t.Errorf("found a record changed since: %+v", rec)
	}

	// The last record without its newline, then cut short: never
	// acknowledged, neither is the one written.
	lines := strings.SplitAfter(string(b), "\n")
	last := strings.TrimSuffix(lines[2], "\n")
	for _, tail := range []string{last, last[:len(last)/2]} {
		os.WriteFile(path, []byte(lines[0]+lines[1]+tail), 0o600)
		if rec := find("gw1", t0, "c"); rec != nil {
			t.Errorf("found %+v in bytes after the last newline", rec)
		}
		if rec := find("gw1", t0, "a"); rec == nil || rec.Seq != 1 {
			t.Errorf("before a tail: found %+v; want record 1", rec)
		}
	}
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.ReaderAt
	n atomic.Int64
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// TestFindForRecoveryReadsOnlyTheEnd: a log of years is not read whole
// for a record written at a stop: Find reads back to the first record
// dated before since, and no further than maxFind when every record is
// later (a clock that ran ahead dates every record after as its one).
func TestFindForRecoveryReadsOnlyTheEnd(t *testing.T) {
	id, _ := identity(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	// 8,000 records of the past, as long as a migration's (2.5 KiB).
	var old bytes.Buffer
	pad := strings.Repeat("x", 2400)
	for i := range 8000 {
		fmt.Fprintf(&old, `{"seq":%d,"time":"%s","node":"gw1","event":"migration","fields":{"migration_id":"x","pad":"%s"},"prev":"","cert":null}`+"\n",
			i+1, t0.Add(-time.Hour).Format(time.RFC3339Nano), pad)
	}
	if err := os.WriteFile(path, old.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	l := Open(path)
	for i, m := range []string{"a", "b", "c"} {
		if _, err := l.Append(id, "migration", map[string]any{"migration_id": m, "pad": pad}, t0.Add(time.Duration(i)*time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	for _, m := range []string{"a", "nowhere"} {
		r := &countingReader{r: f}
		rec, err := findIn(r, fi.Size(), "gw1", t0, migration(m))
		if err != nil || (m == "a") != (rec != nil) {
			t.Fatalf("migration %s: found %+v, %v", m, rec, err)
		}
		if n := r.n.Load(); n > 256<<10 {
			t.Errorf("migration %s: read %d KiB of a %d MiB log to find a record of its last minutes", m, n>>10, fi.Size()>>20)
		}
	}

	defer func(was int64) { maxFind = was }(maxFind)
	maxFind = 1 << 20
	r := &countingReader{r: f}
	if rec, err := findIn(r, fi.Size(), "gw1", time.Time{}, migration("nowhere")); rec != nil || err != nil {
		t.Fatal(rec, err)
	}
	if n := r.n.Load(); n > maxFind+64<<10 {
		t.Errorf("read %d KiB, with no record before since; want no more than %d KiB", n>>10, (maxFind+64<<10)>>10)
	}
}
