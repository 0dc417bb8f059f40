package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/internal/progress"
	"github.com/skybridge-mesh/skybridge/internal/units"
	"github.com/skybridge-mesh/skybridge/mesh"
	"github.com/skybridge-mesh/skybridge/migrate"
)

func migrateCommand() *cli.Command {
	return &cli.Command{
		Name:  "migrate",
		Usage: "move VM images (raw, qcow2) to another site across the mesh: verified, resumable, only where the policy allows",
		Subcommands: []*cli.Command{
			{
				Name:      "run",
				Usage:     "migrate an image to a site (or the least loaded permitted gateway of a region or jurisdiction)",
				ArgsUsage: "IMAGE",
				UsageText: "skybridge migrate run IMAGE --to SITE|REGION|JURISDICTION --class CLASS [--name NAME] [--format raw|qcow2]\n" +
					"    [--source-format raw|qcow2] [--streams N] [--bwlimit 200MB/s] [--json] (--config gateway.hcl | --socket PATH)\n\n" +
					"Without --source-format the image's format is told from its first bytes, as qemu-img does, and an image of\n" +
					"another format (VMDK, VHDX, VDI, VHD, QED, ...) is refused: convert it with qemu-img convert -O qcow2 (a LUKS container moves as raw, encrypted).\n" +
					"Name it for a raw disk, whose guest may have written a qcow2 header (or another format's) at its start.\n" +
					"A resume reads it as the first attempt did.",
				Flags: append(append([]cli.Flag(nil), socketFlags...),
					&cli.StringFlag{Name: "to", Usage: "destination: a node, site, region or jurisdiction", Required: true},
					&cli.StringFlag{Name: "class", Usage: "data class of the image (the residency policy decides with it)", Required: true},
					&cli.StringFlag{Name: "name", Usage: "name at the destination (default: the file name without extension)"},
					&cli.StringFlag{Name: "format", Usage: "raw or qcow2 at the destination (default: the source's)"},
					&cli.StringFlag{Name: "source-format", Usage: "raw or qcow2: what IMAGE is (default: told from its first bytes)"},
					&cli.IntFlag{Name: "streams", Value: 4, Usage: "parallel TLS streams"},
					&cli.StringFlag{Name: "bwlimit", Usage: "bandwidth cap, e.g. 200MB/s, 1Gbit/s (default: none)"},
					jsonFlag,
				),
				Action: migrateRun,
			},
			migrateApplyCommand(),
			{
				Name:      "resume",
				Usage:     "continue an interrupted migration: only chunks not yet durable at the destination are sent",
				ArgsUsage: "ID",
				UsageText: "skybridge migrate resume ID [--streams N] [--bwlimit 200MB/s|none] [--json] (--config | --socket)",
				Flags: append(append([]cli.Flag(nil), socketFlags...), jsonFlag,
					&cli.IntFlag{Name: "streams", Usage: "parallel TLS streams (default: the migration's own)"},
					&cli.StringFlag{Name: "bwlimit", Usage: "bandwidth cap, e.g. 200MB/s, or none to lift it (default: the migration's own)"}),
				Action: migrateResume,
			},
			{
				Name:   "list",
				Usage:  "list the migrations this gateway sent or is receiving, and the images it stores",
				Flags:  append(append([]cli.Flag(nil), socketFlags...), jsonFlag),
				Action: migrateList,
			},
			{
				Name:      "status",
				Usage:     "show one migration",
				ArgsUsage: "ID",
				UsageText: "skybridge migrate status ID [--json] (--config | --socket)",
				Flags:     append(append([]cli.Flag(nil), socketFlags...), jsonFlag),
				Action:    migrateStatus,
			},
			{
				Name:      "cancel",
				Usage:     "stop a running migration (resume it later)",
				ArgsUsage: "ID",
				UsageText: "skybridge migrate cancel ID (--config | --socket)",
				Flags:     socketFlags,
				Action: func(c *cli.Context) error {
					id := c.Args().First()
					if id == "" {
						return usageError("which migration? skybridge migrate cancel ID")
					}
					cl, err := controlClient(c)
					if err != nil {
						return err
					}
					if err := cl.CancelMigration(c.Context, id); err != nil {
						// The gateway says only that it is not running: one
						// it has no record of is said as status says it.
						if _, serr := cl.Migration(c.Context, id); errors.Is(serr, mesh.ErrNoSuchMigration) {
							return serr
						}
						return err
					}
					// What it ended as is said, not assumed: one already
					// committed finishes (the destination stores it
					// whatever the sender does), and one may have been
					// refused or have failed before the cancel took.
					s, err := cl.Migration(c.Context, id)
					if err != nil || s.Record == nil {
						fmt.Fprintf(c.App.Writer, "migration %s stopped; `skybridge migrate status %s` says how it ended\n", id, id)
						return nil
					}
					switch r := s.Record; r.State {
					case migrate.StateDone:
						fmt.Fprintf(c.App.Writer, "migration %s was already committed: it completed, stored and verified at %s\n", id, r.To)
					case migrate.StateCancelled:
						fmt.Fprintf(c.App.Writer, "migration %s cancelled; `skybridge migrate resume %s` continues it\n", id, id)
					default:
						why := ""
						if r.Error != "" {
							why = ": " + printable(r.Error)
						}
						fmt.Fprintf(c.App.Writer, "migration %s ended %s before the cancel took%s\n", id, r.State, why)
					}
					return nil
				},
			},
			{
				Name:      "verify",
				Usage:     "re-read an image this gateway stores and check it against the root hash recorded on arrival",
				ArgsUsage: "NAME",
				UsageText: "skybridge migrate verify NAME [--json] (--config | --socket)",
				Flags:     append(append([]cli.Flag(nil), socketFlags...), jsonFlag),
				Action:    migrateVerify,
			},
			{
				Name:      "remove",
				Usage:     "delete an image this gateway stores (one the residency policy no longer lets rest here, once moved elsewhere), with an audit record",
				ArgsUsage: "NAME",
				UsageText: "skybridge migrate remove NAME --reason TEXT [--json] (--config | --socket)",
				Flags: append(append([]cli.Flag(nil), socketFlags...), jsonFlag,
					&cli.StringFlag{Name: "reason", Usage: "why it is removed (a ticket, a policy change): kept in the audit record"}),
				Action: migrateRemove,
			},
		},
	}
}

