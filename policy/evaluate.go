package policy

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Evaluate decides a request. It is pure and deterministic: the same
// policy and request always give the same decision, so a gateway, the
// migration engine and an auditor replaying the decision log agree.
//
// Per site: a matching deny rule refuses (unless an unexpired exception
// covers the site); otherwise a matching allow rule admits; otherwise an
// unexpired exception admits; otherwise the site is refused by default.
// The request is allowed only if every site is, and, for transit, the path
// is no longer than the strictest max_hops of the rules that admitted it.
// A store is allowed only where the sites' certificates attest what the
// admitting allows require: encryption at rest at each site, and replicas
// in enough zones across the request (see LabelEncryptionAtRest).
func (p *Policy) Evaluate(req Request) Decision {
	d := Decision{Policy: p.rev, Sites: make([]SiteDecision, 0, len(req.Sites))}
	// Audit mode lets through what the class's rules would refuse; a
	// request it cannot judge at all (a class the policy does not define,
	// a misspelt one included) is refused in every mode.
	audit := ""
	cls := p.classes[req.Class]
	switch {
	case cls == nil:
		d.deny(RuleRef{Kind: "default-deny", Name: "unknown class"},
			fmt.Sprintf("class %q is not defined in policy %s (defined: %s)", req.Class, p.rev.Name, strings.Join(p.classNames, ", ")))
	case req.Action != Store && req.Action != Transit:
		d.deny(RuleRef{Kind: "default-deny", Name: "unknown action"}, fmt.Sprintf("action %q is not store or transit", req.Action))
	case len(req.Sites) == 0:
		d.deny(RuleRef{Kind: "default-deny", Name: "no site"}, "the request names no site")
	case req.Time.IsZero():
		d.deny(RuleRef{Kind: "default-deny", Name: "no time"}, "the request has no time, so exceptions cannot be judged")
	default:
		switch {
		case cls.mode == Audit:
			audit = fmt.Sprintf("class %q is", req.Class)
		case cls.mode == "" && p.mode == Audit:
			audit = fmt.Sprintf("policy %s is", p.rev.Name)
		}
		p.evaluateSites(cls, &req, &d)
	}
	if d.Denied {
		// An exception that admitted one site did not let the request
		// through: a record naming it (its ticket, its approver) would
		// read as if it had. Sites says where it applied.
		d.Exception, d.Exceptions = nil, nil
		d.Obligations = Obligations{}
	}
	if d.Denied && audit != "" {
		d.Allowed, d.Audit = true, true
		d.Reasons = append(d.Reasons, fmt.Sprintf("allowed anyway: %s in audit mode, so this denial is only recorded", audit))
	}
	return d
}

func (d *Decision) deny(r RuleRef, reason string) {
	d.Denied, d.Allowed = true, false
	if d.Rule.Kind == "" || d.Rule.Kind == "allow" || d.Rule.Kind == "exception" {
		d.Rule = r
	}
	d.Reasons = append(d.Reasons, reason)
}

func (p *Policy) evaluateSites(cls *class, req *Request, d *Decision) {
	d.Allowed = true
	var hopsRule, zonesRule *rule // the admitting rules with the strictest max_hops and min_replica_zones
	for i := range req.Sites {
		site := &req.Sites[i]
		sd, allows := p.decideSite(cls, req.Action, site, req)
		if sd.Allowed && len(allows) == 0 {
			// Admitted by an exception alone: it waives where the data
			// may rest or pass, not how. The class's allows of the
			// action say how (attested storage, the length of a path).
			allows = cls.allow[req.Action]
		}
		if sd.Allowed && req.Action == Store {
			unattested(cls, site, allows, &sd)
		}
		d.Sites = append(d.Sites, sd)
		if !sd.Allowed {
			d.deny(sd.Rule, sd.Reason)
			continue
		}
		for _, r := range allows {
			d.Obligations.merge(&r.req)
			if r.req.MaxHops > 0 && (hopsRule == nil || r.req.MaxHops < hopsRule.req.MaxHops) {
				hopsRule = r
			}
			if r.req.MinReplicaZones > 0 && (zonesRule == nil || r.req.MinReplicaZones > zonesRule.req.MinReplicaZones) {
				zonesRule = r
			}
		}
		d.reliedOn(sd.Exception)
	}
	if d.Denied {
		return
	}
	if hops := len(req.Sites) - 1; req.Action == Transit && hopsRule != nil && hops > hopsRule.req.MaxHops {
		names := siteNames(req.Sites)
		ref := hopsRule.ref()
		ref.Kind = "max-hops"
		d.deny(ref, fmt.Sprintf("path %s has %d hops; %s allows at most %d", strings.Join(names, " → "), hops, hopsRule.ref(), hopsRule.req.MaxHops))
		return
	}
	if zonesRule != nil {
		if have, need := replicaZones(req.Sites), zonesRule.req.MinReplicaZones; have < need {
			names := siteNames(req.Sites)
			ref := zonesRule.ref()
			ref.Kind = "requirement"
			d.deny(ref, fmt.Sprintf("store of %q at %s: %s requires replicas in at least %d zones, and the certificates attest %d (label %s: the site's store keeps that many itself; or sites with different %s labels)",
				cls.name, strings.Join(names, ", "), zonesRule.ref(), need, have, LabelReplicaZones, LabelZone))
			return
		}
	}
	// The destination's verdict is the one people ask about.
	last := d.Sites[len(d.Sites)-1]
	d.Rule = last.Rule
	for _, sd := range d.Sites {
		d.Reasons = append(d.Reasons, sd.Reason)
	}
}

