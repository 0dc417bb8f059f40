package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/migrate"
)

func caCommand() *cli.Command {
	caFlag := &cli.StringFlag{Name: "ca", Usage: "CA directory, as made by ca init", Required: true, EnvVars: []string{"SKYBRIDGE_CA"}}
	return &cli.Command{
		Name:  "ca",
		Usage: "run the embedded mesh CA: admit, list and revoke gateways",
		Subcommands: []*cli.Command{
			{
				Name:      "init",
				Usage:     "create a new mesh CA",
				UsageText: "skybridge ca init --dir DIR [--mesh-cidr 100.96.0.0/16] [--name NAME]",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "dir", Usage: "directory to create the CA in: a new one, or an empty one (a mount point, or . will do)", Required: true},
					&cli.StringFlag{Name: "mesh-cidr", Value: certs.DefaultMeshPrefix.String(), Usage: "overlay range all gateway overlay IPs must lie in: private, shared (100.64.0.0/10) or unique local space, /24 or wider"},
					&cli.StringFlag{Name: "name", Value: "skybridge mesh", Usage: `the CA certificate is named "NAME CA"`},
					&cli.DurationFlag{Name: "validity", Value: certs.DefaultCAValidity, Usage: "lifetime of the CA certificate"},
				},
				Action: caInit,
			},
			{
				Name:  "issue",
				Usage: "issue a gateway identity binding its node, site, region, provider, jurisdiction, overlay IP and routes",
				UsageText: "skybridge ca issue --ca DIR --node NAME --site SITE --region REGION --provider onprem|aws|gcp|azure|... \\\n" +
					"    --jurisdiction CC --overlay-ip IP [--route CIDR ...] [--label KEY=VALUE ...] [--ttl DURATION] [--csr FILE] --out DIR",
				Flags: append(attributeFlags(),
					caFlag,
					&cli.DurationFlag{Name: "ttl", Value: certs.DefaultNodeTTL, Usage: "certificate lifetime"},
					&cli.StringFlag{Name: "csr", Usage: "sign this PEM CSR made on the gateway instead of generating its key here"},
					&cli.StringFlag{Name: "out", Usage: "directory to write node.crt, node.key, ca.crt, crl.pem and gossip.keyring to", Required: true},
					jsonFlag,
				),
				Action: caIssue,
			},
			{
				Name:      "issue-signer",
				Usage:     "certify a policy signer, so a compliance team can sign residency policies without the CA key",
				UsageText: "skybridge ca issue-signer --ca DIR --name NAME [--ttl DURATION] --out DIR",
				Flags: []cli.Flag{
					caFlag,
					&cli.StringFlag{Name: "name", Usage: "signer name, e.g. compliance", Required: true},
					&cli.DurationFlag{Name: "ttl", Value: defaultSignerTTL, Usage: "certificate lifetime"},
					&cli.StringFlag{Name: "out", Usage: "directory to write signer.crt and signer.key (0600) to", Required: true},
				},
				Action: caIssueSigner,
			},
			{
				Name:  "revoke",
				Usage: "revoke gateway (or policy signer) certificates: they are refused mesh-wide once the new revocation list spreads",
				UsageText: "skybridge ca revoke --ca DIR (--serial SERIAL ... | --node NAME | --signer NAME) [--reason keyCompromise|superseded|...]\n\n" +
					"--node revokes the gateway's certificates and its enrollment endpoint's (the gateway holds its key),\n" +
					"never those of a policy signer of the same name, which --signer revokes.\n" +
					"A serial revoked for keyCompromise takes with it the certificates renewed from it (identity.renew_from):\n" +
					"whoever holds its key may have had them issued.",
				Flags: []cli.Flag{
					caFlag,
					&cli.StringSliceFlag{Name: "serial", Usage: "serial to revoke, as ca list prints it (repeatable)"},
					&cli.StringFlag{Name: "node", Usage: "revoke every valid certificate of this gateway, and of its enrollment endpoint"},
					&cli.StringFlag{Name: "signer", Usage: "revoke every valid certificate of this policy signer (as ca issue-signer --name named it)"},
					&cli.StringFlag{Name: "reason", Value: "unspecified", Usage: "one of " + strings.Join(certs.RevocationReasons(), ", ")},
					jsonFlag,
				},
				Action: caRevoke,
			},
			{
				Name:   "list",
				Usage:  "list the certificates this CA issued",
				Flags:  []cli.Flag{caFlag, jsonFlag},
				Action: caList,
			},
			{
				Name:  "crl",
				Usage: "show the revocation list, or re-sign it with --refresh",
				Flags: []cli.Flag{
					caFlag,
					&cli.BoolFlag{Name: "refresh", Usage: "re-sign the list with a new number and validity"},
					jsonFlag,
				},
				Action: caCRL,
			},
		},
	}
}

