package mesh

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// gatedDevice dials nothing: a dial waits until gate is closed or its
// context ends, then fails, as a destination that does not answer.
type gatedDevice struct {
	*RecordingDevice
	gate    chan struct{}
	dialing chan struct{}
}

func (d *gatedDevice) Dial(ctx context.Context, _ string) (net.Conn, error) {
	select {
	case d.dialing <- struct{}{}:
	default:
	}
	select {
	case <-d.gate:
	case <-ctx.Done():
	}
	return nil, errNoOverlay
}

// migGateway is a gateway with a journal and one peer, gw-fra, whose
// identity is dest; the policy lets class "c" go anywhere.
func migGateway(t *testing.T, f *fixture, dev Device) (*Gateway, *membership) {
	t.Helper()
	j, err := migrate.OpenJournal(filepath.Join(t.TempDir(), "migrate.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	ms := newMembership("gw-zrh", f.trust(), func() time.Time { return f.now }, func() {})
	g := &Gateway{members: ms, dev: dev, log: slog.New(slog.DiscardHandler), now: func() time.Time { return f.now },
		s: &Settings{Topology: TopologyFullMesh}, mig: &migrations{journal: j, recv: &migrate.Receiver{}, running: map[string]*runningMigration{}}}
	g.metrics = newMetrics(g)
	g.id.Store(f.identity("gw-zrh", "zrh", 1, f.now.Add(-time.Hour)))
	tb := f.trust()
	g.trust.Store(tb)
	g.policy.Store(&adoptedPolicy{p: mustPolicy(t, `policy {
  name    = "t"
  version = 1
}
class "c" {
  allow "store" {
    site = ["*"]
  }
  allow "transit" {
    site = ["*"]
  }
}
`)})
	return g, ms
}

func waitEnd(t *testing.T, run *runningMigration) {
	t.Helper()
	select {
	case <-run.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the migration never ended")
	}
}

// TestResumeRecordsTheDestinationAndPaceItRunsWith: a destination gateway gets a
// re-issued certificate placing it at another site, and the interrupted
// migration is resumed to "decide again" (README). The resume is judged,
// dialled and audited at the new site; its journal record — what
// migrate list/status, the dashboard, plan's throughput and the audit
// record of an attempt a stop cut short read — must say the new site too.
// Likewise a resume given another pace: it must be what the record keeps.
func TestResumeRecordsTheDestinationAndPaceItRunsWith(t *testing.T) {
	f := newFixture(t)
	dev := &gatedDevice{RecordingDevice: NewRecordingDevice("mig"), gate: make(chan struct{}), dialing: make(chan struct{}, 1)}
	close(dev.gate) // first attempt: fails at once
	g, ms := migGateway(t, f, dev)
	fra := f.identity("gw-fra", "fra", 2, f.now.Add(-2*time.Hour))
	ms.addCert(fra.Certificate().Raw)
	ms.update("gw-fra", gossipAddr, f.advert(fra, 1))

	img := filepath.Join(t.TempDir(), "vm07.raw")
	if err := os.WriteFile(img, []byte(strings.Repeat("x", 1<<20)), 0o600); err != nil {
		t.Fatal(err)
	}
	run, id, err := g.StartMigration(MigrationRequest{Image: img, To: "gw-fra", Class: "c", Streams: 2, BWLimit: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	waitEnd(t, run)
	rec, _ := g.mig.journal.Send(id)
	if rec.ToSite != "fra" || rec.State != migrate.StateFailed {
		t.Fatalf("first attempt: %+v", rec)
	}

	// gw-fra is re-issued a certificate for site muc.
	muc := f.identity("gw-fra", "muc", 2, f.now.Add(-time.Hour))
	ms.addCert(muc.Certificate().Raw)
	ms.update("gw-fra", gossipAddr, f.advert(muc, 2))
	if gws := ms.gateways(); len(gws) != 1 || gws[0].Attributes.Site != "muc" {
		t.Fatalf("membership: %+v", gws)
	}

	// Resume, with a new pace (apply --bwlimit none --streams 8); the
	// destination does not answer until the gateway is stopped.
	dev.gate = make(chan struct{})
	select {
	case <-dev.dialing: // the first attempt's
	default:
	}
	_, _, err = g.StartMigration(MigrationRequest{ID: id, Streams: 8, BWLimit: -1})
	if err != nil {
		t.Fatal(err)
	}
	<-dev.dialing // past the policy check and startRecord
	rec, _ = g.mig.journal.Send(id)
	if rec.ToSite != "muc" {
		t.Errorf("resume judged and sent to site muc, but its journal record says to_site %q", rec.ToSite)
	}
	if rec.Streams != 8 || rec.BWLimit != -1 {
		t.Errorf("resume runs with 8 streams and no cap, its record says streams %d, bwlimit %d", rec.Streams, rec.BWLimit)
	}

	// The gateway is killed now; at its next start the attempt's audit
	// record is written from the journal.
	ended, err := g.mig.journal.EndInterrupted(f.now)
	if err != nil || len(ended) != 1 {
		t.Fatalf("EndInterrupted: %v, %v", ended, err)
	}
	log := audit.Open(filepath.Join(t.TempDir(), "audit.log"))
	if err := migrate.AuditInterrupted(g.mig.journal, log, g.id.Load(), &ended[0], f.now); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(log.Path())
	var r struct {
		Fields map[string]any `json:"fields"`
	}
	if err := json.Unmarshal([]byte(strings.SplitN(string(b), "\n", 2)[0]), &r); err != nil {
		t.Fatal(err)
	}
	if r.Fields["destination_site"] != "muc" {
		t.Errorf("audit record of the resumed attempt (to site muc) says destination_site %v", r.Fields["destination_site"])
	}
	if err := g.CancelMigration(id); err != nil {
		t.Fatal(err)
	}
	// And the next plain resume (migrate resume ID) keeps the pace the
	// operator set last, not the first attempt's.
	next, err := g.mig.resolve(MigrationRequest{ID: id})
	if err != nil {
		t.Fatal(err)
	}
	if next.BWLimit != -1 || next.Streams != 8 {
		t.Errorf("next resume: streams %d, bwlimit %d; the last resume lifted the cap and used 8 streams", next.Streams, next.BWLimit)
	}
}
