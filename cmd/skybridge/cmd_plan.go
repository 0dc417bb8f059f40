package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
	"github.com/skybridge-mesh/skybridge/mesh"
	"github.com/skybridge-mesh/skybridge/migrate"
)

func planCommand() *cli.Command {
	return &cli.Command{
		Name:  "plan",
		Usage: "place many VMs at once: a destination for each that the policy permits, this gateway reaches and has room, least loaded first",
		UsageText: "skybridge plan --inventory vms.csv [--to SITE|REGION|JURISDICTION ...] [--out plan.json] [--json] (--config | --socket)\n\n" +
			"The inventory is CSV with a header: name,image,class,cpu,memory_gib[,bytes]. Relative image paths are\n" +
			"relative to the inventory. Gateways advertise capacity with the certificate labels capacity_cpu and\n" +
			"capacity_memory_gib. `skybridge migrate apply plan.json` carries the plan out.",
		Flags: append(append([]cli.Flag(nil), socketFlags...), jsonFlag,
			&cli.StringFlag{Name: "inventory", Usage: "the VMs, as CSV", Required: true},
			&cli.StringSliceFlag{Name: "to", Usage: "limit destinations to these nodes, sites, regions or jurisdictions"},
			&cli.StringFlag{Name: "out", Usage: "write the plan to `FILE` (for migrate apply)"}),
		Action: func(c *cli.Context) error {
			if err := givenEmpty(c, "out", "to"); err != nil {
				return err
			}
			// Which gateway first: a usage mistake is said before any
			// problem of the inventory.
			cl, err := controlClient(c)
			if err != nil {
				return err
			}
			inv := c.String("inventory")
			f, err := os.Open(inv)
			if err != nil {
				return fmt.Errorf("read the inventory: %w", err)
			}
			vms, err := migrate.ParseInventory(f)
			f.Close()
			if err != nil {
				return fmt.Errorf("%s: %w", inv, err)
			}
			base, err := filepath.Abs(filepath.Dir(inv))
			if err != nil {
				return err
			}
			for i := range vms {
				if !filepath.IsAbs(vms[i].Image) {
					vms[i].Image = filepath.Join(base, vms[i].Image)
				}
			}
			if out := c.String("out"); out != "" {
				isPlan := func(b []byte) bool {
					var p migrate.Plan
					return json.Unmarshal(b, &p) == nil && p.From != ""
				}
				if err := replaceableOutput(out, isPlan, "a plan", inv); err != nil {
					return err
				}
			}
			p, err := cl.Plan(c.Context, mesh.PlanRequest{VMs: vms, To: c.StringSlice("to")})
			if err != nil {
				return err
			}
			if out := c.String("out"); out != "" {
				b, _ := json.MarshalIndent(p, "", "  ")
				if err := atomicfile.WriteFile(out, append(b, '\n'), 0o644); err != nil {
					return err
				}
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, p)
			}
			printPlan(c, p)
			return nil
		},
	}
}

