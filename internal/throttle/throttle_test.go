package throttle

import (
	"sync"
	"testing"
)

// TestPerSecond: of a burst of events within one second one is allowed,
// and the next one allowed says how many were refused in between.
func TestPerSecond(t *testing.T) {
	var p PerSecond
	var wg sync.WaitGroup
	var mu sync.Mutex
	allowed, reported := 0, int64(0)
	for range 1000 {
		wg.Go(func() {
			if ok, dropped := p.Allow(); ok {
				mu.Lock()
				allowed++
				reported += dropped
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	// The burst may straddle a second's edge: the second one allowed
	// then reports the refusals before it.
	if allowed < 1 || allowed > 2 {
		t.Fatalf("%d of 1000 events in a burst allowed; want 1 (2 across a second's edge)", allowed)
	}
	p.last.Store(0) // the next second
	ok, dropped := p.Allow()
	if !ok || reported+dropped != int64(1000-allowed) {
		t.Fatalf("next second: allowed %v, %d dropped reported (%d before); want true and %d in all", ok, dropped, reported, 1000-allowed)
	}
}

// TestPerSecondLateEvent: an event whose clock reading is older than the
// second an allowed one stored (it read the clock just before the edge,
// and comes after) is refused, not let in to put the second back.
func TestPerSecondLateEvent(t *testing.T) {
	var p PerSecond
	p.last.Store(second() + 1)
	if ok, _ := p.Allow(); ok {
		t.Fatal("an event of a second before the last allowed one was allowed")
	}
	if got := p.last.Load(); got < second() {
		t.Fatalf("the last second went back to %d", got)
	}
}
