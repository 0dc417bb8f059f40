package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/netstack"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"

	"github.com/skybridge-mesh/skybridge/certs"
)

// Device is the WireGuard interface the reconciler drives. Implementations:
// kernel WireGuard and embedded wireguard-go on a TUN device (both
// configured with wgctrl, exactly as `wg` does), netstack (in process, no
// root), and in tests and benchmarks a recorder.
type Device interface {
	Name() string
	Mode() string
	// Device returns the current configuration, peers with handshake
	// times and counters included.
	Device() (*wgtypes.Device, error)
	// Configure applies a change; it never replaces peers wholesale.
	Configure(wgtypes.Config) error
	// Routes reads the routing table (once: it may hold a full BGP
	// table); SetRoutes adds and removes skybridge's routes. Devices
	// without kernel routing (netstack) route by allowed IPs alone and
	// do nothing here.
	Routes() (RouteTable, error)
	SetRoutes(RouteChange) error
	// Listen and Dial reach the overlay: the kernel's stack for kernel
	// and TUN devices, the userspace stack for netstack.
	Listen(addr netip.AddrPort) (net.Listener, error)
	Dial(ctx context.Context, addr string) (net.Conn, error)
	Close() error
}

// RouteTable is what a device's host routes, as the reconciler needs it.
type RouteTable struct {
	// Own is the routes skybridge installed towards the device.
	Own []netip.Prefix
	// Held is the unreachable routes skybridge installed: the prefixes
	// of gateways away that no gateway up carries (Plan.Held). They name no device: a
	// metric derived from the interface's name tells this gateway's.
	Held []netip.Prefix
	// Host is the prefixes the host's main table routes otherwise
	// (routes skybridge did not install: its LANs, its operator's): a
	// remote site's route to one of them is left out.
	Host map[netip.Prefix]bool
}

// RouteChange is what SetRoutes does: routes into the device added and
// removed, and unreachable routes held and freed. A prefix moving from
// one kind to the other is never left without one of them for the host's
// other routes (its default route) to take.
type RouteChange struct {
	Add, Del     []netip.Prefix
	Hold, Unhold []netip.Prefix
}

// DeviceOptions says how to bring a device up.
type DeviceOptions struct {
	Name       string
	Mode       string // ModeAuto, ModeKernel, ModeTUN, ModeNetstack
	Port       int
	MTU        int
	PrivateKey certs.WGPrivateKey
	Overlay    netip.Addr   // the gateway's overlay address
	MeshPrefix netip.Prefix // the overlay range, routed to the interface
	Log        *slog.Logger
}

// errNoKernelWireGuard says the kernel has no WireGuard module.
var errNoKernelWireGuard = errors.New("kernel has no WireGuard support")

// errExistingTUN says the interface exists and is a TUN device, which
// kernel mode cannot use and TUN mode can.
var errExistingTUN = errors.New("use mode \"tun\" (or \"auto\") for a TUN device")

// OpenDevice creates (or, for kernel WireGuard, adopts) the interface,
// gives it the private key, port, overlay address and MTU, and brings it up.
// In auto mode it uses kernel WireGuard where the module exists and
// embedded wireguard-go on TUN otherwise.
func OpenDevice(opt DeviceOptions) (Device, error) {
	if opt.Log == nil {
		opt.Log = slog.Default()
	}
	switch opt.Mode {
	case ModeNetstack:
		return openNetstack(opt)
	case ModeTUN:
		return openTUN(opt)
	case ModeKernel:
		return openKernel(opt)
	case ModeAuto, "":
		d, err := openKernel(opt)
		switch {
		case errors.Is(err, errNoKernelWireGuard):
			opt.Log.Info("no kernel WireGuard here; using embedded wireguard-go on a TUN device", "interface", opt.Name)
			return openTUN(opt)
		case errors.Is(err, errExistingTUN):
			// Made persistent beforehand (ip tuntap add), so that its
			// routes outlive a restart: TUN mode takes it over, as
			// kernel mode takes over a WireGuard interface.
			opt.Log.Info("the interface is an existing TUN device; using embedded wireguard-go on it", "interface", opt.Name)
			return openTUN(opt)
		}
		return d, err
	}
	return nil, fmt.Errorf("unknown device mode %q", opt.Mode)
}

func baseConfig(opt DeviceOptions) wgtypes.Config {
	k := wgtypes.Key(opt.PrivateKey.Bytes())
	return wgtypes.Config{PrivateKey: &k, ListenPort: &opt.Port}
}

// wgctrlDevice is a device configured through wgctrl: kernel WireGuard over
// netlink, or wireguard-go over its UAPI socket.
type wgctrlDevice struct {
	name, mode string
	client     *wgctrl.Client
	link       *linkConfig
	close      func() error
}