// imageArg is the stored image a command names, as usage: what a
// command takes after the name.
func imageArg(c *cli.Context, usage string) (string, error) {
	arg := c.Args().First()
	if arg == "" {
		return "", usageError("which image? skybridge %s (see skybridge migrate list)", usage)
	}
	// Names stored by earlier releases may hold characters new ones may
	// not, which the list shows escaped: it takes them so too.
	name, err := unprintable(arg)
	if err != nil {
		return "", usageError("image name %s: %v: a backslash in a name starts an escape (see skybridge migrate list)", printable(arg), err)
	}
	// A path is no name: it would reach the gateway as another URL.
	if err := migrate.CheckStoredName(name); err != nil {
		return "", usageError("%v: give the name of an image this gateway stores (see skybridge migrate list)", err)
	}
	return name, nil
}

func migrateRemove(c *cli.Context) error {
	name, err := imageArg(c, "migrate remove NAME --reason TEXT")
	if err != nil {
		return err
	}
	reason := strings.TrimSpace(c.String("reason"))
	if reason == "" {
		return usageError("say why the image is removed: --reason TEXT (a ticket, a policy change); the audit record keeps it")
	}
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	img, err := cl.RemoveImage(c.Context, name, reason)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, img)
	}
	fmt.Fprintf(c.App.Writer, "removed %s (%s, class %s, root %s), received from %s on %s\n", printable(img.Name), img.Format, img.Class, img.Root,
		img.From+" ("+img.FromSite+")", img.Received.Local().Format("2006-01-02 15:04:05"))
	return nil
}

func migrateRun(c *cli.Context) error {
	img := c.Args().First()
	if img == "" {
		return usageError("which image? skybridge migrate run IMAGE --to SITE --class CLASS")
	}
	abs, err := filepath.Abs(img)
	if err != nil {
		return err
	}
	bw, err := paceFlags(c)
	if err != nil {
		return err
	}
	switch f := c.String("format"); f {
	case "", migrate.FormatRaw, migrate.FormatQcow2:
	default:
		return usageError("--format %q: the destination's format is raw or qcow2 (default: the source's)", f)
	}
	switch f := c.String("source-format"); f {
	case "", migrate.FormatRaw, migrate.FormatQcow2:
	default:
		return usageError("--source-format %q: the image is raw or qcow2 (default: told from its first bytes)", f)
	}
	// The gateway on this host reads the image; what is plainly not one
	// is said here, as the mistake it is, before a migration is opened
	// (and recorded failed). One this user may not read the gateway may.
	if st, err := os.Stat(abs); errors.Is(err, os.ErrNotExist) {
		return usageError("%s: no such file: give the path of the VM image (raw or qcow2)", img)
	} else if err == nil && !st.Mode().IsRegular() {
		return usageError("%s is not a regular file: give the path of the VM image (raw or qcow2)", img)
	}
	req := mesh.MigrationRequest{Image: abs, To: c.String("to"), Class: c.String("class"), Name: c.String("name"),
		Format: c.String("format"), SourceFormat: c.String("source-format"), Streams: c.Int("streams"), BWLimit: bw}
	return runMigration(c, req)
}

