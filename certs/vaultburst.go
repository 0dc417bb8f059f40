package certs

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	vault "github.com/hashicorp/vault/api"
	"golang.org/x/sync/errgroup"
)

// Burst sites with Vault. Vault, not a gateway, is then what admits a
// burst gateway: `skybridge burst up` (with an operator's Vault token that
// may manage roles, used for that one call and never stored) creates for
// each of the site's gateways a PKI role that certifies exactly that
// gateway's attribute URI, pinned with its overlay address, and ends every
// certificate at the burst's end (not_after); a policy that lets a token
// sign with that role and keep that gateway's WireGuard key; and an
// AppRole bound to that policy whose SecretIDs expire with the burst.
// One gateway each, because burst gateways run on rented servers: one
// that is broken into must not be able to read its siblings' WireGuard
// keys or have certificates issued in their names. Each gateway's join
// token carries its AppRole's role ID and a response-wrapped SecretID:
// Vault lets it be unwrapped once, which is what makes the token
// single-use. The site itself has a PKI role that certifies nothing: it
// marks the site as open in Vault and holds the burst's end, which the
// claim logic below reads.
//
// Each gateway's overlay address is claimed in Vault too, as the site
// is, and for the same reason: any Vault-backed gateway opens bursts, and
// picks addresses from what it sees — its members, its own bursts — which
// leaves out a burst another gateway opened whose servers have not joined
// yet. Both would pin the same addresses in their gateways' roles, and
// the mesh refuses one of each pair. A claim is a KV secret per address
// under the sites' claims (so a token that may claim sites may claim
// addresses), created only if none exists; an address claimed elsewhere
// is skipped for another, unless its claim is stale.

// VaultBurstSpec describes a burst site to Vault.
type VaultBurstSpec struct {
	Site     string
	Nodes    []Attributes // each gateway's attributes, as the enrolling gateway assigned them
	Expires  time.Time    // when every identity of the site ends
	TokenTTL time.Duration
	OpenedBy string // the gateway opening it, named in its claim
	// Readdress gives another overlay address for a gateway of Nodes
	// whose address (taken) a burst opened elsewhere holds in Vault;
	// called one call at a time. Nil: such an address fails the opening.
	Readdress func(taken netip.Addr) (netip.Addr, error)
}

// VaultBurst is what OpenBurst made: per gateway, its AppRole's role ID
// and a wrapped SecretID (secrets: they go into join tokens only).
type VaultBurst struct {
	secret              // the wrapped SecretIDs are never printed or logged
	Name         string // of the site's PKI role
	Gateways     []VaultBurstGateway
	AppRoleMount string
	// Claim identifies this opening's claim on the site: closing or
	// aborting the burst touches the site only while the claim is
	// still this one.
	Claim string
	Place VaultBurstPlace
}

// VaultBurstGateway is what one gateway of a burst logs in and signs with.
type VaultBurstGateway struct {
	secret
	Node            string
	OverlayIP       netip.Addr // claimed in Vault: its node's, or one Readdress gave
	Role            string     // its PKI role, policy and AppRole
	RoleID          string
	WrappedSecretID string
}

// MarshalJSON keeps the wrapped SecretID out of JSON too: slog's JSON
// handler encodes a slice's elements without asking them to redact
// themselves.
func (VaultBurstGateway) MarshalJSON() ([]byte, error) { return json.Marshal(redacted) }

// Nodes names the burst's gateways.
func (b *VaultBurst) Nodes() []string {
	out := make([]string, len(b.Gateways))
	for i, g := range b.Gateways {
		out[i] = g.Node
	}
	return out
}

// VaultBurstPlace is where a burst site's objects live in Vault. The
// gateway records it when the burst opens: its Vault settings may change
// before the burst is closed, and closing with the new ones would look
// for the objects in the wrong place, find none, and leave the old ones —
// an AppRole that can still have certificates issued for the site until
// the burst's end — while reporting the burst closed.
type VaultBurstPlace struct {
	Namespace    string `json:"namespace,omitempty"`
	PKIMount     string `json:"pki_mount"`
	AppRoleMount string `json:"approle_mount"`
	KVMount      string `json:"kv_mount"`
	KVPrefix     string `json:"kv_prefix"`
	Name         string `json:"name"` // of the PKI role and the AppRole (and the policy, in bursts opened before Policy was kept)
	// Policy is the name of the burst's policy: Name and the opening's
	// claim, never used again, so that a token of an ended burst finds
	// no policy of its name when the site is opened anew.
	Policy string `json:"policy,omitempty"`
	// PerGateway: each gateway has a PKI role, a policy and an AppRole
	// of its own (Policy.<node>); bursts opened before 2026-11-27 (third)
	// share the site's.
	PerGateway bool `json:"per_gateway,omitempty"`
}

// BurstPlace is where this gateway's settings put a burst site's objects.
func (v *Vault) BurstPlace(site string) VaultBurstPlace {
	return VaultBurstPlace{Namespace: v.cfg.Namespace, PKIMount: v.cfg.PKIMount, AppRoleMount: v.appRoleMount(),
		KVMount: v.cfg.KVMount, KVPrefix: v.cfg.KVPrefix, Name: v.BurstName(site)}
}

// Changes lists, for people, the settings in which now differs from p
// (nil if none does).
func (p VaultBurstPlace) Changes(now VaultBurstPlace) []string {
	return changed([]field{
		{"namespace", p.Namespace, now.Namespace},
		{"pki_mount", p.PKIMount, now.PKIMount},
		{"AppRole mount", p.AppRoleMount, now.AppRoleMount},
		{"kv_mount", p.KVMount, now.KVMount},
		{"kv_prefix", p.KVPrefix, now.KVPrefix},
		{"object name", p.Name, now.Name},
	})
}

// RemovalCommands are the vault(1) commands that do by hand what closing
// a burst of site does, with nodes its gateways: the AppRole, policy and
// PKI role go first so nothing more can be issued, then the gateways'
// WireGuard keys, then the site's claim (every version: a plain `vault kv
// delete` keeps it, and it blocks the site).
func (p VaultBurstPlace) RemovalCommands(site string, nodes []string) []string {
	ns := ""
	if p.Namespace != "" {
		ns = "VAULT_NAMESPACE=" + p.Namespace + " "
	}
	policy := p.Policy
	if policy == "" {
		policy = p.Name
	}
	var cmds []string
	if p.PerGateway {
		for _, n := range nodes {
			own := policy + "." + n // burstGatewayName
			cmds = append(cmds,
				ns+"vault delete "+path.Join("auth", p.AppRoleMount, "role", own),
				ns+"vault policy delete "+own,
				ns+"vault delete "+path.Join(p.PKIMount, "roles", own))
		}
		cmds = append(cmds, ns+"vault delete "+path.Join(p.PKIMount, "roles", p.Name))
	} else {
		cmds = append(cmds,
			ns+"vault delete "+path.Join("auth", p.AppRoleMount, "role", p.Name),
			ns+"vault policy delete "+policy,
			ns+"vault delete "+path.Join(p.PKIMount, "roles", p.Name))
	}
	for _, n := range nodes {
		cmds = append(cmds, ns+"vault kv metadata delete -mount="+p.KVMount+" "+wgKeyPath(p.KVPrefix, n))
	}
	return append(cmds, ns+"vault kv metadata delete -mount="+p.KVMount+" "+claimPath(p.KVPrefix, site))
}

// BurstName is the name of a burst site's PKI role, policy and AppRole.
func (v *Vault) BurstName(site string) string {
	return strings.ReplaceAll(v.cfg.KVPrefix, "/", "-") + "-burst-" + site
}

