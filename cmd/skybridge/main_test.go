package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/mesh"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// TestMain doubles as a stand-in process for tests that need one with a
// given command line: with SKYBRIDGE_TEST_IDLE set, or run as a gateway
// (a demo's, which starts its gateways with an environment of its own), it
// waits for SIGTERM, or two minutes, and exits. go test never runs it
// with a command.
func TestMain(m *testing.M) {
	if os.Getenv("SKYBRIDGE_TEST_MAIN") != "" {
		main() // the real command (realProcess)
	}
	if os.Getenv("SKYBRIDGE_TEST_IDLE") != "" || len(os.Args) > 1 && os.Args[1] == "gateway" {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM)
		select {
		case <-sig:
		case <-time.After(2 * time.Minute):
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// idleProcess starts the test binary idling with the given arguments, and
// returns it and a channel closed when it has exited.
func idleProcess(t *testing.T, args ...string) (*exec.Cmd, chan struct{}) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "SKYBRIDGE_TEST_IDLE=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	return cmd, done
}

// runCLI runs the command line in-process and returns stdout, stderr and the
// exit code.
func runCLI(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(append([]string{"skybridge"}, args...), &out, &errb)
	return out.String(), errb.String(), code
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, code := runCLI(t, args...)
	if code != 0 {
		t.Fatalf("skybridge %s: exit %d\n%s", strings.Join(args, " "), code, errs)
	}
	return out
}

func issueArgs(ca, out, node, overlay string, extra ...string) []string {
	return append([]string{"ca", "issue", "--ca", ca, "--node", node, "--site", "onprem-zrh", "--region", "zrh-dc1",
		"--provider", "onprem", "--jurisdiction", "CH", "--overlay-ip", overlay, "--out", out}, extra...)
}

// withFlag is args with flag set to value: in its place if args gives it
// (a flag of one value may be given once), else added.
func withFlag(args []string, flag, value string) []string {
	out := slices.Clone(args)
	if i := slices.Index(out, flag); i >= 0 && i+1 < len(out) {
		out[i+1] = value
		return out
	}
	return append(out, flag, value)
}

func TestVersionAndHelp(t *testing.T) {
	out := mustRun(t, "--version")
	if !strings.HasPrefix(out, "skybridge version ") {
		t.Fatalf("--version printed %q", out)
	}
	out = mustRun(t, "help")
	for _, want := range []string{"ca", "identity", "--log-format"} {
		if !strings.Contains(out, want) {
			t.Errorf("help lacks %q", want)
		}
	}
	// Bad logging settings are usage mistakes, named where they came
	// from; one in the environment does not keep anyone from help.
	for _, tt := range []struct {
		env, args []string
		want      string
	}{
		{nil, []string{"--log-format", "xml", "ca", "list", "--ca", t.TempDir()}, `--log-format "xml": use text or json`},
		{nil, []string{"--log-level", "bogus", "ca", "list", "--ca", t.TempDir()}, `--log-level "bogus": use debug, info, warn or error`},
		{[]string{"SKYBRIDGE_LOG_LEVEL", "bogus"}, []string{"ca", "list", "--ca", t.TempDir()}, `SKYBRIDGE_LOG_LEVEL "bogus"`},
		{[]string{"SKYBRIDGE_LOG_FORMAT", "xml"}, []string{"ca", "list", "--ca", t.TempDir()}, `SKYBRIDGE_LOG_FORMAT "xml"`},
	} {
		t.Run(strings.Join(append(tt.env, tt.args[:2]...), " "), func(t *testing.T) {
			if tt.env != nil {
				t.Setenv(tt.env[0], tt.env[1])
			}
			if _, errs, code := runCLI(t, tt.args...); code != 2 || !strings.Contains(errs, tt.want) {
				t.Errorf("exit %d, %q; want exit 2 and %q", code, errs, tt.want)
			}
		})
	}
	t.Run("help with a bad SKYBRIDGE_LOG_LEVEL", func(t *testing.T) {
		t.Setenv("SKYBRIDGE_LOG_LEVEL", "bogus")
		for _, args := range [][]string{{"ca", "--help"}, {"ca", "issue", "-h"}, {"help", "ca"}, {"ca", "help", "issue"}} {
			if out, errs, code := runCLI(t, args...); code != 0 || !strings.Contains(out, "skybridge ca") {
				t.Errorf("%v: exit %d, %q", args, code, errs)
			}
		}
	})
	// The flag beats the variable.
	t.Run("--log-level beats SKYBRIDGE_LOG_LEVEL", func(t *testing.T) {
		t.Setenv("SKYBRIDGE_LOG_LEVEL", "bogus")
		if _, errs, code := runCLI(t, "--log-level", "warn", "ca", "list", "--ca", t.TempDir()); code != 1 || strings.Contains(errs, "bogus") {
			t.Errorf("exit %d, %q", code, errs)
		}
	})
	// Usage mistakes exit 2 with one line on stderr and nothing on stdout
	// (a --json reader would take help for output, and policy check's
	// caller a 1 for "deny").
	for _, args := range [][]string{{"bogus"}, {"ca", "bogus"}, {"policy", "check", "--policy", "p.hcl", "--class", "c", "--action", "store", "--site", "s", "--at", "2020-01-01", "--json"}, {"ca", "list", "--bogus"}, {"policy", "check", "--class", "c", "--json"},
		// Flags several commands share (--ca, --policy) are required in each.
		{"ca", "list"}, {"ca", "revoke", "--serial", "0x1"}, {"policy", "explain", "--class", "x", "--inventory", "y"},
		// An empty value is no value.
		{"ca", "init", "--dir", ""}, {"ca", "list", "--ca", " "},
		{"ca", "revoke", "--ca", t.TempDir(), "--serial", "0x1", "--reason", "bogus"}} {
		if out, errs, code := runCLI(t, args...); code != 2 || out != "" || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit 2, one line on stderr", args, code, out, errs)
		}
	}
	// Shell completion lists the sub-commands. (urfave/cli reads os.Args
	// for completion, so make them look like a real invocation.)
	saved := os.Args
	os.Args = []string{"skybridge", "ca", "--generate-bash-completion"}
	defer func() { os.Args = saved }()
	out = mustRun(t, "ca", "--generate-bash-completion")
	if !strings.Contains(out, "issue") || !strings.Contains(out, "revoke") {
		t.Errorf("completion output %q", out)
	}
	if out := mustRun(t, "completion", "bash"); !strings.Contains(out, "complete -o default -F _skybridge_complete skybridge") {
		t.Errorf("completion script:\n%s", out)
	}
}

