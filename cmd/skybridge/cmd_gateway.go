package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
	"github.com/skybridge-mesh/skybridge/mesh"
)

// socketFlags locate a running gateway's control socket: directly, or
// through its configuration file. Their variables are read by
// controlClient, not by the flags, so that a flag on the command line
// beats a variable left in the environment.
var socketFlags = []cli.Flag{
	&cli.StringFlag{Name: "socket", Usage: "control socket of the gateway (default: $SKYBRIDGE_SOCKET)"},
	&cli.StringFlag{Name: "config", Usage: "gateway configuration, whose control socket is used (default: $SKYBRIDGE_CONFIG)"},
}

// controlClient connects to the gateway the command line names, else the
// one the environment names. Two answers to "which gateway?" are a
// mistake, not a choice to make for the operator: a command sent to the
// wrong gateway (a burst, a key rotation) is not undone.
func controlClient(c *cli.Context) (*mesh.Client, error) {
	socket, config := c.String("socket"), c.String("config")
	if socket != "" && config != "" {
		return nil, usageError("give --socket or --config, not both: they may name different gateways")
	}
	if socket == "" && config == "" {
		socket, config = os.Getenv("SKYBRIDGE_SOCKET"), os.Getenv("SKYBRIDGE_CONFIG")
		if socket != "" && config != "" {
			return nil, usageError("SKYBRIDGE_SOCKET and SKYBRIDGE_CONFIG are both set: unset one, or say which gateway with --socket or --config")
		}
	}
	if socket != "" {
		return mesh.NewClient(socket), nil
	}
	if config != "" {
		s, err := mesh.LoadConfig(config)
		if err != nil {
			return nil, err
		}
		return mesh.NewClient(s.ControlSocket), nil
	}
	return nil, usageError("say which gateway: --socket PATH or --config FILE")
}

func gatewayCommand() *cli.Command {
	return &cli.Command{
		Name:  "gateway",
		Usage: "run a gateway: gossip with the other gateways and keep the WireGuard mesh configured",
		Subcommands: []*cli.Command{{
			Name:  "run",
			Usage: "run the gateway of one site until SIGINT, SIGTERM or SIGHUP (unless started under nohup): then it leaves the cluster and removes its interface",
			UsageText: "skybridge gateway run --config FILE [--join-token-file FILE]\n\n" +
				"With a join token (from `skybridge burst up`) a fresh gateway enrols into a burst site first; its configuration\n" +
				"then has no node block. It leaves the mesh and removes its identity when the burst ends, and exits 0.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "config", Usage: "gateway configuration (HCL)", Required: true, EnvVars: []string{"SKYBRIDGE_CONFIG"}},
				&cli.StringFlag{Name: "join-token-file", Usage: "file holding a join token: enrol into a burst site (used once; a restart uses the stored identity)"},
				&cli.StringFlag{Name: "join-token", Usage: "the join token itself (prefer --join-token-file: a command line is visible to other users)", EnvVars: []string{"SKYBRIDGE_JOIN_TOKEN"}},
			},
			Action: gatewayRun,
		}},
	}
}

