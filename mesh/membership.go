package mesh

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// MemberState is what the gateway thinks of a member.
type MemberState string

const (
	StateVerified MemberState = "verified" // advert verified: may be a WireGuard peer
	StatePending  MemberState = "pending"  // certificate not received yet: never a peer
	StateRefused  MemberState = "refused"  // advert or certificate refused: never a peer
	StateDead     MemberState = "dead"     // gossip declared it dead or it left: not a peer
)

// member is one gateway the gossip layer told us about.
type member struct {
	name         string
	gossip       netip.AddrPort
	meta         []byte
	advert       *certs.SignedAdvert // nil if the meta does not decode
	verified     *certs.Verified
	seen         *certs.Seen // last accepted advert, against replays
	state        MemberState
	reason       string // why pending, refused or dead
	alive        bool
	remembered   bool            // restored from the state directory, not yet heard from
	left         bool            // left on purpose (it said so, signed), rather than declared dead
	leavingAt    time.Time       // when its signed leave notice arrived
	leavingVer   uint64          // the advert version the notice names
	lastVerified *certs.Verified // kept when it dies, to check its leave notice
	// verifiedAt is where gossip had the member when its advert was last
	// verified. memberlist takes a node's address from whoever holds the
	// gossip key, and moves a node that left to any address: only a newer
	// advert, which the gateway alone can sign, takes its name elsewhere.
	verifiedAt netip.AddrPort
	// certAsked is when a newer advert's certificate was last asked for
	// at the address its alive message gave (certFirstError).
	certAsked time.Time
	// renewing: verified, its new advert names a certificate not fetched
	// yet; the advert verified last stands meanwhile.
	renewing bool
	// verifiedMeta is the advert verified holds, as gossiped (meta may be
	// a newer one, not verified yet): what is saved for a restart.
	verifiedMeta []byte
	changed      time.Time
	// stranger: listed only to say why it was refused, and not in gossip
	// (refused at the door, or refused and gone since), never verified.
	stranger bool
	// revokedAt is when a revocation list just adopted refused it while
	// it was here, its refusal (revokedErr) not counted yet: see
	// revokedGrace.
	revokedAt  time.Time
	revokedErr error
	revokedVer uint64 // the version of its last advert then
}

// membership is the gateway's verified view of the mesh. The memberlist
// delegates feed it (without blocking: they run under memberlist's locks);
// the reconciler reads a snapshot of it. All methods are safe for
// concurrent use.
type membership struct {
	mu      sync.Mutex
	self    string
	trust   *certs.TrustBundle
	members map[string]*member
	certs   map[[32]byte]*x509.Certificate // certificates by SHA-256, chain-verified
	badCert map[[32]byte]refusedCert       // certificates refused, and why
	// maxBadCerts bounds badCert (defaultMaxBadCerts). badCertFull is
	// set when a forced prune freed nothing: until the next regular one,
	// further refusals are not remembered rather than each rescanning
	// every member under the lock.
	maxBadCerts int
	badCertFull bool
	strangers   int                // members with stranger set
	unverified  int                // other members never verified (pending, refused in gossip): see maxPending
	cache       *certs.VerifyCache // verified adverts: re-judging costs a lookup
	lists       passedLists        // revocation lists from gossip passed over (worker.go)
	now         func() time.Time
	// onChange is called (outside the lock) when the verified set may
	// have changed.
	onChange func()
	// onRefuse, if set, is told (under the lock) why a member or a gossip
	// message was refused, as a metric label.
	onRefuse func(name, reason string, err error)
	// wentRevoked holds, by name, the members refused as revoked whose
	// count was put off and who went within the grace (forgotten then):
	// a newer advert of one at the door is a revoked gateway come back,
	// counted once; an echo of its last (gossip from members that have
	// not seen it go, as after every burst down) is not. Kept
	// refusedKept, up to maxStrangers.
	wentRevoked map[string]wentRevoked
	// adopting is set while members are judged again under a revocation
	// list just adopted; revokedGrace is how long one it revokes may
	// take to go before its refusal counts (defaultRevokedGrace).
	adopting     bool
	revokedGrace time.Duration
	refusedMsg   map[string][32]byte // hash of the last message refused per name, counted once
	// gen counts such changes: a reconcile that finds it unchanged (and
	// nothing else changed) reuses its last plan instead of recomputing.
	gen atomic.Uint64
	// gw is gateways() as of generation gwGen.
	gw    []Node
	gwGen uint64
	// selfAheadSaid: ownAdvertAhead has reported once.
	selfAheadSaid bool
}

// changed records a change and tells the gateway.
func (ms *membership) changed() {
	ms.gen.Add(1)
	ms.onChange()
}

// generation is the number of changes so far.
func (ms *membership) generation() uint64 { return ms.gen.Load() }

func newMembership(self string, tb *certs.TrustBundle, now func() time.Time, onChange func()) *membership {
	return &membership{
		self: self, trust: tb, now: now, onChange: onChange, cache: certs.NewVerifyCache(),
		members: map[string]*member{}, certs: map[[32]byte]*x509.Certificate{}, badCert: map[[32]byte]refusedCert{}, maxBadCerts: defaultMaxBadCerts, refusedMsg: map[string][32]byte{},
		revokedGrace: defaultRevokedGrace,
	}
}

// admit decides whether memberlist may take an alive message with this
// meta at all (the AliveDelegate). It refuses what can already be known to
// be bad — undecodable, a name that differs from the advert's, a refused
// certificate, a failed verification, a replay — and lets a member whose
// certificate has not arrived yet in as pending, to be verified once it
// has. A conflict with another member is judged once it is in.
//
// A member unknown until its first alive message is refused is listed as
// refused all the same (memberlist never reports it joining): whether an
// impostor's certificate or its alive message arrives first is a race,
// and status must say it was refused either way. Not so a former member
// whose certificate has ended (see formerMemberLocked).
func (ms *membership) admit(name string, gossip netip.AddrPort, meta []byte) error {
	if name == ms.self {
		return nil
	}
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if m := ms.members[name]; m != nil && !m.revokedAt.IsZero() {
		ms.stayedRevokedLocked(m, ms.now())
	}
	sa, err := ms.admitLocked(name, gossip, meta)
	if m := ms.members[name]; m != nil && !m.revokedAt.IsZero() && sa != nil {
		// Its count put off: an advert it signed meanwhile (a load
		// change, before it saw its revocation) is its own, echoed after
		// it went, not a return.
		m.revokedVer = max(m.revokedVer, sa.Version)
	}
	if err == nil {
		delete(ms.refusedMsg, name)
		return nil
	}
	switch err.(type) {
	case *certFirstError, *departedError:
		return err // not an intrusion to count: see each
	}
	m, news := ms.members[name], false
	if w, ok := ms.wentRevoked[name]; ok && sa != nil && sa.Version > w.version && certs.ReasonOf(err) == certs.ReasonRevoked {
		// Revoked while here, gone within the grace, and back with a
		// newer advert: the intrusion the grace put off.
		delete(ms.wentRevoked, name)
		if ms.onRefuse != nil {
			ms.onRefuse(name, rejectionReason(err), err)
		}
		return err
	}
	if m == nil && ms.formerMemberLocked(sa, err) {
		// An echo of a gateway forgotten when its certificate ended:
		// its refusal was counted and logged when it was made.
		return err
	}
	if m == nil && ms.strangers < maxStrangers {
		// Not alive: it is not in memberlist, and is forgotten
		// refusedKept from now unless it is admitted later.
		m = &member{name: name, gossip: gossip, meta: append([]byte(nil), meta...), advert: sa, state: StateRefused, reason: err.Error(), changed: ms.now(), stranger: true}
		ms.members[name] = m
		ms.strangers++
		news = true
	}
	// Gossip repeats a refused message many times; count a refusal once
	// per member and message.
	sum := sha256.Sum256(meta)
	if ms.onRefuse != nil && (news || m == nil || m.state != StateRefused) && ms.refusedMsg[name] != sum {
		// Remembered for listed names only: a name that is not listed
		// (past maxStrangers) is counted each time, rather than kept in
		// memory.
		if m != nil {
			ms.refusedMsg[name] = sum
		}
		ms.onRefuse(name, rejectionReason(err), err)
	}
	return err
}

