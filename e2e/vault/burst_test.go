package vault

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/freeport"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
	"golang.org/x/sync/errgroup"
)

// buildSkybridge builds the gateway binary: the gateways of this test run
// as processes (as in production) talking to the Vault over HTTP, so
// this module links none of their code.
func buildSkybridge(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "skybridge")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/skybridge")
	cmd.Dir = "../.."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build skybridge: %v\n%s", err, out)
	}
	return bin
}

type gwProc struct {
	cmd *exec.Cmd
	// log is read while the gateway writes it (a test waits for a line):
	// a bytes.Buffer there is a data race.
	log    *syncbuf.Buffer
	exited chan error
}

// dieWithTest makes c killed when the test binary dies: go test's
// -timeout ends it with no cleanup run, and a gateway left running holds
// its ports and state directory for the next run. As the main e2e's
// childCommand: the signal comes when the forking thread ends, and nothing
// this binary links locks a goroutine to a thread, so threads live as long
// as the binary.
func dieWithTest(c *exec.Cmd) *exec.Cmd {
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return c
}

func startGW(t *testing.T, bin string, env []string, args ...string) *gwProc {
	t.Helper()
	g := &gwProc{log: &syncbuf.Buffer{}, exited: make(chan error, 1)}
	g.cmd = dieWithTest(exec.Command(bin, args...))
	g.cmd.Env = append(os.Environ(), env...)
	g.cmd.Stdout, g.cmd.Stderr = g.log, g.log
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { g.exited <- g.cmd.Wait() }()
	t.Cleanup(func() {
		g.cmd.Process.Kill()
		<-g.exited
		if t.Failed() {
			t.Logf("%s log:\n%s", strings.Join(args, " "), g.log.String())
		}
	})
	return g
}

// staticGateway describes a Vault-backed gateway of the tests, in
// netstack mode with its gossip on loopback and no operator endpoint.
type staticGateway struct {
	stateDir, node, site, region, jurisdiction, overlay string
	routes                                              string // an HCL list
	iface                                               string
	vaultAddr, roleFile, secretFile                     string
	gossipPort, wgPort                                  int
	seeds                                               []string
	refresh                                             string // identity.refresh, if set
}

// gatewayHCL is g's configuration file, logging in to e with an AppRole.
func (e *env) gatewayHCL(g staticGateway) string {
	seeds := ""
	for _, s := range g.seeds {
		seeds += fmt.Sprintf("  seeds = [%q]\n", s)
	}
	refresh := ""
	if g.refresh != "" {
		refresh = fmt.Sprintf("  refresh   = %q\n", g.refresh)
	}
	return fmt.Sprintf(`state_dir = %q
node {
  name         = %q
  site         = %q
  region       = %q
  provider     = "onprem"
  jurisdiction = %q
  overlay_ip   = %q
  routes       = %s
  labels       = { classes = "risk-batch" }
}
identity {
  backend   = "vault"
  mesh_cidr = %q
%s  vault {
    address   = %q
    ca_cert   = %q
    pki_mount = %q
    pki_role  = %q
    kv_mount  = %q
    auth {
      method         = "approle"
      mount          = %q
      role_id_file   = %q
      secret_id_file = %q
    }
  }
}
gossip {
  bind    = "127.0.0.1:%d"
  profile = "local"
%s}
wireguard {
  interface = %q
  port      = %d
  mode      = "netstack"
}
operator { listen = "off" }
`, g.stateDir, g.node, g.site, g.region, g.jurisdiction, g.overlay, g.routes, meshPrefix, refresh, g.vaultAddr, e.caFile, e.pki, e.role, e.kv,
		e.approleMount, g.roleFile, g.secretFile, g.gossipPort, seeds, g.iface, g.wgPort)
}

type statusView struct {
	Identity struct {
		Issuer         string     `json:"issuer"`
		IssuerAnswered *time.Time `json:"issuer_answered"`
		StartedOnDisk  bool       `json:"started_on_disk"`
		IssuedBy       string     `json:"issued_by"`
		CAs            []string   `json:"cas"`
	} `json:"identity"`
	Members []struct {
		Node  string `json:"node"`
		State string `json:"state"`
		Peer  bool   `json:"peer"`
	} `json:"members"`
}

func gwStatus(bin, socket string) (*statusView, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "status", "--socket", socket, "--json").Output()
	if err != nil {
		return nil, err
	}
	var st statusView
	return &st, json.Unmarshal(out, &st)
}

