package migrate

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/policy"
)

// refusalCounts is an Observer told of a receiver's refusals, which it
// counts by reason.
type refusalCounts struct {
	nopObserver
	mu      sync.Mutex
	denied  map[string]int
	dropped map[string]int
}

func (c *refusalCounts) OfferDenied(reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.denied == nil {
		c.denied = map[string]int{}
	}
	c.denied[reason]++
}

func (c *refusalCounts) ReceiveDropped(reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dropped == nil {
		c.dropped = map[string]int{}
	}
	c.dropped[reason]++
}

func (c *refusalCounts) counts() (denied, dropped map[string]int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.denied), maps.Clone(c.dropped)
}

// TestEveryDeniedOfferObserved: the Observer is told of every offer the
// receiver's policy denies, by the kind of rule that denied it, those its
// audit log only counts (past denialBurst in a row from one gateway)
// included. The audit log's count comes a minute late at the soonest,
// and nothing else said how many a gateway's offers were denied.
func TestEveryDeniedOfferObserved(t *testing.T) {
	var obs refusalCounts
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { c.Observer = &obs })
	n := 0
	deny := func(class string) {
		t.Helper()
		n++
		p.offerDenied(t, fmt.Sprintf("deny%012d", n), class)
	}
	// The destination is in DE: swiss-banking-secret has no allow rule
	// for it, and the other class is no policy's.
	for range denialBurst + 5 {
		deny("swiss-banking-secret")
	}
	deny("no-such-class")
	withPolicy := func(src string) {
		t.Helper()
		pol, err := policy.Parse("p.hcl", []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		p.recvPolicy.Store(pol)
	}
	withPolicy(`policy {
  name    = "deny-test"
  version = 2
}
class "pii-eu" {
  allow "store" {
    jurisdiction = ["DE", "CH"]
  }
  allow "transit" {
    jurisdiction = ["DE", "CH"]
  }
  deny "store" {
    jurisdiction = ["DE"]
    reason       = "not here"
  }
}
`)
	deny("pii-eu")
	withPolicy(`policy {
  name    = "requirement-test"
  version = 3
}
class "pii-eu" {
  allow "store" {
    jurisdiction = ["DE", "CH"]
    require {
      encryption_at_rest = true
    }
  }
  allow "transit" {
    jurisdiction = ["DE", "CH"]
  }
}
`)
	deny("pii-eu") // the destination's certificate attests no encryption at rest
	p.recvPolicy.Store(nil)
	deny("pii-eu")

	denied, _ := obs.counts()
	want := map[string]int{DeniedByDefault: denialBurst + 6, DeniedByRule: 1, DeniedRequirement: 1, DeniedNoPolicy: 1}
	if !maps.Equal(denied, want) {
		t.Errorf("%d denied offers observed as %v, want %v", n, denied, want)
	}
	if err := p.stopRecv(); err != nil {
		t.Fatal(err)
	}
	recorded := 0
	for _, r := range p.recvRecords(t) {
		if r.Event == "migration" {
			recorded++
		}
	}
	if recorded >= n {
		t.Errorf("the audit log recorded %d of %d denied offers one by one: none was only counted, and the test shows nothing of them", recorded, n)
	}
}

// TestDroppedReceivesObserved: the Observer is told of each interrupted
// receive forgotten with what it held: one past the maxInterruptedPerPeer
// its sender may have here, and one not offered again for
// AbandonedAfter. Their senders must send every chunk again, which only
// the receiver's log said.
func TestDroppedReceivesObserved(t *testing.T) {
	var obs refusalCounts
	now := time.Now()
	plant := func(j *Journal, store, id, from string, last time.Time) {
		t.Helper()
		temp := filepath.Join(store, ".incoming", id+".raw")
		if err := os.MkdirAll(filepath.Dir(temp), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(temp, []byte("held"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(temp, last, last); err != nil {
			t.Fatal(err)
		}
		rec := RecvRecord{ID: id, Name: "img-" + id, From: from, FromSite: from + "-site", Class: "pii-eu", Format: FormatRaw, Size: 4096, ChunkSize: 4096,
			Temp: temp, State: StateRunning, Started: last.Add(-time.Hour), Attempted: last}
		if err := j.put(bucketRecv, id, &rec); err != nil {
			t.Fatal(err)
		}
	}
	// Planted before the receiver serves: its first pass over the
	// receives forgets the abandoned one, once.
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.Observer = &obs
		plant(c.Journal, c.StoreDir, "abandoned000000", "gw-other", now.Add(-AbandonedAfter-time.Hour))
		for i := range maxInterruptedPerPeer {
			plant(c.Journal, c.StoreDir, fmt.Sprintf("old%013d", i), "gw-zrh", now.Add(-time.Duration(maxInterruptedPerPeer-i)*time.Hour))
		}
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 8 * mib})
	p.interrupted(raw, 1) // gw-zrh's oldest goes as this one is kept

	want := map[string]int{DroppedTooMany: 1, DroppedAbandoned: 1}
	var dropped map[string]int
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, dropped = obs.counts(); maps.Equal(dropped, want) || time.Now().After(deadline) {
			break
		}
	}
	if !maps.Equal(dropped, want) {
		t.Errorf("receives forgotten with what they held observed as %v, want %v", dropped, want)
	}
	if denied, _ := obs.counts(); len(denied) != 0 {
		t.Errorf("offers observed as denied: %v", denied)
	}
}
