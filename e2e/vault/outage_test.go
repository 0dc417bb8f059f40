package vault

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/freeport"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// cutProxy stands between gateways and Vault on loopback, passing TLS
// through untouched, so a test can take Vault off the network and bring
// it back on the same address: what a gateway sees of a Vault outage.
type cutProxy struct {
	t        *testing.T
	addr     string // host:port the gateways use
	upstream string
	mu       sync.Mutex
	ln       net.Listener
	conns    map[net.Conn]struct{}
	// delay holds back what Vault sends, each read of it: a round trip
	// to a Vault across a network rather than on loopback. Guarded by mu.
	delay time.Duration
}

// setDelay makes the connections opened from now on hold back Vault's
// answers by d.
func (p *cutProxy) setDelay(d time.Duration) {
	p.mu.Lock()
	p.delay = d
	p.mu.Unlock()
}

func newCutProxy(t *testing.T, vaultAddr string) *cutProxy {
	u, err := url.Parse(vaultAddr)
	must(t, err)
	// A port of freeport's band, not one the kernel picks: those come
	// from the ephemeral range, where an outgoing connection (a gateway's
	// to Vault, another test's) could be given it while the proxy is
	// down, and the proxy could not come back on its address.
	ports, err := freeport.Loopback(1)
	must(t, err)
	p := &cutProxy{t: t, addr: fmt.Sprintf("127.0.0.1:%d", ports[0]), upstream: u.Host, conns: map[net.Conn]struct{}{}}
	p.up()
	t.Cleanup(p.down)
	return p
}

// url is the Vault address through the proxy; the test Vault's
// certificate names 127.0.0.1, so it verifies here too.
func (p *cutProxy) url() string { return "https://" + p.addr }

// up listens (again) on the proxy's address.
func (p *cutProxy) up() {
	p.t.Helper()
	ln, err := net.Listen("tcp", p.addr)
	must(p.t, err)
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.pipe(c)
		}
	}()
}

func (p *cutProxy) pipe(c net.Conn) {
	v, err := net.Dial("tcp", p.upstream)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	p.conns[c], p.conns[v] = struct{}{}, struct{}{}
	delay := p.delay
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { io.Copy(v, c); done <- struct{}{} }()
	go func() { io.Copy(c, delayedReader{v, delay}); done <- struct{}{} }()
	<-done
	c.Close()
	v.Close()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, v)
	p.mu.Unlock()
}

type delayedReader struct {
	r io.Reader
	d time.Duration
}

func (d delayedReader) Read(b []byte) (int, error) {
	n, err := d.r.Read(b)
	if n > 0 && d.d > 0 {
		time.Sleep(d.d) // a round trip's latency, not a wait for a condition
	}
	return n, err
}

// down stops listening and cuts every connection: requests fail with
// "connection refused" or a reset.
func (p *cutProxy) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
}

