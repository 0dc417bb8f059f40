package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/smalldisk"
)

func TestRoomFor(t *testing.T) {
	const M = 1 << 20
	for _, tc := range []struct {
		name                      string
		need, journal, free, held int64
		others                    int
		want                      string // "" if it fits
	}{
		{"fits", 100 * M, 0, 200 * M, 0, 0, ""},
		{"fits exactly with the headroom", 100 * M, 0, 100*M + storeHeadroom, 0, 0, ""},
		{"nothing to write, headroom there", 0, 0, storeHeadroom, 0, 0, ""},
		{"short of the headroom", 100 * M, 0, 100*M + storeHeadroom - 1, 0, 0, "needs up to 100.0 MiB in the destination's image store (0 B of it for the migration journal's record of its chunks), which has 164.0 MiB free and keeps 64.0 MiB spare"},
		{"too big", 1 << 40, 0, 10 << 30, 0, 0, "needs up to 1.0 TiB"},
		{"fits alone, not beside others", 100 * M, 0, 200 * M, 50 * M, 2, "200.0 MiB free, 50.0 MiB of it held for 2 other migrations under way,"},
		{"beside others, still fits", 100 * M, 0, 300 * M, 50 * M, 2, ""},
		{"disk nearly full, nothing to write", 0, 0, storeHeadroom - 1, 0, 0, "needs up to 0 B"},
		{"short by the journal's share", 100 * M, 28 * M, 164*M - 1, 0, 0, "needs up to 100.0 MiB in the destination's image store (28.0 MiB of it for the migration journal's record of its chunks)"},
	} {
		err := roomFor(tc.need, tc.journal, tc.free, tc.held, tc.others)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v; want an error saying %q", tc.name, err, tc.want)
		case err != nil && !strings.Contains(err.Error(), "free space there, or send the image to another destination"):
			t.Errorf("%s: %v; the error does not say what to do", tc.name, err)
		}
	}
}

// TestReceiveNeedCountsTheJournal: what a receive reserves counts the
// journal's growth for every chunk that may hold data, which shares the
// store's disk: measured at 258 bytes a chunk, it was left to the 64 MiB
// spare, which one receive of MaxManifestChunks chunks used whole and two
// receives shared until a commit failed on a full disk.
func TestReceiveNeedCountsTheJournal(t *testing.T) {
	const measured = 258 // bytes a chunk the journal grew by
	raw := &Offer{Format: FormatRaw, Size: 4 * mib, ChunkSize: mib}
	for _, tc := range []struct {
		name                  string
		o                     *Offer
		allow, fresh          int64
		wantNeed, wantJournal int64
	}{
		{"a new receive", raw, 2, 2, 2*mib + 2*journalPerChunk, 2 * journalPerChunk},
		// Held chunks take no new room, but the manifests the commit
		// writes list them too.
		{"a resume holding every chunk", raw, 2, 0, 2 * journalPerChunk, 2 * journalPerChunk},
		{"qcow2", &Offer{Format: FormatQcow2, Size: 4 * mib, ChunkSize: mib}, 2, 1, mib + 2*journalPerChunk + qcowMetaBytes(4*mib, 2, mib), 2 * journalPerChunk},
	} {
		need, journal := receiveNeed(tc.o, tc.allow, tc.fresh)
		if need != tc.wantNeed || journal != tc.wantJournal {
			t.Errorf("%s: need %d, journal %d; want %d, %d", tc.name, need, journal, tc.wantNeed, tc.wantJournal)
		}
	}
	// The largest receive of 4 KiB chunks this release sends: its journal
	// share covers what was measured, and alone exceeds the spare.
	big := &Offer{Format: FormatRaw, Size: MaxManifestChunks * 4096, ChunkSize: 4096}
	need, journal := receiveNeed(big, MaxManifestChunks, MaxManifestChunks)
	if journal < measured*MaxManifestChunks || journal <= storeHeadroom || need != MaxManifestChunks*4096+journal {
		t.Errorf("%d chunks of 4 KiB: need %d, journal %d; want the journal at least %d a chunk, beyond the %d spare", int64(MaxManifestChunks), need, journal, measured, storeHeadroom)
	}
}