func (d *wgctrlDevice) Name() string                     { return d.name }
func (d *wgctrlDevice) Mode() string                     { return d.mode }
func (d *wgctrlDevice) Device() (*wgtypes.Device, error) { return d.client.Device(d.name) }
func (d *wgctrlDevice) Configure(c wgtypes.Config) error { return d.client.ConfigureDevice(d.name, c) }
func (d *wgctrlDevice) Routes() (RouteTable, error)      { return d.link.routes() }
func (d *wgctrlDevice) SetRoutes(c RouteChange) error    { return d.link.setRoutes(c) }

// overlayKeepAlive notices a peer gateway that vanished (killed, cut off)
// within about 25 s, instead of the kernel's default of minutes; netstack
// connections get the same (keepNetstackAlive), where gVisor's default is
// none. A variable for tests.
var overlayKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 10 * time.Second, Interval: 5 * time.Second, Count: 3}

func (d *wgctrlDevice) Listen(addr netip.AddrPort) (net.Listener, error) {
	lc := net.ListenConfig{KeepAliveConfig: overlayKeepAlive}
	return lc.Listen(context.Background(), "tcp", addr.String())
}

func (d *wgctrlDevice) Dial(ctx context.Context, addr string) (net.Conn, error) {
	dl := net.Dialer{KeepAliveConfig: overlayKeepAlive}
	return dl.DialContext(ctx, "tcp", addr)
}

func (d *wgctrlDevice) Close() error {
	err := d.close()
	d.client.Close()
	return err
}

// uapiDir is where wireguard-go's ipc package makes the UAPI sockets (its
// socketDirectory); a variable for tests.
var uapiDir = "/var/run/wireguard"

var uapiWords = wayWords{
	what:   "WireGuard socket directory",
	owner:  "that user could take the place of the interface's socket, which the gateway sends its private key to; make it root's",
	anyone: "one could take the place of the interface's socket, which the gateway sends its private key to; run chmod o-w on it",
	group:  "WireGuard socket directory: it, or one on the way to it, may be written by its group: members could take the place of the interface's socket, which the gateway sends its private key to",
}

// checkUAPIDir refuses a socket directory another user could put a socket
// of theirs in, at the interface's name: wgctrl sends the private key to
// what is there, and ipc.UAPIOpen makes the directory if it is missing
// but never looks at one that is there. The control socket's rules hold
// on the way to it (trustedWay); the directory itself may be written by
// its owner alone, sticky or not, as nothing holds the name while the
// gateway is down.
func checkUAPIDir(dir string, log *slog.Logger) error {
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	at, err := trustedWay(dir, os.Geteuid(), false, log, uapiWords)
	if err != nil {
		return err
	}
	fi, err := os.Stat(at)
	if err != nil {
		return fmt.Errorf("WireGuard socket directory: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("WireGuard socket directory %s may be written by users other than its owner (mode %v): one could take the place of the interface's socket, which the gateway sends its private key to; run chmod 755 %s", dir, perm, dir)
	}
	return nil
}

func openTUN(opt DeviceOptions) (Device, error) {
	if err := checkUAPIDir(uapiDir, opt.Log); err != nil {
		return nil, err
	}
	t, err := tun.CreateTUN(opt.Name, opt.MTU)
	if err != nil {
		return nil, fmt.Errorf("create TUN device %s: %w (TUN mode needs root or CAP_NET_ADMIN and /dev/net/tun; netstack mode needs neither)", opt.Name, err)
	}
	dev := device.NewDevice(t, conn.NewDefaultBind(), wgLogger(opt.Log, opt.Name))
	uapiFile, err := ipc.UAPIOpen(opt.Name)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("open UAPI socket for %s: %w", opt.Name, err)
	}
	uapi, err := ipc.UAPIListen(opt.Name, uapiFile)
	if err != nil {
		uapiFile.Close()
		dev.Close()
		return nil, fmt.Errorf("listen on UAPI socket for %s: %w", opt.Name, err)
	}
	go func() {
		for {
			c, err := uapi.Accept()
			if err != nil {
				return
			}
			go dev.IpcHandle(c)
		}
	}()
	closeAll := func() error {
		uapi.Close()
		dev.Close() // closes the TUN device, which removes the interface
		os.Remove(filepath.Join("/var/run/wireguard", opt.Name+".sock"))
		return nil
	}
	return newWgctrlDevice(opt, ModeTUN, closeAll)
}