func waitCond(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	last := ""
	for {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; last: %s", what, d, last)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestVaultBurstSite opens a burst site on a Vault-backed gateway: Vault
// gets a PKI role that certifies only the site, a policy and an AppRole;
// the join token carries a response-wrapped SecretID. A fresh gateway
// redeems it, obtains its certificate from Vault, joins the mesh and
// peers; the token does not work twice; burst down revokes the site's
// certificate in Vault and deletes what burst up created; the burst
// gateway sees the revocation, leaves, and deletes its WireGuard key
// from Vault and its identity from disk. A burst whose site was opened
// again after its Vault objects were removed by hand is recorded as ended
// by burst down, which leaves the new opening alone.
func TestVaultBurstSite(t *testing.T) {
	e := startVault(t)
	bin := buildSkybridge(t)
	dir := t.TempDir()
	ctx := context.Background()
	root := []string{"VAULT_TOKEN=" + e.root.Token()}

	// The static on-prem gateway, with its own AppRole.
	roleFile, secretFile := e.appRole(t, dir, false)
	aDir := filepath.Join(dir, "a")
	aSock := filepath.Join(aDir, "control.sock")
	// Every gateway's gossip and WireGuard ports, taken in one call so
	// that no two are the same: the static one's, then two burst ones'.
	ports, err := freeport.Loopback(6)
	must(t, err)
	cfgA := e.gatewayHCL(staticGateway{
		stateDir: aDir, node: "gw-zrh", site: "onprem-zrh", region: "zrh-dc1", jurisdiction: "CH",
		overlay: "100.96.0.1", routes: `["10.1.0.0/16"]`, iface: "sbvza",
		vaultAddr: e.addr, roleFile: roleFile, secretFile: secretFile, gossipPort: ports[0], wgPort: ports[1],
	})
	must(t, os.WriteFile(filepath.Join(dir, "a.hcl"), []byte(cfgA), 0o644))
	a := startGW(t, bin, nil, "gateway", "run", "--config", filepath.Join(dir, "a.hcl"))
	waitCond(t, 60*time.Second, "the static gateway runs", func() (bool, string) {
		_, err := gwStatus(bin, aSock)
		return err == nil, fmt.Sprint(err)
	})

	burstUp := exec.Command(bin, "burst", "up", "--socket", aSock, "--site", "burst-ams", "--provider", "aws", "--region", "eu-west-1",
		"--jurisdiction", "NL", "--ttl", "1h", "--label", "classes=risk-batch", "--routes", "10.9.0.0/24", "--json")
	burstUp.Env = append(os.Environ(), root...)
	out, err := burstUp.Output()
	if err != nil {
		t.Fatalf("burst up: %v %s\n%s", err, out, a.log.String())
	}
	var grant struct {
		Tokens []string `json:"tokens"`
	}
	must(t, json.Unmarshal(out, &grant))
	if len(grant.Tokens) != 1 {
		t.Fatalf("burst up: %s", out)
	}
	name := "skybridge-burst-burst-ams"
	own := burstGrant(t, e, name, "burst-ams-gw1") // the gateway's PKI role, policy and AppRole
	if s, err := e.root.Logical().Read(e.pki + "/roles/" + own); err != nil || s == nil {
		t.Fatalf("burst up made no PKI role for its gateway: %v", err)
	} else if got := fmt.Sprint(s.Data["allowed_uri_sans"]); !strings.Contains(got, "skybridge://burst-ams/burst-ams-gw1?") || !strings.Contains(got, "jurisdiction=NL&ip=100.96.") || strings.Contains(got, "*") {
		t.Fatalf("the burst gateway's role certifies %s", got)
	}
	// The role certifies the gateway's name alone, not any name: a
	// certificate of the mesh CA for a bank's host would be good
	// wherever that CA is trusted. The site's role certifies nothing.
	for role, cns := range map[string][]string{
		own:  {"vault.bank.example", "*.bank.example", "burst-ams-gw1.bank.example"},
		name: {"burst-ams-gw1", "vault.bank.example"},
	} {
		for _, cn := range cns {
			if _, err := e.root.Logical().Write(e.pki+"/issue/"+role, map[string]any{"common_name": cn}); err == nil {
				t.Errorf("the burst role %s issued a certificate for %q", role, cn)
			}
		}
	}
	tokenFile := filepath.Join(dir, "token")
	must(t, os.WriteFile(tokenFile, []byte(grant.Tokens[0]), 0o600))
	// The gateway records where the burst's objects are, for a burst
	// down after its Vault settings have changed.
	var book struct {
		Bursts []struct {
			Site  string `json:"site"`
			Place struct {
				Name     string `json:"name"`
				Policy   string `json:"policy"`
				KVPrefix string `json:"kv_prefix"`
			} `json:"vault_place"`
		} `json:"bursts"`
	}
	bj, err := os.ReadFile(filepath.Join(aDir, "bursts.json"))
	must(t, err)
	must(t, json.Unmarshal(bj, &book))
	if len(book.Bursts) != 1 || book.Bursts[0].Place.Name != name || book.Bursts[0].Place.KVPrefix != "skybridge" || !strings.HasPrefix(book.Bursts[0].Place.Policy, name+"-") {
		t.Fatalf("the burst's record: %s", bj)
	}
	policy := book.Bursts[0].Place.Policy + ".burst-ams-gw1" // the gateway's
	if policy != own {
		t.Fatalf("the gateway's policy %s, its AppRole %s", policy, own)
	}
	if s, err := e.root.Logical().Read("sys/policy/" + policy); err != nil || s == nil {
		t.Fatalf("burst up made no policy %s: %v", policy, err)
	}

	// The burst gateway: its configuration has no node and no identity.
	burstCfg := func(name string, gossipPort, wgPort int) string {
		p := filepath.Join(dir, name+".hcl")
		must(t, os.WriteFile(p, []byte(fmt.Sprintf(`state_dir = %q
gossip {
  bind    = "127.0.0.1:%d"
  profile = "local"
}
wireguard {
  interface = "sbv%s"
  port      = %d
  mode      = "netstack"
}
operator { listen = "off" }
`, filepath.Join(dir, name), gossipPort, name, wgPort)), 0o644))
		return p
	}
	b := startGW(t, bin, nil, "gateway", "run", "--config", burstCfg("b", ports[2], ports[3]), "--join-token-file", tokenFile)
	// burstPeer says whether the burst gateway is a verified peer of the
	// static one.
	burstPeer := func() (bool, string) {
		st, err := gwStatus(bin, aSock)
		if err != nil {
			return false, err.Error()
		}
		for _, m := range st.Members {
			if m.Node == "burst-ams-gw1" {
				return m.State == "verified" && m.Peer, m.State
			}
		}
		return false, "not a member"
	}
	waitCond(t, 60*time.Second, "the burst gateway is a verified peer of the static one", burstPeer)

	// The gossip key can be rotated with a burst site in the mesh: its
	// gateways may only read the mesh's keyring in Vault, which the
	// rotating gateway has already updated when they are asked.
	rotate := exec.Command(bin, "keys", "rotate-gossip", "--socket", aSock)
	if out, err := rotate.CombinedOutput(); err != nil || !strings.Contains(string(out), "burst-ams-gw1") {
		t.Fatalf("rotate the gossip key with a burst site in the mesh: %v\n%s\nstatic gateway:\n%s\nburst gateway:\n%s", err, out, a.log.String(), b.log.String())
	}
	waitCond(t, 30*time.Second, "the burst gateway still a verified peer after the rotation", burstPeer)

	// The wrapped SecretID is gone: the token cannot enrol another.
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second) // a token wrongly accepted would run on
	defer cancel()
	reuse := dieWithTest(exec.CommandContext(rctx, bin, "gateway", "run", "--config", burstCfg("c", ports[4], ports[5]), "--join-token-file", tokenFile))
	if out, err := reuse.CombinedOutput(); err == nil || !strings.Contains(string(out), "already used or expired") {
		t.Fatalf("token reuse: %v\n%s", err, out)
	}

	down := exec.Command(bin, "burst", "down", "--socket", aSock, "--site", "burst-ams")
	down.Env = append(os.Environ(), root...)
	if out, err := down.CombinedOutput(); err != nil || !strings.Contains(string(out), "1 identities revoked") {
		t.Fatalf("burst down: %v\n%s", err, out)
	}
	select {
	case err := <-b.exited:
		if err != nil {
			t.Fatalf("burst gateway exited with %v", err)
		}
		b.exited <- nil // for the cleanup
	case <-time.After(60 * time.Second):
		t.Fatal("the burst gateway did not leave after burst down")
	}
	if !strings.Contains(b.log.String(), "has ended") {
		t.Error("the burst gateway did not say why it stopped")
	}
	// Its Vault token, which Vault would keep until the burst's end
	// although its AppRole is gone, was revoked by the gateway.
	e.eachToken(t, func(_ any, tok map[string]any) {
		if strings.Contains(fmt.Sprint(tok["policies"]), policy) {
			t.Errorf("a token of the ended burst is still valid: %v", tok)
		}
	})
	for _, f := range []string{"node.key", "node.crt", "vault-secret-id", "vault-role-id"} {
		if _, err := os.Stat(filepath.Join(dir, "b", "identity", f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", f, err)
		}
	}
	if _, err := e.root.KVv2(e.kv).Get(ctx, "skybridge/nodes/burst-ams-gw1/wireguard"); !errors.Is(err, api.ErrSecretNotFound) {
		t.Errorf("the burst gateway's WireGuard key is still in Vault: %v", err)
	}
	if _, err := e.root.KVv2(e.kv).Get(ctx, "skybridge/bursts/burst-ams"); !errors.Is(err, api.ErrSecretNotFound) {
		t.Errorf("the site's claim is still in Vault after burst down: %v", err)
	}
	for _, p := range []string{e.pki + "/roles/" + name, e.pki + "/roles/" + own, "auth/" + e.approleMount + "/role/" + own, "sys/policy/" + policy} {
		if s, _ := e.root.Logical().Read(p); s != nil {
			t.Errorf("%s still exists after burst down", p)
		}
	}
	// The site opened again: its policy has a name of its own. The ended
	// burst's tokens, which Vault keeps until their TTL, name a policy
	// that never comes back.
	again := exec.Command(bin, "burst", "up", "--socket", aSock, "--site", "burst-ams", "--provider", "aws", "--region", "eu-west-1",
		"--jurisdiction", "NL", "--ttl", "1h", "--label", "classes=risk-batch", "--routes", "10.9.0.0/24", "--json")
	again.Env = append(os.Environ(), root...)
	if out, err := again.CombinedOutput(); err != nil {
		t.Fatalf("burst up burst-ams again: %v\n%s", err, out)
	}
	if again := burstGrant(t, e, name, "burst-ams-gw1"); again == own {
		t.Fatalf("the reopened site's gateway's AppRole has the ended burst's name %s", own)
	} else if s, err := e.root.Logical().Read("auth/" + e.approleMount + "/role/" + again); err != nil || s == nil {
		t.Fatalf("the reopened site's gateway's AppRole: %v", err)
	} else if got := fmt.Sprint(s.Data["token_policies"]); strings.Contains(got, policy) || !strings.Contains(got, name+"-") {
		t.Fatalf("the reopened site's tokens get policies %s; the ended burst's was %s", got, policy)
	}
	if s, _ := e.root.Logical().Read("sys/policy/" + policy); s != nil {
		t.Errorf("the ended burst's policy %s exists again", policy)
	}
	waitCond(t, 30*time.Second, "the burst gateway gone from the static gateway's membership", func() (bool, string) {
		st, err := gwStatus(bin, aSock)
		if err != nil {
			return false, err.Error()
		}
		for _, m := range st.Members {
			if m.Node == "burst-ams-gw1" {
				return false, m.State
			}
		}
		return true, ""
	})

	// A burst whose Vault objects and claim were removed by hand, its
	// site then opened again from another gateway: burst down cannot
	// clean up after it, records it as ended (or the record would wait
	// for ever), and leaves the new opening alone.
	up := exec.Command(bin, "burst", "up", "--socket", aSock, "--site", "burst-rot", "--provider", "aws", "--region", "eu-west-1",
		"--jurisdiction", "NL", "--ttl", "1h", "--label", "classes=risk-batch", "--routes", "10.8.0.0/24", "--json")
	up.Env = append(os.Environ(), root...)
	if out, err := up.CombinedOutput(); err != nil {
		t.Fatalf("burst up burst-rot: %v\n%s", err, out)
	}
	rot := "skybridge-burst-burst-rot"
	rotOwn := burstGrant(t, e, rot, "burst-rot-gw1")
	must(t, e.root.KVv2(e.kv).DeleteMetadata(ctx, "skybridge/bursts/burst-rot"))
	rotRole, err := e.root.Logical().Read("auth/" + e.approleMount + "/role/" + rotOwn)
	if err != nil || rotRole == nil {
		t.Fatalf("burst-rot's gateway's AppRole: %v", err)
	}
	rotPolicies, _ := rotRole.Data["token_policies"].([]any)
	if len(rotPolicies) != 1 {
		t.Fatalf("burst-rot's gateway's AppRole gives policies %v", rotPolicies)
	}
	for _, p := range []string{"auth/" + e.approleMount + "/role/" + rotOwn, "sys/policy/" + fmt.Sprint(rotPolicies[0]), e.pki + "/roles/" + rotOwn, e.pki + "/roles/" + rot} {
		_, err := e.root.Logical().Delete(p)
		must(t, err)
	}
	otherDir := filepath.Join(dir, "other")
	must(t, os.MkdirAll(otherDir, 0o700))
	oRole, oSecret := e.appRole(t, otherDir, false)
	ocfg := e.config(filepath.Join(otherDir, "id"), certs.VaultAuth{Method: "approle", RoleIDFile: oRole, SecretIDFile: oSecret})
	ov, err := certs.OpenVault(ctx, ocfg.Vault, meshPrefix, slog.New(slog.DiscardHandler))
	must(t, err)
	spec := certs.VaultBurstSpec{Site: "burst-rot", Nodes: []certs.Attributes{attrs("burst-rot-gw1", "burst-rot", "100.96.9.7")},
		Expires: time.Now().Add(time.Hour), TokenTTL: 10 * time.Minute, OpenedBy: "gw-other"}
	spec.Nodes[0].Provider, spec.Nodes[0].Jurisdiction = "aws", "NL"
	if _, err := ov.OpenBurst(ctx, e.root.Token(), spec); err != nil {
		t.Fatalf("open the site again from another gateway: %v", err)
	}
	down = exec.Command(bin, "burst", "down", "--socket", aSock, "--site", "burst-rot")
	down.Env = append(os.Environ(), root...)
	if out, err := down.CombinedOutput(); err != nil || !strings.Contains(string(out), "burst site burst-rot ended; 0 identities revoked") {
		t.Fatalf("burst down of a burst whose site was opened again: %v\n%s", err, out)
	}
	list := exec.Command(bin, "burst", "list", "--socket", aSock)
	if out, err := list.CombinedOutput(); err != nil || !strings.Contains(string(out), "its Vault objects were removed by hand and the site opened again") {
		t.Fatalf("burst list after that burst down: %v\n%s", err, out)
	}
	if cl, err := e.root.KVv2(e.kv).Get(ctx, "skybridge/bursts/burst-rot"); err != nil || cl.Data["gateway"] != "gw-other" {
		t.Fatalf("the new opening's claim after the old burst's burst down: %v %v", cl, err)
	}
	if s, err := e.root.Logical().Read(e.pki + "/roles/" + rot); err != nil || s == nil {
		t.Fatalf("burst down of the old burst removed the new opening's role: %v", err)
	}
}

// TestVaultBurstOpenAndAbort: a burst site is claimed in Vault before
// anything is created — a second opening of it is refused, names the
// gateway holding it and leaves the open burst alone, and of two gateways
// opening it at the same instant exactly one succeeds; ending a burst
// with another opening's claim deletes nothing; the remains of a burst
// without a claim are refused, and can be ended; aborting a burst whose
// grant never went out removes its role, policy, AppRole and claim, so
// the site can be opened again.
func TestVaultBurstOpenAndAbort(t *testing.T) {
	e := startVault(t)
	ctx := context.Background()
	dir := t.TempDir()
	cfg, _ := e.approleConfig(t, dir)
	v, err := certs.OpenVault(ctx, cfg.Vault, meshPrefix, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	specOf := func(gw, by string) certs.VaultBurstSpec {
		spec := certs.VaultBurstSpec{Site: "burst-x", Nodes: []certs.Attributes{attrs(gw, "burst-x", "100.96.9.1")},
			Expires: time.Now().Add(time.Hour), TokenTTL: 10 * time.Minute, OpenedBy: by}
		spec.Nodes[0].Provider, spec.Nodes[0].Jurisdiction = "aws", "NL"
		return spec
	}
	spec := specOf("burst-x-gw1", "gw-zrh")
	vb, err := v.OpenBurst(ctx, e.root.Token(), spec)
	if err != nil {
		t.Fatal(err)
	}
	name := v.BurstName("burst-x")
	// ours lists the names in the list at p that are the site's or one of
	// its gateways'.
	ours := func(p string) []string {
		s, err := e.root.Logical().List(p)
		must(t, err)
		var out []string
		if s != nil {
			for _, k := range s.Data["keys"].([]any) {
				if k := k.(string); k == name || strings.HasPrefix(k, name+"-") {
					out = append(out, k)
				}
			}
		}
		return out
	}
	// exists says whether any of the burst's PKI roles, policies and
	// AppRoles, and its claim, are in Vault; open, the site's role and
	// each gateway's objects all are.
	exists := func() (role, policy, approle, claim bool) {
		roles := ours(e.pki + "/roles")
		// The policy's name is the opening's: any of the site's.
		ps, err := e.root.Sys().ListPolicies()
		must(t, err)
		p := ""
		for _, n := range ps {
			if n == name || strings.HasPrefix(n, name+"-") {
				p = n
			}
		}
		a := ours("auth/" + e.approleMount + "/role")
		_, err = e.root.KVv2(e.kv).Get(ctx, "skybridge/bursts/burst-x")
		if err != nil && !errors.Is(err, api.ErrSecretNotFound) {
			t.Fatal(err)
		}
		return len(roles) > 0, p != "", len(a) > 0, err == nil
	}
	if r, p, a, c := exists(); !r || !p || !a || !c {
		t.Fatalf("after OpenBurst: role %v, policy %v, AppRole %v, claim %v", r, p, a, c)
	}
	if _, err := v.OpenBurst(ctx, e.root.Token(), specOf("burst-x-gw1", "gw-fra")); err == nil || !strings.Contains(err.Error(), "is open, or being opened, from gateway gw-zrh") {
		t.Fatalf("a second OpenBurst of the site: %v", err)
	}
	// Ending an older burst of the site (another claim, or one from
	// before claims) while this one holds it: told the site was opened
	// again, and nothing is deleted.
	if _, err := v.CloseBurst(ctx, e.root.Token(), "burst-x", []string{"burst-x-gw1"}, "another-opening", "gw-old"); !errors.Is(err, certs.ErrBurstSiteReopened) || !strings.Contains(err.Error(), "from gateway gw-zrh") {
		t.Fatalf("CloseBurst with another opening's claim: %v", err)
	}
	if err := v.AbortBurst(ctx, e.root.Token(), "burst-x", "", "gw-old", vb.Nodes()); !errors.Is(err, certs.ErrBurstSiteReopened) {
		t.Fatalf("AbortBurst without the claim: %v", err)
	}
	if r, p, a, c := exists(); !r || !p || !a || !c {
		t.Fatalf("the refused OpenBurst, CloseBurst or AbortBurst removed the open burst's objects: role %v, policy %v, AppRole %v, claim %v", r, p, a, c)
	}
	// The claim rewritten by someone who may write claims (a gateway whose
	// policy reaches the bursts path): the burst's own close is not taken
	// for a reopening, since the AppRole is still its opening's.
	restore := forgeClaim(t, e, "burst-x")
	if _, err := v.CloseBurst(ctx, e.root.Token(), "burst-x", []string{"burst-x-gw1"}, vb.Claim, "gw-zrh"); err == nil || errors.Is(err, certs.ErrBurstSiteReopened) || !strings.Contains(err.Error(), "changed outside skybridge") {
		t.Fatalf("CloseBurst over a rewritten claim: %v", err)
	}
	if r, p, a, c := exists(); !r || !p || !a || !c {
		t.Fatalf("the close over a rewritten claim deleted: role %v, policy %v, AppRole %v, claim %v", r, p, a, c)
	}
	restore()
	must(t, v.AbortBurst(ctx, e.root.Token(), "burst-x", vb.Claim, "gw-zrh", vb.Nodes()))
	if r, p, a, c := exists(); r || p || a || c {
		t.Fatalf("after AbortBurst: role %v, policy %v, AppRole %v, claim %v", r, p, a, c)
	}

	// Two gateways open the site at the same instant, three times over.
	for round := range 3 {
		specs := []certs.VaultBurstSpec{specOf("burst-x-gw1", "gw-a"), specOf("burst-x-gw2", "gw-b")}
		errs := make([]error, len(specs))
		vbs := make([]*certs.VaultBurst, len(specs))
		start := make(chan struct{})
		done := make(chan int)
		for i := range specs {
			go func() {
				<-start
				vbs[i], errs[i] = v.OpenBurst(ctx, e.root.Token(), specs[i])
				done <- i
			}()
		}
		close(start)
		<-done
		<-done
		won := -1
		for i, err := range errs {
			switch {
			case err == nil && won < 0:
				won = i
			case err == nil:
				t.Fatalf("round %d: both openings of one site succeeded", round)
			case !strings.Contains(err.Error(), "is open, or being opened, from gateway "+specs[1-i].OpenedBy):
				t.Fatalf("round %d: the losing opening: %v", round, err)
			}
		}
		if won < 0 {
			t.Fatalf("round %d: neither opening succeeded: %v", round, errs)
		}
		// The roles are the winner's, not a mix.
		if got, want := ours(e.pki+"/roles"), []string{name, vbs[won].Gateways[0].Role}; !slices.Equal(got, want) || !strings.HasSuffix(want[1], "."+specs[won].Nodes[0].Node) {
			t.Fatalf("round %d: %s won, but the PKI roles are %v", round, specs[won].Nodes[0].Node, got)
		}
		must(t, v.AbortBurst(ctx, e.root.Token(), "burst-x", vbs[won].Claim, specs[won].OpenedBy, vbs[won].Nodes()))
	}

	// A claim deleted softly (`vault kv delete`) reads as empty: closing
	// the burst says so and deletes nothing — an empty claim is nobody's
	// reopening, and taken for one the burst would be recorded as ended
	// with its objects left in Vault. Once it is gone for good, the close
	// goes through.
	vb, err = v.OpenBurst(ctx, e.root.Token(), spec)
	must(t, err)
	must(t, e.root.KVv2(e.kv).Delete(ctx, "skybridge/bursts/burst-x"))
	if _, err := v.CloseBurst(ctx, e.root.Token(), "burst-x", []string{"burst-x-gw1"}, vb.Claim, "gw-zrh"); err == nil || errors.Is(err, certs.ErrBurstSiteReopened) || !strings.Contains(err.Error(), "vault kv metadata delete") {
		t.Fatalf("CloseBurst with its claim deleted softly: %v", err)
	}
	if r, p, a, _ := exists(); !r || !p || !a {
		t.Fatalf("the close refused over an empty claim deleted: role %v, policy %v, AppRole %v", r, p, a)
	}
	must(t, e.root.KVv2(e.kv).DeleteMetadata(ctx, "skybridge/bursts/burst-x"))
	if _, err := v.CloseBurst(ctx, e.root.Token(), "burst-x", []string{"burst-x-gw1"}, vb.Claim, "gw-zrh"); err != nil {
		t.Fatalf("CloseBurst once the empty claim is gone: %v", err)
	}
	if r, p, a, c := exists(); r || p || a || c {
		t.Fatalf("after that close: role %v, policy %v, AppRole %v, claim %v", r, p, a, c)
	}

	// The remains of a burst opened before claims were made (and before
	// gateways had grants of their own: the site's PKI role, a policy and
	// an AppRole, all named after the site, made here as that release
	// did): refused, and the claim taken for the attempt is released;
	// ending them (a record without a claim) claims the site while it is
	// torn down.
	_, err = e.root.Logical().Write(e.pki+"/roles/"+name, map[string]any{"allowed_domains": []string{"burst-x-gw1"}, "allow_bare_domains": true,
		"key_type": "ec", "key_bits": 256, "max_ttl": "1h", "not_after": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)})
	must(t, err)
	must(t, e.root.Sys().PutPolicy(name, fmt.Sprintf(`path "%s/sign/%s" { capabilities = ["update"] }`, e.pki, name)))
	_, err = e.root.Logical().Write("auth/"+e.approleMount+"/role/"+name, map[string]any{"token_policies": name, "token_ttl": "1h"})
	must(t, err)
	if _, err := v.OpenBurst(ctx, e.root.Token(), spec); err == nil || !strings.Contains(err.Error(), "already has") {
		t.Fatalf("OpenBurst over an unclaimed burst's role: %v", err)
	}
	if r, p, a, c := exists(); !r || !p || !a || c {
		t.Fatalf("after the refused OpenBurst over remains: role %v, policy %v, AppRole %v, claim %v (want the remains, no claim)", r, p, a, c)
	}
	// An opening over those remains holds the site's claim from its
	// check-and-set until it has read the role and given up. A close
	// meanwhile must not take the site for opened again (the burst would
	// be recorded as ended, its objects left in Vault): it waits, and
	// says to try again if the claim stays.
	inFlight := map[string]any{"nonce": "in-flight", "gateway": "gw-opening", "closing": false,
		"expires": time.Now().Add(2 * time.Hour).UTC().Format(time.RFC3339)}
	_, err = e.root.KVv2(e.kv).Put(ctx, "skybridge/bursts/burst-x", inFlight, api.WithCheckAndSet(0))
	must(t, err)
	if _, err := v.CloseBurst(ctx, e.root.Token(), "burst-x", []string{"burst-x-gw1"}, "", "gw-closer"); err == nil || errors.Is(err, certs.ErrBurstSiteReopened) ||
		!strings.Contains(err.Error(), "is an earlier burst's, so that opening will be refused") || !strings.Contains(err.Error(), "vault kv metadata delete") {
		t.Fatalf("CloseBurst of remains while an opening holds the claim: %v", err)
	}
	if r, p, a, c := exists(); !r || !p || !a || !c {
		t.Fatalf("the close that waited for an opening deleted: role %v, policy %v, AppRole %v, claim %v (want all)", r, p, a, c)
	}

	// Closing them claims the site for the closing gateway — here once the
	// opening above gives its claim back, 0.7 s into the 2 s the close
	// waits for it. A token
	// that may delete the burst's objects but not list certificates stops
	// the close half-way, with the claim held: an opening meanwhile is
	// told so, and the close can be run again.
	must(t, e.root.Sys().PutPolicy("closer-"+e.kv, fmt.Sprintf(`
path "%[1]s/data/skybridge/bursts/*" { capabilities = ["create", "read", "update"] }
path "%[1]s/metadata/skybridge/bursts/*" { capabilities = ["delete"] }
path "auth/%[2]s/role/*" { capabilities = ["read", "delete"] }
path "sys/policies/acl/*" { capabilities = ["delete"] }
path "%[3]s/roles/*" { capabilities = ["read", "delete"] }
`, e.kv, e.approleMount, e.pki)))
	closer, err := e.root.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"closer-" + e.kv}, TTL: "10m"})
	must(t, err)
	closed := make(chan error, 1)
	go func() {
		_, err := v.CloseBurst(ctx, closer.Auth.ClientToken, "burst-x", []string{"burst-x-gw1"}, "", "gw-closer")
		closed <- err
	}()
	time.Sleep(700 * time.Millisecond) // the opening's claim stays a while; either way the close must go on
	must(t, e.root.KVv2(e.kv).DeleteMetadata(ctx, "skybridge/bursts/burst-x"))
	if err := <-closed; err == nil || !strings.Contains(err.Error(), "certs") {
		t.Fatalf("CloseBurst with a token that cannot list certificates: %v", err)
	}
	if r, p, a, c := exists(); r || p || a || !c {
		t.Fatalf("after a close stopped half-way: role %v, policy %v, AppRole %v, claim %v (want only the claim)", r, p, a, c)
	}
	if _, err := v.OpenBurst(ctx, e.root.Token(), spec); err == nil || !strings.Contains(err.Error(), "is being closed by gateway gw-closer") {
		t.Fatalf("OpenBurst of a site being closed: %v", err)
	}
	if _, err := v.CloseBurst(ctx, e.root.Token(), "burst-x", []string{"burst-x-gw1"}, "", "gw-closer"); err != nil {
		t.Fatalf("CloseBurst of an unclaimed burst (a re-run, after one that stopped half-way): %v", err)
	}
	if r, p, a, c := exists(); r || p || a || c {
		t.Fatalf("after CloseBurst of an unclaimed burst: role %v, policy %v, AppRole %v, claim %v", r, p, a, c)
	}

	// What a gateway that can no longer reach a burst's objects tells the
	// operator to run by hand removes all of them, done as vault(1)
	// would: the site can then be opened again.
	vb, err = v.OpenBurst(ctx, e.root.Token(), spec)
	must(t, err)
	want := v.BurstPlace("burst-x")
	want.Policy, want.PerGateway = vb.Place.Policy, true
	if vb.Place != want || vb.Place.Name != name || !strings.HasPrefix(vb.Place.Policy, name+"-") {
		t.Fatalf("the burst's place %+v, want %+v with the opening's policy", vb.Place, want)
	}
	wgKey := "skybridge/nodes/burst-x-gw1/wireguard"
	_, err = e.root.KVv2(e.kv).Put(ctx, wgKey, map[string]any{"private_key": "k"})
	must(t, err)
	for _, cmd := range vb.Place.RemovalCommands("burst-x", []string{"burst-x-gw1"}) {
		f := strings.Fields(cmd)
		switch {
		case len(f) == 3 && f[1] == "delete":
			_, err = e.root.Logical().Delete(f[2])
		case len(f) == 4 && f[1] == "policy" && f[2] == "delete":
			err = e.root.Sys().DeletePolicy(f[3])
		case len(f) == 6 && f[1] == "kv" && f[2] == "metadata" && f[3] == "delete" && strings.HasPrefix(f[4], "-mount="):
			err = e.root.KVv2(strings.TrimPrefix(f[4], "-mount=")).DeleteMetadata(ctx, f[5])
		default:
			t.Fatalf("a removal command this test does not know: %q", cmd)
		}
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
	}
	if r, p, a, c := exists(); r || p || a || c {
		t.Fatalf("after the by-hand removal: role %v, policy %v, AppRole %v, claim %v", r, p, a, c)
	}
	if _, err := e.root.KVv2(e.kv).Get(ctx, wgKey); !errors.Is(err, api.ErrSecretNotFound) {
		t.Fatalf("the gateway's WireGuard key after the by-hand removal: %v", err)
	}
	vb, err = v.OpenBurst(ctx, e.root.Token(), spec)
	if err != nil {
		t.Fatalf("OpenBurst after the by-hand removal: %v", err)
	}
	must(t, v.AbortBurst(ctx, e.root.Token(), "burst-x", vb.Claim, spec.OpenedBy, vb.Nodes()))
}

