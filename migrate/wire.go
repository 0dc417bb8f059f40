package migrate

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/skybridge-mesh/skybridge/policy"
)

// The migration protocol runs over mutually authenticated TLS connections
// between two gateways. Each connection carries frames: a type byte, a
// uvarint length, the payload. The first connection of a migration is the
// control stream (offer, verdict, commit, result); the others are data
// streams that join it by migration ID.
const (
	frameOffer  byte = 1 // sender → receiver, control: Offer (JSON)
	frameJoin   byte = 2 // sender → receiver, data stream: Join (JSON)
	frameAccept byte = 3 // receiver → sender, control: Accept (JSON)
	frameDeny   byte = 4 // receiver → sender, control: Deny (JSON)
	frameChunk  byte = 5 // sender → receiver: index, hash, flags, raw length, bytes
	frameSame   byte = 6 // sender → receiver: index, hash — take it from the version you hold
	frameAck    byte = 7 // receiver → sender: indices now durable
	frameNack   byte = 8 // receiver → sender: index, reason — send it again
	frameCommit byte = 9 // sender → receiver, control: Commit (JSON)
	frameDone   byte = 10
	frameError  byte = 11
	frameAlive  byte = 12 // sender → receiver, data stream, empty: still reading chunks it need not send

	flagZstd = 1

	maxFrame = 64 << 20
)

// Offer opens a migration.
type Offer struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	Class     string `json:"class"`
	Format    string `json:"format"` // format to store at the destination
	Size      int64  `json:"size"`
	ChunkSize int64  `json:"chunk_size"`
	Streams   int    `json:"streams"`
	Policy    string `json:"policy"` // the sender's policy revision, for the record
	// Chunks is how many chunks may hold data (those that overlap the
	// source's allocated extents): the most the receiver writes, which
	// it makes room for and holds the sender to. Senders of releases
	// before it leave it out; their receives are bounded by the size.
	Chunks *int64 `json:"chunks,omitempty"`
	// Bytes bounds what those chunks take on the receiver's disk, which
	// writes their zeros as holes (sparseBytes): what it makes room for
	// and holds the sender to, when less than the chunks whole. Senders of
	// releases before it leave it out.
	Bytes *int64 `json:"bytes,omitempty"`
	// Restarted: the sender started the migration's chunks over (its
	// source changed since an earlier attempt), so the chunks the receiver
	// holds from it may all be replaced by others, written beside them.
	Restarted bool `json:"restarted,omitempty"`
}

// MaxStreams bounds the data streams of one migration.
const MaxStreams = 32

// Bounds of what a migration may describe. An offer's sizes are a peer's
// word, and size what the receiver allocates and writes (its file, the
// qcow2 tables, the manifest): past a pebibyte (1,000 times the largest
// disks in use) or under a page per chunk, they are not a disk image.
const (
	MaxImageSize = 1 << 50
	MinChunkSize = 4 << 10
	maxChunkSize = maxFrame / 2 // a compressed chunk that grew still fits a frame
)

