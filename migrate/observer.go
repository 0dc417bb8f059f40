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
	// OfferDenied reports each offer the receiver's policy denied,
	// those its audit log counts rather than records one by one
	// (paceDenial) included.
	OfferDenied(reason string)
	// ReceiveDropped reports an interrupted receive forgotten with the
	// chunks it held: a resume of it sends every chunk again.
	ReceiveDropped(reason string)
}

// Why a receiver denied an offer, as OfferDenied names it: the kind of
// the policy's rule that refused it, or no policy in force. A fixed set:
// each is a metric's label value.
const (
	DeniedNoPolicy    = "no_policy"
	DeniedByRule      = "deny"         // a deny rule
	DeniedByDefault   = "default_deny" // no allow rule or exception for the site, or a class the policy does not define
	DeniedRequirement = "requirement"  // the site's certificate does not attest what the allow asks (encryption at rest, replica zones)
	DeniedMaxHops     = "max_hops"     // a path longer than the allow lets the data take
)

// DenialReasons are the reasons OfferDenied gives.
var DenialReasons = []string{DeniedNoPolicy, DeniedByRule, DeniedByDefault, DeniedRequirement, DeniedMaxHops}

// Why a receiver forgot an interrupted receive with the chunks it held,
// as ReceiveDropped names it.
const (
	DroppedTooMany   = "too_many"  // its sender had more interrupted here than are kept (maxInterruptedPerPeer); the oldest went
	DroppedAbandoned = "abandoned" // not offered again for AbandonedAfter
)

// DropReasons are the reasons ReceiveDropped gives.
var DropReasons = []string{DroppedTooMany, DroppedAbandoned}

type nopObserver struct{}

func (nopObserver) Decided(string, string, policy.Request, policy.Decision) {}
func (nopObserver) Moved(string, int, int64)                                {}
func (nopObserver) Done(string, int)                                        {}
func (nopObserver) Retried(string)                                          {}
func (nopObserver) Ended(string, string, time.Duration)                     {}
func (nopObserver) OfferDenied(string)                                      {}
func (nopObserver) ReceiveDropped(string)                                   {}

func observer(o Observer) Observer {
	if o == nil {
		return nopObserver{}
	}
	return o
}
