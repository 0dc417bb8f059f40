package migrate

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
	"github.com/skybridge-mesh/skybridge/policy"
)

const testPolicy = `policy {
  name    = "migrate-test"
  version = 1
}
class "pii-eu" {
  allow "store" {
    jurisdiction = ["DE", "CH"]
  }
  allow "transit" {
    jurisdiction = ["DE", "CH"]
  }
}
class "swiss-banking-secret" {
  allow "store" {
    jurisdiction = ["CH"]
  }
  allow "transit" {
    jurisdiction = ["CH"]
  }
}
`

// pair is a sending and a receiving gateway on loopback, with real
// identities from one mesh CA, real TLS and real journals.
type pair struct {
	t          testing.TB
	dir        string
	ca         *certs.CA
	from, to   *certs.NodeIdentity
	tb         *certs.TrustBundle
	pol        *policy.Policy
	recvPolicy atomic.Pointer[policy.Policy]
	sendJ      *Journal
	recvJ      *Journal
	recv       *Receiver
	addr       netip.AddrPort
	store      string
	sendAudit  *audit.Log
	recvAudit  *audit.Log
	recvLog    syncbuf.Buffer // what the receiving gateway logged
	// stopRecv stops the receiver and returns what Serve returned, once
	// it has (at the test's end if not before).
	stopRecv func() error
}

func newPair(t testing.TB, toJur string) *pair {
	t.Helper()
	return newPairWith(t, toJur, nil)
}

// newPairWith is newPair with a last change to the receiver's
// configuration.
func newPairWith(t testing.TB, toJur string, tweak func(*ReceiverConfig)) *pair {
	t.Helper()
	return newPairLabelled(t, toJur, nil, tweak)
}

// newPairLabelled is newPairWith whose destination's certificate carries
// labels.
func newPairLabelled(t testing.TB, toJur string, toLabels map[string]string, tweak func(*ReceiverConfig)) *pair {
	t.Helper()
	dir := t.TempDir()
	ca, err := certs.InitCA(filepath.Join(dir, "ca"), certs.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	issue := func(node, site, cc string, host byte, labels map[string]string) *certs.NodeIdentity {
		id, err := ca.IssueIdentity(certs.Attributes{Node: node, Site: site, Region: "r", Provider: "onprem", Jurisdiction: cc,
			OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, host}), Labels: labels}, time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	p := &pair{t: t, dir: dir, ca: ca, from: issue("gw-zrh", "onprem-zrh", "CH", 1, nil), to: issue("gw-dst", "dst-site", toJur, 2, toLabels)}
	p.tb, _ = ca.TrustBundle()
	p.pol, err = policy.Parse("p.hcl", []byte(testPolicy))
	if err != nil {
		t.Fatal(err)
	}
	p.recvPolicy.Store(p.pol)
	if p.sendJ, err = OpenJournal(filepath.Join(dir, "send.db")); err != nil {
		t.Fatal(err)
	}
	if p.recvJ, err = OpenJournal(filepath.Join(dir, "recv.db")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.sendJ.Close(); p.recvJ.Close() })
	p.store = filepath.Join(dir, "store")
	p.sendAudit, p.recvAudit = audit.Open(filepath.Join(dir, "send-audit.log")), audit.Open(filepath.Join(dir, "recv-audit.log"))
	rcfg := ReceiverConfig{
		StoreDir: p.store, Journal: p.recvJ,
		Identity: func() *certs.NodeIdentity { return p.to }, Trust: func() *certs.TrustBundle { return p.tb },
		Policy: p.recvPolicy.Load, Audit: p.recvAudit, Log: slog.New(slog.NewTextHandler(&p.recvLog, nil)),
	}
	if tweak != nil {
		tweak(&rcfg)
	}
	p.recv, err = NewReceiver(rcfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- p.recv.Serve(ctx, ln) }()
	p.stopRecv = sync.OnceValue(func() error {
		cancel()
		return <-served
	})
	t.Cleanup(func() { p.stopRecv() })
	return p
}

func (p *pair) config(image, class string) SendConfig {
	var d net.Dialer
	return SendConfig{
		Image: image, Class: class, Streams: 3,
		From: p.from.Attributes(), To: Peer{Attributes: p.to.Attributes(), Addr: p.addr},
		Policy: p.pol, Identity: func() *certs.NodeIdentity { return p.from }, Trust: p.tb, Journal: p.sendJ, Audit: p.sendAudit,
		Dial: func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) },
		Log:  slog.New(slog.DiscardHandler),
	}
}

// dial connects to the receiver as from (the pair's sender if nil), with
// 20 s for what the test does there; the connection closes with the test.
// rawSession is a migration offered and joined frame by frame, as a
// sender would speak the protocol: for tests of what a receiver does with
// frames no conforming sender sends.
type rawSession struct {
	ctrl, data *tls.Conn
	cw, dw     *frameWriter
	cr, dr     *frameReader
	acc        Accept
}

// offerRaw offers o on a control stream and joins one data stream to it.
func (p *pair) offerRaw(t *testing.T, o Offer) *rawSession {
	t.Helper()
	rs := p.offered(t, o)
	rs.join(t, p, o.ID)
	return rs
}

// offered offers o on a control stream, which the receiver accepts.
func (p *pair) offered(t *testing.T, o Offer) *rawSession {
	t.Helper()
	rs := &rawSession{ctrl: p.dial(t, nil)}
	rs.cw, rs.cr = newFrameWriter(rs.ctrl), newFrameReader(rs.ctrl)
	if err := rs.cw.json(frameOffer, o); err != nil {
		t.Fatal(err)
	}
	if err := rs.cr.json(frameAccept, &rs.acc); err != nil {
		t.Fatalf("offer: %v", err)
	}
	return rs
}

// join joins a data stream to migration id.
func (rs *rawSession) join(t *testing.T, p *pair, id string) {
	t.Helper()
	rs.data = p.dial(t, nil)
	rs.dw, rs.dr = newFrameWriter(rs.data), newFrameReader(rs.data)
	if err := rs.dw.json(frameJoin, Join{ID: id}); err != nil {
		t.Fatal(err)
	}
}

// offerDenied offers a 4 KiB image of class under id, which the
// receiver's policy must deny.
func (p *pair) offerDenied(t *testing.T, id, class string) {
	t.Helper()
	c := p.dial(t, nil)
	defer c.Close()
	w, r := newFrameWriter(c), newFrameReader(c)
	o := Offer{ID: id, Name: "vm", Class: class, Format: FormatRaw, Size: 4096, ChunkSize: 4096, Streams: 1}
	if err := w.json(frameOffer, o); err != nil {
		t.Fatal(err)
	}
	var d Deny
	if err := r.json(frameDeny, &d); err != nil {
		t.Fatalf("offer %s of %q: %v; want a denial", id, class, err)
	}
}

func (p *pair) dial(t *testing.T, from *certs.NodeIdentity) *tls.Conn {
	t.Helper()
	if from == nil {
		from = p.from
	}
	raw, err := net.Dial("tcp", p.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	c := tls.Client(raw, clientTLS(from, p.tb, p.to.Attributes(), time.Now))
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return c
}

// slowSend sends image "vm" of 60 chunks of data, each read taking delay,
// and returns once the receiver holds one durable: the transfer is then
// under way for a second or more. Send's error comes on the channel.
func (p *pair) slowSend(t *testing.T, delay time.Duration) <-chan error {
	t.Helper()
	return p.slowSendWith(t, delay, nil)
}

// slowSendWith is slowSend with a last change to the send's configuration.
func (p *pair) slowSendWith(t *testing.T, delay time.Duration, tweak func(*SendConfig)) <-chan error {
	t.Helper()
	raw := filepath.Join(p.dir, "vm.raw")
	const chunk, n = 64 << 10, 60
	blocks := map[int64]int{}
	for i := range int64(n) {
		blocks[i*chunk] = chunk
	}
	makeRaw(t, raw, n*chunk, blocks)
	cfg := p.config(raw, "pii-eu")
	cfg.ChunkSize = chunk
	spyOn(&cfg, delay)
	if tweak != nil {
		tweak(&cfg)
	}
	res := make(chan error, 1)
	go func() {
		_, err := Send(context.Background(), cfg)
		res <- err
	}()
	deadline := time.Now().Add(20 * time.Second)
	for a := p.recv.Active(); len(a) != 1 || a[0].Durable == 0; a = p.recv.Active() {
		if time.Now().After(deadline) {
			t.Fatal("no chunk became durable at the receiver")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return res
}

// makeRaw writes a sparse raw image: size bytes with data blocks at the
// given offsets (alternating random and compressible), holes elsewhere.
func makeRaw(t testing.TB, path string, size int64, blocks map[int64]int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	// In order of offset, so which block is random and which
	// compressible is the same in every run.
	for k, off := range slices.Sorted(maps.Keys(blocks)) {
		n := blocks[off]
		b := make([]byte, n)
		if k%2 == 0 {
			rand.Read(b)
		} else {
			copy(b, bytes.Repeat([]byte("skybridge compressible block "), n/29+1))
		}
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

// writeZeros writes n zero bytes at off of path: allocated, not a hole,
// as a thick-provisioned disk's unused blocks are.
func writeZeros(t *testing.T, path string, off int64, n int) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteAt(make([]byte, n), off)
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		t.Fatal(err)
	}
}

// stored checks that the receiver stores image "vm" as raw is.
func (p *pair) stored(raw string) {
	p.t.Helper()
	img, err := p.recvJ.Image("vm")
	if err != nil {
		p.t.Fatal(err)
	}
	compare(p.t, raw, img.Path)
}

func qemuImg(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("qemu-img")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("qemu-img (qemu-utils) missing; scripts/test.sh installs it")
		}
		t.Skip("qemu-img not installed")
	}
	return p
}

func compare(t testing.TB, a, b string) {
	t.Helper()
	out, err := exec.Command(qemuImg(t), "compare", a, b).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Images are identical") {
		t.Fatalf("qemu-img compare %s %s: %v\n%s", a, b, err, out)
	}
}

const mib = 1 << 20

func TestMigrateRawAndQcow2(t *testing.T) {
	q := qemuImg(t)
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	// 64 MiB + 12345 bytes: not a multiple of the chunk size; data in 4
	// places, one block straddling a chunk boundary, one at the very end.
	size := int64(64*mib + 12345)
	makeRaw(t, raw, size, map[int64]int{0: 4096, 5*mib - 100: 300, 20 * mib: 3 * mib, size - 1000: 1000})
	qc := filepath.Join(p.dir, "vm.qcow2")
	if out, err := exec.Command(q, "convert", "-O", "qcow2", raw, qc).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}

	for _, tc := range []struct{ src, format, name string }{
		{raw, FormatRaw, "raw-to-raw"},
		{raw, FormatQcow2, "raw-to-qcow2"},
		{qc, FormatRaw, "qcow2-to-raw"},
		{qc, FormatQcow2, "qcow2-to-qcow2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := p.config(tc.src, "pii-eu")
			cfg.Format, cfg.Name = tc.format, tc.name
			rec, err := Send(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			img, err := p.recvJ.Image(tc.name)
			if err != nil {
				t.Fatal(err)
			}
			compare(t, raw, img.Path)
			if img.Root != rec.Root || rec.State != StateDone {
				t.Fatalf("record %+v / image root %s", rec, img.Root)
			}
			if tc.format == FormatQcow2 {
				if out, err := exec.Command(q, "check", img.Path).CombinedOutput(); err != nil {
					t.Fatalf("qemu-img check: %v\n%s", err, out)
				}
			}
			st := rec.Stats
			// Cost follows allocated bytes, not the virtual size, nor
			// the chunks that hold them (7 MiB).
			if st.BytesRead > 4*mib || st.BytesRead < 3*mib {
				t.Errorf("read %d bytes of a 64 MiB image with about 3 MiB of data", st.BytesRead)
			}
			// And so does a verify of what was stored.
			if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK || rep.BytesRead > 4*mib || rep.BytesRead < 3*mib {
				t.Errorf("verify of the stored image: %+v %v; want it intact, about 3 MiB read", rep, err)
			}
			// Chunks 0, 4, 5 (a block across their boundary), 20-22, 64.
			if st.ChunksSent != 7 || st.BytesSent >= st.BytesRaw || st.VirtualBytes != img.Manifest.Size {
				t.Errorf("stats %+v: want 7 chunks sent, compression paying", st)
			}
		})
	}
}

func TestMigrateEmptyImage(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "empty.raw")
	makeRaw(t, raw, 10*mib, nil)
	rec, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err != nil {
		t.Fatal(err)
	}
	if rec.Stats.BytesRead != 0 || rec.Stats.ChunksSent != 0 {
		t.Fatalf("empty image read or sent data: %+v", rec.Stats)
	}
	img, _ := p.recvJ.Image("empty")
	compare(t, raw, img.Path)
	// Allocated zeros count as holes too.
	zeros := filepath.Join(p.dir, "zeros.raw")
	os.WriteFile(zeros, make([]byte, 3*mib), 0o644)
	rec, err = Send(context.Background(), p.config(zeros, "pii-eu"))
	if err != nil || rec.Stats.ChunksZero != 3 || rec.Stats.ChunksSent != 0 {
		t.Fatalf("zero image: %+v %v", rec.Stats, err)
	}
}

// TestMigratePolicyJudgesThePath: data that passes through other
// gateways on its way (a hub topology's hubs) is judged along that path,
// at the sender as it sees it and at the receiver as the receiver does: a
// hub in a jurisdiction the class may not cross refuses the move, though
// both ends are allowed.
func TestMigratePolicyJudgesThePath(t *testing.T) {
	usHub := &certs.Attributes{Node: "hub-iad", Site: "us-hub", Region: "us-east-1", Provider: "aws", Jurisdiction: "US"}
	var asked atomic.Pointer[certs.Attributes]
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.Via = func(from *certs.Attributes) []*certs.Attributes {
			asked.Store(from)
			return []*certs.Attributes{usHub}
		}
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: mib})
	cfg := p.config(raw, "pii-eu")
	cfg.To.Via = []*certs.Attributes{usHub}
	rec, err := Send(context.Background(), cfg)
	var denied *DeniedError
	if !errors.As(err, &denied) || denied.By != "sender" || rec.Stats.BytesSent != 0 || !strings.Contains(strings.Join(denied.Reasons, " "), "us-hub") {
		t.Fatalf("through a US hub, as the sender sees it: %v %+v", err, rec)
	}
	// A sender that sees the direct tunnel does not get past a receiver
	// that sees the hub.
	rec, err = Send(context.Background(), p.config(raw, "pii-eu"))
	if !errors.As(err, &denied) || denied.By != "receiver" || rec.Stats.BytesSent != 0 || !strings.Contains(strings.Join(denied.Reasons, " "), "us-hub") {
		t.Fatalf("through a US hub, as the receiver sees it: %v %+v", err, rec)
	}
	if a := asked.Load(); a == nil || a.Node != p.from.Attributes().Node {
		t.Fatalf("the receiver asked for the path from %+v, want the sender's", a)
	}
}