func TestCAWorkflow(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	gw := filepath.Join(dir, "gw1")
	mustRun(t, "ca", "init", "--dir", ca)

	// Refuses to overwrite, and leaves the CA as it was.
	key, _ := os.ReadFile(filepath.Join(ca, "ca.key"))
	if _, errs, code := runCLI(t, "ca", "init", "--dir", ca); code == 0 || !strings.Contains(errs, "refusing to overwrite") {
		t.Fatalf("second init: exit %d, %s", code, errs)
	}
	if key2, _ := os.ReadFile(filepath.Join(ca, "ca.key")); !bytes.Equal(key, key2) {
		t.Fatal("CA key changed")
	}

	out := mustRun(t, issueArgs(ca, gw, "gw1", "100.96.0.1", "--route", "10.1.0.0/16", "--label", "classes=swiss-banking-secret", "--json")...)
	var issued issueOutput
	if err := json.Unmarshal([]byte(out), &issued); err != nil {
		t.Fatalf("issue --json: %v\n%s", err, out)
	}
	if issued.Attributes.Jurisdiction != "CH" || len(issued.Attributes.Routes) != 1 || issued.Serial == "" {
		t.Fatalf("issue --json = %+v", issued)
	}
	for name, mode := range map[string]os.FileMode{"node.key": 0o600, "node.crt": 0o644, "ca.crt": 0o644, "crl.pem": 0o644, "gossip.keyring": 0o600} {
		st, err := os.Stat(filepath.Join(gw, name))
		if err != nil {
			t.Fatalf("issue did not write %s: %v", name, err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s mode %04o, want %04o", name, st.Mode().Perm(), mode)
		}
	}

	var info identityInfo
	out = mustRun(t, "identity", "show", "--dir", gw, "--json")
	if err := json.Unmarshal([]byte(out), &info); err != nil || !info.Accepted || info.Attributes.Node != "gw1" || info.GossipKeys != 1 {
		t.Fatalf("identity show: %+v %v", info, err)
	}
	// A keyring the gateway would refuse (others may read it): not a
	// usable identity directory, whatever the certificate says.
	keyring := filepath.Join(gw, "gossip.keyring")
	os.Chmod(keyring, 0o644)
	if out, _, code := runCLI(t, "identity", "show", "--dir", gw); code != 1 || !strings.Contains(out, "UNUSABLE") || !strings.Contains(out, "chmod 600") {
		t.Fatalf("identity show with a keyring others may read: exit %d\n%s", code, out)
	}
	os.Chmod(keyring, 0o600)
	if info.Unchecked {
		t.Fatal("identity show says revocation was not checked beside the CA's list")
	}
	// Without a list of its CA beside it, it says revocation went
	// unchecked rather than just "accepted".
	os.Rename(filepath.Join(gw, "crl.pem"), filepath.Join(gw, "crl.pem.away"))
	if out := mustRun(t, "identity", "show", "--dir", gw); !strings.Contains(out, "revocation NOT checked") {
		t.Fatalf("identity show without crl.pem:\n%s", out)
	}
	// A list that cannot be read: no verdict (2), said, and not taken
	// for a refusal (1). Nor is a directory without an identity.
	os.WriteFile(filepath.Join(gw, "crl.pem"), []byte("-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n"), 0o644)
	if out, _, code := runCLI(t, "identity", "show", "--dir", gw); code != 2 || !strings.Contains(out, "cannot judge") {
		t.Fatalf("identity show with a damaged crl.pem: exit %d\n%s", code, out)
	}
	if _, errs, code := runCLI(t, "identity", "show", "--dir", t.TempDir()); code != 2 || !strings.Contains(errs, "no node identity") {
		t.Fatalf("identity show of an empty directory: exit %d, %q", code, errs)
	}
	os.Rename(filepath.Join(gw, "crl.pem.away"), filepath.Join(gw, "crl.pem"))

	var list []map[string]any
	if err := json.Unmarshal([]byte(mustRun(t, "ca", "list", "--ca", ca, "--json")), &list); err != nil || len(list) != 1 || list[0]["state"] != "valid" || list[0]["node"] != "gw1" {
		t.Fatalf("ca list --json: %v %v", list, err)
	}
	if out := mustRun(t, "ca", "list", "--ca", ca); !strings.Contains(out, "SERIAL") || !strings.Contains(out, "gw1") {
		t.Fatalf("ca list table:\n%s", out)
	}

	// Revoke by node; the identity is then refused (exit 1) once the new
	// list is next to it.
	mustRun(t, "ca", "revoke", "--ca", ca, "--node", "gw1", "--reason", "keyCompromise")
	crl, _ := os.ReadFile(filepath.Join(ca, "crl.pem"))
	os.WriteFile(filepath.Join(gw, "crl.pem"), crl, 0o644)
	out, _, code := runCLI(t, "identity", "show", "--dir", gw)
	if code != 1 || !strings.Contains(out, "REFUSED") || !strings.Contains(out, "revoked") {
		t.Fatalf("revoked identity: exit %d\n%s", code, out)
	}
	var crlOut crlOutput
	if err := json.Unmarshal([]byte(mustRun(t, "ca", "crl", "--ca", ca, "--json")), &crlOut); err != nil || len(crlOut.Revoked) != 1 || crlOut.Number != "2" {
		t.Fatalf("ca crl: %+v %v", crlOut, err)
	}
	mustRun(t, "ca", "crl", "--ca", ca, "--refresh")
	if err := json.Unmarshal([]byte(mustRun(t, "ca", "crl", "--ca", ca, "--json")), &crlOut); err != nil || crlOut.Number != "3" || len(crlOut.Revoked) != 1 {
		t.Fatalf("ca crl after refresh: %+v %v", crlOut, err)
	}

	// A policy signer renews in place; another signer's directory is
	// refused, and keeps its key.
	sdir := filepath.Join(dir, "signer")
	mustRun(t, "ca", "issue-signer", "--ca", ca, "--name", "compliance", "--out", sdir)
	mustRun(t, "ca", "issue-signer", "--ca", ca, "--name", "compliance", "--out", sdir)
	skey, _ := os.ReadFile(filepath.Join(sdir, "signer.key"))
	if _, errs, code := runCLI(t, "ca", "issue-signer", "--ca", ca, "--name", "treasury", "--out", sdir); code == 0 || !strings.Contains(errs, `already holds policy signer "compliance"`) {
		t.Fatalf("issue-signer into another signer's directory: exit %d, %s", code, errs)
	}
	if skey2, _ := os.ReadFile(filepath.Join(sdir, "signer.key")); !bytes.Equal(skey, skey2) {
		t.Fatal("another signer's key was replaced")
	}
	// ca list tells the signer from a gateway.
	if out := mustRun(t, "ca", "list", "--ca", ca); !strings.Contains(out, "compliance (policy signer)") {
		t.Fatalf("ca list with a policy signer:\n%s", out)
	}
	var listed []certs.IssuedCert
	json.Unmarshal([]byte(mustRun(t, "ca", "list", "--ca", ca, "--json")), &listed)
	i := slices.IndexFunc(listed, func(e certs.IssuedCert) bool { return e.Kind == certs.KindPolicySigner && e.RevokedAt == nil })
	if i < 0 {
		t.Fatalf("ca list --json names no valid policy signer: %+v", listed)
	}
	if out := mustRun(t, "ca", "revoke", "--ca", ca, "--serial", listed[i].Serial, "--reason", "superseded"); !strings.Contains(out, "(policy signer compliance, reason superseded)") {
		t.Fatalf("ca revoke of a policy signer:\n%s", out)
	}
}

// TestCABadInput: every mistake gets an error that says what was wrong,
// and nothing is written.
func TestCABadInput(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca, "--mesh-cidr", "100.96.0.0/16")
	mustRun(t, issueArgs(ca, filepath.Join(dir, "taken"), "gw0", "100.96.0.9")...)
	out := filepath.Join(dir, "out")

	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"missing flags", []string{"ca", "issue", "--ca", ca, "--node", "gw1", "--out", out}, 2, "missing --site, --region, --provider, --jurisdiction, --overlay-ip (see skybridge ca issue --help)"},
		{"unknown flag", append(issueArgs(ca, out, "gw1", "100.96.0.1"), "--colour", "blue"), 2, "flag provided but not defined: -colour (see skybridge ca issue --help)"},
		{"bad duration", append(issueArgs(ca, out, "gw1", "100.96.0.1"), "--ttl", "5"), 2, `invalid value "5" for flag -ttl`},
		{"zero TTL", append(issueArgs(ca, out, "gw1", "100.96.0.1"), "--ttl", "0"), 2, "--ttl 0s: give a positive lifetime, such as 720h0m0s"},
		{"negative TTL", append(issueArgs(ca, out, "gw1", "100.96.0.1"), "--ttl", "-5h"), 2, "--ttl -5h0m0s: give a positive lifetime"},
		{"zero signer TTL", []string{"ca", "issue-signer", "--ca", ca, "--name", "compliance", "--ttl", "0", "--out", out}, 2, "such as 8760h0m0s"},
		{"bad CIDR", issueArgs(ca, out, "gw1", "100.96.0.1", "--route", "10.1.0.0/33"), 2, `route "10.1.0.0/33" is not a CIDR prefix`},
		{"host bits", issueArgs(ca, out, "gw1", "100.96.0.1", "--route", "10.1.2.3/16"), 2, "did you mean 10.1.0.0/16"},
		{"bad overlay IP", issueArgs(ca, out, "gw1", "100.96.0.300"), 2, `--overlay-ip "100.96.0.300" is not an IP address`},
		{"overlay outside mesh", issueArgs(ca, out, "gw1", "10.9.0.1"), 1, "outside the mesh overlay range 100.96.0.0/16"},
		{"route over the mesh", issueArgs(ca, out, "gw1", "100.96.0.1", "--route", "100.96.0.0/24"), 1, "overlaps the mesh overlay range"},
		{"overlay taken", issueArgs(ca, out, "gw1", "100.96.0.9"), 1, `already held by node "gw0"`},
		{"bad label", issueArgs(ca, out, "gw1", "100.96.0.1", "--label", "tier"), 2, `label "tier" is not key=value`},
		{"capacity label not a number", issueArgs(ca, out, "gw1", "100.96.0.1", "--label", "capacity_cpu=abc"), 2, `label capacity_cpu="abc" is not a number of CPUs: give a plain number`},
		{"capacity label negative", issueArgs(ca, out, "gw1", "100.96.0.1", "--label", "capacity_memory_gib=-5"), 2, `label capacity_memory_gib="-5" is not a number of GiB`},
		{"bad jurisdiction", withFlag(issueArgs(ca, out, "gw1", "100.96.0.1"), "--jurisdiction", "EU"), 2, "not an ISO 3166-1"},
		{"unknown jurisdiction", withFlag(issueArgs(ca, out, "gw1", "100.96.0.1"), "--jurisdiction", "XX"), 2, "not an ISO 3166-1"},
		{"bad node name", issueArgs(ca, out, "GW_1", "100.96.0.1"), 2, `node "GW_1" is not valid`},
		{"mesh CIDR with host bits", []string{"ca", "init", "--dir", filepath.Join(dir, "ca4"), "--mesh-cidr", "100.96.0.5/16"}, 2, "did you mean 100.96.0.0/16"},
		{"mesh CIDR with host bits, masked to public space", []string{"ca", "init", "--dir", filepath.Join(dir, "ca4"), "--mesh-cidr", "100.64.0.0/8"}, 2, "has host bits set, and its range will not do either: 100.0.0.0/8 is not private or shared address space"},
		{"mesh CIDR with host bits, masked too small", []string{"ca", "init", "--dir", filepath.Join(dir, "ca4"), "--mesh-cidr", "10.1.2.3/28"}, 2, "its range will not do either: 10.1.2.0/28 holds 14 gateway addresses"},
		{"no CA", issueArgs(filepath.Join(dir, "nope"), out, "gw1", "100.96.0.1"), 1, "skybridge ca init --dir"},
		{"CA certificate for its directory", []string{"ca", "list", "--ca", filepath.Join(ca, "ca.crt")}, 1, "is a file: give the CA's directory"},
		{"bad mesh CIDR", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "banana"}, 2, "--mesh-cidr"},
		{"mesh CIDR of one address", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "100.96.0.0/32"}, 2, "holds 0 gateway addresses: give a range of /24 or wider"},
		{"mesh CIDR too small", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "10.1.2.0/25"}, 2, "holds 126 gateway addresses"},
		{"mesh CIDR of IPv6 too small", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "fd00::/121"}, 2, "give a range of /120 or wider"},
		{"mesh CIDR of everything", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "0.0.0.0/0"}, 2, "is not private or shared address space"},
		{"mesh CIDR of loopback", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "127.0.0.0/8"}, 2, "is not private or shared address space"},
		{"mesh CIDR of multicast", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "224.0.0.0/4"}, 2, "is not private or shared address space"},
		{"mesh CIDR of link-local", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "fe80::/64"}, 2, "is not private or shared address space"},
		{"mesh CIDR of public space", []string{"ca", "init", "--dir", filepath.Join(dir, "ca2"), "--mesh-cidr", "8.8.0.0/16"}, 2, "is not private or shared address space"},
		{"CA shorter-lived than what it issues", []string{"ca", "init", "--dir", filepath.Join(dir, "ca3"), "--validity", "-1h"}, 2, "a CA must outlive the certificates it issues"},
		{"revoke needs a target", []string{"ca", "revoke", "--ca", ca}, 2, "either --serial"},
		{"revoke bad serial", []string{"ca", "revoke", "--ca", ca, "--serial", "zz"}, 2, "not a certificate serial"},
		{"revoke unknown serial", []string{"ca", "revoke", "--ca", ca, "--serial", "0x1234"}, 1, "not issued by this CA"},
		{"revoke unknown node", []string{"ca", "revoke", "--ca", ca, "--node", "ghost"}, 1, `node "ghost" has no valid certificate`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errs, code := runCLI(t, tt.args...)
			if code != tt.code || !strings.Contains(errs, tt.want) {
				t.Fatalf("exit %d (want %d), stderr:\n%s\nwant it to contain %q", code, tt.code, errs, tt.want)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Fatalf("failed issue left %s behind", out)
			}
		})
	}

	// What would fail after signing is refused before it: nothing is
	// issued (the index keeps gw0 alone) and the IP stays free.
	file := filepath.Join(dir, "afile")
	os.WriteFile(file, []byte("x"), 0o600)
	bare := filepath.Join(dir, "bare")
	mustRun(t, "ca", "init", "--dir", bare, "--mesh-cidr", "100.96.0.0/16")
	// What a mesh may use.
	for i, cidr := range []string{"10.0.0.0/8", "172.16.0.0/24", "192.168.0.0/16", "100.64.0.0/10", "fd00:5b::/64"} {
		mustRun(t, "ca", "init", "--dir", filepath.Join(dir, fmt.Sprint("mesh", i)), "--mesh-cidr", cidr)
	}
	os.Remove(filepath.Join(bare, "gossip.keyring"))
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"--out is a file", issueArgs(ca, file, "gw1", "100.96.0.1"), "is a file"},
		{"--out is the CA", issueArgs(ca, ca, "gw1", "100.96.0.1"), "beside the CA key"},
		{"CA without keyring", issueArgs(bare, filepath.Join(dir, "gwb"), "gw1", "100.96.0.1"), "restore gossip.keyring from a backup"},
	} {
		if _, errs, code := runCLI(t, tc.args...); code == 0 || !strings.Contains(errs, tc.want) {
			t.Errorf("%s: exit %d, %s", tc.name, code, errs)
		}
	}
	for _, c := range []string{ca, bare} {
		var list []map[string]any
		json.Unmarshal([]byte(mustRun(t, "ca", "list", "--ca", c, "--json")), &list)
		if n := len(list); c == ca && n != 1 || c == bare && n != 0 {
			t.Errorf("%s issued %d certificates after the refusals", c, n)
		}
	}

	// Each kind of key in a directory of its own: a policy signer's is
	// not written beside the CA key or into a gateway's identity, nor a
	// gateway's into a signer's directory.
	signer := filepath.Join(dir, "signer")
	mustRun(t, "ca", "issue-signer", "--ca", ca, "--name", "compliance", "--out", signer)
	taken := filepath.Join(dir, "taken")
	for _, tc := range []struct {
		name string
		args []string
		want string
		key  string // must not appear
	}{
		{"signer into the CA", []string{"ca", "issue-signer", "--ca", ca, "--name", "treasury", "--out", ca}, "beside the CA key", filepath.Join(ca, "signer.key")},
		{"signer into a gateway's identity", []string{"ca", "issue-signer", "--ca", ca, "--name", "treasury", "--out", taken}, "is a gateway's identity directory", filepath.Join(taken, "signer.key")},
		{"signer into a file", []string{"ca", "issue-signer", "--ca", ca, "--name", "treasury", "--out", file}, "is a file", ""},
		{"gateway into a signer's directory", issueArgs(ca, signer, "gw1", "100.96.0.1"), "is a policy signer's directory", filepath.Join(signer, "node.key")},
	} {
		_, errs, code := runCLI(t, tc.args...)
		if code != 2 || !strings.Contains(errs, tc.want) {
			t.Errorf("%s: exit %d, %q; want exit 2 and %q", tc.name, code, errs, tc.want)
		}
		if _, err := os.Stat(tc.key); tc.key != "" && err == nil {
			t.Errorf("%s: %s was written", tc.name, tc.key)
		}
	}

	// An unreadable (world-readable, so refused) CA key.
	os.Chmod(filepath.Join(ca, "ca.key"), 0o644)
	_, errs, code := runCLI(t, issueArgs(ca, out, "gw1", "100.96.0.1")...)
	if code == 0 || !strings.Contains(errs, "chmod 600") {
		t.Fatalf("world-readable CA key: exit %d, %s", code, errs)
	}
	os.Chmod(filepath.Join(ca, "ca.key"), 0o600)

	// The CA directory holds no temporary files after all this.
	ents, _ := os.ReadDir(ca)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file left in CA: %s", e.Name())
		}
	}
}

