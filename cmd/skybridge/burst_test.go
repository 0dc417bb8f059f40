package main

import (
	"bytes"
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
