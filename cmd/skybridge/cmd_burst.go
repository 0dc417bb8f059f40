package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/mesh"
)

func burstCommand() *cli.Command {
	return &cli.Command{
		Name:  "burst",
		Usage: "open and close ephemeral cloud sites whose gateways enrol with one-time join tokens",
		Subcommands: []*cli.Command{
			{
				Name:      "up",
				Usage:     "open a burst site on a gateway holding the mesh CA and print one join token per gateway it will run",
				ArgsUsage: "[CIDR...]",
				UsageText: "skybridge burst up (--socket PATH | --config FILE) --site NAME --provider P --region R --jurisdiction CC \\\n" +
					"    --ttl 2h --routes CIDR [CIDR ...] [--gateways N] [--token-ttl 30m] [--label KEY=VALUE ...] [--json]\n\n" +
					"Start each burst gateway with `skybridge gateway run --config FILE --join-token-file TOKEN_FILE` (its\n" +
					"configuration needs no node block: the burst decides its name, site, overlay IP and routes). When the TTL\n" +
					"ends or `skybridge burst down` runs, the site's certificates are revoked and its gateways leave the mesh.",
				Flags: append(append([]cli.Flag(nil), socketFlags...),
					&cli.StringFlag{Name: "site", Usage: "name of the burst site (a new site, e.g. burst-risk-ams)", Required: true},
					&cli.StringFlag{Name: "provider", Usage: "cloud provider, e.g. aws", Required: true},
					&cli.StringFlag{Name: "region", Usage: "cloud region, e.g. eu-west-1", Required: true},
					&cli.StringFlag{Name: "jurisdiction", Usage: "ISO 3166-1 alpha-2 country of the region, e.g. NL", Required: true},
					&cli.StringSliceFlag{Name: "routes", Usage: "prefix of the servers behind the burst gateways (repeatable, or comma-separated)", Required: true},
					&cli.StringSliceFlag{Name: "label", Usage: "site label KEY=VALUE, e.g. classes=risk-batch (repeatable)"},
					&cli.DurationFlag{Name: "ttl", Usage: "how long the site lives; its identities end with it", Required: true},
					&cli.DurationFlag{Name: "token-ttl", Value: mesh.DefaultTokenTTL, Usage: "how long a token may wait to be used (never past the TTL)"},
					&cli.IntFlag{Name: "gateways", Value: 1, Usage: "gateways the site runs: one single-use token each"},
					jsonFlag,
				),
				Action: burstUp,
			},
			{
				Name:      "down",
				Usage:     "end a burst site now: revoke its gateways' identities, void its unused tokens; its gateways leave",
				UsageText: "skybridge burst down (--socket PATH | --config FILE) --site NAME [--timeout 10m] [--json]",
				Flags: append(append([]cli.Flag(nil), socketFlags...),
					&cli.StringFlag{Name: "site", Usage: "the burst site", Required: true},
					// With Vault, ending a burst reads every certificate on
					// the PKI mount (about 1 ms each): past 30,000 of them
					// a fixed 30 s cut every attempt short.
					&cli.DurationFlag{Name: "timeout", Value: 10 * time.Minute, Usage: "give up after this long (a Vault PKI mount never tidied holds every certificate it issued: see README, Bursting)"},
					jsonFlag,
				),
				Action: burstDown,
			},
			{
				Name:      "list",
				Usage:     "list the burst sites a CA-holding gateway opened, with their gateways",
				UsageText: "skybridge burst list (--socket PATH | --config FILE) [--json]",
				Flags:     append(append([]cli.Flag(nil), socketFlags...), jsonFlag),
				Action:    burstList,
			},
		},
	}
}

