package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/jitter"
)

// Provider gives a gateway its identity, the mesh's trust bundle and its
// secrets from the configured back end. With an Issuer (Vault, or a local
// embedded CA via ca_dir) it obtains and renews the identity itself;
// without one it uses the identity issued offline by `skybridge ca issue`.
type Provider struct {
	s      *settings
	issuer Issuer
	// renewer renews an identity issued offline through a CA-holding
	// gateway (identity.renew_from); nil with an issuer.
	renewer *renewer
	secrets SecretStore
	log     *slog.Logger
	close   func()
	now     func() time.Time
	// answered is when the issuer last gave Trust a bundle (Unix ns).
	answered atomic.Int64
	saveMu   sync.Mutex // one SaveTrust at a time: ca.crt and crl.pem go together
}

// SaveTrust keeps tb in the identity directory, for a start while the
// issuer is unreachable.
func (p *Provider) SaveTrust(tb *TrustBundle) error {
	_, err := p.saveTrust(tb)
	return err
}

// saveTrust is SaveTrust, and returns the bundle saved: tb, with any list
// newer than its own that the directory holds. Trust loads, merges and
// saves outside the gateway's lock, and the gateway may have saved a
// newer list (from gossip) meanwhile: that one stays.
func (p *Provider) saveTrust(tb *TrustBundle) (*TrustBundle, error) {
	p.saveMu.Lock()
	defer p.saveMu.Unlock()
	if saved, err := LoadTrustBundle(p.s.dir, p.s.meshPrefix); err == nil {
		tb, _ = tb.WithNewerCRLs(saved.CRLs())
	}
	return tb, tb.Save(p.s.dir)
}

// ReadWithoutLogin reports whether iss's last Trust was read without a
// login, Vault refusing the gateway's: revocations are still read, but
// nothing is issued or renewed, which is no answer to count (the issuer
// unreachable alert must still fire).
func ReadWithoutLogin(iss Issuer) bool {
	v, ok := iss.(*Vault)
	return ok && v.anonTrust.Load()
}

// IssuerAnswered is when the issuer last answered Trust with its login;
// zero if it has not (no issuer, unreachable since Open, or Vault refuses
// the login).
func (p *Provider) IssuerAnswered() time.Time {
	if ns := p.answered.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// Open connects to the configured back end. For Vault it logs in and keeps
// the token renewed until Close.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*Provider, error) {
	s, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	p := &Provider{s: s, log: log, close: func() {}, now: time.Now}
	switch s.backend {
	case BackendFile:
		p.secrets = DirSecrets{Dir: s.dir}
		if s.caDir != "" {
			ca, err := OpenCA(s.caDir)
			if err != nil {
				return nil, err
			}
			// Its trust bundle is the CA's own, with the CA's range:
			// a configured range it does not hold would go unchecked.
			if s.meshPrefix.IsValid() {
				if _, err := NewTrustBundle([]*x509.Certificate{ca.Certificate()}, s.meshPrefix); err != nil {
					return nil, fmt.Errorf("identity.mesh_cidr: %w", err)
				}
			}
			p.issuer = ca
		}
		if len(s.renewFrom) > 0 {
			p.renewer = &renewer{endpoints: s.renewFrom, dir: s.dir}
		}
	case BackendVault:
		v, err := openVault(ctx, s.vault, s.meshPrefix, log, s.rideOut)
		if err != nil {
			return nil, err
		}
		v.held = func() (*TrustBundle, error) { return LoadTrustBundle(s.dir, s.meshPrefix) }
		p.issuer, p.secrets, p.close = v, &VaultSecrets{Vault: v, dir: s.dir}, v.Close
	}
	return p, nil
}

// Close stops background work (Vault token renewal).
func (p *Provider) Close() { p.close() }

// Secrets returns the secret store of the back end.
func (p *Provider) Secrets() SecretStore { return p.secrets }

// Issuer returns the back end's issuer, or nil if identities are issued
// offline.
func (p *Provider) Issuer() Issuer { return p.issuer }

// CanRenew reports whether the gateway renews its certificate itself:
// from its issuer, or through a CA-holding gateway (identity.renew_from).
func (p *Provider) CanRenew() bool { return p.issuer != nil || p.renewer != nil }

// Refresh is how often a gateway asks the issuer for its CAs and
// revocation lists (identity.refresh).
func (p *Provider) Refresh() time.Duration { return p.s.refresh }

// MeshPrefix is the configured overlay range (zero if taken from the CA).
func (p *Provider) MeshPrefix() netip.Prefix { return p.s.meshPrefix }

