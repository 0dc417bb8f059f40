package certs

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestRoutesFreeLastIssued: a gateway's latest certificate, whose routes
// count against other sites, is the one issued last, not the one with the
// latest NotBefore. The CA's clock stepped back 10 minutes between two
// issues of gw1: the second, with the earlier NotBefore, is what gw1 runs.
func TestRoutesFreeLastIssued(t *testing.T) {
	t.Run("route added", func(t *testing.T) {
		ca := newTestCA(t)
		issue(t, ca, testAttrs("gw1", "a", "100.96.0.1"), t0, 30*24*time.Hour)
		issue(t, ca, testAttrs("gw1", "a", "100.96.0.1", "10.1.0.0/16"), t0.Add(-10*time.Minute), 30*24*time.Hour)
		if _, err := ca.IssueIdentity(testAttrs("gw2", "b", "100.96.0.2", "10.1.0.0/16"), 30*24*time.Hour, t0.Add(time.Minute)); err == nil {
			t.Error("site b was certified 10.1.0.0/16, which gw1 of site a was certified last")
		}
		if err := ca.RoutesFree(testAttrs("", "b", "100.96.0.3", "10.1.0.0/16"), t0.Add(time.Minute)); err == nil {
			t.Error("RoutesFree: 10.1.0.0/16 free for site b, which gw1 of site a was certified last")
		}
	})
	t.Run("route dropped", func(t *testing.T) {
		ca := newTestCA(t)
		issue(t, ca, testAttrs("gw1", "a", "100.96.0.1", "10.1.0.0/16"), t0, 30*24*time.Hour)
		issue(t, ca, testAttrs("gw1", "a", "100.96.0.1"), t0.Add(-10*time.Minute), 30*24*time.Hour)
		if _, err := ca.IssueIdentity(testAttrs("gw2", "b", "100.96.0.2", "10.1.0.0/16"), 30*24*time.Hour, t0.Add(time.Minute)); err != nil {
			t.Errorf("site b refused 10.1.0.0/16, which gw1 of site a was re-issued without: %v", err)
		}
	})
}

// A year ahead: what the CA's clock says for one operation (a VM resumed
// with a wrong RTC, a bad NTP server), and right again after it.
var (
	jumped = t0.Add(365 * 24 * time.Hour)
	right  = t0.Add(2 * time.Hour)
)

// issueEnrollerAt issues gw0's enrollment endpoint a certificate at now:
// what a CA-holding gateway does by itself, any time.
func issueEnrollerAt(t *testing.T, ca *CA, now time.Time) {
	t.Helper()
	key, _ := GenerateNodeKey()
	if _, err := ca.IssueEnroller("gw0", ca.MeshPrefix().Addr().Next().Next().Next().Next(), key.Public(), time.Hour, now); err != nil {
		t.Fatal(err)
	}
}

func renewAt(ca *CA, id *NodeIdentity, now time.Time) error {
	key, _ := GenerateNodeKey()
	csr, err := createCSR(key, *id.Attributes(), false)
	if err != nil {
		return err
	}
	_, err = ca.Renew(id.Certificate(), csr, now)
	return err
}

// TestClockJumpForwardKeepsRevocations: certificates the CA archived
// while its clock was a year ahead come back, revoked, once it is right:
// the next list names the superseded certificate, still valid by the
// gateways' clocks, and the one revoked then.
func TestClockJumpForwardKeepsRevocations(t *testing.T) {
	ca := newTestCA(t)
	old := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 30*24*time.Hour)
	keep := issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, 30*24*time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{old.Certificate().SerialNumber}, "superseded", t0); err != nil {
		t.Fatal(err)
	}
	held := trust(t, ca) // what the gateways hold

	issueEnrollerAt(t, ca, jumped)
	if _, err := ca.RevokeSerials([]*big.Int{keep.Certificate().SerialNumber}, "keyCompromise", right); err != nil {
		t.Fatalf("revoke gw2 (valid until %s) with the clock right again: %v", keep.Certificate().NotAfter, err)
	}
	if err := ca.RefreshCRL(right); err != nil {
		t.Fatal(err)
	}
	next, err := held.WithCRL(trust(t, ca).CRL())
	if err != nil {
		t.Fatalf("gateways refuse the next list: %v", err)
	}
	for _, id := range []*NodeIdentity{old, keep} {
		if _, err := next.VerifyCertificate(id.Certificate(), right); !errors.Is(err, ErrRevoked) {
			t.Errorf("%s's revoked certificate (valid until %s) after the CA's clock jumped and came back: err = %v, want revoked", id.Attributes().Node, id.Certificate().NotAfter, err)
		}
	}
}

