package mesh

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/migrate"
	"github.com/skybridge-mesh/skybridge/policy"
)

// TestSubscribeAfterEnd: a client that subscribes to a migration that has
// already ended (one that fails at once) gets the last progress and the
// end, rather than waiting on a channel nothing will close.
func TestSubscribeAfterEnd(t *testing.T) {
	run := &runningMigration{done: make(chan struct{})}
	early := run.subscribe()
	run.publish(migrate.Progress{Phase: "policy"})
	run.end(nil, errors.New("the image is gone"))
	for name, c := range map[string]chan migrate.Progress{"before the end": early, "after the end": run.subscribe()} {
		n := 0
	read:
		for {
			select {
			case _, ok := <-c:
				if !ok {
					break read
				}
				n++
			case <-time.After(10 * time.Second):
				t.Fatalf("subscribed %s: the channel is never closed", name)
			}
		}
		if n == 0 {
			t.Errorf("subscribed %s: no progress at all", name)
		}
	}
}

// TestMigrationSeenBeforeItsRecord: the control socket hands out a
// migration's ID before the sender has written its journal record. A
// client that asks about that ID, lists migrations or resumes it in that
// moment (an apply killed and run again) must find it running; otherwise
// it starts the migration a second time or fails it as unknown.
func TestMigrationSeenBeforeItsRecord(t *testing.T) {
	j, err := migrate.OpenJournal(filepath.Join(t.TempDir(), "migrate.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	m := &migrations{journal: j, running: map[string]*runningMigration{}}
	img := filepath.Join(t.TempDir(), "vm07.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	first := migrate.SendRecord{ID: "0123456789abcdef", Image: img, Name: "vm07", Class: "risk-batch", To: "gw-fra",
		State: migrate.StateRunning, Started: time.Now()}
	_, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := m.begin(first, cancel); err != nil {
		t.Fatal(err)
	}

	rec, p, err := m.lookup(first.ID)
	if err != nil || p == nil || rec.State != migrate.StateRunning || rec.Name != "vm07" || rec.To != "gw-fra" {
		t.Fatalf("lookup before the record: %+v, progress %v, %v; want it running", rec, p, err)
	}
	sends, err := m.sends()
	if err != nil || len(sends) != 1 || sends[0].ID != first.ID {
		t.Fatalf("list before the record: %+v, %v; want the running migration", sends, err)
	}
	if _, err := m.resolve(MigrationRequest{ID: first.ID}); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("resume before the record: %v; want already running", err)
	}
	// An ID runs once, whatever its destination: two runs would share one
	// journal record and its chunks, and the second would take the first's
	// place among those running, which could then no longer be cancelled.
	// (To the same destination it is refused as a second send of the
	// image too, which hid whether this check holds.)
	twice := first
	twice.To = "gw-iad"
	if _, err := m.begin(twice, cancel); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("the same ID begun again, to another gateway: %v; want it refused as running", err)
	}
	// One image to one destination at a time; to another, it may go.
	again := first
	again.ID = "00000000000000aa"
	if _, err := m.begin(again, cancel); err == nil || !strings.Contains(err.Error(), first.ID) {
		t.Errorf("vm07 to gw-fra began twice: %v; want it refused, naming the running migration", err)
	}
	again.To = "gw-iad"
	if _, err := m.begin(again, cancel); err != nil {
		t.Errorf("vm07 to gw-iad while it goes to gw-fra: %v", err)
	}
	delete(m.running, again.ID)
	if _, _, err := m.lookup("fedcba9876543210"); err == nil {
		t.Error("an unknown migration was found")
	}

	// Once the sender writes its record, that is what is shown, once.
	// (No policy here: the sender records the refusal and stops.)
	rec, err = migrate.Send(context.Background(), migrate.SendConfig{ID: first.ID, Image: img, Name: "vm07", Class: "risk-batch",
		To: migrate.Peer{Attributes: &certs.Attributes{Node: "gw-fra"}}, Journal: j})
	if rec == nil || rec.State != migrate.StateDenied {
		t.Fatalf("send without a policy: %+v, %v", rec, err)
	}
	got, p, err := m.lookup(first.ID)
	if err != nil || p == nil || got.State != migrate.StateDenied {
		t.Errorf("lookup after the record: %+v, progress %v, %v; want the journal's denied record and live progress", got, p, err)
	}
	if sends, err := m.sends(); err != nil || len(sends) != 1 || sends[0].State != migrate.StateDenied {
		t.Errorf("list after the record: %+v, %v; want the journal's record alone", sends, err)
	}

	// Resumed: until the resume writes its record, the one in the
	// journal is the last attempt's, which is not how it stands.
	m.finished(first.ID)
	resumed := first
	resumed.Started = rec.Started.Add(time.Second)
	if _, err := m.begin(resumed, cancel); err != nil {
		t.Fatal(err)
	}
	if got, _, err := m.lookup(first.ID); err != nil || got.State != migrate.StateRunning || got.Error != "" {
		t.Errorf("lookup of a resume before its record: %+v, %v; want it running", got, err)
	}
}