func migrateResume(c *cli.Context) error {
	id := c.Args().First()
	if id == "" {
		return usageError("which migration? skybridge migrate resume ID (see skybridge migrate list)")
	}
	// Unset, the gateway keeps the migration's own pace: a cancel is
	// often for a cap that proved wrong, which a resume then changes.
	bw, err := paceFlags(c)
	if err != nil {
		return err
	}
	req := mesh.MigrationRequest{ID: id, BWLimit: bw}
	if c.IsSet("streams") {
		req.Streams = c.Int("streams")
	}
	return runMigration(c, req)
}

// paceFlags checks --streams, if set or defaulted, and parses --bwlimit:
// 0 if not given, -1 for none.
func paceFlags(c *cli.Context) (bwlimit int64, err error) {
	if n := c.Int("streams"); (n != 0 || c.IsSet("streams")) && (n < 1 || n > migrate.MaxStreams) {
		return 0, usageError("--streams %d: want 1 to %d", n, migrate.MaxStreams)
	}
	if s := c.String("bwlimit"); s != "" {
		if bwlimit, err = parseRate(s); err != nil {
			return 0, usageError("--bwlimit: %v", err)
		}
	}
	return bwlimit, nil
}

// runMigration streams a migration's progress: a live bar, or with --json
// one JSON event per line.
func runMigration(c *cli.Context, req mesh.MigrationRequest) error {
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	asJSON := c.Bool("json")
	var bar *progress.Bar
	if !asJSON {
		bar = progress.New(c.App.ErrWriter, "migrating")
	}
	id := req.ID
	final, err := cl.Migrate(c.Context, req, func(ev mesh.MigrationEvent) {
		if ev.ID != "" {
			if id == "" && !asJSON {
				// The migration runs in the gateway: said once, so that
				// one left by Ctrl-C or a closed terminal can be found.
				fmt.Fprintf(c.App.ErrWriter, "migration %s (it runs in the gateway: Ctrl-C here leaves it running; skybridge migrate cancel %s stops it)\n", ev.ID, ev.ID)
			}
			id = ev.ID
		}
		if asJSON {
			printJSONLine(c.App.Writer, ev)
		} else if ev.Progress != nil {
			bar.Update(ev.Progress)
		}
	})
	if bar != nil {
		bar.Finish(final != nil && final.Record != nil && final.Record.State == migrate.StateDone)
	}
	var refused *mesh.RefusedError
	if err != nil && id != "" && c.Context.Err() == nil && !errors.As(err, &refused) {
		return streamLost(c.Context, cl, id, err)
	}
	if err != nil {
		return err
	}
	if asJSON {
		printJSONLine(c.App.Writer, final)
	} else {
		printMigrationResult(c.App.Writer, final)
	}
	if final.Error != "" {
		if final.Denied != nil {
			return cli.Exit("", 1)
		}
		if r := final.Record; r != nil && r.State == migrate.StateCancelled {
			// Asked for (migrate cancel), not a failure.
			return cli.Exit(fmt.Sprintf("migration %s cancelled: skybridge migrate resume %s carries on where it stopped", r.ID, r.ID), 1)
		}
		return cli.Exit("migration failed: "+final.Error, 1)
	}
	return nil
}

// streamLost says what became of migration id once its progress stream
// ended before its outcome: the gateway is asked, since a stream ends as
// much because the gateway stops (and the migration with it) as because
// the connection broke.
func streamLost(ctx context.Context, cl *mesh.Client, id string, err error) error {
	s, serr := cl.Migration(ctx, id)
	switch {
	case serr != nil:
		return fmt.Errorf("%w, and the gateway no longer answers (%v): if it stopped, migration %s stopped with it; once it runs again, `skybridge migrate resume %s` continues it (only chunks not yet at the destination are sent)", err, serr, id, id)
	case s.Progress != nil:
		return fmt.Errorf("%w, but migration %s goes on in the gateway: follow it with `skybridge migrate status %s`", err, id, id)
	case s.Record != nil:
		return fmt.Errorf("%w; migration %s is now %s: see `skybridge migrate status %s`", err, id, s.Record.State, id)
	}
	return fmt.Errorf("%w: see `skybridge migrate status %s`", err, id)
}

