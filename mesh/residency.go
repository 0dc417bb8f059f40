package mesh

import (
	"context"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/skybridge-mesh/skybridge/migrate"
	"github.com/skybridge-mesh/skybridge/policy"
)

// Residency at rest. The policy admits an image when it arrives; the
// images a gateway stores are held to the policy in force afterwards too:
// a new revision can take a class away from the site, an exception it
// rested by can expire, a re-issued certificate can change what the site
// attests. An image the rules no longer let rest here is reported — in
// its listing, a metric, the log and an audit record when it leaves the
// policy and when it comes back — and stays until an operator moves it
// elsewhere and removes it (`migrate remove`): deleting data by itself
// is not the gateway's call.

// AtRest is the verdict of the policy in force on an image resting here.
type AtRest struct {
	// Allowed is the rules' verdict, whatever the policy's mode: false
	// in audit mode too, where nothing is refused but the breach is
	// what should be seen.
	Allowed   bool      `json:"allowed"`
	Rule      string    `json:"rule"`
	Reasons   []string  `json:"reasons,omitempty"`
	Exception string    `json:"exception,omitempty"` // the exception it rests by
	Until     time.Time `json:"until,omitzero"`      // when that exception expires
	Policy    string    `json:"policy"`
}

// StoredImage is an image this gateway stores, with the policy's verdict
// on it (nil when no policy is in force).
type StoredImage struct {
	migrate.ImageRecord
	AtRest *AtRest `json:"at_rest,omitempty"`
}

// judgeAtRest is whether p lets data of class rest at here at now.
func judgeAtRest(p *policy.Policy, here policy.Site, class string, now time.Time) AtRest {
	d := p.Evaluate(policy.Request{Class: class, Action: policy.Store, Sites: []policy.Site{here}, Time: now})
	a := AtRest{Allowed: !d.Denied, Rule: d.Rule.String(), Reasons: d.Reasons, Policy: d.Policy.RevisionString()}
	if e := d.Exception; e != nil {
		a.Exception, a.Until = e.Name, e.Expires
	}
	return a
}

// storedImages is the catalog with the verdict of the policy in force now.
func (g *Gateway) storedImages() ([]StoredImage, error) {
	imgs, err := g.mig.journal.Catalog()
	if err != nil {
		return nil, err
	}
	return g.judged(imgs), nil
}

// judged pairs images with the verdict of the policy in force now.
func (g *Gateway) judged(imgs []migrate.ImageRecord) []StoredImage {
	out := make([]StoredImage, len(imgs))
	p, here, now := g.policy.Load(), policy.SiteOf(g.id.Load().Attributes()), g.now()
	for i, img := range imgs {
		out[i].ImageRecord = img
		if p != nil {
			a := judgeAtRest(p.p, here, img.Class, now)
			out[i].AtRest = &a
		}
	}
	return out
}

// atRestRecheck is how often stored images are judged again without a
// reason to: a safety net under the events that trigger it (a policy
// adopted, the identity renewed, the catalog changed, an exception
// expiring).
const atRestRecheck = time.Minute

// atRestState is the residency loop's, and the metrics' view of it.
type atRestState struct {
	kick    chan struct{}
	mu      sync.Mutex
	stored  map[string]int // images by class
	outside map[string]int // images the rules no longer let rest here, by class
}

func (s *atRestState) trigger() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// counts returns the last judgement's images and breaches, by class.
func (s *atRestState) counts() (stored, outside map[string]int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.stored), maps.Clone(s.outside)
}

// storedImagesAffected has the stored images judged again: the policy
// or this gateway's certificate changed.
func (g *Gateway) storedImagesAffected() {
	if g.mig != nil {
		g.mig.atRest.trigger()
	}
}

// atRestVerdict is a verdict on an image as stored.
type atRestVerdict struct {
	root    migrate.Hash
	outside bool
}

// atRestSeen is what the loop last said of an image: in the gateway's
// log, and in the audit log, which is behind while it refuses the record
// (every pass tries again; the gateway's log says it once).
type atRestSeen struct {
	logged   atRestVerdict
	recorded *atRestVerdict // nil: nothing recorded since the image was first judged
	owed     *atRestOwed    // the record the audit log last refused
}

// atRestOwed is a record the audit log refused, kept until it takes it.
type atRestOwed struct {
	verdict atRestVerdict
	fields  map[string]any
}

// atRestChange is what verdict says after was (nil: nothing said yet):
// "out-of-policy", "in-policy", or "" for nothing new.
func atRestChange(was *atRestVerdict, verdict atRestVerdict) string {
	same := was != nil && was.root == verdict.root
	switch {
	case verdict.outside && !(same && was.outside):
		return "out-of-policy"
	case !verdict.outside && same && was.outside:
		return "in-policy"
	}
	return ""
}

// residencyLoop judges the stored images whenever something they depend
// on may have changed, and says so when one leaves the policy or comes
// back into it. What it said is kept in memory only: after a restart the
// images outside the policy are reported, and audited, once more.
func (g *Gateway) residencyLoop(ctx context.Context) {
	seen := map[string]atRestSeen{}
	var imgs []migrate.ImageRecord
	g.mig.catalogChanged.Store(true)
	for {
		if g.mig.catalogChanged.Swap(false) {
			// On a failure the last list stands: judged empty, the images
			// outside the policy would look resolved, and be reported
			// again once read.
			if l, err := g.mig.journal.Catalog(); err != nil {
				g.log.Error("list stored images for the residency check", "err", err)
				g.mig.catalogChanged.Store(true) // again at the next pass
			} else {
				imgs = l
			}
		}
		next := g.judgeStored(imgs, seen)
		wait := atRestRecheck
		if !next.IsZero() {
			// Just past the instant, so the exception has expired.
			wait = min(wait, max(next.Sub(g.now()), 0)+10*time.Millisecond)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-g.mig.atRest.kick:
		case <-t.C:
		}
		t.Stop()
	}
}

