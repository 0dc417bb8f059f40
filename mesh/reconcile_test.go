package mesh

import (
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
)

func key(b byte) certs.WGPublicKey { var k certs.WGPublicKey; k[0] = b; return k }

func devPeer(k byte, endpoint string, keepalive time.Duration, ips ...string) wgtypes.Peer {
	p := wgtypes.Peer{PublicKey: wgtypes.Key(key(k)), PersistentKeepaliveInterval: keepalive}
	if endpoint != "" {
		p.Endpoint = net.UDPAddrFromAddrPort(netip.MustParseAddrPort(endpoint))
	}
	for _, ip := range ips {
		p.AllowedIPs = append(p.AllowedIPs, ipNets([]netip.Prefix{netip.MustParsePrefix(ip)})...)
	}
	return p
}

func planPeer(node string, k byte, endpoint string, keepalive time.Duration, ips ...string) PeerConfig {
	pc := PeerConfig{Node: node, PublicKey: key(k), Keepalive: keepalive}
	if endpoint != "" {
		pc.Endpoint = netip.MustParseAddrPort(endpoint)
	}
	for _, ip := range ips {
		pc.AllowedIPs = append(pc.AllowedIPs, netip.MustParsePrefix(ip))
	}
	return pc
}

func TestDiffPeers(t *testing.T) {
	a := planPeer("a", 1, "192.0.2.1:51820", 0, "100.96.0.1/32", "10.1.0.0/16")
	b := planPeer("b", 2, "192.0.2.2:51820", 0, "100.96.0.2/32")
	devA := devPeer(1, "192.0.2.1:51820", 0, "10.1.0.0/16", "100.96.0.1/32") // order differs: still equal
	devB := devPeer(2, "192.0.2.2:51820", 0, "100.96.0.2/32")
	last := map[certs.WGPublicKey]PeerConfig{key(1): a, key(2): b}

	tests := []struct {
		name                    string
		current                 []wgtypes.Peer
		plan                    []PeerConfig
		last                    map[certs.WGPublicKey]PeerConfig
		added, removed, updated []string
		check                   func(t *testing.T, cfg []wgtypes.PeerConfig)
	}{
		{name: "in sync: nothing to do", current: []wgtypes.Peer{devA, devB}, plan: []PeerConfig{a, b}, last: last},
		{name: "new peer", current: []wgtypes.Peer{devA}, plan: []PeerConfig{a, b}, last: last, added: []string{"b"},
			check: func(t *testing.T, cfg []wgtypes.PeerConfig) {
				if cfg[0].Remove || !cfg[0].ReplaceAllowedIPs || cfg[0].Endpoint == nil || len(cfg[0].AllowedIPs) != 1 {
					t.Errorf("add config %+v", cfg[0])
				}
			}},
		{name: "dead peer removed, the other untouched", current: []wgtypes.Peer{devA, devB}, plan: []PeerConfig{a}, last: last, removed: []string{"b"},
			check: func(t *testing.T, cfg []wgtypes.PeerConfig) {
				if len(cfg) != 1 || !cfg[0].Remove || cfg[0].PublicKey != wgtypes.Key(key(2)) {
					t.Errorf("config %+v", cfg)
				}
			}},
		{name: "unknown peer on the device is removed by key", current: []wgtypes.Peer{devA, devPeer(9, "", 0)}, plan: []PeerConfig{a}, last: last, removed: []string{key(9).String()}},
		{name: "allowed IPs changed", current: []wgtypes.Peer{devA}, plan: []PeerConfig{planPeer("a", 1, "192.0.2.1:51820", 0, "100.96.0.1/32")}, last: last, updated: []string{"a"},
			check: func(t *testing.T, cfg []wgtypes.PeerConfig) {
				if !cfg[0].UpdateOnly || !cfg[0].ReplaceAllowedIPs || cfg[0].Endpoint != nil || cfg[0].PersistentKeepaliveInterval != nil {
					t.Errorf("update touches more than allowed IPs: %+v", cfg[0])
				}
			}},
		{name: "keepalive changed", current: []wgtypes.Peer{devA}, plan: []PeerConfig{planPeer("a", 1, "192.0.2.1:51820", Keepalive, "100.96.0.1/32", "10.1.0.0/16")}, last: last, updated: []string{"a"}},
		{name: "peer roamed: its learned endpoint is left alone", current: []wgtypes.Peer{devPeer(1, "203.0.113.9:40000", 0, "100.96.0.1/32", "10.1.0.0/16")}, plan: []PeerConfig{a}, last: last},
		{name: "advertised endpoint changed: written", current: []wgtypes.Peer{devA}, plan: []PeerConfig{planPeer("a", 1, "198.51.100.1:51820", 0, "100.96.0.1/32", "10.1.0.0/16")}, last: last, updated: []string{"a"},
			check: func(t *testing.T, cfg []wgtypes.PeerConfig) {
				if cfg[0].Endpoint == nil || cfg[0].Endpoint.String() != "198.51.100.1:51820" {
					t.Errorf("endpoint %v", cfg[0].Endpoint)
				}
			}},
		{name: "device lost the endpoint: written", current: []wgtypes.Peer{devPeer(1, "", 0, "100.96.0.1/32", "10.1.0.0/16")}, plan: []PeerConfig{a}, last: last, updated: []string{"a"}},
		{name: "everything gone", current: []wgtypes.Peer{devA, devB}, plan: nil, last: last, removed: []string{"a", "b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, ch := DiffPeers(tt.current, tt.plan, tt.last)
			if !slices.Equal(ch.Added, tt.added) || !slices.Equal(ch.Removed, tt.removed) || !slices.Equal(ch.Updated, tt.updated) {
				t.Fatalf("changes %+v, want added %v removed %v updated %v", ch, tt.added, tt.removed, tt.updated)
			}
			if len(cfg) != len(tt.added)+len(tt.removed)+len(tt.updated) {
				t.Fatalf("%d peer configs for %d changes", len(cfg), len(tt.added)+len(tt.removed)+len(tt.updated))
			}
			if tt.check != nil {
				tt.check(t, cfg)
			}
		})
	}
}

