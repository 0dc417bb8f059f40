package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// What a test binary killed by go test's -timeout leaves: its lab's
// namespaces (with its processes, before childCommand), and the UAPI
// sockets of its gateways. Other test binaries may be running labs at the
// same time (another package's run, another developer's), so a lab is
// removed only once it is known to be nobody's.

// labRuns holds a record of each lab's owner, by lab ID: the test
// binary's PID and its start time, which tells a dead owner from a new
// process given the same PID. It is on /run, which a reboot empties with
// the namespaces.
const labRuns = "/run/skybridge-e2e"

// unownedAfter is how long a lab of a build from before the records, with
// no process in it, is left alone: longer than scripts/bench.sh gives any
// e2e run, so that it is not a lab of such a build still being set up.
const unownedAfter = time.Hour

// labNetns matches a lab's namespace names: "sb", the wan ("w"), LAN
// host ("h") or site's short name, and the lab ID.
var labNetns = regexp.MustCompile(`^sb([0-9a-z]{1,3})([0-9a-f]{6})$`)

// recordOwner records this test binary as the owner of lab id.
func recordOwner(id string) error {
	start, _, err := procStart(os.Getpid())
	if err == nil {
		err = os.MkdirAll(labRuns, 0o755)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(labRuns, id), fmt.Appendf(nil, "%d %d\n", os.Getpid(), start), 0o644)
	}
	if err != nil {
		return fmt.Errorf("record the owner of lab %s in %s (the next run removes by it what a killed run left): %w", id, labRuns, err)
	}
	return nil
}

// procStart is a process's start time (clock ticks since boot) and its
// parent's PID; err for a process that is gone, and for a zombie, whose
// children have already been handed on.
func procStart(pid int) (start uint64, ppid int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // f[0] is field 3, state
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	if f[0] == "Z" {
		return 0, 0, fmt.Errorf("process %d is a zombie", pid)
	}
	ppid, _ = strconv.Atoi(f[1])
	start, err = strconv.ParseUint(f[19], 10, 64)
	return start, ppid, err
}

// owner reads lab id's record: whether there is one, and whether the
// process it names still runs. A record that cannot be read counts as
// a live owner's.
func owner(id string) (recorded, alive bool, pid int) {
	b, err := os.ReadFile(filepath.Join(labRuns, id))
	if errors.Is(err, os.ErrNotExist) {
		return false, false, 0
	}
	var start uint64
	if _, err := fmt.Sscan(string(b), &pid, &start); err != nil {
		return true, true, 0
	}
	now, _, err := procStart(pid)
	return true, err == nil && now == start, pid
}

// netnsPIDs lists the processes in a namespace.
func netnsPIDs(ns string) []int {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if p, err := strconv.Atoi(f); err == nil {
			pids = append(pids, p)
		}
	}
	return pids
}

