package certs

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"encoding/binary"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

func TestAdvertRoundTrip(t *testing.T) {
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw1", "aws-eu-central-1", "100.96.0.10", "10.20.0.0/16", "fd00:20::/48", "192.168.7.0/24"), t0, time.Hour)
	a := advertFor(id, 1<<40, t0.Add(123456789*time.Nanosecond))
	a.Load = 3
	rotating(a)
	raw := sign(t, a, id)
	sa, err := DecodeAdvert(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(sa.Advert, *a) {
		t.Fatalf("round trip changed the advert:\n got %+v\nwant %+v", sa.Advert, *a)
	}
	if !sa.Timestamp.Equal(t0.Add(123 * time.Millisecond)) {
		t.Fatalf("timestamp = %v, want millisecond precision", sa.Timestamp)
	}
	body, err := sa.appendBody(nil)
	if err != nil || !bytes.Equal(body, sa.body) {
		t.Fatal("re-encoding the decoded advert does not give the signed bytes")
	}
}

// TestAdvertFitsGossipMeta checks the design limit: a gateway with a
// large claim set (long names, sixteen routes, four endpoints) fits into
// memberlist's 512-byte node metadata, also during a WireGuard key
// rotation under load, which LargestSize (what gateways check at start) counts.
func TestAdvertFitsGossipMeta(t *testing.T) {
	ca := newTestCA(t)
	a := testAttrs("gateway-a-very-long-node-name-01", "aws-eu-central-1-burst-site-x", "100.96.255.254")
	a.Region = "europe-west3-frankfurt-zone-a"
	for i := range 16 {
		a.Routes = append(a.Routes, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16))
	}
	id := issue(t, ca, a, t0, time.Hour)
	ad := advertFor(id, 1<<62, t0)
	ad.Endpoints = append(ad.Endpoints, netip.MustParseAddrPort("[2001:db8:1:2:3:4:5:6]:51820"), netip.MustParseAddrPort("203.0.113.7:443"))
	plain := sign(t, ad, id)
	largest, err := LargestSize(plain)
	if err != nil {
		t.Fatal(err)
	}
	ad.Load = 1<<32 - 1
	raw := sign(t, rotating(ad), id)
	t.Logf("advert with 16 routes and 4 endpoints: %d bytes, %d with a next WireGuard key and the largest load, at most %d", len(plain), len(raw), largest)
	if largest > MaxAdvertSize {
		t.Fatalf("advert can reach %d bytes", largest)
	}
	// Signatures vary in length (DER): the bodies say what a next key
	// and a load add.
	p, _ := DecodeAdvert(plain)
	r, _ := DecodeAdvert(raw)
	if d := len(r.body) - len(p.body); d != NextWGKeySize+7 {
		t.Fatalf("a next key and the largest load added %d bytes, NextWGKeySize and the load field say %d", d, NextWGKeySize+7)
	}
	if len(raw) > largest || largest-len(raw) > 72-len(r.sig) {
		t.Fatalf("the largest advert is %d bytes with a %d-byte signature, LargestSize says %d", len(raw), len(r.sig), largest)
	}

	// Too many routes must be an error at signing time, never a truncated
	// advert on the wire.
	for i := 16; i < maxRoutes+4; i++ {
		ad.Routes = append(ad.Routes, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, byte(i)}), 48))
	}
	if _, err := SignAdvert(ad, id); err == nil {
		t.Fatal("oversized advert was signed")
	}
}