// appRoleMount is where burst AppRoles live: the gateway's own AppRole
// mount if it logs in with one, else "approle".
func (v *Vault) appRoleMount() string {
	if v.cfg.Auth.Method == "approle" && v.cfg.Auth.Mount != "" {
		return v.cfg.Auth.Mount
	}
	return "approle"
}

// admin is a client acting with an operator's token.
func (v *Vault) admin(token string) (*vault.Client, error) {
	if token == "" {
		return nil, errors.New("a burst site with Vault needs an operator's Vault token that may manage PKI roles, policies and AppRoles: set VAULT_TOKEN for `skybridge burst`")
	}
	c, err := v.client.CloneWithHeaders() // the namespace is a header
	if err != nil {
		return nil, err
	}
	c.SetToken(token)
	return c, nil
}

// burstPolicy is the name of the policy of a burst opened with claim:
// unique to the opening. Vault does not revoke the tokens an AppRole
// issued when the AppRole is deleted; a token lives on until its TTL (the
// burst's end) with the names of its policies, and would regain their
// rights if a burst of the same site made a policy of the same name.
func burstPolicy(name, claim string) string {
	if claim == "" {
		return name // opened before claims were made
	}
	return name + "-" + claim[:min(len(claim), 12)]
}

// burstGatewayName is the name of the PKI role, the policy and the
// AppRole of the gateway node of the opening with claim of the burst
// whose site's role is name. Node and site names hold no dot, so no
// gateway's is another site's or another gateway's; and the opening's
// claim is in it, because updating an AppRole keeps its role ID and
// SecretIDs: an opening that wrote over another's left-over AppRole of
// the same gateway name (names repeat: SITE-gwN) would let the old
// burst's servers log in with the new burst's rights.
func burstGatewayName(name, claim, node string) string {
	return burstPolicy(name, claim) + "." + node
}

// removeByHand says what to do by hand to end the burst whose site's
// role is name, in the order burst down does it: nothing more issued,
// then what was issued revoked (removing the roles leaves the gateways'
// certificates valid until the burst's end), and the claim last.
func (v *Vault) removeByHand(site, name string) string {
	pki := v.cfg.PKIMount
	return fmt.Sprintf("delete the PKI role %s and the PKI roles, policies and AppRoles named %s-*.* (one per gateway; in bursts opened before 2026-11-27, the policy and AppRole %s); "+
		"revoke its gateways' certificates, which stay valid until the burst's end unless revoked: `vault write %s/revoke serial_number=<serial>` for each certificate of site %s in `vault list %s/certs`, then `vault read %s/crl/rotate`; "+
		"last, `vault kv metadata delete %s`",
		name, name, name, pki, site, pki, pki, v.claimRef(site))
}

// deleteBurstObjects deletes what OpenBurst creates, issuing first: each
// of nodes' AppRole (its SecretIDs with it), policies and PKI role, then
// the site's — and the policies of the opening with claim, which an
// AppRole not yet written names nowhere. The site's AppRole and policy
// are those of bursts opened before gateways had their own. Objects
// already gone are not an error.
func (v *Vault) deleteBurstObjects(ctx context.Context, c *vault.Client, name, claim string, nodes []string) error {
	var g errgroup.Group
	g.SetLimit(burstGrantParallel)
	for _, n := range nodes {
		g.Go(func() error {
			own := burstGatewayName(name, claim, n)
			return v.deleteBurstGrant(ctx, c, own, name, own)
		})
	}
	// The site's role goes last: while it is there, the site is open
	// and a close can be run again.
	if err := g.Wait(); err != nil {
		return err
	}
	expect := []string{name}
	if p := burstPolicy(name, claim); p != name {
		expect = append(expect, p)
	}
	return v.deleteBurstGrant(ctx, c, name, name, expect...)
}

// deleteBurstGrant deletes the AppRole role, the policies its tokens
// carry that are the burst name's own, the expected ones, and the PKI
// role role.
func (v *Vault) deleteBurstGrant(ctx context.Context, c *vault.Client, role, name string, expect ...string) error {
	del := func(p string) error {
		_, err := c.Logical().DeleteWithContext(ctx, p)
		var re *vault.ResponseError
		if err != nil && !(errors.As(err, &re) && re.StatusCode == http.StatusNotFound) {
			return fmt.Errorf("vault delete %s: %w", p, err)
		}
		return nil
	}
	policies := slices.Clone(expect)
	// The AppRole names its tokens' policies: read before it goes. A
	// policy left behind would give back to the ended burst's tokens
	// whatever it still allows, so not knowing its name stops the close
	// before anything is deleted.
	carried, err := v.appRolePolicies(ctx, c, role)
	if err != nil {
		return fmt.Errorf("%w (the operator's token needs read on it, to find the policy its tokens carry)", err)
	}
	for _, p := range carried {
		// Only the burst's own: an AppRole edited by hand to carry
		// other policies must not make the close delete them.
		if strings.HasPrefix(p, name+"-") && !slices.Contains(policies, p) {
			policies = append(policies, p)
		}
	}
	if err := del(path.Join("auth", v.appRoleMount(), "role", role)); err != nil {
		return err
	}
	for _, p := range policies {
		if err := c.Sys().DeletePolicyWithContext(ctx, p); err != nil {
			return fmt.Errorf("vault delete policy %s: %w", p, err)
		}
	}
	return del(path.Join(v.cfg.PKIMount, "roles", role))
}

// burstClaimPath is the KV v2 secret (in the KV mount) that claims a
// burst site from the moment it is opened until it is closed.
func (v *Vault) burstClaimPath(site string) string { return claimPath(v.cfg.KVPrefix, site) }

func claimPath(kvPrefix, site string) string { return path.Join(kvPrefix, "bursts", site) }

// claimRef names a site's claim for people: mount and path.
func (v *Vault) claimRef(site string) string { return v.cfg.KVMount + "/" + v.burstClaimPath(site) }

// ErrBurstSiteReopened is why a burst cannot be closed or aborted: its
// site is claimed by a newer opening, which it could only be once this
// burst's Vault objects were gone.
var ErrBurstSiteReopened = errors.New("burst site opened again")

// releaseBurst deletes a burst site's claim, every version of it, so the
// site can be opened again.
func (v *Vault) releaseBurst(ctx context.Context, c *vault.Client, site string) error {
	if err := c.KVv2(v.cfg.KVMount).DeleteMetadata(ctx, v.burstClaimPath(site)); err != nil {
		return v.claimError(site, err)
	}
	return nil
}

// siteClaim is what a burst site's claim in Vault holds.
type siteClaim struct {
	Nonce   string    // the opening's (VaultBurst.Claim), or unclaimedClose
	Gateway string    // the gateway that opened the burst, or is closing it
	Closing bool      // taken to close a burst (one whose own claim is gone)
	Expires time.Time // the burst's end, as its role's not_after (roleOutlivesClaim compares them); zero when closing
	// Addresses are the overlay addresses the opening claimed for its
	// gateways (none in claims made before addresses were claimed, or
	// taken to close), released when the burst is closed.
	Addresses []netip.Addr
}

