// Package progress draws a migration's live progress bar (vbauerster/mpb)
// for the CLI and the demo alike.
package progress

import (
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"

	"github.com/skybridge-mesh/skybridge/internal/units"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// Bar is a progress bar measured in allocated bytes: the unit of work is
// what can hold data, not the virtual size.
type Bar struct {
	p   *mpb.Progress
	bar *mpb.Bar
	// st is read by mpb's drawing goroutine as Update replaces it.
	st atomic.Pointer[migrate.Stats]
}

// New starts a bar on w labelled with name.
func New(w io.Writer, name string) *Bar {
	b := &Bar{p: mpb.New(mpb.WithOutput(w), mpb.WithWidth(36), mpb.WithRefreshRate(150*time.Millisecond))}
	b.bar = b.p.AddBar(0,
		mpb.PrependDecorators(decor.Name(name+" "), decor.CountersKibiByte("% .1f / % .1f")),
		mpb.AppendDecorators(
			decor.EwmaSpeed(decor.SizeB1024(0), " % .1f", 30),
			decor.Name(" ETA "), decor.EwmaETA(decor.ET_STYLE_GO, 30),
			decor.Any(func(decor.Statistics) string {
				st := b.st.Load()
				if st == nil {
					return ""
				}
				return fmt.Sprintf("  sent %s, holes skipped %s", units.Bytes(st.BytesSent), units.Bytes(st.VirtualBytes-st.AllocatedBytes))
			}),
		),
	)
	return b
}

// Update moves the bar to a progress snapshot.
func (b *Bar) Update(p *migrate.Progress) {
	var old migrate.Stats
	if o := b.st.Load(); o != nil {
		old = *o
	}
	st := p.Stats
	b.st.Store(&st)
	if p.Stats.Chunks == 0 {
		return
	}
	b.bar.SetTotal(p.Stats.AllocatedBytes, false)
	cur := p.Stats.AllocatedBytes * int64(p.Stats.ChunksDone) / int64(p.Stats.Chunks)
	b.bar.EwmaSetCurrent(cur, max(p.Stats.Duration-old.Duration, time.Millisecond))
}

// Finish completes the bar (ok) or leaves it where it stopped.
func (b *Bar) Finish(ok bool) {
	if ok {
		b.bar.SetTotal(-1, true)
	} else {
		b.bar.Abort(false)
	}
	b.p.Wait()
}
