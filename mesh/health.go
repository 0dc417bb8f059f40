package mesh

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/skybridge-mesh/skybridge/migrate"
)

// Data-plane health of the gateways that could carry a site's routes.
//
// Gossip says whether a gateway is alive; it does not say whether our
// tunnel to it carries packets. Where a remote site has two or more
// gateways, this gateway probes each of them through its tunnel every
// second (a TCP connection to its overlay address, tried again within the
// probe if it goes unanswered: the answer, even a refusal, has crossed the
// tunnel both ways, and the probe keeps the WireGuard handshake fresh), and the topology routes the site's prefixes
// through the first gateway by name that answers. A gateway is judged
// unreachable after probeFailures misses in a row, and reachable again only
// after answering for probeRecovery without a miss, so a gateway that
// comes and goes does not drag traffic back and forth. A gateway not yet
// probed long enough (just joined) counts as unreachable, so the routes
// stay where they are until it has proved itself — unless no gateway of
// its site is reachable: then one that answers counts.

const (
	probeInterval = time.Second
	probeTimeout  = 800 * time.Millisecond
	probeAttempts = 3 // connection attempts per probe, probeStagger apart
	probeStagger  = 250 * time.Millisecond
	probeFailures = 2
	probeRecovery = 10 * time.Second
	probeForget   = 10 * time.Minute // a gateway gone this long is forgotten
)

type probeState struct {
	site     string
	fails    int
	down     bool
	answered bool      // ever, since first probed
	upSince  time.Time // first answer of the current run of answers
	lastSeen time.Time // last time it was a member
}

// answering: it has answered, and not missed probeFailures probes in a
// row since (judge counts it reachable while no gateway of its site is
// proven).
func (st *probeState) answering() bool { return st.answered && st.fails < probeFailures }

// observe takes one probe's outcome and reports whether the verdict
// changed.
func (st *probeState) observe(answered bool, now time.Time) bool {
	if !answered {
		st.fails++
		st.upSince = time.Time{}
		if !st.down && st.fails >= probeFailures {
			st.down = true
			return true
		}
		return false
	}
	st.fails, st.answered = 0, true
	if st.upSince.IsZero() {
		st.upSince = now
	}
	if st.down && now.Sub(st.upSince) >= probeRecovery {
		st.down = false
		return true
	}
	return false
}