func caInit(c *cli.Context) error {
	if err := givenEmpty(c, "name"); err != nil {
		return err
	}
	prefix, err := netip.ParsePrefix(c.String("mesh-cidr"))
	if err != nil {
		return usageError("--mesh-cidr %q is not a CIDR prefix such as 100.96.0.0/16", c.String("mesh-cidr"))
	}
	if prefix != prefix.Masked() {
		// Suggested only where it would be taken: 100.64.0.0/8 masks
		// to public space.
		if err := certs.CheckMeshPrefix(prefix.Masked()); err != nil {
			return usageError("--mesh-cidr %s has host bits set, and its range will not do either: %v", prefix, err)
		}
		return usageError("--mesh-cidr %s has host bits set: did you mean %s?", prefix, prefix.Masked())
	}
	if err := checkMeshPrefix(prefix); err != nil {
		return err
	}
	// A CA shorter-lived than the certificates it issues by default
	// could issue none of them; and one that lives exactly as long, none
	// either: a certificate issued after it was made ends after it does.
	if v := c.Duration("validity"); v < minCAValidity {
		return usageError("--validity %s: a CA must outlive the certificates it issues (%s by default) issued up to a day after it is made; give at least %s, e.g. --validity 87600h for ten years", v, certs.DefaultNodeTTL, minCAValidity)
	}
	ca, err := certs.InitCA(c.String("dir"), certs.InitOptions{Name: c.String("name"), MeshPrefix: prefix, Validity: c.Duration("validity")})
	if err != nil {
		return err
	}
	cert := ca.Certificate()
	fmt.Fprintf(c.App.Writer, "created mesh CA %q in %s\n  mesh overlay range: %s\n  valid until:        %s\n  key:                ECDSA P-256, %s (mode 0600)\n",
		cert.Subject.CommonName, ca.Dir(), ca.MeshPrefix(), cert.NotAfter.UTC().Format(time.RFC3339), filepath.Join(ca.Dir(), "ca.key"))
	return nil
}

// minCAValidity is the shortest life ca init gives a CA: a certificate
// of the default life, issued a day after it.
const minCAValidity = certs.DefaultNodeTTL + 24*time.Hour

func checkMeshPrefix(p netip.Prefix) error {
	if err := certs.CheckMeshPrefix(p); err != nil {
		return usageError("--mesh-cidr %v", err)
	}
	return nil
}

// issueOutput is what `ca issue --json` prints.
type issueOutput struct {
	Serial      string           `json:"serial"`
	Fingerprint string           `json:"sha256_fingerprint"`
	NotBefore   time.Time        `json:"not_before"`
	NotAfter    time.Time        `json:"not_after"`
	Attributes  certs.Attributes `json:"attributes"`
	Out         string           `json:"out"`
}

