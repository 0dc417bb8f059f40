package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/gohcl"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/hclconf"
	"github.com/skybridge-mesh/skybridge/internal/iso3166"
)

// Policy is a compiled residency policy. It is immutable and safe for
// concurrent use.
type Policy struct {
	rev           Revision
	signedAt      time.Time // by its verified signature; zero if not verified
	signedBy      string    // the verified signer's certified name; "" if not verified
	file          string
	mode          Mode
	description   string
	jurisdictions map[string]map[string]struct{} // group → countries, expanded
	selectors     map[string]*selector
	classes       map[string]*class
	classNames    []string // sorted
	exceptions    []*exception
	never         []Finding // values that can never match (compiler.never)
}

type class struct {
	name        string
	description string
	mode        Mode
	pos         Position
	allow       map[Action][]*rule
	deny        map[Action][]*rule
}

type rule struct {
	kind   string // "allow" or "deny"
	class  string
	action Action
	sel    *selector
	reason string
	req    Obligations
	pos    Position
	name   string // `class "pii-eu" allow "store"`, built once
}

func (r *rule) ref() RuleRef {
	return RuleRef{Kind: r.kind, Name: r.name, Pos: r.pos, Reason: r.reason}
}

type exception struct {
	name     string
	class    string
	action   Action
	sel      *selector
	category string
	reason   string
	approver string
	ticket   string
	expires  time.Time // the exception applies strictly before this instant
	until    string    // the expiry as written ("2026-12-31" means through that day)
	pos      Position
}

func (e *exception) ref() *ExceptionRef {
	return &ExceptionRef{Name: e.name, Category: e.category, Approver: e.approver, Ticket: e.ticket, Expires: e.expires}
}

// Revision identifies the policy.
// ValidName reports whether s may name a class (or a site, a check, an
// exception) in a policy: what a peer offers as a class, for one, before
// it is copied into a record.
func ValidName(s string) bool { return nameRE.MatchString(s) }

func (p *Policy) Revision() Revision { return p.rev }

// SignedBy is the name the verified signer's certificate gives it (a
// delegated signer's, or the mesh CA's); "" for a policy not verified.
func (p *Policy) SignedBy() string { return p.signedBy }

// Mode is the policy-wide mode.
func (p *Policy) Mode() Mode { return p.mode }

// Classes lists the data classes the policy defines, sorted.
func (p *Policy) Classes() []string { return append([]string(nil), p.classNames...) }

// File is the name the policy was parsed under.
func (p *Policy) File() string { return p.file }

// Load reads and compiles a policy file.
func Load(file string) (*Policy, []byte, error) {
	src, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, fmt.Errorf("read policy: %w", err)
	}
	p, err := Parse(file, src)
	return p, src, err
}

// Parse compiles policy source. Every mistake is reported with file:line;
// a policy that does not compile is never half-applied.
func Parse(file string, src []byte) (*Policy, error) {
	var syn fileSyntax
	dups, err := hclconf.DecodeNotingDuplicates(file, src, &syn)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(src)
	c := &compiler{file: file, p: &Policy{
		file:          file,
		jurisdictions: map[string]map[string]struct{}{},
		selectors:     map[string]*selector{},
		classes:       map[string]*class{},
	}}
	c.p.rev.SHA256 = hex.EncodeToString(sum[:])
	c.compile(&syn)
	// Read as HCL reads it (the last value), so that a policy an earlier
	// release signed still parses; lint says it, and sign refuses it.
	for _, d := range dups {
		if d.Subject != nil {
			c.neverAs("duplicate-key", *d.Subject, "%s: %s", d.Summary, d.Detail)
		}
	}
	if len(c.errs) > 0 {
		sort.SliceStable(c.errs, func(i, j int) bool { return c.errs[i].line < c.errs[j].line })
		msgs := make([]string, len(c.errs))
		for i, e := range c.errs {
			msgs[i] = e.msg
		}
		return nil, errors.New(strings.Join(msgs, "\n"))
	}
	return c.p, nil
}

