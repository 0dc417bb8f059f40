package e2e

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// Every log a test's gateways and commands write is searched, when the
// test ends, for every secret the test's CA, identity and state
// directories hold: a debug line printing a key would otherwise go
// unnoticed until an operator pasted a log into a ticket. A hit names the
// log and the kind of secret, never the secret.

// secretFiles are the files that hold a secret, by what a failure calls
// them: what `ca init`, `ca issue`, a gateway's start and a Vault burst
// join leave in a directory.
var secretFiles = map[string]string{
	"ca.key":          "the CA's private key",
	"signer.key":      "the policy signer's private key",
	"node.key":        "a node's private key",
	"wireguard.key":   "a WireGuard private key",
	"gossip.keyring":  "a gossip key",
	"operator.token":  "an operator token",
	"vault-secret-id": "a Vault SecretID",
}

// joinToken is the kind of a join token, searched for whole and for its
// secret half.
const joinToken = "a join token"

// minNeedle is the shortest text searched for: shorter, a chance match
// in a log would fail the test. Every secret above is longer.
const minNeedle = 16

// secretSet is what a test's logs must not hold.
type secretSet struct {
	needles map[string]secretSource // by the text searched for
}

type secretSource struct{ kind, from string }

// addDir adds the secrets of the files under dir, at any depth.
func (s *secretSet) addDir(dir string) {
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil // a directory gone meanwhile: what is left is still searched
		}
		if kind, ok := secretFiles[d.Name()]; ok {
			if b, err := os.ReadFile(p); err == nil {
				s.add(kind, p, string(b))
			}
		} else if strings.HasSuffix(d.Name(), ".token") {
			// Join tokens the tests hand to burst gateways by file.
			if b, err := os.ReadFile(p); err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), "sbj1.") {
				s.add(joinToken, p, string(b))
			}
		}
		return nil
	})
}

// add adds a secret held in from (a file, or what a command printed) as
// the forms a leak would show it in.
func (s *secretSet) add(kind, from, content string) {
	if s.needles == nil {
		s.needles = map[string]secretSource{}
	}
	put := func(v string) {
		if _, ok := s.needles[v]; !ok && len(v) >= minNeedle {
			s.needles[v] = secretSource{kind, from}
		}
	}
	if kind == joinToken {
		tok := strings.TrimSpace(content)
		put(tok)
		// The secret half alone, as the token's JSON and a debug print
		// of the parsed token would show it.
		if jt, err := certs.ParseJoinToken(tok); err == nil {
			if len(jt.Secret) > 0 {
				put(base64.RawURLEncoding.EncodeToString(jt.Secret))
				put(hex.EncodeToString(jt.Secret))
			}
			if jt.Vault != nil {
				put(jt.Vault.WrappedSecretID)
			}
		}
		return
	}
	if strings.Contains(content, "-----BEGIN") {
		for _, v := range privateParts(content) {
			put(v)
		}
		return
	}
	for _, line := range strings.Split(content, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") { // the keyring's comment
			continue
		}
		put(line)
		// WireGuard and gossip keys are 32 bytes in base64; WireGuard's
		// UAPI writes them in hex.
		if b, err := base64.StdEncoding.DecodeString(line); err == nil && len(b) == 32 {
			put(hex.EncodeToString(b))
		}
	}
}

// privateParts are the forms of the private keys in a PEM file a leak
// would show: the private scalar in hex and base64, and the PEM lines
// that hold a byte of it, which a key printed whole, as PEM or as base64
// of its DER, holds. Not the other lines: they hold the public key, which
// the certificate shows too.
func privateParts(content string) []string {
	var out []string
	rest := []byte(content)
	for {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			return out
		}
		key, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			key, err = x509.ParseECPrivateKey(blk.Bytes)
		}
		var priv []byte
		switch k := key.(type) {
		case *ecdsa.PrivateKey:
			priv, err = k.Bytes()
		case ed25519.PrivateKey:
			priv = k.Seed()
		}
		at := bytes.Index(blk.Bytes, priv)
		if err != nil || len(priv) == 0 || at < 0 {
			// A key of a kind not known here: every line, a false hit
			// on its public part rather than a leak let through.
			at, priv = 0, blk.Bytes
		}
		out = append(out, hex.EncodeToString(priv), base64.StdEncoding.EncodeToString(priv))
		// pem.Encode's lines: 64 characters, 48 bytes each.
		enc := base64.StdEncoding.EncodeToString(blk.Bytes)
		for i := 0; i < len(enc); i += 64 {
			if from, to := i/4*3, i/4*3+48; from < at+len(priv) && at < to {
				out = append(out, enc[i:min(i+64, len(enc))])
			}
		}
	}
}

