package migrate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/policy"
)

// TestInsiderDeniedOffersGrowAuditLog: an authenticated peer (any valid
// gateway identity) offers migrations of a class of its choosing, 64 KiB
// of '<' each. The receiver's denial of each used to be recorded in its
// audit log for good, with the class twice (the field and the reason),
// escaped to six bytes a character: 763 KiB of the log per offer, 12
// times what was sent. A class no policy can define is a bad offer: it is
// refused as one, saying why, and nothing is recorded.
func TestInsiderDeniedOffersGrowAuditLog(t *testing.T) {
	p := newPair(t, "DE")
	class := strings.Repeat("<", 64<<10-512) // fits the 64 KiB first frame with the rest of the offer
	const offers = 5
	for i := range offers {
		c := p.dial(t, nil)
		w, r := newFrameWriter(c), newFrameReader(c)
		o := Offer{ID: fmt.Sprintf("deny%012d", i), Name: "vm", Class: class, Format: FormatRaw, Size: 4096, ChunkSize: 4096, Streams: 1}
		// Written as a sender may: '<' as it is, not as \u003c.
		b, _ := json.Marshal(o)
		b = bytes.ReplaceAll(b, []byte(`\u003c`), []byte("<"))
		if err := w.frame(frameOffer, b); err != nil {
			t.Fatal(err)
		}
		w.flush()
		typ, b, err := r.next(nil)
		c.Close()
		if err != nil || typ != frameError || !strings.Contains(string(b), "bad offer: data class") || len(b) > 1<<10 {
			t.Fatalf("offer %d: frame %d of %d bytes %.300q, %v; want a short refusal of the class", i, typ, len(b), b, err)
		}
	}
	if fi, err := os.Stat(p.recvAudit.Path()); err == nil {
		t.Errorf("offers of a class no policy can define grew the audit log to %d bytes", fi.Size())
	}
	if n := len(p.recvLog.String()); n > 16<<10 {
		t.Errorf("offers of a class no policy can define grew the receiver's log by %d KiB", n>>10)
	}
}

// TestOfferClassAsPolicyNamesThem: the receiver takes as an offer's class
// exactly the names a residency policy may give a class, so that no class
// a policy defines is refused as a bad offer.
func TestOfferClassAsPolicyNamesThem(t *testing.T) {
	for _, c := range []string{
		"pii-eu", "a", "0", "9lives", "swiss_banking", strings.Repeat("x", 63),
		"", strings.Repeat("x", 64), "-pii", "_pii", "PII", "pii eu", "pii.eu", "pii/eu", "<", "pïi", "pii\n",
	} {
		src := fmt.Sprintf("policy {\n  name = \"p\"\n  version = 1\n}\nclass %q {\n  allow \"store\" {\n    jurisdiction = [\"DE\"]\n  }\n}\n", c)
		_, err := policy.Parse("p.hcl", []byte(src))
		if defined := err == nil; defined != policy.ValidName(c) {
			t.Errorf("class %q: a policy may define it: %v (%v); an offer may name it: %v", c, defined, err, policy.ValidName(c))
		}
		o := Offer{ID: "0123456789abcdef", Name: "vm", Class: c, Format: FormatRaw, Size: 4096, ChunkSize: 4096, Streams: 1}
		if err := checkOffer(&o); (err == nil) != policy.ValidName(c) || err != nil && !strings.Contains(err.Error(), "data class") {
			t.Errorf("offer of class %q: %v", c, err)
		}
	}
}

// TestInsiderEmptyOffersLeaveReceivesForAWeek: a peer the policy lets
// send one class here offers empty migrations (no chunk may hold data, so
// reserve asks for no room) under new IDs and hangs up. Each used to
// leave a receive record in the journal and a file in .incoming (sparse,
// of the size offered), listed as interrupted and kept AbandonedAfter;
// maxSessionsPerPeer bounds only those under way. A receive that holds no
// chunk as its session ends has nothing to resume: it is forgotten then.
func TestInsiderEmptyOffersLeaveReceivesForAWeek(t *testing.T) {
	p := newPair(t, "DE")
	const offers = 2 * maxSessionsPerPeer
	zero := int64(0)
	for i := range offers {
		c := p.dial(t, nil)
		w, r := newFrameWriter(c), newFrameReader(c)
		o := Offer{ID: fmt.Sprintf("empty%011d", i), Name: fmt.Sprintf("vm%d", i), Class: "pii-eu", Format: FormatRaw, Size: 1 << 40, ChunkSize: 4096, Streams: 1, Chunks: &zero}
		if err := w.json(frameOffer, o); err != nil {
			t.Fatal(err)
		}
		var acc Accept
		if err := r.json(frameAccept, &acc); err != nil {
			t.Fatalf("offer %d: %v", i, err)
		}
		c.Close()
	}
	// The sessions end as their control streams close, and their
	// receives are settled after.
	var recs []RecvRecord
	var files []os.DirEntry
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if recs, err = p.recvJ.Receives(); err != nil {
			t.Fatal(err)
		}
		files, _ = os.ReadDir(filepath.Join(p.store, ".incoming"))
		if len(recs)+len(files)+len(p.recv.Active()) == 0 || time.Now().After(deadline) {
			break
		}
	}
	un, err := p.recv.Unfinished()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) > 0 || len(files) > 0 || len(un) > 0 {
		t.Errorf("%d empty offers, their senders gone, left %d receives, %d incoming files and %d unfinished listed; want none", offers, len(recs), len(files), len(un))
	}
}