type compileError struct {
	line int
	msg  string
}

type compiler struct {
	file string
	p    *Policy
	errs []compileError
}

func (c *compiler) errorf(r hcl.Range, format string, args ...any) {
	line := r.Start.Line
	if line == 0 {
		line = 1
	}
	c.errs = append(c.errs, compileError{line: line, msg: fmt.Sprintf("%s:%d:%d: %s", c.file, line, r.Start.Column, fmt.Sprintf(format, args...))})
}

// Unmatchable lists what in the policy can never take effect: values no
// certified gateway can carry, which never match, and requirements where
// they mean nothing (lint reports them; `policy sign` refuses them).
func (p *Policy) Unmatchable() []Finding { return slices.Clone(p.never) }

// never records a value no certified gateway can carry (capitals in a
// site name, an empty label value): guarding a deny, it lets everything
// through. Not a compile error — a policy signed by an earlier release
// with one must still be taken, or a gateway upgraded under it would run
// with no policy at all — but `policy sign` refuses it and lint reports it.
func (c *compiler) never(r hcl.Range, format string, args ...any) {
	c.neverAs("never-matches", r, format, args...)
}

func (c *compiler) neverAs(check string, r hcl.Range, format string, args ...any) {
	c.p.never = append(c.p.never, Finding{Check: check, Severity: "error", Pos: c.pos(r), Message: fmt.Sprintf(format, args...)})
}

func (c *compiler) pos(r hcl.Range) Position { return Position{File: c.file, Line: r.Start.Line} }

var (
	nameRE  = regexp.MustCompile(`^[a-z0-9]([a-z0-9_-]{0,62})$`)
	groupRE = regexp.MustCompile(`^[A-Z][A-Z0-9_-]{1,31}$`)
)

func (c *compiler) compile(syn *fileSyntax) {
	p := c.p
	if syn.Policy == nil {
		c.errorf(hcl.Range{Filename: c.file, Start: hcl.Pos{Line: 1, Column: 1}}, `missing policy block: start the file with policy { name = "..." version = 1 }`)
	} else {
		h := syn.Policy
		p.rev.Name, p.rev.Version, p.description = h.Name, h.Version, h.Description
		if !nameRE.MatchString(h.Name) {
			c.errorf(h.DefRange, "policy name %q: use lower-case letters, digits, '-' and '_'", h.Name)
		}
		if h.Version < 1 {
			c.errorf(h.VersionRange, "policy version must be 1 or more; raise it with every change so gateways adopt the newer policy")
		}
		p.mode = c.mode(h.Mode, h.ModeRange, Enforce)
	}

	c.compileJurisdictions(syn.Jurisdictions)
	for _, s := range syn.Selectors {
		if !nameRE.MatchString(s.Name) {
			c.errorf(s.DefRange, "selector name %q: use lower-case letters, digits, '-' and '_'", s.Name)
		}
		if _, dup := p.selectors[s.Name]; dup {
			c.errorf(s.DefRange, "selector %q is defined twice", s.Name)
		}
		// Named selectors may only refer to selectors defined above them,
		// which rules out cycles.
		p.selectors[s.Name] = c.selector(s.Rest, s.DefRange, fmt.Sprintf("selector %q", s.Name))
	}
	for i := range syn.Classes {
		c.compileClass(&syn.Classes[i])
	}
	for i := range syn.Exceptions {
		c.compileException(&syn.Exceptions[i])
	}
	for n := range p.classes {
		p.classNames = append(p.classNames, n)
	}
	sort.Strings(p.classNames)
}

func (c *compiler) mode(s string, r hcl.Range, def Mode) Mode {
	switch Mode(s) {
	case "":
		return def
	case Enforce, Audit:
		return Mode(s)
	}
	c.errorf(r, "mode %q is not %q or %q", s, Enforce, Audit)
	return Enforce
}

