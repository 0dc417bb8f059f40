package mesh

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/hclconf"
)

// Device modes.
const (
	ModeAuto     = "auto"     // kernel WireGuard if the module is there, else TUN
	ModeKernel   = "kernel"   // kernel WireGuard via netlink
	ModeTUN      = "tun"      // embedded wireguard-go on a TUN device, configured over its UAPI socket
	ModeNetstack = "netstack" // embedded wireguard-go on a userspace TCP/IP stack: no root, no TUN
)

// Topology modes.
const (
	TopologyFullMesh = "full-mesh" // every gateway peers with every permitted gateway
	TopologyHub      = "hub"       // one hub per site; other gateways reach the mesh through it
)

// Config is a gateway's configuration file (HCL):
//
//	state_dir = "/var/lib/skybridge"
//	node     { ... }   # certs.NodeConfig: the attributes to be certified (none for a burst gateway: --join-token)
//	identity { ... }   # certs.Config: embedded CA files or Vault (default: files in state_dir/identity)
//	gossip {
//	  bind      = "192.0.2.1:7946"
//	  advertise = "192.0.2.1:7946"       # default: bind; without a port, bind's
//	  seeds     = ["198.51.100.1:7946", "203.0.113.1:7946"]
//	}
//	wireguard {
//	  interface  = "sb0"
//	  port       = 51820
//	  mode       = "auto"                # auto, kernel, tun, netstack
//	  mtu        = 1420
//	  endpoints  = ["192.0.2.1:51820"]   # underlay addresses peers reach us at; default: gossip advertise address
//	  behind_nat = false                 # send keepalives so the NAT mapping stays open
//	  rotate_every = "720h"              # replace the WireGuard key on a schedule (also: skybridge keys rotate-wg)
//	}
//	topology { mode = "full-mesh" }      # or "hub"
//	policy {
//	  file      = "/etc/skybridge/residency.hcl"   # signed: file.sig next to it
//	}
//	control { socket = "/run/skybridge/sb0.sock" }
//	operator {                           # metrics and dashboard, token required
//	  listen     = "127.0.0.1:7480"      # loopback, "overlay:7480" (WireGuard-encrypted) or "off"
//	  token_file = "/var/lib/skybridge/operator.token"  # default: in state_dir, created 0600
//	}
//	enroll {                             # burst gateways enrol here; only with identity.ca_dir
//	  listen    = "192.0.2.1:7947"       # default: the gossip bind address, port 7947; "off" to disable
//	  advertise = "192.0.2.1:7947"       # what join tokens name; default: the gossip advertise address
//	}
type Config struct {
	StateDir  string            `hcl:"state_dir"`
	Node      *certs.NodeConfig `hcl:"node,block"`     // optional only for a burst gateway (--join-token)
	Identity  *certs.Config     `hcl:"identity,block"` // default: the file back end in state_dir/identity
	Gossip    GossipConfig      `hcl:"gossip,block"`
	WireGuard WireGuardConfig   `hcl:"wireguard,block"`
	Topology  *TopologyConfig   `hcl:"topology,block"`
	Policy    *PolicyConfig     `hcl:"policy,block"`
	Control   *ControlConfig    `hcl:"control,block"`
	Operator  *OperatorConfig   `hcl:"operator,block"`
	Enroll    *EnrollConfig     `hcl:"enroll,block"`
	Body      hcl.Body          `hcl:",body"`

	file string
}

// GossipConfig is the gossip block.
type GossipConfig struct {
	Bind      string   `hcl:"bind"`
	Advertise string   `hcl:"advertise,optional"`
	Seeds     []string `hcl:"seeds,optional"`
	// Profile picks memberlist timings: "lan" (default) or "wan" (slower
	// failure detection over lossy links), or "local" for tests.
	Profile string   `hcl:"profile,optional"`
	Body    hcl.Body `hcl:",body"`
}

// WireGuardConfig is the wireguard block.
type WireGuardConfig struct {
	Interface string   `hcl:"interface"`
	Port      int      `hcl:"port,optional"`
	Mode      string   `hcl:"mode,optional"`
	MTU       int      `hcl:"mtu,optional"`
	Endpoints []string `hcl:"endpoints,optional"`
	BehindNAT bool     `hcl:"behind_nat,optional"`
	// RotateEvery replaces the WireGuard key on a schedule ("720h");
	// empty: only when `skybridge keys rotate-wg` asks.
	RotateEvery string   `hcl:"rotate_every,optional"`
	Body        hcl.Body `hcl:",body"`
}

