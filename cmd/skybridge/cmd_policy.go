package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
	"github.com/skybridge-mesh/skybridge/mesh"
	"github.com/skybridge-mesh/skybridge/policy"
)

// Exit codes of the policy commands: scripts and CI gates branch on them.
const (
	exitAllow = 0
	exitDeny  = 1 // also: a failed test, a lint error, a bad signature
	exitError = 2 // the question could not be answered
)

func policyCommand() *cli.Command {
	policyFlag := &cli.StringFlag{Name: "policy", Usage: "residency policy file (HCL)", Required: true, EnvVars: []string{"SKYBRIDGE_POLICY"}}
	inventoryFlag := &cli.StringFlag{Name: "inventory", Usage: "HCL file of site blocks (provider, region, jurisdiction, labels)"}
	atFlag := &cli.TimestampFlag{Name: "at", Layout: time.RFC3339, Usage: "decide as of this RFC 3339 time (default: now)"}
	return &cli.Command{
		Name:  "policy",
		Usage: "check, explain, test, lint and sign the data-residency policy",
		Subcommands: []*cli.Command{
			{
				Name:  "check",
				Usage: "decide whether a class of data may be stored at, or travel through, sites (exit 0 allow, 1 deny, 2 error)",
				UsageText: "skybridge policy check --policy FILE --class CLASS --action store|transit --site NAME [--site NAME ...]\n" +
					"    (--inventory FILE | --site-attrs provider=P --site-attrs region=R --site-attrs jurisdiction=CC [--site-attrs label.K=V ...]) [--at TIME] [--json]",
				Flags: []cli.Flag{
					policyFlag, inventoryFlag, atFlag, jsonFlag,
					&cli.StringFlag{Name: "class", Usage: "data class", Required: true},
					&cli.StringFlag{Name: "action", Usage: "store or transit", Required: true},
					&cli.StringSliceFlag{Name: "site", Usage: "site; for transit repeat it along the path, source first", Required: true},
					&cli.StringSliceFlag{Name: "site-attrs", Usage: "attribute KEY=VALUE of the (single) site when there is no inventory: provider, region, jurisdiction, label.NAME"},
				},
				Action: policyCheck,
			},
			{
				Name:      "explain",
				Usage:     "show, for one class, which sites of an inventory may store it or carry it, and why",
				UsageText: "skybridge policy explain --policy FILE --class CLASS --inventory FILE [--at TIME] [--json]",
				Flags: []cli.Flag{
					policyFlag, atFlag, jsonFlag,
					&cli.StringFlag{Name: "class", Usage: "data class", Required: true},
					&cli.StringFlag{Name: "inventory", Usage: "HCL file of site blocks", Required: true},
				},
				Action: policyExplain,
			},
			{
				Name:      "test",
				Usage:     "run policy test files (cases of input and expected decision), like opa test; exit 1 if any case fails",
				ArgsUsage: "FILE...",
				UsageText: "skybridge policy test FILE [FILE...] [--policy FILE] [--json]",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "policy", Usage: "test this policy instead of the one the test file names"},
					jsonFlag,
				},
				Action: policyTest,
			},
			{
				Name:      "lint",
				Usage:     "find expired exceptions, rules that never take effect and classes with nowhere to go",
				UsageText: "skybridge policy lint --policy FILE [--inventory FILE] [--json]",
				Flags:     []cli.Flag{policyFlag, inventoryFlag, atFlag, jsonFlag},
				Action:    policyLint,
			},
			{
				Name:      "sign",
				Usage:     "sign a policy for distribution to the gateways, with the mesh CA or a policy signer it certified",
				UsageText: "skybridge policy sign --policy FILE (--ca DIR | --signer DIR) [--out FILE.sig]",
				Flags: []cli.Flag{
					policyFlag,
					&cli.StringFlag{Name: "ca", Usage: "sign with the embedded CA in DIR"},
					&cli.StringFlag{Name: "signer", Usage: "sign with the policy signer in DIR (made by ca issue-signer)"},
					&cli.StringFlag{Name: "out", Usage: "signature file (default: the policy file name + .sig)"},
				},
				Action: policySign,
			},
			{
				Name:      "publish",
				Usage:     "hand a signed policy to a running gateway, which verifies it and spreads it through the mesh",
				UsageText: "skybridge policy publish --policy FILE [--sig FILE.sig] (--socket PATH | --config FILE)",
				Flags: append(append([]cli.Flag(nil), socketFlags...),
					policyFlag,
					&cli.StringFlag{Name: "sig", Usage: "signature file (default: the policy file name + .sig)"}),
				Action: policyPublish,
			},
			{
				Name:      "verify",
				Usage:     "check a policy's signature against the mesh CA, as a gateway does before adopting it",
				UsageText: "skybridge policy verify --policy FILE [--sig FILE.sig] --ca-cert ca.crt [--crl crl.pem]",
				Flags: []cli.Flag{
					policyFlag, jsonFlag,
					&cli.StringFlag{Name: "sig", Usage: "signature file (default: the policy file name + .sig)"},
					&cli.StringFlag{Name: "ca-cert", Usage: "mesh CA certificate(s), PEM", Required: true},
					&cli.StringFlag{Name: "crl", Usage: "the CA's revocation list, to refuse revoked signers"},
				},
				Action: policyVerify,
			},
		},
	}
}

