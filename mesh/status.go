package mesh

import (
	"fmt"
	"net/netip"
	"sort"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
)

// Status is what `skybridge status` shows.
type Status struct {
	Node         string     `json:"node"`
	Site         string     `json:"site"`
	Region       string     `json:"region"`
	Jurisdiction string     `json:"jurisdiction"`
	OverlayIP    netip.Addr `json:"overlay_ip"`
	Interface    string     `json:"interface"`
	Mode         string     `json:"mode"`
	PublicKey    string     `json:"public_key"`
	ListenPort   int        `json:"listen_port"`
	Gossip       string     `json:"gossip"`
	// GossipKeys counts the gossip keys the gateway takes: 1 but during a
	// rotation. More for long means keys a rotation should have dropped.
	GossipKeys int            `json:"gossip_keys"`
	Operator   string         `json:"operator,omitempty"` // metrics and dashboard address; empty: off
	Identity   IdentityStatus `json:"identity"`
	// BurstUntil is set on a burst gateway: it leaves the mesh then.
	BurstUntil *time.Time     `json:"burst_until,omitempty"`
	Policy     string         `json:"policy"`
	Topology   string         `json:"topology"`
	Uptime     time.Duration  `json:"uptime_ns"`
	Members    []MemberStatus `json:"members"`
	Links      []Link         `json:"links"`
	Conflicts  []string       `json:"conflicts,omitempty"`
	// Carriers names, per site, the gateway its routes go through from
	// here; Unreachable, the gateways our probes through their tunnels
	// do not reach (or that have not proved themselves yet).
	Carriers    map[string]string `json:"carriers"`
	Unreachable []string          `json:"unreachable,omitempty"`
	// Reachable says, per site, what skybridge_site_reachable says: a
	// gateway of it verified and alive, its tunnel from here not failing.
	Reachable map[string]bool `json:"reachable"`
	// Held lists, per site, the routes held for gateways that are away:
	// their traffic is dropped here until one is back (Plan.Held).
	Held      map[string][]netip.Prefix `json:"held,omitempty"`
	Reconcile ReconcileStats            `json:"reconcile"`
}

// IdentityStatus describes our own certificate.
type IdentityStatus struct {
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	CRLNumber uint64    `json:"crl_number"` // the sum of each CA's list number
	// IssuedBy is the CA that signed the certificate; CAs, every CA the
	// gateway trusts (two while an issuer is rotated). SigningCA is the
	// one the issuer now signs with, when it says (Vault's default
	// issuer): a certificate from another is renewed.
	// Revoked: the revocation list in force names this gateway's own
	// certificate; the mesh refuses it.
	Revoked   bool     `json:"revoked,omitempty"`
	IssuedBy  string   `json:"issued_by"`
	CAs       []string `json:"cas"`
	SigningCA string   `json:"signing_ca,omitempty"`
	// Issuer is what renews the identity: "vault", "ca_dir",
	// "renew_from" (a gateway holding the CA), or empty (identities
	// issued offline, renewed by hand).
	Issuer string `json:"issuer,omitempty"`
	// IssuerAnswered is when the issuer last answered the gateway's
	// trust-bundle request; nil if it has not since the start.
	IssuerAnswered *time.Time `json:"issuer_answered,omitempty"`
	// StartedOnDisk: Vault could not be reached when the gateway started,
	// which then took its secrets from the copies kept on disk.
	StartedOnDisk bool `json:"started_on_disk,omitempty"`
}

// MemberStatus is one member: its verification state and, for peers, the
// tunnel as the WireGuard device reports it.
type MemberStatus struct {
	Node          string         `json:"node"`
	Site          string         `json:"site,omitempty"`
	Region        string         `json:"region,omitempty"`
	Provider      string         `json:"provider,omitempty"`
	Jurisdiction  string         `json:"jurisdiction,omitempty"`
	OverlayIP     string         `json:"overlay_ip,omitempty"`
	State         MemberState    `json:"state"`
	SiteVerified  bool           `json:"site_verified"`  // Site comes from a certificate verified now or before, not only from the member's claim
	Left          bool           `json:"left,omitempty"` // left on purpose (decommissioned), not declared dead
	Reason        string         `json:"reason,omitempty"`
	Peer          bool           `json:"peer"` // configured as a WireGuard peer
	Endpoint      string         `json:"endpoint,omitempty"`
	AllowedIPs    []netip.Prefix `json:"allowed_ips,omitempty"`
	LastHandshake time.Time      `json:"last_handshake,omitzero"`
	RxBytes       int64          `json:"rx_bytes"`
	TxBytes       int64          `json:"tx_bytes"`
	// LastSent is when TxBytes last grew, at the earliest: the gateway's
	// read of the counter before the one that saw it grow (zero: not seen
	// to grow since it started). A tunnel is failing when it sends
	// without a handshake, not when it has been idle since it last
	// carried traffic.
	LastSent time.Time `json:"last_sent,omitzero"`
	// SentSince is when the gateway first saw this peer's key send
	// (zero: not yet): TxBytes above zero, or a persistent keepalive,
	// which sends from the first look even when the host lets nothing
	// out. A tunnel that never handshook fails only 180 s after it: a new
	// peer's first initiation goes out at once and is answered a round
	// trip later.
	SentSince time.Time `json:"sent_since,omitzero"`
	// Keepalive is the tunnel's persistent keepalive (zero: none). Such a
	// tunnel sends every interval, so it handshakes every 2 minutes: it is
	// never idle.
	Keepalive time.Duration `json:"keepalive_ns,omitempty"`
	// Health is the tunnel's, as the metrics and the graph judge it
	// (fresh, ageing, stale, idle); only for peers.
	Health         string    `json:"health,omitempty"`
	IdentityExpiry time.Time `json:"identity_expiry,omitzero"`
	PublicKey      string    `json:"public_key,omitempty"`
}