// tmpfsStore mounts a tmpfs of the given size (mount(8)'s "72m") where the
// receiver keeps its images, until the test ends.
func tmpfsStore(t *testing.T, size string) func(*ReceiverConfig) {
	t.Helper()
	smalldisk.NeedRoot(t) // before the pair is made
	return func(c *ReceiverConfig) { smalldisk.Mount(t, c.StoreDir, size) }
}

// TestReceiverMakesRoom: a receiver takes a migration only if its image
// store has room for the chunks that may hold data (and its 64 MiB spare),
// counting what the migrations already under way may still write; a
// refused one writes nothing and says what it needs. On a 72 MiB store
// with 64 KiB chunks, 8 MiB are to be had.
func TestReceiverMakesRoom(t *testing.T) {
	p := newPairWith(t, "DE", tmpfsStore(t, "72m"))
	const chunk = 64 << 10
	image := func(name string, mibs int) SendConfig {
		raw := filepath.Join(p.dir, name+".raw")
		makeRaw(t, raw, int64(mibs)*mib, map[int64]int{0: mibs * mib})
		cfg := p.config(raw, "pii-eu")
		cfg.ChunkSize = chunk
		return cfg
	}
	incoming := func() []string {
		entries, err := os.ReadDir(filepath.Join(p.store, ".incoming"))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		return names
	}

	// Too big for the store: refused before anything is written.
	if _, err := Send(context.Background(), image("huge", 10)); err == nil || !strings.Contains(err.Error(), "needs up to 10.1 MiB in the destination's image store (80.0 KiB of it for the migration journal's record of its chunks)") {
		t.Fatalf("a 10 MiB image into 8 MiB of room: %v; want a refusal saying what it needs", err)
	}
	if names := incoming(); len(names) != 0 {
		t.Fatalf("a refused migration left %v in the store", names)
	}

	// Each fits alone; not together.
	first := image("first", 6)
	first.BWLimit = mib // under way for seconds
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	firstDone := make(chan error, 1)
	go func() {
		_, err := Send(ctx, first)
		firstDone <- err
	}()
	waitFor(t, "the first migration to be under way", func() bool {
		a := p.recv.Active()
		return len(a) == 1 && a[0].Durable > 0
	})
	second := image("second", 4)
	if _, err := Send(context.Background(), second); err == nil || !strings.Contains(err.Error(), "held for 1 other migrations under way") {
		t.Fatalf("a 4 MiB image beside a 6 MiB one under way, with 8 MiB of room: %v; want a refusal counting the other", err)
	}
	cancel()
	if err := <-firstDone; !errors.Is(err, context.Canceled) {
		t.Fatalf("the first migration, cancelled: %v", err)
	}
	waitFor(t, "the first migration's session to end", func() bool { return len(p.recv.Active()) == 0 })
	if _, err := Send(context.Background(), second); err != nil {
		t.Fatalf("the 4 MiB image once the other was cancelled: %v", err)
	}
	img, err := p.recvJ.Image("second")
	if err != nil {
		t.Fatal(err)
	}
	compare(t, second.Image, img.Path)
}

// waitFor polls cond for up to 20 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 20 s for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestReceiverHoldsSenderToItsChunks: a sender writes no more chunks than
// its offer said may hold data; a chunk it writes again does not count
// twice.
func TestReceiverHoldsSenderToItsChunks(t *testing.T) {
	p := newPair(t, "DE")
	c := p.dial(t, nil)
	cw, cr := newFrameWriter(c), newFrameReader(c)
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1, Chunks: new(int64(2))}
	if err := cw.json(frameOffer, offer); err != nil {
		t.Fatal(err)
	}
	var acc Accept
	if err := cr.json(frameAccept, &acc); err != nil {
		t.Fatalf("offer: %v", err)
	}
	d := p.dial(t, nil)
	dw, dr := newFrameWriter(d), newFrameReader(d)
	if err := dw.json(frameJoin, Join{ID: offer.ID}); err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, mib)
	send := func(i int64) (byte, []byte) {
		t.Helper()
		chunk[0] = byte(i)
		if err := dw.frame(frameChunk, chunkHeader(i, hashChunk(chunk), 0, mib), chunk); err != nil {
			t.Fatal(err)
		}
		dw.flush()
		typ, b, err := dr.next(nil)
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		return typ, b
	}
	for _, i := range []int64{0, 2, 2} {
		if typ, b := send(i); typ != frameAck {
			t.Fatalf("chunk %d of the 2 offered: answer type %d %q, want an ack", i, typ, b)
		}
	}
	if typ, b := send(3); typ != frameError || !strings.Contains(string(b), "more chunks hold data than the 2 the offer said") {
		t.Fatalf("a third chunk of 2 offered: answer type %d %q, want an error frame", typ, b)
	}
}