// TestClockBackResignsDroppedRevocation: a list signed while the clock
// was ahead left out the revoked certificate, which looked expired, and
// the gateways adopted it. Once the clock is right, the CA's next
// operation of any kind (here a lookup) signs one that names it again.
func TestClockBackResignsDroppedRevocation(t *testing.T) {
	ca := newTestCA(t)
	old := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 30*24*time.Hour)
	issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, 30*24*time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{old.Certificate().SerialNumber}, "cessationOfOperation", t0); err != nil {
		t.Fatal(err)
	}
	if err := ca.RefreshCRL(jumped); err != nil {
		t.Fatal(err)
	}
	held, err := trust(t, ca).WithCRL(trust(t, ca).CRL())
	if err != nil {
		t.Fatal(err)
	}
	if held.IsRevoked(old.Certificate().SerialNumber) {
		t.Fatal("the list signed a year ahead names gw1's certificate, which had expired by then: the test no longer shows what it is for")
	}
	if _, err := ca.SerialsOfNode("gw2", right); err != nil {
		t.Fatal(err)
	}
	next, err := held.WithCRL(trust(t, ca).CRL())
	if err != nil {
		t.Fatalf("gateways refuse the list signed once the clock was right: %v", err)
	}
	if _, err := next.VerifyCertificate(old.Certificate(), right); !errors.Is(err, ErrRevoked) {
		t.Errorf("gw1's revoked certificate (valid until %s), once the CA's clock is right: err = %v, want revoked", old.Certificate().NotAfter, err)
	}
}

// TestClockJumpIndexKeepsLive: after the same jump, the index knows the
// live certificates again once the clock is right: `ca revoke --node`
// finds gw1's, its address and routes are not given to others, and it
// renews.
func TestClockJumpIndexKeepsLive(t *testing.T) {
	ca := newTestCA(t)
	gw1 := issue(t, ca, testAttrs("gw1", "a", "100.96.0.1", "10.1.0.0/16"), t0, 30*24*time.Hour)
	issueEnrollerAt(t, ca, jumped)
	if _, err := ca.SerialsOfNode("gw1", right); err != nil {
		t.Errorf("revoke --node gw1 with the clock right again: %v (gw1's certificate is valid until %s)", err, gw1.Certificate().NotAfter)
	}
	if err := ca.RoutesFree(testAttrs("", "b", "100.96.0.9", "10.1.0.0/16"), right); err == nil {
		t.Error("10.1.0.0/16 free for site b while gw1 of site a holds it")
	}
	if _, err := ca.IssueIdentity(testAttrs("gw9", "b", "100.96.0.1"), time.Hour, right); err == nil {
		t.Errorf("gw9 was issued gw1's overlay IP 100.96.0.1 while gw1's certificate is valid")
	}
	if err := renewAt(ca, gw1, t0.Add(16*24*time.Hour)); err != nil {
		t.Errorf("gw1's renewal with the clock right again: %v", err)
	}
}

// archiveSerials returns the serials of the archive's lines, in order.
func archiveSerials(t *testing.T, ca *CA) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(ca.Dir(), fileArchive))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for l := range strings.Lines(string(b)) {
		var c IssuedCert
		if err := json.Unmarshal([]byte(l), &c); err != nil {
			t.Fatalf("archive line %q: %v", l, err)
		}
		out = append(out, c.Serial)
	}
	return out
}

func serialOf(id *NodeIdentity) string { return FormatSerial(id.Certificate().SerialNumber) }