// formerMemberLocked reports whether a refusal at the door is of one of
// the mesh's own certificates that has ended: a gateway forgotten for
// that reason is still gossiped as alive by members that have not seen
// it go, and those echoes must not list it again. Revocation is checked
// only on certificates that chain to the mesh CA; expiry is checked
// before the chain, so an expired certificate counts as the mesh's only
// if it was verified when it was learned (an impostor's expired one is
// listed).
func (ms *membership) formerMemberLocked(sa *certs.SignedAdvert, err error) bool {
	switch certs.ReasonOf(err) {
	case certs.ReasonRevoked:
		return true
	case certs.ReasonExpired:
		return sa != nil && ms.certs[sa.CertHash] != nil
	}
	return false
}

// refusedCert is why a certificate was refused, and how long that holds.
type refusedCert struct {
	err error
	// retryAt is when a certificate refused as not yet valid becomes
	// valid: the refusal is dropped then, and the members naming it
	// judged again (clocks differ; an hour's refusal for a few minutes'
	// skew would lock a new gateway out).
	retryAt time.Time
	// keepUntil is the end of a revoked certificate: until then its
	// refusal is kept even when no member names it, so that a revoked
	// gateway still running is refused at the door, not let in as
	// pending to be refused once its certificate is fetched again.
	keepUntil time.Time
}

// refusal records why a certificate was refused.
func refusal(cert *x509.Certificate, err error) refusedCert {
	rc := refusedCert{err: fmt.Errorf("certificate refused: %w", err)}
	if cert != nil {
		switch certs.ReasonOf(err) {
		case certs.ReasonNotYetValid:
			rc.retryAt = certs.ValidFrom(cert)
		case certs.ReasonRevoked:
			rc.keepUntil = cert.NotAfter
		}
	}
	return rc
}

// maxPending bounds the members in gossip never verified (let in before
// their certificate is known, then refused or still waiting for it): far
// above the gateways of a mesh joining at once. They are counted, not
// looked for: memberlist waits on the membership's lock, and a scan of
// every member at each new name cost it as much as the membership held.
const maxPending = 4096

// maxStrangers bounds the refused members not in gossip, so that one
// holding the gossip key cannot fill a gateway's memory by trying names;
// past it, refusals are still counted and logged.
const maxStrangers = 1024

// addLocked lists a new member.
func (ms *membership) addLocked(m *member) {
	ms.members[m.name] = m
	if m.lastVerified == nil && !m.stranger {
		ms.unverified++
	}
}

// dropLocked forgets a member entirely.
func (ms *membership) dropLocked(name string) {
	if m := ms.members[name]; m != nil && m.stranger {
		ms.strangers--
	} else if m != nil && m.lastVerified == nil {
		ms.unverified--
	}
	delete(ms.members, name)
	delete(ms.refusedMsg, name)
}

// admitLocked is admit's judgement. It returns the advert it decoded, if
// it got that far (nil for one already verified), so that a refusal need
// not decode it again.
func (ms *membership) admitLocked(name string, gossip netip.AddrPort, meta []byte) (*certs.SignedAdvert, error) {
	m := ms.members[name]
	floor, bound := ms.boundLocked(m, gossip)
	if bound == "" && m != nil && m.state == StateVerified && bytes.Equal(m.meta, meta) {
		return nil, nil // the advert we verified, gossiped again
	}
	sa, err := certs.DecodeAdvert(meta)
	if err != nil {
		return nil, err
	}
	if sa.Node != name {
		return sa, &certs.VerifyError{Reason: certs.ReasonAttributeMismatch, Detail: fmt.Sprintf("gossip name %q differs from advert node %q", name, sa.Node)}
	}
	if err := ms.refusedLocked(sa.CertHash); err != nil {
		return sa, err
	}
	if bound != "" && sa.Version <= floor && m.verifiedAt == gossip && sa.Seen().Digest == m.seen.Digest {
		return sa, &departedError{name}
	}
	if bound != "" && sa.Version <= floor {
		return sa, &certs.VerifyError{Reason: certs.ReasonReplay, Detail: fmt.Sprintf("advert of %q (version %d) gossiped at %s, but %s: only an advert newer than version %d takes it elsewhere or brings it back, and a gateway signs one at every start; someone holding the gossip key replays it, a second gateway runs under its name (give each gateway its own identity), or %s",
			name, sa.Version, gossip, bound, floor, versionDown(floor))}
	}
	cert := ms.certs[sa.CertHash]
	if cert == nil && bound != "" {
		// Let in as pending, it would be at the address the message
		// gives until its certificate came, and memberlist would refuse
		// the gateway itself anywhere else meanwhile.
		now := ms.now()
		ask := now.Sub(m.certAsked) >= certRetry
		if ask {
			m.certAsked = now
		}
		return sa, &certFirstError{at: gossip, ask: ask}
	}
	if cert == nil {
		// Pending: nothing of it is verified yet, so there is a bound
		// on how many are let in (each is spread to every gateway, kept
		// and asked for its certificate): one holding the gossip key
		// could otherwise make up names without end.
		if (m == nil || m.stranger) && ms.unverified >= maxPending { // listed as refused by this very bound, say
			return sa, fmt.Errorf("%d gateways never verified are in gossip already, waiting for their certificate or refused: no more are let in until some are verified or gone", maxPending)
		}
		return sa, nil
	}
	var last *certs.Seen
	if m != nil {
		last = m.seen
	}
	// A conflict is not refused here but once in (judgeLocked): a member
	// refused at the door is not re-judged when the one that beat it is
	// refused in turn, and would stay refused or not by the order the
	// adverts came in.
	_, err = ms.cache.VerifyAdvert(meta, cert, ms.trust, ms.now(), last)
	if last != nil && sa.Version < last.Version && certs.ReasonOf(err) == certs.ReasonReplay {
		err = fmt.Errorf("%w: someone holding the gossip key replays it, or %s", err, versionDown(last.Version))
	}
	return sa, err
}