func printPlan(c *cli.Context, p *migrate.Plan) {
	w := c.App.Writer
	rows := [][]string{}
	for _, pl := range p.Placements {
		est := "?"
		if pl.Estimate > 0 {
			est = roundDuration(pl.Estimate)
		}
		rule := pl.Rule
		if pl.Audit {
			rule = "AUDIT MODE ONLY, denied by " + rule
		}
		if len(pl.Exceptions) > 0 {
			rule += ", by exception " + strings.Join(pl.Exceptions, ", ")
		}
		rows = append(rows, []string{pl.Name, pl.Class, fmt.Sprintf("%d / %g GiB", pl.CPU, pl.MemoryGiB), humanBytes(pl.Bytes), pl.To + " (" + pl.Site + ")", est, rule})
	}
	fmt.Fprintf(w, "PLACED (%d of %d VMs), from %s under policy %s\n", len(p.Placements), len(p.Placements)+len(p.Unplaced), p.From, dash(p.Policy))
	printTable(w, []string{"vm", "class", "cpu / memory", "to move", "to", "estimate", "admitted by"}, rows)
	if len(p.Unplaced) > 0 {
		fmt.Fprintf(w, "\nNOT PLACED (%d)\n", len(p.Unplaced))
		for _, u := range p.Unplaced {
			fmt.Fprintf(w, "%s (%s, %d CPU, %g GiB):\n", u.Name, u.Class, u.CPU, u.MemoryGiB)
			for _, r := range u.Reasons {
				fmt.Fprintf(w, "  - %s\n", r)
			}
		}
	}
	rows = rows[:0]
	for _, s := range p.Sites {
		cpu, mem := fmt.Sprintf("%d/%g", s.CPU, s.CPUCap), fmt.Sprintf("%g/%g GiB", s.MemoryGiB, s.MemoryCap)
		if s.CPUUnbounded {
			cpu = fmt.Sprintf("%d/-", s.CPU)
		}
		if s.MemoryUnbounded {
			mem = fmt.Sprintf("%g/- GiB", s.MemoryGiB)
		}
		tput := "not measured"
		if s.Throughput > 0 {
			tput = humanBytes(int64(s.Throughput)) + "/s"
		}
		rows = append(rows, []string{s.Node, s.Site, fmt.Sprint(s.VMs), cpu, mem, humanBytes(s.Bytes), fmt.Sprint(s.Load), tput})
	}
	fmt.Fprintln(w, "\nDESTINATIONS")
	printTable(w, []string{"gateway", "site", "vms", "cpu", "memory", "to move", "receiving now", "throughput"}, rows)
	fmt.Fprintf(w, "\ntotal: %s to move; %s one at a time at the measured throughput", humanBytes(p.Bytes), roundDuration(p.Estimate))
	if p.Unmeasured > 0 {
		fmt.Fprintf(w, ", plus %d VM(s) to sites not measured yet", p.Unmeasured)
	}
	fmt.Fprintln(w)
	for _, n := range p.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
}

