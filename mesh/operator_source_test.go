package mesh

import (
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// TestOperatorOneSourceHoldsFewSlots: one address opening three times as
// many connections as the endpoint serves, and sending nothing on them,
// keeps maxOperatorPerSource of them; the rest are closed at once, said in
// the log, and a scrape with the token from another address is answered
// while that address still holds its share. Without the bound its first
// connections took every slot, and the scrape waited in the accept queue
// until header timeouts had closed them and those queued before it.
func TestOperatorOneSourceHoldsFewSlots(t *testing.T) {
	ca := meshCA(t, t.TempDir())
	logs := &syncbuf.Buffer{}
	lg := startLiveGatewayWith(t, ca, t.TempDir(), 0, "s", nil, logs, nil)
	addr := lg.operatorAddr(t).String()

	// The whole of 127/8 is loopback: the holder is 127.0.0.2, the
	// scraper 127.0.0.1.
	holder := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	const opened = 3 * maxOperatorConn
	conns := make([]net.Conn, opened)
	closed := make([]atomic.Bool, opened)
	var nclosed atomic.Int64
	for i := range conns {
		c, err := holder.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns[i] = c
		go func() {
			c.Read(make([]byte, 1)) // returns once the endpoint closes it
			closed[i].Store(true)
			nclosed.Add(1)
		}()
	}
	waitUntil(t, 20*time.Second, "the connections beyond one address's share to be closed", func() bool {
		return nclosed.Load() >= opened-maxOperatorPerSource
	})

	req, _ := http.NewRequest(http.MethodGet, lg.url(t, "/metrics"), nil)
	req.Header.Set("Authorization", "Bearer "+lg.token(t))
	resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("a scrape with the token while one address held connections open: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("a scrape with the token: %s", resp.Status)
	}
	// The connections kept are the first ones, which only the header
	// timeout closes; had they held every slot, they would have been
	// closed before the scrape was taken.
	held := 0
	for i := range maxOperatorPerSource {
		if !closed[i].Load() {
			held++
		}
	}
	if held != maxOperatorPerSource || nclosed.Load() != opened-maxOperatorPerSource {
		t.Errorf("the scrape was answered with %d of the first %d connections from one address open and %d of its %d closed; want %d open and the other %d closed at once",
			held, maxOperatorPerSource, nclosed.Load(), opened, maxOperatorPerSource, opened-maxOperatorPerSource)
	}
	if n := strings.Count(logs.String(), "operator connection turned away"); n < 1 {
		t.Errorf("connections turned away logged %d warnings; want them said", n)
	}
}

// addrConn is a connection from a given address.
type addrConn struct {
	net.Conn
	from net.Addr
}

func (c addrConn) RemoteAddr() net.Addr { return c.from }

// fromListener hands out one connection from each address in turn.
type fromListener struct {
	net.Listener
	from []netip.Addr
}

func (l *fromListener) Accept() (net.Conn, error) {
	if len(l.from) == 0 {
		return nil, net.ErrClosed
	}
	a := l.from[0]
	l.from = l.from[1:]
	c, _ := net.Pipe()
	return addrConn{Conn: c, from: net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, 40000))}, nil
}

// TestOverlaySourcesCountAlone: on an IPv6 overlay the gateways' addresses
// share a /64, yet each is one gateway's: each has its own share of the
// operator endpoint's connections, where another IPv6 address counts by
// its /64 (a host may pick any address in it).
func TestOverlaySourcesCountAlone(t *testing.T) {
	overlay := netip.MustParsePrefix("fd00:5b::/64")
	gw1, gw2 := netip.MustParseAddr("fd00:5b::1:1"), netip.MustParseAddr("fd00:5b::2:1")
	host1, host2 := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
	var from []netip.Addr
	for _, a := range []netip.Addr{gw1, gw2, host1, host2} {
		for range 2 {
			from = append(from, a)
		}
	}
	var refused []netip.Addr
	l := limitPerSource(&fromListener{from: from}, 2, func(a netip.Addr) { refused = append(refused, a) })
	l.exact = overlay
	accepted := map[netip.Addr]int{}
	for {
		c, err := l.Accept()
		if err != nil {
			break
		}
		ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
		accepted[ap.Addr()]++
	}
	if accepted[gw1] != 2 || accepted[gw2] != 2 {
		t.Errorf("overlay addresses of one /64: accepted %d and %d; want each its share of 2", accepted[gw1], accepted[gw2])
	}
	if accepted[host1]+accepted[host2] != 2 || len(refused) != 2 {
		t.Errorf("host addresses of one /64: accepted %d, refused %d; want 2 between them, 2 refused", accepted[host1]+accepted[host2], len(refused))
	}
}
