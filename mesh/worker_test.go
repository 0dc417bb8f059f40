package mesh

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
	"github.com/skybridge-mesh/skybridge/policy"
)

// lonelyGateway runs one live gateway with a CA of its own.
func lonelyGateway(t *testing.T) (*certs.CA, *liveGateway) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	return ca, startLiveGateway(t, ca, dir, 0, "zrh-dc", nil, &syncbuf.Buffer{})
}

// TestWorkerSurvivesMalformedMessages: whatever arrives by gossip — any
// type byte, no fields, empty fields — the gateway's worker refuses it
// and goes on. A panic there would end the gateway, for anyone holding
// the gossip key to cause (a byte 0xf0, once an internal job's type, did).
func TestWorkerSurvivesMalformedMessages(t *testing.T) {
	ca, lg := lonelyGateway(t)
	d := delegate{g: lg.g}
	for typ := range 256 {
		for fields := range 5 {
			for _, field := range [][]byte{{}, {0}, {0xff}} {
				var fs [][]byte
				for range fields {
					fs = append(fs, field)
				}
				d.NotifyMsg(encodeMessage(byte(typ), fs...))
			}
		}
	}
	// Then a good message, which the worker reaches only after the rest:
	// a certificate request, whose certificate the gateway learns.
	id, err := ca.IssueIdentity(certs.Attributes{Node: "probe", Site: "s", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.9.9")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	d.NotifyMsg(encodeMessage(msgCertRequest, []byte("probe"), id.Certificate().Raw, []byte("127.0.0.1:9")))
	sum := sha256.Sum256(id.Certificate().Raw)
	waitUntil(t, 10*time.Second, "the worker past the malformed messages", func() bool {
		ms := lg.g.members
		ms.mu.Lock()
		defer ms.mu.Unlock()
		_, ok := ms.certs[sum]
		return ok
	})
}

// TestCertRequestAnsweredOnlyWithItsCertificate: a certificate request is
// answered at the address it gives only when it carries a valid
// certificate of the gateway it names — the gossip key alone must not
// make a gateway send to any address it likes.
func TestCertRequestAnsweredOnlyWithItsCertificate(t *testing.T) {
	ca, lg := lonelyGateway(t)
	d := delegate{g: lg.g}
	issue := func(node string, ip string) []byte { return mustIssue(t, ca, node, ip) }
	listen := func() *net.UDPConn { return listenUDP(t) }
	refused, answered := listen(), listen()
	other := issue("other", "100.64.9.8")
	// In order: requests that must go unanswered, then one that is
	// answered. The worker takes them one at a time and sends a
	// certificate as one datagram before it takes the next, so once the
	// last one's answer is in, any answer to the others would be too.
	d.NotifyMsg(encodeMessage(msgCertRequest, []byte("probe"), other, []byte(refused.LocalAddr().String())))
	d.NotifyMsg(encodeMessage(msgCertRequest, []byte("probe"), []byte("not a certificate"), []byte(refused.LocalAddr().String())))
	d.NotifyMsg(encodeMessage(msgCertRequest, []byte("probe"), issue("probe", "100.64.9.9"), []byte(answered.LocalAddr().String())))
	answered.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 2048)
	if _, err := answered.Read(buf); err != nil {
		t.Fatalf("a request with the requester's own certificate: no answer: %v", err)
	}
	// Already queued if it was sent at all; a deadline already past
	// would not even look.
	refused.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, err := refused.Read(buf); err == nil {
		t.Fatalf("a request with another gateway's certificate, or none, was answered (%d bytes)", n)
	}
	// A gateway gossip knows is answered where gossip knows it, whatever
	// address the request gives: certificates are no secret, and one
	// replayed under its own name must not aim our answer elsewhere.
	known := listen()
	lg.g.members.update("known", netip.MustParseAddrPort(known.LocalAddr().String()), []byte("its advert"))
	d.NotifyMsg(encodeMessage(msgCertRequest, []byte("known"), issue("known", "100.64.9.7"), []byte(refused.LocalAddr().String())))
	known.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := known.Read(buf); err != nil {
		t.Fatalf("a request from a known gateway: no answer at its gossip address: %v", err)
	}
	refused.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, err := refused.Read(buf); err == nil {
		t.Fatalf("a known gateway's request was answered at the address it gave (%d bytes)", n)
	}
}

// TestBlobRequestsBounded: a blob request names its requester in its own
// words (the gossip key is all it takes to send one). A stranger gossip
// merely named gets nothing: not the policy, which only verified members
// get, nor even the public revocation list. A stream of requests naming a
// member draws one blob a second, not one each: otherwise a few bytes of
// requests would aim a gateway's policy and lists at any member, or at any
// address, a thousandfold.
func TestBlobRequestsBounded(t *testing.T) {
	ca, lg := lonelyGateway(t)
	d := delegate{g: lg.g}
	// A policy held, so that requests for it would be answered.
	<-lg.g.joined // gossip up: adopting announces
	src := []byte("policy {\n  name    = \"bounded\"\n  version = 1\n}\nclass \"risk-batch\" {\n  allow \"store\" {\n    jurisdiction = [\"CH\"]\n  }\n}\n")
	sig, err := policy.Sign("policy.hcl", src, ca.Signer(), "mesh CA", nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := lg.g.AdoptPolicy(src, sig.Marshal()); !ok || err != nil {
		t.Fatalf("adopt a policy to be asked for: %v, %v", ok, err)
	}
	listen := func() *net.UDPConn { return listenUDP(t) }
	at := func(c *net.UDPConn) netip.AddrPort { return netip.MustParseAddrPort(c.LocalAddr().String()) }
	stranger, member, sync := listen(), listen(), listen()
	lg.g.members.update("stranger", at(stranger), []byte("junk meta"))
	verifiedMember(t, lg.g, ca, "member", "100.64.9.9", at(member))
	buf := make([]byte, 64<<10)
	// synced sends a certificate request last and waits for its answer:
	// the worker takes messages in order and sends a list this small as
	// one datagram before the next, so every send that was going to be
	// made at once has been.
	synced := func() {
		t.Helper()
		d.NotifyMsg(encodeMessage(msgCertRequest, []byte("probe"), mustIssue(t, ca, "probe", "100.64.9.8"), []byte(sync.LocalAddr().String())))
		sync.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := sync.Read(buf); err != nil {
			t.Fatalf("no answer to the last request: %v", err)
		}
	}
	count := func(c *net.UDPConn) int {
		n := 0
		for {
			c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if _, err := c.Read(buf); err != nil {
				return n
			}
			n++
		}
	}
	// paced checks what member got for a burst of messages sent from
	// start on: one send at once and, for the others, one more a pace
	// later, then nothing. The second is told by when it came, not by
	// being missing from a window read after the burst: on a slow machine
	// (the race detector, a busy CI) the test could take a pace to get
	// there, and read the second as come at once.
	paced := func(start time.Time, what string) {
		t.Helper()
		// Sent before the sync's answer, it is there: half a pace only
		// covers a slow read, and is short of a send put off a pace.
		member.SetReadDeadline(time.Now().Add(blobPace / 2))
		if _, err := member.Read(buf); err != nil {
			t.Errorf("%s: nothing sent at once: %v", what, err)
			return
		}
		// Folded in, the others cannot keep a member from being answered
		// or asked.
		member.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := member.Read(buf); err != nil {
			t.Errorf("%s: nothing sent a pace later: %v", what, err)
		} else if at := time.Since(start); at < blobPace {
			t.Errorf("%s: a second send %s after the first message, within the pace (%s)", what, at.Round(time.Millisecond), blobPace)
		}
		if n := count(member); n != 0 {
			t.Errorf("%s: %d more sends", what, n)
		}
	}
	start := time.Now()
	for range 20 {
		d.NotifyMsg(encodeMessage(msgBlobRequest, []byte{blobCRL}, []byte("stranger"), nil))
		d.NotifyMsg(encodeMessage(msgBlobRequest, []byte{blobPolicy}, []byte("stranger"), nil))
		d.NotifyMsg(encodeMessage(msgBlobRequest, []byte{blobCRL}, []byte("member"), nil))
	}
	synced()
	if n := count(stranger); n != 0 {
		t.Errorf("a stranger gossip merely named got %d blobs", n)
	}
	paced(start, "20 requests naming a member")

	// Announcements of a newer policy make the gateway ask the member
	// named, if verified: a forged one naming anyone else is ignored, and
	// takes nothing from the member's. The stranger is named for the
	// forgery: gossip knows where it is, so an ask would reach it.
	// The member's 20 more come right behind its first, so that they are
	// within the pace however slow the test is.
	start = time.Now()
	for range 20 {
		d.NotifyMsg(encodeMessage(msgAnnounce, []byte{blobPolicy}, binary.BigEndian.AppendUint64(nil, 1<<62), []byte("stranger")))
	}
	d.NotifyMsg(encodeMessage(msgAnnounce, []byte{blobPolicy}, binary.BigEndian.AppendUint64(nil, 7), []byte("member")))
	for range 20 {
		d.NotifyMsg(encodeMessage(msgAnnounce, []byte{blobPolicy}, binary.BigEndian.AppendUint64(nil, 1<<62), []byte("member")))
	}
	synced()
	if n := count(stranger); n != 0 {
		t.Errorf("20 announcements naming a member never verified made %d requests to it", n)
	}
	paced(start, "an announcement by a member after 20 forged ones, and 20 more by it")
}

// TestCertAskedForgets: the names the worker asked for certificates are
// forgotten once their retry time has passed and enough have gathered —
// every burst gateway brings a new name, for months.
func TestCertAskedForgets(t *testing.T) {
	g := &Gateway{certAsked: map[string]time.Time{}}
	old := time.Now().Add(-certRetry)
	for i := range certAskedPrune {
		g.certAsked[fmt.Sprintf("gone-%d", i)] = old
	}
	g.certAsked["recent"] = time.Now()
	g.forgetCertAsks()
	if len(g.certAsked) != 1 {
		t.Fatalf("%d names remembered, want only the recent one", len(g.certAsked))
	}
}

// TestDamagedAdoptedPolicy: a gateway whose adopted policy no longer
// reads does not start — on an older policy, or none (every verified
// gateway linked) — but says which file and what to do.
func TestDamagedAdoptedPolicy(t *testing.T) {
	_, lg := lonelyGateway(t)
	d := stateDir(lg.g.s.StateDir)
	if err := os.WriteFile(d.path(fileAdoptedPolicy), []byte(`{"policy":"cG9s`), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := newGateway(context.Background(), lg.g.s, nil, options{device: NewRecordingDevice("again"), noControl: true, noMigrations: true})
	if err == nil || !strings.Contains(err.Error(), fileAdoptedPolicy) || !strings.Contains(err.Error(), "restore") {
		t.Fatalf("a gateway with a damaged adopted policy: %v", err)
	}
}

// TestRevocationListsOfTwoCAs: while an issuer is rotated a gateway
// trusts two CAs, each with its list. Its blob carries both (as a kind
// gateways from before rotation ignore), and a blob of lists brings in
// each list newer than the one in force; a list of a CA it does not
// trust is passed over, not taken and not an error.
func TestRevocationListsOfTwoCAs(t *testing.T) {
	ca, lg := lonelyGateway(t)
	g := lg.g
	dir := t.TempDir()
	next, err := certs.InitCA(filepath.Join(dir, "next"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := certs.InitCA(filepath.Join(dir, "stranger"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	list := func(c *certs.CA) *x509.RevocationList {
		tb, err := c.TrustBundle()
		if err != nil {
			t.Fatal(err)
		}
		return tb.CRL()
	}
	tb, err := certs.NewTrustBundle([]*x509.Certificate{ca.Certificate(), next.Certificate()}, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*certs.CA{ca, next} {
		if tb, err = tb.WithCRL(list(c)); err != nil {
			t.Fatal(err)
		}
	}
	if !g.adoptTrust(tb, time.Now()) {
		t.Fatal("a bundle with a second CA was not adopted")
	}
	m, err := decodeMessage(g.blob(blobCRL), maxFields)
	if err != nil || m.typ != msgBlob || m.fields[0][0] != blobCRLs {
		t.Fatalf("the blob of a gateway with two CAs: %v, %+v", err, m)
	}
	if raws, err := unbundle(m.fields[1]); err != nil || len(raws) != 2 {
		t.Fatalf("the blob holds %d lists (%v), want 2", len(raws), err)
	}

	// The first CA revokes a gateway; its list arrives with the second
	// CA's unchanged one and a stranger's.
	id := revokedGateway(t, ca)
	before := g.trust.Load().CRLVersion()
	blob := encodeMessage(msgBlob, []byte{blobCRLs}, bundle(list(ca).Raw, list(next).Raw, list(stranger).Raw))
	if err := g.handle(blob); err != nil {
		t.Fatalf("a blob with a stranger's list: %v", err)
	}
	now := g.trust.Load()
	if !now.IsRevoked(id.Certificate().SerialNumber) || now.CRLVersion() <= before || len(now.CAs()) != 2 {
		t.Fatalf("after the blob: revoked %v, version %d (was %d), %d CAs", now.IsRevoked(id.Certificate().SerialNumber), now.CRLVersion(), before, len(now.CAs()))
	}

	// The issuer retires the second CA. Neither gossip carrying its list
	// nor an answer to an earlier request that still names it brings it
	// back.
	asked := time.Now()
	stale := now
	retired, err := certs.NewTrustBundle([]*x509.Certificate{ca.Certificate()}, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if !g.adoptTrust(retired, asked) || len(g.trust.Load().CAs()) != 1 {
		t.Fatal("the issuer's answer without the second CA was not adopted")
	}
	if err := g.handle(blob); err != nil {
		t.Fatal(err)
	}
	g.adoptTrust(stale, asked.Add(-time.Second))
	if n := len(g.trust.Load().CAs()); n != 1 {
		t.Fatalf("a retired CA came back by gossip or an older answer: %d CAs", n)
	}
	if !g.trust.Load().IsRevoked(id.Certificate().SerialNumber) {
		t.Fatal("the first CA's revocation was lost with the second CA")
	}
	// A later answer naming it again does (the issuer's word).
	if !g.adoptTrust(stale, time.Now()) || len(g.trust.Load().CAs()) != 2 {
		t.Fatal("a later answer naming the second CA again was not adopted")
	}
}

// TestOwnCertificateRevoked: a gateway that adopts a list revoking its own
// certificate says so in its log, once, and in its status — the other
// gateways refuse it, while its own view of them would not change.
func TestOwnCertificateRevoked(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	logs := &syncbuf.Buffer{}
	g := startLiveGateway(t, ca, dir, 0, "zrh-dc", nil, logs).g
	if st, err := g.Status(); err != nil || st.Identity.Revoked {
		t.Fatalf("before any revocation: %+v, %v", st.Identity, err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{g.id.Load().Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the same list twice, then a newer one
		tb, err := ca.TrustBundle()
		if err != nil {
			t.Fatal(err)
		}
		g.adoptTrust(tb, time.Now())
	}
	if err := ca.RefreshCRL(time.Now()); err != nil {
		t.Fatal(err)
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	g.adoptTrust(tb, time.Now())
	if st, err := g.Status(); err != nil || !st.Identity.Revoked {
		t.Fatalf("after its revocation: %+v, %v", st.Identity, err)
	}
	if n := strings.Count(logs.String(), "own certificate is revoked"); n != 1 {
		t.Fatalf("its revocation said %d times, want once:\n%s", n, logs.String())
	}
}

// TestWantBlob: which announced versions are asked for.
func TestWantBlob(t *testing.T) {
	for _, tc := range []struct {
		name    string
		kind    byte
		v, have uint64
		cas     int
		want    bool
	}{
		{"a newer list", blobCRL, 8, 7, 1, true},
		{"the same list", blobCRL, 7, 7, 1, false},
		{"an older list, one CA", blobCRL, 6, 7, 1, false},
		{"a lower sum, two CAs (a CA retired there)", blobCRL, 4, 60, 2, true},
		{"the same sum, two CAs", blobCRL, 60, 60, 2, false},
		{"an older policy", blobPolicy, 3, 4, 2, false},
		{"a newer policy", blobPolicy, 5, 4, 1, true},
	} {
		if got := wantBlob(tc.kind, tc.v, tc.have, tc.cas); got != tc.want {
			t.Errorf("%s: wantBlob = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// mustIssue is the certificate of a gateway node of site "s" at ip.
func mustIssue(t *testing.T, ca *certs.CA, node, ip string) []byte {
	t.Helper()
	id, err := ca.IssueIdentity(certs.Attributes{Node: node, Site: "s", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr(ip)}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return id.Certificate().Raw
}

// verifiedMember makes node (certified by ca, at overlay address ip) a
// verified member of g, gossiping from gossip: its certificate and signed
// advert reach g as they would by gossip. No gateway runs behind it.
func verifiedMember(t *testing.T, g *Gateway, ca *certs.CA, node, ip string, gossip netip.AddrPort) *certs.NodeIdentity {
	t.Helper()
	id, err := ca.IssueIdentity(certs.Attributes{Node: node, Site: "far-" + node, Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr(ip)}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	wg, _ := certs.GenerateWGKey()
	proof, _ := certs.ProveWGKey(wg, id.Fingerprint())
	a := id.Attributes()
	meta, err := certs.SignAdvert(&certs.Advert{Version: 1, Timestamp: time.Now(), Node: a.Node, Site: a.Site, Region: a.Region, Provider: a.Provider,
		Jurisdiction: a.Jurisdiction, OverlayIP: a.OverlayIP, WireGuardKey: wg.Public(), WireGuardKeyProof: proof}, id)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.members.addCert(id.Certificate().Raw); err != nil {
		t.Fatal(err)
	}
	g.members.update(node, gossip, meta)
	if g.members.verified(node) == nil {
		t.Fatalf("%s is not verified", node)
	}
	return id
}

// listenUDP is a UDP socket on loopback, closed with the test.
func listenUDP(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// meshCA is an embedded mesh CA in dir/ca for the mesh range the tests
// use.
func meshCA(t testing.TB, dir string) *certs.CA {
	t.Helper()
	return meshCAFor(t, dir, 0)
}

// meshCAFor is meshCA whose certificate lasts validity (0: the default).
func meshCAFor(t testing.TB, dir string, validity time.Duration) *certs.CA {
	t.Helper()
	ca, err := certs.InitCA(filepath.Join(dir, "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10"), Validity: validity})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// TestJoinStateCertificatesFit: a join's certificates go in as many
// parts as they need, each within a part's bound, and the bundle stays
// within its part count; past that the newcomer fetches the rest. One
// part of all of them was dropped whole past some 1,300 certificates.
func TestJoinStateCertificatesFit(t *testing.T) {
	cert := func(i int) []byte {
		b := make([]byte, 800)
		binary.BigEndian.PutUint32(b, uint32(i))
		return b
	}
	for _, n := range []int{0, 1, 1000, 3000, maxJoinCerts} {
		all := make([][]byte, n)
		for i := range all {
			all[i] = cert(i)
		}
		parts := certParts(all)
		b := bundle(append([][]byte{encodeMessage(msgCert, cert(-1)), encodeMessage(msgBlob, []byte{blobCRL}, make([]byte, 100<<10)), encodeMessage(msgBlob, []byte{blobPolicy}, make([]byte, 200<<10))}, parts...)...)
		got, err := unbundle(b)
		if err != nil {
			t.Fatalf("%d certificates: the bundle does not unbundle: %v", n, err)
		}
		carried := 0
		for _, m := range got[3:] {
			dm, err := decodeMessage(m, maxJoinCerts)
			if err != nil || dm.typ != msgCerts {
				t.Fatalf("%d certificates: a part: %v", n, err)
			}
			for _, c := range dm.fields {
				if binary.BigEndian.Uint32(c) != uint32(carried) {
					t.Fatalf("%d certificates: certificate %d out of order", n, carried)
				}
				carried++
			}
		}
		if want := min(n, maxJoinCertParts*(maxMessageField/(800+binary.MaxVarintLen32))); carried < want-maxJoinCertParts || carried > n {
			t.Fatalf("%d certificates: %d carried in %d parts, want about %d", n, carried, len(parts), want)
		}
	}
}

// TestInboxBoundedByBytes: what the worker's queues hold is bounded in
// bytes, not only in messages (inboxSize messages of a megabyte each,
// from anyone holding the gossip key, were some 8 GiB); blobs cannot take
// the part kept for quick messages, and those come first.
func TestInboxBoundedByBytes(t *testing.T) {
	g := &Gateway{inbox: make(chan []byte, inboxSize), bulk: make(chan []byte, bulkSize), log: slog.New(slog.DiscardHandler)}
	d := delegate{g: g}
	blob := encodeMessage(msgBlob, []byte{blobCRL}, make([]byte, maxMessageField))
	for range (maxInboxBytes-inboxQuickReserve)/len(blob) + 10 {
		d.NotifyMsg(blob)
	}
	queued := 0
	for _, q := range []chan []byte{g.inbox, g.bulk} {
		for range len(q) {
			b := <-q
			queued += len(b)
			q <- b
		}
	}
	if held := g.inboxBytes.Load(); queued > maxInboxBytes-inboxQuickReserve || held != int64(queued) {
		t.Fatalf("%d MiB of blobs queued (counted %d MiB), more than the %d MiB blobs may take", queued>>20, held>>20, (maxInboxBytes-inboxQuickReserve)>>20)
	}
	// A large message of another type is no quick one.
	d.NotifyMsg(encodeMessage(msgCert, make([]byte, maxQuickMsg)))
	if len(g.inbox) != 0 {
		t.Fatal("a message larger than any quick one was queued as quick")
	}
	cert := encodeMessage(msgCert, make([]byte, 800))
	d.NotifyMsg(cert)
	if len(g.inbox) != 1 {
		t.Fatal("a certificate was dropped behind the blobs")
	}
	if b, _, ok := g.next(context.Background(), &queueTurn{}); !ok || !bytes.Equal(b, cert) {
		t.Fatalf("the worker's next message is %d bytes, want the certificate before %d blobs", len(b), len(g.bulk))
	}
}

// TestRevocationListSignerCheckedFirst: a revocation list from gossip is
// refused for its signer before it is parsed, which for one of a
// megabyte costs the worker tens of milliseconds: one whose entries do
// not even parse is refused as signed by no trusted CA, whether it names
// its own issuer or copies the name of the mesh's CA.
func TestRevocationListSignerCheckedFirst(t *testing.T) {
	f := newFixture(t)
	trust := f.trust()
	g := &Gateway{log: slog.New(slog.DiscardHandler)}
	g.trust.Store(trust)
	if err := signedByTrustedCA(trust, trust.CRL().Raw); err != nil {
		t.Fatalf("the mesh CA's own list: %v", err)
	}
	for _, copied := range []bool{false, true} {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "junk"}, NotBefore: f.now.Add(-time.Hour), NotAfter: f.now.Add(time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCRLSign | x509.KeyUsageCertSign}
		if copied {
			tmpl.RawSubject = trust.CAs()[0].RawSubject
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
		if err != nil {
			t.Fatal(err)
		}
		issuer, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		list, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(99), ThisUpdate: f.now, NextUpdate: f.now.Add(time.Hour),
			RevokedCertificateEntries: []x509.RevocationListEntry{{SerialNumber: big.NewInt(7), RevocationTime: f.now}}}, issuer, k)
		if err != nil {
			t.Fatal(err)
		}
		// The first entry made a SET, which no parse takes.
		var outer struct{ TBS, Algorithm, Signature asn1.RawValue }
		if _, err := asn1.Unmarshal(list, &outer); err != nil {
			t.Fatal(err)
		}
		for in := outer.TBS.Bytes; len(in) > 0; {
			var v asn1.RawValue
			if in, err = asn1.Unmarshal(in, &v); err != nil {
				t.Fatal(err)
			}
			if v.Class == asn1.ClassUniversal && v.Tag == asn1.TagSequence && len(v.Bytes) > 0 && v.Bytes[0] == 0x30 {
				v.Bytes[0] = 0x31 // in list: v aliases it
				break
			}
		}
		if _, err := x509.ParseRevocationList(list); err == nil {
			t.Fatal("the damaged list parses")
		}
		err = g.handle(encodeMessage(msgBlob, []byte{blobCRL}, list))
		if !errors.Is(err, errNotOurCAs) {
			t.Errorf("a list signed by a key of the sender's own (issuer name copied: %v) whose entries do not parse: %v, want refused for its signer", copied, err)
		}
		if err := g.handle(encodeMessage(msgBlob, []byte{blobCRLs}, bundle(list))); err != nil {
			t.Errorf("the same among several lists (issuer name copied: %v): %v, want passed over unparsed", copied, err)
		}
	}
}

// countParses counts the parses of list through parseCRL, for the test's
// length: those of other lists (another test's gateways) are not counted.
func countParses(t *testing.T, list []byte) *atomic.Int64 {
	var n atomic.Int64
	parse := parseCRL
	parseCRL = func(b []byte) (*x509.RevocationList, error) {
		if bytes.Equal(b, list) {
			n.Add(1)
		}
		return parse(b)
	}
	t.Cleanup(func() { parseCRL = parse })
	return &n
}

// TestRevocationListKnownNotParsed: a genuine revocation list held, or
// one passed over as older than held, is not parsed again in another
// framing (PEM, beside a junk part), which anyone holding the gossip key
// can send without end: only its bytes compared, or its SHA-256.
func TestRevocationListKnownNotParsed(t *testing.T) {
	f := newFixture(t)
	older := f.trust().CRL().Raw
	id := f.identity("gone", "s", 9, f.now)
	if _, err := f.ca.RevokeSerials([]*big.Int{id.Certificate().SerialNumber}, "keyCompromise", f.now); err != nil {
		t.Fatal(err)
	}
	trust := f.trust()
	held := trust.CRL().Raw
	g := &Gateway{log: slog.New(slog.DiscardHandler), members: newMembership("me", trust, func() time.Time { return f.now }, func() {})}
	g.trust.Store(trust)
	pemOf := func(der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}) }
	for _, list := range [][]byte{held, older} {
		parses := countParses(t, list)
		msgs := [][]byte{
			encodeMessage(msgBlob, []byte{blobCRL}, list),
			encodeMessage(msgBlob, []byte{blobCRL}, pemOf(list)),
			encodeMessage(msgBlob, []byte{blobCRLs}, bundle(list, []byte("x"))),
			encodeMessage(msgBlob, []byte{blobCRLs}, bundle(pemOf(list), []byte("x"))),
		}
		for range 3 {
			for _, m := range msgs {
				if err := g.handle(m); err != nil {
					t.Fatal(err)
				}
			}
		}
		want := int64(0) // the list held
		if bytes.Equal(list, older) {
			want = 1 // once, to find it older
		}
		if got := parses.Load(); got != want {
			t.Errorf("a list (held: %v) sent %d times in several framings was parsed %d times, want %d", bytes.Equal(list, held), 3*len(msgs), got, want)
		}
	}
	if !bytes.Equal(g.trust.Load().CRL().Raw, held) {
		t.Fatal("the list held changed")
	}
}

// TestWorkerTakesBulk: a steady stream of quick messages does not keep
// blobs out: one is taken at least every bulkEvery quick ones, or once
// it has waited bulkWait; with no quick one waiting, at once.
func TestWorkerTakesBulk(t *testing.T) {
	g := &Gateway{inbox: make(chan []byte, 64), bulk: make(chan []byte, 64), fetch: make(chan string, 64)}
	quick, blob := []byte{msgCert}, []byte{msgBlob}
	for range 40 {
		g.inbox <- quick
	}
	for range 4 {
		g.bulk <- blob
	}
	var turn queueTurn
	var order []byte
	for range 44 {
		b, _, ok := g.next(context.Background(), &turn)
		if !ok {
			t.Fatal("next ended")
		}
		order = append(order, b[0])
	}
	// Every bulkEvery+1'th is a blob while both queues hold some.
	for i, typ := range order[:4*(bulkEvery+1)] {
		if want := (i+1)%(bulkEvery+1) == 0; (typ == msgBlob) != want {
			t.Fatalf("message %d is a blob: %v, want %v (order %v)", i, typ == msgBlob, want, order)
		}
	}
	// A blob that has waited bulkWait goes before the next quick one.
	g.inbox <- quick
	g.bulk <- blob
	turn = queueTurn{waiting: time.Now().Add(-bulkWait)}
	if b, _, _ := g.next(context.Background(), &turn); b[0] != msgBlob {
		t.Fatal("a blob that waited bulkWait came after a quick message")
	}
	if b, _, _ := g.next(context.Background(), &turn); b[0] != msgCert {
		t.Fatal("the quick message was lost")
	}
}

// TestGossipedDeltaCRLRefused: a delta CRL of the mesh CA (an issuer that
// publishes them: Vault with enable_delta, served without a login),
// gossiped alone or among lists by anyone holding the gossip key, is
// numbered above the complete list in force, and was taken in its place:
// every revocation it did not repeat was gone, and VerifyCertificate
// (keyring operations, certificates learned from then on, policy
// signers) accepted the revoked certificate again. It is refused, saying
// why, and the complete list stays in force.
func TestGossipedDeltaCRLRefused(t *testing.T) {
	ca, lg := lonelyGateway(t)
	g := lg.g
	id := revokedGateway(t, ca)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	complete := tb.CRL()
	if err := g.handle(encodeMessage(msgBlob, []byte{blobCRL}, complete.Raw)); err != nil {
		t.Fatal(err)
	}
	if _, err := g.trust.Load().VerifyCertificate(id.Certificate(), time.Now()); certs.ReasonOf(err) != certs.ReasonRevoked {
		t.Fatalf("after the complete list: %v, want revoked", err)
	}

	// The issuer's next deltas: what was revoked since the complete list
	// (nothing).
	base, err := asn1.Marshal(complete.Number)
	if err != nil {
		t.Fatal(err)
	}
	delta := func(n int64) []byte {
		der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
			Number: new(big.Int).Add(complete.Number, big.NewInt(n)), ThisUpdate: time.Now(), NextUpdate: time.Now().Add(time.Hour),
			ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 27}, Critical: true, Value: base}},
		}, ca.Certificate(), ca.Signer())
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	for _, msg := range [][]byte{
		encodeMessage(msgBlob, []byte{blobCRL}, delta(1)),
		encodeMessage(msgBlob, []byte{blobCRLs}, bundle(delta(2), complete.Raw)),
	} {
		if err := g.handle(msg); certs.ReasonOf(err) != certs.ReasonMalformed || !strings.Contains(err.Error(), "delta CRL") {
			t.Errorf("a gossiped delta CRL: %v, want it refused as a delta", err)
		}
		if _, err := g.trust.Load().VerifyCertificate(id.Certificate(), time.Now()); certs.ReasonOf(err) != certs.ReasonRevoked {
			t.Errorf("after a gossiped delta CRL: %v, want the certificate still revoked (list in force #%s)", err, g.trust.Load().CRL().Number)
		}
	}
}

// revokedGateway is a gateway certificate ca issued and then revoked for
// keyCompromise.
func revokedGateway(t *testing.T, ca *certs.CA) *certs.NodeIdentity {
	t.Helper()
	id, err := ca.IssueIdentity(certs.Attributes{Node: "gw-x", Site: "s", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.MustParseAddr("100.64.9.10")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.RevokeSerials([]*big.Int{id.Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	return id
}
