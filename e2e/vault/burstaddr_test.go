package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/freeport"
)

// addressClaims lists the overlay addresses claimed in Vault for burst
// gateways, sorted.
func (e *env) addressClaims(t *testing.T) []string {
	t.Helper()
	s, err := e.root.Logical().List(e.kv + "/metadata/skybridge/bursts/_addresses")
	must(t, err)
	var out []string
	if s != nil {
		for _, k := range s.Data["keys"].([]any) {
			out = append(out, k.(string))
		}
	}
	slices.Sort(out)
	return out
}

// topPicker gives, as a gateway does, the highest address of the mesh's
// range that used does not hold.
func topPicker(used map[netip.Addr]bool) func(netip.Addr) (netip.Addr, error) {
	return func(taken netip.Addr) (netip.Addr, error) {
		used[taken] = true
		for a := netip.MustParseAddr("100.96.255.254"); meshPrefix.Contains(a); a = a.Prev() {
			if !used[a] {
				used[a] = true
				return a, nil
			}
		}
		return netip.Addr{}, errors.New("no address free")
	}
}

// burstSpecFrom is a burst of site opened from gateway by with n gateways,
// proposed the addresses at the top of the mesh's range, as every
// gateway that sees no other burst proposes them.
func burstSpecFrom(site, by string, n int) certs.VaultBurstSpec {
	spec := certs.VaultBurstSpec{Site: site, Expires: time.Now().Add(time.Hour), TokenTTL: 10 * time.Minute, OpenedBy: by}
	used := map[netip.Addr]bool{}
	a := netip.MustParseAddr("100.96.255.254")
	for i := range n {
		node := attrs(fmt.Sprintf("%s-gw%d", site, i+1), site, a.String())
		node.Provider, node.Jurisdiction = "aws", "NL"
		spec.Nodes = append(spec.Nodes, node)
		used[a] = true
		a = a.Prev()
	}
	spec.Readdress = topPicker(used)
	return spec
}

func gatewayAddrs(vb *certs.VaultBurst) []string {
	var out []string
	for _, g := range vb.Gateways {
		out = append(out, g.OverlayIP.String())
	}
	slices.Sort(out)
	return out
}