// policyErr turns an error into exit code 2: the policy could not be
// judged, which a script must not mistake for a denial.
func policyErr(err error) error {
	if err == nil {
		return nil
	}
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		return err
	}
	return cli.Exit(err.Error(), exitError)
}

// knownClass refuses a class the policy does not define. The policy
// denies it, as it must for a gateway asked about one; asked here, it is a
// mistake (a typo), and a "deny" would pass for an answer.
func knownClass(p *policy.Policy, class string) error {
	known := p.Classes()
	if len(known) == 0 {
		return cli.Exit(fmt.Sprintf("unknown class %q: %s defines no class, so it denies every one; add a class block for each", class, p.File()), exitError)
	}
	if !slices.Contains(known, class) {
		return cli.Exit(fmt.Sprintf("unknown class %q (known: %s, in %s)", class, strings.Join(known, ", "), p.File()), exitError)
	}
	return nil
}

func decisionTime(c *cli.Context) time.Time {
	if t := c.Timestamp("at"); t != nil {
		return *t
	}
	return time.Now()
}

func policyCheck(c *cli.Context) error {
	p, _, err := policy.Load(c.String("policy"))
	if err != nil {
		return policyErr(err)
	}
	action, err := policy.ParseAction(c.String("action"))
	if err != nil {
		return policyErr(err)
	}
	sites, err := requestSites(c)
	if err != nil {
		return policyErr(err)
	}
	if err := knownClass(p, c.String("class")); err != nil {
		return err
	}
	req := policy.Request{Class: c.String("class"), Action: action, Sites: sites, Time: decisionTime(c)}
	d := p.Evaluate(req)
	if c.Bool("json") {
		if err := printJSON(c.App.Writer, policy.NewRecord(req, d, nil, "skybridge policy check", time.Now())); err != nil {
			return policyErr(err)
		}
	} else {
		printDecision(c.App.Writer, req, d)
	}
	if !d.Allowed {
		return cli.Exit("", exitDeny)
	}
	return nil
}