// healthLoop probes and publishes the set of unreachable gateways.
func (g *Gateway) healthLoop(ctx context.Context) {
	states := map[string]*probeState{}
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	lastGen := ^uint64(0)
	var carriers map[string]bool // as the last round found them: nil before the first
	for {
		// Without a site of two gateways there is nothing to probe; look
		// again only when the membership changes (a thousand gateways
		// each listing a thousand members every second would cost).
		if gen := g.members.generation(); len(states) > 0 || gen != lastGen {
			lastGen = gen
			carriers = g.probeRound(ctx, states, carriers)
		} else {
			// Kept current while nothing is probed: the next round, when
			// a site gets a second gateway, seeds from it.
			carriers = g.planCarriers()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// probeRound probes and judges, a gateway first probed starting out
// reachable if it carried its site's routes as of the round before
// (before, the first time): the plan may have moved them since to a
// newcomer that sorts first and is not judged yet, which must not then
// start reachable and its proven sibling unproven. It returns the
// carriers as of now, for the next round.
func (g *Gateway) probeRound(ctx context.Context, states map[string]*probeState, before map[string]bool) map[string]bool {
	now := g.planCarriers()
	if before == nil {
		before = now
	}
	self := g.id.Load().Attributes()
	nodes := g.members.gateways()
	targets, members := probeTargets(self.Site, nodes, states)
	answered := make([]bool, len(targets))
	attempts := make([]int, len(targets))
	var wg sync.WaitGroup
	for i, n := range targets {
		wg.Go(func() { answered[i], attempts[i] = g.probe(ctx, n.Attributes.OverlayIP) })
	}
	wg.Wait()
	if ctx.Err() != nil {
		return before
	}
	for i := range targets {
		g.metrics.probed(answered[i], attempts[i])
	}
	answering := make(map[string]bool, len(states)) // as of before this round
	for name, st := range states {
		answering[name] = st.answering()
	}
	down, flips := judge(states, targets, members, before, answered, time.Now())
	old := g.downSet()
	flipped := make(map[string]bool, len(flips))
	for _, n := range flips {
		flipped[n.node()] = true
		g.metrics.judged(down[n.node()])
		if down[n.node()] {
			g.log.Warn("gateway unreachable through its tunnel: its site's routes go through another gateway", "peer", n.node(), "peer_site", n.site())
		} else {
			g.log.Info("gateway reachable through its tunnel again", "peer", n.node(), "peer_site", n.site())
		}
	}
	// While no gateway of a site is proven, one that answers counts
	// (judge): it goes in and out of the unreachable set, and the routes
	// with it, without a verdict of its own. Said and counted all the
	// same: a site whose gateways never stay answering long enough to be
	// proven moves its routes at every second miss, and that was silent.
	for _, n := range targets {
		name := n.node()
		st := states[name]
		was, judged := answering[name]
		// Its own answering changed, and with it whether it counts: not
		// a move a sibling's verdict made, nor one judged the first
		// time, nor a state forgotten.
		if flipped[name] || !judged || st == nil || old[name] == down[name] || was == st.answering() {
			continue
		}
		g.metrics.judged(down[name])
		g.log.Info("no gateway of the site proven reachable yet: its routes follow those answering", "peer", name, "peer_site", n.site(), "answering", !down[name])
	}
	if !maps.Equal(old, down) {
		g.down.Store(&down)
		g.healthGen.Add(1)
		g.triggerReconcile()
	}
	return now
}

// probeTargets picks the gateways to probe: those of remote sites with a
// choice of gateways, and those already judged (a site down to one
// gateway while its other one is away: when it returns, both verdicts
// must be current). members names every verified gateway.
func probeTargets(selfSite string, nodes []Node, states map[string]*probeState) (targets []Node, members map[string]bool) {
	perSite := map[string]int{}
	for _, n := range nodes {
		perSite[n.site()]++
	}
	members = map[string]bool{}
	for _, n := range nodes {
		members[n.node()] = true
		if n.site() != selfSite && (perSite[n.site()] > 1 || states[n.node()] != nil) {
			targets = append(targets, n)
		}
	}
	return targets, members
}

// judge takes a round of probe outcomes and returns the gateways now
// judged unreachable (new ones are, until they prove themselves; so are
// those gone from the membership, for when they return) and those whose
// verdict flipped. A gateway first probed while it carries its site's
// routes (carriers) starts reachable: it was the site's only gateway, and
// a newcomer beside it must prove itself before taking them.
func judge(states map[string]*probeState, targets []Node, members, carriers map[string]bool, answered []bool, now time.Time) (down map[string]bool, flips []Node) {
	for i, n := range targets {
		st := states[n.node()]
		if st == nil {
			st = &probeState{site: n.site(), down: !carriers[n.node()]} // unproven, unless it carries the routes now
			states[n.node()] = st
		}
		st.lastSeen = now
		if st.observe(answered[i], now) {
			flips = append(flips, n)
		}
	}
	// In a site where no gateway is judged reachable, one that answers,
	// proven or not yet, counts as reachable: better unproven than
	// missing. (This gateway restarted while the site's first by name is
	// dead in the data plane, or the carrier failed while its sibling was
	// still proving itself: judged alike, all down, the routes went to the
	// dead one by its name until the sibling had answered for
	// probeRecovery.) Answering is judged as reachability is, by
	// probeFailures misses in a row, so that one lost probe does not move
	// the routes.
	proven := map[string]bool{} // sites with a gateway judged reachable
	for name, st := range states {
		if !st.down && members[name] {
			proven[st.site] = true
		}
	}
	down = map[string]bool{}
	for name, st := range states {
		if !members[name] {
			st.down, st.upSince = true, time.Time{}
			if now.Sub(st.lastSeen) > probeForget {
				delete(states, name)
				continue
			}
		}
		if st.down && !(st.answering() && members[name] && !proven[st.site]) {
			down[name] = true
		}
	}
	// A site down to one gateway, its siblings forgotten, leaves nothing
	// to choose: its state goes too, and it is probed no more (a sibling
	// that comes later finds it carrying the routes, and reachable).
	judged := map[string]int{}
	for _, st := range states {
		judged[st.site]++
	}
	for name, st := range states {
		if judged[st.site] == 1 && members[name] {
			delete(states, name)
			delete(down, name)
		}
	}
	return down, flips
}

// probe reports whether a TCP connection attempt to addr through the
// tunnel got an answer (accepted or refused) within probeTimeout, and how
// many attempts it took. While none has answered it starts another every
// probeStagger, probeAttempts in all: the kernel sends a lost SYN again
// only after a second, past the timeout, so with one attempt every lost
// packet would be a miss, and on an underlay losing a few per cent two
// misses in a row, which move a site's routes, came several times an
// hour. A gateway that is gone fails all of them within the same
// probeTimeout, so failover is no slower.
func (g *Gateway) probe(ctx context.Context, addr netip.Addr) (answered bool, attempts int) {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel() // ends the attempts still waiting
	target := netip.AddrPortFrom(addr, migrate.DefaultPort).String()
	results := make(chan bool, probeAttempts) // never blocks an attempt left behind
	attempt := func() {
		c, err := g.dev.Dial(ctx, target)
		if err == nil {
			c.Close()
		}
		results <- err == nil || errors.Is(err, syscall.ECONNREFUSED) || strings.Contains(err.Error(), "connection refused")
	}
	stagger := time.NewTicker(probeStagger)
	defer stagger.Stop()
	go attempt()
	attempts, waiting := 1, 1
	for {
		select {
		case ok := <-results:
			waiting--
			// An attempt that failed at once (no route yet) is not
			// followed at once: the next would fail alike.
			if ok || (waiting == 0 && attempts == probeAttempts) {
				return ok, attempts
			}
		case <-stagger.C:
			if attempts < probeAttempts {
				attempts++
				waiting++
				go attempt()
			}
		case <-ctx.Done():
			return false, attempts
		}
	}
}

// planCarriers is the gateways carrying their sites' routes in the plan
// applied last.
func (g *Gateway) planCarriers() map[string]bool {
	out := map[string]bool{}
	if p := g.plan.Load(); p != nil {
		for _, n := range p.Carriers {
			out[n] = true
		}
	}
	return out
}

// downSet is the gateways the data plane does not reach now.
func (g *Gateway) downSet() map[string]bool {
	if d := g.down.Load(); d != nil {
		return *d
	}
	return nil
}