// TestVaultBurstAddressesClaimed: bursts opened from two gateways at the
// same instant, each proposing the addresses at the top of the range
// (neither sees the other's burst), get distinct addresses, pinned in
// their gateways' roles; closing or aborting a burst releases its
// addresses' claims. A claim whose burst ended, or whose site's claim is
// gone, is taken over; one of an open burst, or an empty one, is passed
// over for another address, and without Readdress the opening fails.
func TestVaultBurstAddressesClaimed(t *testing.T) {
	e := startVault(t)
	ctx := context.Background()
	open := func(dir string) *certs.Vault {
		cfg, _ := e.approleConfig(t, dir)
		v, err := certs.OpenVault(ctx, cfg.Vault, meshPrefix, slog.New(slog.DiscardHandler))
		must(t, err)
		t.Cleanup(func() { v.Close() })
		return v
	}
	zrh, fra := open(t.TempDir()), open(t.TempDir())
	for round := range 3 {
		specs := []certs.VaultBurstSpec{burstSpecFrom("burst-p", "gw-zrh", 3), burstSpecFrom("burst-q", "gw-fra", 3)}
		vs := []*certs.Vault{zrh, fra}
		vbs := make([]*certs.VaultBurst, 2)
		errs := make([]error, 2)
		start, done := make(chan struct{}), make(chan struct{}, 2)
		for i := range specs {
			go func() {
				<-start
				vbs[i], errs[i] = vs[i].OpenBurst(ctx, e.root.Token(), specs[i])
				done <- struct{}{}
			}()
		}
		close(start)
		<-done
		<-done
		must(t, errors.Join(errs...))
		p, q := gatewayAddrs(vbs[0]), gatewayAddrs(vbs[1])
		all := append(slices.Clone(p), q...)
		slices.Sort(all)
		if len(slices.Compact(all)) != 6 {
			t.Fatalf("round %d: bursts opened from two gateways share addresses: burst-p %v, burst-q %v", round, p, q)
		}
		if got := e.addressClaims(t); !slices.Equal(got, all) {
			t.Fatalf("round %d: addresses claimed in Vault %v, the gateways hold %v", round, got, all)
		}
		// Each gateway's role pins the address it holds.
		for _, vb := range vbs {
			for _, g := range vb.Gateways {
				s, err := e.root.Logical().Read(e.pki + "/roles/" + g.Role)
				must(t, err)
				if got := fmt.Sprint(s.Data["allowed_uri_sans"]); !strings.Contains(got, "ip="+g.OverlayIP.String()) {
					t.Fatalf("round %d: gateway %s holds %s, its role pins %s", round, g.Node, g.OverlayIP, got)
				}
			}
		}
		if _, err := zrh.CloseBurst(ctx, e.root.Token(), "burst-p", vbs[0].Nodes(), vbs[0].Claim, "gw-zrh"); err != nil {
			t.Fatalf("round %d: close burst-p: %v", round, err)
		}
		if got := e.addressClaims(t); !slices.Equal(got, q) {
			t.Fatalf("round %d: after burst-p's close, addresses claimed %v; want burst-q's %v", round, got, q)
		}
		must(t, fra.AbortBurst(ctx, e.root.Token(), "burst-q", vbs[1].Claim, "gw-fra", vbs[1].Nodes()))
		if got := e.addressClaims(t); len(got) != 0 {
			t.Fatalf("round %d: after both bursts ended, addresses still claimed: %v", round, got)
		}
	}

	// Claims left behind: of a burst removed by hand (its site's claim
	// gone), of one that ended, of one open, and one deleted softly.
	kv := e.root.KVv2(e.kv)
	claim := func(ip, site, nonce string, expires time.Time) {
		_, err := kv.Put(ctx, "skybridge/bursts/_addresses/"+ip, map[string]any{"site": site, "nonce": nonce, "node": site + "-gw1",
			"gateway": "gw-elsewhere", "expires": expires.UTC().Format(time.RFC3339)})
		must(t, err)
	}
	siteClaim := func(site, nonce string) {
		_, err := kv.Put(ctx, "skybridge/bursts/"+site, map[string]any{"nonce": nonce, "gateway": "gw-elsewhere", "closing": false,
			"expires": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)})
		must(t, err)
	}
	claim("100.96.255.254", "burst-gone", "n-gone", time.Now().Add(time.Hour))
	siteClaim("burst-old", "n-old")
	claim("100.96.255.253", "burst-old", "n-old", time.Now().Add(-time.Hour))
	siteClaim("burst-live", "n-live")
	claim("100.96.255.252", "burst-live", "n-live", time.Now().Add(time.Hour))
	claim("100.96.255.251", "burst-soft", "n-soft", time.Now().Add(time.Hour))
	must(t, kv.Delete(ctx, "skybridge/bursts/_addresses/100.96.255.251"))

	vb, err := zrh.OpenBurst(ctx, e.root.Token(), burstSpecFrom("burst-p", "gw-zrh", 4))
	must(t, err)
	if got, want := gatewayAddrs(vb), []string{"100.96.255.249", "100.96.255.250", "100.96.255.253", "100.96.255.254"}; !slices.Equal(got, want) {
		t.Fatalf("opened over claims left behind, the gateways hold %v; want %v (the stale claims taken over, the others passed over)", got, want)
	}
	if s, err := kv.Get(ctx, "skybridge/bursts/_addresses/100.96.255.252"); err != nil || s.Data["nonce"] != "n-live" {
		t.Fatalf("the open burst's address claim after another opening: %v %v", s, err)
	}
	if s, err := kv.Get(ctx, "skybridge/bursts/_addresses/100.96.255.251"); err != nil || s.Data != nil {
		t.Fatalf("the address claim deleted softly after another opening: %v %v", s, err)
	}
	closed, err := zrh.CloseBurst(ctx, e.root.Token(), "burst-p", vb.Nodes(), vb.Claim, "gw-zrh")
	must(t, err)
	if len(closed.Warnings) != 0 {
		t.Fatalf("a close with every right warned: %v", closed.Warnings)
	}
	if got, want := e.addressClaims(t), []string{"100.96.255.251", "100.96.255.252"}; !slices.Equal(got, want) {
		t.Fatalf("after the close, addresses claimed %v; want only those of others %v", got, want)
	}

	// An opening that cannot choose other addresses fails over one an open
	// burst holds, and releases those it took.
	bare := burstSpecFrom("burst-p", "gw-zrh", 3)
	bare.Readdress = nil
	if _, err := zrh.OpenBurst(ctx, e.root.Token(), bare); err == nil || !strings.Contains(err.Error(), "is held by gateway burst-live-gw1 of burst site burst-live") {
		t.Fatalf("an opening that cannot choose other addresses, over one an open burst holds: %v", err)
	}
	if s, err := kv.Get(ctx, "skybridge/bursts/burst-p"); !errors.Is(err, api.ErrSecretNotFound) {
		t.Fatalf("the failed opening left its site's claim: %v", s)
	}
	if got, want := e.addressClaims(t), []string{"100.96.255.251", "100.96.255.252"}; !slices.Equal(got, want) {
		t.Fatalf("after the failed opening, addresses claimed %v; want only those of others %v", got, want)
	}
}