// sweepLabs removes the labs that earlier runs left: those whose owner has
// ended, and, of labs made before owners were recorded, those whose
// processes are all orphans (reparented to PID 1: whoever started them is
// gone) or that have had none for unownedAfter. It kills what still runs
// in them and removes their UAPI sockets, and says what it removed. It
// needs root, and does nothing without it.
func sweepLabs() {
	if os.Geteuid() != 0 {
		return
	}
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return // no ip(8): no lab could have been made
	}
	labs := map[string][]string{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if m := labNetns.FindStringSubmatch(f[0]); m != nil {
			labs[m[2]] = append(labs[m[2]], f[0])
		}
	}
	records, _ := os.ReadDir(labRuns)
	for _, r := range records {
		if _, ok := labs[r.Name()]; !ok {
			labs[r.Name()] = nil // a record whose namespaces are gone
		}
	}
	for id, nss := range labs {
		var pids []int
		for _, ns := range nss {
			pids = append(pids, netnsPIDs(ns)...)
		}
		recorded, alive, ownerPID := owner(id)
		var why string
		switch {
		case recorded && alive:
			continue
		case recorded:
			why = fmt.Sprintf("its test binary, PID %d, has ended", ownerPID)
		case !slices.Contains(nss, "sbw"+id):
			continue // not a lab: every lab has its wan
		case len(pids) > 0:
			if !orphans(pids) {
				continue // some started by a process outside that still runs
			}
			why = "made before labs recorded their owner; its processes are orphans"
		default:
			var st syscall.Stat_t
			if syscall.Stat("/run/netns/sbw"+id, &st) != nil || time.Since(time.Unix(st.Ctim.Unix())) < unownedAfter {
				continue
			}
			why = fmt.Sprintf("made before labs recorded their owner; nothing in it for over %s", unownedAfter)
		}
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
		var left []string
		for _, ns := range nss {
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				left = append(left, fmt.Sprintf("%s (%v: %s)", ns, err, strings.TrimSpace(string(out))))
			}
		}
		var socks []string
		for _, pattern := range []string{"sb" + id + "*.sock", "wg*" + id + "*.sock"} {
			m, _ := filepath.Glob(filepath.Join("/var/run/wireguard", pattern))
			socks = append(socks, m...)
		}
		for _, s := range socks {
			os.Remove(s)
		}
		if len(left) > 0 {
			fmt.Fprintf(os.Stderr, "e2e: lab %s of an earlier run (%s): could not remove %s; remove them with ip netns del\n", id, why, strings.Join(left, ", "))
			continue
		}
		os.Remove(filepath.Join(labRuns, id))
		if len(nss)+len(pids)+len(socks) > 0 {
			fmt.Fprintf(os.Stderr, "e2e: removed lab %s of an earlier run (%s): namespaces %v, %d processes killed, %d UAPI sockets\n", id, why, nss, len(pids), len(socks))
		}
	}
}

// orphans reports whether every process in pids was started by PID 1 or
// by another of pids: none by a process outside that still runs.
func orphans(pids []int) bool {
	for _, p := range pids {
		_, ppid, err := procStart(p)
		if err == nil && ppid != 1 && !slices.Contains(pids, ppid) {
			return false
		}
	}
	return true
}

// TestChildDiesWithTestBinary kills a process that started a child as the
// harness does, as go test's -timeout kills the test binary: the child
// must go too.
func TestChildDiesWithTestBinary(t *testing.T) {
	parent := exec.Command(os.Args[0])
	parent.Env = append(os.Environ(), helperEnv+"=parent")
	stdout, err := parent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	var child int
	_, err = fmt.Fscan(stdout, &child)
	if err != nil {
		parent.Process.Kill()
		parent.Wait()
		t.Fatalf("the helper's child: %v", err)
	}
	start, _, err := procStart(child)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if now, _, err := procStart(child); err == nil && now == start {
			syscall.Kill(child, syscall.SIGKILL)
		}
	})
	parent.Process.Signal(syscall.SIGKILL)
	parent.Wait()
	waitFor(t, 10*time.Second, fmt.Sprintf("the child, PID %d, killed with its parent", child), func() (bool, string) {
		now, _, err := procStart(child)
		return err != nil || now != start, "still running"
	})
}