func (c *compiler) compileJurisdictions(js []jurisdictionSyntax) {
	raw := map[string]*jurisdictionSyntax{}
	for i := range js {
		j := &js[i]
		switch {
		case !groupRE.MatchString(j.Name):
			c.errorf(j.DefRange, "jurisdiction name %q: use upper-case letters, digits, '-' and '_' (e.g. EU, EEA, DACH)", j.Name)
			continue
		case iso3166.Valid(j.Name):
			c.errorf(j.DefRange, "jurisdiction %q is a country code; name the group something else", j.Name)
			continue
		case raw[j.Name] != nil:
			c.errorf(j.DefRange, "jurisdiction %q is defined twice", j.Name)
			continue
		}
		raw[j.Name] = j
	}
	var expand func(name string, stack []string) map[string]struct{}
	expand = func(name string, stack []string) map[string]struct{} {
		if got, ok := c.p.jurisdictions[name]; ok {
			return got
		}
		j := raw[name]
		for _, s := range stack {
			if s == name {
				c.errorf(j.DefRange, "jurisdiction %q includes itself (%s)", name, strings.Join(append(stack, name), " → "))
				return nil
			}
		}
		set := map[string]struct{}{}
		if len(j.Countries) == 0 {
			c.errorf(j.CountriesRange, "jurisdiction %q lists no countries", name)
		}
		for _, cc := range j.Countries {
			switch {
			case iso3166.Valid(cc):
				set[cc] = struct{}{}
			case raw[cc] != nil:
				for k := range expand(cc, append(stack, name)) {
					set[k] = struct{}{}
				}
			default:
				c.errorf(j.CountriesRange, "jurisdiction %q: %q is neither an ISO 3166-1 alpha-2 country code nor a jurisdiction defined in this file", name, cc)
			}
		}
		c.p.jurisdictions[name] = set
		return set
	}
	for _, j := range js {
		if raw[j.Name] != nil {
			expand(j.Name, nil)
		}
	}
}

func (c *compiler) compileClass(cs *classSyntax) {
	p := c.p
	if !nameRE.MatchString(cs.Name) {
		c.errorf(cs.DefRange, "class name %q: use lower-case letters, digits, '-' and '_'", cs.Name)
	}
	if _, dup := p.classes[cs.Name]; dup {
		c.errorf(cs.DefRange, "class %q is defined twice", cs.Name)
		return
	}
	cl := &class{
		name: cs.Name, description: cs.Description, pos: c.pos(cs.DefRange),
		mode:  c.mode(cs.Mode, cs.ModeRange, ""),
		allow: map[Action][]*rule{}, deny: map[Action][]*rule{},
	}
	for kind, rules := range map[string][]ruleSyntax{"allow": cs.Allow, "deny": cs.Deny} {
		for i := range rules {
			rs := &rules[i]
			a, err := ParseAction(rs.Action)
			if err != nil {
				c.errorf(rs.DefRange, "%s %q: the action must be \"store\" or \"transit\"", kind, rs.Action)
				continue
			}
			r := &rule{kind: kind, class: cs.Name, action: a, reason: rs.Reason, pos: c.pos(rs.DefRange),
				name: fmt.Sprintf("class %q %s %q", cs.Name, kind, a)}
			r.sel = c.selector(rs.Rest, rs.DefRange, fmt.Sprintf("class %q %s %q", cs.Name, kind, a))
			if kind == "deny" && rs.Reason == "" {
				c.errorf(rs.DefRange, "class %q deny %q needs a reason: it is what people are told when they are refused", cs.Name, a)
			} else if kind == "deny" && strings.TrimSpace(rs.Reason) == "" {
				// Not a compile error: a policy signed with one must
				// still load after an upgrade.
				c.neverAs("empty-reason", rs.DefRange, "class %q deny %q has a reason of blanks only: it is what people are told when they are refused; write one", cs.Name, a)
			}
			if rq := rs.Require; rq != nil {
				if kind == "deny" {
					c.errorf(rq.DefRange, "requirements belong to allow rules, not deny")
				}
				r.req = c.requirements(rq, a)
			}
			if kind == "allow" {
				cl.allow[a] = append(cl.allow[a], r)
			} else {
				cl.deny[a] = append(cl.deny[a], r)
			}
		}
	}
	// Keep rules in file order whatever the map iteration did, so the
	// first matching rule is the one written first.
	for _, m := range []map[Action][]*rule{cl.allow, cl.deny} {
		for _, rs := range m {
			sort.SliceStable(rs, func(i, j int) bool { return rs[i].pos.Line < rs[j].pos.Line })
		}
	}
	p.classes[cs.Name] = cl
}