// takeClaim claims a site: the claim is created only if none exists
// (check-and-set 0). If another opening holds the site, other is its
// claim. A claim found to be this one already counts as taken: the Vault
// client retries a write whose answer was lost, and the retry finds the
// first attempt's claim.
func (v *Vault) takeClaim(ctx context.Context, c *vault.Client, site string, cl siteClaim) (other *siteClaim, err error) {
	data := map[string]any{"nonce": cl.Nonce, "gateway": cl.Gateway, "closing": cl.Closing}
	if !cl.Expires.IsZero() {
		data["expires"] = cl.Expires.UTC().Format(time.RFC3339)
	}
	for range 3 {
		_, err = c.KVv2(v.cfg.KVMount).Put(ctx, v.burstClaimPath(site), data, vault.WithCheckAndSet(0))
		if err == nil {
			return nil, nil
		}
		if !isCASMismatch(err) {
			return nil, v.claimError(site, err)
		}
		held, ok, err := v.claimOf(ctx, c, site)
		switch {
		case err != nil:
			return nil, err
		case !ok:
			continue // released between the write and the read: try again
		case held.Nonce == cl.Nonce:
			return nil, nil
		}
		return &held, nil
	}
	return nil, fmt.Errorf("burst site %s: its claim %s keeps appearing and going; try again", site, v.claimRef(site))
}

// claimOf reads a site's claim: ok is false if there is none. (A claim
// deleted softly, with `vault kv delete`, reads as one with no fields:
// it still blocks the site.)
func (v *Vault) claimOf(ctx context.Context, c *vault.Client, site string) (cl siteClaim, ok bool, err error) {
	s, err := c.KVv2(v.cfg.KVMount).Get(ctx, v.burstClaimPath(site))
	if errors.Is(err, vault.ErrSecretNotFound) {
		return siteClaim{}, false, nil
	}
	if err != nil {
		return siteClaim{}, false, v.claimError(site, err)
	}
	cl.Nonce, _ = s.Data["nonce"].(string)
	cl.Gateway, _ = s.Data["gateway"].(string)
	cl.Closing, _ = s.Data["closing"].(bool)
	if e, ok := s.Data["expires"].(string); ok {
		cl.Expires, _ = time.Parse(time.RFC3339, e)
	}
	as, _ := s.Data["addresses"].([]any)
	for _, a := range as {
		str, _ := a.(string)
		if a, err := netip.ParseAddr(str); err == nil {
			cl.Addresses = append(cl.Addresses, a)
		}
	}
	return cl, true, nil
}

// releaseIfOurs releases a claim that a failed request may have made
// after all (Vault can commit a write whose caller has gone): looked for
// a few times, as the write may land after the failure was seen.
func (v *Vault) releaseIfOurs(ctx context.Context, c *vault.Client, site, nonce string) error {
	for try := range 3 {
		cl, ok, err := v.claimOf(ctx, c, site)
		switch {
		case err != nil:
			return err
		case ok && cl.Nonce == nonce:
			return v.releaseBurst(ctx, c, site)
		case ok:
			return nil // another's
		}
		if try < 2 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(500 * time.Millisecond):
			}
		}
	}
	return nil
}

// claimError explains a failure to read, write or delete a site's claim.
func (v *Vault) claimError(site string, err error) error {
	dir := path.Dir(v.burstClaimPath(site))
	return fmt.Errorf("vault claim %s of burst site %s (the operator's token needs create, read and update on %s/data/%s/* and delete on %s/metadata/%s/*): %w",
		v.claimRef(site), site, v.cfg.KVMount, dir, v.cfg.KVMount, dir, err)
}

// holder names the gateway a claim says holds a site, and what it does.
func (cl siteClaim) holder() string {
	by := cl.Gateway
	if by == "" {
		by = "unknown"
	}
	if cl.Closing {
		return "is being closed by gateway " + by
	}
	return "is open, or being opened, from gateway " + by
}

// claimRefusal refuses to open a site another holds, and says how to
// free it.
func (v *Vault) claimRefusal(site string, held siteClaim) error {
	return fmt.Errorf("burst site %s %s (Vault holds its claim %s): run `skybridge burst down --site %s` there; if no gateway knows the burst any more, remove what is left of it by hand: %s",
		site, held.holder(), v.claimRef(site), site, v.removeByHand(site, v.BurstName(site)))
}

// holdBurst makes sure a site's Vault objects are this burst's (claim)
// before any of them is deleted: after a burst ended and its site was
// opened again from elsewhere, ending the old one must not tear down the
// new. A site without a claim (a burst opened before claims were made,
// or a close that stopped half-way) is claimed now by gateway by, so
// nobody opens it while it is torn down, with a claim a re-run
// recognises. Either way the caller releases the claim when done.
func (v *Vault) holdBurst(ctx context.Context, c *vault.Client, site, claim, by string, nodes []string) error {
	if claim == "" {
		claim = unclaimedClose
	}
	for try := 1; ; try++ {
		held, ok, err := v.claimOf(ctx, c, site)
		if err != nil {
			return err
		}
		if !ok {
			other, err := v.takeClaim(ctx, c, site, siteClaim{Nonce: claim, Gateway: by, Closing: true})
			if err != nil {
				return err
			}
			if other == nil {
				return nil
			}
			held = *other
		}
		switch {
		case held.Nonce == claim:
			return nil
		case held.Nonce == "":
			// Deleted softly (`vault kv delete`): it still blocks the
			// site, and says nothing of whose it was.
			return fmt.Errorf("burst site %s: its claim %s is empty (deleted with `vault kv delete`, which keeps it); nothing was deleted: remove it with `vault kv metadata delete %s` and run this again", site, v.claimRef(site), v.claimRef(site))
		case held.Closing:
			return fmt.Errorf("burst site %s %s (Vault's claim %s); nothing of it was deleted: try again once that is done", site, held.holder(), v.claimRef(site))
		}
		// Another opening holds the site, which it could take only once
		// this burst's claim was gone: usually because this burst was
		// closed, but a burst opened before claims were made has no
		// claim, nor has one whose claim was deleted by hand. Then the
		// site's role is still this burst's, and the opening, which
		// refuses a site whose role exists, is about to give its claim
		// back: taken for a reopening, this burst would be recorded as
		// ended with its role, policy and AppRole left in Vault.
		stale, err := v.roleOutlivesClaim(ctx, c, site, held)
		if err != nil {
			return err
		}
		if !stale {
			// The AppRole names its opening's policy: still this burst's,
			// the site was not opened again (an opening makes its own
			// after this one's is gone), and the claim was rewritten by
			// someone who may write claims — taken for a reopening, the
			// burst would be recorded as ended and its AppRole left.
			if ours, err := v.appRoleIsOpenings(ctx, c, v.BurstName(site), claim, nodes); err != nil {
				return err
			} else if ours {
				return fmt.Errorf("burst site %s: its claim %s names gateway %s, but its AppRole is still this burst's: the claim was changed outside skybridge; nothing was deleted: remove the claim (`vault kv metadata delete %s`), find out who wrote it, and run burst down again", site, v.claimRef(site), held.Gateway, v.claimRef(site))
			}
			return fmt.Errorf("%w: site %s %s (Vault's claim %s is not this burst's), so this burst's Vault objects were removed already; nothing was deleted", ErrBurstSiteReopened, site, held.holder(), v.claimRef(site))
		}
		if try == holdTries {
			return fmt.Errorf("burst site %s %s (Vault's claim %s), but its PKI role %s is an earlier burst's, so that opening will be refused and give the claim back; nothing was deleted: try again in a moment, and if no gateway is opening the site, delete the claim by hand (`vault kv metadata delete %s`) first", site, held.holder(), v.claimRef(site), v.BurstName(site), v.claimRef(site))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(holdWait):
		}
	}
}