// TestArchiveGivesBackOnceInOrder: what comes back from the archive goes
// back to its place in the index, which says which certificate of a node
// is its latest; once, though a crash left it listed twice; and leaves the
// archive, so that archived again it is listed once.
func TestArchiveGivesBackOnceInOrder(t *testing.T) {
	ca := newTestCA(t)
	stolen := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 30*24*time.Hour)
	if _, err := ca.RevokeSerials([]*big.Int{stolen.Certificate().SerialNumber}, "keyCompromise", t0); err != nil {
		t.Fatal(err)
	}
	gw1 := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0.Add(time.Minute), 30*24*time.Hour) // its new identity
	gw2 := issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, 30*24*time.Hour)
	// While the clock is ahead, gw2 is issued anew: that one replaces it.
	if _, err := ca.IssueIdentity(testAttrs("gw2", "s", "100.96.0.2"), 30*24*time.Hour, jumped); err != nil {
		t.Fatal(err)
	}
	// A crash between the archive's append and the index's write lists
	// gw1's twice; one between the index's write and the archive's
	// rewrite, after a restore, lists the compromised one the index holds.
	file := filepath.Join(ca.Dir(), fileArchive)
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var dup []byte
	for l := range bytes.Lines(b) {
		if bytes.Contains(l, []byte(serialOf(gw1))) {
			dup = l
		}
	}
	stolenLine, _ := json.Marshal(IssuedCert{Serial: serialOf(stolen), Node: "gw1", NotAfter: stolen.Certificate().NotAfter})
	if err := os.WriteFile(file, append(append(append(b, dup...), stolenLine...), '\n'), 0o600); err != nil {
		t.Fatal(err)
	}

	if err := renewAt(ca, gw1, t0.Add(16*24*time.Hour)); err != nil {
		t.Errorf("gw1's renewal, its certificate after the compromised one: %v", err)
	}
	if err := renewAt(ca, gw2, t0.Add(16*24*time.Hour)); err == nil || !strings.Contains(err.Error(), "not its latest") {
		t.Errorf("gw2's renewal of the certificate the one issued a year ahead replaced: %v, want refused as not its latest", err)
	}
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	for _, c := range issued {
		count[c.Serial]++
	}
	for _, id := range []*NodeIdentity{stolen, gw1, gw2} {
		if count[serialOf(id)] != 1 {
			t.Errorf("index lists %s's %s %d times, want once", id.Attributes().Node, serialOf(id), count[serialOf(id)])
		}
	}
	if got := archiveSerials(t, ca); len(got) != 0 {
		t.Errorf("archive once the clock is right holds %v, want nothing: all of it came back", got)
	}

	// All of it ends, and is archived again: once.
	issueEnrollerAt(t, ca, jumped.Add(90*24*time.Hour))
	count = map[string]int{}
	for _, s := range archiveSerials(t, ca) {
		count[s]++
	}
	for _, id := range []*NodeIdentity{gw1, gw2} {
		if count[serialOf(id)] != 1 {
			t.Errorf("archive lists %s's %s %d times, want once", id.Attributes().Node, serialOf(id), count[serialOf(id)])
		}
	}
	if count[serialOf(stolen)] != 0 {
		t.Errorf("archive lists the compromised certificate, which the index keeps for good")
	}
}