// newWgctrlDevice finishes bringing up an interface that wgctrl can reach
// (kernel or UAPI socket): private key and port, address, MTU, up. On
// failure it undoes everything with closeFn.
func newWgctrlDevice(opt DeviceOptions, mode string, closeFn func() error) (*wgctrlDevice, error) {
	client, err := wgctrl.New()
	if err != nil {
		closeFn()
		return nil, fmt.Errorf("wgctrl: %w", err)
	}
	d := &wgctrlDevice{name: opt.Name, mode: mode, client: client, close: closeFn}
	// An interface adopted from a run that crashed still carries the
	// mesh's routes: deleted with them on a failed start, it would leave
	// the mesh's traffic to the host's other routes, in clear. Held
	// first, as at a stop; the next start takes them over.
	fail := func(err error) (*wgctrlDevice, error) {
		if herr := holdLinkRoutes(opt.Name); herr != nil {
			opt.Log.Warn("could not hold the routes of the interface before removing it (ip route show proto 91 lists them)", "interface", opt.Name, "err", herr)
		}
		d.Close()
		return nil, err
	}
	if err := d.Configure(baseConfig(opt)); err != nil {
		return fail(fmt.Errorf("configure %s: %w", opt.Name, err))
	}
	if d.link, err = setUpLink(opt); err != nil {
		return fail(err)
	}
	return d, nil
}

func openKernel(opt DeviceOptions) (Device, error) {
	created, err := createKernelLink(opt.Name, opt.MTU)
	if err != nil {
		return nil, err
	}
	d, err := newWgctrlDevice(opt, ModeKernel, func() error { return deleteLink(opt.Name) })
	if err != nil {
		return nil, err
	}
	if !created {
		opt.Log.Info("adopted existing kernel WireGuard interface; its peers stay until reconciled", "interface", opt.Name)
	}
	return d, nil
}

// NetstackDevice is wireguard-go on gVisor's userspace network stack: the
// gateway's own services listen on its overlay address through Net, with
// neither root nor a TUN device.
type NetstackDevice struct {
	name   string
	dev    *device.Device
	net    *netstack.Net
	mu     sync.Mutex
	routes routeBook // the netstack routes by allowed IPs; kept for symmetry with the kernel
}

func openNetstack(opt DeviceOptions) (Device, error) {
	t, tnet, err := netstack.CreateNetTUN([]netip.Addr{opt.Overlay}, nil, opt.MTU)
	if err != nil {
		return nil, fmt.Errorf("create netstack device: %w", err)
	}
	dev := device.NewDevice(t, conn.NewDefaultBind(), wgLogger(opt.Log, opt.Name))
	d := &NetstackDevice{name: opt.Name, dev: dev, net: tnet}
	if err := d.Configure(baseConfig(opt)); err != nil {
		dev.Close()
		return nil, fmt.Errorf("configure netstack device: %w", err)
	}
	if err := dev.Up(); err != nil {
		dev.Close()
		return nil, fmt.Errorf("bring up netstack device: %w", err)
	}
	return d, nil
}

// Net is the userspace network stack on the overlay address.
func (d *NetstackDevice) Net() *netstack.Net { return d.net }

func (d *NetstackDevice) Name() string { return d.name }
func (d *NetstackDevice) Mode() string { return ModeNetstack }

func (d *NetstackDevice) Device() (*wgtypes.Device, error) {
	s, err := d.dev.IpcGet()
	if err != nil {
		return nil, err
	}
	return parseUAPI(d.name, s)
}

func (d *NetstackDevice) Configure(c wgtypes.Config) error { return d.dev.IpcSet(encodeUAPI(c)) }

// Routes returns the routes last set, and no host routes: netstack
// routes by the peers' allowed IPs alone, so the list is only bookkeeping.
func (d *NetstackDevice) Routes() (RouteTable, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return RouteTable{Own: slices.Clone(d.routes.own), Held: slices.Clone(d.routes.held)}, nil
}

func (d *NetstackDevice) SetRoutes(c RouteChange) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.routes.apply(c)
	return nil
}

func (d *NetstackDevice) Close() error {
	d.dev.Close()
	return nil
}

// DialContext dials an overlay address through the netstack device, for
// the gateway's own clients (and tests).
func (d *NetstackDevice) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := d.net.DialContext(ctx, network, addr)
	if err != nil {
		return nil, refusedAsKernel(err)
	}
	keepNetstackAlive(c)
	return c, nil
}

