// Package examples embeds the shipped example files — the bank's residency
// policy and its sites — so that `skybridge demo` runs on
// a machine that has only the binary. The files themselves are the source
// of truth and the documentation (docs/POLICY.md).
package examples

import _ "embed"

// Residency is docs/examples/residency.hcl.
//
//go:embed residency.hcl
var Residency []byte

// Sites is docs/examples/sites.hcl.
//
//go:embed sites.hcl
var Sites []byte