// ReconcileStats count reconcile runs.
type ReconcileStats struct {
	Runs      int           `json:"runs"`
	Errors    int           `json:"errors"`
	LastError string        `json:"last_error,omitempty"`
	Last      time.Time     `json:"last,omitzero"`
	Duration  time.Duration `json:"duration_ns"`
}

// Status reports the gateway's view of the mesh.
func (g *Gateway) Status() (*Status, error) {
	id := g.id.Load()
	a := id.Attributes()
	tb := g.trust.Load()
	st := &Status{
		Node: a.Node, Site: a.Site, Region: a.Region, Jurisdiction: a.Jurisdiction, OverlayIP: a.OverlayIP,
		Interface: g.dev.Name(), Mode: g.dev.Mode(), PublicKey: g.wgPublicKey(), ListenPort: g.s.Port,
		Gossip: g.s.GossipAdvertise.String(), GossipKeys: len(g.keyring.GetKeys()), Policy: g.policyRevision(), Topology: g.s.Topology, Uptime: time.Since(g.started),
		Identity: IdentityStatus{Serial: certs.FormatSerial(id.Certificate().SerialNumber), NotBefore: id.Certificate().NotBefore, NotAfter: id.Certificate().NotAfter, CRLNumber: tb.CRLVersion(),
			IssuedBy: id.Certificate().Issuer.CommonName, CAs: caNames(tb), Revoked: tb.IsRevoked(id.Certificate().SerialNumber)},
	}
	if s := tb.Signing(); s != nil {
		st.Identity.SigningCA = s.Subject.CommonName + " (" + certs.FormatSerial(s.SerialNumber) + ")"
	}
	switch iss := g.prov.Issuer().(type) {
	case *certs.Vault:
		st.Identity.Issuer = "vault"
	case *certs.CA:
		st.Identity.Issuer = "ca_dir"
	case nil:
		if g.prov.CanRenew() && g.burst == nil {
			st.Identity.Issuer = "renew_from"
		}
	default:
		st.Identity.Issuer = fmt.Sprintf("%T", iss)
	}
	if at := g.issuerAnswered.Load(); at != 0 {
		t := time.Unix(at, 0)
		st.Identity.IssuerAnswered = &t
	}
	if vs, ok := g.prov.Secrets().(*certs.VaultSecrets); ok {
		st.Identity.StartedOnDisk = vs.ServedFromDisk()
	}
	if a := g.OperatorAddress(); a != nil {
		st.Operator = a.String()
	}
	if g.burst != nil {
		t := id.Certificate().NotAfter.Add(-burstLeaveEarly)
		st.BurstUntil = &t
	}
	g.stats.mu.Lock()
	st.Reconcile = ReconcileStats{Runs: g.stats.runs, Errors: g.stats.errors, LastError: g.stats.lastError, Last: g.stats.last, Duration: g.stats.duration}
	g.stats.mu.Unlock()
	if p := g.plan.Load(); p != nil {
		st.Links, st.Conflicts, st.Carriers = p.Links, p.Conflicts, p.Carriers
	}
	if h := g.held.Load(); h != nil && len(*h) > 0 {
		st.Held = *h
	}
	// Probe verdicts outlive a gateway's departure (so that a return must
	// prove itself); status names only those still verified members.
	verified := map[string]bool{}
	for _, m := range g.members.gateways() {
		verified[m.Attributes.Node] = true
	}
	for n := range g.downSet() {
		if verified[n] {
			st.Unreachable = append(st.Unreachable, n)
		}
	}
	sort.Strings(st.Unreachable)
	dev, err := g.dev.Device()
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", g.dev.Name(), err)
	}
	peers := map[certs.WGPublicKey]int{}
	for i, p := range dev.Peers {
		peers[certs.WGPublicKey(p.PublicKey)] = i
	}
	sent := g.noteSent(dev.Peers)
	for _, m := range g.members.snapshot() {
		ms := MemberStatus{Node: m.Name, State: m.State, Reason: m.Reason, Left: m.Left}
		// What was verified, if anything: a member renewing its
		// certificate gossips a newer advert not checked yet.
		a := m.Advert
		if m.Verified != nil {
			a = &m.Verified.Advert
		}
		switch {
		case a != nil:
			ms.Site, ms.Jurisdiction, ms.Region, ms.Provider = a.Site, a.Jurisdiction, a.Region, a.Provider
			ms.OverlayIP, ms.PublicKey = a.OverlayIP.String(), a.WireGuardKey.String()
		case m.CertSite != "":
			// Restored dead from the state directory: no advert, but its
			// certificate says where it belongs, and its site is missed.
			ms.Site = m.CertSite
		}
		ms.SiteVerified = m.CertSite != "" && m.CertSite == ms.Site
		if m.Verified != nil {
			ms.IdentityExpiry = m.Verified.Cert.NotAfter
			if i, ok := peers[m.Verified.Advert.WireGuardKey]; ok {
				p := dev.Peers[i]
				ms.Peer, ms.LastHandshake, ms.RxBytes, ms.TxBytes = true, p.LastHandshakeTime, p.ReceiveBytes, p.TransmitBytes
				s := sent[m.Verified.Advert.WireGuardKey]
				ms.LastSent, ms.SentSince, ms.Keepalive = s.at, s.since, p.PersistentKeepaliveInterval
				ms.Health = tunnelHealth(ms, g.now())
				if p.Endpoint != nil {
					ms.Endpoint = p.Endpoint.String()
				}
				for _, n := range p.AllowedIPs {
					ms.AllowedIPs = append(ms.AllowedIPs, prefixOf(n))
				}
			}
		}
		st.Members = append(st.Members, ms)
	}
	st.Reachable = map[string]bool{}
	for _, s := range siteHealth(st, g.now()) {
		if s.name != unknownSite {
			st.Reachable[s.name] = s.reachable
		}
	}
	return st, nil
}

