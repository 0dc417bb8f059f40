package mesh

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// A burst site is a site that exists for a while: cloud servers rented
// for an hour. A gateway that holds the mesh CA opens it (`skybridge burst
// up`), hands out one single-use join token per gateway the site will
// run, enrols each fresh gateway that presents one, and closes the site at
// its end (TTL or `skybridge burst down`) by revoking every certificate it
// issued there. This file is the record of bursts and its rules, free of
// I/O so they can be table-tested; enroll.go serves it.

// BurstSite is what a burst site is: where it runs and what it routes.
// A request, the enrolling gateway's record and `burst list` all carry it.
type BurstSite struct {
	Site         string            `json:"site"`
	Provider     string            `json:"provider"`
	Region       string            `json:"region"`
	Jurisdiction string            `json:"jurisdiction"`
	Routes       []string          `json:"routes"`
	Labels       map[string]string `json:"labels,omitempty"`
}

// BurstRequest asks for a burst site.
type BurstRequest struct {
	BurstSite
	TTL      time.Duration `json:"ttl"`                 // the site's lifetime
	TokenTTL time.Duration `json:"token_ttl,omitempty"` // how long a token may wait to be used; default DefaultTokenTTL
	Gateways int           `json:"gateways,omitempty"`  // tokens to make (gateways the site runs); default 1
	// VaultToken is an operator's Vault token for a Vault-backed gateway
	// to set the burst up with (roles, policy, AppRole). It is used for
	// this request only: never stored, never logged.
	VaultToken string `json:"vault_token,omitempty"`
}

// plainBurstRequest is a BurstRequest without its methods, to print.
type plainBurstRequest BurstRequest

// redacted is r with its Vault token replaced by a placeholder.
func (r BurstRequest) redacted() plainBurstRequest {
	if r.VaultToken != "" {
		r.VaultToken = "[redacted]"
	}
	return plainBurstRequest(r)
}

// Format prints the request without its Vault token, for every verb.
func (r BurstRequest) Format(f fmt.State, _ rune) { fmt.Fprintf(f, "%+v", r.redacted()) }

// LogValue logs the request without its Vault token.
func (r BurstRequest) LogValue() slog.Value { return slog.AnyValue(r.redacted()) }

// Limits of a burst request.
const (
	DefaultTokenTTL = 30 * time.Minute
	MaxBurstTTL     = 7 * 24 * time.Hour
	MinBurstTTL     = 30 * time.Second
	// MaxBurstGateways is the most gateways (join tokens) a burst site
	// may run.
	MaxBurstGateways = 64
	// burstNameRoom leaves room in a 63-character node name for the
	// "-gwNN" suffix of the burst's gateways.
	burstNameRoom = 58
	// endedKept is how long an ended burst stays in the record (and in
	// `skybridge burst list`) before it is dropped.
	endedKept = 7 * 24 * time.Hour
)

// Check validates what the request says by itself, as the gateway will
// (which checks it again against the mesh's overlay range), so that
// `skybridge burst up` refuses a mistake as one, before asking a gateway.
func (r *BurstRequest) Check() error {
	_, err := r.attributes(netip.Prefix{})
	return err
}

