package mesh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// inNewNetns runs f on a thread of its own in a network namespace of its
// own, which goes with it.
func inNewNetns(t *testing.T, f func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("this test needs root (a network namespace); CI must run it as root")
		}
		t.Skip("needs root")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Never unlocked: the thread ends with the goroutine, and its
		// namespace with it, rather than go back to the pool.
		runtime.LockOSThread()
		ns, err := netns.New()
		if err != nil {
			t.Errorf("new network namespace: %v", err)
			return
		}
		defer ns.Close()
		f()
	}()
	<-done
}

// addVeth adds a veth pair, name and name+"p", both up, in the calling
// thread's namespace (inNewNetns); nil, the test failed, if it cannot.
func addVeth(t *testing.T, name string) netlink.Link {
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
		t.Errorf("add %s: %v", name, err)
		return nil
	}
	l, _ := netlink.LinkByName(name)
	netlink.LinkSetUp(l)
	if p, err := netlink.LinkByName(name + "p"); err == nil {
		netlink.LinkSetUp(p)
	}
	return l
}

// TestHostRoutes: the host's own routes to a network, at any metric, are
// told apart from skybridge's, in one read of the table.
func TestHostRoutes(t *testing.T) {
	inNewNetns(t, func() {
		lan, wg := addVeth(t, "lan0"), addVeth(t, "wg0")
		if lan == nil || wg == nil {
			return
		}
		// The host's LAN (a connected route), and another network it
		// routes there at metric 100.
		if err := netlink.AddrAdd(lan, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("192.0.2.1"), Mask: net.CIDRMask(24, 32)}}); err != nil {
			t.Errorf("address: %v", err)
			return
		}
		_, other, _ := net.ParseCIDR("203.0.113.0/24")
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: lan.Attrs().Index, Dst: other, Priority: 100, Scope: netlink.SCOPE_LINK}); err != nil {
			t.Errorf("route: %v", err)
			return
		}
		lc := &linkConfig{name: "wg0", index: wg.Attrs().Index}
		ours := netip.MustParsePrefix("198.51.100.0/24")
		if err := lc.setRoutes(RouteChange{Add: []netip.Prefix{ours}}); err != nil {
			t.Errorf("our route: %v", err)
			return
		}
		// skybridge's route towards another device (an earlier
		// interface's) is neither this link's nor the host's.
		elsewhere := &linkConfig{name: "lan0", index: lan.Attrs().Index}
		stale := netip.MustParsePrefix("198.51.100.128/25")
		if err := elsewhere.setRoutes(RouteChange{Add: []netip.Prefix{stale}}); err != nil {
			t.Errorf("route elsewhere: %v", err)
			return
		}
		table, err := lc.routes()
		host := table.Host
		if err != nil || !host[netip.MustParsePrefix("192.0.2.0/24")] || !host[netip.MustParsePrefix("203.0.113.0/24")] || host[ours] || host[stale] {
			t.Errorf("host routes %v, %v; want the LAN and the metric-100 route, not skybridge's", host, err)
		}
		if !slices.Equal(table.Own, []netip.Prefix{ours}) {
			t.Errorf("own routes %v; want only %v", table.Own, ours)
		}
	})
}

