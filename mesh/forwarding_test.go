package mesh

import (
	"bytes"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestForwardingNeeded(t *testing.T) {
	v4mesh, v6mesh := netip.MustParsePrefix("10.99.0.0/16"), netip.MustParsePrefix("fd00:99::/48")
	site4, site6 := netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("fd00:1::/64")
	for _, c := range []struct {
		name     string
		topology string
		mesh     netip.Prefix
		routes   []netip.Prefix
		v4, v6   bool
	}{
		{"full mesh, no networks behind", TopologyFullMesh, v4mesh, nil, false, false},
		{"full mesh, an IPv4 site", TopologyFullMesh, v4mesh, []netip.Prefix{site4}, true, false},
		{"full mesh, an IPv6 site on an IPv4 overlay", TopologyFullMesh, v4mesh, []netip.Prefix{site6}, false, true},
		{"hub, no networks behind: relays the overlay", TopologyHub, v4mesh, nil, true, false},
		{"hub on an IPv6 overlay", TopologyHub, v6mesh, nil, false, true},
		{"hub, both families", TopologyHub, v6mesh, []netip.Prefix{site4}, true, true},
	} {
		v4, v6 := forwardingNeeded(c.topology, c.mesh, c.routes)
		if v4 != c.v4 || v6 != c.v6 {
			t.Errorf("%s: IPv4 %v, IPv6 %v; want %v, %v", c.name, v4, v6, c.v4, c.v6)
		}
	}
}

// fakeProcNet points procNet at a directory holding the two sysctls.
func fakeProcNet(t *testing.T, v4, v6 string) {
	t.Helper()
	dir := t.TempDir()
	for rel, v := range map[string]string{"ipv4/ip_forward": v4, "ipv6/conf/all/forwarding": v6} {
		if v == "" {
			continue // unreadable
		}
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := procNet
	procNet = dir
	t.Cleanup(func() { procNet = old })
}

func TestForwardingOff(t *testing.T) {
	for _, c := range []struct {
		name           string
		v4, v6         string // the sysctls' values; "": unreadable
		needV4, needV6 bool
		want           []string
	}{
		{"both off, both needed", "0", "0", true, true, []string{"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"}},
		{"IPv4 off, only IPv6 needed", "0", "1", false, true, nil},
		{"IPv6 off, needed", "1", "0", true, true, []string{"net.ipv6.conf.all.forwarding"}},
		{"both on", "1", "1", true, true, nil},
		{"unreadable", "", "", true, true, nil},
	} {
		fakeProcNet(t, c.v4, c.v6)
		if got := forwardingOff(c.needV4, c.needV6); !slices.Equal(got, c.want) {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

func TestWarnForwarding(t *testing.T) {
	fakeProcNet(t, "0", "1")
	mesh4 := netip.MustParsePrefix("10.99.0.0/16")
	for _, c := range []struct {
		name     string
		mode     string
		topology string
		routes   []netip.Prefix
		warned   bool
	}{
		{"TUN hub", ModeTUN, TopologyHub, nil, true},
		{"kernel, full mesh, a site behind", ModeKernel, TopologyFullMesh, []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}, true},
		{"TUN, full mesh, nothing behind", ModeTUN, TopologyFullMesh, nil, false},
		{"TUN, full mesh, an IPv6 site (forwarded)", ModeTUN, TopologyFullMesh, []netip.Prefix{netip.MustParsePrefix("fd00:1::/64")}, false},
		{"netstack hub: no host stack", ModeNetstack, TopologyHub, nil, false},
	} {
		var buf bytes.Buffer
		g := &Gateway{s: &Settings{Mode: c.mode, Topology: c.topology}, log: slog.New(slog.NewTextHandler(&buf, nil))}
		g.warnForwarding(mesh4, c.routes)
		if got := strings.Contains(buf.String(), "IP forwarding is off") && strings.Contains(buf.String(), "net.ipv4.ip_forward"); got != c.warned {
			t.Errorf("%s: warned %v, want %v; log: %s", c.name, got, c.warned, buf.String())
		}
	}
}
