package mesh

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The cross-platform userspace API of WireGuard (wireguard.com/xplatform):
// the text protocol wgctrl speaks over /var/run/wireguard/*.sock. The
// netstack device has no socket there (it runs unprivileged), so the
// gateway speaks the same protocol to it in process.

// encodeUAPI renders a configuration as a UAPI "set" body.
func encodeUAPI(c wgtypes.Config) string {
	var b strings.Builder
	if c.PrivateKey != nil {
		fmt.Fprintf(&b, "private_key=%s\n", hex.EncodeToString(c.PrivateKey[:]))
	}
	if c.ListenPort != nil {
		fmt.Fprintf(&b, "listen_port=%d\n", *c.ListenPort)
	}
	if c.ReplacePeers {
		b.WriteString("replace_peers=true\n")
	}
	for _, p := range c.Peers {
		fmt.Fprintf(&b, "public_key=%s\n", hex.EncodeToString(p.PublicKey[:]))
		if p.Remove {
			b.WriteString("remove=true\n")
			continue
		}
		if p.UpdateOnly {
			b.WriteString("update_only=true\n")
		}
		if p.Endpoint != nil {
			fmt.Fprintf(&b, "endpoint=%s\n", p.Endpoint.AddrPort())
		}
		if p.PersistentKeepaliveInterval != nil {
			fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", int(p.PersistentKeepaliveInterval.Seconds()))
		}
		if p.ReplaceAllowedIPs {
			b.WriteString("replace_allowed_ips=true\n")
		}
		for _, ip := range p.AllowedIPs {
			fmt.Fprintf(&b, "allowed_ip=%s\n", prefixOf(ip))
		}
	}
	return b.String()
}

// parseUAPI reads a UAPI "get" answer.
func parseUAPI(name, s string) (*wgtypes.Device, error) {
	d := &wgtypes.Device{Name: name, Type: wgtypes.Userspace}
	var p *wgtypes.Peer
	flush := func() {
		if p != nil {
			d.Peers = append(d.Peers, *p)
			p = nil
		}
	}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("uapi: malformed line %q", line)
		}
		var err error
		switch k {
		case "private_key":
			var key wgtypes.Key
			if key, err = hexKey(v); err == nil {
				d.PrivateKey, d.PublicKey = key, key.PublicKey()
			}
		case "listen_port":
			d.ListenPort, err = strconv.Atoi(v)
		case "fwmark":
			d.FirewallMark, err = strconv.Atoi(v)
		case "public_key":
			flush()
			var key wgtypes.Key
			key, err = hexKey(v)
			p = &wgtypes.Peer{PublicKey: key}
		case "endpoint":
			var ap netip.AddrPort
			if ap, err = netip.ParseAddrPort(v); err == nil && p != nil {
				p.Endpoint = net.UDPAddrFromAddrPort(ap)
			}
		case "persistent_keepalive_interval":
			var n int
			if n, err = strconv.Atoi(v); err == nil && p != nil {
				p.PersistentKeepaliveInterval = time.Duration(n) * time.Second
			}
		case "last_handshake_time_sec":
			var n int64
			if n, err = strconv.ParseInt(v, 10, 64); err == nil && p != nil && n > 0 {
				p.LastHandshakeTime = time.Unix(n, int64(p.LastHandshakeTime.Nanosecond()))
			}
		case "last_handshake_time_nsec":
			var n int64
			if n, err = strconv.ParseInt(v, 10, 64); err == nil && p != nil && !p.LastHandshakeTime.IsZero() {
				p.LastHandshakeTime = time.Unix(p.LastHandshakeTime.Unix(), n)
			}
		case "rx_bytes":
			if p != nil {
				p.ReceiveBytes, err = strconv.ParseInt(v, 10, 64)
			}
		case "tx_bytes":
			if p != nil {
				p.TransmitBytes, err = strconv.ParseInt(v, 10, 64)
			}
		case "allowed_ip":
			var pr netip.Prefix
			if pr, err = netip.ParsePrefix(v); err == nil && p != nil {
				p.AllowedIPs = append(p.AllowedIPs, ipNets([]netip.Prefix{pr})...)
			}
		case "protocol_version":
			if p != nil {
				p.ProtocolVersion, err = strconv.Atoi(v)
			}
		case "errno":
			if v != "0" {
				return nil, fmt.Errorf("uapi: errno %s", v)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("uapi: %s: %w", k, err)
		}
	}
	flush()
	return d, sc.Err()
}

func hexKey(s string) (wgtypes.Key, error) {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != wgtypes.KeyLen {
		return wgtypes.Key{}, fmt.Errorf("bad key")
	}
	var k wgtypes.Key
	copy(k[:], b)
	return k, nil
}
