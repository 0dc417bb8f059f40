package demo

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/audit"
)

// TestOwnGateways: a PID from the state file is signalled only if it is
// one of the demo's gateways; never 0 or -1 (process groups, everyone).
func TestOwnGateways(t *testing.T) {
	root := t.TempDir()
	tests := []struct {
		pid  int
		want string
	}{
		{0, "pid 0: not a process ID"},
		{-1, "pid -1: not a process ID"},
		{os.Getpid(), "not a gateway of this demo"}, // the test binary
	}
	for _, tt := range tests {
		procs, skipped := ownGateways([]int{tt.pid}, root)
		if len(procs) != 0 || len(skipped) != 1 || !strings.Contains(skipped[0], tt.want) {
			t.Errorf("pid %d: %d processes to stop, skipped %q; want none, and %q", tt.pid, len(procs), skipped, tt.want)
		}
	}
}

func TestDemoName(t *testing.T) {
	for name, want := range map[string]bool{
		"sbd1a2bwan": true, "sbd1a2bzrh": true, "sbd1a2b1": true,
		"eth0": false, "sbd../../etc/x": false, "sbd1a2b-x": false, "sbd0123456789abcd": false,
	} {
		if got := demoName(name); got != want {
			t.Errorf("demoName(%q) = %v, want %v", name, got, want)
		}
	}
}

// TestAuditWantsItsRecords: the demo's audit check fails when the source
// or the destination recorded nothing: a missing log read as "nothing
// recorded", valid, and the demo passed without its migration's records.
func TestAuditWantsItsRecords(t *testing.T) {
	r := &run{dir: t.TempDir(), sites: demoSites()}
	if err := r.makeIdentities(); err != nil {
		t.Fatal(err)
	}
	if err := r.audit(); err == nil || !strings.Contains(err.Error(), "should hold 2") || !strings.Contains(err.Error(), "should hold 1") {
		t.Fatalf("no audit logs: %v; want the source's and the destination's missing records said", err)
	}
	for i, n := range []int{2, 1} {
		id, err := certs.LoadNodeIdentity(filepath.Join(r.sites[i].Dir, "identity"))
		if err != nil {
			t.Fatal(err)
		}
		l := audit.Open(filepath.Join(r.sites[i].Dir, "audit.log"))
		for range n {
			if _, err := l.Append(id, "migration", nil, time.Now()); err != nil {
				t.Fatal(err)
			}
		}
	}
	r.sum.Audit = nil
	if err := r.audit(); err != nil {
		t.Fatalf("the records there: %v", err)
	}
}