func caIssue(c *cli.Context) error {
	attrs, err := attributesFromFlags(c)
	if err != nil {
		return err
	}
	// What the flags say by themselves is checked as a usage mistake; the
	// CA checks the rest (the overlay range, IPs taken).
	if err := attrs.Validate(netip.Prefix{}); err != nil {
		return attributesUsageError(err)
	}
	if err := checkTTL(c, certs.DefaultNodeTTL); err != nil {
		return err
	}
	ca, err := certs.OpenCA(c.String("ca"))
	if err != nil {
		return err
	}
	out := c.String("out")
	if err := checkOutDir(out, attrs.Node); err != nil {
		return err
	}
	// What could fail after signing is checked before: a certificate
	// issued and not delivered stays valid in the index and holds its
	// overlay IP.
	if err := checkOutKind("--out", out, ca, outGateway); err != nil {
		return err
	}
	if err := checkCAKeyring(c.Context, ca); err != nil {
		return err
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		return err
	}
	tb = keepNewerCRLs(c, ca, tb, out)

	var (
		cert     *x509.Certificate
		identity *certs.NodeIdentity
	)
	if csrPath := c.String("csr"); csrPath != "" {
		b, err := os.ReadFile(csrPath)
		if err != nil {
			return fmt.Errorf("read CSR: %w", err)
		}
		csr, asked, err := certs.ParseCSR(b)
		if err != nil {
			return fmt.Errorf("%s: %w", csrPath, err)
		}
		// What the gateway asked for is what its node block says: a
		// certificate of other attributes would be refused by it at its
		// start (and a site, jurisdiction or label decided here by a
		// flag the CSR contradicts is a mistake either side).
		if !asked.Equal(&attrs) {
			return fmt.Errorf("%s asks for other attributes than the flags (CSR → flags: %s): issue what the gateway asked for, or have it make a new CSR (skybridge identity csr)", csrPath, strings.Join(asked.Differences(&attrs), ", "))
		}
		if err := certs.CheckKeyFor(out, csr.PublicKey); err != nil {
			return usageError("--out %v", err)
		}
		cert, err = ca.Issue(certs.IssueRequest{Attributes: attrs, PublicKey: csr.PublicKey, TTL: c.Duration("ttl")})
		if err != nil {
			return err
		}
	} else {
		identity, err = ca.IssueIdentity(attrs, c.Duration("ttl"), time.Now())
		if err != nil {
			return err
		}
		cert = identity.Certificate()
	}

	// What the gateway needs beside its certificate goes first: the
	// certificate is then the last thing written, and one that failed to
	// be written is one nobody holds.
	err = tb.Save(out)
	if err == nil {
		err = ca.CopyGossipKeyring(c.Context, out)
	}
	if err == nil {
		if identity != nil {
			err = identity.Save(out, nil)
		} else {
			err = certs.SaveCertificate(out, cert, nil)
		}
	}
	if err != nil && certs.Holds(out, cert) {
		// Written, though something after it failed: revoking it would
		// leave the directory with a revoked identity.
		return fmt.Errorf("%w; the certificate (serial %s) is in %s and valid", err, certs.FormatSerial(cert.SerialNumber), out)
	}
	if err != nil {
		// Not delivered: take it back, so it neither stays valid nor
		// holds its overlay IP against the retry.
		if rerr := ca.TakeBack(cert.SerialNumber, time.Now()); rerr != nil {
			return fmt.Errorf("%w (and revoking the certificate issued for it, serial %s: %v)", err, certs.FormatSerial(cert.SerialNumber), rerr)
		}
		return fmt.Errorf("%w; the certificate issued for it (serial %s) is revoked", err, certs.FormatSerial(cert.SerialNumber))
	}

	res := issueOutput{
		Serial: certs.FormatSerial(cert.SerialNumber), Fingerprint: certs.Fingerprint(cert),
		NotBefore: cert.NotBefore, NotAfter: cert.NotAfter, Attributes: attrs, Out: out,
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, res)
	}
	fmt.Fprintf(c.App.Writer, "issued %s for node %s of site %s\n  serial:      %s\n  overlay IP:  %s\n  routes:      %s\n  valid until: %s\n  written to:  %s\n",
		"certificate", attrs.Node, attrs.Site, res.Serial, attrs.OverlayIP, routesString(attrs.Routes), cert.NotAfter.UTC().Format(time.RFC3339), out)
	return nil
}

