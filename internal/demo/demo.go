// Package demo runs the whole product on one machine: a mesh CA, the bank's
// residency policy, three sites each with its own real gateway process, a
// WireGuard mesh between them, a VM image migrated from the datacenter to
// the EU region and verified, the same image refused for the US region as
// Swiss banking secrecy, and the audit trail — then it cleans up after
// itself. As root the sites are network namespaces with TUN devices;
// otherwise they are unprivileged netstack gateways on loopback.
package demo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/docs/examples"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
	"github.com/skybridge-mesh/skybridge/internal/audit"
	"github.com/skybridge-mesh/skybridge/internal/freeport"
	"github.com/skybridge-mesh/skybridge/internal/progress"
	"github.com/skybridge-mesh/skybridge/internal/units"
	"github.com/skybridge-mesh/skybridge/mesh"
	"github.com/skybridge-mesh/skybridge/migrate"
	"github.com/skybridge-mesh/skybridge/policy"
)

// Modes.
const (
	ModeAuto     = "auto"
	ModeNetns    = "netns"    // network namespaces, TUN devices (root)
	ModeNetstack = "netstack" // loopback, userspace network stacks (no root)
)

// Options configure a demo run.
type Options struct {
	Mode    string
	Keep    bool      // leave the mesh running
	Exe     string    // the skybridge binary to run the gateways with
	Out     io.Writer // the story; nil for none (--json)
	Bars    io.Writer // the progress bar; nil for none
	WorkDir string    // default: a new temporary directory
}

// site is one of the demo's sites.
type site struct {
	Short, Site, Region, Provider, Jurisdiction, Classes, Certified, Route string
	CPU, MemoryGiB                                                         string // capacity for `skybridge plan`
	// Attests is what the site's certificate vouches its storage
	// provides, which the policy's requirements ask for (a demo's sites
	// are simulated: in production the CA's operator checks before
	// certifying).
	Attests                        map[string]string
	Host                           byte
	NS, Iface, Dir, Config, Socket string
	cmd                            *exec.Cmd
}

func demoSites() []*site {
	return []*site{
		{Short: "zrh", Site: "onprem-zrh", Region: "zrh-dc1", Provider: "onprem", Jurisdiction: "CH", Classes: "swiss-banking-secret,pii-eu,risk-batch", Route: "10.1.0.0/16", Host: 1,
			Attests: map[string]string{policy.LabelEncryptionAtRest: "true", policy.LabelReplicaZones: "2"}},
		{Short: "fra", Site: "aws-eu-central-1", Region: "eu-central-1", Provider: "aws", Jurisdiction: "DE", Classes: "pii-eu,risk-batch", Certified: "iso27001,pci-dss", Route: "10.2.0.0/16", CPU: "96", MemoryGiB: "384", Host: 2,
			Attests: map[string]string{policy.LabelEncryptionAtRest: "true"}},
		{Short: "iad", Site: "aws-us-east-1", Region: "us-east-1", Provider: "aws", Jurisdiction: "US", Classes: "risk-batch", Certified: "iso27001", Route: "10.3.0.0/16", CPU: "128", MemoryGiB: "512", Host: 3,
			Attests: map[string]string{policy.LabelEncryptionAtRest: "true"}},
	}
}

// Summary is what `skybridge demo --json` prints.
type Summary struct {
	Mode      string           `json:"mode"`
	WorkDir   string           `json:"work_dir"`
	Policy    string           `json:"policy"`
	Converged bool             `json:"converged"`
	Converge  float64          `json:"converge_seconds"`
	Sites     []SiteSummary    `json:"sites"`
	Migration MigrationSummary `json:"migration"`
	Denial    DenialSummary    `json:"denial"`
	Audit     []AuditSummary   `json:"audit"`
	Seconds   float64          `json:"seconds"` // the whole run, its cleanup included
	Kept      bool             `json:"kept"`
	CleanedUp bool             `json:"cleaned_up"`
	// OK: every step ran and checked out; Error says why not (also
	// when the run was interrupted), so a failed run's JSON is not read
	// as figures of a run that merely refused nothing.
	OK    bool     `json:"ok"`
	Error string   `json:"error,omitempty"`
	Poke  []string `json:"poke,omitempty"` // with --keep: commands to try
}

// SiteSummary is one site as its gateway sees the mesh.
type SiteSummary struct {
	Site         string   `json:"site"`
	Node         string   `json:"node"`
	Jurisdiction string   `json:"jurisdiction"`
	OverlayIP    string   `json:"overlay_ip"`
	Socket       string   `json:"socket"` // control socket, for --keep
	Tunnels      []string `json:"tunnels"`
	Handshakes   int      `json:"handshakes"`
}

// MigrationSummary is the image that moved.
type MigrationSummary struct {
	ID           string  `json:"id"`
	Image        string  `json:"image"`
	Format       string  `json:"format"`
	From         string  `json:"from"`
	To           string  `json:"to"`
	Class        string  `json:"class"`
	Virtual      int64   `json:"virtual_bytes"`
	OnDisk       int64   `json:"on_disk_bytes"`
	Sent         int64   `json:"sent_bytes"`
	Seconds      float64 `json:"seconds"`
	Root         string  `json:"root"`
	Verified     bool    `json:"verified"`
	QemuCompare  string  `json:"qemu_img_compare"` // "identical", or why it was not run
	StoredAt     string  `json:"stored_at"`
	ReceivedRoot string  `json:"received_root"`
}

// DenialSummary is the migration the policy refused.
type DenialSummary struct {
	Class   string   `json:"class"`
	To      string   `json:"to"`
	Refused bool     `json:"refused"`
	By      string   `json:"by"`
	Rule    string   `json:"rule"`
	Reasons []string `json:"reasons"`
	Sent    int64    `json:"sent_bytes"`
}