func gatewayRun(c *cli.Context) error {
	s, err := mesh.LoadConfig(c.String("config"))
	if err != nil {
		return err
	}
	// SIGHUP too (a closed terminal or ssh session, a `kill -HUP`): Go's
	// default ends the process outright, with no leave notice and the
	// routes into the interface gone with it, so the mesh's traffic
	// takes the host's other routes, in clear. Unless it was started
	// ignoring SIGHUP (nohup), which it goes on doing.
	sigs := []os.Signal{syscall.SIGINT, syscall.SIGTERM}
	if !signal.Ignored(syscall.SIGHUP) {
		sigs = append(sigs, syscall.SIGHUP)
	}
	ctx, stop := signal.NotifyContext(c.Context, sigs...)
	defer stop()
	// A log reader gone (`| tee` ended by the same Ctrl-C, a log shipper
	// restarted) must not kill the gateway at its next line, its stop's
	// first one included: Go dies of a broken pipe on standard error
	// unless SIGPIPE is handled. The line is lost instead.
	signal.Ignore(syscall.SIGPIPE)
	defer signal.Reset(syscall.SIGPIPE) // for a caller that goes on (tests)
	// Stopping takes a few seconds (leaving the mesh, ending migrations);
	// a second signal ends the process at once, as without the handler.
	// Not a second SIGHUP: a closed terminal sends two (the shell passes
	// its own on to its jobs, then the kernel hangs up the foreground
	// group as the shell exits), and the second killed the gateway in its
	// stop.
	// Only for a stop asked for: not once the run returns, when stop ends
	// ctx, and a caller that goes on (tests) would be left ignoring SIGHUP.
	defer context.AfterFunc(ctx, func() {
		if slices.Contains(sigs, os.Signal(syscall.SIGHUP)) {
			signal.Ignore(syscall.SIGHUP)
		}
		stop()
	})()
	// Before anything touches the state: the enrollment, the interface.
	release, err := mesh.LockStateDir(s.StateDir)
	if err != nil {
		return err
	}
	defer release()
	token := c.String("join-token")
	if f := c.String("join-token-file"); f != "" {
		if token != "" {
			return usageError("give the join token once: --join-token-file or --join-token")
		}
		if token, err = readJoinToken(f); err != nil {
			return err
		}
	}
	if token != "" {
		if _, err := mesh.Join(ctx, s, token, slog.Default()); err != nil {
			return stoppedBeforeRun(ctx, err)
		}
	}
	g, err := mesh.New(ctx, s, slog.Default())
	if err != nil && stoppedBeforeRun(ctx, err) == nil {
		return nil
	}
	// Only once it failed: an enrollment kept in the state directory (a
	// burst gateway restarted) decides what the gateway has, or that its
	// burst is over.
	if err != nil && token == "" && errors.Is(err, fs.ErrNotExist) {
		if why := noIdentity(s, ", set identity.ca_dir (or a Vault back end) so the gateway obtains its own, or enrol it into a burst site with --join-token-file TOKEN_FILE (from `skybridge burst up`)"); why != nil {
			err = why
		}
	}
	if err == nil {
		err = g.Run(ctx)
	}
	// The end of a burst, now or before this start, is how a burst
	// gateway is meant to stop: exit 0, so a supervisor does not restart
	// it. Said on stderr, with the gateway's log: a daemon's standard
	// output may be a full disk's file or closed, which would make it
	// exit 2, and be restarted for ever.
	var ended *mesh.BurstEndedError
	if errors.As(err, &ended) {
		fmt.Fprintln(c.App.ErrWriter, ended.Error())
		return nil
	}
	return err
}

// readJoinToken reads the join token in file, a secret: single use, but
// until then anyone's who can read it.
func readJoinToken(file string) (string, error) {
	if fi, err := os.Stat(file); err == nil && fi.IsDir() {
		return "", usageError("--join-token-file %s is a directory: name the file holding the token `skybridge burst up` printed", file)
	}
	b, err := certs.ReadPrivateFile(file)
	if err != nil {
		return "", fmt.Errorf("join token: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", fmt.Errorf("join token file %s is empty: put in it the token `skybridge burst up` printed", file)
	}
	return token, nil
}

// noIdentity says how to give an identity to a gateway whose identity
// directory holds none and which has no issuer to obtain one from (a file
// back end without ca_dir), rather than the missing ca.crt the back end
// would report; nil if it has one, or an issuer. more is the other ways.
func noIdentity(s *mesh.Settings, more string) error {
	if s.Identity.Backend == certs.BackendVault || s.Identity.CADir != "" {
		return nil
	}
	if _, err := certs.LoadTrustBundle(s.Identity.Dir, netip.Prefix{}); !errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	node := s.Node.Name
	if node == "" {
		node = "NAME"
	}
	dir := s.Identity.Dir
	return fmt.Errorf("this gateway has no identity yet (nothing in %s): issue one into it with `skybridge ca issue --ca CA_DIR --node %s ... --out %s`%s", dir, node, dir, more)
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:      "status",
		Usage:     "show a gateway's view of the mesh: members, tunnels, handshakes, policy",
		UsageText: "skybridge status (--socket PATH | --config FILE) [--json]",
		Flags:     append(append([]cli.Flag(nil), socketFlags...), jsonFlag),
		Action: func(c *cli.Context) error {
			cl, err := controlClient(c)
			if err != nil {
				return err
			}
			st, err := cl.Status(c.Context)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, st)
			}
			printStatus(c, st)
			return nil
		},
	}
}