// TestMigrateCommitJudgesTheOfferedPath: the decision at the commit
// judges the path the offer was judged along, which the data took, not a
// path the mesh has since changed to (a new hub).
func TestMigrateCommitJudgesTheOfferedPath(t *testing.T) {
	usHub := &certs.Attributes{Node: "hub-iad", Site: "us-hub", Region: "us-east-1", Provider: "aws", Jurisdiction: "US"}
	var calls atomic.Int32
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.Via = func(*certs.Attributes) []*certs.Attributes {
			if calls.Add(1) > 1 {
				return []*certs.Attributes{usHub} // a hub the data never passed
			}
			return nil
		}
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: mib})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatalf("the path changed during the transfer: %v; want the image stored, judged along the path it took", err)
	}
	p.stored(raw)
}

// TestMigratePolicy: a denied class sends nothing; the receiver refuses
// with its own policy even when the sender's would allow.
func TestMigratePolicy(t *testing.T) {
	p := newPair(t, "US")
	raw := filepath.Join(p.dir, "secret.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: mib})

	rec, err := Send(context.Background(), p.config(raw, "swiss-banking-secret"))
	var denied *DeniedError
	if !errors.As(err, &denied) || denied.By != "sender" || rec.State != StateDenied || rec.Stats.BytesSent != 0 || rec.Stats.BytesRead != 0 {
		t.Fatalf("sender-side denial: %v %+v", err, rec)
	}
	if !strings.Contains(strings.Join(denied.Reasons, " "), "denied by default") {
		t.Errorf("reasons: %v", denied.Reasons)
	}

	// A lax sender policy does not get past the receiver's.
	lax, _ := policy.Parse("lax.hcl", []byte(strings.ReplaceAll(testPolicy, `jurisdiction = ["CH"]`, `site = ["*"]`)))
	cfg := p.config(raw, "swiss-banking-secret")
	cfg.Policy = lax
	rec, err = Send(context.Background(), cfg)
	if !errors.As(err, &denied) || denied.By != "receiver" || rec.Stats.BytesSent != 0 {
		t.Fatalf("receiver-side denial: %v %+v", err, rec)
	}
	if _, err := os.Stat(filepath.Join(p.store, "secret.raw")); !os.IsNotExist(err) {
		t.Fatal("a denied image was stored")
	}
	// Both denials are in the audit logs, which verify.
	for _, l := range []*audit.Log{p.sendAudit, p.recvAudit} {
		b, _ := os.ReadFile(l.Path())
		rep, err := audit.Verify(bytes.NewReader(b), p.tb)
		if err != nil || rep.Records == 0 || !strings.Contains(string(b), `"outcome":"denied"`) {
			t.Errorf("audit %s: %+v %v", l.Path(), rep, err)
		}
	}
}

// TestMigrateAuditsObligations: storage that the policy allows only with
// encryption at rest is refused at a site whose certificate does not
// attest it, before anything is sent; where it is attested, what the
// decision rested on beyond its rule — the reasons and the obligations —
// is in both ends' audit records.
func TestMigrateAuditsObligations(t *testing.T) {
	pol, err := policy.Parse("oblig.hcl", []byte(strings.Replace(testPolicy, `  allow "store" {
    jurisdiction = ["DE", "CH"]
  }`, `  allow "store" {
    jurisdiction = ["DE", "CH"]
    require {
      encryption_at_rest = true
    }
  }`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	for _, attested := range []bool{false, true} {
		var labels map[string]string
		if attested {
			labels = map[string]string{policy.LabelEncryptionAtRest: "true"}
		}
		p := newPairLabelled(t, "DE", labels, nil)
		p.recvPolicy.Store(pol)
		raw := filepath.Join(p.dir, "vm.raw")
		makeRaw(t, raw, 4*mib, map[int64]int{0: mib})
		cfg := p.config(raw, "pii-eu")
		cfg.Policy = pol
		rec, err := Send(context.Background(), cfg)
		if !attested {
			var denied *DeniedError
			if !errors.As(err, &denied) || denied.By != "sender" || !strings.Contains(err.Error(), "does not attest") || rec.Stats.BytesSent != 0 {
				t.Fatalf("to a site that does not attest encryption at rest: %v (%d bytes sent); want refused by the sender, nothing sent", err, rec.Stats.BytesSent)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range []*audit.Log{p.sendAudit, p.recvAudit} {
			b, _ := os.ReadFile(l.Path())
			if !strings.Contains(string(b), `"obligations":"encryption at rest"`) || !strings.Contains(string(b), `"reasons":[`) {
				t.Errorf("audit %s lacks the obligations or the reasons:\n%s", l.Path(), b)
			}
		}
	}
}

// TestMigratePolicyChangedInFlight: the receiver decides again when the
// image is to be stored; a policy adopted while it came that no longer
// allows it there refuses it then, and what came is removed.
func TestMigratePolicyChangedInFlight(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 16*mib, map[int64]int{0: 16 * mib})
	v2, err := policy.Parse("v2.hcl", []byte(strings.Replace(strings.Replace(testPolicy, "version = 1", "version = 2", 1),
		`jurisdiction = ["DE", "CH"]`, `jurisdiction = ["CH"]`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.Progress = func(pr Progress) {
		if pr.Stats.ChunksDone >= 2 {
			p.recvPolicy.Store(v2) // store of pii-eu now only in CH
		}
	}
	rec, err := Send(context.Background(), cfg)
	var denied *DeniedError
	if !errors.As(err, &denied) || !denied.AtCommit || denied.By != "receiver" || rec.State != StateDenied || rec.Stats.BytesSent == 0 {
		t.Fatalf("a migration whose destination the policy forbade in flight: %v, %+v", err, rec)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Fatal("the image was stored")
	}
	if recs, err := p.recvJ.Receives(); err != nil || len(recs) != 0 {
		t.Fatalf("receives kept: %+v %v", recs, err)
	}
	if left, _ := os.ReadDir(filepath.Join(p.store, ".incoming")); len(left) != 0 {
		t.Fatalf("received data left at the destination: %v", left)
	}
	b, _ := os.ReadFile(p.recvAudit.Path())
	if !strings.Contains(string(b), `"outcome":"denied"`) || !strings.Contains(string(b), `"policy":"v2-`) {
		t.Errorf("the receiver's audit record does not show the denial under v2:\n%s", b)
	}
	// The sender's record names the receiver's refusal, not its own
	// decision to go ahead.
	b, _ = os.ReadFile(p.sendAudit.Path())
	if !strings.Contains(string(b), `"denied_by":"receiver"`) || !strings.Contains(string(b), `"denied_at_commit":true`) || !strings.Contains(string(b), `(v2.hcl:`) {
		t.Errorf("the sender's audit record does not show the receiver's refusal:\n%s", b)
	}
}

// damageChunk3 makes cfg damage chunk 3 after it is hashed, the first time
// it is sent, as a broken disk or memory would, and then run also (if not
// nil). It counts the times chunk 3 was sent.
func damageChunk3(cfg *SendConfig, also func()) *atomic.Int32 {
	var sent atomic.Int32
	cfg.mangle = func(i int64, b []byte) {
		if i == 3 && sent.Add(1) == 1 {
			b[len(b)/2] ^= 0xff
			if also != nil {
				also()
			}
		}
	}
	return &sent
}

// TestMigrateDamagedChunk: a chunk damaged after hashing is refused by the
// receiver, sent again, and never written.
func TestMigrateDamagedChunk(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 16*mib, map[int64]int{0: 8 * mib})
	cfg := p.config(raw, "pii-eu")
	damaged := damageChunk3(&cfg, nil)
	rec, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Stats.Retries != 1 || damaged.Load() != 2 {
		t.Fatalf("retries %d, chunk 3 sent %d times", rec.Stats.Retries, damaged.Load())
	}
	img, _ := p.recvJ.Image("vm")
	compare(t, raw, img.Path)
}

// writtenAfterExtents writes into a hole of the image once its extents
// are listed: a running VM's write between the listing and the read.
type writtenAfterExtents struct {
	Source
	path string
}

func (w writtenAfterExtents) Extents() ([]Extent, error) {
	e, err := w.Source.Extents()
	f, ferr := os.OpenFile(w.path, os.O_WRONLY, 0)
	if ferr == nil {
		_, ferr = f.WriteAt([]byte("a block the listing did not see"), 4*mib)
		f.Close()
	}
	return e, errors.Join(err, ferr)
}

// TestMigrateSourceWrittenWhileListed: a write that lands while the
// source's extents are listed, into a hole (so the transfer never reads
// it), is seen as a change too.
func TestMigrateSourceWrittenWhileListed(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: mib})
	// An hour back: a write in the same tick of the file system's clock
	// would leave the time as it was.
	if err := os.Chtimes(raw, time.Now().Add(-time.Hour), time.Now().Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.open = func(path string) (Source, error) {
		src, err := OpenSource(path)
		return writtenAfterExtents{src, path}, err
	}
	_, err := Send(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "changed while it was read") {
		t.Fatalf("a source written while its extents were listed: %v, want it refused as changed", err)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Fatal("an image without the write was stored")
	}
}

// TestMigrateSourceWrittenMeanwhile: a source written while it is sent
// (a running VM) is not stored as a mix of two versions: the migration
// fails before its commit, and the resume, once the writer is done, sends
// only what differs. The write here also turns a chunk the receiver
// refused into zeros, so its retry finds nothing to send (which used to
// panic the gateway).
func TestMigrateSourceWrittenMeanwhile(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 16*mib, map[int64]int{0: 8 * mib})
	cfg := p.config(raw, "pii-eu")
	damaged := damageChunk3(&cfg, func() {
		// Not writeZeros: this runs on the sender's producer, where
		// t.Fatal must not be called.
		f, err := os.OpenFile(raw, os.O_WRONLY, 0)
		if err == nil {
			_, err = f.WriteAt(make([]byte, mib), 3*mib)
			f.Close()
		}
		if err != nil {
			t.Error(err)
		}
	})
	rec, err := Send(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "changed while it was read") {
		t.Fatalf("a source written during its migration: %v, want it refused as changed", err)
	}
	if rec.Stats.Retries != 1 || damaged.Load() != 1 || rec.Stats.ChunksZero != 1 {
		t.Fatalf("retries %d, chunk 3 sent %d times, %d chunks of zeros; want 1, 1, 1", rec.Stats.Retries, damaged.Load(), rec.Stats.ChunksZero)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Fatal("the mixed image was stored")
	}
	cfg = p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	if rec, err = Send(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	if rec.Stats.ChunksSent != 0 || rec.Stats.ChunksHad != 7 {
		t.Fatalf("the resume sent %d chunks and found %d at the receiver, want 0 and 7", rec.Stats.ChunksSent, rec.Stats.ChunksHad)
	}
	p.stored(raw)
}

// TestMigrateResumeAndResync: an interrupted migration resumes without
// re-reading acknowledged chunks; a newer version sends only what changed.
func TestMigrateResumeAndResync(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 128*mib, map[int64]int{0: 40 * mib, 64 * mib: 24 * mib})

	// Interrupt after about half of the chunks are acknowledged. A slow
	// source (20 ms a chunk, two readers: 0.6 s for the 64) leaves chunks
	// unread when progress (every 250 ms) reports the half; a bandwidth
	// limit would not, since compressible chunks are small on the wire.
	cfg := p.config(raw, "pii-eu")
	cfg.Streams = 2
	spyOn(&cfg, 20*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	cfg.Progress = func(pr Progress) {
		if pr.Stats.ChunksDone >= 30 {
			cancel()
		}
	}
	rec, err := Send(ctx, cfg)
	if !errors.Is(err, context.Canceled) || rec.State != StateCancelled {
		t.Fatalf("interrupted migration: %v %s", err, rec.State)
	}
	first := rec.Stats

	cfg = p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	waitIdle(t, p.recv, rec.ID)
	rec, err = Send(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	st := rec.Stats
	// Nothing acknowledged in the first attempt is sent again; what the
	// sender's journal recorded (acknowledgements still in flight when it
	// was cancelled may not be) is not even read.
	if st.ChunksResumed == 0 || st.ChunksSent == 0 || st.ChunksResumed+st.ChunksHad < first.ChunksDone || st.ChunksSent+st.ChunksResumed+st.ChunksHad != 64 || st.BytesRead != int64(64-st.ChunksResumed)*mib {
		t.Fatalf("resume re-read or re-sent too much: first %+v then %+v", first, st)
	}
	img, _ := p.recvJ.Image("vm")
	compare(t, raw, img.Path)
	t.Logf("interrupted after %d acknowledged chunks; resume skipped %d without reading them, found %d more already there, sent %d", first.ChunksDone, st.ChunksResumed, st.ChunksHad, st.ChunksSent)

	// Change 1 % of the image (in two places) and migrate again.
	f, _ := os.OpenFile(raw, os.O_WRONLY, 0)
	change := make([]byte, 640*1024)
	rand.Read(change)
	f.WriteAt(change, 3*mib)
	f.WriteAt(change, 70*mib+5)
	f.Close()
	rec, err = Send(context.Background(), p.config(raw, "pii-eu"))
	if err != nil {
		t.Fatal(err)
	}
	st = rec.Stats
	if st.ChunksSent > 3 || st.ChunksSame < 60 || st.BytesSent > 4*mib {
		t.Fatalf("re-sync of a 1 %% change: %+v", st)
	}
	img, _ = p.recvJ.Image("vm")
	compare(t, raw, img.Path)

	// The stored image re-proves itself; a flipped byte is found and named.
	rep, err := VerifyImage(context.Background(), img)
	if err != nil || !rep.OK || rep.Root != rec.Root {
		t.Fatalf("verify: %+v %v", rep, err)
	}
	f, _ = os.OpenFile(img.Path, os.O_RDWR, 0)
	one := make([]byte, 1)
	f.ReadAt(one, 70*mib+100)
	f.WriteAt([]byte{one[0] ^ 0xff}, 70*mib+100)
	f.Close()
	rep, err = VerifyImage(context.Background(), img)
	if err != nil || rep.OK || len(rep.BadChunks) != 1 || rep.BadChunks[0] != 70 {
		t.Fatalf("damaged image: %+v %v", rep, err)
	}
	t.Logf("re-sync after changing %d KiB of 64 MiB: %d chunks sent (%d bytes on the wire), %d reused at the destination", 2*len(change)/1024, st.ChunksSent, st.BytesSent, st.ChunksSame)
}

// interrupted sends raw as pii-eu on one slow stream, cancels the send
// once chunks chunks are acknowledged, and returns its record and the
// receiver's, once the receiver has let go of it.
func (p *pair) interrupted(raw string, chunks int) (*SendRecord, RecvRecord) {
	p.t.Helper()
	return p.interruptedAs(raw, "", chunks)
}

// interruptedAs is interrupted, stored at the destination in format ("":
// the source's).
func (p *pair) interruptedAs(raw, format string, chunks int) (*SendRecord, RecvRecord) {
	t := p.t
	t.Helper()
	cfg := p.config(raw, "pii-eu")
	cfg.Streams, cfg.Format = 1, format
	cfg.BWLimit = 10 * mib
	ctx, cancel := context.WithCancel(context.Background())
	cfg.Progress = func(pr Progress) {
		if pr.Stats.ChunksDone >= chunks {
			cancel()
		}
	}
	rec, err := Send(ctx, cfg)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted migration: %v", err)
	}
	waitIdle(t, p.recv, rec.ID)
	var rr RecvRecord
	if err := p.recvJ.get(bucketRecv, rec.ID, &rr); err != nil {
		t.Fatal(err)
	}
	return rec, rr
}

// TestResumeOfChangedSourceSaysSo: a resume whose source changed since the
// interrupted attempt, its data now in other chunks, says so in its offer,
// so that the receiver makes room for every new chunk beside the ones it
// holds (which stay until the commit clears them), and so does every
// attempt after it; it completes, the image intact. (Without it, the
// receiver holds it to the chunks that may hold data less those held, and
// refuses the rest.)
func TestResumeOfChangedSourceSaysSo(t *testing.T) {
	for _, legacy := range []bool{false, true} {
		t.Run(map[bool]string{false: "records of this release", true: "records of an earlier release"}[legacy], func(t *testing.T) { resumeOfChangedSource(t, legacy) })
	}
}

// resumeOfChangedSource is TestResumeOfChangedSourceSaysSo; legacy, its
// records are rewritten as an earlier release wrote them before the last
// resume (which then asks for room for every chunk: it cannot know).
func resumeOfChangedSource(t *testing.T, legacy bool) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 16 * mib})
	rec, _ := p.interruptedAs(raw, FormatRaw, 8)
	os.Remove(raw)
	makeRaw(t, raw, 32*mib, map[int64]int{16 * mib: 16 * mib})
	// The resume is interrupted too, and resumed again: its source has
	// not changed since, but the first source's chunks are still held
	// beside the new ones, and room is still needed for all.
	cfg := p.config(raw, "pii-eu")
	cfg.ID, cfg.Streams, cfg.BWLimit = rec.ID, 1, 10*mib
	ctx, cancel := context.WithCancel(context.Background())
	cfg.Progress = func(pr Progress) {
		if pr.Stats.ChunksDone >= 4 {
			cancel()
		}
	}
	if _, err := Send(ctx, cfg); !errors.Is(err, context.Canceled) {
		t.Fatalf("the interrupted resume of a changed source: %v", err)
	}
	waitIdle(t, p.recv, rec.ID)
	if legacy {
		// Both records as a release before the eighth of 2026-11-27
		// wrote them: they do not say the attempt restarted.
		sr, err := p.sendJ.Send(rec.ID)
		if err != nil {
			t.Fatal(err)
		}
		sr.Restarted, sr.SourceFormat = false, ""
		var rr RecvRecord
		if err := errors.Join(p.sendJ.put(bucketSend, rec.ID, sr), p.recvJ.get(bucketRecv, rec.ID, &rr)); err != nil {
			t.Fatal(err)
		}
		rr.Restarted = false
		if err := p.recvJ.put(bucketRecv, rec.ID, &rr); err != nil {
			t.Fatal(err)
		}
	}
	cfg = p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatalf("the resume after the resume of a changed source: %v", err)
	}
	p.stored(raw)
}

// TestResumeRecordsChunksTheReceiverHas: a resume whose source changed
// (its acknowledgements dropped) records the chunks it finds the receiver
// holds as acknowledged, so a further resume skips them unread instead of
// reading — in silence — every one of them again.
func TestResumeRecordsChunksTheReceiverHas(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
	rec, _ := p.interrupted(raw, 4)
	had, err := p.recvJ.chunks("recv", rec.ID)
	if err != nil || len(had) == 0 {
		t.Fatalf("the receiver holds %d chunks after the first attempt (%v)", len(had), err)
	}
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(raw, later, later); err != nil { // the source "changed": its acknowledgements go
		t.Fatal(err)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.ID, cfg.Streams, cfg.BWLimit = rec.ID, 1, 10*mib
	ctx, cancel := context.WithCancel(context.Background())
	cfg.Progress = func(pr Progress) {
		if pr.Stats.ChunksDone >= len(had)+4 {
			cancel()
		}
	}
	if _, err := Send(ctx, cfg); !errors.Is(err, context.Canceled) {
		t.Fatalf("second attempt: %v", err)
	}
	acked, err := p.sendJ.chunks("send", rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	for i, h := range had {
		if acked[i] != h {
			t.Fatalf("chunk %d, which the receiver had, is not recorded as acknowledged after the second attempt (%d recorded)", i, len(acked))
		}
	}
}

// readSpy is a source that records the offsets read, optionally slowly.
type readSpy struct {
	Source
	delay time.Duration
	mu    sync.Mutex
	reads map[int64]int
}

func (r *readSpy) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(r.delay) // a slow disk
	r.mu.Lock()
	r.reads[off]++
	r.mu.Unlock()
	return r.Source.ReadAt(p, off)
}

// spyOn makes cfg read its source through a readSpy, returned.
func spyOn(cfg *SendConfig, delay time.Duration) *readSpy {
	spy := &readSpy{delay: delay, reads: map[int64]int{}}
	cfg.open = func(path string) (Source, error) {
		src, err := OpenSource(path)
		spy.Source = src
		return spy, err
	}
	return spy
}

// TestSenderKeepsSessionAlive: a sender reading allocated zeros for
// longer than the receiver's idle limit sends nothing the while, and
// would be taken for gone; it keeps the session with Alive frames.
func TestSenderKeepsSessionAlive(t *testing.T) {
	const idle = time.Second
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { c.IdleTimeout = idle })
	raw := filepath.Join(p.dir, "vm.raw")
	const chunk, zeros = 64 << 10, 100
	makeRaw(t, raw, (zeros+1)*chunk, map[int64]int{zeros * chunk: chunk})
	writeZeros(t, raw, 0, zeros*chunk)
	cfg := p.config(raw, "pii-eu")
	cfg.Streams, cfg.ChunkSize = 1, chunk
	// Two producers reading the zeros 40 ms a chunk: two seconds of
	// nothing to send, twice the receiver's limit.
	spyOn(&cfg, 40*time.Millisecond)
	start := time.Now()
	rec, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatalf("a sender reading zeros for %s, against the receiver's idle limit of %s: %v", time.Since(start).Round(time.Millisecond), idle, err)
	}
	if rec.Stats.ChunksZero != zeros || rec.Stats.ChunksSent != 1 {
		t.Fatalf("%d chunks of zeros and %d sent, want %d and 1", rec.Stats.ChunksZero, rec.Stats.ChunksSent, zeros)
	}
	if took := time.Since(start); took < 2*idle {
		t.Fatalf("the zeros were read in %s: not slower than the receiver's idle limit, so the test proves nothing", took)
	}
	p.stored(raw)
}

// TestResumeSkipsZeros: the chunks of zeros an interrupted attempt read
// are recorded, and a resume of the unchanged source does not read them
// again.
func TestResumeSkipsZeros(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{16 * mib: 16 * mib})
	writeZeros(t, raw, 0, 16*mib)
	rec, _ := p.interrupted(raw, 20)
	// Kept apart from the acknowledged chunks: a release before the
	// zeros' record reads that bucket, and would take a zero entry for a
	// chunk acknowledged with that hash.
	if acked, err := p.sendJ.chunks("send", rec.ID); err != nil || slices.Contains(slices.Collect(maps.Values(acked)), Hash{}) {
		t.Fatalf("zeros recorded among the acknowledged chunks (%v)", err)
	}
	if zeros, err := p.sendJ.chunks(sideSendZeros, rec.ID); err != nil || len(zeros) != 16 {
		t.Fatalf("%d chunks of zeros recorded, want 16 (%v)", len(zeros), err)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	spy := spyOn(&cfg, 0)
	rec, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	for i := range int64(16) {
		if n := spy.reads[i*mib]; n > 0 {
			t.Fatalf("chunk %d, zeros found by the first attempt, was read %d times by the resume", i, n)
		}
	}
	if rec.Stats.ChunksZero != 16 {
		t.Fatalf("%d chunks of zeros counted, want 16", rec.Stats.ChunksZero)
	}
	p.stored(raw)

	// A resume with another chunk size reads everything again: chunk i
	// is other bytes then, and zeros of the old size say nothing.
	p = newPair(t, "DE")
	raw = filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{16 * mib: 16 * mib})
	writeZeros(t, raw, 0, 16*mib)
	rec, _ = p.interrupted(raw, 20)
	half := p.config(raw, "pii-eu")
	half.ID, half.ChunkSize = rec.ID, mib/2
	spy = spyOn(&half, 0)
	if rec, err = Send(context.Background(), half); err != nil {
		t.Fatal(err)
	}
	if spy.reads[0] == 0 || rec.Stats.ChunksZero != 32 {
		t.Fatalf("a resume with half the chunk size: chunk 0 read %d times, %d chunks of zeros; want it read, 32", spy.reads[0], rec.Stats.ChunksZero)
	}
	p.stored(raw)
}

