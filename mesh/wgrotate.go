package mesh

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// WireGuard key rotation, make-before-break as far as WireGuard allows:
//
//  1. The gateway advertises the next key beside the current one (signed
//     advert). Every peer adds it as a second peer entry with no allowed
//     IPs, which routes nothing but lets a handshake with the new key
//     succeed at once, and acknowledges.
//  2. Once its peers have acknowledged (or a deadline passed), the gateway
//     stores the new key durably, switches its device to it and
//     advertises it as the current key. Each peer, on that advert, moves
//     the allowed IPs to the new entry and removes the old: WireGuard
//     cannot route one address to two keys, so this move is the only
//     interruption, as long as gossip takes to carry the advert.
//
// Acknowledgements only tell the gateway when to switch. They are signed
// by the acknowledging gateway's identity (ack.go), so the gossip key
// alone cannot make it switch before a peer is ready.

const (
	msgWGKeyAck     byte = 10 // node, next public key, its signature: "I have added it"
	wgAckWait            = 15 * time.Second
	wgRotatedFile        = "wireguard.rotated" // when the key last changed (RFC 3339)
	wgRotationRetry      = 15 * time.Minute    // after a failed scheduled rotation
)

// wgRotationCheck is how often the rotation schedule is looked at.
var wgRotationCheck = time.Minute

// WGRotationReport says how a rotation went.
type WGRotationReport struct {
	OldKey string        `json:"old_public_key"`
	NewKey string        `json:"new_public_key"`
	Ready  []string      `json:"ready"` // peers that had added the new key before the switch
	Late   []string      `json:"late"`  // peers that had not acknowledged within the wait
	Took   time.Duration `json:"took_ns"`
}

type wgAckWaiter struct {
	key certs.WGPublicKey
	ch  chan string
}

// wgKeys returns the current private key and the next one (zero if no
// rotation is under way).
func (g *Gateway) wgKeys() (cur, next certs.WGPrivateKey) {
	g.wgMu.Lock()
	defer g.wgMu.Unlock()
	return g.wgKey, g.wgNext
}

// RotateWireGuardKey replaces the gateway's WireGuard key without
// dropping its tunnels (see above). One rotation runs at a time.
func (g *Gateway) RotateWireGuardKey(ctx context.Context) (*WGRotationReport, error) {
	return g.rotateWireGuardKey(ctx, nil)
}

// rotateWireGuardKey rotates if due (nil: always) says so once this
// rotation holds the lock: a scheduled one that waited behind a manual
// one must not replace the key just reported to the operator.
func (g *Gateway) rotateWireGuardKey(ctx context.Context, due func() bool) (*WGRotationReport, error) {
	g.wgRotation.Lock()
	defer g.wgRotation.Unlock()
	// A caller that gave up while another rotation held the lock (the
	// CLI's timeout, a Ctrl-C) has reported a failure: no key changes.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if due != nil && !due() {
		return nil, nil
	}
	start := time.Now()
	old, _ := g.wgKeys()
	next, err := certs.GenerateWGKey()
	if err != nil {
		return nil, err
	}
	rep := &WGRotationReport{OldKey: old.Public().String(), NewKey: next.Public().String(), Ready: []string{}, Late: []string{}}
	expect := map[string]bool{}
	if p := g.plan.Load(); p != nil {
		for _, pc := range p.Peers {
			if !pc.Next {
				expect[pc.Node] = true
			}
		}
	}
	acks := make(chan string, len(expect)+8)
	g.wgAck.Store(&wgAckWaiter{key: next.Public(), ch: acks})
	defer g.wgAck.Store(nil)

	g.wgMu.Lock()
	g.wgNext = next
	g.wgMu.Unlock()
	if err := g.advertiseNow(); err != nil {
		g.abandonNext()
		return nil, fmt.Errorf("advertise the next WireGuard key: %w", err)
	}
	g.log.Info("WireGuard key rotation: next key advertised", "peers", len(expect))

	deadline := time.NewTimer(wgAckWait)
	defer deadline.Stop()