func printStatus(c *cli.Context, st *mesh.Status) {
	w := c.App.Writer
	fmt.Fprintf(w, "node %s of site %s (%s, %s), overlay %s\n", st.Node, st.Site, st.Jurisdiction, st.Region, st.OverlayIP)
	fmt.Fprintf(w, "interface %s (%s), port %d, key %s\n", st.Interface, st.Mode, st.ListenPort, st.PublicKey)
	fmt.Fprintf(w, "identity serial %s, valid until %s, revocation list #%d\n", st.Identity.Serial, st.Identity.NotAfter.UTC().Format(time.RFC3339), st.Identity.CRLNumber)
	if st.Identity.Revoked {
		fmt.Fprintf(w, "REVOKED: this gateway's certificate is on the revocation list; the other gateways refuse it\n")
	}
	switch iss := st.Identity.Issuer; iss {
	case "":
	case "renew_from":
		// No issuer of its own to poll: the CA-holding gateway renews it.
		fmt.Fprintf(w, "renewed through identity.renew_from (a gateway holding the mesh CA) at about two thirds of its life\n")
	default:
		answered := "no answer since the gateway started"
		if at := st.Identity.IssuerAnswered; at != nil {
			answered = "last answer " + time.Since(*at).Round(time.Second).String() + " ago"
		}
		disk := ""
		if st.Identity.StartedOnDisk {
			disk = "; started on the secrets kept on disk (vault was unreachable)"
		}
		fmt.Fprintf(w, "issuer %s: %s%s\n", iss, answered, disk)
	}
	fmt.Fprintf(w, "issued by %s; trusted CAs: %s\n", st.Identity.IssuedBy, strings.Join(st.Identity.CAs, ", "))
	if s := st.Identity.SigningCA; s != "" && len(st.Identity.CAs) > 1 {
		fmt.Fprintf(w, "issuer rotation: new certificates come from %s\n", s)
	}
	if st.BurstUntil != nil {
		fmt.Fprintf(w, "burst gateway: leaves the mesh at %s, or when the burst is taken down\n", st.BurstUntil.UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(w, "policy %s, topology %s, gossip %s (%d keys), operator %s, up %s\n\n", st.Policy, st.Topology, st.Gossip, st.GossipKeys, dash(st.Operator), st.Uptime.Round(time.Second))
	rows := [][]string{}
	now := time.Now()
	for _, m := range st.Members {
		hs := "-"
		if !m.LastHandshake.IsZero() {
			hs = now.Sub(m.LastHandshake).Round(time.Second).String() + " ago"
		} else if m.Peer {
			hs = "never"
		}
		exp := "-"
		if !m.IdentityExpiry.IsZero() {
			exp = m.IdentityExpiry.UTC().Format("2006-01-02")
		}
		state := string(m.State)
		if m.Peer {
			state += ", peer"
			if m.Health == mesh.TunnelStale {
				state += ", STALE" // sends without a handshake: the tunnel fails
			}
		}
		rows = append(rows, []string{m.Node, dash(m.Site), dash(m.Jurisdiction), dash(m.OverlayIP), state, dash(m.Endpoint), hs,
			fmt.Sprint(m.RxBytes), fmt.Sprint(m.TxBytes), exp, dash(m.Reason)})
	}
	printTable(w, []string{"node", "site", "jur", "overlay ip", "state", "endpoint", "handshake", "rx", "tx", "identity until", "reason"}, rows)
	for _, l := range st.Links {
		if !l.Allowed {
			fmt.Fprintf(w, "\nno tunnel to site %s: %s", printable(l.Site), printable(l.Reason))
		}
	}
	sites := make([]string, 0, len(st.Carriers))
	for s := range st.Carriers {
		if s != st.Site {
			sites = append(sites, s)
		}
	}
	slices.Sort(sites)
	if len(sites) > 0 {
		var via []string
		for _, s := range sites {
			via = append(via, s+" via "+st.Carriers[s])
		}
		fmt.Fprintf(w, "\nsite routes: %s", printable(strings.Join(via, ", ")))
		if len(st.Unreachable) > 0 {
			fmt.Fprintf(w, " (not through %s: unreachable through their tunnels)", printable(strings.Join(st.Unreachable, ", ")))
		}
		fmt.Fprintln(w)
	}
	var cut []string
	for s, ok := range st.Reachable {
		if !ok {
			cut = append(cut, s)
		}
	}
	if len(cut) > 0 {
		slices.Sort(cut)
		fmt.Fprintf(w, "UNREACHABLE from here: %s (no gateway alive there, or its tunnel sends without a handshake)\n", printable(strings.Join(cut, ", ")))
	}
	for _, s := range slices.Sorted(maps.Keys(st.Held)) {
		fmt.Fprintf(w, "routes HELD for %s: %s (the site's gateways that routed them are away: their traffic is refused here, not sent by the host's other routes)\n", printable(s), printable(routesString(st.Held[s])))
	}
	for _, c := range st.Conflicts {
		fmt.Fprintf(w, "conflict: %s\n", printable(c))
	}
	if len(st.Links) > 0 {
		fmt.Fprintln(w)
	}
}

func dash(s string) string {
	if strings.TrimSpace(s) == "" {
		return "-"
	}
	return s
}

func graphCommand() *cli.Command {
	return &cli.Command{
		Name:  "graph",
		Usage: "render the mesh (sites, gateways, tunnels coloured by handshake age) for reports",
		UsageText: "skybridge graph (--socket PATH | --config FILE) [--format dot|svg|json] [--out FILE]\n\n" +
			"Without --format, --out FILE.svg or FILE.json picks the format; otherwise dot.\n" +
			"svg is drawn by skybridge itself (the dashboard's picture); dot is for Graphviz (`dot -Tpdf`).",
		Flags: append(append([]cli.Flag(nil), socketFlags...),
			&cli.StringFlag{Name: "format", Value: "dot", Usage: strings.Join(mesh.GraphFormats, ", ")},
			&cli.StringFlag{Name: "out", Usage: "write to `FILE` (atomically) instead of standard output"}),
		Action: func(c *cli.Context) error {
			f := c.String("format")
			// --out x.svg without --format draws an SVG, not DOT under
			// an .svg name.
			if ext := strings.TrimPrefix(filepath.Ext(c.String("out")), "."); !c.IsSet("format") && slices.Contains(mesh.GraphFormats, ext) {
				f = ext
			}
			if !slices.Contains(mesh.GraphFormats, f) {
				return usageError("--format %q: want one of %s", f, strings.Join(mesh.GraphFormats, ", "))
			}
			if out := c.String("out"); out != "" {
				if err := replaceableOutput(out, isGraph, "a mesh graph"); err != nil {
					return err
				}
			}
			cl, err := controlClient(c)
			if err != nil {
				return err
			}
			out, err := cl.Graph(c.Context, f)
			if err != nil {
				return err
			}
			if path := c.String("out"); path != "" {
				return atomicfile.WriteFile(path, []byte(out), 0o644)
			}
			_, err = fmt.Fprint(c.App.Writer, out)
			return err
		},
	}
}

// isGraph reports whether b is a graph `skybridge graph` wrote, in any of
// its formats: --out replaces only such a file.
func isGraph(b []byte) bool {
	if bytes.HasPrefix(b, []byte("graph skybridge {")) || bytes.HasPrefix(b, []byte("<svg ")) && bytes.Contains(b, []byte(`aria-label="skybridge mesh"`)) {
		return true
	}
	var g mesh.MeshGraph
	return json.Unmarshal(b, &g) == nil && g.Self != "" && g.Sites != nil
}

func dashboardCommand() *cli.Command {
	return &cli.Command{
		Name:  "dashboard",
		Usage: "print the link to the gateway's live dashboard (it carries the operator token: do not share it)",
		UsageText: "skybridge dashboard (--socket PATH | --config FILE) [--json]\n\n" +
			"The same endpoint serves Prometheus metrics at /metrics to a bearer token (the gateway's operator.token).",
		Flags: append(append([]cli.Flag(nil), socketFlags...), jsonFlag),
		Action: func(c *cli.Context) error {
			cl, err := controlClient(c)
			if err != nil {
				return err
			}
			l, err := cl.Operator(c.Context)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, l)
			}
			fmt.Fprintf(c.App.Writer, "dashboard: %s\nmetrics:   %s (Authorization: Bearer, token in %s)\n", l.Dashboard, l.Metrics, l.TokenFile)
			return nil
		},
	}
}

