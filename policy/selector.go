package policy

import (
	"path"
	"strings"
)

// selector matches sites. Every criterion that is set must hold; within a
// list any value may match. Globs use path.Match syntax (*, ?, [a-z]).
type selector struct {
	sites     []string            // globs on the site name
	providers map[string]struct{} // exact
	regions   []string            // globs
	countries map[string]struct{} // jurisdictions expanded to ISO codes
	labels    map[string]string   // every key must carry the value
	ref       *selector           // a named selector that must match too
	never     bool                // a compile error made it unmatchable
}

func (s *selector) match(site *Site) bool {
	if s.never {
		return false
	}
	if s.sites != nil && !anyGlob(s.sites, site.Name) {
		return false
	}
	if s.providers != nil {
		if _, ok := s.providers[site.Provider]; !ok {
			return false
		}
	}
	if s.regions != nil && !anyGlob(s.regions, site.Region) {
		return false
	}
	if s.countries != nil {
		if _, ok := s.countries[site.Jurisdiction]; !ok {
			return false
		}
	}
	for k, want := range s.labels {
		if !labelHas(site.Labels[k], want) {
			return false
		}
	}
	return s.ref == nil || s.ref.match(site)
}

func anyGlob(globs []string, v string) bool {
	for _, g := range globs {
		if g == "*" || g == v {
			return true
		}
		if ok, _ := path.Match(g, v); ok {
			return true
		}
	}
	return false
}

// labelHas reports whether a site label value carries want. A site label
// may list several values separated by commas (classes = "pii-eu,risk-batch",
// certified = "iso27001,pci-dss"); a selector value matches any one of them.
// Case does not count: certificates may carry upper-case values, and a
// site labelled tenancy = "Shared" must not escape a deny of "shared".
func labelHas(have, want string) bool {
	if strings.EqualFold(have, want) {
		return true
	}
	for have != "" {
		var v string
		v, have, _ = strings.Cut(have, ",")
		if strings.EqualFold(strings.TrimSpace(v), want) {
			return true
		}
	}
	return false
}
