package mesh

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// dashboardHarness runs ui/dashboard.js in node with as much of a DOM as
// it uses, renders the snapshot in argv[3] and prints, for each row of
// the peers table, the node and the class of its handshake cell; then
// sends the page a "failure" event and prints what #live says.
const dashboardHarness = `
const fs = require("fs"), vm = require("vm");
class Node {}
class El extends Node {
  constructor(tag) { super(); this.tag = tag; this.children = []; this.dataset = {}; this.className = ""; this.textContent = ""; }
  append(...c) { this.children.push(...c); }
  replaceChildren(...c) { this.children = c; }
}
const els = {};
function table() { const t = new El("table"); t.tBodies = [new El("tbody")]; t.tHead = { rows: [{ cells: new Array(10) }] }; return t; }
const document = {
  title: "", body: { dataset: {} },
  createElement: (t) => new El(t),
  querySelector: (s) => els[s] || (els[s] = ["#peers", "#sending", "#receiving", "#decisions"].includes(s) ? table() : new El(s)),
  importNode: (n) => n,
};
class DOMParser { parseFromString() { return { documentElement: { nodeName: "svg" } }; } }
const listeners = {};
class EventSource { addEventListener(name, f) { listeners[name] = f; } }
const ctx = vm.createContext({ document, DOMParser, EventSource, Node, console });
vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), ctx);
ctx.render(JSON.parse(fs.readFileSync(process.argv[3], "utf8")));
for (const tr of els["#peers"].tBodies[0].children) console.log(tr.dataset.node + " " + tr.children[6].className);
if (listeners.failure) listeners.failure({ data: "read wg0: no such device" });
console.log("live: " + els["#live"].textContent);
`

// TestDashboardPeerHealth: the peers table colours each peer's handshake
// cell by this gateway's tunnel to it. In a full mesh of op0, op1 and
// op2 seen from op0, the tunnel op1—op2, between two other gateways, is
// not op1's: its STALE tunnel from op0 is shown red. A snapshot the
// gateway could not take is shown with its reason.
func TestDashboardPeerHealth(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("node is not installed: CI must run the dashboard's script (scripts/test.sh installs nodejs)")
		}
		t.Skip("node is not installed: the dashboard's script is not run")
	}
	now := time.Now()
	var nodes []Node
	for _, n := range []string{"op0", "op1", "op2"} {
		nodes = append(nodes, Node{Attributes: &certs.Attributes{Node: n, Site: "s-" + n}})
	}
	edges := map[[2]string]bool{{"op0", "op1"}: true, {"op0", "op2"}: true, {"op1", "op2"}: true}
	members := []MemberStatus{
		// sends without ever a handshake: the tunnel fails (STALE)
		{Node: "op1", Site: "s-op1", State: StateVerified, SiteVerified: true, Peer: true, TxBytes: 4096},
		{Node: "op2", Site: "s-op2", State: StateVerified, SiteVerified: true, Peer: true, LastHandshake: now.Add(-10 * time.Second)},
	}
	for i := range members {
		members[i].Health = tunnelHealth(members[i], now)
	}
	if members[0].Health != TunnelStale || members[1].Health != TunnelFresh {
		t.Fatalf("health %q, %q: want stale, fresh", members[0].Health, members[1].Health)
	}
	mg := buildGraph(nodes, edges, "op0", members, now, false)
	d := Dashboard{Time: now, Status: &Status{Node: "op0", Site: "s-op0", Members: members}, Graph: mg, SVG: "<svg/>"}
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "harness.js"), []byte(dashboardHarness), 0o600)
	os.WriteFile(filepath.Join(dir, "snapshot.json"), b, 0o600)
	out, err := exec.Command(node, filepath.Join(dir, "harness.js"), filepath.Join("ui", "dashboard.js"), filepath.Join(dir, "snapshot.json")).CombinedOutput()
	if err != nil {
		t.Fatalf("node: %v\n%s", err, out)
	}
	got := strings.Split(strings.TrimSpace(string(out)), "\n")
	want := []string{"op1 health-stale", "op2 health-fresh", "live: gateway error: read wg0: no such device"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("peers table (node, handshake cell's class), then #live:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