func keysCommand() *cli.Command {
	return &cli.Command{
		Name:  "keys",
		Usage: "rotate the mesh's keys",
		Subcommands: []*cli.Command{{
			Name:      "rotate-gossip",
			Usage:     "replace the gossip encryption key on every gateway, without a restart",
			UsageText: "skybridge keys rotate-gossip (--socket PATH | --config FILE) [--force] [--json]",
			Flags: append(append([]cli.Flag(nil), socketFlags...), jsonFlag,
				&cli.BoolFlag{Name: "force", Usage: "rotate without the gateways that are away (stopped or declared dead): each then needs the new keyring copied to it"}),
			Action: func(c *cli.Context) error {
				cl, err := controlClient(c)
				if err != nil {
					return err
				}
				ctx, cancel := context.WithTimeout(c.Context, 2*time.Minute)
				defer cancel()
				rep, err := cl.RotateGossipKey(ctx, c.Bool("force"))
				if err != nil {
					return err
				}
				if c.Bool("json") {
					return printJSON(c.App.Writer, rep)
				}
				fmt.Fprintln(c.App.Writer, gossipRotationSummary(rep))
				if len(rep.LeftOut) > 0 {
					if rep.Keyring != "" {
						fmt.Fprintf(c.App.Writer, "left out, away: %s — copy the new keyring (%s) into each one's identity directory before it starts again\n", strings.Join(rep.LeftOut, ", "), rep.Keyring)
					} else { // Vault holds the mesh's keyring
						fmt.Fprintf(c.App.Writer, "left out, away: %s — each takes the new keyring from Vault when it starts again (restart one that ran on through a partition)\n", strings.Join(rep.LeftOut, ", "))
					}
				}
				if rep.CAKeyring == "" {
					// `ca issue` hands new gateways the CA directory's
					// copy: unless a gateway holding it took part, it
					// now holds a key the mesh no longer takes.
					fmt.Fprintf(c.App.Writer, "this gateway does not hold the CA directory: unless a gateway that does (identity.ca_dir) took part, copy the new keyring into it, or gateways issued from now on cannot read the mesh's gossip: cp %s <CA directory>/%s\n", rep.Keyring, certs.FileGossipKeyring)
				}
				return nil
			},
		}, {
			Name:  "rotate-wg",
			Usage: "replace this gateway's WireGuard key without dropping its tunnels (also on a schedule: wireguard { rotate_every = \"720h\" })",
			UsageText: "skybridge keys rotate-wg (--socket PATH | --config FILE) [--json]\n\n" +
				"The next key is advertised first; peers add it and acknowledge; then the gateway switches and peers move\n" +
				"their routes to the new key. Tunnels pause for about as long as gossip takes to carry the switch.",
			Flags: append(append([]cli.Flag(nil), socketFlags...), jsonFlag),
			Action: func(c *cli.Context) error {
				cl, err := controlClient(c)
				if err != nil {
					return err
				}
				ctx, cancel := context.WithTimeout(c.Context, time.Minute)
				defer cancel()
				rep, err := cl.RotateWireGuardKey(ctx)
				if err != nil {
					return err
				}
				if c.Bool("json") {
					return printJSON(c.App.Writer, rep)
				}
				fmt.Fprintf(c.App.Writer, "WireGuard key rotated in %s: %s → %s\n", rep.Took.Round(time.Millisecond), rep.OldKey, rep.NewKey)
				fmt.Fprintf(c.App.Writer, "peers ready before the switch: %s\n", dash(strings.Join(rep.Ready, ", ")))
				if len(rep.Late) > 0 {
					fmt.Fprintf(c.App.Writer, "peers that had not acknowledged (they catch up from the advert): %s\n", strings.Join(rep.Late, ", "))
				}
				return nil
			},
		}},
	}
}

