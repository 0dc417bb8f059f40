package mesh

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/migrate"
)

// TestStopSendsTheFinalRecord: a stop cancels the migrations sent and
// waits for them before the control socket closes, so that their clients
// get the final record; closing the socket ends their requests too, and
// the stream chose between the two at random: 4 clients in 20 got "the
// migration's progress stream ended early".
func TestStopSendsTheFinalRecord(t *testing.T) {
	f := newFixture(t)
	img := filepath.Join(t.TempDir(), "vm07.raw")
	if err := os.WriteFile(img, []byte(strings.Repeat("x", 1<<20)), 0o600); err != nil {
		t.Fatal(err)
	}
	const rounds = 20
	lost := 0
	for i := range rounds {
		dev := &gatedDevice{RecordingDevice: NewRecordingDevice("mig"), gate: make(chan struct{}), dialing: make(chan struct{}, 1)}
		g, ms := migGateway(t, f, dev)
		fra := f.identity("gw-fra", "fra", 2, f.now.Add(-2*time.Hour))
		ms.addCert(fra.Certificate().Raw)
		ms.update("gw-fra", gossipAddr, f.advert(fra, 1))
		sock := filepath.Join(t.TempDir(), "control.sock")
		g.s.ControlSocket = sock
		ctl, err := g.serveControl()
		if err != nil {
			t.Fatal(err)
		}
		type result struct {
			ev  *MigrationEvent
			err error
		}
		res := make(chan result, 1)
		go func() {
			ev, err := NewClient(sock).Migrate(context.Background(), MigrationRequest{Image: img, To: "gw-fra", Class: "c"}, func(MigrationEvent) {})
			res <- result{ev, err}
		}()
		select {
		case <-dev.dialing:
		case <-time.After(20 * time.Second):
			t.Fatal("the migration never dialled")
		}
		// Run's stop, in its order.
		g.cancelSends()
		ctl.Close()
		r := <-res
		if r.err != nil {
			lost++
			t.Logf("round %d: client got no final record: %v", i, r.err)
		} else if r.ev.Record == nil || r.ev.Record.State != migrate.StateCancelled {
			lost++
			t.Logf("round %d: final event without the cancelled record: %+v", i, r.ev)
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d clients of a migration under way at the stop got no final record", lost, rounds)
	}
}