// AuditSummary is one gateway's audit log.
type AuditSummary struct {
	Site    string `json:"site"`
	Records int    `json:"records"`
	Valid   bool   `json:"valid"`
	Status  string `json:"status"` // as printed: "3 record(s) valid", "nothing recorded", "INVALID: …"
}

type run struct {
	opt     Options
	id      string
	mode    string
	modeWhy string // why mode is netstack, for the first line
	dir     string
	sites   []*site
	wanNS   string
	ca      *certs.CA
	started time.Time
	sum     Summary
	// img is the VM image made, in format, for the migration and the
	// refusal after it.
	img, format string
}

func (r *run) sayf(format string, args ...any) {
	if r.opt.Out != nil {
		fmt.Fprintf(r.opt.Out, format, args...)
	}
}

// Run runs the demo. Whatever happens — failure, Ctrl-C (ctx) — it removes
// everything it created unless opt.Keep is set and it succeeded.
//
// Its error is ctx's, or wraps it, when ctx was done as the steps stopped,
// and only then: a caller that cancels ctx on a signal tells by the error
// whether the signal stopped the run. ctx itself does not say: a signal
// while Run cleans up after a failure cancels it too.
func Run(ctx context.Context, opt Options) (sum *Summary, err error) {
	r := &run{opt: opt, started: time.Now()}
	b := make([]byte, 3) // names stay within the kernel's 15 characters
	rand.Read(b)
	r.id = hex.EncodeToString(b)
	r.mode, r.modeWhy = chooseMode(opt.Mode)
	r.sites = demoSites()
	r.dir = opt.WorkDir
	if r.dir == "" {
		if r.dir, err = os.MkdirTemp("", "skybridge-demo-"); err != nil {
			return nil, err
		}
	}
	// Absolute: the gateways are started with configurations under it,
	// and Down stops only processes whose configuration lies inside it.
	if r.dir, err = filepath.Abs(r.dir); err != nil {
		return nil, err
	}
	r.sum.Mode, r.sum.WorkDir = r.mode, r.dir
	defer func() {
		// Last, to count the cleanup: it takes seconds of its own (the
		// gateways' shutdown).
		defer func() { r.sum.Seconds = time.Since(r.started).Seconds() }()
		// OK, not err == nil: err is nil too while a panic unwinds, and
		// a run that crashed is no mesh to keep.
		if opt.Keep && r.sum.OK {
			r.sum.Kept = true
			r.sum.Poke = r.pokeCommands()
			if serr := r.saveState(); serr != nil {
				err = serr
				r.sum.OK, r.sum.Error = false, err.Error()
			}
			return
		}
		if cerr := r.cleanup(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("and could not remove everything it created: %w", cerr))
			r.sum.OK, r.sum.Error = false, err.Error()
			return
		}
		r.sum.CleanedUp = true
	}()
	// From the start, though there is nothing to stop yet: a run killed
	// before its first namespace or gateway (making the CA) leaves the
	// CA's private key, and --down removes only a directory that says it
	// is a demo's.
	if err := r.recordState(); err != nil {
		err = fmt.Errorf("record the demo's state in %s (is it writable?): %w", r.dir, err)
		r.sum.Error = err.Error()
		return &r.sum, err
	}
	if err := r.steps(ctx); err != nil {
		// A step cut short may fail with an error of its own (a
		// migration's progress stream that broke).
		if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
			err = fmt.Errorf("%w (%w)", err, cerr)
		}
		r.sum.Error = err.Error()
		return &r.sum, err
	}
	r.sum.OK = true
	return &r.sum, nil
}

// chooseMode picks the demo's mode, and says why when it is not the one
// that shows the most.
func chooseMode(m string) (mode, why string) {
	if m != ModeAuto && m != "" {
		return m, "--mode " + m
	}
	if os.Geteuid() != 0 {
		return ModeNetstack, "not running as root"
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return ModeNetstack, "no ip(8) (iproute2) on this machine"
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return ModeNetstack, "no /dev/net/tun on this machine"
	}
	return ModeNetns, ""
}

func (r *run) steps(ctx context.Context) error {
	if r.mode == ModeNetns {
		r.sayf("skybridge demo: three sites as network namespaces, each with its own gateway on a TUN device\n\n")
	} else {
		r.sayf("skybridge demo: %s, so the three sites are unprivileged netstack gateways on loopback\n\n", r.modeWhy)
	}
	if err := r.roomFor(); err != nil {
		return err
	}
	// An interruption stops it between steps, not only inside them: a
	// step begun after it would fail for it, and blame something else.
	for _, step := range []func() error{
		r.makeIdentities,
		func() error { return r.startSites(ctx) },
		func() error { return r.converge(ctx) },
		func() error {
			img, format, err := r.makeImage()
			if err == nil {
				r.img, r.format = img, format
			}
			return err
		},
		func() error { return r.migrate(ctx, r.img, r.format) },
		func() error { return r.deny(ctx, r.img) },
		r.audit,
	} {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := step(); err != nil {
			return err
		}
	}
	r.summary()
	return ctx.Err()
}

// makeIdentities creates the mesh CA, signs the bank's policy and issues
// one identity per site.
func (r *run) makeIdentities() error {
	var err error
	r.ca, err = certs.InitCA(filepath.Join(r.dir, "ca"), certs.InitOptions{Name: "skybridge demo"})
	if err != nil {
		return err
	}
	polPath := filepath.Join(r.dir, "residency.hcl")
	if err := atomicfile.WriteFile(polPath, examples.Residency, 0o644); err != nil {
		return err
	}
	sig, err := policy.Sign(polPath, examples.Residency, r.ca.Signer(), r.ca.Certificate().Subject.CommonName, nil, time.Now())
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(polPath+".sig", sig.Marshal(), 0o644); err != nil {
		return err
	}
	r.sum.Policy = sig.Policy.String()
	for _, s := range r.sites {
		s.Dir = filepath.Join(r.dir, s.Short)
		id, err := r.ca.IssueIdentity(certs.Attributes{
			Node: "gw-" + s.Short, Site: s.Site, Region: s.Region, Provider: s.Provider, Jurisdiction: s.Jurisdiction,
			OverlayIP: netip.AddrFrom4([4]byte{100, 96, 0, s.Host}), Routes: []netip.Prefix{netip.MustParsePrefix(s.Route)}, Labels: s.labels(),
		}, 24*time.Hour, time.Now())
		if err != nil {
			return err
		}
		tb, err := r.ca.TrustBundle()
		if err != nil {
			return err
		}
		idDir := filepath.Join(s.Dir, "identity")
		if err := id.Save(idDir, tb); err != nil {
			return err
		}
		if err := r.ca.CopyGossipKeyring(context.Background(), idDir); err != nil {
			return err
		}
	}
	r.sayf("▸ mesh CA created (ECDSA P-256); gateway identities issued for %s\n", r.siteNames())
	r.sayf("▸ residency policy %s signed by the mesh CA\n", r.sum.Policy)
	return nil
}