// TestResumedReceiveReservesWhatItAdmits: a resume reserves room for the
// chunks that may hold data less those the first attempt left, and is
// held to it: a sender whose source changed since says so in its offer,
// and may then write as many new chunks as hold data beside the old ones,
// with room reserved for all of them. The share of the store a receive
// reserved covers every byte it is let write.
func TestResumedReceiveReservesWhatItAdmits(t *testing.T) {
	p := newPair(t, "DE")
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1, Chunks: new(int64(2))}
	if why := p.attemptReserving(t, offer, 2*mib, 0, 1); why != "" {
		t.Fatalf("the first attempt: %s", why)
	}
	// The source changed, the sender not saying so (a release before it
	// did): its data is in other chunks now, and nothing was reserved for
	// them beside the two held.
	if why := p.attemptReserving(t, offer, 0, 2, 3); !strings.Contains(why, "more new chunks than the 0 the store made room for (the 2 the offer said hold data, less those held") {
		t.Fatalf("new chunks beside those held, no restart said: %q; want them refused", why)
	}
	// Said: room for both beside the two held.
	offer.Restarted = true
	if why := p.attemptReserving(t, offer, 2*mib, 2, 3); why != "" {
		t.Fatalf("new chunks beside those held, the restart said: %s", why)
	}
}

// TestResumeReservesRoomTheFileLost: a held chunk the incoming file lost
// between two attempts (cut short) is written again in new room, which the
// resume reserves and holds the sender to; one changed where it lies is
// written again in its own.
func TestResumeReservesRoomTheFileLost(t *testing.T) {
	p := newPair(t, "DE")
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1, Chunks: new(int64(2))}
	if why := p.attemptReserving(t, offer, 2*mib, 0, 1); why != "" {
		t.Fatalf("the first attempt: %s", why)
	}
	incoming := filepath.Join(p.store, ".incoming", offer.ID+".raw")
	if err := os.Truncate(incoming, mib); err != nil { // chunk 1 is gone
		t.Fatal(err)
	}
	if why := p.attemptReserving(t, offer, mib, 1, 2); !strings.Contains(why, "more new chunks than the 1 the store made room for") {
		t.Fatalf("chunk 1 again, in the room the cut file lost, then a new one: %q; want the new one refused", why)
	}
	writeZeros(t, incoming, mib, 4096) // chunk 1 changed, still where it was
	if why := p.attemptReserving(t, offer, 0, 1); why != "" {
		t.Fatalf("chunk 1 again, changed in its own room: %s", why)
	}
}

// attemptReserving offers o, checks the room its receive reserved, and
// sends the chunks (chunk i's first byte is i) until the receiver refuses
// one, whose reason it returns; it fails the test if the receiver lets the
// sender write past the room it reserved.
func (p *pair) attemptReserving(t *testing.T, o Offer, wantHold int64, chunks ...int64) (refused string) {
	t.Helper()
	rs := p.offerRaw(t, o)
	acc, dw, dr := rs.acc, rs.dw, rs.dr
	defer func() {
		rs.ctrl.Close()
		rs.data.Close()
		waitIdle(t, p.recv, o.ID)
	}()
	p.recv.mu.Lock()
	hold := p.recv.sessions[o.ID].hold
	p.recv.mu.Unlock()
	// Beside the chunks' room, the journal's record of every chunk the
	// offer said may hold data, held ones included.
	journal := *o.Chunks * journalPerChunk
	if hold.bytes != wantHold+journal {
		t.Fatalf("%d chunks held, restarted %v: reserved %d bytes, want %d and %d for the journal", len(acc.Have), o.Restarted, hold.bytes, wantHold, journal)
	}
	chunk := make([]byte, o.ChunkSize)
	for _, i := range chunks {
		chunk[0] = byte(i)
		if err := dw.frame(frameChunk, chunkHeader(i, hashChunk(chunk), 0, int(o.ChunkSize)), chunk); err != nil {
			t.Fatal(err)
		}
		dw.flush()
		typ, b, err := dr.next(nil)
		if err == nil && typ == frameError {
			return string(b)
		}
		if err != nil || typ != frameAck {
			t.Fatalf("chunk %d: answer type %d %q, %v; want an ack", i, typ, b, err)
		}
		if wrote := hold.wrote.Load(); wrote > hold.bytes-journal {
			t.Fatalf("%d chunks held, the sender was let write %d bytes against a reservation of %d for chunks", len(acc.Have), wrote, hold.bytes-journal)
		}
	}
	return ""
}

