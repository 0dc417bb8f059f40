package migrate

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestDeniedOffersPaced: one gateway's offers that the receiver's policy
// refuses are recorded one by one up to denialBurst in a row, then one a
// minute; the others are counted, and the count, with the classes, is
// recorded with the gateway's next record, by Serve's loop once a record
// is due, or when the receiver stops. (A gateway that offered without
// pause grew the audit log by a record each, a hundred a second.)
func TestDeniedOffersPaced(t *testing.T) {
	var skew atomic.Int64
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	})
	n := 0
	deny := func(class string) {
		t.Helper()
		n++
		p.offerDenied(t, fmt.Sprintf("deny%012d", n), class)
	}
	// The destination is in DE: swiss-banking-secret stays in CH, and
	// the other class is no policy's.
	classes := []string{"swiss-banking-secret", "no-such-class"}
	for i := range denialBurst + 5 {
		deny(classes[i%2])
	}
	// Counted: recorded by the next record due, and the one after by
	// Serve's loop, which runs flushDenials when one is due.
	skew.Add(int64(denialEvery))
	deny("no-such-class")
	deny("swiss-banking-secret")
	deny("swiss-banking-secret")
	if left := p.recv.flushDenials(false); !left {
		t.Error("flushDenials left nothing counted, before a record was due")
	}
	skew.Add(int64(denialEvery))
	if left := p.recv.flushDenials(false); left {
		t.Error("flushDenials left denials counted when a record was due")
	}
	// And the last, as the receiver stops.
	deny("swiss-banking-secret")
	if err := p.stopRecv(); err != nil {
		t.Fatal(err)
	}

	var got []string
	for _, r := range p.recvRecords(t) {
		switch r.Event {
		case "migration":
			got = append(got, "record")
		case "migration-denials":
			got = append(got, fmt.Sprintf("%v of %v", r.Fields["denials"], r.Fields["classes"]))
			if r.Fields["source_node"] != "gw-zrh" || r.Fields["outcome"] != "denied" {
				t.Errorf("record of the denials counted: %v", r.Fields)
			}
		default:
			t.Errorf("record of event %q: %v", r.Event, r.Fields)
		}
	}
	want := strings.Repeat("record ", denialBurst) + "5 of [swiss-banking-secret no-such-class] record 2 of [swiss-banking-secret] 1 of [swiss-banking-secret]"
	if s := strings.Join(got, " "); s != want {
		t.Errorf("%d denied offers recorded as\n%s\nwant\n%s", n, s, want)
	}
	if c := strings.Count(p.recvLog.String(), "migration refused by the residency policy"); c != denialBurst+1 {
		t.Errorf("the receiver logged %d denials one by one, want %d", c, denialBurst+1)
	}
}