// checkOffer refuses an offer the receiver cannot take as it is: its ID
// names files in the store, its sizes size buffers, and its ID, name and
// class are copied into the audit record of its verdict, which is kept
// for good (a class is bounded as a policy names them; the name as a file
// name).
func checkOffer(o *Offer) error {
	switch {
	case !validID(o.ID):
		return fmt.Errorf("migration ID %s: want 1 to 64 letters, digits, '-' or '_'", clip(o.ID))
	case !policy.ValidName(o.Class):
		// No policy can define such a class, so it would be denied: the
		// denial's record would carry it twice, escaped, and a peer
		// could grow the audit log by ten times what it sends.
		return fmt.Errorf("data class %s: want 1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or digit, as a residency policy names its classes (no policy can define this one, so no gateway takes it): correct the class the image was planned with", clip(o.Class))
	case o.ChunkSize < MinChunkSize || o.ChunkSize > maxChunkSize:
		return fmt.Errorf("chunk size %d: want %d to %d bytes", o.ChunkSize, MinChunkSize, maxChunkSize)
	case o.Size < 0 || o.Size > MaxImageSize:
		return fmt.Errorf("image size %d: want 0 to %d bytes", o.Size, int64(MaxImageSize))
	case o.Format != FormatRaw && o.Format != FormatQcow2:
		return fmt.Errorf("format %q: want %s or %s", o.Format, FormatRaw, FormatQcow2)
	case o.Streams < 1 || o.Streams > MaxStreams:
		return fmt.Errorf("%d data streams: want 1 to %d", o.Streams, MaxStreams)
	case o.Chunks != nil && (*o.Chunks < 0 || *o.Chunks > chunkCount(o.Size, o.ChunkSize)):
		return fmt.Errorf("%d chunks holding data, in an image of %d", *o.Chunks, chunkCount(o.Size, o.ChunkSize))
	case o.Bytes != nil && *o.Bytes < 0:
		return fmt.Errorf("%d bytes holding data", *o.Bytes)
	case o.Chunks != nil && *o.Chunks > maxOfferChunks:
		// Its commit might not fit a frame: refused before any of its
		// data moves, not after all of it has.
		return fmt.Errorf("%d chunks of %d bytes holding data, and one migration carries at most %d: the sending gateway must send larger chunks (releases before the fourth of 2026-11-27 do not: upgrade it)", *o.Chunks, o.ChunkSize, maxOfferChunks)
	}
	return checkName(o.Name)
}

// validID reports whether id can be a migration's ID: NewID makes 16 hex
// digits, and whatever a peer sends must not be a path.
func validID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// clip quotes what a peer sent for an error that names it: a few dozen
// bytes say what is wrong as well as the 64 KiB a first frame may hold.
func clip(s string) string {
	const most = 64
	if len(s) <= most {
		return fmt.Sprintf("%q", s)
	}
	return fmt.Sprintf("%q… (%d bytes)", s[:most], len(s))
}

// Join attaches a data stream to a migration.
type Join struct {
	ID string `json:"id"`
}

// Accept tells the sender what the receiver already holds: chunks made
// durable by an earlier attempt of this migration, and the chunks of the
// version of the image it stores (for incremental re-sync).
type Accept struct {
	Have map[int64]Hash `json:"have,omitempty"`
	Base map[int64]Hash `json:"base,omitempty"`
	// IdleMS is how long, in milliseconds, the receiver waits for a word
	// from a sender that has not committed; a sender that reads chunks
	// it need not send keeps the session with Alive frames meanwhile.
	// Receivers of releases before it take no Alive frame and leave it
	// out (0): the sender then sends none.
	IdleMS int64 `json:"idle_ms,omitempty"`
}

// Deny refuses a migration with the policy's reasons.
type Deny struct {
	Rule    string   `json:"rule"`
	Reasons []string `json:"reasons"`
}

// Commit closes a migration: the sender's manifest and root.
type Commit struct {
	Manifest Manifest `json:"manifest"`
	Root     Hash     `json:"root"`
}

// Done is the receiver's result.
type Done struct {
	Name     string `json:"name"`
	Path     string `json:"path"`
	Format   string `json:"format"`
	Root     Hash   `json:"root"`
	Received int64  `json:"received_bytes"`
	Reused   int    `json:"reused_chunks"`
}

type frameWriter struct {
	w   *bufio.Writer
	hdr [binary.MaxVarintLen64 + 1]byte
}

func newFrameWriter(w io.Writer) *frameWriter {
	return &frameWriter{w: bufio.NewWriterSize(w, 256<<10)}
}

func (fw *frameWriter) frame(typ byte, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	fw.hdr[0] = typ
	h := binary.AppendUvarint(fw.hdr[:1], uint64(n))
	if _, err := fw.w.Write(h); err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := fw.w.Write(p); err != nil {
			return err
		}
	}
	return nil
}

