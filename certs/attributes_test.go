package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

func TestAttributeURIRoundTrip(t *testing.T) {
	a := testAttrs("gw1", "aws-eu-central-1", "100.96.0.10", "10.20.0.0/16", "fd00:20::/48")
	a.Labels["certified"] = "pci-dss"
	a.Labels["owner"] = "team@bank.example"
	u := a.URI()
	want := "skybridge://aws-eu-central-1/gw1?provider=aws&region=eu-central-1&jurisdiction=DE&route=10.20.0.0/16&route=fd00:20::/48&label.certified=pci-dss&label.classes=pii-eu%2Crisk-batch&label.owner=team%40bank.example&label.tier=gold"
	if u.String() != want {
		t.Fatalf("URI =\n %s\nwant\n %s", u, want)
	}
	parsed, err := url.Parse(u.String())
	if err != nil {
		t.Fatal(err)
	}
	back, err := parseAttributeURI(parsed)
	if err != nil {
		t.Fatal(err)
	}
	if back.OverlayIP.IsValid() {
		t.Fatalf("an attribute URI without ip= gave overlay IP %s", back.OverlayIP)
	}
	back.OverlayIP = a.OverlayIP // from the IP SAN, in a certificate
	if !back.Equal(&a) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", back, a)
	}
	// Pinned, the overlay IP is in the URI, after the jurisdiction.
	pinned := a.PinnedURI()
	if want := strings.Replace(want, "jurisdiction=DE&", "jurisdiction=DE&ip=100.96.0.10&", 1); pinned.String() != want {
		t.Fatalf("pinned URI =\n %s\nwant\n %s", pinned, want)
	}
	if back, err = parseAttributeURI(pinned); err != nil {
		t.Fatal(err)
	}
	if !back.Equal(&a) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", back, a)
	}
	// The node block that asks for these attributes gives them back.
	nc := a.NodeConfig()
	fromBlock, err := nc.Attributes(netip.MustParsePrefix("100.96.0.0/16"))
	if err != nil || !fromBlock.Equal(&a) {
		t.Fatalf("node block round trip: %v\n got %+v\nwant %+v", err, fromBlock, a)
	}
	for _, bad := range []string{
		"https://aws-eu-central-1/gw1?provider=aws&region=r&jurisdiction=DE",
		"skybridge://s/gw1?region=r&jurisdiction=DE",
		"skybridge://s/gw1?provider=a&provider=b&region=r&jurisdiction=DE",
		"skybridge://s/gw1?provider=a&region=r&jurisdiction=DE&route=10.0.0.0/33",
		"skybridge://s/gw1?provider=a&region=r&jurisdiction=DE&colour=blue",
		// What a string glob such as Vault's allowed_uri_sans would let
		// through after the attributes it pins: refused, not read past.
		"skybridge://s/gw1?provider=a&region=r&jurisdiction=CH&route=10.0.0.0%2F8#?provider=a&region=r&jurisdiction=NL",
		"skybridge://x@s/gw1?provider=a&region=r&jurisdiction=DE",
		"skybridge://s/gw1?region=r&provider=a&jurisdiction=DE", // not the canonical order
		"skybridge://s/gw1?provider=a&region=r&jurisdiction=DE&ip=100.96.0.300",
		"skybridge://s/gw1?provider=a&region=r&jurisdiction=DE&ip=100.96.0.1&ip=100.96.0.2",
		"skybridge://s/gw1?provider=a&region=r&ip=100.96.0.1&jurisdiction=DE", // not the canonical order
	} {
		u, _ := url.Parse(bad)
		if _, err := parseAttributeURI(u); err == nil {
			t.Errorf("parseAttributeURI(%s) accepted", bad)
		}
	}
}