// attributes validates the request and returns the attributes its
// gateways will be certified with (node and overlay IP are placeholders:
// each gateway gets its own at enrollment). Without a mesh prefix
// nothing is checked against it.
func (r *BurstRequest) attributes(meshPrefix netip.Prefix) (certs.Attributes, error) {
	overlay := meshPrefix.Addr().Next()
	if !meshPrefix.IsValid() {
		overlay = netip.IPv4Unspecified().Next()
	}
	var errs []error
	tooMany := len(r.Labels) >= certs.MaxLabels
	if tooMany {
		errs = append(errs, fmt.Errorf("%d labels given; at most %d, as skybridge adds %s to a burst's", len(r.Labels), certs.MaxLabels-1, certs.BurstLabel))
	}
	labels := map[string]string{certs.BurstLabel: "true"}
	for k, v := range r.Labels {
		if strings.HasPrefix(k, "skybridge/") {
			errs = append(errs, fmt.Errorf("label %q: labels under skybridge/ are set by skybridge, not given", k))
			continue
		}
		labels[k] = v
	}
	a := certs.Attributes{
		Node: "placeholder", Site: r.Site, Region: r.Region, Provider: r.Provider, Jurisdiction: r.Jurisdiction,
		OverlayIP: overlay, Labels: labels,
	}
	routes, err := certs.ParseRoutes(r.Routes)
	if err != nil {
		errs = append(errs, err)
	}
	a.Routes = routes
	a.Normalize()
	if len(r.Routes) == 0 {
		errs = append(errs, errors.New("a burst site needs --routes: the prefixes of the servers behind its gateways"))
	}
	v := a
	if tooMany {
		v.Labels = nil // said above, counting the label skybridge adds
	}
	// Judged under its gateways' longest name: the advert's size counts
	// it (a bad site name is said as such, not again as a node's).
	if n := burstNodeName(r.Site, max(r.Gateways, 1)-1); certs.ValidName(n) {
		v.Node = n
	}
	if err := v.Validate(meshPrefix); err != nil {
		errs = append(errs, err)
	}
	if len(r.Site) > burstNameRoom {
		errs = append(errs, fmt.Errorf("site name %q is longer than %d characters: its gateways are named SITE-gwN", r.Site, burstNameRoom))
	}
	switch {
	case r.TTL < MinBurstTTL:
		errs = append(errs, fmt.Errorf("--ttl %s is too short: at least %s", r.TTL, MinBurstTTL))
	case r.TTL > MaxBurstTTL:
		errs = append(errs, fmt.Errorf("--ttl %s is too long for a burst: at most %s (a lasting site gets its identities from `skybridge ca issue`)", r.TTL, MaxBurstTTL))
	}
	if r.TokenTTL < 0 || (r.TokenTTL > 0 && r.TokenTTL < time.Second) {
		errs = append(errs, fmt.Errorf("--token-ttl %s: use a positive duration of at least 1s", r.TokenTTL))
	}
	if r.Gateways < 0 || r.Gateways > MaxBurstGateways {
		errs = append(errs, fmt.Errorf("--gateways %d: use 1 to %d", r.Gateways, MaxBurstGateways))
	}
	return a, errors.Join(errs...)
}

// BurstLife is when a burst site was opened, is due to end, and ended.
type BurstLife struct {
	Created   time.Time  `json:"created"`
	Expires   time.Time  `json:"expires"`
	Ended     *time.Time `json:"ended,omitempty"`
	EndReason string     `json:"end_reason,omitempty"`
}

// burstRecord is one burst site as the enrolling gateway keeps it.
type burstRecord struct {
	BurstSite
	BurstLife
	Tokens []burstToken `json:"tokens"`
	// Vault bursts: Vault admits the gateways (their tokens' Node and
	// OverlayIP are assigned at burst up, Used stays unknown);
	// VaultCleaned once burst down removed the burst's Vault objects.
	Vault        bool `json:"vault,omitempty"`
	VaultCleaned bool `json:"vault_cleaned,omitempty"`
	// VaultClaim is the burst's claim on its site in Vault: burst down
	// touches the site only while Vault still holds this claim.
	VaultClaim string `json:"vault_claim,omitempty"`
	// VaultPlace is where the burst's Vault objects are (nil in records
	// made before it was kept: the gateway's settings then say).
	VaultPlace *certs.VaultBurstPlace `json:"vault_place,omitempty"`
	// CertsRevoked once the embedded CA revoked the certificates of an
	// ended burst; until then `burst down` may try again.
	CertsRevoked bool `json:"certs_revoked,omitempty"`
}

// burstToken is one join token: its hash, never its secret.
type burstToken struct {
	ID        string     `json:"id"`
	Hash      string     `json:"sha256"`
	Expires   time.Time  `json:"expires"`
	Used      *time.Time `json:"used,omitempty"`
	Node      string     `json:"node,omitempty"`
	OverlayIP string     `json:"overlay_ip,omitempty"`
	Serial    string     `json:"serial,omitempty"`
	// Key is the SHA-256 of the public key certified (hex): the gateway
	// that lost the answer asks again with the same key and token.
	Key string `json:"key_sha256,omitempty"`
	// Cert is the certificate issued (DER), sent again to the key that
	// asks again: a new one would supersede it, each on the mesh's
	// revocation list until the burst ends, as often as the holder of
	// the token and key liked. Records of earlier releases have none.
	Cert []byte `json:"cert,omitempty"`
}

// issued returns the certificate kept for the token if it is the one
// recorded for key, nil if none is kept.
func (t *burstToken) issued(key string) *x509.Certificate {
	if len(t.Cert) == 0 {
		return nil
	}
	c, err := x509.ParseCertificate(t.Cert)
	if err != nil || certs.FormatSerial(c.SerialNumber) != t.Serial {
		return nil
	}
	if sum := sha256.Sum256(c.RawSubjectPublicKeyInfo); hex.EncodeToString(sum[:]) != key {
		return nil
	}
	return c
}

