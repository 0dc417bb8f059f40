package units

import (
	"math"
	"testing"
)

func TestBytes(t *testing.T) {
	for n, want := range map[int64]string{
		0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB",
		64 << 20: "64.0 MiB", 3 << 30: "3.0 GiB", 1 << 40: "1.0 TiB",
		// Rounded up to 1024 of a unit, it is one of the next.
		1048524: "1023.9 KiB", 1048575: "1.0 MiB", 1<<30 - 1: "1.0 GiB", math.MaxInt64: "8.0 EiB",
	} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}