func (r *run) siteNames() string {
	var n []string
	for _, s := range r.sites {
		n = append(n, s.Site+" ("+s.Jurisdiction+")")
	}
	return strings.Join(n, ", ")
}

// startSites builds the sites and starts one gateway process per site.
func (r *run) startSites(ctx context.Context) error {
	gossip := map[string]netip.AddrPort{}
	wgPort := map[string]int{}
	var ports []int // gossip and WireGuard per site, then the enrolment listener
	if r.mode == ModeNetns {
		if err := r.netns(); err != nil {
			return err
		}
		for _, s := range r.sites {
			gossip[s.Short] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, s.Host}), 7946)
			wgPort[s.Short] = 51820
		}
	} else {
		var err error
		if ports, err = freeport.Loopback(2*len(r.sites) + 1); err != nil {
			return err
		}
		for i, s := range r.sites {
			gossip[s.Short] = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(ports[2*i]))
			wgPort[s.Short] = ports[2*i+1]
		}
	}
	seeds := fmt.Sprintf("[%q, %q]", gossip["zrh"].String(), gossip["fra"].String())
	for _, s := range r.sites {
		s.Config = filepath.Join(s.Dir, "gateway.hcl")
		s.Socket = filepath.Join(s.Dir, "control.sock")
		// As root each site has its own namespace, so each gateway's
		// dashboard can have the default port; on shared loopback each
		// takes a free one (`skybridge dashboard` prints where).
		mode, profile, operator := "tun", "lan", "127.0.0.1:7480"
		if r.mode == ModeNetstack {
			mode, profile, operator = "netstack", "local", "127.0.0.1:0"
		}
		s.Iface = fmt.Sprintf("sbd%s%d", r.id, s.Host)
		// Zurich, the bank's own rack, holds the mesh CA: it can open
		// burst sites (`skybridge burst up`) and enrol their gateways.
		identity := fmt.Sprintf("identity {\n  dir = %q\n}\n", filepath.Join(s.Dir, "identity"))
		if s == r.sites[0] {
			enroll := ""
			if r.mode == ModeNetstack {
				enroll = fmt.Sprintf("enroll {\n  listen = \"127.0.0.1:%d\"\n}\n", ports[2*len(r.sites)])
			}
			identity = fmt.Sprintf("identity {\n  dir    = %q\n  ca_dir = %q\n}\n%s", filepath.Join(s.Dir, "identity"), r.ca.Dir(), enroll)
		}
		cfg := fmt.Sprintf(`state_dir = %q
node {
  name         = "gw-%s"
  site         = %q
  region       = %q
  provider     = %q
  jurisdiction = %q
  overlay_ip   = "100.96.0.%d"
  routes       = [%q]
  labels       = %s
}
%sgossip {
  bind    = %q
  seeds   = %s
  profile = %q
}
wireguard {
  interface  = %q
  port       = %d
  mode       = %q
  behind_nat = true
}
policy {
  file = %q
}
operator {
  listen = %q
}
`, s.Dir, s.Short, s.Site, s.Region, s.Provider, s.Jurisdiction, s.Host, s.Route, labelsHCL(s), identity,
			gossip[s.Short].String(), seeds, profile, s.Iface, wgPort[s.Short], mode, filepath.Join(r.dir, "residency.hcl"), operator)
		if err := atomicfile.WriteFile(s.Config, []byte(cfg), 0o644); err != nil {
			return err
		}
		args := []string{r.opt.Exe, "gateway", "run", "--config", s.Config}
		if r.mode == ModeNetns {
			args = append([]string{"ip", "netns", "exec", s.NS}, args...)
		}
		logf, err := os.Create(filepath.Join(s.Dir, "gateway.log"))
		if err != nil {
			return err
		}
		s.cmd = exec.Command(args[0], args[1:]...)
		s.cmd.Env = gatewayEnv(os.Environ())
		s.cmd.Stdout, s.cmd.Stderr = logf, logf
		// Its own process group: Ctrl-C in the terminal reaches the demo,
		// which stops the gateways itself (or leaves them, with --keep).
		s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := s.cmd.Start(); err != nil {
			logf.Close()
			return fmt.Errorf("start gateway of %s: %w", s.Site, err)
		}
		logf.Close()
		r.recordState()
	}
	if r.mode == ModeNetns {
		r.sayf("▸ sites are network namespaces on 192.0.2.0/24 (a bridge stands in for the WAN); a gateway runs in each: %s\n", r.nsNames())
	} else {
		r.sayf("▸ a gateway per site runs on loopback with its own userspace network stack\n")
	}
	return nil
}

// labels are the site's certificate labels.
func (s *site) labels() map[string]string {
	labels := map[string]string{"classes": s.Classes}
	if s.Certified != "" {
		labels["certified"] = s.Certified
	}
	if s.CPU != "" {
		labels[migrate.LabelCapacityCPU], labels[migrate.LabelCapacityMemory] = s.CPU, s.MemoryGiB
	}
	maps.Copy(labels, s.Attests)
	return labels
}

