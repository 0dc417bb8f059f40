package migrate

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// TestChunkFrame reads chunk frames the way the receiver does (fixed
// part, then the data into a buffer of its choice) after frames of other
// types, and refuses a chunk frame too short for its own header.
func TestChunkFrame(t *testing.T) {
	var wire bytes.Buffer
	fw := newFrameWriter(&wire)
	data := bytes.Repeat([]byte("skybridge"), 1000)
	h := hashChunk(data)
	chunks := []struct {
		index  int64
		flags  byte
		rawLen int
	}{{0, 0, len(data)}, {1 << 40, flagZstd, 1 << 20}}
	fw.frame(frameSame, indexFrame(7, h))
	for _, c := range chunks {
		fw.frame(frameChunk, chunkHeader(c.index, h, c.flags, c.rawLen), data)
	}
	// A chunk frame whose index is padded (5 as two bytes, which
	// binary.ReadUvarint accepts): the data's length must not come out
	// one byte long and run into the next frame.
	padded := append([]byte{0x85, 0x00}, chunkHeader(0, h, 0, len(data))[1:]...)
	fw.frame(frameChunk, padded, data)
	// A chunk frame shorter than its own header, followed by a frame
	// whose bytes a header read would run into.
	fw.frame(frameChunk, chunkHeader(5, h, 0, 100)[:20])
	fw.frame(frameSame, bytes.Repeat([]byte{0x01}, 64))
	fw.flush()

	fr := newFrameReader(&wire)
	typ, p, err := fr.next(nil)
	if err != nil || typ != frameSame {
		t.Fatalf("first frame: type %d, %v", typ, err)
	}
	if i, got, err := parseIndexFrame(p); err != nil || i != 7 || got != h {
		t.Fatalf("same frame: %d %s %v", i, got, err)
	}
	for _, want := range chunks {
		typ, n, err := fr.head()
		if err != nil || typ != frameChunk {
			t.Fatalf("chunk %d: type %d, %v", want.index, typ, err)
		}
		c, err := fr.chunkHead(n)
		if err != nil {
			t.Fatal(err)
		}
		if c.index != want.index || c.hash != h || c.flags != want.flags || c.rawLen != want.rawLen || c.dataLen != len(data) {
			t.Fatalf("chunk head %+v, want %+v with %d data bytes", c, want, len(data))
		}
		into := make([]byte, 0, 1<<20)
		got, err := fr.body(c.dataLen, into)
		if err != nil || !bytes.Equal(got, data) || &got[0] != &into[:1][0] {
			t.Fatalf("chunk %d data: %v (read into the given buffer: %v)", want.index, err, err == nil && &got[0] == &into[:1][0])
		}
	}
	typ, n, err := fr.head()
	if err != nil || typ != frameChunk {
		t.Fatalf("padded frame: type %d, %v", typ, err)
	}
	if c, err := fr.chunkHead(n); err != nil || c.index != 5 || c.dataLen != len(data) {
		t.Fatalf("padded chunk head %+v, %v; want index 5 and %d data bytes", c, err, len(data))
	}
	if got, err := fr.body(len(data), nil); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("padded chunk's data: %v", err)
	}
	typ, n, err = fr.head()
	if err != nil || typ != frameChunk {
		t.Fatalf("short frame: type %d, %v", typ, err)
	}
	if _, err := fr.chunkHead(n); !errors.As(err, new(badFrame)) {
		t.Fatalf("a 20-byte chunk frame with a 35-byte header: %v, want a bad frame (refused with a word to the sender)", err)
	}
	// Refusing it read nothing beyond it: past its 20 bytes, the next
	// frame is whole.
	if err := fr.skip(n); err != nil {
		t.Fatal(err)
	}
	if typ, p, err := fr.next(nil); err != nil || typ != frameSame || len(p) != 64 {
		t.Fatalf("the frame after the short one: type %d, %d bytes, %v", typ, len(p), err)
	}
}

// TestFrameLength: a length that is too long, as a number or as a
// varint, is a bad frame (the peer is told), and a stream cut inside a
// frame's head is not taken for a clean end.
func TestFrameLength(t *testing.T) {
	for _, tc := range []struct {
		name string
		wire []byte
		want error // nil: a bad frame
	}{
		{"overlong varint", []byte{frameSame, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00}, nil},
		{"over the limit", binary.AppendUvarint([]byte{frameSame}, maxFrame+1), nil},
		{"varint of 2^64", append([]byte{frameSame}, bytes.Repeat([]byte{0xff}, 10)...), nil},
		{"cut after the type", []byte{frameSame}, io.ErrUnexpectedEOF},
		{"cut inside the length", []byte{frameSame, 0x80}, io.ErrUnexpectedEOF},
		{"nothing", nil, io.EOF},
	} {
		_, _, err := newFrameReader(bytes.NewReader(tc.wire)).head()
		if tc.want == nil && !errors.As(err, new(badFrame)) || tc.want != nil && err != tc.want {
			t.Errorf("%s: %v, want %v (nil: a bad frame)", tc.name, err, tc.want)
		}
	}
	// The longest length that fits, padded to the five bytes allowed.
	typ, n, err := newFrameReader(bytes.NewReader([]byte{frameSame, 0x80, 0x80, 0x80, 0xa0, 0x00})).head()
	if err != nil || typ != frameSame || n != maxFrame {
		t.Fatalf("a padded length of maxFrame: type %d, %d, %v", typ, n, err)
	}
}