// versionDown is the other cause of a gateway's adverts refused as
// replays, and what to do: its versions went down, which nobody else
// tells it (its own log says so only if it hears its older advert
// gossiped, ownAdvertAhead).
func versionDown(floor uint64) string {
	return fmt.Sprintf("its advert version went down (advert.version in its state directory lost, or restored from a backup, while an earlier run's clock was ahead): on that gateway, write %d to advert.version in its state directory and restart it, so that its next advert is above version %d",
		floor, floor)
}

// ownAdvertAhead reports an advert of this gateway's own gossiped with a
// version above mine, the version it signs now, once per run: the peers
// hold it, and refuse every advert it signs now as a replay. Only an
// advert that verifies with one of its certificates counts: anyone
// holding the gossip key can gossip its name with any version.
func (ms *membership) ownAdvertAhead(meta []byte, mine uint64, own *x509.Certificate) (uint64, bool) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if ms.selfAheadSaid {
		return 0, false
	}
	sa, err := certs.DecodeAdvert(meta)
	if err != nil || sa.Node != ms.self || sa.Version <= mine {
		return 0, false
	}
	cert := ms.certs[sa.CertHash]
	if sa.CertHash == sha256.Sum256(own.Raw) {
		cert = own
	}
	if cert == nil {
		return 0, false
	}
	if _, err := ms.cache.VerifyAdvert(meta, cert, ms.trust, ms.now(), nil); err != nil {
		return 0, false
	}
	ms.selfAheadSaid = true
	return sa.Version, true
}

// boundLocked says what ties a member once verified to its last advert,
// if anything does: an alive message that places it elsewhere than where
// that advert was verified, or that comes after it left on purpose, is
// taken only with an advert of a version above floor. Either could
// otherwise be anyone holding the gossip key: memberlist takes a node's
// address and liveness from the message, and moves a node that left (or
// that a forged leave made so) to any address, whatever its incarnation.
// A gateway's own address changes only with a restart, and every start
// signs a newer advert (stateDir.nextAdvertVersion).
func (ms *membership) boundLocked(m *member, gossip netip.AddrPort) (floor uint64, why string) {
	if m == nil || m.seen == nil {
		return 0, ""
	}
	switch {
	case m.left || !m.leavingAt.IsZero():
		return max(m.seen.Version, m.leavingVer), "it left the mesh on purpose"
	case m.verifiedAt.IsValid() && gossip != m.verifiedAt:
		return m.seen.Version, fmt.Sprintf("it was verified at %s", m.verifiedAt)
	}
	return 0, ""
}

// certFirstError puts off a member that boundLocked ties to a newer
// advert, whose advert names a certificate not known yet: it is let in
// once that certificate is here and the advert verifies. ask says to ask
// for the certificate at the address the message gives (at most once per
// certRetry): the members it is known at would otherwise learn it only
// from its own state exchanges, one member at a time.
type certFirstError struct {
	at  netip.AddrPort
	ask bool
}

func (e *certFirstError) Error() string {
	return fmt.Sprintf("its advert names a certificate not known here yet, asked for at %s: let in once that advert verifies", e.at)
}

// departedError refuses the advert a member that left on purpose last
// had verified, at the address it had, without counting it as an
// intrusion: members that have not heard of the departure yet gossip it
// for a while after every gateway stop.
type departedError struct{ name string }

func (e *departedError) Error() string {
	return fmt.Sprintf("%s left the mesh on purpose: its last advert, gossiped again, does not bring it back (a newer one does)", e.name)
}

// conflictLocked refuses a verified advert that claims an overlay IP, a
// WireGuard key or a route of another site that a verified member with a
// better standing (wins) holds, and else refuses in turn the verified
// members that this one beats: only once none beats it, so that it does
// not refuse some and then lose to another. The standing is one order
// over all members and claims, so every gateway keeps the same claimants
// whatever order adverts arrive in (after a re-judgement, which takes
// members in that order: see rejudgeLocked).
func (ms *membership) conflictLocked(name string, v *certs.Verified) error {
	if m := ms.members[name]; m != nil && m.state == StateVerified && sameClaims(m.verified, v) {
		return nil
	}
	return ms.contestLocked(name, v)
}

// contestLocked is conflictLocked without its short-cut for claims the
// member holds already.
func (ms *membership) contestLocked(name string, v *certs.Verified) error {
	var beaten []*member
	for _, o := range ms.members {
		if o.name == name || o.state != StateVerified {
			continue
		}
		why := conflict(o.verified, v)
		if why == "" {
			continue
		}
		if wins(o.verified, o.name, v, name) {
			return &conflictError{fmt.Sprintf("%s already held by %s", why, o.name)}
		}
		beaten = append(beaten, o)
	}
	for _, o := range beaten {
		why := conflict(o.verified, v)
		standing := "whose certificate is older"
		if proven(v) && !proven(o.verified) {
			standing = "which proves it holds its WireGuard key"
		}
		err := &conflictError{fmt.Sprintf("%s also claimed by %s, %s", why, name, standing)}
		// Not renewing any more: refused, it stands on no advert.
		o.verified, o.state, o.reason, o.changed, o.renewing = nil, StateRefused, err.Error(), ms.now(), false
		if ms.onRefuse != nil {
			ms.onRefuse(o.name, "conflict", err)
		}
	}
	return nil
}

// sameClaims reports whether two verified adverts of one member claim the
// same things with the same standing (certificate), so that a re-judged
// member (a new load figure, a refreshed advert) need not be compared with
// every other member again: at a thousand gateways that comparison
// dominated the cost of gossip.
func sameClaims(a, b *certs.Verified) bool {
	return a != nil && b != nil && a.Cert.Equal(b.Cert) && a.Attributes.OverlayIP == b.Attributes.OverlayIP &&
		a.Attributes.Site == b.Attributes.Site && slices.Equal(a.Advert.Routes, b.Advert.Routes) &&
		a.Advert.WireGuardKey == b.Advert.WireGuardKey && a.Advert.NextWireGuardKey == b.Advert.NextWireGuardKey &&
		proven(a) == proven(b)
}

// conflict says what two verified adverts both claim, or "". A WireGuard
// key is a claim like an address: WireGuard keeps one peer per public
// key, so two gateways with one key would share a peer entry on every
// device. Next keys are not contested: a next key that is someone's key
// is left out of the plans (addNextKeys), so that a gateway cannot have
// another refused by naming that one's key.
func conflict(a, b *certs.Verified) string {
	aa, ba := a.Attributes, b.Attributes
	if aa.OverlayIP == ba.OverlayIP {
		return fmt.Sprintf("overlay IP %s", ba.OverlayIP)
	}
	if a.Advert.WireGuardKey == b.Advert.WireGuardKey {
		return fmt.Sprintf("WireGuard key %s", b.Advert.WireGuardKey)
	}
	if aa.Site == ba.Site {
		return "" // gateways of one site share its routes
	}
	for _, r := range b.Advert.Routes {
		for _, ar := range a.Advert.Routes {
			if r.Overlaps(ar) {
				return fmt.Sprintf("route %s (overlapping %s of site %s)", r, ar, aa.Site)
			}
		}
	}
	return ""
}

// proven reports whether v's advert proves that its gateway holds its
// WireGuard key. certs.VerifyAdvert refuses a proof that does not verify;
// an advert without one is a gateway of a release from before proofs.
func proven(v *certs.Verified) bool { return !v.Advert.WireGuardKeyProof.IsZero() }

