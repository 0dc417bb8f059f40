package migrate

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime/debug"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Journal is the durable record of migrations on one gateway (bbolt): for
// each side of each migration its parameters and state, the chunks the
// receiver has made durable and the sender has seen acknowledged, and the
// catalog of stored images with their manifests.
type Journal struct{ db *bolt.DB }

var (
	bucketSend   = []byte("send")
	bucketRecv   = []byte("recv")
	bucketImages = []byte("images")
	// bucketStoring holds the image a receiver is moving into place, from
	// before the rename until its catalog record is written (stagedImage).
	bucketStoring = []byte("storing")
	// bucketRemoving holds, by name, the images taken out of the catalog
	// to be removed, until the removal is audited and the file gone: a
	// stop between the two is finished at the next start.
	bucketRemoving = []byte("removing")
	// bucketAuditOwed holds, by migration ID, the audit records of images
	// stored while the audit log could not take them (a full disk, a
	// damaged log): written before the receiver's next record, or at its
	// next start (Receiver.payOwed).
	bucketAuditOwed = []byte("audit-owed")
)

func chunksBucket(side, id string) []byte { return []byte(side + ".chunks." + id) }

// OpenJournal opens (or creates) the journal file. A damaged one is an
// error naming it, not a panic deep in bbolt nor, for an empty file, a new
// journal in silence: the image catalog (what re-syncs build on) and the
// state of unfinished migrations are in it.
func OpenJournal(path string) (_ *Journal, err error) {
	damaged := func(why any) error {
		return fmt.Errorf("migration journal %s is damaged (%v): move it aside to start a new one — the catalog of stored images (a re-sync then sends everything) and unfinished migrations (they start over) go with it", path, why)
	}
	if fi, err := os.Stat(path); err == nil && fi.Size() == 0 {
		return nil, damaged("empty")
	}
	var db *bolt.DB
	// bbolt panics on some damaged pages, and a page past the end of a
	// file cut short faults (the file is mapped): a panic here, recovered.
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if db != nil {
				db.Close()
			}
			err = damaged(r)
		}
	}()
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return nil, fmt.Errorf("open migration journal %s: %w (is another gateway using this state directory?)", path, err)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrChecksum), errors.Is(err, berrors.ErrVersionMismatch), errors.Is(err, berrors.ErrInvalidMapping):
		return nil, damaged(err)
	case err != nil: // the file system's say (permissions, a read-only disk): not the file's fault
		return nil, fmt.Errorf("open migration journal %s: %w", path, err)
	}
	if err := db.View(func(tx *bolt.Tx) error {
		// Pages past the file's end are mapped but not there. Cut short
		// is told by the size; then every page is read here, on this
		// goroutine, where a fault on a damaged one is a panic recovered
		// (bbolt's own check runs on a goroutine of its own).
		fi, err := os.Stat(path)
		if err != nil {
			return err
		}
		if fi.Size() < tx.Size() {
			return fmt.Errorf("cut short: %d bytes, its pages reach to %d", fi.Size(), tx.Size())
		}
		return tx.ForEach(func(_ []byte, b *bolt.Bucket) error {
			return b.ForEach(func(_, _ []byte) error { return nil })
		})
	}); err != nil {
		db.Close()
		return nil, damaged(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketSend, bucketRecv, bucketImages, bucketStoring, bucketRemoving, bucketAuditOwed} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return &Journal{db: db}, nil
}

// Close closes the journal.
func (j *Journal) Close() error { return j.db.Close() }

func (j *Journal) put(bucket []byte, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return j.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Put([]byte(key), b) })
}

// ErrNotFound is the error of a journal record that does not exist.
var ErrNotFound = errors.New("not found")

func (j *Journal) get(bucket []byte, key string, v any) error {
	return j.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket).Get([]byte(key))
		if b == nil {
			return ErrNotFound
		}
		return json.Unmarshal(b, v)
	})
}

// hasKey reports whether bucket holds key.
func (j *Journal) hasKey(bucket []byte, key string) (has bool, err error) {
	err = j.db.View(func(tx *bolt.Tx) error {
		has = tx.Bucket(bucket).Get([]byte(key)) != nil
		return nil
	})
	return has, err
}

func (j *Journal) deleteKey(bucket []byte, key string) error {
	return j.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Delete([]byte(key)) })
}

func list[T any](j *Journal, bucket []byte) ([]T, error) {
	out := []T{} // empty, not null, in JSON listings
	err := j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).ForEach(func(_, v []byte) error {
			var t T
			if err := json.Unmarshal(v, &t); err != nil {
				return err
			}
			out = append(out, t)
			return nil
		})
	})
	return out, err
}

