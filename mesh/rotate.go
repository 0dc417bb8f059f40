package mesh

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/throttle"
)

// Gossip key rotation without a restart, in three cluster-wide steps, each
// acknowledged by every verified member before the next: install the new
// key (everyone can now decrypt it), switch the primary key (everyone now
// encrypts with it), remove the old key. Operations are signed by the
// initiating gateway's identity and carry a fresh ID and time, so a member
// that merely holds the gossip key can neither forge nor replay one.
//
// The new key travels sealed to each member's certificate, and the later
// steps name keys by their SHA-256: the operations cross gossip, which
// whoever holds the old key can read — and a leak of it is why keys are
// rotated. (Gateways of releases before this one sent the keys as they
// are, with the kinds without a suffix; they are still taken from them.)

const (
	opInstall = "install" // the key as it is (from older initiators)
	opUse     = "use"
	opRemove  = "remove"

	opInstallSealed = "install-sealed" // the key sealed to the recipient's certificate
	opUseHash       = "use-sha256"     // the key named by its SHA-256
	opRemoveHash    = "remove-sha256"

	// What a rotation sends to the members whose keyring its install
	// step finds full (maxGossipKeys): each keeps its primary and the
	// keys named (by SHA-256, cleanNames) it holds, then its own most recent,
	// maxGossipKeys-1 in all. Another member may speak a key other than
	// the initiator's (it took the use step of a rotation cut short),
	// which the initiator holds when it took that rotation's install. It
	// keeps keys the remove step does not, so it lets no one do what a
	// remove step does not already.
	opClean     = "clean"
	opCleanHash = "clean-sha256"

	keyringOpDomain = "skybridge keyring op v1\x00"
	keyringOpMaxAge = certs.MaxClockSkew
	keyringAckWait  = 15 * time.Second

	// maxGossipKeys bounds the keys an install step leaves in a keyring.
	// A rotation needs two (the old key and the new); the rest is margin:
	// a key left by a rotation cut short, and one installed by a rotation
	// of an older release, which does not wait its turn. Without a bound
	// one gateway could install keys on every other without end, and each
	// costs: memberlist tries every installed key on each packet the
	// primary does not open (anyone reaching the gossip port can send
	// them), and each step rewrites the whole keyring.
	maxGossipKeys = 4
)

// errKeyringFull refuses an install step into a keyring holding
// maxGossipKeys keys. Its text reaches the initiator, which recognises it
// (refusedError) and clears the keyrings before installing again.
var errKeyringFull = errors.New("gossip keyring full")

// errKeyMissing refuses a step naming a key this gateway does not hold.
var errKeyMissing = errors.New("no installed gossip key has that SHA-256: was the install step missed?")

// Why a gateway did not take a keyring step, as
// skybridge_gossip_keyring_steps_refused_total says: the log tells of
// them at most once a second, and no alert reads a log. A forged step (a
// leaked gossip key) pages (SkybridgeKeyringStepForged); a gateway
// installing keys it never removes shows as keyring_full.
const (
	refusedMalformed  = "malformed"  // does not parse
	refusedUnverified = "unverified" // not signed by a gateway of the mesh, or replayed
	refusedBurst      = "burst_initiator"
	refusedClock      = "clock_skew"
	refusedBusy       = "rotation_under_way" // another initiator's (claimRotation)
	refusedFull       = "keyring_full"
	refusedMissedStep = "missed_step" // names a key not installed here
	refusedFailed     = "failed"      // the keyring could not be changed or stored
)

var (
	keyringSteps    = []string{opInstall, opUse, opRemove, opClean, "unknown"}
	keyringRefusals = []string{refusedMalformed, refusedUnverified, refusedBurst, refusedClock, refusedBusy, refusedFull, refusedMissedStep, refusedFailed}
)

// stepName names a step's kind for the metrics: the sender writes it, and
// must not make up label values.
func stepName(kind string) string {
	switch kind {
	case opInstall, opInstallSealed:
		return opInstall
	case opUse, opUseHash:
		return opUse
	case opRemove, opRemoveHash:
		return opRemove
	case opClean, opCleanHash:
		return opClean
	}
	return "unknown"
}

type keyringAck struct {
	node    string
	id      []byte
	refused string // why the member could not apply the operation; "" for done
}

type keyringOp struct {
	kind      string
	key       []byte // the key to install, or whose primary/removal is meant
	id        []byte // 16 random bytes
	at        time.Time
	initiator string
	certDER   []byte
	sig       []byte
	// local is a step applied by its initiator, which takes it past
	// maxGossipKeys: its operator asked for it, and it keeps its keys
	// until the remove step (see rotationStepRoom).
	local bool
}

func (op *keyringOp) digest() []byte {
	h := sha256.New()
	h.Write([]byte(keyringOpDomain))
	for _, f := range [][]byte{[]byte(op.kind), op.key, op.id, u64(uint64(op.at.UnixNano())), []byte(op.initiator), op.certDER} {
		h.Write(u64(uint64(len(f))))
		h.Write(f)
	}
	return h.Sum(nil)
}

func (op *keyringOp) encode() []byte {
	return encodeMessage(msgKeyringOp, []byte(op.kind), op.key, op.id, u64(uint64(op.at.UnixNano())), []byte(op.initiator), op.certDER, op.sig)
}

// opLog remembers recent operation IDs against replays.
type opLog struct {
	sync.Mutex
	ids map[string]time.Time
	// open is the rotation under way here: its initiator, and when it is
	// taken as abandoned (rotationOpenFor after its last step).
	open struct {
		initiator string
		until     time.Time
	}
	// warn says when a keyring step not taken is worth logging again:
	// any gateway of the mesh can sign steps, and anyone holding the
	// gossip key can send ones that do not verify.
	warn throttle.PerSecond
}

// rotationOpenFor is how long after a step a rotation counts as under
// way, unless its last step (remove) came: the steps of one rotation
// follow each other within seconds, and each waits keyringAckWait at
// most for its answers.
const rotationOpenFor = 2 * time.Minute