// TestHeldRoutesInKernel: a prefix moves between a route into the device
// and an unreachable route each way, IPv4 and IPv6, without losing either
// to the removal that follows (IPv6 ignores a removal's type); a held
// prefix is refused at once ("no route to host", not a silent drop); an
// unreachable route someone else installed is the host's, and another
// gateway's in the namespace is neither ours nor freed by us.
func TestHeldRoutesInKernel(t *testing.T) {
	inNewNetns(t, func() {
		link := func(name string) *linkConfig {
			if l := addVeth(t, name); l != nil {
				return &linkConfig{name: name, index: l.Attrs().Index}
			}
			return nil
		}
		lc, other := link("wg0"), link("wg1")
		if lc == nil || other == nil {
			return
		}
		// An IPv6 address to connect from (no duplicate detection: it is
		// usable at once).
		wg0, _ := netlink.LinkByName("wg0")
		if err := netlink.AddrAdd(wg0, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("2001:db8:1::1"), Mask: net.CIDRMask(64, 128)}, Flags: syscall.IFA_F_NODAD}); err != nil {
			t.Errorf("IPv6 address: %v", err)
			return
		}
		if lc.heldMetric() == other.heldMetric() {
			t.Errorf("two interfaces' held routes share metric %#x", lc.heldMetric())
		}
		_, theirs, _ := net.ParseCIDR("203.0.113.0/24")
		if err := netlink.RouteAdd(&netlink.Route{Dst: theirs, Type: syscall.RTN_UNREACHABLE, Protocol: netlink.RouteProtocol(4)}); err != nil {
			t.Errorf("the host's own unreachable route: %v", err)
			return
		}
		// Another gateway of this namespace holds a prefix of its own.
		others := netip.MustParsePrefix("198.51.100.128/25")
		if err := other.setRoutes(RouteChange{Hold: []netip.Prefix{others}}); err != nil {
			t.Error(err)
		}
		check := func(step string, own, held []netip.Prefix) {
			t.Helper()
			table, err := lc.routes()
			if err != nil {
				t.Errorf("%s: %v", step, err)
				return
			}
			if !slices.Equal(table.Own, own) || !slices.Equal(table.Held, held) {
				t.Errorf("%s: own %v held %v; want own %v held %v", step, table.Own, table.Held, own, held)
			}
			if !table.Host[netip.MustParsePrefix("203.0.113.0/24")] || table.Host[others] {
				t.Errorf("%s: host routes %v; want the host's unreachable route, not another gateway's", step, table.Host)
			}
			if theirs, _ := other.routes(); !slices.Equal(theirs.Held, []netip.Prefix{others}) {
				t.Errorf("%s: the other gateway's held routes %v; want %v", step, theirs.Held, others)
			}
		}
		for _, tc := range []struct{ site, addr string }{{"198.51.100.0/25", "198.51.100.7:443"}, {"2001:db8:9::/48", "[2001:db8:9::7]:443"}} {
			one := []netip.Prefix{netip.MustParsePrefix(tc.site)}
			if err := lc.setRoutes(RouteChange{Add: one}); err != nil {
				t.Error(err)
			}
			check(tc.site+" carried", one, nil)
			if err := lc.setRoutes(RouteChange{Hold: one, Del: one}); err != nil {
				t.Error(err)
			}
			check(tc.site+" held", nil, one)
			start := time.Now()
			c, err := net.DialTimeout("tcp", tc.addr, 5*time.Second)
			if err == nil {
				c.Close()
			}
			if !errors.Is(err, syscall.EHOSTUNREACH) && !errors.Is(err, syscall.ENETUNREACH) || time.Since(start) > time.Second {
				t.Errorf("a connection into held %s: %v after %s; want refused at once", tc.site, err, time.Since(start))
			}
			if err := lc.setRoutes(RouteChange{Add: one, Unhold: one}); err != nil {
				t.Error(err)
			}
			check(tc.site+" carried again", one, nil)
			if err := lc.setRoutes(RouteChange{Unhold: one}); err != nil {
				t.Error(err)
			}
			check(tc.site+" nothing to free", one, nil)
			if err := lc.setRoutes(RouteChange{Del: one}); err != nil {
				t.Error(err)
			}
			check(tc.site+" gone", nil, nil)
		}
	})
}