func labelsHCL(s *site) string {
	labels := s.labels()
	var kv []string
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		kv = append(kv, fmt.Sprintf("%s = %q", k, labels[k]))
	}
	return "{ " + strings.Join(kv, ", ") + " }"
}

func (r *run) nsNames() string {
	var n []string
	for _, s := range r.sites {
		n = append(n, s.NS)
	}
	return strings.Join(n, ", ")
}

// netns builds the underlay: a bridge in a "wan" namespace and a veth from
// each site namespace to it. Nothing touches the host's own interfaces.
func (r *run) netns() error {
	ip := func(c ...string) error {
		if out, err := tool("ip", c...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(c, " "), err, bytes.TrimSpace(out))
		}
		return nil
	}
	// Each name is the run's once its namespace was made here: one that
	// was there already (a kept demo's) is not removed at the cleanup.
	wan := "sbd" + r.id + "wan"
	if err := ip("netns", "add", wan); err != nil {
		// The first thing the demo does that takes privileges: without
		// them ip says only "Operation not permitted".
		return fmt.Errorf("make the sites' network namespaces: %w: --mode netns needs root (CAP_SYS_ADMIN); run the demo as root, or with --mode netstack for unprivileged gateways on loopback", err)
	}
	r.wanNS = wan
	r.recordState()
	cmds := [][]string{{"-n", r.wanNS, "link", "set", "lo", "up"},
		{"-n", r.wanNS, "link", "add", "br0", "type", "bridge"}, {"-n", r.wanNS, "link", "set", "br0", "up"}}
	for _, s := range r.sites {
		ns := "sbd" + r.id + s.Short
		if err := ip("netns", "add", ns); err != nil {
			return err
		}
		s.NS = ns
		r.recordState()
		in, out := "u"+r.id+s.Short, "w"+r.id+s.Short
		cmds = append(cmds,
			[]string{"link", "add", in, "netns", s.NS, "type", "veth", "peer", "name", out, "netns", r.wanNS},
			[]string{"-n", r.wanNS, "link", "set", out, "master", "br0"},
			[]string{"-n", r.wanNS, "link", "set", out, "up"},
			[]string{"-n", s.NS, "link", "set", "lo", "up"},
			[]string{"-n", s.NS, "addr", "add", fmt.Sprintf("192.0.2.%d/24", s.Host), "dev", in},
			[]string{"-n", s.NS, "link", "set", in, "up"},
		)
	}
	for _, c := range cmds {
		if err := ip(c...); err != nil {
			return err
		}
	}
	// The gateways route their sites' networks, as real ones do, which a
	// new namespace's host does not forward (the gateway warns of it).
	for _, s := range r.sites {
		if out, err := tool("ip", "netns", "exec", s.NS, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward").CombinedOutput(); err != nil {
			return fmt.Errorf("turn IP forwarding on in %s: %v: %s", s.NS, err, bytes.TrimSpace(out))
		}
	}
	return nil
}

