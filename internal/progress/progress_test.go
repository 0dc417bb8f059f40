package progress

import (
	"io"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// terminal returns the terminal end of a new pseudo-terminal and what is
// drawn on it: mpb redraws on its own only on a terminal, as the CLI's
// stderr is.
func terminal(t *testing.T) (*os.File, *syncbuf.Buffer) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Skipf("unlock pseudo-terminal: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Skipf("pseudo-terminal number: %v", err)
	}
	s, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("open pseudo-terminal: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	// A terminal of no width has nothing drawn on it.
	if err := unix.IoctlSetWinsize(int(s.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 24, Col: 200}); err != nil {
		t.Skipf("size pseudo-terminal: %v", err)
	}
	var drawn syncbuf.Buffer
	go io.Copy(&drawn, m)
	return s, &drawn
}

// TestUpdateWhileDrawn: snapshots arrive while the bar is drawn on a
// terminal by mpb's goroutine, which reads the last one (a data race
// under -race, and a line mixing two snapshots, before).
func TestUpdateWhileDrawn(t *testing.T) {
	tty, drawn := terminal(t)
	b := New(tty, "vm")
	deadline := time.Now().Add(time.Second)
	for i := 1; time.Now().Before(deadline); i++ {
		b.Update(&migrate.Progress{Stats: migrate.Stats{AllocatedBytes: 1 << 30, VirtualBytes: 2 << 30, Chunks: 1024, ChunksDone: i % 1024,
			BytesSent: int64(i) << 20, Duration: time.Duration(i) * time.Millisecond}})
		time.Sleep(100 * time.Microsecond) // a pace of snapshots, not a wait for a condition
	}
	b.Finish(true)
	until := time.Now().Add(5 * time.Second)
	for !strings.Contains(drawn.String(), "holes skipped 1.0 GiB") && time.Now().Before(until) {
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(drawn.String(), "holes skipped 1.0 GiB") {
		t.Errorf("drawn %q; want the snapshot's holes (1.0 GiB) in it", drawn.String())
	}
}
