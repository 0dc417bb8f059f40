package migrate

import (
	"bufio"
	"cmp"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/iso3166"
	"github.com/skybridge-mesh/skybridge/policy"
)

// Placement planning: where may each of many VMs go? A plan is a pure
// function of the inventory, the verified destinations (their attributes,
// advertised capacity and load, measured throughput) and the residency
// policy, so the same inputs always give the same plan and the function
// is table-tested; the gateway gathers the inputs and `migrate apply`
// carries the plan out.

// VM is one line of a placement inventory.
type VM struct {
	Name      string  `json:"name"`
	Image     string  `json:"image"`
	Class     string  `json:"class"`
	CPU       int     `json:"cpu"`
	MemoryGiB float64 `json:"memory_gib"`
	Bytes     int64   `json:"bytes"` // allocated bytes to move; the gateway measures the image when 0
}

// Capacity labels a gateway's certificate may carry: what the site behind
// it can run. A gateway without them is placed by load only.
const (
	LabelCapacityCPU    = "capacity_cpu"
	LabelCapacityMemory = "capacity_memory_gib"
)

// Destination is a verified gateway a plan may send VMs to.
type Destination struct {
	Attributes *certs.Attributes
	Load       int     // migrations it is receiving now (advertised)
	Throughput float64 // image bytes per second measured to its site; 0: none yet
	// Via are the gateways the data passes through on its way there (a
	// hub topology's hubs), as Peer.Via.
	Via []*certs.Attributes
	// Unreached says why the source's tunnels do not carry data there
	// ("" if they do): the residency link refused, or a hub that does not
	// link on. Such a gateway is left out with it as the reason, since
	// `migrate apply` would only fail to connect to it.
	Unreached string
}

// capacity reads the capacity labels: +Inf for a dimension not
// advertised; an error (the gateway is then left out, with a note) for a
// label that is not a finite, non-negative number.
func capacity(a *certs.Attributes) (cpu, mem float64, err error) {
	cpu, mem, err = capacityOf(a.Labels)
	if err != nil {
		return 0, 0, fmt.Errorf("%s (%s): %w", a.Node, a.Site, err)
	}
	return cpu, mem, nil
}

// CheckCapacityLabels refuses capacity labels a plan could not read, as a
// certificate is issued: a plan leaves its gateway out, and only a new
// certificate mends it.
func CheckCapacityLabels(labels map[string]string) error {
	_, _, err := capacityOf(labels)
	return err
}

func capacityOf(labels map[string]string) (cpu, mem float64, err error) {
	read := func(label, unit string) (float64, error) {
		s, ok := labels[label]
		if !ok {
			return math.Inf(1), nil
		}
		v, err := strconv.ParseFloat(s, 64)
		if err != nil || v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
			return 0, fmt.Errorf("label %s=%q is not a number of %s", label, s, unit)
		}
		return v, nil
	}
	if cpu, err = read(LabelCapacityCPU, "CPUs"); err != nil {
		return 0, 0, err
	}
	mem, err = read(LabelCapacityMemory, "GiB")
	return cpu, mem, err
}

// PlanInput is everything a plan depends on.
type PlanInput struct {
	From         *certs.Attributes // the gateway the VMs leave from
	Policy       *policy.Policy    // nil: nothing may leave
	Now          time.Time
	VMs          []VM
	To           []string // node, site, region or jurisdiction selectors; empty: any gateway
	Destinations []Destination
}

// Plan says where each VM goes.
type Plan struct {
	Created    time.Time     `json:"created"`
	From       string        `json:"from"`
	FromSite   string        `json:"from_site,omitempty"` // where the VMs leave from: any gateway of it may apply the plan
	Policy     string        `json:"policy"`
	To         []string      `json:"to,omitempty"`
	Placements []Placement   `json:"placements"` // in inventory order
	Unplaced   []Unplaced    `json:"unplaced"`
	Sites      []SitePlan    `json:"sites"`
	Bytes      int64         `json:"bytes"`       // to move, over all placements
	Estimate   time.Duration `json:"estimate_ns"` // one migration at a time, at the measured throughput
	Unmeasured int           `json:"unmeasured"`  // placements to sites with no throughput measured yet (not in Estimate)
	Notes      []string      `json:"notes,omitempty"`
}

