package mesh

import (
	"io"
	"net"
	"net/http"
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
