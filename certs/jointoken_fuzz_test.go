package certs

import (
	"bytes"
	"net/netip"
	"net/url"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// FuzzParseJoinToken: whatever is pasted as a join token, ParseJoinToken
// returns a token or an error, and a token it returns encodes to one that
// parses to the same token.
func FuzzParseJoinToken(f *testing.F) {
	ca, err := InitCA(filepath.Join(f.TempDir(), "ca"), InitOptions{})
	if err != nil {
		f.Fatal(err)
	}
	exp := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	tok, err := NewJoinToken("burst-ams", ca.Certificate(), []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:7947"), netip.MustParseAddrPort("[2001:db8::1%eth0]:7947")}, exp)
	if err != nil {
		f.Fatal(err)
	}
	tok.Enroller = "gw-zrh"
	f.Add(tok.Encode())
	vj := &VaultJoin{Address: "https://vault:8200", RoleID: "r", WrappedSecretID: "w", PKIRole: "p",
		Node: testAttrs("burst-1", "burst-ams", "100.64.0.9")}
	vt, err := NewVaultJoinToken("burst-ams", vj, exp)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(vt.Encode())
	f.Add("sbj1.")
	f.Add("sbj1.e30")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ParseJoinToken(s)
		if err != nil {
			if tok != nil {
				t.Fatal("token and error")
			}
			return
		}
		again, err := ParseJoinToken(tok.Encode())
		if err != nil {
			t.Fatalf("a parsed token does not parse once encoded: %v", err)
		}
		if again.ID != tok.ID || !bytes.Equal(again.Secret, tok.Secret) || again.CAPin != tok.CAPin || again.Site != tok.Site ||
			!again.Expires.Equal(tok.Expires) || !reflect.DeepEqual(again.Endpoints, tok.Endpoints) || again.Enroller != tok.Enroller ||
			(again.Vault == nil) != (tok.Vault == nil) {
			t.Fatalf("round trip changed the token:\n%+v\n%+v", *tok, *again)
		}
		if tok.Vault == nil && (len(tok.Secret) != 32 || len(tok.Endpoints) == 0) {
			t.Fatalf("accepted a token with a %d-byte secret and %d endpoints", len(tok.Secret), len(tok.Endpoints))
		}
	})
}

// FuzzAttributeURI: the attribute URI of a certificate or CSR is taken
// only in the one form URI writes, so what parses is its own encoding,
// and that encoding parses back to the same attributes.
func FuzzAttributeURI(f *testing.F) {
	a := testAttrs("gw1", "aws-eu", "100.64.0.1", "10.0.0.0/8")
	f.Add(a.URI().String())
	f.Add(a.PinnedURI().String())
	f.Add("skybridge://s/n?provider=p&region=r&jurisdiction=DE&label.a%2Fb=c%20d")
	f.Fuzz(func(t *testing.T, s string) {
		u, err := url.Parse(s)
		if err != nil {
			return
		}
		got, err := parseAttributeURI(u)
		if err != nil {
			return
		}
		want := got.URI()
		if got.OverlayIP.IsValid() {
			want = got.PinnedURI()
		}
		if want.String() != u.String() {
			t.Fatalf("took %q, which encodes as %q", u, want)
		}
		again, err := parseAttributeURI(want)
		if err != nil || !again.Equal(&got) {
			t.Fatalf("%q parses, and its encoding does not parse back to the same attributes: %v", u, err)
		}
	})
}