// wins reports whether claimant a keeps a contested claim against b. The
// standing is one order over all claimants, whatever is contested (a mix
// of orders, one per kind of claim, would let the order of arrival decide
// between three claimants): a gateway that proves it holds its WireGuard
// key first, then the older certificate, then the lower name. Proof
// first, because any gateway whose certificate predates another's last
// renewal could otherwise take that one's key by naming it. Adverts of
// earlier releases carry no proof: they are let in, but rank below every
// gateway that has upgraded, for any claim. Two that both prove one key
// hold it between them: a cloned disk, which age settles.
func wins(a *certs.Verified, an string, b *certs.Verified, bn string) bool {
	return standing(a, an, b, bn) < 0
}

// standing compares two claimants: negative if a ranks first.
func standing(a *certs.Verified, an string, b *certs.Verified, bn string) int {
	return rank{proven(a), a.Cert.NotBefore, an}.compare(rank{proven(b), b.Cert.NotBefore, bn})
}

// rank is what a claimant's standing is made of; re-judging sorts members
// by it too, so that both follow one order.
type rank struct {
	proven bool
	since  time.Time // the certificate's NotBefore
	name   string
}

func (a rank) compare(b rank) int {
	if a.proven != b.proven {
		return cmp.Compare(b2i(b.proven), b2i(a.proven)) // proven first
	}
	if c := a.since.Compare(b.since); c != 0 {
		return c
	}
	return cmp.Compare(a.name, b.name)
}

// update records a member as alive with its current meta (join or update)
// and verifies it if its certificate is known. It returns whether the
// member's certificate is unknown, so the caller can fetch it.
func (ms *membership) update(name string, gossip netip.AddrPort, meta []byte) (needCert bool) {
	if name == ms.self {
		return false
	}
	ms.mu.Lock()
	m := ms.members[name]
	if m == nil {
		m = &member{name: name}
		ms.addLocked(m)
	}
	if m.stranger {
		m.stranger = false
		ms.strangers--
		ms.unverified++
	}
	if !m.alive {
		// Back (or new): a leave notice or departure from before is over.
		// Only this clears them, not the re-judging of a member that is
		// still here, which would lose a notice that arrived before gossip
		// saw it go.
		m.left, m.leavingAt = false, time.Time{}
	}
	prev, prevGossip, prevMeta := m.state, m.gossip, m.meta
	m.gossip, m.meta, m.alive, m.remembered = gossip, append([]byte(nil), meta...), true, false
	needCert = ms.judgeLocked(m)
	// Only what a plan is made of counts as a change — a verified member
	// coming, going or changing: every newcomer is announced (pending)
	// before its certificate arrives, and each change makes every gateway
	// recompute its plan, so counting the announcement doubled the work a
	// join costs the mesh.
	relevant := (prev == StateVerified || m.state == StateVerified) && (m.state != prev || gossip != prevGossip || !bytes.Equal(meta, prevMeta))
	ms.mu.Unlock()
	if relevant {
		ms.changed()
	}
	return needCert
}

// judgeLocked (re)derives a member's state from its meta, the known
// certificates and the trust bundle; its changed time moves only when the
// state does.
func (ms *membership) judgeLocked(m *member) (needCert bool) {
	prev := m.state
	defer func() {
		if m.state != prev {
			m.changed = ms.now()
		}
	}()
	if !m.alive && !m.remembered {
		// One refused stays refused when it goes: it is not a member that
		// died (never knocked on, never saved), and status keeps saying
		// why it was refused until it is forgotten.
		if prev == StateRefused {
			m.state, m.verified = StateRefused, nil
			return false
		}
		if m.advert != nil {
			if err := ms.refusedLocked(m.advert.CertHash); err != nil {
				ms.refuseLocked(m, prev, err)
				return false
			}
		}
		m.state, m.verified, m.renewing = StateDead, nil, false
		return false
	}
	sa, err := certs.DecodeAdvert(m.meta)
	if err == nil && sa.Node != m.name {
		// admit refuses this before memberlist takes the member in; said
		// again here so that no path past admit can verify one gateway
		// under another's name.
		err = &certs.VerifyError{Reason: certs.ReasonAttributeMismatch, Detail: fmt.Sprintf("gossip name %q differs from advert node %q", m.name, sa.Node)}
	}
	if err != nil {
		m.advert = nil
		ms.refuseLocked(m, prev, err)
		return false
	}
	m.advert = sa
	if err := ms.refusedLocked(sa.CertHash); err != nil {
		ms.refuseLocked(m, prev, err)
		return false
	}
	cert := ms.certs[sa.CertHash]
	if cert == nil {
		// Renewed: until its new certificate is fetched, the advert
		// verified last stands while its certificate does. Pending, the
		// member would drop out of every peer's plan, its tunnels down
		// for as long as the fetch takes, at every renewal.
		if prev == StateVerified && m.verified != nil {
			if _, err := ms.cache.VerifyCertificate(ms.trust, m.verified.Cert, ms.now()); err == nil {
				// Contested as it stands: a re-judgement meets members
				// afresh, and one that it beats may have been let in.
				if err := ms.contestLocked(m.name, m.verified); err != nil {
					ms.refuseLocked(m, prev, err)
					return true // its new certificate, whose claims may differ, is still wanted
				}
				m.renewing = true
				return true
			}
		}
		m.verified, m.state, m.reason, m.renewing = nil, StatePending, "waiting for its certificate", false
		return true
	}
	m.renewing = false
	v, err := ms.cache.VerifyAdvert(m.meta, cert, ms.trust, ms.now(), m.seen)
	if err == nil {
		err = ms.conflictLocked(m.name, v)
	}
	if err != nil {
		ms.refuseLocked(m, prev, err)
		return false
	}
	if m.lastVerified == nil && !m.stranger {
		ms.unverified--
	}
	m.verified, m.seen, m.state, m.reason, m.lastVerified, m.verifiedMeta = v, &v.Seen, StateVerified, "", v, m.meta
	m.verifiedAt = m.gossip
	if !m.leavingAt.IsZero() && v.Seen.Version > m.leavingVer {
		// A newer advert than its notice's: it came back (a restart
		// quicker than gossip's failure detection), and its notice is over.
		m.left, m.leavingAt = false, time.Time{}
	}
	return false
}

// refuseLocked refuses a member; a refusal that is new (not the same
// member judged again) of a member gossip says is here is counted. One
// that is gone (left, dead, remembered from before a restart) is refused
// when its certificate is revoked or runs out: a burst taken down or a
// gateway decommissioned, not the intrusion the count alerts on. Nor is
// one still here that a revocation list just adopted revokes, if it goes
// within revokedGrace: a burst's gateways leave only once they see their
// own revocation, so the gateway that ran burst down, and others by a
// race, adopt it while they are still here. One that stays is counted
// then (stayedRevokedLocked).
func (ms *membership) refuseLocked(m *member, prev MemberState, err error) {
	m.verified, m.state, m.reason, m.renewing = nil, StateRefused, err.Error(), false
	if prev == StateRefused || !m.alive {
		return
	}
	if ms.adopting && certs.ReasonOf(err) == certs.ReasonRevoked {
		m.revokedAt, m.revokedErr = ms.now(), err
		if m.advert != nil {
			m.revokedVer = m.advert.Version
		}
		return
	}
	if ms.onRefuse != nil {
		ms.onRefuse(m.name, rejectionReason(err), err)
	}
}