// resumeWhole resumes migration id of raw, which must send every one of
// its chunks again, and checks the image stored.
func (p *pair) resumeWhole(raw, id string, chunks int) {
	t := p.t
	t.Helper()
	cfg := p.config(raw, "pii-eu")
	cfg.ID = id
	rec, err := Send(context.Background(), cfg)
	if err != nil || rec.Stats.ChunksSent != chunks {
		t.Fatalf("the resume: %v, %d of %d chunks sent, want all", err, rec.Stats.ChunksSent, chunks)
	}
	p.stored(raw)
}

// TestMigrateNeedsItsAuditRecord: a migration whose audit record could
// not be written — the log of either end ends in a damaged record — does
// not start: nothing is sent, nothing stored.
func TestMigrateNeedsItsAuditRecord(t *testing.T) {
	for _, end := range []string{"sender", "receiver"} {
		t.Run(end, func(t *testing.T) {
			p := newPair(t, "DE")
			log := p.sendAudit
			if end == "receiver" {
				log = p.recvAudit
			}
			if err := os.WriteFile(log.Path(), []byte("not a record\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			raw := filepath.Join(p.dir, "vm.raw")
			makeRaw(t, raw, 4*mib, map[int64]int{0: mib})
			rec, err := Send(context.Background(), p.config(raw, "pii-eu"))
			if err == nil || !strings.Contains(err.Error(), "audit") || rec.Stats.BytesSent != 0 {
				t.Fatalf("a migration whose %s's audit log is damaged: %v, %d bytes sent", end, err, rec.Stats.BytesSent)
			}
			if _, err := p.recvJ.Image("vm"); err == nil {
				t.Fatal("the image was stored")
			}
		})
	}
}

// TestMigrateResumeIncomingDamaged: the incoming file of an interrupted
// migration changed between attempts — cut to nothing, or a chunk
// overwritten: the resume receives again what no longer matches, rather
// than storing the file's zeros or garbage under the sender's root.
func TestMigrateResumeIncomingDamaged(t *testing.T) {
	overwrite := func(t *testing.T, path string, at int64) int {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, 4096), at+mib+100); err != nil { // in chunk 1
			t.Fatal(err)
		}
		return 1
	}
	for _, tc := range []struct {
		name   string
		format string // stored as; qcow2 puts its data DataAt into the file
		damage func(t *testing.T, path string, at int64) (chunks int)
	}{
		{"cut to nothing", FormatRaw, func(t *testing.T, path string, _ int64) int {
			if err := os.Truncate(path, 0); err != nil {
				t.Fatal(err)
			}
			return -1 // all
		}},
		{"a chunk overwritten", FormatRaw, overwrite},
		{"a chunk of a qcow2 overwritten", FormatQcow2, overwrite},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPair(t, "DE")
			raw := filepath.Join(p.dir, "vm.raw")
			makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
			rec, rr := p.interruptedAs(raw, tc.format, 8)
			have, err := p.recvJ.chunks("recv", rec.ID)
			if err != nil || have[1] == (Hash{}) {
				t.Fatalf("the receiver does not hold chunk 1 of the interrupted migration (%v): nothing to damage", err)
			}
			damaged := tc.damage(t, rr.Temp, rr.DataAt)
			if damaged < 0 {
				damaged = len(have)
			}
			cfg := p.config(raw, "pii-eu")
			cfg.ID, cfg.Format = rec.ID, tc.format
			rec, err = Send(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if want := 32 - len(have) + damaged; rec.Stats.ChunksSent != want {
				t.Fatalf("the resume sent %d chunks; the receiver held %d, %d of them damaged: want %d", rec.Stats.ChunksSent, len(have), damaged, want)
			}
			p.stored(raw)
			if !strings.Contains(p.recvLog.String(), "no longer match what was received") {
				t.Errorf("the receiver did not say why it receives chunks again:\n%s", p.recvLog.String())
			}
		})
	}
}