wait:
	for len(rep.Ready) < len(expect) {
		select {
		case n := <-acks:
			if expect[n] && !slices.Contains(rep.Ready, n) {
				rep.Ready = append(rep.Ready, n)
			}
		case <-deadline.C:
			break wait
		case <-ctx.Done():
			g.abandonNext()
			return nil, ctx.Err()
		}
	}
	for n := range expect {
		if !slices.Contains(rep.Ready, n) {
			rep.Late = append(rep.Late, n)
		}
	}
	slices.Sort(rep.Ready)
	slices.Sort(rep.Late)

	// Durable first: a crash after this point restarts with the new key,
	// which peers already know. From here on the caller's context no
	// longer applies: a cancelled request must not leave the store and
	// the device disagreeing.
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	node := g.id.Load().Attributes().Node
	if err := g.prov.Secrets().SetWireGuardKey(sctx, node, next); err != nil {
		g.abandonNext()
		return nil, err
	}
	k := wgtypes.Key(next.Bytes())
	if err := g.dev.Configure(wgtypes.Config{PrivateKey: &k}); err != nil {
		// Put the old key back, so that store, device and advert agree.
		if rerr := g.prov.Secrets().SetWireGuardKey(sctx, node, old); rerr != nil {
			return nil, fmt.Errorf("switch %s to the new key: %w; restoring the old key in the store also failed (%v): the next start uses the new key, which peers know from the advert", g.dev.Name(), err, rerr)
		}
		g.abandonNext()
		return nil, fmt.Errorf("switch %s to the new key: %w (rotation abandoned; the old key stays)", g.dev.Name(), err)
	}
	g.wgMu.Lock()
	g.wgKey, g.wgNext = next, certs.WGPrivateKey{}
	g.wgMu.Unlock()
	if err := g.advertiseNow(); err != nil {
		return nil, fmt.Errorf("advertise the new WireGuard key: %w", err)
	}
	g.wgRotated.Store(g.now().UnixNano())
	if err := g.state.markRotated(g.now()); err != nil {
		g.log.Warn("record the rotation time (a restart may rotate again early)", "err", err)
	}
	rep.Took = time.Since(start)
	g.log.Info("WireGuard key rotated", "public_key", rep.NewKey, "ready", len(rep.Ready), "late", strings.Join(rep.Late, ","), "took", rep.Took.Round(time.Millisecond))
	return rep, nil
}

// abandonNext withdraws an advertised next key (a rotation that failed
// before the switch): peers drop the extra entry.
func (g *Gateway) abandonNext() {
	g.wgMu.Lock()
	g.wgNext = certs.WGPrivateKey{}
	g.wgMu.Unlock()
	if err := g.advertiseNow(); err != nil {
		g.log.Warn("withdraw the next WireGuard key", "err", err)
	}
}

// advertiseNow signs a new advert and gossips it now. Only signing can
// fail: memberlist's wait for the first broadcast to go out may time out
// on a busy machine, but the advert is our node's metadata from then on
// and reaches everyone with the next gossip or push/pull.
func (g *Gateway) advertiseNow() error {
	if err := g.signAdvert(); err != nil {
		return err
	}
	if g.leaving.Load() {
		return nil // memberlist takes no news from a member that left: it would wait its 5 s
	}
	if err := g.ml.UpdateNode(5 * time.Second); err != nil {
		g.log.Debug("advert broadcast", "err", err)
	}
	return nil
}

// handleWGKeyAck passes a peer's acknowledgement to the running rotation.
func (g *Gateway) handleWGKeyAck(m message) error {
	w := g.wgAck.Load()
	if w == nil {
		return nil // a late ack: no rotation is waiting
	}
	if g.dropWGAcks.Load() > 0 && g.dropWGAcks.Add(-1) >= 0 {
		return nil
	}
	node, key, err := g.checkAck(m)
	if err != nil {
		return err
	}
	if len(key) != certs.WGKeyLen || certs.WGPublicKey(key) != w.key {
		return nil // for another rotation
	}
	select {
	case w.ch <- node:
	default:
	}
	return nil
}