func TestDecodeAdvertRejectsNonCanonical(t *testing.T) {
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw1", "aws-eu-central-1", "100.96.0.10", "10.20.0.0/16"), t0, time.Hour)
	raw := sign(t, advertFor(id, 3, t0), id)
	sa, err := DecodeAdvert(raw)
	if err != nil {
		t.Fatal(err)
	}
	// raw starts with the version field: tag, length 1, value 3.
	if !bytes.Equal(raw[:3], []byte{tagVersion, 1, 3}) {
		t.Fatalf("unexpected prefix %x", raw[:3])
	}
	rest := raw[3:]
	ts := appendField(nil, tagTimestamp, binaryUvarint(uint64(t0.UnixMilli())))

	cases := map[string][]byte{
		"non-minimal varint value":  append([]byte{tagVersion, 2, 0x83, 0x00}, rest...),
		"non-minimal varint length": append([]byte{tagVersion, 0x81, 0x00, 3}, rest...),
		"out of order":              append(append(append([]byte(nil), ts...), raw[:3]...), rest[len(ts):]...),
		"unknown critical field":    append([]byte{0x3f, 0}, raw...),
		"duplicate field":           append(append([]byte(nil), raw[:3]...), raw...),
		"data after signature":      append(append([]byte(nil), raw...), 0),
		"length beyond end":         append(append([]byte(nil), sa.body...), tagSignature, 200, 1, 2),
		// The proof is the body's last field: 64 zero bytes are no proof,
		// which is written by leaving the field out.
		"empty key proof": append(append(append([]byte(nil), sa.body[:len(sa.body)-WGProofLen]...), make([]byte, WGProofLen)...), raw[len(sa.body):]...),
	}
	// A key written another way than X25519 writes it (top bit set, or
	// u + p): X25519 takes it for the same key, WireGuard and the mesh
	// for another.
	for name, mut := range map[string]func(*Advert){
		"key with top bit":      func(a *Advert) { a.WireGuardKey[31] |= 0x80 },
		"next key with top bit": func(a *Advert) { a.NextWireGuardKey = a.WireGuardKey; a.NextWireGuardKey[31] |= 0x80 },
		"next key u+p": func(a *Advert) {
			for i := range a.NextWireGuardKey {
				a.NextWireGuardKey[i] = 0xff
			}
			a.NextWireGuardKey[0], a.NextWireGuardKey[31] = 0xee, 0x7f // p + 1
		},
	} {
		a := advertFor(id, 3, t0)
		mut(a)
		cases[name] = sign(t, a, id)
	}
	for name, b := range cases {
		if _, err := DecodeAdvert(b); ReasonOf(err) != ReasonMalformed {
			t.Errorf("%s: err = %v, want malformed", name, err)
		}
	}
}

func binaryUvarint(n uint64) []byte { return binary.AppendUvarint(nil, n) }

func TestDecodeAdvertSkipsOptionalFields(t *testing.T) {
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw1", "aws-eu-central-1", "100.96.0.10"), t0, time.Hour)
	a := advertFor(id, 1, t0)
	a.CertHash = id.Fingerprint()
	body, err := a.appendBody(nil)
	if err != nil {
		t.Fatal(err)
	}
	// A newer gateway adds an optional field; an older one still verifies
	// the advert, signature included. A critical one it must refuse.
	for _, tc := range []struct {
		tag  byte
		want Reason
	}{{tagOptional + 0x20, ""}, {tagCertHash + 1, ReasonMalformed}} {
		b := appendField(append([]byte(nil), body...), tc.tag, []byte("future"))
		sig, err := ecdsa.SignASN1(rand.Reader, id.key, advertDigest(b))
		if err != nil {
			t.Fatal(err)
		}
		raw := appendField(b, tagSignature, sig)
		if _, err := VerifyAdvert(raw, id.Certificate(), trust(t, ca), t0, nil); ReasonOf(err) != tc.want {
			t.Errorf("field 0x%02x: err = %v, want %q", tc.tag, err, tc.want)
		}
	}
}

// FuzzDecodeAdvert: whatever arrives over gossip, decoding must not panic,
// and anything it accepts must re-encode to exactly the signed bytes (so
// two gateways can never disagree about what was signed).
func FuzzDecodeAdvert(f *testing.F) {
	ca := newTestCA(f)
	id := issue(f, ca, testAttrs("gw1", "aws-eu-central-1", "100.96.0.10", "10.20.0.0/16", "fd00:20::/48"), t0, time.Hour)
	raw := sign(f, advertFor(id, 9, t0), id)
	genuine, err := DecodeAdvert(raw)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(raw)
	f.Add(raw[:len(raw)/2])
	f.Add([]byte{})
	f.Add([]byte{tagSignature, 0})
	tb := trust(f, ca)
	f.Fuzz(func(t *testing.T, b []byte) {
		sa, err := DecodeAdvert(b)
		if err != nil {
			if ReasonOf(err) != ReasonMalformed {
				t.Fatalf("decode error without malformed reason: %v", err)
			}
			return
		}
		hasOptional := false
		for tag := tagOptional; tag < tagSignature; tag++ {
			if bytes.Contains(sa.body, []byte{byte(tag)}) {
				hasOptional = true
			}
		}
		if body, err := sa.appendBody(nil); err == nil && !hasOptional && !bytes.Equal(body, sa.body) {
			t.Fatalf("decoded advert re-encodes differently:\n in %x\nout %x", sa.body, body)
		}
		// Nothing but the genuine advert may verify.
		if v, err := VerifyAdvert(b, id.Certificate(), tb, t0, nil); err == nil && !bytes.Equal(sa.body, genuine.body) {
			t.Fatalf("fuzzed advert verified: %+v", v.Advert)
		}
	})
}