// TestVaultOutageStart: a gateway whose Vault is unreachable starts on
// the identity, trust bundle, WireGuard key and gossip keyring it kept on
// disk when Vault last answered (a rotated WireGuard key included), and
// logs in once Vault is back. A gateway that never had Vault has nothing
// to start on and says so; a command run by hand is not made to wait; and
// a Vault that answers with a refusal is obeyed, copies or not.
func TestVaultOutageStart(t *testing.T) {
	e := startVault(t)
	proxy := newCutProxy(t, e.addr)
	ctx := t.Context()
	dir := t.TempDir()
	cfg, secretFile := e.approleConfig(t, dir)
	cfg.Vault.Address = proxy.url()
	a := attrs("gw-fra-7", "aws-eu-central-1", "100.96.1.7")

	p, err := certs.Open(ctx, cfg, slog.New(slog.DiscardHandler))
	must(t, err)
	id, _, err := p.Identity(ctx, a)
	must(t, err)
	_, err = p.Secrets().WireGuardKey(ctx, a.Node)
	must(t, err)
	rotated, err := certs.GenerateWGKey()
	must(t, err)
	must(t, p.Secrets().SetWireGuardKey(ctx, a.Node, rotated))
	kr, err := p.Secrets().GossipKeyring(ctx)
	must(t, err)
	p.Close()
	for _, f := range []string{certs.FileWireGuardKey, certs.FileGossipKeyring} {
		fi, err := os.Stat(filepath.Join(cfg.Dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("the copy %s: %v %v; want a 0600 file", f, fi.Mode(), err)
		}
	}

	proxy.down()
	// A command run by hand says at once that Vault is unreachable.
	if _, err := certs.Open(ctx, cfg, nil); !certs.VaultUnreachable(err) {
		t.Fatalf("open without riding out an outage: %v; want an unreachable Vault's error", err)
	}
	var logs syncbuf.Buffer
	ride := cfg
	ride.RideOutOutage = true
	p, err = certs.Open(ctx, ride, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("a gateway's start while Vault is unreachable: %v", err)
	}
	defer p.Close()
	got, tb, err := p.Identity(ctx, a)
	if err != nil {
		t.Fatalf("identity while Vault is unreachable: %v", err)
	}
	if got.Fingerprint() != id.Fingerprint() {
		t.Error("the identity kept on disk was not the one used")
	}
	if _, err := tb.VerifyCertificate(got.Certificate(), time.Now()); err != nil {
		t.Errorf("the trust bundle kept on disk refuses the identity: %v", err)
	}
	if k, err := p.Secrets().WireGuardKey(ctx, a.Node); err != nil || k.Public() != rotated.Public() {
		t.Errorf("WireGuard key while Vault is unreachable: %v, %v; want the rotated key %v", k.Public(), err, rotated.Public())
	}
	if got, err := p.Secrets().GossipKeyring(ctx); err != nil || !got.Same(kr) {
		t.Errorf("gossip keyring while Vault is unreachable: %v", err)
	}
	vs, ok := p.Secrets().(*certs.VaultSecrets)
	if !ok || !vs.ServedFromDisk() {
		t.Errorf("the secret store (%T) does not say it served the copies on disk", p.Secrets())
	}
	// Nothing is written through the copies alone: Vault holds the truth.
	if err := p.Secrets().SetWireGuardKey(ctx, a.Node, rotated); !certs.VaultUnreachable(err) {
		t.Errorf("a WireGuard key stored while Vault is unreachable: %v; want an unreachable Vault's error", err)
	}

	// A gateway that never reached Vault has nothing to start on.
	fresh := e.config(filepath.Join(dir, "fresh"), cfg.Vault.Auth)
	fresh.Vault.Address, fresh.RideOutOutage = proxy.url(), true
	pf, err := certs.Open(ctx, fresh, slog.New(slog.DiscardHandler))
	must(t, err)
	_, _, err = pf.Identity(ctx, attrs("gw-fra-8", "aws-eu-central-1", "100.96.1.8"))
	pf.Close()
	if err == nil || !strings.Contains(err.Error(), "trust bundle kept in") || !certs.VaultUnreachable(err) {
		t.Errorf("a first start without Vault: %v; want it to say nothing is kept", err)
	}

	// Vault back: the gateway logs in by itself.
	proxy.up()
	waitCond(t, 60*time.Second, "the gateway logs in once Vault is back", func() (bool, string) {
		_, err := p.Issuer().Trust(ctx)
		return err == nil, fmt.Sprint(err)
	})
	if !strings.Contains(logs.String(), "vault answers again") {
		t.Errorf("the gateway did not say it logged in:\n%s", logs.String())
	}

	// A refusal is not an outage. The gateway's SecretID is destroyed
	// while it restarts without Vault: once Vault answers, refusing its
	// login, it serves nothing more from its copies.
	proxy.down()
	// An operator's token in the environment, which the Vault client
	// takes by itself, is not the gateway's to use, nor to revoke when
	// its burst ends before it ever logged in.
	operator, err := e.root.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"default"}, TTL: "1h"})
	must(t, err)
	t.Setenv("VAULT_TOKEN", operator.Auth.ClientToken)
	var refusedLogs syncbuf.Buffer
	pr, err := certs.Open(ctx, ride, slog.New(slog.NewTextHandler(&refusedLogs, nil)))
	must(t, err)
	defer pr.Close()
	sid, err := os.ReadFile(secretFile)
	must(t, err)
	write(t, e.root, "auth/"+e.approleMount+"/role/gateway/secret-id/destroy", map[string]any{"secret_id": strings.TrimSpace(string(sid))})
	proxy.up()
	waitCond(t, 60*time.Second, "the copies are no longer served once Vault refuses the login", func() (bool, string) {
		_, err := pr.Secrets().WireGuardKey(ctx, a.Node)
		return err != nil && !certs.VaultUnreachable(err), fmt.Sprint(err)
	})
	if _, err := pr.Secrets().GossipKeyring(ctx); err == nil || certs.VaultUnreachable(err) {
		t.Errorf("gossip keyring after Vault refused the login: %v; want the refusal", err)
	}
	// Vault answers and has refused every login: the gateway holds no
	// token, and revoking its login touches nobody else's.
	if err := pr.Secrets().(*certs.VaultSecrets).RevokeLogin(ctx); err != nil {
		t.Errorf("revoking the login of a gateway that has none: %v", err)
	}
	if _, err := e.root.Auth().Token().Lookup(operator.Auth.ClientToken); err != nil {
		t.Fatalf("the operator's token from the environment was revoked: %v", err)
	}
	// And a start while Vault refuses does not happen at all.
	if _, err := certs.Open(ctx, ride, slog.New(slog.DiscardHandler)); err == nil || certs.VaultUnreachable(err) {
		t.Errorf("a start with a destroyed SecretID: %v; want Vault's refusal", err)
	}
}

