package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/skybridge-mesh/skybridge/internal/scrape"
)

// TestDashboardInBrowser keeps the demo's mesh running (three netstack
// gateways on loopback, so the browser reaches their dashboards), opens
// the datacenter gateway's dashboard in headless Chromium and checks what
// an operator sees: refused without the token; with the link, every site
// and tunnel of the mesh, a migration's progress moving, the policy's
// refusal with its reasons; and the same facts in the metrics Prometheus
// would scrape. It saves a screenshot (SKYBRIDGE_SCREENSHOT copies it
// elsewhere too, as the README's).
func TestDashboardInBrowser(t *testing.T) {
	chromium := tool(t, "chromium")
	demo := keepDemo(t)
	zrh := demo.Sites[0]

	var link struct {
		Address, Dashboard, Metrics string
		TokenFile                   string `json:"token_file"`
	}
	out, _ := sb(t, 0, "dashboard", "--socket", zrh.Socket, "--json")
	if err := json.Unmarshal([]byte(out), &link); err != nil || !strings.HasPrefix(link.Address, "127.0.0.1:") {
		t.Fatalf("dashboard --json: %v\n%s", err, out)
	}
	tokb, err := os.ReadFile(link.TokenFile)
	if err != nil {
		t.Fatal(err)
	}
	token := strings.TrimSpace(string(tokb))
	var graph struct {
		Sites []struct {
			Name     string `json:"name"`
			Gateways []struct {
				Node string `json:"node"`
			} `json:"gateways"`
		} `json:"sites"`
		Tunnels []struct{ A, B, Health string } `json:"tunnels"`
	}
	out, _ = sb(t, 0, "graph", "--socket", zrh.Socket, "--format", "json")
	if err := json.Unmarshal([]byte(out), &graph); err != nil || len(graph.Sites) != len(demo.Sites) {
		t.Fatalf("graph --format json: %v, want the demo's %d sites\n%s", err, len(demo.Sites), out)
	}
	// The demo's policy lets every site peer with every other: a full
	// mesh, one tunnel for each pair of its gateways.
	var want, got []string
	for i, a := range demo.Sites {
		for _, b := range demo.Sites[i+1:] {
			want = append(want, min(a.Node, b.Node)+"-"+max(a.Node, b.Node))
		}
	}
	for _, tn := range graph.Tunnels {
		got = append(got, min(tn.A, tn.B)+"-"+max(tn.A, tn.B))
	}
	slices.Sort(want)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("graph --format json: tunnels %v, want the full mesh %v\n%s", got, want, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	alloc, cancelAlloc := chromedp.NewExecAllocator(ctx, append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.WindowSize(1440, 1300),
		chromedp.UserDataDir(t.TempDir()))...)
	defer cancelAlloc()
	browser, cancelBrowser := chromedp.NewContext(alloc, chromedp.WithErrorf(t.Logf))
	defer cancelBrowser()

	base := "http://" + link.Address
	// Without the token: refused, and told how to get in.
	resp, err := chromedp.RunResponse(browser, chromedp.Navigate(base+"/"))
	if err != nil {
		t.Fatalf("open the dashboard: %v", err)
	}
	body, err := chromedp.Run(browser, chromedp.Text(chromedp.CSS("body")))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != http.StatusUnauthorized || !strings.Contains(body, "skybridge dashboard") {
		t.Fatalf("without the token: HTTP %d, %q; want 401 and how to get the link", resp.Status, body)
	}
	resp, err = chromedp.RunResponse(browser, chromedp.Navigate(base+"/?token=not-the-token"))
	if err != nil || resp.Status != http.StatusUnauthorized {
		t.Fatalf("with a wrong token: %v, %+v; want 401", err, resp)
	}

	// With the link: redirected to a URL without the token, and live.
	if _, err := chromedp.RunResponse(browser, chromedp.Navigate(link.Dashboard)); err != nil {
		t.Fatal(err)
	}
	if err := chromedp.Do(browser, chromedp.WaitVisible(chromedp.CSS(`#mesh svg`))); err != nil {
		t.Fatal(err)
	}
	href, err := chromedp.Run(browser, chromedp.Location())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(href, token) {
		t.Errorf("the token stayed in the address bar: %s", href)
	}
	eval := func(js string, v any) {
		t.Helper()
		raw, err := chromedp.Run(browser, chromedp.Evaluate[json.RawMessage](js))
		if err == nil {
			err = json.Unmarshal(raw, v)
		}
		if err != nil {
			t.Fatalf("%s: %v", js, err)
		}
	}
	for _, s := range graph.Sites {
		var n int
		eval(fmt.Sprintf(`document.querySelectorAll('#mesh svg g.site[data-site=%q]').length`, s.Name), &n)
		if n != 1 {
			t.Errorf("site %s drawn %d times", s.Name, n)
		}
		for _, gw := range s.Gateways {
			eval(fmt.Sprintf(`document.querySelectorAll('#mesh svg g.gateway[data-node=%q]').length`, gw.Node), &n)
			if n != 1 {
				t.Errorf("gateway %s drawn %d times", gw.Node, n)
			}
		}
	}
	var drawn []string
	eval(`[...document.querySelectorAll('#mesh svg line.tunnel')].map(l => l.dataset.a + '-' + l.dataset.b)`, &drawn)
	for _, tn := range graph.Tunnels {
		if !slices.Contains(drawn, tn.A+"-"+tn.B) {
			t.Errorf("tunnel %s-%s missing from the picture (drawn: %v)", tn.A, tn.B, drawn)
		}
	}
	var peerRows int
	eval(`document.querySelectorAll('#peers tbody tr[data-state="verified"]').length`, &peerRows)
	if peerRows != 2 {
		t.Errorf("%d verified peers listed, want 2", peerRows)
	}
	// The demo's refused migration: swiss banking secrets may not go to
	// the US, and the page says why.
	var denial string
	eval(`[...document.querySelectorAll('#decisions tbody tr[data-outcome="denied"]')].map(r => r.textContent).join('\n')`, &denial)
	if !strings.Contains(denial, "swiss-banking-secret") || !strings.Contains(denial, "aws-us-east-1") {
		t.Errorf("the demo's denial is not listed with its class and site:\n%s", denial)
	}

	// Both ends' counters before the migration, to check what it adds.
	var fra struct {
		Metrics   string
		TokenFile string `json:"token_file"`
	}
	out, _ = sb(t, 0, "dashboard", "--socket", demo.Sites[1].Socket, "--json")
	if err := json.Unmarshal([]byte(out), &fra); err != nil {
		t.Fatal(err)
	}
	ftok, err := os.ReadFile(fra.TokenFile)
	if err != nil {
		t.Fatal(err)
	}
	// A series missing reads as 0, which a check of "at least" or "at
	// most" would take for a value: missing fails instead. The demo's
	// migrations have made every series read here.
	metric := func(fam scrape.Families, name string, labels map[string]string) float64 {
		t.Helper()
		v, ok := fam.Value(name, labels)
		if !ok {
			t.Errorf("no series %s%v in the metrics", name, labels)
		}
		return v
	}
	counter := func(url, tok, name string, labels map[string]string) float64 {
		t.Helper()
		fam, err := scrape.Get(ctx, http.DefaultClient, url, strings.TrimSpace(tok))
		if err != nil {
			t.Fatal(err)
		}
		return metric(fam, name, labels)
	}
	sendRole, recvRole := map[string]string{"role": "send"}, map[string]string{"role": "receive"}
	sentBefore := counter(link.Metrics, token, "skybridge_migration_bytes_total", sendRole)
	recvBefore := counter(fra.Metrics, string(ftok), "skybridge_migration_bytes_total", recvRole)
	doneBefore := counter(link.Metrics, token, "skybridge_migration_duration_seconds", map[string]string{"role": "send", "outcome": "done"})

	// A migration throttled to last several seconds: its progress moves.
	img := filepath.Join(demo.WorkDir, "ledger.raw")
	makeNoise(t, img, 48<<20)
	events, cmd := startMigration(t, "migrate", "run", img, "--to", demo.Sites[1].Site, "--class", "pii-eu", "--bwlimit", "4MB/s", "--socket", zrh.Socket)
	var id string
	for ev := range events {
		if id = ev.ID; id != "" {
			break
		}
	}
	if id == "" {
		t.Fatal("the migration reported no ID")
	}
	row := fmt.Sprintf(`document.querySelector('#sending tbody tr[data-id=%q]')`, id)
	var seen []float64
	shot := filepath.Join(t.ArtifactDir(), "dashboard.png")
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		var state struct {
			State   string `json:"state"`
			Percent string `json:"percent"`
		}
		eval(`(() => { const r = `+row+`; return r ? {state: r.dataset.state, percent: r.dataset.percent} : {}; })()`, &state)
		if p, err := strconv.ParseFloat(state.Percent, 64); err == nil && (len(seen) == 0 || p != seen[len(seen)-1]) {
			seen = append(seen, p)
			if p > 30 && p < 80 && !fileExists(shot) {
				png, err := chromedp.Run(browser, chromedp.FullScreenshot(100))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(shot, png, 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
		if state.State == "done" {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	final := lastEvent(t, events, cmd)
	if final.Record == nil || final.Record.State != "done" {
		t.Fatalf("migration: %+v", final)
	}
	if len(seen) == 0 {
		t.Fatal("the migration never appeared on the page")
	}
	moving := 0
	for i := 1; i < len(seen); i++ {
		if seen[i] > seen[i-1] && seen[i-1] > 0 && seen[i] < 100 {
			moving++
		}
	}
	if moving < 2 || seen[len(seen)-1] != 100 {
		t.Errorf("progress seen on the page: %v; want it to rise through at least three values to 100", seen)
	}
	t.Logf("progress seen on the page: %v; screenshot: %s", seen, shot)
	if !fileExists(shot) {
		t.Error("no screenshot taken mid-migration")
	} else if dst := os.Getenv("SKYBRIDGE_SCREENSHOT"); dst != "" {
		b, _ := os.ReadFile(shot)
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// The metrics tell the same story, and need the token too.
	if r, err := http.Get(link.Metrics); err != nil || r.StatusCode != http.StatusUnauthorized {
		t.Fatalf("metrics without the token: %v %v", err, r)
	}
	fam, err := scrape.Get(ctx, http.DefaultClient, link.Metrics, token)
	if err != nil {
		t.Fatal(err)
	}
	sent := metric(fam, "skybridge_migration_bytes_total", sendRole)
	if d := sent - sentBefore; d != float64(final.Record.Stats.BytesSent) {
		t.Errorf("skybridge_migration_bytes_total{role=send} rose by %.0f, the migration sent %d", d, final.Record.Stats.BytesSent)
	}
	if n := metric(fam, "skybridge_migration_duration_seconds", map[string]string{"role": "send", "outcome": "done"}); n != doneBefore+1 {
		t.Errorf("sends recorded as done went from %v to %v, want one more", doneBefore, n)
	}
	if v := metric(fam, "skybridge_policy_decisions_total", map[string]string{"class": "swiss-banking-secret", "outcome": "denied"}); v < 1 {
		t.Errorf("the demo's denial is not counted: %v", v)
	}
	if v := metric(fam, "skybridge_policy_decisions_total", map[string]string{"class": "pii-eu", "action": "store", "outcome": "allowed"}); v < 2 {
		t.Errorf("pii-eu store decisions allowed: %v, want at least 2", v)
	}
	for _, s := range demo.Sites {
		if v := metric(fam, "skybridge_site_reachable", map[string]string{"site": s.Site}); v != 1 {
			t.Errorf("skybridge_site_reachable{site=%q} = %v", s.Site, v)
		}
	}
	if v := metric(fam, "skybridge_peer_handshake_age_seconds", map[string]string{"peer": demo.Sites[1].Node}); v > 180 {
		t.Errorf("handshake age with %s is %v s right after a migration through its tunnel", demo.Sites[1].Node, v)
	}
	// The receiver counted what arrived.
	if d := counter(fra.Metrics, string(ftok), "skybridge_migration_bytes_total", recvRole) - recvBefore; d != float64(final.Record.Stats.BytesSent) {
		t.Errorf("receiver's bytes rose by %.0f, the sender sent %d", d, final.Record.Stats.BytesSent)
	}
	// One gateway's token opens no other gateway's endpoint: refused as
	// unauthorised, not failing some other way (unreachable, a 500).
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fra.Metrics, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if r, err := http.DefaultClient.Do(req); err != nil {
		t.Errorf("fra's metrics with zrh's token: %v", err)
	} else {
		r.Body.Close()
		if r.StatusCode != http.StatusUnauthorized {
			t.Errorf("fra's metrics with zrh's token: HTTP %d, want 401", r.StatusCode)
		}
	}
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// keptDemo is the demo's mesh left running (netstack gateways on
// loopback): the browser and the CLI reach every gateway from here.
type keptDemo struct {
	WorkDir string `json:"work_dir"`
	Sites   []struct {
		Site   string `json:"site"`
		Node   string `json:"node"`
		Socket string `json:"socket"`
	} `json:"sites"`
}

// keepDemo runs `skybridge demo --keep` and takes it down when the test
// ends.
func keepDemo(t *testing.T) *keptDemo {
	t.Helper()
	out, _ := sb(t, 0, "demo", "--keep", "--mode", "netstack", "--json")
	var d keptDemo
	if err := json.Unmarshal([]byte(out), &d); err != nil || len(d.Sites) != 3 {
		t.Fatalf("demo --keep --json: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		logTails(t, filepath.Join(d.WorkDir, "*", "gateway.log"))
		// Before --down removes the keys and logs it made.
		noSecretsInLogs(t, d.WorkDir, nil)
		sb(t, 0, "demo", "--down", d.WorkDir)
		// --down leaves the directory to what it did not make: the
		// test's own images, which would stay in the temporary directory
		// run after run.
		os.RemoveAll(d.WorkDir)
	})
	return &d
}
