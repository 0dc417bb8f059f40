package certs

import (
	"context"
	"crypto/x509"
	"fmt"
	"math/big"
	"strings"
	"time"
)

// Issuer signs gateway certificates. The embedded *CA and *Vault implement
// it, so everything above this interface (identity provisioning, renewal,
// later the enrollment of burst gateways) is the same for both back ends.
// Implementations must be safe for concurrent use.
type Issuer interface {
	// Sign certifies the key in csrPEM with attrs for ttl. The CSR must
	// ask for exactly attrs; the gateway's private key never travels.
	Sign(ctx context.Context, csrPEM []byte, attrs Attributes, ttl time.Duration) (*x509.Certificate, error)
	// Trust returns the CA certificates and the newest revocation list.
	Trust(ctx context.Context) (*TrustBundle, error)
	// Revoke puts serial on the revocation list.
	Revoke(ctx context.Context, serial *big.Int) error
}

// SecretStore keeps a gateway's long-lived secrets: its WireGuard key and
// the mesh's gossip keyring. Implementations must be safe for concurrent
// use.
type SecretStore interface {
	// WireGuardKey returns node's WireGuard private key, creating and
	// storing one on first use.
	WireGuardKey(ctx context.Context, node string) (WGPrivateKey, error)
	// SetWireGuardKey replaces node's WireGuard private key (a rotation);
	// once it returns, a restart uses k.
	SetWireGuardKey(ctx context.Context, node string, k WGPrivateKey) error
	// GossipKeyring returns the mesh's gossip keyring.
	GossipKeyring(ctx context.Context) (*GossipKeyring, error)
	// UpdateGossipKeyring replaces the keyring with update(current),
	// atomically with respect to other writers (a compare-and-set loop in
	// Vault, a file lock on disk), so two rotations cannot lose a key.
	UpdateGossipKeyring(ctx context.Context, update func(*GossipKeyring) (*GossipKeyring, error)) error
}

// Sign implements Issuer for the embedded CA.
func (ca *CA) Sign(_ context.Context, csrPEM []byte, attrs Attributes, ttl time.Duration) (*x509.Certificate, error) {
	csr, asked, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	attrs.Normalize()
	if !asked.Equal(&attrs) {
		return nil, fmt.Errorf("the CSR asks for other attributes than the request (CSR → request: %s)", strings.Join(asked.Differences(&attrs), ", "))
	}
	return ca.Issue(IssueRequest{Attributes: attrs, PublicKey: csr.PublicKey, TTL: ttl})
}

// Trust implements Issuer for the embedded CA.
func (ca *CA) Trust(context.Context) (*TrustBundle, error) { return ca.TrustBundle() }

// Revoke implements Issuer for the embedded CA.
func (ca *CA) Revoke(_ context.Context, serial *big.Int) error {
	_, err := ca.RevokeSerials([]*big.Int{serial}, "", time.Now())
	return err
}

var _ Issuer = (*CA)(nil)
