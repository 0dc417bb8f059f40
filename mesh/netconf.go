package mesh

import (
	"errors"
	"fmt"
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
		if l.Type() != "wireguard" {
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

func (lc *linkConfig) routes() ([]netip.Prefix, error) {
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{LinkIndex: lc.index, Protocol: routeProtocol},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("list routes of %s: %w", lc.name, err)
	}
	out := make([]netip.Prefix, 0, len(rs))
	for _, r := range rs {
		if r.Dst != nil {
			out = append(out, prefixOf(*r.Dst))
		}
	}
	return out, nil
}

func (lc *linkConfig) setRoutes(add, del []netip.Prefix) error {
	var errs []error
	for _, p := range del {
		if err := netlink.RouteDel(lc.route(p)); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("remove route %s: %w", p, err))
		}
	}
	for _, p := range add {
		// A route the kernel or the operator has to that network, at any
		// metric (a LAN of this host that a remote site also claims), is
		// theirs: replacing it, or outranking it, would take the host's
		// traffic there into the mesh. One of ours (on a link since
		// replaced) is taken over.
		foreign, err := lc.foreignRoute(p)
		switch {
		case err != nil:
		case foreign:
			errs = append(errs, &RouteConflict{Prefix: p})
			continue
		default:
			err = netlink.RouteReplace(lc.route(p))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("add route %s via %s: %w", p, lc.name, err))
		}
	}
	return errors.Join(errs...)
}

// RouteConflict is a remote site's route that the host routes elsewhere
// already: left alone, it is no failure of the reconcile.
type RouteConflict struct{ Prefix netip.Prefix }

func (e *RouteConflict) Error() string {
	return fmt.Sprintf("this host routes %s elsewhere already (not a route of skybridge's): traffic to it is not sent into the mesh; keep that network out of the mesh, or remove the host's route", e.Prefix)
}

// splitRouteConflicts separates the route conflicts SetRoutes reported
// from its failures.
func splitRouteConflicts(err error) (rest error, conflicts []string) {
	var errs []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	} else if err != nil {
		errs = []error{err}
	}
	var others []error
	for _, e := range errs {
		if rc := (*RouteConflict)(nil); errors.As(e, &rc) {
			conflicts = append(conflicts, rc.Error())
			continue
		}
		others = append(others, e)
	}
	return errors.Join(others...), conflicts
}

// foreignRoute reports whether the main table has a route to exactly p
// that skybridge did not install.
func (lc *linkConfig) foreignRoute(p netip.Prefix) (bool, error) {
	n := ipNets([]netip.Prefix{p})[0]
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Dst: &n, Table: syscall.RT_TABLE_MAIN}, netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("list routes to %s: %w", p, err)
	}
	for _, r := range rs {
		if r.Protocol != routeProtocol {
			return true, nil
		}
	}
	return false, nil
}

func (lc *linkConfig) route(p netip.Prefix) *netlink.Route {
	n := ipNets([]netip.Prefix{p})[0]
	return &netlink.Route{LinkIndex: lc.index, Dst: &n, Protocol: routeProtocol, Scope: netlink.SCOPE_LINK}
}
