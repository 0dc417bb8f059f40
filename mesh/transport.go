package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/skybridge-mesh/skybridge/internal/throttle"
)

// gossipTransport is memberlist's UDP and TCP transport, for one bind
// address. It exists for one reason: memberlist's own NetTransport
// allocates a fresh 64 KiB buffer for every datagram it receives, while
// gossip datagrams are at most a few hundred bytes to 1.4 KB. In the
// 100-gateway scale benchmark that was 62 % of every byte the process
// allocated, and the garbage collector's work that follows; here one
// buffer per socket is reused and each packet gets an exact-size copy.
type gossipTransport struct {
	log      *slog.Logger
	traffic  *gossipTraffic
	udp      *net.UDPConn
	tcp      *net.TCPListener
	packets  chan *memberlist.Packet
	streams  chan net.Conn
	wg       sync.WaitGroup
	shutdown atomic.Bool
	done     chan struct{} // closed by Shutdown: hand-overs nobody takes are dropped
	// dials ends with stopDials: the streams we open, and those being
	// opened, end with it.
	dials     context.Context
	stopDials context.CancelFunc
	// inbound counts the incoming streams not yet closed; warnFull says
	// when too many is worth logging again.
	inbound  atomic.Int64
	warnFull throttle.PerSecond
	// from counts them by source (sourceOf), so that one address cannot
	// hold every slot; member says whether a member gossips from a source,
	// whose streams only the total bounds. warnFrom says when a source
	// turned away is worth logging again.
	from     sourceCounts
	member   func(source netip.Addr) bool
	warnFrom throttle.PerSecond
	// inboundBytes counts what the incoming streams not yet closed have
	// read: memberlist buffers a stream's whole message before the gossip
	// key is checked, so it bounds the memory anyone who can reach the
	// port makes the gateway hold. warnBytes says when that is worth
	// logging again.
	inboundBytes atomic.Int64
	warnBytes    throttle.PerSecond
}

var _ memberlist.NodeAwareTransport = (*gossipTransport)(nil)

// gossipTraffic counts a gateway's gossip as it crosses the network,
// encrypted: datagrams (probes, gossip, small requests) and the bytes of
// TCP streams (push/pull exchanges, large messages), each way. The
// gateway exports it as metrics; the scale benchmark reads it.
type gossipTraffic struct {
	packetsSent, packetsReceived         atomic.Int64
	packetBytesSent, packetBytesReceived atomic.Int64
	streamBytesSent, streamBytesReceived atomic.Int64
	// Incoming streams the transport closed before memberlist was done
	// with them: too many at once, too many at once from one address that
	// no member gossips from, or too much read at once.
	streamsTooMany, streamsFromOne, streamsTooMuch atomic.Int64
}

// countingConn counts a stream's bytes each way.
type countingConn struct {
	net.Conn
	sent, received *atomic.Int64
}

func (c countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.received.Add(int64(n))
	return n, err
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.sent.Add(int64(n))
	return n, err
}

func (t *gossipTransport) counted(c net.Conn) net.Conn {
	return countingConn{Conn: c, sent: &t.traffic.streamBytesSent, received: &t.traffic.streamBytesReceived}
}

// maxDatagram is the largest UDP payload there is; the read buffer must
// hold any datagram whole, or the kernel truncates it.
const maxDatagram = 65535

// gossipRecvBuffer is the socket receive buffer asked for (as memberlist
// does), so that a burst of gossip is queued rather than dropped.
const gossipRecvBuffer = 2 << 20

// newGossipTransport binds bind for UDP and TCP, counting into traffic.
// member says whether a member gossips from a source address (sourceOf).
func newGossipTransport(bind netip.AddrPort, log *slog.Logger, traffic *gossipTraffic, member func(source netip.Addr) bool) (*gossipTransport, error) {
	tcp, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(bind))
	if err != nil {
		return nil, fmt.Errorf("gossip TCP listener on %s: %w", bind, err)
	}
	// With port 0 the kernel picks the TCP port; UDP takes the same one.
	bind = netip.AddrPortFrom(bind.Addr(), uint16(tcp.Addr().(*net.TCPAddr).Port))
	udp, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(bind))
	if err != nil {
		tcp.Close()
		return nil, fmt.Errorf("gossip UDP socket on %s: %w", bind, err)
	}
	for size := gossipRecvBuffer; size > 0; size /= 2 {
		if udp.SetReadBuffer(size) == nil {
			break
		}
	}
	t := &gossipTransport{log: log, traffic: traffic, udp: udp, tcp: tcp, packets: make(chan *memberlist.Packet), streams: make(chan net.Conn), done: make(chan struct{}),
		member: member}
	t.dials, t.stopDials = context.WithCancel(context.Background())
	t.wg.Add(2)
	go t.readPackets()
	go t.acceptStreams()
	return t, nil
}

