package certs

import (
	"bytes"
	"crypto/ecdsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestSecretsNeverPrint: private halves must not leak through fmt (any
// verb), slog (text or JSON) or encoding/json.
func TestSecretsNeverPrint(t *testing.T) {
	wg, err := GenerateWGKey()
	if err != nil {
		t.Fatal(err)
	}
	kr, err := GenerateGossipKeyring()
	if err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1"), t0, time.Hour)
	keyPEM, _ := marshalKeyPEM(id.key)
	caKeyPEM, _ := marshalKeyPEM(ca.key)

	secrets := map[string][]string{
		"wireguard key": {wg.Base64Secret(), fmt.Sprintf("%x", wg.k[:])},
		"gossip key":    {base64.StdEncoding.EncodeToString(kr.Primary()), fmt.Sprintf("%x", kr.Primary())},
		"node key":      {rawKey(t, id.key), string(keyPEM)},
		"CA key":        {rawKey(t, ca.key), string(caKeyPEM)},
	}
	values := map[string]any{"wireguard key": wg, "gossip key": kr, "node key": id, "CA key": ca}
	for name, sig := range map[string]any{"node key": id.Signer(), "CA key": ca.Signer()} {
		var out bytes.Buffer
		fmt.Fprintf(&out, "%v %+v %#v %x", sig, sig, sig, sig)
		slog.New(slog.NewJSONHandler(&out, nil)).Info("m", "signer", sig)
		for _, s := range secrets[name] {
			if strings.Contains(out.String(), s) {
				t.Errorf("%s signer leaked: %s", name, out.String())
			}
		}
	}

	for name, v := range values {
		var out bytes.Buffer
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%d", "%q"} {
			fmt.Fprintf(&out, verb+"\n", v)
			fmt.Fprintf(&out, verb+"\n", &v)
		}
		fmt.Fprintln(&out, v)
		slog.New(slog.NewTextHandler(&out, nil)).Info("m", "v", v)
		slog.New(slog.NewJSONHandler(&out, nil)).Info("m", "v", v)
		if b, err := json.Marshal(v); err == nil {
			out.Write(b)
		}
		for _, s := range secrets[name] {
			if strings.Contains(out.String(), s) {
				t.Errorf("%s leaked in output:\n%s", name, out.String())
			}
		}
	}

	// The public side prints usefully.
	pub := wg.Public()
	if got := fmt.Sprint(pub); got != base64.StdEncoding.EncodeToString(pub[:]) {
		t.Errorf("public key prints as %q", got)
	}
	if got := fmt.Sprint(id); !strings.Contains(got, "gw1") {
		t.Errorf("identity prints as %q, want its node name", got)
	}
}

func TestWGKeys(t *testing.T) {
	k, err := GenerateWGKey()
	if err != nil {
		t.Fatal(err)
	}
	// Clamped as wg genkey does.
	if k.k[0]&7 != 0 || k.k[31]&0x80 != 0 || k.k[31]&0x40 == 0 {
		t.Fatal("key not clamped")
	}
	k2, err := ParseWGPrivateKey(k.Base64Secret() + "\n")
	if err != nil || k2.Public() != k.Public() {
		t.Fatalf("parse round trip: %v", err)
	}
	// RFC 7748 section 6.1 test vector (Alice's key pair).
	alice, _ := base64.StdEncoding.DecodeString("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=")
	wantPub := "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
	var a WGPrivateKey
	copy(a.k[:], alice)
	if got := a.Public().String(); got != wantPub {
		t.Fatalf("RFC 7748 vector: public = %s, want %s", got, wantPub)
	}
	for _, bad := range []string{"", "abc", base64.StdEncoding.EncodeToString(make([]byte, 31))} {
		if _, err := ParseWGPrivateKey(bad); err == nil {
			t.Errorf("ParseWGPrivateKey(%q) accepted", bad)
		}
	}
	var pub WGPublicKey
	if err := pub.UnmarshalText([]byte(wantPub)); err != nil || pub.String() != wantPub {
		t.Fatalf("public key text round trip: %v", err)
	}
}

func TestGossipKeyring(t *testing.T) {
	kr, _ := GenerateGossipKeyring()
	k2, _ := NewGossipKey()
	kr2, err := NewGossipKeyring([][]byte{k2, kr.Primary()})
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseGossipKeyring(kr2.MarshalSecret())
	if err != nil {
		t.Fatal(err)
	}
	if back.Len() != 2 || !bytes.Equal(back.Primary(), k2) || !bytes.Equal(back.Keys()[1], kr.Primary()) {
		t.Fatal("keyring round trip lost order or keys")
	}
	for name, keys := range map[string][][]byte{
		"empty":     nil,
		"short key": {make([]byte, 8)},
		"duplicate": {k2, k2},
	} {
		if _, err := NewGossipKeyring(keys); err == nil {
			t.Errorf("%s keyring accepted", name)
		}
	}
	if _, err := ParseGossipKeyring([]byte("not base64!\n")); err == nil || strings.Contains(err.Error(), "not base64!") {
		t.Errorf("bad keyring file: err = %v (must not echo the content)", err)
	}
	// A file cut mid-line: 32 of a 32-byte key's 44 characters still
	// decode, to a 24-byte key another gateway does not have.
	whole := kr2.MarshalSecret()
	line := strings.Index(string(whole), "\n") + 1
	if _, err := ParseGossipKeyring(whole[:line+32]); err == nil || !strings.Contains(err.Error(), "cut short") || strings.Contains(err.Error(), string(whole[line:line+32])) {
		t.Errorf("a keyring cut mid-line: err = %v", err)
	}
	// A whole key without the final newline (copied through a shell
	// variable, a secret store) is fine.
	if back, err := ParseGossipKeyring(bytes.TrimSuffix(whole, []byte("\n"))); err != nil || !bytes.Equal(back.Primary(), kr2.Primary()) {
		t.Errorf("a keyring without its final newline: %v", err)
	}
}

// rawKey is the private scalar in hex, the way a leak through %x would
// show it.
func rawKey(t *testing.T, k *ecdsa.PrivateKey) string {
	b, err := k.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", b)
}

// TestGossipKeyringSame: the same keys with the same primary are the same
// keyring whatever the order of the others (a store is then not written);
// another primary, or a key more or less, is not.
func TestGossipKeyringSame(t *testing.T) {
	a, b, c := make([]byte, 32), make([]byte, 32), make([]byte, 32)
	a[0], b[0], c[0] = 1, 2, 3
	ring := func(keys ...[]byte) *GossipKeyring {
		kr, err := NewGossipKeyring(keys)
		if err != nil {
			t.Fatal(err)
		}
		return kr
	}
	for _, tc := range []struct {
		name string
		x, y *GossipKeyring
		same bool
	}{
		{"identical", ring(a, b, c), ring(a, b, c), true},
		{"others reordered", ring(a, b, c), ring(a, c, b), true},
		{"another primary", ring(a, b), ring(b, a), false},
		{"a key more", ring(a, b), ring(a, b, c), false},
		{"another key", ring(a, b), ring(a, c), false},
		{"nothing stored", ring(a), nil, false},
	} {
		if got := tc.x.Same(tc.y); got != tc.same {
			t.Errorf("%s: Same = %v, want %v", tc.name, got, tc.same)
		}
	}
}
