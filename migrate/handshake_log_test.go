package migrate

import (
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestReceiverRefusedHandshakesLoggedOncePerSecond: connections whose TLS
// handshake fails (bytes that are not TLS; a revoked or foreign
// certificate would do the same), which anyone reaching the port can
// open, are logged at most once a second, the next line counting those
// left out, rather than a line each.
func TestReceiverRefusedHandshakesLoggedOncePerSecond(t *testing.T) {
	p := newPair(t, "DE")
	sent := 0
	junk := func() {
		c, err := net.Dial("tcp", p.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.Copy(io.Discard, c) // the receiver logs, or not, before it closes
		sent++
	}
	start := time.Now()
	for range 200 {
		junk()
	}
	unloggedRE := regexp.MustCompile(`refused_unlogged=(\d+)`)
	count := func() (lines, unlogged int) {
		for _, l := range strings.Split(p.recvLog.String(), "\n") {
			if !strings.Contains(l, "refused migration connection") {
				continue
			}
			lines++
			if m := unloggedRE.FindStringSubmatch(l); m != nil {
				n, _ := strconv.Atoi(m[1])
				unlogged += n
			}
		}
		return
	}
	// The lines left out are counted on the next one logged: junk goes on
	// until one has come that accounts for all before the last.
	waitFor(t, "the refused connections to be accounted for in the log", func() bool {
		if lines, _ := count(); lines > sent/2 {
			return true // logged one by one: no need to wait
		}
		before := sent
		junk()
		lines, unlogged := count()
		return lines+unlogged >= before
	})
	took := time.Since(start)
	lines, unlogged := count()
	t.Logf("%d connections refused in %v: %d lines, %d counted as left out", sent, took.Round(time.Millisecond), lines, unlogged)
	// One a second, and one more for the second begun at each end.
	if most := int(took/time.Second) + 2; lines > most {
		t.Errorf("in %v, %d connections that never authenticated wrote %d log lines; want at most one a second (%d)", took.Round(time.Millisecond), sent, lines, most)
	}
}