func (fw *frameWriter) json(typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if err := fw.frame(typ, b); err != nil {
		return err
	}
	return fw.w.Flush()
}

func (fw *frameWriter) flush() error { return fw.w.Flush() }

type frameReader struct{ r *bufio.Reader }

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{r: bufio.NewReaderSize(r, 256<<10)}
}

// next reads a frame into buf (grown as needed) and returns its type and
// payload.
func (fr *frameReader) next(buf []byte) (byte, []byte, error) {
	typ, n, err := fr.head()
	if err != nil {
		return 0, nil, err
	}
	p, err := fr.body(n, buf)
	return typ, p, err
}

// nextMax is next for a frame that may not exceed max bytes.
func (fr *frameReader) nextMax(buf []byte, max int) (byte, []byte, error) {
	typ, n, err := fr.head()
	if err != nil {
		return 0, nil, err
	}
	if n > max {
		return 0, nil, badFrame(fmt.Sprintf("frame of %d bytes where at most %d are expected", n, max))
	}
	p, err := fr.body(n, buf)
	return typ, p, err
}

// head reads a frame's type and length.
func (fr *frameReader) head() (byte, int, error) {
	typ, err := fr.r.ReadByte()
	if err != nil {
		return 0, 0, err
	}
	// The length is a uvarint read byte by byte, not with
	// binary.ReadUvarint: its error for an overlong varint could not be
	// told from the connection's, and the peer would not hear why.
	var n uint64
	for i := 0; ; i++ {
		b, err := fr.r.ReadByte()
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // a frame's type without its length
		}
		if err != nil {
			return 0, 0, err
		}
		n |= uint64(b&0x7f) << (7 * i)
		if b < 0x80 {
			break
		}
		if i == maxLenBytes-1 {
			return 0, 0, badFrame(fmt.Sprintf("frame length longer than %d bytes", maxLenBytes))
		}
	}
	if n > maxFrame {
		return 0, 0, badFrame(fmt.Sprintf("frame of %d bytes exceeds the limit", n))
	}
	return typ, int(n), nil
}

// maxLenBytes is the longest uvarint a frame's length takes: maxFrame
// needs 4 bytes, 5 allow for a padded one.
const maxLenBytes = 5

// body reads the n bytes that follow into buf, grown as needed.
func (fr *frameReader) body(n int, buf []byte) ([]byte, error) {
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	_, err := io.ReadFull(fr.r, buf)
	return buf, err
}

// chunkHead reads the fixed part of a chunk frame of n bytes, leaving its
// data to be read with body (the receiver reads data straight into a
// buffer aligned for direct I/O) or skipped. It looks at the frame's
// bytes before consuming them, so a frame too short for its own header
// never reads into the next one, and a padded varint counts as the bytes
// it took.
func (fr *frameReader) chunkHead(n int) (c chunkHead, err error) {
	p, err := fr.r.Peek(min(n, maxChunkHead))
	if err != nil {
		return c, err // the connection, not the frame
	}
	i, h, rest, ok := splitIndex(p)
	if !ok || len(rest) < 1 {
		return c, badFrame("chunk frame shorter than its header")
	}
	raw, w := binary.Uvarint(rest[1:])
	if w <= 0 || raw > maxFrame {
		return c, badFrame("bad chunk length")
	}
	head := len(p) - len(rest) + 1 + w
	c = chunkHead{index: i, hash: h, flags: rest[0], rawLen: int(raw), dataLen: n - head}
	_, err = fr.r.Discard(head)
	return c, err
}

// badFrame is a frame that does not parse, as opposed to a connection
// that failed while it was read: the peer is told, and the log says so.
type badFrame string

func (e badFrame) Error() string { return string(e) }

// refuseFrame tells the peer why its frame is refused, if err is a frame
// that does not parse, and reports whether it was.
func refuseFrame(fw *frameWriter, err error) bool {
	var bad badFrame
	if !errors.As(err, &bad) {
		return false
	}
	fw.frame(frameError, []byte(bad))
	fw.flush()
	return true
}

