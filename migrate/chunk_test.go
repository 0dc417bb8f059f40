package migrate

import (
	"slices"
	"testing"
)

func TestCandidates(t *testing.T) {
	const c = 1 << 20
	tests := []struct {
		name    string
		extents []Extent
		size    int64
		want    []int64
	}{
		{"empty image", nil, 0, nil},
		{"all holes", nil, 10 * c, nil},
		{"one block in chunk 3", []Extent{{3*c + 4096, 4096}}, 10 * c, []int64{3}},
		{"extent across chunks", []Extent{{c - 1, 2}}, 10 * c, []int64{0, 1}},
		{"two extents in one chunk", []Extent{{0, 10}, {100, 10}}, 10 * c, []int64{0}},
		{"adjacent extents", []Extent{{0, c}, {c, c}}, 10 * c, []int64{0, 1}},
		{"short last chunk", []Extent{{0, 2*c + 5}}, 2*c + 5, []int64{0, 1, 2}},
		{"extent past the end is clipped", []Extent{{c, 5 * c}}, 2 * c, []int64{1}},
		{"extent exactly on a boundary", []Extent{{2 * c, c}}, 10 * c, []int64{2}},
	}
	for _, tt := range tests {
		if got := candidates(tt.extents, tt.size, c); !slices.Equal(got, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestIsZero(t *testing.T) {
	for _, n := range []int{0, 1, 7, 8, 9, 4096, 4097} {
		b := make([]byte, n)
		if !isZero(b) {
			t.Errorf("zero buffer of %d not zero", n)
		}
		if n > 0 {
			b[n-1] = 1
			if isZero(b) {
				t.Errorf("last byte set in %d bytes: zero", n)
			}
			b[n-1], b[0] = 0, 1
			if isZero(b) {
				t.Errorf("first byte set in %d bytes: zero", n)
			}
		}
	}
}

func TestManifestRoot(t *testing.T) {
	const c = 4
	m := &Manifest{Size: 10, ChunkSize: c, Chunks: map[int64]Hash{1: hashChunk([]byte("abcd"))}}
	r1 := m.Root()
	// Explicitly hashing a zero chunk gives the same root as leaving it out.
	m2 := &Manifest{Size: 10, ChunkSize: c, Chunks: map[int64]Hash{0: zeroHash(4), 1: hashChunk([]byte("abcd"))}}
	if m2.Root() != r1 {
		t.Fatal("explicit zero chunk changes the root")
	}
	for name, other := range map[string]*Manifest{
		"other data":     {Size: 10, ChunkSize: c, Chunks: map[int64]Hash{1: hashChunk([]byte("abce"))}},
		"other position": {Size: 10, ChunkSize: c, Chunks: map[int64]Hash{2: hashChunk([]byte("abcd"))}},
		"other size":     {Size: 12, ChunkSize: c, Chunks: map[int64]Hash{1: hashChunk([]byte("abcd"))}},
		"empty":          {Size: 0, ChunkSize: c},
	} {
		if other.Root() == r1 {
			t.Errorf("%s: same root", name)
		}
	}
	if got := m.DataBytes(); got != 4 {
		t.Errorf("DataBytes = %d", got)
	}
}