func printMigrationResult(w io.Writer, ev *mesh.MigrationEvent) {
	r := ev.Record
	if ev.Denied != nil {
		if ev.Denied.AtCommit {
			fmt.Fprintf(w, "REFUSED by the residency policy at the %s when the image was to be stored (%s): the policy in force changed while it was sent, and what was sent has been removed there:\n", printable(ev.Denied.By), printable(ev.Denied.Rule))
		} else {
			fmt.Fprintf(w, "REFUSED by the residency policy at the %s (%s); nothing was sent:\n", printable(ev.Denied.By), printable(ev.Denied.Rule))
		}
		for _, reason := range ev.Denied.Reasons {
			fmt.Fprintf(w, "  - %s\n", printable(reason)) // the receiver's words, when it refused
		}
		return
	}
	if r == nil {
		fmt.Fprintf(w, "migration %s: %s\n", ev.ID, printable(ev.Error))
		return
	}
	st := r.Stats
	// The name alone, as migrate verify and remove take it: "as vm.raw"
	// was read as a name, and there is no image vm.raw.
	fmt.Fprintf(w, "migration %s: %s %s → %s (%s) as %s, format %s\n", r.ID, r.State, printable(r.Image), r.To, r.ToSite, printable(r.Name), r.Format)
	if r.State == migrate.StateDone {
		fmt.Fprintf(w, "  verified: root %s\n", r.Root)
	}
	allocated := humanBytes(st.AllocatedBytes) + " allocated"
	if st.AllocatedBytes == 0 && r.State != migrate.StateDone {
		allocated = "allocation not read" // refused or failed before the scan
	}
	fmt.Fprintf(w, "  image %s virtual, %s; read %s, sent %s (%s before compression) in %s",
		humanBytes(st.VirtualBytes), allocated, humanBytes(st.BytesRead), humanBytes(st.BytesSent), humanBytes(st.BytesRaw), st.Duration.Round(time.Millisecond))
	if secs := st.Duration.Seconds(); secs > 0 {
		// The allocated data per second is the migration's speed only
		// for one done in one go: one still running, stopped, or resumed
		// (its earlier attempts' chunks not read again) read what it read.
		if r.State == migrate.StateDone && st.ChunksResumed == 0 {
			fmt.Fprintf(w, " (%s/s of allocated data)", humanBytes(int64(float64(st.AllocatedBytes)/secs)))
		} else if st.BytesRead > 0 {
			fmt.Fprintf(w, " (%s/s read)", humanBytes(int64(float64(st.BytesRead)/secs)))
		}
	}
	fmt.Fprintf(w, "\n  chunks: %d sent, %d reused from the stored version, %d resumed, %d already there, %d zero; %d retries\n",
		st.ChunksSent, st.ChunksSame, st.ChunksResumed, st.ChunksHad, st.ChunksZero, st.Retries)
	if r.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", printable(r.Error))
	}
}

func migrateList(c *cli.Context) error {
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	l, err := cl.Migrations(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, l)
	}
	w := c.App.Writer
	rows := [][]string{}
	for _, r := range l.Sending {
		rows = append(rows, []string{r.ID, r.State, r.Name, r.Class, r.To + " (" + r.ToSite + ")", humanBytes(r.Stats.BytesSent), r.Started.Local().Format("2006-01-02 15:04:05")})
	}
	fmt.Fprintln(w, "SENT")
	printTable(w, []string{"id", "state", "name", "class", "to", "sent", "started"}, rows)
	rows = rows[:0]
	for _, r := range l.Receiving {
		state, durable := "receiving", strconv.Itoa(r.Durable)
		if r.Interrupted {
			state, durable = "interrupted", "-"
		}
		rows = append(rows, []string{r.ID, state, r.Name, r.Class, r.From + " (" + r.FromSite + ")", durable, humanBytes(r.Received)})
	}
	fmt.Fprintln(w, "\nRECEIVING")
	printTable(w, []string{"id", "state", "name", "class", "from", "durable chunks", "received"}, rows)
	rows = rows[:0]
	outside := 0
	for _, r := range l.Images {
		rows = append(rows, []string{r.Name, r.Format, r.Class, r.From + " (" + r.FromSite + ")", humanBytes(r.Manifest.Size), r.Root.String()[:16], r.Received.Local().Format("2006-01-02 15:04:05"), atRestCell(r.AtRest)})
		if r.AtRest != nil && !r.AtRest.Allowed {
			outside++
		}
	}
	fmt.Fprintln(w, "\nSTORED IMAGES")
	if err := printTable(w, []string{"name", "format", "class", "from", "size", "root", "received", "residency"}, rows); err != nil {
		return err
	}
	if outside > 0 {
		fmt.Fprintf(w, "\n%d stored image(s) outside the residency policy in force: move them to a site it allows (skybridge migrate run), then remove them here (skybridge migrate remove NAME --reason TEXT); --json gives the rules' reasons\n", outside)
	}
	return nil
}

