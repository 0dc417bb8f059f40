package migrate

import (
	"testing"

	"github.com/skybridge-mesh/skybridge/policy"
)

// TestStandingOf: what an admission rests on, which the planner and
// `migrate run --to` rank alike: an audit-mode pass is last even where an
// exception is named.
func TestStandingOf(t *testing.T) {
	for _, tc := range []struct {
		d    policy.Decision
		want Standing
	}{
		{policy.Decision{Allowed: true}, ByRule},
		{policy.Decision{Allowed: true, Exceptions: []*policy.ExceptionRef{{Name: "e"}}}, ByException},
		{policy.Decision{Allowed: true, Denied: true, Audit: true}, ByAudit},
		{policy.Decision{Allowed: true, Denied: true, Audit: true, Exceptions: []*policy.ExceptionRef{{Name: "e"}}}, ByAudit},
		{policy.Decision{Denied: true}, Refused},
	} {
		if got := StandingOf(&tc.d); got != tc.want {
			t.Errorf("%+v: %d, want %d", tc.d, got, tc.want)
		}
	}
}