// keepNewerCRLs returns tb with the lists of out's crl.pem that are newer
// than its own: the CA's would replace them, and roll back what they
// revoke (a gateway's list came by gossip, the CA directory was restored
// from a backup). The CA takes the newer list back, as a gateway holding
// it does (Provider.Trust): its next list would be numbered below what
// the mesh holds, and ignored by every gateway. A crl.pem that cannot be
// read or parsed holds nothing to keep.
func keepNewerCRLs(c *cli.Context, ca *certs.CA, tb *certs.TrustBundle, out string) *certs.TrustBundle {
	b, err := os.ReadFile(filepath.Join(out, "crl.pem"))
	if err != nil {
		return tb
	}
	crls, err := certs.ParseCRLs(b)
	if err != nil {
		return tb
	}
	merged, newer := tb.WithNewerCRLs(crls)
	if !newer {
		return tb
	}
	held, caList := merged.CRL(), tb.CRL()
	if took, err := ca.TakeNewerCRL(held); err != nil {
		fmt.Fprintf(c.App.ErrWriter, "skybridge: %s holds revocation list #%s, newer than the CA directory's #%s (restored from a backup?), which could not be brought up to date (%v): the CA's next lists would be ignored by every gateway; copy %s into %s\n",
			out, held.Number, caList.Number, err, filepath.Join(out, "crl.pem"), ca.Dir())
	} else if took {
		fmt.Fprintf(c.App.ErrWriter, "skybridge: %s holds revocation list #%s, newer than the CA directory's #%s (restored from a backup?): it is kept there, and written back into %s, so that the CA's next lists carry on from it\n",
			out, held.Number, caList.Number, ca.Dir())
		// A revocation the CA made since it fell behind has the CA sign
		// the next list at once, with both lists' revocations: that one
		// goes out.
		if now, err := ca.TrustBundle(); err == nil {
			merged, _ = merged.WithNewerCRLs(now.CRLs())
		}
	}
	return merged
}

// attributeFlags are the flags that describe a gateway, shared by every
// command that asks for a certificate.
func attributeFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "node", Usage: "gateway name", Required: true},
		&cli.StringFlag{Name: "site", Usage: "site the gateway serves", Required: true},
		&cli.StringFlag{Name: "region", Usage: "region of the site (a cloud region, or a datacenter name)", Required: true},
		&cli.StringFlag{Name: "provider", Usage: "onprem, aws, gcp, azure, ...", Required: true},
		&cli.StringFlag{Name: "jurisdiction", Usage: "ISO 3166-1 alpha-2 country code of the site", Required: true},
		&cli.StringFlag{Name: "overlay-ip", Usage: "the gateway's address on the mesh overlay", Required: true},
		&cli.StringSliceFlag{Name: "route", Usage: "site prefix routed behind the gateway (repeatable)"},
		&cli.StringSliceFlag{Name: "label", Usage: "site label KEY=VALUE, e.g. classes=pii-eu (repeatable)"},
	}
}

func attributesFromFlags(c *cli.Context) (certs.Attributes, error) {
	ip, err := netip.ParseAddr(c.String("overlay-ip"))
	if err != nil {
		return certs.Attributes{}, usageError("--overlay-ip %q is not an IP address", c.String("overlay-ip"))
	}
	routes, err := certs.ParseRoutes(c.StringSlice("route"))
	if err != nil {
		return certs.Attributes{}, usageError("--route: %v", err)
	}
	labels, err := certs.ParseLabels(c.StringSlice("label"))
	if err != nil {
		return certs.Attributes{}, usageError("--label: %v", err)
	}
	if err := migrate.CheckCapacityLabels(labels); err != nil {
		return certs.Attributes{}, usageError("--label: %v: give a plain number (--label %s=64, --label %s=256)", err, migrate.LabelCapacityCPU, migrate.LabelCapacityMemory)
	}
	a := certs.Attributes{
		Node: c.String("node"), Site: c.String("site"), Region: c.String("region"), Provider: c.String("provider"),
		Jurisdiction: strings.ToUpper(c.String("jurisdiction")), OverlayIP: ip, Routes: routes, Labels: labels,
	}
	a.Normalize()
	return a, nil
}

// attributesUsageError is a usage error listing what is wrong with the
// attribute flags, on one line.
func attributesUsageError(err error) error {
	return usageError("%s", strings.ReplaceAll(err.Error(), "\n", "; "))
}

// sameDir reports whether a and b name the same directory.
func sameDir(a, b string) (bool, error) {
	fa, err := os.Stat(a)
	if err != nil {
		return false, err
	}
	fb, err := os.Stat(b)
	if err != nil {
		return false, err
	}
	return os.SameFile(fa, fb), nil
}

// checkOutDir refuses to mix two gateways' identities in one directory:
// re-issuing for the same node (renewal) is fine, overwriting another
// node's key is a mistake that would take that gateway off the mesh. The
// certificate says whose directory it is, whether or not its key loads.
func checkOutDir(dir, node string) error {
	if have := certs.NodeCertifiedIn(dir); have != "" && have != node {
		return fmt.Errorf("%s already holds the identity of node %q; use one directory per gateway", dir, have)
	}
	return nil
}

