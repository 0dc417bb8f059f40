// Command skybridge runs and operates a skybridge mesh: the CA that admits
// gateways, the gateways themselves, the residency policy and migrations.
// Each command group lives in its own cmd_*.go file and only parses flags
// and calls into the packages that do the work.
package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"runtime/debug"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=v1.2.3".
var version = ""

func main() {
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}

// run is main without the process: tests call it with their own args and
// writers and check the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	out := &rememberWriter{w: stdout}
	app := newApp(out, stderr)
	usageErrors(app.Commands, "skybridge")
	app.OnUsageError = func(_ *cli.Context, err error, _ bool) error {
		return usageError("%v (see skybridge --help)", err)
	}
	unknown, under := "", "skybridge"
	app.CommandNotFound = func(c *cli.Context, name string) {
		unknown = name
		if c.Command != nil {
			if n := c.Command.FullName(); n != "" && n != app.Name {
				under = "skybridge " + n
			}
		}
	}
	args, twice := interspersed(app, args)
	if twice != "" {
		fmt.Fprintf(stderr, "skybridge: --%s given more than once: it takes one value (only the last would count); give it once\n", twice)
		return 2
	}
	err := app.Run(args)
	if unknown != "" {
		fmt.Fprintf(stderr, "skybridge: unknown command %q (see %s --help)\n", unknown, under)
		return 2
	}
	code, msg := 0, ""
	if err != nil {
		code, msg = 1, err.Error()
		var ec cli.ExitCoder
		if errors.As(err, &ec) && ec.ExitCode() != 0 {
			code = ec.ExitCode()
		}
	}
	// Output that did not reach its reader is no answer, whatever the
	// command made of it: a "valid" lost to a full disk must not pass a
	// script's test as exit 0, nor a verdict lost with it as a "no".
	// A code of the command's own above 1 (a usage mistake, the demo's
	// 141 for a reader gone) says more and stays.
	if out.err != nil && code <= 1 {
		if err != nil && errors.Is(err, out.err) {
			msg = "" // the command's error is the failed write: said once, below
		}
		if msg != "" {
			fmt.Fprintf(stderr, "skybridge: %s\n", printableLines(msg))
		}
		fmt.Fprintf(stderr, "skybridge: write standard output: %v: the output is cut short, and what the command changed (an identity issued, a burst opened) stays changed: look before running it again; a command that only reads can be run again with standard output where it can be written\n", writeCause(out.err))
		return 2
	}
	if msg != "" {
		fmt.Fprintf(stderr, "skybridge: %s\n", printableLines(msg)) // it may quote a gateway's answer
	}
	return code
}

// rememberWriter is standard output that keeps its first failed write:
// most commands print line by line and do not look at each result, and
// run turns the failure into exit 2 for all of them. Once a write has
// failed the rest fail the same way, unwritten, so that what did get
// out is a whole beginning and not lines with a hole between them.
type rememberWriter struct {
	w   io.Writer
	err error
}

func (r *rememberWriter) Write(b []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	n, err := r.w.Write(b)
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		r.err = err
	}
	return n, err
}