// TestVaultOutageGatewayRestart: a gateway killed while the mesh rotates
// its gossip key and restarted while Vault is down comes up on what it
// kept on disk; the keyring it kept is the old one, which the mesh no
// longer reads, so it stays apart — until Vault is back, when it takes
// the mesh's keyring from there and peers again without a restart.
func TestVaultOutageGatewayRestart(t *testing.T) {
	e := startVault(t)
	proxy := newCutProxy(t, e.addr)
	bin := buildSkybridge(t)
	dir := t.TempDir()
	ports, err := freeport.Loopback(4)
	must(t, err)
	gw := func(name, node, ip string, i int, seed string) (cfg, sock string) {
		roleFile, secretFile := e.appRole(t, dir, false)
		gdir := filepath.Join(dir, name)
		must(t, os.MkdirAll(gdir, 0o700))
		// Each gateway has its own SecretID file.
		own := filepath.Join(gdir, "secret-id")
		must(t, os.Rename(secretFile, own))
		var seeds []string
		if seed != "" {
			seeds = []string{seed}
		}
		cfg = filepath.Join(dir, name+".hcl")
		must(t, os.WriteFile(cfg, []byte(e.gatewayHCL(staticGateway{
			stateDir: gdir, node: node, site: "site-" + name, region: "r-" + name, jurisdiction: "CH",
			overlay: ip, routes: "[]", iface: "sbvo" + name,
			vaultAddr: proxy.url(), roleFile: roleFile, secretFile: own, gossipPort: ports[2*i], wgPort: ports[2*i+1], seeds: seeds,
		})), 0o644))
		return cfg, filepath.Join(gdir, "control.sock")
	}
	cfgA, sockA := gw("a", "gw-a", "100.96.0.11", 0, "")
	cfgB, sockB := gw("b", "gw-b", "100.96.0.12", 1, fmt.Sprintf("127.0.0.1:%d", ports[0]))
	peerOf := func(sock, node string) func() (bool, string) {
		return func() (bool, string) {
			st, err := gwStatus(bin, sock)
			if err != nil {
				return false, err.Error()
			}
			for _, m := range st.Members {
				if m.Node == node {
					return m.State == "verified" && m.Peer, m.State
				}
			}
			return false, "not a member"
		}
	}
	a := startGW(t, bin, nil, "gateway", "run", "--config", cfgA)
	b := startGW(t, bin, nil, "gateway", "run", "--config", cfgB)
	waitCond(t, 60*time.Second, "gw-b a verified peer of gw-a", peerOf(sockA, "gw-b"))
	waitCond(t, 30*time.Second, "gw-a a verified peer of gw-b", peerOf(sockB, "gw-a"))

	// gw-b crashes; the mesh rotates its gossip key without it.
	b.cmd.Process.Kill()
	<-b.exited
	b.exited <- nil
	waitCond(t, 60*time.Second, "gw-a no longer counts gw-b", func() (bool, string) {
		ok, state := peerOf(sockA, "gw-b")()
		return !ok, state
	})
	if out, err := exec.Command(bin, "keys", "rotate-gossip", "--force", "--socket", sockA).CombinedOutput(); err != nil || !strings.Contains(string(out), "left out, away: gw-b") {
		t.Fatalf("rotate the gossip key: %v\n%s\n%s", err, out, a.log.String())
	}

	// Vault down, gw-b back: it runs on what it kept.
	proxy.down()
	b = startGW(t, bin, nil, "gateway", "run", "--config", cfgB)
	waitCond(t, 60*time.Second, "gw-b runs while Vault is down", func() (bool, string) {
		_, err := gwStatus(bin, sockB)
		return err == nil, fmt.Sprint(err)
	})
	if !strings.Contains(b.log.String(), "vault unreachable: starting on the identity and secrets kept on disk") {
		t.Errorf("gw-b did not say it started without Vault:\n%s", b.log.String())
	}
	// Its status says so too, and that Vault has not answered since.
	if st, err := gwStatus(bin, sockB); err != nil || st.Identity.Issuer != "vault" || !st.Identity.StartedOnDisk || st.Identity.IssuerAnswered != nil {
		t.Errorf("gw-b's status during the outage: %+v, %v; want issuer vault, started on disk, no answer", st, err)
	}
	// Its keyring is the old one, which gw-a no longer reads: its join
	// fails.
	waitCond(t, 60*time.Second, "gw-b's join on the old keyring fails", func() (bool, string) {
		return strings.Contains(b.log.String(), "no seed answered"), "no failed join logged"
	})
	if ok, state := peerOf(sockA, "gw-b")(); ok {
		t.Fatalf("gw-b rejoined on a keyring the mesh rotated away (%s)", state)
	}

	proxy.up()
	waitCond(t, 90*time.Second, "gw-b a verified peer of gw-a again once Vault is back", peerOf(sockA, "gw-b"))
	waitCond(t, 30*time.Second, "gw-a a verified peer of gw-b again", peerOf(sockB, "gw-a"))
	if !strings.Contains(b.log.String(), "gossip keyring brought up to the mesh's from vault") {
		t.Errorf("gw-b did not say it took the mesh's keyring:\n%s", b.log.String())
	}
}

