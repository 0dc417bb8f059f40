package mesh

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// enrolledOnce starts an enrolling gateway, opens burst-ams and enrols
// one gateway into it, and returns the enroller, the token and request
// the gateway sent, and the answer it got.
func enrolledOnce(t *testing.T) (hq *liveGateway, tok *certs.JoinToken, body []byte, res *enrollResponse) {
	t.Helper()
	dir := t.TempDir()
	hq = startEnroller(t, meshCA(t, dir), dir, &syncbuf.Buffer{})
	grant, err := hq.g.BurstUp(context.Background(), BurstRequest{BurstSite: amsSite, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	tok, body = burstAsk(t, grant.Tokens[0], filepath.Join(dir, "burst", "identity"))
	if res, err = postEnroll(context.Background(), tok, body, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	return hq, tok, body, res
}

// TestBurstEndForgetsIssuedCertificates: the record keeps each token's
// certificate and key only while its burst runs (to answer a gateway that
// lost its answer). An ended burst is listed for a week, and the record is
// rewritten at every enrollment: its certificates were most of it. Its
// tokens asked again still hear that it ended, and its serials are still
// there to revoke.
func TestBurstEndForgetsIssuedCertificates(t *testing.T) {
	hq, tok, body, res := enrolledOnce(t)
	log := slog.New(slog.DiscardHandler)
	issued, err := certs.ParseCertificatesPEM(res.Certificate)
	if err != nil || len(issued) != 1 {
		t.Fatal(issued, err)
	}
	path := hq.g.state.path(fileBursts)
	keySum := sha256.Sum256(issued[0].RawSubjectPublicKeyInfo)
	holds := func() (cert, key bool) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return bytes.Contains(b, []byte(base64.StdEncoding.EncodeToString(issued[0].Raw))), bytes.Contains(b, []byte(hex.EncodeToString(keySum[:])))
	}
	if cert, key := holds(); !cert || !key {
		t.Fatalf("while the burst runs, the record holds its certificate %v, its key %v: want both, to answer a gateway that asks again", cert, key)
	}

	down, err := hq.g.BurstDown(context.Background(), amsSite.Site, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(down.Revoked) != 1 || down.Revoked[0] != certs.FormatSerial(issued[0].SerialNumber) {
		t.Fatalf("burst down revoked %v; want the one certificate issued", down.Revoked)
	}
	if cert, key := holds(); cert || key {
		t.Errorf("after the burst's end, bursts.json holds its token's certificate %v, key %v", cert, key)
	}
	if _, err := postEnroll(context.Background(), tok, body, log); err == nil || !strings.Contains(err.Error(), "ended") {
		t.Fatalf("the ended burst's token asked again with its key: %v; want the burst ended", err)
	}
	// Finishing the end again (a stop before its revocation) still has
	// the serial to revoke.
	e := hq.g.enroll
	e.mu.Lock()
	serials := e.book.Bursts[0].end("ended by burst down", time.Now())
	e.mu.Unlock()
	if len(serials) != 1 || serials[0] != down.Revoked[0] {
		t.Fatalf("an ended burst's serials to revoke: %v, want %v", serials, down.Revoked)
	}
}

// TestBurstEndedEarlierLoadsWithoutCertificates: a burst ended by a
// release that kept its certificates is read without them, so the next
// save leaves them out.
func TestBurstEndedEarlierLoadsWithoutCertificates(t *testing.T) {
	st := stateDir(t.TempDir())
	now := time.Now().UTC()
	open, ended := &burstRecord{BurstSite: amsSite, BurstLife: BurstLife{Expires: now.Add(time.Hour)}}, &burstRecord{BurstSite: BurstSite{Site: "burst-par"}, BurstLife: BurstLife{Ended: &now}}
	for _, r := range []*burstRecord{open, ended} {
		r.Tokens = []burstToken{{ID: "0b91490b20d84bf0", Hash: strings.Repeat("ab", 32), Used: &now, Serial: "0a", Key: strings.Repeat("cd", 32), Cert: []byte("der")}}
	}
	if err := st.saveBursts(&burstBook{Bursts: []*burstRecord{open, ended}}); err != nil {
		t.Fatal(err)
	}
	bk, err := st.loadBursts()
	if err != nil {
		t.Fatal(err)
	}
	if o := bk.Bursts[0].Tokens[0]; o.Cert == nil || o.Key == "" {
		t.Error("an open burst's token lost its certificate or key")
	}
	if e := bk.Bursts[1].Tokens[0]; e.Cert != nil || e.Key != "" || e.Serial != "0a" || e.Hash == "" {
		t.Errorf("an ended burst's token read as %+v; want its serial and hash, no certificate nor key", e)
	}
}

// TestBurstEndNotRecordedKeepsCertificates: a burst whose end could not
// be recorded stays open, and keeps what it forgets at its end: a gateway
// that lost its answer meanwhile is sent its own certificate again, not
// issued another.
func TestBurstEndNotRecordedKeepsCertificates(t *testing.T) {
	hq, tok, body, first := enrolledOnce(t)
	log := slog.New(slog.DiscardHandler)
	// A directory where the record goes: it cannot be replaced.
	path := hq.g.state.path(fileBursts)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(path, "in-the-way"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := hq.g.BurstDown(context.Background(), amsSite.Site, ""); err == nil || !strings.Contains(err.Error(), "record the end") {
		t.Fatalf("burst down whose end cannot be recorded: %v", err)
	}
	again, err := postEnroll(context.Background(), tok, body, log)
	if err != nil {
		t.Fatalf("asked again after a burst down that failed: %v", err)
	}
	if !bytes.Equal(again.Certificate, first.Certificate) {
		t.Fatal("asked again after a burst down that failed, the gateway was issued another certificate")
	}
}
