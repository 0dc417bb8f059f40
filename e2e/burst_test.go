package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// burstGW is a fresh cloud server: a namespace on the underlay with a
// server network behind it, and a gateway configuration without a node
// block.
type burstGW struct {
	ns, dir, cfg, ifname, tokenFile string
	cmd                             *exec.Cmd
	log                             string
}

// addBurstServer makes a namespace at underlay with a server at address
// server running an echo service on port 7000, and writes its gateway
// configuration.
func (l *lab) addBurstServer(short, underlay, server string) *burstGW {
	l.t.Helper()
	b := &burstGW{ns: l.addHost(short, underlay), dir: filepath.Join(l.dir, short), ifname: "sb" + l.id + short}
	l.nsip(b.ns, "addr", "add", server+"/32", "dev", "lo") // the server (no dummy interfaces here)
	l.start(b.ns, "echo-"+short, []string{helperEnv + "=echo " + server + ":7000"}, os.Args[0])
	b.cfg = filepath.Join(l.dir, short+".hcl")
	b.tokenFile = filepath.Join(l.dir, short+".token")
	b.log = "gw-" + short
	cfg := fmt.Sprintf(`state_dir = %q
gossip {
  bind = "%s:7946"
}
wireguard {
  interface = %q
  mode      = "tun"
}
`, b.dir, underlay, b.ifname)
	if err := os.WriteFile(b.cfg, []byte(cfg), 0o644); err != nil {
		l.t.Fatal(err)
	}
	return b
}

type burstGrant struct {
	Site         string    `json:"site"`
	Expires      time.Time `json:"expires"`
	TokenExpires time.Time `json:"token_expires"`
	Tokens       []string  `json:"tokens"`
	Classes      []struct {
		Class   string `json:"class"`
		Allowed bool   `json:"allowed"`
	} `json:"classes"`
}

// burstUp runs `burst up` on the gateway at socket; the lab's logs must
// hold none of the tokens it grants.
func (l *lab) burstUp(socket string, args ...string) burstGrant {
	t := l.t
	t.Helper()
	out, _ := sb(t, 0, append([]string{"burst", "up", "--socket", socket, "--json"}, args...)...)
	var g burstGrant
	if err := json.Unmarshal([]byte(out), &g); err != nil {
		t.Fatalf("burst up output: %v\n%s", err, out)
	}
	for _, tok := range g.Tokens {
		l.secrets.add(joinToken, "a token of burst site "+g.Site, tok)
	}
	return g
}