func TestIssueWithCSR(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	// The gateway makes its key and CSR; only the CSR travels.
	gwKeyDir := filepath.Join(dir, "gw")
	csrArgs := issueArgs("", gwKeyDir, "gw1", "100.96.0.1")[4:] // drop "ca issue --ca X"
	csrArgs = append([]string{"identity", "csr", "--dir", gwKeyDir}, csrArgs[:len(csrArgs)-2]...)
	csr := filepath.Join(dir, "node.csr")
	os.WriteFile(csr, []byte(mustRun(t, csrArgs...)), 0o644)
	key, _ := os.ReadFile(filepath.Join(gwKeyDir, "node.key"))
	// Running it again keeps the key.
	mustRun(t, csrArgs...)
	if key2, _ := os.ReadFile(filepath.Join(gwKeyDir, "node.key")); !bytes.Equal(key, key2) || len(key) == 0 {
		t.Fatal("identity csr replaced the node key")
	}
	mustRun(t, issueArgs(ca, gwKeyDir, "gw1", "100.96.0.1", "--csr", csr)...)
	out := mustRun(t, "identity", "show", "--dir", gwKeyDir, "--json")
	var info identityInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil || !info.Accepted {
		t.Fatalf("CSR-issued identity: %s %v", out, err)
	}
	if key2, _ := os.ReadFile(filepath.Join(gwKeyDir, "node.key")); !bytes.Equal(key, key2) {
		t.Fatal("ca issue --csr touched the gateway's key")
	}
	// A CSR for another node is refused, and one whose site or
	// jurisdiction the flags contradict: the certificate was issued as
	// the flags said, and the gateway refused it at its start.
	_, errs, code := runCLI(t, issueArgs(ca, filepath.Join(dir, "gw2"), "gw2", "100.96.0.2", "--csr", csr)...)
	if code == 0 || !strings.Contains(errs, "asks for other attributes") || !strings.Contains(errs, "gw1") {
		t.Fatalf("mismatched CSR: exit %d %s", code, errs)
	}
	_, errs, code = runCLI(t, withFlag(withFlag(issueArgs(ca, filepath.Join(dir, "gw3"), "gw1", "100.96.0.1", "--csr", csr), "--jurisdiction", "DE"), "--site", "aws-fra")...)
	if code == 0 || !strings.Contains(errs, "asks for other attributes") || !strings.Contains(errs, "jurisdiction") {
		t.Fatalf("a CSR the flags' site and jurisdiction contradict: exit %d %s", code, errs)
	}
	// Into a directory whose identity has another key, it is refused
	// before anything is issued, and that identity stays usable.
	other := filepath.Join(dir, "other")
	mustRun(t, issueArgs(ca, other, "gw1", "100.96.0.1")...)
	before, _ := os.ReadFile(filepath.Join(other, "node.crt"))
	_, errs, code = runCLI(t, issueArgs(ca, other, "gw1", "100.96.0.1", "--csr", csr)...)
	if code != 2 || !strings.Contains(errs, "not the CSR's") {
		t.Fatalf("a CSR's certificate into a directory with another key: exit %d %s", code, errs)
	}
	if after, _ := os.ReadFile(filepath.Join(other, "node.crt")); !bytes.Equal(before, after) {
		t.Fatal("the refused issue replaced the directory's certificate")
	}
	mustRun(t, "identity", "show", "--dir", other)
}