// forgeClaim rewrites the claim of site as someone who may write claims
// could (a gateway whose policy reaches the bursts path); restore puts
// the original back.
func forgeClaim(t *testing.T, e *env, site string) (restore func()) {
	t.Helper()
	kv, p := e.root.KVv2(e.kv), "skybridge/bursts/"+site
	claimed, err := kv.Get(context.Background(), p)
	must(t, err)
	forged := maps.Clone(claimed.Data)
	forged["nonce"], forged["gateway"] = "forged-nonce", "gw-rogue"
	_, err = kv.Put(context.Background(), p, forged, api.WithCheckAndSet(claimed.VersionMetadata.Version))
	must(t, err)
	return func() {
		_, err := kv.Put(context.Background(), p, claimed.Data)
		must(t, err)
	}
}

// burstGrant is the name of the one PKI role, policy and AppRole of
// gateway node of the open burst whose site's role is name.
func burstGrant(t *testing.T, e *env, name, node string) string {
	t.Helper()
	s, err := e.root.Logical().List("auth/" + e.approleMount + "/role")
	must(t, err)
	var found []string
	if s != nil {
		for _, k := range s.Data["keys"].([]any) {
			if k := k.(string); strings.HasPrefix(k, name+"-") && strings.HasSuffix(k, "."+node) {
				found = append(found, k)
			}
		}
	}
	if len(found) != 1 {
		t.Fatalf("AppRoles of gateway %s of %s: %v, want one", node, name, found)
	}
	return found[0]
}

