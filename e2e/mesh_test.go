package e2e

import (
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// meshSite describes one site of the e2e mesh.
type meshSite struct {
	short, site, region, provider, jur string
	underlay, overlay, route, classes  string

	ns, ifname, dir, cfg, socket string
	gwCmd                        *exec.Cmd
}

const policyV1 = `policy {
  name    = "e2e"
  version = 1
}
class "pii-eu" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    jurisdiction = ["CH", "DE"]
  }
}
class "risk-batch" {
  allow "transit" {
    site = ["*"]
  }
  allow "store" {
    site = ["*"]
  }
}
`

// policyV2 keeps risk batches out of transit through Germany: the only
// class Frankfurt and N. Virginia share, so exactly their tunnel goes.
var policyV2 = strings.Replace(strings.Replace(policyV1, "version = 1", "version = 2", 1),
	"class \"risk-batch\" {\n  allow \"transit\" {\n    site = [\"*\"]", "class \"risk-batch\" {\n  allow \"transit\" {\n    jurisdiction = [\"CH\", \"US\"]", 1)

func (l *lab) writeGatewayConfig(s *meshSite, caDir, policyFile string, seeds []string) {
	l.t.Helper()
	s.dir = filepath.Join(l.dir, s.short)
	s.cfg = filepath.Join(l.dir, s.short+".hcl")
	s.socket = filepath.Join(s.dir, "control.sock")
	s.ifname = "sb" + l.id + s.short
	// The certificate's labels and the node block's must be the same.
	// Every lab site attests that its store encrypts at rest, which the
	// example policy requires to store EU personal data.
	labels := map[string]string{"classes": s.classes, "certified": "iso27001", "encryption_at_rest": "true"}
	issue := []string{"ca", "issue", "--ca", caDir, "--node", "gw-" + s.short, "--site", s.site, "--region", s.region,
		"--provider", s.provider, "--jurisdiction", s.jur, "--overlay-ip", s.overlay, "--route", s.route, "--out", filepath.Join(s.dir, "identity")}
	var hclLabels []string
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		issue = append(issue, "--label", k+"="+labels[k])
		hclLabels = append(hclLabels, fmt.Sprintf("%s = %q", k, labels[k]))
	}
	sb(l.t, 0, issue...)
	q := func(xs []string) string { return `["` + strings.Join(xs, `", "`) + `"]` }
	pol := ""
	if policyFile != "" {
		pol = fmt.Sprintf("policy {\n  file = %q\n}\n", policyFile)
	}
	cfg := fmt.Sprintf(`state_dir = %q
node {
  name         = "gw-%s"
  site         = %q
  region       = %q
  provider     = %q
  jurisdiction = %q
  overlay_ip   = %q
  routes       = [%q]
  labels       = { %s }
}
identity {
  dir = %q
}
gossip {
  bind  = "%s:7946"
  seeds = %s
}
wireguard {
  interface = %q
  port      = 51820
  mode      = "tun"
}
%s`, s.dir, s.short, s.site, s.region, s.provider, s.jur, s.overlay, s.route, strings.Join(hclLabels, ", "), filepath.Join(s.dir, "identity"), s.underlay, q(seeds), s.ifname, pol)
	if err := os.WriteFile(s.cfg, []byte(cfg), 0o644); err != nil {
		l.t.Fatal(err)
	}
}

// threeSites builds the bank's three sites — Zurich on-prem, AWS
// Frankfurt, AWS N. Virginia — as namespaces with gateway configurations
// (not started). classes are their "classes" labels.
func (l *lab) threeSites(caDir, policyFile string, classes [3]string) []*meshSite {
	sites := []*meshSite{
		{short: "1", site: "onprem-zrh", region: "zrh-dc1", provider: "onprem", jur: "CH", underlay: "192.0.2.1", overlay: "100.96.0.1", route: "10.1.0.0/16", classes: classes[0]},
		{short: "2", site: "aws-eu-central-1", region: "eu-central-1", provider: "aws", jur: "DE", underlay: "192.0.2.2", overlay: "100.96.0.2", route: "10.2.0.0/16", classes: classes[1]},
		{short: "3", site: "aws-us-east-1", region: "us-east-1", provider: "aws", jur: "US", underlay: "192.0.2.3", overlay: "100.96.0.3", route: "10.3.0.0/16", classes: classes[2]},
	}
	for _, s := range sites {
		s.ns = l.addHost(s.short, s.underlay)
		l.writeGatewayConfig(s, caDir, policyFile, []string{"192.0.2.1:7946", "192.0.2.2:7946"})
	}
	return sites
}

