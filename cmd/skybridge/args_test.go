package main

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// recordingSocket is a gateway's control socket that refuses every
// request, and the requests it was sent so far.
func recordingSocket(t *testing.T) (string, func() []string) {
	t.Helper()
	var mu sync.Mutex
	var reqs []string
	sock := controlSocket(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		reqs = append(reqs, r.Method+" "+r.URL.Path+" "+string(b))
		mu.Unlock()
		http.Error(w, "test gateway: no", http.StatusTeapot)
	})
	return sock, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(reqs)
	}
}

// TestCompletionNeverRuns: the completion script runs the words before
// the cursor with --generate-bash-completion appended; whatever they are,
// the command only completes. Reordered as a command line, the flag was
// taken for the value of --reason (`migrate remove vm1 --reason <TAB>`
// removed vm1), or for an argument after a "--".
func TestCompletionNeverRuns(t *testing.T) {
	sock, sent := recordingSocket(t)
	ran := 0
	for _, words := range []string{
		// A flag wanting its value, a flag and its value, a boolean,
		// the argument last, a flag being typed, a global flag.
		"migrate remove vm1 --socket SOCK --reason",
		"migrate remove vm1 --socket SOCK --reason CHG-1",
		"migrate remove vm1 --socket SOCK --reason CHG-1 --json",
		"migrate remove --socket SOCK --reason CHG-1 vm1",
		"migrate remove vm1 --socket SOCK --reason CHG-1 --rea",
		"migrate remove vm1 --socket SOCK --reason CHG-1 --log-level",
		"--log-level warn migrate remove vm1 --socket SOCK --reason CHG-1",
		// A "--" typed, or being typed.
		"migrate remove --socket SOCK --reason CHG-1 -- vm1",
		"migrate remove --socket SOCK --reason -- vm1",
		"migrate remove vm1 --socket SOCK --reason CHG-1 --",
		"migrate remove --socket SOCK --reason CHG-1 --",
	} {
		args := append(strings.Fields(strings.ReplaceAll(words, "SOCK", sock)), "--generate-bash-completion")
		if _, errs, code := runCLI(t, args...); code != 0 {
			t.Errorf("%s <TAB>: exit %d, %q; want completions", words, code, errs)
		}
		if reqs := sent(); len(reqs) > ran {
			t.Errorf("%s <TAB> ran the command: %q", words, reqs[ran:])
			ran = len(reqs)
		}
	}
}

// TestFlagWithoutValueRefused: a flag that takes a value, given last
// without one, is a usage error, whatever stands before it. It took the
// "--" put before the arguments for its value: `migrate remove vm1
// --reason` (the reason forgotten) removed vm1 for the reason "--".
func TestFlagWithoutValueRefused(t *testing.T) {
	sock, sent := recordingSocket(t)
	img := filepath.Join(t.TempDir(), "vm.raw")
	if err := os.WriteFile(img, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	ran := 0
	for _, tt := range []struct{ words, flag string }{
		{"migrate remove vm1 --socket SOCK --reason", "reason"},
		{"migrate remove --socket SOCK vm1 --reason", "reason"},
		{"migrate run IMG --to fra --socket SOCK --class", "class"},
		{"migrate remove vm1 --socket SOCK --reason CHG-1 --log-level", "log-level"},
	} {
		args := strings.Fields(strings.NewReplacer("SOCK", sock, "IMG", img).Replace(tt.words))
		if _, errs, code := runCLI(t, args...); code != 2 || !strings.Contains(errs, tt.flag) {
			t.Errorf("%s: exit %d, %q; want a usage error naming --%s", tt.words, code, errs, tt.flag)
		}
		if reqs := sent(); len(reqs) > ran {
			t.Errorf("%s ran the command: %q", tt.words, reqs[ran:])
			ran = len(reqs)
		}
	}
}