// claimRotation admits a keyring step of initiator's rotation: one
// rotation at a time. Two initiators interleaving their steps could leave
// members on different primary keys, each cut off from the rest.
func (g *Gateway) claimRotation(initiator, kind string) error {
	now := g.now()
	g.ops.Lock()
	defer g.ops.Unlock()
	o := &g.ops.open
	if o.initiator != "" && o.initiator != initiator && now.Before(o.until) {
		return fmt.Errorf("a gossip key rotation by %s is under way (abandoned at %s at the latest): one at a time; rotate again once it is done",
			o.initiator, o.until.UTC().Format(time.RFC3339))
	}
	if kind == opRemove || kind == opRemoveHash {
		o.initiator = ""
		return nil
	}
	o.initiator, o.until = initiator, now.Add(rotationOpenFor)
	return nil
}

func parseKeyringOp(m message) (*keyringOp, error) {
	if err := m.want(7); err != nil {
		return nil, err
	}
	at, err := readU64(m.fields[3])
	if err != nil {
		return nil, err
	}
	return &keyringOp{kind: string(m.fields[0]), key: m.fields[1], id: m.fields[2], at: time.Unix(0, int64(at)),
		initiator: string(m.fields[4]), certDER: m.fields[5], sig: m.fields[6]}, nil
}

func (g *Gateway) handleKeyringOp(m message) error {
	op, err := parseKeyringOp(m)
	if err != nil {
		g.metrics.keyringStepRefused("", refusedMalformed)
		return err
	}
	// The initiator is told why a step it signed is not taken: otherwise
	// it waits out its limit and can only say that no acknowledgement
	// came. (An operation that does not verify gets no answer: its
	// initiator may be made up.)
	refuse := func(err error) {
		why := err.Error()
		if len(why) > maxRefusal {
			why = strings.ToValidUTF8(why[:maxRefusal], "")
		}
		refusal, serr := g.signedAck(msgKeyringRefused, append(bytes.Clone(op.id), why...))
		if serr == nil {
			g.goSend(func() error { return g.sendStream(op.initiator, refusal) }, op.initiator)
		}
	}
	if err := g.verifyKeyringOp(op); err != nil {
		g.logKeyringOp(op, err, false)
		switch {
		case errors.Is(err, errOpTime):
			g.metrics.keyringStepRefused(op.kind, refusedClock)
			refuse(err)
		case errors.Is(err, errBurstRotates):
			g.metrics.keyringStepRefused(op.kind, refusedBurst)
			refuse(err)
		default:
			g.metrics.keyringStepRefused(op.kind, refusedUnverified)
		}
		return err
	}
	if err := g.claimRotation(op.initiator, op.kind); err != nil {
		g.metrics.keyringStepRefused(op.kind, refusedBusy)
		g.logKeyringOp(op, err, false)
		refuse(err)
		return err
	}
	// The answer goes on a stream, from a goroutine: a lost one would
	// fail the step, and the worker is not held up meanwhile.
	if err := g.applyKeyringOp(g.runCtx, op); err != nil {
		switch {
		case errors.Is(err, errKeyringFull):
			g.metrics.keyringStepRefused(op.kind, refusedFull)
		case errors.Is(err, errKeyMissing):
			g.metrics.keyringStepRefused(op.kind, refusedMissedStep)
		default:
			g.metrics.keyringStepRefused(op.kind, refusedFailed)
		}
		g.logKeyringOp(op, err, !errors.Is(err, errKeyringFull))
		refuse(err)
		return err
	}
	ack, err := g.signedAck(msgKeyringAck, op.id)
	if err != nil {
		return err
	}
	g.goSend(func() error { return g.sendStream(op.initiator, ack) }, op.initiator)
	return nil
}

// logKeyringOp logs a keyring step not taken: refused, or failed (the
// keyring could not be changed or kept), at most once a second.
func (g *Gateway) logKeyringOp(op *keyringOp, err error, failed bool) {
	ok, dropped := g.ops.warn.Allow()
	switch {
	case !ok:
	case failed:
		g.log.Error("gossip keyring operation failed", "op", op.kind, "peer", op.initiator, "err", err, "refused_unlogged", dropped)
	default:
		g.log.Warn("refused gossip keyring operation", "op", op.kind, "peer", op.initiator, "err", err, "refused_unlogged", dropped)
	}
}

// rotationSends bounds the keyring operations a rotation step sends at
// once.
const rotationSends = 16

// maxStepResends bounds how often one step is sent again to a member
// that renewed its certificate meanwhile (rotationStep): renewals come
// at two thirds of a certificate's life, minutes apart but for lives
// made short on purpose.
const maxStepResends = 3

// renewalRecheck is how often a rotation step looks for members whose
// certificate changed since the step was sent to them.
const renewalRecheck = 250 * time.Millisecond

// maxRefusal bounds the reason a member gives for refusing a keyring
// operation.
const maxRefusal = 400

// errBurstRotates refuses a keyring operation a burst gateway started.
var errBurstRotates = errors.New("a burst gateway may not change the gossip keyring: run `skybridge keys rotate-gossip` on a gateway of a lasting site")

// errOpTime refuses a keyring operation dated too far from our clock.
var errOpTime = errors.New("dated too far from this gateway's clock")

func (g *Gateway) verifyKeyringOp(op *keyringOp) error {
	now := g.now()
	cert, err := x509.ParseCertificate(op.certDER)
	if err != nil {
		return err
	}
	attrs, err := g.trust.Load().VerifyCertificate(cert, now)
	if err != nil {
		return err
	}
	if attrs.Node != op.initiator {
		return fmt.Errorf("signed by %s, claims to come from %s", attrs.Node, op.initiator)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !ecdsa.VerifyASN1(pub, op.digest(), op.sig) {
		return fmt.Errorf("bad signature")
	}
	g.ops.Lock()
	defer g.ops.Unlock()
	if g.ops.ids == nil {
		g.ops.ids = map[string]time.Time{}
	}
	for id, t := range g.ops.ids {
		if now.Sub(t) > 2*keyringOpMaxAge {
			delete(g.ops.ids, id)
		}
	}
	if _, dup := g.ops.ids[string(op.id)]; dup {
		return fmt.Errorf("operation replayed")
	}
	// Remembered whether taken or refused for its time, so that a step
	// replayed is neither taken nor answered again.
	g.ops.ids[string(op.id)] = now
	// Checked once the signature is: the initiator is then who it says,
	// and may be told (errOpTime).
	if d := now.Sub(op.at); d > keyringOpMaxAge || d < -keyringOpMaxAge {
		return fmt.Errorf("operation %w: it says %s, this clock %s (%s allowed)", errOpTime, op.at.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), keyringOpMaxAge)
	}
	// Last, like the time: refused with an answer, which only a step its
	// initiator truly signed, once, may cost. Were a burst gateway
	// compromised, it could put a key of its own on every gateway.
	// (Burst gateways certified before the label: not told apart.)
	if attrs.IsBurst() {
		return errBurstRotates
	}
	return nil
}