// policyPublish hands a signed policy to a running gateway.
func policyPublish(c *cli.Context) error {
	file := c.String("policy")
	src, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("read policy: %w", err)
	}
	sigFile := c.String("sig")
	if sigFile == "" {
		sigFile = file + ".sig"
	}
	sig, err := os.ReadFile(sigFile)
	if err != nil {
		return fmt.Errorf("read policy signature (sign it with skybridge policy sign): %w", err)
	}
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	adopted, rev, err := cl.PublishPolicy(c.Context, src, sig)
	if err != nil {
		return err
	}
	if adopted {
		fmt.Fprintf(c.App.Writer, "gateway adopted %s and is spreading it through the mesh\n", rev)
	} else {
		fmt.Fprintf(c.App.Writer, "gateway already runs %s\n", rev)
	}
	return nil
}

// stoppedBeforeRun is nil for an error that is only the stop asked for
// (a signal while the gateway enrols or waits for Vault at start): a
// supervisor must not count `systemctl stop` as a failure.
func stoppedBeforeRun(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		slog.Info("gateway stopped before it ran, as asked", "was", err)
		return nil
	}
	return err
}

// gossipRotationSummary is the first line `keys rotate-gossip` prints.
func gossipRotationSummary(rep *mesh.RotationReport) string {
	took := rep.Elapsed.Round(time.Millisecond)
	if len(rep.Members) == 0 {
		return fmt.Sprintf("gossip key rotated on this gateway alone in %s: no other gateway took part", took)
	}
	return fmt.Sprintf("gossip key rotated on %d other gateways in %s: %s", len(rep.Members), took, strings.Join(rep.Members, ", "))
}