// TestLeaveOutHostRoutes: a route the host has itself goes from the
// kernel routes and from its peer's allowed IPs, without touching the
// plan it came from.
func TestLeaveOutHostRoutes(t *testing.T) {
	lan, remote, ov := netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("100.96.0.2/32")
	peers := []PeerConfig{{Node: "a", AllowedIPs: []netip.Prefix{ov, lan}}, {Node: "b", AllowedIPs: []netip.Prefix{remote}}}
	routes := []netip.Prefix{lan, remote}
	p2, r2, left := leaveOutHostRoutes(peers, routes, map[netip.Prefix]bool{lan: true, ov: true})
	if !slices.Equal(left, []netip.Prefix{lan}) || !slices.Equal(r2, []netip.Prefix{remote}) || !slices.Equal(p2[0].AllowedIPs, []netip.Prefix{ov}) || !slices.Equal(p2[1].AllowedIPs, []netip.Prefix{remote}) {
		t.Fatalf("left %v, routes %v, peers %+v", left, r2, p2)
	}
	if !slices.Equal(peers[0].AllowedIPs, []netip.Prefix{ov, lan}) || !slices.Equal(routes, []netip.Prefix{lan, remote}) {
		t.Fatalf("the plan was changed: %+v %v", peers, routes)
	}
	if p3, r3, left := leaveOutHostRoutes(peers, routes, nil); left != nil || &p3[0] != &peers[0] || len(r3) != 2 {
		t.Fatal("nothing to leave out, yet the plan was copied or changed")
	}
}

// liveSitePair starts hq, of site zrh-dc (logging to logs), and fra-1, of
// site fra-dc, which routes lan (10.77.0.0/16) and knows hq as its seed,
// and waits until hq routes lan into the mesh.
func liveSitePair(t *testing.T, logs io.Writer) (ca *certs.CA, hq, fra *liveGateway, lan netip.Prefix) {
	t.Helper()
	dir := t.TempDir()
	ca = meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	hq = startLiveGatewayWith(t, ca, dir, 0, "zrh-dc", nil, logs, nil)
	lan = netip.MustParsePrefix("10.77.0.0/16")
	s := liveSettings(t, filepath.Join(dir, "fra"))
	s.Node = provisionGateway(t, ca, tb, certs.Attributes{Node: "fra-1", Site: "fra-dc", Region: "fra", Provider: "onprem", Jurisdiction: "DE",
		OverlayIP: netip.MustParseAddr("100.64.7.9"), Routes: []netip.Prefix{lan}}, time.Hour, s.Identity.Dir)
	s.Seeds = []string{hq.g.s.GossipAdvertise.String()}
	fra = runLiveGateway(t, s, &syncbuf.Buffer{})
	waitUntil(t, 20*time.Second, "fra-1's site routed into the mesh", func() bool { return hq.routed(lan) })
	return ca, hq, fra, lan
}

// routed reports whether the gateway routes p into its device; held,
// whether it holds p unreachable.
func (lg *liveGateway) routed(p netip.Prefix) bool {
	rs, _ := lg.dev.Routes()
	return slices.Contains(rs.Own, p)
}

func (lg *liveGateway) held(p netip.Prefix) bool {
	rs, _ := lg.dev.Routes()
	return slices.Contains(rs.Held, p)
}

// TestGatewayLeavesOutHostRoutes: a gateway whose host routes a remote
// site's network itself (a LAN come up after it) routes it no more into
// the mesh, nor accepts it from the peer, says so once, and routes it
// again once the host's route is gone.
func TestGatewayLeavesOutHostRoutes(t *testing.T) {
	logs := &syncbuf.Buffer{}
	_, hq, _, lan := liveSitePair(t, logs)
	routed := func() bool { return hq.routed(lan) }
	allowed := func() bool {
		for _, p := range hq.dev.Peers() {
			for _, n := range p.AllowedIPs {
				if prefixOf(n) == lan {
					return true
				}
			}
		}
		return false
	}
	hq.dev.SetHostRoutes(lan)
	hq.g.triggerReconcile()
	waitUntil(t, 10*time.Second, "the route the host has itself left out", func() bool { return !routed() && !allowed() && len(hq.dev.Peers()) == 1 })
	runs := func() int {
		hq.g.stats.mu.Lock()
		defer hq.g.stats.mu.Unlock()
		return hq.g.stats.runs
	}
	for range 3 { // passes that find the same: said once
		n := runs()
		hq.g.triggerReconcile()
		waitUntil(t, 10*time.Second, "another reconcile pass", func() bool { return runs() > n })
	}
	if n := strings.Count(logs.String(), "routes left out"); n != 1 {
		t.Fatalf("said %d times that the route is left out, want once", n)
	}
	hq.dev.SetHostRoutes()
	hq.g.triggerReconcile()
	waitUntil(t, 10*time.Second, "the route back once the host's is gone", func() bool { return routed() && allowed() })
}

