package main

import (
	"slices"
	"strings"

	"github.com/urfave/cli/v2"
)

// interspersed lets flags follow positional arguments, as in
// `skybridge migrate run vm.qcow2 --to aws-eu-central-1 --class pii-eu`:
// urfave/cli v2 stops parsing flags at the first argument, so the
// arguments after the command words are reordered, flags (with their
// values) first, positionals last. "--" ends flag parsing as usual. The
// global flags (--log-level, --log-format) are taken after the command
// words too, as in `skybridge status --config g.hcl --log-level debug`,
// and moved before them, where urfave/cli looks for them.
//
// It also names a flag that takes one value but was given more than once
// ("" if none): urfave/cli would keep the last silently, and a verdict
// command given two --ca-cert would judge by one of them.
func interspersed(app *cli.App, args []string) ([]string, string) {
	if len(args) < 2 {
		return args, ""
	}
	if app.EnableBashCompletion && args[len(args)-1] == completionFlag {
		// TAB runs the words typed so far with the completion flag last,
		// and urfave/cli completes rather than runs only if it finds
		// the flag last with no "--" before it. Reordered, the flag
		// would not be last, or a flag wanting a value would take it,
		// and the command would run: TAB after `migrate remove vm1
		// --reason` removed vm1. So the words go as typed, up to a "--"
		// if one was typed.
		if i := slices.Index(args, "--"); i >= 0 {
			args = append(args[:i:i], completionFlag)
		}
		return args, ""
	}
	out := []string{args[0]}
	rest := args[1:]
	cmds := app.Commands
	flags := app.Flags
	var before []string // global flags, and their values, before the command
	top := true
	// Walk global flags and command words.
	for len(rest) > 0 {
		a := rest[0]
		if strings.HasPrefix(a, "-") {
			n := len(out)
			out = append(out, a)
			rest = rest[1:]
			if takesValue(flags, a) && len(rest) > 0 {
				out = append(out, rest[0])
				rest = rest[1:]
			}
			if top {
				before = append(before, out[n:]...)
			}
			continue
		}
		var next *cli.Command
		for _, c := range cmds {
			if c.HasName(a) {
				next = c
			}
		}
		if next == nil {
			break
		}
		out = append(out, a)
		rest = rest[1:]
		top = false
		cmds, flags = next.Subcommands, next.Flags
		if len(cmds) == 0 {
			break
		}
	}
	var global, fl, pos []string
	for len(rest) > 0 {
		a := rest[0]
		rest = rest[1:]
		switch {
		case a == "--":
			pos = append(pos, rest...)
			rest = nil
		case strings.HasPrefix(a, "-") && len(a) > 1 && !names(flags, a) && names(app.Flags, a):
			global = append(global, a)
			if takesValue(app.Flags, a) {
				if len(rest) == 0 {
					// Moved before the command words, it would take
					// the first for its value. Alone after the
					// program's name, urfave/cli refuses it.
					return []string{args[0], a}, ""
				}
				global = append(global, rest[0])
				rest = rest[1:]
			}
		case strings.HasPrefix(a, "-") && len(a) > 1:
			fl = append(fl, a)
			if takesValue(flags, a) {
				if len(rest) == 0 {
					// Given last without its value, it would take the
					// "--" put before the arguments, and the command
					// run with it (migrate remove vm1 --reason removed
					// vm1 for the reason "--"). Last with nothing after
					// it, urfave/cli refuses it, a usage error; the
					// arguments are left out, the command not running.
					return append(append(append(out[:1:1], global...), out[1:]...), fl...), ""
				}
				fl = append(fl, rest[0])
				rest = rest[1:]
			}
		default:
			pos = append(pos, a)
		}
	}
	out = append(out[:1], append(global, out[1:]...)...)
	out = append(out, fl...)
	if len(pos) > 0 {
		out = append(out, "--")
		out = append(out, pos...)
	}
	// A call for help, wherever its flag stands, is never refused.
	help := func(t string) bool { return t == "-h" || t == "--help" }
	if slices.ContainsFunc(fl, help) || slices.ContainsFunc(global, help) || slices.ContainsFunc(before, help) {
		return out, ""
	}
	rep := repeated(flags, fl)
	if rep == "" {
		rep = repeated(app.Flags, append(before, global...))
	}
	return out, rep
}

// completionFlag is what the completion script puts after the words typed
// (cmd_completion.go).
var completionFlag = "--" + cli.BashCompletionFlag.Names()[0]

// repeated names the first flag among toks (flags and their values) that
// takes a single value and is given more than once. Booleans may repeat
// (to no effect), lists are made to.
func repeated(flags []cli.Flag, toks []string) string {
	seen := map[cli.Flag]bool{}
	for i := 0; i < len(toks); i++ {
		tok := toks[i]
		if !strings.HasPrefix(tok, "-") {
			continue // a value
		}
		if takesValue(flags, tok) {
			i++ // its value, whatever it looks like
		}
		name, _, _ := strings.Cut(strings.TrimLeft(tok, "-"), "=")
		for _, f := range flags {
			if !slices.Contains(f.Names(), name) {
				continue
			}
			switch f.(type) {
			case *cli.BoolFlag, *cli.StringSliceFlag, *cli.IntSliceFlag, *cli.Int64SliceFlag, *cli.UintSliceFlag, *cli.Uint64SliceFlag, *cli.Float64SliceFlag:
				continue
			}
			if seen[f] {
				return f.Names()[0]
			}
			seen[f] = true
		}
	}
	return ""
}

// names reports whether the flag token is one of flags.
func names(flags []cli.Flag, tok string) bool {
	name, _, _ := strings.Cut(strings.TrimLeft(tok, "-"), "=")
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				return true
			}
		}
	}
	return false
}

// takesValue reports whether the flag token needs the next argument as its
// value (not for booleans, nor for --flag=value).
func takesValue(flags []cli.Flag, tok string) bool {
	if strings.Contains(tok, "=") {
		return false
	}
	name := strings.TrimLeft(tok, "-")
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				_, isBool := f.(*cli.BoolFlag)
				return !isBool
			}
		}
	}
	return false
}