// TestPickDestinationSaysWhyNoneMay: a destination named by jurisdiction
// goes to a gateway the policy lets the class reach; when none may take
// it, the refusal tried on one comes with why each other site is refused.
func TestPickDestinationSaysWhyNoneMay(t *testing.T) {
	f := newFixture(t)
	issue := func(node, site string, host byte) *certs.NodeIdentity {
		id, err := f.ca.IssueIdentity(certs.Attributes{Node: node, Site: site, Region: "r-" + site, Provider: "aws", Jurisdiction: "US",
			OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, host})}, 48*time.Hour, f.now.Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	self := f.identity("gw-zrh", "zrh", 1, f.now.Add(-time.Hour))
	ms := newMembership("gw-zrh", f.trust(), func() time.Time { return f.now }, func() {})
	for _, id := range []*certs.NodeIdentity{issue("gw-a", "us-a", 2), issue("gw-b", "us-b", 3)} {
		ms.addCert(id.Certificate().Raw)
		ms.update(id.Attributes().Node, gossipAddr, f.advert(id, 1))
	}
	g := &Gateway{members: ms, now: func() time.Time { return f.now }, s: &Settings{Topology: TopologyFullMesh}}
	g.id.Store(self)
	pol := func(site string) *policy.Policy {
		return mustPolicy(t, `policy {
  name    = "t"
  version = 1
}
class "pii-eu" {
  allow "store" {
    site = ["`+site+`"]
  }
  allow "transit" {
    site = ["*"]
  }
}
`)
	}
	g.policy.Store(&adoptedPolicy{p: pol("nowhere")})
	dest, also, err := g.pickDestination("US", "pii-eu")
	if err != nil || dest.node() != "gw-a" || len(also) != 1 || !strings.Contains(also[0], "site us-b (US)") {
		t.Fatalf("none may: %v, %q, %v; want gw-a tried and us-b's refusal beside it", dest, also, err)
	}
	g.policy.Store(&adoptedPolicy{p: pol("us-b")})
	if dest, also, err := g.pickDestination("US", "pii-eu"); err != nil || dest.node() != "gw-b" || also != nil {
		t.Fatalf("us-b may: %v, %q, %v; want gw-b", dest, also, err)
	}
	// In audit mode the policy lets a denied one through, but a gateway
	// it allows comes first, however loaded the other is not.
	audit := mustPolicy(t, `policy {
  name    = "t"
  version = 1
}
class "pii-eu" {
  mode = "audit"
  allow "store" {
    site = ["us-b"]
  }
  allow "transit" {
    site = ["*"]
  }
}
`)
	g.policy.Store(&adoptedPolicy{p: audit})
	if dest, _, err := g.pickDestination("US", "pii-eu"); err != nil || dest.node() != "gw-b" {
		t.Fatalf("audit mode, us-b allowed and us-a only let through: %v, %v; want gw-b", dest, err)
	}
	g.policy.Store(&adoptedPolicy{p: pol("*")})
	// A node named like what else it could be read as is itself.
	us := issue("us", "us-c", 4)
	ms.addCert(us.Certificate().Raw)
	ms.update("us", gossipAddr, f.advert(us, 1))
	if dest, _, err := g.pickDestination("us", "pii-eu"); err != nil || dest.node() != "us" {
		t.Fatalf("a node named us: %v, %v; want that node, not the least loaded US gateway", dest, err)
	}
	// The gateway's own site is no destination, and is said to be it.
	if _, _, err := g.pickDestination("zrh", "pii-eu"); err == nil || !strings.Contains(err.Error(), "is this gateway") {
		t.Errorf("its own site: %v; want it said to be this gateway", err)
	}
	if _, _, err := g.pickDestination("nowhere", "pii-eu"); err == nil || !strings.Contains(err.Error(), "no verified gateway matches") {
		t.Errorf("a name nothing bears: %v", err)
	}
}

