package mesh

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/policy"
)

// certRetry is how long the worker waits before asking a member for its
// certificate again.
const certRetry = 3 * time.Second

// certAskedPrune is how many certificate asks the worker remembers before
// it forgets those past certRetry.
const certAskedPrune = 4096

// worker handles gossip messages and certificate fetches one at a time,
// off memberlist's goroutines.
func (g *Gateway) worker(ctx context.Context) {
	var turn queueTurn
	for {
		b, name, ok := g.next(ctx, &turn)
		switch {
		case !ok:
			return
		case b != nil:
			if err := g.handle(b); err != nil {
				g.log.Debug("ignoring gossip message", "err", err)
			}
			g.inboxBytes.Add(-int64(len(b)))
		default:
			g.askCert(name)
		}
	}
}

const (
	// bulkEvery is how many quick messages and fetches the worker takes
	// at most before a blob waiting, and bulkWait how long one waits at
	// most (as the worker sees it) while quick ones keep coming.
	bulkEvery = 8
	bulkWait  = 100 * time.Millisecond
)

// queueTurn is the worker's count for next: quick messages taken since
// the last blob, and since when one has been waiting.
type queueTurn struct {
	quick   int
	waiting time.Time
}

// next is the worker's next gossip message, or else the next member whose
// certificate to ask for; ok is false once ctx ends. The quick messages
// (certificates and their requests, announcements, keyring steps and
// acknowledgements, leave notices) come before blobs: a blob costs a
// parse and a signature check of up to a megabyte, and anyone holding the
// gossip key can send them by the thousand. But not always: a steady
// stream of quick ones (as many as the gossip key's holder likes) would
// keep revocation lists and policies out for good, so a blob waiting is
// taken after bulkEvery quick ones, or once it has waited bulkWait.
func (g *Gateway) next(ctx context.Context, turn *queueTurn) (b []byte, name string, ok bool) {
	if len(g.bulk) > 0 {
		now := time.Now()
		if turn.waiting.IsZero() {
			turn.waiting = now
		}
		if turn.quick >= bulkEvery || now.Sub(turn.waiting) >= bulkWait {
			select {
			case b := <-g.bulk:
				*turn = queueTurn{}
				return b, "", true
			default:
			}
		}
	}
	select {
	case b := <-g.inbox:
		turn.quick++
		return b, "", true
	case name := <-g.fetch:
		turn.quick++
		return nil, name, true
	default:
	}
	select {
	case <-ctx.Done():
		return nil, "", false
	case b := <-g.inbox:
		turn.quick++
		return b, "", true
	case b := <-g.bulk:
		*turn = queueTurn{}
		return b, "", true
	case name := <-g.fetch:
		turn.quick++
		return nil, name, true
	}
}

const (
	// maxInboxBytes bounds what the worker's queues hold: a count alone
	// let anyone holding the gossip key queue inboxSize messages of
	// maxUserMessage each, some 8 GiB.
	maxInboxBytes = 64 << 20
	// inboxQuickReserve is the part of maxInboxBytes only quick messages
	// may take, so that blobs cannot keep them out.
	inboxQuickReserve = 16 << 20
	// maxQuickMsg is the largest quick message: a certificate request
	// with the largest certificate taken (maxCertSize) and its framing.
	maxQuickMsg = maxCertSize + 1<<10
)

// enqueue hands a gossip message to the worker: a blob, or any message
// larger than a quick one, to the bulk queue; past the queues' bounds it
// is dropped, and said once a second with a count.
func (g *Gateway) enqueue(msg []byte) {
	queue, limit := g.inbox, int64(maxInboxBytes)
	if len(msg) > maxQuickMsg || len(msg) > 0 && msg[0] == msgBlob {
		queue, limit = g.bulk, maxInboxBytes-inboxQuickReserve
	}
	n := int64(len(msg))
	if g.inboxBytes.Add(n) <= limit {
		select {
		case queue <- msg:
			return
		default:
		}
	}
	g.inboxBytes.Add(-n)
	if ok, dropped := g.warnInbox.Allow(); ok {
		g.log.Warn("gossip inbox full; dropping messages (anti-entropy will repair them)", "dropped_unlogged", dropped)
	}
}