// judgeStored judges imgs under the policy in force, logs and audits
// what changed since seen (updated; a record the audit log refuses is
// owed there, for the next pass), publishes the counts, and returns
// when a verdict may change by itself next (zero: not by itself).
func (g *Gateway) judgeStored(imgs []migrate.ImageRecord, seen map[string]atRestSeen) time.Time {
	ap := g.policy.Load()
	stored, outside := map[string]int{}, map[string]int{}
	for _, img := range imgs {
		stored[img.Class]++
	}
	if ap == nil {
		g.mig.atRest.publish(stored, outside)
		return time.Time{}
	}
	id, now := g.id.Load(), g.now()
	self := id.Attributes()
	here := policy.SiteOf(self)
	names := map[string]bool{}
	for _, img := range imgs {
		names[img.Name] = true
		a := judgeAtRest(ap.p, here, img.Class, now)
		if !a.Allowed {
			outside[img.Class]++
		}
		verdict := atRestVerdict{root: img.Root, outside: !a.Allowed}
		prev, known := seen[img.Name]
		var logged *atRestVerdict
		if known {
			logged = &prev.logged
		}
		told := atRestChange(logged, verdict)
		switch told {
		case "out-of-policy":
			g.log.Warn("a stored image is outside the residency policy in force: move it to a site the policy allows and remove it here (skybridge migrate remove); the move is a transit from this site, which the policy must allow too (an exception for the move where it does not)",
				"name", img.Name, "class", img.Class, "rule", a.Rule, "reason", strings.Join(a.Reasons, "; "), "policy", a.Policy)
		case "in-policy":
			g.log.Info("a stored image is within the residency policy in force again", "name", img.Name, "class", img.Class, "rule", a.Rule, "policy", a.Policy)
		}
		// A record the audit log refused for a verdict since changed is
		// written first, marked recovered, as it was judged: judged from
		// what the log has, an image back in the policy before the log
		// took its out-of-policy record would have neither recorded.
		recorded := prev.recorded
		if o := prev.owed; o != nil && o.verdict != verdict && g.mig.audit != nil {
			o.fields["recovered"] = "recorded late: the audit log did not take it when the verdict changed"
			if _, err := g.mig.audit.Append(id, "image", o.fields, now); err != nil {
				if told != "" {
					g.log.Error("audit log: a stored image's residency verdicts are not recorded; they are tried again at every check until the log takes them", "name", img.Name, "action", o.fields["action"], "err", err)
				}
				seen[img.Name] = atRestSeen{logged: verdict, recorded: recorded, owed: o}
				continue
			}
			g.log.Warn("wrote the audit record of a stored image's residency verdict, which the audit log refused when it changed", "name", img.Name, "action", o.fields["action"])
			recorded = &o.verdict
		}
		// Judged against what the audit log has, not what the gateway's
		// log said: a record the audit log refused is written at a later
		// pass, rather than lost while the gateway runs.
		action := atRestChange(recorded, verdict)
		if action != "" && g.mig.audit != nil {
			f := map[string]any{
				"action": action, "name": img.Name, "class": img.Class, "root": img.Root.String(), "format": img.Format,
				"site": self.Site, "jurisdiction": self.Jurisdiction, "policy": a.Policy, "rule": a.Rule, "reasons": a.Reasons,
			}
			if a.Exception != "" {
				f["exception"] = a.Exception
			}
			if told == "" {
				f["recovered"] = "recorded late: the audit log did not take it when the verdict changed"
			}
			if _, err := g.mig.audit.Append(id, "image", f, now); err != nil {
				// Said once per verdict, not at every pass while the
				// log refuses.
				if told != "" {
					g.log.Error("audit log: a stored image's residency verdict is not recorded; it is tried again at every check until the log takes it", "name", img.Name, "action", action, "err", err)
				}
				seen[img.Name] = atRestSeen{logged: verdict, recorded: recorded, owed: &atRestOwed{verdict, f}}
				continue
			}
			if told == "" {
				g.log.Warn("wrote the audit record of a stored image's residency verdict, which the audit log refused when it changed", "name", img.Name, "action", action)
			}
		}
		seen[img.Name] = atRestSeen{logged: verdict, recorded: &verdict}
	}
	for name := range seen {
		if !names[name] {
			delete(seen, name)
		}
	}
	g.mig.atRest.publish(stored, outside)
	return ap.p.NextChange(now)
}

func (s *atRestState) publish(stored, outside map[string]int) {
	s.mu.Lock()
	s.stored, s.outside = stored, outside
	s.mu.Unlock()
}

// RemoveImage removes a stored image, for the reason given (kept in its
// audit record).
func (g *Gateway) RemoveImage(name, reason string) (*migrate.ImageRecord, error) {
	if img, err := g.mig.journal.Image(name); err == nil {
		release, err := g.mig.holdForRemoval(name, img.Path)
		if err != nil {
			return nil, err
		}
		defer release()
	}
	return g.mig.recv.RemoveImage(name, reason)
}