// The kinds of key ca issue and ca issue-signer write.
const (
	outGateway = "gateway"
	outSigner  = "policy signer"
)

// checkOutKind refuses a directory (given as flag) that is a file, or
// holds a key of another kind than the one to be written there: the CA's
// (whoever can read the one can then read both), a gateway's or a policy
// signer's. Each key has a directory of its own, so that it goes to its
// holder alone. ca may be nil (identity csr has none at hand: a CA key in
// the directory still says whose it is).
func checkOutKind(flag, out string, ca *certs.CA, kind string) error {
	fi, err := os.Stat(out)
	if err == nil && !fi.IsDir() {
		return usageError("%s %s is a file: name a directory for the %s", flag, out, kind)
	}
	if err != nil {
		return nil // a new directory
	}
	if ca != nil {
		if same, _ := sameDir(out, ca.Dir()); same {
			return usageError("%s is the CA directory: the %s's key would sit beside the CA key; name a directory of its own", flag, kind)
		}
	}
	holds := func(name string) bool {
		_, err := os.Lstat(filepath.Join(out, name))
		return err == nil
	}
	switch {
	case holds("ca.key"):
		return usageError("%s %s holds a CA key: the %s's key would sit beside it; name a directory of its own", flag, out, kind)
	case kind != outGateway && (holds("node.key") || holds("node.crt")):
		return usageError("%s %s is a gateway's identity directory: the %s's key would be handed over with the gateway's; name a directory of its own", flag, out, kind)
	case kind != outSigner && (holds("signer.key") || holds("signer.crt")):
		return usageError("%s %s is a policy signer's directory: the %s's key would be handed over with the signer's; name a directory of its own", flag, out, kind)
	}
	return nil
}

// defaultSignerTTL is how long a policy signer's certificate lasts unless
// --ttl says.
const defaultSignerTTL = 365 * 24 * time.Hour

// checkTTL refuses a --ttl that is not positive: the CA would read 0 as
// its own default, which need not be the flag's (def).
func checkTTL(c *cli.Context, def time.Duration) error {
	if ttl := c.Duration("ttl"); ttl <= 0 {
		return usageError("--ttl %s: give a positive lifetime, such as %s (the default)", ttl, def)
	}
	return nil
}

func caIssueSigner(c *cli.Context) error {
	if err := checkTTL(c, defaultSignerTTL); err != nil {
		return err
	}
	// As for gateways: renewing a signer in place is fine, replacing
	// another one's key would leave its holder unable to sign.
	if have := certs.SignerCertifiedIn(c.String("out")); have != "" && have != c.String("name") {
		return fmt.Errorf("%s already holds policy signer %q; use one directory per signer", c.String("out"), have)
	}
	ca, err := certs.OpenCA(c.String("ca"))
	if err != nil {
		return err
	}
	if err := checkOutKind("--out", c.String("out"), ca, outSigner); err != nil {
		return err
	}
	s, err := ca.NewPolicySigner(c.String("name"), c.Duration("ttl"), time.Now())
	if err != nil {
		return err
	}
	if err := s.Save(c.String("out")); err != nil {
		serial := s.Certificate().SerialNumber
		if got, lerr := certs.LoadPolicySigner(c.String("out")); lerr == nil && got.Certificate().SerialNumber.Cmp(serial) == 0 {
			return fmt.Errorf("%w; the signer (serial %s) is in %s and valid", err, certs.FormatSerial(serial), c.String("out"))
		}
		// Not delivered: a signer whose key nobody holds is taken back,
		// as ca issue does with a gateway certificate.
		if _, rerr := ca.RevokeSerials([]*big.Int{serial}, "cessationOfOperation", time.Now()); rerr != nil {
			return fmt.Errorf("%w (and revoking the signer certificate issued for it, serial %s: %v)", err, certs.FormatSerial(serial), rerr)
		}
		return fmt.Errorf("%w; the signer certificate issued for it (serial %s) is revoked", err, certs.FormatSerial(serial))
	}
	fmt.Fprintf(c.App.Writer, "issued %s, valid until %s, written to %s\n", s, s.Certificate().NotAfter.UTC().Format(time.RFC3339), c.String("out"))
	return nil
}

