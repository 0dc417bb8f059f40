package certs

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"
	"unicode/utf8"
)

// MaxAdvertSize is memberlist's limit on node metadata (memberlist.MetaMaxSize),
// which is where a gateway's advert travels. The certificate (about 700
// bytes) does not fit; the advert names it by SHA-256 and certificates move
// separately (see docs/ARCHITECTURE.md).
const MaxAdvertSize = 512

// MaxEndpoints is how many underlay endpoints an advert carries: a
// gateway's configuration may list no more.
const MaxEndpoints = maxEndpoints

// NextWGKeySize is what a WireGuard key rotation adds to an advert: the
// next key with its tag and length.
const NextWGKeySize = 2 + WGKeyLen

// LargestSize is the most a gateway's adverts can take with the claims of
// raw (names, routes, endpoints): with a next WireGuard key (a rotation),
// the largest load figure, and the longest ECDSA P-256 signature (DER, 72
// bytes; they vary by a few). A gateway checks it at start, so that its
// first rotation under load does not find the advert too large to sign.
func LargestSize(raw []byte) (int, error) {
	sa, err := DecodeAdvert(raw)
	if err != nil {
		return 0, err
	}
	n := len(sa.body) + 2 + 72
	if sa.NextWireGuardKey.IsZero() {
		n += NextWGKeySize
	}
	const maxLoad = 2 + 5 // tag, length, a uint32 as a varint
	if sa.Load == 0 {
		n += maxLoad
	} else {
		n += maxLoad - 2 - uvarintLen(uint64(sa.Load))
	}
	return n, nil
}

// advertDomain separates advert signatures from every other use of a
// gateway key (TLS handshakes, audit records).
const advertDomain = "skybridge advert v1\x00"

// Advert field tags. An advert is a sequence of tag-length-value fields in
// strictly increasing tag order, ending with the signature, so that every
// advert has exactly one encoding. Tags below tagOptional are critical: a
// decoder that does not know one refuses the advert. Tags from tagOptional
// up may be skipped by older gateways, which lets later versions add fields
// (a next WireGuard key during rotation, advertised load) without a flag day;
// they are covered by the signature all the same.
const (
	tagVersion      = 0x01
	tagTimestamp    = 0x02
	tagNode         = 0x03
	tagSite         = 0x04
	tagRegion       = 0x05
	tagProvider     = 0x06
	tagJurisdiction = 0x07
	tagOverlayIP    = 0x08
	tagRoutes       = 0x09
	tagWireGuardKey = 0x0a
	tagEndpoints    = 0x0b
	tagCertHash     = 0x0c
	tagOptional     = 0x40
	tagLoad         = 0x41 // optional: the gateway's current load, for placement
	tagNextWGKey    = 0x42 // optional: the WireGuard key the gateway is about to switch to
	tagWGProof      = 0x43 // optional: the WireGuard key's proof of possession (ProveWGKey)
	tagSignature    = 0xff
)

// Advert is the record a gateway gossips about itself. Its claims are bound
// to the gateway's certificate by VerifyAdvert.
type Advert struct {
	Version      uint64           // strictly increasing per node; guards against replay
	Timestamp    time.Time        // signing time, millisecond precision
	Node         string           // must equal the certificate's
	Site         string           // must equal the certificate's
	Region       string           // must equal the certificate's
	Provider     string           // must equal the certificate's
	Jurisdiction string           // must equal the certificate's
	OverlayIP    netip.Addr       // must equal the certificate's
	Routes       []netip.Prefix   // each inside a certified route
	WireGuardKey WGPublicKey      // the gateway's current WireGuard public key
	Endpoints    []netip.AddrPort // underlay addresses where its WireGuard listens
	CertHash     [32]byte         // SHA-256 of the signing certificate (DER)
	Load         uint32           // optional: migrations the gateway is receiving (0: idle or not said)
	// NextWireGuardKey, while a key rotation runs, is the key the gateway
	// will switch to: peers add it beside the current one, so that the
	// switch needs no new peer, only the move of the allowed IPs.
	NextWireGuardKey WGPublicKey
	// WireGuardKeyProof proves that the gateway holds WireGuardKey's
	// private key, for the certificate named by CertHash (ProveWGKey).
	// VerifyAdvert refuses one that does not verify and lets in an
	// advert without one (as an earlier release signs them), which then
	// wins no contested claim from one with a proof. The next
	// key needs none: it routes nothing, and one that is already
	// someone's key is left out, not contested (mesh's topology).
	WireGuardKeyProof WGProof
}

