// Package atomicfile writes files so that a reader, or a process that
// restarts after a crash, sees either the old content or the new content and
// never a torn mixture.
//
// The recipe is the classic one: write to a temporary name in the same
// directory, fsync the file, rename it over the final name, then fsync the
// directory so the rename itself is durable.
package atomicfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// WriteFile atomically replaces path with data, created with mode perm.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	tmp, err := writeTemp(path, data, perm)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rename %s into place: %w", path, err)
	}
	return SyncDir(filepath.Dir(path))
}

// WriteNew atomically creates path with data and fails with an error
// satisfying errors.Is(err, os.ErrExist) if path already exists. Unlike
// O_EXCL, the file never appears half-written: it is linked into place only
// once its content is durable.
func WriteNew(path string, data []byte, perm os.FileMode) error {
	tmp, err := writeTemp(path, data, perm)
	if err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil {
		os.Remove(tmp)
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s already exists: %w", path, os.ErrExist)
		}
		return fmt.Errorf("link %s into place: %w", path, err)
	}
	// The temporary name goes before the directory is synced: removed
	// after, a crash could bring it back, a second name of a secret
	// that outlives the file's replacement.
	os.Remove(tmp)
	return SyncDir(filepath.Dir(path))
}

// TempPattern is the glob of the temporary files written on the way to
// the file called base: what a crash leaves, for a caller that must not
// leave a secret behind.
func TempPattern(base string) string { return tempPrefix(base) + "*" }

func tempPrefix(base string) string { return "." + base + ".tmp-" }

// isTemp says whether name is one writeTemp gives on the way to base:
// its prefix and what os.CreateTemp puts for the star, a uint32 in
// decimal. Nothing else matches: not a file of the caller's that happens
// to begin the same way.
func isTemp(name, base string) bool {
	n, ok := strings.CutPrefix(name, tempPrefix(base))
	if !ok {
		return false
	}
	v, err := strconv.ParseUint(n, 10, 32)
	return err == nil && strconv.FormatUint(v, 10) == n
}

// RemoveTemps removes from dir the temporary files of writes to the
// files called names that never finished: their process died between
// making one and renaming it (kill -9, a crash, the power), and nothing
// else ever removes it. Each holds what its file was to hold: a private
// key, a whole index. Regular files named as writeTemp names them go,
// nothing else.
//
// A write under way loses its temporary file too, and fails (its rename
// finds nothing; the file it was to replace stays as it was). So call
// this holding the lock that every writer of these files holds, with
// minAge 0; or, where they hold none in common, give minAge, and only
// files last written longer ago than that go: a write lasts as long as
// an fsync, and one stalled longer (its process stopped) only fails.
func RemoveTemps(dir string, minAge time.Duration, names ...string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look for temporary files left in %s: %w", dir, err)
	}
	var errs []error
	removed := false
	for _, e := range ents {
		if !e.Type().IsRegular() || !slices.ContainsFunc(names, func(base string) bool { return isTemp(e.Name(), base) }) {
			continue
		}
		if minAge > 0 {
			fi, err := e.Info()
			if err != nil || time.Since(fi.ModTime()) < minAge {
				continue // gone meanwhile, or maybe a write under way
			}
		}
		path := filepath.Join(dir, e.Name())
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s, left by a write that never finished: %w", path, err))
			continue
		}
		removed = true
	}
	if removed {
		// Not brought back by a crash: it may be a secret's copy.
		if err := SyncDir(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func writeTemp(path string, data []byte, perm os.FileMode) (string, error) {
	// Said before anything is written: the rename would fail with a
	// message about a temporary file the caller never named.
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return "", fmt.Errorf("%s is a directory: name a file", path)
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, TempPattern(base))
	if err != nil {
		return "", fmt.Errorf("create temporary file for %s: %w", path, err)
	}
	name := f.Name()
	fail := func(step string, err error) (string, error) {
		f.Close()
		os.Remove(name)
		return "", fmt.Errorf("%s %s: %w", step, path, err)
	}
	// CreateTemp makes the file 0600; set the final mode explicitly so the
	// umask cannot loosen or tighten what the caller asked for.
	if err := f.Chmod(perm); err != nil {
		return fail("chmod", err)
	}
	if _, err := f.Write(data); err != nil {
		return fail("write", err)
	}
	if err := f.Sync(); err != nil {
		return fail("fsync", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(name)
		return "", fmt.Errorf("close %s: %w", path, err)
	}
	return name, nil
}

// SyncDir fsyncs a directory so that entries created or renamed in it
// survive a crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// WriteJSON atomically replaces path with v as JSON, created with mode
// perm. Compact: a gateway rewrites its member list every few seconds
// while the mesh changes, and indenting 1,000 members (1.2 MB) took five
// times as long as encoding them (10.6 against 2.1 ms); `jq .` reads it
// for people.
func WriteJSON(path string, v any, perm os.FileMode) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return WriteFile(path, append(b, '\n'), perm)
}

// ReadJSON decodes path into v. A missing file is not an error (found is
// false); a file that does not decode is, wrapping ErrDamaged, so callers
// can give advice for that case alone (not for one they could not read).
func ReadJSON(path string, v any) (found bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return true, fmt.Errorf("%s is %w: %w", path, ErrDamaged, err)
	}
	return true, nil
}

// ErrDamaged marks a file that exists but does not decode.
var ErrDamaged = errors.New("damaged")