// TestMigrateResumeClearsWhatIsNotHeld: the incoming file of an
// interrupted migration holds data the receiver does not count — a chunk
// written but not yet journalled when it stopped, or a whole file whose
// journal record was lost — and the source's chunk there is zeros by the
// resume: the stored image has zeros there too, not the old bytes under
// a root that says zeros.
func TestMigrateResumeClearsWhatIsNotHeld(t *testing.T) {
	for _, tc := range []struct {
		name, format string
		forget       func(p *pair, id string) error
	}{
		{"a chunk not journalled", FormatRaw, func(p *pair, id string) error { return p.recvJ.removeChunks("recv", id, []int64{2}) }},
		{"a chunk of a qcow2 not journalled", FormatQcow2, func(p *pair, id string) error { return p.recvJ.removeChunks("recv", id, []int64{2}) }},
		{"the record lost", FormatRaw, func(p *pair, id string) error {
			return errors.Join(p.recvJ.deleteKey(bucketRecv, id), p.recvJ.dropChunks("recv", id))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPair(t, "DE")
			raw := filepath.Join(p.dir, "vm.raw")
			makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
			rec, rr := p.interruptedAs(raw, tc.format, 8)
			if have, err := p.recvJ.chunks("recv", rec.ID); err != nil || have[2] == (Hash{}) {
				t.Fatalf("the receiver does not hold chunk 2 of the interrupted migration (%v)", err)
			}
			if err := tc.forget(p, rec.ID); err != nil {
				t.Fatal(err)
			}
			writeZeros(t, raw, 2*mib, mib)
			cfg := p.config(raw, "pii-eu")
			cfg.ID, cfg.Format = rec.ID, tc.format
			if _, err := Send(context.Background(), cfg); err != nil {
				t.Fatal(err)
			}
			p.stored(raw)
			if _, err := os.Stat(rr.Temp); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the incoming file is still there: %v", err)
			}
		})
	}
}

// TestMigrateResumeIncomingLost: resuming a migration whose incoming file
// the receiver no longer has (a crash as the image was stored, removed by
// hand) sends every chunk again, rather than storing the image with the
// chunks the journal remembered as zeros.
func TestMigrateResumeIncomingLost(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
	rec, rr := p.interrupted(raw, 8)
	if have, err := p.recvJ.chunks("recv", rec.ID); err != nil || len(have) == 0 {
		t.Fatalf("the receiver holds no chunks of the interrupted migration (%v): nothing to lose", err)
	}
	if err := os.Remove(rr.Temp); err != nil {
		t.Fatal(err)
	}
	p.resumeWhole(raw, rec.ID, 32)
}

// TestReceiverSweepsIncoming: a receiver starting removes the incoming
// files no receive is recorded for (a journal moved aside leaves them),
// and keeps those of receives it may resume and files it did not make.
func TestReceiverSweepsIncoming(t *testing.T) {
	var rcfg ReceiverConfig
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { rcfg = *c })
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
	_, rr := p.interrupted(raw, 4)
	incoming := filepath.Join(p.store, ".incoming")
	orphans := []string{"0123456789abcdef.raw", "0123456789abcdef.qcow2"}
	others := []string{"notes.txt", "not an id.raw"}
	for _, name := range append(slices.Clone(orphans), others...) {
		if err := os.WriteFile(filepath.Join(incoming, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := NewReceiver(rcfg); err != nil {
		t.Fatal(err)
	}
	for _, name := range orphans {
		if _, err := os.Stat(filepath.Join(incoming, name)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("orphan %s: %v; want it removed", name, err)
		}
	}
	for _, path := range []string{rr.Temp, filepath.Join(incoming, others[0]), filepath.Join(incoming, others[1])} {
		if _, err := os.Stat(path); err != nil {
			t.Errorf("%s: %v; want it kept", path, err)
		}
	}
}

// TestReceiverForgetsAbandoned: a receive its sender has not offered again
// for AbandonedAfter goes, incoming file and all; one offered since stays,
// and the sender coming back after all sends every chunk again.
func TestReceiverForgetsAbandoned(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 16*mib, map[int64]int{0: 16 * mib})
	rec, rr := p.interrupted(raw, 4)
	p.recv.forgetAbandoned()
	if _, err := os.Stat(rr.Temp); err != nil {
		t.Fatalf("a receive offered just now was forgotten: %v", err)
	}
	// Offered long ago, but a chunk written lately: still alive.
	rr.Attempted = time.Now().Add(-AbandonedAfter - time.Hour)
	rr.Started = rr.Attempted
	if err := p.recvJ.put(bucketRecv, rec.ID, &rr); err != nil {
		t.Fatal(err)
	}
	p.recv.forgetAbandoned()
	if _, err := os.Stat(rr.Temp); err != nil {
		t.Fatalf("a receive written to lately was forgotten: %v", err)
	}
	if err := os.Chtimes(rr.Temp, rr.Attempted, rr.Attempted); err != nil {
		t.Fatal(err)
	}
	p.recv.forgetAbandoned()
	if _, err := os.Stat(rr.Temp); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the abandoned receive's incoming file: %v", err)
	}
	if recs, err := p.recvJ.Receives(); err != nil || len(recs) != 0 {
		t.Fatalf("receives after forgetting: %+v %v", recs, err)
	}
	p.resumeWhole(raw, rec.ID, 16)
}

// TestSenderLeavesNothingRunning: an attempt that ends early (cancelled
// here) ends every goroutine its transfer started; writers left waiting
// for the queue held their streams' buffers, a megabyte an attempt.
func TestSenderLeavesNothingRunning(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
	for range 2 {
		cfg := p.config(raw, "pii-eu")
		cfg.BWLimit = 10 * mib
		ctx, cancel := context.WithCancel(context.Background())
		cfg.Progress = func(pr Progress) {
			if pr.Stats.ChunksDone >= 2 {
				cancel()
			}
		}
		if _, err := Send(ctx, cfg); !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled migration: %v", err)
		}
	}
	transfers := func() int {
		buf := make([]byte, 1<<20)
		return strings.Count(string(buf[:runtime.Stack(buf, true)]), "migrate.(*sender).transfer")
	}
	deadline := time.Now().Add(10 * time.Second)
	for transfers() > 0 {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines of cancelled transfers still running:\n%s", transfers(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMigrateCancelIsCancelled: cancelling a migration ends it as
// cancelled, never as the failure of the connections that the
// cancellation itself closes. Cancelled as it commits, the commit's write
// meets the closed control connection and, before Send looked at the
// context first, always ended "failed"; cancelled mid-transfer, it did at
// random.
func TestMigrateCancelIsCancelled(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 32*mib, map[int64]int{0: 32 * mib})
	for _, phase := range []string{"commit", "transfer", "transfer", "transfer"} {
		cfg := p.config(raw, "pii-eu")
		if phase == "transfer" {
			cfg.BWLimit = 8 * mib // still transferring at the first progress tick
		}
		ctx, cancel := context.WithCancel(context.Background())
		cfg.Progress = func(pr Progress) {
			if pr.Phase == phase && (phase == "commit" || pr.Stats.ChunksDone > 0) && ctx.Err() == nil {
				cancel()
				// Not a wait for a condition: it lets the closed
				// connections fail before the sender goes on.
				time.Sleep(50 * time.Millisecond)
			}
		}
		rec, err := Send(ctx, cfg)
		cancel()
		if rec == nil {
			t.Fatalf("%s: cancelled migration has no record: %v", phase, err)
		}
		if !errors.Is(err, context.Canceled) || rec.State != StateCancelled || rec.Error != "cancelled" {
			t.Fatalf("cancelled during %s: ended %s (%q): %v", phase, rec.State, rec.Error, err)
		}
		waitIdle(t, p.recv, rec.ID)
	}
}

// TestMigrateResyncDamagedStore: a re-sync copies unchanged chunks from
// the receiver's stored version only where that copy is intact; a chunk
// damaged on its disk, or cut off, is fetched from the sender instead,
// and the receiver says so in its log — for a raw file cut short once,
// up front, for a qcow2 chunk by chunk.
func TestMigrateResyncDamagedStore(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 16*mib, map[int64]int{0: 8 * mib})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	// Bit rot in chunk 1; the file loses its tail from the middle of
	// chunk 6 (so chunks 6 and 7 cannot be read whole).
	f, err := os.OpenFile(img.Path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{1, 2, 3}, mib+100)
	f.Truncate(6*mib + mib/2)
	f.Close()
	rec, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err != nil {
		t.Fatal(err)
	}
	if st := rec.Stats; st.Retries != 1 || st.ChunksSame != 6 {
		t.Errorf("re-sync: %d chunks offered from the stored version, %d sent again, want 6 and 1 (the two cut off not offered)", st.ChunksSame, st.Retries)
	}
	if img, err = p.recvJ.Image("vm"); err != nil {
		t.Fatal(err)
	}
	compare(t, raw, img.Path)
	log := p.recvLog.String()
	if strings.Count(log, "stored version of the image damaged") != 1 || strings.Count(log, "stored version of the image is shorter") != 1 || strings.Contains(log, "unreadable") {
		t.Errorf("the receiver's log does not name the damaged chunk and the cut once:\n%s", log)
	}

	// Stored as qcow2, whose size is the virtual one: a cut file is found
	// chunk by chunk, each unreadable chunk fetched again; the first is
	// logged, and the count at the end.
	logged := len(p.recvLog.String())
	cfg := p.config(raw, "pii-eu")
	cfg.Format, cfg.Name = FormatQcow2, "vmq"
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	if img, err = p.recvJ.Image("vmq"); err != nil {
		t.Fatal(err)
	}
	os.Truncate(img.Path, qcowDataStart(16*mib)+6*mib+mib/2) // chunks 6 and 7, as above
	rec, err = Send(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if img, err = p.recvJ.Image("vmq"); err != nil {
		t.Fatal(err)
	}
	compare(t, raw, img.Path)
	qlog := p.recvLog.String()[logged:]
	if n := strings.Count(qlog, "stored version of the image unreadable"); n != 1 || !strings.Contains(qlog, "bad_chunks=2") || rec.Stats.Retries != 2 {
		t.Errorf("qcow2 cut short: %d chunks logged unreadable, %d sent again, want the first logged, a count of 2 and 2 sent again:\n%s", n, rec.Stats.Retries, qlog)
	}
}

// waitIdle waits until the receiver has let go of an interrupted session.
func waitIdle(t testing.TB, r *Receiver, id string) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		r.mu.Lock()
		_, busy := r.sessions[id]
		r.mu.Unlock()
		if !busy {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("receiver still holds migration %s", id)
}

func TestOpenSourceErrors(t *testing.T) {
	q := qemuImg(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	over := filepath.Join(dir, "overlay.qcow2")
	exec.Command(q, "create", "-f", "qcow2", base, "16M").Run()
	if out, err := exec.Command(q, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", over).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if _, err := OpenSource(over); err == nil || !strings.Contains(err.Error(), "backing file") || !strings.Contains(err.Error(), "qemu-img convert") {
		t.Fatalf("backing file: %v", err)
	}
	if _, err := OpenSource(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("missing image opened")
	}
	// Subclusters: the reader would report a stretch with data as a hole.
	ext := filepath.Join(dir, "extended.qcow2")
	if out, err := exec.Command(q, "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k", ext, "64M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if _, err := OpenSource(ext); err == nil || !strings.Contains(err.Error(), "extended L2") || !strings.Contains(err.Error(), "extended_l2=off") {
		t.Fatalf("extended L2 entries: %v", err)
	}
}

// TestRawDiskWithQcow2Header: a raw disk whose guest wrote a qcow2 header
// into its first sector, sent as raw, arrives as the raw disk it is — also
// when its send is resumed without the format named again — and the
// receiver verifies it, and re-syncs from it, as raw: read by content it
// is the empty image the header describes.
func TestRawDiskWithQcow2Header(t *testing.T) {
	p := newPair(t, "DE")
	raw := rawWithQcow2Header(t, p.dir)
	const chunks = 29 // the header's, and 28 MiB of data

	cfg := p.config(raw, "pii-eu")
	cfg.SourceFormat = FormatRaw
	cfg.Streams, cfg.BWLimit = 1, 10*mib
	ctx, cancel := context.WithCancel(context.Background())
	cfg.Progress = func(pr Progress) {
		if pr.Stats.ChunksDone >= 2 {
			cancel()
		}
	}
	rec, err := Send(ctx, cfg)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted migration: %v", err)
	}
	if rec.SourceFormat != FormatRaw {
		t.Fatalf("the send's record says source format %q, want raw", rec.SourceFormat)
	}
	waitIdle(t, p.recv, rec.ID)
	cfg = p.config(raw, "pii-eu")
	cfg.ID = rec.ID // as the gateway resumes: from the record, no source format
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatalf("resume: %v", err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	if img.Format != FormatRaw {
		t.Fatalf("stored as %s, want raw", img.Format)
	}
	if out, err := exec.Command(qemuImg(t), "compare", "-f", "raw", "-F", "raw", raw, img.Path).CombinedOutput(); err != nil || !strings.Contains(string(out), "Images are identical") {
		t.Fatalf("qemu-img compare -f raw -F raw: %v\n%s", err, out)
	}
	if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
		t.Fatalf("verify the stored raw image: %+v %v", rep, err)
	}

	cfg = p.config(raw, "pii-eu")
	cfg.SourceFormat = FormatRaw
	rec, err = Send(context.Background(), cfg)
	if err != nil {
		t.Fatalf("re-sync: %v", err)
	}
	if st := rec.Stats; st.ChunksSame != chunks || st.ChunksSent != 0 {
		t.Fatalf("re-sync of an unchanged image: %d chunks reused, %d sent, want %d and 0", st.ChunksSame, st.ChunksSent, chunks)
	}

	cfg = p.config(raw, "pii-eu")
	cfg.SourceFormat = "vmdk"
	if _, err := Send(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "use raw or qcow2") {
		t.Fatalf("source format vmdk: %v", err)
	}
}