// TopologyConfig is the topology block.
type TopologyConfig struct {
	Mode string   `hcl:"mode"`
	Body hcl.Body `hcl:",body"`
}

// PolicyConfig is the policy block.
type PolicyConfig struct {
	File      string   `hcl:"file"`
	Signature string   `hcl:"signature,optional"` // default: file + ".sig"
	Body      hcl.Body `hcl:",body"`
}

// ControlConfig is the control block.
type ControlConfig struct {
	Socket string   `hcl:"socket"`
	Body   hcl.Body `hcl:",body"`
}

// OperatorConfig is the operator block: the HTTP endpoint that serves
// Prometheus metrics and the dashboard.
type OperatorConfig struct {
	Listen    string   `hcl:"listen,optional"`
	TokenFile string   `hcl:"token_file,optional"`
	Body      hcl.Body `hcl:",body"`
}

// EnrollConfig is the enroll block: where a CA-holding gateway serves
// the enrollment of burst gateways (TLS, join token required) and the
// renewal of gateways issued offline (identity.renew_from on theirs):
// "off" turns both off.
type EnrollConfig struct {
	Listen    string   `hcl:"listen,optional"`
	Advertise string   `hcl:"advertise,optional"`
	Body      hcl.Body `hcl:",body"`
}

// Settings is a validated configuration with defaults filled in.
type Settings struct {
	File     string
	StateDir string
	Node     certs.NodeConfig
	Identity certs.Config

	GossipBind      netip.AddrPort
	GossipAdvertise netip.AddrPort
	Seeds           []string
	GossipProfile   string

	Interface string
	Port      int
	Mode      string
	MTU       int
	Endpoints []netip.AddrPort
	BehindNAT bool
	// WGRotateEvery is the WireGuard key's scheduled lifetime (0: none).
	WGRotateEvery time.Duration

	Topology string

	PolicyFile      string
	PolicySignature string

	ControlSocket string

	// The operator endpoint: off if neither is set. OperatorOverlay
	// listens on the gateway's overlay address at OperatorAddr's port.
	OperatorAddr      netip.AddrPort
	OperatorOverlay   bool
	OperatorTokenFile string

	// Enrollment of burst gateways: off unless valid (needs the CA).
	EnrollListen    netip.AddrPort
	EnrollAdvertise netip.AddrPort
}

// Defaults.
const (
	DefaultWireGuardPort = 51820
	DefaultMTU           = 1420 // 1500 underlay minus WireGuard's worst-case IPv6 overhead
	DefaultGossipPort    = 7946
	DefaultOperatorPort  = 7480
)

// LoadConfig reads and validates a gateway configuration file.
func LoadConfig(path string) (*Settings, error) {
	var c Config
	if err := hclconf.DecodeFile(path, &c); err != nil {
		return nil, err
	}
	c.file = path
	if err := c.resolvePaths(); err != nil {
		return nil, err
	}
	return c.validate()
}

// resolvePaths makes the file's relative paths relative to its directory,
// so that the gateway (started in / by systemd) and a command reading the
// same file from a shell (status, identity request) find the same ones.
func (c *Config) resolvePaths() error {
	base, err := filepath.Abs(filepath.Dir(c.file))
	if err != nil {
		return err
	}
	ps := []*string{&c.StateDir}
	if p := c.Policy; p != nil {
		ps = append(ps, &p.File, &p.Signature)
	}
	if c.Control != nil {
		ps = append(ps, &c.Control.Socket)
	}
	if c.Operator != nil {
		ps = append(ps, &c.Operator.TokenFile)
	}
	certs.ResolveUnder(base, ps...)
	if c.Identity != nil {
		return c.Identity.ResolvePaths(c.file)
	}
	return nil
}