// roundDuration keeps an estimate's meaningful digits.
func roundDuration(d time.Duration) string {
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

func migrateApplyCommand() *cli.Command {
	return &cli.Command{
		Name:      "apply",
		Usage:     "carry out a plan from `skybridge plan --out`: N migrations at a time, resumable as a whole",
		ArgsUsage: "PLAN",
		UsageText: "skybridge migrate apply PLAN [--parallel 4] [--streams N] [--bwlimit 200MB/s] [--json] (--config | --socket)\n\n" +
			"Progress is kept in PLAN.state: run the same command again after an interruption and it skips what is\n" +
			"done, resumes what was interrupted (only missing chunks are sent) and starts the rest.",
		Flags: append(append([]cli.Flag(nil), socketFlags...), jsonFlag,
			&cli.IntFlag{Name: "parallel", Value: 4, Usage: "migrations at a time"},
			&cli.IntFlag{Name: "streams", Value: 2, Usage: "TLS streams per migration"},
			&cli.StringFlag{Name: "bwlimit", Usage: "bandwidth cap per migration, e.g. 200MB/s; given, it applies to resumed migrations too (none: lift their cap)"},
			&cli.BoolFlag{Name: "policy-changed-ok", Usage: "apply a plan made under another policy than the gateway enforces now (each migration is still judged under the policy in force)"}),
		Action: migrateApply,
	}
}

// applyState is what PLAN.state holds: per VM, its migration.
type applyState struct {
	Plan string              `json:"plan"` // SHA-256 of the plan file: a state belongs to one plan
	VMs  map[string]*vmState `json:"vms"`
}

type vmState struct {
	ID string `json:"id,omitempty"`
	// From is the gateway that ran the migration ID names: after a
	// failover to a sibling, which does not know it, it is sent anew.
	From     string  `json:"from,omitempty"`
	To       string  `json:"to"`
	State    string  `json:"state"` // running, done, failed, denied, cancelled
	Error    string  `json:"error,omitempty"`
	Root     string  `json:"root,omitempty"`
	Sent     int64   `json:"bytes_sent,omitempty"`
	Seconds  float64 `json:"seconds,omitempty"`
	Attempts int     `json:"attempts"`
}

func migrateApply(c *cli.Context) error {
	path := c.Args().First()
	if path == "" {
		return usageError("which plan? skybridge migrate apply PLAN (from skybridge plan --out PLAN)")
	}
	bw, err := paceFlags(c) // 0: none for a new migration, a resumed one's own
	if err != nil {
		return err
	}
	if c.Int("parallel") < 1 {
		return usageError("--parallel %d: at least 1", c.Int("parallel"))
	}
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	// One apply of a plan at a time: two would dispatch the same VMs
	// (the gateway refuses the second of each) and overwrite each other's
	// PLAN.state, recording as failed what the other runs. The plan file
	// itself is locked, so nothing is left beside it.
	pf, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read the plan: %w", err)
	}
	defer pf.Close()
	if err := syscall.Flock(int(pf.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("another `skybridge migrate apply %s` is running: wait for it, or stop it (Ctrl-C; the migrations under way carry on) and run this again", path)
		}
		return fmt.Errorf("lock %s: %w", path, err)
	}
	raw, err := io.ReadAll(pf)
	if err != nil {
		return fmt.Errorf("read the plan %s: %w", path, err)
	}
	var plan migrate.Plan
	if err := json.Unmarshal(raw, &plan); err != nil {
		return fmt.Errorf("%s is not a plan from `skybridge plan --out`: %w", path, err)
	}
	if len(plan.Placements) == 0 {
		return fmt.Errorf("%s places no VM: nothing to apply", path)
	}
	// Progress is kept by VM name: two placements of one (plans merged
	// by hand) would share it, and one's failure read as done.
	seenName := map[string]bool{}
	for _, pl := range plan.Placements {
		if seenName[pl.Name] {
			return fmt.Errorf("%s places VM %q twice: keep one placement of it (plans merged by hand?)", path, pl.Name)
		}
		seenName[pl.Name] = true
	}
	sum := sha256.Sum256(raw)
	st := &applyState{Plan: hex.EncodeToString(sum[:]), VMs: map[string]*vmState{}}
	statePath := path + ".state"
	var old applyState
	if found, err := atomicfile.ReadJSON(statePath, &old); errors.Is(err, atomicfile.ErrDamaged) {
		return fmt.Errorf("%w (remove it to start the plan over)", err)
	} else if err != nil {
		return err
	} else if found {
		if old.Plan != st.Plan {
			return fmt.Errorf("%s belongs to another version of %s: remove it to apply this plan from the start", statePath, path)
		}
		st = &old
	}
	// Ctrl-C stops dispatching; migrations under way finish their record
	// (the gateway carries them on) and the next apply resumes the rest.
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var mu sync.Mutex
	var saveErr error
	save := func() {
		mu.Lock()
		defer mu.Unlock()
		if err := atomicfile.WriteJSON(statePath, st, 0o644); err != nil && saveErr == nil {
			saveErr = err
		}
	}
	// A migration this plan started whose ID never reached the state file
	// (the apply was killed at that moment) is found on the gateway by
	// image, name and destination, so that it is not started twice: the
	// newest, listed last. This is also the first word with the gateway:
	// one that cannot be reached is one error now, before the state file
	// is written, not every VM failed in it.
	l, err := cl.Migrations(ctx)
	if err != nil {
		return fmt.Errorf("nothing applied: %w", err)
	}
	gs, err := cl.Status(ctx)
	if err != nil {
		return fmt.Errorf("nothing applied: %w", err)
	}
	// The plan judged paths, hubs and throughput from the gateway it was
	// made at; through another, the data would leave from elsewhere.
	// Any gateway of the plan's site will do (a sibling, after a
	// failover); plans from before they named their site, only the one.
	if plan.From != "" {
		if plan.FromSite != "" && gs.Site != plan.FromSite {
			return fmt.Errorf("nothing applied: %s was made at gateway %s of site %s, and this is %s of site %s, from which the VMs would leave: apply it through a gateway of %s, or plan again here", path, plan.From, plan.FromSite, gs.Node, gs.Site, plan.FromSite)
		}
		if plan.FromSite == "" && gs.Node != plan.From {
			return fmt.Errorf("nothing applied: %s was made at gateway %s, and this is %s: apply it through %s's control socket, or plan again here", path, plan.From, gs.Node, plan.From)
		}
	}
	// Sends since the plan was made: by this gateway's clock. Through a
	// sibling of the planning gateway (after a failover), the plan was
	// dated by another clock, which the mesh allows to differ by
	// MaxClockSkew; through the planning gateway, by the same one, and a
	// send of the VM just before the plan (a trial) is not the plan's.
	since := plan.Created
	if plan.From != "" && gs.Node != plan.From {
		since = since.Add(-certs.MaxClockSkew)
	}
	started := map[string]string{} // VM name → migration ID
	for _, r := range l.Sending {
		if !r.Started.Before(since) {
			for _, pl := range plan.Placements {
				if r.Name == pl.Name && r.To == pl.To && r.Image == pl.Image {
					started[pl.Name] = r.ID
				}
			}
		}
	}
	// The plan ranked destinations by what the policy said then (those a
	// rule allows first, exceptions and audit mode last): under another
	// policy its choices may no longer be the ones it would make. VMs
	// under way are followed and resumed (the gateway judges each under
	// the policy in force); new ones are not started on the old ranking.
	if plan.Policy != "" && gs.Policy != plan.Policy && !c.Bool("policy-changed-ok") {
		// New sends: a VM not started, one denied (started anew), one a
		// sibling sends anew after a failover.
		var fresh []string
		for _, pl := range plan.Placements {
			vs := st.VMs[pl.Name]
			anew := vs == nil || vs.State != migrate.StateDone && (vs.ID == "" || vs.State == migrate.StateDenied || vs.From != "" && vs.From != gs.Node)
			// The denied send itself, still listed by the gateway, is
			// not one under way: the VM is sent anew all the same.
			if s := started[pl.Name]; anew && (s == "" || vs != nil && vs.State == migrate.StateDenied && s == vs.ID) {
				fresh = append(fresh, pl.Name)
			}
		}
		if len(fresh) > 0 {
			return fmt.Errorf("nothing applied: %s was made under policy %s, and the gateway enforces %s now; %d VM(s) of it not started yet (%s) would be placed by the old policy's ranking: plan those again (a plan of its own), or apply it as it is with --policy-changed-ok (each migration is still judged under the policy in force)",
				path, plan.Policy, dash(gs.Policy), len(fresh), strings.Join(fresh[:min(len(fresh), 5)], ", "))
		}
	}
	get := func(name, to string) *vmState {
		mu.Lock()
		defer mu.Unlock()
		if st.VMs[name] == nil {
			st.VMs[name] = &vmState{To: to}
		}
		return st.VMs[name]
	}
	for _, pl := range plan.Placements {
		get(pl.Name, pl.To) // every VM has a state, started or not, for the report
	}
	sem := make(chan struct{}, c.Int("parallel"))
	var wg sync.WaitGroup
dispatch:
	for _, pl := range plan.Placements {
		vs := get(pl.Name, pl.To)
		mu.Lock()
		done := vs.State == migrate.StateDone
		// A denied VM is started anew (not resumed), under a new ID that
		// may not have reached the state file either.
		if id := started[pl.Name]; id != "" && (vs.ID == "" || vs.State == migrate.StateDenied && id != vs.ID) {
			vs.ID, vs.From, vs.State = id, gs.Node, migrate.StateRunning
		}
		mu.Unlock()
		if done {
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break dispatch
		}
		wg.Go(func() {
			defer func() { <-sem }()
			applyOne(ctx, cl, gs.Node, plan.From, pl, vs, &mu, save, c.Int("streams"), c.IsSet("streams"), bw)
			save()
		})
	}
	wg.Wait()
	if saveErr != nil {
		return fmt.Errorf("record progress in %s: %w", statePath, saveErr)
	}
	return reportApply(c, &plan, st)
}