// TestCleanupSignalsOnlyItsGateways: the cleanup of a run whose gateway
// exited signals none of the processes that came after it. alive() reaped
// the gateway by number (Wait4), so its number was free, and the cleanup
// sent SIGTERM, and 10 s later SIGKILL, to that number: to whatever
// process had it by then. Here another program's process is made to get
// the number, which the kernel does on request only in a PID namespace
// (ns_last_pid): the test runs itself again as PID 1 of one of its own.
func TestCleanupSignalsOnlyItsGateways(t *testing.T) {
	if os.Getenv(inPIDNamespace) == "" {
		rerunInPIDNamespace(t)
		return
	}
	r := &run{dir: t.TempDir(), sites: demoSites()}
	gw := r.sites[0]
	var pid int
	victim := "sleep\x0030\x00"
	isVictim := func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		return string(b) == victim
	}
	// The shell has the kernel give the number to its sleep: it sets
	// ns_last_pid itself, just before it starts the sleep. Set by the
	// test before it started the shell, the numbers went to whatever came
	// first (a thread the runtime started, on a loaded machine), the
	// shell took pid, and every try again with the same pid failed. A
	// thread may still come in the shell's moment: then again, with a new
	// gateway.
	for try := 0; !isVictim(); try++ {
		if try == 5 {
			t.Fatalf("could not have pid %d given to another program's process", pid)
		}
		gw.cmd = exec.Command("/bin/true") // a gateway that exits at once
		if err := gw.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pid = gw.cmd.Process.Pid
		for end := time.Now().Add(10 * time.Second); r.alive() == nil; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatal("alive() did not notice the gateway that exited")
			}
		}
		sh := exec.Command("sh", "-c", fmt.Sprintf("echo %d >/proc/sys/kernel/ns_last_pid; sleep 30; exit 0", pid-1))
		if err := sh.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sh.Process.Kill(); sh.Wait() })
		for end := time.Now().Add(10 * time.Second); !isVictim() && time.Now().Before(end); {
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.Cleanup(func() {
		if isVictim() {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	if st := r.state(); len(st.PIDs) != 0 {
		t.Errorf("the state lists pids %v, of which none is the demo's now", st.PIDs)
	}
	// What Run does after the error alive() returned. It signals what it
	// signals before it returns: the victim would be gone by then.
	if err := r.cleanup(); err != nil {
		t.Fatal(err)
	}
	if !isVictim() {
		t.Errorf("the cleanup killed pid %d, `sleep 30` of another program's, once the demo's gateway", pid)
	}
}

// inPIDNamespace is set in the environment of a test run again by
// rerunInPIDNamespace.
const inPIDNamespace = "SKYBRIDGE_TEST_IN_PID_NAMESPACE"

// rerunInPIDNamespace runs the test again as PID 1 of a PID namespace of
// its own (unshare(1), as root: CI runs the tests as root) and passes,
// skips or fails as it did there.
func rerunInPIDNamespace(t *testing.T) {
	t.Helper()
	unshare, err := exec.LookPath("unshare")
	if os.Geteuid() != 0 || err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("this test needs root and unshare(1) (util-linux) for a PID namespace; CI must run it as root")
		}
		t.Skip("needs root and unshare(1) for a PID namespace of its own")
	}
	cmd := exec.Command(unshare, "--pid", "--fork", "--mount-proc", os.Args[0], "-test.run", "^"+t.Name()+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), inPIDNamespace+"=1")
	out, err := cmd.CombinedOutput()
	switch {
	case err == nil && bytes.Contains(out, []byte("--- SKIP")):
		t.Skipf("in a PID namespace of its own it skipped:\n%s", out)
	case err == nil && bytes.Contains(out, []byte("--- PASS")):
	default:
		t.Fatalf("in a PID namespace of its own: %v\n%s", err, out)
	}
}

// TestCleanupStopsItsGateways: the cleanup stops a gateway still running,
// through its os.Process, and reaps it.
func TestCleanupStopsItsGateways(t *testing.T) {
	r := &run{dir: t.TempDir(), sites: demoSites()}
	gw := r.sites[1]
	gw.cmd = exec.Command("sleep", "30")
	if err := gw.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gw.cmd.Process.Kill() })
	if err := r.alive(); err != nil {
		t.Fatalf("a gateway that runs: %v", err)
	}
	if st := r.state(); len(st.PIDs) != 1 || st.PIDs[0] != gw.cmd.Process.Pid {
		t.Errorf("the state lists pids %v; want the gateway's, %d", st.PIDs, gw.cmd.Process.Pid)
	}
	if err := r.cleanup(); err != nil {
		t.Fatal(err)
	}
	if ps := gw.cmd.ProcessState; ps == nil || ps.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		t.Errorf("the gateway after the cleanup: %v; want it ended by SIGTERM, and reaped", ps)
	}
	if _, err := os.Stat(r.dir); !os.IsNotExist(err) {
		t.Errorf("the work directory is still there: %v", err)
	}
}

// panicOnce panics at its first write, as a bug in a step would, and
// keeps the rest.
type panicOnce struct {
	done bool
	buf  bytes.Buffer
}

