package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/internal/demo"
)

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "run the whole product on this machine: three sites, a WireGuard mesh, a verified migration, a refusal by policy",
		Description: "As root the sites are network namespaces with TUN devices; otherwise unprivileged netstack gateways on loopback.\n" +
			"Everything it creates is removed at the end, on failure and on Ctrl-C, unless --keep.",
		UsageText: "skybridge demo [--keep] [--json] [--mode auto|netns|netstack]\n   skybridge demo --down DIR   (stop a demo left running with --keep)",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "keep", Usage: "leave the mesh running and print how to poke at it"},
			&cli.StringFlag{Name: "mode", Value: demo.ModeAuto, Usage: "auto (namespaces as root, else netstack), netns or netstack"},
			&cli.StringFlag{Name: "down", Usage: "tear down the kept demo in this directory"},
			jsonFlag,
		},
		Action: func(c *cli.Context) error {
			if c.IsSet("down") && strings.TrimSpace(c.String("down")) == "" {
				return usageError("--down is empty: give the directory the kept demo printed (skybridge demo --down DIR)")
			}
			if d := c.String("down"); d != "" {
				for _, f := range []string{"keep", "mode", "json"} {
					if c.IsSet(f) {
						return usageError("--down stops a kept demo; --%s is for starting one", f)
					}
				}
				skipped, err := demo.Down(d)
				for _, s := range skipped {
					fmt.Fprintf(c.App.ErrWriter, "skybridge: left alone %s\n", s)
				}
				if err != nil {
					return fmt.Errorf("tear down the demo in %s: %w", d, err)
				}
				if len(skipped) > 0 {
					fmt.Fprintf(c.App.Writer, "demo in %s stopped and removed, but for what was not its own (above)\n", d)
					return nil
				}
				fmt.Fprintf(c.App.Writer, "demo in %s stopped and removed\n", d)
				return nil
			}
			switch m := c.String("mode"); m {
			case demo.ModeAuto, demo.ModeNetns, demo.ModeNetstack:
			default:
				return usageError("--mode %q: use auto, netns or netstack", m)
			}
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			// SIGHUP too: a closed terminal or ssh session would otherwise
			// leave the gateways (process groups of their own) and the
			// namespaces behind. The signal is kept for the exit status,
			// 128 + its number, as a shell reports it. They are caught
			// until the end, not only until the first: a second Ctrl-C
			// while the demo cleans up must not stop the cleanup.
			ctx, cancel := context.WithCancelCause(c.Context)
			defer cancel(nil)
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
			defer signal.Stop(sigs)
			go func() {
				select {
				case s := <-sigs:
					cancel(interrupted{s.(syscall.Signal)})
				case <-ctx.Done():
				}
			}()
			// Output piped into a reader that has gone (`| head`) killed
			// the demo with SIGPIPE at its next line, leaving everything
			// behind: ignored, the write fails instead, and a failed write
			// of its own output stops it as SIGPIPE would have, cleanly.
			signal.Ignore(syscall.SIGPIPE)
			defer signal.Reset(syscall.SIGPIPE)
			gone := func() { cancel(interrupted{syscall.SIGPIPE}) }
			opt := demo.Options{Mode: c.String("mode"), Keep: c.Bool("keep"), Exe: exe}
			if !c.Bool("json") {
				// The bar's writer stays the file: the bar draws itself
				// in place only on a terminal, which it tells by that.
				opt.Out, opt.Bars = pipeWatch{c.App.Writer, gone}, c.App.ErrWriter
			}
			sum, err := demo.Run(ctx, opt)
			// Interrupted only if the signal stopped the steps, which
			// Run's error says: one that came while it cleaned up after
			// a failure (a Ctrl-C as it waits for the gateways to stop)
			// did not end the run, and the failure is what to report.
			var sig interrupted
			stopped := errors.Is(err, context.Canceled) && errors.As(context.Cause(ctx), &sig)
			if c.Bool("json") {
				if sum == nil { // it failed before it had a directory
					sum = &demo.Summary{Mode: c.String("mode"), Error: err.Error()}
				}
				if perr := printJSON(pipeWatch{c.App.Writer, gone}, sum); perr != nil && err == nil {
					err = perr
					if errors.Is(perr, syscall.EPIPE) {
						sig, stopped = interrupted{syscall.SIGPIPE}, true
					}
				}
			}
			if err == nil {
				return nil
			}
			what, code := "demo failed", 1
			if stopped {
				what, code = "demo interrupted ("+sig.String()+")", 128+int(sig.Signal)
			}
			if sum != nil && sum.CleanedUp {
				what += " (everything it created was removed)"
			}
			return cli.Exit(fmt.Sprintf("%s: %v", what, err), code)
		},
	}
}

// interrupted is the cause of a demo stopped by a signal, or by its
// output's reader going (as SIGPIPE).
type interrupted struct{ syscall.Signal }

func (i interrupted) Error() string { return "interrupted: " + i.String() }

// pipeWatch is w, calling gone when a write finds its reader gone.
type pipeWatch struct {
	w    io.Writer
	gone func()
}

func (p pipeWatch) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	if errors.Is(err, syscall.EPIPE) {
		p.gone()
	}
	return n, err
}