// TestVaultBurstDownCRLNotRebuilt: a burst down whose token may revoke
// but not rebuild Vault's CRL closes the burst, and says so to the
// operator rather than only in the gateway's log: with a PKI mount that
// rebuilds its CRL on a schedule, the revocations reach the mesh only
// then.
func TestVaultBurstDownCRLNotRebuilt(t *testing.T) {
	e := startVault(t)
	ctx := context.Background()
	cfg, _ := e.approleConfig(t, t.TempDir())
	v, err := certs.OpenVault(ctx, cfg.Vault, meshPrefix, slog.New(slog.DiscardHandler))
	must(t, err)
	defer v.Close()
	spec := burstSpecFrom("burst-c", "gw-zrh", 1)
	vb, err := v.OpenBurst(ctx, e.root.Token(), spec)
	must(t, err)
	node := spec.Nodes[0]
	_, err = e.root.Logical().Write(e.pki+"/issue/"+vb.Gateways[0].Role, map[string]any{
		"common_name": node.Node, "uri_sans": node.PinnedURI().String(), "ip_sans": node.OverlayIP.String()})
	must(t, err)
	// Everything burst down needs (README, Bursting into a cloud region)
	// but read on <pki>/crl/rotate.
	must(t, e.root.Sys().PutPolicy("closer-norotate", fmt.Sprintf(`
path "%[1]s/data/skybridge/bursts/*" { capabilities = ["create", "read", "update"] }
path "%[1]s/metadata/skybridge/bursts/*" { capabilities = ["delete"] }
path "%[1]s/metadata/skybridge/nodes/*" { capabilities = ["delete"] }
path "auth/%[2]s/role/*" { capabilities = ["read", "delete"] }
path "sys/policies/acl/*" { capabilities = ["delete"] }
path "%[3]s/roles/*" { capabilities = ["read", "delete"] }
path "%[3]s/certs" { capabilities = ["list"] }
path "%[3]s/cert/*" { capabilities = ["read"] }
path "%[3]s/revoke" { capabilities = ["update"] }
`, e.kv, e.approleMount, e.pki)))
	closer, err := e.root.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"closer-norotate"}, TTL: "10m"})
	must(t, err)
	closed, err := v.CloseBurst(ctx, closer.Auth.ClientToken, "burst-c", vb.Nodes(), vb.Claim, "gw-zrh")
	if err != nil {
		t.Fatalf("burst down without the right to rebuild the CRL: %v", err)
	}
	if len(closed.Revoked) != 1 {
		t.Fatalf("burst down revoked %v, want the gateway's certificate", closed.Revoked)
	}
	if len(closed.Warnings) != 1 || !strings.Contains(closed.Warnings[0], "vault read "+e.pki+"/crl/rotate") {
		t.Fatalf("burst down that could not rebuild the CRL warned %q; want the command that does", closed.Warnings)
	}
}

