package policy

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"
)

// DecisionPath is the policy "query path" recorded with every decision, as
// OPA records the rule path that was evaluated.
const DecisionPath = "skybridge/residency/decision"

// Record is one decision in the shape of an Open Policy Agent decision log
// event (decision_id, timestamp, path, input, result, bundles[].revision,
// labels), so SIEM pipelines that already ingest OPA decision logs read
// skybridge's without new parsers.
type Record struct {
	DecisionID  string                `json:"decision_id"`
	Timestamp   time.Time             `json:"timestamp"`
	Path        string                `json:"path"`
	Input       Request               `json:"input"`
	Result      Decision              `json:"result"`
	Bundles     map[string]BundleInfo `json:"bundles"`
	Labels      map[string]string     `json:"labels,omitempty"`
	RequestedBy string                `json:"requested_by,omitempty"`
}

// BundleInfo is OPA's per-bundle revision entry.
type BundleInfo struct {
	Revision string `json:"revision"`
}

// NewRecord wraps a decision for the decision log. labels identify the
// deciding party (OPA's labels: e.g. node and site of the gateway);
// requestedBy is who asked (a migration ID, an operator). The ID is random
// and now is the caller's clock, which keeps Evaluate itself pure.
func NewRecord(req Request, d Decision, labels map[string]string, requestedBy string, now time.Time) Record {
	return Record{
		DecisionID:  newDecisionID(),
		Timestamp:   now.UTC(),
		Path:        DecisionPath,
		Input:       req,
		Result:      d,
		Bundles:     map[string]BundleInfo{d.Policy.Name: {Revision: d.Policy.RevisionString()}},
		Labels:      labels,
		RequestedBy: requestedBy,
	}
}

// RevisionString is the bundle revision OPA tooling shows: version and
// source hash.
func (r Revision) RevisionString() string { return fmt.Sprintf("v%d-sha256:%s", r.Version, r.SHA256) }

// newDecisionID returns a random RFC 4122 version 4 UUID, the form OPA
// uses for decision IDs.
func newDecisionID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