// TestTakeOverPersistentTUN: a TUN device made beforehand (ip tuntap add,
// so that its routes outlive a restart) is taken over in auto mode as in
// TUN mode, and an overlay address an earlier identity left on it goes:
// kept, it stayed the primary address, the source of every connection
// into the mesh.
func TestTakeOverPersistentTUN(t *testing.T) {
	inNewNetns(t, func() {
		// The UAPI socket is named after the interface, in a directory
		// every namespace shares: one name per run.
		name := fmt.Sprintf("sbt%d", os.Getpid()%100000)
		tt := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TUN}
		if err := netlink.LinkAdd(tt); err != nil {
			t.Errorf("add a persistent TUN: %v", err)
			return
		}
		for _, f := range tt.Fds {
			f.Close()
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Error(err)
			return
		}
		// Two earlier addresses, the second a secondary of the first,
		// which the kernel removes with the first unless
		// promote_secondaries is on.
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+name+"/promote_secondaries", []byte("0"), 0o644); err != nil {
			t.Errorf("promote_secondaries: %v", err)
			return
		}
		for _, a := range []string{"100.64.9.9", "100.64.9.10"} {
			stale := &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(a).To4(), Mask: net.CIDRMask(10, 32)}}
			if err := netlink.AddrAdd(l, stale); err != nil {
				t.Errorf("the earlier address %s: %v", a, err)
				return
			}
		}
		key, _ := certs.GenerateWGKey()
		overlay := netip.MustParseAddr("100.64.7.1")
		d, err := OpenDevice(DeviceOptions{Name: name, Mode: ModeAuto, Port: 51820, MTU: 1420, PrivateKey: key,
			Overlay: overlay, MeshPrefix: netip.MustParsePrefix("100.64.0.0/10"), Log: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Errorf("auto mode on a persistent TUN: %v", err)
			return
		}
		defer d.Close()
		if d.Mode() != ModeTUN {
			t.Errorf("mode %s, want %s", d.Mode(), ModeTUN)
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			t.Error(err)
			return
		}
		var got []string
		for _, a := range addrs {
			got = append(got, a.IPNet.String())
		}
		if !slices.Equal(got, []string{"100.64.7.1/10"}) {
			t.Errorf("addresses %v, want only the overlay address 100.64.7.1/10", got)
		}
		if _, err := d.Device(); err != nil {
			t.Errorf("wgctrl over the UAPI socket: %v", err)
		}
	})
}

// TestHeldRoutesFreedWhenBurstEndedWhileOff: a burst gateway that held its
// routes at its last stop, and finds at its next start that its burst
// ended meanwhile, frees them: it will not run again to do so. Another
// failure to start leaves them held.
func TestHeldRoutesFreedWhenBurstEndedWhileOff(t *testing.T) {
	inNewNetns(t, func() {
		lc := &linkConfig{name: "sb-burst"}
		held := []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
		if err := lc.setRoutes(RouteChange{Hold: held}); err != nil {
			t.Error(err)
			return
		}
		s := &Settings{Interface: "sb-burst", Mode: ModeTUN}
		log := slog.New(slog.DiscardHandler)
		other := errors.New("identity back end: unreachable")
		if err := endedWhileOff(s, options{}, log, other); err != other {
			t.Errorf("endedWhileOff returned %v, want the error it was given", err)
		}
		if table, _ := lc.routes(); !slices.Equal(table.Held, held) {
			t.Errorf("after a failed start: held %v, want %v kept", table.Held, held)
		}
		// The burst's end recorded at its last run: the start finds it.
		dir := t.TempDir()
		s.StateDir, s.Identity.Dir = filepath.Join(dir, "state"), filepath.Join(dir, "identity")
		if err := os.MkdirAll(s.Identity.Dir, 0o700); err != nil {
			t.Error(err)
			return
		}
		at := time.Now()
		if err := saveEnrollment(s.Identity.Dir, &Enrollment{Site: "burst-ams", Node: "burst-ams-gw1", Ended: &at, Reason: "taken down"}); err != nil {
			t.Error(err)
			return
		}
		var ended *BurstEndedError
		if _, err := newGateway(context.Background(), s, log, options{}); !errors.As(err, &ended) {
			t.Errorf("a start after the burst ended: %v, want the burst's end", err)
		}
		if table, _ := lc.routes(); len(table.Held) != 0 {
			t.Errorf("after the burst ended while off: held %v, want none", table.Held)
		}
	})
}

