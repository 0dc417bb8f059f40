package mesh

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// TestGossipJunkLoggedOncePerSecond: datagrams and streams without the
// gossip key, which anyone reaching the port can send (a datagram from any
// source address it cares to forge), have the gateway log a warning at
// most once a second of each kind, whose counts account for the rest,
// rather than an error line each.
func TestGossipJunkLoggedOncePerSecond(t *testing.T) {
	ca := meshCA(t, t.TempDir())
	logs := &syncbuf.Buffer{}
	lg := startLiveGatewayWith(t, ca, t.TempDir(), 0, "s-a", nil, logs, nil)
	addr := lg.g.s.GossipBind.String()

	u, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	junk := bytes.Repeat([]byte{0x42}, 64)
	datagrams, streams := 0, 0
	datagram := func() {
		if _, err := u.Write(junk); err == nil {
			datagrams++
		}
	}
	stream := func() {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("x"))
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.Copy(io.Discard, c) // memberlist logs, answers with an error, then closes
		streams++
	}
	start := time.Now()
	for range 300 {
		datagram()
	}
	for range 50 {
		stream()
	}

	type tally struct{ errors, warnings, unlogged int }
	count := func() (udp, tcp tally) {
		for _, l := range strings.Split(logs.String(), "\n") {
			var rec struct {
				Level    string `json:"level"`
				Msg      string `json:"msg"`
				Unlogged int    `json:"refused_unlogged"`
			}
			if json.Unmarshal([]byte(l), &rec) != nil {
				continue
			}
			var c *tally
			switch {
			case strings.Contains(rec.Msg, "Decrypt packet failed"):
				c = &udp
			case strings.Contains(rec.Msg, "failed to receive"):
				c = &tcp
			default:
				continue
			}
			switch rec.Level {
			case "ERROR":
				c.errors++
			case "WARN":
				c.warnings++
				c.unlogged += rec.Unlogged
			}
		}
		return
	}
	// The lines left out are counted on the next one logged: junk goes on
	// until one has come that accounts for (nearly: UDP) all sent before.
	waitUntil(t, 20*time.Second, "the junk to be accounted for in the log", func() bool {
		udp, tcp := count()
		if udp.errors+tcp.errors > 0 {
			return true
		}
		before := datagrams
		datagram()
		stream()
		return udp.warnings+udp.unlogged >= before*9/10 && tcp.warnings+tcp.unlogged >= streams-1
	})
	took := time.Since(start)
	udp, tcp := count()
	t.Logf("%d junk datagrams and %d junk streams in %v: udp %+v, tcp %+v", datagrams, streams, took.Round(time.Millisecond), udp, tcp)
	if udp.errors > 0 || tcp.errors > 0 {
		t.Fatalf("junk without the gossip key logged %d errors for %d datagrams and %d for %d streams; want warnings at most once a second", udp.errors, datagrams, tcp.errors, streams)
	}
	// One a second, and one more for the second begun at each end.
	most := int(took/time.Second) + 2
	if udp.warnings > most || tcp.warnings > most {
		t.Errorf("in %v, %d datagrams logged %d warnings and %d streams %d; want at most one a second of each", took, datagrams, udp.warnings, streams, tcp.warnings)
	}
}
