package mesh

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// fileLock is in the state directory while a gateway runs on it.
const fileLock = "gateway.lock"

// LockStateDir claims the state directory for one gateway process until
// release is called (or the process ends). A second gateway on the same
// directory would take over the first one's WireGuard interface, fail on
// the migration journal's lock, and delete the interface as it gave up:
// the first kept gossiping with every tunnel gone. It is refused first.
func LockStateDir(dir string) (release func(), err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	path := filepath.Join(dir, fileLock)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state directory lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			who := "another gateway"
			if pid, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil {
				who = fmt.Sprintf("another gateway (pid %d)", pid)
			}
			return nil, fmt.Errorf("state directory %s is in use by %s: stop it first, or give this one a state directory of its own", dir, who)
		}
		return nil, fmt.Errorf("state directory lock %s: %w", path, err)
	}
	// Who holds it, for the message above; the lock itself is the flock.
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return func() { f.Close() }, nil
}