// TestHubPathJudged: in the hub topology a migration from a gateway that
// is not its site's hub to one that is not its site's hub crosses three
// tunnels, through both hubs; the policy judges that path (max_hops
// counts its tunnels), where to pick the destination and to plan, not
// the direct tunnel that does not exist. In a full mesh it is direct.
func TestHubPathJudged(t *testing.T) {
	f := newFixture(t)
	issue := func(node, site, cc string, host byte) *certs.NodeIdentity {
		id, err := f.ca.IssueIdentity(certs.Attributes{Node: node, Site: site, Region: "r-" + site, Provider: "aws", Jurisdiction: cc,
			OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, host})}, 48*time.Hour, f.now.Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	self := f.identity("zrh-2", "zrh", 1, f.now.Add(-time.Hour)) // not zrh's hub: zrh-1 is
	ms := newMembership("zrh-2", f.trust(), func() time.Time { return f.now }, func() {})
	for _, id := range []*certs.NodeIdentity{issue("zrh-1", "zrh", "CH", 2), issue("fra-1", "fra", "DE", 3), issue("fra-2", "fra", "DE", 4)} {
		ms.addCert(id.Certificate().Raw)
		ms.update(id.Attributes().Node, gossipAddr, f.advert(id, 1))
	}
	g := &Gateway{members: ms, now: func() time.Time { return f.now }, s: &Settings{Topology: TopologyHub}}
	g.id.Store(self)
	g.policy.Store(&adoptedPolicy{p: mustPolicy(t, `policy {
  name    = "t"
  version = 1
}
class "direct-only" {
  allow "store" {
    site = ["*"]
  }
  allow "transit" {
    site = ["*"]
    require {
      max_hops = 1
    }
  }
}
class "via-hubs" {
  allow "store" {
    site = ["*"]
  }
  allow "transit" {
    site = ["*"]
    require {
      max_hops = 3
    }
  }
}
`)})
	names := func(as []*certs.Attributes) (out []string) {
		for _, a := range as {
			out = append(out, a.Node)
		}
		return out
	}
	attrs := map[string]*certs.Attributes{"zrh-2": self.Attributes()}
	for _, n := range ms.gateways() {
		attrs[n.node()] = n.Attributes
	}
	for _, tc := range []struct{ from, to, want string }{
		{"zrh-2", "fra-2", "zrh-1 fra-1"},
		{"zrh-2", "fra-1", "zrh-1"},
		{"zrh-1", "fra-2", "fra-1"},
		{"zrh-1", "fra-1", ""},
		{"zrh-2", "zrh-1", ""},
		{"fra-2", "zrh-2", "fra-1 zrh-1"},
	} {
		if got := strings.Join(names(g.via(attrs[tc.from], attrs[tc.to])), " "); got != tc.want {
			t.Errorf("%s → %s passes %q, want %q", tc.from, tc.to, got, tc.want)
		}
	}
	// fra-2 is three tunnels away: a class held to one is refused there,
	// and the refusal says how long the path is.
	dest, also, err := g.pickDestination("fra-2", "direct-only")
	if err != nil || dest.node() != "fra-2" || len(also) != 0 {
		t.Fatalf("pick fra-2: %v, %v, %v", dest, also, err)
	}
	_, verdict := g.policy.Load().p.AdmitPath("direct-only", policy.PathOf(self.Attributes(), g.via(self.Attributes(), dest.Attributes), dest.Attributes), f.now)
	if verdict.Allowed || !strings.Contains(strings.Join(verdict.Reasons, " "), "has 3 hops") {
		t.Fatalf("direct-only to fra-2 through both hubs: %+v, want refused for its 3 hops", verdict)
	}
	plan, err := migrate.MakePlan(migrate.PlanInput{From: self.Attributes(), Policy: g.policy.Load().p, Now: f.now,
		VMs: []migrate.VM{{Name: "vm1", Image: "/x.raw", Class: "via-hubs", CPU: 1, MemoryGiB: 1, Bytes: 1}, {Name: "vm2", Image: "/y.raw", Class: "direct-only", CPU: 1, MemoryGiB: 1, Bytes: 1}},
		To:  []string{"fra-2"}, Destinations: []migrate.Destination{{Attributes: attrs["fra-2"], Via: g.via(self.Attributes(), attrs["fra-2"])}}})
	if err != nil || len(plan.Placements) != 1 || plan.Placements[0].Name != "vm1" || len(plan.Unplaced) != 1 || !strings.Contains(strings.Join(plan.Unplaced[0].Reasons, " "), "has 3 hops") {
		t.Fatalf("plan: %+v, %v; want vm1 placed and vm2 refused for its 3 hops", plan, err)
	}
	g.s.Topology = TopologyFullMesh
	if via := g.via(self.Attributes(), attrs["fra-2"]); len(via) != 0 {
		t.Fatalf("full mesh: through %v, want the direct tunnel", names(via))
	}
}

