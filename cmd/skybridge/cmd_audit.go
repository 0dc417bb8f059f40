package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
	"github.com/skybridge-mesh/skybridge/internal/audit"
)

func auditCommand() *cli.Command {
	return &cli.Command{
		Name:  "audit",
		Usage: "check a gateway's signed, hash-chained audit log",
		Subcommands: []*cli.Command{{
			Name:      "verify",
			Usage:     "verify every record's signature (by a mesh identity) and the hash chain: nothing removed, changed or reordered (exit 1 if not; 2 if it could not be checked); records cut from the end are found only with the log's audit.log.head beside it",
			UsageText: "skybridge audit verify --log STATE_DIR/audit.log --ca-cert ca.crt [--crl crl.pem] [--node NAME] [--mesh-cidr CIDR] [--json]",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "log", Usage: "audit log file", Required: true},
				&cli.StringFlag{Name: "ca-cert", Usage: "mesh CA certificate(s), PEM", Required: true},
				&cli.StringFlag{Name: "crl", Usage: "the CA's revocation list (without it, revoked keys are not refused)"},
				&cli.StringFlag{Name: "node", Usage: "the gateway whose log it must be (the log names it either way)"},
				&cli.StringFlag{Name: "mesh-cidr", Usage: "the mesh's overlay range, for a CA certificate that does not name it (Vault's): the mesh_cidr of the gateways' configuration"},
				jsonFlag,
			},
			Action: func(c *cli.Context) error {
				// Exit 1 says the log is not intact; inputs that could
				// not be read say nothing about it, so they exit 2 as
				// the policy commands do, and a script that pages on 1
				// is not paged for a wrong path.
				var mesh netip.Prefix
				if v := c.String("mesh-cidr"); v != "" {
					p, err := netip.ParsePrefix(v)
					if err != nil {
						return usageError("--mesh-cidr %q: %v (e.g. 100.96.0.0/16)", v, err)
					}
					mesh = p.Masked()
				}
				tb, err := trustFromFiles(c.String("ca-cert"), c.String("crl"), mesh)
				if err != nil {
					return cli.Exit(err.Error(), exitError)
				}
				f, err := os.Open(c.String("log"))
				if err != nil {
					return cli.Exit(err.Error(), exitError)
				}
				defer f.Close()
				// Said as the mistake it is: read as a log, a directory
				// would be reported INVALID, which reads as tampering.
				if st, err := f.Stat(); err == nil && st.IsDir() { // a pipe is fine: zcat audit.log.gz | … --log /dev/stdin
					return usageError("--log %s is a directory: give the audit log itself (STATE_DIR/audit.log)", c.String("log"))
				}
				rep, verr := audit.Verify(f, tb)
				var unreadable *audit.UnreadableError
				if errors.As(verr, &unreadable) {
					return cli.Exit(fmt.Sprintf("%s could not be read, so it was not checked (after %d good records): %v", c.String("log"), rep.Records, verr), exitError)
				}
				if verr == nil && rep.Records == 0 && audit.Open(c.String("log")).HasHead() {
					// A gateway creates its log with its first record, and
					// the head beside it with that record: an empty log
					// with a head was emptied, and "intact" would say
					// nothing was lost. (Without one, an earlier release
					// may have made it before any record.)
					verr = errors.New("it holds no record: a gateway's audit log starts with its first record, so this one was emptied or is not an audit log")
				}
				if node := c.String("node"); verr == nil && node != "" && rep.Node != node {
					verr = fmt.Errorf("it is the log of %s, not of %s", rep.Node, node)
				}
				if verr == nil {
					// A log cut back is a shorter chain, intact; the
					// head beside it knows how long it was.
					verr = audit.Open(c.String("log")).CheckHead()
					if errors.Is(verr, atomicfile.ErrDamaged) {
						// The audit package's advice is the gateway's, to
						// run this command: what is left to do here.
						return cli.Exit(fmt.Sprintf("%s: %d records verify, but its head %s.head is damaged, so whether records were cut from its end could not be checked: restore the head from the backup that holds this log; or, if this log is known to be whole, move the head aside (the gateway's next record writes a new one)", c.String("log"), rep.Records, filepath.Base(c.String("log"))), exitError)
					}
					if errors.As(verr, &unreadable) {
						return cli.Exit(fmt.Sprintf("%s: %d records verify, but whether records were cut from its end could not be checked: %v", c.String("log"), rep.Records, verr), exitError)
					}
				}
				revocations := c.String("crl") != ""
				headChecked := audit.Open(c.String("log")).HasHead()
				if c.Bool("json") {
					out := map[string]any{"valid": verr == nil, "report": rep, "revocations_checked": revocations, "end_checked": headChecked}
					if verr != nil {
						out["error"] = verr.Error()
					}
					if err := printJSON(c.App.Writer, out); err != nil {
						return err
					}
				} else if verr == nil && rep.Records == 0 {
					fmt.Fprintf(c.App.Writer, "%s: no record, and no head beside it: nothing recorded yet\n", c.String("log"))
				} else if verr == nil {
					fmt.Fprintf(c.App.Writer, "%s: %d records of %s, signatures and chain intact", c.String("log"), rep.Records, printable(rep.Node))
					if rep.Records > 0 {
						fmt.Fprintf(c.App.Writer, " (%s .. %s)", rep.First.Format(time.RFC3339), rep.Last.Format(time.RFC3339))
					}
					fmt.Fprintln(c.App.Writer)
					if !revocations {
						fmt.Fprintln(c.App.Writer, "note: revocations were not checked: give the CA's revocation list with --crl")
					}
					if !headChecked {
						fmt.Fprintf(c.App.Writer, "note: no %s.head beside the log: records cut from its end would not show; verify it where the gateway keeps both\n", filepath.Base(c.String("log")))
					}
				} else {
					fmt.Fprintf(c.App.Writer, "%s: INVALID after %d good records: %v\n", c.String("log"), rep.Records, verr)
				}
				// Whatever the verdict: bytes not read as a record are
				// said so, not passed over.
				if !c.Bool("json") && rep.CutShort {
					fmt.Fprintln(c.App.Writer, "note: the log ends in bytes without a newline that are not a whole record, not counted: an append cut short (a crash, a full disk), never acknowledged, which the gateway cuts off at its next record")
				}
				if !c.Bool("json") && rep.NewlineLost {
					fmt.Fprintln(c.App.Writer, "note: the last record lost its newline (an editor, a copy), and is counted: the gateway puts the newline back at its next record")
				}
				if verr != nil {
					return cli.Exit("", 1)
				}
				return nil
			},
		}},
	}
}
