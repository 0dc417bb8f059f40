// Package migrate moves VM images (raw and qcow2) between sites across the
// mesh: fast (sparse-aware reads, zero detection, zstd where it pays,
// parallel streams), resumable (journals on both ends record durable
// chunks), verified end to end (BLAKE3 per chunk and a Merkle root over
// the image), incremental (a newer version of an image the destination
// holds sends only changed chunks) and only where the residency policy
// allows — checked by the sender before the first byte and again by the
// receiver with its own policy copy.
//
// The sender and the receiver both run inside gateways: the receiver
// listens on its overlay address only, and both ends authenticate each
// other with their mesh identities (mutual TLS), so the receiver knows
// which site is sending.
package migrate
