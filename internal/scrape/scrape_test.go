package scrape

import (
	"strings"
	"testing"
)

// TestValue: a series' value, summed over the series matched; of a
// histogram or a summary, its count (a summary's read as 0, found).
func TestValue(t *testing.T) {
	f, err := Parse(strings.NewReader(`# TYPE sent counter
sent{site="a"} 3
sent{site="b"} 4
# TYPE rtt summary
rtt_sum 12.5
rtt_count 5
# TYPE join histogram
join_bucket{le="1"} 2
join_bucket{le="+Inf"} 6
join_sum 9
join_count 6
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		want map[string]string
		v    float64
		ok   bool
	}{
		{"sent", nil, 7, true},
		{"sent", map[string]string{"site": "b"}, 4, true},
		{"sent", map[string]string{"site": "c"}, 0, false},
		{"rtt", nil, 5, true},
		{"join", nil, 6, true},
		{"none", nil, 0, false},
	} {
		if v, ok := f.Value(tc.name, tc.want); v != tc.v || ok != tc.ok {
			t.Errorf("Value(%s, %v) = %v, %v; want %v, %v", tc.name, tc.want, v, ok, tc.v, tc.ok)
		}
	}
}
