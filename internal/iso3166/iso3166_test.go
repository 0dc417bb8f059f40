package iso3166

import "testing"

func TestValid(t *testing.T) {
	if n := len(codes); n != 249 {
		t.Fatalf("have %d codes, ISO 3166-1 assigns 249", n)
	}
	for _, c := range []string{"CH", "DE", "US", "IE", "GB", "SG", "LI"} {
		if !Valid(c) {
			t.Errorf("Valid(%q) = false", c)
		}
	}
	for _, c := range []string{"", "ch", "EU", "UK", "DX", "CHE", "C"} {
		if Valid(c) {
			t.Errorf("Valid(%q) = true", c)
		}
	}
}