// forgetIssued drops the certificate and key kept for each token to be
// asked again: once a burst has ended, redeem answers every token of it
// "ended" before it looks at them, and its revocation goes by the
// serials. Kept, they were most of the record (its certificate is 1 KB
// a token), for the week an ended burst is listed, and the whole record
// is rewritten at every enrollment.
func (r *burstRecord) forgetIssued() {
	for i := range r.Tokens {
		r.Tokens[i].Cert, r.Tokens[i].Key = nil, ""
	}
}

func (r *burstRecord) active(now time.Time) bool { return r.Ended == nil && now.Before(r.Expires) }

// burstBook is every burst this gateway opened.
type burstBook struct {
	Bursts []*burstRecord `json:"bursts"`
}

// find returns the newest record of site that has not ended, or nil.
func (b *burstBook) find(site string) *burstRecord {
	for i := len(b.Bursts) - 1; i >= 0; i-- {
		if r := b.Bursts[i]; r.Site == site && r.Ended == nil {
			return r
		}
	}
	return nil
}

// check refuses a burst whose site is open already, or whose routes
// overlap those of an open burst (whose gateways may not have joined yet).
func (b *burstBook) check(a certs.Attributes) error {
	if r := b.find(a.Site); r != nil {
		return fmt.Errorf("burst site %s is already open (until %s): end it first with `skybridge burst down --site %s`",
			a.Site, r.Expires.UTC().Format(time.RFC3339), a.Site)
	}
	for _, r := range b.Bursts {
		if r.Ended != nil {
			continue
		}
		for _, rs := range r.Routes {
			o, err := netip.ParsePrefix(rs)
			if err != nil {
				continue
			}
			for _, p := range a.Routes {
				if p.Overlaps(o) {
					return fmt.Errorf("route %s overlaps %s of open burst site %s: a burst site needs prefixes of its own", p, o, r.Site)
				}
			}
		}
	}
	return nil
}

// open records a new burst with its tokens.
func (b *burstBook) open(req BurstRequest, attrs certs.Attributes, tokens []*certs.JoinToken, now time.Time) (*burstRecord, error) {
	if err := b.check(attrs); err != nil {
		return nil, err
	}
	r := &burstRecord{
		BurstSite: BurstSite{Site: attrs.Site, Provider: attrs.Provider, Region: attrs.Region, Jurisdiction: attrs.Jurisdiction, Labels: attrs.Labels},
		BurstLife: BurstLife{Created: now.UTC(), Expires: now.Add(req.TTL).UTC()},
	}
	for _, p := range attrs.Routes {
		r.Routes = append(r.Routes, p.String())
	}
	for _, t := range tokens {
		bt := burstToken{ID: t.ID, Expires: t.Expires.UTC()}
		if v := t.Vault; v != nil {
			// Vault admits the gateway (its wrapped SecretID is the
			// secret); we only assign its name and address.
			r.Vault, bt.Node, bt.OverlayIP = true, v.Node.Node, v.Node.OverlayIP.String()
		} else {
			h := t.SecretHash()
			bt.Hash = hex.EncodeToString(h[:])
		}
		r.Tokens = append(r.Tokens, bt)
	}
	b.Bursts = append(b.Bursts, r)
	return r, nil
}

// errToken is what a newcomer hears for a token that does not exist or
// whose secret is wrong: the same words, so probing learns nothing.
var errToken = errors.New("join token not recognised by this gateway: check that you copied it whole, or ask for a new one with `skybridge burst up`")

// redeem checks a token and returns its burst and index. It does not mark
// it used: the caller does, once the certificate exists. again says the
// token was used already, by the same key (key: the hex SHA-256 of the
// public key asked for): the gateway lost the answer — to a crash, to the
// network — and asks again within the token's life, which is answered,
// with the same certificate, rather than held against it.
func (b *burstBook) redeem(id string, secret []byte, key string, now time.Time) (_ *burstRecord, _ int, again bool, _ error) {
	for _, r := range b.Bursts {
		for i, t := range r.Tokens {
			if t.ID != id {
				continue
			}
			h, err := hex.DecodeString(t.Hash)
			if err != nil || len(h) != 32 || !certs.MatchesSecretHash(secret, [32]byte(h)) {
				return nil, 0, false, errToken
			}
			switch {
			case r.Ended != nil:
				return nil, 0, false, fmt.Errorf("burst site %s ended at %s (%s): its tokens are void", r.Site, r.Ended.UTC().Format(time.RFC3339), r.EndReason)
			case !now.Before(r.Expires):
				return nil, 0, false, fmt.Errorf("burst site %s expired at %s: its tokens are void", r.Site, r.Expires.UTC().Format(time.RFC3339))
			case !now.Before(t.Expires):
				return nil, 0, false, fmt.Errorf("join token %s expired at %s: ask for a new one with `skybridge burst up`", t.ID, t.Expires.UTC().Format(time.RFC3339))
			case t.Used != nil && (t.Key == "" || t.Key != key):
				return nil, 0, false, fmt.Errorf("join token %s was already used at %s (by gateway %s): a token enrols one gateway once; ask for a new one with `skybridge burst up`",
					t.ID, t.Used.UTC().Format(time.RFC3339), t.Node)
			}
			return r, i, t.Used != nil, nil
		}
	}
	return nil, 0, false, errToken
}

