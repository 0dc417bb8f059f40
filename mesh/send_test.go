package mesh

import (
	"log/slog"
	"sync/atomic"
	"testing"
	"time"
)

// TestGoSendNeverBlocks: the worker hands stream sends to goSend; with
// every stream busy (a member that does not read, flooded with requests
// naming it) goSend still returns at once, queues a bounded number and
// drops the rest, and the queued ones go once streams are free.
func TestGoSendNeverBlocks(t *testing.T) {
	g := &Gateway{sends: make(chan struct{}, maxSends), log: slog.New(slog.DiscardHandler)}
	for range maxSends {
		g.sends <- struct{}{} // every stream busy
	}
	var ran atomic.Int64
	handed := make(chan struct{})
	go func() {
		defer close(handed)
		for range maxQueuedSends + 100 {
			g.goSend(func() error { ran.Add(1); return nil }, "peer")
		}
	}()
	select {
	case <-handed:
	case <-time.After(20 * time.Second):
		t.Fatal("goSend blocked its caller while every stream was busy")
	}
	if n := g.sendsQueued.Load(); n != maxQueuedSends {
		t.Errorf("%d sends queued, want %d (the rest dropped)", n, maxQueuedSends)
	}
	for range maxSends {
		<-g.sends // streams free again
	}
	waitUntil(t, 20*time.Second, "the queued sends to go", func() bool { return ran.Load() == maxQueuedSends })
}
