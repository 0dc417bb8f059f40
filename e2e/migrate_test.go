package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/migrate"
)

// migrationEvent is a line of `skybridge migrate run --json`.
type migrationEvent struct {
	ID       string `json:"id"`
	Progress *struct {
		Phase string         `json:"phase"`
		Stats migrationStats `json:"stats"`
	} `json:"progress"`
	Record *struct {
		ID    string         `json:"id"`
		State string         `json:"state"`
		Root  string         `json:"root"`
		Stats migrationStats `json:"stats"`
	} `json:"record"`
	Error string `json:"error"`
}

type migrationStats struct {
	AllocatedBytes int64 `json:"allocated_bytes"`
	Chunks         int   `json:"chunks"`
	ChunksDone     int   `json:"chunks_done"`
	ChunksSent     int   `json:"chunks_sent"`
	ChunksSame     int   `json:"chunks_same"`
	ChunksResumed  int   `json:"chunks_resumed"`
	ChunksHad      int   `json:"chunks_had"`
	BytesRead      int64 `json:"bytes_read"`
	BytesRaw       int64 `json:"bytes_raw"`
	BytesSent      int64 `json:"bytes_sent"`
	Duration       int64 `json:"duration_ns"`
}

// startMigration runs `skybridge migrate ... --json` and returns its
// events as they come, and the process.
func startMigration(t *testing.T, args ...string) (<-chan migrationEvent, *exec.Cmd) {
	t.Helper()
	// A migration that hangs fails its test, not the whole package at
	// its -timeout.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, skybridge, append(args, "--json")...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := make(chan migrationEvent, 1024)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev migrationEvent
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				ch <- ev
			}
		}
	}()
	return ch, cmd
}

// lastEvent drains events and returns the final one.
func lastEvent(t *testing.T, ch <-chan migrationEvent, cmd *exec.Cmd) migrationEvent {
	t.Helper()
	var last migrationEvent
	for ev := range ch {
		last = ev
	}
	cmd.Wait()
	return last
}

// makeImage writes a sparse raw image of size bytes with blocks of data
// (in turn random, text-like and half-compressible) every stride bytes, and converts
// it to qcow2.
func makeImage(t *testing.T, raw, qcow string, size, stride, block int64) {
	t.Helper()
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	buf := make([]byte, block)
	for off, k := int64(0), 0; off+block <= size; off, k = off+stride, k+1 {
		switch k % 3 {
		case 0: // encrypted or compressed payloads
			rand.Read(buf)
		case 1: // text, logs
			for i := range buf {
				buf[i] = byte("skybridge risk batch "[i%21])
			}
		case 2: // half-compressible: random hex digits
			rand.Read(buf)
			for i := range buf {
				buf[i] = "0123456789abcdef"[buf[i]&15]
			}
		}
		f.WriteAt(buf, off)
	}
	f.Close()
	if out, err := exec.Command("qemu-img", "convert", "-O", "qcow2", raw, qcow).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v %s", err, out)
	}
}

func compareImages(t *testing.T, a, b string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", a, b).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Images are identical") {
		t.Fatalf("qemu-img compare %s %s: %v\n%s", a, b, err, out)
	}
}