func (c *compiler) requirements(rq *requireSyntax, a Action) Obligations {
	var o Obligations
	if rq.EncryptionAtRest != nil {
		if a != Store {
			// Taken by earlier releases: refused by sign, not compile.
			c.neverAs("ignored-requirement", rq.EncryptionAtRestRange, "encryption_at_rest only means something on a store rule (data in transit crosses WireGuard); here it is ignored")
		} else {
			o.EncryptionAtRest = *rq.EncryptionAtRest
		}
	}
	if rq.MaxHops != nil {
		if *rq.MaxHops < 1 {
			c.errorf(rq.MaxHopsRange, "max_hops must be 1 or more (a direct tunnel is 1 hop)")
		}
		if a != Transit {
			c.errorf(rq.MaxHopsRange, "max_hops only makes sense on a transit rule")
		}
		o.MaxHops = *rq.MaxHops
	}
	if rq.MinReplicaZones != nil {
		if *rq.MinReplicaZones < 1 {
			c.errorf(rq.ZonesRange, "min_replica_zones must be 1 or more")
		}
		if a != Store {
			c.errorf(rq.ZonesRange, "min_replica_zones only makes sense on a store rule")
		}
		o.MinReplicaZones = *rq.MinReplicaZones
	}
	return o
}

func (c *compiler) compileException(es *exceptionSyntax) {
	e := &exception{
		name: es.Name, class: es.Class, category: es.Category, reason: es.Reason,
		approver: es.Approver, ticket: es.Ticket, pos: c.pos(es.DefRange),
	}
	what := fmt.Sprintf("exception %q", es.Name)
	if !nameRE.MatchString(es.Name) {
		c.errorf(es.DefRange, "exception name %q: use lower-case letters, digits, '-' and '_'", es.Name)
	}
	for _, o := range c.p.exceptions {
		if o.name == es.Name {
			// Decisions, audit records and expect_exception name an
			// exception by its name. Not a compile error: a policy
			// signed with two must still load after an upgrade.
			c.neverAs("duplicate-exception", es.DefRange, "%s is defined twice (also at line %d): decisions and audit records name an exception by its name; rename one", what, o.pos.Line)
			break
		}
	}
	if _, ok := c.p.classes[es.Class]; !ok {
		c.errorf(es.ClassRange, "%s: class %q is not defined (exceptions come after the classes they relax)", what, es.Class)
	}
	a, err := ParseAction(es.Action)
	if err != nil {
		c.errorf(es.ActionRange, "%s: action %q must be \"store\" or \"transit\"", what, es.Action)
	}
	e.action = a
	switch es.Category {
	case "waiver", "mitigated":
	default:
		c.errorf(es.CategoryRange, "%s: category %q must be \"waiver\" (risk accepted) or \"mitigated\" (risk reduced by other controls)", what, es.Category)
	}
	for field, v := range map[string]string{"reason": es.Reason, "approver": es.Approver, "ticket": es.Ticket} {
		if strings.TrimSpace(v) == "" {
			c.errorf(es.DefRange, "%s: %s must not be empty: an exception must be traceable", what, field)
		}
	}
	exp, err := parseExpiry(es.Expires)
	if err != nil {
		c.errorf(es.ExpiresRange, "%s: %v", what, err)
	}
	e.expires, e.until = exp, es.Expires
	e.sel = c.selector(es.Rest, es.DefRange, what)
	c.p.exceptions = append(c.p.exceptions, e)
}