// decideSite returns the verdict for one site and the allow rules that
// matched it (for their obligations).
func (p *Policy) decideSite(cls *class, a Action, site *Site, req *Request) (SiteDecision, []*rule) {
	sd := SiteDecision{Site: site.Name}
	where := describeSite(site)
	var allows []*rule
	for _, r := range cls.allow[a] {
		if r.sel.match(site) {
			allows = append(allows, r)
		}
	}
	var deny *rule
	for _, r := range cls.deny[a] {
		if r.sel.match(site) {
			deny = r
			break
		}
	}
	var exc, expired *exception
	for _, e := range p.exceptions {
		if e.class != cls.name || e.action != a || !e.sel.match(site) {
			continue
		}
		if req.Time.Before(e.expires) {
			exc = e
			break
		}
		if expired == nil {
			expired = e
		}
	}

	switch {
	case deny != nil && exc != nil:
		sd.Allowed, sd.Exception = true, exc.ref()
		sd.Rule = RuleRef{Kind: "exception", Name: fmt.Sprintf("exception %q", exc.name), Pos: exc.pos, Reason: exc.reason}
		sd.Reason = fmt.Sprintf("%s: %s of %q allowed by %s exception %q (ticket %s, approved by %s, until %s) over %s",
			where, a, cls.name, exc.category, exc.name, exc.ticket, exc.approver, exc.until, deny.ref())
	case deny != nil:
		sd.Rule = deny.ref()
		sd.Reason = fmt.Sprintf("%s: %s of %q denied by %s: %s", where, a, cls.name, deny.ref(), deny.reason)
	case len(allows) > 0:
		sd.Allowed = true
		sd.Rule = allows[0].ref()
		sd.Reason = fmt.Sprintf("%s: %s of %q allowed by %s", where, a, cls.name, allows[0].ref())
		if allows[0].reason != "" {
			sd.Reason += ": " + allows[0].reason
		}
	case exc != nil:
		sd.Allowed, sd.Exception = true, exc.ref()
		sd.Rule = RuleRef{Kind: "exception", Name: fmt.Sprintf("exception %q", exc.name), Pos: exc.pos, Reason: exc.reason}
		sd.Reason = fmt.Sprintf("%s: %s of %q allowed only by %s exception %q (ticket %s, approved by %s, until %s): %s",
			where, a, cls.name, exc.category, exc.name, exc.ticket, exc.approver, exc.until, exc.reason)
	default:
		sd.Rule = RuleRef{Kind: "default-deny", Name: fmt.Sprintf("class %q has no allow %q rule for this site", cls.name, a), Pos: cls.pos}
		sd.Reason = fmt.Sprintf("%s: %s of %q denied by default: no allow rule matches", where, a, cls.name)
	}
	if !sd.Allowed && expired != nil {
		sd.Reason += fmt.Sprintf(" (exception %q ran until %s and has expired)", expired.name, expired.until)
	}
	return sd, allows
}

// unattested denies a site admitted for storage whose certificate does not
// attest encryption at rest that a requiring allow asks for. (An exception
// waives a deny, or the absence of an allow, not the allows' requirements.)
func unattested(cls *class, site *Site, requiring []*rule, sd *SiteDecision) {
	if site.Labels[LabelEncryptionAtRest] == "true" {
		return
	}
	for _, r := range requiring {
		if r.req.EncryptionAtRest {
			why := fmt.Sprintf("allowed by %s only where data rests encrypted", r.ref())
			if sd.Exception != nil {
				why = fmt.Sprintf("allowed by exception %q, which waives where the data may rest, not how: %s requires it encrypted", sd.Exception.Name, r.ref())
			}
			sd.Allowed, sd.Exception = false, nil
			sd.Rule = r.ref()
			sd.Rule.Kind = "requirement"
			sd.Reason = fmt.Sprintf("%s: %s of %q %s, which the site's certificate does not attest (label %s = \"true\")",
				describeSite(site), Store, cls.name, why, LabelEncryptionAtRest)
			return
		}
	}
}

