package mesh

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestSlogWriterLevels: memberlist's log lines keep their level, except
// its repetition of our own refusals, which anyone holding the gossip key
// can make it write at will.
func TestSlogWriterLevels(t *testing.T) {
	var buf bytes.Buffer
	w := slogWriter{slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	for line, want := range map[string]string{
		"[WARN] memberlist: ignoring alive message for 'gw-x': refused":    "level=DEBUG",
		"[WARN] memberlist: Refuting a suspect message (from: gw-2)":       "level=WARN",
		"[ERR] memberlist: Failed to send ping: write: connection refused": "level=ERROR",
		"[DEBUG] memberlist: Stream connection from=127.0.0.1:4000":        "level=DEBUG",
	} {
		buf.Reset()
		w.Write([]byte(line + "\n"))
		if !strings.Contains(buf.String(), want) {
			t.Errorf("%q logged as %q, want %s", line, buf.String(), want)
		}
	}
}

// TestGossipLogThrottlesRefusedBeforeKey: memberlist's line for each
// datagram or stream refused before its gossip key is checked, which
// anyone reaching the port can have it write, comes out as a warning at
// most once a second of each kind, the next one saying how many were left
// out; its other errors pass as they are.
func TestGossipLogThrottlesRefusedBeforeKey(t *testing.T) {
	var buf bytes.Buffer
	w := &gossipLog{slogWriter: slogWriter{slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))}}
	const each = 100
	for range each {
		w.Write([]byte("[ERR] memberlist: Decrypt packet failed: No installed keys could decrypt the message from=192.0.2.1:7946\n"))
		w.Write([]byte("[ERR] memberlist: discarding packet with unacceptable label \"x\": from=192.0.2.1:7946\n"))
		w.Write([]byte("[ERR] memberlist: failed to receive: encryption is configured but remote state is not encrypted from=192.0.2.1:40000\n"))
		w.Write([]byte("[ERR] memberlist: Failed to send error: write: broken pipe from=192.0.2.1:40000\n"))
	}
	w.Write([]byte("[ERR] memberlist: Failed to send ping: write: connection refused\n"))
	packets, streams := 0, 0
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		switch {
		case strings.Contains(l, "Failed to send ping"):
			if !strings.Contains(l, "level=ERROR") {
				t.Errorf("another memberlist error changed: %s", l)
			}
			continue
		case strings.Contains(l, "packet"):
			packets++
		default:
			streams++
		}
		if !strings.Contains(l, "level=WARN") || !strings.Contains(l, "refused_unlogged=") {
			t.Errorf("want a warning with the count left out: %s", l)
		}
	}
	// A second's edge may fall within the loop: one more each then.
	if packets < 1 || packets > 2 || streams < 1 || streams > 2 {
		t.Errorf("%d refused datagrams and %d refused streams logged %d and %d lines; want one of each a second\n%s", 2*each, 2*each, packets, streams, buf.String())
	}
}