func (c *Config) validate() (*Settings, error) {
	s := &Settings{File: c.file, StateDir: c.StateDir, Topology: TopologyFullMesh}
	if c.Identity != nil {
		s.Identity = *c.Identity
	}
	if c.Node != nil {
		s.Node = *c.Node
	}
	var errs []error
	// Blank paths are not made absolute (resolvePaths): taken, they would
	// name files under whatever directory the gateway was started in.
	if strings.TrimSpace(c.StateDir) == "" {
		errs = append(errs, hclconf.Errorf(c.Body, "state_dir", "must name the directory where the gateway keeps its state"))
	}
	if c.Identity != nil && c.Identity.Dir != "" && strings.TrimSpace(c.Identity.Dir) == "" {
		errs = append(errs, hclconf.Errorf(c.Identity.Body, "dir", "is empty: name the directory that holds the node identity, or remove dir for STATE_DIR/identity"))
	}
	if s.Identity.Dir == "" && strings.TrimSpace(c.StateDir) != "" {
		s.Identity.Dir = filepath.Join(c.StateDir, "identity")
	}

	g := c.Gossip
	var err error
	if s.GossipBind, err = parseAddrPort(g.Bind, DefaultGossipPort); err != nil {
		errs = append(errs, hclconf.Errorf(g.Body, "bind", "%v", err))
	}
	s.GossipAdvertise = s.GossipBind
	if g.Advertise != "" {
		// A bare address says where, not on which port: the one bound,
		// as enroll's advertise takes its listen's.
		port := DefaultGossipPort
		if s.GossipBind.IsValid() && s.GossipBind.Port() != 0 {
			port = int(s.GossipBind.Port())
		}
		if s.GossipAdvertise, err = parseAddrPort(g.Advertise, port); err != nil {
			errs = append(errs, hclconf.Errorf(g.Body, "advertise", "%v", err))
		}
		if s.GossipBind.IsValid() && s.GossipBind.Port() == 0 && s.GossipAdvertise.Port() != 0 {
			// Nothing would answer at the port advertised. (Without
			// advertise, the advertised port 0 is refused below.)
			named := fmt.Sprintf("the %d advertise names", s.GossipAdvertise.Port())
			if _, err := netip.ParseAddrPort(g.Advertise); err != nil {
				named = fmt.Sprintf("the port advertised (advertise names none: %d, the default)", s.GossipAdvertise.Port())
			}
			errs = append(errs, hclconf.Errorf(g.Body, "bind", "port 0 lets the kernel pick a port, not %s: give that one", named))
		}
	}
	if err := reachable(s.GossipAdvertise); err != nil && s.GossipAdvertise.IsValid() {
		errs = append(errs, hclconf.Errorf(g.Body, "advertise", "gateways cannot reach %s (%v); set advertise to an address and port they can", s.GossipAdvertise, err))
	}
	for _, seed := range g.Seeds {
		// A seed without a port is at the port this gateway binds, as
		// memberlist has always dialled it, and as a bare advertise is
		// (a mesh on one port need not repeat it).
		port := DefaultGossipPort // a bind not given, or refused above
		if s.GossipBind.Port() != 0 {
			port = int(s.GossipBind.Port())
		}
		ap, err := parseAddrPort(seed, port)
		if err == nil {
			err = reachable(ap)
		}
		if err != nil {
			errs = append(errs, hclconf.Errorf(g.Body, "seeds", "%q: %v", seed, err))
			continue
		}
		// With its port, so that rejoin rounds knock where joins go.
		s.Seeds = append(s.Seeds, ap.String())
	}
	switch g.Profile {
	case "", "lan", "wan", "local":
		s.GossipProfile = g.Profile
		if s.GossipProfile == "" {
			s.GossipProfile = "lan"
		}
	default:
		errs = append(errs, hclconf.Errorf(g.Body, "profile", "%q is not lan, wan or local", g.Profile))
	}

	w := c.WireGuard
	s.Interface, s.Port, s.Mode, s.MTU, s.BehindNAT = w.Interface, w.Port, w.Mode, w.MTU, w.BehindNAT
	if !validInterfaceName(w.Interface) {
		errs = append(errs, hclconf.Errorf(w.Body, "interface", "%q: an interface name has 1 to 15 characters, none of them '/', ':', '%%' or a space, and is not . or ..", w.Interface))
	}
	if s.Port == 0 {
		s.Port = DefaultWireGuardPort
	}
	if s.Port < 1 || s.Port > 65535 {
		errs = append(errs, hclconf.Errorf(w.Body, "port", "%d is not a UDP port", w.Port))
	}
	switch s.Mode {
	case "":
		s.Mode = ModeAuto
	case ModeAuto, ModeKernel, ModeTUN, ModeNetstack:
	default:
		errs = append(errs, hclconf.Errorf(w.Body, "mode", "%q is not auto, kernel, tun or netstack", w.Mode))
	}
	if s.MTU == 0 {
		s.MTU = DefaultMTU
	}
	if s.MTU < 1280 || s.MTU > 9000 {
		errs = append(errs, hclconf.Errorf(w.Body, "mtu", "%d is outside 1280-9000", w.MTU))
	}
	for _, e := range w.Endpoints {
		ap, err := parseAddrPort(e, s.Port)
		if err == nil {
			err = reachable(ap)
		}
		if err != nil {
			errs = append(errs, hclconf.Errorf(w.Body, "endpoints", "%q: %v", e, err))
			continue
		}
		s.Endpoints = append(s.Endpoints, ap)
	}
	if len(w.Endpoints) > certs.MaxEndpoints {
		// Refused here, not by the advert the gateway signs at its start.
		errs = append(errs, hclconf.Errorf(w.Body, "endpoints", "%d endpoints: an advert carries at most %d; list the ones peers should try", len(w.Endpoints), certs.MaxEndpoints))
	}
	if w.RotateEvery != "" {
		d, err := time.ParseDuration(w.RotateEvery)
		switch {
		case err != nil:
			errs = append(errs, hclconf.Errorf(w.Body, "rotate_every", "%q is not a duration such as \"720h\"", w.RotateEvery))
		case d < 10*time.Minute:
			errs = append(errs, hclconf.Errorf(w.Body, "rotate_every", "%s is too often: at least 10m", d))
		default:
			s.WGRotateEvery = d
		}
	}
	if len(s.Endpoints) == 0 && s.GossipAdvertise.IsValid() {
		s.Endpoints = []netip.AddrPort{netip.AddrPortFrom(s.GossipAdvertise.Addr(), uint16(s.Port))}
	}

	if t := c.Topology; t != nil {
		switch t.Mode {
		case TopologyFullMesh, TopologyHub:
			s.Topology = t.Mode
		default:
			errs = append(errs, hclconf.Errorf(t.Body, "mode", "%q is not %q or %q", t.Mode, TopologyFullMesh, TopologyHub))
		}
	}
	if p := c.Policy; p != nil {
		s.PolicyFile, s.PolicySignature = p.File, p.Signature
		if strings.TrimSpace(p.File) == "" {
			// An empty path (a template that rendered nothing) would
			// run with no policy at all, every gateway linked.
			errs = append(errs, hclconf.Errorf(p.Body, "file", "is empty: name the signed residency policy, or remove the policy block to take the mesh's by gossip"))
		}
		if p.Signature != "" && strings.TrimSpace(p.Signature) == "" {
			errs = append(errs, hclconf.Errorf(p.Body, "signature", "is empty: name the policy's signature file, or remove signature for FILE.sig"))
		}
		if s.PolicySignature == "" {
			s.PolicySignature = p.File + ".sig"
		}
	}
	s.ControlSocket = filepath.Join(c.StateDir, "control.sock")
	if c.Control != nil {
		s.ControlSocket = c.Control.Socket
		if strings.TrimSpace(c.Control.Socket) == "" {
			errs = append(errs, hclconf.Errorf(c.Control.Body, "socket", "is empty: name the control socket's path, or remove the control block for STATE_DIR/control.sock"))
		}
	}
	op := OperatorConfig{Listen: fmt.Sprintf("127.0.0.1:%d", DefaultOperatorPort)}
	if c.Operator != nil {
		op.Body, op.TokenFile = c.Operator.Body, c.Operator.TokenFile
		if op.TokenFile != "" && strings.TrimSpace(op.TokenFile) == "" {
			errs = append(errs, hclconf.Errorf(op.Body, "token_file", "is empty: name the token's file, or remove token_file for STATE_DIR/operator.token"))
		}
		if c.Operator.Listen != "" {
			op.Listen = c.Operator.Listen
		} else if setBlank(c.Operator.Body, "listen") {
			// A template that rendered nothing where "off" was meant
			// would otherwise turn the endpoint on at its default.
			errs = append(errs, hclconf.Errorf(c.Operator.Body, "listen", "is empty: give an address, or \"off\", or remove it for 127.0.0.1:%d", DefaultOperatorPort))
		}
	}
	if err := s.operator(op); err != nil {
		errs = append(errs, err)
	}
	if err := s.enroll(c.Enroll); err != nil {
		errs = append(errs, err)
	}
	if err := hclconf.Join(errs...); err != nil {
		return nil, err
	}
	return s, nil
}

