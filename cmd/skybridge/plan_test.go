package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/mesh"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// TestWaitMigrationEndsWhenNothingRuns: a migration the gateway no longer
// runs ends the wait whatever its record says. One whose last journal
// write failed stays "running" in the journal, and apply polled it for
// ever. (The gateway's control socket stands in for the gateway: only the
// client's logic is under test.)
func TestWaitMigrationEndsWhenNothingRuns(t *testing.T) {
	var polls atomic.Int32
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		n := polls.Add(1)
		st := mesh.MigrationStatus{Record: &migrate.SendRecord{ID: "aaaaaaaaaaaaaaaa", State: migrate.StateRunning}}
		if n < 3 {
			st.Progress = &migrate.Progress{ID: "aaaaaaaaaaaaaaaa", Phase: "transfer"} // still running
		}
		json.NewEncoder(w).Encode(st)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ev, err := waitMigration(ctx, mesh.NewClient(sock), "aaaaaaaaaaaaaaaa")
	if err != nil {
		t.Fatalf("wait for a migration that stopped running with its record saying running: %v", err)
	}
	if ev.Record.State != migrate.StateFailed || ev.Error != migrate.Interrupted {
		t.Errorf("ended as %+v, %q; want failed, interrupted", ev.Record, ev.Error)
	}
	if n := polls.Load(); n < 3 {
		t.Errorf("ended after %d polls, while the gateway still ran it", n)
	}
}

// TestApplyWithoutGateway: a plan applied through a gateway that cannot be
// reached fails once, saying so, and writes no state that would record
// every VM as failed.
func TestApplyWithoutGateway(t *testing.T) {
	dir := t.TempDir()
	plan := filepath.Join(dir, "plan.json")
	b, _ := json.Marshal(migrate.Plan{Created: time.Now(), Placements: []migrate.Placement{
		{VM: migrate.VM{Name: "vm1", Image: "/img/vm1.raw", Class: "pii-eu"}, To: "gw2", Site: "aws-eu-central-1"},
		{VM: migrate.VM{Name: "vm2", Image: "/img/vm2.raw", Class: "pii-eu"}, To: "gw2", Site: "aws-eu-central-1"},
	}})
	os.WriteFile(plan, b, 0o644)
	out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", filepath.Join(dir, "nope.sock"))
	if code != 1 || !strings.Contains(errs, "cannot reach the gateway") || strings.Contains(errs, "run the same command again") || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
		t.Errorf("apply without a gateway: exit %d, stdout %q, stderr %q; want exit 1 and one line saying the gateway cannot be reached", code, out, errs)
	}
	if _, err := os.Stat(plan + ".state"); !os.IsNotExist(err) {
		t.Errorf("apply without a gateway wrote %s.state: %v", plan, err)
	}
}

// TestMigrationStreamLost: a progress stream that ends before the outcome
// is not reported as a migration going on in the gateway when the gateway
// has gone: the gateway is asked.
func TestMigrationStreamLost(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	for _, tt := range []struct {
		name     string
		stops    bool // the gateway stops with the stream
		want     string
		mustNot  string
		wantCode int
	}{
		{"gateway stopped", true, "the gateway no longer answers", "goes on in the gateway", 1},
		{"connection lost", false, "goes on in the gateway: follow it with `skybridge migrate status " + id + "`", "no longer answers", 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "control.sock")
			ln, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method == http.MethodPost { // the resume: one event, then the stream ends
					if tt.stops {
						w.Header().Set("Connection", "close")
					}
					json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: id, Progress: &migrate.Progress{ID: id, Phase: "transfer"}})
					if tt.stops {
						ln.Close()
					}
					return
				}
				json.NewEncoder(w).Encode(mesh.MigrationStatus{Record: &migrate.SendRecord{ID: id, State: migrate.StateRunning}, Progress: &migrate.Progress{ID: id, Phase: "transfer"}})
			})}
			go srv.Serve(ln)
			defer srv.Close()
			_, errs, code := runCLI(t, "migrate", "resume", id, "--socket", sock)
			if code != tt.wantCode || !strings.Contains(errs, tt.want) || strings.Contains(errs, tt.mustNot) {
				t.Errorf("exit %d, stderr %q; want exit %d, %q and not %q", code, errs, tt.wantCode, tt.want, tt.mustNot)
			}
		})
	}
}