// TestSweepLabs lays out the namespaces of four labs as killed runs and a
// running one leave them, and sweeps: only those nobody runs go.
func TestSweepLabs(t *testing.T) {
	requireRoot(t)
	ids := make([]string, 4)
	for i := range ids {
		b := make([]byte, 3)
		rand.Read(b)
		ids[i] = hex.EncodeToString(b)
	}
	dead, live, young, orphaned := ids[0], ids[1], ids[2], ids[3]
	var made []string
	t.Cleanup(func() {
		for _, ns := range made {
			for _, p := range netnsPIDs(ns) {
				syscall.Kill(p, syscall.SIGKILL)
			}
			exec.Command("ip", "netns", "del", ns).Run()
		}
		for _, id := range ids {
			os.Remove(filepath.Join(labRuns, id))
		}
	})
	netns := func(name string) {
		t.Helper()
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add %s: %v %s", name, err, out)
		}
		made = append(made, name)
	}

	// A killed run's lab, with a process still in it: its owner's PID is
	// this binary's, but with another start time, as when the PID has
	// been given to a new process since.
	netns("sbw" + dead)
	netns("sb1" + dead)
	start, _, _ := procStart(os.Getpid())
	os.MkdirAll(labRuns, 0o755)
	if err := os.WriteFile(filepath.Join(labRuns, dead), fmt.Appendf(nil, "%d %d\n", os.Getpid(), start+1), 0o644); err != nil {
		t.Fatal(err)
	}
	stray := exec.Command("ip", "netns", "exec", "sb1"+dead, "sleep", "300")
	if err := stray.Start(); err != nil {
		t.Fatal(err)
	}
	defer stray.Process.Kill()
	os.MkdirAll("/var/run/wireguard", 0o755)
	sock := "/var/run/wireguard/sb" + dead + "1.sock"
	if err := os.WriteFile(sock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(sock) })
	waitFor(t, 10*time.Second, "the stray process in its namespace", func() (bool, string) {
		return len(netnsPIDs("sb1"+dead)) == 1, fmt.Sprint(netnsPIDs("sb1" + dead))
	})

	// A running lab: this binary's.
	if err := recordOwner(live); err != nil {
		t.Fatal(err)
	}
	netns("sbw" + live)

	// A lab of a build from before the records, just made, nothing in it
	// yet: it may be being set up.
	netns("sbw" + young)

	// One from before the records whose process is an orphan: its
	// starter, a shell, is gone.
	netns("sbw" + orphaned)
	if out, err := exec.Command("sh", "-c", "ip netns exec sbw"+orphaned+" sleep 300 >/dev/null 2>&1 &").CombinedOutput(); err != nil {
		t.Fatalf("start an orphan: %v %s", err, out)
	}
	orphanIsPID1s := false
	waitFor(t, 10*time.Second, "the orphan in its namespace", func() (bool, string) {
		pids := netnsPIDs("sbw" + orphaned)
		if len(pids) != 1 {
			return false, fmt.Sprint(pids)
		}
		_, ppid, err := procStart(pids[0])
		orphanIsPID1s = err == nil && ppid == 1
		return err == nil, fmt.Sprint(pids)
	})

	sweepLabs()

	list, _ := exec.Command("ip", "netns", "list").Output()
	has := func(ns string) bool { return regexp.MustCompile(`(?m)^` + ns + `\b`).Match(list) }
	if has("sbw"+dead) || has("sb1"+dead) {
		t.Errorf("the killed run's namespaces are still there:\n%s", list)
	}
	if _, err := os.Stat(sock); err == nil {
		t.Errorf("the killed run's UAPI socket %s is still there", sock)
	}
	if _, err := os.Stat(filepath.Join(labRuns, dead)); err == nil {
		t.Errorf("the killed run's record is still there")
	}
	if !has("sbw" + live) {
		t.Errorf("the running lab's namespace was removed")
	}
	if !has("sbw" + young) {
		t.Errorf("a lab without a record, made just now, was removed")
	}
	switch {
	case orphanIsPID1s && has("sbw"+orphaned):
		t.Errorf("a lab without a record whose process is an orphan is still there")
	case !orphanIsPID1s && !has("sbw"+orphaned):
		t.Errorf("a lab without a record whose process was handed to a subreaper, not PID 1, was removed")
	case !orphanIsPID1s:
		t.Log("orphans here go to a subreaper, not PID 1: the lab of one is (rightly) kept")
	}
	// Our child: a zombie once killed, until waited for.
	waitFor(t, 5*time.Second, "the process in the killed run's lab killed", func() (bool, string) {
		_, _, err := procStart(stray.Process.Pid)
		return err != nil, "still running"
	})
	if err := stray.Wait(); err == nil || stray.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("the process in the killed run's lab: %v, want killed by SIGKILL", err)
	}
}