// parseExpiry accepts a date (the exception ends when that day ends, UTC)
// or an RFC 3339 instant.
func parseExpiry(s string) (time.Time, error) {
	if d, err := time.Parse(time.DateOnly, s); err == nil {
		return d.Add(24 * time.Hour), nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("expires %q is not a date (2026-12-31) or an RFC 3339 time", s)
}

// selector decodes and compiles the selector attributes left in body.
func (c *compiler) selector(body hcl.Body, def hcl.Range, what string) *selector {
	var ss selectorSyntax
	if diags := gohcl.DecodeBody(body, nil, &ss); diags.HasErrors() {
		for _, d := range diags {
			r := def
			if d.Subject != nil {
				r = *d.Subject
			}
			msg := d.Summary
			if d.Detail != "" {
				msg += ": " + d.Detail
			}
			c.errorf(r, "%s: %s", what, msg)
		}
		return &selector{never: true}
	}
	s := &selector{}
	given := false
	checkList := func(name string, vals []string, r hcl.Range) {
		if vals != nil {
			given = true
			if len(vals) == 0 {
				c.errorf(r, "%s: %s = [] can never match; remove it or list values", what, name)
				s.never = true
			}
		}
	}
	checkList("site", ss.Site, ss.SiteRange)
	checkList("provider", ss.Provider, ss.ProviderRange)
	checkList("region", ss.Region, ss.RegionRange)
	checkList("jurisdiction", ss.Jurisdiction, ss.JurisdictionRange)
	for _, g := range append(append([]string(nil), ss.Site...), ss.Region...) {
		if _, err := path.Match(g, ""); err != nil {
			c.errorf(def, "%s: %q is not a valid glob pattern", what, g)
		} else if strings.Contains(g, "[!") {
			// The shell's "[!x]" is not Go's: path.Match negates only with
			// '^' and reads '!' as a member, so "[!o]*" matches the names
			// that start with "o", the very ones it was meant to spare.
			c.neverAs("glob-negation", def, "%s: %q: a class negates with '^' here, not '!' ('!' is a character of the class, and no name has one): write %q", what, g, strings.ReplaceAll(g, "[!", "[^"))
		} else if !globCanMatchName(g) {
			c.never(def, "%s: %q can never match: site and region names are lower-case letters, digits and '-'%s", what, g, lowerHint(g))
		} else if !globMatchesSomeName(g) {
			c.never(def, "%s: %q can never match: site and region names are 1 to 63 lower-case letters, digits and '-', starting and ending with a letter or digit", what, g)
		}
	}
	for _, v := range ss.Provider {
		if !certs.ValidName(v) {
			c.never(ss.ProviderRange, "%s: provider %q can never match: provider names are lower-case letters, digits and '-'%s", what, v, lowerHint(v))
		}
	}
	for k, v := range ss.Labels {
		switch {
		case !certs.ValidLabelKey(k):
			c.never(ss.LabelsRange, "%s: label key %q can never match: label keys are lower-case letters, digits and . _ / -%s", what, k, lowerHint(k))
		case v == "":
			c.never(ss.LabelsRange, "%s: label %s = \"\" would match every site without the label; name the value it must have", what, k)
		case !certs.ValidLabelValue(v):
			c.never(ss.LabelsRange, "%s: label %s value %q can never match: label values are letters, digits and . _ : / + @ , -", what, k, v)
		case strings.Contains(v, ","):
			// A site's label may list values ("shared,public"), and a
			// selector value matches one of them: this one would match
			// only a site whose label is the whole list, not either.
			c.never(ss.LabelsRange, "%s: label %s value %q holds a comma: it matches one value of a site's comma-separated label, not several; write one rule per value", what, k, v)
		}
	}
	s.sites, s.regions = ss.Site, ss.Region
	if ss.Provider != nil {
		s.providers = map[string]struct{}{}
		for _, v := range ss.Provider {
			s.providers[v] = struct{}{}
		}
	}
	if ss.Jurisdiction != nil {
		s.countries = map[string]struct{}{}
		for _, v := range ss.Jurisdiction {
			if iso3166.Valid(v) {
				s.countries[v] = struct{}{}
				continue
			}
			set, ok := c.p.jurisdictions[v]
			if !ok {
				c.errorf(ss.JurisdictionRange, "%s: %q is neither an ISO 3166-1 alpha-2 country code nor a defined jurisdiction", what, v)
				continue
			}
			for k := range set {
				s.countries[k] = struct{}{}
			}
		}
	}
	if ss.Labels != nil {
		given = true
		if len(ss.Labels) == 0 {
			c.errorf(ss.LabelsRange, "%s: labels = {} selects nothing in particular; remove it", what)
		}
		s.labels = ss.Labels
	}
	if ss.Selector != "" {
		given = true
		ref, ok := c.p.selectors[ss.Selector]
		if !ok {
			c.errorf(ss.SelectorRange, "%s: selector %q is not defined above", what, ss.Selector)
		}
		s.ref = ref
	}
	if !given {
		c.errorf(def, `%s says no site it applies to: give site, provider, region, jurisdiction, labels or selector (site = ["*"] means every site)`, what)
		s.never = true
	}
	return s
}

// globCanMatchName reports whether a site or region glob can match a
// certified name: outside the glob's own syntax, only the characters a
// name may have. (A value that cannot match is a silent allow in a deny
// rule's guard, the mistake this catches.)
func globCanMatchName(g string) bool {
	for _, r := range g {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-':
		case r == '*', r == '?', r == '[', r == ']', r == '!', r == '^', r == '\\':
		default:
			return false
		}
	}
	return true
}

