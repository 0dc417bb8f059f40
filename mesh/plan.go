package mesh

import (
	"errors"
	"fmt"
	"strings"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/migrate"
	"github.com/skybridge-mesh/skybridge/policy"
)

// PlanRequest asks the gateway where a list of VMs may go.
type PlanRequest struct {
	VMs []migrate.VM `json:"vms"`
	To  []string     `json:"to,omitempty"` // node, site, region or jurisdiction selectors
}

// Plan gathers what a placement plan depends on — the verified gateways
// with their advertised capacity and load, the throughput measured by
// past migrations to each site, the sizes of the images, the policy in
// force — and makes the plan (migrate.MakePlan, which is pure).
func (g *Gateway) Plan(req PlanRequest) (*migrate.Plan, error) {
	if g.mig == nil {
		return nil, errors.New("this gateway does not run migrations")
	}
	if err := migrate.ValidateInventory(req.VMs); err != nil {
		return nil, err
	}
	vms := append([]migrate.VM(nil), req.VMs...)
	var errs []error
	for i := range vms {
		if vms[i].Bytes > 0 {
			continue
		}
		n, err := allocatedBytes(vms[i].Image)
		if err != nil {
			errs = append(errs, fmt.Errorf("VM %q: %w", vms[i].Name, err))
			continue
		}
		vms[i].Bytes = n
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	rates, err := g.measuredThroughput()
	if err != nil {
		return nil, err
	}
	in := migrate.PlanInput{From: g.id.Load().Attributes(), Now: g.now(), VMs: vms, To: req.To, Destinations: g.destinations(rates)}
	if p := g.policy.Load(); p != nil {
		in.Policy = p.p
	}
	return migrate.MakePlan(in)
}

// destinations are the verified gateways as a plan weighs them, each
// with why this gateway's tunnels do not reach it, if they do not.
func (g *Gateway) destinations(rates map[string]float64) []migrate.Destination {
	self := g.id.Load().Attributes()
	var dests []migrate.Destination
	for _, n := range g.members.gateways() {
		dests = append(dests, migrate.Destination{Attributes: n.Attributes, Load: int(n.Advert.Load), Throughput: rates[n.Attributes.Site],
			Via: g.via(self, n.Attributes), Unreached: g.unreached(n.Attributes)})
	}
	return dests
}

// unreached says why the tunnels of this gateway's last reconcile carry
// nothing to gateway a ("" if they do). Verified is not reached: the
// topology links two sites only if a class both handle may travel
// between them, and in the hub topology a gateway is reached only if the
// hubs on the way link on. A route counts, not a peer: behind a hub every
// other gateway is reached through it. Before a first reconcile there is
// nothing to tell by (""): the connection says.
func (g *Gateway) unreached(a *certs.Attributes) string {
	plan := g.plan.Load()
	if plan == nil {
		return ""
	}
	for _, pc := range plan.Peers {
		for _, p := range pc.AllowedIPs {
			if p.Contains(a.OverlayIP) {
				return ""
			}
		}
	}
	// Why, as the topology judged it: gateway by gateway, since the link
	// a site shows is allowed if any of its gateways is, and refused
	// with the first refused one's reason.
	self := g.id.Load().Attributes()
	if a.Site != self.Site {
		var pol *policy.Policy
		if p := g.policy.Load(); p != nil {
			pol = p.p
		}
		if l := residencyPath(pol, self, g.via(self, a), a, g.now()); !l.Allowed {
			return l.Reason
		}
	}
	for _, c := range plan.Conflicts {
		if why, ok := strings.CutPrefix(c, a.Node+" is not reached: "); ok { // hubLinks': which hub does not link on
			return why
		}
	}
	for _, l := range plan.Links {
		if l.Site == a.Site && !l.Allowed {
			return l.Reason
		}
	}
	return fmt.Sprintf("no tunnel of this gateway routes its overlay address %s (see skybridge status: links and conflicts); a gateway that joined just now is routed at the next reconcile, in a moment", a.OverlayIP)
}

// allocatedBytes is what migrating an image moves at most: its allocated
// extents.
func allocatedBytes(path string) (int64, error) {
	src, err := migrate.OpenSource(path)
	if err != nil {
		return 0, err
	}
	defer src.Close()
	ext, err := src.Extents()
	if err != nil {
		return 0, fmt.Errorf("image %s: %w", path, err)
	}
	var n int64
	for _, e := range ext {
		n += e.Len
	}
	return n, nil
}

// measuredThroughput is, per destination site, the allocated bytes of the
// migrations done to it over the time they took. Only whole runs count: a
// resumed attempt or a re-sync skips chunks its duration never paid for.
func (g *Gateway) measuredThroughput() (map[string]float64, error) {
	sends, err := g.mig.journal.Sends()
	if err != nil {
		return nil, err
	}
	bytes, secs := map[string]float64{}, map[string]float64{}
	for _, r := range sends {
		st := r.Stats
		if r.State == migrate.StateDone && st.Duration > 0 && st.ChunksResumed+st.ChunksHad+st.ChunksSame == 0 {
			bytes[r.ToSite] += float64(st.AllocatedBytes)
			secs[r.ToSite] += st.Duration.Seconds()
		}
	}
	out := map[string]float64{}
	for site, b := range bytes {
		out[site] = b / secs[site]
	}
	return out, nil
}