func requestSites(c *cli.Context) ([]policy.Site, error) {
	names := c.StringSlice("site")
	if inv := c.String("inventory"); inv != "" {
		if len(c.StringSlice("site-attrs")) > 0 {
			return nil, errors.New("give --inventory or --site-attrs, not both")
		}
		i, err := policy.LoadInventory(inv)
		if err != nil {
			return nil, err
		}
		return i.Lookup(names)
	}
	attrs := c.StringSlice("site-attrs")
	if len(attrs) == 0 {
		return nil, errors.New("the policy needs to know the sites: give --inventory FILE, or --site-attrs for a single site")
	}
	if len(names) != 1 {
		return nil, errors.New("--site-attrs describes one site; use --inventory for a path of several")
	}
	s := policy.Site{Name: names[0]}
	given := map[string]bool{}
	for _, kv := range attrs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("--site-attrs %q is not KEY=VALUE", kv)
		}
		// The last of two would decide, in silence: CH then US is a US
		// site's decision.
		if given[k] {
			return nil, fmt.Errorf("--site-attrs %s is given twice: give each attribute once", k)
		}
		given[k] = true
		switch {
		case k == "provider":
			s.Provider = v
		case k == "region":
			s.Region = v
		case k == "jurisdiction":
			s.Jurisdiction = strings.ToUpper(v)
		case strings.HasPrefix(k, "label."):
			if s.Labels == nil {
				s.Labels = map[string]string{}
			}
			s.Labels[strings.TrimPrefix(k, "label.")] = v
		default:
			return nil, fmt.Errorf("--site-attrs key %q is not provider, region, jurisdiction or label.NAME", k)
		}
	}
	// The same attributes a gateway's certificate would certify: a site
	// no certificate could describe would get a decision no gateway gets.
	if err := certs.ValidatePlace(s.Name, s.Region, s.Provider, s.Jurisdiction, s.Labels); err != nil {
		return nil, fmt.Errorf("--site and --site-attrs describe no site a gateway could have (give provider, region and jurisdiction):\n%w", err)
	}
	return []policy.Site{s}, nil
}

func printDecision(w io.Writer, req policy.Request, d policy.Decision) {
	names := make([]string, len(req.Sites))
	for i, s := range req.Sites {
		names[i] = s.Name
	}
	verdict := strings.ToUpper(d.Outcome())
	if d.Audit {
		verdict = "ALLOW (audit mode; the policy denies this)"
	}
	fmt.Fprintf(w, "%s  %s %s %s\n", verdict, req.Class, req.Action, strings.Join(names, " → "))
	fmt.Fprintf(w, "rule:        %s\n", d.Rule)
	fmt.Fprintln(w, "reasons:")
	for _, r := range d.Reasons {
		fmt.Fprintf(w, "  - %s\n", r)
	}
	for _, e := range d.Exceptions {
		fmt.Fprintf(w, "exception:   %s (%s, ticket %s, approved by %s, until %s)\n", e.Name, e.Category, e.Ticket, e.Approver, e.Expires.UTC().Format(time.RFC3339))
	}
	if d.Allowed {
		fmt.Fprintf(w, "obligations: %s\n", d.Obligations)
	}
	fmt.Fprintf(w, "policy:      %s\n", d.Policy)
}

type explainRow struct {
	Site    policy.Site     `json:"site"`
	Store   policy.Decision `json:"store"`
	Transit policy.Decision `json:"transit"`
}

func policyExplain(c *cli.Context) error {
	p, _, err := policy.Load(c.String("policy"))
	if err != nil {
		return policyErr(err)
	}
	if err := knownClass(p, c.String("class")); err != nil {
		return err
	}
	inv, err := policy.LoadInventory(c.String("inventory"))
	if err != nil {
		return policyErr(err)
	}
	class, at := c.String("class"), decisionTime(c)
	rows := []explainRow{} // empty, not null, in JSON
	for _, n := range inv.Names() {
		s := inv[n]
		rows = append(rows, explainRow{
			Site:    s,
			Store:   p.Evaluate(policy.Request{Class: class, Action: policy.Store, Sites: []policy.Site{s}, Time: at}),
			Transit: p.Evaluate(policy.Request{Class: class, Action: policy.Transit, Sites: []policy.Site{s}, Time: at}),
		})
	}
	if c.Bool("json") {
		return policyErr(printJSON(c.App.Writer, rows))
	}
	fmt.Fprintf(c.App.Writer, "class %q under %s, as of %s\n\n", class, p.Revision(), at.UTC().Format(time.RFC3339))
	table := make([][]string, 0, len(rows))
	for _, r := range rows {
		why := r.Store.Rule.String()
		if r.Store.Exception != nil {
			why += " [ticket " + r.Store.Exception.Ticket + "]"
		}
		table = append(table, []string{r.Site.Name, r.Site.Jurisdiction, r.Site.Provider, r.Site.Region, r.Store.Outcome(), r.Transit.Outcome(), why})
	}
	return policyErr(printTable(c.App.Writer, []string{"site", "jurisdiction", "provider", "region", "store", "transit", "store decided by"}, table))
}