func burstUp(c *cli.Context) error {
	// The gateway takes 0 for 1 (a request that does not say); here it
	// was said.
	if n := c.Int("gateways"); n < 1 || n > mesh.MaxBurstGateways {
		return usageError("--gateways %d: use 1 to %d", n, mesh.MaxBurstGateways)
	}
	labels, err := certs.ParseLabels(c.StringSlice("label"))
	if err != nil {
		return usageError("%v", err)
	}
	var routes []string
	for _, r := range c.StringSlice("routes") {
		for _, p := range strings.Split(r, ",") {
			if p = strings.TrimSpace(p); p != "" {
				routes = append(routes, p)
			}
		}
	}
	// `--routes A B C`: the words after the flags are more routes.
	for _, r := range c.Args().Slice() {
		if _, err := netip.ParsePrefix(r); err != nil {
			return usageError("unexpected argument %q: only routes (CIDR prefixes) may follow the flags", r)
		}
		routes = append(routes, r)
	}
	req := mesh.BurstRequest{
		BurstSite: mesh.BurstSite{Site: c.String("site"), Provider: c.String("provider"), Region: c.String("region"), Jurisdiction: c.String("jurisdiction"),
			Routes: routes, Labels: labels},
		TTL: c.Duration("ttl"), TokenTTL: c.Duration("token-ttl"), Gateways: c.Int("gateways"),
		// A Vault-backed gateway sets the burst up in Vault with the
		// operator's token; the embedded CA ignores it.
		VaultToken: os.Getenv("VAULT_TOKEN"),
	}
	if err := req.Check(); err != nil {
		return usageError("%s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 30*time.Second)
	defer cancel()
	g, err := cl.BurstUp(ctx, req)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, g)
	}
	w := c.App.Writer
	where := "at " + g.Endpoint
	if g.Endpoint == "vault" {
		where = "by logging in to Vault (each token holds a wrapped AppRole SecretID)"
	}
	fmt.Fprintf(w, "burst site %s is open until %s (%s); gateways enrol %s\n", g.Site, g.Expires.Format(time.RFC3339), req.TTL, where)
	if len(g.Classes) > 0 {
		fmt.Fprintf(w, "what the residency policy lets %s store:\n", g.Site)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, v := range g.Classes {
			verdict := "allowed"
			switch {
			case !v.Allowed:
				verdict = "denied"
			case v.Audit:
				verdict = "audit" // denied by the rules, let through by audit mode
			}
			why := v.Rule
			if (!v.Allowed || v.Audit) && len(v.Reasons) > 0 {
				why += ": " + strings.Join(v.Reasons, "; ")
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", v.Class, verdict, why)
		}
		tw.Flush()
	}
	fmt.Fprintf(w, "join tokens (secrets: each enrols one gateway once, until %s):\n", g.TokenExpires.Format(time.RFC3339))
	for _, t := range g.Tokens {
		fmt.Fprintf(w, "  %s\n", t)
	}
	fmt.Fprintf(w, "start each burst gateway with its token in a file (or in $SKYBRIDGE_JOIN_TOKEN):\n  skybridge gateway run --config gateway.hcl --join-token-file TOKEN_FILE\n")
	return nil
}

func burstDown(c *cli.Context) error {
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	if c.Duration("timeout") <= 0 {
		return usageError("--timeout %s: give a positive duration, e.g. 10m", c.Duration("timeout"))
	}
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	bi, err := cl.BurstDown(ctx, c.String("site"), os.Getenv("VAULT_TOKEN"))
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, bi)
	}
	printBurstDown(c.App.Writer, bi)
	return nil
}

// printBurstDown says what burst down did.
func printBurstDown(w io.Writer, bi *mesh.BurstInfo) {
	if bi.AlreadyEnded {
		// A retry, or a script run again: nothing to do, which is success.
		when := ""
		if bi.Ended != nil {
			when = " at " + bi.Ended.Format(time.RFC3339)
		}
		fmt.Fprintf(w, "burst site %s had already ended%s (%s); nothing left to do\n", bi.Site, when, bi.EndReason)
		return
	}
	fmt.Fprintf(w, "burst site %s ended; %d identities revoked, %d unused tokens void\n", bi.Site, len(bi.Revoked), bi.TokensVoided)
	if len(bi.Revoked) > 0 {
		for _, gw := range bi.Gateways {
			fmt.Fprintf(w, "  %s (%s) leaves the mesh as the revocation spreads\n", gw.Node, gw.OverlayIP)
		}
	} else if len(bi.Gateways) > 0 {
		// None found valid (servers never started, certificates revoked
		// by an earlier attempt), or none looked for (the site opened
		// again after its Vault objects were removed by hand): no
		// revocation is on its way to make anyone leave.
		fmt.Fprintf(w, "  no certificate of its gateways was revoked (%s); any still valid ends with the burst, at %s\n", bi.EndReason, bi.Expires.Format(time.RFC3339))
	}
	for _, warn := range bi.Warnings {
		fmt.Fprintf(w, "WARNING: %s\n", warn)
	}
	fmt.Fprintln(w, "its gateways knew the gossip key, which alone admits nobody; `skybridge keys rotate-gossip` replaces it if your rules say so")
}

func burstList(c *cli.Context) error {
	cl, err := controlClient(c)
	if err != nil {
		return err
	}
	l, err := cl.Bursts(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, l)
	}
	rows := [][]string{}
	for _, b := range l {
		state := "open until " + b.Expires.Format(time.RFC3339)
		if b.Ended != nil {
			state = "ended " + b.Ended.Format(time.RFC3339) + " (" + b.EndReason + ")"
			if b.WorkLeft {
				state += "; not cleaned up: run burst down --site " + b.Site
			}
		}
		var gws []string
		for _, g := range b.Gateways {
			gws = append(gws, g.Node)
		}
		rows = append(rows, []string{b.Site, b.Provider + "/" + b.Region, b.Jurisdiction, strings.Join(b.Routes, ","), state,
			dash(strings.Join(gws, ",")), fmt.Sprint(b.TokensUnused), fmt.Sprint(b.TokensVoid)})
	}
	return printTable(c.App.Writer, []string{"SITE", "PROVIDER/REGION", "JUR", "ROUTES", "STATE", "GATEWAYS", "UNUSED TOKENS", "VOID"}, rows)
}