// TestChunkCompression: what the sender's encoder does with the kinds of
// data an image holds, and that the receiver's decoder restores it.
// Random data is sent as it is after two small probes; text compresses
// to almost nothing; random hex digits, which have no repeats for zstd's
// fastest level to find, are still entropy-coded to about half.
func TestChunkCompression(t *testing.T) {
	enc, err := newChunkEncoder(2)
	if err != nil {
		t.Fatal(err)
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(maxFrame))
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	random := make([]byte, 1<<20)
	rand.Read(random)
	hexDigits := make([]byte, 1<<20)
	for i, b := range random {
		hexDigits[i] = "0123456789abcdef"[b&15]
	}
	text := bytes.Repeat([]byte("skybridge risk batch "), (1<<20)/21)
	for _, tt := range []struct {
		name     string
		data     []byte
		worth    bool
		maxRatio float64
	}{
		{"random", random, false, 0},
		{"text", text, true, 0.01},
		{"random hex digits", hexDigits, true, 0.55},
	} {
		if got := worthCompressing(enc, tt.data); got != tt.worth {
			t.Errorf("%s: worth compressing %v, want %v", tt.name, got, tt.worth)
			continue
		}
		if !tt.worth {
			continue
		}
		c := enc.EncodeAll(tt.data, nil)
		if r := float64(len(c)) / float64(len(tt.data)); r > tt.maxRatio {
			t.Errorf("%s: compressed to %.2f of its size, want at most %.2f", tt.name, r, tt.maxRatio)
		}
		back, err := dec.DecodeAll(c, nil)
		if err != nil || !bytes.Equal(back, tt.data) {
			t.Errorf("%s: does not decompress to itself: %v", tt.name, err)
		}
	}
}

// FuzzFrames: whatever a peer's connection carries, reading it frame by
// frame as the receiver and the sender do — chunk frames' fixed part, the
// other frames' payloads as acks, nacks and index frames — neither panics
// nor reads past a frame, and a chunk's data length is what its frame
// leaves.
func FuzzFrames(f *testing.F) {
	var wire bytes.Buffer
	fw := newFrameWriter(&wire)
	fw.frame(frameChunk, chunkHeader(3, hashChunk([]byte("abc")), 0, 3), []byte("abc"))
	fw.frame(frameAck, ackFrame([]int64{1, 2, 300}))
	fw.frame(frameAck, indexFrame(7, Hash{1}))
	fw.flush()
	f.Add(wire.Bytes())
	f.Add([]byte{frameChunk, 0x80, 0x80, 0x80, 0x80, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr := newFrameReader(bytes.NewReader(b))
		for range 64 {
			typ, n, err := fr.head()
			if err != nil {
				return
			}
			if n < 0 || n > maxFrame {
				t.Fatalf("frame length %d", n)
			}
			if typ == frameChunk {
				c, err := fr.chunkHead(n)
				if err != nil {
					return
				}
				if c.dataLen < 0 || c.dataLen > n {
					t.Fatalf("chunk frame of %d bytes leaves %d of data", n, c.dataLen)
				}
				if err := fr.skip(c.dataLen); err != nil {
					return
				}
				continue
			}
			p, err := fr.body(n, nil)
			if err != nil {
				return
			}
			if len(p) != n {
				t.Fatalf("body of %d bytes for a frame of %d", len(p), n)
			}
			if idx, err := parseAck(p); err == nil {
				if back, err := parseAck(ackFrame(idx)); err != nil || len(back) != len(idx) {
					t.Fatalf("ack %v does not round-trip: %v %v", idx, back, err)
				}
			}
			parseNack(p)
			parseIndexFrame(p)
		}
	})
}

// FuzzCheckOffer: an offer the receiver takes describes an image it can
// size without overflow, whose root costs what its height does.
func FuzzCheckOffer(f *testing.F) {
	f.Add([]byte(`{"id":"0123456789abcdef","name":"vm","class":"pii-eu","format":"raw","size":1048576,"chunk_size":1048576,"streams":4}`))
	f.Add([]byte(`{"id":"a","name":"vm","format":"raw","size":9223372036854775807,"chunk_size":1,"streams":1,"chunks":0}`))
	f.Add([]byte(`{"id":"a","name":"vm","format":"qcow2","size":1125899906842624,"chunk_size":4096,"streams":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var o Offer
		if json.Unmarshal(b, &o) != nil || checkOffer(&o) != nil {
			return
		}
		if o.Size < 0 || o.Size > MaxImageSize || o.ChunkSize < MinChunkSize {
			t.Fatalf("offer taken: size %d, chunk %d", o.Size, o.ChunkSize)
		}
		n := chunkCount(o.Size, o.ChunkSize)
		if n < 0 || n > MaxImageSize/MinChunkSize {
			t.Fatalf("%d chunks of %d bytes in %d", n, o.ChunkSize, o.Size)
		}
		if o.Chunks != nil && (*o.Chunks < 0 || *o.Chunks > n) {
			t.Fatalf("%d chunks holding data of %d", *o.Chunks, n)
		}
		m := Manifest{Size: o.Size, ChunkSize: o.ChunkSize}
		m.Root() // no chunk holds data: its cost is the tree's height
		if o.Format == FormatQcow2 {
			if l := qcowInPlaceLayout(o.Size); l.base < 0 || l.clusters < 0 {
				t.Fatalf("qcow2 layout of %d bytes: %+v", o.Size, l)
			}
		}
	})
}
