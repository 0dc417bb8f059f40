// Package freeport finds loopback ports free for both UDP and TCP, as a
// gateway's gossip binds both: for the demo and the tests that run
// gateways side by side on 127.0.0.1.
package freeport

import (
	"errors"
	"fmt"
	"io"
	"net"
)

// Loopback returns n distinct ports of 127.0.0.1, each free for UDP and
// TCP when returned. The kernel picks them (from its ephemeral range, so
// they do not clash with tests that probe fixed ranges), and the probing
// sockets stay open until all n are found, so none is handed out twice.
// Another socket may still take one before the caller binds it: bind them
// at once.
func Loopback(n int) ([]int, error) {
	var (
		out  []int
		held []io.Closer
	)
	defer func() {
		for _, h := range held {
			h.Close()
		}
	}()
	for try := 0; len(out) < n; try++ {
		if try == 100*n {
			return nil, errors.New("no free loopback ports")
		}
		u, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("probe a loopback port: %w", err)
		}
		held = append(held, u)
		p := u.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue // taken for TCP: try another
		}
		held = append(held, l)
		out = append(out, p)
	}
	return out, nil
}