func policyTest(c *cli.Context) error {
	files := c.Args().Slice()
	if len(files) == 0 {
		return cli.Exit("policy test needs the test file: skybridge policy test FILE [FILE...]", exitError)
	}
	// Every file is read, and its policy compiled, before any runs: one
	// that cannot be is an error (exit 2) whatever the others say.
	type suite struct {
		tf *policy.TestFile
		p  *policy.Policy
	}
	suites := make([]suite, 0, len(files))
	for _, file := range files {
		tf, err := policy.LoadTestFile(file, time.Now())
		if err != nil {
			return policyErr(err)
		}
		if c.String("policy") != "" {
			tf.Policy = c.String("policy")
		}
		p, _, err := policy.Load(tf.Policy)
		if err != nil {
			return policyErr(fmt.Errorf("%s: %w", file, err))
		}
		suites = append(suites, suite{tf, p})
	}
	var all []policy.TestResult
	failed := 0
	for _, s := range suites {
		res := policy.RunTests(s.p, s.tf.Inventory, s.tf.Cases)
		all = append(all, res...)
		fileFailed := 0
		for _, r := range res {
			if !r.Pass {
				fileFailed++
			}
		}
		failed += fileFailed
		if c.Bool("json") {
			continue
		}
		for _, r := range res {
			status := "PASS"
			if !r.Pass {
				status = "FAIL"
			}
			fmt.Fprintf(c.App.Writer, "%s  %s (%s)\n", status, r.Name, r.Pos)
			for _, pr := range r.Problems {
				fmt.Fprintf(c.App.Writer, "        %s\n", pr)
			}
		}
		fmt.Fprintf(c.App.Writer, "\n%d passed, %d failed (%s against %s)\n", len(res)-fileFailed, fileFailed, s.tf.Path, s.p.Revision())
	}
	if c.Bool("json") {
		// One list of every file's cases; each names its file.
		if all == nil {
			all = []policy.TestResult{}
		}
		if err := printJSON(c.App.Writer, all); err != nil {
			return policyErr(err)
		}
	} else if len(suites) > 1 {
		fmt.Fprintf(c.App.Writer, "\nin all: %d passed, %d failed in %d files\n", len(all)-failed, failed, len(suites))
	}
	if failed > 0 {
		return cli.Exit("", exitDeny)
	}
	return nil
}

func policyLint(c *cli.Context) error {
	p, _, err := policy.Load(c.String("policy"))
	if err != nil {
		// Nothing to lint: the compiler's errors, with their positions,
		// and exit 2 as for every policy that cannot be read.
		return policyErr(err)
	}
	var inv policy.Inventory
	if f := c.String("inventory"); f != "" {
		if inv, err = policy.LoadInventory(f); err != nil {
			return policyErr(err)
		}
	}
	findings := policy.Lint(p, inv, decisionTime(c))
	if c.Bool("json") {
		if findings == nil {
			findings = []policy.Finding{}
		}
		if err := printJSON(c.App.Writer, findings); err != nil {
			return policyErr(err)
		}
	} else {
		for _, f := range findings {
			fmt.Fprintf(c.App.Writer, "%s: %s: %s [%s]\n", f.Pos, f.Severity, f.Message, f.Check)
		}
		if len(findings) == 0 {
			fmt.Fprintf(c.App.Writer, "%s: no findings\n", p.Revision())
		}
	}
	for _, f := range findings {
		if f.Severity == "error" {
			return cli.Exit("", exitDeny)
		}
	}
	return nil
}