// TestMigrateTruncatedSource: a qcow2 whose host file was cut short reads
// short at its end; the migration must fail saying so, not send zeros in
// place of the lost data (the manifest would then vouch for them).
func TestMigrateTruncatedSource(t *testing.T) {
	q := qemuImg(t)
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4 * mib})
	qc := filepath.Join(p.dir, "vm.qcow2")
	if out, err := exec.Command(q, "convert", "-O", "qcow2", raw, qc).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if err := os.Truncate(qc, 2*mib); err != nil {
		t.Fatal(err)
	}
	rec, err := Send(context.Background(), p.config(qc, "pii-eu"))
	if err == nil || !strings.Contains(err.Error(), "shorter than its size says") {
		t.Fatalf("migration of a truncated qcow2: %v (record %+v)", err, rec)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Fatal("the truncated image was stored at the destination")
	}
}

// TestReceiverRefusesBadFrames speaks the protocol as a certified but
// misbehaving sender would. A 4-chunk version of the image is stored
// first and the new version has 3 chunks, so the receiver offers chunks
// of the stored version beyond the new end. Each bad frame is refused with
// its reason, nothing is acknowledged for it, the receiver stays up, and
// good chunks on the same stream — one sent, one taken from the stored
// version — are still acknowledged.
func TestReceiverRefusesBadFrames(t *testing.T) {
	p := newPair(t, "DE")
	old := filepath.Join(p.dir, "old.raw")
	makeRaw(t, old, 4*mib, map[int64]int{0: 4 * mib})
	cfg := p.config(old, "pii-eu")
	cfg.Name = "bad"
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	dial := func() (*frameWriter, *frameReader) {
		c := p.dial(t, nil)
		return newFrameWriter(c), newFrameReader(c)
	}
	cw, cr := dial()
	const size = 2*mib + 100 // chunks 0, 1 and a 100-byte chunk 2
	offer := Offer{ID: "0123456789abcdef", Name: "bad", Class: "pii-eu", Format: FormatRaw, Size: size, ChunkSize: mib, Streams: 1}
	if err := cw.json(frameOffer, offer); err != nil {
		t.Fatal(err)
	}
	var acc Accept
	if err := cr.json(frameAccept, &acc); err != nil {
		t.Fatalf("offer: %v", err)
	}
	if _, ok := acc.Base[3]; !ok {
		t.Fatalf("the stored version's chunk 3 was not offered: %v", acc.Base)
	}
	// Another gateway, certified by the same CA, cannot attach a data
	// stream to this sender's migration, even knowing its ID.
	other, err := p.ca.IssueIdentity(certs.Attributes{Node: "gw-other", Site: "other-site", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, 3})}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	oc := p.dial(t, other)
	ow, or := newFrameWriter(oc), newFrameReader(oc)
	if err := ow.json(frameJoin, Join{ID: offer.ID}); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := or.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "no such migration from you") {
		t.Fatalf("another gateway joining the migration: answer type %d %q, %v; want an error frame", typ, b, err)
	}
	dw, dr := dial()
	if err := dw.json(frameJoin, Join{ID: offer.ID}); err != nil {
		t.Fatal(err)
	}
	good := make([]byte, mib)
	rand.Read(good)
	h := hashChunk(good)
	wrong := hashChunk([]byte("something else"))
	// 1,000 bytes compressed, with their own hash, for a place of 1 MiB:
	// the hash matches what it holds, so only its length tells.
	enc, err := newChunkEncoder(1)
	if err != nil {
		t.Fatal(err)
	}
	short := enc.EncodeAll(good[:1000], nil)
	for _, tc := range []struct {
		name   string
		typ    byte
		parts  [][]byte
		index  int64
		reason string
	}{
		{"chunk past the end", frameChunk, [][]byte{chunkHeader(3, h, 0, mib), good}, 3, "chunk outside the image"},
		{"wrong length for its place", frameChunk, [][]byte{chunkHeader(2, h, 0, mib), good}, 2, "chunk of the wrong length"},
		{"fewer bytes than it says", frameChunk, [][]byte{chunkHeader(0, h, 0, mib), good[:1000]}, 0, "chunk of the wrong length"},
		{"not zstd", frameChunk, [][]byte{chunkHeader(0, h, flagZstd, mib), good[:1000]}, 0, "does not decompress"},
		{"compressed, no smaller", frameChunk, [][]byte{chunkHeader(0, h, flagZstd, mib), good}, 0, "chunk of the wrong length"},
		{"decompresses short", frameChunk, [][]byte{chunkHeader(0, hashChunk(good[:1000]), flagZstd, mib), short}, 0, "does not decompress"},
		{"damaged", frameChunk, [][]byte{chunkHeader(0, wrong, 0, mib), good}, 0, "hash mismatch"},
		{"stored chunk past the new end", frameSame, [][]byte{indexFrame(3, acc.Base[3])}, 3, "chunk outside the image"},
		{"not what is stored", frameSame, [][]byte{indexFrame(1, wrong)}, 1, "not in the stored version"},
	} {
		if err := dw.frame(tc.typ, tc.parts...); err != nil {
			t.Fatal(err)
		}
		dw.flush()
		typ, b, err := dr.next(nil)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		i, reason, perr := parseNack(b)
		if typ != frameNack || perr != nil || i != tc.index || reason != tc.reason {
			t.Fatalf("%s: answer type %d %q, want a nack of %d: %s", tc.name, typ, b, tc.index, tc.reason)
		}
	}
	// A data stream beyond those offered (each holds chunk buffers).
	jw, jr := dial()
	if err := jw.json(frameJoin, Join{ID: offer.ID}); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := jr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "already has the 1 data streams it offered") {
		t.Fatalf("a second data stream of a one-stream migration: answer type %d %q, %v; want an error frame", typ, b, err)
	}
	dw.frame(frameChunk, chunkHeader(1, h, 0, mib), good)
	dw.frame(frameSame, indexFrame(0, acc.Base[0]))
	dw.flush()
	acked := map[int64]bool{}
	for len(acked) < 2 {
		typ, b, err := dr.next(nil)
		if err != nil || typ != frameAck {
			t.Fatalf("good chunks after the bad ones: type %d %q, %v", typ, b, err)
		}
		idx, err := parseAck(b)
		if err != nil {
			t.Fatal(err)
		}
		for _, i := range idx {
			if i != 0 && i != 1 {
				t.Fatalf("chunk %d acknowledged; only 0 and 1 were good", i)
			}
			acked[i] = true
		}
	}
	// A frame longer than any may be ends the stream, and says why.
	dw.w.Write(binary.AppendUvarint([]byte{frameChunk}, maxFrame+1))
	dw.flush()
	if typ, b, err := dr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "exceeds the limit") {
		t.Fatalf("an oversized frame: answer type %d %q, %v; want an error frame", typ, b, err)
	}
	// On the control connection too: a commit that is not one, and an
	// oversized first frame, are refused with a word, not in silence.
	if err := cw.json(frameJoin, Join{ID: offer.ID}); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := cr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "unexpected frame") {
		t.Fatalf("a join where the commit belongs: answer type %d %q, %v; want an error frame", typ, b, err)
	}
	xw, xr := dial()
	xw.w.Write(binary.AppendUvarint([]byte{frameOffer}, maxFrame+1))
	xw.flush()
	if typ, b, err := xr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "exceeds the limit") {
		t.Fatalf("an oversized first frame: answer type %d %q, %v; want an error frame", typ, b, err)
	}
}

// standIn serves the migration protocol in a Receiver's place, with the
// destination's identity: control hears each control connection once its
// offer was read; data streams are held open until they close.
func (p *pair) standIn(t *testing.T, control func(fw *frameWriter, fr *frameReader)) netip.AddrPort {
	t.Helper()
	return p.standInWith(t, control, nil)
}

// standInWith is standIn whose data streams data serves (nil: held open
// until they close).
func (p *pair) standInWith(t *testing.T, control, data func(fw *frameWriter, fr *frameReader)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	tcfg := serverTLS(func() *certs.NodeIdentity { return p.to }, func() *certs.TrustBundle { return p.tb }, time.Now)
	go func() {
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				c := tls.Server(raw, tcfg)
				defer c.Close()
				c.SetDeadline(time.Now().Add(20 * time.Second))
				fw, fr := newFrameWriter(c), newFrameReader(c)
				typ, _, err := fr.next(nil)
				if err != nil {
					return
				}
				if typ != frameOffer { // a data stream
					if data != nil {
						data(fw, fr)
						return
					}
					for err == nil {
						_, _, err = fr.next(nil)
					}
					return
				}
				control(fw, fr)
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// TestSenderChecksReceiversRoot: a migration is done only when the
// receiver reports the root the sender computed. A receiver that answers
// the commit with another root (a bug, a store that lost a chunk) fails
// the migration rather than have it recorded verified.
func TestSenderChecksReceiversRoot(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "holes.raw")
	makeRaw(t, raw, 4*mib, nil) // no data: nothing to send but the commit
	cfg := p.config(raw, "pii-eu")
	cfg.Name = "holes"
	cfg.To.Addr = p.standIn(t, func(fw *frameWriter, fr *frameReader) {
		fw.json(frameAccept, Accept{})
		fw.flush()
		for {
			typ, payload, err := fr.next(nil)
			if err != nil {
				return
			}
			if typ != frameCommit {
				continue
			}
			var cm Commit
			jsonUnmarshal(payload, &cm)
			other := cm.Root
			other[0] ^= 0xff
			fw.json(frameDone, Done{Name: "holes", Root: other})
			fw.flush()
		}
	})
	rec, err := Send(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "receiver stored root") {
		t.Fatalf("a receiver reporting another root: %v (record %+v); want the migration failed", err, rec)
	}
	if rec != nil && rec.State == StateDone {
		t.Fatalf("recorded done: %+v", rec)
	}
}

// TestSenderBoundsTheOffersAnswer: a receiver that takes the offer and
// never answers (hung, its host gone where no keepalive tells) fails the
// migration in time, rather than hold it, its files and the image's slot
// until someone cancels it.
func TestSenderBoundsTheOffersAnswer(t *testing.T) {
	was, wasInFlight := answerTimeout, answerInFlight
	answerTimeout, answerInFlight = 300*time.Millisecond, 0
	t.Cleanup(func() { answerTimeout, answerInFlight = was, wasInFlight })
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	// 200 MiB of data: 20 s at the read-back pace, which a first attempt
	// (the receiver holds nothing to read back) does not wait for.
	makeRaw(t, raw, 256*mib, map[int64]int{0: 200 * mib})
	cfg := p.config(raw, "pii-eu")
	cfg.To.Addr = p.standIn(t, func(_ *frameWriter, fr *frameReader) {
		for { // heard, never answered
			if _, _, err := fr.next(nil); err != nil {
				return
			}
		}
	})
	done := make(chan error, 1)
	go func() {
		_, err := Send(context.Background(), cfg)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "offer") {
			t.Fatalf("an offer never answered: %v; want the migration failed at the offer", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("an offer never answered holds the migration")
	}
}

// TestReceiverQuietOnProbes: a connection closed before a word (another
// gateway's reachability probe, every second) is not logged at the
// default level; a failed handshake is.
func TestReceiverQuietOnProbes(t *testing.T) {
	p := newPair(t, "DE")
	for range 3 {
		c, err := net.Dial("tcp", p.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	c, err := net.Dial("tcp", p.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("GET / HTTP/1.0\r\n\r\n")) // not TLS
	io.Copy(io.Discard, c)
	c.Close()
	waitFor(t, "the failed handshake logged", func() bool { return strings.Contains(p.recvLog.String(), "refused migration connection") })
	if n := strings.Count(p.recvLog.String(), "refused migration connection"); n != 1 {
		t.Fatalf("%d refusals logged, want the failed handshake's alone:\n%s", n, p.recvLog.String())
	}
}

// TestJoinIsHeard: a data stream joining is news from the sender, as its
// frames are: the time a sender takes to dial its streams (TLS, on a busy
// host) did not count, and a session could end as silent before its first
// chunk.
func TestJoinIsHeard(t *testing.T) {
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { c.IdleTimeout = time.Minute })
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: mib, ChunkSize: mib, Streams: 1}
	rs := p.offered(t, offer)
	p.recv.mu.Lock()
	s := p.recv.sessions[offer.ID]
	p.recv.mu.Unlock()
	if s == nil {
		t.Fatal("no session for the offer")
	}
	joined := time.Now()
	rs.join(t, p, offer.ID)
	// Heard since the join was sent: the join; before it, the offer.
	waitFor(t, "the data stream's join taken as news from the sender", func() bool { return s.heard.age() < time.Since(joined) })
}

// TestReceiverEndsSilentSession: a sender that goes silent before its
// commit (vanished where no keepalive notices it) loses its session after
// the receiver's IdleTimeout; its durable chunks stay for a resume.
func TestReceiverEndsSilentSession(t *testing.T) {
	// Long enough for the offer, a data stream's TLS dial and its first
	// chunk on a busy machine (300 ms failed 2 runs in 35 so), which the
	// receiver takes for silence too.
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { c.IdleTimeout = 3 * time.Second })
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: mib, ChunkSize: mib, Streams: 1}
	rs := p.offerRaw(t, offer)
	// A chunk made durable: a receive that holds none is forgotten as it
	// ends, having nothing to resume.
	chunk := bytes.Repeat([]byte("held"), mib/4)
	rs.dw.frame(frameChunk, chunkHeader(0, hashChunk(chunk), 0, mib), chunk)
	rs.dw.flush()
	if typ, b, err := rs.dr.next(nil); err != nil || typ != frameAck {
		t.Fatalf("the chunk: answer type %d %q, %v; want its ack", typ, b, err)
	}
	// Silent from here on: the receiver ends the session and closes the
	// control connection.
	if _, _, err := rs.cr.next(nil); err == nil {
		t.Fatal("the control connection of a silent sender was not closed")
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(p.recv.Active()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the silent sender's session is still active: %+v", p.recv.Active())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if recs, err := p.recvJ.Receives(); err != nil || len(recs) != 1 {
		t.Fatalf("its receive record, kept for a resume: %+v %v", recs, err)
	}
}

// TestReceiverSaysWhenItCannotSync: chunks the receiver cannot make
// durable (its journal or disk failing) are never acknowledged. The sender
// is told why at once, instead of waiting out its stall timeout for
// acknowledgements that will not come and blaming a vanished receiver.
func TestReceiverSaysWhenItCannotSync(t *testing.T) {
	p := newPair(t, "DE")
	start := time.Now()
	res := p.slowSend(t, 20*time.Millisecond)
	p.recvJ.Close() // every later batch fails to be recorded
	if err := <-res; err == nil || !strings.Contains(err.Error(), "could not make chunks durable") {
		t.Fatalf("send to a receiver that cannot record chunks: %v; want the receiver's reason", err)
	}
	if took := time.Since(start); took >= stallTimeout {
		t.Errorf("the sender learnt of it after %s, as late as its stall timeout", took.Round(time.Millisecond))
	}
	if !strings.Contains(p.recvLog.String(), "could not make received chunks durable") {
		t.Errorf("the receiver did not log it:\n%s", p.recvLog.String())
	}
}

// failingListener fails its first Accepts as a process out of file
// descriptors does.
type failingListener struct {
	net.Listener
	fails atomic.Int32
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// TestReceiverOutlastsAcceptErrors: a receiver that once cannot accept (out
// of file descriptors) receives again once it can, instead of stopping for
// good while its gateway goes on advertising itself as a destination.
func TestReceiverOutlastsAcceptErrors(t *testing.T) {
	p := newPair(t, "DE")
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &failingListener{Listener: inner}
	ln.fails.Store(4)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- p.recv.Serve(ctx, ln) }()
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{mib: 4096})
	cfg := p.config(raw, "pii-eu")
	cfg.To.Addr = inner.Addr().(*net.TCPAddr).AddrPort()
	if _, err := Send(context.Background(), cfg); err != nil {
		t.Fatalf("send after the receiver's accept failed %d times: %v", 4, err)
	}
	p.stored(raw)
	if !strings.Contains(p.recvLog.String(), "too many open files") {
		t.Errorf("the accept errors were not logged:\n%s", p.recvLog.String())
	}
	cancel()
	if err := <-served; err != nil {
		t.Errorf("Serve ended with %v when its context ended", err)
	}
}

