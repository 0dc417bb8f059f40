package migrate

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// Both ends of a migration prove their mesh identity (mutual TLS 1.3 with
// the gateway certificates) and judge the other's with the same checks as
// gossip admission: chained to the mesh CA, valid, not revoked. The
// receiver learns the sending site from the certificate, never from
// anything the sender claims.

func verifyPeer(tb func() *certs.TrustBundle, now func() time.Time, want string, got **certs.Attributes) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("peer presented no certificate")
		}
		leaf, err := x509.ParseCertificate(raw[0])
		if err != nil {
			return err
		}
		attrs, err := tb().VerifyCertificate(leaf, now())
		if err != nil {
			return err
		}
		if want != "" && attrs.Node != want {
			return fmt.Errorf("reached %s, expected %s", attrs.Node, want)
		}
		if got != nil {
			*got = attrs
		}
		return nil
	}
}

// serverTLS is the receiver's TLS configuration; the sender's attributes
// are recovered per connection with peerAttributes.
func serverTLS(id func() *certs.NodeIdentity, tb func() *certs.TrustBundle, now func() time.Time) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			c := id().TLSCertificate()
			return &c, nil
		},
		ClientAuth:            tls.RequireAnyClientCert,
		VerifyPeerCertificate: verifyPeer(tb, now, "", nil),
	}
}

// clientTLS is the sender's TLS configuration for reaching node.
func clientTLS(id *certs.NodeIdentity, tb *certs.TrustBundle, node string, now func() time.Time) *tls.Config {
	c := id.TLSCertificate()
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c},
		// The chain, validity, revocation and node name are checked by
		// VerifyPeerCertificate against the mesh CA (gateway certificates
		// have no DNS names for the standard hostname check).
		InsecureSkipVerify:    true,
		VerifyPeerCertificate: verifyPeer(func() *certs.TrustBundle { return tb }, now, node, nil),
	}
}

// peerAttributes returns the verified attributes of the other end.
func peerAttributes(cs tls.ConnectionState, tb *certs.TrustBundle, now time.Time) (*certs.Attributes, error) {
	if len(cs.PeerCertificates) == 0 {
		return nil, errors.New("no peer certificate")
	}
	return tb.VerifyCertificate(cs.PeerCertificates[0], now)
}