// Trust returns the trust bundle: fresh from the issuer if there is one
// (and cached in the identity directory for restarts while it is
// unreachable), else from the identity directory.
func (p *Provider) Trust(ctx context.Context) (*TrustBundle, error) {
	var issuerErr error
	if p.issuer != nil {
		tb, err := p.issuer.Trust(ctx)
		if err == nil {
			if !ReadWithoutLogin(p.issuer) {
				p.answered.Store(p.now().UnixNano())
			}
			// The cached list may be newer: gossip brings lists the
			// issuer's copy may lack (a CA directory restored from a
			// backup, a CRL write that failed). Revocations are not
			// forgotten for it.
			if cached, cerr := LoadTrustBundle(p.s.dir, p.s.meshPrefix); cerr == nil {
				// Kept even when no list is newer: it carries the lists of
				// retired CAs the issuer's answer has not.
				kept, _ := cached.Adopt(tb)
				newer := kept.Key() != tb.Key()
				tb = kept
				if newer {
					// An embedded CA behind the mesh numbers its next
					// lists below what gateways hold, which ignore them:
					// it takes the newer list back.
					if ca, ok := p.issuer.(*CA); ok {
						if took, err := ca.TakeNewerCRL(kept.CRL()); err != nil {
							p.log.Error("the CA directory's revocation list is older than this gateway's (restored from a backup?) and could not be brought up to date: its next lists would be ignored; copy crl.pem from this identity directory into it", "ca", ca.Dir(), "err", err)
						} else if took {
							p.log.Warn("the CA directory's revocation list was older than this gateway's (restored from a backup?): the newer one is written back into it, so the CA's next lists carry on from it", "ca", ca.Dir(), "number", kept.CRL().Number)
						}
					} else if _, ok := p.issuer.(*Vault); !ok { // Vault.Trust says so itself
						p.log.Warn("the issuer's revocation list is older than the one this gateway holds; keeping the newer, and enforcing the issuer's beside it", "held", kept.CRLVersion())
					}
				}
			}
			return p.saveTrust(tb)
		}
		issuerErr = err
	}
	tb, err := LoadTrustBundle(p.s.dir, p.s.meshPrefix)
	switch {
	case err != nil && issuerErr != nil:
		return nil, fmt.Errorf("%w; and the trust bundle kept in %s cannot be used: %v", issuerErr, p.s.dir, err)
	case err != nil:
		return nil, fmt.Errorf("trust bundle in %s: %w", p.s.dir, err)
	case issuerErr != nil:
		p.log.Warn("the issuer's trust bundle cannot be read (unreachable, or its files damaged); using the one kept on disk", "err", issuerErr)
	}
	return tb, nil
}

// Identity returns the gateway's identity for attrs. With an issuer it
// obtains a new one when there is none, when the stored one was issued for
// other attributes, is no longer valid, or is past its renewal time;
// without one it insists that the stored identity matches and is valid,
// and renews it through a CA-holding gateway (identity.renew_from) once
// past its renewal time.
func (p *Provider) Identity(ctx context.Context, attrs Attributes) (*NodeIdentity, *TrustBundle, error) {
	attrs.Normalize()
	tb, err := p.Trust(ctx)
	if err != nil {
		return nil, nil, err
	}
	now := p.now()
	id, loadErr := LoadNodeIdentity(p.s.dir)
	var why string
	renewable := false // by possession of the current certificate
	switch {
	case loadErr != nil:
		why = loadErr.Error()
	case !id.Attributes().Equal(&attrs):
		why = fmt.Sprintf("the node block differs from the stored certificate (certificate → node block: %s)", strings.Join(id.Attributes().Differences(&attrs), ", "))
	default:
		if _, err := tb.VerifyCertificate(id.Certificate(), now); err != nil {
			why = err.Error()
		} else if now.After(RenewalTime(id.Certificate().NotBefore, id.Certificate().NotAfter, 0.5)) {
			why = "certificate is past its renewal time"
			if !p.CanRenew() {
				p.log.Warn("node certificate should be renewed; issue a new one with `skybridge ca issue`, or let the gateway renew it (identity.renew_from)", "identity", id)
				return id, tb, nil
			}
			renewable = true
		} else {
			return id, tb, nil
		}
	}
	if p.issuer == nil && !renewable {
		if p.renewer != nil {
			// Renewal by possession needs a valid certificate of the
			// same attributes.
			return nil, nil, fmt.Errorf("no usable identity in %s: %s; a renewal (identity.renew_from) needs a valid certificate for this node block: correct the node block, or issue an identity for it (skybridge ca issue)", p.s.dir, why)
		}
		return nil, nil, fmt.Errorf("no usable identity in %s: %s; correct the node block, or issue an identity for it (skybridge ca issue)", p.s.dir, why)
	}
	p.log.Info("obtaining node certificate", "node", attrs.Node, "site", attrs.Site, "reason", why)
	fresh, freshTB, err := p.obtain(ctx, attrs)
	if err != nil {
		// tb, not obtain's (nil on failure): the bundle the current
		// certificate was judged by just above.
		if id != nil && loadErr == nil && id.Attributes().Equal(&attrs) {
			if _, verr := tb.VerifyCertificate(id.Certificate(), now); verr == nil {
				p.log.Warn("renewal failed, keeping the current certificate", "err", err, "identity", id)
				return id, tb, nil
			}
		}
		return nil, nil, err
	}
	return fresh, freshTB, nil
}

