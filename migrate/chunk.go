package migrate

import (
	"encoding/hex"
	"fmt"
	"maps"
	"math/bits"
	"slices"

	"github.com/skybridge-mesh/skybridge/internal/units"
	"github.com/zeebo/blake3"
)

// DefaultChunkSize is the unit of transfer, verification, resumption and
// incremental re-sync: small enough that a 1 % change of an image sends
// about 1 % of it, large enough that per-chunk overhead (hash, frame,
// journal entry) stays negligible.
const DefaultChunkSize = 1 << 20

// MaxManifestChunks bounds the chunks that may hold data in one
// migration. The receiver's answer (the chunks it holds, and those of the
// version it stores) and the sender's commit (the manifest) are each one
// frame of at most 64 MiB, read whole, and a chunk takes under 80 bytes
// of their JSON: at 2^18 chunks a list stays under 20 MiB, and the
// answer's two under 40. Past 256 GiB of data a sender takes larger
// chunks instead (chunkSizeFor); before the bound, an image of about
// 860 GiB moved all its data and then failed at the commit. (Receivers
// take offers of up to twice as many, as earlier senders made them.)
const MaxManifestChunks = 1 << 18

// maxManifestChunks is MaxManifestChunks, lowered by tests that move an
// image too large for it without moving 256 GiB.
var maxManifestChunks int64 = MaxManifestChunks

// chunkSizeFor is the chunk size for an image of size bytes whose data
// lies in extents: DefaultChunkSize, doubled until the chunks that can
// hold data fit in maxManifestChunks. Growing in powers of two, an image
// keeps its chunk size as its data grows or shrinks a little, and a
// re-sync can reuse the version stored before (only a stored version of
// the same chunk size is reused).
func chunkSizeFor(extents []Extent, size int64) (int64, error) {
	for chunk := int64(DefaultChunkSize); chunk <= maxChunkSize; chunk *= 2 {
		if countCandidates(extents, size, chunk) <= maxManifestChunks {
			return chunk, nil
		}
	}
	var data int64
	for _, e := range extents {
		data += e.Len
	}
	return 0, fmt.Errorf("the image holds %s of data in %d chunks of %s, and one migration carries at most %d chunks (%s of data): skybridge cannot migrate an image this large as one",
		units.Bytes(data), countCandidates(extents, size, maxChunkSize), units.Bytes(maxChunkSize), maxManifestChunks, units.Bytes(maxManifestChunks*maxChunkSize))
}

// checkChunkCount refuses a chunk size the image has too many chunks of.
func checkChunkCount(extents []Extent, size, chunk int64) error {
	if n := countCandidates(extents, size, chunk); n > maxManifestChunks {
		return fmt.Errorf("chunk size %s: the image has %d chunks of it that can hold data, and one migration carries at most %d: use larger chunks, or leave the chunk size to skybridge", units.Bytes(chunk), n, maxManifestChunks)
	}
	return nil
}

// countCandidates is len(candidates(extents, size, chunk)), without
// listing them.
func countCandidates(extents []Extent, size, chunk int64) int64 {
	var n int64
	next := int64(0) // the first chunk not yet counted
	for _, e := range extents {
		end := min(e.Off+e.Len, size)
		if end <= e.Off {
			continue
		}
		first, last := max(e.Off/chunk, next), (end-1)/chunk
		if last >= first {
			n += last - first + 1
			next = last + 1
		}
	}
	return n
}