func TestAdmitLoad(t *testing.T) {
	const M = 1 << 20
	peerFull := make([]receiveLoad, maxSessionsPerPeer)
	for i := range peerFull {
		peerFull[i] = receiveLoad{id: fmt.Sprint("m", i), name: fmt.Sprint("vm", i), from: "gw-a", buffers: 12 * M}
	}
	for _, tc := range []struct {
		name  string
		under []receiveLoad
		l     receiveLoad
		want  string // "" if admitted
	}{
		{"the first", nil, receiveLoad{id: "x", name: "vm", from: "gw-a", buffers: 12 * M}, ""},
		{"a gateway's last allowed", peerFull[1:], receiveLoad{id: "x", name: "vm", from: "gw-a", buffers: 12 * M}, ""},
		{"one too many from a gateway", peerFull, receiveLoad{id: "x", name: "vm", from: "gw-a", buffers: 12 * M}, "gw-a already sends 32 migrations here"},
		{"another gateway beside them", peerFull, receiveLoad{id: "x", name: "vm", from: "gw-b", buffers: 12 * M}, ""},
		{"a resume of one of them", peerFull, receiveLoad{id: "m3", name: "vm3", from: "gw-a", buffers: 12 * M}, ""},
		{"a new send of one of their images", peerFull, receiveLoad{id: "y", name: "vm3", from: "gw-a", buffers: 12 * M}, ""},
		{"more buffers than all may hold", nil, receiveLoad{id: "x", name: "vm", from: "gw-a", buffers: maxReceiveBuffers + 1}, "would hold 1.0 GiB of buffers"},
		{"buffers full", []receiveLoad{{id: "m", name: "big", from: "gw-b", buffers: maxReceiveBuffers - 10*M}}, receiveLoad{id: "x", name: "vm", from: "gw-a", buffers: 12 * M}, "as many migrations as its buffers allow"},
	} {
		err := admitLoad(tc.under, tc.l)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: %v; want %q", tc.name, err, tc.want)
		}
	}
}

// TestReceiverBoundsReceives: one gateway opens at most 32 receives at
// once, and no receive may hold more stream buffers than all may.
func TestReceiverBoundsReceives(t *testing.T) {
	p := newPair(t, "DE")
	offer := func(i int, streams int, chunk int64) (byte, []byte) {
		c := p.dial(t, nil)
		cw, cr := newFrameWriter(c), newFrameReader(c)
		o := Offer{ID: fmt.Sprintf("bound%02d", i), Name: fmt.Sprintf("vm%02d", i), Class: "pii-eu", Format: FormatRaw, Size: mib, ChunkSize: chunk, Streams: streams}
		if err := cw.json(frameOffer, o); err != nil {
			t.Fatal(err)
		}
		typ, b, err := cr.next(nil)
		if err != nil {
			t.Fatalf("offer %d: %v", i, err)
		}
		return typ, b
	}
	if typ, b := offer(99, MaxStreams, 16*mib); typ != frameError || !strings.Contains(string(b), "use fewer streams") {
		t.Fatalf("32 streams of 16 MiB chunks: answer type %d %q; want a refusal", typ, b)
	}
	for i := range maxSessionsPerPeer {
		if typ, b := offer(i, 1, mib); typ != frameAccept {
			t.Fatalf("receive %d of %d allowed: answer type %d %q", i+1, maxSessionsPerPeer, typ, b)
		}
	}
	if typ, b := offer(maxSessionsPerPeer, 1, mib); typ != frameError || !strings.Contains(string(b), "gw-zrh already sends 32 migrations here") {
		t.Fatalf("one receive too many: answer type %d %q; want a refusal", typ, b)
	}
}