// ackNextKeys tells the peers whose next key the device now holds that
// they may switch, again at a pass wgAckResend after the last while the
// peer still advertises it: the acknowledgement is one datagram, and a
// lost one left the peer waiting out its rotation and reporting this
// gateway late. It runs in the reconcile loop.
func (g *Gateway) ackNextKeys(plan Plan) {
	if g.ml == nil {
		return // restoring members before gossip started: the next pass acknowledges
	}
	seen := map[certs.WGPublicKey]bool{}
	for _, pc := range plan.Peers {
		if !pc.Next {
			continue
		}
		seen[pc.PublicKey] = true
		if at, ok := g.nextAcked[pc.PublicKey]; ok && g.now().Sub(at) < wgAckResend {
			continue
		}
		// A datagram, sent here and now; marked only once it left, so a
		// failed send is tried again on the next pass.
		ack, err := g.signedAck(msgWGKeyAck, pc.PublicKey[:])
		if err == nil {
			err = g.send(pc.Node, ack)
		}
		if err != nil {
			g.log.Debug("acknowledge next WireGuard key", "peer", pc.Node, "err", err)
			continue
		}
		g.nextAcked[pc.PublicKey] = g.now()
	}
	for k := range g.nextAcked {
		if !seen[k] {
			delete(g.nextAcked, k)
		}
	}
}

// wgAckResend is how long after acknowledging a peer's next key a
// reconcile pass acknowledges it again, while the peer still advertises it.
const wgAckResend = 2 * time.Second

// rotateOnSchedule rotates the key when the configured period has passed
// since the last change (the first start counts as one).
func (g *Gateway) rotateOnSchedule(ctx context.Context) {
	if g.s.WGRotateEvery <= 0 {
		return
	}
	t := time.NewTicker(wgRotationCheck)
	defer t.Stop()
	// The time of the last rotation survives restarts in the state
	// directory; from then on RotateWireGuardKey keeps it in memory, so a
	// state file that cannot be written does not make every check rotate.
	last, err := g.state.rotatedAt()
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			g.log.Warn("read the last WireGuard rotation time; counting from now", "err", err)
		}
		last = g.now()
		if err := g.state.markRotated(last); err != nil {
			g.log.Warn("record the rotation schedule's start", "err", err)
		}
	}
	g.wgRotated.CompareAndSwap(0, last.UnixNano())
	var retryAt time.Time // after a failure: not before this
	due := func() bool { return g.now().Sub(time.Unix(0, g.wgRotated.Load())) >= g.s.WGRotateEvery }
	for {
		// A rotation recorded while the clock ran ahead (before this start
		// or since) is dated then: counted from then once the clock is set
		// back, the schedule would wait for the clock to get there.
		now, at := g.now(), g.wgRotated.Load()
		if time.Unix(0, at).After(now.Add(certs.MaxClockSkew)) && g.wgRotated.CompareAndSwap(at, now.UnixNano()) {
			g.log.Warn("the last WireGuard rotation is recorded in the future (was the clock wrong?); counting from now", "recorded", time.Unix(0, at).UTC(), "now", now)
			if err := g.state.markRotated(now); err != nil {
				g.log.Warn("record the rotation schedule's start", "err", err)
			}
		}
		if next := now.Add(wgRotationRetry); retryAt.After(next) { // set while the clock ran ahead
			retryAt = next
		}
		if due() && !g.now().Before(retryAt) {
			if _, err := g.rotateWireGuardKey(ctx, due); err != nil && ctx.Err() == nil {
				retryAt = g.now().Add(wgRotationRetry)
				g.log.Error("scheduled WireGuard key rotation", "err", err, "retry_in", wgRotationRetry)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (d stateDir) markRotated(t time.Time) error {
	return atomicfile.WriteFile(d.path(wgRotatedFile), []byte(t.UTC().Format(time.RFC3339)+"\n"), 0o600)
}

func (d stateDir) rotatedAt() (time.Time, error) {
	b, err := os.ReadFile(d.path(wgRotatedFile))
	if err != nil {
		return time.Time{}, err
	}
	return time.Parse(time.RFC3339, strings.TrimSpace(string(b)))
}

func (g *Gateway) wgPublicKey() string {
	k, _ := g.wgKeys()
	return k.Public().String()
}
