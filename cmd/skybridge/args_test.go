package main

import (
	"io"
	"net/http"
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