// appRoleIsOpenings reports whether the burst's AppRoles give their
// tokens the policy of the opening with claim: any of nodes' gateways',
// or the site's (name) in a burst opened before gateways had their own.
func (v *Vault) appRoleIsOpenings(ctx context.Context, c *vault.Client, name, claim string, nodes []string) (bool, error) {
	if claim == unclaimedClose {
		return false, nil
	}
	ps, err := v.appRolePolicies(ctx, c, name)
	if err != nil || slices.Contains(ps, burstPolicy(name, claim)) {
		return err == nil, err
	}
	// Every gateway's: a close stopped half-way has removed some.
	for _, n := range nodes {
		own := burstGatewayName(name, claim, n)
		if ps, err := v.appRolePolicies(ctx, c, own); err != nil || slices.Contains(ps, own) {
			return err == nil, err
		}
	}
	return false, nil
}

// appRolePolicies lists the policies the burst AppRole name gives its
// tokens (none if there is no such AppRole).
func (v *Vault) appRolePolicies(ctx context.Context, c *vault.Client, name string) ([]string, error) {
	role := path.Join("auth", v.appRoleMount(), "role", name)
	s, err := c.Logical().ReadWithContext(ctx, role)
	if err != nil {
		return nil, fmt.Errorf("vault read %s: %w", role, err)
	}
	if s == nil {
		return nil, nil
	}
	raw, _ := s.Data["token_policies"].([]any)
	out := make([]string, 0, len(raw))
	for _, p := range raw {
		if p, ok := p.(string); ok {
			out = append(out, p)
		}
	}
	return out, nil
}

// holdTries and holdWait bound how long holdBurst waits for an opening
// that is bound to fail (it reads the role right after taking the claim,
// and releases the claim at once when it exists).
const (
	holdTries = 5 // 2 s in all
	holdWait  = 500 * time.Millisecond
)

// roleOutlivesClaim reports whether the site's PKI role is not the one
// of the opening holding its claim (held), but an earlier burst's. An
// opening writes the burst's end both into its claim and as the role's
// not_after. Without both to compare (a Vault that does not keep
// not_after), the role counts as the opening's.
func (v *Vault) roleOutlivesClaim(ctx context.Context, c *vault.Client, site string, held siteClaim) (bool, error) {
	p := path.Join(v.cfg.PKIMount, "roles", v.BurstName(site))
	s, err := c.Logical().ReadWithContext(ctx, p)
	if err != nil {
		return false, fmt.Errorf("vault read %s: %w", p, err)
	}
	if s == nil || held.Expires.IsZero() {
		return false, nil
	}
	na, _ := s.Data["not_after"].(string)
	end, err := time.Parse(time.RFC3339, na)
	if err != nil {
		return false, nil
	}
	return !end.Equal(held.Expires), nil
}

// unclaimedClose is the claim taken to close a burst opened before
// claims were made.
const unclaimedClose = "closing-unclaimed"

func newClaimNonce() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// addressDir is where, under the sites' claims, the claims of burst
// gateways' overlay addresses are: no site is named so (site names hold
// no underscore).
const addressDir = "_addresses"

func (v *Vault) addressClaimPath(a netip.Addr) string {
	return path.Join(v.cfg.KVPrefix, "bursts", addressDir, a.String())
}

// addressRef names an address's claim for people: mount and path.
func (v *Vault) addressRef(a netip.Addr) string { return v.cfg.KVMount + "/" + v.addressClaimPath(a) }

// addressClaim is what the claim of a burst gateway's overlay address
// holds: whose it is, and until when.
type addressClaim struct {
	Site    string
	Nonce   string // the opening's (VaultBurst.Claim)
	Node    string
	Gateway string    // the gateway that opened the burst
	Expires time.Time // the burst's end: its gateways' certificates end then
}

func (cl addressClaim) data() map[string]any {
	return map[string]any{"site": cl.Site, "nonce": cl.Nonce, "node": cl.Node, "gateway": cl.Gateway,
		"expires": cl.Expires.UTC().Format(time.RFC3339)}
}

func addressClaimOf(data map[string]any) addressClaim {
	var cl addressClaim
	cl.Site, _ = data["site"].(string)
	cl.Nonce, _ = data["nonce"].(string)
	cl.Node, _ = data["node"].(string)
	cl.Gateway, _ = data["gateway"].(string)
	if e, ok := data["expires"].(string); ok {
		cl.Expires, _ = time.Parse(time.RFC3339, e)
	}
	return cl
}

// addressError explains a failure to read, write or delete an address's
// claim: it is one of the sites' claims as far as Vault's rights go.
func (v *Vault) addressError(a netip.Addr, err error) error {
	dir := path.Join(v.cfg.KVPrefix, "bursts")
	return fmt.Errorf("vault claim %s of overlay address %s (the operator's token needs create, read and update on %s/data/%s/* and delete on %s/metadata/%s/*): %w",
		v.addressRef(a), a, v.cfg.KVMount, dir, v.cfg.KVMount, dir, err)
}

// takeAddress claims overlay address a as cl says: the claim is created
// only if none exists (check-and-set 0), or written over a stale one
// (check-and-set its version), so that of two openings wanting a at
// once one gets it. held is the claim that keeps a, if another does. A
// claim found to be this opening's already counts as taken (the Vault
// client retries a write whose answer was lost).
func (v *Vault) takeAddress(ctx context.Context, c *vault.Client, a netip.Addr, cl addressClaim) (held *addressClaim, err error) {
	kv, p := c.KVv2(v.cfg.KVMount), v.addressClaimPath(a)
	cas := 0
	for range 3 {
		_, err := kv.Put(ctx, p, cl.data(), vault.WithCheckAndSet(cas))
		if err == nil {
			return nil, nil
		}
		if !isCASMismatch(err) {
			return nil, v.addressError(a, err)
		}
		s, err := kv.Get(ctx, p)
		switch {
		case errors.Is(err, vault.ErrSecretNotFound):
			cas = 0 // released between the write and the read: try again
			continue
		case err != nil:
			return nil, v.addressError(a, err)
		}
		other := addressClaimOf(s.Data)
		if other.Nonce == cl.Nonce {
			return nil, nil
		}
		stale, err := v.addressStale(ctx, c, other)
		if err != nil {
			return nil, err
		}
		if !stale || s.VersionMetadata == nil {
			return &other, nil
		}
		cas = s.VersionMetadata.Version
	}
	return nil, fmt.Errorf("overlay address %s: its claim %s keeps changing; try again", a, v.addressRef(a))
}

// addressStale reports whether an address's claim no longer keeps the
// address: its burst has ended (and its gateways' certificates with it,
// allowing for clocks), or its site's claim, which an opening takes
// before its addresses' and a close releases after them, is gone or
// another opening's — the burst was closed, or removed by hand. A claim
// deleted softly (`vault kv delete`) reads as one with no fields, which
// says nothing of whose it was: it keeps the address, as it would a site.
func (v *Vault) addressStale(ctx context.Context, c *vault.Client, held addressClaim) (bool, error) {
	switch {
	case held.Nonce == "":
		return false, nil
	case !held.Expires.IsZero() && time.Now().After(held.Expires.Add(MaxClockSkew)):
		return true, nil
	case !nameRE.MatchString(held.Site):
		return false, nil
	}
	site, ok, err := v.claimOf(ctx, c, held.Site)
	if err != nil {
		return false, err
	}
	return !ok || site.Nonce != "" && site.Nonce != held.Nonce, nil
}