// TestSenderGivesUpOnSilentReceiver: a receiver whose kernel completes
// the connection but which never answers (its gateway hung, or no longer
// accepting) fails the migration with a reason, not a wait for ever.
func TestSenderGivesUpOnSilentReceiver(t *testing.T) {
	p := newPair(t, "DE")
	silent, err := net.Listen("tcp", "127.0.0.1:0") // never accepted from
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	was := dialTimeout
	dialTimeout = 300 * time.Millisecond
	t.Cleanup(func() { dialTimeout = was })
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, mib, map[int64]int{0: 4096})
	cfg := p.config(raw, "pii-eu")
	cfg.To.Addr = silent.Addr().(*net.TCPAddr).AddrPort()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rec, err := Send(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "no answer within") || ctx.Err() != nil {
		t.Fatalf("send to a receiver that never answers: %v (test deadline passed: %v)", err, ctx.Err() != nil)
	}
	if rec == nil || rec.State != StateFailed {
		t.Errorf("record %+v; want it failed, to resume", rec)
	}
}

// TestReceiverOneMigrationPerName: two migrations storing one image name
// at once would race to store it. Another gateway's is refused while one
// runs; the same gateway's new one supersedes the old (that gateway sends
// a name to a destination once at a time: the old is one it no longer runs).
func TestReceiverOneMigrationPerName(t *testing.T) {
	p := newPair(t, "DE")
	other, err := p.ca.IssueIdentity(certs.Attributes{Node: "gw-gva", Site: "onprem-gva", Region: "r", Provider: "onprem", Jurisdiction: "CH",
		OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, 3})}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	offer := func(from *certs.NodeIdentity, id string) (*tls.Conn, byte, []byte) {
		t.Helper()
		c := p.dial(t, from)
		o := Offer{ID: id, Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: mib, ChunkSize: mib, Streams: 1}
		if err := newFrameWriter(c).json(frameOffer, o); err != nil {
			t.Fatal(err)
		}
		typ, payload, err := newFrameReader(c).next(nil)
		if err != nil {
			t.Fatalf("offer %s: %v", id, err)
		}
		return c, typ, payload
	}
	first, typ, _ := offer(p.from, "aaaaaaaaaaaaaaaa")
	if typ != frameAccept {
		t.Fatalf("the first offer of vm: answer %d", typ)
	}
	// Refused without the migration's ID: that is its sender's, which a
	// resume names.
	if _, typ, why := offer(other, "bbbbbbbbbbbbbbbb"); typ != frameError || !strings.Contains(string(why), "being received from another gateway") || strings.Contains(string(why), "aaaaaaaaaaaaaaaa") {
		t.Fatalf("another gateway's offer of vm while it is received: answer %d %q; want refused, without the migration's ID", typ, why)
	}
	if _, typ, why := offer(p.from, "cccccccccccccccc"); typ != frameAccept {
		t.Fatalf("the same gateway's new offer of vm: answer %d %q; want it to supersede the old", typ, why)
	}
	first.SetDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := newFrameReader(first).next(nil); err == nil {
		t.Error("the superseded migration's control connection is still open")
	}
	if a := p.recv.Active(); len(a) != 1 || a[0].ID != "cccccccccccccccc" {
		t.Errorf("receiving %+v; want the superseding migration alone", a)
	}
}

// pairStoppingAfterRename is a pair whose receiver stops, as a crash
// would, once it renamed an image into place while stop is set; rcfg is
// its configuration, for a gateway starting on the same journal and store.
func pairStoppingAfterRename(t *testing.T) (p *pair, rcfg *ReceiverConfig, stop *atomic.Bool) {
	rcfg, stop = new(ReceiverConfig), new(atomic.Bool)
	p = newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			if stop.Load() {
				return errStopHere
			}
			return nil
		}
		*rcfg = *c
	})
	return p, rcfg, stop
}

// TestReceiverStoppedWhileStoring: a receiving gateway stopped after a new
// version of an image replaced the stored one, before the catalog recorded
// it, records it when it starts again: the catalog never describes the
// file the image replaced (verify would call a good image damaged), nor
// does a qcow2 version lose its file to a raw one's clean-up.
func TestReceiverStoppedWhileStoring(t *testing.T) {
	for _, format := range []string{FormatRaw, FormatQcow2} {
		t.Run(format, func(t *testing.T) {
			if format == FormatQcow2 {
				qemuImg(t)
			}
			p, rcfg, stop := pairStoppingAfterRename(t)
			raw := filepath.Join(p.dir, "vm.raw")
			makeRaw(t, raw, 8*mib, map[int64]int{0: 4096, 3 * mib: 64 << 10})
			if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
				t.Fatal(err)
			}
			// A new version, stored as format; the gateway stops after
			// the rename.
			makeRaw(t, raw, 8*mib, map[int64]int{0: 4096, 5 * mib: 64 << 10})
			stop.Store(true)
			cfg := p.config(raw, "pii-eu")
			cfg.Format = format
			if _, err := Send(context.Background(), cfg); err == nil {
				t.Fatal("the receiver stopped while storing, yet the send succeeded")
			}
			if format == FormatQcow2 {
				if _, err := os.Stat(filepath.Join(p.store, "vm.raw")); err != nil {
					t.Fatalf("the raw version was removed before the qcow2 one was recorded: %v", err)
				}
			}
			// A gateway starting on the same journal and store.
			rcfg.afterRename = nil
			r, err := NewReceiver(*rcfg)
			if err != nil {
				t.Fatal(err)
			}
			_ = r
			img, err := p.recvJ.Image("vm")
			if err != nil {
				t.Fatalf("the image moved into place before the stop is not in the catalog: %v", err)
			}
			if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
				t.Fatalf("verify after the restart: %+v %v", rep, err)
			}
			if img.Format != format {
				t.Errorf("catalog says %s, want %s", img.Format, format)
			}
			if format == FormatRaw {
				compare(t, raw, img.Path)
			} else if _, err := os.Stat(filepath.Join(p.store, "vm.raw")); err == nil {
				t.Error("the raw version stays beside the qcow2 one that replaced it")
			}
			if recs, _ := p.recvJ.Receives(); len(recs) != 0 {
				t.Errorf("its receive is still recorded: %+v", recs)
			}
			if staged, _ := p.recvJ.stagedImages(); len(staged) != 0 {
				t.Errorf("still staged: %+v", staged)
			}
			if left, _ := os.ReadDir(filepath.Join(p.store, ".incoming")); len(left) != 0 {
				t.Errorf("left in .incoming: %v", left)
			}
			if !strings.Contains(p.recvLog.String(), "recorded an image stored just before the gateway stopped") {
				t.Errorf("not logged:\n%s", p.recvLog.String())
			}
			// The receiver's audit log says the image was stored, once,
			// and still verifies.
			var done, failed int
			for _, rec := range p.recvRecords(t) {
				if rec.Fields["outcome"] == "done" && rec.Fields["recovered"] != nil && rec.Fields["root"] == img.Root.String() {
					done++
				}
				if rec.Fields["outcome"] == "failed" {
					failed++
				}
			}
			if done != 1 {
				t.Errorf("%d records of the image stored before the stop, want 1, marked recovered", done)
			}
			// Nothing says it failed: it was stored, only not yet recorded.
			if failed != 0 {
				t.Errorf("%d records say a migration failed; the image was stored", failed)
			}
		})
	}
}

// TestReceiverStagedFileReplaced: a staged image is told at the next start
// by its file's whole identity, not by its inode number alone, which the
// file system gives out again once the file is freed. Here the file at the
// image's path keeps the staged inode but not its content: it is not
// recorded as the staged image, whose root would describe another file.
func TestReceiverStagedFileReplaced(t *testing.T) {
	p, rcfg, stop := pairStoppingAfterRename(t)
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 4096})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	first, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	makeRaw(t, raw, 8*mib, map[int64]int{0: 4096, 5 * mib: 64 << 10})
	stop.Store(true)
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err == nil {
		t.Fatal("the receiver stopped while storing, yet the send succeeded")
	}
	staged, err := p.recvJ.stagedImages()
	if err != nil || len(staged) != 1 {
		t.Fatalf("staged: %+v, %v; want the second version", staged, err)
	}
	// Other content under the staged inode number.
	before, err := sourceID(first.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(first.Path, []byte("not the staged image"), 0o600); err != nil {
		t.Fatal(err)
	}
	if after, err := sourceID(first.Path); err != nil || after.Inode != before.Inode {
		t.Fatalf("rewritten in place: inode %d, was %d (%v)", after.Inode, before.Inode, err)
	}
	rcfg.afterRename = nil
	if _, err := NewReceiver(*rcfg); err != nil {
		t.Fatal(err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range staged {
		if img.Root == st.Image.Root {
			t.Errorf("the catalog took the staged image (root %s) for a file that is not it", st.Image.Root)
		}
	}
	if left, _ := p.recvJ.stagedImages(); len(left) != 0 {
		t.Errorf("still staged: %+v", left)
	}
	if strings.Contains(p.recvLog.String(), "recorded an image stored just before the gateway stopped") {
		t.Errorf("recorded as stored:\n%s", p.recvLog.String())
	}
}

// recvRecords reads the receiving gateway's audit log, checks that it
// verifies, and returns its records.
func (p *pair) recvRecords(t *testing.T) []audit.Record { return p.records(t, p.recvAudit) }

// records reads an audit log of the pair, which must verify.
func (p *pair) records(t *testing.T, log *audit.Log) []audit.Record {
	t.Helper()
	b, err := os.ReadFile(log.Path())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := audit.Verify(bytes.NewReader(b), p.tb); err != nil {
		t.Fatalf("the audit log %s: %v", log.Path(), err)
	}
	var recs []audit.Record
	for line := range bytes.Lines(b) {
		var r audit.Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, r)
	}
	return recs
}

// TestReceiverRecordsAfterAFailure: a failure once the image is in place
// (a directory sync, a journal write) is not the migration's: the receiver
// records the image at once when the catalog takes it, answers done, and
// writes one "done" record and no "failed" one.
func TestReceiverRecordsAfterAFailure(t *testing.T) {
	var fail atomic.Bool
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			if fail.CompareAndSwap(true, false) {
				return errors.New("the directory could not be synced")
			}
			return nil
		}
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{mib: 4096})
	fail.Store(true)
	rec, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err != nil || rec.State != StateDone {
		t.Fatalf("send with a failure after the image was in place: %v, %+v; want done", err, rec)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatalf("the image is not in the catalog without a restart: %v", err)
	}
	if rep, err := VerifyImage(context.Background(), img); err != nil || !rep.OK {
		t.Fatalf("verify: %+v %v", rep, err)
	}
	if staged, _ := p.recvJ.stagedImages(); len(staged) != 0 {
		t.Errorf("still staged: %+v", staged)
	}
	if !strings.Contains(p.recvLog.String(), "recording it failed once, and succeeded when tried again") {
		t.Errorf("not logged:\n%s", p.recvLog.String())
	}
	outcomes := map[any]int{}
	for _, r := range p.recvRecords(t) {
		outcomes[r.Fields["outcome"]]++
	}
	if outcomes["done"] != 1 || outcomes["failed"] != 0 {
		t.Errorf("the receiver's audit records by outcome: %v; want one done, no failed", outcomes)
	}
}