// FinalAdvertiseAddr is the address given in the configuration; the
// gateway's settings always name one (never "any").
func (t *gossipTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	local := t.tcp.Addr().(*net.TCPAddr)
	if port == 0 {
		port = local.Port
	}
	if ip == "" {
		if local.IP.IsUnspecified() {
			return nil, 0, errors.New("gossip: no address to advertise; set gossip.advertise")
		}
		return local.IP, port, nil
	}
	a := net.ParseIP(ip)
	if a == nil {
		return nil, 0, fmt.Errorf("gossip: advertise address %q is not an IP address", ip)
	}
	if v4 := a.To4(); v4 != nil {
		a = v4
	}
	return a, port, nil
}

func (t *gossipTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

func (t *gossipTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	ap, err := netip.ParseAddrPort(a.Addr)
	if err != nil {
		ua, rerr := net.ResolveUDPAddr("udp", a.Addr)
		if rerr != nil {
			return time.Time{}, rerr
		}
		ap = ua.AddrPort()
	}
	n, err := t.udp.WriteToUDPAddrPort(b, ap)
	if err == nil {
		t.traffic.packetsSent.Add(1)
		t.traffic.packetBytesSent.Add(int64(n))
	}
	return time.Now(), err
}

func (t *gossipTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }

func (t *gossipTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

func (t *gossipTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.DialContext(t.dials, "tcp", a.Addr)
	if err != nil {
		return nil, err
	}
	// memberlist sets a deadline for its own exchanges (push/pull) but
	// none for a user message sent on a stream: a peer that stops reading
	// would hold the sender for good. The whole exchange gets what the
	// dial got.
	c.SetDeadline(time.Now().Add(timeout))
	return &outgoingConn{Conn: t.counted(c), stop: context.AfterFunc(t.dials, func() { c.Close() })}, nil
}

// abortStreams ends the streams we have opened or are opening, and fails
// those we would open: a stopping gateway does not wait out a join or a
// state exchange with a peer that does not answer (memberlist's joins
// cannot be cancelled, and each seed could take twice its TCP timeout).
func (t *gossipTransport) abortStreams() { t.stopDials() }

// outgoingConn is a stream we opened, closed by abortStreams.
type outgoingConn struct {
	net.Conn
	stop func() bool
}

func (c *outgoingConn) Close() error {
	c.stop()
	return c.Conn.Close()
}

func (t *gossipTransport) StreamCh() <-chan net.Conn { return t.streams }

func (t *gossipTransport) Shutdown() error {
	if t.shutdown.Swap(true) {
		return nil
	}
	close(t.done)
	t.stopDials()
	t.tcp.Close()
	t.udp.Close()
	t.wg.Wait()
	return nil
}

func (t *gossipTransport) readPackets() {
	defer t.wg.Done()
	buf := make([]byte, maxDatagram)
	for {
		n, from, err := t.udp.ReadFromUDPAddrPort(buf)
		now := time.Now()
		if err != nil {
			if t.shutdown.Load() {
				return
			}
			t.log.Warn("gossip: read UDP", "err", err)
			continue
		}
		if n == 0 {
			continue
		}
		t.traffic.packetsReceived.Add(1)
		t.traffic.packetBytesReceived.Add(int64(n))
		// A dual-stack socket reports IPv4 senders as ::ffff:a.b.c.d.
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		select {
		case t.packets <- &memberlist.Packet{Buf: append([]byte(nil), buf[:n]...), From: net.UDPAddrFromAddrPort(from), Timestamp: now}:
		case <-t.done:
			return
		}
	}
}

func (t *gossipTransport) acceptStreams() {
	defer t.wg.Done()
	var delay time.Duration
	for {
		c, err := t.tcp.Accept()
		if err != nil {
			if t.shutdown.Load() {
				return
			}
			// Out of file descriptors, say: back off rather than spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			t.log.Warn("gossip: accept TCP", "err", err, "retry_in", delay)
			select {
			case <-time.After(delay):
			case <-t.done:
				return
			}
			continue
		}
		delay = 0
		// Before the gossip key is checked, a stream costs its reader a
		// goroutine and a descriptor for up to the TCP timeout: a flood of
		// them from anyone who can reach the port would run the gateway
		// out of descriptors. Past the bound they are closed at once.
		if t.inbound.Add(1) > maxInboundStreams {
			t.inbound.Add(-1)
			t.traffic.streamsTooMany.Add(1)
			c.Close()
			if ok, dropped := t.warnFull.Allow(); ok {
				t.log.Warn("gossip: too many incoming streams at once; closing new ones", "max", maxInboundStreams, "closed_unlogged", dropped)
			}
			continue
		}
		ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
		src := sourceOf(ap.Addr())
		if !t.from.take(src, maxInboundStreamsFrom, t.member) {
			t.inbound.Add(-1)
			t.traffic.streamsFromOne.Add(1)
			c.Close()
			if ok, dropped := t.warnFrom.Allow(); ok {
				t.log.Warn("gossip: too many incoming streams at once from one address that no member gossips from; closing new ones", "from", src, "max", maxInboundStreamsFrom, "closed_unlogged", dropped)
			}
			continue
		}
		in := &inboundConn{Conn: t.counted(c), n: &t.inbound, bytes: &t.inboundBytes, over: t.overBudget, release: func() { t.from.release(src) }}
		select {
		case t.streams <- in:
		case <-t.done:
			in.Close()
			return
		}
	}
}

// maxInboundStreams bounds the gossip streams being read at once. A
// gateway's peers open one each for a state exchange every 15 s or so,
// and for the rare large message: a few at a time even in a large mesh.
// maxInboundStreamsFrom bounds those of one source address that no member
// gossips from (a newcomer's, or a stranger's: memberlist holds a stream
// for its TCP timeout before the gossip key is checked), so that one
// address holding connections open cannot keep new gateways from joining,
// nor members' large messages from arriving. A gateway opens one or two
// at a time; a site's gateways behind one NAT address a few each.
const (
	maxInboundStreams     = 256
	maxInboundStreamsFrom = 32
)

// maxInboundBytes bounds what the incoming streams being read hold at
// once: a join's state exchange in a mesh of thousands carries a few MB
// (maxJoinCerts certificates), memberlist takes up to 20 MiB per stream,
// and a stream is read whole into memory, doubling its buffer as it grows,
// before the gossip key is checked.
const maxInboundBytes = 64 << 20

// errInboundBudget ends a stream read past maxInboundBytes.
var errInboundBudget = errors.New("gossip: incoming streams hold too much at once; closing this one")

// inboundConn is an incoming stream, counted until it is closed, with the
// bytes it read.
type inboundConn struct {
	net.Conn
	n       *atomic.Int64
	bytes   *atomic.Int64
	seen    int64        // read so far (by the one goroutine reading)
	ended   bool         // past the budget: every later read fails
	charged atomic.Int64 // to bytes; Close may come from another goroutine
	over    func()
	release func() // its source's count
	once    sync.Once
}

func (c *inboundConn) Read(b []byte) (int, error) {
	if c.ended {
		return 0, errInboundBudget
	}
	n, err := c.Conn.Read(b)
	if n > 0 {
		// The first inboundFree bytes of a stream are not charged: the
		// small messages (acknowledgements, certificates, blobs) go on
		// while large state exchanges fill the budget, and
		// maxInboundStreams bounds them.
		before := c.seen
		c.seen += int64(n)
		charge := max(c.seen-inboundFree, 0) - max(before-inboundFree, 0)
		if charge > 0 && c.bytes.Add(charge) > maxInboundBytes {
			c.bytes.Add(-charge) // dropped, not held
			c.ended = true
			c.over()
			return 0, errInboundBudget
		}
		c.charged.Add(charge)
	}
	return n, err
}

func (c *inboundConn) Close() error {
	c.once.Do(func() {
		c.n.Add(-1)
		c.bytes.Add(-c.charged.Load())
		if c.release != nil {
			c.release()
		}
	})
	return c.Conn.Close()
}

// inboundFree is what each stream may read without charge to
// maxInboundBytes.
const inboundFree = 64 << 10

// overBudget says, now and then, that a stream was closed for
// maxInboundBytes.
func (t *gossipTransport) overBudget() {
	t.traffic.streamsTooMuch.Add(1)
	if ok, dropped := t.warnBytes.Allow(); ok {
		t.log.Warn("gossip: incoming streams hold too much at once; closing the one that went past", "max_bytes", maxInboundBytes, "closed_unlogged", dropped)
	}
}
