package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/mesh"
)

// TestBurstDownOutput: burst down says a gateway leaves the mesh only
// when a revocation is on its way to make it; passes on the warnings of
// an end that left something to the operator; and of a burst that had
// ended already, says so.
func TestBurstDownOutput(t *testing.T) {
	ended := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	base := mesh.BurstInfo{BurstSite: mesh.BurstSite{Site: "burst-ams"},
		BurstLife: mesh.BurstLife{Expires: ended.Add(time.Hour), Ended: &ended, EndReason: "ended by burst down"},
		Gateways:  []mesh.BurstGateway{{Node: "burst-ams-gw1", OverlayIP: "100.127.255.254"}}}
	for _, tc := range []struct {
		name      string
		edit      func(*mesh.BurstInfo)
		want, not []string
	}{
		{"revoked", func(bi *mesh.BurstInfo) { bi.Revoked = []string{"01:02"} },
			[]string{"1 identities revoked", "burst-ams-gw1 (100.127.255.254) leaves the mesh as the revocation spreads"}, []string{"WARNING"}},
		{"nothing revoked", func(bi *mesh.BurstInfo) {},
			[]string{"0 identities revoked", "no certificate of its gateways was revoked (ended by burst down); any still valid ends with the burst, at 2026-11-27T11:00:00Z"},
			[]string{"leaves the mesh"}},
		{"warned", func(bi *mesh.BurstInfo) {
			bi.Revoked, bi.Warnings = []string{"01:02"}, []string{"Vault's CRL could not be rebuilt: run `vault read pki/crl/rotate` now"}
		}, []string{"leaves the mesh", "WARNING: Vault's CRL could not be rebuilt: run `vault read pki/crl/rotate` now"}, nil},
		{"already ended", func(bi *mesh.BurstInfo) { bi.AlreadyEnded = true },
			[]string{"burst site burst-ams had already ended at 2026-11-27T10:00:00Z (ended by burst down); nothing left to do"},
			[]string{"identities revoked", "leaves the mesh"}},
	} {
		bi := base
		tc.edit(&bi)
		var out bytes.Buffer
		printBurstDown(&out, &bi)
		for _, w := range tc.want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("%s: output lacks %q:\n%s", tc.name, w, out.String())
			}
		}
		for _, n := range tc.not {
			if strings.Contains(out.String(), n) {
				t.Errorf("%s: output says %q:\n%s", tc.name, n, out.String())
			}
		}
	}
}

// TestBurstEndedGatewayExitsZero: a burst gateway started after its burst
// ended says so and exits 0, so that its supervisor does not restart it,
// even when its standard output cannot be written (a full disk's log
// file): said on stdout, that made it exit 2, and be restarted for ever.
func TestBurstEndedGatewayExitsZero(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	id := filepath.Join(state, "identity")
	if err := os.MkdirAll(id, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(id, "burst.json"), []byte(`{"site":"burst-ams","node":"burst-ams-gw1","token_id":"t1","enrolled":"2026-01-01T00:00:00Z","expires":"2026-01-02T00:00:00Z","seeds":[],"ended":"2026-01-02T00:00:00Z","end_reason":"expired"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "gw.hcl")
	if err := os.WriteFile(cfg, []byte("state_dir = \""+state+"\"\ngossip { bind = \"127.0.0.1:17946\" }\nwireguard { interface = \"sbx\" }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var errb bytes.Buffer
	if code := run([]string{"skybridge", "gateway", "run", "--config", cfg}, fullWriter{}, &errb); code != 0 || !strings.Contains(errb.String(), "burst-ams") {
		t.Errorf("burst ended, standard output full: exit %d, %q; want 0, and the end said on stderr", code, strings.TrimSpace(errb.String()))
	}
}