// releaseAddress deletes the claim of a if it is still the opening's
// with nonce: one taken over is another burst's. Nor is an ended burst's
// deleted: it is stale, and from then on may be taken over between the
// read and the delete here, which would delete the new burst's.
func (v *Vault) releaseAddress(ctx context.Context, c *vault.Client, a netip.Addr, nonce string) error {
	kv, p := c.KVv2(v.cfg.KVMount), v.addressClaimPath(a)
	s, err := kv.Get(ctx, p)
	if errors.Is(err, vault.ErrSecretNotFound) {
		return nil
	}
	if err != nil {
		return v.addressError(a, err)
	}
	if cl := addressClaimOf(s.Data); cl.Nonce != nonce || !time.Now().Before(cl.Expires) {
		return nil
	}
	if err := kv.DeleteMetadata(ctx, p); err != nil {
		return v.addressError(a, err)
	}
	return nil
}

// releaseAddresses releases the addresses in list claimed by the opening
// with nonce.
func (v *Vault) releaseAddresses(ctx context.Context, c *vault.Client, list []netip.Addr, nonce string) error {
	var g errgroup.Group
	g.SetLimit(burstGrantParallel)
	for _, a := range list {
		g.Go(func() error { return v.releaseAddress(ctx, c, a, nonce) })
	}
	return g.Wait()
}

// releaseClaimedAddresses releases the addresses the site's claim, while
// it is the opening's with nonce, says the opening claimed.
func (v *Vault) releaseClaimedAddresses(ctx context.Context, c *vault.Client, site, nonce string) error {
	cl, ok, err := v.claimOf(ctx, c, site)
	if err != nil || !ok || cl.Nonce != nonce {
		return err
	}
	return v.releaseAddresses(ctx, c, cl.Addresses, nonce)
}

// recordAddresses writes into the site's claim, still the opening's with
// nonce, the addresses its gateways hold, for the close to release.
func (v *Vault) recordAddresses(ctx context.Context, c *vault.Client, site, nonce string, list []netip.Addr) error {
	kv, p := c.KVv2(v.cfg.KVMount), v.burstClaimPath(site)
	strs := make([]any, len(list))
	for i, a := range list {
		strs[i] = a.String()
	}
	for range 3 {
		s, err := kv.Get(ctx, p)
		if err != nil {
			return v.claimError(site, err)
		}
		if n, _ := s.Data["nonce"].(string); n != nonce || s.VersionMetadata == nil {
			return fmt.Errorf("burst site %s: its claim %s changed while the burst was being opened (now: gateway %v); nothing is left of this opening: open it again once the claim is gone",
				site, v.claimRef(site), s.Data["gateway"])
		}
		if got, _ := s.Data["addresses"].([]any); slices.Equal(got, strs) { // a retried write that landed
			return nil
		}
		data := maps.Clone(s.Data)
		data["addresses"] = strs
		_, err = kv.Put(ctx, p, data, vault.WithCheckAndSet(s.VersionMetadata.Version))
		if err == nil {
			return nil
		}
		if !isCASMismatch(err) {
			return v.claimError(site, err)
		}
	}
	return fmt.Errorf("burst site %s: its claim %s keeps changing; try again", site, v.claimRef(site))
}

// burstAddresses claims the overlay addresses of one opening's gateways.
type burstAddresses struct {
	v         *Vault
	c         *vault.Client
	claim     addressClaim // Node is each gateway's
	readdress func(taken netip.Addr) (netip.Addr, error)

	mu    sync.Mutex
	tried []netip.Addr // every address a claim was asked for: an opening that fails releases those that are its own
}

// take claims an address for gateway n: its own, or if a burst opened
// elsewhere holds that, the next Readdress gives.
func (b *burstAddresses) take(ctx context.Context, n Attributes) (netip.Addr, error) {
	cl := b.claim
	cl.Node = n.Node
	a := n.OverlayIP
	for {
		b.mu.Lock()
		b.tried = append(b.tried, a)
		b.mu.Unlock()
		held, err := b.v.takeAddress(ctx, b.c, a, cl)
		if err != nil {
			return netip.Addr{}, err
		}
		if held == nil {
			return a, nil
		}
		whose := fmt.Sprintf("overlay address %s of gateway %s is held by gateway %s of burst site %s, opened from gateway %s until %s (Vault's claim %s)",
			a, n.Node, held.Node, held.Site, held.Gateway, held.Expires.UTC().Format(time.RFC3339), b.v.addressRef(a))
		if held.Nonce == "" {
			whose = fmt.Sprintf("overlay address %s of gateway %s is held by an empty claim (deleted with `vault kv delete`, which keeps it; `vault kv metadata delete %s` removes it)",
				a, n.Node, b.v.addressRef(a))
		}
		if b.readdress == nil {
			return netip.Addr{}, errors.New(whose)
		}
		b.mu.Lock()
		next, err := b.readdress(a)
		b.mu.Unlock()
		if err != nil {
			return netip.Addr{}, fmt.Errorf("%s, and no other is free: %w", whose, err)
		}
		b.v.log.Debug("burst gateway's overlay address taken by another burst: trying the next", "node", n.Node, "taken", a, "next", next, "held_by_site", held.Site)
		a = next
	}
}

// release releases the addresses tried that are still the opening's.
func (b *burstAddresses) release(ctx context.Context) error {
	b.mu.Lock()
	tried := slices.Clone(b.tried)
	b.mu.Unlock()
	return b.v.releaseAddresses(ctx, b.c, tried, b.claim.Nonce)
}

