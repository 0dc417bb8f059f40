package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
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
			// namespaces behind; and SIGPIPE, which would kill the demo
			// outright at its next line when its output is piped into a
			// reader that has gone (`| head`). The signal is kept for the
			// exit status, 128 + its number, as a shell reports it.
			ctx, cancel := context.WithCancel(c.Context)
			defer cancel()
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGPIPE)
			defer signal.Stop(sigs)
			var caught atomic.Value // syscall.Signal
			go func() {
				select {
				case s := <-sigs:
					caught.Store(s)
					cancel()
				case <-ctx.Done():
				}
			}()
			opt := demo.Options{Mode: c.String("mode"), Keep: c.Bool("keep"), Exe: exe}
			if !c.Bool("json") {
				opt.Out, opt.Bars = c.App.Writer, c.App.ErrWriter
			}
			sum, err := demo.Run(ctx, opt)
			if c.Bool("json") {
				if sum == nil { // it failed before it had a directory
					sum = &demo.Summary{Mode: c.String("mode"), Error: err.Error()}
				}
				if perr := printJSON(c.App.Writer, sum); perr != nil && err == nil {
					return perr
				}
			}
			if err == nil {
				return nil
			}
			what, code := "demo failed", 1
			if s, ok := caught.Load().(syscall.Signal); ok {
				what, code = "demo interrupted ("+s.String()+")", 128+int(s)
			}
			if sum != nil && sum.CleanedUp {
				what += " (everything it created was removed)"
			}
			return cli.Exit(fmt.Sprintf("%s: %v", what, err), code)
		},
	}
}