// operator validates the operator block. The endpoint is plain HTTP with
// a bearer token, so it may listen only where the token crosses no
// network in the clear but the one an operator chose to: loopback, or the
// overlay address, reached across the mesh encrypted, but from a site
// network in the clear up to its gateway (README says so).
func (s *Settings) operator(op OperatorConfig) error {
	if op.Listen == "off" {
		return nil
	}
	s.OperatorTokenFile = op.TokenFile
	if s.OperatorTokenFile == "" && s.StateDir != "" {
		s.OperatorTokenFile = filepath.Join(s.StateDir, "operator.token")
	}
	if port, ok := strings.CutPrefix(op.Listen, "overlay:"); ok {
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil || p == 0 {
			return hclconf.Errorf(op.Body, "listen", "%q: the port after overlay: must be 1-65535", op.Listen)
		}
		s.OperatorOverlay, s.OperatorAddr = true, netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(p))
		return nil
	}
	ap, err := parseAddrPort(op.Listen, DefaultOperatorPort)
	if err != nil {
		return hclconf.Errorf(op.Body, "listen", "%v, \"overlay:PORT\" or \"off\"", err)
	}
	if !ap.Addr().IsLoopback() {
		return hclconf.Errorf(op.Body, "listen", "%s is not a loopback address: the operator endpoint would send its token in clear; "+
			"use 127.0.0.1:PORT, overlay:PORT (reached through the WireGuard mesh) or a TLS-terminating proxy in front of loopback", ap)
	}
	s.OperatorAddr = ap
	return nil
}

