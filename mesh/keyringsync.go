package mesh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/jitter"
)

// catchUpKeyring ends a start on the gossip keyring kept on disk because
// Vault could not be reached. The mesh may have rotated its key while this
// gateway was down, and then no member can read its gossip nor it theirs:
// once Vault answers, the gateway takes the mesh's keyring from there.
func (g *Gateway) catchUpKeyring(ctx context.Context) {
	vs, ok := g.prov.Secrets().(*certs.VaultSecrets)
	if !ok || !vs.ServedFromDisk() {
		return
	}
	const awaitingPoll = 2 * time.Second // only a flag is read until the login succeeds
	backoff := awaitingPoll
	for {
		// A rotation step may change the keyring while Vault is read:
		// what was read is taken only if the live keyring is still the
		// one it was read against. A step holds keyringMu until its
		// change is stored, so a read begun after that sees it. (A join
		// trying another key changes nothing: the keys are compared as
		// they are without its trial, which ends before the adoption.)
		g.keyringMu.Lock()
		before := slices.Clone(g.liveKeys())
		g.keyringMu.Unlock()
		kr, err := vs.GossipKeyringFromVault(ctx)
		if err == nil {
			g.keyringMu.Lock()
			if !sameKeys(before, g.liveKeys()) {
				g.keyringMu.Unlock()
				continue // a step landed meanwhile: read again
			}
			g.endKeyTrial()
			changed, err := adoptKeyring(g.keyring, kr)
			g.keyringMu.Unlock()
			if err != nil {
				g.log.Error("the mesh's gossip keyring read from vault could not be taken", "err", err)
			} else if changed {
				g.log.Info("gossip keyring brought up to the mesh's from vault (it changed while this gateway was down)", "keys", kr.Len())
			}
			return
		}
		unreachable := certs.VaultUnreachable(err)
		if unreachable {
			backoff = awaitingPoll
		} else {
			backoff = min(2*backoff, time.Minute)
		}
		wait := jitter.Spread(backoff)
		if !unreachable {
			g.log.Warn("vault refuses the gossip keyring: this gateway keeps the one kept on disk, which may be behind the mesh's", "err", err, "retry_in", wait.Round(time.Millisecond))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// adoptKeyring makes live hold exactly kr's keys with kr's primary, and
// reports whether it changed anything. The new keys go in first and the
// old ones out last, so that gossip in either keyring is read throughout.
func adoptKeyring(live *memberlist.Keyring, kr *certs.GossipKeyring) (bool, error) {
	want, before := kr.Keys(), live.GetKeys() // primary first
	if sameKeys(want, before) {
		return false, nil
	}
	var errs []error
	for _, k := range want {
		errs = append(errs, live.AddKey(k))
	}
	errs = append(errs, live.UseKey(kr.Primary()))
	errs = append(errs, removeKeys(live, func(k []byte) bool { return !hasKey(want, k) }))
	if err := errors.Join(errs...); err != nil {
		return true, fmt.Errorf("adopt gossip keyring: %w", err)
	}
	return true, nil
}

// removeKeys takes the keys drop chooses (never the primary) out of live
// without writing into an array memberlist has handed out. Its RemoveKey
// shifts the keys after the one removed in place, in the array GetKeys
// returns and its decryption goes through without the keyring's lock: a
// data race on the keys (seen by the race detector in a rotation). A key
// removed last shifts nothing, so from the first key dropped on every key
// is taken out from the end, and those kept are put back; a datagram under
// one of them in that instant goes unread, as one lost would.
func removeKeys(live *memberlist.Keyring, drop func([]byte) bool) error {
	keys := slices.Clone(live.GetKeys()) // primary first, the rest in order
	i := slices.IndexFunc(keys[min(1, len(keys)):], drop)
	if i < 0 {
		return nil
	}
	first := i + 1
	var errs []error
	for j := len(keys) - 1; j >= first; j-- {
		errs = append(errs, live.RemoveKey(keys[j]))
	}
	for _, k := range keys[first+1:] {
		if !drop(k) {
			errs = append(errs, live.AddKey(k))
		}
	}
	return errors.Join(errs...)
}

// sameKeys reports whether two keyrings (primary first) have the same
// primary and the same keys, in whatever order.
func sameKeys(a, b [][]byte) bool {
	if len(a) == 0 || len(b) == 0 {
		return len(a) == len(b)
	}
	if len(a) != len(b) || !bytes.Equal(a[0], b[0]) {
		return false
	}
	for _, k := range a {
		if !hasKey(b, k) {
			return false
		}
	}
	return true
}

func hasKey(keys [][]byte, k []byte) bool {
	return slices.ContainsFunc(keys, func(x []byte) bool { return bytes.Equal(x, k) })
}
