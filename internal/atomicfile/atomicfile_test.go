package atomicfile

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestWriteFileReplacesAndSetsMode: the file has the mode asked for, a
// key's 0600 or a trust bundle's 0644. The temporary file starts 0600,
// so only 0644 shows the mode is set: left as it was, the CA
// certificate and CRL a gateway writes for others to read would be
// readable by its user alone.
func TestWriteFileReplacesAndSetsMode(t *testing.T) {
	for _, perm := range []os.FileMode{0o600, 0o644} {
		dir := t.TempDir()
		p := filepath.Join(dir, "key")
		if err := WriteFile(p, []byte("one"), perm); err != nil {
			t.Fatal(err)
		}
		if err := WriteFile(p, []byte("two"), perm); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != "two" {
			t.Fatalf("content = %q, %v; want two", got, err)
		}
		st, _ := os.Stat(p)
		if st.Mode().Perm() != perm {
			t.Fatalf("mode = %v, want %v", st.Mode().Perm(), perm)
		}
		assertNoTemps(t, dir)
	}
}

func TestWriteNewRefusesExisting(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "ca.key")
	if err := WriteNew(p, []byte("first"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := WriteNew(p, []byte("second"), 0o600)
	if !errors.Is(err, os.ErrExist) {
		t.Fatalf("second WriteNew error = %v, want ErrExist", err)
	}
	got, _ := os.ReadFile(p)
	if string(got) != "first" {
		t.Fatalf("existing file was changed to %q", got)
	}
	assertNoTemps(t, dir)
}

func TestWriteFileMissingDir(t *testing.T) {
	err := WriteFile(filepath.Join(t.TempDir(), "no", "such", "file"), nil, 0o644)
	if err == nil {
		t.Fatal("expected error for missing directory")
	}
}

// TestWriteFileOntoDirectory: naming a directory is refused before
// anything is written, in words about the name given.
func TestWriteFileOntoDirectory(t *testing.T) {
	dir := t.TempDir()
	err := WriteFile(dir, []byte("x"), 0o644)
	if err == nil || !strings.Contains(err.Error(), "is a directory: name a file") {
		t.Fatalf("WriteFile onto a directory: %v", err)
	}
	assertNoTemps(t, filepath.Dir(dir))
}

func assertNoTemps(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if filepath.Ext(e.Name()) != "" && e.Name()[0] == '.' {
			t.Errorf("temporary file left behind: %s", e.Name())
		}
	}
}

func TestJSON(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	var got map[string]int
	if found, err := ReadJSON(path, &got); found || err != nil {
		t.Fatalf("missing file: found %v, %v", found, err)
	}
	// 0644, as the state a gateway keeps for others to read (its
	// adopted policy): the temporary file starts 0600.
	if err := WriteJSON(path, map[string]int{"a": 1}, 0o644); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil {
		t.Fatal(err)
	} else if st.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v, want 0644", st.Mode())
	}
	if found, err := ReadJSON(path, &got); !found || err != nil || got["a"] != 1 {
		t.Fatalf("round trip: %v %v %v", found, err, got)
	}
	os.WriteFile(path, []byte("{"), 0o600)
	if _, err := ReadJSON(path, &got); !errors.Is(err, ErrDamaged) {
		t.Fatalf("damaged file: %v", err)
	}
	// Unreadable is not damaged: no advice to repair or remove it.
	os.Remove(path)
	os.Mkdir(path, 0o700)
	if _, err := ReadJSON(path, &got); err == nil || errors.Is(err, ErrDamaged) {
		t.Fatalf("a directory in the file's place: %v", err)
	}
}

// TestLines: the last line is found from the end — past blank lines, a
// line longer than a read, an unfinished tail — and the tail is cut off.
func TestLines(t *testing.T) {
	long := strings.Repeat("x", 200<<10)
	for name, tc := range map[string]struct{ content, last, after string }{
		"empty":             {"", "", ""},
		"only a tail":       {"unfinished", "", ""},
		"one line":          {"a\n", "a", "a\n"},
		"tail cut off":      {"a\nb\nunfini", "b", "a\nb\n"},
		"blank lines after": {"a\nb\n\n  \n", "b", "a\nb\n\n  \n"},
		"a long last line":  {"a\n" + long + "\n", long, "a\n" + long + "\n"},
		"a long first line": {long + "\n\n", long, long + "\n\n"},
	} {
		path := filepath.Join(t.TempDir(), "log")
		if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		end, err := CutPartialLine(f)
		if err != nil {
			t.Fatal(err)
		}
		last, err := LastLine(f, end)
		f.Close()
		if err != nil || string(last) != tc.last {
			t.Errorf("%s: last line %.20q, %v; want %.20q", name, last, err, tc.last)
		}
		if b, _ := os.ReadFile(path); string(b) != tc.after || end != int64(len(tc.after)) {
			t.Errorf("%s: file after %.20q (end %d), want %.20q", name, b, end, tc.after)
		}
	}
}

// TestLastLine: the last line that is not blank, whole, however far back;
// a damaged file whose end holds no whole line within 2×MaxLine (40 MiB
// of zeros, say) is said to be damaged, not read into memory whole.
func TestLastLine(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	long := bytes.Repeat([]byte("y"), 100<<10) // longer than the first read
	f.Write([]byte("first\n"))
	f.Write(append(long, '\n'))
	f.Write([]byte("\n  \n"))
	end, _ := f.Seek(0, io.SeekEnd)
	if got, err := LastLine(f, end); err != nil || !bytes.Equal(got, long) {
		t.Fatalf("LastLine = %d bytes, %v; want the %d-byte line", len(got), err, len(long))
	}
	if err := f.Truncate(end + 40<<20); err != nil { // zeros, no newline
		t.Fatal(err)
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("\n"))
	end, _ = f.Seek(0, io.SeekEnd)
	if got, err := LastLine(f, end); err == nil || !strings.Contains(err.Error(), "no whole line in the last 32 MiB") {
		t.Fatalf("LastLine of a damaged end = %d bytes, %v; want it said damaged", len(got), err)
	}
}
