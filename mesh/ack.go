package mesh

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
)

// Acknowledgements — of a gossip keyring step, of a peer's next WireGuard
// key — are signed with the acknowledging gateway's identity and checked
// against its verified certificate. With the gossip key alone one could
// otherwise acknowledge for a member that missed a step: the keyring
// rotation's last step would then cut that member off, and a WireGuard
// key switch would go ahead before the peer held the new key.

const ackDomain = "skybridge ack v1\x00"

func ackDigest(kind byte, node string, subject []byte) []byte {
	h := sha256.New()
	h.Write([]byte(ackDomain))
	h.Write([]byte{kind})
	h.Write([]byte(node))
	h.Write([]byte{0})
	h.Write(subject)
	return h.Sum(nil)
}

// signedAck is the message of type kind acknowledging subject.
func (g *Gateway) signedAck(kind byte, subject []byte) ([]byte, error) {
	id := g.id.Load()
	node := id.Attributes().Node
	sig, err := id.Signer().Sign(rand.Reader, ackDigest(kind, node, subject), crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("sign acknowledgement: %w", err)
	}
	return encodeMessage(kind, []byte(node), subject, sig), nil
}

// checkAck returns who acknowledged what, once the signature verifies
// against that member's verified certificate.
func (g *Gateway) checkAck(m message) (node string, subject []byte, err error) {
	if len(m.fields) != 3 {
		return "", nil, fmt.Errorf("acknowledgement (type %d): %d fields, want 3", m.typ, len(m.fields))
	}
	node, subject, sig := string(m.fields[0]), m.fields[1], m.fields[2]
	v := g.members.verified(node)
	if v == nil {
		return "", nil, fmt.Errorf("acknowledgement from %s, which is not a verified member", node)
	}
	pub, ok := v.Cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !ecdsa.VerifyASN1(pub, ackDigest(m.typ, node, subject), sig) {
		return "", nil, errors.New("acknowledgement from " + node + ": signature does not verify")
	}
	return node, subject, nil
}
