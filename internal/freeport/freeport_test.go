package freeport

import (
	"fmt"
	"net"
	"testing"
)

// TestLoopback: the ports are distinct and each can be bound for UDP and
// TCP once returned.
func TestLoopback(t *testing.T) {
	ports, err := Loopback(6)
	if err != nil {
		t.Fatal(err)
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
}
