package policy

import "github.com/hashicorp/hcl/v2"

// The HCL schema of a policy file. These structs only carry what the file
// says; compile turns them into the evaluation model and reports mistakes
// with their position.

type fileSyntax struct {
	Policy        *headerSyntax        `hcl:"policy,block"`
	Jurisdictions []jurisdictionSyntax `hcl:"jurisdiction,block"`
	Selectors     []namedSelector      `hcl:"selector,block"`
	Classes       []classSyntax        `hcl:"class,block"`
	Exceptions    []exceptionSyntax    `hcl:"exception,block"`
}

type headerSyntax struct {
	Name         string    `hcl:"name"`
	Version      int64     `hcl:"version"`
	Mode         string    `hcl:"mode,optional"`
	Description  string    `hcl:"description,optional"`
	DefRange     hcl.Range `hcl:",def_range"`
	VersionRange hcl.Range `hcl:"version,attr_range"`
	ModeRange    hcl.Range `hcl:"mode,attr_range"`
}

type jurisdictionSyntax struct {
	Name           string    `hcl:"name,label"`
	Countries      []string  `hcl:"countries"`
	Description    string    `hcl:"description,optional"`
	DefRange       hcl.Range `hcl:",def_range"`
	CountriesRange hcl.Range `hcl:"countries,attr_range"`
}

// selectorSyntax is the set of site criteria shared by rules, exceptions
// and named selectors (gohcl does not flatten embedded structs, so each of
// those blocks keeps its remaining body and compile decodes it into this).
// Every given criterion must hold (AND); any value of a list may match (OR).
type selectorSyntax struct {
	Site         []string          `hcl:"site,optional"`
	Provider     []string          `hcl:"provider,optional"`
	Region       []string          `hcl:"region,optional"`
	Jurisdiction []string          `hcl:"jurisdiction,optional"`
	Labels       map[string]string `hcl:"labels,optional"`
	Selector     string            `hcl:"selector,optional"`

	SiteRange         hcl.Range `hcl:"site,attr_range"`
	ProviderRange     hcl.Range `hcl:"provider,attr_range"`
	RegionRange       hcl.Range `hcl:"region,attr_range"`
	JurisdictionRange hcl.Range `hcl:"jurisdiction,attr_range"`
	LabelsRange       hcl.Range `hcl:"labels,attr_range"`
	SelectorRange     hcl.Range `hcl:"selector,attr_range"`
}

type namedSelector struct {
	Name        string    `hcl:"name,label"`
	Description string    `hcl:"description,optional"`
	Rest        hcl.Body  `hcl:",remain"` // the selectorSyntax
	DefRange    hcl.Range `hcl:",def_range"`
}

type classSyntax struct {
	Name        string       `hcl:"name,label"`
	Description string       `hcl:"description,optional"`
	Mode        string       `hcl:"mode,optional"`
	Allow       []ruleSyntax `hcl:"allow,block"`
	Deny        []ruleSyntax `hcl:"deny,block"`
	DefRange    hcl.Range    `hcl:",def_range"`
	ModeRange   hcl.Range    `hcl:"mode,attr_range"`
}

type ruleSyntax struct {
	Action   string         `hcl:"action,label"`
	Rest     hcl.Body       `hcl:",remain"` // the selectorSyntax
	Reason   string         `hcl:"reason,optional"`
	Require  *requireSyntax `hcl:"require,block"`
	DefRange hcl.Range      `hcl:",def_range"`
}

type requireSyntax struct {
	EncryptionAtRest      *bool     `hcl:"encryption_at_rest,optional"`
	MaxHops               *int      `hcl:"max_hops,optional"`
	MinReplicaZones       *int      `hcl:"min_replica_zones,optional"`
	DefRange              hcl.Range `hcl:",def_range"`
	EncryptionAtRestRange hcl.Range `hcl:"encryption_at_rest,attr_range"`
	MaxHopsRange          hcl.Range `hcl:"max_hops,attr_range"`
	ZonesRange            hcl.Range `hcl:"min_replica_zones,attr_range"`
}

type exceptionSyntax struct {
	Name     string    `hcl:"name,label"`
	Rest     hcl.Body  `hcl:",remain"` // the selectorSyntax
	Class    string    `hcl:"class"`
	Action   string    `hcl:"action"`
	Category string    `hcl:"category"`
	Reason   string    `hcl:"reason"`
	Approver string    `hcl:"approver"`
	Ticket   string    `hcl:"ticket"`
	Expires  string    `hcl:"expires"`
	DefRange hcl.Range `hcl:",def_range"`

	ClassRange    hcl.Range `hcl:"class,attr_range"`
	ActionRange   hcl.Range `hcl:"action,attr_range"`
	CategoryRange hcl.Range `hcl:"category,attr_range"`
	ExpiresRange  hcl.Range `hcl:"expires,attr_range"`
}