// blobPace is how often the worker asks one member for a blob of one
// kind, and answers one member's requests of one kind.
const blobPace = time.Second

// paced runs send for key now if it last ran blobPace ago or more, else
// once when it has: what comes meanwhile is folded into that one, never
// dropped. An announcement or a request names its member in its own
// words (the gossip key is all it takes to send one), so dropping would
// let a stream of forged ones keep a member from being asked, or
// answered, at all; folding bounds what they draw to one send a second.
// send runs on a timer's goroutine when it is put off, so it may only
// send. seen (the worker's) is pruned like certAsked.
func paced(seen map[string]time.Time, key string, send func()) {
	now := time.Now()
	next, ok := seen[key]
	switch {
	case ok && next.After(now):
		return // a send is put off to then: it covers this one
	case ok && now.Sub(next) < blobPace:
		at := next.Add(blobPace)
		seen[key] = at
		time.AfterFunc(at.Sub(now), send)
		return
	}
	if len(seen) >= certAskedPrune {
		for k, t := range seen {
			if now.Sub(t) >= blobPace {
				delete(seen, k)
			}
		}
	}
	seen[key] = now
	send()
}

// forgetCertAsks forgets the asks whose retry time has passed: names
// come and go (every burst gateway's is new), and that is all but a few.
func (g *Gateway) forgetCertAsks() {
	for n, t := range g.certAsked {
		if time.Since(t) >= certRetry {
			delete(g.certAsked, n)
		}
	}
}

// askCert asks a member for its certificate, sending ours: at most once
// per certRetry.
func (g *Gateway) askCert(name string) {
	if t, ok := g.certAsked[name]; ok && time.Since(t) < certRetry {
		return
	}
	if len(g.certAsked) >= certAskedPrune {
		g.forgetCertAsks()
	}
	g.certAsked[name] = time.Now()
	me := g.id.Load()
	g.sendAsync(name, netip.AddrPort{}, encodeMessage(msgCertRequest, []byte(me.Attributes().Node), me.Certificate().Raw, g.gossipAddr()))
}