// TestArchiveReadOnlyWhenClockWentBack: as the clock goes forward, the
// archive is only appended to, never read (here, a line that does not
// decode would stop the operation that read it); it is read once the
// clock goes back past what it archived.
func TestArchiveReadOnlyWhenClockWentBack(t *testing.T) {
	ca := newTestCA(t)
	issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0.Add(archiveAfter+2*time.Hour), time.Hour) // archives gw1
	f, err := os.OpenFile(filepath.Join(ca.Dir(), fileArchive), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("not json\n")
	f.Close()
	issue(t, ca, testAttrs("gw3", "s", "100.96.0.3"), t0.Add(2*archiveAfter+4*time.Hour), time.Hour) // archives gw2
	if _, err := ca.SerialsOfNode("gw3", t0.Add(2*archiveAfter+4*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.IssueIdentity(testAttrs("gw4", "s", "100.96.0.4"), time.Hour, t0.Add(2*time.Hour)); err == nil || !strings.Contains(err.Error(), fileArchive) {
		t.Errorf("issue with the clock back before gw2's end: %v, want the archive's damaged line reported", err)
	}
}

// TestArchiveGivesBackToEarlierIndex: an index an earlier release wrote
// does not say up to when its archive holds entries: the archive is read
// once, and what is not over comes back.
func TestArchiveGivesBackToEarlierIndex(t *testing.T) {
	ca := newTestCA(t)
	ended := issue(t, ca, testAttrs("gw0", "s", "100.96.0.9"), t0, time.Hour)
	gw1 := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 60*24*time.Hour)
	issueEnrollerAt(t, ca, jumped)
	asEarlierRelease(t, ca, false)
	file := filepath.Join(ca.Dir(), fileIndex)

	later := t0.Add(35 * 24 * time.Hour) // gw0's ended too long ago to come back
	if _, err := ca.SerialsOfNode("gw1", later); err != nil {
		t.Errorf("gw1 (valid until %s) with the clock right again: %v", gw1.Certificate().NotAfter, err)
	}
	if got := archiveSerials(t, ca); len(got) != 1 || got[0] != serialOf(ended) {
		t.Errorf("archive holds %v, want gw0's %s alone", got, serialOf(ended))
	}
	if b, _ := os.ReadFile(file); !bytes.Contains(b, []byte(`"archived_end"`)) {
		t.Errorf("index does not say up to when its archive holds entries: %s", b)
	}
}

// asEarlierRelease rewrites the CA's index, and its archive unless only
// the index, as a release that did not number the entries wrote them:
// what an upgraded CA directory holds; a rollback to such a release
// rewrites the index, and only appends to the archive.
func asEarlierRelease(t *testing.T, ca *CA, indexOnly bool) {
	t.Helper()
	file := filepath.Join(ca.Dir(), fileIndex)
	var idx map[string]any
	b, err := os.ReadFile(file)
	if err != nil || json.Unmarshal(b, &idx) != nil {
		t.Fatal(err)
	}
	delete(idx, "archived_end")
	delete(idx, "last_seq")
	for _, c := range idx["certs"].([]any) {
		delete(c.(map[string]any), "seq")
	}
	if b, err = json.Marshal(idx); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(ca.Dir(), fileArchive)
	b, err = os.ReadFile(archive)
	if errors.Is(err, fs.ErrNotExist) || indexOnly {
		return
	} else if err != nil {
		t.Fatal(err)
	}
	var lines bytes.Buffer
	for l := range bytes.Lines(b) {
		var c map[string]any
		if err := json.Unmarshal(l, &c); err != nil {
			t.Fatal(err)
		}
		delete(c, "seq")
		json.NewEncoder(&lines).Encode(c)
	}
	if err := os.WriteFile(archive, lines.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestArchiveGivesBackEarlierReleaseInOrder: gw1 was issued A, then B,
// by a release that did not number the index's entries. Upgraded, the
// CA's clock runs ahead far enough to archive A, not B; once it is right,
// A comes back before B, not after: a gateway's last entry is its latest
// certificate, and gw1's renewal of B was refused as one whose key was
// copied. A rollback and a new upgrade number the entries above those
// archived.
func TestArchiveGivesBackEarlierReleaseInOrder(t *testing.T) {
	ca := newTestCA(t)
	a := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 30*24*time.Hour)
	b := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0.Add(24*time.Hour), 30*24*time.Hour)
	asEarlierRelease(t, ca, false)
	issueEnrollerAt(t, ca, t0.Add(60*24*time.Hour+12*time.Hour)) // archives A, not B
	if got := archiveSerials(t, ca); len(got) != 1 || got[0] != serialOf(a) {
		t.Fatalf("archive holds %v, want A alone", got)
	}
	asEarlierRelease(t, ca, true) // rolled back, then upgraded again
	if err := renewAt(ca, b, t0.Add(17*24*time.Hour)); err != nil {
		t.Errorf("gw1's renewal of its certificate B once A came back: %v", err)
	}
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	seen := map[int64]bool{}
	for _, c := range issued {
		if seen[c.Seq] || c.Seq == 0 {
			t.Errorf("entry %s numbered %d, twice or not at all", c.Serial, c.Seq)
		}
		seen[c.Seq] = true
		switch c.Serial {
		case serialOf(a):
			order = append(order, "A")
		case serialOf(b):
			order = append(order, "B")
		}
	}
	if !slices.Equal(order, []string{"A", "B"}) {
		t.Errorf("gw1's certificates in index order: %v; want A, B", order)
	}
}

// TestArchiveGivesBackEarlierReleaseNumbered: an entry an earlier release
// archived, unnumbered, comes back before the gateway's newer certificate
// and numbered before it too: numbered last, the next give-back (sorted by
// number) put it after, and the renewal of the newer one was refused as
// one whose key was copied.
func TestArchiveGivesBackEarlierReleaseNumbered(t *testing.T) {
	ca := newTestCA(t)
	issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 30*24*time.Hour)                        // A, ends t0+30d
	b := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0.Add(24*time.Hour), 40*24*time.Hour) // B, ends t0+41d
	issueEnrollerAt(t, ca, t0.Add(65*24*time.Hour))                                               // ahead: archives A, not B
	asEarlierRelease(t, ca, false)
	issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), right, time.Hour) // right again: A comes back
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(issued); i++ {
		if issued[i-1].Seq >= issued[i].Seq {
			t.Errorf("entry %d (%s) numbered %d, entry %d (%s) %d: index order and numbers disagree",
				i-1, issued[i-1].Node, issued[i-1].Seq, i, issued[i].Node, issued[i].Seq)
		}
	}
	issueEnrollerAt(t, ca, t0.Add(100*24*time.Hour)) // ahead again, then right
	if err := renewAt(ca, b, t0.Add(25*24*time.Hour)); err != nil {
		t.Errorf("gw1's renewal of B, its latest certificate: %v", err)
	}
}

