package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/scrape"
)

// TestOperatorOverOverlay runs the three-site mesh on TUN devices with
// the Zurich gateway's operator endpoint on its overlay address, and
// scrapes it the way a Prometheus in another site would: through the
// WireGuard tunnel, with the token. The endpoint is not on the underlay,
// the metrics show the real tunnels' handshakes and traffic, and a wrong
// token is refused. Then a site whose gateway crashed is reported
// unreachable, and so is one whose only gateway was shut down, its
// gateway counted as left.
func TestOperatorOverOverlay(t *testing.T) {
	l := newLab(t)
	defer l.dumpLogs()
	_, sites := l.signedSites([]byte(policyV1), [3]string{"pii-eu,risk-batch", "pii-eu,risk-batch", "risk-batch"})
	zrh, fra := sites[0], sites[1]
	f, err := os.OpenFile(zrh.cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("operator {\n  listen = \"overlay:7480\"\n}\n")
	f.Close()
	for _, s := range sites {
		l.startGateway(s, 1)
	}
	token := filepath.Join(zrh.dir, "operator.token")
	overlayURL := "http://" + zrh.overlay + ":7480/metrics"
	// Scraped from Frankfurt through the tunnel, until zrh sees all three
	// sites (N. Virginia may join last).
	var fam scrape.Families
	waitFor(t, 30*time.Second, "fra scrapes zrh's metrics through the tunnel, all sites reachable", func() (bool, string) {
		out, err := l.nsexec(fra.ns, "env", helperEnv+"=get "+overlayURL+" "+token, os.Args[0])
		if err != nil {
			return false, out
		}
		if fam, err = scrape.Parse(strings.NewReader(out)); err != nil {
			t.Fatalf("parse the metrics: %v", err)
		}
		n, _ := fam.Value("skybridge_site_reachable", nil)
		return n == 3, fmt.Sprintf("%v sites reachable", n)
	})
	// The scrape itself crossed the zrh–fra tunnel: a handshake just now,
	// bytes both ways, on the real WireGuard device.
	peer := map[string]string{"peer": "gw-" + fra.short, "peer_site": fra.site}
	if age, ok := fam.Value("skybridge_peer_handshake_age_seconds", peer); !ok || age > 60 {
		t.Errorf("handshake age with fra: %v (present %v), want a recent handshake", age, ok)
	}
	for _, m := range []string{"skybridge_peer_receive_bytes_total", "skybridge_peer_transmit_bytes_total"} {
		if v, _ := fam.Value(m, peer); v <= 0 {
			t.Errorf("%s{peer=fra} = %v after traffic through the tunnel", m, v)
		}
	}
	if v, _ := fam.Value("skybridge_gateway_info", map[string]string{"node": "gw-1", "mode": "tun"}); v != 1 {
		t.Errorf("skybridge_gateway_info{node=gw-1,mode=tun} = %v", v)
	}
	for _, s := range sites {
		if v, _ := fam.Value("skybridge_site_reachable", map[string]string{"site": s.site}); v != 1 {
			t.Errorf("site %s not reachable from zrh: %v", s.site, v)
		}
	}

	// Not on the underlay, nor on zrh's loopback: unreachable there
	// (helper exit 1), not merely refused.
	exit := func(err error) int {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		return 0
	}
	if out, err := l.nsexec(fra.ns, "env", helperEnv+"=get http://"+zrh.underlay+":7480/metrics "+token, os.Args[0]); exit(err) != 1 {
		t.Errorf("the operator endpoint on the underlay address: %v, %s; want it unreachable", err, out)
	}
	if out, err := l.nsexec(zrh.ns, "env", helperEnv+"=get http://127.0.0.1:7480/metrics "+token, os.Args[0]); exit(err) != 1 {
		t.Errorf("the operator endpoint on loopback: %v, %s; want it unreachable", err, out)
	}
	// A wrong token is refused (exit 3: HTTP 401).
	wrong := filepath.Join(l.dir, "wrong.token")
	os.WriteFile(wrong, []byte("not-the-operator-token-of-zrh"), 0o600)
	if out, err := l.nsexec(fra.ns, "env", helperEnv+"=get "+overlayURL+" "+wrong, os.Args[0]); exit(err) != 3 || !strings.Contains(out, "token is required") {
		t.Errorf("a wrong token: err %v, %s; want 401", err, out)
	}
	// Crash Frankfurt: zrh reports it unreachable.
	reachable := func() (map[string]float64, string) {
		out, err := l.nsexec(zrh.ns, "env", helperEnv+"=get "+overlayURL+" "+token, os.Args[0])
		if err != nil {
			return nil, out
		}
		fam, err := scrape.Parse(strings.NewReader(out))
		if err != nil {
			return nil, err.Error()
		}
		got := map[string]float64{}
		for _, m := range fam["skybridge_site_reachable"].GetMetric() {
			got[m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
		}
		return got, fmt.Sprint(got)
	}
	fra.gwCmd.Process.Kill()
	fra.gwCmd.Wait()
	waitFor(t, 30*time.Second, "zrh reports the crashed site unreachable", func() (bool, string) {
		got, state := reachable()
		v, ok := got[fra.site]
		return ok && v == 0, state
	})
	// Stopped on purpose (SIGTERM, as systemctl stop sends), its site's
	// only gateway leaves the site cut off as a crash does: it stays in
	// the metrics, unreachable, its gateway counted as left. (Before, it
	// disappeared, and no alert on it could fire.)
	iad := sites[2]
	iad.gwCmd.Process.Signal(syscall.SIGTERM)
	iad.gwCmd.Wait()
	waitFor(t, 30*time.Second, "zrh reports the stopped site unreachable, its gateway left", func() (bool, string) {
		out, err := l.nsexec(zrh.ns, "env", helperEnv+"=get "+overlayURL+" "+token, os.Args[0])
		if err != nil {
			return false, out
		}
		fam, err := scrape.Parse(strings.NewReader(out))
		if err != nil {
			return false, err.Error()
		}
		iadV, iadThere := fam.Value("skybridge_site_reachable", map[string]string{"site": iad.site})
		left, _ := fam.Value("skybridge_members", map[string]string{"site": iad.site, "state": "left"})
		dead, _ := fam.Value("skybridge_members", map[string]string{"site": iad.site, "state": "dead"})
		fraV, fraThere := fam.Value("skybridge_site_reachable", map[string]string{"site": fra.site})
		zrhV, _ := fam.Value("skybridge_site_reachable", map[string]string{"site": zrh.site})
		return iadThere && iadV == 0 && left == 1 && dead == 0 && fraThere && fraV == 0 && zrhV == 1,
			fmt.Sprintf("%s reachable %v (listed %v), left %v, dead %v; %s %v; %s %v", iad.site, iadV, iadThere, left, dead, fra.site, fraV, zrh.site, zrhV)
	})

	// skybridge status names the endpoint.
	st, err := status(zrh.socket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Operator != zrh.overlay+":7480" {
		t.Errorf("status operator = %q, want %s:7480", st.Operator, zrh.overlay)
	}
	// Crashed or stopped, a site's routes are held unreachable at zrh:
	// the kernel refuses their traffic ("no route to host") rather than
	// send it by the host's other routes in clear (the namespace has
	// none here: without the hold, the network reads unreachable).
	waitFor(t, 10*time.Second, "zrh holds the routes of both sites cut off", func() (bool, string) {
		st, err := status(zrh.socket)
		if err != nil {
			return false, err.Error()
		}
		for _, s := range []*meshSite{fra, iad} {
			if got := st.Held[s.site]; len(got) != 1 || got[0] != s.route {
				return false, fmt.Sprintf("status holds %v for %s, want its route %s", got, s.site, s.route)
			}
			addr := strings.TrimSuffix(s.route, "0.0/16") + "7.7"
			out, _ := l.nsexec(zrh.ns, "ip", "route", "get", addr)
			if !strings.Contains(out, "No route to host") {
				return false, fmt.Sprintf("zrh's route to %s (in %s): %s; want no route to host", addr, s.site, out)
			}
			if out, _ := l.nsexec(zrh.ns, "ip", "route", "show", s.route); !strings.Contains(out, "unreachable "+s.route+" proto 91") {
				return false, fmt.Sprintf("zrh's routes to %s: %q; want it held unreachable", s.route, out)
			}
		}
		return true, ""
	})
}