func (g *Gateway) handle(b []byte) error {
	m, err := decodeMessage(b, maxFields)
	if err != nil {
		return err
	}
	me := g.id.Load()
	switch m.typ {
	case msgCertRequest:
		if err := m.want(3); err != nil {
			return err
		}
		name := string(m.fields[0])
		if err := g.members.addCert(m.fields[1]); err != nil {
			g.log.Debug("refused a certificate", "peer", name, "err", err)
			return nil
		}
		// Only a request that carries a valid certificate of the gateway
		// it names is answered, and at the address gossip knows for it;
		// at the address the request gives only for a gateway gossip
		// has not told us of yet (a newcomer asks before that). The
		// gossip key alone must not make us send to any address it
		// likes — though certificates are no secret, so someone holding
		// it and a certificate of a gateway we do not know yet still can,
		// once; closing that needs the request signed, which the protocol
		// does not have.
		if c, err := x509.ParseCertificate(m.fields[1]); err != nil {
			return err
		} else if a, err := certs.AttributesOf(c); err != nil || a.Node != name {
			return fmt.Errorf("certificate request from %q with another gateway's certificate", name)
		}
		at := g.members.addr(name)
		if !at.IsValid() {
			at = addrField(m.fields[2])
		}
		g.sendAsync(name, at, encodeMessage(msgCert, me.Certificate().Raw))
		return nil

	case msgCert:
		if err := m.want(1); err != nil {
			return err
		}
		if err := g.members.addCert(m.fields[0]); err != nil {
			g.log.Info("refused a gateway certificate", "err", err)
		}
		return nil

	case msgAnnounce:
		if err := m.want(3); err != nil {
			return err
		}
		kind, from := m.fields[0], string(m.fields[2])
		v, err := readU64(m.fields[1])
		if err != nil || len(kind) != 1 {
			return fmt.Errorf("bad announcement")
		}
		// Only verified members are asked (a newcomer gets the blobs with
		// its join): a name of the announcement's choosing would
		// otherwise grow the worker's records without end.
		if wantBlob(kind[0], v, g.blobVersion(kind[0]), len(g.trust.Load().CAs())) && from != me.Attributes().Node && g.members.verified(from) != nil {
			ask := encodeMessage(msgBlobRequest, kind, []byte(me.Attributes().Node), g.gossipAddr())
			paced(g.blobAsked, from+"\x00"+string(kind), func() {
				if !g.leaving.Load() { // put off, it may come after the stop
					g.sendAsync(from, netip.AddrPort{}, ask)
				}
			})
		}
		return nil

	case msgBlobRequest:
		if err := m.want(3); err != nil || len(m.fields[0]) != 1 {
			return fmt.Errorf("bad blob request")
		}
		kind := m.fields[0][0]
		if g.blob(kind) == nil {
			return nil
		}
		// At the address gossip knows for the member (the request's own
		// is ignored, so the gossip key alone cannot aim our streams),
		// and only to a verified member — but the revocation list to any
		// member gossip knows: it is public, and a member it revokes (a
		// burst gateway at burst down) must get it to learn that it has
		// to leave. A newcomer gets the blobs with its join's state
		// exchange anyway.
		// The requester's name is the request's word only, so answers
		// are paced per requester and kind: a stream of requests naming
		// a member, or of announcements that make members ask, draws at
		// most one blob a second per member and kind, not one each —
		// the blob held when it goes.
		name := string(m.fields[1])
		if kind == blobCRL && !g.members.everVerified(name) || kind != blobCRL && g.members.verified(name) == nil {
			return fmt.Errorf("blob request from %q, which is not a verified member", name)
		}
		paced(g.blobAnswered, name+"\x00"+string(kind), func() {
			if blob := g.blob(kind); blob != nil && !g.leaving.Load() {
				g.sendAsync(name, netip.AddrPort{}, blob)
			}
		})
		return nil

	case msgBlob:
		if err := m.want(2); err != nil || len(m.fields[0]) != 1 {
			return fmt.Errorf("bad blob")
		}
		switch m.fields[0][0] {
		case blobCRL:
			trust := g.trust.Load()
			der, skip := g.listKnown(trust, m.fields[1])
			if skip {
				return nil
			}
			if err := signedByTrustedCA(trust, der); err != nil {
				return err
			}
			crl, err := parseCRL(der)
			if err != nil {
				return err
			}
			// A list of no CA trusted here is said; one no newer than
			// held is passed over by adoptLists.
			if !trust.SignedByCA(crl) {
				return errNotOurCAs
			}
			// So is a delta, which adoptLists would pass over without
			// a word: said here, and not parsed again while it comes.
			if err := certs.CheckCompleteCRL(crl); err != nil {
				g.listsPassed(trust, der)
				return err
			}
			if !g.adoptLists([]*x509.RevocationList{crl}) {
				g.listsPassed(trust, der)
			}
		case blobCRLs:
			return g.takeCRLs(m.fields[1])
		case blobPolicy:
			parts, err := unbundle(m.fields[1])
			if err != nil || len(parts) != 2 {
				return fmt.Errorf("bad policy blob")
			}
			// The policy in force, byte for byte: nothing to verify.
			if cur := g.policy.Load(); cur != nil && bytes.Equal(cur.src, parts[0]) && bytes.Equal(cur.sig, parts[1]) {
				return nil
			}
			_, err = g.AdoptPolicy(parts[0], parts[1])
			return err
		}
		return nil

	case msgLeaving:
		return g.handleLeaving(m)
	case msgWGKeyAck:
		return g.handleWGKeyAck(m)
	case msgKeyringOp:
		return g.handleKeyringOp(m)
	case msgKeyringAck, msgKeyringRefused:
		return g.handleKeyringAck(m)
	}
	return fmt.Errorf("unknown message type %d", m.typ)
}

// wantBlob reports whether a blob announced at version v is worth asking
// for, holding version have and trusting cas CAs. A CRL version is a sum
// over CAs, which falls when one is retired and can be the same for
// different lists: a gateway that trusts several asks for any other
// version (taking lists is idempotent). With one CA, only a higher one
// can bring it a newer list. A policy's version only grows.
func wantBlob(kind byte, v, have uint64, cas int) bool {
	return v > have || kind == blobCRL && cas > 1 && v != have
}