// converge waits until every gateway has a verified tunnel with a
// WireGuard handshake to each of the others, and shows the table.
func (r *run) converge(ctx context.Context) error {
	start := time.Now()
	deadline := start.Add(45 * time.Second)
	for {
		ok, sites := r.meshState(ctx)
		if ok {
			r.sum.Converged, r.sum.Converge, r.sum.Sites = true, time.Since(start).Seconds(), sites
			break
		}
		if time.Now().After(deadline) {
			r.sum.Sites = sites
			// The logs go with the work directory: their ends go with
			// the error.
			var b strings.Builder
			for _, s := range sites {
				fmt.Fprintf(&b, "\n  %s: tunnels to %v, %d with a handshake", s.Site, s.Tunnels, s.Handshakes)
			}
			for _, s := range r.sites {
				fmt.Fprintf(&b, "\n--- the end of %s's gateway log ---\n%s", s.Site, s.logTail(1200))
			}
			return fmt.Errorf("the mesh did not converge in 45 s:%s", b.String())
		}
		if err := r.alive(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	r.sayf("▸ mesh converged in %.1f s: every site has a verified WireGuard tunnel to the others\n\n", r.sum.Converge)
	if r.opt.Out != nil {
		tw := tabwriter.NewWriter(r.opt.Out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  SITE\tGATEWAY\tJURISDICTION\tOVERLAY\tTUNNELS\tHANDSHAKES")
		for _, s := range r.sum.Sites {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%d/%d\n", s.Site, s.Node, s.Jurisdiction, s.OverlayIP, strings.Join(s.Tunnels, ", "), s.Handshakes, len(s.Tunnels))
		}
		tw.Flush()
		fmt.Fprintln(r.opt.Out)
	}
	return nil
}

// alive reports a gateway that exited.
func (r *run) alive() error {
	for _, s := range r.sites {
		if s.cmd != nil && s.cmd.Process != nil && s.exited() {
			return fmt.Errorf("the gateway of %s exited (%v):\n%s", s.Site, s.cmd.ProcessState, s.logTail(2000))
		}
	}
	return nil
}

// exited reports whether the site's gateway has exited. It looks without
// reaping (WNOWAIT), so that until then the number stays our child's, and
// reaps one that has through Wait: its os.Process then knows it is done
// and signals nothing, and state() leaves out its number, which from then
// on may be another program's.
func (s *site) exited() bool {
	if s.cmd == nil || s.cmd.Process == nil || s.cmd.ProcessState != nil {
		return true
	}
	var info unix.Siginfo
	err := unix.Waitid(unix.P_PID, s.cmd.Process.Pid, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	// ECHILD cannot come: Go handles SIGCHLD itself, so the child waits
	// for us, whatever disposition the demo inherited.
	if err != nil || info.Signo == 0 {
		return false
	}
	s.cmd.Wait()
	return true
}

// logTail is the last n bytes of the site's gateway log: the log goes
// with the work directory, its end with an error.
func (s *site) logTail(n int) []byte {
	b, _ := os.ReadFile(filepath.Join(s.Dir, "gateway.log"))
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

func (r *run) meshState(ctx context.Context) (bool, []SiteSummary) {
	ok := true
	var out []SiteSummary
	for _, s := range r.sites {
		sum := SiteSummary{Site: s.Site, Node: "gw-" + s.Short, Jurisdiction: s.Jurisdiction, OverlayIP: fmt.Sprintf("100.96.0.%d", s.Host), Socket: s.Socket}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := mesh.NewClient(s.Socket).Status(cctx)
		cancel()
		if err != nil {
			ok = false
			out = append(out, sum)
			continue
		}
		for _, m := range st.Members {
			if m.Peer {
				sum.Tunnels = append(sum.Tunnels, m.Site)
				if !m.LastHandshake.IsZero() {
					sum.Handshakes++
				}
			}
		}
		slices.Sort(sum.Tunnels)
		if len(sum.Tunnels) != len(r.sites)-1 || sum.Handshakes != len(sum.Tunnels) {
			ok = false
		}
		out = append(out, sum)
	}
	return ok, out
}

// needSpace is what the demo writes under its directory at most: the
// image (210 MiB allocated), a qcow2 copy of it while converting, the
// destination's copy and its receiver's spare, the audit logs.
const needSpace = 600 << 20

// roomFor refuses, before anything starts, a directory without room for
// the demo: short of it, the demo failed after the mesh had converged,
// with the receiver's refusal.
func (r *run) roomFor() error {
	var st syscall.Statfs_t
	if err := syscall.Statfs(r.dir, &st); err != nil || st.Blocks == 0 || st.Bsize <= 0 {
		return nil // not known (a file system that does not say): the steps say when they run out
	}
	if st.Bavail < needSpace/uint64(st.Bsize) {
		free := int64(st.Bavail) * st.Bsize
		return fmt.Errorf("%s has %s free; the demo needs %s (an image, its copy at the destination): free some, or point TMPDIR elsewhere", r.dir, units.Bytes(free), units.Bytes(needSpace))
	}
	return nil
}

// makeImage makes the VM image to move: a qcow2 by qemu-img when it is
// installed, else a sparse raw image. 2 GiB virtual, about 10 % allocated.
func (r *run) makeImage() (string, string, error) {
	raw := filepath.Join(r.dir, "vm.raw")
	f, err := os.Create(raw)
	if err != nil {
		return "", "", err
	}
	const size, stride, block = 2 << 30, 100 << 20, 10 << 20
	f.Truncate(size)
	buf := make([]byte, block)
	for off, k := int64(0), 0; off+block <= size; off, k = off+stride, k+1 {
		if k%2 == 0 {
			rand.Read(buf) // like compressed or encrypted data
		} else {
			const text = "risk model inputs, pseudonymised "
			for i := range buf {
				buf[i] = text[i%len(text)]
			}
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			f.Close()
			return "", "", err
		}
	}
	f.Close()
	if q, err := exec.LookPath("qemu-img"); err == nil {
		img := filepath.Join(r.dir, "vm.qcow2")
		out, err := tool(q, "convert", "-O", "qcow2", raw, img).CombinedOutput()
		if err == nil {
			os.Remove(raw)
			r.sayf("▸ VM image vm.qcow2 made with qemu-img: 2.0 GiB virtual, %s on disk\n", units.Bytes(onDisk(img)))
			return img, migrate.FormatQcow2, nil
		}
		os.Remove(img) // what a convert cut short (a full disk) wrote
		r.sayf("  (qemu-img convert failed: %s; the demo goes on with the raw image)\n", bytes.TrimSpace(out))
		r.sayf("▸ VM image vm.raw (sparse raw): 2.0 GiB virtual, %s on disk\n", units.Bytes(onDisk(raw)))
		return raw, migrate.FormatRaw, nil
	}
	r.sayf("▸ VM image vm.raw (sparse raw; install qemu-utils for qcow2): 2.0 GiB virtual, %s on disk\n", units.Bytes(onDisk(raw)))
	return raw, migrate.FormatRaw, nil
}

func onDisk(path string) int64 {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// migrate moves the image from the Zurich rack to the EU region and
// verifies it there.
func (r *run) migrate(ctx context.Context, img, format string) error {
	zrh, fra := r.sites[0], r.sites[1]
	r.sayf("▸ migrating it from %s to %s as class pii-eu (EU personal data: allowed in the EEA and Switzerland)\n", zrh.Site, fra.Site)
	var bar *progress.Bar
	if r.opt.Bars != nil {
		bar = progress.New(r.opt.Bars, "  vm")
	}
	ev, err := mesh.NewClient(zrh.Socket).Migrate(ctx, mesh.MigrationRequest{Image: img, To: fra.Site, Class: "pii-eu", Format: format, Name: "vm"}, func(e mesh.MigrationEvent) {
		if bar != nil && e.Progress != nil {
			bar.Update(e.Progress)
		}
	})
	ok := err == nil && ev.Record != nil && ev.Record.State == migrate.StateDone
	if bar != nil {
		bar.Finish(ok)
	}
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("migration failed: %s", ev.Error)
	}
	rec := ev.Record
	m := &r.sum.Migration
	*m = MigrationSummary{ID: rec.ID, Image: filepath.Base(img), Format: format, From: zrh.Site, To: fra.Site, Class: "pii-eu",
		Virtual: rec.Stats.VirtualBytes, OnDisk: onDisk(img), Sent: rec.Stats.BytesSent, Seconds: rec.Stats.Duration.Seconds(), Root: rec.Root.String()}
	rep, err := mesh.NewClient(fra.Socket).VerifyImage(ctx, "vm")
	if err != nil {
		return fmt.Errorf("verify at the destination: %w", err)
	}
	m.Verified, m.ReceivedRoot, m.StoredAt = rep.OK && rep.Root == rec.Root, rep.Root.String(), rep.Path
	m.QemuCompare = "skipped: qemu-img not installed"
	if q, err := exec.LookPath("qemu-img"); err == nil {
		out, err := tool(q, "compare", img, rep.Path).CombinedOutput()
		if err == nil && bytes.Contains(out, []byte("Images are identical")) {
			m.QemuCompare = "identical"
		} else {
			m.QemuCompare = "DIFFERENT: " + string(bytes.TrimSpace(out))
			m.Verified = false
		}
	}
	r.sayf("▸ %s in %.2f s: %s on disk, %s sent through the tunnel; the destination re-read it: root %s… %s, qemu-img compare: %s\n",
		map[bool]string{true: "verified", false: "NOT VERIFIED"}[m.Verified], m.Seconds, units.Bytes(m.OnDisk), units.Bytes(m.Sent),
		m.Root[:16], map[bool]string{true: "matches", false: "differs"}[m.Verified], m.QemuCompare)
	if !m.Verified {
		return errors.New("the migrated image did not verify")
	}
	return nil
}

// deny tries to move the same image, as Swiss banking secrecy, to the US.
func (r *run) deny(ctx context.Context, img string) error {
	zrh, iad := r.sites[0], r.sites[2]
	r.sayf("\n▸ the same image as class swiss-banking-secret to %s:\n", iad.Site)
	ev, err := mesh.NewClient(zrh.Socket).Migrate(ctx, mesh.MigrationRequest{Image: img, To: iad.Site, Class: "swiss-banking-secret", Name: "vm-secret"}, func(mesh.MigrationEvent) {})
	if err != nil {
		return err
	}
	d := &r.sum.Denial
	d.Class, d.To = "swiss-banking-secret", iad.Site
	if ev.Record != nil {
		d.Sent = ev.Record.Stats.BytesSent
	}
	if ev.Denied == nil {
		return fmt.Errorf("the policy did not refuse swiss-banking-secret for the US: %+v", ev)
	}
	d.Refused, d.By, d.Rule, d.Reasons = true, ev.Denied.By, ev.Denied.Rule, ev.Denied.Reasons
	when := fmt.Sprintf("%d bytes sent", d.Sent)
	if d.By == "sender" && d.Sent == 0 && ev.Record != nil {
		when = "before a single byte left: 0 bytes sent"
	}
	r.sayf("  REFUSED by the residency policy at the %s, %s\n  rule: %s\n", d.By, when, d.Rule)
	for _, reason := range d.Reasons {
		r.sayf("  reason: %s\n", reason)
	}
	return nil
}

// audit verifies each gateway's signed audit log. A gateway that decided
// nothing (the receiver of a move its sender refused) has none yet; a log
// that does not verify fails the demo.
func (r *run) audit() error {
	tb, err := r.ca.TrustBundle()
	if err != nil {
		return fmt.Errorf("audit logs: %w", err)
	}
	r.sayf("\n▸ audit logs (signed by each gateway, hash-chained):")
	var bad []error
	for i, s := range r.sites {
		a := AuditSummary{Site: s.Site}
		// The source records the migration and the refusal, the
		// destination the migration; the third site saw neither.
		want := [...]int{2, 1, 0}[i]
		f, err := os.Open(filepath.Join(s.Dir, "audit.log"))
		switch {
		case errors.Is(err, os.ErrNotExist) && want == 0:
			a.Valid, a.Status = true, "nothing recorded"
		case errors.Is(err, os.ErrNotExist):
			a.Status = fmt.Sprintf("no audit log, and it should hold %d record(s)", want)
		case err != nil:
			a.Status = err.Error()
		default:
			rep, verr := audit.Verify(f, tb)
			f.Close()
			a.Records, a.Valid, a.Status = rep.Records, verr == nil && rep.Records >= want, fmt.Sprintf("%d record(s) valid", rep.Records)
			switch {
			case verr != nil:
				a.Status = "INVALID: " + verr.Error()
			case rep.Records < want:
				a.Status = fmt.Sprintf("%d record(s), and it should hold %d", rep.Records, want)
			}
		}
		if !a.Valid {
			bad = append(bad, fmt.Errorf("the audit log of %s: %s", s.Site, a.Status))
		}
		r.sum.Audit = append(r.sum.Audit, a)
		r.sayf(" %s %s;", s.Site, a.Status)
	}
	r.sayf("\n")
	return errors.Join(bad...)
}

func (r *run) summary() {
	m := r.sum.Migration
	r.sayf("\nsummary: %s image, %s on disk → %s sent (%.1f%% of its virtual size), %.2f s, %s; swiss-banking-secret to the US refused with %d bytes sent; the steps took %.1f s\n",
		units.Bytes(m.Virtual), units.Bytes(m.OnDisk), units.Bytes(m.Sent), 100*float64(m.Sent)/float64(max(m.Virtual, 1)), m.Seconds,
		map[bool]string{true: "verified end to end", false: "NOT verified"}[m.Verified], r.sum.Denial.Sent, time.Since(r.started).Seconds())
}

func (r *run) pokeCommands() []string {
	var out []string
	for _, s := range r.sites {
		out = append(out, fmt.Sprintf("%s status --socket %s", r.opt.Exe, s.Socket))
	}
	out = append(out, fmt.Sprintf("%s graph --socket %s --format svg --out mesh.svg", r.opt.Exe, r.sites[0].Socket))
	if r.mode == ModeNetns {
		// The dashboard listens on loopback inside the site's namespace.
		out = append(out, fmt.Sprintf("ip netns exec %s %s dashboard --socket %s   # then a browser in that namespace", r.sites[0].NS, r.opt.Exe, r.sites[0].Socket))
	} else {
		out = append(out, fmt.Sprintf("%s dashboard --socket %s   # the live dashboard's link", r.opt.Exe, r.sites[0].Socket))
	}
	if r.mode == ModeNetns {
		for _, s := range r.sites {
			out = append(out, fmt.Sprintf("ip netns exec %s wg show %s", s.NS, s.Iface))
		}
	}
	out = append(out, fmt.Sprintf("%s migrate list --socket %s", r.opt.Exe, r.sites[1].Socket))
	out = append(out, fmt.Sprintf("%s burst up --socket %s --site burst-dub --provider aws --region eu-west-1 --jurisdiction IE --ttl 1h --label classes=risk-batch --label certified=iso27001 --routes 10.9.0.0/16   # a one-hour cloud site the example policy lets store risk batches",
		r.opt.Exe, r.sites[0].Socket))
	out = append(out, fmt.Sprintf("%s demo --down %s", r.opt.Exe, r.dir))
	return out
}

// state is what --keep leaves for --down.
type state struct {
	Mode       string   `json:"mode"`
	Namespaces []string `json:"namespaces"`
	Ifaces     []string `json:"interfaces"`
	PIDs       []int    `json:"pids"`
}

const stateFile = "demo-state.json"

func (r *run) state() state {
	st := state{Mode: r.mode}
	if r.wanNS != "" {
		st.Namespaces = append(st.Namespaces, r.wanNS)
	}
	for _, s := range r.sites {
		if s.NS != "" {
			st.Namespaces = append(st.Namespaces, s.NS)
		}
		// Empty until the site's gateway is configured: "" is nothing
		// to remove, and --down would say it left it alone.
		if s.Iface != "" {
			st.Ifaces = append(st.Ifaces, s.Iface)
		}
		// One reaped is left out: its number may be another's now.
		if s.cmd != nil && s.cmd.Process != nil && s.cmd.ProcessState == nil {
			st.PIDs = append(st.PIDs, s.cmd.Process.Pid)
		}
	}
	return st
}

// recordState keeps what the run has started in its directory as it goes
// (namespaces, gateway processes): a run killed outright (SIGKILL, a
// crash) cannot clean up, and `skybridge demo --down DIR` then finds in
// it what to stop and remove.
func (r *run) recordState() error {
	return atomicfile.WriteJSON(filepath.Join(r.dir, stateFile), r.state(), 0o600)
}

func (r *run) saveState() error {
	if err := r.recordState(); err != nil {
		return err
	}
	r.sayf("\nthe mesh keeps running (--keep). Try:\n")
	for _, c := range r.sum.Poke {
		r.sayf("  %s\n", c)
	}
	return nil
}

// cleanup stops the gateways (SIGTERM, then SIGKILL) and removes the
// namespaces, their stale sockets and the work directory.
func (r *run) cleanup() error {
	if err := errors.Join(r.stopGateways(), teardown(r.state())); err != nil {
		// The directory stays, with what is left listed in its state
		// file, for --down to finish.
		r.recordState()
		return fmt.Errorf("%w; skybridge demo --down %s removes what is left", err, r.dir)
	}
	return os.RemoveAll(r.dir)
}

// stopGateways stops the run's gateways: SIGTERM, up to 10 s to exit,
// then SIGKILL. They are its children, signalled through their os.Process
// (a pidfd) and never by number, which once one has exited and been
// reaped may be another program's.
func (r *run) stopGateways() error {
	var running []*site
	for _, s := range r.sites {
		if !s.exited() {
			s.cmd.Process.Signal(syscall.SIGTERM)
			running = append(running, s)
		}
	}
	var errs []error
	deadline := time.Now().Add(10 * time.Second)
	for _, s := range running {
		for time.Now().Before(deadline) && !s.exited() {
			time.Sleep(50 * time.Millisecond)
		}
		if s.exited() {
			continue
		}
		s.cmd.Process.Kill()
		for end := time.Now().Add(2 * time.Second); !s.exited() && time.Now().Before(end); {
			time.Sleep(20 * time.Millisecond)
		}
		if !s.exited() {
			errs = append(errs, fmt.Errorf("the gateway of %s (pid %d) still runs after SIGKILL", s.Site, s.cmd.Process.Pid))
		}
	}
	return errors.Join(errs...)
}

// teardown removes the namespaces and UAPI sockets of st, and says what
// it could not. The gateways are stopped before: by the run itself, or by
// Down.
func teardown(st state) error {
	var errs []error
	for _, ns := range st.Namespaces {
		out, err := tool("ip", "netns", "del", ns).CombinedOutput()
		if _, serr := os.Stat(filepath.Join("/run/netns", ns)); err != nil && serr == nil {
			errs = append(errs, fmt.Errorf("network namespace %s: %v: %s (remove it with: ip netns del %s)", ns, err, strings.TrimSpace(string(out)), ns))
		}
	}
	for _, i := range st.Ifaces {
		if err := os.Remove(filepath.Join("/var/run/wireguard", i+".sock")); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// tool runs a program of the demo's (ip, qemu-img) in a process group of
// its own: Ctrl-C in the terminal reaches the demo, which stops between
// steps and cleans up, and not the program, which killed half-way would
// leave what it made (a namespace made and not yet recorded) or say only
// "signal: interrupt".
func tool(name string, args ...string) *exec.Cmd {
	c := exec.Command(name, args...)
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return c
}

// Down tears down a demo left running with --keep, and returns what it
// left alone and why. The state file is only as trustworthy as the
// directory, and a PID outlives its process: once a gateway has died its
// number may be another program's. So only a process that runs `gateway
// run` on a configuration inside dir is signalled, through a pidfd taken
// before the check, so that the process checked is the one signalled; and
// only namespaces and interfaces named the way the demo names them are
// removed.
func Down(dir string) (skipped []string, err error) {
	var st state
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s does not exist: nothing to stop (removed already?)", dir)
	}
	if found, err := atomicfile.ReadJSON(filepath.Join(dir, stateFile), &st); err != nil {
		return nil, err
	} else if !found {
		return nil, fmt.Errorf("%s is not a kept demo (no %s)", dir, stateFile)
	}
	root, err := filepath.Abs(dir)
	if err == nil {
		root, err = filepath.EvalSymlinks(root)
	}
	if err != nil {
		return nil, fmt.Errorf("demo directory %s: %w", dir, err)
	}
	procs, skipped := ownGateways(st.PIDs, root)
	stopProcesses(procs)
	own := state{Mode: st.Mode}
	// An empty name stands for nothing: a state file of an earlier
	// release has one for each site a run killed part way had not come
	// to.
	for _, ns := range st.Namespaces {
		if ns == "" {
			continue
		}
		if demoName(ns) {
			own.Namespaces = append(own.Namespaces, ns)
		} else {
			skipped = append(skipped, fmt.Sprintf("network namespace %q: not a name the demo gives", ns))
		}
	}
	for _, i := range st.Ifaces {
		if i == "" {
			continue
		}
		if demoName(i) {
			own.Ifaces = append(own.Ifaces, i)
		} else {
			skipped = append(skipped, fmt.Sprintf("interface %q: not a name the demo gives", i))
		}
	}
	if err := teardown(own); err != nil {
		return skipped, err
	}
	// What Run made, and the directory only if nothing else is in it:
	// --down is given a path by hand, and may be given the wrong one.
	var errs []error
	for _, name := range append(madeByRun(), stateFile) {
		if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return skipped, err
	}
	if err := os.Remove(dir); err != nil {
		var left []string
		if ents, rerr := os.ReadDir(dir); rerr == nil {
			for _, e := range ents {
				left = append(left, e.Name())
			}
		}
		if len(left) == 0 {
			return skipped, err
		}
		skipped = append(skipped, fmt.Sprintf("directory %s: it holds %s, which the demo did not make", dir, strings.Join(left, ", ")))
	}
	return skipped, nil
}

// madeByRun names what Run makes in its directory, besides stateFile.
func madeByRun() []string {
	names := []string{"ca", "residency.hcl", "residency.hcl.sig", "vm.raw", "vm.qcow2"}
	for _, s := range demoSites() {
		names = append(names, s.Short)
	}
	return names
}

// ownGateways opens the processes among pids that are gateways of the
// demo in root, and says why it skipped each other one.
func ownGateways(pids []int, root string) (procs []*os.Process, skipped []string) {
	for _, pid := range pids {
		if pid <= 0 {
			// kill(0) and kill(-1) mean process groups and everything.
			skipped = append(skipped, fmt.Sprintf("pid %d: not a process ID", pid))
			continue
		}
		p, _ := os.FindProcess(pid) // on Unix it always succeeds
		if why := notOurGateway(pid, root); why != "" {
			p.Release()
			// One that has ended is nothing left alone: a gateway of the
			// demo that died (or was stopped) before.
			if why != notRunning {
				skipped = append(skipped, fmt.Sprintf("pid %d: %s", pid, why))
			}
			continue
		}
		procs = append(procs, p)
	}
	return procs, skipped
}

// notRunning is notOurGateway's word for a process that has ended.
const notRunning = "no longer running"

// demoName reports whether name is one Run gives namespaces and
// interfaces: "sbd", its id and a site, nothing a path could climb out of.
func demoName(name string) bool {
	if !strings.HasPrefix(name, "sbd") || len(name) > 15 { // IFNAMSIZ-1
		return false
	}
	for _, c := range name {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// notOurGateway says why pid is not a gateway of the demo in root (an
// absolute path without symlinks), or "" if it is one: its command line is
// `<exe> gateway run ... --config <a file inside root>`.
func notOurGateway(pid int, root string) string {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	switch {
	case errors.Is(err, os.ErrNotExist):
		return notRunning
	case err != nil:
		return fmt.Sprintf("cannot tell what it runs (%v); stop it yourself if it is one of the demo's gateways", err)
	case len(raw) == 0:
		return "no longer running" // a zombie, or a kernel thread
	}
	args := strings.Split(strings.TrimSuffix(string(raw), "\x00"), "\x00")
	notOurs := fmt.Sprintf("it runs %q, not a gateway of this demo", strings.Join(args, " "))
	if len(args) < 3 || args[1] != "gateway" || args[2] != "run" {
		return notOurs
	}
	for i, a := range args {
		cfg, ok := strings.CutPrefix(a, "--config=")
		if !ok && a == "--config" && i+1 < len(args) {
			cfg, ok = args[i+1], true
		}
		if !ok || !filepath.IsAbs(cfg) {
			continue // the demo gives gateways absolute paths
		}
		if real, err := filepath.EvalSymlinks(cfg); err == nil {
			if rel, err := filepath.Rel(root, real); err == nil && filepath.IsLocal(rel) {
				return ""
			}
		}
	}
	return notOurs
}

// stopProcesses stops the demo's gateways, which are no longer our
// children: SIGTERM, up to 10 s to exit, then SIGKILL.
func stopProcesses(procs []*os.Process) {
	for _, p := range procs {
		p.Signal(syscall.SIGTERM)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, p := range procs {
		for time.Now().Before(deadline) && p.Signal(syscall.Signal(0)) == nil {
			time.Sleep(50 * time.Millisecond)
		}
		p.Kill()
		p.Release()
	}
}

// gatewayEnv is env without what an operator may have set for gateways,
// CAs and Vault of their own: a SKYBRIDGE_JOIN_TOKEN had every demo
// gateway try to enrol with it (and fail), a SKYBRIDGE_CONFIG names
// another configuration, and a VAULT_TOKEN is no demo gateway's to hold.
// The log's settings (SKYBRIDGE_LOG_LEVEL, _FORMAT) go on.
func gatewayEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(name, "VAULT_"):
		case name == "SKYBRIDGE_JOIN_TOKEN", name == "SKYBRIDGE_CONFIG", name == "SKYBRIDGE_SOCKET", name == "SKYBRIDGE_CA", name == "SKYBRIDGE_POLICY":
		default:
			out = append(out, kv)
		}
	}
	return out
}