func policySign(c *cli.Context) error {
	if err := givenEmpty(c, "out", "signer"); err != nil {
		return err
	}
	file := c.String("policy")
	src, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("read policy: %w", err)
	}
	// Signed, it would be refused by every gateway (room left for the
	// signature, a few KiB).
	if limit := mesh.MaxPolicyBytes - 16<<10; len(src) > limit {
		return fmt.Errorf("policy %s is %d bytes, and gossip carries at most %d with its signature: shorten it (descriptions, selectors shared between classes)", file, len(src), limit)
	}
	var sig *policy.Signature
	switch caDir, signerDir := c.String("ca"), c.String("signer"); {
	case (caDir == "") == (signerDir == ""):
		return usageError("give either --ca DIR or --signer DIR")
	case caDir != "":
		ca, err := certs.OpenCA(caDir)
		if err != nil {
			return err
		}
		sig, err = policy.Sign(file, src, ca.Signer(), ca.Certificate().Subject.CommonName, nil, time.Now())
		if err != nil {
			return err
		}
	default:
		s, err := certs.LoadPolicySigner(signerDir)
		if err != nil {
			return err
		}
		sig, err = policy.Sign(file, src, s.Signer(), s.Name(), s.Certificate(), time.Now())
		if err != nil {
			return err
		}
	}
	out := c.String("out")
	if out == "" {
		out = file + ".sig"
	}
	// Only a signature is replaced: an --out naming the policy itself, or
	// any other file (a key), would be lost to it.
	if err := replaceableOutput(out, func(b []byte) bool { _, err := policy.ParseSignature(b); return err == nil }, "a policy signature", file); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(out, sig.Marshal(), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "signed %s as %q, written to %s\n", sig.Policy, sig.Signer, out)
	// Signed, as lint only warns of it, but not in silence: in force, it
	// denies every request.
	if p, err := policy.Parse(file, src); err == nil && len(p.Classes()) == 0 {
		fmt.Fprintf(c.App.ErrWriter, "skybridge: warning: %s defines no class: in force it denies every request to store or move data (skybridge policy lint --policy %s)\n", file, file)
	}
	return nil
}

type verifyOutput struct {
	Valid bool   `json:"valid"`
	Error string `json:"error,omitempty"`
	// SignedBy is the signer as its certificate names it; the
	// signature's own "signer" is not covered by it.
	SignedBy  string            `json:"signed_by,omitempty"`
	Signature *policy.Signature `json:"signature,omitempty"`
	// RevocationsChecked is false without --crl: a signer the CA has
	// revoked then verifies as valid.
	RevocationsChecked bool `json:"revocations_checked"`
}