// TestApplyOneAtATime: a second apply of a plan while one runs is refused,
// saying so, before it asks the gateway anything or writes any state.
func TestApplyOneAtATime(t *testing.T) {
	dir := t.TempDir()
	plan := filepath.Join(dir, "plan.json")
	b, _ := json.Marshal(migrate.Plan{Created: time.Now(), Placements: []migrate.Placement{
		{VM: migrate.VM{Name: "vm1", Image: "/img/vm1.raw", Class: "pii-eu"}, To: "gw2", Site: "aws-eu-central-1"},
	}})
	os.WriteFile(plan, b, 0o644)
	f, err := os.Open(plan)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil { // the apply running
		t.Fatal(err)
	}
	_, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", filepath.Join(dir, "nope.sock"))
	if code != 1 || !strings.Contains(errs, "is running") || strings.Contains(errs, "cannot reach the gateway") {
		t.Errorf("a second apply: exit %d, %q; want it refused as another apply runs", code, errs)
	}
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	if _, errs, _ := runCLI(t, "migrate", "apply", plan, "--socket", filepath.Join(dir, "nope.sock")); !strings.Contains(errs, "cannot reach the gateway") {
		t.Errorf("once the other apply is done: %q; want it to go on (and find no gateway)", errs)
	}
}

// TestResumeRefused: a resume the gateway refuses (no such migration) is
// its answer, said as it is — not taken for a stream that broke, which
// would say the gateway stopped.
func TestResumeRefused(t *testing.T) {
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			http.Error(w, "no migration nosuch on this gateway", http.StatusNotFound)
			return
		}
		http.Error(w, "no migration nosuch on this gateway", http.StatusNotFound)
	})
	_, errs, code := runCLI(t, "migrate", "resume", "nosuch", "--socket", sock)
	if code != 1 || !strings.Contains(errs, "no migration nosuch") || strings.Contains(errs, "no longer answers") {
		t.Errorf("exit %d, stderr %q; want exit 1 with the gateway's refusal only", code, errs)
	}
}

// TestApplyForgottenMigration: a plan's VM whose migration the gateway no
// longer knows (it ended over migrate.SendsKept ago) is neither resumed
// (refused at every run) nor sent again unasked (it may be stored and in
// use): apply says so, and how to send it again.
func TestApplyForgottenMigration(t *testing.T) {
	var mu sync.Mutex
	var asked []string
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		asked = append(asked, r.Method+" "+r.URL.Path)
		mu.Unlock()
		switch {
		case r.Method == http.MethodGet:
			http.Error(w, "no migration cccccccccccccccc on this gateway", http.StatusNotFound)
		default:
			http.Error(w, "busy", http.StatusServiceUnavailable) // the outcome is not under test
		}
	})
	vs := &vmState{ID: "cccccccccccccccc", State: migrate.StateFailed}
	pl := migrate.Placement{VM: migrate.VM{Name: "vm1", Image: "/images/vm1.qcow2", Class: "pii-eu"}, To: "aws-eu-central-1"}
	applyOne(t.Context(), mesh.NewClient(sock), "gw-zrh", "gw-zrh", pl, vs, &sync.Mutex{}, func() {}, 4, false, 0)
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"GET /v1/migrations/cccccccccccccccc"}; !slices.Equal(asked, want) {
		t.Fatalf("asked the gateway %q; want %q (a look, nothing sent)", asked, want)
	}
	if vs.Attempts != 0 || vs.State != migrate.StateFailed || !strings.Contains(vs.Error, "no longer knows migration cccccccccccccccc") || !strings.Contains(vs.Error, "remove its entry") {
		t.Errorf("state %+v; want no attempt, failed saying the migration is forgotten and what to do", vs)
	}
}