func TestDiffRoutes(t *testing.T) {
	p := netip.MustParsePrefix
	add, del := DiffRoutes([]netip.Prefix{p("10.1.0.0/16"), p("10.2.0.0/16")}, []netip.Prefix{p("10.2.0.0/16"), p("10.3.0.0/16")})
	if !slices.Equal(add, []netip.Prefix{p("10.3.0.0/16")}) || !slices.Equal(del, []netip.Prefix{p("10.1.0.0/16")}) {
		t.Fatalf("add %v del %v", add, del)
	}
	if add, del := DiffRoutes(nil, nil); add != nil || del != nil {
		t.Fatal("empty diff not empty")
	}
}

// TestPrefixOf: what the device and the kernel report reads back as the
// prefix that was configured: IPv4 networks (which net keeps in 16
// bytes) as IPv4, IPv6 ones as they are, IPv4-mapped included.
func TestPrefixOf(t *testing.T) {
	for _, p := range []string{"10.9.0.0/16", "100.96.0.7/32", "fd00:1::/48", "::ffff:10.9.0.0/112"} {
		want := netip.MustParsePrefix(p)
		if got := prefixOf(ipNets([]netip.Prefix{want})[0]); got != want {
			t.Errorf("%s read back as %s", want, got)
		}
	}
	// net's own IPv4 form: 16-byte address, 4-byte mask.
	if got := prefixOf(net.IPNet{IP: net.ParseIP("10.9.0.0"), Mask: net.CIDRMask(16, 32)}); got != netip.MustParsePrefix("10.9.0.0/16") {
		t.Errorf("an IPv4 network in 16 bytes read back as %s", got)
	}
}
