package mesh

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// TestGossipTransport checks what memberlist relies on: datagrams arrive
// whole with their sender, each in a buffer of its own (the receive buffer
// is reused, so a packet must not change when the next one arrives),
// streams connect, the advertised address is the one asked for (the bound
// port if none), and shutdown returns.
func TestGossipTransport(t *testing.T) {
	lo := netip.MustParseAddr("127.0.0.1")
	var aTraffic, bTraffic gossipTraffic
	a, err := newGossipTransport(netip.AddrPortFrom(lo, 0), slog.New(slog.DiscardHandler), &aTraffic, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := newGossipTransport(netip.AddrPortFrom(lo, 0), slog.New(slog.DiscardHandler), &bTraffic, nil)
	if err != nil {
		t.Fatal(err)
	}
	ip, port, err := b.FinalAdvertiseAddr("", 0)
	if err != nil || !ip.Equal(lo.AsSlice()) || port == 0 {
		t.Fatalf("FinalAdvertiseAddr(\"\", 0) = %v, %d, %v; want 127.0.0.1 and the bound port", ip, port, err)
	}
	if ip, p, err := b.FinalAdvertiseAddr("192.0.2.7", 7946); err != nil || ip.String() != "192.0.2.7" || p != 7946 {
		t.Fatalf("FinalAdvertiseAddr(192.0.2.7, 7946) = %v, %d, %v", ip, p, err)
	}
	if _, _, err := b.FinalAdvertiseAddr("gateway.example", 7946); err == nil {
		t.Fatal("a host name was accepted as the advertise address")
	}
	to := netip.AddrPortFrom(lo, uint16(port)).String()

	first, second := bytes.Repeat([]byte{1}, 1400), []byte("ping")
	for _, msg := range [][]byte{first, second} {
		if _, err := a.WriteToAddress(msg, memberlist.Address{Addr: to}); err != nil {
			t.Fatal(err)
		}
	}
	recv := func() *memberlist.Packet {
		select {
		case p := <-b.PacketCh():
			return p
		case <-time.After(5 * time.Second):
			t.Fatal("no datagram within 5 s")
			return nil
		}
	}
	p1, p2 := recv(), recv()
	if !bytes.Equal(p1.Buf, first) || !bytes.Equal(p2.Buf, second) {
		t.Fatalf("received %d bytes then %q; want the 1400-byte datagram unchanged, then %q", len(p1.Buf), p2.Buf, second)
	}
	if cap(p2.Buf) > 64 {
		t.Errorf("a 4-byte datagram holds a %d-byte buffer; want an exact-size copy", cap(p2.Buf))
	}
	_, aPort, _ := a.FinalAdvertiseAddr("", 0)
	if want := netip.AddrPortFrom(lo, uint16(aPort)).String(); p1.From.String() != want {
		t.Errorf("sender %s; want %s", p1.From, want)
	}

	c, err := a.DialTimeout(to, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	answered := make(chan []byte, 1)
	go func() {
		c.Write([]byte("push/pull"))
		got, _ := io.ReadAll(c)
		c.Close()
		answered <- got
	}()
	select {
	case s := <-b.StreamCh():
		got := make([]byte, len("push/pull"))
		io.ReadFull(s, got)
		s.Write([]byte("state"))
		s.Close()
		if string(got) != "push/pull" {
			t.Fatalf("stream carried %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no stream within 5 s")
	}
	if got := <-answered; string(got) != "state" {
		t.Fatalf("the stream's answer was %q", got)
	}

	// Both ends counted all of it, each way.
	for _, c := range []struct {
		what      string
		got, want int64
	}{
		{"a: datagrams sent", aTraffic.packetsSent.Load(), 2},
		{"a: datagram bytes sent", aTraffic.packetBytesSent.Load(), 1404},
		{"b: datagrams received", bTraffic.packetsReceived.Load(), 2},
		{"b: datagram bytes received", bTraffic.packetBytesReceived.Load(), 1404},
		{"a: stream bytes sent", aTraffic.streamBytesSent.Load(), 9},
		{"a: stream bytes received", aTraffic.streamBytesReceived.Load(), 5},
		{"b: stream bytes received", bTraffic.streamBytesReceived.Load(), 9},
		{"b: stream bytes sent", bTraffic.streamBytesSent.Load(), 5},
		{"b: datagrams sent", bTraffic.packetsSent.Load(), 0},
	} {
		if c.got != c.want {
			t.Errorf("%s: %d, want %d", c.what, c.got, c.want)
		}
	}

	// Shut down with a datagram and a stream that nobody takes (memberlist
	// failed to start, say): Shutdown must still return, and twice.
	if _, err := a.WriteToAddress([]byte("unread"), memberlist.Address{Addr: to}); err != nil {
		t.Fatal(err)
	}
	if c, err := a.DialTimeout(to, 5*time.Second); err == nil {
		defer c.Close()
	}
	// b's reader holds the datagram (it counts it as it reads it) and
	// blocks on its hand-over.
	for deadline := time.Now().Add(5 * time.Second); bTraffic.packetsReceived.Load() < 3; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("b never read the datagram nobody takes")
		}
	}
	for _, tr := range []*gossipTransport{a, b, b} {
		done := make(chan error, 1)
		go func() { done <- tr.Shutdown() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Shutdown did not return")
		}
	}
}

// TestGossipTransportBoundsIncomingStreams: past maxInboundStreams streams
// being read, a new one is closed at once (before the gossip key is
// checked, anyone who reaches the port can open them); once one closes,
// the next is taken again. They come from a member's address here, which
// only the total bounds.
func TestGossipTransportBoundsIncomingStreams(t *testing.T) {
	tr, err := newGossipTransport(netip.MustParseAddrPort("127.0.0.1:0"), slog.New(slog.DiscardHandler), &gossipTraffic{}, func(netip.Addr) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Shutdown()
	lo := netip.MustParseAddr("127.0.0.1")
	dial := func() net.Conn { return dialStream(t, tr, lo) }
	taken := func() net.Conn { return takenStream(t, tr) }
	held := make([]net.Conn, 0, maxInboundStreams)
	for range maxInboundStreams {
		dial()
		held = append(held, taken())
	}
	over := dial()
	over.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := over.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("a stream past the bound: read %v, want it closed (EOF)", err)
	}
	if n := tr.traffic.streamsTooMany.Load(); n != 1 {
		t.Fatalf("%d streams counted as closed for too many at once, want 1", n)
	}
	held[0].Close()
	dial()
	taken().Close()
	for _, c := range held[1:] {
		c.Close()
	}
}

// heldFrom is what s counts as open from source a.
func heldFrom(s *sourceCounts, a netip.Addr) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open[a]
}

