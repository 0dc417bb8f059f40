package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/mesh"
)

func identityCommand() *cli.Command {
	return &cli.Command{
		Name:  "identity",
		Usage: "inspect a gateway identity, or obtain one from the configured back end (embedded CA or Vault)",
		Subcommands: []*cli.Command{
			{
				Name:      "show",
				Usage:     "show a gateway identity and whether the mesh would accept it now",
				UsageText: "skybridge identity show --dir DIR [--json]",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "dir", Usage: "identity directory (node.crt, node.key, ca.crt, crl.pem)", Required: true},
					jsonFlag,
				},
				Action: identityShow,
			},
			{
				Name:  "csr",
				Usage: "make this gateway's key (kept in --dir, 0600) and a certificate signing request for the CA",
				UsageText: "skybridge identity csr --dir DIR --node NAME --site SITE --region REGION --provider P --jurisdiction CC \\\n" +
					"    --overlay-ip IP [--route CIDR ...] [--label KEY=VALUE ...] > node.csr",
				Flags: append(attributeFlags(),
					&cli.StringFlag{Name: "dir", Usage: "identity directory to keep the key in", Required: true},
				),
				Action: identityCSR,
			},
			{
				Name:      "request",
				Usage:     "obtain or renew this gateway's identity as its configuration says (Vault PKI, or a local CA with ca_dir)",
				UsageText: "skybridge identity request --config gateway.hcl [--json]",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "config", Usage: "the gateway's configuration (its node block says what to request)", Required: true},
					jsonFlag,
				},
				Action: identityRequest,
			},
		},
	}
}

// identityInfo is the public view of an identity directory.
type identityInfo struct {
	Dir           string           `json:"dir"`
	Attributes    certs.Attributes `json:"attributes"`
	Serial        string           `json:"serial"`
	Fingerprint   string           `json:"sha256_fingerprint"`
	NotBefore     time.Time        `json:"not_before"`
	NotAfter      time.Time        `json:"not_after"`
	RenewAfter    time.Time        `json:"renew_after"`
	Accepted      bool             `json:"accepted"`
	Refusal       string           `json:"refusal,omitempty"`
	RefusalReason certs.Reason     `json:"refusal_reason,omitempty"`
	CRLNumber     string           `json:"crl_number,omitempty"`
	// Unchecked: the directory holds no revocation list of the CA that
	// signed it (crl.pem missing, or another CA's), so revocation was not
	// checked.
	Unchecked    bool   `json:"revocation_unchecked,omitempty"`
	WireGuardKey string `json:"wireguard_public_key,omitempty"`
	GossipKeys   int    `json:"gossip_keys"`
	// GossipProblem is why the gossip keyring here cannot be used (a
	// gateway with this directory would not start); empty if it can, or
	// if there is none (a Vault-backed gateway reads it from Vault).
	GossipProblem string `json:"gossip_problem,omitempty"`
}

func describeIdentity(ctx context.Context, dir string, id *certs.NodeIdentity, tb *certs.TrustBundle) identityInfo {
	c := id.Certificate()
	info := identityInfo{
		Dir: dir, Attributes: *id.Attributes(), Serial: certs.FormatSerial(c.SerialNumber), Fingerprint: certs.Fingerprint(c),
		NotBefore: c.NotBefore, NotAfter: c.NotAfter, RenewAfter: certs.RenewalTime(c.NotBefore, c.NotAfter, 0.5),
	}
	if tb != nil {
		if crl := tb.CRL(); crl != nil {
			info.CRLNumber = crl.Number.String()
		}
		info.Unchecked = tb.CRLFor(c) == nil
		_, err := tb.VerifyCertificate(c, time.Now())
		info.Accepted = err == nil
		if err != nil {
			info.Refusal, info.RefusalReason = err.Error(), certs.ReasonOf(err)
		}
	}
	// Only the public halves: the WireGuard key is derived, the keyring
	// counted. Neither file is created by looking.
	secrets := certs.DirSecrets{Dir: dir}
	if _, err := os.Stat(filepath.Join(dir, certs.FileWireGuardKey)); err == nil {
		if k, err := secrets.WireGuardKey(ctx, id.Attributes().Node); err == nil {
			info.WireGuardKey = k.Public().String()
		}
	}
	if _, err := os.Stat(filepath.Join(dir, certs.FileGossipKeyring)); err == nil {
		if kr, err := secrets.GossipKeyring(ctx); err == nil {
			info.GossipKeys = kr.Len()
		} else {
			info.GossipProblem = err.Error()
		}
	}
	return info
}

func identityShow(c *cli.Context) error {
	// Exit 1 says the mesh would refuse this identity; 2 that it could
	// not be judged (nothing to judge, or no trust to judge it by), as
	// for the other commands that give a verdict.
	dir := c.String("dir")
	id, err := certs.LoadNodeIdentity(dir)
	if err != nil {
		return cli.Exit(err.Error(), exitError)
	}
	tb, tbErr := certs.LoadTrustBundle(dir, netip.Prefix{})
	info := describeIdentity(c.Context, dir, id, tb)
	if tbErr != nil {
		info.Refusal = "cannot judge: " + tbErr.Error()
	}
	if c.Bool("json") {
		if err := printJSON(c.App.Writer, info); err != nil {
			return err
		}
	} else {
		printIdentity(c.App.Writer, info)
	}
	if tbErr != nil {
		return cli.Exit("", exitError)
	}
	if !info.Accepted || info.GossipProblem != "" {
		return cli.Exit("", exitDeny) // scripts can test an identity by exit code
	}
	return nil
}

