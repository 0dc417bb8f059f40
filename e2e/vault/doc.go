// Package vault tests skybridge's Vault identity back end against a real
// Vault: an in-process Vault core by default, or an external server when
// VAULT_ADDR and VAULT_TOKEN are set.
//
// It is a separate module so that the main module never links Vault's
// server code (Business Source License; see go.mod for the version pins).
package vault