// TestGraphFormatFromOut: --out FILE.svg without --format asks the gateway
// for an SVG (DOT under an .svg name opens nowhere); --format wins.
func TestGraphFormatFromOut(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "control.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "format=%s", r.URL.Query().Get("format"))
	})}
	go srv.Serve(ln)
	defer srv.Close()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--out", filepath.Join(dir, "mesh.svg")}, "format=svg"},
		{[]string{"--out", filepath.Join(dir, "mesh.json")}, "format=json"},
		{[]string{"--out", filepath.Join(dir, "mesh.gv")}, "format=dot"},
		{[]string{"--out", filepath.Join(dir, "forced.svg"), "--format", "dot"}, "format=dot"},
	} {
		if _, errs, code := runCLI(t, append([]string{"graph", "--socket", sock}, tc.args...)...); code != 0 {
			t.Fatalf("%v: exit %d, %q", tc.args, code, errs)
		}
		if b, _ := os.ReadFile(tc.args[1]); string(b) != tc.want {
			t.Errorf("%v: wrote %q, want %q", tc.args, b, tc.want)
		}
	}
}

// TestPlanOutNotOverInventory: the plan is not written over its inventory
// or any file that is not a plan, before the gateway is even asked.
func TestPlanOutNotOverInventory(t *testing.T) {
	dir := t.TempDir()
	inv := filepath.Join(dir, "vms.csv")
	src := []byte("name,image,class,cpu,memory_gib\nvm1,/img/vm1.raw,pii-eu,2,4\n")
	os.WriteFile(inv, src, 0o644)
	notes := filepath.Join(dir, "notes.txt")
	os.WriteFile(notes, []byte("mine"), 0o644)
	for _, out := range []string{inv, notes} {
		if _, errs, code := runCLI(t, "plan", "--inventory", inv, "--out", out, "--socket", filepath.Join(dir, "nope.sock")); code != 2 || !strings.Contains(errs, "it would be overwritten") {
			t.Errorf("--out %s: exit %d %q; want it refused", out, code, errs)
		}
	}
	if b, _ := os.ReadFile(inv); !bytes.Equal(b, src) {
		t.Fatal("the inventory was overwritten")
	}
}

// TestRotateGossipLeftOut: a forced rotation names the gateways it left
// out and how each gets the new keyring — a file to copy, or Vault's.
func TestRotateGossipLeftOut(t *testing.T) {
	var keyring atomic.Value // the server's, set between requests
	keyring.Store("")        // as a Vault mesh's gateway answers
	var forced atomic.Bool
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		forced.Store(r.URL.Query().Get("force") == "1")
		json.NewEncoder(w).Encode(mesh.RotationReport{Members: []string{"op1"}, LeftOut: []string{"op2"}, Keyring: keyring.Load().(string), CAKeyring: "vault"})
	})
	out, errs, code := runCLI(t, "keys", "rotate-gossip", "--force", "--socket", sock)
	if code != 0 || !forced.Load() || !strings.Contains(out, "left out, away: op2 — each takes the new keyring from Vault") {
		t.Errorf("forced rotation of a Vault mesh: exit %d, %q, %q (forced %v)", code, out, errs, forced.Load())
	}
	keyring.Store("/var/lib/skybridge/identity/gossip.keyring")
	out, _, _ = runCLI(t, "keys", "rotate-gossip", "--force", "--socket", sock)
	if !strings.Contains(out, "copy the new keyring (/var/lib/skybridge/identity/gossip.keyring)") {
		t.Errorf("forced rotation with the keyring in files: %q", out)
	}
}

// TestCancelledMigrationNotFailed: a migration cancelled (migrate cancel
// from another terminal) ends the command that runs it saying it was
// cancelled and how to resume it, not that it failed with "context
// canceled".
func TestCancelledMigrationNotFailed(t *testing.T) {
	const id = "aaaaaaaaaaaaaaaa"
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: id, Error: "context canceled",
			Record: &migrate.SendRecord{ID: id, State: migrate.StateCancelled, Error: "context canceled"}})
	})
	_, errs, code := runCLI(t, "migrate", "resume", id, "--socket", sock)
	if code != 1 || !strings.Contains(errs, "migration "+id+" cancelled: skybridge migrate resume "+id) || strings.Contains(errs, "failed") {
		t.Errorf("exit %d, stderr %q; want exit 1 saying it was cancelled and how to resume it", code, errs)
	}
}