func policyVerify(c *cli.Context) error {
	file := c.String("policy")
	src, err := os.ReadFile(file)
	if err != nil {
		return policyErr(fmt.Errorf("read policy: %w", err))
	}
	sigFile := c.String("sig")
	if sigFile == "" {
		sigFile = file + ".sig"
	}
	// A policy without its default .sig is unsigned: a verdict. A
	// signature file named on the command line and missing is a mistake.
	var sig *policy.Signature
	var sigErr error
	if b, err := os.ReadFile(sigFile); err == nil {
		// A signature that does not parse may have been tampered with
		// like one that does not verify: a verdict too.
		if sig, err = policy.ParseSignature(b); err != nil {
			sigErr = fmt.Errorf("%s: %w", sigFile, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) || c.IsSet("sig") {
		return policyErr(fmt.Errorf("read signature: %w", err))
	}
	tb, err := trustFromFiles(c.String("ca-cert"), c.String("crl"), netip.Prefix{})
	if err != nil {
		return policyErr(err)
	}
	var p *policy.Policy
	verr := sigErr
	if verr == nil {
		p, verr = policy.Verify(file, src, sig, tb, time.Now())
	}
	out := verifyOutput{Valid: verr == nil, Signature: sig, RevocationsChecked: c.String("crl") != ""}
	if verr != nil {
		out.Error = verr.Error()
	} else {
		out.SignedBy = p.SignedBy()
	}
	if c.Bool("json") {
		if err := printJSON(c.App.Writer, out); err != nil {
			return policyErr(err)
		}
	} else if verr == nil {
		fmt.Fprintf(c.App.Writer, "valid: %s signed by %s at %s\n", p.Revision(), printable(p.SignedBy()), sig.SignedAt.Format(time.RFC3339))
		if sig.Signer != p.SignedBy() && sig.Signer+" (the mesh CA)" != p.SignedBy() {
			fmt.Fprintf(c.App.Writer, "note: the signature calls its signer %q, which its certificate does not vouch for\n", printable(sig.Signer))
		}
		if !out.RevocationsChecked {
			fmt.Fprintln(c.App.Writer, "note: revocations were not checked: give the CA's revocation list with --crl")
		}
	} else {
		fmt.Fprintf(c.App.Writer, "INVALID: %v\n", verr)
	}
	if verr != nil {
		return cli.Exit("", exitDeny)
	}
	return nil
}

// replaceableOutput refuses an output file that exists and is not what
// the command writes (is says whether its bytes are), or that is one of
// the command's inputs: overwritten, it would be lost.
func replaceableOutput(out string, is func([]byte) bool, what string, inputs ...string) error {
	st, err := os.Stat(out)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, in := range inputs {
		if ist, err := os.Stat(in); err == nil && os.SameFile(st, ist) {
			return usageError("--out %s is the input %s: it would be overwritten; name another file", out, in)
		}
	}
	if !st.Mode().IsRegular() {
		return usageError("--out %s is not a regular file", out)
	}
	if b, err := os.ReadFile(out); err != nil || !is(b) {
		return usageError("--out %s exists and is not %s: it would be overwritten; name another file, or remove it first", out, what)
	}
	return nil
}

// trustFromFiles builds a trust bundle from a CA certificate file and an
// optional CRL file. The mesh's overlay range is mesh if valid, else the
// CA's own constraint (the embedded CA writes one), else the default.
func trustFromFiles(caFile, crlFile string, mesh netip.Prefix) (*certs.TrustBundle, error) {
	b, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("read CA certificate: %w", err)
	}
	cas, err := certs.ParseCertificatesPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", caFile, err)
	}
	tb, err := certs.NewTrustBundle(cas, mesh)
	if err != nil && !mesh.IsValid() {
		tb, err = certs.NewTrustBundle(cas, certs.DefaultMeshPrefix) // a Vault CA has no constraint
	}
	if err != nil {
		return nil, err
	}
	if crlFile == "" {
		return tb, nil
	}
	crlPEM, err := os.ReadFile(crlFile)
	if err != nil {
		return nil, fmt.Errorf("read CRL: %w", err)
	}
	// One list per CA: an issuer rotated, the old and new CAs' lists
	// side by side.
	crls, err := certs.ParseCRLs(crlPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", crlFile, err)
	}
	for _, crl := range crls {
		if !tb.SignedByCA(crl) {
			return nil, fmt.Errorf("%s: a revocation list signed by none of the CAs of %s (%s)", crlFile, caFile, crl.Issuer)
		}
	}
	// A gateway's crl.pem as it saved it: the issuer's lists numbered
	// behind the mesh's come after them, and count too.
	if tb, err = tb.WithSavedCRLs(crls); err != nil {
		return nil, fmt.Errorf("%s: %w", crlFile, err)
	}
	return tb, nil
}