// obtain makes a new key, has it certified and stores the identity.
func (p *Provider) obtain(ctx context.Context, attrs Attributes) (*NodeIdentity, *TrustBundle, error) {
	var key *ecdsa.PrivateKey
	var err error
	if p.issuer == nil {
		// Renewal by possession, of the certificate in the directory: one
		// process at a time (the gateway, `identity request` run by hand).
		// Two would each ask with a key of their own, and the CA would
		// take the second for a copy of the key renewing again; after
		// the lock, the second takes up what the first renewed.
		// Not for ever: the other may be stopped (Ctrl-Z), and a start
		// then goes on with the certificate it has.
		lctx, cancel := context.WithTimeout(ctx, renewLockWait)
		unlock, lerr := lockFileContext(lctx, filepath.Join(p.s.dir, fileRenewLock))
		cancel()
		if lerr != nil {
			return nil, nil, fmt.Errorf("%w: is a `skybridge identity request` of this directory stopped or hung? end it, or wait for it", lerr)
		}
		defer unlock()
		if tb, err := p.Trust(ctx); err == nil {
			if id := renewedElsewhere(p.s.dir, &attrs, tb, p.now()); id != nil {
				p.log.Info("the identity directory holds a certificate renewed by another process: taken up", "identity", id)
				return id, tb, nil
			}
		}
		key, err = pendingRenewalKey(p.s.dir)
	} else {
		key, err = GenerateNodeKey()
	}
	if err != nil {
		return nil, nil, err
	}
	csr, err := createCSR(key, attrs, p.s.vault != nil && p.s.vault.PinOverlayIP)
	if err != nil {
		return nil, nil, err
	}
	var cert *x509.Certificate
	if p.issuer != nil {
		cert, err = p.issuer.Sign(ctx, csr, attrs, p.s.ttl)
	} else {
		cert, err = p.renewer.Sign(ctx, csr, attrs, p.s.ttl)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("obtain certificate for %s: %w", attrs.Node, err)
	}
	id, err := NewNodeIdentity(cert, key)
	if err != nil {
		return nil, nil, err
	}
	tb, err := p.Trust(ctx)
	if err != nil {
		return nil, nil, err
	}
	if _, err := tb.VerifyCertificate(cert, p.now()); err != nil {
		return nil, nil, fmt.Errorf("issuer returned a certificate the mesh would refuse: %w", err)
	}
	// The bundle was saved by Trust just above, under saveMu.
	if err := id.Save(p.s.dir, nil); err != nil {
		return nil, nil, err
	}
	if p.issuer == nil {
		// Certified and saved: the next renewal asks for a new key.
		if err := os.Remove(filepath.Join(p.s.dir, fileNodeKeyNext)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			p.log.Warn("remove the key of the renewal just saved (the next renewal makes another)", "err", err)
		}
	}
	p.log.Info("node certificate issued", "identity", id)
	return id, tb, nil
}

// refusedRenewalWait is how long a renewal the CA holder refused waits
// before asking again (less, near the certificate's end).
const refusedRenewalWait = time.Hour

// renewLockWait bounds the wait for another renewal of the same identity
// directory (the gateway's, `identity request`'s) to end.
const renewLockWait = 30 * time.Second

// RenewalTime is when a certificate valid from notBefore to notAfter should
// be renewed: at about two thirds of its lifetime, spread by jitter (0..1)
// over 62-72 % so that a fleet issued at once does not renew at once.
func RenewalTime(notBefore, notAfter time.Time, jitter float64) time.Time {
	life := notAfter.Sub(notBefore)
	frac := 0.62 + 0.10*min(max(jitter, 0), 1)
	return notBefore.Add(time.Duration(float64(life) * frac))
}