// writeCause is a write error without the file's name, /dev/stdout or
// the like, which "write standard output" says better.
func writeCause(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// usageErrors makes every command's flag mistakes (an unknown flag, a
// value that does not parse, a missing required flag) exit 2 with one
// line on stderr, instead of exit 1 with the command's help on stdout —
// where a --json reader would take it for output, and policy check's
// caller for a "deny". urfave/cli prints the help for a missing required
// flag itself, so that check moves into each command's Before; the flags
// are marked not required only once every command has taken note of them,
// since some (--ca, --policy) are shared.
func usageErrors(cmds []*cli.Command, parent string) {
	required := map[cli.Flag]bool{}
	noteRequired(cmds, parent, required)
	for f := range required {
		switch f := f.(type) {
		case *cli.StringFlag:
			f.Required = false
		case *cli.StringSliceFlag:
			f.Required = false
		case *cli.DurationFlag:
			f.Required = false
		default:
			panic(fmt.Sprintf("usageErrors: a required %T flag: add its type", f))
		}
	}
}

func noteRequired(cmds []*cli.Command, parent string, required map[cli.Flag]bool) {
	for _, c := range cmds {
		name := parent + " " + c.Name
		c.OnUsageError = func(_ *cli.Context, err error, _ bool) error {
			return usageError("%v (see %s --help)", err, name)
		}
		var names []string
		for _, f := range c.Flags {
			if r, ok := f.(cli.RequiredFlag); ok && r.IsRequired() || required[f] {
				required[f] = true
				names = append(names, f.Names()[0])
			}
		}
		if len(names) > 0 {
			before := c.Before
			c.Before = func(ctx *cli.Context) error {
				var missing []string
				for _, r := range names {
					if !ctx.IsSet(r) {
						missing = append(missing, "--"+r)
					}
				}
				if len(missing) > 0 {
					return usageError("missing %s (see %s --help)", strings.Join(missing, ", "), name)
				}
				if err := givenEmpty(ctx, names...); err != nil {
					return err
				}
				if before != nil {
					return before(ctx)
				}
				return nil
			}
		}
		if c.Action != nil {
			checkArgs(c, name)
		}
		noteRequired(c.Subcommands, name, required)
	}
}

// givenEmpty refuses those of the string flags names that were given an
// empty value (a slice flag, one of its values): a required one would
// pass as given, and one with a default or a meaning when left out
// would silently take it, as from an unset variable (--out "$OUT").
// Other kinds of flags are let be: their own parsing refuses "".
func givenEmpty(ctx *cli.Context, names ...string) error {
	var empty []string
	for _, f := range ctx.Command.Flags {
		n := f.Names()[0]
		if !slices.Contains(names, n) || !ctx.IsSet(n) {
			continue
		}
		var vals []string
		switch f.(type) {
		case *cli.StringFlag:
			vals = []string{ctx.String(n)}
		case *cli.StringSliceFlag:
			vals = ctx.StringSlice(n)
		}
		if slices.ContainsFunc(vals, func(v string) bool { return strings.TrimSpace(v) == "" }) {
			empty = append(empty, "--"+n)
		}
	}
	if len(empty) > 0 {
		return usageError("%s given empty (see %s --help)", strings.Join(empty, ", "), ctx.Command.HelpName)
	}
	return nil
}

// checkArgs refuses more positional arguments than the command declares
// in its ArgsUsage: a word no command reads, such as a second test file,
// would otherwise be dropped without a word, and a CI gate pass on the
// first file alone. ArgsUsage names one word per argument; a word ending
// in "..." takes any number. Each command checks for missing arguments
// itself, with its own hint.
func checkArgs(c *cli.Command, name string) {
	words := strings.Fields(c.ArgsUsage)
	most := len(words)
	for _, w := range words {
		if strings.Contains(w, "...") {
			return
		}
	}
	before := c.Before
	c.Before = func(ctx *cli.Context) error {
		if args := ctx.Args().Slice(); len(args) > most {
			extra := fmt.Sprintf("%q", args[most:])
			extra = "argument " + extra[1:len(extra)-1]
			if len(args)-most > 1 {
				extra = "arguments " + extra[len("argument "):]
			}
			if most == 0 {
				return usageError("unexpected %s: %s takes none (see %s --help)", extra, name, name)
			}
			return usageError("unexpected %s: %s takes only %s (see %s --help)", extra, name, c.ArgsUsage, name)
		}
		if before != nil {
			return before(ctx)
		}
		return nil
	}
}

func newApp(stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:                 "skybridge",
		Usage:                "secure bridge between datacenters and cloud regions",
		Description:          "Gateways in every rack and region gossip, admit each other by certificate, build a WireGuard mesh,\nand move VM images between sites only where the data-residency policy allows.",
		Version:              buildVersion(),
		EnableBashCompletion: true,
		// Repeat a flag to give several values; a comma is data (a label
		// listing data classes), not a separator.
		DisableSliceFlagSeparator: true,
		Writer:                    stdout,
		ErrWriter:                 stderr,
		// Errors are printed once, by run, with the exit code they carry.
		ExitErrHandler: func(*cli.Context, error) {},
		// Their variables are read in Before, not by the flags, so that an
		// error names where the bad value came from.
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Usage: "debug, info, warn or error (default: $SKYBRIDGE_LOG_LEVEL, else info)"},
			&cli.StringFlag{Name: "log-format", Usage: "text or json (default: $SKYBRIDGE_LOG_FORMAT, else text)"},
		},
		Before: func(c *cli.Context) error {
			log, err := newLogger(stderr, setting(c, "log-level", "SKYBRIDGE_LOG_LEVEL", "info"), setting(c, "log-format", "SKYBRIDGE_LOG_FORMAT", "text"))
			if err != nil {
				// Help needs no logger: a bad variable in the
				// environment must not keep anyone from reading it.
				if helpWanted(c) {
					return nil
				}
				return err
			}
			slog.SetDefault(log)
			return nil
		},
		Commands: []*cli.Command{
			demoCommand(),
			caCommand(),
			identityCommand(),
			policyCommand(),
			gatewayCommand(),
			statusCommand(),
			graphCommand(),
			dashboardCommand(),
			planCommand(),
			burstCommand(),
			keysCommand(),
			migrateCommand(),
			auditCommand(),
			completionCommand(),
		},
	}
}

// source is a setting's value and where it came from, for errors.
type source struct{ value, from string }

// setting is the value of a global flag: from the command line, else
// from its variable, else def.
func setting(c *cli.Context, flag, env, def string) source {
	if c.IsSet(flag) {
		return source{c.String(flag), "--" + flag}
	}
	if v := os.Getenv(env); v != "" {
		return source{v, env}
	}
	return source{def, "--" + flag}
}

// helpWanted reports whether the command line asks for help: -h, --help
// or the help command, at any level. (interspersed puts a "--" before the
// words after the flags; a help command may be among them.) A flag's value
// "help" counts too: then a bad logging setting is let pass, no worse.
func helpWanted(c *cli.Context) bool {
	var words []string
	flags := true
	for _, a := range c.Args().Slice() {
		switch {
		case a == "--":
			flags = false
		case flags && (a == "-h" || a == "--help" || a == "-help"):
			return true
		case flags && strings.HasPrefix(a, "-"):
		case (a == "help" || a == "h") && isCommandPath(c.App.Commands, words):
			return true
		default:
			words = append(words, a)
		}
	}
	return false
}

// isCommandPath reports whether words are command names, each a
// sub-command of the one before: what may come before a help command.
func isCommandPath(cmds []*cli.Command, words []string) bool {
	for _, w := range words {
		var next *cli.Command
		for _, c := range cmds {
			if c.HasName(w) {
				next = c
			}
		}
		if next == nil {
			return false
		}
		cmds = next.Subcommands
	}
	return true
}

func newLogger(w io.Writer, level, format source) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level.value)); err != nil {
		return nil, usageError("%s %q: use debug, info, warn or error", level.from, level.value)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch strings.ToLower(format.value) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usageError("%s %q: use text or json", format.from, format.value)
}

func buildVersion() string {
	if version != "" {
		return version
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := info.Main.Version
	for _, s := range info.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += " (" + s.Value[:12] + ")"
		}
	}
	return v
}
