package mesh

import (
	"testing"
	"time"
)

// TestProbeVerdicts: a gateway is unreachable after two misses in a row
// and reachable again only after answering for ten seconds without a miss;
// a new one starts unproven; one miss among answers changes nothing.
func TestProbeVerdicts(t *testing.T) {
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name  string
		start bool   // initially down
		seq   string // one probe a second: + answered, - missed
		want  string // verdict after each probe: U up, D down
	}{
		{"unproven gateway proves itself after ten seconds", true, "+++++++++++++", "DDDDDDDDDDUUU"},
		{"two misses in a row: down", false, "++-+-+--+", "UUUUUUUDD"},
		{"a miss restarts the recovery clock: no flapping", true, "++++++++-++++++++++++", "DDDDDDDDDDDDDDDDDDDUU"},
	} {
		st := &probeState{down: tc.start}
		got := ""
		for i, c := range tc.seq {
			st.observe(c == '+', t0.Add(time.Duration(i)*time.Second))
			got += map[bool]string{true: "D", false: "U"}[st.down]
		}
		if got != tc.want {
			t.Errorf("%s: %s gave %s, want %s", tc.name, tc.seq, got, tc.want)
		}
	}
}