type revokeOutput struct {
	Revoked   []certs.IssuedCert `json:"revoked"`
	CRLNumber string             `json:"crl_number"`
}

func caRevoke(c *cli.Context) error {
	serialArgs, node, signer := c.StringSlice("serial"), c.String("node"), c.String("signer")
	given := 0
	for _, g := range []bool{len(serialArgs) > 0, node != "", signer != ""} {
		if g {
			given++
		}
	}
	if given != 1 {
		return usageError("give either --serial (one or more), --node or --signer")
	}
	if reason := c.String("reason"); !slices.Contains(certs.RevocationReasons(), reason) {
		return usageError("--reason %q: want one of %s", reason, strings.Join(certs.RevocationReasons(), ", "))
	}
	ca, err := certs.OpenCA(c.String("ca"))
	if err != nil {
		return err
	}
	var done []certs.IssuedCert
	switch {
	case node != "":
		done, err = ca.RevokeNode(node, c.String("reason"), time.Now())
	case signer != "":
		done, err = ca.RevokeSigner(signer, c.String("reason"), time.Now())
	default:
		serials := make([]*big.Int, 0, len(serialArgs))
		for _, s := range serialArgs {
			n, err := certs.ParseSerial(s)
			if err != nil {
				return usageError("--serial: %v", err)
			}
			serials = append(serials, n)
		}
		done, err = ca.RevokeSerials(serials, c.String("reason"), time.Now())
		if err != nil {
			// The CA names a serial as it writes them (11 for 00:11):
			// the one not found is said as it was typed, to be found
			// on the command line.
			for i, s := range serialArgs {
				if f := certs.FormatSerial(serials[i]); f != s {
					err = errors.New(strings.Replace(err.Error(), "serial "+f+" was not issued", "serial "+s+" was not issued", 1))
				}
			}
		}
	}
	if err != nil {
		return err
	}
	// Revoked, and the new list written: whatever fails from here on
	// says so, or the revocation would be taken for one not made (and,
	// asked again by --node, be refused as of a node with nothing left
	// to revoke).
	crlPath := filepath.Join(ca.Dir(), "crl.pem")
	changed := slices.ContainsFunc(done, func(e certs.IssuedCert) bool { return !e.AlreadyRevoked })
	revokedBut := func(err error) error {
		serials := make([]string, len(done))
		for i, e := range done {
			serials[i] = e.Serial
		}
		if !changed {
			return fmt.Errorf("%s already revoked, on the revocation list in %s; but %w", strings.Join(serials, ", "), crlPath, err)
		}
		return fmt.Errorf("revoked %s, on the revocation list written to %s; but %w", strings.Join(serials, ", "), crlPath, err)
	}
	out := revokeOutput{Revoked: done}
	tb, tbErr := ca.TrustBundle()
	if tbErr == nil {
		out.CRLNumber = tb.CRL().Number.String()
	} else {
		tbErr = fmt.Errorf("the CA's trust bundle cannot be read back: %w: mend the CA directory (`skybridge ca crl --ca %s` reads it so too): until then a gateway that reads it (identity.ca_dir) does not take the new list from it", tbErr, ca.Dir())
	}
	if c.Bool("json") {
		if err := printJSON(c.App.Writer, out); err != nil {
			return revokedBut(err)
		}
	} else {
		for _, e := range done {
			what := "revoked"
			if e.AlreadyRevoked {
				what = "already revoked"
			}
			switch e.Kind {
			case certs.KindPolicySigner:
				fmt.Fprintf(c.App.Writer, "%s %s (policy signer %s, reason %s)\n", what, e.Serial, e.Node, e.Reason)
			case certs.KindEnroller:
				fmt.Fprintf(c.App.Writer, "%s %s (enrollment endpoint of node %s, reason %s)\n", what, e.Serial, e.Node, e.Reason)
			default:
				fmt.Fprintf(c.App.Writer, "%s %s (node %s, site %s, reason %s)\n", what, e.Serial, e.Node, e.Site, e.Reason)
			}
		}
		switch {
		case tbErr != nil:
		case changed:
			fmt.Fprintf(c.App.Writer, "revocation list #%s written to %s\n", out.CRLNumber, crlPath)
		default:
			fmt.Fprintf(c.App.Writer, "revocation list #%s in %s left as it was: it lists them already\n", out.CRLNumber, crlPath)
		}
	}
	if tbErr != nil {
		return revokedBut(tbErr)
	}
	return nil
}

