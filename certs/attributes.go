package certs

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/iso3166"
)

// AttributeURIScheme is the URI scheme of the SAN that carries a gateway's
// attributes in its certificate:
//
//	skybridge://SITE/NODE?provider=P&region=R&jurisdiction=CC&route=CIDR&label.K=V
//
// A URI SAN (rather than a private X.509 extension) is used because Vault's
// PKI engine can put one into a certificate under a role's allowed_uri_sans
// glob, so the embedded CA and Vault issue byte-for-byte the same kind of
// certificate and one verifier serves both. The overlay IP is an ordinary IP
// SAN, and the node name is also the subject common name.
const AttributeURIScheme = "skybridge"

// Limits that keep a signed advert inside memberlist's 512-byte node meta.
const (
	maxNameLen = 63
	maxRoutes  = 32
	maxLabels  = 32
	// MaxLabels is how many labels a certificate may carry.
	MaxLabels = maxLabels
	// BurstLabel marks the certificate of a burst gateway (value "true"),
	// set by the gateway that opens the burst: a burst gateway runs on
	// rented servers for hours, and some acts are not left to it (the
	// gossip keyring is changed only by gateways without it). Labels
	// under "skybridge/" are skybridge's own.
	BurstLabel   = "skybridge/burst"
	maxEndpoints = 8
)

// Attributes are the facts about a gateway that the mesh CA vouches for.
// Everything the residency policy or the topology relies on is here, so a
// gateway cannot claim to be somewhere it is not.
type Attributes struct {
	Node         string            `json:"node"`
	Site         string            `json:"site"`
	Region       string            `json:"region"`
	Provider     string            `json:"provider"`
	Jurisdiction string            `json:"jurisdiction"` // ISO 3166-1 alpha-2
	OverlayIP    netip.Addr        `json:"overlay_ip"`
	Routes       []netip.Prefix    `json:"routes,omitempty"` // prefixes routed behind this gateway's site
	Labels       map[string]string `json:"labels,omitempty"` // free-form site labels, e.g. tier=gold, classes=pii-eu
}

// IsBurst reports whether a certifies a burst gateway: one whose
// certificate carries the burst label, whatever its value (a label set by
// hand counts as the mesh counts it).
func (a *Attributes) IsBurst() bool { return a.Labels[BurstLabel] != "" }