// atRestCell is the residency column of a stored image.
func atRestCell(a *mesh.AtRest) string {
	switch {
	case a == nil:
		return "no policy"
	case !a.Allowed:
		return "OUTSIDE POLICY (" + a.Rule + ")"
	case a.Exception != "":
		return "allowed by exception " + a.Exception + " until " + a.Until.Local().Format("2006-01-02 15:04")
	}
	return "allowed"
}

func migrateStatus(c *cli.Context) error {
	id := c.Args().First()
	if id == "" {
		return usageError("which migration? skybridge migrate status ID")
	}
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	st, err := cl.Migration(c.Context, id)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, st)
	}
	ev := &mesh.MigrationEvent{ID: id, Record: st.Record}
	if st.Progress != nil {
		ev.Record.Stats, ev.Record.State = st.Progress.Stats, "running ("+st.Progress.Phase+")"
	}
	printMigrationResult(c.App.Writer, ev)
	return nil
}

func migrateVerify(c *cli.Context) error {
	name, err := imageArg(c, "migrate verify NAME")
	if err != nil {
		return err
	}
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	rep, err := cl.VerifyImage(c.Context, name)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if err := printJSON(c.App.Writer, rep); err != nil {
			return err
		}
	} else if rep.OK {
		fmt.Fprintf(c.App.Writer, "%s: intact (root %s, %s re-read)\n", printable(rep.Path), rep.Root, humanBytes(rep.BytesRead))
	} else {
		fmt.Fprintf(c.App.Writer, "%s: DAMAGED: root %s, expected %s; chunks differing from the manifest: %v\n", printable(rep.Path), rep.Root, rep.Expected, rep.BadChunks)
	}
	if !rep.OK {
		return cli.Exit("", 1)
	}
	return nil
}

// parseRate reads a bandwidth such as 200MB/s, 1.5GiB/s, 800Mbit/s or 10M.
func parseRate(s string) (int64, error) {
	if strings.TrimSpace(s) == "none" {
		return -1, nil // no cap, a resumed migration's lifted too
	}
	t := strings.TrimSuffix(strings.TrimSpace(s), "/s")
	t = strings.TrimSuffix(t, "ps")
	bits := false
	for _, suf := range []string{"bit", "b"} {
		if strings.HasSuffix(t, suf) && !strings.HasSuffix(t, "B") {
			t, bits = strings.TrimSuffix(t, suf), true
			break
		}
	}
	t = strings.TrimSuffix(t, "B")
	mult := 1.0
	prefixes := []struct {
		suf string
		m   float64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"K", 1e3}, {"k", 1e3}, {"M", 1e6}, {"G", 1e9}}
	for _, u := range prefixes {
		if strings.HasSuffix(t, u.suf) {
			t, mult = strings.TrimSuffix(t, u.suf), u.m
			break
		}
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(t), 64)
	// The gateway takes a limit of 0 (or less) for none: NaN, a rate
	// under a byte a second, or one past int64, would quietly become that.
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) || v <= 0 {
		return 0, fmt.Errorf("%q is not a positive rate such as 200MB/s, 1GiB/s or 800Mbit/s", s)
	}
	r := v * mult
	if bits {
		r /= 8
	}
	switch {
	case r < 1:
		return 0, fmt.Errorf("%q is not a positive rate: it is under 1 byte/s; give at least 1B/s, or none for no limit", s)
	case r >= math.MaxInt64:
		return 0, fmt.Errorf("%q is not a positive rate a limiter can hold (at most %s/s); give none for no limit", s, units.Bytes(math.MaxInt64))
	}
	return int64(r), nil
}

func humanBytes(n int64) string { return units.Bytes(n) }
