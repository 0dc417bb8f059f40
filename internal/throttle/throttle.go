// Package throttle says when a repeated event is worth logging again: a
// flood that a peer can cause (full queues, refused connections) must not
// become a flood of log lines.
package throttle

import (
	"sync/atomic"
	"time"
)

// PerSecond allows one event per second. The zero value is ready to use
// and safe for concurrent use.
type PerSecond struct {
	last    atomic.Int64 // second (of the monotonic clock) of the last event allowed
	dropped atomic.Int64 // events refused since
}

// epoch starts the seconds counted: on the monotonic clock, so that a
// wall clock stepped back does not silence events for as long.
var epoch = time.Now()

// second is the current second, from 1.
func second() int64 { return int64(time.Since(epoch)/time.Second) + 1 }

// Allow reports whether this event is the first of its second, and how
// many were refused since the last one allowed.
func (p *PerSecond) Allow() (ok bool, dropped int64) {
	now := second()
	for {
		// Compared, not swapped: an event that read the clock just
		// before a second's edge, and stores after one that read it
		// just after, would put the second back and let a third in.
		last := p.last.Load()
		if last >= now {
			p.dropped.Add(1)
			return false, 0
		}
		if p.last.CompareAndSwap(last, now) {
			return true, p.dropped.Swap(0)
		}
	}
}