// sealContext binds a sealed gossip key to its operation and recipient.
func sealContext(opID []byte, node string) []byte {
	return append(append([]byte("gossip key\x00"), opID...), node...)
}

// installedKey is the installed key whose SHA-256 is sum.
func (g *Gateway) installedKey(sum []byte) ([]byte, error) {
	if k := keyBySum(g.keyring.GetKeys(), sum); k != nil {
		return k, nil
	}
	return nil, errKeyMissing
}

// keyBySum is the key of keys whose SHA-256 is sum, or nil.
func keyBySum(keys [][]byte, sum []byte) []byte {
	for _, k := range keys {
		if h := sha256.Sum256(k); bytes.Equal(h[:], sum) {
			return k
		}
	}
	return nil
}

// applyKeyringOp changes the live keyring and the stored one together.
func (g *Gateway) applyKeyringOp(ctx context.Context, op *keyringOp) error {
	// With the store's write: catchUpKeyring must not take a keyring it
	// read before the write for the one the step left.
	g.keyringMu.Lock()
	defer g.keyringMu.Unlock()
	g.endKeyTrial()
	kind, key := op.kind, op.key
	switch kind {
	case opInstallSealed:
		id := g.id.Load()
		k, err := id.Open(key, sealContext(op.id, id.Attributes().Node))
		if err != nil {
			return err
		}
		kind, key = opInstall, k
	case opCleanHash:
		// Keys this gateway does not hold are passed over: one may be
		// the key the initiator is installing, or one it took without
		// this gateway.
		if len(key) == 0 || len(key)%sha256.Size != 0 {
			return fmt.Errorf("clean step: %d bytes do not name keys by SHA-256", len(key))
		}
		kind = opClean
	case opClean: // sent by no initiator: the keys to keep are named
		return fmt.Errorf("unknown keyring operation %q", op.kind)
	case opUseHash, opRemoveHash:
		k, err := g.installedKey(key)
		switch {
		case err == nil:
			kind, key = strings.TrimSuffix(kind, "-sha256"), k
		case kind == opRemoveHash && len(g.keyring.GetKeys()) == 1:
			// Taken already: the initiator sends a step again, under a
			// new ID, to a member that renewed its certificate before
			// its answer arrived (rotationStep), and the answer to this
			// one is what it waits for. A member reaches the remove step
			// only once it took the use step, so the one key it holds is
			// the new primary, as the step would leave it. The stores
			// are brought to it all the same (a remove naming no key
			// removes all but the primary): the first step may have
			// changed the live keyring and failed to store it.
			kind, key = opRemove, nil
		default:
			return err
		}
	}
	var err error
	switch kind {
	case opInstall:
		if !op.local && !hasKey(g.keyring.GetKeys(), key) {
			err = g.sharedRoom(ctx, key)
		}
		if err == nil {
			err = g.installKey(key, !op.local)
		}
	case opUse:
		err = g.keyring.UseKey(key)
	case opClean:
		kept := cleanKept(g.keyring.GetKeys(), key)
		err = removeKeys(g.keyring, func(k []byte) bool { return !hasKey(kept, k) })
	case opRemove:
		primary := g.keyring.GetPrimaryKey()
		if bytes.Equal(primary, key) {
			return fmt.Errorf("refusing to remove the primary gossip key")
		}
		// The rotation's last step leaves the new key alone: a key
		// installed by an interrupted rotation, or by a gateway since
		// revoked, goes with the old one rather than outliving the
		// rotation meant to end it.
		err = removeKeys(g.keyring, func(k []byte) bool { return !bytes.Equal(k, primary) })
	default:
		return fmt.Errorf("unknown keyring operation %q", op.kind)
	}
	if err != nil {
		return err
	}
	live := g.keyring.GetKeys() // primary first
	// This gateway's own file holds its live keyring. A keyring others
	// take theirs from — Vault's, the CA directory's copy — gets the step
	// instead: a member whose live keyring differs from it (one that
	// missed a step of a rotation cut short) then finds it already so,
	// rather than write its own over the initiator's, and a burst
	// gateway, which may only read Vault's, is not refused at every
	// later rotation.
	own := func(*certs.GossipKeyring) (*certs.GossipKeyring, error) { return certs.NewGossipKeyring(live) }
	shared := func(cur *certs.GossipKeyring) (*certs.GossipKeyring, error) {
		next, err := keyringStep(cur, kind, key, live)
		// Bound as the live keyring is: gateways load it when they
		// start, and each step writes it whole.
		if err == nil && cur != nil && !op.local && next.Len() > cur.Len() && next.Len() > maxGossipKeys {
			return nil, keyringFull(cur.Len())
		}
		return next, err
	}
	update := shared
	if _, ok := g.prov.Secrets().(certs.DirSecrets); ok {
		update = own
	}
	if err := g.prov.Secrets().UpdateGossipKeyring(ctx, update); err != nil {
		return err
	}
	// The CA directory's copy is the one `skybridge ca issue` hands to new
	// gateways: left behind, they would get a key the mesh no longer
	// takes. (A CA kept off every gateway needs it copied by hand.)
	if ca, ok := g.prov.Issuer().(*certs.CA); ok {
		if err := ca.Secrets().UpdateGossipKeyring(ctx, shared); err != nil {
			return fmt.Errorf("the CA directory's gossip keyring: %w", err)
		}
	}
	return nil
}

