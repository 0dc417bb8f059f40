package migrate

import (
	"fmt"
	mathrand "math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zeebo/blake3"
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

// TestManifestWalkHashesZerosOnce: a manifest walk hashes a chunk of
// zeros a few times, not once per chunk listed (zeroHash keeps nothing:
// kept per length, its hashes grew with every image size offered, and
// bounded, a chunk size past the bound cost 7 s a commit of 2,000 chunks
// of 2 MiB, not 6 ms). Chunks of zeros listed go; the root is as defined.
func TestManifestWalkHashesZerosOnce(t *testing.T) {
	const chunk = 64 << 10
	m := &Manifest{Size: 4000*chunk + 100, ChunkSize: chunk, Chunks: map[int64]Hash{}}
	for i := int64(0); i < 4000; i += 2 { // every other chunk holds data
		m.Chunks[i] = Hash{byte(i), byte(i >> 8), 1}
	}
	m.Chunks[3999] = zeroHash(chunk)                         // listed, though zeros
	m.Chunks[4000] = zeroHash(chunkLen(4000, m.Size, chunk)) // the last, short
	var c *Manifest
	allocs := testing.AllocsPerRun(2, func() {
		c = m.withoutZeroChunks()
		c.Root()
	})
	if _, ok := c.Chunks[3999]; ok || len(c.Chunks) != 2000 {
		t.Fatalf("chunks of zeros listed stay, or others went: %d chunks", len(c.Chunks))
	}
	if c.Root() != rootByLevels(m) {
		t.Fatal("the root differs from the root by levels")
	}
	if allocs > 100 {
		t.Errorf("%.0f allocations a walk of 2,000 chunks; want a few: a chunk of zeros hashed per chunk", allocs)
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

// rootByLevels is the root computed as the tree is defined, one level
// at a time over every chunk: what Root must equal, since roots are stored
// in catalogs and compared across releases.
func rootByLevels(m *Manifest) Hash {
	n := chunkCount(m.Size, m.ChunkSize)
	level := make([]Hash, 0, n)
	for i := int64(0); i < n; i++ {
		h, ok := m.Chunks[i]
		if !ok {
			h = zeroHash(chunkLen(i, m.Size, m.ChunkSize))
		}
		level = append(level, leaf(h))
	}
	if len(level) == 0 {
		return blake3.Sum256([]byte(fmt.Sprintf("skybridge empty image %d", m.ChunkSize)))
	}
	for len(level) > 1 {
		next := level[:0:0]
		for i := 0; i < len(level); i += 2 {
			if i+1 == len(level) {
				next = append(next, level[i])
				continue
			}
			next = append(next, node(level[i], level[i+1]))
		}
		level = next
	}
	return level[0]
}

// TestManifestRootByLevels: the root, which skips subtrees of zeros, is
// the tree's root as defined, for every shape of tree up to 70 chunks
// (short last chunk or not, holding data nowhere, everywhere, at random),
// and for a root pinned from the level-by-level computation.
func TestManifestRootByLevels(t *testing.T) {
	const c = 8
	rnd := mathrand.New(mathrand.NewPCG(1, 2))
	for n := int64(0); n <= 70; n++ {
		for _, short := range []int64{0, 3} {
			size := n*c - short
			if size < 0 {
				continue
			}
			for fill := range 4 {
				m := &Manifest{Size: size, ChunkSize: c, Chunks: map[int64]Hash{}}
				for i := range n {
					if fill == 1 || fill >= 2 && rnd.IntN(fill*3) == 0 {
						m.Chunks[i] = hashChunk([]byte{byte(i), byte(fill)})
					}
				}
				m.Chunks[n+5] = Hash{9} // past the end: not part of the image
				if got, want := m.Root(), rootByLevels(m); got != want {
					t.Fatalf("%d chunks of %d bytes, last %d short, %d holding data: root %s, want %s", n, c, short, len(m.Chunks)-1, got, want)
				}
			}
		}
	}
	m := &Manifest{Size: 5*mib + 7, ChunkSize: mib, Chunks: map[int64]Hash{1: hashChunk([]byte("one")), 4: hashChunk([]byte("four"))}}
	if got := m.Root().String(); got != rootByLevels(m).String() {
		t.Fatalf("root %s, want %s", got, rootByLevels(m))
	}
}

// BenchmarkManifestRoot: the root of a sparse 16 TiB image (1 MiB chunks,
// 1,000 of them holding data) costs what its data chunks do, not its size.
func BenchmarkManifestRoot(b *testing.B) {
	m := &Manifest{Size: 16 << 40, ChunkSize: mib, Chunks: map[int64]Hash{}}
	for i := range int64(1000) {
		m.Chunks[i*16381] = hashChunk([]byte{byte(i)})
	}
	b.ReportAllocs()
	for b.Loop() {
		m.Root()
	}
}

// TestHashChunkIsBLAKE3 pins chunk hashes to BLAKE3 itself: they are
// stored in journals and compared with what other gateways (perhaps of
// another release, perhaps another BLAKE3 implementation) computed. Input
// bytes i % 251, as in BLAKE3's published test vectors; the 1 MiB + 1
// value was computed with lukechampine.com/blake3, the implementation
// used before.
func TestHashChunkIsBLAKE3(t *testing.T) {
	for _, tt := range []struct {
		n    int
		want string
	}{
		{0, "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"},
		{1025, "d00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444"},
		{1<<20 + 1, "2f053cd7472cf0cd2f9adaf45c1180255b91b9a865404a63671a0ee5f792ed33"},
	} {
		b := make([]byte, tt.n)
		for i := range b {
			b[i] = byte(i % 251)
		}
		if got := hashChunk(b).String(); got != tt.want {
			t.Errorf("%d bytes: %s, want %s", tt.n, got, tt.want)
		}
	}
}

// TestStamp: a stamp ages from its last touch, or from when it was made.
func TestStamp(t *testing.T) {
	s := &stamp{base: time.Now().Add(-time.Hour)} // Add keeps the monotonic reading
	if a := s.age(); a < time.Hour || a > time.Hour+time.Minute {
		t.Fatalf("untouched stamp made an hour ago: age %s", a)
	}
	s.touch()
	if a := s.age(); a < 0 || a > time.Minute {
		t.Fatalf("just touched: age %s", a)
	}
}

// TestChunkSizeFor: chunks grow in powers of two until the data fits
// the manifest bound, counting the chunks data touches, not its bytes.
func TestChunkSizeFor(t *testing.T) {
	const gib = 1 << 30
	bound := int64(MaxManifestChunks)
	for _, tc := range []struct {
		name    string
		extents []Extent
		size    int64
		want    int64 // 0: refused
	}{
		{"empty", nil, 8 * gib, mib},
		{"2 GiB of data", []Extent{{0, 2 * gib}}, 8 * gib, mib},
		{"data in exactly the bound", []Extent{{0, bound * mib}}, 1 << 40, mib},
		{"one byte past it", []Extent{{0, bound*mib + 1}}, 1 << 40, 2 * mib},
		{"1 TiB of data in a 4 TiB disk", []Extent{{0, 1 << 40}}, 4 << 40, 4 * mib},
		{"data only up to the image's end counts", []Extent{{0, 1 << 40}}, bound * mib, mib},
		// One byte in every MiB: little data, but every chunk of 1 MiB
		// and of 2 MiB holds some.
		{"scattered", scattered(2*bound+2, mib), (2*bound + 2) * mib, 4 * mib},
		{"8 TiB of data", []Extent{{0, 8 << 40}}, 1 << 50, 32 * mib},
		{"more than 8 TiB of data", []Extent{{0, 8<<40 + 1}}, 1 << 50, 0},
	} {
		got, err := chunkSizeFor(tc.extents, tc.size)
		switch {
		case tc.want == 0 && (err == nil || !strings.Contains(err.Error(), "cannot migrate an image this large")):
			t.Errorf("%s: chunk size %d, %v; want it refused as too large", tc.name, got, err)
		case tc.want != 0 && (err != nil || got != tc.want):
			t.Errorf("%s: chunk size %d, %v; want %d", tc.name, got, err, tc.want)
		}
	}
	if err := checkChunkCount([]Extent{{0, bound*mib + 1}}, 1<<40, mib); err == nil || !strings.Contains(err.Error(), "use larger chunks") {
		t.Errorf("1 MiB chunks for data past the bound: %v", err)
	}
	if err := checkChunkCount([]Extent{{0, bound*mib + 1}}, 1<<40, 2*mib); err != nil {
		t.Errorf("2 MiB chunks for data just past the bound of 1 MiB ones: %v", err)
	}
}

// scattered is n extents of one byte, every stride bytes.
func scattered(n, stride int64) []Extent {
	out := make([]Extent, n)
	for i := range out {
		out[i] = Extent{int64(i) * stride, 1}
	}
	return out
}

// TestCountCandidates: the count is the length of the list, for extents
// that share chunks, straddle them, overlap and run past the end.
func TestCountCandidates(t *testing.T) {
	r := mathrand.New(mathrand.NewPCG(1, 2))
	for range 2000 {
		size := r.Int64N(64 * mib)
		var ext []Extent
		off := int64(0)
		for range r.IntN(20) {
			off += r.Int64N(4*mib) - mib/2 // sometimes back into the last one
			off = max(off, 0)
			n := r.Int64N(3 * mib)
			ext = append(ext, Extent{off, n})
			off += n
		}
		chunk := int64(4<<10) << r.IntN(10)
		if got, want := countCandidates(ext, size, chunk), int64(len(candidates(ext, size, chunk))); got != want {
			t.Fatalf("extents %v, size %d, chunk %d: counted %d, listed %d", ext, size, chunk, got, want)
		}
	}
}