// TestAttributesOfBindsOverlayIP: a certificate whose attribute URI names
// an overlay IP must carry that address — a Vault role pins URIs, not IP
// SANs, so a burst gateway could otherwise have any address certified —
// while one from before the URI named it takes the IP SAN.
func TestAttributesOfBindsOverlayIP(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	a := testAttrs("gw1", "burst-ams", "100.96.0.10")
	cert := func(u *url.URL, ip string) *x509.Certificate { return selfSigned(t, key, "gw1", ip, u) }
	if got, err := AttributesOf(cert(a.PinnedURI(), "100.96.0.10")); err != nil || got.OverlayIP != a.OverlayIP {
		t.Fatalf("matching URI and IP SAN: %+v, %v", got, err)
	}
	if _, err := AttributesOf(cert(a.PinnedURI(), "100.96.0.99")); err == nil || !strings.Contains(err.Error(), "names overlay IP 100.96.0.10") {
		t.Fatalf("an IP SAN other than the URI's overlay IP: %v", err)
	}
	if got, err := AttributesOf(cert(a.URI(), "100.96.0.99")); err != nil || got.OverlayIP != netip.MustParseAddr("100.96.0.99") {
		t.Fatalf("a URI without the overlay IP (issued before it was named): %+v, %v", got, err)
	}
}

// selfSigned is a certificate for cn, ip and uris, signed by its own key:
// what AttributesOf reads, trust aside.
func selfSigned(t *testing.T, key *ecdsa.PrivateKey, cn, ip string, uris ...*url.URL) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, URIs: uris,
		IPAddresses: []net.IP{net.ParseIP(ip)}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	return createCert(t, tmpl, tmpl, key)
}

