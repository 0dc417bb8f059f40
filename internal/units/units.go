// Package units prints quantities for people.
package units

import (
	"fmt"
	"math"
)

// Bytes prints a byte count in binary units.
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	// Rounded to a tenth, 1048575 B is 1024.0 KiB: say 1.0 MiB.
	if math.Round(v*10) >= unit*10 && exp < len("KMGTPE")-1 {
		v /= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[exp])
}
