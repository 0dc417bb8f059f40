package e2e

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBenchRoutesUnderLoss measures how often packet loss on the underlay
// moves a site's routes between its gateways when none of them failed.
// An on-prem gateway probes the two gateways of a cloud site through its
// tunnels, as in TestHAFailover; nft drops a share of the UDP packets
// (WireGuard and gossip) in and out of the on-prem host at random. For
// each loss rate it counts, over a window, the verdicts "unreachable
// through its tunnel" in the on-prem gateway's log and the moves of the
// site's carrier away from its first gateway seen by polling its status
// (the move back is not counted again); every one is a false alarm, and
// every move breaks the site's connections twice (away and back).
//
// SKYBRIDGE_BENCH_LOSS=5,10 (per cent, each way), SKYBRIDGE_BENCH_LOSS_FOR=240
// (seconds per rate), SKYBRIDGE_BENCH_LOSS_LOGS=DIR (keep the on-prem
// gateway's log there). SKYBRIDGE_E2E_BINARY runs another build (an older
// one, to compare).
func TestBenchRoutesUnderLoss(t *testing.T) {
	benchmarkOnly(t)
	var losses []int // per mille: nft draws in thousandths
	for _, f := range strings.Split(envString("SKYBRIDGE_BENCH_LOSS", "5,10"), ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		perMille := int(math.Round(v * 10))
		if err != nil || perMille < 1 || perMille >= 1000 {
			t.Fatalf("SKYBRIDGE_BENCH_LOSS: %q is not a percentage from 0.1 to 99.9", f)
		}
		losses = append(losses, perMille)
	}
	window := time.Duration(envInt("SKYBRIDGE_BENCH_LOSS_FOR", 240)) * time.Second

	l := newLab(t)
	defer l.dumpLogs()
	sites := l.haSites()
	for _, s := range sites {
		l.startQuiet(s, 1)
	}
	zrh := sites[0]
	settled := func() (bool, string) {
		st, err := status(zrh.socket)
		if err != nil {
			return false, err.Error()
		}
		return st.Carriers["aws-eu-central-1"] == "gw-2a" && len(st.Unreachable) == 0,
			fmt.Sprintf("carrier %s, unreachable %v", st.Carriers["aws-eu-central-1"], st.Unreachable)
	}
	// Proven, not merely answering: a gateway answering for 10 s without
	// a miss (probeRecovery). Before that, while neither is, one that
	// answers counts, and the routes follow each second miss.
	steadySince := time.Time{}
	waitFor(t, 120*time.Second, "both cloud gateways proven reachable (none unreachable for 12 s), routes through gw-2a", func() (bool, string) {
		ok, state := settled()
		if !ok {
			steadySince = time.Time{}
			return false, state
		}
		if steadySince.IsZero() {
			steadySince = time.Now()
		}
		return time.Since(steadySince) >= 12*time.Second, state
	})
	underlayIf := "u" + zrh.short + l.id
	logFile := filepath.Join(l.dir, "gw-"+zrh.short+"-1.log")
	verdicts := func() int {
		b, _ := os.ReadFile(logFile)
		return strings.Count(string(b), "unreachable through its tunnel")
	}

	type row struct {
		loss            float64
		verdicts, moves int // moves away from gw-2a
		longestAway     time.Duration
		stillAway       bool // the longest had not ended with the window
	}
	var rows []row
	for _, perMille := range losses {
		rules := []string{
			"add table inet sbloss",
			"add chain inet sbloss in { type filter hook input priority 0 ; }",
			"add chain inet sbloss out { type filter hook output priority 0 ; }",
			fmt.Sprintf("add rule inet sbloss in iifname %q meta l4proto udp numgen random mod 1000 < %d drop", underlayIf, perMille),
			fmt.Sprintf("add rule inet sbloss out oifname %q meta l4proto udp numgen random mod 1000 < %d drop", underlayIf, perMille),
		}
		for _, r := range rules {
			if out, err := l.nsexec(zrh.ns, append([]string{"nft"}, strings.Fields(r)...)...); err != nil {
				t.Fatalf("nft %s: %v %s", r, err, out)
			}
		}
		before := verdicts()
		r := row{loss: float64(perMille) / 10}
		carrier, awaySince := "gw-2a", time.Time{}
		for end := time.Now().Add(window); time.Now().Before(end); time.Sleep(250 * time.Millisecond) { // sampling, not waiting for a condition
			st, err := status(zrh.socket)
			if err != nil {
				continue // a status call is local: not subject to the loss, but may time out under load
			}
			c := st.Carriers["aws-eu-central-1"]
			if c == "" || c == carrier {
				continue
			}
			// A false alarm is the move away; the move back ends it.
			switch {
			case carrier == "gw-2a":
				r.moves++
				awaySince = time.Now()
			case c == "gw-2a":
				r.longestAway = max(r.longestAway, time.Since(awaySince))
			}
			carrier = c
		}
		if d := time.Since(awaySince); carrier != "gw-2a" && d > r.longestAway {
			r.longestAway, r.stillAway = d, true
		}
		r.verdicts = verdicts() - before
		if out, err := l.nsexec(zrh.ns, "nft", "delete", "table", "inet", "sbloss"); err != nil {
			t.Fatalf("nft delete table: %v %s", err, out)
		}
		rows = append(rows, r)
		// The next rate starts from the same place: routes back on gw-2a.
		waitFor(t, 60*time.Second, "routes back on gw-2a, none unreachable", settled)
	}

	if dir := os.Getenv("SKYBRIDGE_BENCH_LOSS_LOGS"); dir != "" {
		// To see what moved the routes: the on-prem gateway's log.
		if b, err := os.ReadFile(logFile); err == nil {
			os.WriteFile(filepath.Join(dir, "onprem-gateway.log"), b, 0o600)
		}
	}
	bin := "this build"
	if b := os.Getenv("SKYBRIDGE_E2E_BINARY"); b != "" {
		bin = b
	}
	var b strings.Builder
	fmt.Fprintf(&b, "routes under loss (%s, %s per rate, UDP dropped at random both ways at the on-prem host)\n", bin, window)
	fmt.Fprintln(&b, "| UDP loss each way | gateways judged unreachable | carrier moves away (each away and back) | per hour | longest away |")
	fmt.Fprintln(&b, "|---|---|---|---|---|")
	for _, r := range rows {
		longest := r.longestAway.Round(100 * time.Millisecond).String()
		if r.stillAway {
			longest += ", still away as the window ended"
		}
		fmt.Fprintf(&b, "| %g %% | %d | %d | %.0f | %s |\n", r.loss, r.verdicts, r.moves,
			float64(r.moves)*float64(time.Hour)/float64(window), longest)
	}
	fmt.Print(b.String())
	t.Log("\n" + b.String())
}

func envString(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
