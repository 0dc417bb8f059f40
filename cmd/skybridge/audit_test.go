package main

import (
	"bytes"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
)

// TestAuditVerifyNoWholeRecord: input without a newline (a log whose
// line ends were turned to CR, any other file) is not a log with nothing
// recorded yet: it holds no whole record, which is said with what its
// bytes look like, exit 1; bytes without a newline are noted whatever
// the verdict.
func TestAuditVerifyNoWholeRecord(t *testing.T) {
	dir := t.TempDir()
	ca, id := auditSigner(t, dir)
	log := filepath.Join(dir, "gw", "audit.log")
	os.Mkdir(filepath.Dir(log), 0o700)
	for i := range 3 {
		if _, err := audit.Open(log).Append(id, "migration", map[string]any{"n": i}, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := os.ReadFile(log)
	const note = "note: the log ends in bytes without a newline"
	for name, tc := range map[string]struct {
		content []byte
		want    string
	}{
		"line ends turned to CR": {bytes.ReplaceAll(b, []byte("\n"), []byte("\r")), "lines end in CR"},
		"another file":           {[]byte("PK\x03\x04 not a log"), `not an audit log: it begins "PK\x03\x04 not a log"`},
		"a first record cut":     {b[:40], "part of a record"},
	} {
		copied := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".log") // without a head
		os.WriteFile(copied, tc.content, 0o600)
		out, _, code := runCLI(t, "audit", "verify", "--log", copied, "--ca-cert", filepath.Join(ca, "ca.crt"))
		if code != 1 || !strings.Contains(out, "INVALID after 0 good records: it holds no whole record") || !strings.Contains(out, tc.want) || !strings.Contains(out, note) {
			t.Errorf("%s: exit %d, %q; want 1, no whole record, %q, and the note", name, code, out, tc.want)
		}
		if out, _, code := runCLI(t, "audit", "verify", "--json", "--log", copied, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 1 || !strings.Contains(out, `"valid": false`) {
			t.Errorf("%s, --json: exit %d, %q", name, code, out)
		}
	}
	// A last record that only lost its newline is counted, and noted:
	// the gateway keeps it.
	os.WriteFile(log, b[:len(b)-1], 0o600)
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 0 || !strings.Contains(out, "3 records of gw1") || !strings.Contains(out, "note: the last record lost its newline") || strings.Contains(out, note) {
		t.Errorf("a log whose last record lost its newline: exit %d, %q", code, out)
	}
	// After whole records, the note stands beside any verdict.
	os.WriteFile(log, append(b, `{"seq":4,"ti`...), 0o600)
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 0 || !strings.Contains(out, "3 records of gw1") || !strings.Contains(out, note) {
		t.Errorf("a log ending in an append cut short: exit %d, %q", code, out)
	}
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt"), "--node", "gw2"); code != 1 || !strings.Contains(out, "INVALID") || !strings.Contains(out, note) {
		t.Errorf("another gateway's log ending in an append cut short: exit %d, %q", code, out)
	}
}

// TestAuditVerifyUnreadable: a log or head that cannot be read says
// nothing of whether the log is intact: exit 2, as the usage says, not
// the 1 of a log found broken.
func TestAuditVerifyUnreadable(t *testing.T) {
	dir := t.TempDir()
	ca, id := auditSigner(t, dir)
	log := filepath.Join(dir, "audit.log")
	if _, err := audit.Open(log).Append(id, "migration", nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	verify := func(what, log string) {
		t.Helper()
		out, errs, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt"))
		if code != 2 || strings.Contains(out, "INVALID") || !strings.Contains(errs, "could not be") {
			t.Errorf("%s: exit %d, %q %q; want 2, saying it could not be read", what, code, out, errs)
		}
	}
	os.WriteFile(log+".head", []byte("{damaged"), 0o600)
	verify("a damaged head", log)
	// Not the gateway's advice, to run this very command.
	if _, errs, _ := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt")); strings.Contains(errs, "audit verify") || !strings.Contains(errs, "audit.log.head is damaged") || !strings.Contains(errs, "move the head aside") {
		t.Errorf("a damaged head: %q; want what to do, not to run audit verify", errs)
	}
	os.Remove(log + ".head")
	os.Mkdir(log+".head", 0o700)
	verify("a head that cannot be read", log)
	// A read error (EIO), where the system gives one.
	if _, err := os.ReadFile("/proc/self/mem"); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, fs.ErrPermission) {
		verify("a log that cannot be read", "/proc/self/mem")
	}
}

// auditSigner makes a CA in dir/ca with `ca init` and returns its
// directory and an identity of gw1 it issued, to sign audit records.
func auditSigner(t *testing.T, dir string) (string, *certs.NodeIdentity) {
	t.Helper()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	c, err := certs.OpenCA(ca)
	if err != nil {
		t.Fatal(err)
	}
	id, err := c.IssueIdentity(certs.Attributes{Node: "gw1", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.MustParseAddr("100.96.0.1")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return ca, id
}