// addChunks records chunks as durable (receiver) or acknowledged (sender)
// in one transaction.
func (j *Journal) addChunks(side, id string, chunks map[int64]Hash) error {
	if len(chunks) == 0 {
		return nil
	}
	return j.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(chunksBucket(side, id))
		if err != nil {
			return err
		}
		// bbolt keeps the key and value slices until the transaction
		// commits: each entry needs its own.
		for i, h := range chunks {
			k := binary.BigEndian.AppendUint64(nil, uint64(i))
			if err := b.Put(k, append([]byte(nil), h[:]...)); err != nil {
				return err
			}
		}
		return nil
	})
}

// removeChunks forgets chunks of a migration.
func (j *Journal) removeChunks(side, id string, idx []int64) error {
	return j.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(chunksBucket(side, id))
		if b == nil {
			return nil
		}
		for _, i := range idx {
			if err := b.Delete(binary.BigEndian.AppendUint64(nil, uint64(i))); err != nil {
				return err
			}
		}
		return nil
	})
}

func (j *Journal) chunks(side, id string) (map[int64]Hash, error) {
	out := map[int64]Hash{}
	err := j.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(chunksBucket(side, id))
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			var h Hash
			copy(h[:], v)
			out[int64(binary.BigEndian.Uint64(k))] = h
			return nil
		})
	})
	return out, err
}

// sideSendZeros is the sender's record of the chunks it found all zeros,
// apart from the acknowledged ones: a release before it would read a zero
// entry there as a chunk acknowledged with that hash.
const sideSendZeros = "send-zeros"

// dropSent forgets what the sender recorded of migration id's chunks.
func (j *Journal) dropSent(id string) error {
	return errors.Join(j.dropChunks("send", id), j.dropChunks(sideSendZeros, id))
}

// SendsKept is how long the record of a send that ended stays in the
// journal (migrate list, the dashboard, a plan's view of what ran): the
// audit log keeps the lasting history. Every begin and end of a migration
// reads the records again, so without a bound a gateway that has moved
// thousands of images would read them all, each time, for ever.
const SendsKept = 90 * 24 * time.Hour

// ForgetStaleSends drops what the journal holds of the chunks of sends
// that ended unfinished (failed, cancelled, denied) over AbandonedAfter
// before now — about 100 bytes per chunk, so 100 MB for a TiB image that
// was never resumed — and the records of sends that ended over SendsKept
// before now, and returns how many of each. A resume after AbandonedAfter
// reads and sends every chunk again, as the receiver, which forgets its
// side after AbandonedAfter too, would need anyway; one after SendsKept
// finds no record, and is a new migration.
func (j *Journal) ForgetStaleSends(now time.Time) (chunks, records int, err error) {
	err = j.db.Update(func(tx *bolt.Tx) error {
		chunks, records = 0, 0
		var stale, gone []string
		err := tx.Bucket(bucketSend).ForEach(func(k, v []byte) error {
			var r SendRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("migration %s: %w", k, err)
			}
			// One whose audit record is still owed stays until written.
			ended := r.State != StateRunning && !r.Finished.IsZero() && !r.AuditPending
			if ended && now.Sub(r.Finished) > SendsKept {
				gone = append(gone, r.ID)
			}
			if ended && r.State != StateDone && now.Sub(r.Finished) > AbandonedAfter {
				stale = append(stale, r.ID)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, id := range stale {
			found := false
			for _, side := range []string{"send", sideSendZeros} {
				err := tx.DeleteBucket(chunksBucket(side, id))
				if err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
					return err
				}
				found = found || err == nil
			}
			if found {
				chunks++
			}
		}
		for _, id := range gone {
			for _, side := range []string{"send", sideSendZeros} { // a done one's, should a stop have left them
				if err := tx.DeleteBucket(chunksBucket(side, id)); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
					return err
				}
			}
			if err := tx.Bucket(bucketSend).Delete([]byte(id)); err != nil {
				return err
			}
			records++
		}
		return nil
	})
	return chunks, records, err
}

func (j *Journal) dropChunks(side, id string) error {
	return j.db.Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(chunksBucket(side, id)); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
			return err
		}
		return nil
	})
}

