package mesh

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// turnAway listens on loopback and closes every connection at once, as
// the enrollment endpoint does to one from an address that has as many
// open as it serves.
func turnAway(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// warnings records the attributes of the warnings logged.
type warnings struct {
	mu   sync.Mutex
	seen []map[string]string
	got  chan struct{}
}

func (w *warnings) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w *warnings) Handle(_ context.Context, r slog.Record) error {
	m := map[string]string{"msg": r.Message}
	r.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.String(); return true })
	w.mu.Lock()
	w.seen = append(w.seen, m)
	w.mu.Unlock()
	select {
	case w.got <- struct{}{}:
	default:
	}
	return nil
}
func (w *warnings) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnings) WithGroup(string) slog.Handler      { return w }

// TestEnrollRetriedWhileTheTokenLasts: a newcomer turned away by the
// enrolling gateway (its address has as many connections open as one may:
// a burst's servers behind one NAT address, 16 served at a time) tries
// again for as long as its token is valid, not for a minute, past which
// 437 of 2,000 servers starting at once gave up; and gives up once the
// token has expired, saying so.
func TestEnrollRetriedWhileTheTokenLasts(t *testing.T) {
	ca := meshCA(t, t.TempDir())
	ep := turnAway(t)
	tok, err := certs.NewJoinToken("burst-ams", ca.Certificate(), []netip.AddrPort{ep}, time.Now().Add(30*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(`{}`)
	w := &warnings{got: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := postEnroll(ctx, tok, body, slog.New(w)); done <- err }()
	select {
	case <-w.got:
	case err := <-done:
		t.Fatalf("turned away, the newcomer gave up at once: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("turned away, the newcomer said nothing")
	}
	cancel()
	<-done
	w.mu.Lock()
	first := w.seen[0]
	w.mu.Unlock()
	until, err := time.Parse(time.RFC3339, first["until"])
	if err != nil || until.Before(tok.Expires.Truncate(time.Second)) {
		t.Fatalf("turned away, the newcomer tries again until %q (%v); want until its token expires, %s: %v", first["until"], err, tok.Expires.UTC().Format(time.RFC3339), first)
	}

	// A token about to expire (by the enroller's clock, which may run
	// ahead of ours by as much as the mesh allows) is tried until then.
	tok.Expires = time.Now().Add(-certs.MaxClockSkew + 2*time.Second)
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	_, err = postEnroll(ctx, tok, body, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "expired at") || !strings.Contains(err.Error(), ep.String()) {
		t.Fatalf("turned away until its token expired: %v (after %s); want it to say the token expired, and where it tried", err, time.Since(start).Round(time.Millisecond))
	}
}