// dialStream opens a stream to tr from the loopback address from; it
// closes with the test.
func dialStream(t *testing.T, tr *gossipTransport, from netip.Addr) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
	c, err := d.Dial("tcp", tr.tcp.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// takenStream is the next stream tr hands memberlist; it closes with the
// test.
func takenStream(t *testing.T, tr *gossipTransport) net.Conn {
	t.Helper()
	select {
	case c := <-tr.StreamCh():
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("an incoming stream was not handed over")
		return nil
	}
}

// TestGossipTransportBoundsStreamsFromOneSource: an address no member
// gossips from holds at most maxInboundStreamsFrom streams at once; past
// them its next is closed at once, while other addresses' are taken, and
// once a member gossips from it, or one of its streams closes, it is
// taken again.
func TestGossipTransportBoundsStreamsFromOneSource(t *testing.T) {
	stranger := netip.MustParseAddr("127.0.0.2")
	var isMember atomic.Bool
	tr, err := newGossipTransport(netip.MustParseAddrPort("127.0.0.1:0"), slog.New(slog.DiscardHandler), &gossipTraffic{},
		func(src netip.Addr) bool { return src == stranger && isMember.Load() })
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Shutdown()
	dial := func(from netip.Addr) net.Conn { return dialStream(t, tr, from) }
	taken := func() net.Conn { return takenStream(t, tr) }
	closedAtOnce := func(c net.Conn) bool {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := c.Read(make([]byte, 1))
		return err == io.EOF
	}
	held := make([]net.Conn, 0, maxInboundStreamsFrom)
	for range maxInboundStreamsFrom {
		dial(stranger)
		held = append(held, taken())
	}
	if over := dial(stranger); !closedAtOnce(over) {
		t.Fatal("a stream past the bound from one address was not closed")
	}
	if n := tr.traffic.streamsFromOne.Load(); n != 1 {
		t.Fatalf("%d streams counted as closed for too many from one address, want 1", n)
	}
	dial(netip.MustParseAddr("127.0.0.3")) // another address is taken
	taken()
	held[0].Close()
	dial(stranger) // its place given back
	taken()
	isMember.Store(true)
	dial(stranger) // past the bound, but a member gossips from there
	taken()
	if n := tr.traffic.streamsFromOne.Load() + tr.traffic.streamsTooMany.Load(); n != 1 {
		t.Fatalf("%d streams closed in all, want the one", n)
	}
}

// TestGossipJoinWhileAStrangerHoldsStreams: an address without the
// gossip key that holds more idle streams than the gateway reads at once
// (memberlist holds each for its TCP timeout, 10 s on the LAN profile)
// takes only its share: a newcomer still joins through that seed.
func TestGossipJoinWhileAStrangerHoldsStreams(t *testing.T) {
	ca := meshCA(t, t.TempDir())
	lan := func(s *Settings) { s.GossipProfile = "lan" }
	seed := startLiveGatewayWith(t, ca, t.TempDir(), 0, "s-a", nil, io.Discard, lan)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	for range maxInboundStreams + 8 {
		c, err := d.Dial("tcp", seed.g.s.GossipBind.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	// The stranger holds its share, no more: the rest are free. (Its
	// streams end at the TCP timeout, so a join alone, however late,
	// would not show it.) Counted by source: the total also holds, for
	// an instant, each stream about to be turned away.
	tr := &seed.g.traffic
	waitUntil(t, 15*time.Second, "the stranger's streams past its share to be turned away", func() bool {
		return tr.streamsFromOne.Load() >= maxInboundStreams+8-maxInboundStreamsFrom
	})
	if held := heldFrom(&seed.g.gossip.from, netip.MustParseAddr("127.0.0.2")); held != maxInboundStreamsFrom || tr.streamsFromOne.Load() != maxInboundStreams+8-maxInboundStreamsFrom {
		t.Fatalf("the stranger holds %d streams, %d turned away; want %d held, the rest turned away", held, tr.streamsFromOne.Load(), maxInboundStreamsFrom)
	}
	newcomer := startLiveGatewayWith(t, ca, t.TempDir(), 1, "s-b", []string{seed.g.s.GossipBind.String()}, io.Discard, lan)
	waitUntil(t, 20*time.Second, "the newcomer to join through the seed", func() bool { return len(newcomer.dev.Peers()) > 0 })
}

// TestGossipTransportBoundsIncomingBytes: memberlist reads a stream's
// whole message into memory before the gossip key is checked. Streams
// from anyone, each claiming memberlist's largest message and sending it,
// hold no more than maxInboundBytes at once: past it the stream that goes
// over is ended, and closing streams gives the room back.
func TestGossipTransportBoundsIncomingBytes(t *testing.T) {
	tr, err := newGossipTransport(netip.MustParseAddrPort("127.0.0.1:0"), slog.New(slog.DiscardHandler), &gossipTraffic{}, func(netip.Addr) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Shutdown()
	const streams, each = 5, 20 << 20 // 100 MiB in all
	junk := make([]byte, each)
	junk[0] = 10 // memberlist's encrypted message, its length next
	binary.BigEndian.PutUint32(junk[1:5], each-5)
	for range streams {
		c, err := net.Dial("tcp", tr.tcp.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		go c.Write(junk)
	}
	var held []net.Conn
	ended := 0
	for range streams {
		var in net.Conn
		select {
		case in = <-tr.StreamCh():
		case <-time.After(10 * time.Second):
			t.Fatal("an incoming stream was not handed over")
		}
		held = append(held, in)
		in.SetReadDeadline(time.Now().Add(20 * time.Second))
		n, err := io.Copy(io.Discard, io.LimitReader(in, each))
		if errors.Is(err, errInboundBudget) {
			ended++
		} else if err != nil || n != each {
			t.Fatalf("a stream within the bound: %d bytes, %v", n, err)
		}
		if got := tr.inboundBytes.Load(); got > maxInboundBytes {
			t.Fatalf("incoming streams hold %d bytes, more than %d", got, maxInboundBytes)
		}
	}
	if ended == 0 || tr.traffic.streamsTooMuch.Load() != int64(ended) {
		t.Fatalf("%d streams of %d MiB held open: %d ended past %d MiB, %d counted", streams, each>>20, ended, maxInboundBytes>>20, tr.traffic.streamsTooMuch.Load())
	}
	// With the budget spent, a small stream (an acknowledgement, a
	// certificate) still goes through.
	small, err := net.Dial("tcp", tr.tcp.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	go small.Write(junk[:inboundFree])
	select {
	case in := <-tr.StreamCh():
		held = append(held, in)
		in.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := io.ReadFull(in, make([]byte, inboundFree)); err != nil {
			t.Fatalf("a small stream with the budget spent: %d bytes, %v", n, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the small stream was not handed over")
	}
	for _, c := range held {
		c.Close()
	}
	if got := tr.inboundBytes.Load(); got != 0 {
		t.Fatalf("closed streams still count %d bytes", got)
	}
}
