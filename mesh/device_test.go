package mesh

import (
	"context"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
)

// freeUDPPort asks the kernel for a free loopback UDP port.
func freeUDPPort(t *testing.T) int {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// TestNetstackDevicesTalk brings up two unprivileged netstack devices,
// configures them through the same Configure path the reconciler uses,
// and carries TCP between their overlay addresses: a real WireGuard
// handshake, no root, no TUN.
func TestNetstackDevicesTalk(t *testing.T) {
	a, b := netstackPair(t, 1, 2)

	ln, err := b.dev.Net().ListenTCPAddrPort(netip.AddrPortFrom(b.overlay, 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c) // echo
	}()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	c, err := a.dev.DialContext(ctx, "tcp", netip.AddrPortFrom(b.overlay, 9000).String())
	if err != nil {
		t.Fatalf("dial over the overlay: %v", err)
	}
	defer c.Close()
	msg := []byte("skybridge over netstack")
	c.Write(msg)
	got := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != string(msg) {
		t.Fatalf("echo: %q, %v", got, err)
	}

	// The device reports what the reconciler and `skybridge status` need.
	dev, err := a.dev.Device()
	if err != nil {
		t.Fatal(err)
	}
	if dev.ListenPort != a.port || dev.PublicKey != wgtypes.Key(a.key.Public()) || len(dev.Peers) != 1 {
		t.Fatalf("device %+v", dev)
	}
	p := dev.Peers[0]
	if p.PublicKey != wgtypes.Key(b.key.Public()) || p.LastHandshakeTime.IsZero() || p.ReceiveBytes == 0 || p.TransmitBytes == 0 ||
		len(p.AllowedIPs) != 1 || prefixOf(p.AllowedIPs[0]) != netip.PrefixFrom(b.overlay, 32) || p.Endpoint.Port != b.port {
		t.Fatalf("peer %+v", p)
	}

	// Removing the peer through the same diff path leaves no peer.
	cfg, ch := DiffPeers(dev.Peers, nil, nil)
	if err := a.dev.Configure(wgtypes.Config{Peers: cfg}); err != nil || len(ch.Removed) != 1 {
		t.Fatal(err)
	}
	if dev, _ := a.dev.Device(); len(dev.Peers) != 0 {
		t.Fatalf("peer not removed: %+v", dev.Peers)
	}
}

func TestUAPIRoundTrip(t *testing.T) {
	k, _ := certs.GenerateWGKey()
	wk := wgtypes.Key(k.Bytes())
	port := 51999
	ka := 25 * time.Second
	cfg := wgtypes.Config{PrivateKey: &wk, ListenPort: &port, Peers: []wgtypes.PeerConfig{
		{PublicKey: wgtypes.Key(key(1)), Endpoint: net.UDPAddrFromAddrPort(netip.MustParseAddrPort("[2001:db8::1]:51820")), PersistentKeepaliveInterval: &ka,
			ReplaceAllowedIPs: true, AllowedIPs: ipNets([]netip.Prefix{netip.MustParsePrefix("100.96.0.1/32"), netip.MustParsePrefix("fd00::/64")})},
		{PublicKey: wgtypes.Key(key(2)), Remove: true},
	}}
	s := encodeUAPI(cfg)
	for _, want := range []string{"listen_port=51999\n", "endpoint=[2001:db8::1]:51820\n", "persistent_keepalive_interval=25\n", "replace_allowed_ips=true\n", "allowed_ip=fd00::/64\n", "remove=true\n"} {
		if !strings.Contains(s, want) {
			t.Errorf("encoded UAPI lacks %q:\n%s", want, s)
		}
	}
	get := "private_key=" + hex.EncodeToString(wk[:]) + "\nlisten_port=51999\npublic_key=" + hex.EncodeToString(wgKeySlice(key(1))) +
		"\nendpoint=192.0.2.1:51820\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\npersistent_keepalive_interval=25\nallowed_ip=100.96.0.1/32\nprotocol_version=1\nerrno=0\n"
	d, err := parseUAPI("x", get)
	if err != nil {
		t.Fatal(err)
	}
	p := d.Peers[0]
	if d.PublicKey != wgtypes.Key(k.Public()) || d.ListenPort != 51999 || p.Endpoint.String() != "192.0.2.1:51820" ||
		p.LastHandshakeTime.Unix() != 1700000000 || p.ReceiveBytes != 20 || p.TransmitBytes != 10 || p.PersistentKeepaliveInterval != ka {
		t.Fatalf("parsed %+v / %+v", d, p)
	}
	if _, err := parseUAPI("x", "errno=1\n"); err == nil {
		t.Fatal("errno ignored")
	}
}

func wgKeySlice(k certs.WGPublicKey) []byte { return k[:] }

// TestNetstackListenerSaysClosed: a netstack listener closed says
// net.ErrClosed, as the kernel's does, so that a server retrying accept
// errors stops instead of retrying a closed listener for ever.
func TestNetstackListenerSaysClosed(t *testing.T) {
	overlay := netip.AddrFrom4([4]byte{100, 96, 0, 9})
	d := testNetstack(t, "nsclosed", overlay)
	ln, err := d.Listen(netip.AddrPortFrom(overlay, 9000))
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan error, 1)
	go func() {
		_, err := ln.Accept()
		accepted <- err
	}()
	ln.Close()
	select {
	case err := <-accepted:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("accept on a closed netstack listener: %v; want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("accept did not return once the listener was closed")
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("accept after the close: %v; want net.ErrClosed", err)
	}
}

// TestNetstackRefusedIsAnAnswer: a netstack gateway's probe of a port
// nothing listens on is refused, and a refusal is an answer (the peer is
// there), as through the kernel; gVisor says it in words of its own.
func TestNetstackRefusedIsAnAnswer(t *testing.T) {
	overlay := netip.AddrFrom4([4]byte{100, 96, 0, 9})
	d := testNetstack(t, "nsrefused", overlay)
	if _, err := d.Dial(context.Background(), netip.AddrPortFrom(overlay, 9001).String()); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("a dial to a port nothing listens on: %v; want ECONNREFUSED", err)
	}
	g := &Gateway{dev: d, log: slog.New(slog.DiscardHandler)}
	if ok, _ := g.probe(context.Background(), overlay); !ok {
		t.Fatal("a refused probe judged as no answer")
	}
}

// testNetstack opens a netstack device at overlay, closed with the test.
func testNetstack(t *testing.T, name string, overlay netip.Addr) Device {
	t.Helper()
	k, _ := certs.GenerateWGKey()
	d, err := OpenDevice(DeviceOptions{Name: name, Mode: ModeNetstack, Port: freeUDPPort(t), MTU: 1420,
		PrivateKey: k, Overlay: overlay, MeshPrefix: mesh16, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}