// TestArchiveNotReadForAnOperationDatedBack: an operation dated a little
// back (the enrollment endpoint's certificate is backdated by the clocks'
// allowance) does not bring back what the one before it just archived: the
// archive was read and rewritten under the CA's lock, for an entry the
// next operation archived again.
func TestArchiveNotReadForAnOperationDatedBack(t *testing.T) {
	ca := newTestCA(t)
	ended := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, 24*time.Hour)
	now := t0.Add(24*time.Hour + archiveAfter + 2*time.Minute) // 2 minutes after it is archiveAfter past its end
	issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), now, time.Hour)
	if got := archiveSerials(t, ca); !slices.Contains(got, serialOf(ended)) {
		t.Fatalf("archive %v lacks gw1's", got)
	}
	file := filepath.Join(ca.Dir(), fileArchive)
	before, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	issueEnrollerAt(t, ca, now.Add(time.Minute).Add(-MaxClockSkew))
	if after, err := os.Stat(file); err != nil || !os.SameFile(before, after) {
		t.Errorf("the archive was rewritten by an operation dated 4 minutes back (%v)", err)
	}
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(issued, func(c IssuedCert) bool { return c.Serial == serialOf(ended) }) {
		t.Error("gw1's certificate, 30 days past its end, came back into the index")
	}
}

// TestArchiveGiveBackKeepsNumbers: an earlier release's entry given back
// is numbered below every number, and the others keep theirs. Renumbering
// the index put an entry issued before one still archived (gw1's E, longer
// lived, before S) above it, and S given back later went before E: E then
// read as gw1's latest certificate, though S was issued after it.
func TestArchiveGiveBackKeepsNumbers(t *testing.T) {
	idx := &caIndex{LastSeq: 5, Certs: []IssuedCert{{Serial: "e", Node: "gw1", Seq: 3}}}
	idx.putBack([]IssuedCert{{Serial: "x", Node: "gw9"}}, 5) // S (5) stays archived
	idx.putBack([]IssuedCert{{Serial: "s", Node: "gw1", Seq: 5}}, 5)
	var order []string
	for i, c := range idx.Certs {
		order = append(order, c.Serial)
		if i > 0 && c.Seq <= idx.Certs[i-1].Seq {
			t.Errorf("%s numbered %d after %s's %d", c.Serial, c.Seq, idx.Certs[i-1].Serial, idx.Certs[i-1].Seq)
		}
	}
	if !slices.Equal(order, []string{"x", "e", "s"}) {
		t.Errorf("index order %v; want [x e s]: the earlier release's first, S after E", order)
	}
}