// TestVaultBurstGatewaysIsolated: each gateway of a Vault burst logs in
// with an AppRole of its own, whose token may have certificates issued in
// that gateway's name only and reach that gateway's WireGuard key only.
// Burst gateways run on rented servers: one broken into can neither
// impersonate its siblings nor read the keys that decrypt their tunnels.
func TestVaultBurstGatewaysIsolated(t *testing.T) {
	e := startVault(t)
	ctx := context.Background()
	cfg, _ := e.approleConfig(t, t.TempDir())
	v, err := certs.OpenVault(ctx, cfg.Vault, meshPrefix, slog.New(slog.DiscardHandler))
	must(t, err)
	spec := certs.VaultBurstSpec{Site: "burst-y", Expires: time.Now().Add(time.Hour), TokenTTL: 10 * time.Minute, OpenedBy: "gw-zrh"}
	for i, ip := range []string{"100.96.9.1", "100.96.9.2"} {
		n := attrs(fmt.Sprintf("burst-y-gw%d", i+1), "burst-y", ip)
		n.Provider, n.Jurisdiction = "aws", "NL"
		spec.Nodes = append(spec.Nodes, n)
	}
	vb, err := v.OpenBurst(ctx, e.root.Token(), spec)
	must(t, err)
	if len(vb.Gateways) != 2 || vb.Gateways[0].RoleID == vb.Gateways[1].RoleID || vb.Gateways[0].Role == vb.Gateways[1].Role {
		t.Fatalf("the burst's two gateways share a role ID or a PKI role: %q %q", vb.Gateways[0].Role, vb.Gateways[1].Role)
	}
	one, other := vb.Gateways[0], vb.Gateways[1]

	// The first gateway logs in as its join token lets it.
	unwrapped, err := e.root.Logical().Unwrap(one.WrappedSecretID)
	must(t, err)
	c, err := e.root.Clone()
	must(t, err)
	login, err := c.Logical().Write("auth/"+e.approleMount+"/login", map[string]any{"role_id": one.RoleID, "secret_id": unwrapped.Data["secret_id"]})
	must(t, err)
	c.SetToken(login.Auth.ClientToken)
	// Its token is short-lived, whatever the burst's length: counted
	// from the login, one as long as the burst would outlive it.
	if d := time.Duration(login.Auth.LeaseDuration) * time.Second; d <= 0 || d > certs.BurstTokenTTL {
		t.Errorf("a burst gateway's token lasts %s, want at most %s", d, certs.BurstTokenTTL)
	}

	status := func(err error) int {
		var re *api.ResponseError
		if errors.As(err, &re) {
			return re.StatusCode
		}
		return 0
	}
	sign := func(c *api.Client, role string, n certs.Attributes) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		must(t, err)
		n.Normalize()
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: n.Node},
			URIs: []*url.URL{n.PinnedURI()}, IPAddresses: []net.IP{n.OverlayIP.AsSlice()}}, key)
		must(t, err)
		_, err = c.Logical().Write(e.pki+"/sign/"+role, map[string]any{
			"csr": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), "common_name": n.Node,
			"uri_sans": n.PinnedURI().String(), "ip_sans": n.OverlayIP.String(), "exclude_cn_from_sans": true,
		})
		return err
	}
	if err := sign(c, one.Role, spec.Nodes[0]); err != nil {
		t.Fatalf("a burst gateway's certificate from its own role: %v", err)
	}
	if err := sign(c, one.Role, spec.Nodes[1]); status(err) != http.StatusBadRequest {
		t.Errorf("a burst gateway's role, asked for its sibling's certificate: %v; want refused by the role", err)
	}
	if err := sign(c, other.Role, spec.Nodes[1]); status(err) != http.StatusForbidden {
		t.Errorf("a burst gateway's token, on its sibling's role: %v; want permission denied", err)
	}
	for _, n := range spec.Nodes {
		if err := sign(e.root, vb.Name, n); status(err) != http.StatusBadRequest {
			t.Errorf("the site's role, asked for %s's certificate: %v; want refused: it certifies nothing", n.Node, err)
		}
	}

	kv := c.KVv2(e.kv)
	if _, err := kv.Put(ctx, "skybridge/nodes/burst-y-gw1/wireguard", map[string]any{"private_key": "mine"}); err != nil {
		t.Fatalf("a burst gateway storing its own WireGuard key: %v", err)
	}
	if _, err := kv.Get(ctx, "skybridge/nodes/burst-y-gw1/wireguard"); err != nil {
		t.Fatalf("a burst gateway reading its own WireGuard key: %v", err)
	}
	_, err = e.root.KVv2(e.kv).Put(ctx, "skybridge/nodes/burst-y-gw2/wireguard", map[string]any{"private_key": "sibling's"})
	must(t, err)
	if s, err := kv.Get(ctx, "skybridge/nodes/burst-y-gw2/wireguard"); status(err) != http.StatusForbidden {
		t.Errorf("a burst gateway reading its sibling's WireGuard key: %v %v; want permission denied", s, err)
	}
	if _, err := kv.Put(ctx, "skybridge/nodes/burst-y-gw2/wireguard", map[string]any{"private_key": "forged"}); status(err) != http.StatusForbidden {
		t.Errorf("a burst gateway replacing its sibling's WireGuard key: %v; want permission denied", err)
	}
	if _, err := kv.Get(ctx, "skybridge/gossip"); err != nil && !errors.Is(err, api.ErrSecretNotFound) {
		t.Errorf("a burst gateway reading the gossip keyring: %v", err) // the mesh's, shared
	}

	// A close stopped half-way (the first gateway's grant gone), then its
	// claim rewritten by someone who may write claims: the second
	// gateway's AppRole still names this opening, so the close is not
	// taken for a reopening (which would record the burst as ended and
	// leave that AppRole, SecretIDs and all).
	_, err = e.root.Logical().Delete("auth/" + e.approleMount + "/role/" + one.Role)
	must(t, err)
	restore := forgeClaim(t, e, "burst-y")
	if _, err := v.CloseBurst(ctx, e.root.Token(), "burst-y", vb.Nodes(), vb.Claim, "gw-zrh"); err == nil || errors.Is(err, certs.ErrBurstSiteReopened) || !strings.Contains(err.Error(), "changed outside skybridge") {
		t.Fatalf("CloseBurst, half done, over a rewritten claim: %v", err)
	}
	restore()

	// Aborted, nothing of it stays: no gateway's role, policy or AppRole.
	must(t, v.AbortBurst(ctx, e.root.Token(), "burst-y", vb.Claim, "gw-zrh", vb.Nodes()))
	for _, p := range []string{e.pki + "/roles/" + one.Role, e.pki + "/roles/" + other.Role, e.pki + "/roles/" + vb.Name,
		"auth/" + e.approleMount + "/role/" + one.Role, "auth/" + e.approleMount + "/role/" + other.Role,
		"sys/policy/" + vb.Place.Policy + ".burst-y-gw1", "sys/policy/" + vb.Place.Policy + ".burst-y-gw2"} {
		if s, err := e.root.Logical().Read(p); err != nil || s != nil {
			t.Errorf("%s after AbortBurst: %v %v", p, s != nil, err)
		}
	}

	// Cleaned up by hand only in part (the claim and the site's role,
	// the gateways' grants left), the site opened again: the new
	// burst's gateways have grants of their own names, so the old
	// burst's servers, which keep their role ID and SecretID, cannot log
	// in with the new burst's rights.
	old, err := v.OpenBurst(ctx, e.root.Token(), spec)
	must(t, err)
	oldSecret, err := e.root.Logical().Unwrap(old.Gateways[0].WrappedSecretID)
	must(t, err)
	must(t, e.root.KVv2(e.kv).DeleteMetadata(ctx, "skybridge/bursts/burst-y"))
	_, err = e.root.Logical().Delete(e.pki + "/roles/" + old.Name)
	must(t, err)
	again, err := v.OpenBurst(ctx, e.root.Token(), spec)
	must(t, err)
	if again.Gateways[0].Role == old.Gateways[0].Role || again.Gateways[0].RoleID == old.Gateways[0].RoleID {
		t.Fatalf("the reopened burst's gateway has the left-over grant %s", old.Gateways[0].Role)
	}
	c.SetToken("")
	login, err = c.Logical().Write("auth/"+e.approleMount+"/login", map[string]any{"role_id": old.Gateways[0].RoleID, "secret_id": oldSecret.Data["secret_id"]})
	must(t, err)
	if slices.Contains(login.Auth.Policies, again.Gateways[0].Role) {
		t.Fatalf("the ended burst's SecretID logs in with the new burst's policy: %v", login.Auth.Policies)
	}
}