// blobVersion is the version of what we hold: the CRL number, the policy
// version.
func (g *Gateway) blobVersion(kind byte) uint64 {
	switch kind {
	case blobCRL:
		return g.trust.Load().CRLVersion()
	case blobPolicy:
		if p := g.policy.Load(); p != nil {
			return uint64(p.p.Revision().Version)
		}
	}
	return 0
}

// blob is our copy of a blob, as a msgBlob message, or nil.
func (g *Gateway) blob(kind byte) []byte {
	switch kind {
	case blobCRL:
		// Several lists (an issuer rotated) go as one blob of another
		// kind, which gateways from before rotation ignore.
		switch crls := g.trust.Load().CRLs(); len(crls) {
		case 0:
		case 1:
			return encodeMessage(msgBlob, []byte{blobCRL}, crls[0].Raw)
		default:
			raws := make([][]byte, len(crls))
			for i, c := range crls {
				raws[i] = c.Raw
			}
			return encodeMessage(msgBlob, []byte{blobCRLs}, bundle(raws...))
		}
	case blobPolicy:
		if p := g.policy.Load(); p != nil {
			return encodeMessage(msgBlob, []byte{blobPolicy}, bundle(p.src, p.sig))
		}
	}
	return nil
}

// takeCRLs adopts the lists of a blobCRLs that are newer than those in
// force. A list of a CA this gateway does not trust (yet: the issuer's new
// CA, before its next refresh) is passed over; trust in a CA comes from
// the issuer, never from gossip.
func (g *Gateway) takeCRLs(b []byte) error {
	raws, err := unbundle(b)
	if err != nil { // at most maxBundleParts lists: a mesh has two while an issuer is rotated
		return fmt.Errorf("bad revocation lists blob: %w", err)
	}
	trust := g.trust.Load()
	crls := make([]*x509.RevocationList, 0, len(raws))
	var ders [][]byte
	var partial error
	for _, raw := range raws {
		der, skip := g.listKnown(trust, raw)
		if skip || signedByTrustedCA(trust, der) != nil {
			continue // passed over unparsed, as adoptLists would once parsed
		}
		crl, err := parseCRL(der)
		if err != nil {
			return err
		}
		if err := certs.CheckCompleteCRL(crl); err != nil {
			g.listsPassed(trust, der) // the other lists may still be taken
			partial = err
			continue
		}
		crls = append(crls, crl)
		ders = append(ders, der)
	}
	if len(crls) > 0 && !g.adoptLists(crls) {
		g.listsPassed(trust, ders...)
	}
	return partial
}

// parseCRL is certs.ParseCRL; tests count the lists parsed through it.
var parseCRL = certs.ParseCRL

// listKnown reports whether a revocation list from gossip is one held
// under trust, or one passed over under it lately, and so need not be
// checked and parsed again; der is the list as DER. Every state exchange
// carries the lists in force, and anyone holding the gossip key can send
// a genuine list, held or older, again and again, and in another framing
// than the held bytes (PEM, or beside a junk part in a blobCRLs): each
// passed the signature check and cost a full parse, some 50 ms for a
// megabyte. A list is compared with those held byte for byte, and with
// those passed over by its SHA-256.
func (g *Gateway) listKnown(trust *certs.TrustBundle, raw []byte) (der []byte, known bool) {
	der = raw
	if blk, _ := pem.Decode(raw); blk != nil {
		der = blk.Bytes
	}
	if slices.ContainsFunc(trust.CRLs(), func(c *x509.RevocationList) bool { return bytes.Equal(c.Raw, der) }) {
		return der, true
	}
	return der, g.members != nil && g.members.lists.known(trust, sha256.Sum256(der))
}

// listsPassed remembers lists that adoptLists passed over under trust.
func (g *Gateway) listsPassed(trust *certs.TrustBundle, ders ...[]byte) {
	if g.members == nil {
		return
	}
	for _, der := range ders {
		g.members.lists.add(trust, sha256.Sum256(der))
	}
}