// enroll validates the enroll block. Enrollment is on by default where it
// can work, on a gateway holding the CA (identity.ca_dir).
func (s *Settings) enroll(e *EnrollConfig) error {
	var body hcl.Body
	listen, advertise := "", ""
	if e != nil {
		body, listen, advertise = e.Body, e.Listen, e.Advertise
	}
	if listen == "off" {
		return nil
	}
	if s.Identity.CADir == "" {
		if listen != "" || advertise != "" {
			return hclconf.Errorf(body, "listen", "only a gateway holding the mesh CA (identity.ca_dir) enrols burst gateways; remove the enroll block")
		}
		return nil // a blank one turns nothing on here (a template shared by every gateway)
	}
	for _, a := range []struct{ name, v string }{{"listen", listen}, {"advertise", advertise}} {
		if a.v == "" && setBlank(body, a.name) {
			return hclconf.Errorf(body, a.name, "is empty: give an address (listen may be \"off\"), or remove it for the default")
		}
	}
	var err error
	s.EnrollListen = netip.AddrPortFrom(s.GossipBind.Addr(), DefaultEnrollPort)
	if listen != "" {
		if s.EnrollListen, err = parseAddrPort(listen, DefaultEnrollPort); err != nil {
			return hclconf.Errorf(body, "listen", "%v, or \"off\"", err)
		}
		if s.EnrollListen.Port() == 0 {
			// Join tokens would name another: advertise's, or port 0.
			return hclconf.Errorf(body, "listen", "port 0 lets the kernel pick a port, which join tokens cannot name: give one (default %d), or \"off\"", DefaultEnrollPort)
		}
	}
	s.EnrollAdvertise = netip.AddrPortFrom(s.GossipAdvertise.Addr(), s.EnrollListen.Port())
	if advertise != "" {
		if s.EnrollAdvertise, err = parseAddrPort(advertise, int(s.EnrollListen.Port())); err != nil {
			return hclconf.Errorf(body, "advertise", "%v", err)
		}
	}
	if err := reachable(s.EnrollAdvertise); err != nil {
		return hclconf.Errorf(body, "advertise", "join tokens must name an address and port burst gateways can reach (%v); set advertise", err)
	}
	return nil
}

// setBlank reports whether body sets attribute name at all: a blank
// value given, as opposed to none (the default).
func setBlank(body hcl.Body, name string) bool {
	if body == nil {
		return false
	}
	attrs, _ := body.JustAttributes()
	_, ok := attrs[name]
	return ok
}