// createCert makes tmpl's certificate, signed by parent's key (key's own
// when tmpl is parent), for a key pair it holds.
func createCert(t *testing.T, tmpl, parent *x509.Certificate, key *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestAttributesOfRefusesAmbiguity: a certificate names one node, one
// place: two attribute URIs (a CA that pins URIs loosely would let the
// holder add its own), or a common name other than the node attribute,
// are refused rather than one of them picked.
func TestAttributesOfRefusesAmbiguity(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	a := testAttrs("gw1", "onprem-zrh", "100.96.0.10")
	b := testAttrs("gw1", "aws-us-east-1", "100.96.0.10")
	b.Jurisdiction = "US"
	cert := func(cn string, us ...*url.URL) *x509.Certificate { return selfSigned(t, key, cn, "100.96.0.10", us...) }
	if got, err := AttributesOf(cert("gw1", a.PinnedURI())); err != nil || got.Site != "onprem-zrh" {
		t.Fatalf("one URI, its node the common name: %+v, %v", got, err)
	}
	if _, err := AttributesOf(cert("gw1", a.PinnedURI(), b.PinnedURI())); err == nil || !strings.Contains(err.Error(), "2 skybridge attribute URIs") {
		t.Fatalf("two attribute URIs: %v; want refused", err)
	}
	if _, err := AttributesOf(cert("gw1")); err == nil || !strings.Contains(err.Error(), "0 skybridge attribute URIs") {
		t.Fatalf("no attribute URI: %v; want refused", err)
	}
	if _, err := AttributesOf(cert("gw2", a.PinnedURI())); err == nil || !strings.Contains(err.Error(), `common name "gw2" differs from its node attribute "gw1"`) {
		t.Fatalf("a common name other than the node: %v; want refused", err)
	}
}

func TestGrants(t *testing.T) {
	a := testAttrs("gw1", "s", "100.96.0.1", "10.20.0.0/16", "fd00:20::/48")
	for p, want := range map[string]bool{
		"10.20.0.0/16": true, "10.20.3.0/24": true, "10.20.3.4/32": true, "fd00:20:0:1::/64": true,
		"10.0.0.0/8": false, "10.21.0.0/16": false, "0.0.0.0/0": false, "::/0": false, "fd00::/16": false,
	} {
		if got := a.Grants(netip.MustParsePrefix(p)); got != want {
			t.Errorf("Grants(%s) = %v, want %v", p, got, want)
		}
	}
}

func TestParseRoutesAndLabels(t *testing.T) {
	if _, err := ParseRoutes([]string{"10.0.0.0/8", "bogus"}); err == nil || !strings.Contains(err.Error(), `"bogus"`) {
		t.Errorf("bad route: err = %v, want it to name the route", err)
	}
	if _, err := ParseLabels([]string{"tier"}); err == nil {
		t.Error("label without = accepted")
	}
	if _, err := ParseLabels([]string{"a=1", "a=2"}); err == nil {
		t.Error("duplicate label accepted")
	}
	m, err := ParseLabels([]string{"tier=gold", "classes=pii-eu"})
	if err != nil || m["tier"] != "gold" || m["classes"] != "pii-eu" {
		t.Errorf("ParseLabels = %v, %v", m, err)
	}
}

func TestIdentitySaveLoad(t *testing.T) {
	ca := newTestCA(t)
	id := issue(t, ca, testAttrs("gw1", "s", "100.96.0.1", "10.1.0.0/16"), t0, time.Hour)
	dir := filepath.Join(t.TempDir(), "id")
	if err := id.Save(dir, trust(t, ca)); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(filepath.Join(dir, fileNodeKey))
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("node.key mode %04o", st.Mode().Perm())
	}
	back, err := LoadNodeIdentity(dir)
	if err != nil {
		t.Fatal(err)
	}
	if back.Fingerprint() != id.Fingerprint() || !back.key.Equal(id.key) {
		t.Fatal("identity changed on save/load")
	}
	tb, err := LoadTrustBundle(dir, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tb.VerifyCertificate(back.Certificate(), t0); err != nil {
		t.Fatal(err)
	}
	// A key that does not match the certificate is refused.
	other := issue(t, ca, testAttrs("gw2", "s", "100.96.0.2"), t0, time.Hour)
	keyPEM, _ := marshalKeyPEM(other.key)
	os.WriteFile(filepath.Join(dir, fileNodeKey), keyPEM, 0o600)
	if _, err := LoadNodeIdentity(dir); err == nil || !strings.Contains(err.Error(), "does not belong") {
		t.Fatalf("mismatched key: err = %v", err)
	}
}

func TestCSRFlow(t *testing.T) {
	ca := newTestCA(t)
	key, _ := GenerateNodeKey()
	a := testAttrs("gw1", "s", "100.96.0.1", "10.1.0.0/16")
	csrPEM, err := CreateCSR(key, a)
	if err != nil {
		t.Fatal(err)
	}
	csr, asked, err := ParseCSR(csrPEM)
	if err != nil {
		t.Fatal(err)
	}
	if !asked.Equal(&a) {
		t.Fatalf("CSR attributes = %+v", asked)
	}
	cert, err := ca.Issue(IssueRequest{Attributes: *asked, PublicKey: csr.PublicKey, Now: t0})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewNodeIdentity(cert, key); err != nil {
		t.Fatal(err)
	}
	// A CSR whose signature was tampered with is refused.
	bad := []byte(strings.Replace(string(csrPEM), "A", "B", 1))
	if _, _, err := ParseCSR(bad); err == nil {
		t.Fatal("tampered CSR accepted")
	}
}

// TestWGKeyMatchesWgTool cross-checks key derivation with wireguard-tools.
func TestWGKeyMatchesWgTool(t *testing.T) {
	wgPath, err := exec.LookPath("wg")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("wg (wireguard-tools) is missing; the test command installs it")
		}
		t.Skip("wg not installed")
	}
	k, _ := GenerateWGKey()
	cmd := exec.Command(wgPath, "pubkey")
	cmd.Stdin = strings.NewReader(k.Base64Secret() + "\n")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != k.Public().String() {
		t.Fatalf("wg pubkey = %s, ours = %s", got, k.Public())
	}
}

