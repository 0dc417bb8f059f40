package mesh

import (
	"errors"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/migrate"
)

// TestSubscribeAfterEnd: a client that subscribes to a migration that has
// already ended (one that fails at once) gets the last progress and the
// end, rather than waiting on a channel nothing will close.
func TestSubscribeAfterEnd(t *testing.T) {
	run := &runningMigration{done: make(chan struct{})}
	early := run.subscribe()
	run.publish(migrate.Progress{Phase: "policy"})
	run.end(nil, errors.New("the image is gone"))
	for name, c := range map[string]chan migrate.Progress{"before the end": early, "after the end": run.subscribe()} {
		n := 0
	read:
		for {
			select {
			case _, ok := <-c:
				if !ok {
					break read
				}
				n++
			case <-time.After(10 * time.Second):
				t.Fatalf("subscribed %s: the channel is never closed", name)
			}
		}
		if n == 0 {
			t.Errorf("subscribed %s: no progress at all", name)
		}
	}
}
