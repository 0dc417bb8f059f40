package migrate

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
)

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

func isEOF(err error) bool { return errors.Is(err, io.EOF) }

// binaryLenIndexFrame is the length of the index-and-hash prefix of a nack
// frame (the rest is the reason).
func binaryLenIndexFrame(p []byte) int {
	_, w := binary.Uvarint(p)
	if w <= 0 {
		return len(p)
	}
	return min(len(p), w+32)
}

func dirOf(p string) string { return filepath.Dir(p) }