// TestReceiverBoundsUnprovenConnections: past 64 connections from one
// address, or 256 in all, that have not yet authenticated and said what
// they are, a new one is closed at once; once one of them goes, the next
// is taken again.
func TestReceiverBoundsUnprovenConnections(t *testing.T) {
	p := newPair(t, "DE")
	dial := func(from byte) net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, from)}}
		c, err := d.Dial("tcp", p.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	closedAtOnce := func(c net.Conn, what string) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("%s: read %v, want it closed (EOF)", what, err)
		}
	}
	taken := func(n int64) {
		t.Helper()
		waitFor(t, fmt.Sprintf("the receiver to hold %d connections", n), func() bool { return p.recv.unproven.Load() == n })
	}
	var first []net.Conn
	for range maxUnprovenFrom {
		first = append(first, dial(1))
	}
	taken(maxUnprovenFrom)
	closedAtOnce(dial(1), "a connection past the bound for one address")
	first[0].Close()
	taken(maxUnprovenFrom - 1)
	dial(1)
	taken(maxUnprovenFrom)

	for from := byte(2); p.recv.unproven.Load() < maxUnproven; from++ {
		for range min(maxUnprovenFrom, maxUnproven-int(p.recv.unproven.Load())) {
			dial(from)
		}
		taken(min(int64(from)*maxUnprovenFrom, maxUnproven))
	}
	closedAtOnce(dial(200), "a connection past the bound in all, from a new address")
	first[1].Close()
	taken(maxUnproven - 1)
	dial(200)
	taken(maxUnproven)
}

// TestReceiverTakesOnlyItsSources: a receiver told where gateways'
// connections come from closes any other unread.
func TestReceiverTakesOnlyItsSources(t *testing.T) {
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { c.Sources = netip.MustParsePrefix("127.0.0.2/32") })
	c, err := net.Dial("tcp", p.addr.String()) // from 127.0.0.1
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("a connection from elsewhere: read %v, want it closed (EOF)", err)
	}
	if got := p.recv.unproven.Load(); got != 0 {
		t.Fatalf("%d connections held, want none", got)
	}
	waitFor(t, "the receiver to log why it closed the connection", func() bool {
		return strings.Contains(p.recvLog.String(), "does not come from a gateway's overlay address (127.0.0.2/32)")
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: mib, 2 * mib: mib})
	cfg := p.config(raw, "pii-eu")
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatalf("a migration from the sources: %v", err)
	}
	p.stored(raw)
	waitFor(t, "the receiver to let go of every place", func() bool {
		p.recv.unprovenMu.Lock()
		defer p.recv.unprovenMu.Unlock()
		return p.recv.unproven.Load() == 0 && len(p.recv.unprovenFrom) == 0
	})
}

// TestSupersedingOfferSeesTheStoredClass: an offer that supersedes a
// migration of the same name from the same gateway judges the stored
// image's class once that migration has let go: it may have stored the
// image, under another class, as it ended. (Judged before, the offer saw
// no stored image and could replace it under its own, laxer class.)
func TestSupersedingOfferSeesTheStoredClass(t *testing.T) {
	storing := make(chan struct{})
	release := make(chan struct{})
	p := newPairWith(t, "CH", func(c *ReceiverConfig) {
		hold := sync.OnceFunc(func() { close(storing); <-release })
		c.afterRename = func() error { hold(); return nil }
	})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseOnce)
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4096})
	first := make(chan error, 1)
	go func() {
		_, err := Send(context.Background(), p.config(raw, "swiss-banking-secret"))
		first <- err
	}()
	<-storing // renamed into place, not yet in the catalog
	c := p.dial(t, nil)
	cw, cr := newFrameWriter(c), newFrameReader(c)
	offer := Offer{ID: "superseding0001", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1}
	if err := cw.json(frameOffer, offer); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the superseding offer to wait for the first migration", func() bool {
		p.recv.mu.Lock()
		defer p.recv.mu.Unlock()
		_, ok := p.recv.opening[offer.ID]
		return ok
	})
	releaseOnce()
	typ, b, err := cr.next(nil)
	if err != nil || typ != frameError || !strings.Contains(string(b), `stored here as class \"swiss-banking-secret\"`) {
		t.Fatalf("an offer of another class superseding the migration that stored the image: type %d %q, %v; want it refused", typ, b, err)
	}
	<-first
	if img, err := p.recvJ.Image("vm"); err != nil || img.Class != "swiss-banking-secret" {
		t.Fatalf("stored image: %+v, %v", img, err)
	}
}