// SignAdvert fills in the certificate hash and signs a with the identity's
// key, returning the wire form. It fails if the result would not fit in
// memberlist's node metadata.
func SignAdvert(a *Advert, id *NodeIdentity) ([]byte, error) {
	a.CertHash = id.Fingerprint()
	a.Timestamp = time.UnixMilli(a.Timestamp.UnixMilli()).UTC()
	body, err := a.appendBody(nil)
	if err != nil {
		return nil, err
	}
	sig, err := ecdsa.SignASN1(rand.Reader, id.key, advertDigest(body))
	if err != nil {
		return nil, fmt.Errorf("sign advert: %w", err)
	}
	out := appendField(body, tagSignature, sig)
	if len(out) > MaxAdvertSize {
		return nil, fmt.Errorf("signed advert is %d bytes but gossip metadata holds at most %d: advertise fewer routes or endpoints (aggregate the routes)", len(out), MaxAdvertSize)
	}
	return out, nil
}

func advertDigest(body []byte) []byte {
	h := sha256.New()
	h.Write([]byte(advertDomain))
	h.Write(body)
	return h.Sum(nil)
}

func (a *Advert) appendBody(b []byte) ([]byte, error) {
	for _, s := range []struct {
		name, v string
	}{{"node", a.Node}, {"site", a.Site}, {"region", a.Region}, {"provider", a.Provider}, {"jurisdiction", a.Jurisdiction}} {
		if s.v == "" || len(s.v) > maxNameLen {
			return nil, fmt.Errorf("advert %s %q must be 1-%d bytes", s.name, s.v, maxNameLen)
		}
	}
	if !a.OverlayIP.IsValid() {
		return nil, errors.New("advert has no overlay IP")
	}
	if len(a.Routes) > maxRoutes || len(a.Endpoints) > maxEndpoints {
		return nil, fmt.Errorf("advert has %d routes and %d endpoints; at most %d and %d fit", len(a.Routes), len(a.Endpoints), maxRoutes, maxEndpoints)
	}
	b = appendField(b, tagVersion, binary.AppendUvarint(nil, a.Version))
	ms := a.Timestamp.UnixMilli()
	if ms < 0 {
		return nil, errors.New("advert timestamp is before 1970")
	}
	b = appendField(b, tagTimestamp, binary.AppendUvarint(nil, uint64(ms)))
	b = appendField(b, tagNode, []byte(a.Node))
	b = appendField(b, tagSite, []byte(a.Site))
	b = appendField(b, tagRegion, []byte(a.Region))
	b = appendField(b, tagProvider, []byte(a.Provider))
	b = appendField(b, tagJurisdiction, []byte(a.Jurisdiction))
	b = appendField(b, tagOverlayIP, a.OverlayIP.Unmap().AsSlice())
	if len(a.Routes) > 0 {
		var v []byte
		for _, r := range a.Routes {
			if !r.IsValid() || r != r.Masked() {
				return nil, fmt.Errorf("advert route %s is not a canonical prefix", r)
			}
			v = appendPrefix(v, r)
		}
		b = appendField(b, tagRoutes, v)
	}
	b = appendField(b, tagWireGuardKey, a.WireGuardKey[:])
	if len(a.Endpoints) > 0 {
		var v []byte
		for _, e := range a.Endpoints {
			if !e.IsValid() || e.Addr().Zone() != "" {
				return nil, fmt.Errorf("advert endpoint %s is not an address:port without zone", e)
			}
			v = appendAddrPort(v, e)
		}
		b = appendField(b, tagEndpoints, v)
	}
	b = appendField(b, tagCertHash, a.CertHash[:])
	if a.Load > 0 {
		b = appendField(b, tagLoad, binary.AppendUvarint(nil, uint64(a.Load)))
	}
	if a.NextWireGuardKey != (WGPublicKey{}) {
		b = appendField(b, tagNextWGKey, a.NextWireGuardKey[:])
	}
	if !a.WireGuardKeyProof.IsZero() {
		b = appendField(b, tagWGProof, a.WireGuardKeyProof[:])
	}
	return b, nil
}

