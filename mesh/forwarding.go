package mesh

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
)

// forwardingNeeded says which IP families this gateway forwards: those
// of its site's networks, which it routes between the site and the
// tunnels, and in the hub topology the overlay's, which a hub relays from
// one tunnel to another. Any gateway of a site may become its hub, so a
// non-hub needs it as much.
func forwardingNeeded(topology string, meshPrefix netip.Prefix, routes []netip.Prefix) (v4, v6 bool) {
	if topology == TopologyHub && meshPrefix.IsValid() {
		v4, v6 = meshPrefix.Addr().Is4(), meshPrefix.Addr().Is6()
	}
	for _, p := range routes {
		v4, v6 = v4 || p.Addr().Is4(), v6 || p.Addr().Is6()
	}
	return v4, v6
}

// procNet is where the host's network sysctls are read; tests point it
// elsewhere.
var procNet = "/proc/sys/net"

// forwardingOff names the sysctls, of the families asked for, that keep
// this host from forwarding. One it cannot read is not named: it says
// nothing about forwarding, and a gateway does not fail on it.
func forwardingOff(v4, v6 bool) []string {
	var off []string
	check := func(name, rel string) {
		b, err := os.ReadFile(filepath.Join(procNet, rel))
		if err == nil && string(bytes.TrimSpace(b)) == "0" {
			off = append(off, name)
		}
	}
	if v4 {
		check("net.ipv4.ip_forward", "ipv4/ip_forward")
	}
	if v6 {
		check("net.ipv6.conf.all.forwarding", "ipv6/conf/all/forwarding")
	}
	return off
}

// warnForwarding warns when the host forwards none of what this gateway
// routes: the kernel drops it without a word, and the mesh looks up, its
// tunnels handshaking, while the site's traffic goes nowhere. skybridge
// does not turn forwarding on itself: it is the host's to decide, and a
// firewall set up around it may expect it off.
func (g *Gateway) warnForwarding(meshPrefix netip.Prefix, routes []netip.Prefix) {
	if g.s.Mode == ModeNetstack || g.opt.device != nil {
		return // no host stack routes for it
	}
	if off := forwardingOff(forwardingNeeded(g.s.Topology, meshPrefix, routes)); len(off) > 0 {
		why := "its site's networks"
		if g.s.Topology == TopologyHub {
			why = "its site's networks and, should it be its site's hub (any gateway may become it), the site's other gateways"
		}
		g.log.Warn("IP forwarding is off on this host: the kernel drops the packets this gateway should route for "+why+
			"; turn it on (sysctl -w NAME=1, and a file in /etc/sysctl.d/ to keep it across reboots)", "off", off)
	}
}