// maxChunkHead is the longest fixed part of a chunk frame: index and raw
// length as varints, hash, flags.
const maxChunkHead = 2*binary.MaxVarintLen64 + 33

// skip discards the n bytes that follow (a refused chunk's data).
func (fr *frameReader) skip(n int) error {
	_, err := fr.r.Discard(n)
	return err
}

type chunkHead struct {
	index   int64
	hash    Hash
	flags   byte
	rawLen  int // length of the chunk
	dataLen int // bytes in the frame: rawLen, or less if compressed
}

func (fr *frameReader) json(want byte, v any) error { return fr.jsonMax(want, v, maxFrame) }

// jsonMax is json for a frame that may not exceed max bytes.
func (fr *frameReader) jsonMax(want byte, v any, max int) error {
	typ, b, err := fr.nextMax(nil, max)
	if err != nil {
		return err
	}
	if typ == frameError {
		return fmt.Errorf("peer: %s", b)
	}
	if typ != want {
		return badFrame(fmt.Sprintf("unexpected frame %d, want %d", typ, want))
	}
	if err := json.Unmarshal(b, v); err != nil {
		return badFrame(fmt.Sprintf("frame %d: %v", typ, err))
	}
	return nil
}

// chunkHeader is the fixed part of a chunk frame.
func chunkHeader(index int64, h Hash, flags byte, rawLen int) []byte {
	b := binary.AppendUvarint(nil, uint64(index))
	b = append(b, h[:]...)
	b = append(b, flags)
	return binary.AppendUvarint(b, uint64(rawLen))
}

// maxIndexFrame is the most bytes an index frame (Same, and a nack's
// start) takes: a chunk index and its hash.
const maxIndexFrame = binary.MaxVarintLen64 + len(Hash{})

func indexFrame(index int64, h Hash) []byte {
	return append(binary.AppendUvarint(nil, uint64(index)), h[:]...)
}

// parseNack reads a nack frame: the refused chunk and why.
func parseNack(p []byte) (index int64, reason string, err error) {
	i, _, rest, ok := splitIndex(p)
	if !ok {
		return 0, "", badFrame("bad nack frame")
	}
	return i, string(rest), nil
}

func parseIndexFrame(p []byte) (int64, Hash, error) {
	i, h, rest, ok := splitIndex(p)
	if !ok || len(rest) != 0 {
		return 0, h, badFrame("bad index frame")
	}
	return i, h, nil
}

// splitIndex parses the chunk index and hash that chunk, Same and nack
// frames start with.
func splitIndex(p []byte) (i int64, h Hash, rest []byte, ok bool) {
	u, w := binary.Uvarint(p)
	if w <= 0 || len(p) < w+32 {
		return 0, h, nil, false
	}
	copy(h[:], p[w:w+32])
	return int64(u), h, p[w+32:], true
}

func ackFrame(indices []int64) []byte {
	b := binary.AppendUvarint(nil, uint64(len(indices)))
	for _, i := range indices {
		b = binary.AppendUvarint(b, uint64(i))
	}
	return b
}

// maxAckFrame bounds what a sender reads on a data stream: the receiver's
// acknowledgements (at most every chunk of a migration in one), refusals
// and reasons are all smaller.
const maxAckFrame = binary.MaxVarintLen64 * (MaxManifestChunks + 1)

func parseAck(p []byte) ([]int64, error) {
	n, w := binary.Uvarint(p)
	if w <= 0 || n > uint64(len(p)-w) { // each index takes a byte at least
		return nil, errors.New("bad ack")
	}
	p = p[w:]
	// Grown as indices are read, not sized by what the frame claims: an
	// index takes one byte on the wire and eight here.
	out := make([]int64, 0, min(n, 1024))
	for range n {
		i, w := binary.Uvarint(p)
		if w <= 0 {
			return nil, errors.New("bad ack")
		}
		out = append(out, int64(i))
		p = p[w:]
	}
	return out, nil
}
