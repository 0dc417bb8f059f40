package migrate

import (
	"time"

	"github.com/skybridge-mesh/skybridge/policy"
)

// Roles a gateway plays in a migration, as Observer calls name them.
const (
	RoleSend    = "send"
	RoleReceive = "receive"
)

// Observer is told what migrations do, for metrics and for the operator's
// list of recent policy decisions. Calls are synchronous, from the
// migration's own goroutines, and must return quickly.
type Observer interface {
	// Decided reports a residency decision taken for a migration: the
	// sender asks before it sends, the receiver before it accepts.
	Decided(role, id string, req policy.Request, d policy.Decision)
	// Moved reports chunks that crossed the wire and their bytes there.
	Moved(role string, chunks int, wireBytes int64)
	// Done reports chunks a sender has dealt with, whichever way: sent
	// and acknowledged, found at the receiver or in its stored version,
	// or zeros.
	Done(role string, chunks int)
	// Retried reports a chunk sent again after a stream failed.
	Retried(role string)
	// Ended reports a migration's end: done, denied, cancelled or failed.
	Ended(role, outcome string, took time.Duration)
}

type nopObserver struct{}

func (nopObserver) Decided(string, string, policy.Request, policy.Decision) {}
func (nopObserver) Moved(string, int, int64)                                {}
func (nopObserver) Done(string, int)                                        {}
func (nopObserver) Retried(string)                                          {}
func (nopObserver) Ended(string, string, time.Duration)                     {}

func observer(o Observer) Observer {
	if o == nil {
		return nopObserver{}
	}
	return o
}
