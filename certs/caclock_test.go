package certs

import (
	"testing"
	"time"
)

// TestRoutesFreeLastIssued: a gateway's latest certificate, whose routes
// count against other sites, is the one issued last, not the one with the
// latest NotBefore. The CA's clock stepped back 10 minutes between two
// issues of gw1: the second, with the earlier NotBefore, is what gw1 runs.
func TestRoutesFreeLastIssued(t *testing.T) {
	t.Run("route added", func(t *testing.T) {
		ca := newTestCA(t)
		issue(t, ca, testAttrs("gw1", "a", "100.96.0.1"), t0, 30*24*time.Hour)
		issue(t, ca, testAttrs("gw1", "a", "100.96.0.1", "10.1.0.0/16"), t0.Add(-10*time.Minute), 30*24*time.Hour)
		if _, err := ca.IssueIdentity(testAttrs("gw2", "b", "100.96.0.2", "10.1.0.0/16"), 30*24*time.Hour, t0.Add(time.Minute)); err == nil {
			t.Error("site b was certified 10.1.0.0/16, which gw1 of site a was certified last")
		}
		if err := ca.RoutesFree(testAttrs("", "b", "100.96.0.3", "10.1.0.0/16"), t0.Add(time.Minute)); err == nil {
			t.Error("RoutesFree: 10.1.0.0/16 free for site b, which gw1 of site a was certified last")
		}
	})
	t.Run("route dropped", func(t *testing.T) {
		ca := newTestCA(t)
		issue(t, ca, testAttrs("gw1", "a", "100.96.0.1", "10.1.0.0/16"), t0, 30*24*time.Hour)
		issue(t, ca, testAttrs("gw1", "a", "100.96.0.1"), t0.Add(-10*time.Minute), 30*24*time.Hour)
		if _, err := ca.IssueIdentity(testAttrs("gw2", "b", "100.96.0.2", "10.1.0.0/16"), 30*24*time.Hour, t0.Add(time.Minute)); err != nil {
			t.Errorf("site b refused 10.1.0.0/16, which gw1 of site a was re-issued without: %v", err)
		}
	})
}