// Placement is one VM's destination.
type Placement struct {
	VM
	To   string `json:"to"` // gateway (node)
	Site string `json:"site"`
	Rule string `json:"rule"` // the policy rule that admits it there
	// Audit: the policy denies it there (Rule is the denying rule), and
	// lets it through only because the class is in audit mode; chosen
	// only where no destination the policy allows had room.
	Audit bool `json:"audit,omitempty"`
	// Exceptions names the policy exceptions the placement rests on
	// (where it is stored, where it passes): it lasts as long as they do.
	Exceptions []string      `json:"exceptions,omitempty"`
	Estimate   time.Duration `json:"estimate_ns,omitempty"`
}

// Unplaced is a VM no destination can take, and why.
type Unplaced struct {
	VM
	Reasons []string `json:"reasons"`
}

// SitePlan sums a plan per destination gateway.
type SitePlan struct {
	Node      string  `json:"node"`
	Site      string  `json:"site"`
	VMs       int     `json:"vms"`
	Bytes     int64   `json:"bytes"`
	CPU       int     `json:"cpu"`                    // planned through this gateway
	CPUCap    float64 `json:"cpu_capacity,omitempty"` // of its site, shared with the site's other gateways; 0 when not advertised (CPUUnbounded)
	MemoryGiB float64 `json:"memory_gib"`
	MemoryCap float64 `json:"memory_capacity_gib,omitempty"`
	// A dimension the gateway does not advertise does not limit it.
	CPUUnbounded    bool    `json:"cpu_unbounded,omitempty"`
	MemoryUnbounded bool    `json:"memory_unbounded,omitempty"`
	Load            int     `json:"load"` // migrations it was receiving when planned
	Throughput      float64 `json:"throughput,omitempty"`
}

// Standing is what a move the policy admits rests on, best first: a
// planned VM and `migrate run --to` pick among the destinations of the
// best standing, so that both choose alike.
type Standing int

const (
	ByRule      Standing = iota // the class's rules allow it
	ByException                 // only an exception does: the data rests outside the rules once it expires
	ByAudit                     // the policy denies it, and audit mode lets it through
	Refused                     // the policy refuses it
)

// StandingOf is what the verdict of policy.AdmitPath rests on.
func StandingOf(v *policy.Decision) Standing {
	switch {
	case !v.Allowed:
		return Refused
	case v.Denied:
		return ByAudit
	case len(v.Exceptions) > 0:
		return ByException
	}
	return ByRule
}

// Matches reports whether a gateway is what a "to" selector names: its
// node, site or region, or its jurisdiction (an ISO 3166 code).
func Matches(a *certs.Attributes, to string) bool {
	return a.Node == to || a.Site == to || a.Region == to || (iso3166.Valid(strings.ToUpper(to)) && a.Jurisdiction == strings.ToUpper(to))
}

// The most a VM of an inventory may have.
const (
	maxVMCPU       = 1 << 16
	maxVMMemoryGiB = 1 << 20
)