// TestMigrationEndToEnd moves a qcow2 image made by qemu-img (2 GiB
// virtual, about 10 % allocated) from the Zurich rack to AWS Frankfurt over
// the real mesh (TUN mode, network namespaces): identical per qemu-img; a
// swiss-banking-secret image bound for the US refused with nothing sent; a
// migration killed half-way (the sending gateway, then the receiving one)
// resumed to an identical image; and a re-sync after changing 1 % of the
// image sending about 1 % of it.
func TestMigrationEndToEnd(t *testing.T) {
	l := newLab(t)
	defer l.dumpLogs()
	tool(t, "qemu-img")
	caDir := filepath.Join(l.dir, "ca")
	sb(t, 0, "ca", "init", "--dir", caDir)
	pol := filepath.Join(l.dir, "residency.hcl")
	src, err := os.ReadFile("../docs/examples/residency.hcl")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(pol, src, 0o644)
	sb(t, 0, "policy", "sign", "--policy", pol, "--ca", caDir)
	sites := l.threeSites(caDir, pol, [3]string{"swiss-banking-secret,pii-eu,risk-batch", "pii-eu,risk-batch", "risk-batch"})
	for _, s := range sites {
		l.startGateway(s, 1)
	}
	zrh, fra, iad := sites[0], sites[1], sites[2]
	waitPeers := func(s *meshSite, want ...string) {
		waitFor(t, 60*time.Second, "gw-"+s.short+" peers with "+strings.Join(want, ","), func() (bool, string) {
			st, err := status(s.socket)
			if err != nil {
				return false, err.Error()
			}
			got := st.peers()
			for _, w := range want {
				if !slices.Contains(got, w) {
					return false, fmt.Sprint(got)
				}
			}
			return true, ""
		})
	}
	waitPeers(zrh, "gw-2", "gw-3")
	waitPeers(fra, "gw-1")

	const gib = 1 << 30
	raw := filepath.Join(l.dir, "vm.raw")
	qcow := filepath.Join(l.dir, "vm.qcow2")
	// 2 GiB virtual, a 10 MiB block every 100 MiB: about 10 % allocated.
	makeImage(t, raw, qcow, 2*gib, 100<<20, 10<<20)

	t.Run("qcow2 to the EU region, identical", func(t *testing.T) {
		ch, cmd := startMigration(t, "migrate", "run", qcow, "--to", "aws-eu-central-1", "--class", "pii-eu", "--format", "qcow2", "--source-format", "qcow2", "--socket", zrh.socket)
		ev := lastEvent(t, ch, cmd)
		if ev.Record == nil || ev.Record.State != "done" {
			t.Fatalf("migration: %+v", ev)
		}
		compareImages(t, qcow, filepath.Join(fra.dir, "images", "vm.qcow2"))
		st := ev.Record.Stats
		secs := float64(st.Duration) / 1e9
		t.Logf("2 GiB qcow2 (%d MiB allocated): read %d MiB, sent %d MiB in %.2fs = %.0f MiB/s of allocated data",
			st.AllocatedBytes>>20, st.BytesRead>>20, st.BytesSent>>20, secs, float64(st.AllocatedBytes)/secs/(1<<20))
		if st.BytesRead > st.AllocatedBytes+(8<<20) {
			t.Errorf("read %d bytes for %d allocated", st.BytesRead, st.AllocatedBytes)
		}
		sb(t, 0, "migrate", "verify", "vm", "--socket", fra.socket)
	})

	t.Run("a host in a site cannot hold the receiver's connections", func(t *testing.T) {
		// A host behind gw-1 (10.1.0.9, in its site's routes, so the
		// tunnel lets it through) reaches gw-2's migration port; only
		// gateways' overlay addresses are taken there, to authenticate.
		l.nsip(zrh.ns, "addr", "add", "10.1.0.9/32", "dev", "lo")
		target := fmt.Sprintf("%s:%d", fra.overlay, migrate.DefaultPort)
		if out, err := l.nsexec(zrh.ns, "env", helperEnv+"=closed 10.1.0.9 "+target, os.Args[0]); err != nil {
			t.Fatalf("a connection from a site's host: %v %s; want it closed unread", err, out)
		}
		out, err := l.nsexec(zrh.ns, "env", helperEnv+"=closed "+zrh.overlay+" "+target, os.Args[0])
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
			t.Fatalf("a connection from gw-1's overlay address: %v %s; want it held for the handshake", err, out)
		}
	})

	t.Run("swiss banking secret refused for the US with nothing sent", func(t *testing.T) {
		out, _ := sb(t, 1, "migrate", "run", qcow, "--to", "aws-us-east-1", "--class", "swiss-banking-secret", "--name", "secret", "--socket", zrh.socket)
		if !strings.Contains(out, "REFUSED by the residency policy") || !strings.Contains(out, "nothing was sent") {
			t.Fatalf("output:\n%s", out)
		}
		if ents, _ := os.ReadDir(filepath.Join(iad.dir, "images", ".incoming")); len(ents) != 0 {
			t.Fatalf("the US gateway received something: %v", ents)
		}
		if _, err := os.Stat(filepath.Join(iad.dir, "audit.log")); err == nil {
			t.Fatal("the US gateway was even contacted")
		}
		b, _ := os.ReadFile(filepath.Join(zrh.dir, "audit.log"))
		if !strings.Contains(string(b), `"outcome":"denied"`) || !strings.Contains(string(b), `"class":"swiss-banking-secret"`) {
			t.Fatal("the refusal is not in the sender's audit log")
		}
		sb(t, 0, "audit", "verify", "--log", filepath.Join(zrh.dir, "audit.log"), "--ca-cert", filepath.Join(caDir, "ca.crt"))
	})

	t.Run("killed sender, then killed receiver, resumed to an identical image", func(t *testing.T) {
		ch, cmd := startMigration(t, "migrate", "run", qcow, "--to", "aws-eu-central-1", "--class", "pii-eu", "--name", "vm-resume",
			"--bwlimit", "40MB/s", "--socket", zrh.socket)
		id := ""
		for ev := range ch {
			id = ev.ID
			if p := ev.Progress; p != nil && p.Stats.Chunks > 0 && p.Stats.ChunksDone*3 >= p.Stats.Chunks {
				break
			}
		}
		if id == "" {
			t.Fatal("no migration ID")
		}
		// migrate list shows the running migration's progress (it showed
		// what its record held: nothing until the end).
		type send struct {
			ID    string `json:"id"`
			State string `json:"state"`
			Stats struct {
				ChunksDone int `json:"chunks_done"`
			} `json:"stats"`
		}
		var listed struct {
			Sending []send `json:"sending"`
		}
		out, _ := sb(t, 0, "migrate", "list", "--json", "--socket", zrh.socket)
		if err := json.Unmarshal([]byte(out), &listed); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if i := slices.IndexFunc(listed.Sending, func(r send) bool { return r.ID == id }); i < 0 || listed.Sending[i].State != "running" || listed.Sending[i].Stats.ChunksDone == 0 {
			t.Fatalf("migrate list while %s runs, a third done: %s", id, out)
		}
		zrh.gwCmd.Process.Signal(syscall.SIGKILL) // the sending gateway dies
		zrh.gwCmd.Wait()
		cmd.Process.Kill()
		cmd.Wait()
		l.startGateway(zrh, 2)
		waitPeers(zrh, "gw-2")

		ch, cmd = startMigration(t, "migrate", "resume", id, "--socket", zrh.socket)
		var twoThirds *migrationStats
		for ev := range ch {
			if p := ev.Progress; p != nil && p.Stats.Chunks > 0 && p.Stats.ChunksDone*3 >= p.Stats.Chunks*2 {
				s := p.Stats
				twoThirds = &s
				break
			}
		}
		// The resume skipped, unread, what the killed sender had recorded
		// as acknowledged (a third at least).
		if twoThirds == nil || twoThirds.ChunksResumed == 0 {
			t.Fatalf("the resume after the sender was killed, two thirds through: %+v", twoThirds)
		}
		fra.gwCmd.Process.Signal(syscall.SIGKILL) // now the receiving gateway dies
		fra.gwCmd.Wait()
		if ev := lastEvent(t, ch, cmd); ev.Record != nil && ev.Record.State == "done" {
			t.Fatalf("the attempt whose receiver was killed ended done: %+v", ev.Record)
		}
		l.startGateway(fra, 2)
		// The restarted receiver, not the sender's memory of the old one.
		waitPeers(fra, "gw-1")
		waitPeers(zrh, "gw-2")

		ch, cmd = startMigration(t, "migrate", "resume", id, "--socket", zrh.socket)
		ev := lastEvent(t, ch, cmd)
		if ev.Record == nil || ev.Record.State != "done" {
			t.Fatalf("final resume: %+v", ev)
		}
		compareImages(t, qcow, filepath.Join(fra.dir, "images", "vm-resume.qcow2"))
		st := ev.Record.Stats
		t.Logf("final attempt: %d of %d chunks skipped without reading (acknowledged before), %d found durable at the receiver, %d sent",
			st.ChunksResumed, st.Chunks, st.ChunksHad, st.ChunksSent)
		if st.ChunksResumed+st.ChunksHad < st.Chunks/2 {
			t.Fatalf("the final attempt redid too much: %+v", st)
		}
	})

	t.Run("re-sync after a 1 % change sends about 1 %", func(t *testing.T) {
		f, _ := os.OpenFile(raw, os.O_WRONLY, 0)
		change := make([]byte, 20<<20) // 1 % of 2 GiB
		rand.Read(change)
		f.WriteAt(change, 300<<20)
		f.Close()
		os.Remove(qcow)
		if out, err := exec.Command("qemu-img", "convert", "-O", "qcow2", raw, qcow).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		ch, cmd := startMigration(t, "migrate", "run", qcow, "--to", "aws-eu-central-1", "--class", "pii-eu", "--format", "qcow2", "--source-format", "qcow2", "--socket", zrh.socket)
		ev := lastEvent(t, ch, cmd)
		if ev.Record == nil || ev.Record.State != "done" {
			t.Fatalf("re-sync: %+v", ev)
		}
		compareImages(t, qcow, filepath.Join(fra.dir, "images", "vm.qcow2"))
		st := ev.Record.Stats
		pct := 100 * float64(st.BytesRaw) / float64(2*gib)
		t.Logf("re-sync: %d chunks sent (%.2f %% of the image's bytes, %d MiB on the wire), %d reused at the destination", st.ChunksSent, pct, st.BytesSent>>20, st.ChunksSame)
		if pct > 1.2 || st.ChunksSame == 0 {
			t.Fatalf("re-sync sent %.2f %% of the image: %+v", pct, st)
		}
	})

	t.Run("a policy that takes the class from the site flags its images, and remove deletes them", func(t *testing.T) {
		v2 := strings.Replace(string(src), "version     = 1", "version     = 2", 1)
		v2 = strings.Replace(v2, `class "pii-eu" {`, `class "pii-eu" {
  deny "store" {
    jurisdiction = ["DE"]
    reason       = "DPA-2026-07: no personal data at rest in Germany"
  }
`, 1)
		pol2 := filepath.Join(l.dir, "residency-v2.hcl")
		if err := os.WriteFile(pol2, []byte(v2), 0o644); err != nil {
			t.Fatal(err)
		}
		sb(t, 0, "policy", "sign", "--policy", pol2, "--ca", caDir)
		sb(t, 0, "policy", "publish", "--policy", pol2, "--socket", zrh.socket)
		type listing struct {
			Images []struct {
				Name   string `json:"name"`
				Class  string `json:"class"`
				AtRest *struct {
					Allowed bool     `json:"allowed"`
					Reasons []string `json:"reasons"`
				} `json:"at_rest"`
			} `json:"images"`
		}
		list := func() listing {
			out, _ := sb(t, 0, "migrate", "list", "--json", "--socket", fra.socket)
			var l listing
			if err := json.Unmarshal([]byte(out), &l); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			return l
		}
		audited := func(action, name string) bool {
			b, _ := os.ReadFile(filepath.Join(fra.dir, "audit.log"))
			for line := range strings.Lines(string(b)) {
				if strings.Contains(line, `"event":"image"`) && strings.Contains(line, `"action":"`+action+`"`) && strings.Contains(line, `"name":"`+name+`"`) {
					return true
				}
			}
			return false
		}
		waitFor(t, 30*time.Second, "the Frankfurt gateway flags its pii-eu images", func() (bool, string) {
			l := list()
			for _, img := range l.Images {
				if img.AtRest == nil || img.AtRest.Allowed || !strings.Contains(strings.Join(img.AtRest.Reasons, " "), "DPA-2026-07") {
					return false, fmt.Sprintf("%+v", l.Images)
				}
			}
			return len(l.Images) == 2 && audited("out-of-policy", "vm") && audited("out-of-policy", "vm-resume"), fmt.Sprintf("%+v", l.Images)
		})
		out, _ := sb(t, 0, "migrate", "list", "--socket", fra.socket)
		if !strings.Contains(out, "OUTSIDE POLICY") || !strings.Contains(out, "2 stored image(s) outside the residency policy") {
			t.Fatalf("the listing does not say so:\n%s", out)
		}

		sb(t, 2, "migrate", "remove", "vm", "--socket", fra.socket) // no reason
		out, _ = sb(t, 0, "migrate", "remove", "vm", "--reason", "DPA-2026-07", "--socket", fra.socket)
		if !strings.Contains(out, "removed vm") {
			t.Fatalf("remove said:\n%s", out)
		}
		if _, err := os.Stat(filepath.Join(fra.dir, "images", "vm.qcow2")); !os.IsNotExist(err) {
			t.Fatalf("the image's file is still there: %v", err)
		}
		if l := list(); len(l.Images) != 1 || l.Images[0].Name != "vm-resume" {
			t.Fatalf("after the removal: %+v", l.Images)
		}
		if !audited("removed", "vm") {
			t.Fatal("the removal is not in the audit log")
		}
		sb(t, 0, "audit", "verify", "--log", filepath.Join(fra.dir, "audit.log"), "--ca-cert", filepath.Join(caDir, "ca.crt"))
		sb(t, 1, "migrate", "remove", "vm", "--reason", "again", "--socket", fra.socket)
	})

	// The checks above pass on what is intact; these make sure they can
	// fail. Whichever image is stored: a run of some subtests stores
	// another.
	t.Run("a flipped byte in a stored image and a tampered audit log are found", func(t *testing.T) {
		out, _ := sb(t, 0, "migrate", "list", "--json", "--socket", fra.socket)
		var listed struct {
			Images []struct {
				Name string `json:"name"`
				Path string `json:"path"`
			} `json:"images"`
		}
		if err := json.Unmarshal([]byte(out), &listed); err != nil || len(listed.Images) == 0 {
			t.Fatalf("migrate list: %v\n%s", err, out)
		}
		img := listed.Images[0]
		sb(t, 0, "migrate", "verify", img.Name, "--socket", fra.socket)
		// A byte of data, not of qcow2's tables: damage the format would
		// report as unreadable, not as an image that changed.
		out2, err := exec.Command("qemu-img", "map", "--output=json", img.Path).Output()
		if err != nil {
			t.Fatalf("qemu-img map %s: %v", img.Path, err)
		}
		type extent struct {
			Data   bool  `json:"data"`
			Zero   bool  `json:"zero"`
			Offset int64 `json:"offset"` // in the file
			Length int64 `json:"length"`
		}
		var extents []extent
		if err := json.Unmarshal(out2, &extents); err != nil {
			t.Fatalf("qemu-img map: %v\n%s", err, out2)
		}
		i := slices.IndexFunc(extents, func(e extent) bool { return e.Data && !e.Zero && e.Offset > 0 })
		if i < 0 {
			t.Fatalf("qemu-img map: no data in %s\n%s", img.Path, out2)
		}
		at := extents[i].Offset + extents[i].Length/2
		f, err := os.OpenFile(img.Path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		if _, err := f.ReadAt(b, at); err != nil {
			t.Fatal(err)
		}
		b[0] ^= 0x01
		if _, err := f.WriteAt(b, at); err != nil {
			t.Fatal(err)
		}
		f.Close()
		out, _ = sb(t, 1, "migrate", "verify", img.Name, "--socket", fra.socket)
		if !strings.Contains(out, ": DAMAGED: ") || strings.Contains(out, "manifest: []") {
			t.Errorf("migrate verify of %s with a byte flipped at %d: exit 1, but it says\n%s\nwant DAMAGED, naming the chunk", img.Name, at, out)
		}

		// Copies of the audit log, with its head: the head first, so the
		// log copied after holds at least the records it counts (nothing
		// is being recorded now: no migration or removal is under way),
		// and the untouched copy verifies.
		dir := t.TempDir()
		logf := filepath.Join(dir, "audit.log")
		for _, f := range []string{"audit.log.head", "audit.log"} {
			b, err := os.ReadFile(filepath.Join(fra.dir, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		caCert := filepath.Join(caDir, "ca.crt")
		sb(t, 0, "audit", "verify", "--log", logf, "--ca-cert", caCert)
		whole, _ := os.ReadFile(logf)
		lines := strings.SplitAfter(string(whole), "\n") // the last is "", after the last newline
		// A record changed (its time, to another valid one: not a line
		// that cannot be read, which exits 2).
		changed := slices.Clone(lines)
		changed[0] = strings.Replace(changed[0], `"time":"20`, `"time":"21`, 1)
		if changed[0] == lines[0] {
			t.Fatalf("no time in the record: %s", lines[0])
		}
		if err := os.WriteFile(logf, []byte(strings.Join(changed, "")), 0o600); err != nil {
			t.Fatal(err)
		}
		if out, _ := sb(t, 1, "audit", "verify", "--log", logf, "--ca-cert", caCert); !strings.Contains(out, "INVALID after 0 good records") {
			t.Errorf("audit verify of a log whose first record changed:\n%s", out)
		}
		// The last record cut off: the head beside it says it was there.
		if err := os.WriteFile(logf, []byte(strings.Join(lines[:len(lines)-2], "")), 0o600); err != nil {
			t.Fatal(err)
		}
		if out, _ := sb(t, 1, "audit", "verify", "--log", logf, "--ca-cert", caCert); !strings.Contains(out, "INVALID") {
			t.Errorf("audit verify of a log cut by its last record, its head beside it:\n%s", out)
		}
	})
}