// installKey adds key to the live keyring for an install step. Bounded,
// it is refused past maxGossipKeys; a key already there is no step at
// all (the same key sent again: a newcomer's catch-up, a resumed
// rotation).
func (g *Gateway) installKey(key []byte, bounded bool) error {
	keys := g.keyring.GetKeys() // primary first
	if hasKey(keys, key) {
		return nil
	}
	if n := len(keys); bounded && n >= maxGossipKeys {
		return keyringFull(n)
	}
	return g.keyring.AddKey(key)
}

// sharedRoom refuses an install step that a keyring others take theirs
// from (Vault's, the CA directory's copy) has no room for, before the
// live keyring changes: refused once it had, the step left the key live
// and in this gateway's file, which its refusal says it did not take. A
// copy that cannot be read is left to its update to report.
func (g *Gateway) sharedRoom(ctx context.Context, key []byte) error {
	full := func(kr *certs.GossipKeyring) bool {
		return kr.Len() >= maxGossipKeys && !hasKey(kr.Keys(), key)
	}
	if _, own := g.prov.Secrets().(certs.DirSecrets); !own {
		if kr, err := g.prov.Secrets().GossipKeyring(ctx); err == nil && full(kr) {
			return keyringFull(kr.Len())
		}
	}
	if ca, ok := g.prov.Issuer().(*certs.CA); ok {
		if kr, err := ca.Secrets().GossipKeyring(ctx); err == nil && full(kr) {
			return fmt.Errorf("the CA directory's gossip keyring: %w", keyringFull(kr.Len()))
		}
	}
	return nil
}

// keyringFull refuses an install step into a keyring of n keys.
func keyringFull(n int) error {
	// Said to the initiator's operator too, who may be running a
	// release whose rotation cannot clear (during an upgrade).
	return fmt.Errorf("%w: it holds %d keys, and takes no new one at %d or more; `skybridge keys rotate-gossip` run on a gateway of a release from 2026-11-28 on clears the keys left over (from rotations cut short) before it installs its own, which an earlier release's cannot; a gateway that installs keys run after run and never finishes a rotation is one to revoke",
		errKeyringFull, n, maxGossipKeys)
}

// joinUnderAnyKey is memberlist's Join, tried again under each other key
// of the keyring as its primary when nobody answers under the primary.
// A gateway that took the keyring in the middle of a rotation (both
// keys, the old one primary) and came in after its last step began, or
// that was off across its remove step, speaks a key no member reads any
// more: no rotation step reaches it, and it would stay cut off for good.
// Taking up the key the mesh answers under is what the use step it
// missed would have done. The old key stays installed — members still on
// it, in a rotation cut short, must still be read — until the next
// rotation's last step removes it.
//
// Only a gateway cut off tries (cutOff): knocks on members gone for good
// fail all the time in a live mesh, and each would otherwise put this
// gateway's traffic under another key for the length of a join — unread
// by the mesh, which would declare it dead. Nor while a rotation is under
// way here (claimRotation): its steps reach this gateway, which is then
// not the one left behind, and what it sends meanwhile, its answers among
// it, would go under a key the initiator may not hold. A rotation whose
// initiator went quiet counts until rotationOpenFor has passed.
//
// keyringMu is not held across a join: each address that takes the
// connection and never answers costs memberlist's TCP timeout (10 s LAN,
// 30 s WAN), and the gossip worker, which applies the keyring steps it
// receives, would wait as long with every message behind the step — past
// the initiator's keyringAckWait, so a rotation by --force with another
// site away failed on a gateway cut off from it. The key tried is a trial
// instead (keyTrial): a step or a catch-up that comes meanwhile ends it
// first (endKeyTrial), and the join, finding it gone, leaves the keyring
// as they left it.
func (g *Gateway) joinUnderAnyKey(addrs []string) (int, error) {
	n, err := g.ml.Join(addrs)
	if n > 0 || len(g.keyring.GetKeys()) < 2 || g.leaving.Load() || !g.cutOff() {
		return n, err
	}
	g.keyringMu.Lock()
	before := slices.Clone(g.keyring.GetKeys()) // primary first
	g.keyringMu.Unlock()
	primary := before[0]
	for _, k := range before[1:] {
		g.keyringMu.Lock()
		// Between two keys, a step may have changed the keyring, a
		// rotation begun, or another join (joinSeeds beside a rejoin
		// round) begun its own trial: a primary put aside twice would
		// not come back.
		if g.keyTrial != nil || g.rotationOpen() || !sameKeys(before, g.keyring.GetKeys()) {
			g.keyringMu.Unlock()
			return n, err
		}
		if uerr := g.keyring.UseKey(k); uerr != nil {
			g.keyringMu.Unlock()
			continue
		}
		trial := &keyTrial{primary: primary}
		g.keyTrial = trial
		g.keyringMu.Unlock()

		m, _ := g.ml.Join(addrs)

		g.keyringMu.Lock()
		if g.keyTrial != trial {
			// A step or a catch-up put the primary back and changed the
			// keyring: theirs stands, whatever this join found.
			g.keyringMu.Unlock()
			return n, err
		}
		g.keyTrial = nil
		if m > 0 {
			g.log.Warn("nobody answered under this gateway's primary gossip key, and the mesh answered under another key of its keyring: a rotation finished without this gateway; it uses the mesh's key now (the old one stays installed until the next rotation removes it)",
				"keys", len(g.keyring.GetKeys()))
			if _, own := g.prov.Secrets().(certs.DirSecrets); own {
				live := g.keyring.GetKeys()
				if serr := g.prov.Secrets().UpdateGossipKeyring(context.Background(), func(*certs.GossipKeyring) (*certs.GossipKeyring, error) {
					return certs.NewGossipKeyring(live)
				}); serr != nil {
					g.log.Warn("store the gossip keyring", "err", serr)
				}
			}
			g.keyringMu.Unlock()
			return m, nil
		}
		if uerr := g.keyring.UseKey(primary); uerr != nil { // nobody answered under it: as it was
			g.log.Warn("restore the primary gossip key", "err", uerr)
		}
		g.keyringMu.Unlock()
	}
	return n, err
}