// maxPassedLists is how many lists passedLists remembers: a mesh has one
// list per CA, two while an issuer is rotated, and a replay is of one of
// a few recent ones.
const maxPassedLists = 16

// passedLists are the SHA-256 of revocation lists from gossip that
// changed nothing under one trust bundle (older than those held): what
// trust becomes next (a newer list, a CA added or retired) may want them,
// so they are forgotten with it. The oldest goes first past
// maxPassedLists.
type passedLists struct {
	mu    sync.Mutex
	trust *certs.TrustBundle
	sums  [][32]byte
}

func (p *passedLists) known(trust *certs.TrustBundle, sum [32]byte) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.trust == trust && slices.Contains(p.sums, sum)
}

func (p *passedLists) add(trust *certs.TrustBundle, sum [32]byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.trust != trust {
		p.trust, p.sums = trust, nil
	}
	if slices.Contains(p.sums, sum) {
		return
	}
	if len(p.sums) >= maxPassedLists {
		p.sums = slices.Delete(p.sums, 0, 1)
	}
	p.sums = append(p.sums, sum)
}

// announce tells the mesh (by gossip broadcast) that we hold a version of
// a blob; members with an older one ask us for it.
func (g *Gateway) announce(kind byte, version uint64, _ []byte) {
	if g.queue == nil {
		return
	}
	msg := encodeMessage(msgAnnounce, []byte{kind}, u64(version), []byte(g.id.Load().Attributes().Node))
	g.queue.QueueBroadcast(broadcast{name: fmt.Sprintf("announce/%d", kind), msg: msg})
}

// localState is our push/pull state: certificate, CRL, policy. Answering
// a newcomer's join, it also carries every certificate we hold, so the
// newcomer can verify the whole mesh at once instead of asking each member.
func (g *Gateway) localState(join bool) []byte {
	me := g.id.Load()
	parts := [][]byte{encodeMessage(msgCert, me.Certificate().Raw)}
	if join {
		parts = append(parts, certParts(g.members.certificates(maxJoinCerts))...)
	}
	if b := g.blob(blobCRL); b != nil {
		parts = append(parts, b)
	}
	if b := g.blob(blobPolicy); b != nil {
		parts = append(parts, b)
	}
	return bundle(parts...)
}

// certParts packs certificates into msgCerts messages that each fit a
// bundle's part, at most maxJoinCertParts of them (beside our
// certificate, the CRL and the policy). A part over a field's bound made
// the receiver drop the whole state, ours and the lists included: past
// about 1,300 members' certificates, at some 800 bytes each. What does not
// fit the newcomer asks the members for, one by one.
func certParts(certs [][]byte) [][]byte {
	var parts [][]byte
	for len(certs) > 0 && len(parts) < maxJoinCertParts {
		n, size := 0, 1
		for n < len(certs) && size+binary.MaxVarintLen32+len(certs[n]) <= maxMessageField {
			size += binary.MaxVarintLen32 + len(certs[n])
			n++
		}
		if n == 0 {
			certs = certs[1:] // one that fits no part (a certificate is a few KiB)
			continue
		}
		parts = append(parts, encodeMessage(msgCerts, certs[:n]...))
		certs = certs[n:]
	}
	return parts
}

