package mesh

import (
	"bytes"
	"fmt"
	"net/netip"

	"github.com/hashicorp/memberlist"
)

// delegate connects memberlist to the gateway. memberlist calls it from
// its network goroutines, some while holding its own locks: every method
// here is quick, never blocks, and never calls back into memberlist;
// anything slower (verification of fetched certificates, answering
// requests) is queued for the gateway's worker.
type delegate struct{ g *Gateway }

var (
	_ memberlist.Delegate      = delegate{}
	_ memberlist.EventDelegate = delegate{}
	_ memberlist.AliveDelegate = delegate{}
)

// NodeMeta is our signed advert.
func (d delegate) NodeMeta(limit int) []byte {
	raw := *d.g.advert.Load()
	if len(raw) > limit {
		d.g.log.Error("advert exceeds the gossip metadata limit", "bytes", len(raw), "limit", limit)
		return nil
	}
	return raw
}

// NotifyMsg hands a user message to the worker; one larger than any
// message the gateways send is dropped here, uncopied.
func (d delegate) NotifyMsg(b []byte) {
	if len(b) == 0 || len(b) > maxUserMessage {
		d.g.log.Debug("ignoring a gossip message of an impossible size", "bytes", len(b))
		return
	}
	d.g.enqueue(append([]byte(nil), b...))
}

func (d delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.g.queue.GetBroadcasts(overhead, limit)
}

// LocalState is what we send in a push/pull exchange: our certificate, the
// revocation list and the signed policy, so anti-entropy repairs whatever
// the targeted requests missed.
func (d delegate) LocalState(join bool) []byte { return d.g.localState(join) }

func (d delegate) MergeRemoteState(buf []byte, join bool) {
	msgs, err := unbundle(buf)
	if err != nil {
		d.g.log.Warn("ignoring a malformed push/pull state (a gateway of another release, or one whose state outgrew the bounds)", "err", err)
		return
	}
	for _, m := range msgs {
		if len(m) == 0 {
			continue
		}
		// A join's certificate bundle is learned here, in one batch:
		// through the inbox it could be as many messages as members.
		// Only a join's state carries one.
		if m[0] == msgCerts {
			if !join {
				continue
			}
			if dm, err := decodeMessage(m, maxJoinCerts); err == nil {
				d.g.members.addCerts(dm.fields)
			} else {
				d.g.log.Debug("ignoring a join's certificates", "err", err)
			}
			continue
		}
		d.g.enqueue(append([]byte(nil), m...))
	}
}

// NotifyAlive refuses, before memberlist takes them in, members whose
// advert is known to be bad. Members whose certificate has not arrived
// yet get in as pending (they gossip, but never become WireGuard peers
// until verified), if never verified here: a member verified before
// whose new advert names a certificate not known yet is put off
// (certFirstError), its certificate asked for at the address the message
// gives.
//
// Our own name, gossiped with an advert of ours above the version we
// sign now, is said once as an error: every peer holding it refuses our
// adverts as replays, and tells only its own log. We do not sign above
// it ourselves: a second gateway run under our identity shows the same,
// its adverts genuine, and the two would outbid each other's versions
// without end, the peers moving our name between their addresses at
// each; the operator knows which case it is.
func (d delegate) NotifyAlive(n *memberlist.Node) error {
	if n.Name == d.g.members.self {
		if self := d.g.self.Load(); self != nil && !bytes.Equal(n.Meta, *d.g.advert.Load()) {
			if v, first := d.g.members.ownAdvertAhead(n.Meta, self.Advert.Version, d.g.id.Load().Certificate()); first {
				d.g.log.Error(fmt.Sprintf("the mesh holds an advert of this gateway's of version %d, above the %d it signs now, and refuses its adverts as replays: if no other gateway runs under its identity, its advert version went down (advert.version in its state directory lost, or restored from a backup, while an earlier run's clock was ahead); write %d to %s and restart it",
					v, self.Advert.Version, v, d.g.state.path(fileAdvertVersion)))
			}
		}
		return nil
	}
	if err := d.g.members.admit(n.Name, nodeAddr(n), n.Meta); err != nil {
		if first, ok := err.(*certFirstError); ok && first.ask {
			d.askCertAt(n.Name, first.at)
		}
		d.g.log.Debug("refused gossip member", "peer", n.Name, "addr", n.Addr.String(), "err", err)
		return err
	}
	return nil
}

// askCertAt asks a member for its certificate at the address an alive
// message gives, not the one gossip knows (certFirstError). From a
// goroutine of its own: memberlist calls NotifyAlive under its node lock,
// which a send takes too.
func (d delegate) askCertAt(name string, at netip.AddrPort) {
	me := d.g.id.Load()
	msg := encodeMessage(msgCertRequest, []byte(me.Attributes().Node), me.Certificate().Raw, d.g.gossipAddr())
	d.g.goSend(func() error { return d.g.sendTo(name, at, msg) }, name)
}

func (d delegate) NotifyJoin(n *memberlist.Node)   { d.g.memberUp(n) }
func (d delegate) NotifyUpdate(n *memberlist.Node) { d.g.memberUp(n) }
func (d delegate) NotifyLeave(n *memberlist.Node)  { d.g.members.leave(n.Name) }

func nodeAddr(n *memberlist.Node) netip.AddrPort {
	a, _ := netip.AddrFromSlice(n.Addr)
	return netip.AddrPortFrom(a.Unmap(), n.Port)
}

// broadcast is a named memberlist broadcast: a newer announcement of the
// same blob replaces an older one still in the queue.
type broadcast struct {
	name string
	msg  []byte
}

func (b broadcast) Invalidates(o memberlist.Broadcast) bool {
	nb, ok := o.(memberlist.NamedBroadcast)
	return ok && nb.Name() == b.name
}
func (b broadcast) Name() string    { return b.name }
func (b broadcast) Message() []byte { return b.msg }
func (b broadcast) Finished()       {}
