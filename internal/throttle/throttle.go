// Package throttle says when a repeated event is worth logging again: a
// flood that a peer can cause (full queues, refused connections) must not
// become a flood of log lines.
package throttle

import (
	"sync/atomic"
	"time"
)

// PerSecond allows one event per second of the wall clock. The zero value
// is ready to use and safe for concurrent use.
type PerSecond struct {
	last    atomic.Int64 // unix second of the last event allowed
	dropped atomic.Int64 // events refused since
}

// Allow reports whether this event is the first of its second, and how
// many were refused since the last one allowed.
func (p *PerSecond) Allow() (ok bool, dropped int64) {
	now := time.Now().Unix()
	if p.last.Swap(now) == now {
		p.dropped.Add(1)
		return false, 0
	}
	return true, p.dropped.Swap(0)
}