// loadPolicies adopts the newest correctly signed policy among the one
// adopted in the last run (state directory) and the one the configuration
// names. The one adopted last run unreadable is an error: running on would
// mean an older policy, or none (every verified gateway linked), in
// silence.
func (g *Gateway) loadPolicies() error {
	w, err := g.state.loadWithdrawn()
	if err != nil {
		return fmt.Errorf("the residency policy withdrawn in an earlier run (state directory %s): %w; restore it from a backup (moved aside, an older policy withdrawn then may be adopted again)", g.s.StateDir, err)
	}
	g.withdrawn = w
	var untrusted *adoptedPolicy // the stored policy, if only its signer is no longer trusted
	var untrustedWhy error
	switch src, sig, err := g.state.loadPolicy(); {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("the residency policy adopted in the last run (state directory %s): %w; restore it from a backup, or move it aside to start from the policy the configuration names (newer ones arrive by gossip; until a policy is in force the gateway links to every verified gateway and takes no migration)",
			g.s.StateDir, err)
	default:
		if _, err := g.adoptPolicy(src, sig, true); err != nil {
			g.log.Warn("stored policy refused", "err", err)
			// Kept only if its signature verifies and only its signer's
			// revocation stands in the way: then it was in force when
			// the gateway stopped (recheckPolicy kept it), or until the
			// revocation while it was down. Or, the policy this gateway
			// withdrew itself while it ran (recheckPolicy kept it then
			// too): its signer's CA may be retired since, which the
			// signer certificate cannot be checked against any more.
			// Not on the word of the state directory alone: one of
			// another mesh (a mesh rebuilt under a new CA) is not kept.
			if ps, perr := policy.ParseSignature(sig); errors.Is(err, policy.ErrUntrustedSigner) && perr == nil {
				p, verr := policy.VerifyRevokedSigner("policy.hcl", src, ps, g.trust.Load(), g.now())
				if verr != nil {
					if p, verr = policy.VerifyWithdrawn("policy.hcl", src, ps, g.trust.Load(), g.now()); verr == nil {
						if r := p.Revision(); w.Name != r.Name || w.Version != r.Version || w.SHA256 != "" && w.SHA256 != r.SHA256 {
							verr = errors.New("not the policy this gateway withdrew")
						}
					}
				}
				if verr == nil {
					untrusted, untrustedWhy = &adoptedPolicy{p: p, src: src, sig: sig}, err
					g.policyMu.Lock()
					g.withdrawLocked(p.Revision()) // revoked while this gateway was down
					g.policyMu.Unlock()
				}
			}
		}
	}
	src, sig, why := g.configuredPolicy()
	if why == nil {
		if _, err := g.adoptPolicy(src, sig, true); err != nil {
			why = err
			g.log.Error("configured policy refused", "policy", g.s.PolicyFile, "err", err)
		}
	}
	// A policy was asked for and none is in force: running on would link
	// every verified gateway, whatever the residency rules say.
	if g.s.PolicyFile != "" && g.policy.Load() == nil {
		return fmt.Errorf("the configured residency policy %s cannot be put in force: %w; fix it and sign it (skybridge policy sign --policy %s --ca DIR or --signer DIR), or remove policy.file from the configuration to take the mesh's policy by gossip (until one arrives the gateway links to every verified gateway and takes no migration)",
			g.s.PolicyFile, why, g.s.PolicyFile)
	}
	// As while running (recheckPolicy): the last policy in force, whose
	// signer was revoked since, rather than none.
	if g.policy.Load() == nil && untrusted != nil {
		g.policyMu.Lock()
		g.keepUntrustedLocked(untrusted, untrustedWhy)
		g.policyMu.Unlock()
	}
	return nil
}

// errNoConfiguredPolicy: the configuration names no policy file.
var errNoConfiguredPolicy = errors.New("no policy file configured")

// configuredPolicy reads the policy the configuration names, and its
// signature; the error (also logged) says why there is none to use.
func (g *Gateway) configuredPolicy() (src, sig []byte, err error) {
	if g.s.PolicyFile == "" {
		return nil, nil, errNoConfiguredPolicy
	}
	src, err = os.ReadFile(g.s.PolicyFile)
	if err != nil {
		g.log.Error("read the configured policy", "err", err)
		return nil, nil, err
	}
	sig, err = os.ReadFile(g.s.PolicySignature)
	if err != nil {
		err = fmt.Errorf("%w: its signature %s: %w (sign it with skybridge policy sign)", policy.ErrUnsigned, g.s.PolicySignature, err)
		g.log.Error("the configured policy is not signed: it will not be used", "policy", g.s.PolicyFile, "err", err)
		return nil, nil, err
	}
	return src, sig, nil
}

// AdoptPolicy verifies a signed policy and adopts it if it is newer than
// the one in force: it is stored, announced to the mesh, and the topology
// is re-planned. It returns whether it was adopted.
func (g *Gateway) AdoptPolicy(src, sigJSON []byte) (bool, error) {
	return g.adoptPolicy(src, sigJSON, false)
}