// TestMigrationsAwaitingAnswer: sends waiting for the answer to their
// offer (a resume's receiver reading back what it holds) are counted
// apart, for the stall alert to leave them out.
func TestMigrationsAwaitingAnswer(t *testing.T) {
	g := &Gateway{mig: &migrations{recv: &migrate.Receiver{}, running: map[string]*runningMigration{
		"a": {last: migrate.Progress{Phase: "offered"}},
		"b": {last: migrate.Progress{Phase: "transfer"}},
		"c": {last: migrate.Progress{Phase: "offered"}, ended: true},
	}}}
	if send, awaiting, recv := g.migrationsRunning(); send != 3 || awaiting != 1 || recv != 0 {
		t.Fatalf("running %d, awaiting %d, receiving %d; want 3, 1, 0", send, awaiting, recv)
	}
}

// TestStoredImageNotRemovedUnderASend: a stored image being sent on (to a
// site the policy lets it rest at, before it is removed here) is not
// removed under the send, which would leave it stored nowhere; nor does a
// send of one being removed begin.
func TestStoredImageNotRemovedUnderASend(t *testing.T) {
	m := &migrations{running: map[string]*runningMigration{}}
	dir := t.TempDir()
	img := filepath.Join(dir, "vm07.raw")
	if err := os.WriteFile(img, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.raw") // the same file under another name
	if err := os.Symlink(img, link); err != nil {
		t.Fatal(err)
	}
	send := migrate.SendRecord{ID: "0123456789abcdef", Image: link, Name: "vm07", To: "gw-fra"}
	if _, err := m.begin(send, func() {}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.holdForRemoval("vm07", img); err == nil || !strings.Contains(err.Error(), send.ID) {
		t.Fatalf("removal under a send: %v, want it refused, naming the migration", err)
	}
	delete(m.running, send.ID) // it ended
	release, err := m.holdForRemoval("vm07", img)
	if err != nil {
		t.Fatal(err)
	}
	again := send
	again.ID = "00000000000000aa"
	if _, err := m.begin(again, func() {}); err == nil || !strings.Contains(err.Error(), "being removed") {
		t.Errorf("a send of an image being removed: %v, want it refused", err)
	}
	release()
	if _, err := m.begin(again, func() {}); err != nil {
		t.Errorf("a send once the removal let go: %v", err)
	}
}