// stagedImage is an image being moved into place: its catalog record to
// be, and the file renamed onto its path (with its inode, which the path
// has once the rename is done).
type stagedImage struct {
	Image  ImageRecord `json:"image"`
	Source string      `json:"source"`
	Inode  uint64      `json:"inode"`
	// File is the source's whole identity, which its rename into place
	// keeps: an inode number alone is given out again as soon as the file
	// is freed. Entries of earlier releases hold only Inode.
	File     *SourceID `json:"file,omitempty"`
	Incoming string    `json:"incoming"` // the receive's file, removed once stored
	// Audit is the receiver's audit record of the migration, appended
	// once the image is in place; Audited says it was. A stop in between
	// leaves it to recoverStores, so no stored image lacks its record.
	Audit   map[string]any `json:"audit,omitempty"`
	Audited bool           `json:"audited,omitempty"`
}

// stagedImages lists the images being moved into place.
func (j *Journal) stagedImages() (map[string]stagedImage, error) {
	out := map[string]stagedImage{}
	err := j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketStoring).ForEach(func(k, v []byte) error {
			var st stagedImage
			if err := json.Unmarshal(v, &st); err != nil {
				return fmt.Errorf("image being stored by migration %s: %w", k, err)
			}
			out[string(k)] = st
			return nil
		})
	})
	return out, err
}

// owedRecord is an audit record a receiver owes (bucketAuditOwed).
type owedRecord struct {
	key, ID string
	Fields  map[string]any
}

// auditOwed lists the audit records owed, oldest first.
func (j *Journal) auditOwed() ([]owedRecord, error) {
	var out []owedRecord
	err := j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAuditOwed).ForEach(func(k, v []byte) error {
			o := owedRecord{key: string(k)}
			_, o.ID, _ = strings.Cut(o.key, ".")
			if err := json.Unmarshal(v, &o.Fields); err != nil {
				return fmt.Errorf("audit record owed for migration %s: %w", o.ID, err)
			}
			out = append(out, o)
			return nil
		})
	})
	return out, err
}

// storedImage records migration id's image in the catalog and forgets its
// receive — record, chunks, staging — in one transaction: a stop between
// them left the catalog describing the file the image replaced.
func (j *Journal) storedImage(id string, img *ImageRecord, owed map[string]any) error {
	v, err := json.Marshal(img)
	if err != nil {
		return err
	}
	var o []byte
	if owed != nil {
		if o, err = json.Marshal(owed); err != nil {
			return err
		}
	}
	return j.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketImages).Put([]byte(img.Name), v); err != nil {
			return err
		}
		// With the staged entry goes the only other copy of its record.
		// Keyed in the order owed, which is the order they are written.
		if o != nil {
			b := tx.Bucket(bucketAuditOwed)
			seq, err := b.NextSequence()
			if err != nil {
				return err
			}
			if err := b.Put(fmt.Appendf(nil, "%016x.%s", seq, id), o); err != nil {
				return err
			}
		}
		// A removal under way of the version this one replaced at its
		// path has no file left to remove: its file went with the
		// rename, and a later version's may be given its inode number.
		if v := tx.Bucket(bucketRemoving).Get([]byte(img.Name)); v != nil {
			var rm removal
			if err := json.Unmarshal(v, &rm); err != nil {
				return fmt.Errorf("removal of image %q under way: %w", img.Name, err)
			}
			if rm.Image.Path == img.Path && (rm.Inode != 0 || rm.File != nil) {
				rm.Inode, rm.File = 0, nil
				b, err := json.Marshal(rm)
				if err != nil {
					return err
				}
				if err := tx.Bucket(bucketRemoving).Put([]byte(img.Name), b); err != nil {
					return err
				}
			}
		}
		if err := tx.DeleteBucket(chunksBucket("recv", id)); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
			return err
		}
		if err := tx.Bucket(bucketRecv).Delete([]byte(id)); err != nil {
			return err
		}
		return tx.Bucket(bucketStoring).Delete([]byte(id))
	})
}

// SourceID identifies the exact source file a migration read, so a resume
// never mixes chunks of two versions of an image.
type SourceID struct {
	Size  int64     `json:"size"`
	MTime time.Time `json:"mtime"`
	Inode uint64    `json:"inode"`
	Dev   uint64    `json:"dev"`
	// CTime, which no program can set back as it can the mtime (`touch
	// -r`, `rsync -t --inplace`): an image rewritten in place and given
	// its old mtime again is still seen as changed. (So is one whose
	// mode, owner or links changed.) Records of releases before it have
	// none: their resume is judged without it, as they were, rather than
	// read the image again and ask the receiver for room for all of it.
	CTime time.Time `json:"ctime,omitzero"`
}