// wentRevoked is a member refused as revoked that went within the grace.
type wentRevoked struct {
	version uint64 // of its last advert when it was refused
	at      time.Time
}

// defaultRevokedGrace is how long a gateway refused as revoked while
// here has to leave before its refusal is counted: a burst gateway leaves
// within seconds of its revocation reaching it by gossip. One that stays
// is one the mesh revoked (its key stolen, say) that goes on gossiping,
// which the count must not miss: a minute late, it still alerts.
const defaultRevokedGrace = leavingMatches

// stayedRevokedLocked counts the refusal refuseLocked put off, of a
// member still here revokedGrace after it.
func (ms *membership) stayedRevokedLocked(m *member, now time.Time) {
	if m.revokedAt.IsZero() || now.Sub(m.revokedAt) < ms.revokedGrace {
		return
	}
	err := m.revokedErr
	m.revokedAt, m.revokedErr = time.Time{}, nil
	if m.alive && m.state == StateRefused && ms.onRefuse != nil {
		ms.onRefuse(m.name, rejectionReason(err), err)
	}
}

// conflictError refuses a claim (overlay IP, WireGuard key, route) that a
// member of better standing holds (wins).
type conflictError struct{ msg string }

func (e *conflictError) Error() string { return e.msg }

// gossipsFrom reports whether a member that is alive gossips from source,
// an address as sourceOf counts it.
func (ms *membership) gossipsFrom(source netip.Addr) bool {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	for _, m := range ms.members {
		if m.alive && m.gossip.IsValid() && sourceOf(m.gossip.Addr()) == source {
			return true
		}
	}
	return false
}

// leave records that gossip declared a member dead or that it left.
func (ms *membership) leave(name string) {
	ms.mu.Lock()
	if m := ms.members[name]; m != nil {
		m.alive, m.remembered = false, false
		if !m.revokedAt.IsZero() && len(ms.wentRevoked) < maxStrangers { // gone in time: counted if it comes back
			if ms.wentRevoked == nil {
				ms.wentRevoked = map[string]wentRevoked{}
			}
			// Its leave notice names its last version: it signs none after.
			ms.wentRevoked[name] = wentRevoked{version: max(m.revokedVer, m.leavingVer), at: ms.now()}
		}
		m.revokedAt = time.Time{}
		ms.judgeLocked(m)
		m.left = !m.leavingAt.IsZero() && ms.now().Sub(m.leavingAt) < leavingMatches
		if m.state == StateDead {
			m.reason = "declared dead"
			if m.left {
				m.reason = "left the mesh"
			}
		}
		switch {
		case m.lastVerified != nil || m.stranger:
			ms.forgetIfEndedLocked(m, ms.now())
		case m.state == StateRefused && ms.strangers < maxStrangers:
			// Listed a while yet, to say why it was refused, but among
			// the strangers and their bound.
			m.stranger = true
			ms.strangers++
			ms.unverified--
		default:
			// Never verified: gone, nothing of it is worth keeping,
			// saving or knocking on, and kept it would escape
			// maxPending, which counts those in gossip — one holding
			// the gossip key could make up names, each alive then dead,
			// without end.
			ms.dropLocked(name)
		}
	}
	ms.mu.Unlock()
	ms.changed()
}

// leaving records a member's signed notice that it is leaving on purpose,
// made when its advert was at version; valid checks the signature against
// the member's verified certificate. The notice may arrive before or
// after gossip reports the departure.
func (ms *membership) leaving(name string, version uint64, valid func(*certs.Verified) bool) error {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	m := ms.members[name]
	if m == nil {
		return fmt.Errorf("leave notice of unknown member %s", name)
	}
	v := m.lastVerified // the current one, or the last before it was declared dead
	if v == nil || !valid(v) {
		return fmt.Errorf("leave notice of %s: signature does not verify", name)
	}
	if version < v.Seen.Version {
		return fmt.Errorf("leave notice of %s names advert version %d, older than the %d verified since: a replay from an earlier run", name, version, v.Seen.Version)
	}
	m.leavingAt, m.leavingVer = ms.now(), version
	if m.state == StateDead && ms.now().Sub(m.changed) < leavingMatches {
		m.left, m.reason = true, "left the mesh"
	}
	return nil
}

// addCert learns a certificate (fetched from its owner, or from push/pull).
// It is kept only if it chains to the mesh CA now; either way the members
// waiting for it are judged again.
func (ms *membership) addCert(der []byte) error {
	sum := sha256.Sum256(der)
	ms.mu.Lock()
	if _, ok := ms.certs[sum]; ok {
		ms.mu.Unlock()
		return nil
	}
	err := ms.learnCertLocked(sum, der)
	for _, m := range ms.members {
		if m.advert != nil && m.advert.CertHash == sum {
			ms.judgeLocked(m)
		}
	}
	ms.mu.Unlock()
	ms.changed()
	return err
}

// learnCertLocked verifies a certificate against the trust bundle and
// files it as known or refused.
func (ms *membership) learnCertLocked(sum [32]byte, der []byte) error {
	cert, err := ms.checkCert(ms.trust, der, ms.now())
	return ms.fileCertLocked(sum, cert, err)
}

