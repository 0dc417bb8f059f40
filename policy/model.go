package policy

import (
	"fmt"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// Action is what is done with data at a site.
type Action string

const (
	// Store: data at rest in a site.
	Store Action = "store"
	// Transit: data crossing a site, or a tunnel between two sites.
	Transit Action = "transit"
)

// ParseAction accepts "store" or "transit".
func ParseAction(s string) (Action, error) {
	switch a := Action(s); a {
	case Store, Transit:
		return a, nil
	}
	return "", fmt.Errorf("action %q is not store or transit", s)
}

// Mode says whether denials are enforced.
type Mode string

const (
	// Enforce: a denial stops the operation.
	Enforce Mode = "enforce"
	// Audit: a would-be denial is allowed and recorded, for rolling out a
	// new rule without breaking what runs.
	Audit Mode = "audit"
)

// Site is what the policy knows about a site: the attributes its
// gateways' certificates carry.
type Site struct {
	Name         string            `json:"name"`
	Provider     string            `json:"provider"`
	Region       string            `json:"region"`
	Jurisdiction string            `json:"jurisdiction"`
	Labels       map[string]string `json:"labels,omitempty"`
}

// Labels by which a site's certificate attests what its storage provides,
// vouched for by the CA as the site's jurisdiction is. The requirements of
// a store allow are met by them, or the store is denied.
const (
	// LabelEncryptionAtRest "true": images rest encrypted at the site
	// (an encrypted volume, an encrypted cloud disk).
	LabelEncryptionAtRest = "encryption_at_rest"
	// LabelReplicaZones "N": the site's storage keeps every image in N
	// zones itself (a stretched or replicated store).
	LabelReplicaZones = "replica_zones"
	// LabelZone names the zone the site is in: a store at sites of N
	// different zones keeps N zone replicas.
	LabelZone = "zone"
)

// SiteOf takes a site's attributes from a verified gateway certificate.
func SiteOf(a *certs.Attributes) Site {
	return Site{Name: a.Site, Provider: a.Provider, Region: a.Region, Jurisdiction: a.Jurisdiction, Labels: a.Labels}
}

// PathOf is the sites of the gateways data passes from from to to,
// through via in order: a transit request's path, one site per end of
// each tunnel.
func PathOf(from *certs.Attributes, via []*certs.Attributes, to *certs.Attributes) []Site {
	path := make([]Site, 0, len(via)+2)
	path = append(path, SiteOf(from))
	for _, v := range via {
		path = append(path, SiteOf(v))
	}
	return append(path, SiteOf(to))
}

// Request asks whether data of Class may undergo Action at Sites.
//
// For Store, Sites are the sites where the data will rest (one, or each
// replica's). For Transit, Sites are the path the data takes, source first
// and destination last; every site on it must allow transit, and a rule's
// max_hops bounds the number of tunnels (len(Sites)-1).
type Request struct {
	Class  string    `json:"class"`
	Action Action    `json:"action"`
	Sites  []Site    `json:"sites"`
	Time   time.Time `json:"time"` // decides which exceptions are in force
}

// Obligations are the requirements of the allows that admitted a request;
// the caller must meet them (e.g. encrypt at rest).
type Obligations struct {
	EncryptionAtRest bool `json:"encryption_at_rest,omitempty"`
	MaxHops          int  `json:"max_hops,omitempty"`          // 0: no bound
	MinReplicaZones  int  `json:"min_replica_zones,omitempty"` // 0: no bound
}

func (o *Obligations) merge(r *Obligations) {
	o.EncryptionAtRest = o.EncryptionAtRest || r.EncryptionAtRest
	if r.MaxHops > 0 && (o.MaxHops == 0 || r.MaxHops < o.MaxHops) {
		o.MaxHops = r.MaxHops
	}
	o.MinReplicaZones = max(o.MinReplicaZones, r.MinReplicaZones)
}

// IsZero reports whether there is nothing to meet.
func (o Obligations) IsZero() bool { return o == Obligations{} }

func (o Obligations) String() string {
	var p []string
	if o.EncryptionAtRest {
		p = append(p, "encryption at rest")
	}
	if o.MaxHops > 0 {
		p = append(p, fmt.Sprintf("at most %d hop(s)", o.MaxHops))
	}
	if o.MinReplicaZones > 0 {
		p = append(p, fmt.Sprintf("replicas in at least %d zones", o.MinReplicaZones))
	}
	if len(p) == 0 {
		return "none"
	}
	return strings.Join(p, ", ")
}

// Position is where something is written in the policy file.
type Position struct {
	File string `json:"file"`
	Line int    `json:"line"`
}

func (p Position) String() string {
	if p.File == "" {
		return "-"
	}
	return fmt.Sprintf("%s:%d", p.File, p.Line)
}

// RuleRef names the rule that decided.
type RuleRef struct {
	Kind   string   `json:"kind"` // "allow", "deny", "exception", "default-deny", "max-hops", "requirement"
	Name   string   `json:"name"` // e.g. `class "pii-eu" allow "store"`
	Pos    Position `json:"position"`
	Reason string   `json:"reason,omitempty"`
}

func (r RuleRef) String() string {
	if r.Pos.File == "" {
		return r.Name
	}
	return fmt.Sprintf("%s (%s)", r.Name, r.Pos)
}

// ExceptionRef identifies an exception that decided a request.
type ExceptionRef struct {
	Name     string    `json:"name"`
	Category string    `json:"category"`
	Approver string    `json:"approver"`
	Ticket   string    `json:"ticket"`
	Expires  time.Time `json:"expires"`
}

// SiteDecision is the verdict for one site of a request.
type SiteDecision struct {
	Site      string        `json:"site"`
	Allowed   bool          `json:"allowed"`
	Rule      RuleRef       `json:"rule"`
	Reason    string        `json:"reason"`
	Exception *ExceptionRef `json:"exception,omitempty"`
}

// Decision is the answer to a Request.
type Decision struct {
	// Allowed is the effective outcome: true when the policy allows the
	// request, and also when it denies it in audit mode (then Audit is
	// set and the denial is what should be recorded).
	Allowed bool `json:"allowed"`
	// Denied is the policy's verdict regardless of mode.
	Denied      bool        `json:"denied"`
	Audit       bool        `json:"audit,omitempty"`
	Rule        RuleRef     `json:"rule"`
	Reasons     []string    `json:"reasons"`
	Obligations Obligations `json:"obligations"`
	// Exception is the first exception the decision relied on;
	// Exceptions, every one (a move may rest on one for where the data
	// is stored and another for where it passes), each once.
	Exception  *ExceptionRef   `json:"exception,omitempty"`
	Exceptions []*ExceptionRef `json:"exceptions,omitempty"`
	Sites      []SiteDecision  `json:"sites"`
	Policy     Revision        `json:"policy"`
}

// Outcome is "allow", "deny", or "audit" (allowed only because of audit
// mode): the label a metric or a log line wants.
func (d *Decision) Outcome() string {
	switch {
	case d.Audit:
		return "audit"
	case d.Allowed:
		return "allow"
	}
	return "deny"
}

// Revision identifies a policy: its declared version and the SHA-256 of
// its source.
type Revision struct {
	Name    string `json:"name"`
	Version int64  `json:"version"`
	SHA256  string `json:"sha256"`
}

func (r Revision) String() string {
	h := r.SHA256
	if len(h) > 12 {
		h = h[:12]
	}
	return fmt.Sprintf("%s v%d (sha256:%s)", r.Name, r.Version, h)
}