// Same reports whether two identities name the same unchanged file.
func (a SourceID) Same(b SourceID) bool {
	ctime := a.CTime.IsZero() || b.CTime.IsZero() || a.CTime.Equal(b.CTime)
	return a.Size == b.Size && a.MTime.Equal(b.MTime) && ctime && a.Inode == b.Inode && a.Dev == b.Dev
}

// Migration states.
const (
	StateRunning   = "running"
	StateDone      = "done"
	StateFailed    = "failed"
	StateDenied    = "denied"
	StateCancelled = "cancelled"
)

// SendRecord is the sender's record of a migration.
type SendRecord struct {
	ID     string   `json:"id"`
	Image  string   `json:"image"`
	Source SourceID `json:"source"`
	// SourceFormat is what the image was read as (raw or qcow2), which
	// a resume reads it as again; empty in records of earlier releases.
	SourceFormat string `json:"source_format,omitempty"`
	// ChunkSize is what the chunk indices of the journal mean.
	ChunkSize int64     `json:"chunk_size,omitempty"`
	Name      string    `json:"name"`
	Class     string    `json:"class"`
	Format    string    `json:"format"`
	To        string    `json:"to"` // destination node
	ToSite    string    `json:"to_site"`
	Streams   int       `json:"streams"`
	BWLimit   int64     `json:"bwlimit,omitempty"` // bytes per second
	State     string    `json:"state"`
	Error     string    `json:"error,omitempty"`
	Reasons   []string  `json:"reasons,omitempty"`
	Started   time.Time `json:"started"`
	Finished  time.Time `json:"finished,omitzero"`
	Root      Hash      `json:"root,omitzero"`
	Stats     Stats     `json:"stats"`
	// Restarted: an attempt started the chunks over (the source changed
	// since the one before); every attempt after says so in its offer
	// until the migration is done, as the receiver may hold stale chunks
	// of the first source beside the new ones until its commit.
	Restarted bool `json:"restarted,omitempty"`
	// AuditPending says the end is recorded here but not yet in the
	// audit log: a stop in between, or an audit log that refused the
	// record, leaves it to EndInterrupted (and AuditInterrupted) at the
	// next start or resume. AuditOwed is that record as the sender made
	// it (its decision, rule, reasons and exceptions), written then.
	AuditPending bool           `json:"audit_pending,omitempty"`
	AuditOwed    map[string]any `json:"audit_owed,omitempty"`
}

// RecvRecord is the receiver's record of a migration.
type RecvRecord struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	From      string `json:"from"`
	FromSite  string `json:"from_site"`
	Class     string `json:"class"`
	Format    string `json:"format"`
	Size      int64  `json:"size"`
	ChunkSize int64  `json:"chunk_size"`
	Temp      string `json:"temp"`
	// DataAt is where virtual offset 0 sits in Temp: 0 for raw; for
	// qcow2, after room for the metadata written at the end (records of
	// older versions have 0 and are converted instead).
	DataAt  int64     `json:"data_at,omitempty"`
	State   string    `json:"state"`
	Started time.Time `json:"started"`
	// Attempted is when the sender last offered it (zero in records
	// from before it was kept: Started then).
	Attempted time.Time `json:"attempted,omitzero"`
	// Restarted: an offer said its sender started the chunks over (its
	// source changed); the chunks held before may be stale until the
	// commit, so every later attempt gets room for all (Offer.Restarted).
	Restarted bool `json:"restarted,omitempty"`
}

// ImageRecord is a stored image in the receiver's catalog.
type ImageRecord struct {
	Name      string    `json:"name"`
	Path      string    `json:"path"`
	Format    string    `json:"format"`
	Class     string    `json:"class"`
	From      string    `json:"from"`
	FromSite  string    `json:"from_site"`
	Migration string    `json:"migration"`
	Received  time.Time `json:"received"`
	Root      Hash      `json:"root"`
	Manifest  Manifest  `json:"manifest"`
}

// Sends lists the sender's migrations.
func (j *Journal) Sends() ([]SendRecord, error) { return list[SendRecord](j, bucketSend) }

// Interrupted is the error of a send its gateway stopped running without
// recording how it ended (a crash, a kill, a full disk at its end).
const Interrupted = "interrupted: the gateway stopped during the migration; resume it"

