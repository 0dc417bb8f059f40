package e2e

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"
)

// TestHAFailover runs a cloud site with two gateways in front of one LAN
// host, and an on-prem site whose client keeps a TCP conversation with
// that host. It kills the site's active gateway: the on-prem gateway's
// probes through the tunnel notice, the site's routes move to the other
// gateway, and the client (reconnecting, since the new gateway translates
// from another address) carries on; the outage is measured. When the
// killed gateway returns, the routes move back only once it has answered
// for the recovery period, and stay.
// haSites lays out, configured, an on-prem site of one gateway (1) and a
// cloud site of two (2a, 2b) advertising the same LAN.
func (l *lab) haSites() []*meshSite {
	caDir, pol := l.signedPolicy([]byte(policyV1))
	sites := []*meshSite{
		{short: "1", site: "onprem-zrh", region: "zrh-dc1", provider: "onprem", jur: "CH", underlay: "192.0.2.1", overlay: "100.96.0.1", route: "10.1.0.0/16", classes: "risk-batch"},
		{short: "2a", site: "aws-eu-central-1", region: "eu-central-1", provider: "aws", jur: "DE", underlay: "192.0.2.2", overlay: "100.96.0.2", route: "10.2.0.0/24", classes: "risk-batch"},
		{short: "2b", site: "aws-eu-central-1", region: "eu-central-1", provider: "aws", jur: "DE", underlay: "192.0.2.3", overlay: "100.96.0.3", route: "10.2.0.0/24", classes: "risk-batch"},
	}
	for _, s := range sites {
		s.ns = l.addHost(s.short, s.underlay)
		l.writeGatewayConfig(s, caDir, pol, []string{"192.0.2.1:7946", "192.0.2.2:7946"})
	}
	return sites
}

func TestHAFailover(t *testing.T) {
	l := newLab(t)
	defer l.dumpLogs()
	sites := l.haSites()
	zrh, fraA, fraB := sites[0], sites[1], sites[2]

	// The cloud LAN: a host at 10.2.0.100 behind both gateways (10.2.0.1,
	// 10.2.0.2), which forward into it and translate the source, as a
	// cloud subnet's NAT gateways would.
	host := "sbh" + l.id
	l.ip("netns", "add", host)
	l.netnss = append(l.netnss, host)
	l.nsip(host, "link", "set", "lo", "up")
	l.nsip(host, "link", "add", "lan", "type", "bridge")
	l.nsip(host, "addr", "add", "10.2.0.100/24", "dev", "lan")
	l.nsip(host, "link", "set", "lan", "up")
	for i, s := range []*meshSite{fraA, fraB} {
		in, out := "l"+s.short+l.id, "h"+s.short+l.id
		l.ip("link", "add", in, "netns", s.ns, "type", "veth", "peer", "name", out, "netns", host)
		l.nsip(host, "link", "set", out, "master", "lan")
		l.nsip(host, "link", "set", out, "up")
		l.nsip(s.ns, "addr", "add", fmt.Sprintf("10.2.0.%d/24", i+1), "dev", in)
		l.nsip(s.ns, "link", "set", in, "up")
		l.run("ip", "netns", "exec", s.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		l.run("ip", "netns", "exec", s.ns, "nft", "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100 ; } ; add rule ip nat post oifname \""+in+"\" masquerade")
	}
	l.start(host, "echo-host", []string{helperEnv + "=echo 0.0.0.0:7000"}, os.Args[0])
	for _, s := range sites {
		l.startGateway(s, 1)
	}
	carrier := func() (string, []string, string) {
		st, err := status(zrh.socket)
		if err != nil {
			return "", nil, err.Error()
		}
		return st.Carriers["aws-eu-central-1"], st.Unreachable, fmt.Sprintf("carrier %s, unreachable %v", st.Carriers["aws-eu-central-1"], st.Unreachable)
	}
	waitFor(t, 60*time.Second, "both cloud gateways proven reachable, routes through gw-2a", func() (bool, string) {
		c, down, state := carrier()
		return c == "gw-2a" && len(down) == 0, state
	})

	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := l.nsexec(zrh.ns, "env", helperEnv+"=reconnect 10.2.0.100:7000 20", os.Args[0])
		done <- result{out, err}
	}()
	l.waitConnected(zrh.ns, 7000) // the conversation runs before the failure
	fraA.gwCmd.Process.Kill()
	fraA.gwCmd.Wait()
	moved := waitFor(t, 30*time.Second, "routes move to gw-2b", func() (bool, string) {
		c, _, state := carrier()
		return c == "gw-2b", state
	})
	r := <-done
	if r.err != nil {
		t.Fatalf("the conversation did not recover: %v\n%s", r.err, r.out)
	}
	m := regexp.MustCompile(`longest_ms=(\d+) reconnects=(\d+)`).FindStringSubmatch(r.out)
	if m == nil {
		t.Fatalf("client output: %s", r.out)
	}
	outage, _ := strconv.Atoi(m[1])
	t.Logf("active gateway killed: routes moved after %s; the client's longest wait between echoed lines was %d ms (%s reconnects)",
		moved.Round(100*time.Millisecond), outage, m[2])
	// The README says about two seconds (measured 1.6–2.8 s: two missed
	// probes a second apart, a reconcile, the client's 1 s read deadline
	// before it reconnects). Six leaves room for -race on a loaded
	// 2-core machine; the 15 s allowed before let a failover several
	// times slower than documented pass.
	if outage > 6000 {
		t.Errorf("outage %d ms, at most 6000 ms allowed (about 2 s expected): failover is slower than the probes alone explain; the on-prem gateway's log says when it judged gw-2a unreachable", outage)
	}

	// gw-2a returns: the routes move back only after it has answered
	// through its tunnel for the recovery period, and then stay.
	l.startGateway(fraA, 2)
	back := waitFor(t, 60*time.Second, "routes move back to gw-2a", func() (bool, string) {
		c, _, state := carrier()
		return c == "gw-2a", state
	})
	if back < 10*time.Second {
		t.Errorf("routes moved back %s after gw-2a restarted: before it proved itself for 10 s", back.Round(100*time.Millisecond))
	}
	stable := time.Now()
	var seen []string
	for time.Since(stable) < 5*time.Second {
		// A status that fails names no carrier: passed over, not taken
		// for routes through none.
		if st, err := status(zrh.socket); err == nil && !slices.Contains(seen, st.Carriers["aws-eu-central-1"]) {
			seen = append(seen, st.Carriers["aws-eu-central-1"])
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !slices.Equal(seen, []string{"gw-2a"}) {
		t.Errorf("carrier after the return: %v, want gw-2a throughout", seen)
	}
	t.Logf("gw-2a restarted: routes back after %s", back.Round(100*time.Millisecond))
	if out, err := l.nsexec(zrh.ns, "env", helperEnv+"=dial 10.2.0.100:7000", os.Args[0]); err != nil {
		t.Errorf("the LAN host is not reachable after the return: %v %s", err, out)
	}
}