// TestBenchVaultBurstDown prints how long `burst down` takes to find and
// revoke a burst site's certificates on a PKI mount that has issued
// many others (SKYBRIDGE_BENCH_CERTS, default 2000), with Vault a round
// trip away (SKYBRIDGE_BENCH_VAULT_RTT, default 5ms): `SKYBRIDGE_BENCH=1
// go test -v -run TestBenchVaultBurstDown` in e2e/vault.
func TestBenchVaultBurstDown(t *testing.T) {
	if os.Getenv("SKYBRIDGE_BENCH") == "" {
		t.Skip("a benchmark: set SKYBRIDGE_BENCH=1")
	}
	others := 2000
	if n, err := strconv.Atoi(os.Getenv("SKYBRIDGE_BENCH_CERTS")); err == nil && n >= 0 {
		others = n
	}
	rtt := 5 * time.Millisecond
	if d, err := time.ParseDuration(os.Getenv("SKYBRIDGE_BENCH_VAULT_RTT")); err == nil {
		rtt = d
	}
	e := startVault(t)
	ctx := context.Background()
	cfg, _ := e.approleConfig(t, t.TempDir())
	// The gateway reaches Vault across a network; the set-up below does not.
	proxy := newCutProxy(t, e.addr)
	proxy.setDelay(rtt)
	cfg.Vault.Address = proxy.url()
	v, err := certs.OpenVault(ctx, cfg.Vault, meshPrefix, slog.New(slog.DiscardHandler))
	must(t, err)
	defer v.Close()
	gateways := 8
	if n, err := strconv.Atoi(os.Getenv("SKYBRIDGE_BENCH_GATEWAYS")); err == nil && n > 0 {
		gateways = n
	}
	spec := certs.VaultBurstSpec{Site: "burst-b", Expires: time.Now().Add(time.Hour), TokenTTL: 10 * time.Minute, OpenedBy: "gw-zrh"}
	for i := range gateways {
		node := attrs(fmt.Sprintf("burst-b-gw%d", i+1), "burst-b", fmt.Sprintf("100.96.9.%d", i+1))
		node.Provider, node.Jurisdiction = "aws", "NL"
		spec.Nodes = append(spec.Nodes, node)
	}
	start := time.Now()
	vb, err := v.OpenBurst(ctx, e.root.Token(), spec)
	up := time.Since(start)
	must(t, err)
	// The site's gateways' certificates, then the mount's other business.
	for i, node := range spec.Nodes {
		_, err = e.root.Logical().Write(e.pki+"/issue/"+vb.Gateways[i].Role, map[string]any{
			"common_name": node.Node, "uri_sans": node.PinnedURI().String(), "ip_sans": node.OverlayIP.String()})
		must(t, err)
	}
	var g errgroup.Group
	g.SetLimit(4)
	for i := range others {
		g.Go(func() error {
			_, err := e.root.Logical().Write(e.pki+"/issue/"+e.role, map[string]any{"common_name": fmt.Sprintf("host-%d.bank.example", i)})
			return err
		})
	}
	must(t, g.Wait())
	start = time.Now()
	closed, err := v.CloseBurst(ctx, e.root.Token(), "burst-b", vb.Nodes(), vb.Claim, "gw-zrh")
	took := time.Since(start)
	must(t, err)
	if len(closed.Revoked) != gateways {
		t.Fatalf("burst down revoked %d certificates, want the site's %d", len(closed.Revoked), gateways)
	}
	t.Logf("\n| gateways | certificates on the mount | round trip to Vault | burst up | burst down |\n|---|---|---|---|---|\n| %d | %d | %v | %v | %v |",
		gateways, others+gateways, rtt, up.Round(time.Millisecond), took.Round(time.Millisecond))
}