// EndInterrupted marks the sends still recorded as running as failed, and
// returns them, with the ended sends whose audit record a stop left
// unwritten (AuditPending): the caller writes the records
// (AuditInterrupted, which clears it), and those it could not write come
// back at the next start. It is for a gateway starting, before it runs
// any: nothing runs those any more, and a client waiting for one to end
// would wait for ever.
func (j *Journal) EndInterrupted(now time.Time) ([]SendRecord, error) {
	var ended []SendRecord
	err := j.db.Update(func(tx *bolt.Tx) error {
		ended = nil
		b := tx.Bucket(bucketSend)
		err := b.ForEach(func(k, v []byte) error {
			var r SendRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("migration %s: %w", k, err)
			}
			switch {
			case r.State == StateRunning:
				r.State, r.Error, r.Finished, r.AuditPending = StateFailed, Interrupted, now, true
				ended = append(ended, r)
			case r.AuditPending:
				ended = append(ended, r)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, r := range ended { // a ForEach must not modify its bucket
			v, err := json.Marshal(&r)
			if err != nil {
				return err
			}
			if err := b.Put([]byte(r.ID), v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ended, nil
}

// Send returns one sender record.
func (j *Journal) Send(id string) (*SendRecord, error) {
	var r SendRecord
	if err := j.get(bucketSend, id, &r); err != nil {
		return nil, fmt.Errorf("migration %s: %w", id, err)
	}
	return &r, nil
}

// Images lists the stored images.
func (j *Journal) Images() ([]ImageRecord, error) { return list[ImageRecord](j, bucketImages) }

// Image returns one stored image: the catalog's record of it or, while a
// version moved into place at its path is not in the catalog yet (its
// record failed: a full disk), that version's, which is what the path
// holds: verified against the catalog's, an intact image would read as
// damaged.
func (j *Journal) Image(name string) (*ImageRecord, error) {
	var staged []stagedImage
	err := j.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketStoring).ForEach(func(k, v []byte) error {
			// The name first: a commit under way stages a manifest of up
			// to millions of chunks, not to be built for another name.
			var named struct {
				Image struct {
					Name string `json:"name"`
				} `json:"image"`
			}
			if err := json.Unmarshal(v, &named); err != nil || named.Image.Name != name {
				return nil // a damaged entry is stagedImages' to report
			}
			var st stagedImage
			if err := json.Unmarshal(v, &st); err != nil {
				return fmt.Errorf("image being stored by migration %s: %w", k, err)
			}
			staged = append(staged, st)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	for _, st := range staged {
		if at, err := sourceID(st.Image.Path); err == nil && st.movedInPlace(at) {
			return &st.Image, nil
		}
	}
	var r ImageRecord
	if err := j.get(bucketImages, name, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// removal is an image being removed: its catalog entry, and the identity
// of its file then (none: gone already), so that only that file is
// removed — a removal cut short must not take a newer version stored at
// the same path meanwhile. An inode number alone does not tell them apart:
// the file system gives a freed one out again at once.
type removal struct {
	Image ImageRecord `json:"image"`
	// Inode alone is what entries of earlier releases hold; File is the
	// whole identity (nil in those).
	Inode uint64    `json:"inode,omitempty"`
	File  *SourceID `json:"file,omitempty"`
	// Reason is the operator's, kept for the record written at the next
	// start if a stop comes first (empty in entries of earlier releases).
	Reason string `json:"reason,omitempty"`
}

// takeForRemoval moves an image's catalog entry to the list of removals
// under way, in one transaction, with the reason it is removed, and
// returns it.
func (j *Journal) takeForRemoval(name, reason string) (*removal, error) {
	rm := removal{Reason: reason}
	err := j.db.Update(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketImages).Get([]byte(name))
		if v == nil {
			return ErrNotFound
		}
		if err := json.Unmarshal(v, &rm.Image); err != nil {
			return err
		}
		if id, err := sourceID(rm.Image.Path); err == nil {
			rm.Inode, rm.File = id.Inode, &id
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		b, err := json.Marshal(rm)
		if err != nil {
			return err
		}
		if err := tx.Bucket(bucketRemoving).Put([]byte(name), b); err != nil {
			return err
		}
		return tx.Bucket(bucketImages).Delete([]byte(name))
	})
	return &rm, err
}

// restoreRemoval puts back a catalog entry takeForRemoval took.
func (j *Journal) restoreRemoval(img *ImageRecord) error {
	v, err := json.Marshal(img)
	if err != nil {
		return err
	}
	return j.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketImages).Put([]byte(img.Name), v); err != nil {
			return err
		}
		return tx.Bucket(bucketRemoving).Delete([]byte(img.Name))
	})
}

// Receives lists the receiver's migrations in progress.
func (j *Journal) Receives() ([]RecvRecord, error) { return list[RecvRecord](j, bucketRecv) }