func appendField(b []byte, tag byte, v []byte) []byte {
	b = append(b, tag)
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

// A prefix is its family (4 or 6), its length, and only the address bytes
// the length covers: 10.1.0.0/16 takes four bytes.
func appendPrefix(b []byte, p netip.Prefix) []byte {
	fam := byte(6)
	if p.Addr().Is4() {
		fam = 4
	}
	addr := p.Addr().AsSlice()
	return append(append(b, fam, byte(p.Bits())), addr[:(p.Bits()+7)/8]...)
}

func appendAddrPort(b []byte, ap netip.AddrPort) []byte {
	addr := ap.Addr().Unmap()
	fam := byte(6)
	if addr.Is4() {
		fam = 4
	}
	b = append(append(b, fam), addr.AsSlice()...)
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

// SignedAdvert is a decoded advert with the parts needed to check its
// signature. Decoding does not establish trust; VerifyAdvert does.
type SignedAdvert struct {
	Advert
	body []byte // the signed bytes
	sig  []byte
}

// DecodeAdvert parses the wire form. It never panics, whatever the input,
// and rejects anything not produced by SignAdvert's canonical encoding.
func DecodeAdvert(raw []byte) (*SignedAdvert, error) {
	if len(raw) > MaxAdvertSize {
		return nil, refuse(ReasonMalformed, "advert is %d bytes, more than %d", len(raw), MaxAdvertSize)
	}
	s := &SignedAdvert{}
	a := &s.Advert
	seen := map[byte]bool{}
	last := -1
	rest := raw
	for len(rest) > 0 {
		start := len(raw) - len(rest)
		tag := rest[0]
		n, w := binary.Uvarint(rest[1:])
		if w <= 0 || w != uvarintLen(n) {
			return nil, refuse(ReasonMalformed, "field at byte %d has a bad length", start)
		}
		rest = rest[1+w:]
		if n > uint64(len(rest)) {
			return nil, refuse(ReasonMalformed, "field 0x%02x at byte %d is truncated", tag, start)
		}
		v := rest[:n]
		rest = rest[n:]
		if int(tag) <= last {
			return nil, refuse(ReasonMalformed, "field 0x%02x at byte %d is out of order", tag, start)
		}
		last = int(tag)
		seen[tag] = true
		var err error
		switch tag {
		case tagVersion:
			a.Version, err = decodeUvarint(v)
		case tagTimestamp:
			var ms uint64
			ms, err = decodeUvarint(v)
			if err == nil && ms > 1<<53 {
				err = errors.New("timestamp out of range")
			}
			a.Timestamp = time.UnixMilli(int64(ms)).UTC()
		case tagNode:
			a.Node, err = decodeString(v)
		case tagSite:
			a.Site, err = decodeString(v)
		case tagRegion:
			a.Region, err = decodeString(v)
		case tagProvider:
			a.Provider, err = decodeString(v)
		case tagJurisdiction:
			a.Jurisdiction, err = decodeString(v)
		case tagOverlayIP:
			var ok bool
			a.OverlayIP, ok = netip.AddrFromSlice(v)
			if !ok || a.OverlayIP.Is4In6() {
				err = errors.New("bad overlay IP")
			}
		case tagRoutes:
			a.Routes, err = decodePrefixes(v)
		case tagWireGuardKey:
			if len(v) != WGKeyLen {
				err = errors.New("bad WireGuard key length")
			}
			copy(a.WireGuardKey[:], v)
			if err == nil && !canonicalKey(a.WireGuardKey) {
				err = errWGKeyForm
			}
		case tagEndpoints:
			a.Endpoints, err = decodeAddrPorts(v)
		case tagCertHash:
			if len(v) != len(a.CertHash) {
				err = errors.New("bad certificate hash length")
			}
			copy(a.CertHash[:], v)
		case tagLoad:
			var n uint64
			if n, err = decodeUvarint(v); err == nil {
				if n == 0 || n > 1<<32-1 {
					err = errors.New("bad load")
				}
				a.Load = uint32(n)
			}
		case tagNextWGKey:
			if len(v) != WGKeyLen {
				err = errors.New("bad next WireGuard key length")
			}
			copy(a.NextWireGuardKey[:], v)
			if err == nil && !canonicalKey(a.NextWireGuardKey) {
				err = errWGKeyForm
			}
		case tagWGProof:
			if len(v) != WGProofLen {
				err = errors.New("bad WireGuard key proof length")
			}
			copy(a.WireGuardKeyProof[:], v)
			if a.WireGuardKeyProof.IsZero() {
				err = errors.New("empty WireGuard key proof (an advert without one leaves the field out)")
			}
		case tagSignature:
			if len(rest) != 0 {
				err = errors.New("data after signature")
			}
			s.body = raw[:start]
			s.sig = v
		default:
			if tag < tagOptional {
				err = fmt.Errorf("unknown critical field 0x%02x (is this gateway older than the sender?)", tag)
			}
		}
		if err != nil {
			return nil, refuse(ReasonMalformed, "field 0x%02x at byte %d: %v", tag, start, err)
		}
	}
	for _, t := range []byte{tagVersion, tagTimestamp, tagNode, tagSite, tagRegion, tagProvider, tagJurisdiction, tagOverlayIP, tagWireGuardKey, tagCertHash, tagSignature} {
		if !seen[t] {
			return nil, refuse(ReasonMalformed, "required field 0x%02x is missing", t)
		}
	}
	return s, nil
}

func uvarintLen(n uint64) int { return len(binary.AppendUvarint(nil, n)) }

func decodeUvarint(v []byte) (uint64, error) {
	n, w := binary.Uvarint(v)
	if w <= 0 || w != len(v) || w != uvarintLen(n) {
		return 0, errors.New("bad varint")
	}
	return n, nil
}

func decodeString(v []byte) (string, error) {
	if len(v) == 0 || len(v) > maxNameLen || !utf8.Valid(v) {
		return "", errors.New("bad string")
	}
	return string(v), nil
}

func decodePrefixes(v []byte) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for len(v) > 0 {
		if len(v) < 2 {
			return nil, errors.New("truncated prefix")
		}
		fam, bits := v[0], int(v[1])
		size := 16
		if fam == 4 {
			size = 4
		} else if fam != 6 {
			return nil, errors.New("bad address family")
		}
		if bits > size*8 {
			return nil, errors.New("bad prefix length")
		}
		n := (bits + 7) / 8
		if len(v) < 2+n {
			return nil, errors.New("truncated prefix")
		}
		var buf [16]byte
		copy(buf[:], v[2:2+n])
		addr, _ := netip.AddrFromSlice(buf[:size])
		p := netip.PrefixFrom(addr, bits)
		if p != p.Masked() {
			return nil, errors.New("prefix has host bits set")
		}
		out = append(out, p)
		v = v[2+n:]
	}
	if len(out) == 0 || len(out) > maxRoutes {
		return nil, errors.New("bad number of routes")
	}
	return out, nil
}

func decodeAddrPorts(v []byte) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for len(v) > 0 {
		size := 16
		switch v[0] {
		case 4:
			size = 4
		case 6:
		default:
			return nil, errors.New("bad address family")
		}
		if len(v) < 1+size+2 {
			return nil, errors.New("truncated endpoint")
		}
		addr, _ := netip.AddrFromSlice(v[1 : 1+size])
		if addr.Is4In6() {
			return nil, errors.New("IPv4 endpoint encoded as IPv6")
		}
		out = append(out, netip.AddrPortFrom(addr, binary.BigEndian.Uint16(v[1+size:])))
		v = v[1+size+2:]
	}
	if len(out) == 0 || len(out) > maxEndpoints {
		return nil, errors.New("bad number of endpoints")
	}
	return out, nil
}
