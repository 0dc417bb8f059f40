package migrate

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync/atomic"
	"time"
)

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

func isEOF(err error) bool { return errors.Is(err, io.EOF) }

// readChunk reads exactly len(b) bytes of an image at off. Every chunk
// lies within its image's size, so a short read means the image is
// shorter than it says — truncated or damaged —, never zeros to fill in
// (and buffers are reused: what one held before would pass for data).
func readChunk(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || isEOF(err) {
		err = fmt.Errorf("only %d of %d bytes at offset %d: the image is shorter than its size says (truncated?)", n, len(b), off)
	}
	return err
}

func dirOf(p string) string { return filepath.Dir(p) }

// stamp is when something last happened, set and read by several
// goroutines, on the monotonic clock: unix nanos on the wall clock would
// make an NTP step or a resumed VM time a live peer out, or keep a dead
// one, for as long as the step.
type stamp struct {
	base  time.Time    // with its monotonic reading
	since atomic.Int64 // of the last event, from base
}

func newStamp() *stamp { return &stamp{base: time.Now()} }

func (s *stamp) touch() { s.since.Store(int64(time.Since(s.base))) }

// age is how long ago the last event was (since the stamp was made, if
// none was).
func (s *stamp) age() time.Duration { return time.Since(s.base) - time.Duration(s.since.Load()) }