// reachable refuses an address others cannot be sent to: the unspecified
// address, a multicast one, a zoned one, port 0.
func reachable(ap netip.AddrPort) error {
	switch a := ap.Addr(); {
	case !a.IsValid() || a.IsUnspecified():
		return errors.New("no address to reach")
	case a.IsMulticast():
		return errors.New("a multicast address")
	case a.Zone() != "":
		// It names an interface of this host, which other hosts have
		// not; memberlist, too, dials a seed without it.
		return fmt.Errorf("a zone (%%%s): gossip, adverts and join tokens carry addresses without one", a.Zone())
	case ap.Port() == 0:
		return errors.New("port 0 is no port to reach")
	}
	return nil
}

// validInterfaceName applies the kernel's rules for a network interface
// name (dev_valid_name), and refuses '%', which it reads as a template.
func validInterfaceName(n string) bool {
	return n != "" && len(n) <= 15 && n != "." && n != ".." && !strings.ContainsAny(n, "/:% \t\n\r\v\f")
}

// parseAddrPort accepts "ip:port", "[ip6]:port" or an IP alone, "[ip6]"
// for IPv6 (with defaultPort).
func parseAddrPort(s string, defaultPort int) (netip.AddrPort, error) {
	// Unmapped: [::ffff:192.0.2.1] is the IPv4 address, and is judged so
	// (which family of a peer's endpoints to dial follows ours).
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	bare := strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	if a, err := netip.ParseAddr(bare); err == nil {
		// Without brackets, 2001:db8::1:7946 is an address whose last
		// group reads as a port, and whoever wrote it likely meant one:
		// taken as an address, the gateway would advertise, or dial, one
		// nobody holds. Only a trailing "::" (as in "::"), an IPv4 address
		// as its last part (::ffff:192.0.2.1) or a zone cannot hide a port.
		last := s[strings.LastIndexByte(s, ':')+1:]
		if a.Is6() && bare == s && !strings.HasSuffix(s, "::") && !strings.Contains(last, ".") && a.Zone() == "" {
			return netip.AddrPort{}, fmt.Errorf("%q: write an IPv6 address in brackets, [%s] or with a port [%s]:%d, as a port after it without them cannot be told from its last group", s, s, s, defaultPort)
		}
		if bare != s && (!a.Is6() || len(s) != len(bare)+2) {
			return netip.AddrPort{}, fmt.Errorf("%q is not an address such as 192.0.2.1:%d or [2001:db8::1]:%d", s, defaultPort, defaultPort)
		}
		return netip.AddrPortFrom(a.Unmap(), uint16(defaultPort)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("%q is not an address such as 192.0.2.1:%s", s, strconv.Itoa(defaultPort))
}

// Durations of the gateway's loops.
const (
	reconcileInterval = 10 * time.Second      // resync even without events, to repair drift
	reconcileDebounce = 50 * time.Millisecond // gather a burst of events into one reconcile
	rejoinInterval    = 5 * time.Second       // how often a gateway missing members knocks on seeds
	// rejoinFanout bounds the addresses knocked on per round: each knock is
	// a full state exchange, one that answers heals the partition, and a
	// mesh that falsely declared many members dead must not answer with a
	// storm of exchanges.
	rejoinFanout = 3
	saveInterval = 5 * time.Second // at most this often is the membership written to disk
	inboxSize    = 8192            // quick gossip messages waiting for the worker (enqueue)
	// bulkSize bounds the blobs and large messages waiting, beside the
	// bytes they may take: a blob comes only when asked for, at most one
	// a second per member and kind; a queue as long as the quick one
	// would cost every gateway 192 KiB of buffer.
	bulkSize = 1024
	maxSends = 16 // streams a gateway opens at once for its own messages
	// maxQueuedSends bounds those waiting for one of them: a policy
	// announced to a mesh of thousands has each member ask for it.
	maxQueuedSends = 4096
	maxJoinCerts   = 8192 // certificates a join's push/pull carries, at most
	// maxJoinCertParts bounds the bundle parts they take (1 MiB each,
	// about 1,300 certificates): with our certificate, the CRL and the
	// policy, within a bundle's 8 parts.
	maxJoinCertParts = maxBundleParts - 4
)
