package atomicfile

import (
	"bytes"
	"fmt"
	"os"
)

// Append-only files of lines (the audit log, the CA's archive) are read
// from their end: what an append needs is the last line, and reading a
// log of years from its start on every append grows with its age.

// WholeEnd returns the offset just past f's last newline: where its whole
// lines end. Bytes after it are an append cut short (a crash, a full disk).
func WholeEnd(f *os.File) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	end := fi.Size()
	buf := make([]byte, 4096)
	for end > 0 {
		n := min(int64(len(buf)), end)
		if _, err := f.ReadAt(buf[:n], end-n); err != nil {
			return 0, err
		}
		if i := bytes.LastIndexByte(buf[:n], '\n'); i >= 0 {
			return end - n + int64(i) + 1, nil
		}
		end -= n
	}
	return 0, nil
}

// CutPartialLine truncates f after its last newline, so the next append
// starts a line of its own, and returns the new size.
func CutPartialLine(f *os.File) (int64, error) {
	end, err := WholeEnd(f)
	if err != nil {
		return 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if end < fi.Size() {
		if err := f.Truncate(end); err != nil {
			return 0, err
		}
	}
	return end, nil
}

// MaxLine bounds what LastLine reads back: no record of these files comes
// near it, and a damaged file (a long run of bytes without a newline, or
// of blank lines) is said so rather than read whole into memory.
const MaxLine = 16 << 20

// LastLine returns the last line of f before end that is not blank,
// trimmed, or nil if there is none.
func LastLine(f *os.File, end int64) ([]byte, error) {
	for n := int64(64 << 10); ; n *= 2 {
		if n > 2*MaxLine {
			return nil, fmt.Errorf("%s: no whole line in the last %d MiB before offset %d (a line that long, or that much blank, is damage): restore the file from a backup, or move it aside", f.Name(), 2*MaxLine>>20, end)
		}
		start := max(0, end-n)
		buf := make([]byte, end-start)
		if _, err := f.ReadAt(buf, start); err != nil {
			return nil, err
		}
		lines := bytes.Split(buf, []byte{'\n'})
		first := 1 // the first piece may be the tail of a longer line
		if start == 0 {
			first = 0
		}
		for i := len(lines) - 1; i >= first; i-- {
			if t := bytes.TrimSpace(lines[i]); len(t) > 0 {
				return t, nil
			}
		}
		if start == 0 {
			return nil, nil
		}
	}
}
