package certs

import (
	"math/big"
	"testing"
	"time"
)

// TestRevokedListedWithinClockSkew: a revoked certificate stays on the
// list for MaxClockSkew past its end, since a gateway whose clock runs
// that far behind the CA's takes it as valid still; then it goes.
func TestRevokedListedWithinClockSkew(t *testing.T) {
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	serial := id.Certificate().SerialNumber
	if _, err := ca.RevokeSerials([]*big.Int{serial}, "superseded", t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	end := id.Certificate().NotAfter
	for _, c := range []struct {
		at     time.Time
		listed bool
	}{
		{end.Add(time.Second), true},
		{end.Add(MaxClockSkew - time.Second), true},
		{end.Add(MaxClockSkew + time.Second), false},
	} {
		if err := ca.RefreshCRL(c.at); err != nil {
			t.Fatal(err)
		}
		if got := trust(t, ca).IsRevoked(serial); got != c.listed {
			t.Errorf("list signed %s after the certificate's end names it: %v, want %v", c.at.Sub(end), got, c.listed)
		}
	}
}
