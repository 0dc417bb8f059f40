package mesh

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// User messages the gateways exchange beside memberlist's own. Each is
// authenticated on its own — certificates chain to the CA, the CRL and the
// policy are CA-signed, keyring operations and acknowledgements are signed
// by a gateway identity — so the gossip key alone (which every member
// holds) grants nothing. Messages are a type byte followed by length-prefixed fields.
const (
	msgCertRequest byte = 1 // requester name, requester certificate, requester gossip address: "send me yours"
	msgCert        byte = 2 // a certificate (answer to msgCertRequest)
	msgAnnounce    byte = 3 // kind, version, digest: "I have this version of a blob"
	msgBlobRequest byte = 4 // kind, requester name, requester gossip address (ignored: answered where gossip knows it): "send me your blob of this kind"
	msgBlob        byte = 5 // kind, payload: a CRL or a signed policy
	msgKeyringOp   byte = 6 // a signed gossip keyring operation (rotation)
	msgKeyringAck  byte = 7 // node, operation ID, its signature (ack.go): "done"
	msgCerts       byte = 8 // certificates, one per field (push/pull on join)
	// msgKeyringRefused is node, operation ID and why, its signature
	// (ack.go): "I could not apply it". (9 and 10 are in leave.go and
	// wgrotate.go.)
	msgKeyringRefused byte = 11
	maxMessageField        = 1 << 20
	// maxFields bounds the fields of a message of any type but msgCerts:
	// none has more than 7. A peer's message of a million empty fields
	// would otherwise cost the worker seconds and gigabytes to split.
	maxFields = 16
	// maxBundleParts bounds the messages of a push/pull bundle
	// (localState sends at most four).
	maxBundleParts = 8
	// maxUserMessage bounds a user message as it arrives: a blob (a
	// policy or a CRL, at most maxMessageField) and its framing.
	maxUserMessage = maxMessageField + 1<<10
)

// MaxPolicyBytes is the largest policy, with its signature, that gossip
// carries: one message field, less room for the framing. A larger one is
// refused when it is signed or published, not adopted by one gateway and
// then dropped by every other.
const MaxPolicyBytes = maxMessageField - 4<<10

// Blob kinds travelling by announce/request.
const (
	blobCRL    byte = 1
	blobPolicy byte = 2
	blobCRLs   byte = 3 // several CAs' lists, a bundle of DER lists
)

type message struct {
	typ    byte
	fields [][]byte
}

func encodeMessage(typ byte, fields ...[]byte) []byte {
	n := 1
	for _, f := range fields {
		n += binary.MaxVarintLen32 + len(f)
	}
	b := make([]byte, 0, n)
	b = append(b, typ)
	for _, f := range fields {
		b = binary.AppendUvarint(b, uint64(len(f)))
		b = append(b, f...)
	}
	return b
}

// decodeMessage splits a message into its fields, at most maxFields of
// them.
func decodeMessage(b []byte, maxFields int) (message, error) {
	if len(b) == 0 {
		return message{}, errors.New("empty message")
	}
	m := message{typ: b[0]}
	rest := b[1:]
	for len(rest) > 0 {
		if len(m.fields) == maxFields {
			return message{}, fmt.Errorf("message type %d: more than %d fields", m.typ, maxFields)
		}
		n, w := binary.Uvarint(rest)
		if w <= 0 || n > maxMessageField || n > uint64(len(rest)-w) {
			return message{}, fmt.Errorf("message type %d: bad field length", m.typ)
		}
		m.fields = append(m.fields, rest[w:w+int(n)])
		rest = rest[w+int(n):]
	}
	return m, nil
}

func (m message) want(n int) error {
	if len(m.fields) != n {
		return fmt.Errorf("message type %d has %d fields, want %d", m.typ, len(m.fields), n)
	}
	return nil
}

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func readU64(b []byte) (uint64, error) {
	if len(b) != 8 {
		return 0, errors.New("bad number")
	}
	return binary.BigEndian.Uint64(b), nil
}

// bundle packs several messages into one (push/pull state).
func bundle(msgs ...[]byte) []byte { return encodeMessage(0, msgs...) }

func unbundle(b []byte) ([][]byte, error) {
	m, err := decodeMessage(b, maxBundleParts)
	if err != nil {
		return nil, err
	}
	if m.typ != 0 {
		return nil, errors.New("not a state bundle")
	}
	return m.fields, nil
}