// end closes a burst and returns the serials of the certificates it
// issued, to be revoked.
func (r *burstRecord) end(reason string, now time.Time) []string {
	if r.Ended == nil {
		t := now.UTC()
		r.Ended, r.EndReason = &t, reason
	}
	r.forgetIssued()
	var serials []string
	for _, t := range r.Tokens {
		if t.Serial != "" {
			serials = append(serials, t.Serial)
		}
	}
	return serials
}

// strays returns the serials of certificates the CA's index shows it
// issued for the burst's site during the burst that the burst's record
// does not name: issued, and the record not saved (a crash between the
// two; the newcomer then retries its token and gets another). Ending the
// burst revokes them with the rest. Only certificates issued between the
// burst's opening (less the CA's backdating and clock skew) and its end
// count, so a later burst of the same name is not touched, and only
// those of the burst's own node names.
func (r *burstRecord) strays(issued []certs.IssuedCert, now time.Time) []string {
	named, ours := map[string]bool{}, map[string]bool{}
	for i, t := range r.Tokens {
		named[t.Serial], ours[r.nodeName(i)] = true, true
	}
	from := r.Created.Add(-certs.MaxClockSkew)
	var out []string
	for _, c := range issued {
		if c.Site != r.Site || !ours[c.Node] || c.Kind != certs.KindGateway && c.Kind != "" || c.RevokedAt != nil || !c.NotAfter.After(now) ||
			named[c.Serial] || c.NotBefore.Before(from) || r.Ended != nil && !c.NotBefore.Before(*r.Ended) {
			continue
		}
		out = append(out, c.Serial)
	}
	return out
}

// burstNamesFree refuses a burst site whose name, or one of whose gateways'
// names, a valid certificate of the CA holds: a lasting site whose
// gateways are offline (the mesh does not see them) would be
// impersonated, and its certificates revoked at the burst's end.
func burstNamesFree(issued []certs.IssuedCert, site string, gateways int, now time.Time) error {
	names := map[string]bool{}
	for i := range gateways {
		names[burstNodeName(site, i)] = true
	}
	for _, c := range issued {
		if c.Kind != certs.KindGateway && c.Kind != "" || c.RevokedAt != nil || !c.NotAfter.After(now) {
			continue
		}
		switch {
		case c.Site == site:
			return fmt.Errorf("site %s has a gateway certified by this CA (%s, serial %s, valid until %s), though it may be offline: a burst site takes a name of its own", site, c.Node, c.Serial, c.NotAfter.Format(time.RFC3339))
		case names[c.Node]:
			return fmt.Errorf("node name %s, which the burst's gateways would take, is certified by this CA for site %s (serial %s, valid until %s): a burst site takes a name of its own", c.Node, c.Site, c.Serial, c.NotAfter.Format(time.RFC3339))
		}
	}
	return nil
}

// due returns the bursts that have run out and are not ended yet, and
// those ended whose certificates the embedded CA has yet to revoke while
// they are still valid: the end is recorded before the revocation, and a
// stop in between (a crash, a kill) would otherwise leave a burst ended
// early by burst down with its gateways certified until its expiry.
func (b *burstBook) due(now time.Time) []*burstRecord {
	var out []*burstRecord
	for _, r := range b.Bursts {
		if r.Ended == nil && !now.Before(r.Expires) || r.Ended != nil && !r.Vault && !r.CertsRevoked && now.Before(r.Expires) {
			out = append(out, r)
		}
	}
	return out
}

// prune drops bursts that ended long ago.
func (b *burstBook) prune(now time.Time) bool {
	n := len(b.Bursts)
	b.Bursts = slices.DeleteFunc(b.Bursts, func(r *burstRecord) bool {
		// A Vault burst whose Vault objects were not removed is kept
		// until `burst down` removes them (that takes an operator's
		// token): until then its site cannot be opened again, and
		// only this record lets burst down find it.
		return r.Ended != nil && now.Sub(*r.Ended) > endedKept && !r.vaultLeft()
	})
	return len(b.Bursts) != n
}

