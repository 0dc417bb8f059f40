package certs

import (
	"crypto/sha256"
	"crypto/x509"
	"sync"
	"time"
)

// VerifyCache remembers adverts that passed the expensive part of
// VerifyAdvert — the certificate chain, the advert's signature and the
// WireGuard key's proof — so that re-judging a member (a newer revocation
// list, the periodic expiry check, a gossip re-delivery) costs a map
// lookup. Entries are keyed by the advert's bytes, the certificate and
// the revocation list in force, and expire with the first certificate of
// the chain to end, the gateway's or a CA's; the replay and clock checks, which depend on the caller's state, are redone
// on every call. The certificate's verdict and the key's proof are kept
// on their own too, so that a member's new advert (a new load figure)
// costs one signature check.
//
// A VerifyCache is safe for concurrent use. One per gateway is the normal
// case; the in-process scale benchmark shares one among all its gateways,
// so that each advert is verified once per process instead of once per
// simulated gateway.
type VerifyCache struct {
	mu     sync.Mutex
	m      map[verifyKey]verifyEntry
	proofs map[proofKey]struct{} // WireGuard key proofs that verified
}

type proofKey struct {
	key   WGPublicKey
	cert  [32]byte
	proof WGProof
}

type verifyKey struct {
	advert [32]byte
	cert   [32]byte
	trust  string // TrustBundle.Key: a new CA or list judges anew
}

type verifyEntry struct {
	v        *Verified
	notAfter time.Time
}

// NewVerifyCache makes an empty cache.
func NewVerifyCache() *VerifyCache {
	return &VerifyCache{m: map[verifyKey]verifyEntry{}, proofs: map[proofKey]struct{}{}}
}

// proven is VerifyWGProof with the cache in front: a gateway proves its
// key once per certificate and key (see mesh's advert signing), while its
// adverts change with every load figure.
func (c *VerifyCache) proven(key WGPublicKey, cert [32]byte, p WGProof) error {
	k := proofKey{key, cert, p}
	c.mu.Lock()
	_, ok := c.proofs[k]
	c.mu.Unlock()
	if ok {
		return nil
	}
	if err := VerifyWGProof(key, cert, p); err != nil {
		return err
	}
	c.mu.Lock()
	if len(c.proofs) >= maxCacheEntries {
		c.proofs = map[proofKey]struct{}{}
	}
	c.proofs[k] = struct{}{}
	c.mu.Unlock()
	return nil
}

// Retain drops the verdicts reached under any trust bundle but trust (its
// Key): once a gateway adopts a new revocation list, none of the old
// ones' entries is looked up again, and in a mesh of thousands, each list
// adopted left a copy of every member's until the cache filled (some
// 47 MB) and was cleared whole.
func (c *VerifyCache) Retain(trust string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.m {
		if k.trust != trust {
			delete(c.m, k)
		}
	}
}

// Len is how many verdicts the cache holds.
func (c *VerifyCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

// maxCacheEntries bounds the cache; when full it is simply cleared (the
// next round of verifications refills it).
const maxCacheEntries = 1 << 16

// VerifyAdvert is certs.VerifyAdvert with the cache in front. A nil cache
// verifies every time.
func (c *VerifyCache) VerifyAdvert(raw []byte, cert *x509.Certificate, tb *TrustBundle, now time.Time, last *Seen) (*Verified, error) {
	if c == nil || cert == nil {
		return VerifyAdvert(raw, cert, tb, now, last)
	}
	k := verifyKey{advert: sha256.Sum256(raw), cert: sha256.Sum256(cert.Raw)}
	k.trust = tb.Key()
	c.mu.Lock()
	e, ok := c.m[k]
	c.mu.Unlock()
	if ok && now.Before(e.notAfter) && !now.Before(ValidFrom(e.v.Cert)) {
		if err := checkFreshness(&e.v.Advert, now, last, e.v.Seen); err != nil {
			return nil, err
		}
		v := *e.v
		return &v, nil
	}
	v, until, err := verifyAdvert(raw, cert, tb, now, nil, c)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if len(c.m) >= maxCacheEntries {
		c.m = map[verifyKey]verifyEntry{}
	}
	c.m[k] = verifyEntry{v: v, notAfter: until}
	c.mu.Unlock()
	if err := checkFreshness(&v.Advert, now, last, v.Seen); err != nil {
		return nil, err
	}
	return v, nil
}

// VerifyCertificate is TrustBundle.VerifyCertificate with the cache in
// front (same keys and expiry as adverts).
func (c *VerifyCache) VerifyCertificate(tb *TrustBundle, cert *x509.Certificate, now time.Time) (*Attributes, error) {
	if c == nil {
		return tb.VerifyCertificate(cert, now)
	}
	a, _, err := c.certificate(tb, cert, now)
	return a, err
}

func (c *VerifyCache) certificate(tb *TrustBundle, cert *x509.Certificate, now time.Time) (*Attributes, time.Time, error) {
	k := verifyKey{cert: sha256.Sum256(cert.Raw)}
	k.trust = tb.Key()
	c.mu.Lock()
	e, ok := c.m[k]
	c.mu.Unlock()
	if ok && now.Before(e.notAfter) && !now.Before(ValidFrom(cert)) {
		return e.v.Attributes, e.notAfter, nil
	}
	attrs, until, err := tb.verifyCertificate(cert, now)
	if err != nil {
		return nil, time.Time{}, err
	}
	c.mu.Lock()
	if len(c.m) >= maxCacheEntries {
		c.m = map[verifyKey]verifyEntry{}
	}
	c.m[k] = verifyEntry{v: &Verified{Attributes: attrs, Cert: cert}, notAfter: until}
	c.mu.Unlock()
	return attrs, until, nil
}
