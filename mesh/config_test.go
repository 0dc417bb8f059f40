package mesh

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

const goodConfig = `state_dir = "/var/lib/skybridge"
node {
  name         = "gw1"
  site         = "onprem-zrh"
  region       = "zrh-dc1"
  provider     = "onprem"
  jurisdiction = "CH"
  overlay_ip   = "100.96.0.1"
}
identity {
  dir = "/var/lib/skybridge/identity"
}
gossip {
  bind  = "192.0.2.1:7946"
  seeds = ["198.51.100.1", "203.0.113.1:7000"]
}
wireguard {
  interface = "sb0"
}
`

func writeConfig(t *testing.T, src string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "gateway.hcl")
	os.WriteFile(p, []byte(src), 0o644)
	return p
}

func TestLoadConfigDefaults(t *testing.T) {
	s, err := LoadConfig(writeConfig(t, goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	if s.Mode != ModeAuto || s.Port != DefaultWireGuardPort || s.MTU != DefaultMTU || s.Topology != TopologyFullMesh || s.GossipProfile != "lan" {
		t.Errorf("defaults: %+v", s)
	}
	if s.GossipAdvertise != s.GossipBind || len(s.Endpoints) != 1 || s.Endpoints[0].String() != "192.0.2.1:51820" {
		t.Errorf("advertise %s, endpoints %v", s.GossipAdvertise, s.Endpoints)
	}
	if s.ControlSocket != "/var/lib/skybridge/control.sock" {
		t.Errorf("control socket %s", s.ControlSocket)
	}
	if s.OperatorAddr.String() != "127.0.0.1:7480" || s.OperatorOverlay || s.OperatorTokenFile != "/var/lib/skybridge/operator.token" {
		t.Errorf("operator endpoint %s (overlay %v), token %s; want loopback 7480 and a token in the state directory", s.OperatorAddr, s.OperatorOverlay, s.OperatorTokenFile)
	}
}

// TestSeedsCarryTheirPort: a seed given without a port is at the port the
// gateway binds, where memberlist has always dialled it (a mesh on another
// port than 7946 wrote its seeds bare), and is kept with it, so that rejoin
// rounds knock where joins go.
func TestSeedsCarryTheirPort(t *testing.T) {
	s, err := LoadConfig(writeConfig(t, strings.Replace(goodConfig, `bind  = "192.0.2.1:7946"`, `bind  = "192.0.2.1:7000"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"198.51.100.1:7000", "203.0.113.1:7000"}; !slices.Equal(s.Seeds, want) {
		t.Errorf("seeds %q; want %q", s.Seeds, want)
	}
}

// TestAdvertiseWithoutPort: an advertise address without a port is
// reached on the port bound, which is where memberlist listens; the
// default port had peers knock where nothing answers.
func TestAdvertiseWithoutPort(t *testing.T) {
	s, err := LoadConfig(writeConfig(t, strings.Replace(goodConfig, `bind  = "192.0.2.1:7946"`, "bind  = \"0.0.0.0:7950\"\n  advertise = \"192.0.2.1\"", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if s.GossipAdvertise.String() != "192.0.2.1:7950" {
		t.Errorf("advertise %s; want 192.0.2.1:7950", s.GossipAdvertise)
	}
}

// TestParseAddrPortIPv6: an IPv6 address without brackets is refused
// unless no port can hide in its last group: 2001:db8::1:7946 was taken as
// an address, and the gateway advertised, or dialled, one nobody holds.
func TestParseAddrPortIPv6(t *testing.T) {
	for in, want := range map[string]string{
		"[2001:db8::1]:7000":    "[2001:db8::1]:7000",
		"[2001:db8::1]":         "[2001:db8::1]:7946",
		"::":                    "[::]:7946",
		"2001:db8::":            "[2001:db8::]:7946",
		"[::ffff:192.0.2.1]":    "192.0.2.1:7946",
		"::ffff:192.0.2.1":      "192.0.2.1:7946",
		"64:ff9b::192.0.2.1":    "[64:ff9b::c000:201]:7946",
		"192.0.2.1":             "192.0.2.1:7946",
		"2001:db8::1:7946":      "",
		"2001:db8::1":           "",
		"[192.0.2.1]":           "",
		"[2001:db8::1":          "",
		"2001:db8::1]":          "",
		"[[2001:db8::1]]":       "",
		"[2001:db8::1]:":        "",
		"[2001:db8::1]:7946:46": "",
	} {
		ap, err := parseAddrPort(in, DefaultGossipPort)
		switch {
		case want == "" && err == nil:
			t.Errorf("%q: taken as %s; want it refused", in, ap)
		case want == "" && strings.Count(in, ":") > 1 && !strings.ContainsAny(in, "[]") && !strings.Contains(err.Error(), "brackets"):
			t.Errorf("%q: %v; want it told to use brackets", in, err)
		case want != "" && (err != nil || ap.String() != want):
			t.Errorf("%q: %s, %v; want %s", in, ap, err, want)
		}
	}
	_, err := LoadConfig(writeConfig(t, strings.Replace(goodConfig, `bind  = "192.0.2.1:7946"`, "bind  = \"[::]:7946\"\n  advertise = \"2001:db8:a::1:7946\"", 1)))
	if err == nil || !strings.Contains(err.Error(), "[2001:db8:a::1:7946]:7946") {
		t.Errorf("an advertise address without brackets: %v; want it refused, with the bracketed forms", err)
	}
	// A bind refused is one mistake: the bare seeds, valid, are not
	// refused with it for "port 0".
	_, err = LoadConfig(writeConfig(t, strings.Replace(goodConfig, `bind  = "192.0.2.1:7946"`, `bind  = "2001:db8::5"`, 1)))
	if err == nil || strings.Contains(err.Error(), "port 0") {
		t.Errorf("a bind without brackets: %v; want it refused, and the seeds not", err)
	}
}

func TestLoadConfigOperator(t *testing.T) {
	for _, tc := range []struct {
		block   string
		addr    string
		overlay bool
		token   string
	}{
		{`operator { listen = "off" }`, "invalid AddrPort", false, ""},
		{`operator { listen = "overlay:9100" }`, "0.0.0.0:9100", true, "/var/lib/skybridge/operator.token"},
		{`operator { listen = "[::1]:9100" }`, "[::1]:9100", false, "/var/lib/skybridge/operator.token"},
		{"operator {\n  listen = \"127.0.0.2\"\n  token_file = \"/etc/skybridge/token\"\n}", "127.0.0.2:7480", false, "/etc/skybridge/token"},
	} {
		s, err := LoadConfig(writeConfig(t, goodConfig+tc.block+"\n"))
		if err != nil {
			t.Fatalf("%s: %v", tc.block, err)
		}
		if s.OperatorAddr.String() != tc.addr || s.OperatorOverlay != tc.overlay || s.OperatorTokenFile != tc.token {
			t.Errorf("%s: address %s overlay %v token %q; want %s %v %q", tc.block, s.OperatorAddr, s.OperatorOverlay, s.OperatorTokenFile, tc.addr, tc.overlay, tc.token)
		}
	}
}

func TestLoadConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name, old, new, want string
	}{
		{"bad bind", `bind  = "192.0.2.1:7946"`, `bind  = "somewhere"`, ":14:3: bind: \"somewhere\" is not an address"},
		{"unspecified advertise", `bind  = "192.0.2.1:7946"`, `bind  = "0.0.0.0:7946"`, "advertise: gateways cannot reach 0.0.0.0:7946"},
		{"bad seed", `"198.51.100.1"`, `"seed.example"`, ":15:3: seeds: \"seed.example\""},
		{"bad mode", `interface = "sb0"`, "interface = \"sb0\"\n  mode = \"userspace\"", ":19:3: mode: \"userspace\" is not auto"},
		{"long interface", `interface = "sb0"`, `interface = "skybridge-interface0"`, ":18:3: interface:"},
		{"bad mtu", `interface = "sb0"`, "interface = \"sb0\"\n  mtu = 500", "mtu: 500 is outside"},
		{"unknown field", `interface = "sb0"`, "interface = \"sb0\"\n  colour = \"blue\"", ":19:3: Unsupported argument"},
		{"operator on all interfaces", `interface = "sb0"`, "interface = \"sb0\"\n}\noperator {\n  listen = \"0.0.0.0:7480\"", ":21:3: listen: 0.0.0.0:7480 is not a loopback address: the operator endpoint would send its token in clear"},
		{"operator on a LAN address", `interface = "sb0"`, "interface = \"sb0\"\n}\noperator {\n  listen = \"192.0.2.1:7480\"", "use 127.0.0.1:PORT, overlay:PORT"},
		{"operator overlay without port", `interface = "sb0"`, "interface = \"sb0\"\n}\noperator {\n  listen = \"overlay:\"", "the port after overlay: must be 1-65535"},
		{"bad topology", `interface = "sb0"`, "interface = \"sb0\"\n}\ntopology {\n  mode = \"star\"", ":21:3: mode: \"star\""},
		{"interface name with a slash", `interface = "sb0"`, `interface = "sb 0/x"`, ":18:3: interface: \"sb 0/x\": an interface name has 1 to 15 characters, none of them '/'"},
		{"interface name template", `interface = "sb0"`, `interface = "sb%d"`, "interface: \"sb%d\""},
		{"bind on port 0", `bind  = "192.0.2.1:7946"`, `bind  = "192.0.2.1:0"`, "advertise: gateways cannot reach 192.0.2.1:0 (port 0 is no port to reach)"},
		// Port 0 where a port is advertised: the kernel would pick
		// another, where no gateway or burst gateway is sent.
		{"bind on port 0, advertised on a port", `bind  = "192.0.2.1:7946"`, "bind  = \"192.0.2.1:0\"\n  advertise = \"192.0.2.1:7946\"", ":14:3: bind: port 0 lets the kernel pick a port, not the 7946 advertise names"},
		{"bind on port 0, advertised without a port", `bind  = "192.0.2.1:7946"`, "bind  = \"192.0.2.1:0\"\n  advertise = \"192.0.2.1\"", ":14:3: bind: port 0 lets the kernel pick a port, not the port advertised (advertise names none: 7946, the default)"},
		{"enroll listen on port 0", `dir = "/var/lib/skybridge/identity"`, "dir = \"/var/lib/skybridge/identity\"\n  ca_dir = \"/etc/skybridge/ca\"\n}\nenroll {\n  listen = \"192.0.2.1:0\"", ":15:3: listen: port 0 lets the kernel pick a port, which join tokens cannot name"},
		{"enroll listen on port 0, advertised on a port", `dir = "/var/lib/skybridge/identity"`, "dir = \"/var/lib/skybridge/identity\"\n  ca_dir = \"/etc/skybridge/ca\"\n}\nenroll {\n  listen = \"192.0.2.1:0\"\n  advertise = \"192.0.2.1:7947\"", ":15:3: listen: port 0 lets the kernel pick a port, which join tokens cannot name"},
		{"seed on port 0", `"198.51.100.1"`, `"198.51.100.1:0"`, "seeds: \"198.51.100.1:0\": port 0"},
		// What the advert the gateway signs at its start would refuse.
		{"zoned endpoint", `interface = "sb0"`, "interface = \"sb0\"\n  endpoints = [\"[fe80::1%eth0]:51820\"]", ":19:3: endpoints: \"[fe80::1%eth0]:51820\": a zone (%eth0)"},
		{"nine endpoints", `interface = "sb0"`, "interface = \"sb0\"\n  endpoints = [" + strings.Repeat(`"192.0.2.1:51820", `, 9) + "]", ":19:3: endpoints: 9 endpoints: an advert carries at most 8"},
		{"zoned bind", `bind  = "192.0.2.1:7946"`, `bind  = "[fe80::1%eth0]:7946"`, "advertise: gateways cannot reach [fe80::1%eth0]:7946 (a zone (%eth0)"},
		{"zoned advertise", `bind  = "192.0.2.1:7946"`, "bind  = \"192.0.2.1:7946\"\n  advertise = \"[fe80::1%eth0]:7946\"", ":15:3: advertise: gateways cannot reach [fe80::1%eth0]:7946 (a zone (%eth0)"},
		{"zoned seed", `"198.51.100.1"`, `"fe80::1%eth0"`, "seeds: \"fe80::1%eth0\": a zone (%eth0)"},
		{"zoned enroll advertise", `dir = "/var/lib/skybridge/identity"`, "dir = \"/var/lib/skybridge/identity\"\n  ca_dir = \"/etc/skybridge/ca\"\n}\nenroll {\n  advertise = \"[fe80::1%eth0]:7947\"", ":15:3: advertise: join tokens must name an address and port burst gateways can reach (a zone (%eth0)"},
		{"multicast endpoint", `interface = "sb0"`, "interface = \"sb0\"\n  endpoints = [\"224.0.0.1:51820\"]", "endpoints: \"224.0.0.1:51820\": a multicast address"},
		{"unspecified endpoint", `interface = "sb0"`, "interface = \"sb0\"\n  endpoints = [\"0.0.0.0\"]", "endpoints: \"0.0.0.0\": no address to reach"},
		{"empty policy file", `interface = "sb0"`, "interface = \"sb0\"\n}\npolicy {\n  file = \"\"", "file: is empty: name the signed residency policy"},
		{"empty control socket", `interface = "sb0"`, "interface = \"sb0\"\n}\ncontrol {\n  socket = \" \"", "socket: is empty"},
		// Blank paths stay relative: the state would live wherever the
		// gateway was started.
		{"blank state_dir", `state_dir = "/var/lib/skybridge"`, `state_dir = " "`, ":1:1: state_dir: must name the directory"},
		{"blank identity dir", `dir = "/var/lib/skybridge/identity"`, `dir = " "`, ":11:3: dir: is empty"},
		{"blank policy signature", `interface = "sb0"`, "interface = \"sb0\"\n}\npolicy {\n  file = \"p.hcl\"\n  signature = \" \"", ":22:3: signature: is empty"},
		{"blank operator token file", `interface = "sb0"`, "interface = \"sb0\"\n}\noperator {\n  token_file = \"\t\"", ":21:3: token_file: is empty"},
		// A template that rendered nothing where "off" was meant turned
		// the endpoint on at its default.
		{"empty operator listen", `interface = "sb0"`, "interface = \"sb0\"\n}\noperator {\n  listen = \"\"", "listen: is empty"},
		{"empty enroll listen", `dir = "/var/lib/skybridge/identity"`, "dir = \"/var/lib/skybridge/identity\"\n  ca_dir = \"/etc/skybridge/ca\"\n}\nenroll {\n  listen = \"\"", "listen: is empty"},
		{"empty enroll advertise", `dir = "/var/lib/skybridge/identity"`, "dir = \"/var/lib/skybridge/identity\"\n  ca_dir = \"/etc/skybridge/ca\"\n}\nenroll {\n  advertise = \"\"", "advertise: is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := LoadConfig(writeConfig(t, strings.Replace(goodConfig, tc.old, tc.new, 1)))
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "gateway.hcl") {
				t.Fatalf("err = %v, want it to contain %q and the file name", err, tc.want)
			}
		})
	}
}

// TestEndpointsFitTheAdvert: the endpoints a configuration loads with are
// ones the advert the gateway signs at its start carries: those it would
// refuse (a zone, more than it holds) are refused where they are written.
func TestEndpointsFitTheAdvert(t *testing.T) {
	ca, err := certs.InitCA(filepath.Join(t.TempDir(), "ca"), certs.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	id, err := ca.IssueIdentity(certs.Attributes{Node: "gw1", Site: "onprem-zrh", Region: "zrh-dc1", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.96.0.1")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	endpoints := func(n int) string {
		var l []string
		for i := range n {
			l = append(l, fmt.Sprintf("%q", netip.AddrPortFrom(netip.MustParseAddr("2001:db8::1"), uint16(51820+i))))
		}
		return "interface = \"sb0\"\n  endpoints = [" + strings.Join(l, ", ") + "]"
	}
	for _, tc := range []struct {
		name, old, new string
		loads          bool
	}{
		{"eight endpoints", `interface = "sb0"`, endpoints(certs.MaxEndpoints), true},
		{"nine endpoints", `interface = "sb0"`, endpoints(certs.MaxEndpoints + 1), false},
		{"zoned endpoint", `interface = "sb0"`, "interface = \"sb0\"\n  endpoints = [\"[fe80::1%eth0]:51820\"]", false},
		// A zone where the gateway listens is its own business.
		{"zoned bind, advertise without", `bind  = "192.0.2.1:7946"`, "bind  = \"[fe80::1%eth0]:7946\"\n  advertise = \"[2001:db8::1]:7946\"", true},
		{"zoned bind", `bind  = "192.0.2.1:7946"`, `bind  = "[fe80::1%eth0]:7946"`, false},
	} {
		s, err := LoadConfig(writeConfig(t, strings.Replace(goodConfig, tc.old, tc.new, 1)))
		if (err == nil) != tc.loads {
			t.Errorf("%s: loads %v (%v); want %v", tc.name, err == nil, err, tc.loads)
		}
		if err != nil {
			continue
		}
		a := id.Attributes()
		if _, err := certs.SignAdvert(&certs.Advert{Version: 1, Timestamp: time.Now(), Node: a.Node, Site: a.Site, Region: a.Region, Provider: a.Provider,
			Jurisdiction: a.Jurisdiction, OverlayIP: a.OverlayIP, Endpoints: s.Endpoints}, id); err != nil {
			t.Errorf("%s: loaded with endpoints %v, which the advert refuses: %v", tc.name, s.Endpoints, err)
		}
	}
}

// TestBlankEnrollWithoutCA: a blank enroll listen turns nothing on in a
// gateway without the CA (a template shared by every gateway): no error.
func TestBlankEnrollWithoutCA(t *testing.T) {
	cfg := strings.Replace(goodConfig, `interface = "sb0"`, "interface = \"sb0\"\n}\nenroll {\n  listen = \"\"", 1)
	if _, err := LoadConfig(writeConfig(t, cfg)); err != nil {
		t.Fatalf("a blank enroll listen without ca_dir: %v", err)
	}
}

// TestLoadConfigRelativePaths: relative paths are the config file's
// directory's, wherever the gateway or a command reading the file starts.
func TestLoadConfigRelativePaths(t *testing.T) {
	src := strings.Replace(goodConfig, `state_dir = "/var/lib/skybridge"`, `state_dir = "st"`, 1)
	src = strings.Replace(src, `dir = "/var/lib/skybridge/identity"`, `dir = "id"`, 1)
	src += "policy {\n  file = \"policy/residency.hcl\"\n}\n"
	path := writeConfig(t, src)
	dir := filepath.Dir(path)
	t.Chdir("/")
	s, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	for got, want := range map[string]string{
		s.StateDir: filepath.Join(dir, "st"), s.Identity.Dir: filepath.Join(dir, "id"), s.ControlSocket: filepath.Join(dir, "st", "control.sock"),
		s.PolicyFile: filepath.Join(dir, "policy", "residency.hcl"), s.PolicySignature: filepath.Join(dir, "policy", "residency.hcl.sig"),
	} {
		if got != want {
			t.Errorf("%s, want %s", got, want)
		}
	}
}
