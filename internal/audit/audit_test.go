package audit

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

var t0 = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

func identity(t *testing.T) (*certs.NodeIdentity, *certs.TrustBundle) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{Now: t0.Add(-time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	id, err := ca.IssueIdentity(certs.Attributes{Node: "gw1", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.MustParseAddr("100.96.0.1")}, 24*time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	return id, tb
}

func TestAppendVerify(t *testing.T) {
	id, tb := identity(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	for i := range 3 {
		if _, err := l.Append(id, "migration", map[string]any{"n": i, "class": "pii-eu"}, t0.Add(time.Duration(i)*time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := os.ReadFile(path)
	rep, err := Verify(bytes.NewReader(b), tb)
	if err != nil || rep.Records != 3 {
		t.Fatalf("verify: %+v %v", rep, err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("audit log mode %04o", st.Mode().Perm())
	}
	lines := strings.SplitAfter(string(b), "\n")

	_, foreignTB := identity(t)
	for name, tc := range map[string]struct {
		log  string
		tb   *certs.TrustBundle
		want string
	}{
		"changed field":     {strings.Replace(string(b), `"class":"pii-eu"`, `"class":"public"`, 1), tb, "line 1: signature does not verify"},
		"removed record":    {lines[0] + lines[2], tb, "line 2: chain broken"},
		"reordered":         {lines[1] + lines[0] + lines[2], tb, "line 1: chain broken"},
		"cut mid-record":    {lines[0] + lines[1][:20] + "\n" + lines[2], tb, "line 2: not a record"},
		"another mesh's CA": {string(b), foreignTB, "line 1: signer"},
		// The last line has no next record's link over it: keys the
		// decoder drops (unknown, a first copy, other case) would pass
		// its signature.
		"a key added to the last record":  {lines[0] + lines[1] + strings.Replace(lines[2], `{"seq":3,`, `{"seq":3,"approved_by":"ciso",`, 1), tb, "line 3: not as the gateway wrote it"},
		"a key given twice in the last":   {lines[0] + lines[1] + strings.Replace(lines[2], `"event":"migration"`, `"event":"migration.approved","event":"migration"`, 1), tb, "line 3: not as the gateway wrote it"},
		"a key in other case in the last": {lines[0] + lines[1] + strings.Replace(lines[2], `"event":"migration"`, `"EVENT":"approved","event":"migration"`, 1), tb, "line 3: not as the gateway wrote it"},
	} {
		if _, err := Verify(strings.NewReader(tc.log), tc.tb); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", name, err, tc.want)
		}
	}
	// An append cut short is not a record, and no break either: the
	// gateway never acknowledged it, and cuts it off at its next append.
	rep, err = Verify(strings.NewReader(lines[0]+lines[1][:20]), tb)
	if err != nil || rep.Records != 1 || !rep.CutShort || rep.Node != "gw1" {
		t.Errorf("a log whose last append was cut short: %+v, %v; want 1 record, cut short after it", rep, err)
	}
	// A read error says nothing of the log: told apart from a break.
	var unreadable *UnreadableError
	if rep, err := Verify(io.MultiReader(strings.NewReader(lines[0]), iotest.ErrReader(syscall.EIO)), tb); !errors.As(err, &unreadable) || rep.Records != 1 {
		t.Errorf("a read error after a record: %+v, %v; want it said unreadable", rep, err)
	}
	// Alone, bytes without a newline are all the input holds, not a log
	// with nothing recorded yet.
	for _, in := range []string{lines[0][:20], strings.ReplaceAll(string(b), "\n", "\r"), "not a log"} {
		if rep, err := Verify(strings.NewReader(in), tb); err == nil || !strings.Contains(err.Error(), "no whole record") || !rep.CutShort {
			t.Errorf("%.20q…: %+v, %v; want no whole record", in, rep, err)
		}
	}
}

// TestVerifyOneGatewaysLog: a log is one gateway's: a record signed by
// another gateway of the mesh, spliced in, breaks it, and so does one
// naming another gateway than its signer. A state directory
// that goes on under another name puts its log aside, whole, and starts
// a new one.
func TestVerifyOneGatewaysLog(t *testing.T) {
	ca, tb := testCA(t)
	gw1, gw2 := issue(t, ca, "gw1", "100.96.0.1", t0), issue(t, ca, "gw2", "100.96.0.2", t0)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	l.Append(gw1, "migration", map[string]any{"n": 1}, t0)
	l.Append(gw1, "migration", map[string]any{"n": 2}, t0)
	gw1Log, _ := os.ReadFile(path)

	// gw2's record, chained by hand after gw1's.
	last := bytes.TrimSpace(gw1Log[bytes.LastIndexByte(gw1Log[:len(gw1Log)-1], '\n')+1:])
	sum := sha256.Sum256(last)
	spliced := &Record{Seq: 3, Time: t0, Node: "gw2", Event: "image", Cert: gw2.Certificate().Raw, Prev: hex.EncodeToString(sum[:])}
	d, _ := spliced.digest()
	spliced.Sig, _ = gw2.Signer().Sign(rand.Reader, d, crypto.SHA256)
	line, _ := json.Marshal(spliced)
	if rep, err := Verify(bytes.NewReader(append(bytes.Clone(gw1Log), append(line, '\n')...)), tb); err == nil || !strings.Contains(err.Error(), "line 3: signed by gw2, in the log of gw1") {
		t.Fatalf("a record of gw2 in gw1's log: %+v, %v", rep, err)
	}
	// gw2's records naming gw1 would be read, in the report and by
	// `audit verify --node gw1`, as gw1's log.
	claimed := &Record{Seq: 1, Time: t0, Node: "gw1", Event: "migration", Fields: map[string]any{"n": 1}, Cert: gw2.Certificate().Raw}
	d, _ = claimed.digest()
	claimed.Sig, _ = gw2.Signer().Sign(rand.Reader, d, crypto.SHA256)
	line, _ = json.Marshal(claimed)
	if rep, err := Verify(bytes.NewReader(append(line, '\n')), tb); err == nil || !strings.Contains(err.Error(), "line 1: signed by gw2 but claims node gw1") {
		t.Fatalf("a record of gw1 signed by gw2: %+v, %v; want it refused", rep, err)
	}

	// The directory goes on as gw2: gw1's log is put aside.
	if r, err := l.Append(gw2, "migration", map[string]any{"n": 1}, t0.Add(time.Minute)); err != nil || r.Seq != 1 {
		t.Fatalf("gw2's first record: %+v, %v; want record 1 of a new log", r, err)
	}
	aside, _ := os.ReadFile(path + ".gw1.2")
	if !bytes.Equal(aside, gw1Log) {
		t.Fatal("gw1's log is not put aside whole")
	}
	if err := Open(path + ".gw1.2").CheckHead(); err != nil {
		t.Fatalf("gw1's log put aside, with its head: %v", err)
	}
	b, _ := os.ReadFile(path)
	if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Node != "gw2" || rep.Records != 1 {
		t.Fatalf("the new log: %+v, %v", rep, err)
	}
	if err := l.CheckHead(); err != nil {
		t.Fatalf("the new log's head: %v", err)
	}
}

// TestVerifyRevokedKeyDatedBack: a key revoked for compromise cannot add
// records dated back before its revocation after the gateway's later
// records; its own records from before the revocation still verify.
func TestVerifyRevokedKeyDatedBack(t *testing.T) {
	ca, _ := testCA(t)
	stolen := issue(t, ca, "gw1", "100.96.0.1", t0)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	l.Append(stolen, "migration", map[string]any{"n": 1}, t0.Add(time.Minute))
	if _, err := ca.RevokeSerials([]*big.Int{stolen.Certificate().SerialNumber}, "keyCompromise", t0.Add(10*time.Minute)); err != nil {
		t.Fatal(err)
	}
	renewed := issue(t, ca, "gw1", "100.96.0.1", t0.Add(11*time.Minute))
	l.Append(renewed, "migration", map[string]any{"n": 2}, t0.Add(20*time.Minute))
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Records != 2 {
		t.Fatalf("the stolen key's record from before its revocation, then the renewed one's: %+v, %v", rep, err)
	}
	// The thief's record, dated back: Append would date it after the
	// last, so it is written as a thief would.
	forged := &Record{Seq: 3, Time: t0.Add(5 * time.Minute), Node: "gw1", Event: "image", Fields: map[string]any{"action": "removed"}, Cert: stolen.Certificate().Raw}
	sum := sha256.Sum256(bytes.TrimSpace(b[bytes.LastIndexByte(b[:len(b)-1], '\n')+1:]))
	forged.Prev = hex.EncodeToString(sum[:])
	d, _ := forged.digest()
	forged.Sig, _ = stolen.Signer().Sign(rand.Reader, d, crypto.SHA256)
	line, _ := json.Marshal(forged)
	b = append(b, append(line, '\n')...)
	if rep, err := Verify(bytes.NewReader(b), tb); err == nil || !strings.Contains(err.Error(), "line 3: signer") {
		t.Fatalf("a revoked key's record dated back after later records: %+v, %v; want it refused", rep, err)
	}
}

// oneRecordRevoked is a log of one record gw1 (certified from issued)
// wrote at, its certificate then revoked for reason at revoked, and the
// trust bundle that says so.
func oneRecordRevoked(t *testing.T, issued, at time.Time, reason string, revoked time.Time) (*certs.TrustBundle, []byte) {
	t.Helper()
	ca, _ := testCA(t)
	id := issue(t, ca, "gw1", "100.96.0.1", issued)
	path := filepath.Join(t.TempDir(), "audit.log")
	if _, err := Open(path).Append(id, "migration", map[string]any{"n": 1}, at); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{id.Certificate().SerialNumber}, reason, revoked); err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return tb, b
}

// TestVerifyGatewayClockAheadOfCA: a record is dated by its gateway's
// clock and a revocation by the CA's. A record written a minute before
// its signer's revocation (for good: reason unspecified), by a gateway
// whose clock runs 2 minutes ahead of the CA's, still verifies: the log
// must not read as tampered with for a skew the mesh allows.
func TestVerifyGatewayClockAheadOfCA(t *testing.T) {
	tb, b := oneRecordRevoked(t, t0.Add(-time.Hour), t0.Add(2*time.Minute), "unspecified", t0.Add(time.Minute))
	if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Records != 1 {
		t.Fatalf("a record written a minute before the revocation, by a clock 2 minutes ahead of the CA's: %+v, %v", rep, err)
	}
}

// TestVerifyRevokedLaterHeldToTheMesh: a signer revoked after its
// records is still held to what a certificate not revoked is: an overlay
// address outside the mesh's range is refused either way.
func TestVerifyRevokedLaterHeldToTheMesh(t *testing.T) {
	tb, b := oneRecordRevoked(t, t0, t0.Add(time.Minute), "superseded", t0.Add(10*time.Minute))
	if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Records != 1 {
		t.Fatalf("revoked after its record: %+v, %v", rep, err)
	}
	// A mesh on part of the CA's range, which the address is outside.
	narrow, err := certs.NewTrustBundle(tb.CAs(), netip.MustParsePrefix("100.96.1.0/24"))
	if err != nil {
		t.Fatal(err)
	}
	if narrow, err = narrow.WithCRL(tb.CRL()); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(bytes.NewReader(b), narrow); err == nil || !strings.Contains(err.Error(), "outside the mesh overlay range") {
		t.Fatalf("a signer revoked later, outside the mesh's range: %v; want it refused", err)
	}
}

// TestAppendInTimeOrder: a clock stepped back does not date a record
// before the one ahead of it; fields are signed as Verify reads them
// (bytes that are not UTF-8).
func TestAppendInTimeOrder(t *testing.T) {
	id, tb := identity(t)
	l := Open(filepath.Join(t.TempDir(), "audit.log"))
	l.Append(id, "migration", nil, t0.Add(time.Hour))
	r, err := l.Append(id, "migration", map[string]any{"error": "open /img/vm\xff.raw: no such file"}, t0)
	if err != nil || r.Time.Before(t0.Add(time.Hour)) {
		t.Fatalf("a record after the clock stepped back: dated %v, %v; want no earlier than the one before", r.Time, err)
	}
	verifies(t, l.Path(), tb, 2)
}

// TestAppendOnlyWithinTheCertificatesValidity: a record is not signed
// by a certificate that is not valid at its time (a send that began
// before a renewal, a clock far off): it would not verify, nor would any
// record chained after it. Nothing is written; the log goes on whole
// once a valid certificate signs.
func TestAppendOnlyWithinTheCertificatesValidity(t *testing.T) {
	ca, tb := testCA(t)
	old := issue(t, ca, "gw1", "100.96.0.1", t0)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	if _, err := l.Append(old, "migration", map[string]any{"n": 1}, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	head, _ := os.ReadFile(path + headSuffix)
	if _, err := l.Append(old, "migration", map[string]any{"n": 2}, old.Certificate().NotAfter.Add(time.Minute)); err == nil || !strings.Contains(err.Error(), "expired") || !strings.Contains(err.Error(), "renew") {
		t.Fatalf("a record after its certificate's end: %v; want it refused, saying to renew", err)
	}
	early := issue(t, ca, "gw1", "100.96.0.1", t0.Add(48*time.Hour))
	if _, err := l.Append(early, "migration", map[string]any{"n": 2}, t0.Add(2*time.Hour)); err == nil || !strings.Contains(err.Error(), "valid only from") {
		t.Fatalf("a record before its certificate's start: %v; want it refused", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, before) {
		t.Fatalf("refused records changed the log:\n%s", after)
	}
	if h, _ := os.ReadFile(path + headSuffix); !bytes.Equal(h, head) {
		t.Fatalf("refused records changed the head: %s", h)
	}
	renewed := issue(t, ca, "gw1", "100.96.0.1", t0.Add(20*time.Hour))
	if _, err := l.Append(renewed, "migration", map[string]any{"n": 2}, old.Certificate().NotAfter.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	verifies(t, path, tb, 2)
}

// TestAppendClockBeforeTheCertificate: a clock stepped back before the
// certificate's start is refused only where the record would be dated by
// it: after a record, the record is dated as that one, within the
// certificate, and taken; a new log, or one put aside for another name,
// is neither created nor put aside for a record refused.
func TestAppendClockBeforeTheCertificate(t *testing.T) {
	ca, tb := testCA(t)
	id := issue(t, ca, "gw1", "100.96.0.1", t0)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	if _, err := l.Append(id, "migration", nil, t0.Add(-time.Hour)); err == nil || !strings.Contains(err.Error(), "valid only from") {
		t.Fatalf("a first record before its certificate's start: %v; want it refused", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a refused first record left a log: %v", err)
	}
	if _, err := l.Append(id, "migration", map[string]any{"n": 1}, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	r, err := l.Append(id, "migration", map[string]any{"n": 2}, t0.Add(-time.Hour))
	if err != nil {
		t.Fatalf("a record after the clock stepped back before its certificate's start: %v; want it dated as the one before", err)
	}
	if !r.Time.Equal(t0.Add(time.Hour)) {
		t.Fatalf("the record is dated %v; want %v", r.Time, t0.Add(time.Hour))
	}
	b, _ := os.ReadFile(path)
	if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Records != 2 {
		t.Fatalf("%+v, %v", rep, err)
	}
	gw2 := issue(t, ca, "gw2", "100.96.0.2", t0)
	if _, err := l.Append(gw2, "image", nil, t0.Add(-time.Hour)); err == nil || !strings.Contains(err.Error(), "valid only from") {
		t.Fatalf("another name's first record before its certificate's start: %v; want it refused", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, b) {
		t.Fatal("a refused record of another name put the log aside")
	}
}

// TestAppendAfterAClockAhead: a clock that ran ahead once dates a record
// far on (within a long certificate's validity); the records after it are
// not dated there too, past the end of the shorter certificate that signs
// them — every one would be refused until the clock caught up — nor
// chained after it dated back by the clock: that log is put aside, whole,
// and a new one starts. Its records verify when their signer is revoked
// after them, as a routine renewal does; dated back in the old log, they
// were judged by the record ahead and refused.
func TestAppendAfterAClockAhead(t *testing.T) {
	ca, _ := testCA(t)
	long, err := ca.IssueIdentity(certs.Attributes{Node: "gw1", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.MustParseAddr("100.96.0.1")}, 30*24*time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	l := Open(filepath.Join(t.TempDir(), "audit.log"))
	l.Append(long, "migration", map[string]any{"n": 1}, t0.Add(time.Hour))
	if _, err := l.Append(long, "image", map[string]any{"n": 2}, t0.Add(20*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	ahead, _ := os.ReadFile(l.Path())
	renewed := issue(t, ca, "gw1", "100.96.0.1", t0.Add(2*time.Hour))
	for i, at := range []time.Time{t0.Add(3 * time.Hour), t0.Add(4 * time.Hour)} {
		r, err := l.Append(renewed, "migration", map[string]any{"n": 3 + i}, at)
		if err != nil {
			t.Fatalf("a record at %v after one dated %v, its certificate ending %v: %v", at, t0.Add(20*24*time.Hour), renewed.Certificate().NotAfter, err)
		}
		if !r.Time.Equal(at) || r.Seq != uint64(i+1) {
			t.Fatalf("a record at %v after one dated %v is record %d dated %v; want record %d of a new log, dated by the clock", at, t0.Add(20*24*time.Hour), r.Seq, r.Time, i+1)
		}
	}
	// Within the signer's validity, the record before still dates it.
	if r, err := l.Append(renewed, "migration", nil, t0.Add(3*time.Hour)); err != nil || !r.Time.Equal(t0.Add(4*time.Hour)) {
		t.Fatalf("a record after the clock stepped back an hour: %v; want it dated as the one before", err)
	}
	if b, _ := os.ReadFile(l.Path() + ".gw1.2"); !bytes.Equal(b, ahead) {
		t.Fatalf("the log with the record ahead was not put aside whole")
	}
	if _, err := ca.RevokeSerials([]*big.Int{renewed.Certificate().SerialNumber}, "superseded", t0.Add(5*time.Hour)); err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int{l.Path(): 3, l.Path() + ".gw1.2": 2} {
		b, _ := os.ReadFile(name)
		if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Records != want {
			t.Errorf("%s, its renewed signer revoked after its records: %+v, %v; want %d records", name, rep, err, want)
		}
	}
}

func testCA(t *testing.T) (*certs.CA, *certs.TrustBundle) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{Now: t0.Add(-time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	return ca, tb
}

func issue(t *testing.T, ca *certs.CA, node, ip string, at time.Time) *certs.NodeIdentity {
	id, err := ca.IssueIdentity(certs.Attributes{Node: node, Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.MustParseAddr(ip)}, 24*time.Hour, at)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestHeadRecordChecked: a log ahead of its head (the head's last write
// failed) still holds the record the head names; one cut back and written
// on past the head does not.
func TestHeadRecordChecked(t *testing.T) {
	id, _ := identity(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	for i := range 3 {
		l.Append(id, "migration", map[string]any{"n": i}, t0)
	}
	headAt3, _ := os.ReadFile(path + headSuffix)
	l.Append(id, "migration", map[string]any{"n": 3}, t0)
	os.WriteFile(path+headSuffix, headAt3, 0o600) // the head's write after record 4 failed
	if err := l.CheckHead(); err != nil {
		t.Fatalf("a log one record ahead of its head: %v", err)
	}
	b, _ := os.ReadFile(path)
	lines := strings.SplitAfter(string(b), "\n")
	os.WriteFile(path, []byte(lines[0]+lines[1]), 0o600)
	os.Remove(path + headSuffix)
	for i := range 2 {
		l.Append(id, "migration", map[string]any{"n": 10 + i}, t0)
	}
	os.WriteFile(path+headSuffix, headAt3, 0o600)
	if err := l.CheckHead(); err == nil || !strings.Contains(err.Error(), "record 3 is not the one written") {
		t.Fatalf("a log cut back to 2 records and written on to 4, its head at 3: %v", err)
	}
}

// TestAppendAfterCutShort: an append cut short (a crash, a full disk)
// leaves part of a record without its newline; the next append cuts it
// off and chains to the last whole record, so the log stays whole. A
// whole last line that is not a record stops appends, saying what to do.
func TestAppendAfterCutShort(t *testing.T) {
	id, tb := identity(t)
	l, path := logOf(t, id, 2)
	whole, _ := os.ReadFile(path)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(whole[:len(whole)/3]) // the start of a record, as a cut-short append leaves it
	f.Close()
	r, err := l.Append(id, "migration", map[string]any{"n": 2}, t0)
	if err != nil || r.Seq != 3 {
		t.Fatalf("append after one cut short: %+v, %v", r, err)
	}
	b, _ := os.ReadFile(path)
	if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Records != 3 {
		t.Fatalf("the log after that: %+v, %v", rep, err)
	}

	os.WriteFile(path, append(b, "{not a record}\n"...), 0o600)
	if _, err := l.Append(id, "migration", nil, t0); err == nil || !strings.Contains(err.Error(), "move it aside") {
		t.Fatalf("append after a damaged whole line: %v", err)
	}
}

// TestNewlineLostIsPutBack: a log whose last record lost only its
// newline (an editor, a copy) keeps that record — acknowledged, signed —
// at the next Ready or Append: the newline is put back, whether the head
// names the record or, without a head, the record chains to the log.
// What the head does not prove is cut as an append cut short; a log
// behind its head is left as it is, whatever its end.
func TestNewlineLostIsPutBack(t *testing.T) {
	id, tb := identity(t)
	l, path := logOf(t, id, 2)
	whole, _ := os.ReadFile(path)
	lines := strings.SplitAfter(string(whole), "\n")
	os.WriteFile(path, whole[:len(whole)-1], 0o600)
	if err := l.Ready(nil, t0); err != nil {
		t.Fatalf("Ready on a log whose last newline was lost: %v", err)
	}
	if b, _ := os.ReadFile(path); !bytes.Equal(b, whole) {
		t.Fatalf("Ready left the log as\n%s\nwant it whole again", b)
	}

	// Without a head: the record chains to the log, and is kept.
	os.WriteFile(path, whole[:len(whole)-1], 0o600)
	os.Remove(path + headSuffix)
	if r, err := l.Append(id, "migration", map[string]any{"n": 2}, t0); err != nil {
		t.Fatalf("append after a lost newline, without a head: %v", err)
	} else if r.Seq != 3 {
		t.Fatalf("append after a lost newline, without a head: record %d; want 3", r.Seq)
	}
	b, _ := os.ReadFile(path)
	if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Records != 3 || !bytes.HasPrefix(b, whole) {
		t.Fatalf("the log after that: %+v, %v", rep, err)
	}
	// The head names the record before it (its write after this one
	// failed, and the record was acknowledged all the same): judged as
	// without a head, the record is kept.
	os.WriteFile(path, whole, 0o600)
	sum := sha256.Sum256([]byte(strings.TrimSpace(lines[0])))
	atomicfile.WriteJSON(path+headSuffix, head{Seq: 1, SHA256: hex.EncodeToString(sum[:])}, 0o600)
	os.WriteFile(path, whole[:len(whole)-1], 0o600)
	if r, err := l.Append(id, "migration", map[string]any{"n": 2}, t0); err != nil {
		t.Fatalf("append after a lost newline, the head naming the record before: %v", err)
	} else if r.Seq != 3 {
		t.Fatalf("append after a lost newline, the head naming the record before: record %d; want 3", r.Seq)
	}
	if b, _ := os.ReadFile(path); !bytes.HasPrefix(b, whole) {
		t.Fatal("record 2, acknowledged, was cut")
	}
	// Without a head, a record that does not chain there (a copy of the
	// first) is cut, as an append cut short is.
	os.WriteFile(path, []byte(lines[0]+lines[1]+strings.TrimSpace(lines[0])), 0o600)
	os.Remove(path + headSuffix)
	if r, err := l.Append(id, "migration", map[string]any{"n": 2}, t0); err != nil {
		t.Fatalf("append after a record that does not chain: %v", err)
	} else if r.Seq != 3 {
		t.Fatalf("append after a record that does not chain: record %d; want it cut, and record 3", r.Seq)
	}
	// The head names record 4; a tail other than it, after record 2
	// (records 3 and 4, their line ends turned to CR), is left for the
	// head check to refuse.
	l.Append(id, "migration", map[string]any{"n": 3}, t0)
	b, _ = os.ReadFile(path)
	cr := bytes.ReplaceAll(b, []byte("\n"), []byte("\r"))
	cr = append([]byte(lines[0]+lines[1]), cr[len(lines[0])+len(lines[1]):]...)
	os.WriteFile(path, cr, 0o600)
	if err := l.Ready(nil, t0); err == nil || !strings.Contains(err.Error(), "record 4 was written") {
		t.Fatalf("Ready on a log behind its head, ending without a newline: %v", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, cr) {
		t.Fatal("a log behind its head was changed")
	}
}

// TestVerifyNewlineLost: a last record that only lost its newline, which
// the gateway keeps (TestNewlineLostIsPutBack), is counted by Verify and
// noted, and the head that names it passes: not records removed, nor, for
// a first record, input of no whole record.
func TestVerifyNewlineLost(t *testing.T) {
	id, tb := identity(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	for i := range 2 {
		if _, err := l.Append(id, "migration", map[string]any{"n": i}, t0); err != nil {
			t.Fatal(err)
		}
		whole, _ := os.ReadFile(path)
		os.WriteFile(path, whole[:len(whole)-1], 0o600)
		rep, err := Verify(bytes.NewReader(whole[:len(whole)-1]), tb)
		if err != nil || rep.Records != i+1 || !rep.NewlineLost || rep.CutShort || rep.Node != "gw1" {
			t.Errorf("record %d without its newline: %+v, %v; want %d records, the newline noted lost", i+1, rep, err, i+1)
		}
		if err := l.CheckHead(); err != nil {
			t.Errorf("head check, record %d without its newline: %v", i+1, err)
		}
		os.WriteFile(path, whole, 0o600)
	}
	// Any other tail is still the records the head names removed.
	whole, _ := os.ReadFile(path)
	lines := strings.SplitAfter(string(whole), "\n")
	os.WriteFile(path, []byte(lines[0]+strings.TrimSpace(lines[0])), 0o600)
	if err := l.CheckHead(); err == nil || !strings.Contains(err.Error(), "record 2 was written") {
		t.Errorf("head check, record 2 replaced by a copy of 1 without its newline: %v", err)
	}
}

// TestReady: a log takes a record when it is new or ends in a whole one
// (an unfinished one is cut off) and its disk has room; a damaged last
// record, or a disk short of room, is refused before anything starts
// whose record could not be written.
func TestReady(t *testing.T) {
	id, _ := identity(t)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	if err := l.Ready(id, t0); err != nil {
		t.Fatalf("a new log: %v", err)
	}
	// A record its certificate is not valid for would be refused.
	end := id.Certificate().NotAfter
	if err := l.Ready(id, end.Add(time.Minute)); err == nil || !strings.Contains(err.Error(), "expired") || !strings.Contains(err.Error(), "renew") {
		t.Fatalf("a certificate expired: %v", err)
	}
	if err := l.Ready(id, id.Certificate().NotBefore.Add(-time.Hour)); err == nil || !strings.Contains(err.Error(), "clock") {
		t.Fatalf("a certificate not valid yet: %v", err)
	}
	// A clock stepped back behind the log's last record: Append dates
	// the record after it, and takes it; so does Ready.
	stepped := Open(filepath.Join(t.TempDir(), "audit.log"))
	if _, err := stepped.Append(id, "migration", map[string]any{"n": 1}, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	back := id.Certificate().NotBefore.Add(-time.Hour)
	if err := stepped.Ready(id, back); err != nil {
		t.Errorf("a clock stepped back behind the last record: %v", err)
	}
	if _, err := stepped.Append(id, "migration", map[string]any{"n": 2}, back); err != nil {
		t.Errorf("Append with the clock stepped back: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("Ready made the log (%v): an empty one reads as emptied", err)
	}
	if _, err := l.Append(id, "migration", map[string]any{"n": 1}, t0); err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString(`{"seq":2,"ti`) // an append cut short
	f.Close()
	if err := l.Ready(nil, t0); err != nil {
		t.Fatalf("a log whose last append was cut short: %v", err)
	}
	f, _ = os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString("not a record\n")
	f.Close()
	if err := l.Ready(nil, t0); err == nil || !strings.Contains(err.Error(), "last record is damaged") {
		t.Fatalf("a log ending in a damaged record: %v", err)
	}

	l = Open(filepath.Join(t.TempDir(), "audit.log"))
	saved := minFree
	minFree = 1 << 62
	defer func() { minFree = saved }()
	if err := l.Ready(nil, t0); err == nil || !strings.Contains(err.Error(), "free") {
		t.Fatalf("a disk short of room: %v", err)
	}
}

// TestReadyToFree: a record of what frees space (an image's removal) is
// taken on a disk short of the margin a migration needs, there most of
// all; a log ending in a damaged record still refuses it, as does a
// certificate not valid at its time.
func TestReadyToFree(t *testing.T) {
	id, _ := identity(t)
	saved := minFree
	minFree = 1 << 62 // no disk has that free
	defer func() { minFree = saved }()
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	if err := l.Ready(id, t0); err == nil {
		t.Fatal("Ready on a disk short of room: nil")
	}
	if err := l.ReadyToFree(id, t0); err != nil {
		t.Fatalf("a new log on a disk short of room: %v", err)
	}
	if _, err := l.Append(id, "image", map[string]any{"action": "removed"}, t0); err != nil {
		t.Fatal(err)
	}
	if err := l.ReadyToFree(id, t0); err != nil {
		t.Fatalf("a log of one record on a disk short of room: %v", err)
	}
	if err := l.ReadyToFree(id, id.Certificate().NotAfter.Add(time.Hour)); err == nil {
		t.Error("a record dated past its certificate's end: nil")
	}
	f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString("not a record\n")
	f.Close()
	if err := l.ReadyToFree(id, t0); err == nil || !strings.Contains(err.Error(), "last record is damaged") {
		t.Fatalf("a log ending in a damaged record: %v", err)
	}
}

// TestHead: a log cut back, emptied or replaced by an older copy still
// verifies as a chain; its head says records are missing, and no record
// is chained to what is left.
func TestHead(t *testing.T) {
	id, tb := identity(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	l := Open(path)
	var lines [][]byte
	for i := range 3 {
		if _, err := l.Append(id, "migration", map[string]any{"n": i}, t0); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(path)
		lines = append(lines, bytes.Clone(b))
	}
	if err := l.CheckHead(); err != nil {
		t.Fatalf("an intact log: %v", err)
	}
	for name, content := range map[string][]byte{
		"cut back to two records": lines[1],
		"emptied":                 nil,
	} {
		os.WriteFile(path, content, 0o600)
		if rep, err := Verify(bytes.NewReader(content), tb); err != nil {
			t.Fatalf("%s: the chain itself (%d records): %v", name, rep.Records, err)
		}
		if err := l.CheckHead(); err == nil || !strings.Contains(err.Error(), "record 3 was written") {
			t.Errorf("%s: CheckHead: %v", name, err)
		}
		if _, err := l.Append(id, "migration", nil, t0); err == nil {
			t.Errorf("%s: a record was chained to what is left", name)
		}
		if err := l.Ready(nil, t0); err == nil {
			t.Errorf("%s: Ready", name)
		}
	}
	// Another log of the same length in its place.
	other := Open(filepath.Join(t.TempDir(), "audit.log"))
	for i := range 3 {
		other.Append(id, "other", map[string]any{"n": i}, t0)
	}
	b, _ := os.ReadFile(other.Path())
	os.WriteFile(path, b, 0o600)
	if err := l.CheckHead(); err == nil || !strings.Contains(err.Error(), "not the one written") {
		t.Errorf("a log replaced by another as long: %v", err)
	}
	// Put back whole, it goes on.
	os.WriteFile(path, lines[2], 0o600)
	if _, err := l.Append(id, "migration", nil, t0); err != nil {
		t.Fatalf("the log put back: %v", err)
	}
	// A head damaged from outside says what to do; moved aside, the log
	// goes on and the next record writes a new one.
	os.WriteFile(path+headSuffix, []byte(`{"seq": 4, "sha`), 0o600)
	if err := l.Ready(nil, t0); err == nil || !strings.Contains(err.Error(), "audit verify") || !strings.Contains(err.Error(), "move") {
		t.Fatalf("a damaged head: %v; want what to do", err)
	}
	os.Rename(path+headSuffix, path+headSuffix+".damaged")
	if _, err := l.Append(id, "migration", nil, t0); err != nil || l.CheckHead() != nil {
		t.Fatalf("the head moved aside: %v, then %v", err, l.CheckHead())
	}
}

// TestPutAsideFails: a log that cannot be put aside is an error, said
// once, not tried for ever.
func TestPutAsideFails(t *testing.T) {
	ca, _ := testCA(t)
	gw1, gw2 := issue(t, ca, "gw1", "100.96.0.1", t0), issue(t, ca, "gw2", "100.96.0.2", t0)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	l.Append(gw1, "migration", nil, t0)
	// In the way of the head's rename: a directory with something in it.
	if err := os.MkdirAll(filepath.Join(path+".gw1.1"+headSuffix, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := l.Append(gw2, "migration", nil, t0)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "put aside the audit log head of gw1") {
			t.Fatalf("a log that cannot be put aside: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Append kept trying to put the log aside")
	}
}

// TestPutAsideRaces: records of the directory's new gateway written at
// once each go to its new log, and the old gateway's log is put aside
// whole, once. A writer that had opened the old log before it was put
// aside appended to it, and a second put-aside moved the new log over it.
func TestPutAsideRaces(t *testing.T) {
	ca, tb := testCA(t)
	gw1, gw2 := issue(t, ca, "gw1", "100.96.0.1", t0), issue(t, ca, "gw2", "100.96.0.2", t0)
	for round := range 50 {
		l, path := logOf(t, gw1, 2)
		old, _ := os.ReadFile(path)
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		for i := range 4 {
			wg.Go(func() {
				if _, err := l.Append(gw2, "image", map[string]any{"i": i}, t0.Add(time.Minute)); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("round %d: %v", round, err)
		}
		if aside, _ := os.ReadFile(path + ".gw1.2"); !bytes.Equal(aside, old) {
			t.Fatalf("round %d: gw1's log put aside is not what gw1 wrote:\n%s", round, aside)
		}
		verifies(t, path, tb, 4)
	}
}

// TestPutAsideKeepsEarlierLogs: a gateway name that comes back to the
// directory and leaves a log as long again does not put it over the
// first.
func TestPutAsideKeepsEarlierLogs(t *testing.T) {
	ca, _ := testCA(t)
	gw1, gw2 := issue(t, ca, "gw1", "100.96.0.1", t0), issue(t, ca, "gw2", "100.96.0.2", t0)
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	var logs [][]byte
	for round := range 2 {
		for i := range 2 {
			if _, err := l.Append(gw1, "migration", map[string]any{"round": round, "n": i}, t0); err != nil {
				t.Fatal(err)
			}
		}
		b, _ := os.ReadFile(path)
		logs = append(logs, b)
		if _, err := l.Append(gw2, "image", nil, t0); err != nil {
			t.Fatal(err)
		}
		os.Remove(path) // gw2's: the name gw1 comes back to is empty again
		os.Remove(path + headSuffix)
	}
	for i, name := range []string{path + ".gw1.2", path + ".gw1.2.1"} {
		if b, _ := os.ReadFile(name); !bytes.Equal(b, logs[i]) {
			t.Errorf("%s: not gw1's log of round %d", name, i)
		}
	}
}

// logOf is a new log of n records by id, and its path.
func logOf(t *testing.T, id *certs.NodeIdentity, n int) (*Log, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l := Open(path)
	for i := range n {
		if _, err := l.Append(id, "migration", map[string]any{"n": i}, t0); err != nil {
			t.Fatal(err)
		}
	}
	return l, path
}

// verifies fails t unless the log at path verifies under tb with records
// records.
func verifies(t *testing.T, path string, tb *certs.TrustBundle, records int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := Verify(bytes.NewReader(b), tb); err != nil || rep.Records != records {
		t.Fatalf("%s: %+v, %v; want %d records verified", path, rep, err, records)
	}
}

// TestForgedTailNotKept: bytes after the last newline that decode as the
// next record, chained and signed, but under a certificate neither the
// record before them carries nor the writer holds, are no record the
// gateway can place: verify refuses a forged one, Ready leaves them as
// they are, and an append puts the log aside whole rather than cut them
// (they may be the gateway's, under a certificate renewed since) or chain
// its record after them (they may be anyone's).
func TestForgedTailNotKept(t *testing.T) {
	ca, tb := testCA(t)
	id := issue(t, ca, "gw1", "100.96.0.1", t0)
	other, _ := testCA(t)
	for _, tt := range []struct {
		name   string
		signer *certs.NodeIdentity
		valid  bool // the log put aside verifies
	}{
		{"forged", issue(t, other, "gw1", "100.96.0.1", t0), false},
		{"renewed since", issue(t, ca, "gw1", "100.96.0.1", t0.Add(time.Minute)), true},
	} {
		path := filepath.Join(t.TempDir(), "audit.log")
		l := Open(path)
		if _, err := l.Append(id, "migration", map[string]any{"n": 1}, t0.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(path)
		sum := sha256.Sum256(bytes.TrimSpace(b))
		r := &Record{Seq: 2, Time: t0.Add(2 * time.Hour), Node: "gw1", Event: "migration", Fields: map[string]any{"n": tt.name}, Cert: tt.signer.Certificate().Raw, Prev: hex.EncodeToString(sum[:])}
		d, err := r.digest()
		if err != nil {
			t.Fatal(err)
		}
		if r.Sig, err = tt.signer.Signer().Sign(rand.Reader, d, crypto.SHA256); err != nil {
			t.Fatal(err)
		}
		tail, _ := json.Marshal(r)
		written := append(b, tail...)
		if err := os.WriteFile(path, written, 0o600); err != nil {
			t.Fatal(err)
		}
		if rep, err := Verify(bytes.NewReader(written), tb); (err == nil) != tt.valid {
			t.Fatalf("%s: a last record without its newline: %+v, %v; want valid %v", tt.name, rep, err, tt.valid)
		}
		if err := l.Ready(nil, t0); err != nil {
			t.Fatal(err)
		}
		if after, _ := os.ReadFile(path); !bytes.Equal(after, written) {
			t.Fatalf("%s: Ready changed the log:\n%s", tt.name, after)
		}
		writer := issue(t, ca, "gw1", "100.96.0.1", t0.Add(2*time.Minute))
		if _, err := l.Append(writer, "migration", map[string]any{"n": 3}, t0.Add(3*time.Hour)); err != nil {
			t.Fatal(err)
		}
		if aside, _ := os.ReadFile(path + ".gw1.1"); !bytes.Equal(aside, written) {
			t.Fatalf("%s: the log put aside is not the log as it was:\n%s", tt.name, aside)
		}
		if rep, err := Verify(bytes.NewReader(written), tb); (err == nil) != tt.valid || tt.valid && (rep.Records != 2 || !rep.NewlineLost) {
			t.Fatalf("%s: the log put aside: %+v, %v; want valid %v", tt.name, rep, err, tt.valid)
		}
		verifies(t, path, tb, 1)
	}
}

// TestAppendClearsHeadTemps: the temporary of a head a writer killed
// before its rename left goes at the next process's first append (every
// head is written under the log's lock); other files stay.
func TestAppendClearsHeadTemps(t *testing.T) {
	id, _ := identity(t)
	dir := t.TempDir()
	l := Open(filepath.Join(dir, "audit.log"))
	if _, err := l.Append(id, "migration", map[string]any{"n": 0}, t0); err != nil {
		t.Fatal(err)
	}
	left, other := filepath.Join(dir, ".audit.log.head.tmp-1234"), filepath.Join(dir, ".node.key.tmp-1234")
	for _, p := range []string{left, other} {
		if err := os.WriteFile(p, []byte("{}"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	l = Open(l.Path()) // a process started again
	if _, err := l.Append(id, "migration", map[string]any{"n": 1}, t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(left); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the head's temporary is still there: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("another file's temporary went: %v", err)
	}
}

// TestRefusedSyncLeavesNoRecord: a record whose fsync the disk refused is
// not left in the log, where the page cache would show it (and a record
// owed would be taken as written) though the disk may never hold it.
func TestRefusedSyncLeavesNoRecord(t *testing.T) {
	id, tb := identity(t)
	l := Open(filepath.Join(t.TempDir(), "audit.log"))
	if _, err := l.Append(id, "migration", map[string]any{"n": 0}, t0); err != nil {
		t.Fatal(err)
	}
	syncFile = func(*os.File) error { return syscall.EIO }
	_, err := l.Append(id, "migration", map[string]any{"n": 1}, t0.Add(time.Minute))
	syncFile = (*os.File).Sync
	if err == nil {
		t.Fatal("appended with its fsync refused")
	}
	if _, err := l.Append(id, "migration", map[string]any{"n": 2}, t0.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(l.Path())
	rep, err := Verify(bytes.NewReader(b), tb)
	if err != nil || rep.Records != 2 || strings.Contains(string(b), `"n":1`) {
		t.Fatalf("log after a refused fsync: %d records, %v; want 2, without the refused one:\n%s", rep.Records, err, b)
	}
}