func caList(c *cli.Context) error {
	ca, err := certs.OpenCA(c.String("ca"))
	if err != nil {
		return err
	}
	issued, err := ca.Issued()
	if err != nil {
		return err
	}
	now := time.Now()
	stateOf := func(e certs.IssuedCert) string {
		switch {
		case e.RevokedAt != nil:
			return "revoked"
		case now.After(e.NotAfter):
			return "expired"
		}
		return "valid"
	}
	if c.Bool("json") {
		// The state the table shows, beside the index entry.
		type listed struct {
			certs.IssuedCert
			State string `json:"state"`
		}
		out := make([]listed, 0, len(issued))
		for _, e := range issued {
			out = append(out, listed{e, stateOf(e)})
		}
		return printJSON(c.App.Writer, out)
	}
	rows := make([][]string, 0, len(issued))
	for _, e := range issued {
		state := stateOf(e)
		if e.RevokedAt != nil {
			state += " (" + e.Reason + ")"
		}
		// A policy signer is not a gateway: no site, no address.
		name, site := e.Node, e.Site
		switch e.Kind {
		case certs.KindPolicySigner:
			name, site = e.Node+" (policy signer)", "-"
		case certs.KindEnroller:
			name, site = e.Node+" (its enrollment endpoint)", "-"
		}
		rows = append(rows, []string{e.Serial, name, site, e.OverlayIP, e.NotAfter.UTC().Format(time.RFC3339), state})
	}
	return printTable(c.App.Writer, []string{"serial", "node", "site", "overlay ip", "not after", "state"}, rows)
}

type crlOutput struct {
	Number     string    `json:"number"`
	ThisUpdate time.Time `json:"this_update"`
	NextUpdate time.Time `json:"next_update"`
	Revoked    []string  `json:"revoked_serials"`
}

func caCRL(c *cli.Context) error {
	ca, err := certs.OpenCA(c.String("ca"))
	if err != nil {
		return err
	}
	if c.Bool("refresh") {
		if err := ca.RefreshCRL(time.Now()); err != nil {
			return err
		}
	}
	tb, err := ca.TrustBundle()
	if err != nil {
		return err
	}
	crl := tb.CRL()
	out := crlOutput{Number: crl.Number.String(), ThisUpdate: crl.ThisUpdate, NextUpdate: crl.NextUpdate, Revoked: []string{}}
	for _, e := range crl.RevokedCertificateEntries {
		out.Revoked = append(out.Revoked, certs.FormatSerial(e.SerialNumber))
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, out)
	}
	fmt.Fprintf(c.App.Writer, "revocation list #%s of %q\n  this update: %s\n  next update: %s\n  revoked:     %d\n",
		out.Number, ca.Certificate().Subject.CommonName, out.ThisUpdate.UTC().Format(time.RFC3339), out.NextUpdate.UTC().Format(time.RFC3339), len(out.Revoked))
	for _, s := range out.Revoked {
		fmt.Fprintf(c.App.Writer, "    %s\n", s)
	}
	return nil
}

func routesString(rs []netip.Prefix) string {
	if len(rs) == 0 {
		return "(none)"
	}
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, ", ")
}

// checkCAKeyring makes sure the CA directory holds the gossip keyring it
// hands to every new gateway.
// The secret store's own advice for a missing keyring (`ca issue` copies
// it from the CA) is no way out when the CA is what lacks it.
func checkCAKeyring(ctx context.Context, ca *certs.CA) error {
	path := filepath.Join(ca.Dir(), certs.FileGossipKeyring)
	if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("the CA directory %s has no gossip keyring, which every new gateway needs: restore gossip.keyring from a backup, or copy it (mode 0600) from the identity directory of a gateway of this mesh", ca.Dir())
	}
	if _, err := ca.Secrets().GossipKeyring(ctx); err != nil {
		return fmt.Errorf("the CA directory %s has no usable gossip keyring, which every new gateway needs: %w", ca.Dir(), err)
	}
	return nil
}