// TestReceiverOwesRecord: an image stored while the audit log cannot take
// its "done" record keeps the record, which is written before the
// receiver's next one, or at its next start; before, it went with the
// staged entry and no record was ever written.
func TestReceiverOwesRecord(t *testing.T) {
	p, owed, good := pairOwingARecord(t)
	if owed.Fields["outcome"] != "done" {
		t.Fatalf("record owed: %+v; want the stored image's", owed)
	}
	// Repaired, the next start writes it.
	p.recv.cfg.afterRename = nil
	if err := os.WriteFile(p.recvAudit.Path(), good, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReceiver(p.recv.cfg); err != nil {
		t.Fatal(err)
	}
	recs := p.recvRecords(t)
	if len(recs) == 0 {
		t.Fatal("no record after the start; want the owed one")
	}
	if last := recs[len(recs)-1]; last.Fields["outcome"] != "done" || last.Fields["migration_id"] != owed.ID || last.Fields["recovered"] == nil {
		t.Fatalf("last record after the start: %+v; want the owed one", last)
	}
	if owed, _ := p.recvJ.auditOwed(); len(owed) != 0 {
		t.Fatalf("still owed after it was written: %+v", owed)
	}
}

// pairOwingARecord is a pair whose receiver stored an image while its
// audit log could not take the record (damaged as the image was stored;
// a disk filling up makes appends fail the same way): the record owed,
// and the log as it was before, to repair it with.
func pairOwingARecord(t *testing.T) (p *pair, owed owedRecord, good []byte) {
	t.Helper()
	p = newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			good, _ = os.ReadFile(p.recvAudit.Path())
			return os.WriteFile(p.recvAudit.Path(), append(slices.Clone(good), "not a record\n"...), 0o600)
		}
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: mib})
	if rec, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil || rec.State != StateDone {
		t.Fatalf("send: %v %+v", err, rec)
	}
	p.stored(raw)
	all, err := p.recvJ.auditOwed()
	if err != nil || len(all) != 1 {
		t.Fatalf("records owed: %+v, %v; want the stored image's", all, err)
	}
	return p, all[0], good
}

// TestCancelAfterCommit: a migration cancelled once its commit is sent
// (migrate cancel, the sending gateway stopping) lets the receiver answer:
// it stores the image whatever the sender does, and the sender recording
// "cancelled" beside the receiver's "done" would disagree in the audit
// logs and send the whole image again on a resume.
func TestCancelAfterCommit(t *testing.T) {
	storing, release := make(chan struct{}), make(chan struct{})
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			close(storing)
			<-release
			return nil
		}
	})
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{mib: 4096})
	rec, err := p.cancelAfterCommit(raw, storing, release)
	if err != nil || rec.State != StateDone {
		t.Fatalf("cancelled while the receiver stored the image: %v, record %+v; want done, as at the receiver", err, rec)
	}
	p.stored(raw)
}

// cancelAfterCommit sends raw as pii-eu, cancels the send once the
// receiver, past the commit, is held (held closed), lets it go on
// (release) once the cancel has reached the sender, and returns how the
// send ended.
func (p *pair) cancelAfterCommit(raw string, held <-chan struct{}, release chan struct{}) (*SendRecord, error) {
	t := p.t
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	type result struct {
		rec *SendRecord
		err error
	}
	res := make(chan result, 1)
	go func() {
		rec, err := Send(ctx, p.config(raw, "pii-eu"))
		res <- result{rec, err}
	}()
	select {
	case <-held:
	case r := <-res:
		t.Fatalf("the send ended before the receiver was held past its commit: %+v %v", r.rec, r.err)
	}
	cancel()
	time.Sleep(100 * time.Millisecond) // the cancel has every chance to cut the commit short
	close(release)
	r := <-res
	return r.rec, r.err
}

// TestReceiverBoundsTheFirstFrame: a connection's first frame (an offer
// or a join) comes at once and small. One that sends nothing is closed,
// one that announces megabytes is refused, instead of each holding a
// goroutine, its buffers and a descriptor for good.
func TestReceiverBoundsTheFirstFrame(t *testing.T) {
	was := firstFrameTimeout
	firstFrameTimeout = 300 * time.Millisecond
	t.Cleanup(func() { firstFrameTimeout = was })
	p := newPair(t, "DE")
	dial := func() (*tls.Conn, *frameWriter, *frameReader) {
		c := p.dial(t, nil)
		if err := c.Handshake(); err != nil {
			t.Fatal(err)
		}
		return c, newFrameWriter(c), newFrameReader(c)
	}
	_, _, fr := dial() // silent
	if _, _, err := fr.next(nil); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("a connection silent after its handshake: %v; want it closed by the receiver", err)
	}
	c, fw, fr := dial()
	head := binary.AppendUvarint([]byte{frameOffer}, 8<<20)
	if _, err := c.Write(head); err != nil {
		t.Fatal(err)
	}
	fw.flush()
	if typ, why, err := fr.next(nil); err != nil || typ != frameError || !strings.Contains(string(why), "at most") {
		t.Errorf("an offer of 8 MiB announced: %d %q %v; want it refused", typ, why, err)
	}
}

// TestReceiverEndsStreamsWithTheSession: a data stream stalled in the
// middle of a frame ends with its session, instead of holding its
// goroutines and chunk buffers after the session is gone.
func TestReceiverEndsStreamsWithTheSession(t *testing.T) {
	p := newPair(t, "DE")
	dial := func() (*tls.Conn, *frameWriter, *frameReader) {
		c := p.dial(t, nil)
		return c, newFrameWriter(c), newFrameReader(c)
	}
	ctrl, cw, cr := dial()
	offer := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1}
	if err := cw.json(frameOffer, offer); err != nil {
		t.Fatal(err)
	}
	var acc Accept
	if err := cr.json(frameAccept, &acc); err != nil {
		t.Fatal(err)
	}
	data, dw, dr := dial()
	if err := dw.json(frameJoin, Join{ID: offer.ID}); err != nil {
		t.Fatal(err)
	}
	// Half a chunk's frame: the receiver is now reading the rest of it.
	chunk := make([]byte, mib)
	rand.Read(chunk)
	hdr := chunkHeader(0, hashChunk(chunk), 0, mib)
	dw.flush()
	data.Write(binary.AppendUvarint([]byte{frameChunk}, uint64(len(hdr)+mib)))
	data.Write(hdr)
	data.Write(chunk[:mib/2])
	// The stream joined (its join is handled on a goroutine of its own):
	// closed before, the session would end first and the join be refused.
	deadline := time.Now().Add(10 * time.Second)
	for joined := 0; joined == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the data stream never joined its session")
		}
		time.Sleep(5 * time.Millisecond)
		p.recv.mu.Lock()
		if s := p.recv.sessions[offer.ID]; s != nil {
			s.mu.Lock()
			joined = s.streams
			s.mu.Unlock()
		}
		p.recv.mu.Unlock()
	}
	ctrl.Close() // the sender goes; the session ends
	waitIdle(t, p.recv, offer.ID)
	data.SetDeadline(time.Now().Add(10 * time.Second))
	if typ, p, err := dr.next(nil); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the stalled data stream after its session ended: %v (frame %d %q); want it closed by the receiver", err, typ, p)
	}
}

// TestStoredImageKeepsItsClass: a stored image is replaced only by a
// migration of its own class. A sender the policy lets store a laxer class
// here could otherwise overwrite it, or copy its data (from the chunk
// hashes a re-sync is given) into an image recorded under the laxer class.
func TestStoredImageKeepsItsClass(t *testing.T) {
	p := newPair(t, "CH")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4096})
	if _, err := Send(context.Background(), p.config(raw, "swiss-banking-secret")); err != nil {
		t.Fatal(err)
	}
	before, _ := p.recvJ.Image("vm")
	_, err := Send(context.Background(), p.config(raw, "pii-eu"))
	if err == nil || !strings.Contains(err.Error(), "stored here as class") || !strings.Contains(err.Error(), "swiss-banking-secret") {
		t.Fatalf("the image sent again as pii-eu: %v; want it refused", err)
	}
	after, _ := p.recvJ.Image("vm")
	if after.Class != "swiss-banking-secret" || after.Migration != before.Migration {
		t.Errorf("stored image %+v after the refusal; want it unchanged", after)
	}
	// Its own class replaces it.
	if _, err := Send(context.Background(), p.config(raw, "swiss-banking-secret")); err != nil {
		t.Errorf("sent again as its own class: %v", err)
	}
}

// TestSenderChecksThePlaceItReaches: the policy decides on the
// destination's attributes as gossip certified them; the gateway reached
// must hold a certificate for that same place, not merely that name (one
// from before the gateway moved, never revoked, would do otherwise).
func TestSenderChecksThePlaceItReaches(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, mib, map[int64]int{0: 4096})
	cfg := p.config(raw, "pii-eu")
	judged := *cfg.To.Attributes
	judged.Region = "elsewhere" // the place the policy judged; the receiver's certificate says r
	cfg.To.Attributes = &judged
	_, err := Send(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "another place than the one the policy judged") {
		t.Fatalf("a receiver certified for another place: %v; want it refused", err)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Error("the image was stored")
	}
}

// TestSenderRevokedMeanwhile: a sender whose certificate is revoked while
// its image comes (a gateway decommissioned, a key compromised) does not
// get it stored: the receiver judges it again at the commit.
func TestSenderRevokedMeanwhile(t *testing.T) {
	var trust atomic.Pointer[certs.TrustBundle]
	p := newPairWith(t, "DE", func(c *ReceiverConfig) { c.Trust = trust.Load })
	trust.Store(p.tb)
	res := p.slowSend(t, 50*time.Millisecond)
	if _, err := p.ca.RevokeSerials([]*big.Int{p.from.Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	tb, err := p.ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	trust.Store(tb) // the receiver's gateway adopts the new list
	if err := <-res; err == nil || !strings.Contains(err.Error(), "was revoked while the image came") {
		t.Fatalf("send by a sender revoked meanwhile: %v; want it refused at the commit", err)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Error("its image was stored")
	}
}

// TestDestinationRevokedMeanwhile: a destination whose certificate is
// revoked while its image comes (its gateway decommissioned, its key
// stolen) is sent nothing more, nor the commit: nothing is stored there.
func TestDestinationRevokedMeanwhile(t *testing.T) {
	p := newPair(t, "DE")
	var trust atomic.Pointer[certs.TrustBundle]
	trust.Store(p.tb)
	res := p.slowSendWith(t, 50*time.Millisecond, func(c *SendConfig) { c.TrustNow = trust.Load })
	if _, err := p.ca.RevokeSerials([]*big.Int{p.to.Certificate().SerialNumber}, "keyCompromise", time.Now()); err != nil {
		t.Fatal(err)
	}
	tb, err := p.ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	trust.Store(tb) // the sending gateway adopts the new list
	if err := <-res; err == nil || !strings.Contains(err.Error(), "certificate "+certs.FormatSerial(p.to.Certificate().SerialNumber)+" was revoked during the migration") {
		t.Fatalf("send to a destination revoked meanwhile: %v; want it stopped", err)
	}
	if _, err := p.recvJ.Image("vm"); err == nil {
		t.Error("its image was stored")
	}
}

// TestReceiverRefusesBadOffers: an offer's ID names the receiver's
// temporary files, so one that could be a path is refused before anything
// is opened, as are sizes and stream counts out of bounds.
func TestReceiverRefusesBadOffers(t *testing.T) {
	p := newPair(t, "DE")
	victim := filepath.Join(p.dir, "victim.raw")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(filepath.Join(p.store, ".incoming"), strings.TrimSuffix(victim, ".raw"))
	if err != nil {
		t.Fatal(err)
	}
	good := Offer{ID: "0123456789abcdef", Name: "vm", Class: "pii-eu", Format: FormatRaw, Size: mib, ChunkSize: mib, Streams: 4}
	for _, tc := range []struct {
		change func(*Offer)
		want   string
	}{
		{func(o *Offer) { o.ID = rel }, "migration ID"},
		{func(o *Offer) { o.ID = "" }, "migration ID"},
		{func(o *Offer) { o.ID = strings.Repeat("a", 65) }, "migration ID"},
		{func(o *Offer) { o.Streams = 0 }, "data streams"},
		{func(o *Offer) { o.Streams = MaxStreams + 1 }, "data streams"},
		{func(o *Offer) { o.ChunkSize = maxFrame }, "chunk size"},
		{func(o *Offer) { o.ChunkSize = 1 }, "chunk size"}, // a hash per byte at the commit
		{func(o *Offer) { o.Size = 1<<63 - 1 }, "image size"},
		{func(o *Offer) { o.Size = -1 }, "image size"},
		{func(o *Offer) { o.Format = "vmdk" }, "format"},
		{func(o *Offer) { o.Name = "../vm" }, "image name"},
		{func(o *Offer) { o.Name = "vm\x1b]0;pwned\a" }, "control or invisible character"}, // reaches operators' terminals
		{func(o *Offer) { o.Name = "vm\u202egpj" }, "control or invisible character"},
		{func(o *Offer) { o.Chunks = new(int64(-1)) }, "chunks holding data"},
		{func(o *Offer) { o.Chunks = new(int64(2)) }, "chunks holding data"},
		// Its commit might not fit a frame (a sender of an earlier
		// release, with 1 MiB chunks for any image).
		{func(o *Offer) { o.Size, o.Chunks = (maxOfferChunks+1)*mib, new(int64(maxOfferChunks+1)) }, "carries at most"},
	} {
		o := good
		tc.change(&o)
		c := p.dial(t, nil)
		fw, fr := newFrameWriter(c), newFrameReader(c)
		if err := fw.json(frameOffer, o); err != nil {
			t.Fatal(err)
		}
		typ, b, err := fr.next(nil)
		c.Close()
		if err != nil || typ != frameError || !strings.Contains(string(b), "bad offer") || !strings.Contains(string(b), tc.want) {
			t.Errorf("offer %+v: answer type %d %q, %v; want a bad offer naming the %s", o, typ, b, err, tc.want)
		}
	}
	if b, err := os.ReadFile(victim); err != nil || string(b) != "precious" {
		t.Fatalf("the file a crafted ID pointed at: %d bytes, beginning %q, %v", len(b), b[:min(len(b), 16)], err)
	}
}

// TestReceiverBypassesPageCache: on a filesystem that offers direct I/O,
// the whole chunks a receiver writes do not go through the page cache;
// the short last chunk does.
func TestReceiverBypassesPageCache(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	size := int64(8*mib + 1000)
	makeRaw(t, raw, size, map[int64]int{0: int(size)})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	img, err := p.recvJ.Image("vm")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, _, ok := dioAlign(f); !ok {
		noDirectIO(t, "the page cache cannot be bypassed")
		t.SkipNow()
	}
	if in, pages := cached(t, f, 0, 8*mib); in != 0 {
		t.Errorf("%d of %d pages of the whole chunks are in the page cache", in, pages)
	}
	if in, pages := cached(t, f, 8*mib, 1000); in != pages {
		t.Errorf("the short last chunk: %d of %d pages in the page cache, want all (written through it)", in, pages)
	}
}

// TestReceiverStopsCleanly: when a stopping gateway's receiver has
// stopped, nothing of it uses the journal any more, which the gateway
// then closes. A migration under way ends and waits for a resume; one
// already committed is stored and its sender told so; a connection that
// has not said what it is does not hold the stop up for its 30 s.
func TestReceiverStopsCleanly(t *testing.T) {
	committing := make(chan struct{})
	release := make(chan struct{})
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		commit := sync.OnceFunc(func() { close(committing); <-release })
		c.afterRename = func() error { commit(); return nil }
	})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseOnce)                      // before the receiver's stop, which waits for it
	slow := p.slowSend(t, 250*time.Millisecond) // 5 s: it cannot reach its commit first
	raw := filepath.Join(p.dir, "stored.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 4096, 3 * mib: 64 << 10})
	cfg := p.config(raw, "pii-eu")
	storedRes := make(chan error, 1)
	go func() {
		_, err := Send(context.Background(), cfg)
		storedRes <- err
	}()
	select {
	case <-committing:
	case <-time.After(20 * time.Second):
		t.Fatal("the second migration did not reach its commit")
	}
	silent := p.dial(t, nil)
	if err := silent.Handshake(); err != nil {
		t.Fatal(err)
	}

	stopped := make(chan error, 1)
	go func() { stopped <- p.stopRecv() }()
	waitFor(t, "the receiver to begin stopping", func() bool {
		p.recv.mu.Lock()
		defer p.recv.mu.Unlock()
		return p.recv.stopping
	})
	releaseOnce()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the receiver took more than 15 s to stop")
	}
	p.recvJ.Close() // as the gateway does next

	if err := <-storedRes; err != nil {
		t.Fatalf("the migration committed as the receiver stopped: %v", err)
	}
	img, err := p.recvJ.Image("stored")
	if err == nil { // closed: read it from a fresh handle below
		t.Fatalf("journal still open after Close: %+v", img)
	}
	err = <-slow
	if err == nil || strings.Contains(err.Error(), "database not open") {
		t.Fatalf("the migration under way as the receiver stopped: %v; want it interrupted by the receiver going away", err)
	}
	if log := p.recvLog.String(); strings.Contains(log, "database not open") {
		t.Fatalf("the receiver used its journal after it stopped:\n%s", log)
	}
	if _, err := silent.Read(make([]byte, 1)); err == nil {
		t.Fatal("the connection that never said what it is is still open")
	}
	j, err := OpenJournal(filepath.Join(p.dir, "recv.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if img, err := j.Image("stored"); err != nil || img.Migration == "" {
		t.Fatalf("the committed image's record: %+v, %v", img, err)
	}
	recvs, err := j.Receives()
	if err != nil || len(recvs) != 1 || recvs[0].Name != "vm" {
		t.Fatalf("receives kept for a resume: %+v, %v; want the one under way", recvs, err)
	}
}