// OpenBurst creates the site's PKI role, policy and AppRole and returns a
// wrapped SecretID per gateway. It first claims the site with a KV secret
// created only if none exists (check-and-set 0), so that of two gateways
// opening one site at the same instant one is refused, rather than the
// second's role replacing the first's. It refuses too a site whose role
// exists already (the remains of a burst opened before claims were
// made), and if it fails half-way, it deletes what it created — never
// what it found. Each gateway's overlay address is claimed too (the
// package's comment): one held by a burst opened elsewhere is replaced
// with spec.Readdress's, and the gateway's in the result is the one it
// holds.
func (v *Vault) OpenBurst(ctx context.Context, adminToken string, spec VaultBurstSpec) (vb *VaultBurst, err error) {
	c, err := v.admin(adminToken)
	if err != nil {
		return nil, err
	}
	name := v.BurstName(spec.Site)
	mount := v.appRoleMount()
	ttl := time.Until(spec.Expires).Round(time.Second)
	if ttl <= 0 {
		return nil, errors.New("the burst has already ended")
	}
	nonce := newClaimNonce()
	other, err := v.takeClaim(ctx, c, spec.Site, siteClaim{Nonce: nonce, Gateway: spec.OpenedBy, Expires: spec.Expires})
	if err != nil {
		// The claim may have been made all the same (a cancelled
		// call, an answer lost): if it is ours, it goes. A request
		// Vault refused (4xx: rights, a bad path) wrote nothing.
		var re *vault.ResponseError
		if errors.As(err, &re) && re.StatusCode < http.StatusInternalServerError {
			return nil, err
		}
		if rerr := v.afterFailure(ctx, func(ctx context.Context) error { return v.releaseIfOurs(ctx, c, spec.Site, nonce) }); rerr != nil {
			err = fmt.Errorf("%w (and looking for a claim left behind: %v)", err, rerr)
		}
		return nil, err
	}
	if other != nil {
		return nil, v.claimRefusal(spec.Site, *other)
	}
	// From here on, a failure releases the claim, and from the first
	// write on removes what was written first, and the addresses claimed
	// (before the site's claim: while it is the opening's, they are not
	// stale).
	wrote := false
	addrs := &burstAddresses{v: v, c: c, readdress: spec.Readdress,
		claim: addressClaim{Site: spec.Site, Nonce: nonce, Gateway: spec.OpenedBy, Expires: spec.Expires}}
	defer func() {
		if err == nil {
			return
		}
		cerr := v.afterFailure(ctx, func(ctx context.Context) error {
			if wrote {
				if err := v.deleteBurstObjects(ctx, c, name, nonce, nodeNames(spec.Nodes)); err != nil {
					return err // the claim stays with what is left
				}
			}
			if err := addrs.release(ctx); err != nil {
				return err
			}
			// Only this opening's: a claim changed meanwhile (by hand)
			// is not ours to delete.
			return v.releaseIfOurs(ctx, c, spec.Site, nonce)
		})
		if cerr != nil {
			err = fmt.Errorf("%w (and cleaning up: %v)", err, cerr)
		}
	}()
	rolePath := path.Join(v.cfg.PKIMount, "roles", name)
	if s, err := c.Logical().ReadWithContext(ctx, rolePath); err != nil {
		return nil, fmt.Errorf("vault read %s: %w", rolePath, err)
	} else if s != nil {
		return nil, fmt.Errorf("vault already has %s: a burst of site %s is open, or one ended without its Vault objects removed; run `skybridge burst down --site %s` on the gateway that opened it, or end it by hand: %s", rolePath, spec.Site, spec.Site, v.removeByHand(spec.Site, name))
	}
	for _, n := range spec.Nodes {
		if n.Site != spec.Site {
			return nil, fmt.Errorf("gateway %s is not of burst site %s", n.Node, spec.Site)
		}
	}
	wrote = true
	// The site's role certifies nothing (no name, no URI): it marks the
	// site open and holds the burst's end (roleOutlivesClaim).
	if err := vaultWrite(ctx, c, rolePath, map[string]any{
		"allow_any_name": false, "allowed_domains": []string{}, "allow_bare_domains": false, "allow_subdomains": false,
		"allow_glob_domains": false, "allow_wildcard_certificates": false, "allow_localhost": false, "enforce_hostnames": false,
		"allow_ip_sans": false, "allowed_uri_sans": []string{},
		"key_type": "ec", "key_bits": 256, "max_ttl": ttl.String(), "not_after": spec.Expires.UTC().Format(time.RFC3339),
	}); err != nil {
		return nil, err
	}
	vb = &VaultBurst{Name: name, AppRoleMount: mount, Claim: nonce, Place: v.BurstPlace(spec.Site)}
	vb.Place.Policy, vb.Place.PerGateway = burstPolicy(name, nonce), true
	wrap := min(spec.TokenTTL, ttl)
	// SecretIDs are answered wrapped, and nothing else: the client is
	// this call's own.
	c.SetWrappingLookupFunc(func(_, p string) string {
		if strings.HasSuffix(p, "/secret-id") {
			return wrap.String()
		}
		return ""
	})
	// Five requests a gateway, some at once: a burst of 64 gateways
	// opens in a fraction of a second with Vault a few milliseconds away
	// rather than in seconds (docs/BENCHMARKS.md).
	vb.Gateways = make([]VaultBurstGateway, len(spec.Nodes))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(burstGrantParallel)
	for i, n := range spec.Nodes {
		g.Go(func() (err error) {
			// Claimed before its role pins it.
			if n.OverlayIP, err = addrs.take(gctx, n); err != nil {
				return err
			}
			vb.Gateways[i], err = v.openBurstGateway(gctx, c, name, nonce, n, spec.Expires, ttl)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	held := make([]netip.Addr, len(vb.Gateways))
	for i, gw := range vb.Gateways {
		held[i] = gw.OverlayIP
	}
	if err := v.recordAddresses(ctx, c, spec.Site, nonce, held); err != nil {
		return nil, err
	}
	return vb, nil
}

// burstGrantParallel is how many gateways' grants are made or removed
// at once.
const burstGrantParallel = 8

// vaultWrite writes data at p, saying where if it fails.
func vaultWrite(ctx context.Context, c *vault.Client, p string, data map[string]any) error {
	if _, err := c.Logical().WriteWithContext(ctx, p, data); err != nil {
		return fmt.Errorf("vault write %s: %w", p, err)
	}
	return nil
}

// openBurstGateway makes one burst gateway's PKI role, policy and
// AppRole, and a wrapped SecretID for it.
func (v *Vault) openBurstGateway(ctx context.Context, c *vault.Client, name, claim string, n Attributes,
	expires time.Time, ttl time.Duration) (VaultBurstGateway, error) {
	n.Normalize()
	own := burstGatewayName(name, claim, n.Node)
	// Its name as the common name alone (no DNS names: a certificate of
	// this CA for "vault.bank.example" would be good wherever the CA is
	// trusted beyond the mesh), and its attribute URI as a whole, pinned
	// with its overlay IP: Vault cannot pin the IP SAN, and AttributesOf
	// refuses a certificate whose IP SAN differs from the address its URI
	// names.
	if err := vaultWrite(ctx, c, path.Join(v.cfg.PKIMount, "roles", own), map[string]any{
		"allow_any_name": false, "allowed_domains": []string{n.Node}, "allow_bare_domains": true, "allow_subdomains": false,
		"allow_glob_domains": false, "allow_wildcard_certificates": false, "allow_localhost": false, "enforce_hostnames": false,
		"allow_ip_sans": true, "allowed_uri_sans": []string{n.PinnedURI().String()},
		"key_type": "ec", "key_bits": 256, "server_flag": true, "client_flag": true,
		"max_ttl": ttl.String(), "not_after": expires.UTC().Format(time.RFC3339), "not_before_duration": "30s",
	}); err != nil {
		return VaultBurstGateway{}, err
	}
	var acl strings.Builder
	fmt.Fprintf(&acl, "# skybridge burst gateway %s of site %s, until %s\n", n.Node, n.Site, expires.UTC().Format(time.RFC3339))
	fmt.Fprintf(&acl, "path %q { capabilities = [\"update\"] }\n", path.Join(v.cfg.PKIMount, "sign", own))
	fmt.Fprintf(&acl, "path %q { capabilities = [\"read\"] }\n", path.Join(v.cfg.PKIMount, "cert")+"/*")
	// The issuers, to tell a revoked or key-less one (Vault.Trust).
	fmt.Fprintf(&acl, "path %q { capabilities = [\"read\"] }\n", path.Join(v.cfg.PKIMount, "issuer", "+"))
	fmt.Fprintf(&acl, "path %q { capabilities = [\"read\"] }\n", path.Join(v.cfg.KVMount, "data", v.gossipPath()))
	fmt.Fprintf(&acl, "path %q { capabilities = [\"create\", \"read\", \"update\", \"delete\"] }\n", path.Join(v.cfg.KVMount, "data", v.wgPath(n.Node)))
	fmt.Fprintf(&acl, "path %q { capabilities = [\"read\", \"delete\"] }\n", path.Join(v.cfg.KVMount, "metadata", v.wgPath(n.Node)))
	if err := c.Sys().PutPolicyWithContext(ctx, own, acl.String()); err != nil {
		return VaultBurstGateway{}, fmt.Errorf("vault policy %s: %w", own, err)
	}
	roleBase := path.Join("auth", v.appRoleMount(), "role", own)
	// A token's life counts from its login, not from the burst: one as
	// long as the burst, got late (a restart on its last day), would
	// read the gossip keyring long after the burst ended. Short tokens,
	// and the gateway logs in again with its SecretID, which ends with
	// the burst.
	tokenTTL := min(ttl, BurstTokenTTL)
	if err := vaultWrite(ctx, c, roleBase, map[string]any{
		"token_policies": own, "token_ttl": tokenTTL.String(), "token_max_ttl": tokenTTL.String(),
		"secret_id_ttl": ttl.String(), "secret_id_num_uses": 0,
	}); err != nil {
		return VaultBurstGateway{}, err
	}
	g := VaultBurstGateway{Node: n.Node, OverlayIP: n.OverlayIP, Role: own}
	s, err := c.Logical().ReadWithContext(ctx, roleBase+"/role-id")
	if err != nil {
		return g, fmt.Errorf("vault read %s/role-id: %w", roleBase, err)
	}
	if s != nil {
		g.RoleID, _ = s.Data["role_id"].(string)
	}
	if g.RoleID == "" {
		return g, fmt.Errorf("vault read %s/role-id: no role ID in the answer", roleBase)
	}
	if s, err = c.Logical().WriteWithContext(ctx, roleBase+"/secret-id", nil); err != nil {
		return g, fmt.Errorf("vault write %s/secret-id: %w", roleBase, err)
	}
	if s == nil || s.WrapInfo == nil {
		return g, errors.New("vault did not wrap the SecretID")
	}
	g.WrappedSecretID = s.WrapInfo.Token
	return g, nil
}

// BurstTokenTTL bounds the life of a burst gateway's Vault token, and so
// how long one outlives its burst.
const BurstTokenTTL = 15 * time.Minute

// nodeNames names the gateways of nodes.
func nodeNames(nodes []Attributes) []string {
	out := make([]string, len(nodes))
	for i, n := range nodes {
		out[i] = n.Node
	}
	return out
}

// AbortBurst removes the Vault objects of a burst whose grant never
// reached anyone (burst up failed after OpenBurst), and its claims, the
// site's and its addresses': no gateway can have been certified under
// it, so there is nothing to revoke. claim is the opening's (VaultBurst.Claim); by is the gateway
// aborting it; nodes are the burst's gateways (VaultBurst.Nodes).
func (v *Vault) AbortBurst(ctx context.Context, adminToken, site, claim, by string, nodes []string) error {
	c, err := v.admin(adminToken)
	if err != nil {
		return err
	}
	return v.afterFailure(ctx, func(ctx context.Context) error {
		if err := v.holdBurst(ctx, c, site, claim, by, nodes); err != nil {
			return err
		}
		if err := v.deleteBurstObjects(ctx, c, v.BurstName(site), claim, nodes); err != nil {
			return err
		}
		if err := v.releaseClaimedAddresses(ctx, c, site, claim); err != nil {
			return err
		}
		return v.releaseBurst(ctx, c, site)
	})
}

// afterFailure runs a clean-up on behalf of a request that failed: even
// if the caller has given up (cancelled), but not for ever.
func (v *Vault) afterFailure(ctx context.Context, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	return f(ctx)
}

// BurstClosed is what CloseBurst did.
type BurstClosed struct {
	Revoked []string // the serials of the certificates it revoked
	// Warnings are for the operator: the burst is closed, but something
	// that should have followed is left to do by hand.
	Warnings []string
}

// CloseBurst ends a burst site in Vault: it deletes the AppRole (its
// SecretIDs with it), the policy and the PKI role first, so that nothing
// can be issued for the site any more, then revokes every unexpired
// certificate of the burst's gateways, nodes (the CRL then reaches the
// mesh; a lasting site's gateways of the same name are left alone), deletes its
// gateways' WireGuard keys, releases their addresses' claims, and last
// the site's claim — not before, or a burst of the same site opened
// meanwhile would have its certificates revoked by this one. claim is
// the opening's (VaultBurst.Claim; "" for a burst opened before claims
// were made): a site claimed by another opening is left alone. by is the
// gateway closing it.
func (v *Vault) CloseBurst(ctx context.Context, adminToken, site string, nodes []string, claim, by string) (closed BurstClosed, err error) {
	c, err := v.admin(adminToken)
	if err != nil {
		return closed, err
	}
	if err := v.holdBurst(ctx, c, site, claim, by, nodes); err != nil {
		return closed, err
	}
	if err := v.deleteBurstObjects(ctx, c, v.BurstName(site), claim, nodes); err != nil {
		return closed, err
	}
	s, err := c.Logical().ListWithContext(ctx, path.Join(v.cfg.PKIMount, "certs"))
	if err != nil {
		return closed, fmt.Errorf("vault list %s/certs: %w", v.cfg.PKIMount, err)
	}
	var keys []any
	if s != nil {
		keys, _ = s.Data["keys"].([]any)
	}
	ours, unread, err := v.siteCertificates(ctx, c, keys, site, nodes)
	if err != nil {
		return closed, err
	}
	for _, cert := range ours {
		if _, err := c.Logical().WriteWithContext(ctx, path.Join(v.cfg.PKIMount, "revoke"), map[string]any{"serial_number": cert.key}); err != nil {
			return closed, fmt.Errorf("vault revoke %s: %w", cert.key, err)
		}
		closed.Revoked = append(closed.Revoked, cert.serial)
	}
	if len(closed.Revoked) > 0 {
		// A PKI mount with auto_rebuild on does not rebuild its CRL at a
		// revocation, and the mesh reads the full CRL: the site's
		// gateways would stay trusted until the next scheduled rebuild
		// (up to days). Rebuilt now; without the right to, the operator
		// is told, not only this gateway's log: the burst is closed all
		// the same, and its gateways stay in the mesh until then.
		rotate := path.Join(v.cfg.PKIMount, "crl", "rotate")
		if _, err := c.Logical().ReadWithContext(ctx, rotate); err != nil {
			w := fmt.Sprintf("Vault's CRL could not be rebuilt (%v): if the PKI mount rebuilds it on a schedule (auto_rebuild), the %d revocations reach the mesh, and the burst's gateways leave it, only with the next rebuild; run `vault read %s` now (the operator's token needs read on it)",
				err, len(closed.Revoked), rotate)
			v.log.Warn("burst site ended, but "+w, "site", site)
			closed.Warnings = append(closed.Warnings, w)
		}
	}
	// The site's gateways' WireGuard keys: each deletes its own when its
	// burst ends, but not one that crashed, nor once its policy is gone.
	for _, n := range nodes {
		if err := c.KVv2(v.cfg.KVMount).DeleteMetadata(ctx, v.wgPath(n)); err != nil {
			return closed, fmt.Errorf("vault delete the WireGuard key of %s: %w", n, err)
		}
	}
	if len(unread) > 0 {
		return closed, fmt.Errorf("%d certificates could not be read to see whether they are of site %s (run burst down again); the first: %w", len(unread), site, unread[0])
	}
	if err := v.releaseClaimedAddresses(ctx, c, site, claim); err != nil {
		return closed, err
	}
	return closed, v.releaseBurst(ctx, c, site)
}

// certReadParallel is how many certificates burst down reads from Vault
// at once: a mount that has issued tens of thousands is read in seconds
// rather than minutes when Vault is a few milliseconds away.
const certReadParallel = 16

// listedCert is a certificate of the PKI mount: its key in Vault's
// listing, and its serial as skybridge prints them.
type listedCert struct{ key, serial string }

// siteCertificates reads the certificates of the PKI mount listed in
// keys and returns the unexpired ones of burst site site: of its nodes,
// or where they are not known, labelled a burst's; in the order listed. A certificate gone or unparsable is not one of ours to
// judge; one that could not be read (Vault unreachable, denied) may be,
// so it is returned in unread — after the others were tried — and the
// close fails and can be run again.
func (v *Vault) siteCertificates(ctx context.Context, c *vault.Client, keys []any, site string, nodes []string) (ours []listedCert, unread []error, err error) {
	now := time.Now()
	found := make([]listedCert, len(keys))
	var mu sync.Mutex
	var g errgroup.Group
	g.SetLimit(certReadParallel)
	for i, k := range keys {
		serial, _ := k.(string)
		g.Go(func() error {
			if ctx.Err() != nil {
				return nil
			}
			p := path.Join(v.cfg.PKIMount, "cert", serial)
			s, err := c.Logical().ReadWithContext(ctx, p)
			if err != nil {
				if ctx.Err() == nil {
					mu.Lock()
					unread = append(unread, fmt.Errorf("vault read %s: %w", p, err))
					mu.Unlock()
				}
				return nil
			}
			var pemStr string
			if s != nil {
				pemStr, _ = s.Data["certificate"].(string)
			}
			cs, err := ParseCertificatesPEM([]byte(pemStr))
			if err != nil || len(cs) == 0 || !cs[0].NotAfter.After(now) || cs[0].IsCA {
				return nil
			}
			// Only the burst's: a gateway of a lasting site of the same
			// name (one opened over it while that site's gateways were
			// away) is none of its nodes, nor labelled a burst's.
			if a, err := AttributesOf(cs[0]); err != nil || a.Site != site ||
				(len(nodes) > 0 && !slices.Contains(nodes, a.Node)) || (len(nodes) == 0 && a.Labels[BurstLabel] != "true") {
				return nil
			}
			found[i] = listedCert{key: serial, serial: FormatSerial(cs[0].SerialNumber)}
			return nil
		})
	}
	g.Wait()
	if ctx.Err() != nil {
		return nil, nil, fmt.Errorf("ending burst site %s interrupted (run burst down again): %w", site, ctx.Err())
	}
	for _, f := range found {
		if f.key != "" {
			ours = append(ours, f)
		}
	}
	return ours, unread, nil
}

// VaultJoin is the Vault half of a join token: where Vault is, how to log
// in (the AppRole's role ID and a wrapped SecretID), what to ask for.
type VaultJoin struct {
	secret                     // printed or logged, it shows nothing: it holds a wrapped SecretID
	Address         string     `json:"addr"`
	CACert          string     `json:"ca,omitempty"` // PEM of the CA that signed Vault's TLS certificate
	Namespace       string     `json:"ns,omitempty"`
	AppRoleMount    string     `json:"approle"`
	RoleID          string     `json:"role_id"`
	WrappedSecretID string     `json:"wrapped"`
	PKIMount        string     `json:"pki"`
	PKIRole         string     `json:"role"`
	PinIP           bool       `json:"pin_ip,omitempty"` // the role pins URIs with the overlay IP (PinnedURI)
	KVMount         string     `json:"kv"`
	KVPrefix        string     `json:"kv_prefix"`
	MeshCIDR        string     `json:"mesh_cidr"`
	Node            Attributes `json:"node"`
	Seeds           []string   `json:"seeds"`
}

// VaultJoinFor fills the parts of a VaultJoin this gateway's configuration
// knows, common to the burst's gateways; each gateway's own (role ID,
// PKI role, wrapped SecretID) are in b.Gateways.
func (v *Vault) VaultJoinFor(b *VaultBurst) (*VaultJoin, error) {
	vj := &VaultJoin{Address: v.client.Address(), Namespace: v.cfg.Namespace, AppRoleMount: b.AppRoleMount, PinIP: true,
		PKIMount: v.cfg.PKIMount, KVMount: v.cfg.KVMount, KVPrefix: v.cfg.KVPrefix, MeshCIDR: v.meshPrefix.String()}
	if v.cfg.CACert != "" {
		pemb, err := os.ReadFile(v.cfg.CACert)
		if err != nil {
			return nil, fmt.Errorf("vault ca_cert: %w", err)
		}
		vj.CACert = string(pemb)
		return vj, nil
	}
	// Without ca_cert this gateway trusts the CA the Vault client takes
	// from its environment (the Vault CLI's variables); a burst gateway,
	// a fresh VM, has neither, and would not trust Vault.
	pemb, err := envVaultCA()
	if err != nil {
		return nil, err
	}
	vj.CACert = string(pemb)
	return vj, nil
}

// envVaultCA reads the CA the Vault client trusts from its environment,
// in the client's order (go-rootcerts): VAULT_CACERT (a file),
// VAULT_CACERT_BYTES, VAULT_CAPATH (a tree of PEM files). None set: nil.
func envVaultCA() ([]byte, error) {
	if f := os.Getenv(vault.EnvVaultCACert); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("$%s, the CA this gateway trusts Vault by, for burst gateways' join tokens: %w (set vault { ca_cert = ... } instead)", vault.EnvVaultCACert, err)
		}
		return b, nil
	}
	if b := os.Getenv(vault.EnvVaultCACertBytes); b != "" {
		return []byte(b), nil
	}
	dir := os.Getenv(vault.EnvVaultCAPath)
	if dir == "" {
		return nil, nil
	}
	var all []byte
	seen := map[[sha256.Size]byte]bool{}
	// Walked as the client walks it: every file and link in the tree, of
	// which it trusts the certificates. Each goes into the token once: a
	// system's CA directory holds each CA under two names or more (its
	// file, its hash links, a bundle of all), and /etc/ssl/certs whole
	// made a token of a megabyte, more than a command line, a variable
	// or a VM's user data carries.
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rest, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				return nil
			}
			if sum := sha256.Sum256(b.Bytes); b.Type == "CERTIFICATE" && len(b.Headers) == 0 && !seen[sum] {
				seen[sum] = true
				all = append(all, pem.EncodeToMemory(&pem.Block{Type: b.Type, Bytes: b.Bytes})...)
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("$%s, the CAs this gateway trusts Vault by, for burst gateways' join tokens: %w (set vault { ca_cert = ... } instead)", vault.EnvVaultCAPath, err)
	}
	return all, nil
}

