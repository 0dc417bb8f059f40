package migrate

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// TestInterruptedKeptPerPeer: a gateway's interrupted receives are kept
// for its resumes up to maxInterruptedPerPeer; past that, as another is
// interrupted, its oldest are forgotten, files and all. Another
// gateway's are not touched, nor the one just interrupted.
func TestInterruptedKeptPerPeer(t *testing.T) {
	p := newPair(t, "DE")
	// Receives of earlier sessions from gw-zrh, a day apart (the
	// oldest first), as many as are kept, and one of another gateway,
	// older than all.
	plant := func(id, from string, last time.Time) string {
		t.Helper()
		temp := filepath.Join(p.store, ".incoming", id+".raw")
		if err := os.WriteFile(temp, []byte("held"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(temp, last, last); err != nil {
			t.Fatal(err)
		}
		rec := RecvRecord{ID: id, Name: "img-" + id, From: from, FromSite: from + "-site", Class: "pii-eu", Format: FormatRaw, Size: 4096, ChunkSize: 4096,
			Temp: temp, State: StateRunning, Started: last.Add(-time.Hour), Attempted: last}
		if err := p.recvJ.put(bucketRecv, id, &rec); err != nil {
			t.Fatal(err)
		}
		return temp
	}
	now := time.Now()
	var planted []string
	for i := range maxInterruptedPerPeer {
		id := fmt.Sprintf("old%013d", i)
		plant(id, "gw-zrh", now.Add(-time.Duration(maxInterruptedPerPeer-i)*time.Hour))
		planted = append(planted, id)
	}
	otherTemp := plant("other0000000000", "gw-other", now.Add(-30*24*time.Hour))

	raw := filepath.Join(p.dir, "vm.raw")
	makeRaw(t, raw, 8*mib, map[int64]int{0: 8 * mib})
	rec, _ := p.interrupted(raw, 1)

	// The oldest of gw-zrh's goes, as the new one is settled.
	want := append(slices.Clone(planted[1:]), rec.ID)
	slices.Sort(want)
	var got []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		recs, err := p.recvJ.Receives()
		if err != nil {
			t.Fatal(err)
		}
		got = got[:0]
		for _, r := range recs {
			if r.From == "gw-zrh" {
				got = append(got, r.ID)
			}
		}
		slices.Sort(got)
		if slices.Equal(got, want) || time.Now().After(deadline) {
			break
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("gw-zrh's receives kept: %d, %v\nwant %d, all but the oldest planted (%s) and the one interrupted (%s)", len(got), got, len(want), planted[0], rec.ID)
	}
	if _, err := os.Stat(filepath.Join(p.store, ".incoming", planted[0]+".raw")); err == nil {
		t.Errorf("the incoming file of the receive forgotten is still there")
	}
	var other RecvRecord
	if err := p.recvJ.get(bucketRecv, "other0000000000", &other); err != nil {
		t.Errorf("another gateway's receive: %v", err)
	}
	if _, err := os.Stat(otherTemp); err != nil {
		t.Errorf("another gateway's incoming file: %v", err)
	}
}