// TestBenchVaultOutageStart prints how long a gateway's start on what it
// kept takes while Vault refuses connections (the client's retries) and
// while it drops them (startLoginTimeout): `SKYBRIDGE_BENCH=1 go test -v
// -run TestBenchVaultOutageStart` in e2e/vault.
func TestBenchVaultOutageStart(t *testing.T) {
	if os.Getenv("SKYBRIDGE_BENCH") == "" {
		t.Skip("a benchmark: set SKYBRIDGE_BENCH=1")
	}
	e := startVault(t)
	proxy := newCutProxy(t, e.addr)
	ctx := t.Context()
	cfg, _ := e.approleConfig(t, t.TempDir())
	cfg.Vault.Address = proxy.url()
	a := attrs("gw-fra-9", "aws-eu-central-1", "100.96.1.9")
	start := func(c certs.Config) time.Duration {
		t0 := time.Now()
		p, err := certs.Open(ctx, c, slog.New(slog.DiscardHandler))
		must(t, err)
		defer p.Close()
		_, _, err = p.Identity(ctx, a)
		must(t, err)
		_, err = p.Secrets().WireGuardKey(ctx, a.Node)
		must(t, err)
		_, err = p.Secrets().GossipKeyring(ctx)
		must(t, err)
		return time.Since(t0)
	}
	up := start(cfg) // the first start, with Vault: obtains and keeps
	ride := cfg
	ride.RideOutOutage = true
	proxy.down()
	refused := start(ride)
	// A Vault that drops connections: accepted, never answered.
	ln, err := net.Listen("tcp", proxy.addr)
	must(t, err)
	defer ln.Close()
	var held []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c) // kept open, never read
		}
	}()
	dropped := start(ride)
	t.Logf("\n| Vault | start to identity, WireGuard key and gossip keyring |\n|---|---|\n| answering (first start) | %v |\n| refusing connections | %v |\n| dropping connections | %v |",
		up.Round(time.Millisecond), refused.Round(time.Millisecond), dropped.Round(time.Millisecond))
}