// keyTrial is a join's trial of a key of the keyring other than its
// primary (joinUnderAnyKey): the key tried is primary for the join, and
// primary is the one put aside meanwhile.
type keyTrial struct {
	primary []byte
}

// endKeyTrial puts back the primary key a join's trial put aside, before
// the keyring changes under keyringMu: a use step taken during the trial
// would be undone when the join put its primary back, and a remove step
// would keep the key tried and drop the mesh's.
func (g *Gateway) endKeyTrial() {
	t := g.keyTrial
	if t == nil {
		return
	}
	g.keyTrial = nil
	if err := g.keyring.UseKey(t.primary); err != nil {
		g.log.Warn("restore the primary gossip key", "err", err)
	}
}

// liveKeys are the keyring's keys, primary first, with the primary a
// join's trial put aside in its place (under keyringMu): what the keyring
// is, rather than what one join sends under.
func (g *Gateway) liveKeys() [][]byte {
	keys := g.keyring.GetKeys()
	t := g.keyTrial
	if t == nil {
		return keys
	}
	return append([][]byte{t.primary}, slices.DeleteFunc(slices.Clone(keys), func(k []byte) bool { return bytes.Equal(k, t.primary) })...)
}

// primaryKey is the keyring's primary key, as liveKeys has it.
func (g *Gateway) primaryKey() []byte {
	g.keyringMu.Lock()
	defer g.keyringMu.Unlock()
	return g.liveKeys()[0]
}

// rotationOpen reports whether a gossip key rotation is under way here
// (claimRotation).
func (g *Gateway) rotationOpen() bool {
	now := g.now()
	g.ops.Lock()
	defer g.ops.Unlock()
	return g.ops.open.initiator != "" && now.Before(g.ops.open.until)
}

// cutOff reports whether this gateway hears from no other site: alone,
// or with gateways of its own site only while it knows of others (the
// gateways of a site off together across a rotation find each other
// first, on the key they share, and must still take up the mesh's).
func (g *Gateway) cutOff() bool {
	if g.ml.NumMembers() <= 1 {
		return true
	}
	site, others := g.id.Load().Attributes().Site, false
	for _, m := range g.members.snapshot() {
		if m.CertSite == "" || m.CertSite == site {
			continue
		}
		if m.Alive {
			return false
		}
		others = true
	}
	return others
}

// keyringStep is a shared keyring cur after a rotation step (kind, key)
// that left this gateway's keyring live (primary first): the key added,
// made primary, cleared as a member's is (cleanKept), or — the last
// step — the live primary alone.
func keyringStep(cur *certs.GossipKeyring, kind string, key []byte, live [][]byte) (*certs.GossipKeyring, error) {
	if cur == nil {
		return certs.NewGossipKeyring(live)
	}
	keys := cur.Keys()
	switch kind {
	case opInstall:
		if !hasKey(keys, key) {
			keys = append(keys, key)
		}
	case opClean:
		keys = cleanKept(keys, key)
	case opUse:
		keys = append([][]byte{key}, slices.DeleteFunc(keys, func(k []byte) bool { return bytes.Equal(k, key) })...)
	default: // opRemove
		keys = live[:1]
	}
	return certs.NewGossipKeyring(keys)
}

// cleanKept are the keys (primary first, the rest in the order they
// were installed) a clean step keeps: the primary, the keys named
// (SHA-256s, in order) held, then the most recent, maxGossipKeys-1 in
// all, so that the install after it has room.
func cleanKept(keys [][]byte, named []byte) [][]byte {
	kept := [][]byte{keys[0]}
	keep := func(k []byte) {
		if len(kept) < maxGossipKeys-1 && !hasKey(kept, k) {
			kept = append(kept, k)
		}
	}
	for sum := range slices.Chunk(named, sha256.Size) {
		if k := keyBySum(keys, sum); k != nil {
			keep(k)
		}
	}
	for i := len(keys) - 1; i >= 1; i-- {
		keep(keys[i])
	}
	return kept
}

// cleanNames names, by SHA-256, the keys a clean step asks the members
// to keep: this gateway's primary, the key it spoke before, then its
// other keys, the most recent first, but the key installing (no member it
// is sent to holds it).
func (g *Gateway) cleanNames(installing []byte) []byte {
	g.keyringMu.Lock()
	keys := slices.Clone(g.liveKeys()) // primary first
	g.keyringMu.Unlock()
	var names []byte
	name := func(k []byte) {
		if len(names) < (maxGossipKeys-1)*sha256.Size && !bytes.Equal(k, installing) {
			sum := sha256.Sum256(k)
			names = append(names, sum[:]...)
		}
	}
	name(keys[0])
	// Then the key after the primary: memberlist's UseKey puts the new
	// primary first and leaves the others in their order, so after a
	// use step the key spoken before is there, and a member that missed
	// that step still speaks it. Then the most recent.
	if len(keys) > 1 {
		name(keys[1])
	}
	for i := len(keys) - 1; i >= 2; i-- {
		name(keys[i])
	}
	return names
}