// TestIssueNotDelivered: a re-issue into a gateway's directory that fails
// (here, the gossip keyring cannot be written) takes its certificate back
// and leaves the directory's own certificate in place, not a revoked one.
// TestIssueKeepsAnotherHoldersDirectory: ca issue and ca issue-signer
// tell whose directory it is from its certificate, so another holder's key
// is kept even where it cannot be loaded: a mode left loose by a restore,
// or a certificate whose key stayed where its CSR was made.
func TestIssueKeepsAnotherHoldersDirectory(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	refused := func(what, out string, args []string, want string) {
		t.Helper()
		before := map[string][]byte{}
		for _, f := range []string{"node.key", "node.crt", "signer.key", "signer.crt"} {
			before[f], _ = os.ReadFile(filepath.Join(out, f))
		}
		if _, errs, code := runCLI(t, args...); code == 0 || !strings.Contains(errs, want) {
			t.Errorf("%s: exit %d, %q; want refused (%s)", what, code, errs, want)
		}
		for f, b := range before {
			if now, _ := os.ReadFile(filepath.Join(out, f)); !bytes.Equal(b, now) {
				t.Errorf("%s: %s was replaced", what, f)
			}
		}
	}

	gwA := filepath.Join(dir, "gw-a")
	mustRun(t, issueArgs(ca, gwA, "gw-a", "100.96.0.10")...)
	refused("another node's directory", gwA, issueArgs(ca, gwA, "gw-b", "100.96.0.11"), `already holds the identity of node "gw-a"`)
	os.Chmod(filepath.Join(gwA, "node.key"), 0o640)
	refused("another node's directory, its key's mode loose", gwA, issueArgs(ca, gwA, "gw-b", "100.96.0.11"), `already holds the identity of node "gw-a"`)
	// The same node again renews in place, and the new key is 0600.
	mustRun(t, issueArgs(ca, gwA, "gw-a", "100.96.0.10")...)
	if fi, err := os.Stat(filepath.Join(gwA, "node.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("renewed node.key: %v %v; want mode 0600", fi.Mode(), err)
	}

	// A certificate issued for a CSR, its key kept elsewhere.
	keys, certOnly := filepath.Join(dir, "keys"), filepath.Join(dir, "gw-c")
	csrArgs := issueArgs("", keys, "gw-c", "100.96.0.12")[4:]
	csrArgs = append([]string{"identity", "csr", "--dir", keys}, csrArgs[:len(csrArgs)-2]...)
	csr := filepath.Join(dir, "c.csr")
	os.WriteFile(csr, []byte(mustRun(t, csrArgs...)), 0o644)
	mustRun(t, issueArgs(ca, certOnly, "gw-c", "100.96.0.12", "--csr", csr)...)
	refused("a CSR's certificate", certOnly, issueArgs(ca, certOnly, "gw-d", "100.96.0.13"), `already holds the identity of node "gw-c"`)

	signer := filepath.Join(dir, "signer")
	mustRun(t, "ca", "issue-signer", "--ca", ca, "--name", "compliance", "--out", signer)
	os.Chmod(filepath.Join(signer, "signer.key"), 0o644)
	refused("another signer's directory, its key's mode loose", signer, []string{"ca", "issue-signer", "--ca", ca, "--name", "treasury", "--out", signer}, `already holds policy signer "compliance"`)

	// identity csr certifies the key it finds: never another gateway's,
	// nor one beside the CA's or a signer's.
	csrFor := func(dir, node string) []string {
		a := issueArgs("", dir, node, "100.96.0.20")[4:]
		return append([]string{"identity", "csr", "--dir", dir}, a[:len(a)-2]...)
	}
	refused("identity csr in another node's directory", gwA, csrFor(gwA, "gw-z"), `already holds the identity of node "gw-a"`)
	refused("identity csr in the CA directory", ca, csrFor(ca, "gw-z"), "holds a CA key")
	refused("identity csr in a signer's directory", signer, csrFor(signer, "gw-z"), "is a policy signer's directory")
	if _, err := os.Stat(filepath.Join(ca, "node.key")); err == nil {
		t.Error("identity csr left a node key in the CA directory")
	}
	mustRun(t, csrFor(gwA, "gw-a")...) // its own node: a CSR with its key
}

func TestIssueNotDelivered(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	gw := filepath.Join(dir, "gw1")
	mustRun(t, "ca", "init", "--dir", ca)
	mustRun(t, issueArgs(ca, gw, "gw1", "100.96.0.1")...)
	before, _ := os.ReadFile(filepath.Join(gw, "node.crt"))
	keyBefore, _ := os.ReadFile(filepath.Join(gw, "node.key"))
	os.Remove(filepath.Join(gw, "gossip.keyring"))
	os.Mkdir(filepath.Join(gw, "gossip.keyring"), 0o700) // not writable as a file
	_, errs, code := runCLI(t, issueArgs(ca, gw, "gw1", "100.96.0.1", "--json")...)
	if code == 0 || !strings.Contains(errs, "is revoked") {
		t.Fatalf("issue whose keyring cannot be written: exit %d, %s; want the certificate taken back", code, errs)
	}
	after, _ := os.ReadFile(filepath.Join(gw, "node.crt"))
	keyAfter, _ := os.ReadFile(filepath.Join(gw, "node.key"))
	if !bytes.Equal(before, after) || !bytes.Equal(keyBefore, keyAfter) {
		t.Fatal("the directory's identity was replaced by the certificate that was then revoked")
	}
	var list []struct {
		Node      string     `json:"node"`
		RevokedAt *time.Time `json:"revoked_at"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "ca", "list", "--ca", ca, "--json")), &list); err != nil || len(list) != 2 {
		t.Fatalf("ca list: %+v %v", list, err)
	}
	if revoked := (list[0].RevokedAt != nil) != (list[1].RevokedAt != nil); !revoked {
		t.Errorf("ca list %+v: want the first certificate valid and the second revoked", list)
	}
}

func TestGraphAndDashboardUsage(t *testing.T) {
	if _, errs, code := runCLI(t, "graph", "--socket", "/nonexistent.sock", "--format", "png"); code != 2 || !strings.Contains(errs, `--format "png": want one of dot, svg, json`) {
		t.Errorf("graph --format png: exit %d, %q; want a usage error naming the formats", code, errs)
	}
	sock := filepath.Join(t.TempDir(), "control.sock")
	if _, errs, code := runCLI(t, "dashboard", "--socket", sock); code != 1 || !strings.Contains(errs, "cannot reach the gateway at "+sock) {
		t.Errorf("dashboard without a gateway: exit %d, %q", code, errs)
	}

	// graph --out replaces only a graph of its own, in any format, and
	// says so before asking the gateway.
	dir := t.TempDir()
	key := filepath.Join(dir, "ca.key")
	os.WriteFile(key, []byte("-----BEGIN EC PRIVATE KEY-----\n"), 0o600)
	if _, errs, code := runCLI(t, "graph", "--socket", sock, "--format", "json", "--out", key); code != 2 || !strings.Contains(errs, "is not a mesh graph") {
		t.Errorf("graph --out over a key: exit %d, %q; want it refused", code, errs)
	}
	if b, _ := os.ReadFile(key); string(b) != "-----BEGIN EC PRIVATE KEY-----\n" {
		t.Errorf("graph --out replaced a key: %q", b)
	}
	g := &mesh.MeshGraph{Self: "gw1", Sites: []mesh.GraphSite{{Name: "onprem-zrh", Gateways: []mesh.GraphGateway{{Node: "gw1", OverlayIP: "100.96.0.1", Self: true}}}}}
	js, _ := json.Marshal(g)
	for name, b := range map[string][]byte{"mesh.dot": []byte(g.DOT()), "mesh.svg": []byte(g.SVG()), "mesh.json": js} {
		out := filepath.Join(dir, name)
		os.WriteFile(out, b, 0o644)
		if _, errs, code := runCLI(t, "graph", "--socket", sock, "--out", out); code != 1 || !strings.Contains(errs, "cannot reach the gateway") {
			t.Errorf("graph --out over an earlier %s: exit %d, %q; want it let through (to fail at the gateway)", name, code, errs)
		}
	}
}

// TestBurstUsage: mistakes in burst commands are caught before any
// gateway is contacted, and say what to do.
func TestBurstUsage(t *testing.T) {
	base := []string{"burst", "up", "--socket", filepath.Join(t.TempDir(), "none.sock"), "--site", "burst-ams", "--provider", "aws",
		"--region", "eu-west-1", "--jurisdiction", "NL", "--ttl", "1h", "--routes", "10.9.0.0/24"}
	if _, errs, code := runCLI(t, append(base, "not-a-route")...); code != 2 || !strings.Contains(errs, "only routes (CIDR prefixes) may follow") {
		t.Errorf("burst up with a stray argument: exit %d, %q", code, errs)
	}
	if _, errs, code := runCLI(t, append(base, "--label", "classes")...); code != 2 || !strings.Contains(errs, "classes") {
		t.Errorf("burst up with a bad label: exit %d, %q", code, errs)
	}
	// What the gateway would refuse is refused here, as a usage error,
	// without asking it.
	for _, tt := range []struct {
		extra []string
		want  string
	}{
		{[]string{"--gateways", "0"}, "--gateways 0: use 1 to 64"},
		{[]string{"--gateways", "-2"}, "--gateways -2: use 1 to 64"},
		{[]string{"--gateways", "65"}, "--gateways 65: use 1 to 64"},
		{[]string{"--ttl", "5s"}, "--ttl 5s is too short"},
		{[]string{"--ttl", "1000h"}, "too long for a burst"},
		{[]string{"--token-ttl", "-1s"}, "--token-ttl -1s"},
		{[]string{"--jurisdiction", "XX"}, `jurisdiction "XX" is not an ISO 3166-1`},
		{[]string{"--routes", "10.0.0.1/8"}, "did you mean 10.0.0.0/8"},
		{[]string{"--site", "Bad_Name"}, `site "Bad_Name" is not valid`},
	} {
		if _, errs, code := runCLI(t, withFlag(base, tt.extra[0], tt.extra[1])...); code != 2 || !strings.Contains(errs, tt.want) || strings.Contains(errs, "cannot reach") {
			t.Errorf("burst up %v: exit %d, %q; want exit 2 and %q", tt.extra, code, errs, tt.want)
		}
	}
	if _, errs, code := runCLI(t, append(base, "10.10.0.0/24")...); code != 1 || !strings.Contains(errs, "cannot reach the gateway") {
		t.Errorf("burst up without a gateway: exit %d, %q", code, errs)
	}
	cfg := filepath.Join(t.TempDir(), "gw.hcl")
	os.WriteFile(cfg, []byte("state_dir = \"/nonexistent\"\ngossip { bind = \"127.0.0.1:7946\" }\nwireguard { interface = \"sbx\" }\n"), 0o644)
	tok := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tok, []byte("sbj1.bm90LWEtdG9rZW4"), 0o600)
	if _, errs, code := runCLI(t, "gateway", "run", "--config", cfg, "--join-token-file", tok, "--join-token", "x"); code != 2 || !strings.Contains(errs, "give the join token once") {
		t.Errorf("two join tokens: exit %d, %q", code, errs)
	}
	if _, errs, code := runCLI(t, "gateway", "run", "--config", cfg, "--join-token-file", tok); code != 1 || !strings.Contains(errs, "join token is damaged") {
		t.Errorf("a damaged join token: exit %d, %q", code, errs)
	}
	os.Chmod(tok, 0o644)
	if _, errs, code := runCLI(t, "gateway", "run", "--config", cfg, "--join-token-file", tok); code != 1 || !strings.Contains(errs, "chmod 600") {
		t.Errorf("a join token file others may read: exit %d, %q", code, errs)
	}
}

// TestAuditVerifyEmpty: an emptied audit log is not reported intact — a
// gateway creates its log with its first record — nor one cut back.
func TestAuditVerifyEmpty(t *testing.T) {
	dir := t.TempDir()
	ca, id := auditSigner(t, dir)
	log := filepath.Join(dir, "audit.log")
	os.WriteFile(log, nil, 0o600)
	// Made empty by an earlier release before its first record: no head.
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 0 || !strings.Contains(out, "nothing recorded yet") {
		t.Fatalf("an empty audit log without a head: exit %d, %q", code, out)
	}
	// Emptied: its head says a record was written.
	os.WriteFile(log+".head", []byte(`{"seq":1,"sha256":"00"}`), 0o600)
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 1 || !strings.Contains(out, "holds no record") {
		t.Fatalf("an emptied audit log: exit %d, %q", code, out)
	}
	if out, errs, code := runCLI(t, "audit", "verify", "--log", dir, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 2 || strings.Contains(out, "INVALID") || !strings.Contains(errs, "is a directory") {
		t.Fatalf("a directory for --log: exit %d, %q %q", code, out, errs)
	}
	// Inputs that cannot be read say nothing of the log: 2, not the 1 of
	// a broken log.
	for _, args := range [][]string{
		{"--log", filepath.Join(dir, "missing.log"), "--ca-cert", filepath.Join(ca, "ca.crt")},
		{"--log", log, "--ca-cert", filepath.Join(dir, "missing.crt")},
		{"--log", log, "--ca-cert", log},
		{"--log", log, "--ca-cert", filepath.Join(ca, "ca.crt"), "--crl", filepath.Join(dir, "missing.pem")},
	} {
		if out, errs, code := runCLI(t, append([]string{"audit", "verify"}, args...)...); code != 2 || strings.Contains(out, "INVALID") || !strings.Contains(errs, "missing") && !strings.Contains(errs, "audit.log") {
			t.Errorf("audit verify %v: exit %d, %q %q; want 2, naming what could not be read", args, code, out, errs)
		}
	}

	// Cut back by a record: a shorter chain, intact; the head beside it
	// says a record is missing.
	log = filepath.Join(dir, "audit2.log")
	l := audit.Open(log)
	l.Append(id, "migration", nil, time.Now())
	one, _ := os.ReadFile(log)
	l.Append(id, "migration", nil, time.Now())
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 0 {
		t.Fatalf("an intact log: exit %d, %q", code, out)
	}
	os.WriteFile(log, one, 0o600)
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 1 || !strings.Contains(out, "record 2 was written") {
		t.Fatalf("a log cut back by a record: exit %d, %q", code, out)
	}
}

// TestAuditVerifyMeshRange: a log of a mesh on another overlay range
// than the default verifies against its CA, which names the range; the
// result names whose log it is, says when revocations were not checked,
// and --node refuses another gateway's log.
func TestAuditVerifyMeshRange(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca, "--mesh-cidr", "10.200.0.0/16")
	c, err := certs.OpenCA(ca)
	if err != nil {
		t.Fatal(err)
	}
	id, err := c.IssueIdentity(certs.Attributes{Node: "gw1", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.MustParseAddr("10.200.0.1")}, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(dir, "audit.log")
	if _, err := audit.Open(log).Append(id, "migration", map[string]any{"outcome": "done"}, time.Now()); err != nil {
		t.Fatal(err)
	}
	out, errs, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt"))
	if code != 0 || !strings.Contains(out, "1 records of gw1, signatures and chain intact") || !strings.Contains(out, "revocations were not checked") {
		t.Fatalf("a log of a mesh on 10.200.0.0/16: exit %d, %q %q", code, out, errs)
	}
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt"), "--crl", filepath.Join(ca, "crl.pem"), "--node", "gw2"); code != 1 || !strings.Contains(out, "the log of gw1, not of gw2") {
		t.Fatalf("another gateway's log: exit %d, %q", code, out)
	}
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt"), "--crl", filepath.Join(ca, "crl.pem"), "--node", "gw1"); code != 0 || strings.Contains(out, "not checked") {
		t.Fatalf("its own gateway's log, revocations checked: exit %d, %q", code, out)
	}
	if _, errs, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(ca, "ca.crt"), "--mesh-cidr", "100.96.0.0/16"); code != 2 || !strings.Contains(errs, "is not inside 10.200.0.0/16") {
		t.Fatalf("a range other than the CA's: exit %d, %q", code, errs)
	}
	if strings.Contains(out, "no audit.log.head") {
		t.Fatalf("the head beside the log is said missing: %q", out)
	}
	// A copy without its head verifies, saying that its end was not
	// checked: records cut from it would not show.
	copied := filepath.Join(dir, "copy", "audit.log")
	os.Mkdir(filepath.Dir(copied), 0o700)
	b, _ := os.ReadFile(log)
	os.WriteFile(copied, b, 0o600)
	if out, _, code := runCLI(t, "audit", "verify", "--log", copied, "--ca-cert", filepath.Join(ca, "ca.crt")); code != 0 || !strings.Contains(out, "note: no audit.log.head beside the log: records cut from its end would not show") {
		t.Fatalf("a log without its head: exit %d, %q", code, out)
	}
	if out, _, _ := runCLI(t, "audit", "verify", "--json", "--log", copied, "--ca-cert", filepath.Join(ca, "ca.crt")); !strings.Contains(out, `"end_checked": false`) {
		t.Fatalf("a log without its head, --json: %q", out)
	}
}

// TestAuditVerifyAcrossRotation: a log written across an issuer rotation
// verifies against both CAs and both lists, in one file each, whatever
// their order — a revocation of the old CA's gateway after its records
// does not undo them — and not against the new CA alone.
func TestAuditVerifyAcrossRotation(t *testing.T) {
	dir := t.TempDir()
	var cas []*certs.CA
	var caPEM, crlPEM []byte
	for _, name := range []string{"old", "new"} {
		mustRun(t, "ca", "init", "--dir", filepath.Join(dir, name))
		c, err := certs.OpenCA(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		cas = append(cas, c)
	}
	ids := make([]*certs.NodeIdentity, 2)
	for i, c := range cas {
		id, err := c.IssueIdentity(certs.Attributes{Node: "gw1", Site: "s", Region: "r", Provider: "aws", Jurisdiction: "DE", OverlayIP: netip.MustParseAddr("100.96.0.1")}, time.Hour, time.Now().Add(-time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = id
	}
	log := filepath.Join(dir, "audit.log")
	l := audit.Open(log)
	l.Append(ids[0], "migration", nil, time.Now().Add(-30*time.Second))
	l.Append(ids[1], "migration", nil, time.Now().Add(-20*time.Second))
	if _, err := cas[0].RevokeSerials([]*big.Int{ids[0].Certificate().SerialNumber}, "superseded", time.Now().Add(-10*time.Second)); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{1, 0} { // the new CA first
		b, _ := os.ReadFile(filepath.Join(dir, []string{"old", "new"}[i], "ca.crt"))
		caPEM = append(caPEM, b...)
		b, _ = os.ReadFile(filepath.Join(dir, []string{"old", "new"}[i], "crl.pem"))
		crlPEM = append(crlPEM, b...)
	}
	bothCAs, bothCRLs := filepath.Join(dir, "cas.pem"), filepath.Join(dir, "crls.pem")
	os.WriteFile(bothCAs, caPEM, 0o644)
	os.WriteFile(bothCRLs, crlPEM, 0o644)
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", bothCAs, "--crl", bothCRLs); code != 0 {
		t.Fatalf("a log across a rotation, both CAs and lists: exit %d, %q", code, out)
	}
	if out, _, code := runCLI(t, "audit", "verify", "--log", log, "--ca-cert", filepath.Join(dir, "new", "ca.crt")); code != 1 || !strings.Contains(out, "line 1") {
		t.Fatalf("the same log against the new CA alone: exit %d, %q", code, out)
	}
	// A record the old CA's gateway signed after its revocation (by more
	// than clocks may differ): the old CA's list, second in the file,
	// counts too.
	late := filepath.Join(dir, "late.log")
	audit.Open(late).Append(ids[0], "migration", nil, time.Now().Add(10*time.Minute))
	if out, _, code := runCLI(t, "audit", "verify", "--log", late, "--ca-cert", bothCAs, "--crl", bothCRLs); code != 1 || !strings.Contains(out, "revoked") {
		t.Fatalf("a record signed after the signer's revocation: exit %d, %q", code, out)
	}
}

// TestDemoDown: --down stops the demo's own gateways and nothing else,
// whatever PIDs its state file lists.
func TestDemoDown(t *testing.T) {
	dir := t.TempDir()
	demoDir := filepath.Join(dir, "demo")
	other := filepath.Join(dir, "other")
	for _, d := range []string{filepath.Join(demoDir, "zrh"), other} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "gateway.hcl"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// exec.Cmd.Start returns once the child has exec'd: its command
	// line, which --down checks, is final.
	own, ownDone := idleProcess(t, "gateway", "run", "--config", filepath.Join(demoDir, "zrh", "gateway.hcl"))
	stranger, strangerDone := idleProcess(t, "gateway", "run", "--config", filepath.Join(other, "gateway.hcl"))
	unrelated, unrelatedDone := idleProcess(t, "serve", "--port", "8080")
	st, err := json.Marshal(map[string]any{"mode": "netstack", "pids": []int{own.Process.Pid, stranger.Process.Pid, unrelated.Process.Pid},
		"namespaces": []string{"prod"}, "interfaces": []string{"../../etc/x"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(demoDir, "demo-state.json"), st, 0o600); err != nil {
		t.Fatal(err)
	}

	out, errs, code := runCLI(t, "demo", "--down", demoDir)
	if code != 0 || !strings.Contains(out, "stopped and removed") {
		t.Fatalf("demo --down: exit %d, %q, %q", code, out, errs)
	}
	select {
	case <-ownDone:
	case <-time.After(5 * time.Second):
		t.Error("the demo's gateway still runs")
	}
	for _, p := range []struct {
		cmd  *exec.Cmd
		done chan struct{}
	}{{stranger, strangerDone}, {unrelated, unrelatedDone}} {
		select {
		case <-p.done:
			t.Errorf("pid %d (%v) was stopped", p.cmd.Process.Pid, p.cmd.Args[1:])
		default:
		}
		if want := "pid " + strconv.Itoa(p.cmd.Process.Pid) + ": it runs"; !strings.Contains(errs, want) {
			t.Errorf("stderr does not say it left pid %d alone:\n%s", p.cmd.Process.Pid, errs)
		}
	}
	for _, want := range []string{`network namespace "prod": not a name the demo gives`, `interface "../../etc/x"`} {
		if !strings.Contains(errs, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errs)
		}
	}
	if _, err := os.Stat(demoDir); !os.IsNotExist(err) {
		t.Errorf("the demo directory is still there: %v", err)
	}

	// Given a directory that holds more than a demo, --down removes what
	// the demo makes and keeps the rest, and says so.
	mixed := filepath.Join(dir, "mixed")
	for name, body := range map[string]string{"demo-state.json": `{"mode":"netstack"}`, "residency.hcl": "", "zrh/gateway.hcl": "", "important.txt": "keep me"} {
		os.MkdirAll(filepath.Dir(filepath.Join(mixed, name)), 0o700)
		if err := os.WriteFile(filepath.Join(mixed, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	out, errs, code = runCLI(t, "demo", "--down", mixed)
	if code != 0 || !strings.Contains(errs, "it holds important.txt, which the demo did not make") || !strings.Contains(out, "but for what was not its own") {
		t.Errorf("demo --down of a directory holding a file of the user's: exit %d, %q, %q", code, out, errs)
	}
	if b, err := os.ReadFile(filepath.Join(mixed, "important.txt")); err != nil || string(b) != "keep me" {
		t.Errorf("the user's file: %q, %v; want it kept", b, err)
	}
	for _, name := range []string{"demo-state.json", "residency.hcl", "zrh"} {
		if _, err := os.Stat(filepath.Join(mixed, name)); !os.IsNotExist(err) {
			t.Errorf("the demo's %s is still there: %v", name, err)
		}
	}
	// An empty --down (an unset shell variable) starts nothing.
	if _, errs, code := runCLI(t, "demo", "--down", ""); code != 2 || !strings.Contains(errs, "--down is empty") {
		t.Errorf(`demo --down "": exit %d, %q; want a usage error`, code, errs)
	}
}

// TestUnexpectedArguments: every command refuses more positional
// arguments than it takes (exit 2, naming them), before anything else.
func TestUnexpectedArguments(t *testing.T) {
	var walk func(path []string, cmds []*cli.Command)
	walk = func(path []string, cmds []*cli.Command) {
		for _, c := range cmds {
			p := append(append([]string(nil), path...), c.Name)
			walk(p, c.Subcommands)
			if c.Action == nil || strings.Contains(c.ArgsUsage, "...") {
				continue
			}
			args := append(p, strings.Fields(c.ArgsUsage+" one-too-many")...)
			out, errs, code := runCLI(t, args...)
			if code != 2 || out != "" || !strings.Contains(errs, `unexpected argument "one-too-many"`) {
				t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit 2 and the extra argument named", args, code, out, errs)
			}
		}
	}
	walk(nil, newApp(nil, nil).Commands)

	// As the audit found them.
	for _, args := range [][]string{
		{"migrate", "run", "a.raw", "b.raw", "--to", "x", "--class", "y"},
		{"status", "extra"},
		{"ca", "list", "--ca", t.TempDir(), "oops"},
	} {
		if _, errs, code := runCLI(t, args...); code != 2 || !strings.Contains(errs, "unexpected argument") {
			t.Errorf("%v: exit %d, %q", args, code, errs)
		}
	}
}

// TestGatewaySelection: a flag on the command line beats the environment,
// and two answers to "which gateway?" are a usage error.
func TestGatewaySelection(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "gw.hcl")
	os.WriteFile(cfg, []byte("state_dir = \""+dir+"\"\ngossip { bind = \"127.0.0.1:7946\" }\nwireguard { interface = \"sbx\" }\n"), 0o644)
	cfgSock := filepath.Join(dir, "control.sock")
	flagSock := filepath.Join(dir, "flag.sock")
	envSock := filepath.Join(dir, "env.sock")
	t.Setenv("SKYBRIDGE_SOCKET", envSock)
	tests := []struct {
		name string
		env  string // SKYBRIDGE_CONFIG
		args []string
		code int
		want string
	}{
		{"environment", "", []string{"status"}, 1, "cannot reach the gateway at " + envSock},
		{"--config beats SKYBRIDGE_SOCKET", "", []string{"status", "--config", cfg}, 1, "cannot reach the gateway at " + cfgSock},
		{"--socket beats SKYBRIDGE_CONFIG", cfg, []string{"status", "--socket", flagSock}, 1, "cannot reach the gateway at " + flagSock},
		{"both variables", cfg, []string{"status"}, 2, "SKYBRIDGE_SOCKET and SKYBRIDGE_CONFIG are both set"},
		{"both flags", "", []string{"status", "--socket", flagSock, "--config", cfg}, 2, "give --socket or --config, not both"},
		{"both flags, burst down", "", []string{"burst", "down", "--site", "b", "--socket", flagSock, "--config", cfg}, 2, "not both"},
		{"both flags, keys rotate-gossip", "", []string{"keys", "rotate-gossip", "--socket", flagSock, "--config", cfg}, 2, "not both"},
		{"both flags, migrate cancel", "", []string{"migrate", "cancel", "x", "--socket", flagSock, "--config", cfg}, 2, "not both"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("SKYBRIDGE_CONFIG", tt.env)
			if _, errs, code := runCLI(t, tt.args...); code != tt.code || !strings.Contains(errs, tt.want) {
				t.Errorf("exit %d (want %d), stderr %q, want %q", code, tt.code, errs, tt.want)
			}
		})
	}
}

// TestBandwidthLimit: a --bwlimit is a positive rate the gateway can pace
// at; anything it would take for "no limit" is refused (exit 2).
func TestBandwidthLimit(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want int64 // 0: refused
	}{
		{"200MB/s", 200e6}, {"1GiB/s", 1 << 30}, {"800Mbit/s", 100e6}, {"8bit/s", 1}, {"1B/s", 1}, {"1.5KB/s", 1500},
		{"NaN", 0}, {"Inf", 0}, {"-Inf", 0}, {"infinity", 0}, {"1e30", 0}, {"1e19", 0}, {"0", 0}, {"-5MB/s", 0},
		{"0.5", 0}, {"7bit/s", 0}, {"fast", 0}, {"", 0},
	} {
		got, err := parseRate(tt.in)
		if got != tt.want || (tt.want == 0) != (err != nil) {
			t.Errorf("parseRate(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
		if err != nil && !strings.Contains(err.Error(), "not a positive rate") {
			t.Errorf("parseRate(%q): %v; want it to say it is not a positive rate", tt.in, err)
		}
	}
	sock := filepath.Join(t.TempDir(), "none.sock")
	for _, args := range [][]string{
		{"migrate", "run", "vm.raw", "--to", "x", "--class", "y", "--socket", sock, "--bwlimit", "NaN"},
		{"migrate", "apply", "plan.json", "--socket", sock, "--bwlimit", "7bit/s"},
	} {
		if _, errs, code := runCLI(t, args...); code != 2 || !strings.Contains(errs, "--bwlimit") || !strings.Contains(errs, "not a positive rate") {
			t.Errorf("%v: exit %d, %q", args, code, errs)
		}
	}
}

// gatewayConfig writes a gateway configuration for node gw1 whose state is
// in dir/state, with the given identity block (none if empty).
func gatewayConfig(t *testing.T, dir, identity string) string {
	t.Helper()
	return gatewayConfigWith(t, dir, "gossip { bind = \"127.0.0.1:7946\" }\nwireguard { interface = \"sbx\" }\n", identity)
}

// gatewayConfigWith is gatewayConfig with the given gossip and wireguard
// blocks (network).
func gatewayConfigWith(t *testing.T, dir, network, identity string) string {
	t.Helper()
	cfg := filepath.Join(dir, "gw.hcl")
	src := `state_dir = "` + filepath.Join(dir, "state") + `"
node {
  name         = "gw1"
  site         = "onprem-zrh"
  region       = "zrh-dc1"
  provider     = "onprem"
  jurisdiction = "CH"
  overlay_ip   = "100.96.0.1"
}
` + network + identity
	if err := os.WriteFile(cfg, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestIdentityRequest: identity request reads a configuration as gateway
// run does, and issues nothing it cannot deliver whole.
func TestIdentityRequest(t *testing.T) {
	certsIn := func(ca string) int {
		var list []map[string]any
		json.Unmarshal([]byte(mustRun(t, "ca", "list", "--ca", ca, "--json")), &list)
		return len(list)
	}
	tests := []struct {
		name     string
		identity string // the identity block; CA stands for the CA directory
		bare     bool   // the CA has lost its gossip keyring
		issue    bool   // the identity was issued offline into state/identity
		code     int
		want     string // in stderr
		issued   int    // certificates in the CA's index afterwards
	}{
		{"no identity block: state_dir/identity", "", false, true, 0, "no issuer configured", 1},
		{"ca_dir without dir", "identity {\n  ca_dir = \"CA\"\n}\n", false, false, 0, "", 1},
		{"ca_dir on a fresh dir", "identity {\n  dir = \"ID\"\n  ca_dir = \"CA\"\n}\n", false, false, 0, "", 1},
		{"a CA without its keyring", "identity {\n  ca_dir = \"CA\"\n}\n", true, false, 1, "has no gossip keyring", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			ca := filepath.Join(dir, "ca")
			mustRun(t, "ca", "init", "--dir", ca)
			if tt.bare {
				os.Remove(filepath.Join(ca, "gossip.keyring"))
			}
			idDir := filepath.Join(dir, "state", "identity")
			if tt.issue {
				mustRun(t, issueArgs(ca, idDir, "gw1", "100.96.0.1")...)
			}
			if strings.Contains(tt.identity, "ID") {
				idDir = filepath.Join(dir, "id")
			}
			block := strings.NewReplacer(`"CA"`, `"`+ca+`"`, `"ID"`, `"`+idDir+`"`).Replace(tt.identity)
			_, errs, code := runCLI(t, "identity", "request", "--config", gatewayConfig(t, dir, block))
			if code != tt.code || !strings.Contains(errs, tt.want) {
				t.Fatalf("exit %d (want %d), stderr:\n%s\nwant %q", code, tt.code, errs, tt.want)
			}
			if n := certsIn(ca); n != tt.issued {
				t.Errorf("the CA issued %d certificates, want %d", n, tt.issued)
			}
			if code == 0 {
				if _, err := os.Stat(filepath.Join(idDir, "gossip.keyring")); err != nil {
					t.Errorf("no gossip keyring beside the identity: %v", err)
				}
			}
		})
	}
}

// TestGatewayWithoutIdentity: a gateway with nothing to start from says
// how to give it an identity; a join token file must hold a token.
func TestGatewayWithoutIdentity(t *testing.T) {
	dir := t.TempDir()
	cfg := gatewayConfig(t, dir, "")
	empty := filepath.Join(dir, "empty-token")
	os.WriteFile(empty, nil, 0o600)
	tests := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"gateway run", []string{"gateway", "run", "--config", cfg}, 1,
			[]string{"no identity yet", "skybridge ca issue --ca CA_DIR --node gw1", "--out " + filepath.Join(dir, "state", "identity"), "identity.ca_dir", "--join-token-file"}},
		{"identity request", []string{"identity", "request", "--config", cfg}, 1,
			[]string{"no identity yet", "skybridge ca issue --ca CA_DIR --node gw1", "no issuer to ask"}},
		{"an empty join token file", []string{"gateway", "run", "--config", cfg, "--join-token-file", empty}, 1, []string{"join token file " + empty + " is empty"}},
		{"a directory for a join token file", []string{"gateway", "run", "--config", cfg, "--join-token-file", dir}, 2, []string{"--join-token-file " + dir + " is a directory"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errs, code := runCLI(t, tt.args...)
			if code != tt.code {
				t.Errorf("exit %d, want %d: %s", code, tt.code, errs)
			}
			for _, w := range tt.want {
				if !strings.Contains(errs, w) {
					t.Errorf("stderr lacks %q:\n%s", w, errs)
				}
			}
		})
	}
}

// TestErrorAdvice: the advice in an error is a way out of that error.
func TestErrorAdvice(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	mustRun(t, "ca", "init", "--dir", ca)
	gw := filepath.Join(dir, "gw1")
	mustRun(t, issueArgs(ca, gw, "gw1", "100.96.0.1")...)
	bare := filepath.Join(dir, "bare")
	mustRun(t, "ca", "init", "--dir", bare)
	os.Remove(filepath.Join(bare, "gossip.keyring"))
	sock := filepath.Join(dir, "none.sock")
	tests := []struct {
		name      string
		args      []string
		code      int
		want, not string
	}{
		{"ca init into a gateway's identity", []string{"ca", "init", "--dir", gw}, 1, "a gateway's identity directory", "a CA already exists"},
		{"ca issue from a CA without its keyring", issueArgs(bare, filepath.Join(dir, "gw2"), "gw2", "100.96.0.2"), 1, "restore gossip.keyring from a backup", "ca issue --out"},
		{"migrate verify a path", []string{"migrate", "verify", "../../etc/passwd", "--socket", sock}, 2, `image name "../../etc/passwd"`, "404"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errs, code := runCLI(t, tt.args...)
			if code != tt.code || !strings.Contains(errs, tt.want) || strings.Contains(errs, tt.not) {
				t.Errorf("exit %d, stderr %q; want exit %d, %q and not %q", code, errs, tt.code, tt.want, tt.not)
			}
		})
	}
}

// TestIssueSignerNotDelivered: a policy signer whose certificate cannot be
// written is taken back, as a gateway certificate is: a signer nobody
// holds must not stay valid.
func TestIssueSignerNotDelivered(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	sdir := filepath.Join(dir, "signer")
	mustRun(t, "ca", "init", "--dir", ca)
	if err := os.MkdirAll(filepath.Join(sdir, "signer.crt"), 0o700); err != nil { // not writable as a file
		t.Fatal(err)
	}
	_, errs, code := runCLI(t, "ca", "issue-signer", "--ca", ca, "--name", "compliance", "--out", sdir)
	if code == 0 || !strings.Contains(errs, "is revoked") {
		t.Fatalf("issue-signer whose certificate cannot be written: exit %d, %s; want the certificate taken back", code, errs)
	}
	var list []struct {
		RevokedAt *time.Time `json:"revoked_at"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "ca", "list", "--ca", ca, "--json")), &list); err != nil || len(list) != 1 || list[0].RevokedAt == nil {
		t.Fatalf("ca list: %+v %v; want the signer revoked", list, err)
	}
}