func (p *panicOnce) Write(b []byte) (int, error) {
	if !p.done {
		p.done = true
		panic("a bug in a step")
	}
	return p.buf.Write(b)
}

// TestKeepDoesNotKeepACrashedRun: with --keep, a run that panicked is
// cleaned up, not kept. A panic unwinds through Run's deferred function
// with err nil, which took it for a success: it left everything, and
// said the mesh kept running.
func TestKeepDoesNotKeepACrashedRun(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "demo")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	out := &panicOnce{}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Run did not pass the panic on")
			}
		}()
		Run(context.Background(), Options{Mode: ModeNetstack, Keep: true, Exe: "/bin/false", Out: out, WorkDir: dir})
	}()
	if strings.Contains(out.buf.String(), "keeps running") {
		t.Errorf("a run that panicked says:\n%s", out.buf.String())
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("a run that panicked left its directory: %v", err)
	}
}

// TestDownOfAPartialRun: --down of a run killed before all its gateways
// were configured leaves nothing alone. The state file listed "" as the
// interface of each site not yet come to, and --down said it left alone
// interface "", "not a name the demo gives".
func TestDownOfAPartialRun(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "demo")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	r := &run{dir: dir, id: "abcdef", mode: ModeNetstack, sites: demoSites()}
	r.sites[0].Iface = "sbdabcdef1" // the first gateway's, as startSites sets it
	if err := r.recordState(); err != nil {
		t.Fatal(err)
	}
	if st := r.state(); len(st.Ifaces) != 1 {
		t.Errorf("the state lists interfaces %q; want only the first gateway's", st.Ifaces)
	}
	skipped, err := Down(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(skipped) != 0 {
		t.Errorf("--down of a partial run says it left alone: %q", skipped)
	}
	// A state file as written before, with the empty names in it.
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, stateFile), []byte(`{"mode":"netns","namespaces":["sbdabcdefwan",""],"interfaces":["sbdabcdef1","",""]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if skipped, err := Down(dir); err != nil || len(skipped) != 0 {
		t.Errorf("--down of an older partial run's state: left alone %q, %v", skipped, err)
	}
}

// stopAt blocks the write of a line holding at until released, as if the
// run were killed there: what it left is what is on disk meanwhile.
type stopAt struct {
	at               string
	reached, release chan struct{}
}

func (s *stopAt) Write(b []byte) (int, error) {
	if strings.Contains(string(b), s.at) {
		close(s.reached)
		<-s.release
	}
	return len(b), nil
}

// TestDownCleansARunKilledBeforeItsFirstGateway: --down removes what a run
// killed while it made its identities left, its CA's private key
// included. The state file was written first with the first namespace, or
// in netstack mode the first gateway, and --down refused the directory as
// "not a kept demo".
func TestDownCleansARunKilledBeforeItsFirstGateway(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "demo")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	out := &stopAt{at: "mesh CA created", reached: make(chan struct{}), release: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Run(ctx, Options{Mode: ModeNetstack, Exe: "/bin/false", Out: out, WorkDir: dir})
	}()
	defer func() { cancel(); close(out.release); <-done }()
	select {
	case <-out.reached:
	case <-done:
		t.Fatal("the run ended before it made its identities")
	}
	if _, err := os.Stat(filepath.Join(dir, "ca")); err != nil {
		t.Fatalf("no CA made: %v", err)
	}
	if skipped, err := Down(dir); err != nil || len(skipped) != 0 {
		t.Errorf("--down of a run killed while making its identities: left alone %q, %v", skipped, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the demo's directory, with its CA's private key, is still there: %v", err)
	}
}

// TestNetnsSaysWhatToDo: --mode netns without the privileges for network
// namespaces says to run as root or in netstack mode, not only ip's
// "Operation not permitted". ip is one that fails as it does then.
func TestNetnsSaysWhatToDo(t *testing.T) {
	bin := t.TempDir()
	const refusal = "mount --make-shared /run/netns failed: Operation not permitted"
	if err := os.WriteFile(filepath.Join(bin, "ip"), []byte("#!/bin/sh\necho '"+refusal+"' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin)
	r := &run{dir: t.TempDir(), id: "abcdef", mode: ModeNetns, sites: demoSites()}
	err := r.netns()
	if err == nil || !strings.Contains(err.Error(), refusal) || !strings.Contains(err.Error(), "as root") || !strings.Contains(err.Error(), "--mode netstack") {
		t.Errorf("ip refused: %v; want its refusal, and to run as root or with --mode netstack", err)
	}
	if st := r.state(); len(st.Namespaces) != 0 {
		t.Errorf("namespaces recorded though none was made: %q", st.Namespaces)
	}
}

// TestSecondsIncludeTheCleanup: the run's seconds count its cleanup, which
// takes seconds of its own. They were taken before it (and on failure not
// at all). Zurich's gateway here takes a second to stop; the others fail
// the run as they start.
func TestSecondsIncludeTheCleanup(t *testing.T) {
	exe := filepath.Join(t.TempDir(), "gateway")
	// The others exit only once Zurich's trap is set: Zurich's shell, not
	// run that far when the run failed (a loaded machine ran Frankfurt's
	// first), died of the SIGTERM at once, and the run took under a second.
	script := `#!/bin/sh
ready="$(dirname "$0")/zrh-trapped"
case "$4" in
*/zrh/*) trap 'sleep 1; exit 0' TERM; : >"$ready"; while :; do sleep 0.05; done ;;
esac
until [ -e "$ready" ]; do sleep 0.01; done
exit 1
`
	if err := os.WriteFile(exe, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sum, err := Run(context.Background(), Options{Mode: ModeNetstack, Exe: exe, WorkDir: t.TempDir()})
	took := time.Since(start).Seconds()
	if err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("a run whose gateways exit: %v", err)
	}
	if !sum.CleanedUp || sum.Seconds < 1 || sum.Seconds > took {
		t.Errorf("cleaned up: %v, in %.2f s by its summary, %.2f s by the clock; want its 1 s cleanup counted", sum.CleanedUp, sum.Seconds, took)
	}
}

// TestGatewayEnv: the demo's gateways start without the variables an
// operator set for gateways and Vault of their own (a join token in
// SKYBRIDGE_JOIN_TOKEN had each try to enrol), and with the rest, the
// log's settings included. Each
// gateway here writes down its environment and exits.
func TestGatewayEnv(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "gateway")
	// Named env.* once written whole: the run stops the gateways still
	// running when one has exited, and a shell stopped after it had
	// opened the file for env, before env wrote, left it empty.
	script := "#!/bin/sh\nenv > \"" + dir + "/.env.$$\" && mv \"" + dir + "/.env.$$\" \"" + dir + "/env.$$\"\nexit 1\n"
	if err := os.WriteFile(exe, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SKYBRIDGE_JOIN_TOKEN", "sbjt1.x")
	t.Setenv("VAULT_TOKEN", "hvs.x")
	t.Setenv("SKYBRIDGE_LOG_LEVEL", "debug")
	if _, err := Run(context.Background(), Options{Mode: ModeNetstack, Exe: exe, WorkDir: t.TempDir()}); err == nil {
		t.Fatal("a run whose gateways exit succeeded")
	}
	envs, _ := filepath.Glob(filepath.Join(dir, "env.*"))
	if len(envs) == 0 {
		t.Fatal("no gateway started")
	}
	for _, f := range envs {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		env := string(b)
		if strings.Contains(env, "SKYBRIDGE_JOIN_TOKEN") || strings.Contains(env, "VAULT_TOKEN") || !strings.Contains(env, "SKYBRIDGE_LOG_LEVEL=debug") {
			t.Errorf("a gateway's environment:\n%s\nwant it without the join token and Vault's token, with the log level", env)
		}
	}
}
