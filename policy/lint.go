package policy

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"
)

// Finding is one lint result.
type Finding struct {
	Check    string   `json:"check"`
	Severity string   `json:"severity"` // "error" or "warning"
	Pos      Position `json:"position"`
	Message  string   `json:"message"`
}

// Lint looks for what compiles but is probably wrong: expired or
// open-ended exceptions, classes that can be stored nowhere, rules that can
// never take effect, audit mode left on. With an inventory (may be nil) it
// also judges the rules against the real sites. It is pure.
func Lint(p *Policy, inv Inventory, now time.Time) []Finding {
	out := slices.Clone(p.never)
	add := func(check, sev string, pos Position, format string, args ...any) {
		out = append(out, Finding{Check: check, Severity: sev, Pos: pos, Message: fmt.Sprintf(format, args...)})
	}
	if p.mode == Audit {
		add("audit-mode", "warning", Position{File: p.file, Line: 1}, "policy %s is in audit mode: denials are recorded but not enforced", p.rev.Name)
	}
	// It compiles, as a policy being written must, and denies every
	// request, as a class it does not know: signed, it would stop every
	// migration in the mesh.
	if len(p.classNames) == 0 {
		add("no-classes", "warning", Position{File: p.file, Line: 1}, "policy %s defines no class: every data class is denied everywhere; add a class block for each class the mesh may store or carry", p.rev.Name)
	}
	for _, e := range p.exceptions {
		switch {
		case !now.Before(e.expires):
			add("expired-exception", "warning", e.pos, "exception %q ran until %s and no longer applies; remove it", e.name, e.until)
		case e.expires.Sub(now) > 366*24*time.Hour:
			add("long-exception", "warning", e.pos, "exception %q runs for more than a year (until %s); exceptions should be short and renewed deliberately", e.name, e.until)
		}
	}
	var sites []Site
	for _, n := range inv.Names() {
		sites = append(sites, inv[n])
	}
	for _, name := range p.classNames {
		cls := p.classes[name]
		if cls.mode == Audit {
			add("audit-mode", "warning", cls.pos, "class %q is in audit mode: its denials are recorded but not enforced", name)
		}
		if len(cls.allow[Store]) == 0 {
			add("never-stored", "warning", cls.pos, "class %q has no allow \"store\" rule: it may be stored nowhere", name)
		}
		for _, a := range []Action{Store, Transit} {
			for _, al := range cls.allow[a] {
				for _, dn := range cls.deny[a] {
					if covers(dn.sel, withRefs(al.sel)) {
						add("shadowed-allow", "warning", al.pos, "%s never takes effect: %s (line %d) denies every site it could allow", al.ref().Name, dn.ref().Name, dn.pos.Line)
					}
				}
			}
		}
		if len(sites) == 0 {
			continue
		}
		// Deny rules that match no site today are guards (sanctioned
		// countries) and fine; an allow that matches nothing is a mistake.
		for _, a := range []Action{Store, Transit} {
			for _, r := range cls.allow[a] {
				if !slices.ContainsFunc(sites, func(s Site) bool { return r.sel.match(&s) }) {
					add("matches-no-site", "warning", r.pos, "%s matches none of the %d inventory sites", r.ref().Name, len(sites))
				}
			}
		}
		// A store allow whose requirements a site does not attest denies
		// there: say so before a migration finds out.
		for _, r := range cls.allow[Store] {
			var unmet []string
			for _, s := range sites {
				if !r.sel.match(&s) {
					continue
				}
				// Denied for a requirement, and one of this rule's
				// (another allow's may have been named first).
				d := p.Evaluate(Request{Class: name, Action: Store, Sites: []Site{s}, Time: now})
				mine := r.req.EncryptionAtRest && s.Labels[LabelEncryptionAtRest] != "true" || r.req.MinReplicaZones > replicaZones([]Site{s})
				if d.Denied && d.Rule.Kind == "requirement" && mine {
					unmet = append(unmet, s.Name)
				}
			}
			if len(unmet) > 0 {
				add("unattested-requirement", "warning", r.pos, "%s requires %s, which these sites it matches do not attest (labels %s, %s, %s): %s; stores there are denied",
					r.ref().Name, r.req.String(), LabelEncryptionAtRest, LabelReplicaZones, LabelZone, strings.Join(unmet, ", "))
			}
		}
		stored := false
		for _, s := range sites {
			if d := p.Evaluate(Request{Class: name, Action: Store, Sites: []Site{s}, Time: now}); !d.Denied {
				stored = true
				break
			}
		}
		if !stored && len(cls.allow[Store]) > 0 {
			add("never-stored", "warning", cls.pos, "class %q may be stored at none of the %d inventory sites", name, len(sites))
		}
	}
	for _, e := range p.exceptions {
		if len(sites) > 0 && !slices.ContainsFunc(sites, func(s Site) bool { return e.sel.match(&s) }) {
			add("matches-no-site", "warning", e.pos, "exception %q matches none of the %d inventory sites", e.name, len(sites))
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Pos.Line < out[j].Pos.Line })
	return out
}

// covers reports whether every site matched by b is matched by a (a is
// no stricter than b), judged from the criteria alone. It may answer
// false when a does cover b; it never answers true when it does not.
func covers(a, b *selector) bool {
	if a.never || b.never {
		return false
	}
	if a.sites != nil && !(slices.Contains(a.sites, "*") || b.sites != nil && subset(b.sites, a.sites)) {
		return false
	}
	if a.regions != nil && !(slices.Contains(a.regions, "*") || b.regions != nil && subset(b.regions, a.regions)) {
		return false
	}
	if a.providers != nil && (b.providers == nil || !subsetSet(b.providers, a.providers)) {
		return false
	}
	if a.countries != nil && (b.countries == nil || !subsetSet(b.countries, a.countries)) {
		return false
	}
	for k, v := range a.labels {
		if b.labels[k] != v {
			return false
		}
	}
	return a.ref == nil || a.ref == b.ref
}

// withRefs is s with the criteria of its named selectors folded in, for
// covers' b: a site s matches matches them too. Where both constrain one
// criterion by globs, s's own stay (they are no stricter than what s
// matches), so covers stays sound. The named selector itself stays, for
// a deny that names the same.
func withRefs(s *selector) *selector {
	f := *s
	for r := s.ref; r != nil; r = r.ref {
		f.never = f.never || r.never
		if f.sites == nil {
			f.sites = r.sites
		}
		if f.regions == nil {
			f.regions = r.regions
		}
		f.providers = intersect(f.providers, r.providers)
		f.countries = intersect(f.countries, r.countries)
		for k, v := range r.labels {
			if _, ok := f.labels[k]; !ok {
				f.labels = maps.Clone(f.labels)
				if f.labels == nil {
					f.labels = map[string]string{}
				}
				f.labels[k] = v
			}
		}
	}
	return &f
}

// intersect is what both sets allow; nil is no constraint.
func intersect(a, b map[string]struct{}) map[string]struct{} {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	}
	out := map[string]struct{}{}
	for k := range a {
		if _, ok := b[k]; ok {
			out[k] = struct{}{}
		}
	}
	return out
}

func subset(xs, of []string) bool {
	for _, x := range xs {
		if !slices.Contains(of, x) {
			return false
		}
	}
	return true
}

func subsetSet(xs, of map[string]struct{}) bool {
	for x := range xs {
		if _, ok := of[x]; !ok {
			return false
		}
	}
	return true
}