// TestFlagMistakes: flags that cannot work together or hold values the
// command cannot use are usage errors (exit 2) before anything runs.
func TestFlagMistakes(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"demo", "--down", dir, "--keep"},
		{"migrate", "run", "img.raw", "--to", "s", "--class", "c", "--streams", "-1", "--socket", filepath.Join(dir, "none.sock")},
		{"migrate", "run", "img.raw", "--to", "s", "--class", "c", "--streams", "33", "--socket", filepath.Join(dir, "none.sock")},
		{"migrate", "apply", filepath.Join(dir, "plan.json"), "--streams", "0", "--socket", filepath.Join(dir, "none.sock")},
	} {
		if _, errs, code := runCLI(t, args...); code != 2 || !strings.Contains(errs, "--") {
			t.Errorf("%v: exit %d, %q; want a usage error", args, code, errs)
		}
	}
	// migrate run says what is plainly not an image, or not a format,
	// before a migration is opened at the gateway (and recorded failed).
	imgDir := filepath.Join(dir, "images")
	os.Mkdir(imgDir, 0o700)
	for _, tt := range []struct {
		image, flag, format, want string
	}{
		{filepath.Join(dir, "missing.raw"), "", "", "missing.raw: no such file"},
		{imgDir, "", "", "is not a regular file"},
		{filepath.Join(dir, "missing.raw"), "--format", "vmdk", `--format "vmdk"`},
		{filepath.Join(dir, "missing.raw"), "--source-format", "vmdk", `--source-format "vmdk"`},
	} {
		args := []string{"migrate", "run", tt.image, "--to", "s", "--class", "c", "--socket", filepath.Join(dir, "none.sock")}
		if tt.flag != "" {
			args = append(args, tt.flag, tt.format)
		}
		if _, errs, code := runCLI(t, args...); code != 2 || !strings.Contains(errs, tt.want) {
			t.Errorf("%v: exit %d, %q; want a usage error saying %q", args, code, errs, tt.want)
		}
	}
	// A flag of one value given twice is a mistake, not the last one
	// winning (two --ca-cert would have a log judged by one CA); lists
	// and booleans may repeat.
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"audit", "verify", "--log", "a.log", "--ca-cert", "old.crt", "--ca-cert", "new.crt"}, "--ca-cert given more than once"},
		{[]string{"ca", "list", "--ca=ca1", "--ca", "ca6"}, "--ca given more than once"},
		{[]string{"--log-level", "debug", "status", "--log-level=warn"}, "--log-level given more than once"},
	} {
		if out, errs, code := runCLI(t, tt.args...); code != 2 || out != "" || !strings.Contains(errs, tt.want) {
			t.Errorf("%v: exit %d, %q, %q; want a usage error naming %q", tt.args, code, out, errs, tt.want)
		}
	}
	// A value that looks like a flag is a value; help is help.
	if _, errs, code := runCLI(t, "ca", "init", "--dir", filepath.Join(dir, "ca-dashes"), "--name", "--dir"); code != 0 {
		t.Errorf("ca init --name --dir: exit %d, %q; want the name taken", code, errs)
	}
	for _, args := range [][]string{
		{"ca", "issue", "--help", "--node", "a", "--node", "b"},
		{"--log-level", "debug", "--log-level", "info", "ca", "issue", "--help"},
		{"--log-level", "debug", "--help", "--log-level", "info", "ca", "issue"},
	} {
		if _, errs, code := runCLI(t, args...); code != 0 || strings.Contains(errs, "more than once") {
			t.Errorf("%v: exit %d, %q; want the help, not a refusal", args, code, errs)
		}
	}
	if _, errs, code := runCLI(t, "burst", "up", "--socket", filepath.Join(dir, "none.sock"), "--site", "burst-ams", "--provider", "aws",
		"--region", "eu-west-1", "--jurisdiction", "NL", "--ttl", "1h", "--routes", "10.9.0.0/24", "--label", "a=b", "--label", "c=d", "--json", "--json"); code == 2 || strings.Contains(errs, "more than once") {
		t.Errorf("burst up with two --label and two --json: exit %d, %q; want them taken", code, errs)
	}
	// A mistake on the command line is said first, before a problem of
	// the gateway's configuration or of an input file hides it.
	badInventory := filepath.Join(dir, "vms.csv")
	os.WriteFile(badInventory, []byte("not,an,inventory\n"), 0o644)
	missingConfig := filepath.Join(dir, "missing.hcl")
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"demo", "--down", dir, "--json"}, "--json"},
		{[]string{"migrate", "status", "--config", missingConfig}, "which migration?"},
		{[]string{"migrate", "cancel", "--config", missingConfig}, "which migration?"},
		{[]string{"migrate", "verify", "--config", missingConfig}, "which image?"},
		{[]string{"migrate", "verify", "../etc", "--config", missingConfig}, "give the name of an image"},
		{[]string{"migrate", "remove", "--reason", "CHG-1", "--config", missingConfig}, "skybridge migrate remove NAME"},
		{[]string{"migrate", "remove", "../etc", "--reason", "CHG-1", "--config", missingConfig}, "give the name of an image"},
		{[]string{"migrate", "remove", "vm", "--config", missingConfig}, "--reason TEXT"},
		{[]string{"plan", "--inventory", badInventory}, "say which gateway"},
		// An empty value would take the flag's default, unsaid.
		{[]string{"ca", "init", "--dir", filepath.Join(dir, "ca"), "--name", ""}, "--name given empty (see skybridge ca init --help)"},
		{[]string{"policy", "sign", "--policy", examplePolicy, "--ca", dir, "--out", ""}, "--out given empty (see skybridge policy sign --help)"},
		{[]string{"plan", "--inventory", badInventory, "--out", " ", "--config", missingConfig}, "--out given empty (see skybridge plan --help)"},
		{[]string{"plan", "--inventory", badInventory, "--to", "onprem-zrh", "--to", "", "--config", missingConfig}, "--to given empty (see skybridge plan --help)"},
		{[]string{"migrate", "apply", filepath.Join(dir, "missing-plan.json")}, "say which gateway"},
	} {
		if _, errs, code := runCLI(t, tt.args...); code != 2 || !strings.Contains(errs, tt.want) {
			t.Errorf("%v: exit %d, %q; want exit 2 and %q", tt.args, code, errs, tt.want)
		}
	}
	// A name an earlier release stored, with characters new names may
	// not hold, can still be named (to be verified or removed).
	for _, cmd := range [][]string{{"migrate", "remove", "vm\x1b[2K", "--reason", "CHG-1"}, {"migrate", "verify", "vm\u202egpj"}} {
		if _, errs, _ := runCLI(t, append(cmd, "--config", missingConfig)...); strings.Contains(errs, "give the name of an image") || !strings.Contains(errs, "missing.hcl") {
			t.Errorf("%q: %q; want the name taken and the missing configuration reported", cmd, errs)
		}
	}
}

