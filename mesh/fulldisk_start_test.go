package mesh

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/smalldisk"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// TestStartWithInterruptedSendOnAFullDisk: a gateway stopped during a
// send starts again on a full disk, where its journal cannot record the
// send as ended: the site's tunnels must not stay down for it. The send
// reads as interrupted (not running, which nothing would end), and the
// log says why its record waits.
func TestStartWithInterruptedSendOnAFullDisk(t *testing.T) {
	state := t.TempDir()
	smalldisk.Mount(t, state, "4m")

	f := newFixture(t)
	dev := &gatedDevice{RecordingDevice: NewRecordingDevice("mig"), gate: make(chan struct{}), dialing: make(chan struct{}, 1)}
	g, ms := migGateway(t, f, dev)
	j, err := migrate.OpenJournal(filepath.Join(state, "migrate.db"))
	if err != nil {
		t.Fatal(err)
	}
	g.mig.journal = j
	fra := f.identity("gw-fra", "fra", 2, f.now.Add(-2*time.Hour))
	ms.addCert(fra.Certificate().Raw)
	ms.update("gw-fra", gossipAddr, f.advert(fra, 1))
	// A long path makes a record larger than the free pages the journal
	// holds, so that ending it needs the disk's room (as a journal of
	// many migrations does).
	dir := smalldisk.DeepDir(t, t.TempDir())
	img := filepath.Join(dir, "vm07.raw")
	if err := os.WriteFile(img, []byte(strings.Repeat("x", 1<<20)), 0o600); err != nil {
		t.Fatal(err)
	}
	run, id, err := g.StartMigration(MigrationRequest{Image: img, To: "gw-fra", Class: "c"})
	if err != nil {
		t.Fatal(err)
	}
	<-dev.dialing // its record written, running
	j.Close()     // the gateway is killed: the send's end is never written
	close(dev.gate)
	waitEnd(t, run)

	smalldisk.Fill(t, state)

	var logs bytes.Buffer
	g2, _ := migGateway(t, f, dev)
	g2.mig, g2.s.StateDir, g2.log = nil, state, slog.New(slog.NewTextHandler(&logs, nil))
	if err := g2.openMigrations(); err != nil {
		t.Fatalf("a start on a full disk: %v", err)
	}
	t.Cleanup(func() { g2.mig.journal.Close() })
	if !strings.Contains(logs.String(), "cannot be recorded as ended") {
		t.Fatalf("the full disk's delay not logged:\n%s", logs.String())
	}
	rec, p, err := g2.mig.lookup(id)
	if err != nil || p != nil || rec.State != migrate.StateFailed || rec.Error != migrate.Interrupted {
		t.Fatalf("lookup: %v (progress %v): %s, %q; want failed as interrupted", err, p, rec.State, rec.Error)
	}
	sends, err := g2.mig.sends()
	if err != nil || len(sends) != 1 || sends[0].State != migrate.StateFailed {
		t.Fatalf("sends: %d, %v; want one, failed as interrupted (%+v)", len(sends), err, sends[0].State)
	}
}