// adoptPolicy is AdoptPolicy; local (the configured policy, or the one
// stored by the last run) may be a version a revocation withdrew, as the
// policy to fall back on.
func (g *Gateway) adoptPolicy(src, sigJSON []byte, local bool) (bool, error) {
	// Verified under the lock: a revocation list adopted meanwhile
	// re-judges the policy in force under it too (recheckPolicy), so
	// one of the two sees the other.
	g.policyMu.Lock()
	defer g.policyMu.Unlock()
	return g.adoptPolicyLocked(src, sigJSON, false, local)
}

// adoptPolicyLocked is adoptPolicy with g.policyMu held. replace adopts
// the policy whatever the one in force (whose signer was revoked).
func (g *Gateway) adoptPolicyLocked(src, sigJSON []byte, replace, local bool) (bool, error) {
	if n := len(src) + len(sigJSON); n > MaxPolicyBytes {
		return false, fmt.Errorf("the policy and its signature are %d bytes, and gossip carries at most %d: shorten the policy (descriptions, selectors shared between classes)", n, MaxPolicyBytes)
	}
	sig, err := policy.ParseSignature(sigJSON)
	if err != nil {
		return false, err
	}
	p, err := policy.Verify("policy.hcl", src, sig, g.trust.Load(), g.now())
	if err != nil {
		return false, err
	}
	var cur *policy.Policy
	if c := g.policy.Load(); c != nil && !replace {
		cur = c.p
	}
	if w, r := g.withdrawn, p.Revision(); !local && w.Name == r.Name && r.Version <= w.Version && (cur == nil || cur.Revision().Version < w.Version) {
		return false, fmt.Errorf("policy %s version %d is not above version %d, which was in force until its signer was revoked: an older version does not come back (a replay of one the mesh had moved past); sign the policy wanted as version %d or above",
			r.Name, r.Version, w.Version, w.Version+1)
	}
	ok, err := policy.Adopt(cur, p)
	if err != nil || !ok {
		return false, err
	}
	g.policy.Store(&adoptedPolicy{p: p, src: src, sig: sigJSON})
	g.metrics.classes(p.Classes())
	if err := g.state.savePolicy(src, sigJSON); err != nil {
		g.log.Warn("save adopted policy", "err", err)
	}
	g.log.Info("adopted residency policy", "policy", p.Revision().String())
	for _, f := range p.Unmatchable() {
		g.log.Warn("the residency policy has a mistake `policy sign` now refuses (it was signed before that)", "check", f.Check, "line", f.Pos.Line, "problem", f.Message)
	}
	g.announce(blobPolicy, uint64(p.Revision().Version), nil)
	g.triggerReconcile()
	g.storedImagesAffected()
	return true, nil
}

// recheckPolicy judges the policy in force again after a new revocation
// list. One whose signer it revokes gives way to the configured policy if
// that still verifies, as after a restart: revoking a signer is how its
// rights are taken away, and what it signed stayed in force wherever it
// arrived before the list did. With nothing trusted to put in its place
// it stays in force, loudly: none at all would leave the topology with no
// residency limit on any tunnel.
func (g *Gateway) recheckPolicy() {
	g.policyMu.Lock()
	defer g.policyMu.Unlock()
	c := g.policy.Load()
	if c == nil || c.untrusted {
		return
	}
	sig, why := policy.ParseSignature(c.sig)
	if why == nil {
		_, why = policy.Verify("policy.hcl", c.src, sig, g.trust.Load(), g.now())
	}
	if !errors.Is(why, policy.ErrUntrustedSigner) {
		return
	}
	g.withdrawLocked(c.p.Revision())
	if src, sig, err := g.configuredPolicy(); err == nil {
		adopted, err := g.adoptPolicyLocked(src, sig, true, true)
		if adopted {
			g.log.Error("the residency policy in force was signed by a signer since revoked: the configured policy is in force instead",
				"revoked", c.p.Revision().String(), "policy", g.policyRevision(), "err", why)
			return
		}
		g.log.Error("configured policy refused", "policy", g.s.PolicyFile, "err", err)
	}
	g.keepUntrustedLocked(c, why)
}