// addCapped adds without wrapping around: a total past int64 is none a
// person reads anyway.
func addCapped[T ~int64](a, b T) T {
	if b > 0 && a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// ValidateInventory checks VMs for what no plan can fix.
func ValidateInventory(vms []VM) error {
	var errs []error
	seen := map[string]bool{}
	for i, vm := range vms {
		switch {
		case vm.Name == "":
			errs = append(errs, fmt.Errorf("VM %d: no name", i+1))
		case seen[vm.Name]:
			errs = append(errs, fmt.Errorf("VM %q: listed twice", vm.Name))
		}
		seen[vm.Name] = true
		if err := checkName(vm.Name); vm.Name != "" && err != nil {
			errs = append(errs, fmt.Errorf("VM %q: %v (it names the image at the destination)", vm.Name, err))
		}
		if vm.Image == "" {
			errs = append(errs, fmt.Errorf("VM %q: no image", vm.Name))
		}
		if vm.Class == "" {
			errs = append(errs, fmt.Errorf("VM %q: no data class (the policy decides with it)", vm.Name))
		}
		if vm.CPU < 0 || vm.MemoryGiB < 0 || vm.Bytes < 0 || math.IsNaN(vm.MemoryGiB) || math.IsInf(vm.MemoryGiB, 0) {
			errs = append(errs, fmt.Errorf("VM %q: CPU, memory and bytes must be finite and not negative", vm.Name))
		}
		// Bounds no VM comes near, so that no total of a plan wraps
		// around (a typo, a damaged export) into a figure that misleads.
		if vm.CPU > maxVMCPU || vm.MemoryGiB > maxVMMemoryGiB || vm.Bytes > MaxImageSize {
			errs = append(errs, fmt.Errorf("VM %q: %d CPUs, %g GiB of memory, %d bytes: more than any VM has (at most %d CPUs, %d GiB, %d bytes, the largest image a migration takes)",
				vm.Name, vm.CPU, vm.MemoryGiB, vm.Bytes, maxVMCPU, maxVMMemoryGiB, int64(MaxImageSize)))
		}
	}
	return errors.Join(errs...)
}

type slot struct {
	dest      Destination
	room      *room   // its site's, shared with the site's other gateways
	usedCPU   int     // planned through this gateway
	usedMem   float64 // planned through this gateway
	assigned  int
	bytes     int64
	policyErr map[string]string   // class → why not, "" if allowed
	rule      map[string]string   // class → admitting rule
	audit     map[string]bool     // class → denied, let through by audit mode
	waived    map[string][]string // class → the exceptions that admit it, for a time
	standing  map[string]Standing // class → what the admission rests on
}

// room is a site's capacity and what the plan has used of it. The
// capacity labels say what the site behind a gateway can run, and every
// gateway of a site (a burst site's, an HA pair) carries them: counted per
// gateway, a site of two would be planned twice full.
type room struct {
	cpu, mem float64 // capacity; +Inf: not advertised
	usedCPU  int
	usedMem  float64
}

func (s *slot) fits(vm VM) bool {
	r := s.room
	return float64(r.usedCPU+vm.CPU) <= r.cpu && r.usedMem+vm.MemoryGiB <= r.mem+1e-9
}

// fill is how full a slot's site would be with vm: the larger of its CPU
// and memory shares (an unadvertised dimension counts as empty).
func (s *slot) fill(vm VM) float64 {
	r, f := s.room, 0.0
	if r.cpu > 0 && !math.IsInf(r.cpu, 1) {
		f = float64(r.usedCPU+vm.CPU) / r.cpu
	}
	if r.mem > 0 && !math.IsInf(r.mem, 1) {
		f = max(f, (r.usedMem+vm.MemoryGiB)/r.mem)
	}
	return f
}

// MakePlan places the VMs: for each, the destinations the selectors name
// (not the source's own site unless they name it or its gateway, nor one
// the source's tunnels do not reach) and the policy admits (store at the
// destination, transit on the way) with room left; those the class's
// rules allow before those only an exception admits, and those only audit
// mode lets through last (StandingOf); within each, the least loaded
// first — migrations it is receiving plus those planned for it, as a
// dispatcher hands work to the least busy worker — then the one left least
// full, then by name. The largest VMs are placed first, so that they are
// not the ones left without room.
func MakePlan(in PlanInput) (*Plan, error) {
	if err := ValidateInventory(in.VMs); err != nil {
		return nil, err
	}
	p := &Plan{Created: in.Now, From: in.From.Node, FromSite: in.From.Site, To: in.To, Placements: []Placement{}, Unplaced: []Unplaced{}, Sites: []SitePlan{}}
	if in.Policy != nil {
		p.Policy = in.Policy.Revision().String()
	}
	dests := slices.Clone(in.Destinations)
	slices.SortFunc(dests, func(a, b Destination) int { return cmp.Compare(a.Attributes.Node, b.Attributes.Node) })
	var slots []*slot
	ownSite := 0 // gateways of the source's own site left out
	// Gateways left out for a capacity label that is no number, or as not
	// reached: among the reasons of a VM left unplaced, which would
	// otherwise not name them (or, with no other destination, blame an
	// empty mesh).
	var leftOut []string
	rooms := map[string]*room{}
	for _, d := range dests {
		if d.Attributes.Node == in.From.Node {
			continue
		}
		if len(in.To) > 0 && !slices.ContainsFunc(in.To, func(to string) bool { return Matches(d.Attributes, to) }) {
			continue
		}
		// A gateway of the source's own site moves nothing out of it
		// (and, idle beside the source, would be picked first): only
		// when asked for by its name or its site's.
		if d.Attributes.Site == in.From.Site && !slices.ContainsFunc(in.To, func(to string) bool { return to == d.Attributes.Node || to == d.Attributes.Site }) {
			p.Notes = append(p.Notes, fmt.Sprintf("%s is of the source's own site %s: left out (name it, or its site, in --to to move VMs within the site)", d.Attributes.Node, d.Attributes.Site))
			ownSite++
			continue
		}
		if d.Unreached != "" {
			leftOut = append(leftOut, fmt.Sprintf("%s (%s): not reached from %s: %s", d.Attributes.Node, d.Attributes.Site, in.From.Node, d.Unreached))
			continue
		}
		cpu, mem, err := capacity(d.Attributes)
		if err != nil {
			p.Notes = append(p.Notes, err.Error()+": left out of the plan")
			leftOut = append(leftOut, err.Error()+": left out of the plan; its certificate's capacity labels must be plain numbers (--label capacity_cpu=64): issue it again with them")
			continue
		}
		if math.IsInf(cpu, 1) || math.IsInf(mem, 1) {
			p.Notes = append(p.Notes, fmt.Sprintf("%s (%s) does not advertise all its capacity (labels %s, %s): what it does not advertise does not limit it",
				d.Attributes.Node, d.Attributes.Site, LabelCapacityCPU, LabelCapacityMemory))
		}
		r := rooms[d.Attributes.Site]
		switch {
		case r == nil:
			r = &room{cpu: cpu, mem: mem}
			rooms[d.Attributes.Site] = r
		case r.cpu != cpu || r.mem != mem:
			p.Notes = append(p.Notes, fmt.Sprintf("the gateways of %s advertise different capacities: planned with the smaller", d.Attributes.Site))
			r.cpu, r.mem = min(r.cpu, cpu), min(r.mem, mem)
		}
		slots = append(slots, &slot{dest: d, room: r, policyErr: map[string]string{}, rule: map[string]string{}, audit: map[string]bool{}, waived: map[string][]string{}, standing: map[string]Standing{}})
	}

	order := make([]int, len(in.VMs))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(i, j int) int {
		a, b := in.VMs[i], in.VMs[j]
		return cmp.Or(cmp.Compare(b.CPU, a.CPU), cmp.Compare(b.MemoryGiB, a.MemoryGiB), cmp.Compare(b.Bytes, a.Bytes), cmp.Compare(a.Name, b.Name))
	})
	placed := make([]*Placement, len(in.VMs))
	why := make([][]string, len(in.VMs))
	for _, i := range order {
		vm := in.VMs[i]
		// Where the policy's rules allow it; where only an exception
		// does, until it expires (the data is then stored outside the
		// policy); where only its audit mode lets it through.
		var bests [Refused]*slot
		var reasons []string
		for _, s := range slots {
			if msg := s.admits(in, vm.Class); msg != "" {
				reasons = append(reasons, msg)
				continue
			}
			if !s.fits(vm) {
				reasons = append(reasons, fmt.Sprintf("%s (%s): needs %d CPU and %g GiB; %g CPU and %g GiB free at the site",
					s.dest.Attributes.Node, s.dest.Attributes.Site, vm.CPU, vm.MemoryGiB, s.room.cpu-float64(s.room.usedCPU), s.room.mem-s.room.usedMem))
				continue
			}
			if b := &bests[s.standing[vm.Class]]; *b == nil || better(s, *b, vm) {
				*b = s
			}
		}
		best := cmp.Or(bests[:]...)
		if best == nil {
			if len(slots) == 0 {
				reasons = noSlotReasons(in, ownSite, len(leftOut) > 0)
			}
			why[i] = append(slices.Clone(leftOut), reasons...)
			continue
		}
		best.usedCPU += vm.CPU
		best.usedMem += vm.MemoryGiB
		best.room.usedCPU += vm.CPU
		best.room.usedMem += vm.MemoryGiB
		best.assigned++
		best.bytes = addCapped(best.bytes, vm.Bytes)
		a := best.dest.Attributes
		pl := &Placement{VM: vm, To: a.Node, Site: a.Site, Rule: best.rule[vm.Class], Audit: best.audit[vm.Class], Exceptions: best.waived[vm.Class]}
		if t := best.dest.Throughput; t > 0 {
			pl.Estimate = time.Duration(min(float64(vm.Bytes)/t*float64(time.Second), math.MaxInt64/2))
		}
		placed[i] = pl
	}
	for i, vm := range in.VMs {
		if pl := placed[i]; pl != nil {
			p.Placements = append(p.Placements, *pl)
			p.Bytes = addCapped(p.Bytes, vm.Bytes)
			p.Estimate = addCapped(p.Estimate, pl.Estimate)
			if pl.Estimate == 0 && vm.Bytes > 0 {
				p.Unmeasured++
			}
		} else {
			p.Unplaced = append(p.Unplaced, Unplaced{VM: vm, Reasons: why[i]})
		}
	}
	for _, s := range slots {
		a := s.dest.Attributes
		sp := SitePlan{Node: a.Node, Site: a.Site, VMs: s.assigned, Bytes: s.bytes, CPU: s.usedCPU, MemoryGiB: s.usedMem, Load: s.dest.Load, Throughput: s.dest.Throughput,
			CPUUnbounded: math.IsInf(s.room.cpu, 1), MemoryUnbounded: math.IsInf(s.room.mem, 1)}
		if !sp.CPUUnbounded {
			sp.CPUCap = s.room.cpu
		}
		if !sp.MemoryUnbounded {
			sp.MemoryCap = s.room.mem
		}
		p.Sites = append(p.Sites, sp)
	}
	return p, nil
}