// signedSites makes a CA and a signed policy (source src) in the lab and
// the three sites configured to use them (not started).
func (l *lab) signedSites(src []byte, classes [3]string) (caDir string, sites []*meshSite) {
	l.t.Helper()
	caDir, pol := l.signedPolicy(src)
	return caDir, l.threeSites(caDir, pol, classes)
}

// signedPolicy makes a CA in the lab and the policy src signed by it.
func (l *lab) signedPolicy(src []byte) (caDir, pol string) {
	l.t.Helper()
	caDir = filepath.Join(l.dir, "ca")
	sb(l.t, 0, "ca", "init", "--dir", caDir)
	pol = filepath.Join(l.dir, "residency.hcl")
	if err := os.WriteFile(pol, src, 0o644); err != nil {
		l.t.Fatal(err)
	}
	sb(l.t, 0, "policy", "sign", "--policy", pol, "--ca", caDir)
	return caDir, pol
}

// startQuiet starts a site's gateway at the default log level, as in
// production: for benchmarks, where the logger is not what is measured.
func (l *lab) startQuiet(s *meshSite, n int) {
	s.gwCmd = l.start(s.ns, fmt.Sprintf("gw-%s-%d", s.short, n), nil, skybridge, "gateway", "run", "--config", s.cfg)
}

func (l *lab) startGateway(s *meshSite, n int) {
	s.gwCmd = l.start(s.ns, fmt.Sprintf("gw-%s-%d", s.short, n), nil, skybridge, "--log-level", "debug", "gateway", "run", "--config", s.cfg)
}

