package mesh

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestNewTokenAfterEndedBurstKeepsPendingKey: a server whose earlier
// burst ended is enrolled into a new burst with a new token, and the
// answer is lost (a crash). At the restart the ended burst's record is
// still the one on disk (the new one is saved last): its identity goes,
// but not the key kept for the new token, or the enrollment is asked for
// again with another key and the enroller calls the token used.
func TestNewTokenAfterEndedBurstKeepsPendingKey(t *testing.T) {
	dir, _, grant := openBurst(t)
	bs := liveSettings(t, filepath.Join(dir, "burst"))
	if err := os.MkdirAll(bs.Identity.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ended := time.Now().Add(-time.Hour).UTC()
	if err := saveEnrollment(bs.Identity.Dir, &Enrollment{Site: "burst-old", Node: "burst-old-gw1", TokenID: "old-token", Ended: &ended, Reason: "expired"}); err != nil {
		t.Fatal(err)
	}
	// First ask with the new token, as Join makes it (pending key kept
	// before asking); its answer is lost.
	tok, body := burstAsk(t, grant.Tokens[0], bs.Identity.Dir)
	if _, err := postEnroll(context.Background(), tok, body, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	// Restart with the same token.
	if _, err := Join(context.Background(), bs, grant.Tokens[0], nil); err != nil {
		t.Fatalf("asking again after a lost answer, the server's previous burst ended: %v", err)
	}
}
