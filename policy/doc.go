// Package policy is skybridge's data-residency policy: which classes of
// data may be stored in, or pass through, which sites.
//
// A policy is an HCL file a compliance officer can read (docs/POLICY.md):
// named jurisdictions (groups of ISO 3166 country codes), site selectors,
// data classes with allow and deny rules for the actions store and transit,
// requirements attached to allows, and dated exceptions. Anything not
// allowed is denied; a deny beats an allow; an unexpired exception beats a
// deny.
//
// Parse compiles the file once; Policy.Evaluate is then a pure,
// deterministic function of the request (class, action, sites, time) that
// says allow or deny, which rule decided (file:line), why, and what the
// caller must still guarantee (obligations). Record turns a decision into
// an OPA-style decision log entry for SIEM tooling, and Sign/Verify bind a
// policy to the mesh CA so gateways adopt only genuine, newer versions.
package policy