func printIdentity(w io.Writer, info identityInfo) {
	a := info.Attributes
	labels := make([]string, 0, len(a.Labels))
	for k, v := range a.Labels {
		labels = append(labels, k+"="+v)
	}
	sort.Strings(labels)
	status := "accepted by the mesh CA"
	if info.Unchecked {
		status += " (revocation NOT checked: no revocation list of the CA here; copy the CA's crl.pem into " + info.Dir + ")"
	}
	if !info.Accepted {
		status = "REFUSED: " + info.Refusal
	}
	rows := [][2]string{
		{"node", a.Node}, {"site", a.Site}, {"region", a.Region}, {"provider", a.Provider}, {"jurisdiction", a.Jurisdiction},
		{"overlay ip", a.OverlayIP.String()}, {"routes", routesString(a.Routes)}, {"labels", strings.Join(labels, ", ")},
		{"serial", info.Serial}, {"sha256", info.Fingerprint},
		{"valid", info.NotBefore.UTC().Format(time.RFC3339) + " .. " + info.NotAfter.UTC().Format(time.RFC3339)},
		{"renew after", info.RenewAfter.UTC().Format(time.RFC3339)},
		{"status", status},
	}
	if info.CRLNumber != "" {
		rows = append(rows, [2]string{"crl", "#" + info.CRLNumber})
	}
	if info.WireGuardKey != "" {
		rows = append(rows, [2]string{"wireguard key", info.WireGuardKey})
	}
	switch {
	case info.GossipProblem != "":
		rows = append(rows, [2]string{"gossip keys", "UNUSABLE: " + info.GossipProblem})
	case info.GossipKeys == 0:
		rows = append(rows, [2]string{"gossip keys", "none here (a Vault-backed gateway reads them from Vault; a file-backed one needs gossip.keyring: skybridge ca issue --out copies it)"})
	default:
		rows = append(rows, [2]string{"gossip keys", fmt.Sprint(info.GossipKeys)})
	}
	for _, r := range rows {
		if r[1] == "" {
			r[1] = "(none)"
		}
		fmt.Fprintf(w, "%-14s %s\n", r[0]+":", r[1])
	}
}

func identityCSR(c *cli.Context) error {
	attrs, err := attributesFromFlags(c)
	if err != nil {
		return err
	}
	if err := attrs.Validate(netip.Prefix{}); err != nil {
		return attributesUsageError(err)
	}
	// The key made here (or found here) is the one certified: another
	// gateway's, or one beside a CA or signer key, would be handed over.
	dir := c.String("dir")
	if err := checkOutDir(dir, attrs.Node); err != nil {
		return usageError("--dir %v", err)
	}
	if err := checkOutKind("--dir", dir, nil, outGateway); err != nil {
		return err
	}
	csr, err := certs.PrepareCSR(dir, attrs)
	if err != nil {
		return err
	}
	_, err = c.App.Writer.Write(csr)
	return err
}

func identityRequest(c *cli.Context) error {
	// Read as `gateway run` reads it, with the same defaults (an identity
	// in state_dir/identity, the file back end): what it asks for is the
	// identity that gateway will look for.
	s, err := mesh.LoadConfig(c.String("config"))
	if err != nil {
		return err
	}
	if s.Node.Name == "" {
		return fmt.Errorf("%s has no node block: it says which attributes to request", c.String("config"))
	}
	p, err := certs.Open(c.Context, s.Identity, nil)
	if err != nil {
		return err
	}
	defer p.Close()
	if p.Issuer() == nil {
		if err := noIdentity(s, "; identity request has no issuer to ask here: that takes identity.ca_dir or a Vault back end"); err != nil {
			return err
		}
	}
	attrs, err := s.Node.Attributes(p.MeshPrefix())
	if err != nil {
		return err
	}
	// With an issuer, the gossip keyring comes first: a certificate issued
	// into a directory the gateway then cannot start from is one more in
	// the CA's index, and the way out (ca issue) would issue another. A
	// local CA hands over its copy, as `ca issue` does.
	if ca, ok := p.Issuer().(*certs.CA); ok {
		if err := checkCAKeyring(c.Context, ca); err != nil {
			return err
		}
		if err := ca.CopyGossipKeyring(c.Context, s.Identity.Dir); err != nil {
			return fmt.Errorf("copy the mesh's gossip keyring from %s into %s: %w", ca.Dir(), s.Identity.Dir, err)
		}
	}
	if p.Issuer() != nil {
		if _, err := p.Secrets().GossipKeyring(c.Context); err != nil {
			return err
		}
	}
	id, tb, err := p.Identity(c.Context, attrs)
	if err != nil {
		return err
	}
	// Make sure the gateway's other secrets exist too, so it can start.
	if _, err := p.Secrets().WireGuardKey(c.Context, attrs.Node); err != nil {
		return err
	}
	if _, err := p.Secrets().GossipKeyring(c.Context); err != nil {
		return err
	}
	switch {
	case p.Issuer() == nil && p.CanRenew():
		// Said on stderr: the identity is still printed, as asked.
		fmt.Fprintf(c.App.ErrWriter, "skybridge: the identity in %s is renewed through identity.renew_from once past its renewal time (about two thirds of its life), by this command or the running gateway; this is the identity it holds now\n", s.Identity.Dir)
	case p.Issuer() == nil:
		fmt.Fprintf(c.App.ErrWriter, "skybridge: no issuer configured (identity.ca_dir, or a Vault back end): nothing was requested; this is the identity already in %s\n", s.Identity.Dir)
	}
	info := describeIdentity(c.Context, s.Identity.Dir, id, tb)
	if c.Bool("json") {
		return printJSON(c.App.Writer, info)
	}
	printIdentity(c.App.Writer, info)
	return nil
}
