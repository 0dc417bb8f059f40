package main

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestPrintable: what a terminal would act on is shown escaped, the rest
// as it is. Tables print names and reasons from other gateways.
func TestPrintable(t *testing.T) {
	for in, want := range map[string]string{
		"gw-zrh-1":                 "gw-zrh-1",
		"Zürich, 東京":               "Zürich, 東京",
		"\x1b[1A\x1b[2Kgw-fake":    `\u001b[1A\u001b[2Kgw-fake`,
		"\x1b]52;c;cHduZWQ=\a":     `\u001b]52;c;cHduZWQ=\u0007`,
		"img\u202egpj.exe":         `img\u202egpj.exe`,
		"line\rover":               `line\u000dover`,
		"two\nlines\tand a tab":    `two\u000alines\u0009and a tab`,
		"bad \xff byte":            `bad \xff byte`,
		"\u009b31m (a C1 control)": `\u009b31m (a C1 control)`,
	} {
		if got := printable(in); got != want {
			t.Errorf("printable(%q) = %q, want %q", in, got, want)
		}
	}
	var b bytes.Buffer
	printTable(&b, []string{"node", "reason"}, [][]string{{"\x1b[2Kop9", "refused \x1b]0;x\a"}})
	if strings.ContainsAny(b.String(), "\x1b\a") {
		t.Fatalf("a table printed control characters: %q", b.String())
	}
}

// TestUnprintable: what printable shows of a name is what a command
// takes back as that name; a backslash that is no such escape is refused.
func TestUnprintable(t *testing.T) {
	for _, name := range []string{"vm-1", "vm\x1b[2K", "bad \xff byte", "img\u202egpj", "tag\U000e0001x", "\ufffd literal", "Zürich", "\x9b31m"} {
		shown := printable(name)
		got, err := unprintable(shown)
		if err != nil || got != name {
			t.Errorf("unprintable(printable(%q) = %q) = %q, %v; want the name back", name, shown, got, err)
		}
	}
	if got := printable("tag\U000e0001x"); got != `tag\U000e0001x` {
		t.Errorf("a character past U+FFFF shows as %q, want Go's \\U form, whose length is fixed", got)
	}
	for _, bad := range []string{`vm\`, `vm\n`, `vm\u00`, `vm\uzzzz`, `vm\ud800`, `vm\U00110000`, `vm\x1`} {
		if got, err := unprintable(bad); err == nil {
			t.Errorf("unprintable(%q) = %q, want an error", bad, got)
		}
	}
}

// TestErrorsPrintable: an error is printed escaped, its lines kept: it
// may quote a gateway's answer, or a name from another gateway.
func TestErrorsPrintable(t *testing.T) {
	missing := t.TempDir() + "/a\x1b]0;x\ab.hcl"
	_, errs, code := runCLI(t, "status", "--config", missing)
	if code == 0 || strings.ContainsAny(errs, "\x1b\a") || !strings.Contains(errs, `a\u001b]0;x\u0007b.hcl`) {
		t.Fatalf("exit %d, %q: want the error with its control characters escaped", code, errs)
	}
	if got := printableLines("one\n\x1b[2Ktwo"); got != "one\n\\u001b[2Ktwo" {
		t.Fatalf("printableLines = %q", got)
	}
}

// fullWriter is standard output on a full disk.
type fullWriter struct{}

func (fullWriter) Write([]byte) (int, error) {
	return 0, &fs.PathError{Op: "write", Path: "/dev/stdout", Err: syscall.ENOSPC}
}

// TestStdoutWriteFailure: output lost on its way out is no answer: every
// command exits 2 and says so, a verdict's 0 or 1 included, while a usage
// mistake keeps its own message.
func TestStdoutWriteFailure(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	log := filepath.Join(dir, "audit.log")
	os.WriteFile(log, nil, 0o600)
	check := []string{"policy", "check", "--policy", examplePolicy, "--inventory", exampleInventory, "--at", beforeExpiry, "--action", "store", "--class"}
	for _, args := range [][]string{
		append(check, "pii-eu", "--site", "aws-eu-central-1"),            // allowed
		append(check, "swiss-banking-secret", "--site", "aws-us-east-1"), // denied
		{"policy", "lint", "--policy", examplePolicy},
		{"policy", "test", exampleTests},
		{"audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt")},
		{"audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt"), "--json"},
		{"ca", "crl", "--ca", ca},
		{"ca", "crl", "--ca", ca, "--json"},
		{"--help"},
	} {
		var errb bytes.Buffer
		code := run(append([]string{"skybridge"}, args...), fullWriter{}, &errb)
		errs := errb.String()
		if code != 2 || strings.Count(errs, "write standard output: no space left on device") != 1 || strings.Count(errs, "no space left") != 1 {
			t.Errorf("%v to a full disk: exit %d, %q; want 2, saying once that standard output could not be written", args, code, errs)
		}
	}
	var errb bytes.Buffer
	if code := run([]string{"skybridge", "policy", "check", "--policy", examplePolicy}, fullWriter{}, &errb); code != 2 || !strings.Contains(errb.String(), "missing --class") {
		t.Errorf("a usage mistake to a full disk: exit %d, %q", code, errb.String())
	}
}
