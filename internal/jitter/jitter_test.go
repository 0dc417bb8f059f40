package jitter

import (
	"testing"
	"time"
)

func TestCut(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		r    float64
		want time.Duration
	}{
		{time.Second, 0, time.Second},
		{time.Second, 1, 500 * time.Millisecond},
		{4 * time.Minute, 0.5, 3 * time.Minute},
		{time.Second, 7, 500 * time.Millisecond}, // clamped
		{time.Second, -1, time.Second},
		{0, 0.5, 0},
	} {
		if got := Cut(c.d, c.r); got != c.want {
			t.Errorf("Cut(%v, %v) = %v, want %v", c.d, c.r, got, c.want)
		}
	}
}

func TestSpreadSpreads(t *testing.T) {
	seen := map[time.Duration]bool{}
	for range 64 {
		got := Spread(time.Second)
		if got < 500*time.Millisecond || got > time.Second {
			t.Fatalf("Spread(1s) = %v, outside 500ms..1s", got)
		}
		seen[got] = true
	}
	// 64 draws from a float64 alike would be a broken source, not luck.
	if len(seen) < 2 {
		t.Fatalf("Spread(1s) gave the same wait 64 times: %v", seen)
	}
}
