// Package jitter spreads retries out in time. Gateways that fail
// together — their issuer restarting, a thousand burst servers booting at
// once against one enrollment endpoint — would otherwise retry together,
// in step, at every doubling of their backoff.
package jitter

import (
	"math/rand/v2"
	"time"
)

// Spread returns d less a random part of up to half of it.
func Spread(d time.Duration) time.Duration {
	return Cut(d, rand.Float64())
}

// Cut returns d less the part r/2 of it, r clamped to 0..1: Spread's
// arithmetic, with the randomness given, for callers that test theirs.
func Cut(d time.Duration, r float64) time.Duration {
	return time.Duration(float64(d) * (1 - 0.5*min(max(r, 0), 1)))
}