// TestCACRLWithoutItsList: a CA directory whose crl.pem is missing or
// another CA's is said to be so, with what to do — not a crash — and
// --refresh signs a new list from the index unless the file there is
// another CA's, which it does not carry on.
func TestCACRLWithoutItsList(t *testing.T) {
	dir := t.TempDir()
	ca, other := filepath.Join(dir, "ca"), filepath.Join(dir, "other")
	mustRun(t, "ca", "init", "--dir", ca)
	mustRun(t, "ca", "init", "--dir", other)
	crl := filepath.Join(ca, "crl.pem")
	os.Remove(crl)
	if _, errs, code := runCLI(t, "ca", "crl", "--ca", ca); code != 1 || !strings.Contains(errs, "--refresh") {
		t.Fatalf("ca crl without crl.pem: exit %d, %q", code, errs)
	}
	if out, errs, code := runCLI(t, "ca", "crl", "--ca", ca, "--refresh"); code != 0 {
		t.Fatalf("ca crl --refresh without crl.pem: exit %d, %q %q", code, out, errs)
	}
	foreign, _ := os.ReadFile(filepath.Join(other, "crl.pem"))
	os.WriteFile(crl, foreign, 0o644)
	for _, args := range [][]string{{"ca", "crl", "--ca", ca}, {"ca", "crl", "--ca", ca, "--refresh"}} {
		if _, errs, code := runCLI(t, args...); code != 1 || !strings.Contains(errs, "another CA") && !strings.Contains(errs, "not signed by this CA") {
			t.Errorf("%v with another CA's crl.pem: exit %d, %q", args, code, errs)
		}
	}
}

