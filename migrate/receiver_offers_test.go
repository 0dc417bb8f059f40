package migrate

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// TestDenialCountAfterClockStepBack: denials counted after the
// receiver's clock stepped back (an NTP correction) are recorded within a
// minute, as others are; the refill waited for the clock to pass where it
// stood before the step (here 40 minutes), and a crash meanwhile lost
// them.
func TestDenialCountAfterClockStepBack(t *testing.T) {
	var skew atomic.Int64
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	})
	n := 0
	deny := func() {
		t.Helper()
		c := p.dial(t, nil)
		defer c.Close()
		w, r := newFrameWriter(c), newFrameReader(c)
		n++
		o := Offer{ID: fmt.Sprintf("deny%012d", n), Name: "vm", Class: "swiss-banking-secret", Format: FormatRaw, Size: 4096, ChunkSize: 4096, Streams: 1}
		if err := w.json(frameOffer, o); err != nil {
			t.Fatal(err)
		}
		var d Deny
		if err := r.json(frameDeny, &d); err != nil {
			t.Fatal(err)
		}
	}
	// (Certificates here last an hour from now: the clock runs 40 min
	// fast, and is then corrected.)
	skew.Store(int64(40 * time.Minute))
	for range denialBurst {
		deny() // recorded one by one, the burst spent
	}
	skew.Store(0) // the clock is corrected back 40 minutes
	deny()        // counted
	skew.Add(int64(5 * denialEvery))
	if left := p.recv.flushDenials(false); left {
		t.Errorf("five minutes after a denial was counted, the count is still held: it waits for the clock to pass where it stood before the step")
	}
}

// TestBadOfferEndsFailed: an offer the receiver cannot take (malformed,
// or not JSON at all) counts as a receive failed before it started, as
// its sender counts it.
func TestBadOfferEndsFailed(t *testing.T) {
	var e endings
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { c.Observer = &e })
	for name, send := range map[string]func(w *frameWriter) error{
		"malformed": func(w *frameWriter) error {
			return w.json(frameOffer, Offer{ID: "bad000000001", Name: "vm", Class: "Not A Class", Format: FormatRaw, Size: 4096, ChunkSize: 4096, Streams: 1})
		},
		"not JSON": func(w *frameWriter) error {
			if err := w.frame(frameOffer, []byte("{")); err != nil {
				return err
			}
			return w.flush()
		},
	} {
		e.mu.Lock()
		e.seen = nil
		e.mu.Unlock()
		c := p.dial(t, nil)
		w, r := newFrameWriter(c), newFrameReader(c)
		if err := send(w); err != nil {
			t.Fatal(err)
		}
		if typ, _, err := r.next(nil); err != nil || typ != frameError {
			t.Fatalf("%s: answer %d, %v; want an error", name, typ, err)
		}
		c.Close()
		e.mu.Lock()
		if len(e.seen) != 1 || e.seen[0] != RoleReceive+"/"+StateFailed {
			t.Errorf("%s: ends %v; want one receive/failed", name, e.seen)
		}
		e.mu.Unlock()
	}
}
