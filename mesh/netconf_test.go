package mesh

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
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

// TestRoutesLeaveTheHostsAlone: a remote site's route to a network this
// host already routes (one of its LANs) is not put in the kernel's table
// over the host's own, at any metric, and the reconcile says why; routes
// of skybridge's own are added, and taken over from a link since gone.
func TestRoutesLeaveTheHostsAlone(t *testing.T) {
	inNewNetns(t, func() {
		veth := func(name string) netlink.Link {
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
		lan, wg := veth("lan0"), veth("wg0")
		if lan == nil || wg == nil {
			return
		}
		// The host's LAN (connected route, metric 0), and another
		// network it routes there at metric 100.
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
		lanNet, remote := netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("198.51.100.0/24")
		err := lc.setRoutes([]netip.Prefix{lanNet, netip.MustParsePrefix("203.0.113.0/24"), remote}, nil)
		if err == nil || !strings.Contains(err.Error(), "routes 192.0.2.0/24 elsewhere already") || !strings.Contains(err.Error(), "routes 203.0.113.0/24 elsewhere already") {
			t.Errorf("routes over the host's own: %v; want both refused, saying why", err)
		}
		got, err := lc.routes()
		if err != nil || len(got) != 1 || got[0] != remote {
			t.Errorf("skybridge's routes: %v, %v; want only %s", got, err, remote)
		}
		rs, _ := netlink.RouteGet(net.ParseIP("192.0.2.7"))
		if len(rs) != 1 || rs[0].LinkIndex != lan.Attrs().Index {
			t.Errorf("the host's LAN is routed %+v, want through lan0", rs)
		}
		// A route of ours on a link since replaced is taken over.
		wg2 := veth("wg1")
		if wg2 == nil {
			return
		}
		lc2 := &linkConfig{name: "wg1", index: wg2.Attrs().Index}
		if err := lc2.setRoutes([]netip.Prefix{remote}, nil); err != nil {
			t.Errorf("our own route, moved to a new link: %v", err)
		}
		if got, err := lc2.routes(); err != nil || len(got) != 1 || got[0] != remote {
			t.Errorf("routes of the new link: %v, %v", got, err)
		}
	})
}

// TestSplitRouteConflicts: routes left alone because the host routes them
// are told apart from failures, which alone fail a reconcile.
func TestSplitRouteConflicts(t *testing.T) {
	boom := errors.New("netlink: boom")
	rest, conflicts := splitRouteConflicts(errors.Join(&RouteConflict{Prefix: netip.MustParsePrefix("192.0.2.0/24")}, fmt.Errorf("add route: %w", boom)))
	if !errors.Is(rest, boom) || len(conflicts) != 1 || !strings.Contains(conflicts[0], "192.0.2.0/24") {
		t.Fatalf("a conflict and a failure: %v, %q", rest, conflicts)
	}
	if rest, conflicts := splitRouteConflicts(errors.Join(&RouteConflict{Prefix: netip.MustParsePrefix("192.0.2.0/24")})); rest != nil || len(conflicts) != 1 {
		t.Fatalf("a conflict alone: %v, %q; want no failure", rest, conflicts)
	}
	if rest, conflicts := splitRouteConflicts(nil); rest != nil || conflicts != nil {
		t.Fatalf("nothing: %v, %q", rest, conflicts)
	}
}
