package mesh

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
)

// netstackEnd is one of two netstack devices a test links.
type netstackEnd struct {
	key     certs.WGPrivateKey
	port    int
	overlay netip.Addr
	dev     *NetstackDevice
}

// netstackPair opens two netstack devices at 100.96.0.hostA and .hostB,
// each the other's WireGuard peer on loopback, until the test ends.
func netstackPair(t *testing.T, hostA, hostB byte) (a, b *netstackEnd) {
	t.Helper()
	mk := func(host byte) *netstackEnd {
		k, _ := certs.GenerateWGKey()
		e := &netstackEnd{key: k, port: freeUDPPort(t), overlay: netip.AddrFrom4([4]byte{100, 96, 0, host})}
		d, err := OpenDevice(DeviceOptions{Name: "ns" + string('0'+host), Mode: ModeNetstack, Port: e.port, MTU: 1420,
			PrivateKey: k, Overlay: e.overlay, MeshPrefix: mesh16, Log: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		e.dev = d.(*NetstackDevice)
		return e
	}
	a, b = mk(hostA), mk(hostB)
	for _, l := range [][2]*netstackEnd{{a, b}, {b, a}} {
		from, to := l[0], l[1]
		cfg, _ := DiffPeers(nil, []PeerConfig{{
			Node: "peer", PublicKey: to.key.Public(), Endpoint: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(to.port)),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(to.overlay, 32)},
		}}, nil)
		if err := from.dev.Configure(wgtypes.Config{Peers: cfg}); err != nil {
			t.Fatal(err)
		}
	}
	return a, b
}

// TestNetstackKeepAliveNoticesVanishedPeer: a netstack connection whose
// peer vanishes (its gateway killed: nothing more arrives, not even a
// reset) ends within the overlay's keepalive time, on the dialling side
// and on the accepting one, as through the kernel. It waited for ever: a
// migration's sender whose receiver was killed after the commit sat
// `running (commit)` for the commit's 10 minutes.
func TestNetstackKeepAliveNoticesVanishedPeer(t *testing.T) {
	defer func(k net.KeepAliveConfig) { overlayKeepAlive = k }(overlayKeepAlive)
	overlayKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 300 * time.Millisecond, Interval: 200 * time.Millisecond, Count: 3}
	const wait = 20 * time.Second // far past the keepalive's 0.9 s

	for i, tc := range []struct {
		name       string
		dialerGoes bool // the dialling gateway vanishes, or the listening one
	}{{"the listener vanishes", false}, {"the dialer vanishes", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ea, eb := netstackPair(t, byte(10+2*i), byte(11+2*i))
			a, b := ea.dev, eb.dev
			bAddr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{100, 96, 0, byte(11 + 2*i)}), 9000)
			ln, err := b.Listen(bAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			accepted := make(chan net.Conn, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					t.Error(err)
					close(accepted)
					return
				}
				accepted <- c
			}()
			ctx, cancel := context.WithTimeout(t.Context(), wait)
			defer cancel()
			dialed, err := a.Dial(ctx, bAddr.String())
			if err != nil {
				t.Fatalf("dial over the overlay: %v", err)
			}
			defer dialed.Close()
			var acc net.Conn
			select {
			case acc = <-accepted:
			case <-ctx.Done():
				t.Fatal("nothing accepted")
			}
			if acc == nil {
				t.FailNow()
			}
			defer acc.Close()

			// The side that stays only reads: what it sent and was not
			// acknowledged would be retransmitted, not kept alive.
			stays, goes, gone := dialed, acc, b
			if tc.dialerGoes {
				stays, goes, gone = acc, dialed, a
			}
			if _, err := goes.Write([]byte{1}); err != nil {
				t.Fatal(err)
			}
			stays.SetReadDeadline(time.Now().Add(wait))
			if _, err := io.ReadFull(stays, make([]byte, 1)); err != nil {
				t.Fatalf("the first byte: %v", err)
			}
			gone.Close()
			start := time.Now()
			_, err = stays.Read(make([]byte, 1))
			took := time.Since(start)
			var deadline net.Error // gonet's is no os.ErrDeadlineExceeded
			if err == nil || errors.As(err, &deadline) && deadline.Timeout() {
				t.Fatalf("the peer vanished; the connection after %s: %v, want it ended by the keepalive", took.Round(time.Millisecond), err)
			}
			if took < overlayKeepAlive.Idle {
				t.Fatalf("the connection ended after %s, before a keepalive was due (%s): %v; want the peer vanished, not gone with a word", took, overlayKeepAlive.Idle, err)
			}
			t.Logf("ended after %s: %v", took.Round(time.Millisecond), err)
		})
	}
}
