package mesh

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
)

// A gateway shut down on purpose says so, signed with its identity,
// before it leaves the gossip. memberlist reports a graceful leave and a
// failure alike (its Node.State is not kept up to date for the delegate),
// but an operator must tell a decommissioned site from a lost one: the
// first should disappear from the metrics, the second should alert. The
// signature matters because the gossip key alone must not let anyone
// retire a live gateway and so silence the alert about its site.
//
// A notice names the version of the leaver's last advert. A signature
// and a date alone would let a holder of the gossip key replay a genuine
// notice, within its five minutes, against the same gateway's next run:
// restarted, then crashed, it would show as gone on purpose. Each run
// signs adverts of higher versions (they are kept in the state
// directory), so a notice older than the advert a member was last
// verified with is from an earlier run and counts for nothing.

const (
	msgLeaving     byte = 9 // node, unix time, advert version, signature: "I am leaving on purpose"
	leavingDomain       = "skybridge leaving v2\x00"
	leavingSkew         = certs.MaxClockSkew // how far the stated time may be from ours
	leavingMatches      = time.Minute        // a leave notice and the departure belong together within this
)

func leavingDigest(node string, at int64, version uint64) []byte {
	h := sha256.New()
	h.Write([]byte(leavingDomain))
	h.Write([]byte(node))
	h.Write([]byte{0})
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(at)))
	h.Write(binary.BigEndian.AppendUint64(nil, version))
	return h.Sum(nil)
}

// announceLeaving tells every member, directly and by gossip, that this
// gateway is leaving on purpose.
func (g *Gateway) announceLeaving() {
	// Under the advert lock: a re-sign under way ends first, and none
	// follows once leaving is set (signAdvert), so no advert of a higher
	// version than the notice's can reach members after it.
	g.advertMu.Lock()
	self := g.self.Load()
	g.advertMu.Unlock()
	if self == nil {
		return // never advertised: nobody to tell
	}
	msgs := g.leaveNotices(self.Advert.Version)
	for i, msg := range msgs {
		// Gossip carries them to members a lost datagram would miss;
		// memberlist goes on sending broadcasts while Leave spreads our
		// departure. Named apart, or each would replace the one before.
		name := "leaving/" + self.Attributes.Node
		if i > 0 {
			name += "/" + strconv.Itoa(i)
		}
		if g.queue != nil {
			g.queue.QueueBroadcast(broadcast{name: name, msg: msg})
		}
	}
	for _, m := range g.members.snapshot() {
		if m.Alive && m.Gossip.IsValid() {
			for _, msg := range msgs {
				g.sendAsync(m.Name, m.Gossip, msg)
			}
		}
	}
}

// formerIdentityFor is how long after a certificate change the identity
// before it still signs leave notices: peers hold the old certificate
// until gossip brings the new advert and they fetch its certificate,
// seconds but for a peer cut off meanwhile.
const formerIdentityFor = 10 * time.Minute

// formerIdentity is the identity that signed this gateway's adverts
// before the last certificate change (a renewal), kept until.
type formerIdentity struct {
	id    *certs.NodeIdentity
	until time.Time
}

// leaveNotices are this gateway's leave notices naming advert version,
// one signed by each identity a peer may check it against: a peer checks
// a notice against the certificate of the advert it verified last. A
// gateway that renewed its certificate shortly before it stops has peers
// that hold the certificate before (its new advert on its way, or its
// certificate not fetched yet), and one that renewed as it stopped has
// an advert that names the old one (signAdvert signs none once leaving):
// signed with the new key only, the notice was thrown away there, and
// the gateway reported declared dead rather than gone on purpose.
func (g *Gateway) leaveNotices(version uint64) [][]byte {
	now := g.now()
	ids := []*certs.NodeIdentity{g.id.Load()}
	if by := g.advertBy.Load(); by != nil && !slices.Contains(ids, by) {
		ids = append(ids, by)
	}
	if f := g.formerID.Load(); f != nil && now.Before(f.until) && now.Before(f.id.Certificate().NotAfter) && !slices.Contains(ids, f.id) {
		ids = append(ids, f.id)
	}
	at := now.Unix()
	var msgs [][]byte
	for _, id := range ids {
		node := id.Attributes().Node
		sig, err := id.Signer().Sign(rand.Reader, leavingDigest(node, at, version), crypto.SHA256)
		if err != nil {
			g.log.Warn("sign leave notice", "serial", certs.FormatSerial(id.Certificate().SerialNumber), "err", err)
			continue
		}
		msgs = append(msgs, encodeMessage(msgLeaving, []byte(node), binary.BigEndian.AppendUint64(nil, uint64(at)),
			binary.BigEndian.AppendUint64(nil, version), sig))
	}
	return msgs
}

// handleLeaving checks a leave notice and records it.
func (g *Gateway) handleLeaving(m message) error {
	if len(m.fields) == 3 {
		// Earlier releases' notices name no version: replayable.
		return errors.New("leave notice without an advert version (a gateway of an earlier release): ignored")
	}
	if len(m.fields) != 4 || len(m.fields[1]) != 8 || len(m.fields[2]) != 8 {
		return errors.New("leave notice: malformed")
	}
	node, at, version, sig := string(m.fields[0]), int64(binary.BigEndian.Uint64(m.fields[1])), binary.BigEndian.Uint64(m.fields[2]), m.fields[3]
	now := g.now()
	if d := now.Sub(time.Unix(at, 0)); d > leavingSkew || d < -leavingSkew {
		return fmt.Errorf("leave notice of %s: dated %s away from now", node, d.Round(time.Second))
	}
	return g.members.leaving(node, version, func(v *certs.Verified) bool {
		pub, ok := v.Cert.PublicKey.(*ecdsa.PublicKey)
		return ok && ecdsa.VerifyASN1(pub, leavingDigest(node, at, version), sig)
	})
}