// better: fewer migrations (running and planned), then less full after
// taking vm, then by name (slots are sorted by name, so keep the first).
func better(s, than *slot, vm VM) bool {
	if a, b := s.dest.Load+s.assigned, than.dest.Load+than.assigned; a != b {
		return a < b
	}
	return s.fill(vm) < than.fill(vm)
}

// admits asks the policy (once per class) whether data of class may be
// stored at the slot's site and cross from the source to it, as the
// sender will ask before the first byte; "" if so, else why not.
func (s *slot) admits(in PlanInput, class string) string {
	if msg, ok := s.policyErr[class]; ok {
		return msg
	}
	a := s.dest.Attributes
	msg := ""
	if in.Policy == nil {
		msg = "no residency policy is in force on this gateway: nothing may leave it"
	} else {
		_, verdict := in.Policy.AdmitPath(class, policy.PathOf(in.From, s.dest.Via, a), in.Now)
		if verdict.Allowed {
			s.rule[class], s.audit[class], s.standing[class] = verdict.Rule.String(), verdict.Denied, StandingOf(&verdict)
			for _, e := range verdict.Exceptions {
				s.waived[class] = append(s.waived[class], e.Name)
			}
		} else {
			msg = fmt.Sprintf("%s (%s): %s [%s]", a.Node, a.Site, strings.Join(verdict.Reasons, "; "), verdict.Rule)
		}
	}
	s.policyErr[class] = msg
	return msg
}