// sparseBytes bounds what the chunks overlapping extents take written
// sparse at the receiver (writeSparse): in each, its data's blocks on the
// grid of sparseBlock, and the runs of fewer than sparseHole bytes
// between them. Zeros are holes at the source or data read as zeros, so
// a receiver writes no more: a receive is given room for that, not for
// every chunk whole (50 GiB for an image holding 200 MiB in 50,000
// extents).
func sparseBytes(extents []Extent, size, chunk int64) int64 {
	var n int64
	cur, from, to := int64(-1), int64(0), int64(0) // the span being grown, in chunk cur
	for _, e := range extents {
		for lo, hi := e.Off, min(e.Off+e.Len, size); lo < hi; {
			c := lo / chunk
			cEnd := min((c+1)*chunk, size)
			end := min(hi, cEnd)
			a := max(lo&^(sparseBlock-1), c*chunk)
			b := min((end+sparseBlock-1)&^(sparseBlock-1), cEnd)
			if c == cur && a-to < sparseHole {
				to = max(to, b)
			} else {
				n += to - from
				cur, from, to = c, a, b
			}
			lo = end
		}
	}
	return n + to - from
}

// Hash is a BLAKE3-256 digest.
type Hash [32]byte

func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// MarshalText encodes the hash in hex.
func (h Hash) MarshalText() ([]byte, error) { return []byte(h.String()), nil }

// UnmarshalText decodes hex.
func (h *Hash) UnmarshalText(b []byte) error {
	if len(b) != 64 {
		return fmt.Errorf("hash %q is not 64 hex digits", b)
	}
	_, err := hex.Decode(h[:], b)
	return err
}

// hashChunk runs once per chunk on each end, so its speed is a migration's
// speed: zeebo/blake3 hashes a 1 MiB chunk at 3.4 GB/s on one core here,
// lukechampine.com/blake3 (used before) at 1.0 GB/s, same digests.
func hashChunk(b []byte) Hash { return blake3.Sum256(b) }

// chunkCount is the number of chunks of an image.
func chunkCount(size, chunk int64) int64 { return (size + chunk - 1) / chunk }

// chunkLen is the length of chunk i (the last one may be short).
func chunkLen(i, size, chunk int64) int64 { return min(chunk, size-i*chunk) }

// candidates lists, in order, the chunks that overlap an allocated extent:
// the only ones that can hold data. Everything else is a hole and is never
// read.
func candidates(extents []Extent, size, chunk int64) []int64 {
	var out []int64
	for _, e := range extents {
		end := min(e.Off+e.Len, size)
		if end <= e.Off {
			continue
		}
		first, last := e.Off/chunk, (end-1)/chunk
		if n := len(out); n > 0 && out[n-1] >= first {
			first = out[n-1] + 1
		}
		for i := first; i <= last; i++ {
			out = append(out, i)
		}
	}
	return out
}

// isZero reports whether b is all zero bytes: such chunks are holes even
// when the image has them allocated.
func isZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// zeroHash is the hash of n zero bytes, the leaf of a hole in the Merkle
// tree. Not kept: a manifest walk asks for a whole chunk's and its last
// chunk's once each (withoutZeroChunks, Root), a few per migration, and
// kept by length they grew with every image size a sender offered.
func zeroHash(n int64) Hash { return hashChunk(make([]byte, n)) }

// withoutZeroChunks is m without the chunks it lists as all zeros — holes,
// which a manifest leaves out — or m itself if it lists none. The root is
// the same: a hole's leaf is the hash of its zeros.
func (m *Manifest) withoutZeroChunks() *Manifest {
	n := chunkCount(m.Size, m.ChunkSize)
	if n <= 0 {
		return m
	}
	// Once per walk, not per chunk listed: each is a chunk of zeros hashed.
	whole, last := zeroHash(m.ChunkSize), zeroHash(chunkLen(n-1, m.Size, m.ChunkSize))
	var zero []int64
	for i, h := range m.Chunks {
		if i >= 0 && i < n && (i < n-1 && h == whole || i == n-1 && h == last) {
			zero = append(zero, i)
		}
	}
	if len(zero) == 0 {
		return m
	}
	c := &Manifest{Size: m.Size, ChunkSize: m.ChunkSize, Chunks: maps.Clone(m.Chunks)}
	for _, i := range zero {
		delete(c.Chunks, i)
	}
	return c
}

// Manifest describes an image as chunks: the hashes of the chunks that hold
// data; every other chunk is zeros.
type Manifest struct {
	Size      int64          `json:"size"`
	ChunkSize int64          `json:"chunk_size"`
	Chunks    map[int64]Hash `json:"chunks"` // index → hash of the chunks that are not all zero
}