// doneCounter counts what a sender reports to its observer.
type doneCounter struct {
	nopObserver
	done, moved atomic.Int64
}

func (c *doneCounter) Done(_ string, n int)           { c.done.Add(int64(n)) }
func (c *doneCounter) Moved(_ string, n int, _ int64) { c.moved.Add(int64(n)) }

// TestSenderReportsChunksDone: every chunk a sender deals with is reported
// as done, whichever way — sent, or found in the destination's stored
// version in a re-sync, which sends next to nothing for as long as it
// reads (the stalled-migration alert reads this as progress).
func TestSenderReportsChunksDone(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 3 * mib, 5 * mib: mib})
	for _, pass := range []string{"first", "re-sync"} {
		var c doneCounter
		cfg := p.config(raw, "pii-eu")
		cfg.Observer = &c
		rec, err := Send(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := c.done.Load(), int64(rec.Stats.Chunks); got != want {
			t.Errorf("%s: %d chunks reported done of %d", pass, got, want)
		}
		if pass == "re-sync" && c.moved.Load() != 0 {
			t.Errorf("re-sync of an unchanged image moved %d chunks", c.moved.Load())
		}
	}
}

// TestCommitMax: the commit frame a receive counts with its buffers
// follows the chunks that may hold data, not the image's virtual size.
func TestCommitMax(t *testing.T) {
	n := func(v int64) *int64 { return &v }
	for _, tc := range []struct {
		name string
		o    Offer
		want int
	}{
		{"small image", Offer{Size: 10 * mib, ChunkSize: mib}, 4096 + 10*manifestEntryMax},
		{"sparse 1 PiB, 10 chunks of data", Offer{Size: MaxImageSize, ChunkSize: mib, Chunks: n(10)}, 4096 + 10*manifestEntryMax},
		{"1 PiB, chunks not said (an earlier sender)", Offer{Size: MaxImageSize, ChunkSize: mib}, maxFrame},
		{"as many chunks as may be offered", Offer{Size: MaxImageSize, ChunkSize: mib, Chunks: n(maxOfferChunks)}, maxFrame},
		{"more chunks said than the image has", Offer{Size: 2 * mib, ChunkSize: mib, Chunks: n(5)}, 4096 + 2*manifestEntryMax},
	} {
		if got := commitMax(&tc.o); got != tc.want {
			t.Errorf("%s: %d bytes; want %d", tc.name, got, tc.want)
		}
	}
}

// TestManifestEntryMax: a commit lists a chunk within the bound the
// receiver reads it with, for the largest index an offer can have.
func TestManifestEntryMax(t *testing.T) {
	last := chunkCount(MaxImageSize, MinChunkSize) - 1
	h := Hash{0xff}
	m := Manifest{Size: MaxImageSize, ChunkSize: MinChunkSize, Chunks: map[int64]Hash{}}
	empty, _ := json.Marshal(Commit{Manifest: m, Root: h})
	for i := range int64(1000) {
		m.Chunks[last-i] = h
	}
	full, err := json.Marshal(Commit{Manifest: m, Root: h})
	if err != nil {
		t.Fatal(err)
	}
	if per := (len(full) - len(empty)) / 1000; per > manifestEntryMax || len(empty) > 4096 {
		t.Fatalf("%d bytes a chunk (bound %d), %d without chunks (bound 4096)", per, manifestEntryMax, len(empty))
	}
}