// noSlotReasons says why a VM has no destination when none was left to
// weigh, besides the gateways left out for their labels or as not reached
// (leftOut), which the VM's reasons name: the others that matched were of
// the source's own site, or there were none.
func noSlotReasons(in PlanInput, ownSite int, leftOut bool) []string {
	switch {
	case ownSite > 0 && leftOut:
		return []string{fmt.Sprintf("the other gateways that match are of the source's own site %s, and they are no destination unless named: name one, or the site, in --to to move VMs within the site", in.From.Site)}
	case ownSite > 0:
		return []string{fmt.Sprintf("only gateways of the source's own site %s match, and they are no destination unless named: name one, or the site, in --to to move VMs within the site", in.From.Site)}
	case leftOut:
		return nil
	}
	return []string{noDestination(in.To)}
}

func noDestination(to []string) string {
	if len(to) == 0 {
		return "no other verified gateway in the mesh"
	}
	return fmt.Sprintf("no verified gateway matches %s (a node, site, region or jurisdiction)", strings.Join(to, ", "))
}

// inventoryColumns are the CSV header's names; bytes is optional.
var inventoryColumns = []string{"name", "image", "class", "cpu", "memory_gib", "bytes"}

// ParseInventory reads a CSV inventory with a header naming the columns
// name, image, class, cpu, memory_gib and, optionally, bytes (allocated
// bytes to move; measured from the image when absent or empty).
func ParseInventory(r io.Reader) ([]VM, error) {
	// Spreadsheets' "CSV UTF-8" starts with a byte-order mark, before a
	// quoted header or a comment as well.
	br := bufio.NewReader(r)
	if b, err := br.Peek(3); err == nil && string(b) == "\ufeff" {
		br.Discard(3)
	}
	cr := csv.NewReader(br)
	cr.Comment = '#'
	cr.TrimLeadingSpace = true
	header, err := cr.Read()
	if err == io.EOF {
		return nil, fmt.Errorf("inventory is empty: its first line names the columns (%s; bytes is optional), then one VM per line", strings.Join(inventoryColumns, ", "))
	}
	if err != nil {
		return nil, fmt.Errorf("inventory header: %w", err)
	}
	col := map[string]int{}
	for i, h := range header {
		h = strings.ToLower(strings.TrimSpace(h))
		if !slices.Contains(inventoryColumns, h) {
			return nil, fmt.Errorf("inventory header: unknown column %q (want %s)", h, strings.Join(inventoryColumns, ", "))
		}
		if j, twice := col[h]; twice {
			return nil, fmt.Errorf("inventory header: column %q is named twice (columns %d and %d): which one holds the figures?", h, j+1, i+1)
		}
		col[h] = i
	}
	for _, need := range inventoryColumns[:5] {
		if _, ok := col[need]; !ok {
			return nil, fmt.Errorf("inventory header: column %q is missing (want %s; bytes is optional)", need, strings.Join(inventoryColumns, ", "))
		}
	}
	var vms []VM
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		var pe *csv.ParseError
		if errors.As(err, &pe) && errors.Is(pe.Err, csv.ErrFieldCount) {
			return nil, fmt.Errorf("inventory line %d: %d columns, but the header names %d", pe.Line, len(rec), len(header))
		}
		if err != nil {
			return nil, fmt.Errorf("inventory: %w", err)
		}
		line, _ := cr.FieldPos(0)
		// "web1 " and "web1" are one VM: spaces around a field are the
		// spreadsheet's, not the name's.
		for i := range rec {
			rec[i] = strings.TrimSpace(rec[i])
		}
		vm := VM{Name: rec[col["name"]], Image: rec[col["image"]], Class: rec[col["class"]]}
		if vm.CPU, err = strconv.Atoi(rec[col["cpu"]]); errors.Is(err, strconv.ErrRange) {
			return nil, fmt.Errorf("inventory line %d: cpu %q is out of range", line, rec[col["cpu"]])
		} else if err != nil {
			return nil, fmt.Errorf("inventory line %d: cpu %q is not a whole number", line, rec[col["cpu"]])
		}
		if vm.MemoryGiB, err = strconv.ParseFloat(rec[col["memory_gib"]], 64); err != nil || math.IsInf(vm.MemoryGiB, 0) || math.IsNaN(vm.MemoryGiB) {
			return nil, fmt.Errorf("inventory line %d: memory_gib %q is not a number", line, rec[col["memory_gib"]])
		}
		if i, ok := col["bytes"]; ok && rec[i] != "" {
			if vm.Bytes, err = strconv.ParseInt(rec[i], 10, 64); errors.Is(err, strconv.ErrRange) {
				return nil, fmt.Errorf("inventory line %d: bytes %q is out of range", line, rec[i])
			} else if err != nil {
				return nil, fmt.Errorf("inventory line %d: bytes %q is not a whole number", line, rec[i])
			}
		}
		vms = append(vms, vm)
	}
	if len(vms) == 0 {
		return nil, errors.New("inventory lists no VM")
	}
	return vms, ValidateInventory(vms)
}