// TestValidateRefusesAdvertTooLarge: the CA, embedded or Vault, certified
// names and routes whose gateway's advert could not fit in gossip: four
// 63-character names, or 32 IPv6 routes, each allowed alone. The gateway
// then refused to start, saying to advertise less, which only a new
// certificate could do. They are refused at issue, by how many bytes,
// and the largest set let through does fit, to the byte. A certificate
// issued before is still verified: its gateway may be of an earlier
// release, whose adverts fit.
func TestValidateRefusesAdvertTooLarge(t *testing.T) {
	ca := newTestCA(t)
	long := testAttrs(strings.Repeat("n", 63), strings.Repeat("s", 63), "100.96.0.2")
	long.Region, long.Provider = strings.Repeat("r", 63), strings.Repeat("p", 63)
	v6 := testAttrs("gw1", "fra", "100.96.0.1")
	for i := range maxRoutes {
		v6.Routes = append(v6.Routes, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, byte(i)}), 48))
	}
	var asked atomic.Int32 // of Vault, to sign
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		w.WriteHeader(http.StatusBadRequest)
		w.Write([]byte(`{"errors":["not a Vault"]}`))
	}))
	defer srv.Close()
	cfg := vault.DefaultConfig()
	cfg.Address, cfg.MaxRetries = srv.URL, 0
	client, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	v := &Vault{client: client, cfg: &VaultConfig{PKIMount: "pki", PKIRole: "gateway"}}
	for name, a := range map[string]Attributes{"four 63-character names": long, "32 IPv6 /48 routes": v6} {
		if n, err := a.largestAdvert(); err != nil || n <= MaxAdvertSize {
			t.Fatalf("%s: its advert takes %d bytes at the least (%v); the test wants more than %d", name, n, err, MaxAdvertSize)
		}
		if err := a.Validate(ca.MeshPrefix()); err == nil || !strings.Contains(err.Error(), "more than the 512 gossip carries") {
			t.Errorf("%s: Validate says %v, want the advert too large", name, err)
		}
		if _, err := ca.IssueIdentity(a, time.Hour, t0); err == nil {
			t.Errorf("%s: the CA issued it", name)
		}
		if _, err := v.Sign(t.Context(), nil, a, time.Hour); err == nil || asked.Load() > 0 || !strings.Contains(err.Error(), "gossip carries") {
			t.Errorf("%s: Vault asked to sign it (%d requests): %v", name, asked.Load(), err)
		}
		id := certifyUnchecked(t, ca, a, t0.Add(-time.Minute), t0.Add(time.Hour))
		if _, err := trust(t, ca).VerifyCertificate(id.Certificate(), t0); err != nil {
			t.Errorf("%s: certified before, refused now: %v", name, err)
		}
	}

	// The site's name grows a byte at a time until the set is refused.
	a := testAttrs(strings.Repeat("n", 63), "s", "100.96.0.3", "10.1.0.0/16")
	a.Region, a.Provider = strings.Repeat("r", 63), strings.Repeat("p", 63)
	var last *NodeIdentity
	for ; len(a.Site) < 63; a.Site += "s" {
		err := a.Validate(ca.MeshPrefix())
		if err == nil {
			last = issue(t, ca, a, t0, time.Hour)
			continue
		}
		if last == nil || !strings.Contains(err.Error(), "1 more than the 512") {
			t.Fatalf("site name of %d bytes: %v; want refused by one byte, after a shorter one passed", len(a.Site), err)
		}
		break
	}
	if last == nil || len(a.Site) == 63 {
		t.Fatal("no site name was refused: the test's names are too short")
	}
	// ... at the least: with one IPv4 endpoint, at this century's times.
	ad := advertFor(last, uint64(t0.UnixMilli()), t0)
	ad.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:51820")}
	raw, err := SignAdvert(ad, last)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := LargestSize(raw); err != nil || n != MaxAdvertSize {
		t.Errorf("the largest set let through: its advert can reach %d bytes (%v), want %d", n, err, MaxAdvertSize)
	}
}
