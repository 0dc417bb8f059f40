package migrate

import (
	"context"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// TestNextJobFlushesBeforeWaiting: a data stream that finds no job waiting
// sends what it has buffered before it waits. A frame left in the buffer
// while another stream took the last job was never sent: its chunk was
// never acknowledged, and the sender took the receiver for gone 30 s
// later (a failure seen in CI, one migration in a few hundred).
func TestNextJobFlushesBeforeWaiting(t *testing.T) {
	var out syncbuf.Buffer
	fw := newFrameWriter(&out)
	queue := make(chan *job, 2)

	// A job waiting: taken at once, the frame kept to go with the next.
	fw.frame(frameSame, indexFrame(1, Hash{1}))
	queue <- &job{index: 2}
	if j, err := nextJob(context.Background(), queue, fw); err != nil || j == nil || j.index != 2 {
		t.Fatalf("a job waiting: %+v %v", j, err)
	}
	if len(out.String()) != 0 {
		t.Fatal("flushed with a job waiting: frames would go one write each")
	}

	// None waiting: the frame goes out before the stream waits.
	got := make(chan *job, 1)
	go func() {
		j, _ := nextJob(context.Background(), queue, fw)
		got <- j
	}()
	deadline := time.Now().Add(10 * time.Second)
	for len(out.String()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("a stream waiting for a job holds a frame it has not sent")
		}
		time.Sleep(time.Millisecond)
	}
	queue <- &job{index: 3}
	if j := <-got; j == nil || j.index != 3 {
		t.Fatalf("then the next job: %+v", j)
	}

	// Closed: nil, and cancelled: the context's error.
	close(queue)
	if j, err := nextJob(context.Background(), queue, fw); j != nil || err != nil {
		t.Errorf("closed queue: %+v %v", j, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := nextJob(ctx, make(chan *job), fw); err == nil {
		t.Error("cancelled: no error")
	}
}
