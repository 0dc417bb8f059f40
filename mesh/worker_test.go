package mesh

import (
	"crypto/sha256"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// TestWorkerSurvivesMalformedMessages: whatever arrives by gossip — any
// type byte, no fields, empty fields — the gateway's worker refuses it
// and goes on. A panic there would end the gateway, for anyone holding
// the gossip key to cause (a byte 0xf0, once an internal job's type, did).
func TestWorkerSurvivesMalformedMessages(t *testing.T) {
	dir := t.TempDir()
	port := 24000 + os.Getpid()%6000
	ca, err := certs.InitCA(filepath.Join(dir, "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	lg := startLiveGateway(t, ca, dir, 0, "zrh-dc", nil, &port, &syncbuf.Buffer{})
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