// applyOne runs (or resumes, or waits for) one VM's migration and records
// its outcome in vs.
//
// A resumed migration keeps its pace unless this apply was told one:
// streamsSet, bw other than 0.
func applyOne(ctx context.Context, cl *mesh.Client, node, planFrom string, pl migrate.Placement, vs *vmState, mu *sync.Mutex, save func(), streams int, streamsSet bool, bw int64) {
	mu.Lock()
	req := mesh.MigrationRequest{Image: pl.Image, To: pl.To, Class: pl.Class, Name: pl.Name, Streams: streams, BWLimit: bw}
	id := ""
	if vs.ID != "" && vs.State != migrate.StateDenied {
		id = vs.ID
	}
	if id != "" && vs.From != "" && vs.From != node {
		// Run by another gateway of the site (this one took over after a
		// failover), which this one does not know: sent anew from here.
		// The destination resumes only a migration of the gateway that
		// began it, so this one sends the image whole (less an earlier
		// version stored there); while the other's transfer is still
		// open there, it is refused, and a later apply sends it.
		id = ""
	}
	prev := *vs // what stands if an interruption leaves nothing to say
	mu.Unlock()
	seen := false // running in the gateway, as this apply saw
	var final *mesh.MigrationEvent
	var err error
	if id != "" {
		// An earlier apply was interrupted. The gateway owns the
		// migration: it may have finished it, or still be running it,
		// or it stopped and can resume (sending only the chunks not yet
		// durable at the destination).
		s, serr := cl.Migration(ctx, id)
		switch {
		case errors.Is(serr, mesh.ErrNoSuchMigration) && vs.From == "" && planFrom != "" && node != planFrom:
			// A state file of an earlier release does not say which
			// gateway ran it; unknown here, on a sibling of the gateway
			// the plan was made at, it was that one's: sent anew.
			id = ""
		case errors.Is(serr, mesh.ErrNoSuchMigration):
			// Forgotten (it ended over migrate.SendsKept ago): it may
			// have been stored, and in use since, so it is not sent
			// again unasked — a resume would be refused at every run.
			mu.Lock()
			vs.State, vs.Error = migrate.StateFailed, fmt.Sprintf("the gateway no longer knows migration %s (it ended over %d days ago; the audit logs say how): to send %s again, remove its entry from the plan's .state file and apply again", id, int(migrate.SendsKept.Hours()/24), pl.Name)
			mu.Unlock()
			return
		case serr == nil && s.Record != nil && s.Progress != nil:
			seen = true
			final, err = waitMigration(ctx, cl, id)
		case serr == nil && s.Record != nil && s.Record.State == migrate.StateDone:
			final = &mesh.MigrationEvent{ID: id, Record: s.Record}
		}
		if id != "" {
			req = mesh.MigrationRequest{ID: id, BWLimit: bw}
			if streamsSet {
				req.Streams = streams
			}
		}
	}
	if final == nil && err == nil {
		mu.Lock()
		vs.Attempts++
		mu.Unlock()
		final, err = cl.Migrate(ctx, req, func(ev mesh.MigrationEvent) {
			mu.Lock()
			first := vs.ID != ev.ID && ev.ID != ""
			seen = seen || first || ev.Progress != nil // the gateway took it
			if first {
				vs.ID, vs.From, vs.State = ev.ID, node, migrate.StateRunning
			}
			mu.Unlock()
			if first {
				save() // the ID is what makes a resume possible: keep it at once
			}
		})
		if err != nil && id != "" && strings.Contains(err.Error(), "already running") {
			final, err = waitMigration(ctx, cl, id) // started again between our look and our resume
		}
		mu.Lock()
		running := vs.ID
		mu.Unlock()
		if err != nil && ctx.Err() == nil && seen && running != "" {
			// The progress stream broke, not the migration: the gateway
			// runs it still. Followed to its end, it holds its place in
			// --parallel, rather than the next VM starting beside it.
			final, err = waitMigration(ctx, cl, running)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	switch {
	case err != nil && ctx.Err() != nil && seen:
		// Interrupted (Ctrl-C): the gateway carries the migration on,
		// and the next apply follows it.
		vs.State, vs.Error = migrate.StateRunning, "still running in the gateway when the apply was interrupted: apply again to follow it"
	case err != nil && ctx.Err() != nil:
		// Interrupted before anything ran: nothing new to say.
		*vs = prev
	case err != nil:
		vs.State, vs.Error = migrate.StateFailed, err.Error()
	case final.Record != nil:
		r := final.Record
		vs.State, vs.Error, vs.Sent, vs.Seconds = r.State, r.Error, r.Stats.BytesSent, r.Stats.Duration.Seconds()
		if r.State == migrate.StateDone {
			vs.Root = r.Root.String()
		}
	default:
		// Failed before the gateway recorded it (the image missing,
		// unreadable, not an image): there is nothing to resume, and
		// its ID, kept, would be looked up in vain at every apply after.
		vs.State, vs.Error, vs.ID = migrate.StateFailed, final.Error, ""
	}
	if final != nil && final.Denied != nil {
		vs.State, vs.Error = migrate.StateDenied, strings.Join(final.Denied.Reasons, "; ")
	}
}

// waitMigration polls a migration the gateway runs until it ends.
func waitMigration(ctx context.Context, cl *mesh.Client, id string) (*mesh.MigrationEvent, error) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		s, err := cl.Migration(ctx, id)
		if err != nil {
			return nil, err
		}
		if s.Progress == nil && s.Record != nil {
			// Not running: its record says how it ended, or it ended
			// without saying (its last journal write failed).
			ev := &mesh.MigrationEvent{ID: id, Record: s.Record, Error: s.Record.Error}
			if s.Record.State == migrate.StateRunning {
				ev.Record.State, ev.Record.Error, ev.Error = migrate.StateFailed, migrate.Interrupted, migrate.Interrupted
			}
			return ev, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

func reportApply(c *cli.Context, plan *migrate.Plan, st *applyState) error {
	failed, denied := 0, 0
	for _, pl := range plan.Placements {
		switch st.VMs[pl.Name].State {
		case migrate.StateDone:
		case migrate.StateDenied:
			failed++
			denied++
		default:
			failed++
		}
	}
	if c.Bool("json") {
		if err := printJSON(c.App.Writer, st); err != nil {
			return err
		}
	} else {
		rows := [][]string{}
		for _, pl := range plan.Placements {
			vs := st.VMs[pl.Name]
			detail := vs.Error
			if vs.State == migrate.StateDone && len(vs.Root) >= 16 {
				detail = "verified, root " + vs.Root[:16] + "…"
			}
			rows = append(rows, []string{pl.Name, pl.To + " (" + pl.Site + ")", dash(vs.State), humanBytes(vs.Sent), fmt.Sprintf("%.1f s", vs.Seconds), fmt.Sprint(vs.Attempts), detail})
		}
		printTable(c.App.Writer, []string{"vm", "to", "state", "sent", "took", "attempts", ""}, rows)
		fmt.Fprintf(c.App.Writer, "\n%d of %d VMs migrated and verified", len(plan.Placements)-failed, len(plan.Placements))
		if len(plan.Unplaced) > 0 {
			fmt.Fprintf(c.App.Writer, "; %d VM(s) the plan could not place", len(plan.Unplaced))
		}
		fmt.Fprintln(c.App.Writer)
	}
	switch {
	case denied == failed && denied > 0:
		return cli.Exit(fmt.Sprintf("%d migration(s) denied by the residency policy in force: running the command again sends them again, and they are denied again unless the policy changed (plan them again, or change the policy)", denied), 1)
	case denied > 0:
		return cli.Exit(fmt.Sprintf("%d migration(s) did not complete: run the same command again to resume them (%d of them denied by the residency policy in force, sent again and denied again unless the policy changed)", failed, denied), 1)
	case failed > 0:
		return cli.Exit(fmt.Sprintf("%d migration(s) did not complete: run the same command again to resume them", failed), 1)
	}
	return nil
}
