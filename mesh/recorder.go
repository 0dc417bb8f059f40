package mesh

import (
	"context"
	"errors"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// RecordingDevice is a WireGuard device that only records what the
// reconciler applies: for running many gateways in one process (the scale
// benchmark) and for tests. It applies configuration changes with the
// kernel's semantics (add, update-only, replace allowed IPs, remove).
type RecordingDevice struct {
	mu      sync.Mutex
	name    string
	peers   map[wgtypes.Key]wgtypes.Peer
	routes  routeBook
	applies int
	removed int // peers removed (by name or by replacing them all)
	// hostRoutes stands for the host's own routes (SetHostRoutes).
	hostRoutes map[netip.Prefix]bool
}

// NewRecordingDevice makes an empty recording device.
func NewRecordingDevice(name string) *RecordingDevice {
	return &RecordingDevice{name: name, peers: map[wgtypes.Key]wgtypes.Peer{}}
}

func (d *RecordingDevice) Name() string { return d.name }
func (d *RecordingDevice) Mode() string { return modeRecord }

// modeRecord is the RecordingDevice's mode.
const modeRecord = "record"

func (d *RecordingDevice) Device() (*wgtypes.Device, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	dev := &wgtypes.Device{Name: d.name}
	for _, p := range d.peers {
		p.AllowedIPs = slices.Clone(p.AllowedIPs)
		dev.Peers = append(dev.Peers, p)
	}
	return dev, nil
}

func (d *RecordingDevice) Configure(c wgtypes.Config) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.applies++
	if c.ReplacePeers {
		d.removed += len(d.peers)
		d.peers = map[wgtypes.Key]wgtypes.Peer{}
	}
	for _, pc := range c.Peers {
		p, exists := d.peers[pc.PublicKey]
		switch {
		case pc.Remove:
			if exists {
				d.removed++
			}
			delete(d.peers, pc.PublicKey)
			continue
		case pc.UpdateOnly && !exists:
			continue
		case !exists:
			p = wgtypes.Peer{PublicKey: pc.PublicKey}
		}
		if pc.Endpoint != nil {
			p.Endpoint = pc.Endpoint
		}
		if pc.PersistentKeepaliveInterval != nil {
			p.PersistentKeepaliveInterval = *pc.PersistentKeepaliveInterval
		}
		if pc.ReplaceAllowedIPs {
			p.AllowedIPs = nil
		}
		p.AllowedIPs = append(p.AllowedIPs, pc.AllowedIPs...)
		d.peers[pc.PublicKey] = p
	}
	return nil
}

// Removed counts the peers removed so far: a tunnel that went down.
func (d *RecordingDevice) Removed() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.removed
}

// Peers returns the recorded peers by public key.
func (d *RecordingDevice) Peers() map[wgtypes.Key]wgtypes.Peer {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[wgtypes.Key]wgtypes.Peer, len(d.peers))
	for k, p := range d.peers {
		out[k] = p
	}
	return out
}

// Check runs f on the recorded peers under the device's lock, without a
// copy (a benchmark polling a thousand devices cannot afford one), along
// with the number of configuration changes applied so far (unchanged
// since the last check: same answer). f must not keep or modify the map.
func (d *RecordingDevice) Check(f func(peers map[wgtypes.Key]wgtypes.Peer, applies int) bool) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return f(d.peers, d.applies)
}

// Applies counts the configuration changes applied.
func (d *RecordingDevice) Applies() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.applies
}

// Routes is the routes set, and the host routes SetHostRoutes gave.
func (d *RecordingDevice) Routes() (RouteTable, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return RouteTable{Own: slices.Clone(d.routes.own), Held: slices.Clone(d.routes.held), Host: maps.Clone(d.hostRoutes)}, nil
}

func (d *RecordingDevice) SetRoutes(c RouteChange) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.routes.apply(c)
	return nil
}

// SetHostRoutes has the recorder report host routes, as a host's LANs.
func (d *RecordingDevice) SetHostRoutes(ps ...netip.Prefix) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.hostRoutes = map[netip.Prefix]bool{}
	for _, p := range ps {
		d.hostRoutes[p] = true
	}
}

var errNoOverlay = errors.New("a recording device carries no traffic")

func (d *RecordingDevice) Listen(netip.AddrPort) (net.Listener, error) { return nil, errNoOverlay }
func (d *RecordingDevice) Dial(context.Context, string) (net.Conn, error) {
	return nil, errNoOverlay
}
func (d *RecordingDevice) Close() error { return nil }
