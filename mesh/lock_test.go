package mesh

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestLockStateDir: one gateway at a time on a state directory; the
// second is told which process holds it, and gets it once that one lets
// go.
func TestLockStateDir(t *testing.T) {
	dir := t.TempDir()
	release, err := LockStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := LockStateDir(dir); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("in use by another gateway (pid %d)", os.Getpid())) {
		t.Fatalf("a second gateway on the directory: %v; want a refusal naming the first", err)
	}
	release()
	again, err := LockStateDir(dir)
	if err != nil {
		t.Fatalf("once the first let go: %v", err)
	}
	again()
}