// TestApplyRetriesAnEarlyFailure: a VM whose migration failed before the
// gateway recorded it (its image missing at apply time) is sent anew by
// the next apply, once the image is back. Its ID, kept, was looked up in
// vain at every apply after, and the VM reported forgotten for good. And
// a plan is applied only through the gateway it was made at.
func TestApplyRetriesAnEarlyFailure(t *testing.T) {
	dir := t.TempDir()
	plan := filepath.Join(dir, "plan.json")
	b, _ := json.Marshal(migrate.Plan{Created: time.Now(), From: "gw-zrh", FromSite: "onprem-zrh", Placements: []migrate.Placement{
		{VM: migrate.VM{Name: "vm1", Image: "/img/vm1.raw", Class: "pii-eu"}, To: "gw-fra", Site: "aws-eu-central-1"},
	}})
	os.WriteFile(plan, b, 0o644)
	sock := filepath.Join(dir, "control.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var posts atomic.Int32
	var gateway atomic.Value // node and site, read by the server's goroutines
	gateway.Store([2]string{"gw-zrh", "onprem-zrh"})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/v1/migrations":
			json.NewEncoder(w).Encode(mesh.MigrationList{})
		case r.Method == http.MethodGet && r.URL.Path == "/v1/status":
			json.NewEncoder(w).Encode(mesh.Status{Node: gateway.Load().([2]string)[0], Site: gateway.Load().([2]string)[1]})
		case r.Method == http.MethodGet:
			http.Error(w, "no such migration", http.StatusNotFound) // none was recorded
		case r.Method == http.MethodPost && r.URL.Path == "/v1/migrations":
			id := fmt.Sprintf("%016x", posts.Add(1))
			json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: id})
			if posts.Load() == 1 {
				json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: id, Error: "open image: stat /img/vm1.raw: no such file or directory"})
				return
			}
			json.NewEncoder(w).Encode(mesh.MigrationEvent{ID: id, Record: &migrate.SendRecord{ID: id, Name: "vm1", State: migrate.StateDone}})
		default:
			http.Error(w, "unexpected "+r.Method+" "+r.URL.Path, http.StatusBadRequest)
		}
	})}
	go srv.Serve(ln)
	defer srv.Close()
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock); code != 1 || !strings.Contains(errs, "did not complete") {
		t.Fatalf("the first apply, the image missing: exit %d, %q", code, errs)
	}
	out, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock)
	if code != 0 || posts.Load() != 2 || strings.Contains(out+errs, "no longer knows") {
		t.Fatalf("the apply after, the image back: exit %d, %d sends, %q %q; want it sent anew and done", code, posts.Load(), out, errs)
	}
	// Through a gateway of another site, nothing is applied: the VMs
	// would leave from another site than the one planned. Through the
	// planning gateway's sibling, the plan is applied.
	os.Remove(plan + ".state")
	gateway.Store([2]string{"gw-iad", "aws-us-east-1"})
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock); code != 1 || posts.Load() != 2 || !strings.Contains(errs, "was made at gateway gw-zrh of site onprem-zrh, and this is gw-iad of site aws-us-east-1") {
		t.Fatalf("apply through another site's gateway: exit %d, %d sends, %q; want it refused, nothing sent", code, posts.Load(), errs)
	}
	gateway.Store([2]string{"gw-zrh-2", "onprem-zrh"})
	if _, errs, code := runCLI(t, "migrate", "apply", plan, "--socket", sock); code != 0 || posts.Load() != 3 {
		t.Fatalf("apply through the planning gateway's sibling: exit %d, %d sends, %q; want it applied", code, posts.Load(), errs)
	}
}
