package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode"
	"unicode/utf8"

	"github.com/urfave/cli/v2"
)

// jsonFlag is the --json flag every command that prints a table takes.
var jsonFlag = &cli.BoolFlag{Name: "json", Usage: "print machine-readable JSON instead of a table"}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printTable prints rows under an upper-case header, aligned in columns.
// Cells are made printable: they hold names and reasons from other
// gateways.
func printTable(w io.Writer, header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.ToUpper(strings.Join(header, "\t")))
	cells := []string{}
	for _, r := range rows {
		cells = cells[:0]
		for _, c := range r {
			cells = append(cells, printable(c))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// printableLines is printable for text of several lines (an error whose
// message quotes a gateway's answer): its line breaks stay.
func printableLines(s string) string {
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		lines[i] = printable(l)
	}
	return strings.Join(lines, "\n")
}

// printable escapes what a terminal would act on rather than show:
// control characters (escape sequences can move the cursor, rewrite
// lines, retitle the window or set the clipboard), invisible formatting
// such as bidirectional overrides, and bytes that are not UTF-8. Text
// from other gateways (a refused stranger's name, an image name a sender
// chose, a reason quoting them) goes through it before it is printed.
func printable(s string) string {
	clean := true
	for _, r := range s {
		if r == utf8.RuneError || !unicode.IsGraphic(r) || unicode.Is(unicode.Cf, r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i, r := range s {
		switch {
		case r == utf8.RuneError && !strings.HasPrefix(s[i:], "\uFFFD"):
			fmt.Fprintf(&b, "\\x%02x", s[i])
		case r > 0xffff && (!unicode.IsGraphic(r) || unicode.Is(unicode.Cf, r)):
			fmt.Fprintf(&b, "\\U%08x", r) // as Go writes it: a fifth digit would be read as text
		case r == utf8.RuneError || !unicode.IsGraphic(r) || unicode.Is(unicode.Cf, r):
			fmt.Fprintf(&b, "\\u%04x", r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// unprintable undoes printable for a name, which holds no backslash of
// its own (migrate.CheckStoredName): what `migrate list` showed is what
// `migrate remove` takes.
func unprintable(s string) (string, error) {
	var b strings.Builder
	for {
		i := strings.IndexByte(s, '\\')
		if i < 0 {
			b.WriteString(s)
			return b.String(), nil
		}
		b.WriteString(s[:i])
		s = s[i+1:]
		digits := 0
		if s != "" {
			digits = map[byte]int{'x': 2, 'u': 4, 'U': 8}[s[0]]
		}
		n, err := uint64(0), strconv.ErrSyntax
		if digits > 0 && len(s) > digits {
			n, err = strconv.ParseUint(s[1:1+digits], 16, 32)
		}
		if err != nil || digits > 2 && !utf8.ValidRune(rune(n)) {
			return "", fmt.Errorf("%q is not an escape as `skybridge migrate list` prints them (\\u001b, \\U000e0001, \\xff)", `\`+s[:min(len(s), 1+digits)])
		}
		if digits == 2 {
			b.WriteByte(byte(n))
		} else {
			b.WriteRune(rune(n))
		}
		s = s[1+digits:]
	}
}

// usageError is a mistake on the command line: exit code 2, like flag
// parsing errors, so scripts can tell it from a failed operation.
func usageError(format string, args ...any) error {
	return cli.Exit(fmt.Sprintf(format, args...), 2)
}

// printJSONLine prints v as one line of JSON (NDJSON streams).
func printJSONLine(w io.Writer, v any) error { return json.NewEncoder(w).Encode(v) }
