package migrate

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestDroppedReceivesCountedOnce: sessions of one sender that settle at
// the same moment (its link dropped under a few parallel migrations) each
// list the sender's interrupted receives and forget the oldest past
// maxInterruptedPerPeer; each forgotten receive is counted (and logged)
// once. forget succeeded again on a record already gone, and
// skybridge_migration_receives_dropped_total counted 4 receives 15 times.
func TestDroppedReceivesCountedOnce(t *testing.T) {
	var obs refusalCounts
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { c.Observer = &obs })
	now := time.Now()
	plant := func(id string, last time.Time) {
		t.Helper()
		temp := filepath.Join(p.store, ".incoming", id+".raw")
		if err := os.MkdirAll(filepath.Dir(temp), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(temp, []byte("held"), 0o600); err != nil {
			t.Fatal(err)
		}
		os.Chtimes(temp, last, last)
		rec := RecvRecord{ID: id, Name: "img-" + id, From: "gw-zrh", FromSite: "onprem-zrh", Class: "pii-eu", Format: FormatRaw, Size: 4096, ChunkSize: 4096,
			Temp: temp, State: StateRunning, Started: last.Add(-time.Hour), Attempted: last}
		if err := p.recvJ.put(bucketRecv, id, &rec); err != nil {
			t.Fatal(err)
		}
	}
	const settling = 4                   // sessions of gw-zrh interrupted together
	for trial := 0; trial < 5; trial++ { // each a race; the double count showed at the first
		recs, _ := p.recvJ.Receives()
		for _, r := range recs {
			p.recv.forget(r.ID, r.Temp)
		}
		obs.mu.Lock()
		obs.dropped = nil
		obs.mu.Unlock()
		for i := range maxInterruptedPerPeer {
			plant(fmt.Sprintf("old%013d", i), now.Add(-time.Duration(maxInterruptedPerPeer-i+settling)*time.Hour))
		}
		for i := range settling {
			plant(fmt.Sprintf("new%013d", i), now.Add(-time.Duration(settling-i)*time.Minute))
		}
		var start, done sync.WaitGroup
		start.Add(1)
		for i := range settling {
			done.Add(1)
			go func() {
				defer done.Done()
				start.Wait()
				p.recv.trimInterrupted("gw-zrh", fmt.Sprintf("new%013d", i))
			}()
		}
		start.Done()
		done.Wait()
		left, _ := p.recvJ.Receives()
		gone := maxInterruptedPerPeer + settling - len(left)
		_, dropped := obs.counts()
		if dropped[DroppedTooMany] != gone {
			t.Fatalf("trial %d: %d receives forgotten, counted %d times as dropped", trial, gone, dropped[DroppedTooMany])
		}
	}
}