// TestInterspersed: flags may follow positional arguments, and the
// global flags the command words, as operators type them.
func TestInterspersed(t *testing.T) {
	app := newApp(&bytes.Buffer{}, &bytes.Buffer{})
	for _, tc := range []struct{ in, want string }{
		{"skybridge migrate run vm.qcow2 --to fra --class pii-eu", "skybridge migrate run --to fra --class pii-eu -- vm.qcow2"},
		{"skybridge status --config g.hcl --log-level debug", "skybridge --log-level debug status --config g.hcl"},
		{"skybridge --log-format json status --log-level=warn --json", "skybridge --log-level=warn --log-format json status --json"},
		{"skybridge migrate verify vm --log-format json --socket s", "skybridge --log-format json migrate verify --socket s -- vm"},
		// After "--" nothing is a flag.
		{"skybridge migrate verify --socket s -- --log-level", "skybridge migrate verify --socket s -- --log-level"},
	} {
		if got, _ := interspersed(app, strings.Fields(tc.in)); strings.Join(got, " ") != tc.want {
			t.Errorf("%s\n got %s\nwant %s", tc.in, got, tc.want)
		}
	}
	// An unknown word names the help that lists the right ones.
	for _, tc := range []struct{ args, want string }{
		{"skybridge nosuch", "(see skybridge --help)"},
		{"skybridge policy nosuch", "(see skybridge policy --help)"},
	} {
		var errb bytes.Buffer
		if code := run(strings.Fields(tc.args), &bytes.Buffer{}, &errb); code != 2 || !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%s: exit %d, %q; want 2 and %q", tc.args, code, errb.String(), tc.want)
		}
	}
	// And the command runs so.
	var out, errb bytes.Buffer
	if code := run([]string{"skybridge", "policy", "lint", "--policy", "../../docs/examples/residency.hcl", "--log-level", "debug"}, &out, &errb); code != 0 {
		t.Fatalf("policy lint with --log-level after it: exit %d\n%s%s", code, out.String(), errb.String())
	}
}