// keyringOpFor is what member m is sent of op: the new key sealed to m's
// certificate, or a key named by its hash, signed, since it is m's own —
// by id, whose certificate op carries (a renewal during the rotation
// must not sign with the new key what names the old certificate). to
// is m's certificate, which the install step seals to (nil if m is not
// verified: the other steps seal nothing).
//
// An id of this gateway's that it has renewed since (the identity a step
// began with) gives way to the identity in force, whose certificate the
// step then carries instead: a step is sent again late in its wait, to a
// member that renewed meanwhile (rotationStep), and signed under the
// certificate before this gateway's own renewal it was refused unanswered
// once that certificate had ended — certificates of a minute or less end
// within a step's wait of their renewal.
func (g *Gateway) keyringOpFor(id *certs.NodeIdentity, op *keyringOp, m string, to *x509.Certificate) ([]byte, error) {
	mop := *op
	if cur := g.id.Load(); cur != id && cur.Attributes().Node == id.Attributes().Node {
		id, mop.certDER = cur, cur.Certificate().Raw
	}
	switch op.kind {
	case opInstall:
		if to == nil {
			return nil, errors.New("the member is no longer verified")
		}
		sealed, err := certs.SealTo(to, op.key, sealContext(op.id, m))
		if err != nil {
			return nil, fmt.Errorf("seal the new key: %w", err)
		}
		mop.kind, mop.key = opInstallSealed, sealed
	case opUse, opRemove:
		sum := sha256.Sum256(op.key)
		mop.kind, mop.key = op.kind+"-sha256", sum[:]
	case opClean: // named already (cleanNames)
		mop.kind = opCleanHash
	}
	sig, err := id.Signer().Sign(rand.Reader, mop.digest(), crypto.SHA256)
	if err != nil {
		return nil, err
	}
	mop.sig = sig
	return mop.encode(), nil
}

// handleKeyringAck takes a member's answer to a keyring operation: done
// (msgKeyringAck), or could not, and why (msgKeyringRefused).
func (g *Gateway) handleKeyringAck(m message) error {
	node, subject, err := g.checkAck(m)
	if err != nil {
		return err
	}
	a := keyringAck{node: node, id: subject}
	if m.typ == msgKeyringRefused {
		if len(subject) < opIDLen {
			return fmt.Errorf("keyring refusal from %s: too short", node)
		}
		a.id, a.refused = subject[:opIDLen], string(subject[opIDLen:])
		if a.refused == "" {
			a.refused = "no reason given"
		}
	}
	select {
	case g.acks <- a:
	default:
	}
	return nil
}

// opIDLen is the length of a keyring operation's ID.
const opIDLen = 16

// RotationReport says how a rotation went.
type RotationReport struct {
	Members []string `json:"members"` // verified members that acknowledged every step
	// LeftOut names the gateways that were away (stopped or declared
	// dead) and rotated without, by force: each needs the new keyring
	// before it can gossip with the mesh again.
	LeftOut []string      `json:"left_out,omitempty"`
	Elapsed time.Duration `json:"elapsed"`
	// CAKeyring says where the keyring new gateways are given now holds
	// the new key: "vault" (the mesh's one, in KV), "ca_dir" (this
	// gateway holds the CA directory and updated its copy), or "" — the
	// CA directory is elsewhere, updated only if a gateway holding it
	// took part; a CA kept on no gateway needs it copied by hand.
	CAKeyring string `json:"ca_keyring,omitempty"`
	// Keyring is this gateway's keyring file, to copy from ("" with Vault).
	Keyring string `json:"keyring,omitempty"`
}

// RotateGossipKey replaces the mesh's gossip key without a restart (see
// the top of this file). It fails, naming them, if a verified member does
// not acknowledge a step; the steps already done are safe to leave (an
// extra installed key, or the new key already primary) and a new rotation
// finishes the job.
//
// It refuses, naming them, while gateways of the mesh are away
// (awayMembers): one that comes back holding only the old key could not
// read the mesh's gossip, nor the mesh its, for good; and a gateway cut
// off from the rest, which sees them all away, would rotate alone, on a
// key nobody else holds (with Vault, then handed to every gateway started
// after). force rotates without them; the report names them.
func (g *Gateway) RotateGossipKey(ctx context.Context, force bool) (*RotationReport, error) {
	if g.burst != nil || g.id.Load().Attributes().IsBurst() {
		return nil, errBurstRotates
	}
	g.rotation.Lock()
	defer g.rotation.Unlock()
	away := g.awayMembers()
	if len(away) > 0 && !force {
		why := g.awayWhy()
		named := make([]string, len(away))
		for i, n := range away {
			named[i] = n + " (" + why[n] + ")"
		}
		return nil, fmt.Errorf("%d gateways of the mesh are away: %s; rotated without them, each would come back unable to read the mesh's gossip until given the new keyring. Rotate when they are back, revoke those gone for good (skybridge ca revoke --node NAME with the embedded CA; with Vault, revoke their certificates there; one whose certificate has ended is forgotten a week after its end), or rotate with --force and copy the new keyring to each",
			len(away), strings.Join(named, ", "))
	}
	start := time.Now()
	newKey, err := certs.NewGossipKey()
	if err != nil {
		return nil, err
	}
	old := g.primaryKey() // not a key a join is trying
	steps := []struct {
		kind string
		key  []byte
	}{{opInstall, newKey}, {opUse, newKey}, {opRemove, old}}
	var members []string // in the rotation so far
	in := map[string]bool{}
	for i, step := range steps {
		// A member verified since the rotation began (a burst gateway
		// enrolled with the keyring as it was, one restarted from its
		// file) goes through the steps before this one first: left out,
		// it would keep a key the others drop, cut off for good. One
		// heard from but not verified yet (its certificate on its way)
		// is waited for, a while.
		if i > 0 {
			g.awaitPending(ctx)
		}
		var newcomers []string
		for _, m := range g.rotationMembers() {
			if !in[m] {
				in[m] = true
				newcomers = append(newcomers, m)
			}
		}
		if i > 0 && len(newcomers) > 0 {
			g.log.Info("gossip key rotation: members verified since it began go through the earlier steps", "members", newcomers)
			for _, earlier := range steps[:i] {
				if err := g.rotationStepRoom(ctx, earlier.kind, earlier.key, newcomers); err != nil {
					return nil, fmt.Errorf("gossip key rotation, step %q for members verified since it began: %w", earlier.kind, err)
				}
			}
		}
		members = append(members, newcomers...)
		sort.Strings(members)
		if err := g.rotationStepRoom(ctx, step.kind, step.key, members); err != nil {
			return nil, fmt.Errorf("gossip key rotation, step %q: %w", step.kind, err)
		}
		if g.afterRotationStep != nil {
			g.afterRotationStep(step.kind)
		}
	}
	// A member verified after the last step began took the keyring
	// mid-rotation (from Vault, the CA directory's copy, an enrolling
	// gateway) and holds the old key as its primary, which no member
	// reads any more. It is brought through the use and remove steps
	// (the install step's acknowledgement would come under the old key);
	// one that cannot be, or is still not verified, is left out, and
	// named so.
	g.awaitPending(ctx)
	var late []string
	for _, m := range g.rotationMembers() {
		if !in[m] {
			in[m] = true
			late = append(late, m)
		}
	}
	if len(late) > 0 {
		g.log.Info("gossip key rotation: members verified after its last step began go through it", "members", late)
		for _, step := range steps[1:] {
			if err := g.rotationStep(ctx, step.kind, step.key, late); err != nil {
				g.log.Warn("gossip key rotation: members verified after its last step began could not be brought through it: give them the new keyring", "members", late, "err", err)
				away, late = append(away, late...), nil
				break
			}
		}
		members = append(members, late...)
		sort.Strings(members)
	}
	for _, m := range g.pendingMembers() {
		if !in[m] {
			g.log.Warn("gossip key rotation: a member heard from during it was not verified in time and may hold the old key only: give it the new keyring", "member", m)
			away = append(away, m)
		}
	}
	slices.Sort(away)
	away = slices.Compact(away)
	g.log.Info("gossip key rotated", "members", len(members), "left_out", away)
	rep := &RotationReport{Members: members, Elapsed: time.Since(start), LeftOut: away}
	switch sec := g.prov.Secrets().(type) {
	case certs.DirSecrets:
		rep.Keyring = filepath.Join(sec.Dir, certs.FileGossipKeyring)
		if _, ok := g.prov.Issuer().(*certs.CA); ok {
			rep.CAKeyring = "ca_dir"
		}
	default:
		rep.CAKeyring = "vault"
	}
	return rep, nil
}