// KeepRenewed renews id at its renewal time, again and again, until ctx is
// done, calling onRenew with each new identity (the gateway re-advertises
// it). A receive from renewNow renews at once (the issuer signs with a
// new CA). Failed renewals are retried with backoff while the current
// certificate is still valid, and after that too: a gateway should recover
// as soon as its issuer does.
func (p *Provider) KeepRenewed(ctx context.Context, id *NodeIdentity, renewNow <-chan struct{}, onRenew func(*NodeIdentity, *TrustBundle)) error {
	if !p.CanRenew() {
		return errors.New("identity back end cannot renew certificates (no issuer): configure Vault, ca_dir or renew_from")
	}
	attrs := *id.Attributes()
	var renewed time.Time // of the last renewal here
	for {
		c := id.Certificate()
		// From when it was obtained, not from its start: issuers
		// backdate certificates (a minute here, Vault's
		// not_before_duration), and a short life measured from there is
		// due the moment it arrives, again and again.
		from := c.NotBefore
		if renewed.After(from) {
			from = renewed
		}
		at := RenewalTime(from, c.NotAfter, rand.Float64())
		if err := sleepUntil(ctx, p.now, at, renewNow); err != nil {
			return err
		}
		if err := ctx.Err(); err != nil { // a timer run out as ctx ended
			return err
		}
		backoff := time.Second
		for {
			fresh, tb, err := p.obtain(ctx, attrs)
			if err == nil {
				id, renewed = fresh, p.now()
				onRenew(fresh, tb)
				// A renewal asked for meanwhile (while this one was
				// retried) is done.
				select {
				case <-renewNow:
				default:
				}
				break
			}
			left := c.NotAfter.Sub(p.now())
			if renewalRefused(err, p.issuer != nil) {
				backoff = max(backoff, refusedRenewalWait)
			}
			wait := renewalRetryWait(backoff, left, rand.Float64())
			p.log.Error("certificate renewal failed", "err", err, "node", attrs.Node, "expires_in", left.Round(100*time.Millisecond), "retry_in", wait.Round(10*time.Millisecond))
			if err := sleepUntil(ctx, p.now, p.now().Add(wait), nil); err != nil {
				return err
			}
			backoff = nextRenewalBackoff(backoff, left)
		}
	}
}

// renewalRefused reports whether a renewal failed for a refusal that
// asking again does not change until an operator acts: the CA holder's
// (the certificate revoked, replaced, ended; renewal without an issuer),
// or Vault's of the gateway's login (its SecretID expired or destroyed).
// Each is counted and logged there too.
func renewalRefused(err error, withIssuer bool) bool {
	if withIssuer {
		return errors.Is(err, ErrVaultLoginRefused)
	}
	return errors.Is(err, ErrIssueRefused)
}

// nextRenewalBackoff is the backoff after a failed renewal that waited
// backoff, with left until the certificate ends: doubled, up to 5
// minutes, and while the certificate is valid up to a tenth of the time
// it has left (not under 5 s), so that tries come closer near its end.
// Once it has ended there is no end to come close to: the 5 minutes.
func nextRenewalBackoff(backoff, left time.Duration) time.Duration {
	ceiling := 5 * time.Minute
	if left > 0 {
		ceiling = min(ceiling, max(5*time.Second, left/10))
	}
	return min(2*backoff, ceiling)
}

// renewalRetryWait is how long a failed renewal waits before trying
// again: its backoff, cut by up to half by r (0..1) so that gateways
// whose renewals failed together (their issuer down, or all moving to a
// new CA) do not come back to it together, but while the certificate is
// valid at most half the time it has left (and not under 100 ms), so that
// near the end the next try comes before the end rather than after it —
// all but in its last 200 ms, where the floor may take it past.
func renewalRetryWait(backoff, left time.Duration, r float64) time.Duration {
	backoff = jitter.Cut(backoff, r)
	if left <= 0 {
		return backoff
	}
	return min(backoff, max(left/2, 100*time.Millisecond))
}

// wallCheck is how often a wait for a time of day looks at the wall
// clock. Go's timers run on the monotonic clock, which stands still while
// a VM is suspended and which a step of the wall clock does not move: a
// renewal due during a suspension of hours would come after the
// certificate ended.
var wallCheck = time.Minute

// sleepUntil waits until now() reaches at, ctx ends (its error) or wake
// receives (nil: never).
func sleepUntil(ctx context.Context, now func() time.Time, at time.Time, wake <-chan struct{}) error {
	for {
		d := at.Sub(now())
		if d <= 0 {
			return ctx.Err()
		}
		t := time.NewTimer(min(d, wallCheck))
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-wake:
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}