// TestStatusShowsConflicts: what the plan had to drop is in the text
// status, not only in its JSON.
func TestStatusShowsConflicts(t *testing.T) {
	var out bytes.Buffer
	c := cli.NewContext(&cli.App{Writer: &out}, nil, nil)
	printStatus(c, &mesh.Status{Node: "gw-1", Site: "zrh", Conflicts: []string{"192.0.0.0/8 of fra-1 covers 192.0.2.4, the underlay address of fra-1's tunnel; not routed to it"}})
	if !strings.Contains(out.String(), "conflict: 192.0.0.0/8 of fra-1 covers") {
		t.Fatalf("status:\n%s", out.String())
	}
}

// TestStatusShowsFailingTunnels: the text status says which tunnels are
// stale and which sites are unreachable from here, as the metrics do,
// and whose routes are held.
func TestStatusShowsFailingTunnels(t *testing.T) {
	var out bytes.Buffer
	c := cli.NewContext(&cli.App{Writer: &out}, nil, nil)
	printStatus(c, &mesh.Status{Node: "gw-1", Site: "zrh", Reachable: map[string]bool{"zrh": true, "iad": false, "fra": true, "sin": false},
		Held: map[string][]netip.Prefix{"sin": {netip.MustParsePrefix("10.9.0.0/16"), netip.MustParsePrefix("10.19.0.0/16")}},
		Members: []mesh.MemberStatus{
			{Node: "gw-iad", Site: "iad", State: mesh.StateVerified, Peer: true, Health: mesh.TunnelStale},
			{Node: "gw-fra", Site: "fra", State: mesh.StateVerified, Peer: true, Health: mesh.TunnelFresh},
		}})
	for _, want := range []string{"verified, peer, STALE", "UNREACHABLE from here: iad, sin ", "routes HELD for sin: 10.9.0.0/16, 10.19.0.0/16 (the site's gateways that routed them are away"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}
	if strings.Count(out.String(), "STALE") != 1 {
		t.Errorf("a fresh tunnel shown stale:\n%s", out.String())
	}
}

// TestMigrationResultRate: the rate a migration's result shows is the
// allocated data per second only for one done in one go; one running,
// stopped or resumed shows what it read per second; one refused before
// its scan does not claim an empty image.
func TestMigrationResultRate(t *testing.T) {
	for _, tc := range []struct {
		state   string
		stats   migrate.Stats
		want    string
		notWant string
	}{
		{migrate.StateDone, migrate.Stats{VirtualBytes: 8 << 20, AllocatedBytes: 4 << 20, BytesRead: 4 << 20, Duration: 2 * time.Second}, "(2.0 MiB/s of allocated data)", "read)"},
		{migrate.StateRunning, migrate.Stats{VirtualBytes: 8 << 20, AllocatedBytes: 4 << 20, BytesRead: 1 << 20, Duration: 2 * time.Second}, "(512.0 KiB/s read)", "allocated data)"},
		{migrate.StateDone, migrate.Stats{VirtualBytes: 8 << 20, AllocatedBytes: 4 << 20, BytesRead: 2 << 20, ChunksResumed: 2, Duration: 2 * time.Second}, "(1.0 MiB/s read)", "allocated data)"},
		{migrate.StateDenied, migrate.Stats{VirtualBytes: 8 << 20}, "allocation not read", "0 B allocated"},
	} {
		var out bytes.Buffer
		printMigrationResult(&out, &mesh.MigrationEvent{ID: "m1", Record: &migrate.SendRecord{ID: "m1", State: tc.state, Stats: tc.stats}})
		if !strings.Contains(out.String(), tc.want) || strings.Contains(out.String(), tc.notWant) {
			t.Errorf("%s %+v: want %q and not %q:\n%s", tc.state, tc.stats, tc.want, tc.notWant, out.String())
		}
	}
}
