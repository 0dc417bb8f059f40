// Package freeport finds loopback ports free for both UDP and TCP, as a
// gateway's gossip binds both: for the demo and the tests that run
// gateways side by side on 127.0.0.1.
package freeport

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// The band ports are taken from: below the kernel's ephemeral range, so
// that no outgoing connection is given one between the probe and the
// caller's bind.
const (
	bandLow  = 10000
	bandHigh = 20000
)

// ephemeralRange is where Linux says which ports connect() takes.
var ephemeralRange = "/proc/sys/net/ipv4/ip_local_port_range"

var (
	mu sync.Mutex
	// given holds the ports handed out by this process: each is handed
	// out once, as the caller may not have bound it yet when the next
	// call probes.
	given = map[int]bool{}
)

// Loopback returns n distinct ports of 127.0.0.1, each free for UDP and
// TCP when returned and never returned before by this process. They come
// from a band below the kernel's ephemeral range, from a random place in
// it so that processes calling at once seldom probe the same ports; on a
// host whose ephemeral range leaves no room for the band, the kernel picks
// them. Another process may still bind one before the caller: bind them
// at once.
func Loopback(n int) ([]int, error) {
	mu.Lock()
	defer mu.Unlock()
	var (
		out  []int
		held []io.Closer
	)
	defer func() {
		for _, h := range held {
			h.Close()
		}
	}()
	// probe binds port p (0: the kernel picks) for UDP and TCP and holds
	// both until all n are found, so none is found twice.
	probe := func(p int) (int, error) {
		u, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return 0, err
		}
		held = append(held, u)
		p = u.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return 0, err
		}
		held = append(held, l)
		return p, nil
	}
	take := func(p int) {
		given[p] = true
		out = append(out, p)
	}
	lo, hi := band()
	if hi > lo {
		start := lo + rand.IntN(hi-lo)
		for i := 0; i < hi-lo && len(out) < n; i++ {
			p := lo + (start-lo+i)%(hi-lo)
			if given[p] {
				continue
			}
			if _, err := probe(p); err == nil {
				take(p)
			}
		}
		if len(out) == n {
			return out, nil
		}
	}
	lastErr := errors.New("every port probed was taken")
	for try := 0; len(out) < n; try++ {
		if try == 100*n {
			return nil, fmt.Errorf("no free loopback ports: %w", lastErr)
		}
		p, err := probe(0)
		if err != nil {
			lastErr = err
			continue
		}
		if !given[p] {
			take(p)
		}
	}
	return out, nil
}

// band is where Loopback looks first: [bandLow, bandHigh), cut short at
// the start of the kernel's ephemeral range.
func band() (lo, hi int) {
	lo, hi = bandLow, bandHigh
	b, err := os.ReadFile(ephemeralRange)
	if err != nil {
		return lo, hi
	}
	if f := strings.Fields(string(b)); len(f) == 2 {
		if start, err := strconv.Atoi(f[0]); err == nil && start < hi {
			hi = start
		}
	}
	return lo, hi
}
