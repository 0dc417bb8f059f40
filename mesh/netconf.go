package mesh

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
)

// routeProtocol marks the routes skybridge installs (rtnetlink's protocol
// field), so it removes its own routes and never anyone else's.
const routeProtocol = netlink.RouteProtocol(91)

// linkConfig manages the address and routes of a kernel or TUN interface.
type linkConfig struct {
	name  string
	index int
}

// createKernelLink adds a kernel WireGuard interface, or adopts an existing
// one (created reports which). It returns errNoKernelWireGuard when the
// kernel has no WireGuard module.
func createKernelLink(name string, mtu int) (created bool, err error) {
	if l, err := netlink.LinkByName(name); err == nil {
		switch l.Type() {
		case "wireguard":
		case "tuntap":
			return false, fmt.Errorf("interface %s exists and is a TUN device, not kernel WireGuard: %w", name, errExistingTUN)
		default:
			return false, fmt.Errorf("interface %s exists and is a %s, not WireGuard", name, l.Type())
		}
		return false, nil
	}
	err = netlink.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}})
	if errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EINVAL) {
		return false, errNoKernelWireGuard
	}
	if err != nil {
		return false, fmt.Errorf("create WireGuard interface %s: %w", name, err)
	}
	return true, nil
}

// holdLinkRoutes holds, unreachable, every route of ours into the
// interface name (none if it does not exist), as routesAtStop does.
func holdLinkRoutes(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil
	}
	lc := &linkConfig{name: name, index: l.Attrs().Index}
	table, err := lc.routes()
	if err != nil || len(table.Own) == 0 {
		return err
	}
	return lc.setRoutes(RouteChange{Hold: table.Own, Del: table.Own})
}

func deleteLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil
	}
	return netlink.LinkDel(l)
}

// setUpLink gives the interface its overlay address (with the mesh prefix
// length, so the whole overlay range routes to it), MTU, and brings it up.
func setUpLink(opt DeviceOptions) (*linkConfig, error) {
	l, err := netlink.LinkByName(opt.Name)
	if err != nil {
		return nil, fmt.Errorf("find interface %s: %w", opt.Name, err)
	}
	// An interface taken over (kernel WireGuard, a persistent TUN) may
	// hold the overlay address of an earlier identity: kept, it would
	// stay the primary address, the source of every connection into the
	// mesh, which peers' allowed IPs refuse. Removed first: removing a
	// primary address removes the secondaries of its subnet with it.
	old, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list the addresses of %s: %w", opt.Name, err)
	}
	for _, a := range old {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() != opt.Overlay && opt.MeshPrefix.Contains(ip.Unmap()) {
			// Gone already if it was a secondary address of an earlier
			// one removed before it (promote_secondaries off).
			if err := netlink.AddrDel(l, &a); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) {
				return nil, fmt.Errorf("remove the earlier overlay address %s from %s: %w", ip, opt.Name, err)
			}
		}
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: opt.Overlay.AsSlice(), Mask: net.CIDRMask(opt.MeshPrefix.Bits(), opt.Overlay.BitLen())}}
	if err := netlink.AddrReplace(l, addr); err != nil {
		return nil, fmt.Errorf("set address %s on %s: %w", addr, opt.Name, err)
	}
	if err := netlink.LinkSetMTU(l, opt.MTU); err != nil {
		return nil, fmt.Errorf("set MTU %d on %s: %w", opt.MTU, opt.Name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("bring up %s: %w", opt.Name, err)
	}
	return &linkConfig{name: opt.Name, index: l.Attrs().Index}, nil
}

