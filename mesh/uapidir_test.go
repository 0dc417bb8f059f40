package mesh

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/skybridge-mesh/skybridge/certs"
)

// TestUAPIDirChecked: the directory of wireguard-go's UAPI sockets, which
// wgctrl sends the private key through, is refused when another user
// could put a socket of theirs in it: theirs, or one its group or others
// may write, sticky or not, or one on the way to it anyone may write.
// One that is not there yet is wireguard-go's to make.
func TestUAPIDirChecked(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	dir := func(t *testing.T, mode os.FileMode) string {
		t.Helper()
		d := filepath.Join(t.TempDir(), "wireguard")
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, mode); err != nil {
			t.Fatal(err)
		}
		return d
	}
	for _, tc := range []struct {
		name string
		mode os.FileMode
		want string // "" for allowed
	}{
		{"ours", 0o755, ""},
		{"its group may write it", 0o775, "may be written by users other than its owner"},
		{"anyone may write it", 0o777, "may be written by"},
		{"sticky, anyone may write it", 0o777 | os.ModeSticky, "may be written by users other than its owner"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkUAPIDir(dir(t, tc.mode), log)
			if tc.want == "" && err != nil {
				t.Errorf("mode %v: %v", tc.mode, err)
			}
			if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Errorf("mode %v: %v; want a refusal saying %q", tc.mode, err, tc.want)
			}
		})
	}
	t.Run("not there", func(t *testing.T) {
		if err := checkUAPIDir(filepath.Join(t.TempDir(), "wireguard"), log); err != nil {
			t.Errorf("a directory wireguard-go will make: %v", err)
		}
	})
	t.Run("in a directory anyone may write", func(t *testing.T) {
		d := dir(t, 0o755)
		parent := filepath.Dir(d)
		if err := os.Chmod(parent, 0o777); err != nil {
			t.Fatal(err)
		}
		if err := checkUAPIDir(d, log); err == nil || !strings.Contains(err.Error(), "directory "+parent+" may be written by any user") {
			t.Errorf("in a directory anyone may write: %v", err)
		}
	})
	t.Run("another user's", func(t *testing.T) {
		asRoot(t)
		d := dir(t, 0o755)
		if err := os.Chown(d, otherUser, otherUser); err != nil {
			t.Fatal(err)
		}
		if err := checkUAPIDir(d, log); err == nil || !strings.Contains(err.Error(), "directory "+d+" belongs to user 12345") {
			t.Errorf("another user's: %v", err)
		}
	})
}

// TestTUNRefusesAnOpenUAPIDir: TUN mode checks the socket directory before
// wireguard-go puts the interface's socket in it, and makes no interface.
func TestTUNRefusesAnOpenUAPIDir(t *testing.T) {
	inNewNetns(t, func() {
		open := filepath.Join(t.TempDir(), "wireguard")
		if err := os.Mkdir(open, 0o700); err != nil {
			t.Error(err)
			return
		}
		if err := os.Chmod(open, 0o777); err != nil {
			t.Error(err)
			return
		}
		saved := uapiDir
		uapiDir = open
		defer func() { uapiDir = saved }()
		key, _ := certs.GenerateWGKey()
		d, err := OpenDevice(DeviceOptions{Name: fmt.Sprintf("sbu%d", os.Getpid()%100000), Mode: ModeTUN, Port: freeUDPPort(t), MTU: 1420,
			PrivateKey: key, Overlay: netip.MustParseAddr("100.64.7.1"), MeshPrefix: netip.MustParsePrefix("100.64.0.0/10"), Log: slog.New(slog.DiscardHandler)})
		if err == nil {
			d.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "directory "+open+" may be written by any user") {
			t.Errorf("TUN mode with a socket directory anyone may write: %v", err)
		}
	})
}