// sentMark is a peer's transmit counter as last seen, when it was seen,
// when it was last seen to grow, and when it was first seen above zero.
type sentMark struct {
	bytes  int64
	looked time.Time // zero: bytes is no baseline to date growth from
	at     time.Time
	// since is dated to the look that saw it, the latest it can have
	// begun: a tunnel is failing only once it has certainly sent 180 s
	// without a handshake. Kept when the counter falls (a greeting
	// re-creates the peer, and is part of the same wait for an answer);
	// a new key is a new peer, and a new wait.
	since time.Time
}

// noteSent records the peers' transmit counters and returns, per peer,
// when each was last seen to grow and first seen to send (SentSince). The
// reconciler calls it every time it reads the device, and Status too; it
// may be called from both at once.
//
// Growth is dated to the look before the one that saw it: the earliest
// it can have been sent. Dated to the look that saw it, traffic an hour
// old, first seen by a status after a quiet hour, read as sent now, and
// a tunnel idle since its last handshake as failing (STALE, its site
// unreachable). A counter seen for the first time, whatever it holds,
// says nothing of when it was sent: the next growth will.
func (g *Gateway) noteSent(peers []wgtypes.Peer) map[certs.WGPublicKey]sentMark {
	now := g.now()
	g.sentMu.Lock()
	defer g.sentMu.Unlock()
	next := make(map[certs.WGPublicKey]sentMark, len(peers)) // peers gone are forgotten
	for _, p := range peers {
		k := certs.WGPublicKey(p.PublicKey)
		m, seen := g.sent[k]
		switch {
		case !seen:
			m = sentMark{bytes: p.TransmitBytes, looked: now}
		case p.TransmitBytes < m.bytes:
			// The peer was configured anew (counting restarts), or these
			// peers were read before the last ones noted (the reconciler
			// and a status read the device at once): either way the next
			// look's growth, back to the count already seen, is no
			// sending. When it last grew is still when it last grew.
			m.bytes, m.looked = p.TransmitBytes, time.Time{}
		default:
			if p.TransmitBytes > m.bytes && !m.looked.IsZero() {
				m.at = m.looked
			}
			m.bytes, m.looked = p.TransmitBytes, now
		}
		if m.since.IsZero() && (p.TransmitBytes > 0 || p.PersistentKeepaliveInterval > 0) {
			m.since = now
		}
		next[k] = m
	}
	g.sent = next
	return next // no look writes to it again: each makes its own
}