var (
	nameRE     = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	labelKeyRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$`)
	labelValRE = regexp.MustCompile(`^[A-Za-z0-9._:/+@,-]{0,255}$`)
)

// ValidName reports whether s can be a node, site, region or provider
// name; ValidLabelKey and ValidLabelValue whether it can be a site label's
// key or value. A policy uses them to refuse values no certified gateway
// can carry, which would never match.
func ValidName(s string) bool       { return nameRE.MatchString(s) }
func ValidLabelKey(s string) bool   { return labelKeyRE.MatchString(s) }
func ValidLabelValue(s string) bool { return labelValRE.MatchString(s) }

// Validate checks every attribute and says which one is wrong and how to fix
// it. meshPrefix, if valid, is the overlay range the overlay IP must be in.
// It refuses too a set whose gateway's advert could be too large for
// gossip, which the gateway finds out only at its start.
func (a *Attributes) Validate(meshPrefix netip.Prefix) error {
	errs := a.problems(meshPrefix)
	if len(errs) == 0 {
		// Not said beside another error: the size is of names and
		// routes that may yet change for it.
		if n, err := a.largestAdvert(); err != nil {
			errs = append(errs, err)
		} else if n > MaxAdvertSize {
			fix := fmt.Sprintf("shorten the node, site, region or provider names (%d bytes together)", len(a.Node)+len(a.Site)+len(a.Region)+len(a.Provider))
			if len(a.Routes) > 0 {
				fix += fmt.Sprintf(" or aggregate the routes (%d, taking %d bytes)", len(a.Routes), routesSize(a.Routes))
			}
			errs = append(errs, fmt.Errorf("the gateway's advert could reach %d bytes, %d more than the %d gossip carries (during a WireGuard key rotation, under load, even with a single IPv4 endpoint), and the gateway would refuse to start: %s",
				n, n-MaxAdvertSize, MaxAdvertSize, fix))
		}
	}
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	return errors.Join(errs...)
}

// rangeEnd refuses the first or last address of an IPv4 mesh range as a
// new gateway's overlay IP: the gateway puts its address on its interface
// with the whole range, whose last address is then the interface's
// broadcast address, which no peer can connect to (the first is the
// network's, by custom unused). Of an IPv6 range the first is refused: it
// is the Subnet-Router anycast address (RFC 4291), which Linux delivers
// locally on every gateway with forwarding on. Burst gateways and ca
// init's count leave them out. A gateway that had the address keeps it (a
// renewal, by renew_from, ca_dir or ca issue again).
func rangeEnd(ip netip.Addr, meshPrefix netip.Prefix) error {
	if !meshPrefix.IsValid() || !meshPrefix.Contains(ip) {
		return nil
	}
	first := meshPrefix.Masked().Addr()
	if ip.Is6() && meshPrefix.Bits() < 127 && ip == first {
		return fmt.Errorf("overlay IP %s is the first address of the mesh overlay range %s, its Subnet-Router anycast address, which every gateway takes for its own: pick another, such as %s", ip, meshPrefix, first.Next())
	}
	if !ip.Is4() || meshPrefix.Bits() > 30 {
		return nil
	}
	b := first.As4()
	host := uint32(1)<<(32-meshPrefix.Bits()) - 1
	n := (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) | host
	last := netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
	switch ip {
	case first:
		return fmt.Errorf("overlay IP %s is the first address of the mesh overlay range %s, its network's: pick one between %s and %s", ip, meshPrefix, first.Next(), last.Prev())
	case last:
		return fmt.Errorf("overlay IP %s is the last address of the mesh overlay range %s, its broadcast address, which peers cannot connect to: pick one between %s and %s", ip, meshPrefix, first.Next(), last.Prev())
	}
	return nil
}

// ValidateCertified is Validate without the advert's size, for a
// certificate already issued: one from before Validate counted the advert
// may be a running gateway's, of an earlier release whose adverts (with
// no proof of its WireGuard key) fit, and its peers judge the adverts it
// signs.
func (a *Attributes) ValidateCertified(meshPrefix netip.Prefix) error {
	errs := a.problems(meshPrefix)
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	return errors.Join(errs...)
}

// largestAdvert is what the largest advert of a gateway with these
// attributes takes (LargestSize) at the least: a gateway's start refuses
// more. With the fewest endpoints it can run with, one IPv4 address (its
// configuration is not known here), a version and time of this century
// (they count milliseconds; an advert's grow a byte around 2109), a next
// WireGuard key, the key's proof, the largest load and the longest
// signature. At the least, not at the most: a renewal of a certificate
// whose gateway runs is never refused for it.
func (a *Attributes) largestAdvert() (int, error) {
	ms := advertMillisBound.UnixMilli()
	ad := Advert{
		Version: uint64(ms), Timestamp: advertMillisBound,
		Node: a.Node, Site: a.Site, Region: a.Region, Provider: a.Provider, Jurisdiction: a.Jurisdiction,
		OverlayIP: a.OverlayIP, Routes: a.Routes,
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.IPv4Unspecified(), 65535)},
		Load:      math.MaxUint32, NextWireGuardKey: WGPublicKey{1}, WireGuardKeyProof: WGProof{1},
	}
	body, err := ad.appendBody(nil)
	if err != nil {
		return 0, err
	}
	return len(body) + 2 + 72, nil
}

// advertMillisBound is a time as late as an advert's version and
// timestamp, both milliseconds, take as many bytes as now.
var advertMillisBound = time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC)

// routesSize is what routes take in an advert.
func routesSize(routes []netip.Prefix) int {
	if len(routes) == 0 {
		return 0 // the field is left out
	}
	var v []byte
	for _, r := range routes {
		v = appendPrefix(v, r)
	}
	return len(appendField(nil, tagRoutes, v))
}

func (a *Attributes) problems(meshPrefix netip.Prefix) []error {
	errs := placeErrors(a.Site, a.Region, a.Provider, a.Jurisdiction, a.Labels)
	if !nameRE.MatchString(a.Node) {
		errs = append(errs, badName("node", a.Node))
	}
	switch {
	case !a.OverlayIP.IsValid():
		errs = append(errs, errors.New("overlay IP is missing"))
	case a.OverlayIP.Zone() != "":
		errs = append(errs, fmt.Errorf("overlay IP %s must not have a zone", a.OverlayIP))
	case a.OverlayIP.Is4In6():
		errs = append(errs, fmt.Errorf("overlay IP %s: write IPv4 addresses in dotted form", a.OverlayIP))
	case meshPrefix.IsValid() && !meshPrefix.Contains(a.OverlayIP):
		errs = append(errs, fmt.Errorf("overlay IP %s is outside the mesh overlay range %s: pick an address inside it", a.OverlayIP, meshPrefix))
	}
	if len(a.Routes) > maxRoutes {
		errs = append(errs, fmt.Errorf("%d routes given; at most %d fit in a gateway's advertisement: aggregate them into larger prefixes", len(a.Routes), maxRoutes))
	}
	for _, r := range a.Routes {
		if !r.IsValid() {
			errs = append(errs, errors.New("a route is not a valid CIDR prefix"))
			continue
		}
		if r.Addr().Is4In6() {
			// One network, two spellings: the kernel and WireGuard
			// know it only as IPv4, and the mesh would never see its
			// configuration match the plan.
			errs = append(errs, fmt.Errorf("route %s is an IPv4 network written as IPv6: write it as IPv4 (%s/%d)", r, r.Addr().Unmap(), max(r.Bits()-96, 0)))
			continue
		}
		if r != r.Masked() {
			errs = append(errs, fmt.Errorf("route %s has host bits set: did you mean %s?", r, r.Masked()))
		}
		if r.Bits() == 0 {
			errs = append(errs, fmt.Errorf("route %s is a default route: a gateway's routes are its site's networks, and a default route into the mesh would take every host's traffic, the tunnels' own included", r))
		}
		if meshPrefix.IsValid() && r.Overlaps(meshPrefix) {
			errs = append(errs, fmt.Errorf("route %s overlaps the mesh overlay range %s: routes are the site networks behind the gateway, not overlay addresses", r, meshPrefix))
		}
	}
	return errs
}

// ValidatePlace checks a site's attributes — its name, region, provider,
// jurisdiction and labels — as a certificate's are checked: a site in an
// inventory, or described on the command line, that no certificate could
// carry would be judged as no gateway ever is.
func ValidatePlace(site, region, provider, jurisdiction string, labels map[string]string) error {
	errs := placeErrors(site, region, provider, jurisdiction, labels)
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	return errors.Join(errs...)
}

func placeErrors(site, region, provider, jurisdiction string, labels map[string]string) []error {
	var errs []error
	for _, f := range [...]struct{ field, v string }{{"site", site}, {"region", region}, {"provider", provider}} {
		if !nameRE.MatchString(f.v) {
			errs = append(errs, badName(f.field, f.v))
		}
	}
	if !iso3166.Valid(jurisdiction) {
		errs = append(errs, fmt.Errorf("jurisdiction %q is not an ISO 3166-1 alpha-2 country code (e.g. CH, DE, US)", jurisdiction))
	}
	if len(labels) > maxLabels {
		errs = append(errs, fmt.Errorf("%d labels given; at most %d are allowed", len(labels), maxLabels))
	}
	for k, v := range labels {
		if !labelKeyRE.MatchString(k) {
			errs = append(errs, fmt.Errorf("label key %q is not valid: use lower-case letters, digits and . _ / -", k))
		}
		if !labelValRE.MatchString(v) {
			errs = append(errs, fmt.Errorf("label %s value %q is not valid: use at most 255 letters, digits and . _ : / + @ , -", k, v))
		}
	}
	return errs
}

func badName(field, v string) error {
	return fmt.Errorf("%s %q is not valid: use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit", field, v)
}

// Normalize puts routes in a canonical order so that equal attribute sets
// encode identically.
func (a *Attributes) Normalize() {
	slices.SortFunc(a.Routes, func(x, y netip.Prefix) int {
		if c := x.Addr().Compare(y.Addr()); c != 0 {
			return c
		}
		return x.Bits() - y.Bits()
	})
	a.Routes = slices.Compact(a.Routes)
}

// Grants reports whether these (certified) attributes allow prefix to be
// advertised: it must lie inside one of the certified routes.
func (a *Attributes) Grants(prefix netip.Prefix) bool {
	for _, r := range a.Routes {
		if r.Bits() <= prefix.Bits() && r.Contains(prefix.Addr()) {
			return true
		}
	}
	return false
}

// Differences lists, for people, where b differs from a: the attribute's
// configuration name, a's value → b's.
func (a *Attributes) Differences(b *Attributes) []string {
	return changed([]field{
		{"name", a.Node, b.Node},
		{"site", a.Site, b.Site},
		{"region", a.Region, b.Region},
		{"provider", a.Provider, b.Provider},
		{"jurisdiction", a.Jurisdiction, b.Jurisdiction},
		{"overlay_ip", a.OverlayIP.String(), b.OverlayIP.String()},
		{"routes", fmt.Sprint(a.Routes), fmt.Sprint(b.Routes)},
		{"labels", fmt.Sprint(a.Labels), fmt.Sprint(b.Labels)},
	})
}

// field is one named setting in two versions of something.
type field struct{ name, was, is string }

// changed lists, for people, the fields whose two versions differ, as
// `name "was" → "is"` (nil if none does).
func changed(fs []field) []string {
	var out []string
	for _, f := range fs {
		if f.was != f.is {
			out = append(out, fmt.Sprintf("%s %q → %q", f.name, f.was, f.is))
		}
	}
	return out
}

// Equal reports whether two attribute sets are the same.
func (a *Attributes) Equal(b *Attributes) bool {
	if a.Node != b.Node || a.Site != b.Site || a.Region != b.Region || a.Provider != b.Provider ||
		a.Jurisdiction != b.Jurisdiction || a.OverlayIP != b.OverlayIP || !slices.Equal(a.Routes, b.Routes) ||
		len(a.Labels) != len(b.Labels) {
		return false
	}
	for k, v := range a.Labels {
		if bv, ok := b.Labels[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

// URI encodes the attributes (all but the overlay IP, which is an IP SAN) as
// the certificate's attribute URI, in a canonical order.
func (a *Attributes) URI() *url.URL { return a.uri(false) }

// PinnedURI is URI naming the overlay IP too (ip=…), for a CA that pins
// URIs but cannot pin IP SANs — a Vault burst role pins each gateway's
// whole URI — since a certificate whose URI names an address must carry
// that one (AttributesOf). Not the default: gateways of releases before
// 2026-11-26 refuse an attribute URI with ip=.
func (a *Attributes) PinnedURI() *url.URL { return a.uri(true) }

func (a *Attributes) uri(pinIP bool) *url.URL {
	q := []string{
		"provider=" + url.QueryEscape(a.Provider),
		"region=" + url.QueryEscape(a.Region),
		"jurisdiction=" + url.QueryEscape(a.Jurisdiction),
	}
	if pinIP && a.OverlayIP.IsValid() {
		q = append(q, "ip="+a.OverlayIP.String())
	}
	for _, r := range a.Routes {
		q = append(q, "route="+r.String())
	}
	keys := make([]string, 0, len(a.Labels))
	for k := range a.Labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		q = append(q, "label."+url.QueryEscape(k)+"="+url.QueryEscape(a.Labels[k]))
	}
	return &url.URL{Scheme: AttributeURIScheme, Host: a.Site, Path: "/" + a.Node, RawQuery: strings.Join(q, "&")}
}

// parseAttributeURI is the inverse of URI. It does not validate values; the
// caller runs Validate on the whole set.
func parseAttributeURI(u *url.URL) (Attributes, error) {
	var a Attributes
	if u.Scheme != AttributeURIScheme {
		return a, fmt.Errorf("URI %q is not a %s attribute URI", u, AttributeURIScheme)
	}
	a.Site = u.Host
	a.Node = strings.TrimPrefix(u.Path, "/")
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return a, fmt.Errorf("attribute URI query: %w", err)
	}
	one := func(k string) (string, error) {
		v := q[k]
		if len(v) != 1 {
			return "", fmt.Errorf("attribute URI must carry exactly one %s, has %d", k, len(v))
		}
		return v[0], nil
	}
	var errs []error
	for k, dst := range map[string]*string{"provider": &a.Provider, "region": &a.Region, "jurisdiction": &a.Jurisdiction} {
		v, err := one(k)
		errs = append(errs, err)
		*dst = v
	}
	if v, ok := q["ip"]; ok {
		ip, err := netip.ParseAddr(v[0])
		if len(v) != 1 || err != nil {
			errs = append(errs, fmt.Errorf("attribute URI ip %q is not one IP address", v))
		}
		a.OverlayIP = ip
	}
	for _, r := range q["route"] {
		p, err := netip.ParsePrefix(r)
		if err != nil {
			errs = append(errs, fmt.Errorf("attribute URI route: %w", err))
			continue
		}
		a.Routes = append(a.Routes, p)
	}
	for k, v := range q {
		switch {
		case k == "provider" || k == "region" || k == "jurisdiction" || k == "route" || k == "ip":
		case strings.HasPrefix(k, "label."):
			if len(v) != 1 {
				errs = append(errs, fmt.Errorf("attribute URI label %s appears %d times", k, len(v)))
				continue
			}
			if a.Labels == nil {
				a.Labels = map[string]string{}
			}
			a.Labels[strings.TrimPrefix(k, "label.")] = v[0]
		default:
			errs = append(errs, fmt.Errorf("attribute URI has unknown key %q", k))
		}
	}
	// Only the one encoding URI makes is accepted: a fragment, user info
	// or a second copy of the query could otherwise hide attributes from
	// a CA that matches the URI as a string (a Vault role's
	// allowed_uri_sans glob) while this parser reads others.
	if err := errors.Join(errs...); err != nil {
		return a, err
	}
	canon := a
	canon.Normalize()
	want := canon.URI()
	if a.OverlayIP.IsValid() {
		want = canon.PinnedURI()
	}
	if got := u.String(); got != want.String() {
		return a, fmt.Errorf("attribute URI %q is not in canonical form (%q)", got, want)
	}
	return a, nil
}

// ParseLabels parses "key=value" strings as given on a command line.
func ParseLabels(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("label %q is not key=value", kv)
		}
		if _, dup := m[k]; dup {
			return nil, fmt.Errorf("label %q given twice", k)
		}
		m[k] = v
	}
	return m, nil
}

// ParseRoutes parses CIDR prefixes as given on a command line, with errors
// that name the bad one.
func ParseRoutes(ss []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(ss))
	for _, s := range ss {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("route %q is not a CIDR prefix such as 10.1.0.0/16: %w", s, err)
		}
		out = append(out, p)
	}
	return out, nil
}
