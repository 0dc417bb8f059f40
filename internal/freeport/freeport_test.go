package freeport

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
)

// TestLoopback: the ports are distinct, each can be bound for UDP and TCP
// once returned, and they lie below the kernel's ephemeral range.
func TestLoopback(t *testing.T) {
	lo, hi := band()
	for _, p := range loopback(t, 6) {
		if hi > lo && (p < lo || p >= hi) {
			t.Errorf("port %d outside [%d, %d): an outgoing connection could be given it", p, lo, hi)
		}
	}
}

// TestLoopbackNotTwice: a port is not handed out again although nothing
// holds it, even when the band has no other (here it is cut to 6 ports).
func TestLoopbackNotTwice(t *testing.T) {
	setRange(t, fmt.Sprintf("%d 60999", bandLow+6))
	first := loopback(t, 6)
	second := loopback(t, 6)
	for _, p := range second {
		for _, q := range first {
			if p == q {
				t.Fatalf("port %d handed out twice: %v then %v", p, first, second)
			}
		}
	}
}

func setRange(t *testing.T, r string) {
	f := filepath.Join(t.TempDir(), "range")
	if err := os.WriteFile(f, []byte(r+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	old := ephemeralRange
	ephemeralRange = f
	t.Cleanup(func() { ephemeralRange = old })
}

// TestLoopbackWithoutBand: where the ephemeral range leaves no room below
// it, the kernel picks the ports, with the same guarantees.
func TestLoopbackWithoutBand(t *testing.T) {
	setRange(t, "1024\t65535")
	if lo, hi := band(); hi > lo {
		t.Fatalf("band [%d, %d) with the ephemeral range from 1024", lo, hi)
	}
	for _, p := range loopback(t, 4) {
		if p >= bandLow && p < bandHigh {
			t.Errorf("port %d from the band, which the ephemeral range covers", p)
		}
	}
}

func loopback(t *testing.T, n int) []int {
	t.Helper()
	ports, err := Loopback(n)
	if err != nil {
		t.Fatal(err)
	}
	if len(ports) != n {
		t.Fatalf("%d ports, want %d", len(ports), n)
	}
	seen := map[int]bool{}
	for _, p := range ports {
		if seen[p] {
			t.Fatalf("port %d handed out twice: %v", p, ports)
		}
		seen[p] = true
		u, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			t.Fatalf("UDP %d: %v", p, err)
		}
		defer u.Close()
		l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			t.Fatalf("TCP %d: %v", p, err)
		}
		defer l.Close()
	}
	return ports
}