// TestMeshEndToEnd builds three sites as network namespaces, runs the real
// gateway binary (TUN mode) in each and checks, in order: convergence and
// TCP over every overlay pair; `wg show` agreeing with the plan; a
// SIGKILLed gateway leaving and returning without disturbing the other
// tunnels; a rogue holding the gossip key but a foreign identity never
// becoming a peer; a 60-second cut healing by itself; and a policy change
// removing exactly one tunnel while a tampered policy is refused.
func TestMeshEndToEnd(t *testing.T) {
	l := newLab(t)
	defer l.dumpLogs()
	caDir := filepath.Join(l.dir, "ca")
	sb(t, 0, "ca", "init", "--dir", caDir)
	pol := filepath.Join(l.dir, "residency.hcl")
	os.WriteFile(pol, []byte(policyV1), 0o644)
	sb(t, 0, "policy", "sign", "--policy", pol, "--ca", caDir)

	sites := l.threeSites(caDir, pol, [3]string{"pii-eu,risk-batch", "pii-eu,risk-batch", "risk-batch"})
	for _, s := range sites {
		l.start(s.ns, "echo-"+s.short, []string{helperEnv + "=echo 0.0.0.0:7000"}, os.Args[0])
	}
	start := time.Now()
	for _, s := range sites {
		l.startGateway(s, 1)
	}

	keys := map[string]string{} // node → WireGuard public key
	peersOf := func(s *meshSite) map[string]wgPeer {
		p, err := l.wgDump(s.ns, s.ifname)
		if err != nil {
			return nil
		}
		return p
	}
	// nodesIn names the peers `wg show` lists, by node.
	nodesIn := func(s *meshSite) []string {
		var out []string
		for k := range peersOf(s) {
			for n, nk := range keys {
				if nk == k {
					out = append(out, n)
				}
			}
		}
		slices.Sort(out)
		return out
	}
	expectPeers := func(want map[string][]string) func() (bool, string) {
		return func() (bool, string) {
			var state []string
			ok := true
			for _, s := range sites {
				got := nodesIn(s)
				state = append(state, fmt.Sprintf("%s:%v", s.short, got))
				if !slices.Equal(got, want["gw-"+s.short]) {
					ok = false
				}
			}
			return ok, strings.Join(state, " ")
		}
	}
	fullMesh := map[string][]string{"gw-1": {"gw-2", "gw-3"}, "gw-2": {"gw-1", "gw-3"}, "gw-3": {"gw-1", "gw-2"}}
	dial := func(from, to *meshSite) error {
		out, err := l.nsexec(from.ns, "env", helperEnv+"=dial "+to.overlay+":7000", os.Args[0])
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}

	t.Run("converge and carry TCP between every pair", func(t *testing.T) {
		waitFor(t, 60*time.Second, "gateways report their keys", func() (bool, string) {
			for _, s := range sites {
				st, err := status(s.socket)
				if err != nil {
					return false, err.Error()
				}
				keys[st.Node] = st.PublicKey
			}
			return true, ""
		})
		took := waitFor(t, 60*time.Second, "full mesh in wg show", expectPeers(fullMesh))
		t.Logf("3 gateways converged %s after start (%s after the last status answer)", time.Since(start).Round(time.Millisecond), took.Round(time.Millisecond))
		for _, a := range sites {
			for _, b := range sites {
				if a == b {
					continue
				}
				waitFor(t, 20*time.Second, fmt.Sprintf("TCP %s → %s over the overlay", a.short, b.short), func() (bool, string) {
					err := dial(a, b)
					return err == nil, fmt.Sprint(err)
				})
			}
		}
	})

	t.Run("a second gateway on a running one's state directory is refused", func(t *testing.T) {
		s := sites[0]
		out, err := l.nsexec(s.ns, "timeout", "30", skybridge, "gateway", "run", "--config", s.cfg)
		if err == nil || !strings.Contains(out, "is in use by another gateway (pid ") {
			t.Fatalf("a second gateway with gw-%s's configuration: %v\n%s", s.short, err, out)
		}
		for _, b := range sites[1:] {
			if err := dial(s, b); err != nil {
				t.Fatalf("gw-%s's tunnel to gw-%s after the second gateway was refused: %v", s.short, b.short, err)
			}
		}
	})

	t.Run("wg show lists exactly the planned peers and allowed IPs", func(t *testing.T) {
		for _, s := range sites {
			peers := peersOf(s)
			for _, o := range sites {
				if o == s {
					continue
				}
				p, ok := peers[keys["gw-"+o.short]]
				if !ok {
					t.Fatalf("%s: wg show lacks gw-%s", s.short, o.short)
				}
				got := slices.Clone(p.AllowedIPs)
				slices.Sort(got)
				want := []string{o.route, o.overlay + "/32"}
				slices.Sort(want)
				if !slices.Equal(got, want) {
					t.Errorf("%s: allowed IPs of gw-%s = %v, want %v", s.short, o.short, got, want)
				}
				if p.Endpoint != o.underlay+":51820" {
					t.Errorf("%s: endpoint of gw-%s = %s", s.short, o.short, p.Endpoint)
				}
			}
			if len(peers) != 2 {
				t.Errorf("%s: %d peers in wg show, want 2", s.short, len(peers))
			}
			// The kernel routes the remote sites' prefixes into the tunnel.
			routes, _ := l.nsexec(s.ns, "ip", "route", "show", "dev", s.ifname)
			for _, o := range sites {
				if o != s && !strings.Contains(routes, o.route) {
					t.Errorf("%s: no route to %s via %s:\n%s", s.short, o.route, s.ifname, routes)
				}
			}
		}
	})

	t.Run("SIGKILLed gateway leaves and returns; other tunnels untouched", func(t *testing.T) {
		s1, s2, s3 := sites[0], sites[1], sites[2]
		dial(s1, s2) // fresh traffic, so counters are non-zero
		before := peersOf(s1)[keys["gw-2"]]
		s3.gwCmd.Process.Kill()
		s3.gwCmd.Wait()
		killed := time.Now()
		took := waitFor(t, 60*time.Second, "gw-3 removed everywhere", expectPeers(map[string][]string{"gw-1": {"gw-2"}, "gw-2": {"gw-1"}}))
		t.Logf("SIGKILLed gateway removed from every peer in %s", took.Round(time.Millisecond))
		after := peersOf(s1)[keys["gw-2"]]
		if after.Handshake == 0 || after.Rx < before.Rx || after.Tx < before.Tx {
			t.Fatalf("the gw-1 → gw-2 peer was re-created: before %+v, after %+v", before, after)
		}
		if err := dial(s1, s2); err != nil {
			t.Fatalf("gw-1 → gw-2 broke while gw-3 was gone: %v", err)
		}
		l.startGateway(s3, 2)
		took = waitFor(t, 60*time.Second, "gw-3 back everywhere", expectPeers(fullMesh))
		t.Logf("restarted gateway back in every configuration %s after restart (%s after the kill)", took.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))
		again := peersOf(s1)[keys["gw-2"]]
		if again.Rx < after.Rx || again.Tx < after.Tx {
			t.Fatalf("the gw-1 → gw-2 peer was re-created when gw-3 returned: %+v then %+v", after, again)
		}
		waitFor(t, 20*time.Second, "TCP 1 → 3 after the restart", func() (bool, string) {
			err := dial(s1, s3)
			return err == nil, fmt.Sprint(err)
		})
	})

	t.Run("rogue with the gossip key but a foreign identity never becomes a peer", func(t *testing.T) {
		rogueCA := filepath.Join(l.dir, "rogue-ca")
		sb(t, 0, "ca", "init", "--dir", rogueCA)
		r := &meshSite{short: "9", site: "onprem-zrh", region: "zrh-dc1", provider: "onprem", jur: "CH", underlay: "192.0.2.9", overlay: "100.96.0.9", route: "10.9.0.0/16", classes: "pii-eu,risk-batch"}
		r.ns = l.addHost(r.short, r.underlay)
		l.writeGatewayConfig(r, rogueCA, "", []string{"192.0.2.1:7946"})
		// The rogue stole the mesh's gossip key.
		kr, _ := os.ReadFile(filepath.Join(caDir, "gossip.keyring"))
		os.WriteFile(filepath.Join(r.dir, "identity", "gossip.keyring"), kr, 0o600)
		l.startGateway(r, 1)
		waitFor(t, 30*time.Second, "gw-1 refuses the rogue", func() (bool, string) {
			st, err := status(sites[0].socket)
			if err != nil {
				return false, err.Error()
			}
			for _, m := range st.Members {
				if m.Node == "gw-9" {
					return m.State == "refused", m.State + ": " + m.Reason
				}
			}
			return false, "rogue not seen yet"
		})
		// Watch for a while: the rogue must never appear in any wg show.
		deadline := time.Now().Add(8 * time.Second)
		for time.Now().Before(deadline) {
			for _, s := range sites {
				for k := range peersOf(s) {
					if !slices.Contains([]string{keys["gw-1"], keys["gw-2"], keys["gw-3"]}, k) {
						t.Fatalf("%s: unknown peer %s in wg show (the rogue?)", s.short, k)
					}
				}
			}
			time.Sleep(500 * time.Millisecond)
		}
		if ok, state := expectPeers(fullMesh)(); !ok {
			t.Fatalf("mesh disturbed by the rogue: %s", state)
		}
		r.gwCmd.Process.Kill()
	})

	t.Run("a site cut off for 60 s heals without a manual step", func(t *testing.T) {
		s3 := sites[2]
		l.nsexec(s3.ns, "nft", "add table inet sbcut")
		for _, spec := range []string{
			"add chain inet sbcut in { type filter hook input priority -10 ; policy drop ; }",
			"add chain inet sbcut out { type filter hook output priority -10 ; policy drop ; }",
			`add rule inet sbcut in iifname "lo" accept`,
			`add rule inet sbcut out oifname "lo" accept`,
		} {
			if out, err := l.nsexec(s3.ns, append([]string{"nft"}, strings.Fields(spec)...)...); err != nil {
				t.Fatalf("nft %s: %v %s", spec, err, out)
			}
		}
		cut := time.Now()
		waitFor(t, 60*time.Second, "the others drop the cut site", func() (bool, string) {
			a, b := nodesIn(sites[0]), nodesIn(sites[1])
			return slices.Equal(a, []string{"gw-2"}) && slices.Equal(b, []string{"gw-1"}), fmt.Sprintf("1:%v 2:%v", a, b)
		})
		t.Logf("cut site dropped from the others' configuration after %s", time.Since(cut).Round(time.Millisecond))
		// The cut outlasts the time memberlist goes on gossiping to a
		// member it declared dead, so that the heal cannot lean on it.
		// Meanwhile the two others keep their tunnel, and do not take the
		// cut site back.
		for time.Now().Before(cut.Add(60 * time.Second)) {
			if a, b := nodesIn(sites[0]), nodesIn(sites[1]); !slices.Equal(a, []string{"gw-2"}) || !slices.Equal(b, []string{"gw-1"}) {
				t.Fatalf("during the cut, after %s: gw-1 has %v, gw-2 has %v; want each other alone", time.Since(cut).Round(time.Second), a, b)
			}
			time.Sleep(5 * time.Second)
		}
		if out, err := l.nsexec(s3.ns, "nft", "delete", "table", "inet", "sbcut"); err != nil {
			t.Fatalf("restore: %v %s", err, out)
		}
		took := waitFor(t, 90*time.Second, "full mesh healed", expectPeers(fullMesh))
		t.Logf("mesh healed %s after the link came back", took.Round(time.Millisecond))
		waitFor(t, 20*time.Second, "TCP 1 → 3 after healing", func() (bool, string) {
			err := dial(sites[0], s3)
			return err == nil, fmt.Sprint(err)
		})
	})

	t.Run("policy change removes exactly one tunnel; tampered policy refused", func(t *testing.T) {
		s1 := sites[0]
		dial(s1, sites[1])
		dial(s1, sites[2])
		before := peersOf(s1)
		v2 := filepath.Join(l.dir, "residency-v2.hcl")
		os.WriteFile(v2, []byte(policyV2), 0o644)
		sb(t, 0, "policy", "sign", "--policy", v2, "--ca", caDir)
		sb(t, 0, "policy", "publish", "--socket", s1.socket, "--policy", v2)
		took := waitFor(t, 30*time.Second, "Frankfurt–N. Virginia tunnel removed", expectPeers(map[string][]string{"gw-1": {"gw-2", "gw-3"}, "gw-2": {"gw-1"}, "gw-3": {"gw-1"}}))
		t.Logf("policy v2 gossiped and the tunnel removed in %s", took.Round(time.Millisecond))
		after := peersOf(s1)
		for _, n := range []string{"gw-2", "gw-3"} {
			if after[keys[n]].Rx < before[keys[n]].Rx {
				t.Errorf("gw-1's tunnel to %s was re-created by the policy change", n)
			}
		}
		for _, s := range sites {
			st, err := status(s.socket)
			if err != nil || !strings.HasPrefix(st.Policy, "e2e v2") {
				t.Errorf("%s runs policy %q (%v), want e2e v2", s.short, st.Policy, err)
			}
		}

		// Sign v3, then change it: every gateway must refuse it.
		v3 := filepath.Join(l.dir, "residency-v3.hcl")
		os.WriteFile(v3, []byte(strings.Replace(policyV2, "version = 2", "version = 3", 1)), 0o644)
		sb(t, 0, "policy", "sign", "--policy", v3, "--ca", caDir)
		os.WriteFile(v3, []byte(strings.Replace(strings.Replace(policyV2, "version = 2", "version = 3", 1), `"CH", "US"`, `"CH", "US", "DE"`, 1)), 0o644)
		_, errs := sb(t, 1, "policy", "publish", "--socket", s1.socket, "--policy", v3)
		if !strings.Contains(errs, "signature does not verify") {
			t.Errorf("tampered policy: %s", errs)
		}
		st, err := status(s1.socket)
		if err != nil {
			t.Fatalf("gw-1's status after a tampered publish: %v", err)
		}
		if !strings.HasPrefix(st.Policy, "e2e v2") {
			t.Errorf("after a tampered publish gw-1 runs %q", st.Policy)
		}
	})
}
