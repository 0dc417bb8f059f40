package mesh

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// otherUser is a uid no file of the test's belongs to.
const otherUser = 12345

// asRoot skips a test that gives files to another user where it cannot;
// CI runs as root, where it must.
func asRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root to give files to another user (CI runs as root)")
		}
		t.Skip("needs root to give files to another user")
	}
}

func serveControlAt(t *testing.T, sock string) error {
	t.Helper()
	g := &Gateway{s: &Settings{ControlSocket: sock}, log: slog.New(slog.DiscardHandler)}
	c, err := g.serveControl()
	if err == nil {
		c.Close()
	}
	return err
}

// TestControlSocketWay: not only the socket's own directory but every
// directory and symbolic link on the way to it must be root's or the
// gateway's, and not writable by others unless sticky: whoever may
// rename or repoint one may put a socket of theirs at the path while the
// gateway is down.
func TestControlSocketWay(t *testing.T) {
	asRoot(t)
	sticky := func(t *testing.T) string { // stands for /tmp
		d := t.TempDir()
		if err := os.Chmod(d, 0o777|os.ModeSticky); err != nil {
			t.Fatal(err)
		}
		return d
	}
	ours := func(t *testing.T) string {
		d := t.TempDir()
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	t.Run("symbolic link of another user's in a sticky directory", func(t *testing.T) {
		link := filepath.Join(sticky(t), "skybridge")
		if err := os.Symlink(ours(t), link); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(link, otherUser, otherUser); err != nil {
			t.Fatal(err)
		}
		if err := serveControlAt(t, filepath.Join(link, "control.sock")); err == nil || !strings.Contains(err.Error(), "symbolic link "+link+" belongs to user 12345") {
			t.Errorf("behind a link another user may repoint: %v", err)
		}
	})
	t.Run("parent of another user's", func(t *testing.T) {
		theirs := ours(t)
		if err := os.Chown(theirs, otherUser, otherUser); err != nil {
			t.Fatal(err)
		}
		// the gateway makes theirs/skybridge itself, its own: the other
		// user may still rename it away and put theirs in its place
		if err := serveControlAt(t, filepath.Join(theirs, "skybridge", "control.sock")); err == nil || !strings.Contains(err.Error(), "directory "+theirs+" belongs to user 12345") {
			t.Errorf("in a directory whose parent is another user's: %v", err)
		}
	})
	t.Run("parent anyone may write", func(t *testing.T) {
		open := ours(t)
		if err := os.Chmod(open, 0o777); err != nil {
			t.Fatal(err)
		}
		if err := serveControlAt(t, filepath.Join(open, "skybridge", "control.sock")); err == nil || !strings.Contains(err.Error(), "may be written by any user") {
			t.Errorf("in a directory whose parent anyone may write: %v", err)
		}
	})
	t.Run("our directory in a sticky one", func(t *testing.T) {
		if err := serveControlAt(t, filepath.Join(sticky(t), "skybridge", "control.sock")); err != nil {
			t.Errorf("in a directory of ours in a sticky directory (/tmp/skybridge): %v", err)
		}
	})
	t.Run("in a sticky directory itself", func(t *testing.T) {
		// sticky keeps others from removing the socket, not from making
		// one at its path while the gateway is down
		if err := serveControlAt(t, filepath.Join(sticky(t), "control.sock")); err == nil || !strings.Contains(err.Error(), "may be written by any user") {
			t.Errorf("directly in a sticky directory (/tmp/control.sock): %v", err)
		}
	})
	t.Run("our symbolic link in a sticky directory", func(t *testing.T) {
		link := filepath.Join(sticky(t), "skybridge")
		if err := os.Symlink(ours(t), link); err != nil {
			t.Fatal(err)
		}
		if err := serveControlAt(t, filepath.Join(link, "control.sock")); err != nil {
			t.Errorf("behind a link of ours (as /var/run to /run): %v", err)
		}
	})
	t.Run("relative link into another user's directory", func(t *testing.T) {
		base := ours(t)
		theirs := filepath.Join(base, "theirs")
		if err := os.Mkdir(theirs, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(theirs, otherUser, otherUser); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(filepath.Join(theirs, "run"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("theirs/run", filepath.Join(base, "run")); err != nil {
			t.Fatal(err)
		}
		if err := serveControlAt(t, filepath.Join(base, "run", "control.sock")); err == nil || !strings.Contains(err.Error(), "directory "+theirs+" belongs to user 12345") {
			t.Errorf("behind a link of ours that leads through another user's directory: %v", err)
		}
	})
}

// TestControlSocketLeavesOtherFiles: at start, what nothing answers at
// the socket's path is removed only if it is a socket (one a gateway left
// behind); a file there (a control { socket = … } naming a file of the
// state directory) is kept, and the gateway refuses to start, naming it.
func TestControlSocketLeavesOtherFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "migrate.db")
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := serveControlAt(t, path); err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "regular file") {
		t.Errorf("a regular file at the socket's path: %v, want a refusal naming it", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
		t.Errorf("the file at the socket's path is gone or changed: %q, %v", b, err)
	}

	link := filepath.Join(dir, "link.sock")
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	if err := serveControlAt(t, link); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("a symbolic link at the socket's path: %v, want a refusal", err)
	}
	if _, err := os.Lstat(link); err != nil {
		t.Errorf("the link at the socket's path is gone: %v", err)
	}

	// A socket a gateway left (killed): nothing answers, it is replaced.
	left := filepath.Join(dir, "control.sock")
	ln, err := net.Listen("unix", left)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if err := serveControlAt(t, left); err != nil {
		t.Errorf("a socket left behind: %v, want it replaced", err)
	}
}

// TestClientRefusesOtherUsersSocket: the CLI sends nothing to a control
// socket served by a user other than its own or root (someone's socket
// put where the gateway's should be).
func TestClientRefusesOtherUsersSocket(t *testing.T) {
	asRoot(t)
	serve := func(t *testing.T, uid int, at ...string) (string, *atomic.Int32) {
		t.Helper()
		// An abstract socket: no directory the other user must reach.
		name := "@skybridge-test-" + hex.EncodeToString(randBytes(8))
		if len(at) > 0 {
			name = at[0]
		}
		if uid != 0 {
			// The listener's credentials are its maker's effective uid
			// at listen(): taken for the moment of the call.
			if err := syscall.Setresuid(-1, uid, -1); err != nil {
				t.Fatal(err)
			}
		}
		ln, err := net.Listen("unix", name)
		if uid != 0 {
			if err := syscall.Setresuid(-1, 0, -1); err != nil {
				panic(err) // the rest of the tests would run as another user
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		var asked atomic.Int32
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			asked.Add(1)
			reply(w, &Status{Node: "n"}, nil)
		})}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
		return name, &asked
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	sock, asked := serve(t, otherUser)
	_, err := NewClient(sock).Status(ctx)
	if se, ok := errors.AsType[*serverUserError](err); !ok || se.Uid != otherUser || !strings.Contains(err.Error(), "user 12345") {
		t.Errorf("a socket user %d serves: %v, want refused", otherUser, err)
	}
	if _, err := NewClient(sock).Migrate(ctx, MigrationRequest{ID: "m"}, func(MigrationEvent) {}); !strings.Contains(err.Error(), "user 12345") {
		t.Errorf("a migration to a socket user %d serves: %v, want refused", otherUser, err)
	}
	if n := asked.Load(); n != 0 {
		t.Errorf("%d requests sent to the socket another user serves", n)
	}

	sock, asked = serve(t, os.Geteuid())
	if st, err := NewClient(sock).Status(ctx); err != nil || st.Node != "n" || asked.Load() != 1 {
		t.Errorf("a socket our own user serves: %v, %v", st, err)
	}

	// A gateway run as a service user, reached with sudo: its own socket
	// on a way only root and that user may change is its own.
	base := rootOnlyDir(t)
	own := filepath.Join(base, "run")
	if err := os.Mkdir(own, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(own, otherUser, otherUser); err != nil {
		t.Fatal(err)
	}
	sock, asked = serve(t, otherUser, filepath.Join(own, "control.sock"))
	if st, err := NewClient(sock).Status(ctx); err != nil || st.Node != "n" || asked.Load() != 1 {
		t.Errorf("a socket of the user who serves it, on its own way: %v, %v", st, err)
	}
	// The same, in a directory a third user could replace: refused.
	if err := os.Chown(base, otherUser+1, otherUser+1); err != nil {
		t.Fatal(err)
	}
	if _, err := NewClient(sock).Status(ctx); !strings.Contains(err.Error(), "user 12345") {
		t.Errorf("a socket of user %d's in a directory of user %d's: %v, want refused", otherUser, otherUser+1, err)
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// serveAs listens on the unix socket path as uid (its effective uid at
// listen), answering every request.
func serveAs(t *testing.T, uid int, path string) *atomic.Int32 {
	t.Helper()
	if err := syscall.Setresgid(-1, uid, -1); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Setresuid(-1, uid, -1); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", path)
	if err := syscall.Setresuid(-1, 0, -1); err != nil {
		panic(err)
	}
	if err := syscall.Setresgid(-1, 0, -1); err != nil {
		panic(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	var asked atomic.Int32
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		reply(w, &Status{Node: "impostor"}, nil)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return &asked
}

// TestClientRefusesAWayInTmp: a gateway's socket configured as
// /tmp/skybridge/control.sock: while the gateway is not running, any
// local user can make /tmp/skybridge and serve a socket there, on a way
// that is then root's and theirs. Root's CLI (sudo skybridge burst up,
// with VAULT_TOKEN) must not talk to it.
func TestClientRefusesAWayInTmp(t *testing.T) {
	asRoot(t)
	base := rootOnlyDir(t)
	tmp := filepath.Join(base, "tmp") // stands for /tmp: root's, 1777
	if err := os.Mkdir(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	// What the other user does, unprivileged: mkdir in a sticky dir.
	evil := filepath.Join(tmp, "skybridge")
	if err := os.Mkdir(evil, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(evil, otherUser, otherUser); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(evil, "control.sock")
	asked := serveAs(t, otherUser, sock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := NewClient(sock).Status(ctx)
	if err == nil || asked.Load() != 0 {
		t.Errorf("root's client talked to user %d's socket in a directory that user created in a sticky world-writable directory: status %+v, %d requests", otherUser, st, asked.Load())
	}
}

// TestClientRefusesAGroupWriter: a root gateway's socket in a directory of
// root's its group may write (the gateway only warns): a member of the
// group can put a socket of its own there, which root's CLI must not
// take for the gateway's.
func TestClientRefusesAGroupWriter(t *testing.T) {
	asRoot(t)
	base := rootOnlyDir(t)
	run := filepath.Join(base, "run")
	if err := os.Mkdir(run, 0o775); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(run, 0, otherUser); err != nil { // root:ops 0775, the other user in ops
		t.Fatal(err)
	}
	if err := os.Chmod(run, 0o775); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(run, "control.sock")
	asked := serveAs(t, otherUser, sock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := NewClient(sock).Status(ctx)
	if err == nil || asked.Load() != 0 {
		t.Errorf("root's client talked to user %d's socket in root's group-writable directory: status %+v, %d requests", otherUser, st, asked.Load())
	}
}

// rootOnlyDir is a directory of root's, mode 0755, on a way only root may
// write (under /run, not the sticky /tmp, which a client refuses on the
// way to another user's socket), removed when the test ends.
func rootOnlyDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/run", "skybridge-test-")
	if err != nil {
		t.Skipf("no directory of root's to test in: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