// routes reads the main table once (the kernel dumps all of it whatever
// the filter, and it may be a full BGP table): skybridge's own routes
// towards the link, and the prefixes routed by routes skybridge did not
// install (the host's LANs, its operator's routes).
func (lc *linkConfig) routes() (RouteTable, error) {
	var rs []netlink.Route
	var err error
	for range 3 { // a table that changed during the dump is read again
		rs, err = netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: syscall.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return RouteTable{}, fmt.Errorf("list the routing table: %w", err)
	}
	t := RouteTable{Host: map[netip.Prefix]bool{}}
	for _, r := range rs {
		switch {
		case r.Dst == nil:
		case r.Protocol != routeProtocol:
			t.Host[prefixOf(*r.Dst)] = true
		case r.Type == syscall.RTN_UNREACHABLE:
			// An unreachable route names no device: its metric says
			// whose it is (another gateway's in this namespace is
			// neither ours nor the host's), and one an earlier run of
			// ours left is ours.
			if uint32(r.Priority) == lc.heldMetric() {
				t.Held = append(t.Held, prefixOf(*r.Dst))
			}
		case r.LinkIndex == lc.index:
			t.Own = append(t.Own, prefixOf(*r.Dst))
		}
	}
	return t, nil
}

// setRoutes installs routes first and removes them after, so that a
// prefix moving between a route into the device (metric 0) and an
// unreachable one (our held metric, behind it) always has one of them:
// the host's other routes never take its traffic meanwhile. Removals name
// the route's metric, which IPv6 matches on where it ignores the type.
//
// A prefix whose new route could not be installed keeps its old one: a
// held prefix freed without the route into the device beside it (IPv6
// off on the link, say) would go out by the host's default route,
// unencrypted; a device route removed without the unreachable one would
// leave it to the host's routes likewise. The next pass tries again.
func (lc *linkConfig) setRoutes(c RouteChange) error {
	var errs []error
	failed := map[netip.Prefix]bool{}
	for _, p := range c.Add {
		if err := netlink.RouteReplace(lc.route(p)); err != nil {
			failed[p] = true
			errs = append(errs, fmt.Errorf("add route %s via %s: %w", p, lc.name, err))
		}
	}
	for _, p := range c.Hold {
		if err := netlink.RouteReplace(lc.heldRoute(p)); err != nil {
			failed[p] = true
			errs = append(errs, fmt.Errorf("hold route %s (unreachable): %w", p, err))
		}
	}
	for _, p := range c.Del {
		if failed[p] {
			continue
		}
		if err := netlink.RouteDel(lc.route(p)); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("remove route %s: %w", p, err))
		}
	}
	for _, p := range c.Unhold {
		if failed[p] {
			continue
		}
		if err := netlink.RouteDel(lc.heldRoute(p)); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("remove held route %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

func (lc *linkConfig) route(p netip.Prefix) *netlink.Route {
	n := ipNets([]netip.Prefix{p})[0]
	return &netlink.Route{LinkIndex: lc.index, Dst: &n, Protocol: routeProtocol, Scope: netlink.SCOPE_LINK, Type: syscall.RTN_UNICAST}
}

// heldRoute is an unreachable route: the kernel answers "no route to
// host" at once, to a local connection as to a forwarded packet (an
// ICMP error), where a route into a wireguard-go device with no peer for
// the address would drop the packets in silence and leave connections
// hanging.
func (lc *linkConfig) heldRoute(p netip.Prefix) *netlink.Route {
	n := ipNets([]netip.Prefix{p})[0]
	return &netlink.Route{Dst: &n, Protocol: routeProtocol, Type: syscall.RTN_UNREACHABLE, Table: syscall.RT_TABLE_MAIN, Priority: int(lc.heldMetric())}
}

// heldMetric is the metric of the gateway's unreachable routes: derived
// from its interface's name, the same at every run (a TUN device's index
// is not) and another for another gateway of this namespace, each of
// which holds and frees its own. Behind a route into the device (metric
// 0) for the same prefix, and far from the small metrics hosts use.
func (lc *linkConfig) heldMetric() uint32 {
	h := fnv.New32a()
	h.Write([]byte(lc.name))
	return heldMetricBase | h.Sum32()&0xffffff
}

const heldMetricBase = 0x5b000000 // 0x5b: skybridge's protocol number, 91