// leaks names, for each log that holds one of the secrets, the log and
// the secret's kind and file.
func (s *secretSet) leaks(logs []string) []string {
	var out []string
	for _, l := range logs {
		b, err := os.ReadFile(l)
		if err != nil {
			continue // removed by what the test ran: nothing of it to read
		}
		seen := map[secretSource]bool{}
		for v, src := range s.needles {
			if !seen[src] && strings.Contains(string(b), v) {
				seen[src] = true
				out = append(out, fmt.Sprintf("%s holds %s (of %s)", l, src.kind, src.from))
			}
		}
	}
	slices.Sort(out)
	return out
}

// logsUnder lists the logs under dir, at any depth: the gateways' and
// helpers' output the harness keeps, the demo's gateway.log, audit logs.
func logsUnder(dir string) []string {
	var logs []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(d.Name(), ".log") {
			logs = append(logs, p)
		}
		return nil
	})
	return logs
}

// noSecretsInLogs fails t for each log under dir that holds a secret of
// a file under dir or of s (secrets the test was given, or read from
// files gone since).
func noSecretsInLogs(t *testing.T, dir string, s *secretSet) {
	t.Helper()
	if s == nil {
		s = &secretSet{}
	}
	s.addDir(dir)
	for _, leak := range s.leaks(logsUnder(dir)) {
		t.Errorf("%s: a log must hold no secret; find what printed it and leave the secret out", leak)
	}
}

// TestSecretScan: the search finds each secret in the forms a leak would
// show it, says which, and takes nothing public for a secret.
func TestSecretScan(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	sb(t, 0, "ca", "init", "--dir", ca)
	gw := filepath.Join(dir, "gw", "identity")
	sb(t, 0, issueArgs(ca, gw, "gw", "onprem-zrh", "CH", "100.96.0.1")...)
	wg, err := certs.GenerateWGKey()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(gw, "wireguard.key"), []byte(wg.Base64Secret()+"\n"), 0o600)
	caPEM, _ := os.ReadFile(filepath.Join(ca, "ca.crt"))
	blk, _ := pem.Decode(caPEM)
	if blk == nil {
		t.Fatalf("ca.crt: no PEM:\n%s", caPEM)
	}
	caCert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	jt, err := certs.NewJoinToken("burst-ams", caCert, []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:7947")}, time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	var given secretSet
	given.add(joinToken, "burst up", jt.Encode())

	line := func(file string, n int) string { // the nth line of a file
		b, _ := os.ReadFile(file)
		return strings.Split(string(b), "\n")[n]
	}
	keyring := strings.TrimSpace(line(filepath.Join(gw, "gossip.keyring"), 1))
	gk, _ := base64.StdEncoding.DecodeString(keyring)
	crt, _ := os.ReadFile(filepath.Join(gw, "node.crt"))
	wgb := wg.Bytes()
	logs := map[string]string{
		"clean.log":     "level=INFO msg=started public_key=" + wg.Public().String() + " token=" + jt.ID + "\n" + string(crt),
		"cakey.log":     `{"msg":"loaded","key":"` + line(filepath.Join(ca, "ca.key"), 2) + `"}`,
		"nodekey.log":   "key " + line(filepath.Join(gw, "node.key"), 1),
		"gossiphex.log": "keyring [" + hex.EncodeToString(gk) + "]",
		"wguapi.log":    "private_key=" + hex.EncodeToString(wgb[:]),
		"token.log":     "token " + base64.RawURLEncoding.EncodeToString(jt.Secret),
	}
	for name, text := range logs {
		os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644)
	}
	given.addDir(dir)
	got := given.leaks(logsUnder(dir))
	want := []string{
		filepath.Join(dir, "cakey.log") + " holds the CA's private key (of " + filepath.Join(ca, "ca.key") + ")",
		filepath.Join(dir, "gossiphex.log") + " holds a gossip key (of " + filepath.Join(ca, "gossip.keyring") + ")",
		filepath.Join(dir, "nodekey.log") + " holds a node's private key (of " + filepath.Join(gw, "node.key") + ")",
		filepath.Join(dir, "token.log") + " holds a join token (of burst up)",
		filepath.Join(dir, "wguapi.log") + " holds a WireGuard private key (of " + filepath.Join(gw, "wireguard.key") + ")",
	}
	if !slices.Equal(got, want) {
		t.Errorf("leaks found:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
