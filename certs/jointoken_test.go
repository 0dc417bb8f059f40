package certs

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestJoinTokenRoundTrip(t *testing.T) {
	ca, err := InitCA(filepath.Join(t.TempDir(), "ca"), InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	exp := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	eps := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:7947"), netip.MustParseAddrPort("[2001:db8::1]:7947")}
	tok, err := NewJoinToken("burst-ams", ca.Certificate(), eps, exp)
	if err != nil {
		t.Fatal(err)
	}
	tok.Enroller = "gw-zrh"
	text := tok.Encode()
	got, err := ParseJoinToken("  " + text + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != tok.ID || !bytes.Equal(got.Secret, tok.Secret) || got.CAPin != tok.CAPin || got.Site != "burst-ams" ||
		!got.Expires.Equal(exp) || len(got.Endpoints) != 2 || got.Endpoints[1] != eps[1] || got.Enroller != "gw-zrh" {
		t.Fatalf("round trip: %+v", got)
	}
	if got.CAPin != CAPin(ca.Certificate()) {
		t.Fatal("pin is not the CA's")
	}
	if !got.Expired(exp) || got.Expired(exp.Add(-time.Second)) {
		t.Fatal("expiry")
	}
	if !MatchesSecretHash(tok.Secret, got.SecretHash()) || MatchesSecretHash([]byte("x"), got.SecretHash()) {
		t.Fatal("secret hash")
	}
	other, _ := NewJoinToken("burst-ams", ca.Certificate(), eps, exp)
	if other.ID == tok.ID || bytes.Equal(other.Secret, tok.Secret) {
		t.Fatal("two tokens share an ID or a secret")
	}

	// The secret never shows in fmt or slog output.
	secret := strings.TrimPrefix(text, joinTokenPrefix)
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("x", "token", tok)
	slog.New(slog.NewTextHandler(&logged, nil)).Info("x", "token", tok)
	for _, out := range []string{fmt.Sprint(tok), fmt.Sprintf("%v %+v %#v %s %x", tok, tok, tok, tok, tok), logged.String()} {
		b64 := base64.RawURLEncoding.EncodeToString(tok.Secret)
		if strings.Contains(out, secret) || strings.Contains(out, b64) || strings.Contains(out, fmt.Sprintf("%x", tok.Secret)) {
			t.Fatalf("token secret printed: %s", out)
		}
	}
	if !strings.Contains(fmt.Sprint(tok), tok.ID) {
		t.Fatal("String should name the token")
	}
}

func TestParseJoinTokenErrors(t *testing.T) {
	good := joinTokenJSON{ID: "0123456789abcdef", Secret: strings.Repeat("A", 43), CAPin: strings.Repeat("ab", 32), Endpoints: []string{"192.0.2.1:7947"}, Site: "burst-ams", Expires: 1}
	enc := func(j joinTokenJSON) string {
		b, _ := json.Marshal(j)
		return joinTokenPrefix + base64url(b)
	}
	if _, err := ParseJoinToken(enc(good)); err != nil {
		t.Fatalf("good token: %v", err)
	}
	for _, tc := range []struct {
		name string
		tok  string
		want string
	}{
		{"no prefix", "hello", "not a skybridge join token"},
		{"not base64", joinTokenPrefix + "!!!", "not base64url"},
		{"not json", joinTokenPrefix + base64url([]byte("{")), "damaged"},
		{"short id", enc(func() joinTokenJSON { j := good; j.ID = "01"; return j }()), "id is malformed"},
		{"short secret", enc(func() joinTokenJSON { j := good; j.Secret = "AAAA"; return j }()), "secret is malformed"},
		{"bad pin", enc(func() joinTokenJSON { j := good; j.CAPin = "zz"; return j }()), "CA pin is malformed"},
		{"bad endpoint", enc(func() joinTokenJSON { j := good; j.Endpoints = []string{"gw1"}; return j }()), `endpoint "gw1"`},
		{"no endpoint", enc(func() joinTokenJSON { j := good; j.Endpoints = nil; return j }()), "no enrollment endpoint"},
		{"bad site", enc(func() joinTokenJSON { j := good; j.Site = "A B"; return j }()), "site"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseJoinToken(tc.tok); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
		})
	}
}

// TestVerifyEnroller: the enrolling gateway must present a certificate
// from the pinned CA, with that CA in the chain.
func TestVerifyEnroller(t *testing.T) {
	dir := t.TempDir()
	ca, err := InitCA(filepath.Join(dir, "ca"), InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rogue, err := InitCA(filepath.Join(dir, "rogue"), InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	attrs := Attributes{Node: "gw1", Site: "zrh", Region: "zrh-dc1", Provider: "onprem", Jurisdiction: "CH", OverlayIP: netip.MustParseAddr("100.96.0.1")}
	id, err := ca.IssueIdentity(attrs, time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	fake, err := rogue.IssueIdentity(attrs, time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	other, err := ca.IssueIdentity(Attributes{Node: "gw2", Site: "zrh", Region: "zrh-dc1", Provider: "onprem", Jurisdiction: "CH", OverlayIP: netip.MustParseAddr("100.96.0.2")}, time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	// The enrolling gateway serves TLS: a certificate of the pinned CA
	// for client authentication only is not one it may serve with.
	clientOnly := certifyUnchecked(t, ca, attrs, now.Add(-time.Hour), now.Add(time.Hour))
	tok, err := NewJoinToken("burst", ca.Certificate(), []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:7947")}, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	tok.Enroller = "gw1"
	for _, tc := range []struct {
		name  string
		chain [][]byte
		at    time.Time
		want  string // "" for accepted
	}{
		{"gateway of the pinned CA", [][]byte{id.Certificate().Raw, ca.Certificate().Raw}, now, ""},
		{"no CA in the chain", [][]byte{id.Certificate().Raw}, now, "no CA certificate"},
		{"another CA", [][]byte{fake.Certificate().Raw, rogue.Certificate().Raw}, now, "not the one the join token pins"},
		{"another CA's gateway with the pinned CA", [][]byte{fake.Certificate().Raw, ca.Certificate().Raw}, now, "does not chain"},
		{"expired certificate", [][]byte{id.Certificate().Raw, ca.Certificate().Raw}, now.Add(2 * time.Hour), "does not chain"},
		{"another gateway of the mesh", [][]byte{other.Certificate().Raw, ca.Certificate().Raw}, now, "the join token names gw1"},
		{"client authentication only", [][]byte{clientOnly.Certificate().Raw, ca.Certificate().Raw}, now, "does not chain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tok.VerifyEnroller(tc.chain, tc.at)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
		})
	}
}

func base64url(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// TestVaultJoinRedacted: the Vault half of a join token, and what burst up
// gets from Vault, never print their wrapped SecretIDs — but the token's
// encoding still carries them.
func TestVaultJoinRedacted(t *testing.T) {
	const wrapped = "hvs.WRAPPED-SECRET-ID"
	vj := &VaultJoin{Address: "https://vault.example:8200", RoleID: "role-1", WrappedSecretID: wrapped}
	gw := VaultBurstGateway{Node: "burst-ams-gw1", Role: "skybridge-burst-ams.burst-ams-gw1", RoleID: "role-1", WrappedSecretID: wrapped}
	vb := &VaultBurst{Name: "skybridge-burst-ams", Gateways: []VaultBurstGateway{gw}}
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("x", "vault", vj, "burst", vb, "gateway", gw, "gateways", vb.Gateways)
	for _, out := range []string{fmt.Sprintf("%v %+v %#v %s", vj, vj, vj, vj), fmt.Sprintf("%v %+v %#v", vb, vb, vb),
		fmt.Sprintf("%v %+v %#v %v", gw, gw, gw, vb.Gateways), logged.String()} {
		if strings.Contains(out, wrapped) {
			t.Fatalf("a wrapped SecretID was printed: %s", out)
		}
	}
	b, err := json.Marshal(vj)
	if err != nil || !strings.Contains(string(b), wrapped) {
		t.Fatalf("the token's JSON lost the wrapped SecretID: %s %v", b, err)
	}
}

// TestJoinTokenPrintsNoSecret: a join token prints and logs its public
// half whether it is held as a pointer, a value (a copy, a slice of
// tokens, a struct field) or encoded to JSON; Encode alone writes it
// whole.
func TestJoinTokenPrintsNoSecret(t *testing.T) {
	ca := newTestCA(t)
	tok, err := NewJoinToken("burst-ams", ca.Certificate(), []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:7947")}, t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for _, v := range []any{tok, *tok, []JoinToken{*tok}, struct{ Token JoinToken }{*tok}} {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x"} {
			fmt.Fprintf(&out, verb+"\n", v)
		}
		slog.New(slog.NewTextHandler(&out, nil)).Info("m", "v", v)
		slog.New(slog.NewJSONHandler(&out, nil)).Info("m", "v", v)
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		out.Write(b)
	}
	for _, s := range []string{base64.StdEncoding.EncodeToString(tok.Secret), base64.RawURLEncoding.EncodeToString(tok.Secret), hex.EncodeToString(tok.Secret)} {
		if strings.Contains(out.String(), s) {
			t.Fatalf("the token's secret is in what was printed:\n%s", out.String())
		}
	}
	if !strings.Contains(out.String(), tok.ID) {
		t.Errorf("the token's ID is not in what was printed:\n%s", out.String())
	}
	back, err := ParseJoinToken(tok.Encode())
	if err != nil || !bytes.Equal(back.Secret, tok.Secret) {
		t.Errorf("Encode, parsed again: %v, %v; want the secret whole", back, err)
	}
}