// endings is an Observer that records only ends.
type endings struct {
	nopObserver
	mu   sync.Mutex
	seen []string // role/outcome
}

func (e *endings) Ended(role, outcome string, _ time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seen = append(e.seen, role+"/"+outcome)
}

// TestSendFailureBeforeStartEnds: a send that fails before it has a
// journal record — an image that is not there, a name that cannot be
// stored — still ends as failed for the metrics, once; one that runs ends
// once too, as what it ended as.
func TestSendFailureBeforeStartEnds(t *testing.T) {
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "disk.raw")
	makeRaw(t, raw, 4<<20, map[int64]int{0: 1 << 20})
	for name, tweak := range map[string]func(*SendConfig){
		"missing image": func(c *SendConfig) { c.Image = filepath.Join(p.dir, "nothing.raw") },
		"bad name":      func(c *SendConfig) { c.Name = ".hidden" },
		"denied":        func(c *SendConfig) { c.Class = "swiss-banking-secret" },
		"done":          nil,
	} {
		var e endings
		cfg := p.config(raw, "pii-eu")
		cfg.Observer = &e
		if tweak != nil {
			tweak(&cfg)
		}
		rec, err := Send(context.Background(), cfg)
		want := "send/" + StateFailed
		switch name {
		case "done":
			want = "send/" + StateDone
		case "denied": // ended by the run, not again before it
			want = "send/" + StateDenied
		}
		if (err != nil) == (tweak == nil) || len(e.seen) != 1 || e.seen[0] != want {
			t.Errorf("%s: err %v, ends %v; want one %s", name, err, e.seen, want)
		}
		if name != "done" {
			continue
		}
		// Resuming it is nothing to do, not a failure.
		done := e.seen
		e.seen = nil
		cfg.ID = rec.ID
		if _, err := Send(context.Background(), cfg); !errors.Is(err, ErrAlreadyDone) || len(e.seen) != 0 {
			t.Errorf("resuming a done migration: %v, ends %v; want ErrAlreadyDone and none", err, e.seen)
		}
		e.seen = done
	}
}

// TestStoredImageKeepsItsSite: a stored image is replaced only from the
// site that stored it (its gateways: a failover may send it again), and
// only that site's offers are given its chunk hashes. Any site the policy
// lets store the class here could otherwise overwrite the others' images
// of it. Nor may another site's offer take over a migration's ID: it
// would empty the chunks the migration's own sender resumes with.
func TestStoredImageKeepsItsSite(t *testing.T) {
	p := newPair(t, "CH")
	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 4*mib, map[int64]int{0: 4096, 2 * mib: 4096})
	if _, err := Send(context.Background(), p.config(raw, "pii-eu")); err != nil {
		t.Fatal(err)
	}
	before, _ := p.recvJ.Image("vm")
	issue := func(node, site string, host byte) *certs.NodeIdentity {
		id, err := p.ca.IssueIdentity(certs.Attributes{Node: node, Site: site, Region: "r", Provider: "onprem", Jurisdiction: "CH",
			OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, host})}, time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	as := func(id *certs.NodeIdentity) SendConfig {
		j, err := OpenJournal(filepath.Join(p.dir, id.Attributes().Node+".db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { j.Close() })
		cfg := p.config(raw, "pii-eu")
		cfg.From, cfg.Identity, cfg.Journal = id.Attributes(), func() *certs.NodeIdentity { return id }, j
		return cfg
	}
	other := as(issue("gw-gva", "onprem-gva", 3))
	if _, err := Send(context.Background(), other); err == nil || !strings.Contains(err.Error(), "stored here from site onprem-zrh") {
		t.Fatalf("the image sent again from another site: %v; want it refused", err)
	}
	if after, _ := p.recvJ.Image("vm"); after.Migration != before.Migration || after.From != "gw-zrh" {
		t.Errorf("stored image %+v after the refusal; want it unchanged", after)
	}
	// Another site offering under the ID of a migration under way (its
	// record and a chunk held, as an interrupted one leaves them).
	held := RecvRecord{ID: "underway000001", Name: "vm2", From: "gw-zrh", FromSite: "onprem-zrh", Class: "pii-eu", Format: FormatRaw,
		Size: 4 * mib, ChunkSize: mib, Temp: filepath.Join(p.store, ".incoming", "underway000001.raw"), State: StateRunning, Started: time.Now()}
	if err := p.recvJ.put(bucketRecv, held.ID, &held); err != nil {
		t.Fatal(err)
	}
	if err := p.recvJ.addChunks("recv", held.ID, map[int64]Hash{0: {1}}); err != nil {
		t.Fatal(err)
	}
	c := p.dial(t, other.Identity())
	cw, cr := newFrameWriter(c), newFrameReader(c)
	if err := cw.json(frameOffer, Offer{ID: held.ID, Name: "vm2", Class: "pii-eu", Format: FormatRaw, Size: 4 * mib, ChunkSize: mib, Streams: 1}); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := cr.next(nil); err != nil || typ != frameError || !strings.Contains(string(b), "offered by another site") {
		t.Fatalf("another site's offer under a migration's ID: type %d %q, %v; want it refused", typ, b, err)
	}
	if chunks, err := p.recvJ.chunks("recv", held.ID); err != nil || len(chunks) != 1 {
		t.Errorf("the migration's chunks after another site's offer of its ID: %d, %v; want the one held", len(chunks), err)
	}
	// A gateway of the site that stored it replaces it.
	sibling := as(issue("gw-zrh2", "onprem-zrh", 4))
	if _, err := Send(context.Background(), sibling); err != nil {
		t.Fatalf("the image sent again from its own site's other gateway: %v", err)
	}
	if after, _ := p.recvJ.Image("vm"); after.From != "gw-zrh2" {
		t.Errorf("stored image after its site's other gateway sent it: from %s", after.From)
	}
}

// lowerManifestBound makes n chunks the most one migration carries until
// the test ends, so that an image of a few MiB stands for one of
// hundreds of GiB.
func lowerManifestBound(t *testing.T, n int64) {
	old := maxManifestChunks
	maxManifestChunks = n
	t.Cleanup(func() { maxManifestChunks = old })
}

// TestLargeImageTakesLargerChunks: an image with more data than the
// manifest bound holds in 1 MiB chunks moves in larger ones — end to end,
// resumed and re-synced in them — where it used to move all its data and
// then fail at the commit; one with more than the largest chunks hold is
// refused before anything moves.
func TestLargeImageTakesLargerChunks(t *testing.T) {
	lowerManifestBound(t, 4)
	p := newPair(t, "DE")
	raw := filepath.Join(p.dir, "vm.raw")
	blocks := map[int64]int{}
	for i := range int64(8) {
		blocks[i*mib] = mib
	}
	makeRaw(t, raw, 16*mib, blocks) // 8 chunks of 1 MiB hold data, 4 of 2 MiB

	rec, _ := p.interrupted(raw, 1)
	if rec.ChunkSize != 2*mib {
		t.Fatalf("chunk size %d for 8 MiB of data with at most 4 chunks; want 2 MiB", rec.ChunkSize)
	}
	cfg := p.config(raw, "pii-eu")
	cfg.ID = rec.ID
	rec, err := Send(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if st := rec.Stats; rec.ChunkSize != 2*mib || st.ChunksResumed+st.ChunksHad == 0 || st.ChunksResumed+st.ChunksHad+st.ChunksSent != 4 {
		t.Fatalf("resumed in chunks of %d: %+v; want the 2 MiB chunks of the first attempt taken up", rec.ChunkSize, st)
	}
	p.stored(raw)
	img, err := p.recvJ.Image("vm")
	if err != nil || img.Manifest.ChunkSize != 2*mib || len(img.Manifest.Chunks) != 4 {
		t.Fatalf("stored image: %+v, %v", img.Manifest, err)
	}

	// A change in one place re-sends one chunk and reuses the others.
	writeZeros(t, raw, 5*mib+7, 100)
	rec, err = Send(context.Background(), p.config(raw, "pii-eu"))
	if err != nil {
		t.Fatal(err)
	}
	if st := rec.Stats; st.ChunksSent != 1 || st.ChunksSame != 3 {
		t.Fatalf("re-sync after a change in one chunk: %+v", st)
	}
	p.stored(raw)

	// Chunks chosen by hand that the bound cannot carry are refused,
	// and so is an image no chunk size can carry; neither reaches the
	// destination.
	cfg = p.config(raw, "pii-eu")
	cfg.ChunkSize, cfg.Name = mib, "by-hand"
	if _, err := Send(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "use larger chunks") {
		t.Fatalf("1 MiB chunks chosen by hand for 8 of them: %v", err)
	}
	lowerManifestBound(t, 0)
	cfg = p.config(raw, "pii-eu")
	cfg.Name = "too-large"
	if _, err := Send(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "cannot migrate an image this large") {
		t.Fatalf("an image past the bound at every chunk size: %v", err)
	}
	for _, name := range []string{"by-hand", "too-large"} {
		if _, err := p.recvJ.Image(name); err == nil {
			t.Errorf("image %s reached the destination", name)
		}
	}
	if recs := p.recvRecords(t); len(recs) != 2 {
		t.Errorf("%d audit records at the destination; want one for each version stored", len(recs))
	}
}

// TestActiveDuringCommit: while one migration's commit stores its image,
// Active answers and another migration runs to its end: neither waits for
// the commit (Active runs on every metrics scrape).
func TestActiveDuringCommit(t *testing.T) {
	storing := make(chan struct{})
	release := make(chan struct{})
	var held atomic.Bool
	p := newPairWith(t, "DE", func(c *ReceiverConfig) {
		c.afterRename = func() error {
			if held.CompareAndSwap(false, true) { // the first commit only
				close(storing)
				<-release
			}
			return nil
		}
	})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseOnce)
	vm, other := filepath.Join(p.dir, "vm.raw"), filepath.Join(p.dir, "other.raw")
	makeRaw(t, vm, 4*mib, map[int64]int{0: 2 * mib})
	makeRaw(t, other, 4*mib, map[int64]int{mib: 2 * mib})
	first := make(chan error, 1)
	go func() {
		_, err := Send(context.Background(), p.config(vm, "pii-eu"))
		first <- err
	}()
	select {
	case <-storing:
	case err := <-first:
		t.Fatalf("the first migration ended before its commit stored the image: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("the first migration's commit never reached the store")
	}

	active := make(chan []Incoming, 1)
	go func() { active <- p.recv.Active() }()
	select {
	case a := <-active:
		if len(a) != 1 || a[0].Name != "vm" || a[0].Durable != 2 || a[0].Received == 0 {
			t.Errorf("Active during the commit: %+v, want vm with its 2 chunks", a)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Active waited for a commit in progress")
	}

	second := make(chan error, 1)
	go func() {
		_, err := Send(context.Background(), p.config(other, "pii-eu"))
		second <- err
	}()
	select {
	case err := <-second:
		if err != nil {
			t.Fatalf("another migration during the commit: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("another migration waited for a commit in progress")
	}
	select {
	case err := <-first:
		t.Fatalf("the first migration ended with its commit held: %v", err)
	default:
	}
	releaseOnce()
	if err := <-first; err != nil {
		t.Fatalf("the first migration: %v", err)
	}
}
