package migrate

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// Both ends of a migration prove their mesh identity (mutual TLS 1.3 with
// the gateway certificates) and judge the other's with the same checks as
// gossip admission: chained to the mesh CA, valid, not revoked. The
// receiver learns the sending site from the certificate, never from
// anything the sender claims.

func verifyPeer(tb func() *certs.TrustBundle, now func() time.Time, want *certs.Attributes, got **certs.Attributes) func([][]byte, [][]*x509.Certificate) error {
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
		if want != nil && attrs.Node != want.Node {
			return fmt.Errorf("reached %s, expected %s", attrs.Node, want.Node)
		}
		// The policy decided on the destination's certified attributes as
		// gossip had them: another certificate with the node's name (one
		// from before the gateway moved, never revoked) must not receive
		// the image somewhere the policy did not judge.
		if want != nil && !attrs.Equal(want) {
			return fmt.Errorf("%s presented a certificate for another place than the one the policy judged (%s); resume to decide again", attrs.Node, strings.Join(want.Differences(attrs), ", "))
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
		VerifyPeerCertificate: verifyPeer(tb, now, nil, nil),
	}
}

// clientTLS is the sender's TLS configuration for reaching the gateway
// whose certified attributes are want.
func clientTLS(id *certs.NodeIdentity, tb *certs.TrustBundle, want *certs.Attributes, now func() time.Time) *tls.Config {
	c := id.TLSCertificate()
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c},
		// The chain, validity, revocation and node name are checked by
		// VerifyPeerCertificate against the mesh CA (gateway certificates
		// have no DNS names for the standard hostname check).
		InsecureSkipVerify:    true,
		VerifyPeerCertificate: verifyPeer(func() *certs.TrustBundle { return tb }, now, want, nil),
	}
}

// peerAttributes returns the verified attributes of the other end.
func peerAttributes(cs tls.ConnectionState, tb *certs.TrustBundle, now time.Time) (*certs.Attributes, error) {
	if len(cs.PeerCertificates) == 0 {
		return nil, errors.New("no peer certificate")
	}
	return tb.VerifyCertificate(cs.PeerCertificates[0], now)
}
