package e2e

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestHubFailover runs the hub topology on real gateways (TUN mode): Zurich
// with two gateways, gw-1a its hub (first by name) and gw-1b behind it, and
// Frankfurt with two, gw-2a its hub and gw-2b. It checks that gw-1b peers
// with its hub alone while the hubs peer with each other, that gw-1b's
// traffic to Frankfurt's network crosses gw-1a, and that when gw-1a is
// SIGKILLed gw-1b's routes to Frankfurt stay in its tunnel (not sent in
// clear by its default route) until the membership drops gw-1a, when gw-1b
// becomes Zurich's hub, peers with gw-2a, and its traffic flows again.
// When gw-1a returns it is the hub again, and gw-1b's traffic crosses it.
func TestHubFailover(t *testing.T) {
	l := newLab(t)
	defer l.dumpLogs()
	caDir, pol := l.signedPolicy([]byte(policyV1))
	zrhA := &meshSite{short: "1a", site: "onprem-zrh", region: "zrh-dc1", provider: "onprem", jur: "CH", underlay: "192.0.2.1", overlay: "100.96.0.1", route: "10.1.0.0/16", classes: "pii-eu,risk-batch"}
	zrhB := &meshSite{short: "1b", site: "onprem-zrh", region: "zrh-dc1", provider: "onprem", jur: "CH", underlay: "192.0.2.4", overlay: "100.96.0.4", route: "10.1.0.0/16", classes: "pii-eu,risk-batch"}
	fraA := &meshSite{short: "2a", site: "aws-eu-central-1", region: "eu-central-1", provider: "aws", jur: "DE", underlay: "192.0.2.2", overlay: "100.96.0.2", route: "10.2.0.0/16", classes: "pii-eu,risk-batch"}
	fraB := &meshSite{short: "2b", site: "aws-eu-central-1", region: "eu-central-1", provider: "aws", jur: "DE", underlay: "192.0.2.3", overlay: "100.96.0.3", route: "10.2.0.0/16", classes: "pii-eu,risk-batch"}
	sites := []*meshSite{zrhA, zrhB, fraA, fraB}
	for _, s := range sites {
		s.ns = l.addHost(s.short, s.underlay)
		l.writeGatewayConfig(s, caDir, pol, []string{"192.0.2.1:7946", "192.0.2.2:7946"})
		f, err := os.OpenFile(s.cfg, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString("topology {\n  mode = \"hub\"\n}\n")
		f.Close()
		// A hub relays between tunnels, which the kernel does only with
		// forwarding on; any gateway of a site may become its hub.
		l.run("ip", "netns", "exec", s.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	}
	// Frankfurt's network: an address of it on gw-2a, its route carrier,
	// with an echo server.
	const far = "10.2.0.1"
	l.nsip(fraA.ns, "addr", "add", far+"/32", "dev", "lo")
	l.start(fraA.ns, "echo-2a", []string{helperEnv + "=echo 0.0.0.0:7000"}, os.Args[0])

	// Zurich's hosts have a default route to "the internet" on the
	// underlay, as real ones would: should gw-1b let go of its route to
	// Frankfurt, or a hub relay gw-1b's traffic there before it has its
	// tunnel to Frankfurt, the packets would leave in clear, where a
	// counter sees them.
	l.nsip(l.wan, "addr", "add", "192.0.2.254/24", "dev", "br0")
	for _, s := range []*meshSite{zrhA, zrhB} {
		l.nsip(s.ns, "route", "add", "default", "via", "192.0.2.254")
		for _, spec := range []string{
			"add table inet sbclear",
			"add chain inet sbclear post { type filter hook postrouting priority 0 ; }",
			`add rule inet sbclear post oifname "u` + s.short + l.id + `" ip daddr 10.2.0.0/16 counter`,
		} {
			if out, err := l.nsexec(s.ns, append([]string{"nft"}, strings.Fields(spec)...)...); err != nil {
				t.Fatalf("nft %s: %v %s", spec, err, out)
			}
		}
	}
	// And what hub gw-1a relays of gw-1b's connections to Frankfurt's
	// echo server, which its host forwards from one tunnel to another.
	for _, spec := range []string{
		"add chain inet sbclear relay { type filter hook forward priority 0 ; }",
		"add rule inet sbclear relay ip daddr " + far + " tcp dport 7000 counter",
	} {
		if out, err := l.nsexec(zrhA.ns, append([]string{"nft"}, strings.Fields(spec)...)...); err != nil {
			t.Fatalf("nft %s: %v %s", spec, err, out)
		}
	}
	// routeToFar says where gw-1b's kernel sends a packet for Frankfurt:
	// "tunnel", "held" (unreachable) or "clear" (anywhere else).
	routeToFar := func() (string, string) {
		out, _ := l.nsexec(zrhB.ns, "ip", "route", "get", far)
		out = strings.TrimSpace(out)
		switch {
		case strings.Contains(out, " dev "+zrhB.ifname+" "):
			return "tunnel", out
		case strings.Contains(out, "No route to host"):
			return "held", out
		}
		return "clear", out
	}
	if where, out := routeToFar(); where != "clear" || !strings.Contains(out, " dev u"+zrhB.short+l.id+" ") {
		t.Fatalf("before any gateway runs, gw-1b's host routes %s by %q; want its default route on the underlay, or the test proves nothing", far, out)
	}
	counted := func(s *meshSite, chain string) int {
		out, _ := l.nsexec(s.ns, "nft", "list", "chain", "inet", "sbclear", chain)
		m := regexp.MustCompile(`counter packets (\d+)`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no counter in gw-%s's nft chain %s:\n%s", s.short, chain, out)
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	inClear := func(s *meshSite) int { return counted(s, "post") }

	for _, s := range sites {
		l.startGateway(s, 1)
	}
	keys := map[string]string{} // node → WireGuard public key
	waitFor(t, 60*time.Second, "gateways report their keys", func() (bool, string) {
		for _, s := range sites {
			st, err := status(s.socket)
			if err != nil {
				return false, "gw-" + s.short + ": " + err.Error()
			}
			keys[st.Node] = st.PublicKey
		}
		return true, ""
	})
	nodesIn := func(s *meshSite) []string {
		peers, err := l.wgDump(s.ns, s.ifname)
		if err != nil {
			return nil
		}
		var out []string
		for k := range peers {
			for n, nk := range keys {
				if nk == k {
					out = append(out, n)
				}
			}
		}
		slices.Sort(out)
		return out
	}
	expectPeers := func(want map[*meshSite][]string) func() (bool, string) {
		return func() (bool, string) {
			ok := true
			var state []string
			for _, s := range sites {
				w, checked := want[s]
				if !checked {
					continue
				}
				got := nodesIn(s)
				state = append(state, fmt.Sprintf("%s:%v", s.short, got))
				if !slices.Equal(got, w) {
					ok = false
				}
			}
			return ok, strings.Join(state, " ")
		}
	}
	dial := func() error {
		out, err := l.nsexec(zrhB.ns, "env", helperEnv+"=dial "+far+":7000", os.Args[0])
		if err != nil {
			return fmt.Errorf("%v: %s", err, strings.TrimSpace(out))
		}
		return nil
	}

	// Each site's first gateway by name is its hub: the hubs peer with
	// each other and with their own site; the others with their hub alone,
	// not with the remote hub nor the remote site's other gateway.
	waitFor(t, 30*time.Second, "the hub layout in wg show", expectPeers(map[*meshSite][]string{
		zrhA: {"gw-1b", "gw-2a"},
		zrhB: {"gw-1a"},
		fraA: {"gw-1a", "gw-2b"},
		fraB: {"gw-2a"},
	}))
	if where, out := routeToFar(); where != "tunnel" {
		t.Fatalf("gw-1b routes %s by %q; want its tunnel %s", far, out, zrhB.ifname)
	}

	// gw-1b's only peer is gw-1a, whose host forwards gw-1b's connection
	// to Frankfurt (the tunnels' own counters grow with the gateways'
	// probes of each other whatever the connection's path).
	crossesHubA := func(what string) {
		t.Helper()
		before := counted(zrhA, "relay")
		if err := dial(); err != nil {
			t.Fatalf("TCP gw-1b → %s %s: %v", far, what, err)
		}
		if after := counted(zrhA, "relay"); after <= before {
			t.Errorf("%s, hub gw-1a did not relay gw-1b's connection: %d packets forwarded, then %d", what, before, after)
		}
	}
	waitFor(t, 20*time.Second, "TCP gw-1b → "+far+" (Frankfurt's network) through hub gw-1a", func() (bool, string) {
		err := dial()
		return err == nil, fmt.Sprint(err)
	})
	crossesHubA("through the first hub")

	// The hub crashes: no leave, so the others learn it only when the
	// membership declares it dead. gw-1b keeps connecting meanwhile, so
	// that a route let go would show as packets on the underlay.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var through [][2]time.Time // when each of gw-1b's connections that got through began and ended
	// flowedSince is when the first connection begun after t0 got through:
	// its start, not its end, tells which layout carried it.
	flowedSince := func(t0 time.Time) (time.Time, bool) {
		mu.Lock()
		defer mu.Unlock()
		i := slices.IndexFunc(through, func(c [2]time.Time) bool { return c[0].After(t0) })
		if i < 0 {
			return time.Time{}, false
		}
		return through[i][1], true
	}
	killed := time.Now()
	zrhA.gwCmd.Process.Kill()
	zrhA.gwCmd.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			began := time.Now()
			if dial() != nil {
				// Refused at once when held: not a core's worth of
				// processes started while the failover is timed.
				time.Sleep(100 * time.Millisecond)
				continue
			}
			mu.Lock()
			through = append(through, [2]time.Time{began, time.Now()})
			mu.Unlock()
		}
	}()
	var once sync.Once
	stopTraffic := func() {
		once.Do(func() {
			close(stop)
			wg.Wait()
		})
	}
	defer stopTraffic()
	// Held: in the tunnel (to the dead hub, where WireGuard drops it, then
	// to the new one) or unreachable, never by the host's own routes.
	held := func(then func() (bool, string)) func() (bool, string) {
		return func() (bool, string) {
			if where, out := routeToFar(); where == "clear" {
				t.Fatalf("%s after gw-1a was killed, gw-1b routes %s by %q: sent in clear, not held in the mesh", time.Since(killed).Round(time.Millisecond), far, out)
			}
			return then()
		}
	}
	flowedAgain := func(t0 time.Time) func() (bool, string) {
		return func() (bool, string) {
			_, ok := flowedSince(t0)
			return ok, "no connection through yet"
		}
	}
	took := waitFor(t, 30*time.Second, "gw-1b Zurich's hub, peered with hub gw-2a", held(expectPeers(map[*meshSite][]string{
		zrhB: {"gw-2a"},
		fraA: {"gw-1b", "gw-2b"},
		fraB: {"gw-2a"},
	})))
	t.Logf("hub gw-1a SIGKILLed: gw-1b took its place and peered with gw-2a after %s", took.Round(time.Millisecond))
	tookOver := time.Now()
	waitFor(t, 20*time.Second, "TCP gw-1b → "+far+" again, through its own tunnel to gw-2a", held(flowedAgain(tookOver)))
	at, _ := flowedSince(killed)
	t.Logf("traffic from gw-1b to Frankfurt flowed again %s after the kill", at.Sub(killed).Round(time.Millisecond))
	// Waited for, not read once: the tunnels above prove what gw-1b and
	// gw-2a took in, not that gw-2b, whose one peer is gw-2a, has seen
	// gw-1a go.
	waitFor(t, 30*time.Second, "every other gateway to carry Zurich's routes through gw-1b", func() (bool, string) {
		ok, state := true, []string{}
		for _, s := range []*meshSite{zrhB, fraA, fraB} {
			st, err := status(s.socket)
			if err != nil {
				return false, fmt.Sprintf("gw-%s status: %v", s.short, err)
			}
			c := st.Carriers[zrhB.site]
			ok = ok && c == "gw-1b"
			state = append(state, fmt.Sprintf("gw-%s: %q", s.short, c))
		}
		return ok, strings.Join(state, ", ")
	})

	// gw-1a returns: first by name again, it is Zurich's hub again (hubs
	// are chosen from the membership alone), and gw-1b goes back behind
	// it, its traffic still never in clear, neither at gw-1b nor at a
	// gw-1a that relays before it has its tunnel to Frankfurt.
	restarted := time.Now()
	l.startGateway(zrhA, 2)
	took = waitFor(t, 30*time.Second, "the hub layout back in wg show", held(expectPeers(map[*meshSite][]string{
		zrhA: {"gw-1b", "gw-2a"},
		zrhB: {"gw-1a"},
		fraA: {"gw-1a", "gw-2b"},
		fraB: {"gw-2a"},
	})))
	t.Logf("gw-1a restarted: Zurich's hub again after %s", took.Round(time.Millisecond))
	settled := time.Now()
	waitFor(t, 20*time.Second, "TCP gw-1b → "+far+" through hub gw-1a again", held(flowedAgain(settled)))
	at, _ = flowedSince(settled)
	t.Logf("traffic from gw-1b to Frankfurt flowed through gw-1a again %s after its restart", at.Sub(restarted).Round(time.Millisecond))
	stopTraffic()
	crossesHubA("through the restarted hub")
	for _, s := range []*meshSite{zrhA, zrhB} {
		if n := inClear(s); n != 0 {
			t.Errorf("%d packets for Frankfurt's network left gw-%s's host on the underlay, in clear", n, s.short)
		}
	}
}