// workLeft reports whether an ended burst still needs `burst down`: a
// Vault burst whose Vault objects were not removed, or a burst whose
// certificates could not be revoked.
func (r *burstRecord) workLeft() bool {
	return r.vaultLeft() || !r.Vault && !r.CertsRevoked
}

// vaultLeft reports whether a Vault burst's Vault objects are still there.
func (r *burstRecord) vaultLeft() bool { return r.Vault && !r.VaultCleaned }

// vaultUnreachable says why this gateway cannot remove the Vault objects
// the burst left, and what the operator can do instead; nil if it can, or
// none are left. here is where the gateway's settings put a burst's
// objects now (nil if it is not Vault-backed).
func (r *burstRecord) vaultUnreachable(here *certs.VaultBurstPlace, now time.Time) error {
	if !r.vaultLeft() {
		return nil
	}
	var why string
	switch {
	case here == nil:
		why = fmt.Sprintf("burst site %s was opened with Vault, and its Vault objects remain, but this gateway is not Vault-backed now: run burst down here once it is again", r.Site)
	case r.VaultPlace == nil: // recorded before places were: assume they are the same
		return nil
	default:
		changes := r.VaultPlace.Changes(*here)
		if len(changes) == 0 {
			return nil
		}
		why = fmt.Sprintf("burst site %s was opened with other Vault settings than this gateway has now (%s), and burst down would look for its objects in the wrong place: restore the settings and run burst down again", r.Site, strings.Join(changes, "; "))
	}
	if r.VaultPlace == nil {
		return fmt.Errorf("%s, or remove its objects by hand: the claim with `vault kv metadata delete <kv mount>/<kv prefix>/bursts/%s` (a plain `vault kv delete` keeps it, and it blocks the site), the PKI role, policy and AppRole <kv prefix>-burst-%s, and its gateways' WireGuard keys under <kv prefix>/nodes", why, r.Site, r.Site)
	}
	var nodes []string
	for _, t := range r.Tokens {
		nodes = append(nodes, t.Node)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s, or remove its objects by hand:", why)
	for _, c := range r.VaultPlace.RemovalCommands(r.Site, nodes) {
		b.WriteString("\n  " + c)
	}
	if now.Before(r.Expires) {
		fmt.Fprintf(&b, "\nIts gateways' certificates stay valid until %s unless revoked: `vault write %s/revoke serial_number=<serial>` for each certificate of site %s in `vault list %s/certs`, then `vault read %s/crl/rotate`.",
			r.Expires.Format(time.RFC3339), r.VaultPlace.PKIMount, r.Site, r.VaultPlace.PKIMount, r.VaultPlace.PKIMount)
	}
	return errors.New(b.String())
}

// nodeName names the i-th gateway of a burst.
func (r *burstRecord) nodeName(i int) string { return burstNodeName(r.Site, i) }

func burstNodeName(site string, i int) string { return fmt.Sprintf("%s-gw%d", site, i+1) }

// pickOverlayIP returns the highest address of prefix that is not used,
// skipping the prefix's first and last address. Burst gateways take
// addresses from the top of the range because operators number their
// lasting gateways from the bottom.
func pickOverlayIP(prefix netip.Prefix, used map[netip.Addr]bool) (netip.Addr, error) {
	first := prefix.Masked().Addr()
	last := lastAddr(prefix)
	for a, n := last.Prev(), 0; a.IsValid() && a.Compare(first) > 0 && n < 1<<20; a, n = a.Prev(), n+1 {
		if !used[a] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("no free overlay address left in %s for a burst gateway", prefix)
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

const fileBursts = "bursts.json"

func (d stateDir) loadBursts() (*burstBook, error) {
	var bk burstBook
	if _, err := atomicfile.ReadJSON(d.path(fileBursts), &bk); errors.Is(err, atomicfile.ErrDamaged) {
		return nil, fmt.Errorf("%w; it records the burst sites this gateway opened, which tokens were used and the overlay addresses given out, so it is not rewritten: restore it from a backup (or repair it: JSON). Removed, open bursts are forgotten — their gateways stay until their certificates expire, `burst down` cannot end them, and with Vault their addresses may be given out again", err)
	} else if err != nil {
		return nil, err
	}
	// Bursts ended by an earlier release still hold them: dropped at the
	// next save.
	for _, r := range bk.Bursts {
		if r.Ended != nil {
			r.forgetIssued()
		}
	}
	return &bk, nil
}

func (d stateDir) saveBursts(bk *burstBook) error {
	return atomicfile.WriteJSON(d.path(fileBursts), bk, 0o600)
}