// TestVaultBurstsFromTwoGateways: `burst up` on two Vault-backed gateways
// of the mesh, one after the other, before any burst gateway joined:
// neither sees the other's burst, yet their gateways get distinct
// overlay addresses. burst down releases them, and a second burst down
// of an ended burst succeeds, saying it had ended.
func TestVaultBurstsFromTwoGateways(t *testing.T) {
	e := startVault(t)
	bin := buildSkybridge(t)
	dir := t.TempDir()
	root := []string{"VAULT_TOKEN=" + e.root.Token()}
	ports, err := freeport.Loopback(4)
	must(t, err)
	var socks []string
	for i, gw := range []struct{ node, site, overlay, routes string }{
		{"gw-zrh", "onprem-zrh", "100.96.0.1", `["10.1.0.0/16"]`},
		{"gw-fra", "onprem-fra", "100.96.0.2", `["10.2.0.0/16"]`},
	} {
		gdir := filepath.Join(dir, gw.node)
		must(t, os.MkdirAll(gdir, 0o700))
		roleFile, secretFile := e.appRole(t, gdir, false)
		cfg := e.gatewayHCL(staticGateway{
			stateDir: gdir, node: gw.node, site: gw.site, region: "dc1", jurisdiction: "CH",
			overlay: gw.overlay, routes: gw.routes, iface: fmt.Sprintf("sbvt%d", i),
			vaultAddr: e.addr, roleFile: roleFile, secretFile: secretFile, gossipPort: ports[2*i], wgPort: ports[2*i+1],
		})
		must(t, os.WriteFile(filepath.Join(gdir, "gw.hcl"), []byte(cfg), 0o644))
		startGW(t, bin, nil, "gateway", "run", "--config", filepath.Join(gdir, "gw.hcl"))
		socks = append(socks, filepath.Join(gdir, "control.sock"))
	}
	for _, sock := range socks {
		waitCond(t, 60*time.Second, "the gateway runs", func() (bool, string) {
			_, err := gwStatus(bin, sock)
			return err == nil, fmt.Sprint(err)
		})
	}
	run := func(args ...string) (string, error) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), root...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	sites := []string{"burst-use2", "burst-euw1"}
	var held [][]string
	for i, sock := range socks {
		out, err := run("burst", "up", "--socket", sock, "--site", sites[i], "--provider", "aws", "--region", "r1",
			"--jurisdiction", "US", "--ttl", "1h", "--gateways", "2", "--routes", fmt.Sprintf("10.%d.0.0/24", 50+i))
		if err != nil {
			t.Fatalf("burst up %s: %v\n%s", sites[i], err, out)
		}
		// The addresses the gateway gave the burst's gateways, as it
		// recorded them (the join tokens carry the same).
		var book struct {
			Bursts []struct {
				Tokens []struct {
					OverlayIP string `json:"overlay_ip"`
				} `json:"tokens"`
			} `json:"bursts"`
		}
		bj, err := os.ReadFile(filepath.Join(filepath.Dir(sock), "bursts.json"))
		must(t, err)
		must(t, json.Unmarshal(bj, &book))
		var ips []string
		for _, tok := range book.Bursts[0].Tokens {
			ips = append(ips, tok.OverlayIP)
		}
		held = append(held, ips)
	}
	all := append(slices.Clone(held[0]), held[1]...)
	slices.Sort(all)
	if len(slices.Compact(slices.Clone(all))) != 4 {
		t.Fatalf("bursts opened on two gateways share overlay addresses: %s %v, %s %v", sites[0], held[0], sites[1], held[1])
	}
	if got := e.addressClaims(t); !slices.Equal(got, all) {
		t.Fatalf("addresses claimed in Vault %v; the bursts hold %v", got, all)
	}
	for i, sock := range socks {
		if out, err := run("burst", "down", "--socket", sock, "--site", sites[i]); err != nil || !strings.Contains(out, "burst site "+sites[i]+" ended") {
			t.Fatalf("burst down %s: %v\n%s", sites[i], err, out)
		}
	}
	if got := e.addressClaims(t); len(got) != 0 {
		t.Fatalf("after burst down of both, addresses still claimed: %v", got)
	}
	// Run again (a script retried): done already, which is no failure.
	out, err := run("burst", "down", "--socket", socks[0], "--site", sites[0])
	if err != nil || !strings.Contains(out, "burst site "+sites[0]+" had already ended") {
		t.Fatalf("a second burst down of %s: %v\n%s", sites[0], err, out)
	}
	out, err = run("burst", "down", "--socket", socks[0], "--site", sites[0], "--json")
	var bi struct {
		Site         string `json:"site"`
		AlreadyEnded bool   `json:"already_ended"`
		EndReason    string `json:"end_reason"`
	}
	if err != nil || json.Unmarshal([]byte(out), &bi) != nil || bi.Site != sites[0] || !bi.AlreadyEnded || bi.EndReason != "ended by burst down" {
		t.Fatalf("a second burst down of %s, in JSON: %v\n%s", sites[0], err, out)
	}
}
