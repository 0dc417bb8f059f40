package policy

import (
	"fmt"
	"sort"

	"github.com/hashicorp/hcl/v2"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/hclconf"
)

// Inventory is a set of sites by name, for judging a policy against the
// mesh it will govern.
type Inventory map[string]Site

// Names returns the site names, sorted.
func (inv Inventory) Names() []string {
	out := make([]string, 0, len(inv))
	for n := range inv {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Lookup returns the named sites in order, or an error naming the unknown
// ones.
func (inv Inventory) Lookup(names []string) ([]Site, error) {
	out := make([]Site, 0, len(names))
	for _, n := range names {
		s, ok := inv[n]
		if !ok {
			return nil, fmt.Errorf("site %q is not in the inventory (known: %v)", n, inv.Names())
		}
		out = append(out, s)
	}
	return out, nil
}

type siteSyntax struct {
	Name         string            `hcl:"name,label"`
	Provider     string            `hcl:"provider"`
	Region       string            `hcl:"region"`
	Jurisdiction string            `hcl:"jurisdiction"`
	Labels       map[string]string `hcl:"labels,optional"`
	DefRange     hcl.Range         `hcl:",def_range"`
}

// LoadInventory reads `site "NAME" { provider region jurisdiction labels }`
// blocks from an HCL file.
func LoadInventory(file string) (Inventory, error) {
	// A file of its own holds sites only: anything else is a typo (or
	// the wrong file) whose sites would silently be missing. A label
	// given twice is refused, not decided by the order of two lines.
	var only struct {
		Sites []siteSyntax `hcl:"site,block"`
	}
	if err := hclconf.DecodeFile(file, &only); err != nil {
		return nil, err
	}
	if len(only.Sites) == 0 {
		return nil, fmt.Errorf("%s holds no site block: an inventory lists sites as site \"NAME\" { provider, region, jurisdiction, labels }", file)
	}
	return inventoryOf(only.Sites)
}

func inventoryOf(sites []siteSyntax) (Inventory, error) {
	inv := Inventory{}
	for _, s := range sites {
		r := s.DefRange
		if _, dup := inv[s.Name]; dup {
			return nil, fmt.Errorf("%s:%d: site %q is defined twice", r.Filename, r.Start.Line, s.Name)
		}
		if err := certs.ValidatePlace(s.Name, s.Region, s.Provider, s.Jurisdiction, s.Labels); err != nil {
			return nil, fmt.Errorf("%s:%d: site %q is no site a gateway's certificate could describe:\n%w", r.Filename, r.Start.Line, s.Name, err)
		}
		inv[s.Name] = Site{Name: s.Name, Provider: s.Provider, Region: s.Region, Jurisdiction: s.Jurisdiction, Labels: s.Labels}
	}
	return inv, nil
}