// gonetEndpoint is where a gonet.TCPConn keeps its gVisor endpoint, the
// one place keepalive is set: gonet does not give it out, nor
// netstack.Net its stack, gVisor has no default for a whole stack, and an
// accepted endpoint does not take its listener's. Without it a sender
// whose receiver was killed after the commit waited out the commit's 10
// minutes, `running (commit)`, its resume refused as already running.
// The field is found by name and checked by type: under a gVisor that
// moved it, connections go without keepalive, as before it was set
// (TestNetstackKeepAliveNoticesVanishedPeer fails), rather than read
// something else as the endpoint or keep the gateway from starting.
var gonetEndpoint = sync.OnceValues(func() (uintptr, bool) {
	f, ok := reflect.TypeFor[gonet.TCPConn]().FieldByName("ep")
	if !ok || f.Type != reflect.TypeFor[tcpip.Endpoint]() {
		return 0, false
	}
	return f.Offset, true
})

// keepNetstackAlive gives a netstack TCP connection overlayKeepAlive's
// timings, as the kernel's connections have them (a value of zero or
// less leaves gVisor's own); other connections are left as they are.
func keepNetstackAlive(c net.Conn) {
	tc, ok := c.(*gonet.TCPConn)
	if !ok {
		return
	}
	off, ok := gonetEndpoint()
	if !ok {
		return
	}
	ep := *(*tcpip.Endpoint)(unsafe.Add(unsafe.Pointer(tc), off))
	ka := overlayKeepAlive
	// gVisor takes these options on any TCP endpoint; one it refused
	// would leave the connection as it was, without keepalive, not to be
	// closed for it (an Accept's error ends its server).
	if ka.Idle > 0 {
		idle := tcpip.KeepaliveIdleOption(ka.Idle)
		ep.SetSockOpt(&idle)
	}
	if ka.Interval > 0 {
		interval := tcpip.KeepaliveIntervalOption(ka.Interval)
		ep.SetSockOpt(&interval)
	}
	if ka.Count > 0 {
		ep.SetSockOptInt(tcpip.KeepaliveCountOption, ka.Count)
	}
	// Last: it starts the timer, with the timings above.
	ep.SocketOptions().SetKeepAlive(ka.Enable)
}

// refusedAsKernel makes gVisor's refusal, which it says in words of its
// own, one that errors.Is finds as syscall.ECONNREFUSED, as the kernel's:
// a refused probe is an answer.
func refusedAsKernel(err error) error {
	if err != nil && strings.Contains(err.Error(), "connection was refused") {
		return fmt.Errorf("%w (%v)", syscall.ECONNREFUSED, err)
	}
	return err
}

func (d *NetstackDevice) Listen(addr netip.AddrPort) (net.Listener, error) {
	ln, err := d.net.ListenTCPAddrPort(addr)
	if err != nil {
		return nil, err
	}
	return &netstackListener{Listener: ln}, nil
}

// netstackListener says net.ErrClosed from Accept once closed, as the
// kernel's listeners do: gVisor's says "endpoint is in invalid state", and
// a server that backs off and retries on accept errors (out of file
// descriptors, say) would retry a closed listener for ever.
type netstackListener struct {
	net.Listener
	closed atomic.Bool
}

func (l *netstackListener) Close() error {
	l.closed.Store(true)
	return l.Listener.Close()
}

func (l *netstackListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil && l.closed.Load() {
		return nil, fmt.Errorf("%w (%v)", net.ErrClosed, err)
	}
	if err != nil {
		return nil, err
	}
	keepNetstackAlive(c)
	return c, nil
}

func (d *NetstackDevice) Dial(ctx context.Context, addr string) (net.Conn, error) {
	return d.DialContext(ctx, "tcp", addr)
}

func wgLogger(log *slog.Logger, name string) *device.Logger {
	l := log.With("interface", name)
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			if l.Enabled(context.Background(), slog.LevelDebug-4) {
				l.Log(context.Background(), slog.LevelDebug-4, fmt.Sprintf(format, args...))
			}
		},
		Errorf: func(format string, args ...any) { l.Warn(fmt.Sprintf(format, args...)) },
	}
}

// routeBook keeps the routes of a device without kernel routing.
type routeBook struct{ own, held []netip.Prefix }

// apply changes the book as the kernel changes its table: a route into
// the device and a held one for the same prefix are two routes (at two
// metrics), each added and removed on its own.
func (b *routeBook) apply(c RouteChange) {
	add := func(set, ps []netip.Prefix) []netip.Prefix {
		for _, p := range ps {
			if !slices.Contains(set, p) {
				set = append(set, p)
			}
		}
		return set
	}
	b.own = slices.DeleteFunc(add(b.own, c.Add), func(p netip.Prefix) bool { return slices.Contains(c.Del, p) })
	b.held = slices.DeleteFunc(add(b.held, c.Hold), func(p netip.Prefix) bool { return slices.Contains(c.Unhold, p) })
}
