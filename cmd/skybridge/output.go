package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

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
func printTable(w io.Writer, header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.ToUpper(strings.Join(header, "\t")))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// usageError is a mistake on the command line: exit code 2, like flag
// parsing errors, so scripts can tell it from a failed operation.
func usageError(format string, args ...any) error {
	return cli.Exit(fmt.Sprintf(format, args...), 2)
}

// printJSONLine prints v as one line of JSON (NDJSON streams).
func printJSONLine(w io.Writer, v any) error { return json.NewEncoder(w).Encode(v) }