// UnwrapSecretID redeems the wrapped SecretID of a join token. Vault
// answers only once per wrapping token: a second use, or one after the
// token's wrap TTL, is refused.
func (vj *VaultJoin) UnwrapSecretID(ctx context.Context) (string, error) {
	if vj.Address == "" {
		return "", errors.New("the join token names no Vault address")
	}
	var ca []byte
	if vj.CACert != "" {
		ca = []byte(vj.CACert)
	}
	vc, err := vaultClientConfig(vj.Address, &vault.TLSConfig{CACertBytes: ca})
	if err != nil {
		return "", err
	}
	c, err := vault.NewClient(vc)
	if err != nil {
		return "", err
	}
	if vj.Namespace != "" {
		c.SetNamespace(vj.Namespace)
	}
	c.SetToken("")
	s, err := c.Logical().UnwrapWithContext(ctx, vj.WrappedSecretID)
	if err != nil {
		var re *vault.ResponseError
		if errors.As(err, &re) && (re.StatusCode == http.StatusBadRequest || re.StatusCode == http.StatusForbidden) {
			return "", fmt.Errorf("join token already used or expired: Vault no longer holds its wrapped SecretID (%s); ask for a new one with `skybridge burst up`",
				strings.Join(re.Errors, "; "))
		}
		return "", fmt.Errorf("vault unwrap: %w", err)
	}
	if s == nil {
		return "", errors.New("vault unwrap returned nothing")
	}
	id, _ := s.Data["secret_id"].(string)
	if id == "" {
		return "", errors.New("the join token's wrapped secret is not an AppRole SecretID")
	}
	return id, nil
}