// replicaZones is how many zones a store at sites keeps replicas in, as
// their certificates attest: the distinct zone labels, or the most zones a
// site's store keeps by itself, whichever is more.
func replicaZones(sites []Site) int {
	zones := map[string]bool{}
	most := 0
	for _, s := range sites {
		// Labels match without regard to case everywhere: "ZRH-A" and
		// "zrh-a" are one zone, not two.
		if z := strings.ToLower(s.Labels[LabelZone]); z != "" {
			zones[z] = true
		}
		if n, err := strconv.Atoi(s.Labels[LabelReplicaZones]); err == nil {
			most = max(most, n)
		}
	}
	return max(len(zones), most)
}

func siteNames(sites []Site) []string {
	names := make([]string, len(sites))
	for i := range sites {
		names[i] = sites[i].Name
	}
	return names
}

func describeSite(s *Site) string {
	return fmt.Sprintf("site %s (%s, %s %s)", s.Name, s.Jurisdiction, s.Provider, s.Region)
}

// NextChange is the first instant after t at which a decision of the
// policy can change by itself (an exception expiring), or the zero time if
// none will: decisions made at t may be reused until then.
func (p *Policy) NextChange(t time.Time) time.Time {
	var next time.Time
	for _, e := range p.exceptions {
		if e.expires.After(t) && (next.IsZero() || e.expires.Before(next)) {
			next = e.expires
		}
	}
	return next
}

// Check is one decision taken on the way to a verdict, with its request,
// as the audit log records it.
type Check struct {
	Request  Request
	Decision Decision
}

// AdmitMove decides whether data of class may move from one site to
// another and rest there: storage at the destination first, then transit
// from source to destination, stopping at the first denial. It returns the
// checks made, in order, and the verdict: the denying decision, or, when
// both allow, the storage decision (whose rule admitted the data) with
// what the transit decision adds: its reasons and obligations, its
// exception if storage needed none, and audit mode if either was let
// through only by it — what the move's audit record must show. The
// migration planner, the sending and the receiving gateway all decide
// this way, so they cannot disagree.
func (p *Policy) AdmitMove(class string, from, to Site, now time.Time) (checks []Check, verdict Decision) {
	return p.AdmitPath(class, []Site{from, to}, now)
}

// AdmitPath is AdmitMove along path: the sites of the gateways the data
// passes, one per end of each tunnel, source first and destination last
// (a hub topology's path through the sites' hubs). The transit check
// judges every one of them and counts every tunnel against max_hops.
func (p *Policy) AdmitPath(class string, path []Site, now time.Time) (checks []Check, verdict Decision) {
	var to []Site
	if len(path) > 0 {
		to = path[len(path)-1:]
	}
	for _, req := range []Request{
		{Class: class, Action: Store, Sites: to, Time: now},
		{Class: class, Action: Transit, Sites: path, Time: now},
	} {
		d := p.Evaluate(req)
		checks = append(checks, Check{Request: req, Decision: d})
		if !d.Allowed {
			return checks, d
		}
	}
	verdict, transit := checks[0].Decision, checks[1].Decision
	verdict.Reasons = append(slices.Clone(verdict.Reasons), transit.Reasons...)
	verdict.Obligations.merge(&transit.Obligations)
	verdict.Exceptions = slices.Clone(verdict.Exceptions)
	for _, e := range transit.Exceptions {
		verdict.reliedOn(e)
	}
	verdict.Audit = verdict.Audit || transit.Audit
	if transit.Denied && !verdict.Denied {
		// In audit mode the denial is what is recorded: the rule that
		// would have refused the move, not the store rule that allowed it.
		verdict.Rule = transit.Rule
	}
	verdict.Denied = verdict.Denied || transit.Denied
	if verdict.Denied {
		// Let through by audit mode only: nothing admitted the move (as
		// in Evaluate).
		verdict.Exception, verdict.Exceptions, verdict.Obligations = nil, nil, Obligations{}
	}
	return checks, verdict
}

// reliedOn adds e (if any) to the exceptions the decision relied on,
// once; the first is Exception.
func (d *Decision) reliedOn(e *ExceptionRef) {
	if e == nil || slices.ContainsFunc(d.Exceptions, func(x *ExceptionRef) bool { return x.Name == e.Name }) {
		return
	}
	d.Exceptions = append(d.Exceptions, e)
	d.Exception = d.Exceptions[0]
}
