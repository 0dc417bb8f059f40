package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/scrape"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// unreadableDevice is a device that cannot be read once broken.
type unreadableDevice struct {
	*RecordingDevice
	broken atomic.Bool
}

func (d *unreadableDevice) Device() (*wgtypes.Device, error) {
	if d.broken.Load() {
		return nil, errors.New("the device cannot be read")
	}
	return d.RecordingDevice.Device()
}

// TestMigrationMetricsWithoutTheDevice: the migration gauges are exported
// when the WireGuard device cannot be read, as the identity's are: the
// stalled-migration alert reads them then too.
func TestMigrationMetricsWithoutTheDevice(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	gdir := filepath.Join(dir, "op0")
	attrs := certs.Attributes{Node: "op0", Site: "zrh-dc", Region: "r-zrh-dc", Provider: "onprem", Jurisdiction: "CH", OverlayIP: netip.AddrFrom4([4]byte{100, 64, 7, 1})}
	s := liveSettings(t, gdir)
	s.Node = provisionGateway(t, ca, tb, attrs, time.Hour, s.Identity.Dir)
	dev := &unreadableDevice{RecordingDevice: NewRecordingDevice("op0")}
	g := runGateway(t, s, dev, slog.New(slog.DiscardHandler), nil)
	waitUntil(t, 10*time.Second, "the operator endpoint", func() bool { return g.OperatorAddress() != nil })
	tok := (&liveGateway{g: g}).token(t)
	dev.broken.Store(true)
	fam, err := scrape.Get(context.Background(), &http.Client{Timeout: 10 * time.Second}, fmt.Sprintf("http://%s/metrics", g.OperatorAddress()), tok)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := fam.Value("skybridge_identity_expiry_timestamp_seconds", nil); !ok {
		t.Fatal("premise: the identity's expiry is exported without the device")
	}
	for _, name := range []string{"skybridge_migrations_running", "skybridge_migrations_awaiting_answer"} {
		if _, ok := fam[name]; !ok {
			t.Errorf("%s not exported while the device cannot be read", name)
		}
	}
}