// burstLab starts Zurich (holding the CA, enrolling on 192.0.2.1:7947)
// and Frankfurt, and waits until they peer.
func burstLab(t *testing.T) (l *lab, zrh, fra *meshSite) {
	l = newLab(t)
	caDir, pol := l.signedPolicy([]byte(policyV1))
	zrh = &meshSite{short: "1", site: "onprem-zrh", region: "zrh-dc1", provider: "onprem", jur: "CH", underlay: "192.0.2.1", overlay: "100.96.0.1", route: "10.1.0.0/16", classes: "pii-eu,risk-batch"}
	fra = &meshSite{short: "2", site: "aws-eu-central-1", region: "eu-central-1", provider: "aws", jur: "DE", underlay: "192.0.2.2", overlay: "100.96.0.2", route: "10.2.0.0/16", classes: "pii-eu,risk-batch"}
	for _, s := range []*meshSite{zrh, fra} {
		s.ns = l.addHost(s.short, s.underlay)
		l.writeGatewayConfig(s, caDir, pol, []string{"192.0.2.1:7946"})
	}
	// Zurich holds the CA: it renews its own identity from it and enrols
	// burst gateways (enrollment on 192.0.2.1:7947 by default).
	cfg, _ := os.ReadFile(zrh.cfg)
	withCA := strings.Replace(string(cfg), "identity {\n", fmt.Sprintf("identity {\n  ca_dir = %q\n", caDir), 1)
	if err := os.WriteFile(zrh.cfg, []byte(withCA), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*meshSite{zrh, fra} {
		l.startGateway(s, 1)
	}
	waitFor(t, 60*time.Second, "Zurich and Frankfurt peer", func() (bool, string) {
		st, err := status(zrh.socket)
		if err != nil {
			return false, err.Error()
		}
		p := st.peers()
		return len(p) == 1, fmt.Sprintf("peers %v", p)
	})
	return l, zrh, fra
}

// TestBurstSite opens a burst site in "Amsterdam" (NL) from the Zurich
// gateway, which holds the mesh CA. A fresh gateway enrols with the join
// token, joins the mesh and advertises the site's servers, which the
// Zurich rack then reaches over the mesh (join-to-routable time measured);
// the token does not work twice; the residency policy lets risk batches
// run there and keeps pii-eu out before the first byte; and at the end of
// the TTL the burst gateway leaves, its identity is revoked and removed,
// and no gateway keeps anything of it. A second burst site ended early by
// `skybridge burst down` goes the same way, and an expired token is
// refused.
func TestBurstSite(t *testing.T) {
	l, zrh, fra := burstLab(t)
	defer l.dumpLogs()
	ams := l.addBurstServer("b", "192.0.2.9", "10.9.0.1")
	par := l.addBurstServer("c", "192.0.2.10", "10.10.0.1")

	// Refusals before anything is issued.
	if _, e := sb(t, 1, "burst", "up", "--socket", fra.socket, "--site", "burst-ams", "--provider", "aws", "--region", "eu-west-1",
		"--jurisdiction", "NL", "--ttl", "1h", "--routes", "10.9.0.0/24"); !strings.Contains(e, "does not open burst sites") {
		t.Fatalf("burst up on a gateway without the CA: %s", e)
	}
	if _, e := sb(t, 1, "burst", "up", "--socket", zrh.socket, "--site", "burst-ams", "--provider", "aws", "--region", "eu-west-1",
		"--jurisdiction", "NL", "--ttl", "1h", "--routes", "10.2.0.0/24"); !strings.Contains(e, "overlaps 10.2.0.0/16") {
		t.Fatalf("burst routes overlapping Frankfurt's: %s", e)
	}

	const ttl = 75 * time.Second
	grant := l.burstUp(zrh.socket, "--site", "burst-ams", "--provider", "aws", "--region", "eu-west-1", "--jurisdiction", "NL",
		"--ttl", ttl.String(), "--label", "classes=risk-batch", "--routes", "10.9.0.0/24")
	opened := time.Now()
	verdict := map[string]bool{}
	for _, c := range grant.Classes {
		verdict[c.Class] = c.Allowed
	}
	if !verdict["risk-batch"] || verdict["pii-eu"] || len(grant.Tokens) != 1 {
		t.Fatalf("burst up: classes %+v, %d tokens; want risk-batch allowed, pii-eu not, one token", grant.Classes, len(grant.Tokens))
	}
	if err := os.WriteFile(ams.tokenFile, []byte(grant.Tokens[0]+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ams.cmd = l.start(ams.ns, ams.log, nil, skybridge, "--log-level", "debug", "gateway", "run", "--config", ams.cfg, "--join-token-file", ams.tokenFile)
	routable := waitFor(t, 60*time.Second, "Zurich reaches a server behind the burst gateway", func() (bool, string) {
		out, err := l.nsexec(zrh.ns, "env", helperEnv+"=dial 10.9.0.1:7000", os.Args[0])
		return err == nil, out
	})
	t.Logf("burst gateway: join-to-routable %s (process start to a TCP echo from Zurich through the mesh)", routable.Round(10*time.Millisecond))
	// Now, while it is surely a member: what follows has no time budget,
	// and the burst ends ttl after it opened.
	amsKey := publicKeyOf(t, zrh.socket, "burst-ams-gw1")
	l.secrets.addDir(ams.dir) // removed when the burst ends

	// The token is spent: a second server presenting it gets a clear no.
	out, err := l.nsexec(par.ns, "timeout", "30", skybridge, "gateway", "run", "--config", par.cfg, "--join-token-file", ams.tokenFile) // a token wrongly accepted would run on
	if err == nil || !strings.Contains(out, "already used") {
		t.Fatalf("token reuse: %v\n%s", err, out)
	}

	// What the burst site holds is the policy's call: pii-eu is refused
	// with nothing sent, risk batches move.
	img := filepath.Join(l.dir, "risk.raw")
	makeImage(t, img, img+".qcow2", 64<<20, 4<<20, 256<<10)
	out, _ = sb(t, 1, "migrate", "run", img, "--to", "burst-ams", "--class", "pii-eu", "--name", "pii", "--socket", zrh.socket)
	if !strings.Contains(out, "REFUSED by the residency policy") || !strings.Contains(out, "nothing was sent") {
		t.Fatalf("pii-eu to the burst site:\n%s", out)
	}
	ch, cmd := startMigration(t, "migrate", "run", img, "--to", "burst-ams", "--class", "risk-batch", "--name", "risk", "--socket", zrh.socket)
	if last := lastEvent(t, ch, cmd); last.Error != "" || last.Record == nil || last.Record.State != "done" {
		t.Fatalf("risk-batch to the burst site: %+v", last)
	}
	compareImages(t, img, filepath.Join(ams.dir, "images", "risk.raw"))

	// A second burst site, ended early by burst down.
	g2 := l.burstUp(zrh.socket, "--site", "burst-par", "--provider", "aws", "--region", "eu-west-3", "--jurisdiction", "FR",
		"--ttl", "1h", "--label", "classes=risk-batch", "--routes", "10.10.0.0/24")
	os.WriteFile(par.tokenFile, []byte(g2.Tokens[0]), 0o600)
	par.cmd = l.start(par.ns, par.log, nil, skybridge, "gateway", "run", "--config", par.cfg, "--join-token-file", par.tokenFile)
	waitFor(t, 60*time.Second, "Zurich reaches a server behind the second burst gateway", func() (bool, string) {
		out, err := l.nsexec(zrh.ns, "env", helperEnv+"=dial 10.10.0.1:7000", os.Args[0])
		return err == nil, out
	})
	parKey := publicKeyOf(t, zrh.socket, "burst-par-gw1")
	l.secrets.addDir(par.dir)
	downAt := time.Now()
	out, _ = sb(t, 0, "burst", "down", "--socket", zrh.socket, "--site", "burst-par")
	if !strings.Contains(out, "1 identities revoked") {
		t.Fatalf("burst down: %s", out)
	}
	l.checkBurstGone(par, "burst-par-gw1", parKey, "10.10.0.0/24", downAt, 30*time.Second, zrh, fra)

	// An expired token is refused with a clear error.
	g3 := l.burstUp(zrh.socket, "--site", "burst-lhr", "--provider", "aws", "--region", "eu-west-2", "--jurisdiction", "GB",
		"--ttl", "1h", "--token-ttl", "1s", "--routes", "10.11.0.0/24")
	time.Sleep(time.Until(g3.TokenExpires) + 100*time.Millisecond) // the token's expiry is the condition
	os.WriteFile(par.tokenFile, []byte(g3.Tokens[0]), 0o600)
	out, err = l.nsexec(par.ns, "timeout", "30", skybridge, "gateway", "run", "--config", par.cfg, "--join-token-file", par.tokenFile)
	if err == nil || !strings.Contains(out, "expired") {
		t.Fatalf("expired token: %v\n%s", err, out)
	}

	// The first burst runs out.
	t.Logf("waiting for the end of burst-ams (%s after it opened)", ttl)
	l.checkBurstGone(ams, "burst-ams-gw1", amsKey, "10.9.0.0/24", grant.Expires, ttl-time.Since(opened)+40*time.Second, zrh, fra)
	out, _ = sb(t, 0, "burst", "list", "--socket", zrh.socket)
	if !strings.Contains(out, "burst-ams") || !strings.Contains(out, "(expired)") || !strings.Contains(out, "(ended by burst down)") {
		t.Fatalf("burst list:\n%s", out)
	}
	if out, err := l.nsexec(zrh.ns, "env", helperEnv+"=dial 10.9.0.1:7000", os.Args[0]); err == nil {
		t.Fatalf("the ended burst site is still reachable: %s", out)
	}
}

func publicKeyOf(t *testing.T, socket, node string) string {
	t.Helper()
	st, err := status(socket)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Members {
		if m.Node == node && m.PublicKey != "" {
			return m.PublicKey
		}
	}
	t.Fatalf("%s is not a member", node)
	return ""
}

// checkBurstGone waits for a burst gateway to end on its own (exit 0,
// saying so, its secrets removed) and checks that no gateway keeps a
// trace of it: no WireGuard peer, no route, no member, nothing in the
// saved membership. It logs how long after since each took.
func (l *lab) checkBurstGone(b *burstGW, node, key, route string, since time.Time, within time.Duration, sites ...*meshSite) {
	t := l.t
	t.Helper()
	// A caller whose earlier steps ran long may have no time left to
	// give: the exit still gets some, rather than a race between a
	// timer that has already fired and the exit.
	within = max(within, 10*time.Second)
	exited := make(chan error, 1)
	go func() { exited <- b.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("burst gateway %s exited with %v", node, err)
		}
	case <-time.After(within):
		b.cmd.Process.Signal(syscall.SIGKILL)
		t.Fatalf("burst gateway %s still running %s later", node, within)
	}
	exitAfter := time.Since(since)
	logb, _ := os.ReadFile(filepath.Join(l.dir, b.log+".log"))
	if !strings.Contains(string(logb), "has ended") {
		t.Errorf("burst gateway %s did not say why it stopped", node)
	}
	for _, f := range []string{"node.key", "node.crt", "wireguard.key", "gossip.keyring"} {
		if _, err := os.Stat(filepath.Join(b.dir, "identity", f)); !os.IsNotExist(err) {
			t.Errorf("%s: %s left behind (%v)", node, f, err)
		}
	}
	for _, s := range sites {
		var pending string
		defer func() {
			if pending != "" {
				t.Logf("%s: on %s the last thing to go was: %s", node, s.site, pending)
			}
		}()
		took := waitFor(t, 45*time.Second, node+" gone from "+s.site, func() (bool, string) {
			ok, why := l.burstGoneFrom(s, node, key, route)
			if !ok {
				pending = why
			}
			return ok, why
		})
		if took < 2*time.Second {
			pending = ""
		}
	}
	t.Logf("%s: exited at %+.2f s from the end, gone from every gateway (tunnel, route, membership, saved state) at %+.2f s",
		node, exitAfter.Seconds(), time.Since(since).Seconds())
}

// burstGoneFrom reports whether s keeps nothing of a burst gateway, or
// what it keeps.
func (l *lab) burstGoneFrom(s *meshSite, node, key, route string) (bool, string) {
	peers, err := l.wgDump(s.ns, s.ifname)
	if err != nil {
		return false, err.Error()
	}
	if _, ok := peers[key]; ok {
		return false, "still a WireGuard peer"
	}
	if r := l.nsip(s.ns, "route", "show", route); strings.TrimSpace(r) != "" {
		return false, "route left: " + r
	}
	st, err := status(s.socket)
	if err != nil {
		return false, err.Error()
	}
	for _, m := range st.Members {
		if m.Node == node {
			return false, "still a member: " + m.State + " " + m.Reason
		}
	}
	if saved, _ := os.ReadFile(filepath.Join(s.dir, "members.json")); strings.Contains(string(saved), node) {
		return false, "still in the saved membership"
	}
	return true, ""
}

// TestBenchBurstJoin opens burst sites one after another, each with a
// fresh gateway in its own namespace, and measures join to routable
// (process start to a TCP echo from Zurich through the mesh) and burst
// down to gone; it prints the figures.
func TestBenchBurstJoin(t *testing.T) {
	benchmarkOnly(t)
	l, zrh, fra := burstLab(t)
	defer l.dumpLogs()
	n := envInt("SKYBRIDGE_BENCH_JOINS", 10)
	var joins, gone []time.Duration
	for i := range n {
		short := fmt.Sprintf("j%d", i)
		server := fmt.Sprintf("10.%d.0.1", 20+i)
		b := l.addBurstServer(short, fmt.Sprintf("192.0.2.%d", 20+i), server)
		site := fmt.Sprintf("burst-%d", i)
		g := l.burstUp(zrh.socket, "--site", site, "--provider", "aws", "--region", "eu-west-1", "--jurisdiction", "NL",
			"--ttl", "1h", "--label", "classes=risk-batch", "--routes", fmt.Sprintf("10.%d.0.0/24", 20+i))
		os.WriteFile(b.tokenFile, []byte(g.Tokens[0]), 0o600)
		b.cmd = l.start(b.ns, b.log, nil, skybridge, "gateway", "run", "--config", b.cfg, "--join-token-file", b.tokenFile)
		joins = append(joins, waitFor(t, 60*time.Second, site+" routable", func() (bool, string) {
			out, err := l.nsexec(zrh.ns, "env", helperEnv+"=dial "+server+":7000", os.Args[0])
			return err == nil, out
		}))
		key := publicKeyOf(t, zrh.socket, site+"-gw1")
		down := time.Now()
		sb(t, 0, "burst", "down", "--socket", zrh.socket, "--site", site)
		l.checkBurstGone(b, site+"-gw1", key, fmt.Sprintf("10.%d.0.0/24", 20+i), down, 30*time.Second, zrh, fra)
		gone = append(gone, time.Since(down))
	}
	slices.Sort(joins)
	slices.Sort(gone)
	ms := func(d time.Duration) string { return fmt.Sprintf("%d ms", d.Milliseconds()) }
	fmt.Printf("%d burst gateway(s), one after another\n| | median | min | max |\n|---|---|---|---|\n| join to routable | %s | %s | %s |\n| burst down to gone everywhere | %s | %s | %s |\n",
		n, ms(joins[n/2]), ms(joins[0]), ms(joins[n-1]), ms(gone[n/2]), ms(gone[0]), ms(gone[n-1]))
}
