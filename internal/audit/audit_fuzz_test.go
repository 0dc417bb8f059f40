package audit

import (
	"bytes"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

func fuzzIdentity(f *testing.F) (*certs.NodeIdentity, *certs.TrustBundle) {
	ca, err := certs.InitCA(filepath.Join(f.TempDir(), "ca"), certs.InitOptions{Now: t0.Add(-time.Hour)})
	if err != nil {
		f.Fatal(err)
	}
	id, err := ca.IssueIdentity(certs.Attributes{Node: "gw1", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.MustParseAddr("100.96.0.1")}, 24*time.Hour, t0)
	if err != nil {
		f.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		f.Fatal(err)
	}
	return id, tb
}

// FuzzVerify: a damaged or forged log is refused or verified, never
// crashes Verify; what verifies counts no more records than it has
// lines, and its head check neither crashes.
func FuzzVerify(f *testing.F) {
	id, tb := fuzzIdentity(f)
	path := filepath.Join(f.TempDir(), "audit.log")
	l := Open(path)
	for i := range 2 {
		if _, err := l.Append(id, "migration", map[string]any{"n": i, "class": "pii-eu"}, t0.Add(time.Duration(i)*time.Minute)); err != nil {
			f.Fatal(err)
		}
	}
	good, _ := os.ReadFile(path)
	head, _ := os.ReadFile(path + headSuffix)
	f.Add(good, head)
	f.Add(good[:len(good)-5], head)
	f.Add([]byte("{}\n"), []byte(`{"seq":1,"sha256":""}`))
	f.Fuzz(func(t *testing.T, log, head []byte) {
		rep, err := Verify(bytes.NewReader(log), tb)
		if rep == nil {
			t.Fatalf("no report (err %v)", err)
		}
		if lines := bytes.Count(log, []byte("\n")); rep.Records > lines {
			t.Fatalf("%d records verified in %d lines", rep.Records, lines)
		}
		dir := t.TempDir()
		p := filepath.Join(dir, "audit.log")
		os.WriteFile(p, log, 0o600)
		os.WriteFile(p+headSuffix, head, 0o600)
		Open(p).CheckHead()
	})
}

// FuzzAppendVerify: whatever fields a record is given, the log verifies:
// the record is signed as Verify reads it back.
func FuzzAppendVerify(f *testing.F) {
	id, tb := fuzzIdentity(f)
	f.Add("class", "pii-eu", 3.0, int64(1<<62), "migration")
	f.Add("\xff", "a\u2028b\x00\xfe", math.Copysign(0, -1), int64(-1), "migration")
	f.Add("k", "v", 1.0, int64(1), "\xc0")
	f.Fuzz(func(t *testing.T, key, value string, x float64, n int64, event string) {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return // json.Marshal refuses them: Append says so
		}
		path := filepath.Join(t.TempDir(), "audit.log")
		l := Open(path)
		fields := map[string]any{key: value, "x": x, "n": n, "nested": map[string]any{key: []any{value, x}}}
		for i := range 2 {
			if _, err := l.Append(id, event, fields, t0.Add(time.Duration(i)*time.Second)); err != nil {
				t.Fatalf("append: %v", err)
			}
		}
		b, _ := os.ReadFile(path)
		rep, err := Verify(bytes.NewReader(b), tb)
		if err != nil || rep.Records != 2 {
			t.Fatalf("a log as written does not verify: %+v %v\n%s", rep, err, b)
		}
		if err := l.CheckHead(); err != nil {
			t.Fatalf("head of a log as written: %v", err)
		}
	})
}
