package mesh

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/scrape"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// liveGateway is an in-process gateway with real gossip on loopback, a
// device that records its configuration, and its operator endpoint on an
// ephemeral loopback port.
type liveGateway struct {
	g    *Gateway
	dev  *RecordingDevice
	done chan struct{}
	err  error  // Run's, once done is closed
	stop func() // ends Run as a signal would, and waits for it
}

func startLiveGateway(t *testing.T, ca *certs.CA, dir string, i int, site string, seeds []string, logs io.Writer) *liveGateway {
	return startLiveGatewayWith(t, ca, dir, i, site, seeds, logs, nil)
}

// startLiveGatewayWith is startLiveGateway with a last change to its
// settings.
func startLiveGatewayWith(t *testing.T, ca *certs.CA, dir string, i int, site string, seeds []string, logs io.Writer, tweak func(*Settings)) *liveGateway {
	t.Helper()
	tb, err := ca.TrustBundle()
	if err != nil {
		t.Fatal(err)
	}
	node := fmt.Sprintf("op%d", i)
	gdir := filepath.Join(dir, node)
	overlay := netip.AddrFrom4([4]byte{100, 64, 7, byte(i + 1)})
	attrs := certs.Attributes{Node: node, Site: site, Region: "r-" + site, Provider: "onprem", Jurisdiction: "CH", OverlayIP: overlay}
	s := liveSettings(t, gdir)
	s.Node = provisionGateway(t, ca, tb, attrs, time.Hour, s.Identity.Dir)
	s.Seeds = seeds
	if tweak != nil {
		tweak(s)
	}
	return runLiveGateway(t, s, logs)
}

// runGateway runs a gateway of s on dev until the test ends, without
// waiting for it to start; tweak, if set, changes it before it runs (its
// clock, say, which no goroutine reads yet).
func runGateway(t testing.TB, s *Settings, dev Device, log *slog.Logger, tweak func(*Gateway)) *Gateway {
	t.Helper()
	g, err := newGateway(context.Background(), s, log, options{device: dev, noControl: true, noMigrations: true})
	if err != nil {
		t.Fatal(err)
	}
	if tweak != nil {
		tweak(g)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); g.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return g
}

// liveSettings are the settings of an in-process gateway in dir with its
// gossip on a free loopback port, and no node block.
func liveSettings(t testing.TB, dir string) *Settings {
	p := loopbackPort(t)
	ap := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(p))
	return &Settings{
		StateDir: dir, Identity: certs.Config{Dir: filepath.Join(dir, "identity")},
		GossipBind: ap, GossipAdvertise: ap, GossipProfile: "local",
		Interface: "sim", Port: p, MTU: DefaultMTU, Endpoints: []netip.AddrPort{ap}, Topology: TopologyFullMesh,
		OperatorAddr: netip.MustParseAddrPort("127.0.0.1:0"), OperatorTokenFile: filepath.Join(dir, "operator.token"),
	}
}

