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
