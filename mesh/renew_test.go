package mesh

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// TestRenewThroughCAHolder: a gateway whose identity was issued offline
// renews it through the gateway holding the CA (identity.renew_from), at
// its start when it is due and again at its renewal time, without
// leaving the mesh: the CA-holding gateway verifies each new certificate.
// What cannot authenticate as the certificate's holder is refused.
func TestRenewThroughCAHolder(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	var logs syncbuf.Buffer
	hq := startEnroller(t, ca, dir, &logs)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	attrs := certs.Attributes{Node: "op1", Site: "fra-dc", Region: "r-fra-dc", Provider: "onprem", Jurisdiction: "CH", OverlayIP: netip.MustParseAddr("100.64.7.2")}
	var first string
	fra := startLiveGatewayWith(t, ca, dir, 1, "fra-dc", []string{hq.g.s.GossipAdvertise.String()}, &logs, func(s *Settings) {
		// 20 s, backdated a minute: due for renewal at once, and every
		// 13–15 s after that.
		s.Node = provisionGateway(t, ca, tb, attrs, 20*time.Second, s.Identity.Dir)
		id, err := certs.LoadNodeIdentity(s.Identity.Dir)
		if err != nil {
			t.Fatal(err)
		}
		first = certs.FormatSerial(id.Certificate().SerialNumber)
		s.Identity.RenewFrom = []string{hq.g.s.EnrollListen.String()}
	})
	serial := func(lg *liveGateway) string { return certs.FormatSerial(lg.g.id.Load().Certificate().SerialNumber) }
	atStart := serial(fra)
	if atStart == first {
		t.Fatalf("the gateway started on its certificate past its renewal time (%s) instead of renewing it", first)
	}
	// Its identity directory holds a renewed one, for a restart (this
	// one, or the next: a life this short is due again at once).
	if onDisk, err := certs.LoadNodeIdentity(fra.g.s.Identity.Dir); err != nil || certs.FormatSerial(onDisk.Certificate().SerialNumber) == first {
		t.Fatalf("identity directory after the renewal at start: %v; still the certificate issued offline", err)
	}
	// Renewed again by the running gateway, and the CA-holding gateway
	// verifies that certificate: the tunnel stays.
	var renewed string
	waitUntil(t, 40*time.Second, "a renewal while running that the CA holder verifies", func() bool {
		renewed = serial(fra)
		if renewed == atStart {
			return false
		}
		st, err := hq.g.Status()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range st.Members {
			if m.Node == "op1" {
				return m.State == StateVerified && m.Peer && m.IdentityExpiry.Equal(fra.g.id.Load().Certificate().NotAfter)
			}
		}
		return false
	})
	issued, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	var ofFra []string
	for _, e := range issued {
		if e.Node == "op1" {
			ofFra = append(ofFra, e.Serial)
		}
	}
	if len(ofFra) < 3 || !containsAll(ofFra, first, atStart, renewed) {
		t.Fatalf("the CA's index holds %v for op1; want the offline one and both renewals", ofFra)
	}
	if st, err := fra.g.Status(); err != nil || st.Identity.Issuer != "renew_from" {
		t.Fatalf("status issuer: %v %v", st, err)
	}
	if !strings.Contains(logs.String(), "renewed the certificate of a gateway issued offline") {
		t.Fatal("the CA-holding gateway did not log the renewal")
	}

	// Someone with the certificate but not its key gets nothing: TLS
	// proves possession, and without a client certificate it is refused.
	key, err := certs.GenerateNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := certs.CreateCSR(key, attrs)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(certs.RenewRequest{CSR: csr})
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	res, err := client.Post("https://"+hq.g.s.EnrollListen.String()+certs.RenewPath, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusForbidden {
		t.Fatalf("a renewal without a client certificate: %s; want 403", res.Status)
	}
	// A certificate that is not its gateway's latest (a copy taken
	// before the holder renewed) renews nothing.
	old, err := certs.LoadNodeIdentity(fra.g.s.Identity.Dir)
	if err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, "stale")
	if err := old.Save(stale, tb); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 40*time.Second, "the holder to renew past the copied certificate", func() bool {
		return serial(fra) != certs.FormatSerial(old.Certificate().SerialNumber)
	})
	// Its holder, restarted from the copy, is refused and keeps it.
	p, err := certs.Open(context.Background(), certs.Config{Dir: stale, RenewFrom: []string{hq.g.s.EnrollListen.String()}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	refusedBefore := testutil.ToFloat64(hq.g.metrics.renewals.WithLabelValues("refused"))
	kept, _, err := p.Identity(context.Background(), attrs)
	if err != nil || !kept.Certificate().Equal(old.Certificate()) {
		t.Fatalf("identity from the copy: %v; want the copy kept, its renewal refused", err)
	}
	if got := testutil.ToFloat64(hq.g.metrics.renewals.WithLabelValues("refused")); got != refusedBefore+1 {
		t.Fatalf("refused renewals counted %v, want %v", got, refusedBefore+1)
	}
	if !strings.Contains(logs.String(), "is not its latest") {
		t.Fatal("the CA-holding gateway did not say why it refused the copy")
	}
}

func containsAll(have []string, want ...string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			found = found || h == w
		}
		if !found {
			return false
		}
	}
	return true
}
