// Package mesh is the skybridge gateway: it joins the gossip cluster of
// gateways (hashicorp/memberlist), admits only members whose signed advert
// verifies against the mesh CA, adopts the newest signed residency policy,
// computes the WireGuard configuration the verified membership and the
// policy call for, and applies only the difference to its WireGuard device
// (kernel, embedded wireguard-go on a TUN device, or netstack).
//
// The path a membership change takes:
//
//	gossip (delegate.go) → verify (membership.go) → topology (topology.go, pure)
//	→ reconcile (reconcile.go: diff, then wgctrl/UAPI and netlink)
//
// Nothing in the data plane depends on a coordinator: every gateway
// computes its own configuration from what it has verified itself.
package mesh
