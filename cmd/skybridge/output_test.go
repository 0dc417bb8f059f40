package main

import (
	"bytes"
	"strings"
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