// TestFailedRouteKeepsItsPredecessor: a prefix moving from held to
// carried keeps its unreachable route when the route into the device is
// refused (here IPv6 is off on the tunnel link, as hardened hosts have
// it): freed anyway, it would follow the host's default route, in clear.
// Real kernel, in a namespace of the test's own.
func TestFailedRouteKeepsItsPredecessor(t *testing.T) {
	inNewNetns(t, func() {
		wg, up := addVeth(t, "wgx0"), addVeth(t, "upx0")
		if wg == nil || up == nil {
			return
		}
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/wgx0/disable_ipv6", []byte("1"), 0o644); err != nil {
			t.Error(err)
			return
		}
		// The host's uplink, with an IPv6 default route.
		if err := netlink.AddrAdd(up, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("2001:db8:ffff::1"), Mask: net.CIDRMask(64, 128)}, Flags: syscall.IFA_F_NODAD}); err != nil {
			t.Error(err)
			return
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: up.Attrs().Index, Gw: net.ParseIP("2001:db8:ffff::2")}); err != nil {
			t.Error(err)
			return
		}
		lc := &linkConfig{name: "wgx0", index: wg.Attrs().Index}
		site := []netip.Prefix{netip.MustParsePrefix("2001:db8:77::/48")}
		if err := lc.setRoutes(RouteChange{Hold: site}); err != nil {
			t.Error(err)
			return
		}
		// The site's gateway is back: carried again, as apply asks.
		if err := lc.setRoutes(RouteChange{Add: site, Unhold: site}); err == nil {
			t.Error("an IPv6 route into a link with IPv6 off went in")
			return
		}
		table, err := lc.routes()
		if err != nil {
			t.Error(err)
			return
		}
		if !slices.Equal(table.Held, site) {
			t.Errorf("the route into the device was refused, and the held route is gone too (held %v, own %v)", table.Held, table.Own)
		}
		rs, err := netlink.RouteGet(net.ParseIP("2001:db8:77::1"))
		if err == nil && len(rs) > 0 && rs[0].LinkIndex == up.Attrs().Index {
			t.Error("traffic to the site goes out by the host's default route")
		}
	})
}

// TestHoldLinkRoutes: the routes of an interface a failed start removes
// (one adopted from a run that crashed, which still carries the mesh's
// traffic) are held first, and stay held once it is gone.
func TestHoldLinkRoutes(t *testing.T) {
	inNewNetns(t, func() {
		wg := addVeth(t, "wgy0")
		if wg == nil {
			return
		}
		lc := &linkConfig{name: "wgy0", index: wg.Attrs().Index}
		carried := []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16"), netip.MustParsePrefix("2001:db8:77::/48")}
		if err := lc.setRoutes(RouteChange{Add: carried}); err != nil {
			t.Error(err)
			return
		}
		if err := holdLinkRoutes("wgy0"); err != nil {
			t.Error(err)
			return
		}
		if err := deleteLink("wgy0"); err != nil {
			t.Error(err)
			return
		}
		table, err := lc.routes()
		if err != nil {
			t.Error(err)
			return
		}
		slices.SortFunc(table.Held, netip.Prefix.Compare)
		if !slices.Equal(table.Held, carried) {
			t.Errorf("held after the interface went: %v, want %v", table.Held, carried)
		}
		if err := holdLinkRoutes("wgy0"); err != nil {
			t.Errorf("no interface: %v", err)
		}
	})
}