// globMatchesSomeName reports whether glob g, made of the characters
// globCanMatchName allows, matches at least one certified name: "-*",
// "onprem-" or "[z-a]*" pass that check and match none. It tries
// candidates built from g (each '*' as nothing or "a", each '?' and
// class as a character it takes); past 256 of them it answers yes,
// unable to prove the opposite.
func globMatchesSomeName(g string) bool {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-"
	cands := []string{""}
	for i := 0; i < len(g); i++ {
		var opts []string
		switch ch := g[i]; ch {
		case '*':
			opts = []string{"", "a"}
		case '?':
			opts = []string{"a"}
		case '[':
			end := strings.IndexByte(g[i+1:], ']')
			if end < 0 {
				return true // path.Match refused it already
			}
			if end == 0 { // "[]...]": ']' is the class's first member
				if e2 := strings.IndexByte(g[i+2:], ']'); e2 >= 0 {
					end = e2 + 1
				}
			}
			class := g[i : i+1+end+1]
			i += end + 1
			// A letter or digit, and '-', if the class takes them.
			var letter, dash string
			for _, r := range alphabet {
				if ok, _ := path.Match(class, string(r)); ok {
					if r == '-' {
						dash = "-"
					} else if letter == "" {
						letter = string(r)
					}
				}
			}
			for _, o := range []string{letter, dash} {
				if o != "" {
					opts = append(opts, o)
				}
			}
		case '\\':
			if i+1 < len(g) {
				i++
			}
			opts = []string{string(g[i])}
		default:
			opts = []string{string(ch)}
		}
		if len(opts) == 0 {
			return false // a class that takes no character a name has
		}
		next := make([]string, 0, len(cands)*len(opts))
		for _, c := range cands {
			for _, o := range opts {
				next = append(next, c+o)
			}
		}
		if len(next) > 256 {
			return true
		}
		cands = next
	}
	for _, c := range cands {
		if ok, _ := path.Match(g, c); ok && certs.ValidName(c) {
			return true
		}
	}
	return false
}

// lowerHint suggests the lower-case spelling of a value that has capitals.
func lowerHint(v string) string {
	if l := strings.ToLower(v); l != v {
		return fmt.Sprintf(" (did you mean %q?)", l)
	}
	return ""
}