// awayMembers are the gateways a gossip key rotation would leave behind:
// verified once, now stopped (a leave notice says nothing of coming back),
// declared dead, or remembered from before a restart and not heard from;
// or alive and not verified now, with a certificate that still stands
// (one run out while it runs, refused by this clock, a renewal not
// fetched yet): it holds the old key, and would keep only that. A
// gateway gone for good is revoked, and then no member any more.
func (g *Gateway) awayMembers() []string {
	var out []string
	for _, a := range g.members.away() {
		if !a.Attributes.IsBurst() {
			out = append(out, a.node())
		}
	}
	for _, m := range g.members.snapshot() {
		if slices.Contains(out, m.Name) {
			continue
		}
		if m.LastCert == nil {
			continue
		}
		// A burst's gateways are rented servers, enrolled anew rather
		// than brought back (a Vault mesh's take the keyring from Vault
		// when they start), and a Vault burst's are not revoked at its
		// end: "rotate after a burst" must not wait for them.
		if c, err := x509.ParseCertificate(m.LastCert); err == nil {
			if a, err := certs.AttributesOf(c); err == nil && a.IsBurst() {
				continue
			}
		}
		if m.State == StateDead || m.State == StateVerified && m.Remembered {
			out = append(out, m.Name)
		}
	}
	slices.Sort(out)
	return out
}

// awayWhy says, by member, why awayMembers counts it away.
func (g *Gateway) awayWhy() map[string]string {
	why := map[string]string{}
	for _, m := range g.members.snapshot() {
		switch {
		case m.State == StateDead && m.Left:
			why[m.Name] = "stopped"
		case m.State == StateDead:
			why[m.Name] = "declared dead"
		case m.State == StateVerified && m.Remembered:
			why[m.Name] = "not heard from since this gateway started"
		case m.Reason != "":
			why[m.Name] = "alive, not verified: " + m.Reason
		default:
			why[m.Name] = "alive, not verified"
		}
	}
	return why
}

// pendingGrace is how long after a member is first heard from a gossip
// key rotation waits for its certificate to arrive (var for tests): one
// pending longer never answered, and is no member.
var pendingGrace = 10 * time.Second

// pendingMembers are the members alive and heard from within
// pendingGrace whose certificate has not arrived yet.
func (g *Gateway) pendingMembers() []string {
	var out []string
	now := g.now()
	for _, m := range g.members.snapshot() {
		if m.State == StatePending && m.Alive && now.Sub(m.Since) < pendingGrace {
			out = append(out, m.Name)
		}
	}
	return out
}

