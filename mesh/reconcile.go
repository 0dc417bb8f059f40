package mesh

import (
	"net"
	"net/netip"
	"slices"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
)

// Changes summarises what a reconcile did, for logs and metrics.
type Changes struct {
	Added, Removed, Updated []string // peer nodes (or public keys of unknown peers)
	RoutesAdded             []netip.Prefix
	RoutesRemoved           []netip.Prefix
	RoutesHeld, RoutesFreed []netip.Prefix // unreachable routes (Plan.Held)
}

// Empty reports whether nothing changed.
func (c Changes) Empty() bool {
	return len(c.Added)+len(c.Removed)+len(c.Updated)+len(c.RoutesAdded)+len(c.RoutesRemoved)+len(c.RoutesHeld)+len(c.RoutesFreed) == 0
}

// DiffPeers computes the device change that turns the peers the device has
// into the plan's, and nothing more: peers that are already right are not
// mentioned, so their sessions, handshakes and counters survive (the
// reason the reconciler never uses ReplacePeers).
//
// lastApplied is the plan applied last time (by public key). An endpoint is
// only written when the plan's differs from what we last wrote or the
// device has none: WireGuard updates a peer's endpoint itself when the peer
// roams, and overwriting that with the advertised one on every pass would
// fight it.
func DiffPeers(current []wgtypes.Peer, plan []PeerConfig, lastApplied map[certs.WGPublicKey]PeerConfig) ([]wgtypes.PeerConfig, Changes) {
	var (
		out []wgtypes.PeerConfig
		ch  Changes
	)
	have := make(map[certs.WGPublicKey]*wgtypes.Peer, len(current))
	for i := range current {
		have[certs.WGPublicKey(current[i].PublicKey)] = &current[i]
	}
	want := make(map[certs.WGPublicKey]bool, len(plan))
	for _, pc := range plan {
		want[pc.PublicKey] = true
		cur, ok := have[pc.PublicKey]
		if !ok {
			out = append(out, newPeer(pc))
			ch.Added = append(ch.Added, pc.Node)
			continue
		}
		upd := wgtypes.PeerConfig{PublicKey: wgtypes.Key(pc.PublicKey), UpdateOnly: true}
		changed := false
		if pc.Endpoint.IsValid() && (cur.Endpoint == nil || lastApplied[pc.PublicKey].Endpoint != pc.Endpoint) && !sameEndpoint(cur.Endpoint, pc.Endpoint) {
			upd.Endpoint, changed = udpAddr(pc.Endpoint), true
		}
		if cur.PersistentKeepaliveInterval != pc.Keepalive {
			upd.PersistentKeepaliveInterval, changed = ptr(pc.Keepalive), true
		}
		if !samePrefixes(cur.AllowedIPs, pc.AllowedIPs) {
			upd.ReplaceAllowedIPs, upd.AllowedIPs, changed = true, ipNets(pc.AllowedIPs), true
		}
		if changed {
			out = append(out, upd)
			ch.Updated = append(ch.Updated, pc.Node)
		}
	}
	for _, p := range current {
		k := certs.WGPublicKey(p.PublicKey)
		if want[k] {
			continue
		}
		out = append(out, wgtypes.PeerConfig{PublicKey: p.PublicKey, Remove: true})
		name := lastApplied[k].Node
		if name == "" {
			name = k.String()
		}
		ch.Removed = append(ch.Removed, name)
	}
	return out, ch
}

// newPeer is the configuration that adds pc to a device.
func newPeer(pc PeerConfig) wgtypes.PeerConfig {
	return wgtypes.PeerConfig{
		PublicKey:                   wgtypes.Key(pc.PublicKey),
		Endpoint:                    udpAddr(pc.Endpoint),
		PersistentKeepaliveInterval: ptr(pc.Keepalive),
		ReplaceAllowedIPs:           true,
		AllowedIPs:                  ipNets(pc.AllowedIPs),
	}
}

// DiffRoutes returns the routes to add and to remove so that the routes
// skybridge installed become want.
// It runs at every pass, the plan reused or not: sets, not a scan of one
// list per entry of the other (a thousand gateways of 32 routes each
// took most of a second).
func DiffRoutes(have, want []netip.Prefix) (add, del []netip.Prefix) {
	haveSet := make(map[netip.Prefix]struct{}, len(have))
	for _, h := range have {
		haveSet[h] = struct{}{}
	}
	wantSet := make(map[netip.Prefix]struct{}, len(want))
	for _, w := range want {
		wantSet[w] = struct{}{}
		if _, ok := haveSet[w]; !ok {
			add = append(add, w)
		}
	}
	for _, h := range have {
		if _, ok := wantSet[h]; !ok {
			del = append(del, h)
		}
	}
	return add, del
}

func ptr[T any](v T) *T { return &v }

func udpAddr(ap netip.AddrPort) *net.UDPAddr {
	if !ap.IsValid() {
		return nil
	}
	return net.UDPAddrFromAddrPort(ap)
}

func sameEndpoint(a *net.UDPAddr, b netip.AddrPort) bool {
	if a == nil {
		return !b.IsValid()
	}
	ap := a.AddrPort()
	return ap.Addr().Unmap() == b.Addr().Unmap() && ap.Port() == b.Port()
}

func ipNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, len(ps))
	for i, p := range ps {
		out[i] = net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	return out
}

func prefixOf(n net.IPNet) netip.Prefix {
	a, _ := netip.AddrFromSlice(n.IP)
	ones, bits := n.Mask.Size()
	if bits == 32 {
		a = a.Unmap() // net keeps IPv4 addresses in 16 bytes
	}
	return netip.PrefixFrom(a, ones)
}

func samePrefixes(have []net.IPNet, want []netip.Prefix) bool {
	if len(have) != len(want) {
		return false
	}
	for _, n := range have {
		if !slices.Contains(want, prefixOf(n)) {
			return false
		}
	}
	return true
}

// leaveOutHostRoutes takes out of a plan the routes the host routes
// itself (host: see Device.HostRoutes), from the kernel routes and from
// the allowed IPs of the peer that carries each, and returns them too.
// The plan's slices are not changed: new ones are made where needed.
func leaveOutHostRoutes(peers []PeerConfig, routes []netip.Prefix, host map[netip.Prefix]bool) ([]PeerConfig, []netip.Prefix, []netip.Prefix) {
	var left []netip.Prefix
	for _, r := range routes {
		if host[r] {
			left = append(left, r)
		}
	}
	if len(left) == 0 {
		return peers, routes, nil
	}
	out := slices.Clone(peers)
	for i := range out {
		if slices.ContainsFunc(out[i].AllowedIPs, func(p netip.Prefix) bool { return slices.Contains(left, p) }) {
			out[i].AllowedIPs = slices.DeleteFunc(slices.Clone(out[i].AllowedIPs), func(p netip.Prefix) bool { return slices.Contains(left, p) })
		}
	}
	return out, slices.DeleteFunc(slices.Clone(routes), func(p netip.Prefix) bool { return host[p] }), left
}