// Root is the image's Merkle root: a binary tree over the hashes of all
// chunks in order (zero chunks included, as the hash of zeros), leaves and
// inner nodes domain-separated; each level pairs its nodes from the left,
// an odd one out going up as it is. Two images have the same root exactly
// when they have the same size, chunking and bytes.
//
// A subtree over whole chunks that are all zeros has the same hash
// wherever it is, so it is computed once per height: the root costs time
// in the chunks that hold data times the tree's height, and memory in the
// height — not one hash per chunk, which for a sparse 64 TiB disk would be
// 2 GiB, and which an offer's size alone would make a receiver allocate.
func (m *Manifest) Root() Hash {
	n := chunkCount(m.Size, m.ChunkSize)
	if n <= 0 {
		return blake3.Sum256([]byte(fmt.Sprintf("skybridge empty image %d", m.ChunkSize)))
	}
	held := make([]int64, 0, len(m.Chunks))
	for i := range m.Chunks {
		if i >= 0 && i < n {
			held = append(held, i)
		}
	}
	slices.Sort(held)
	height := bits.Len64(uint64(n - 1))
	t := &rootTree{m: m, n: n, held: held, zeros: make([]Hash, 0, height+1)}
	return t.hash(height, 0)
}

// rootTree computes a manifest's root.
type rootTree struct {
	m     *Manifest
	n     int64   // chunks
	held  []int64 // the chunks that hold data, in order
	zeros []Hash  // zeros[j]: a complete subtree of 2^j whole zero chunks
}

// hash is the node at height j and position k: over chunks k·2^j up to
// (k+1)·2^j, or to the end.
func (t *rootTree) hash(j int, k int64) Hash {
	if j == 0 {
		h, ok := t.m.Chunks[k]
		switch {
		case ok:
		case k < t.n-1 || t.m.Size%t.m.ChunkSize == 0:
			return t.zero(0) // a whole chunk's: hashed once per root
		default:
			h = zeroHash(chunkLen(k, t.m.Size, t.m.ChunkSize))
		}
		return leaf(h)
	}
	from, to := k<<j, min((k+1)<<j, t.n)
	whole := to-from == 1<<j && (to < t.n || t.m.Size%t.m.ChunkSize == 0)
	if at, _ := slices.BinarySearch(t.held, from); whole && (at == len(t.held) || t.held[at] >= to) {
		return t.zero(j)
	}
	left := t.hash(j-1, 2*k)
	if below := (t.n + 1<<(j-1) - 1) >> (j - 1); 2*k+1 < below {
		return node(left, t.hash(j-1, 2*k+1))
	}
	return left
}

func (t *rootTree) zero(j int) Hash {
	for len(t.zeros) <= j {
		if len(t.zeros) == 0 {
			t.zeros = append(t.zeros, leaf(zeroHash(t.m.ChunkSize)))
			continue
		}
		z := t.zeros[len(t.zeros)-1]
		t.zeros = append(t.zeros, node(z, z))
	}
	return t.zeros[j]
}

func leaf(h Hash) Hash {
	var b [33]byte
	b[0] = 0
	copy(b[1:], h[:])
	return blake3.Sum256(b[:])
}

func node(l, r Hash) Hash {
	var b [65]byte
	b[0] = 1
	copy(b[1:], l[:])
	copy(b[33:], r[:])
	return blake3.Sum256(b[:])
}

// DataBytes is the number of bytes in chunks that hold data.
func (m *Manifest) DataBytes() int64 {
	var n int64
	for i := range m.Chunks {
		n += chunkLen(i, m.Size, m.ChunkSize)
	}
	return n
}

// Indices returns the data chunks in order.
func (m *Manifest) Indices() []int64 {
	out := make([]int64, 0, len(m.Chunks))
	for i := range m.Chunks {
		out = append(out, i)
	}
	slices.Sort(out)
	return out
}