// awaitPending waits, up to pendingGrace, for pendingMembers to be
// verified (or to give up on them).
func (g *Gateway) awaitPending(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	deadline := time.Now().Add(pendingGrace)
	for len(g.pendingMembers()) > 0 && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// rotationMembers are the members a gossip key rotation goes to: those
// verified and heard from.
func (g *Gateway) rotationMembers() []string {
	var out []string
	for _, m := range g.members.snapshot() {
		if m.State == StateVerified && !m.Remembered {
			out = append(out, m.Name)
		}
	}
	return out
}

// rotationStepRoom is rotationStep, but an install step members refused
// for a full keyring (keys of rotations cut short, of a gateway since
// revoked, or of a release before the bound) clears their keyrings
// (opClean) and is sent again: the remove step would clear them, but a
// rotation must install first. Only they are cleared: a member with room
// may speak a key the clearing would drop, and keeps every key it holds
// until the remove step. This gateway keeps its own keys too (its install
// is not bound): a member still on an older primary key, which the
// clearing leaves it, must be heard meanwhile.
func (g *Gateway) rotationStepRoom(ctx context.Context, kind string, key []byte, members []string) error {
	err := g.rotationStep(ctx, kind, key, members)
	var full *keyringsFull
	if kind != opInstall || !errors.As(err, &full) {
		return err
	}
	g.log.Warn("gossip key rotation: a member's keyring is full; clearing the keys left over on the members that refused, then installing again", "members", full.nodes(), "err", err)
	if err := g.rotationStep(ctx, opClean, g.cleanNames(key), full.nodes()); err != nil {
		return fmt.Errorf("clearing full keyrings: %w", err)
	}
	return g.rotationStep(ctx, kind, key, members)
}

// keyringsFull is an install step refused for a full keyring by the
// members named, and taken by the rest.
type keyringsFull struct{ refusals []*refusedError }

func (e *keyringsFull) Error() string {
	why := make([]string, len(e.refusals))
	for i, r := range e.refusals {
		why[i] = r.Error()
	}
	return strings.Join(why, "; ")
}

func (e *keyringsFull) nodes() []string {
	out := make([]string, len(e.refusals))
	for i, r := range e.refusals {
		out[i] = r.node
	}
	slices.Sort(out)
	return out
}

// refusedError is a member's refusal of a rotation step, in its words.
type refusedError struct{ node, why string }

func (e *refusedError) Error() string { return e.node + " could not apply it: " + e.why }

// Is recognises a full keyring (errKeyringFull) in the member's words,
// which is all that crosses the wire.
func (e *refusedError) Is(target error) bool {
	return target == errKeyringFull && strings.Contains(e.why, errKeyringFull.Error())
}

func (g *Gateway) rotationStep(ctx context.Context, kind string, key []byte, members []string) error {
	signer := g.id.Load()
	op := &keyringOp{kind: kind, key: key, id: make([]byte, opIDLen), at: g.now(), initiator: signer.Attributes().Node, certDER: signer.Certificate().Raw, local: true}
	rand.Read(op.id)
	// Drain acks of earlier, failed steps.
	for len(g.acks) > 0 {
		<-g.acks
	}
	if err := g.claimRotation(op.initiator, op.kind); err != nil {
		return err
	}
	if kind != opClean { // see rotationStepRoom
		if err := g.applyKeyringOp(ctx, op); err != nil {
			return err
		}
	}
	// Sent from goroutines, a few at a time (a stream each: dial, write,
	// close), while the answers are read: one member after another took
	// members × a round trip, and answers arriving meanwhile could
	// overflow the queue they wait in.
	type sent struct {
		member string
		err    error
	}
	sends := make(chan sent, len(members)*(1+maxStepResends))
	sem := make(chan struct{}, rotationSends)
	// A send again still waiting its turn when the step ends is not
	// made: its member answered another, and a step arriving after the
	// next one began (a clean step after the install it made room for)
	// would undo what that one did. First sends are all made, the step
	// ended or not: a member refusing at once does not keep the others
	// from taking the step, as they did before sends were ever made again.
	stepDone := make(chan struct{})
	defer close(stepDone)
	send := func(m string, id []byte, to *x509.Certificate) {
		sem <- struct{}{}
		defer func() { <-sem }()
		if !bytes.Equal(id, op.id) {
			select {
			case <-stepDone:
				return
			default:
			}
		}
		mop := *op
		mop.id = id
		msg, err := g.keyringOpFor(signer, &mop, m, to)
		if err == nil {
			err = g.sendStream(m, msg)
		}
		sends <- sent{m, err}
	}
	certOf := func(m string) *x509.Certificate {
		if v := g.members.verified(m); v != nil {
			return v.Cert
		}
		return nil
	}
	// A member that renews its certificate while a step is on its way
	// (a new key with each renewal) cannot open a key sealed to the old
	// one, and signs its answer with a key this gateway cannot check
	// until gossip brings the new certificate. Once it does, the step
	// is sent again, made for the new certificate, under an ID of its
	// own: the member took the first one's ID as used.
	type waiter struct {
		to      *x509.Certificate // the member's, as last sent
		ids     [][]byte          // of every send, the latest last
		resends int
	}
	waiting := map[string]*waiter{}
	for _, m := range members {
		w := &waiter{to: certOf(m), ids: [][]byte{op.id}}
		waiting[m] = w
		go send(m, op.id, w.to)
	}
	renewed := func(m string, w *waiter) bool {
		to := certOf(m)
		return to != nil && w.to != nil && !to.Equal(w.to) && w.resends < maxStepResends
	}
	resend := func(m string, w *waiter) {
		id := make([]byte, opIDLen)
		rand.Read(id)
		w.ids, w.to = append(w.ids, id), certOf(m)
		w.resends++
		go send(m, id, w.to)
	}
	var full []*refusedError
	deadline := time.NewTimer(keyringAckWait)
	defer deadline.Stop()
	recheck := time.NewTicker(renewalRecheck)
	defer recheck.Stop()
	for len(waiting) > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case s := <-sends:
			if s.err != nil && waiting[s.member] != nil {
				// Said now, with the reason, rather than as an
				// acknowledgement missing in a quarter of a minute.
				// (A member that answered another send is not failed
				// for this one.)
				return fmt.Errorf("not sent to %s: %w", s.member, s.err)
			}
		case <-recheck.C:
			for m, w := range waiting {
				if renewed(m, w) {
					resend(m, w)
				}
			}
		case a := <-g.acks:
			w := waiting[a.node]
			if w == nil || !slices.ContainsFunc(w.ids, func(id []byte) bool { return bytes.Equal(a.id, id) }) {
				continue
			}
			if a.refused != "" {
				if !bytes.Equal(a.id, w.ids[len(w.ids)-1]) {
					continue // answered by the send that replaced it
				}
				if renewed(a.node, w) {
					resend(a.node, w)
					continue
				}
				r := &refusedError{a.node, a.refused}
				switch {
				case kind == opInstall && errors.Is(r, errKeyringFull):
					// The others' answers are waited for: each
					// member refusing so is to be cleared
					// (rotationStepRoom), and only those.
					full = append(full, r)
				case kind != opClean:
					return r
				default:
					// A member that cannot clear its keyring (one of
					// a release before the step refuses it as
					// unknown) keeps its keys: the install that
					// follows says whether it has room.
					g.log.Warn("gossip key rotation: a member kept the keys its keyring holds", "member", a.node, "err", r)
				}
			}
			delete(waiting, a.node)
		case <-deadline.C:
			var missing []string
			for m := range waiting {
				missing = append(missing, m)
			}
			slices.Sort(missing)
			return fmt.Errorf("no acknowledgement from %s within %s", strings.Join(missing, ", "), keyringAckWait)
		}
	}
	if len(full) > 0 {
		return &keyringsFull{full}
	}
	return nil
}