// withdrawLocked records r as withdrawn (Gateway.withdrawn), with
// g.policyMu held.
func (g *Gateway) withdrawLocked(r policy.Revision) {
	// The same version again fills in its hash where an earlier
	// release wrote none.
	if w := g.withdrawn; r.Name == w.Name && (r.Version < w.Version || r.Version == w.Version && w.SHA256 != "") {
		return
	}
	g.withdrawn = withdrawnPolicy{Name: r.Name, Version: r.Version, SHA256: r.SHA256}
	if err := g.state.saveWithdrawn(g.withdrawn); err != nil {
		g.log.Warn("save the withdrawn policy's version", "err", err)
	}
}

// keepUntrustedLocked keeps in force a policy whose signer the mesh no
// longer trusts, marked (so that this is said once per policy, not per
// list), with g.policyMu held.
func (g *Gateway) keepUntrustedLocked(c *adoptedPolicy, why error) {
	g.policy.Store(&adoptedPolicy{p: c.p, src: c.src, sig: c.sig, untrusted: true})
	g.metrics.classes(c.p.Classes())
	g.log.Error(fmt.Sprintf("the residency policy in force was signed by a signer since revoked, and no trusted policy can take its place: it stays in force until one signed by a trusted signer, above version %d, is published", c.p.Revision().Version),
		"policy", c.p.Revision().String(), "err", why)
}

func (g *Gateway) policyRevision() string {
	if p := g.policy.Load(); p != nil {
		return p.p.Revision().String()
	}
	return "none"
}

var errNotOurCAs = errors.New("revocation list not signed by a CA this gateway trusts")

// signedByTrustedCA checks, before a revocation list from gossip is
// parsed, that it names a CA of trust as its issuer and bears that CA's
// signature: parsing one of a megabyte (some 30,000 serials) costs the
// worker tens of milliseconds, and anyone holding the gossip key can
// send lists signed by a key of its own. Only the outer structure and the
// issuer are read here, and the signature checked over the raw bytes. A
// signature algorithm not named here (RSA-PSS, whose parameters the
// parse reads) is left to the parse and listOf, for a CA with an RSA key.
func signedByTrustedCA(trust *certs.TrustBundle, der []byte) error {
	if blk, _ := pem.Decode(der); blk != nil {
		der = blk.Bytes
	}
	var list struct {
		TBS       asn1.RawValue
		Algorithm pkix.AlgorithmIdentifier
		Signature asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &list); err != nil {
		return fmt.Errorf("parse revocation list: %w", err)
	}
	// The TBS list: an optional version, the signature algorithm, then
	// the issuer.
	var issuer asn1.RawValue
	rest, err := asn1.Unmarshal(list.TBS.Bytes, &issuer)
	if err == nil && issuer.Class == asn1.ClassUniversal && issuer.Tag == asn1.TagInteger {
		rest, err = asn1.Unmarshal(rest, &issuer)
	}
	if err == nil {
		_, err = asn1.Unmarshal(rest, &issuer)
	}
	if err != nil {
		return fmt.Errorf("parse revocation list: %w", err)
	}
	algo, known := listAlgorithms[list.Algorithm.Algorithm.String()]
	for _, ca := range trust.CAs() {
		if !bytes.Equal(issuer.FullBytes, ca.RawSubject) {
			continue
		}
		if !known {
			if _, ok := ca.PublicKey.(*rsa.PublicKey); ok {
				return nil
			}
			continue
		}
		if ca.CheckSignature(algo, list.TBS.FullBytes, list.Signature.RightAlign()) == nil {
			return nil
		}
	}
	return errNotOurCAs
}

// listAlgorithms are the signature algorithms of revocation lists that
// their object identifier alone names.
var listAlgorithms = map[string]x509.SignatureAlgorithm{
	"1.2.840.10045.4.3.2":   x509.ECDSAWithSHA256,
	"1.2.840.10045.4.3.3":   x509.ECDSAWithSHA384,
	"1.2.840.10045.4.3.4":   x509.ECDSAWithSHA512,
	"1.2.840.113549.1.1.11": x509.SHA256WithRSA,
	"1.2.840.113549.1.1.12": x509.SHA384WithRSA,
	"1.2.840.113549.1.1.13": x509.SHA512WithRSA,
	"1.3.101.112":           x509.PureEd25519,
}