// runLiveGateway runs a gateway with a recording device until the test
// ends, and returns once it has started or ended; its run's error is
// lg.err once lg.done is closed.
func runLiveGateway(t testing.TB, s *Settings, logs io.Writer) *liveGateway {
	t.Helper()
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dev := NewRecordingDevice(filepath.Base(s.StateDir))
	g, err := newGateway(context.Background(), s, log, options{device: dev, noControl: true, noMigrations: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	lg := &liveGateway{g: g, dev: dev, done: make(chan struct{})}
	lg.stop = func() { cancel(); <-lg.done }
	go func() {
		defer close(lg.done)
		lg.err = g.Run(ctx)
		var ended *BurstEndedError
		if lg.err != nil && !errors.As(lg.err, &ended) {
			t.Errorf("%s: %v", g.id.Load().Attributes().Node, lg.err)
		}
	}()
	t.Cleanup(lg.stop)
	// Tests call the gateway's methods directly, as its own loops would,
	// and those loops start only once the gossip is up; the operator
	// endpoint listens after it.
	waitUntil(t, 20*time.Second, "the gateway to start", func() bool {
		select {
		case <-lg.done:
			return true
		default:
			return lg.g.OperatorAddress() != nil
		}
	})
	return lg
}

// operatorAddr waits for the operator endpoint to listen.
func (lg *liveGateway) operatorAddr(t *testing.T) net.Addr {
	t.Helper()
	waitUntil(t, 10*time.Second, "the operator endpoint", func() bool { return lg.g.OperatorAddress() != nil })
	return lg.g.OperatorAddress()
}

func (lg *liveGateway) url(t *testing.T, path string) string {
	return "http://" + lg.operatorAddr(t).String() + path
}

func (lg *liveGateway) cookieName(t *testing.T) string {
	_, port, _ := net.SplitHostPort(lg.operatorAddr(t).String())
	return sessionCookie + port
}

func (lg *liveGateway) token(t *testing.T) string {
	b, err := os.ReadFile(lg.g.s.OperatorTokenFile)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// liveMesh is three live gateways of three sites, peered.
type liveMesh struct {
	ca   *certs.CA
	dir  string
	logs *syncbuf.Buffer
	gws  [3]*liveGateway
}

func startLiveMesh(t *testing.T) *liveMesh {
	t.Helper()
	m := &liveMesh{dir: t.TempDir(), logs: &syncbuf.Buffer{}}
	var err error
	m.ca, err = certs.InitCA(filepath.Join(m.dir, "ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	var seed []string
	for i, site := range []string{"zrh-dc", "aws-fra", "gcp-ams"} {
		m.gws[i] = startLiveGateway(t, m.ca, m.dir, i, site, seed, m.logs)
		seed = []string{m.gws[0].g.s.GossipAdvertise.String()}
	}
	for _, lg := range m.gws {
		waitUntil(t, 20*time.Second, lg.g.s.Node.Name+" peers with the other two", func() bool { return len(lg.dev.Peers()) == 2 })
	}
	return m
}

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestOperatorEndpoint runs three gateways and an impostor signed by
// another CA, then checks what an operator sees: metrics scraped from a
// live gateway (members, reachability, tunnels, the impostor's rejection,
// reconciles), the dashboard's data and picture, and that nothing on the
// endpoint answers without the token.
func TestOperatorEndpoint(t *testing.T) {
	m := startLiveMesh(t)
	a, b, ca, dir, lw := m.gws[0], m.gws[1], m.ca, m.dir, m.logs
	seed := []string{a.g.s.GossipAdvertise.String()}

	// An impostor: a valid-looking gateway whose certificate another CA
	// signed, given the mesh's gossip key (a leaked key must not be enough).
	rogueCA, err := certs.InitCA(filepath.Join(dir, "rogue-ca"), certs.InitOptions{MeshPrefix: netip.MustParsePrefix("100.64.0.0/10")})
	if err != nil {
		t.Fatal(err)
	}
	// Its identity directory gets the mesh's keyring first (the rogue
	// CA's copy does not overwrite it).
	if err := ca.CopyGossipKeyring(context.Background(), filepath.Join(dir, "op3", "identity")); err != nil {
		t.Fatal(err)
	}
	startLiveGateway(t, rogueCA, dir, 3, "evil", seed, lw)

	tok := a.token(t)
	if fi, err := os.Stat(a.g.s.OperatorTokenFile); err != nil {
		t.Fatal(err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Fatalf("operator token file mode %v, want 0600", fi.Mode().Perm())
	}
	noRedirect := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(path string, hdr map[string]string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, a.url(t, path), nil)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}

	// Nothing without the token.
	for _, tc := range []struct {
		path string
		hdr  map[string]string
	}{
		{"/metrics", nil},
		{"/metrics", map[string]string{"Authorization": "Bearer " + strings.Repeat("x", len(tok))}},
		{"/", nil},
		{"/?token=wrong", nil},
		{"/ui/dashboard.js", nil},
		{"/api/v1/dashboard", map[string]string{"Cookie": a.cookieName(t) + "=" + tok}}, // the token is not the session
		{"/api/v1/events", nil},
		{"/api/v1/graph?format=svg", nil},
	} {
		if resp := get(tc.path, tc.hdr); resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s %v: %s, want 401", tc.path, tc.hdr, resp.Status)
		}
	}

	// Metrics, as Prometheus scrapes them.
	var fam scrape.Families
	waitUntil(t, 20*time.Second, "the impostor's rejection to be counted and it to be listed as refused", func() bool {
		fam, err = scrape.Get(context.Background(), noRedirect, a.url(t, "/metrics"), tok)
		if err != nil {
			t.Fatal(err)
		}
		// One scrape gathers the counter and the member list side by side,
		// so the refusal may land between the two: wait for both.
		v, _ := fam.Value("skybridge_verification_rejections_total", map[string]string{"reason": "unknown_ca"})
		r, _ := fam.Value("skybridge_members", map[string]string{"site": unknownSite, "state": "refused"})
		return v >= 1 && r >= 1
	})
	if v, ok := fam.Value("skybridge_burst_gateway", nil); !ok || v != 0 {
		t.Errorf("skybridge_burst_gateway = %v (present %v) on a gateway of no burst, want 0", v, ok)
	}
	// unknownSite is not a site: an impostor knocking once must not page
	// as a site that is down.
	if n := fam.Series("skybridge_site_reachable", map[string]string{"site": unknownSite}); n != 0 {
		t.Errorf("skybridge_site_reachable has %d series for %q", n, unknownSite)
	}
	for _, site := range []string{"zrh-dc", "aws-fra", "gcp-ams"} {
		if v, ok := fam.Value("skybridge_members", map[string]string{"site": site, "state": "verified"}); !ok || v != 1 {
			t.Errorf("skybridge_members{site=%q,state=verified} = %v (present %v), want 1", site, v, ok)
		}
		if v, ok := fam.Value("skybridge_site_reachable", map[string]string{"site": site}); !ok || v != 1 {
			t.Errorf("skybridge_site_reachable{site=%q} = %v (present %v), want 1", site, v, ok)
		}
	}
	// The impostor's claimed site is not a site: only certificates name
	// sites, so it counts as refused under unknownSite and mints no label.
	if n := fam.Series("skybridge_members", map[string]string{"site": "evil"}) + fam.Series("skybridge_site_reachable", map[string]string{"site": "evil"}); n != 0 {
		t.Errorf("the impostor's claimed site appears in %d series", n)
	}
	if v, _ := fam.Value("skybridge_members", map[string]string{"site": unknownSite, "state": "refused"}); v != 1 {
		t.Errorf("skybridge_members{site=%s,state=refused} = %v, want the impostor", unknownSite, v)
	}
	if n := fam.Series("skybridge_peer_handshake_age_seconds", nil); n != 2 {
		t.Errorf("%d handshake-age series, want one per peer (2)", n)
	}
	// The recording device never handshakes: the age is +Inf, not 0.
	if v, _ := fam.Value("skybridge_peer_handshake_age_seconds", map[string]string{"peer": "op1", "peer_site": "aws-fra"}); !math.IsInf(v, 1) {
		t.Errorf("handshake age of a peer that never handshook = %v, want +Inf", v)
	}
	// Three gateways joined through push/pull exchanges and gossip: both
	// transports carried bytes each way (TestGossipTransport checks the
	// counts themselves).
	for _, tr := range []string{"udp", "tcp"} {
		for _, dir := range []string{"sent", "received"} {
			if v, _ := fam.Value("skybridge_gossip_bytes_total", map[string]string{"transport": tr, "direction": dir}); v < 1 {
				t.Errorf("skybridge_gossip_bytes_total{transport=%q,direction=%q} = %v", tr, dir, v)
			}
		}
	}
	if p, _ := fam.Value("skybridge_gossip_packets_total", map[string]string{"direction": "sent"}); p < 1 {
		t.Errorf("skybridge_gossip_packets_total{direction=sent} = %v", p)
	}
	// Exported from the start, at zero: no stream was closed unread.
	for _, reason := range []string{"too_many", "too_much"} {
		if v, ok := fam.Value("skybridge_gossip_streams_closed_total", map[string]string{"reason": reason}); !ok || v != 0 {
			t.Errorf("skybridge_gossip_streams_closed_total{reason=%q} = %v (exported %v), want 0", reason, v, ok)
		}
	}
	if v, _ := fam.Value("skybridge_reconcile_runs_total", nil); v < 1 {
		t.Errorf("skybridge_reconcile_runs_total = %v", v)
	}
	if v, _ := fam.Value("skybridge_reconcile_duration_seconds", nil); v < 1 {
		t.Errorf("reconcile duration histogram has %v observations", v)
	}
	// A tunnel with no traffic yet does not fail.
	if v, ok := fam.Value("skybridge_peer_tunnel_failing", map[string]string{"peer": "op1"}); !ok || v != 0 {
		t.Errorf("skybridge_peer_tunnel_failing{peer=op1} = %v (exported %v), want 0", v, ok)
	}
	if v, _ := fam.Value("skybridge_gateway_info", map[string]string{"node": "op0", "site": "zrh-dc", "mode": "record"}); v != 1 {
		t.Errorf("skybridge_gateway_info for op0 = %v", v)
	}
	if v, _ := fam.Value("skybridge_identity_expiry_timestamp_seconds", nil); time.Until(time.Unix(int64(v), 0)) < 50*time.Minute {
		t.Errorf("identity expiry %v is not the certificate's (an hour from now)", v)
	}
	if v, _ := fam.Value("skybridge_identity_issued_timestamp_seconds", nil); time.Since(time.Unix(int64(v), 0)) > 10*time.Minute || time.Since(time.Unix(int64(v), 0)) < 0 {
		t.Errorf("identity issued at %v, not the certificate's (just now)", v)
	}
	// Every metric the shipped alerting rules use is one a live gateway
	// exports (promtool, in scripts/test.sh, checks the rules' syntax and
	// behaviour). The decision counter exists once a policy names classes.
	a.g.metrics.classes([]string{"pii-eu"})
	fam, err = scrape.Get(context.Background(), noRedirect, a.url(t, "/metrics"), tok)
	if err != nil {
		t.Fatal(err)
	}
	// At zero from the start, so that the alert's increase() sees the
	// first denial: the policy's classes, and the undefined ones.
	for _, class := range []string{"pii-eu", undefinedClass} {
		if v, ok := fam.Value("skybridge_policy_decisions_total", map[string]string{"class": class, "action": "store", "outcome": "denied"}); !ok || v != 0 {
			t.Errorf("skybridge_policy_decisions_total{class=%q,action=store,outcome=denied} = %v (exported %v), want 0", class, v, ok)
		}
	}
	rules, err := os.ReadFile("../docs/examples/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	names := regexp.MustCompile(`skybridge_[a-z_]+`).FindAllString(string(rules), -1)
	if len(names) < 8 {
		t.Fatalf("only %d metric names found in alerts.yml", len(names))
	}
	for _, name := range names {
		// Only a gateway with an issuer has them: TestIssuerAnsweredMetric.
		if name == "skybridge_issuer_last_answer_timestamp_seconds" || name == "skybridge_issuer_refresh_interval_seconds" {
			continue
		}
		// Only a gateway that stores images has it: TestAtRestMetrics.
		if name == "skybridge_images_outside_policy" {
			continue
		}
		if _, ok := fam[name]; !ok {
			t.Errorf("alerts.yml uses %s, which the gateway does not export", name)
		}
	}
	for _, name := range []string{"skybridge_migration_bytes_total", "skybridge_migrations_running", "go_goroutines", "process_resident_memory_bytes"} {
		if _, ok := fam.Value(name, nil); !ok {
			t.Errorf("metric %s missing", name)
		}
	}

	// A browser: the link with the token sets a session cookie and
	// redirects to a URL without the token.
	resp := get("/?token="+tok, nil)
	if resp.StatusCode != http.StatusSeeOther || strings.Contains(resp.Header.Get("Location"), tok) {
		t.Fatalf("GET /?token=…: %s, Location %q; want 303 to a URL without the token", resp.Status, resp.Header.Get("Location"))
	}
	var cookie *http.Cookie
	for _, ck := range resp.Cookies() {
		if ck.Name == a.cookieName(t) {
			cookie = ck
		}
	}
	if cookie == nil || !cookie.HttpOnly || cookie.SameSite != http.SameSiteStrictMode || strings.Contains(cookie.Value, tok) {
		t.Fatalf("session cookie %+v: want HttpOnly, SameSite=Strict, not the token", cookie)
	}
	withCookie := map[string]string{"Cookie": cookie.String()}
	resp = get("/", withCookie)
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "dashboard.js") || !strings.Contains(resp.Header.Get("Content-Security-Policy"), "script-src 'self'") {
		t.Fatalf("GET / with the session: %s, CSP %q", resp.Status, resp.Header.Get("Content-Security-Policy"))
	}
	resp = get("/api/v1/dashboard", withCookie)
	var d Dashboard
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil {
		t.Fatal(err)
	}
	if len(d.Graph.Sites) != 3 || len(d.Graph.Tunnels) != 3 {
		t.Errorf("dashboard graph: %d sites, %d tunnels; want 3 and 3 (the impostor in neither)", len(d.Graph.Sites), len(d.Graph.Tunnels))
	}
	for _, site := range []string{"zrh-dc", "aws-fra", "gcp-ams"} {
		if !strings.Contains(d.SVG, `data-site="`+site+`"`) {
			t.Errorf("dashboard picture lacks site %s", site)
		}
	}
	refused := false
	for _, m := range d.Status.Members {
		refused = refused || (m.Node == "op3" && m.State == StateRefused && strings.Contains(m.Reason, "unknown_ca"))
	}
	if !refused {
		t.Errorf("the impostor is not listed as refused with its reason: %+v", d.Status.Members)
	}

	// The bearer token works for the graph too.
	resp = get("/api/v1/graph?format=dot", map[string]string{"Authorization": "Bearer " + tok})
	body, _ = io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"op0" -- "op1"`) {
		t.Errorf("graph as dot: %s\n%s", resp.Status, body)
	}

	// Logs: every line names its gateway with the stable keys, and no
	// secret reaches them, neither the token nor a WireGuard private key.
	out := lw.String()
	for _, secret := range []string{tok, a.g.wgKey.Base64Secret(), b.g.wgKey.Base64Secret()} {
		if strings.Contains(out, secret) {
			t.Error("a secret appears in the logs")
		}
	}
	refusalLogged := false
	for line := range strings.Lines(out) {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line is not JSON: %v: %s", err, line)
		}
		if rec["node"] == nil || rec["site"] == nil {
			t.Errorf("log line without node and site: %s", line)
		}
		refusalLogged = refusalLogged || (rec["msg"] == "gateway refused" && rec["node"] == "op0" && rec["peer"] == "op3" && rec["reason"] == "unknown_ca")
	}
	if !refusalLogged {
		t.Error("op0 did not log the impostor's refusal with peer and reason")
	}
}

// TestOperatorToken: the token is made (0600) on first start and read
// back; one too short, damaged into bytes nobody could type, or open to
// other users is refused with what to do.
func TestOperatorToken(t *testing.T) {
	dir := t.TempDir()
	made := filepath.Join(dir, "made")
	tok, err := operatorToken(made)
	if err != nil || len(tok) < 40 {
		t.Fatalf("first start: %q, %v", tok, err)
	}
	if fi, err := os.Stat(made); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("made token: %v, %v; want mode 0600", fi, err)
	}
	if again, err := operatorToken(made); err != nil || again != tok {
		t.Fatalf("second start read %q, %v; want %q", again, err, tok)
	}
	for _, tc := range []struct {
		name, content string
		mode          os.FileMode
		want          string // in the error; "" for accepted
	}{
		{"chosen", "correct-horse-battery-staple\n", 0o600, ""},
		{"short", "secret\n", 0o600, "too short"},
		{"zeros", strings.Repeat("\x00", 32), 0o600, "control character"},
		{"binary", "\xff\xfe" + strings.Repeat("a", 30), 0o600, "not UTF-8"},
		{"escape", "\x1b[31m" + strings.Repeat("a", 20), 0o600, "control character"},
		// Accepted by releases before the check: a shared token an
		// operator wrote must not stop the gateway after an upgrade.
		{"inner space", "correct horse battery staple", 0o600, ""},
		{"letters", "jeton partagé de l'équipe réseau", 0o600, ""},
		{"byte-order mark", "\ufeffcorrect-horse-battery-staple", 0o600, "invisible"},
		{"zero-width space", "correct-horse\u200bbattery-staple", 0o600, "invisible"},
		{"short in characters, long in bytes", "日本語の秘密です", 0o600, "too short"},
		{"open", "correct-horse-battery-staple\n", 0o644, "chmod 600"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name)
			if err := os.WriteFile(path, []byte(tc.content), tc.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tc.mode); err != nil {
				t.Fatal(err)
			}
			got, err := operatorToken(path)
			switch {
			case tc.want == "" && (err != nil || got != strings.TrimSpace(tc.content)):
				t.Fatalf("got %q, %v; want the file's token", got, err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %q, %v; want an error saying %q", got, err, tc.want)
			}
		})
	}
}

// gauge is the value of the first series of a gauge g exports.
func gauge(t *testing.T, g *Gateway, name string) (float64, bool) {
	t.Helper()
	fams, err := g.metrics.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name {
			return f.GetMetric()[0].GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// TestIssuerAnsweredMetric: a gateway with an issuer (here a local CA,
// ca_dir) exports when it last answered, from its first request at the
// start on; one without an issuer exports nothing of the kind, so the
// alert cannot fire for it.
func TestIssuerAnsweredMetric(t *testing.T) {
	dir := t.TempDir()
	ca := meshCA(t, dir)
	const name = "skybridge_issuer_last_answer_timestamp_seconds"
	value := func(g *Gateway) (float64, bool) { return gauge(t, g, name) }
	start := time.Now()
	var logs syncbuf.Buffer
	withCA := startLiveGatewayWith(t, ca, dir, 0, "zrh-dc", nil, &logs, func(s *Settings) { s.Identity.CADir, s.Identity.Refresh = ca.Dir(), "1s" })
	// The alert waits three refresh intervals (ten minutes at least).
	if v, ok := gauge(t, withCA.g, "skybridge_issuer_refresh_interval_seconds"); !ok || v != 1 {
		t.Errorf("skybridge_issuer_refresh_interval_seconds = %v (exported %v), want 1 (refresh = \"1s\")", v, ok)
	}
	waitUntil(t, 10*time.Second, "the issuer's first answer", func() bool { v, _ := value(withCA.g); return v > 0 })
	if v, _ := value(withCA.g); v < float64(start.Unix()) || v > float64(time.Now().Unix()) {
		t.Errorf("%s = %v, not a time since the start (%d)", name, v, start.Unix())
	}
	// The issuer gone (its directory moved away): the time stops, which
	// is what the alert watches, and comes back with it.
	moved := ca.Dir() + ".away"
	if err := os.Rename(ca.Dir(), moved); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "refreshes failing", func() bool {
		return strings.Contains(logs.String(), "revocation list cannot be read")
	})
	stopped, _ := value(withCA.g)
	waitUntil(t, 10*time.Second, "a second past the last answer, refreshes still failing", func() bool {
		return time.Now().Unix() > int64(stopped)+1 && strings.Count(logs.String(), "refresh trust bundle") >= 3
	})
	if v, _ := value(withCA.g); v != stopped {
		t.Errorf("%s moved from %v to %v while the issuer could not be read", name, stopped, v)
	}
	if err := os.Rename(moved, ca.Dir()); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the issuer answering again", func() bool { v, _ := value(withCA.g); return v > stopped })
	st, err := withCA.g.Status()
	if err != nil {
		t.Fatal(err)
	}
	if id := st.Identity; id.Issuer != "ca_dir" || id.IssuerAnswered == nil || id.IssuerAnswered.Before(start.Truncate(time.Second)) || id.StartedOnDisk {
		t.Errorf("status of a gateway with a local CA: issuer %q, answered %v, started on disk %v", id.Issuer, id.IssuerAnswered, id.StartedOnDisk)
	}
	without := startLiveGatewayWith(t, ca, dir, 1, "fra-dc", nil, io.Discard, nil)
	for _, n := range []string{name, "skybridge_issuer_refresh_interval_seconds"} {
		if v, ok := gauge(t, without.g, n); ok {
			t.Errorf("a gateway without an issuer exports %s = %v", n, v)
		}
	}
	if st, err := without.g.Status(); err != nil || st.Identity.Issuer != "" || st.Identity.IssuerAnswered != nil {
		t.Errorf("status of a gateway without an issuer: %+v, %v", st.Identity, err)
	}
}

// TestOperatorSessions: each login is a session of its own, found by its
// cookie's value, that ends sessionLifetime after it began on the
// gateway's side too (browsers send a host's cookies to all of its
// ports, so a cookie can reach another service); past maxSessions the
// oldest is forgotten.
func TestOperatorSessions(t *testing.T) {
	o := &operator{sessions: map[[32]byte]time.Time{}}
	a, b := o.login(), o.login()
	if a == b || !o.inSession(a) || !o.inSession(b) || o.inSession("") || o.inSession(a+"0") {
		t.Fatalf("two logins: %q %q, in session %v %v", a, b, o.inSession(a), o.inSession(b))
	}
	o.sessions[sha256.Sum256([]byte(a))] = time.Now().Add(-sessionLifetime)
	if o.inSession(a) || !o.inSession(b) {
		t.Fatal("a session past its lifetime still counts, or ended another")
	}
	first := o.login()
	o.sessions[sha256.Sum256([]byte(first))] = time.Now().Add(-time.Hour) // the oldest
	for range maxSessions {
		o.login()
	}
	if o.inSession(first) || len(o.sessions) > maxSessions {
		t.Fatalf("after %d more logins: the oldest still counts (%v), %d kept", maxSessions, o.inSession(first), len(o.sessions))
	}
}

// TestOperatorTokenOwner: a token file of another user is refused (one
// who may write the directory could have put it there, with a token of
// their choosing).
func TestOperatorTokenOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the file to another user")
	}
	path := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(path, []byte("a-token-someone-else-chose-0123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := operatorToken(path); err == nil || !strings.Contains(err.Error(), "belongs to uid 65534") {
		t.Fatalf("a token file of uid 65534: %v; want it refused", err)
	}
}

// TestOperatorRefusalsHoldNoSlot: the endpoint serves a bounded number of
// connections, counted before anyone is authenticated. A refused request
// closes its connection: kept alive, as many refused requests as there
// are slots locked the token's holder out (a scrape waited for a slot).
func TestOperatorRefusalsHoldNoSlot(t *testing.T) {
	ca := meshCA(t, t.TempDir())
	lg := startLiveGatewayWith(t, ca, t.TempDir(), 0, "s", nil, io.Discard, nil)
	addr := lg.operatorAddr(t).String()
	for range maxOperatorConn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: %s\r\n\r\n", addr)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || !resp.Close {
			t.Fatalf("a request without the token: %s, closing the connection: %v; want 401 and closing", resp.Status, resp.Close)
		}
	}
	req, _ := http.NewRequest(http.MethodGet, lg.url(t, "/metrics"), nil)
	req.Header.Set("Authorization", "Bearer "+lg.token(t))
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("a scrape with the token after %d refused requests: %v", maxOperatorConn, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("a scrape with the token: %s", resp.Status)
	}
}

// TestOperatorEventStreamEndsWithSession: the dashboard's event stream,
// opened with a session, ends when the session does (a session is checked
// when a request begins, and this request does not end by itself).
func TestOperatorEventStreamEndsWithSession(t *testing.T) {
	ca := meshCA(t, t.TempDir())
	lg := startLiveGatewayWith(t, ca, t.TempDir(), 0, "s", nil, io.Discard, nil)
	noRedirect := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noRedirect.Get(lg.url(t, "/?token="+lg.token(t)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	var session *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == lg.cookieName(t) {
			session = c
		}
	}
	if session == nil {
		t.Fatalf("no session cookie from the login link (%s)", resp.Status)
	}
	// One stream with the cookie alone, one with another kind of
	// Authorization header beside it (the cookie admits it all the same).
	client := &http.Client{Timeout: 30 * time.Second}
	var streams []*bufio.Reader
	for _, auth := range []string{"", "Basic eDp5"} {
		req, _ := http.NewRequest(http.MethodGet, lg.url(t, "/api/v1/events"), nil)
		req.AddCookie(session)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		stream, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer stream.Body.Close()
		r := bufio.NewReader(stream.Body)
		if line, err := r.ReadString('\n'); err != nil || line != "event: snapshot\n" {
			t.Fatalf("first line of the stream %q (%v), want a snapshot (status %s)", line, err, stream.Status)
		}
		streams = append(streams, r)
	}
	op := lg.g.operator.Load()
	op.sessMu.Lock()
	clear(op.sessions) // the session ends, as at its lifetime's end
	op.sessMu.Unlock()
	for i, r := range streams {
		ended := make(chan error, 1)
		go func() { _, err := io.Copy(io.Discard, r); ended <- err }()
		select {
		case <-ended:
		case <-time.After(10 * time.Second):
			t.Fatalf("event stream %d went on after its session ended", i)
		}
	}
}

// TestOperatorConnectionsEnd: a connection that sends no request is let
// go after the header timeout, and an event stream, however authenticated,
// ends after maxEventStream (the browser's EventSource reconnects).
func TestOperatorConnectionsEnd(t *testing.T) {
	was := maxEventStream
	maxEventStream = 2 * time.Second
	t.Cleanup(func() { maxEventStream = was })
	ca := meshCA(t, t.TempDir())
	lg := startLiveGatewayWith(t, ca, t.TempDir(), 0, "s", nil, io.Discard, nil)

	c, err := net.Dial("tcp", lg.operatorAddr(t).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil || time.Since(start) > 8*time.Second {
		t.Fatalf("a connection that sent nothing: read %d bytes, %v after %s; want it closed within the header timeout", n, err, time.Since(start))
	}

	req, _ := http.NewRequest(http.MethodGet, lg.url(t, "/api/v1/events"), nil)
	req.Header.Set("Authorization", "Bearer "+lg.token(t))
	stream, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Body.Close()
	start = time.Now()
	if _, err := io.Copy(io.Discard, stream.Body); err != nil || time.Since(start) > 20*time.Second {
		t.Fatalf("an event stream with the token ended after %s (%v); want it ended after %s", time.Since(start), err, maxEventStream)
	}
}

// TestControlSocketPlace: the control socket is not made in a directory
// any user may write, or another user owns (one could put a socket of
// theirs at its path while the gateway is down, and be sent policies and
// Vault tokens for bursts); one its group may write (umask 002) is only
// warned about.
func TestControlSocketPlace(t *testing.T) {
	try := func(t *testing.T, mode os.FileMode, owner int) error {
		t.Helper()
		dir := t.TempDir()
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		if owner != 0 {
			if err := os.Chown(dir, owner, owner); err != nil {
				if os.Getenv("CI") == "true" {
					t.Fatalf("cannot give a directory to another user (CI runs as root): %v", err)
				}
				t.Skipf("cannot give a directory to another user: %v", err)
			}
		}
		g := &Gateway{s: &Settings{ControlSocket: filepath.Join(dir, "control.sock")}, log: slog.New(slog.DiscardHandler)}
		c, err := g.serveControl()
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := try(t, 0o777, 0); err == nil || !strings.Contains(err.Error(), "may be written by any user") {
		t.Errorf("a directory anyone may write: %v", err)
	}
	for _, mode := range []os.FileMode{0o700, 0o755, 0o775} {
		if err := try(t, mode, 0); err != nil {
			t.Errorf("a directory of ours, mode %v: %v", mode, err)
		}
	}
	t.Run("another user's", func(t *testing.T) {
		if err := try(t, 0o700, 12345); err == nil || !strings.Contains(err.Error(), "belongs to user 12345") {
			t.Errorf("a directory of another user: %v", err)
		}
	})
}

// TestDashboardSnapshotShared: the dashboard snapshot is shared by every
// request; answering one must not write into it (append wrote the
// newline into the snapshot's spare room, from every request at once).
// Run with -race too.
func TestDashboardSnapshotShared(t *testing.T) {
	g := &Gateway{log: slog.New(slog.DiscardHandler)}
	g.metrics = newMetrics(g)
	j, err := json.Marshal(Dashboard{Time: time.Now(), Status: &Status{Node: "n", Site: "s"}, SVG: "<svg/>"})
	if err != nil {
		t.Fatal(err)
	}
	room := bytes.Repeat([]byte{'x'}, 64)
	snap := append(append(make([]byte, 0, len(j)+len(room)), j...), room...)[:len(j)] // spare room, as json.Marshal leaves
	const tok = "0123456789abcdef0123"
	op := &operator{g: g, token: []byte(tok), sessions: map[[32]byte]time.Time{}, snap: snap, snapAt: time.Now().Add(time.Hour)}
	h := op.routes()
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 20 {
				req := httptest.NewRequest(http.MethodGet, "/api/v1/dashboard", nil)
				req.Header.Set("Authorization", "Bearer "+tok)
				w := httptest.NewRecorder()
				h.ServeHTTP(w, req)
				if w.Code != http.StatusOK || w.Body.String() != string(j)+"\n" {
					t.Errorf("GET /api/v1/dashboard: %d %q", w.Code, w.Body.String())
					return
				}
			}
		})
	}
	wg.Wait()
	if got := snap[len(snap):cap(snap)]; !bytes.Equal(got, room) {
		t.Errorf("the shared snapshot's spare room was written: %q", got)
	}
}
