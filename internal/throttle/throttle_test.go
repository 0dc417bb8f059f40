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
	allowed := 0
	for range 1000 {
		wg.Go(func() {
			if ok, _ := p.Allow(); ok {
				mu.Lock()
				allowed++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	// The burst may straddle a second's edge.
	if allowed < 1 || allowed > 2 {
		t.Fatalf("%d of 1000 events in a burst allowed; want 1 (2 across a second's edge)", allowed)
	}
	p.last.Store(0) // the next second
	ok, dropped := p.Allow()
	if !ok || dropped != int64(1000-allowed) {
		t.Fatalf("next second: allowed %v, %d dropped reported; want true, %d", ok, dropped, 1000-allowed)
	}
}