// checkCert parses a certificate and verifies it against trust. It takes
// no lock: a join's batch of thousands is verified outside ms.mu.
func (ms *membership) checkCert(trust *certs.TrustBundle, der []byte, now time.Time) (*x509.Certificate, error) {
	if len(der) > maxCertSize {
		return nil, fmt.Errorf("a certificate of %d bytes: larger than any gateway certificate (%d at most)", len(der), maxCertSize)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	_, err = ms.cache.VerifyCertificate(trust, cert, now)
	return cert, err
}

// fileCertLocked files a checked certificate as known, or as refused
// for err.
func (ms *membership) fileCertLocked(sum [32]byte, cert *x509.Certificate, err error) error {
	if err != nil {
		if len(ms.badCert) >= ms.maxBadCerts && !ms.badCertFull {
			ms.pruneCertsLocked(true)
			ms.badCertFull = len(ms.badCert) >= ms.maxBadCerts
		}
		// Past the bound (every one still named by a member) it is
		// not remembered: seen again, it is verified and refused again.
		if len(ms.badCert) < ms.maxBadCerts {
			ms.badCert[sum] = refusal(cert, err)
		}
		return err
	}
	delete(ms.badCert, sum) // refused as not valid yet, and now it is
	ms.certs[sum] = cert
	return nil
}

// maxCertSize bounds a gossiped certificate before it is parsed: a
// gateway's is under 1 KiB, and what is refused is remembered (up to
// maxBadCerts of them), so one of a megabyte would be kept by the
// thousand.
const maxCertSize = 16 << 10

// refusedLocked is why a certificate is refused, or nil if it is not (or
// its refusal as not valid yet has run out: it is verified again).
func (ms *membership) refusedLocked(sum [32]byte) error {
	rc, bad := ms.badCert[sum]
	if !bad || !rc.retryAt.IsZero() && !ms.now().Before(rc.retryAt) {
		return nil
	}
	return rc.err
}

// rememberedFor is how long a member restored at start stays a peer
// without gossip hearing from it: a restart while it is partitioned keeps
// its tunnel meanwhile; gossip reaches a live one in seconds.
const rememberedFor = 10 * time.Minute

// defaultMaxBadCerts bounds the refused certificates remembered: anyone
// holding the gossip key can send any number of them.
const defaultMaxBadCerts = 4096

// pruneCertsLocked drops the certificates no member's advert names any
// more: expired ones (a burst's thousands of gateways, every renewed
// identity's predecessor) refusedKept after they ended, as a forgotten
// member's echoes stop by then, and refused ones, which are refused again
// if they come back — a revoked one only once it has ended, unless force
// (the bound is reached). Kept while named, because a member's state
// comes from them (judged again without its certificate it would be
// pending, then fetch it). A refusal for a certificate not valid yet is
// dropped when it becomes valid, and the members naming it judged again.
func (ms *membership) pruneCertsLocked(force bool) {
	named := make(map[[32]byte]bool, len(ms.members))
	for _, m := range ms.members {
		if m.advert != nil {
			named[m.advert.CertHash] = true
		}
	}
	now := ms.now()
	for sum, c := range ms.certs {
		if !named[sum] && now.After(c.NotAfter.Add(refusedKept)) {
			delete(ms.certs, sum)
		}
	}
	var retry map[[32]byte]bool
	for sum, rc := range ms.badCert {
		switch {
		case !rc.retryAt.IsZero() && !now.Before(rc.retryAt):
			if retry == nil {
				retry = map[[32]byte]bool{}
			}
			retry[sum] = true
			delete(ms.badCert, sum)
		case named[sum]:
		case !force && now.Before(rc.keepUntil):
		default:
			delete(ms.badCert, sum)
		}
	}
	// A stranger refused for a certificate that is valid now was never
	// in memberlist: its next alive message is judged afresh. (Members
	// are judged again by refresh, which takes a refusal whose time has
	// come for none.)
	for name, m := range ms.members {
		if m.stranger && m.advert != nil && retry[m.advert.CertHash] {
			ms.dropLocked(name)
		}
	}
}

// addCerts learns a batch of certificates (a join's bundle) under one
// lock, judging each waiting member once.
func (ms *membership) addCerts(ders [][]byte) {
	type checked struct {
		sum  [32]byte
		der  []byte
		cert *x509.Certificate
		err  error
	}
	var todo []checked
	ms.mu.Lock()
	trust, now := ms.trust, ms.now()
	seen := make(map[[32]byte]bool, len(ders))
	for _, der := range ders {
		sum := sha256.Sum256(der)
		if _, ok := ms.certs[sum]; ok || seen[sum] || ms.refusedLocked(sum) != nil {
			continue
		}
		seen[sum] = true
		todo = append(todo, checked{sum: sum, der: der})
	}
	ms.mu.Unlock()
	// Verified without the lock, which memberlist waits on in NotifyAlive
	// (under its own node lock): a join brings every certificate its seed
	// holds, a signature check each.
	for i := range todo {
		todo[i].cert, todo[i].err = ms.checkCert(trust, todo[i].der, now)
	}
	ms.mu.Lock()
	added := map[[32]byte]bool{}
	for _, c := range todo {
		if _, ok := ms.certs[c.sum]; ok {
			continue // learned meanwhile
		}
		if ms.trust != trust {
			// A new CRL or CA meanwhile: judged by what is in force.
			ms.learnCertLocked(c.sum, c.der)
		} else {
			ms.fileCertLocked(c.sum, c.cert, c.err)
		}
		added[c.sum] = true
	}
	if len(added) > 0 {
		for _, m := range ms.members {
			if m.advert != nil && added[m.advert.CertHash] {
				ms.judgeLocked(m)
			}
		}
	}
	ms.mu.Unlock()
	if len(added) > 0 {
		ms.changed()
	}
}

// certificates returns up to max certificates of verified members (DER).
func (ms *membership) certificates(max int) [][]byte {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	out := make([][]byte, 0, min(max, len(ms.members)))
	for _, m := range ms.members {
		if len(out) == max {
			break
		}
		if m.state == StateVerified {
			out = append(out, m.verified.Cert.Raw)
		}
	}
	return out
}

// pending lists the members waiting for their certificate (a renewed one
// included).
func (ms *membership) pending() []string {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	var out []string
	for _, m := range ms.members {
		if m.state == StatePending || m.renewing {
			out = append(out, m.name)
		}
	}
	return out
}

// verified returns the verified identity of a member, or nil if it is
// not verified now.
func (ms *membership) verified(name string) *certs.Verified {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if m := ms.members[name]; m != nil && m.state == StateVerified {
		return m.verified
	}
	return nil
}

// addr is where gossip last saw a member.
func (ms *membership) addr(name string) netip.AddrPort {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if m := ms.members[name]; m != nil {
		return m.gossip
	}
	return netip.AddrPort{}
}

// setTrust swaps the trust bundle (a newer CRL) and judges everyone again,
// so a revoked gateway drops out of every configuration.
func (ms *membership) setTrust(tb *certs.TrustBundle) {
	ms.warm(tb)
	ms.mu.Lock()
	if ms.trust == nil || newCA(ms.trust, tb) {
		// Certificates of a CA just trusted (an issuer rotated, and a
		// gateway renewed onto the new CA before this one read it)
		// are fetched and judged again.
		for sum, rc := range ms.badCert {
			if certs.ReasonOf(rc.err) == certs.ReasonUnknownCA {
				delete(ms.badCert, sum)
			}
		}
	}
	ms.trust = tb
	for sum, c := range ms.certs {
		// An expired certificate stays known (its adverts are refused
		// as expired all the same) until pruneCertsLocked drops it:
		// that is how a forgotten member's echoes are told apart.
		if _, err := ms.cache.VerifyCertificate(tb, c, ms.now()); err != nil && certs.ReasonOf(err) != certs.ReasonExpired {
			delete(ms.certs, sum)
			ms.badCert[sum] = refusal(c, err)
		}
	}
	ms.adopting = true
	ms.rejudgeLocked()
	ms.adopting = false
	ms.forgetEndedLocked()
	ms.cache.Retain(tb.Key())
	ms.mu.Unlock()
	ms.changed()
}

// newCA reports whether next trusts a CA that cur does not.
func newCA(cur, next *certs.TrustBundle) bool {
	for _, c := range next.CAs() {
		if !slices.ContainsFunc(cur.CAs(), func(o *x509.Certificate) bool { return bytes.Equal(o.Raw, c.Raw) }) {
			return true
		}
	}
	return false
}

// warm verifies, outside the lock, the certificates and adverts setTrust
// is about to judge again under tb, so that under the lock they are cache
// hits. A new revocation list changes every cache key: verified under the
// lock, a mesh of 2,300 members held it for about 1.6 s, and memberlist's
// callbacks, which need it, stalled memberlist as long at every burst's
// end. Whatever changes meanwhile is judged under the lock as before.
func (ms *membership) warm(tb *certs.TrustBundle) {
	type item struct {
		advert []byte // nil: the certificate alone
		cert   *x509.Certificate
	}
	ms.mu.Lock()
	work := make([]item, 0, len(ms.certs))
	named := map[[32]byte]bool{}
	for _, m := range ms.members {
		if m.advert == nil {
			continue
		}
		if c := ms.certs[m.advert.CertHash]; c != nil {
			// Verifying the advert caches its certificate's verdict too.
			work = append(work, item{advert: m.meta, cert: c})
			named[m.advert.CertHash] = true
		}
	}
	for sum, c := range ms.certs {
		if !named[sum] {
			work = append(work, item{cert: c})
		}
	}
	now := ms.now()
	ms.mu.Unlock()
	for _, w := range work {
		if w.advert == nil {
			ms.cache.VerifyCertificate(tb, w.cert, now)
		} else {
			ms.cache.VerifyAdvert(w.advert, w.cert, tb, now, nil)
		}
	}
}

// forgetEndedLocked drops members that are gone and whose last verified
// certificate has been revoked, or expired a while ago (retiredAt): a
// burst gateway after its burst, a decommissioned gateway after
// revocation. They cannot come back with that identity, so nothing of
// them is kept, saved or knocked on.
// Gone members that were refused, or never verified at all, are dropped
// refusedKept after their last change of state.
func (ms *membership) forgetEndedLocked() (forgot bool) {
	now := ms.now()
	for _, m := range ms.members {
		forgot = ms.forgetIfEndedLocked(m, now) || forgot
	}
	return forgot
}

// forgetIfEndedLocked is forgetEndedLocked for one member.
func (ms *membership) forgetIfEndedLocked(m *member, now time.Time) (forgot bool) {
	if m.alive {
		return false
	}
	// One refused only because its certificate ran out while it was
	// still here (its site cut off from its issuer, say), or while
	// restored and not heard from yet, is a gone gateway like one that
	// died first: retired as below.
	expired := m.state == StateRefused && m.lastVerified != nil && m.advert != nil &&
		!now.Before(m.lastVerified.Cert.NotAfter) && m.advert.CertHash == sha256.Sum256(m.lastVerified.Cert.Raw)
	if m.remembered && expired {
		m.remembered = false
		ms.gen.Add(1)
		forgot = true
	}
	if m.remembered {
		// Restored at start and not heard from since: gossip may never
		// report it (a burst gateway gone while we restarted), so it
		// goes once its certificate is revoked — its refusal then — or
		// it would be kept, and knocked on, for good.
		if m.state == StateRefused {
			ms.dropLocked(m.name)
			return true
		}
		// Nor is it a peer for good: memberlist takes no news of the
		// death of a node it never saw, so one that went down while we
		// were down would be verified, its site reported reachable,
		// until its certificate ended.
		if now.Sub(m.changed) >= rememberedFor {
			m.remembered, m.reason = false, ""
			ms.judgeLocked(m)
			m.reason = "not heard from since the restart"
			ms.gen.Add(1)
			forgot = true
		}
		return forgot
	}
	if (m.state == StateRefused && !expired || m.lastVerified == nil) && now.Sub(m.changed) >= refusedKept {
		// Refused, or never a peer: listed a while (status says why),
		// but not for ever.
		ms.dropLocked(m.name)
		return true
	}
	if m.lastVerified == nil {
		return forgot
	}
	if !now.Before(retiredAt(m.lastVerified)) || ms.trust.IsRevoked(m.lastVerified.Cert.SerialNumber) {
		ms.dropLocked(m.name)
		forgot = true
	}
	return forgot
}

// expiredKept is how long a gone gateway is remembered once its
// certificate has expired. Certificates of Vault's are a day long and
// renewed by the gateway itself: a site down for longer (a data centre
// lost) would otherwise be forgotten within a day, its alert cleared and
// its held routes freed, its traffic sent by the host's other routes.
// Retire a gateway sooner by revoking its certificate.
const expiredKept = 7 * 24 * time.Hour

// retiredAt is when a gone gateway is forgotten, its certificate revoked
// or not: a week after its certificate expired, or then for a burst
// gateway's, which lasts exactly its burst.
func retiredAt(v *certs.Verified) time.Time {
	if v.Attributes != nil && v.Attributes.IsBurst() {
		return v.Cert.NotAfter
	}
	return v.Cert.NotAfter.Add(expiredKept)
}

// refusedKept is how long a gone member that was refused (or never got
// as far as verified) stays listed; otherwise every name an impostor
// ever tried would be kept for good.
const refusedKept = time.Hour

// rejudgeLocked judges every member again, in the order of their standing
// (wins), so that each meets the claimants that rank above it first.
func (ms *membership) rejudgeLocked() (changed bool) {
	type was struct {
		state  MemberState
		v      *certs.Verified
		reason string
	}
	prev := make(map[*member]was, len(ms.members))
	all := make([]*member, 0, len(ms.members))
	for _, m := range ms.members {
		prev[m] = was{m.state, m.verified, m.reason}
		// Cleared so that no claim of its own stands in the way of the
		// others' judgement.
		m.verified, m.state = nil, ""
		all = append(all, m)
	}
	// By standing (wins: proof, then age, then name): each member meets
	// only claimants that rank above it, as when adverts arrive one by
	// one in that order. In name order a member could be refused by a
	// rival that a better one refuses in turn, and stay refused while
	// that rival is.
	rankOf := func(m *member) (rank, bool) {
		if v := prev[m].v; m.renewing && v != nil {
			return rank{proven(v), v.Cert.NotBefore, m.name}, true // judged on the certificate it renews meanwhile
		}
		if m.advert != nil {
			if c := ms.certs[m.advert.CertHash]; c != nil {
				return rank{!m.advert.WireGuardKeyProof.IsZero(), c.NotBefore, m.name}, true
			}
		}
		return rank{name: m.name}, false
	}
	slices.SortFunc(all, func(a, b *member) int {
		ra, ka := rankOf(a)
		rb, kb := rankOf(b)
		if ka != kb {
			return cmp.Compare(b2i(kb), b2i(ka)) // certificate unknown: last
		}
		return ra.compare(rb)
	})
	for _, m := range all {
		p := prev[m]
		// Judged against its state before clearing (restored for its
		// own judgement only): the same state again is not news (a
		// refusal counted and logged every pass).
		m.state = p.state
		if m.renewing { // the advert it stands on meanwhile
			m.verified = p.v
		}
		ms.judgeLocked(m)
		// The advert is the same bytes as before, so two verifications
		// of it hold the same claims.
		if p.state != m.state || (p.v == nil) != (m.verified == nil) || p.reason != m.reason {
			changed = true
		}
	}
	return changed
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// refresh re-judges everyone at the current time (expiry).
func (ms *membership) refresh() {
	ms.mu.Lock()
	now := ms.now()
	for _, m := range ms.members {
		ms.stayedRevokedLocked(m, now)
	}
	for name, w := range ms.wentRevoked {
		if now.Sub(w.at) > refusedKept {
			delete(ms.wentRevoked, name)
		}
	}
	changed := ms.rejudgeLocked()
	changed = ms.forgetEndedLocked() || changed
	ms.pruneCertsLocked(false)
	ms.badCertFull = false
	ms.mu.Unlock()
	// Re-judging finds nothing new almost always; a change (an expiry)
	// is what makes the topology worth recomputing.
	if changed {
		ms.changed()
	}
}

// remember restores a member from the state directory: a gateway that
// restarts during a partition keeps its tunnels to the members it last
// verified until gossip says otherwise.
func (ms *membership) remember(name string, gossip netip.AddrPort, meta, certDER []byte) error {
	if name == ms.self {
		return nil
	}
	if err := ms.addCert(certDER); err != nil {
		return err
	}
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if _, known := ms.members[name]; known {
		return nil
	}
	m := &member{name: name, gossip: gossip, meta: meta, remembered: true}
	ms.addLocked(m)
	ms.gen.Add(1)
	ms.judgeLocked(m)
	if m.state != StateVerified {
		ms.dropLocked(name)
		return errors.New(m.reason)
	}
	return nil
}

// rememberDead restores a member that was dead at the last save: it is
// not a peer, but the gateway keeps knocking on its address. certDER is
// its last verified certificate, if saved: a member retired since (its
// certificate revoked, or expired a while ago: retiredAt) is not
// restored, and one restored is forgotten when that happens later. One
// saved without a certificate is forgotten refusedKept after the restart
// unless it comes back.
func (ms *membership) rememberDead(name string, gossip netip.AddrPort, certDER []byte, left bool) {
	ms.rememberGone(name, gossip, nil, certDER, left)
}

// rememberGone is rememberDead with the advert verified last from the
// member, if saved (by releases since they were): it is what an advert
// must be newer than to be taken, and where it was verified is where the
// member's name stays bound (boundLocked). Without it, after a restart,
// any advert the gateway ever signed would be taken again, at any address.
func (ms *membership) rememberGone(name string, gossip netip.AddrPort, meta, certDER []byte, left bool) {
	if name == ms.self || !gossip.IsValid() {
		return
	}
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if _, known := ms.members[name]; known {
		return
	}
	m := &member{name: name, gossip: gossip, state: StateDead, reason: "dead at the last save", changed: ms.now(), left: left}
	if left {
		m.reason = "left the mesh"
	}
	if c, err := x509.ParseCertificate(certDER); err == nil {
		if a, err := certs.AttributesOf(c); err == nil {
			m.lastVerified = &certs.Verified{Cert: c, Attributes: a}
		}
	}
	if sa, err := certs.DecodeAdvert(meta); err == nil && sa.Node == name {
		seen := sa.Seen()
		m.seen = &seen
		m.verifiedAt, m.verifiedMeta = gossip, meta
		if m.lastVerified != nil { // its leave notice must not be older either
			m.lastVerified.Seen = *m.seen
		}
	}
	ms.addLocked(m)
	ms.forgetIfEndedLocked(m, ms.now())
	ms.gen.Add(1)
}

// MemberView is a read-only copy of a member for status and persistence.
type MemberView struct {
	Name       string
	Gossip     netip.AddrPort
	State      MemberState
	Reason     string
	Remembered bool
	Meta       []byte
	Verified   *certs.Verified
	// VerifiedMeta is Verified's advert as gossiped (Meta may be a newer
	// one, of a member renewing its certificate).
	VerifiedMeta []byte
	Advert       *certs.Advert
	Since        time.Time
	Left         bool   // left on purpose, not declared dead
	Alive        bool   // gossip counts it alive now
	CertSite     string // the site a verified certificate gave it ("" if never verified)
	LastCert     []byte // its last verified certificate (DER), kept after it died
	LastMeta     []byte // its advert verified last, as gossiped, kept after it died
}

// snapshot copies the members, sorted by name.
func (ms *membership) snapshot() []MemberView {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	out := make([]MemberView, 0, len(ms.members))
	for _, m := range ms.members {
		v := MemberView{Name: m.name, Gossip: m.gossip, State: m.state, Reason: m.reason, Remembered: m.remembered, Meta: m.meta, Verified: m.verified, Since: m.changed, Left: m.left, Alive: m.alive}
		if m.verified != nil {
			v.VerifiedMeta = m.verifiedMeta
		}
		if m.lastVerified != nil { // only a certificate names a site
			v.CertSite, v.LastCert, v.LastMeta = m.lastVerified.Attributes.Site, m.lastVerified.Cert.Raw, m.verifiedMeta
		}
		if m.advert != nil {
			a := m.advert.Advert
			v.Advert = &a
		}
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b MemberView) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// gateways returns the verified members as topology input, sorted by
// name. The slice is shared until the membership changes: callers must
// not modify it (appending copies: its capacity is its length). The
// reconciler, the health prober and the dashboard each ask for it after
// every change, and in a large mesh building it was a tenth of a
// reconcile.
func (ms *membership) gateways() []Node {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	gen := ms.gen.Load()
	if ms.gw != nil && ms.gwGen == gen {
		return ms.gw
	}
	out := make([]Node, 0, len(ms.members))
	for _, m := range ms.members {
		if m.state == StateVerified {
			out = append(out, Node{Attributes: m.verified.Attributes, Advert: m.verified.Advert, Gossip: m.gossip})
		}
	}
	slices.SortFunc(out, func(a, b Node) int { return cmp.Compare(a.node(), b.node()) })
	ms.gw, ms.gwGen = slices.Clip(out), gen
	return ms.gw
}

// away returns the gateways that are not up (dead, left, or alive but not
// verified again yet: a certificate being fetched, a claim refused) whose
// last verified certificate still stands: it verifies against the trust
// in force, is not revoked, and expired less than expiredKept ago (a
// burst gateway's: not expired). Their sites' routes are held
// (holdRoutes), so that traffic to a site whose gateways are away is refused
// rather than sent by the host's other routes, outside the mesh, in clear.
// One restored from the state directory has no advert, only its
// certificate, which was not checked against any trust when it was read.
func (ms *membership) away() []AwayGateway {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	now := ms.now()
	var out []AwayGateway
	for _, m := range ms.members {
		v := m.lastVerified
		if m.state == StateVerified || v == nil || !now.Before(retiredAt(v)) {
			continue
		}
		// Expired, but not for long: checked as it stood at its end.
		at := now
		if !now.Before(v.Cert.NotAfter) {
			at = v.Cert.NotAfter.Add(-time.Second)
		}
		if _, err := ms.cache.VerifyCertificate(ms.trust, v.Cert, at); err != nil {
			continue
		}
		out = append(out, AwayGateway{Node: Node{Attributes: v.Attributes, Advert: v.Advert}, Gossip: m.gossip.Addr()})
	}
	slices.SortFunc(out, func(a, b AwayGateway) int { return cmp.Compare(a.node(), b.node()) })
	return out
}

// everVerified reports whether name is a member that was verified, now
// or before it was refused (revoked, expired) or died: one that may need
// the revocation list to learn it must leave. A stranger gossip merely
// named, with an address of the sender's choosing, never was.
func (ms *membership) everVerified(name string) bool {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	m := ms.members[name]
	return m != nil && m.lastVerified != nil
}
