package migrate

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// Catalog lists the stored images without their manifests' chunk hashes:
// what a listing or a policy check needs, at a cost that does not grow
// with the images' sizes.
func (j *Journal) Catalog() ([]ImageRecord, error) {
	// A manifest without its chunks field: decoding skips the hashes
	// rather than building a map of them per image.
	type lean struct {
		ImageRecord
		Manifest struct {
			Size      int64 `json:"size"`
			ChunkSize int64 `json:"chunk_size"`
		} `json:"manifest"`
	}
	ls, err := list[lean](j, bucketImages)
	out := make([]ImageRecord, len(ls))
	for i, l := range ls {
		out[i] = l.ImageRecord
		out[i].Manifest = Manifest{Size: l.Manifest.Size, ChunkSize: l.Manifest.ChunkSize}
	}
	return out, err
}

// RemoveImage deletes a stored image — its file and its catalog entry —
// and writes an audit record of it with the operator's reason (a ticket,
// a policy change). It refuses while a migration stores a new version of
// the image, and when the audit log cannot take the record: data of a
// regulated class does not leave a site without a trace.
//
// The catalog entry moves, in one transaction, to a list of removals
// under way; then the record is written, then the file and the list
// entry go. A record that cannot be written puts the entry back. A stop
// in between is finished at the next start (finishRemovals), whose record
// says so: a removal may be recorded twice, never not at all.
func (r *Receiver) RemoveImage(name, reason string) (*ImageRecord, error) {
	if err := checkStoredName(name); err != nil {
		return nil, err
	}
	if strings.TrimSpace(reason) == "" {
		return nil, fmt.Errorf("image %q is kept: say why it is removed (a ticket, a policy change); the audit record keeps the reason", name)
	}
	// Without the free-space margin a migration needs: a removal frees
	// space, most needed on a disk nearly full; a record that does not
	// fit puts the catalog entry back (below).
	if r.cfg.Audit != nil {
		if err := r.cfg.Audit.ReadyToFree(r.cfg.Identity(), r.cfg.Now()); err != nil {
			return nil, fmt.Errorf("image %q is kept: its removal could not be recorded in the audit log: %w", name, err)
		}
	}
	// The name is reserved, not the receiver locked: unlinking a file of
	// terabytes takes seconds, which offers, joins and listings of other
	// migrations need not wait for.
	r.mu.Lock()
	if id, _ := r.receivingName(&Offer{Name: name}); id != "" {
		r.mu.Unlock()
		return nil, fmt.Errorf("image %q is being received (migration %s): cancel that migration at its sender, or remove the image once it has been stored", name, id)
	}
	if r.removing[name] {
		r.mu.Unlock()
		return nil, fmt.Errorf("image %q is already being removed", name)
	}
	r.removing[name] = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.removing, name)
		r.mu.Unlock()
	}()

	// A newer version in place that the catalog lacks (its journal write
	// failed: a full disk) is recorded first: the removal would record
	// the version before it as removed, and take the newer one's file.
	if sid, err := r.waitingRecord("", name); err != nil {
		return nil, fmt.Errorf("image %q is kept: %w", name, err)
	} else if sid != "" {
		return nil, fmt.Errorf("image %q is kept: its newest version, stored by migration %s, is not recorded in the catalog yet (the gateway's log says why: a full disk?); it is recorded within a minute of the journal taking it: free space on the gateway's disk (remove another image), then remove this one again", name, sid)
	}
	rm, err := r.cfg.Journal.takeForRemoval(name, reason)
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("no stored image %q on this gateway: an image is stored by the gateway it was migrated to (skybridge migrate list there)", name)
	} else if err != nil {
		return nil, fmt.Errorf("image %q: %w", name, err)
	}
	img := &rm.Image
	r.catalogChanged()
	if !r.appendEvent("image", r.removalFields(img, reason)) {
		if err := r.cfg.Journal.restoreRemoval(img); err != nil {
			return nil, fmt.Errorf("image %q: its removal could not be recorded in the audit log, and its catalog entry could not be put back (the next start removes it, recorded then): %w", name, err)
		}
		r.catalogChanged()
		return nil, fmt.Errorf("image %q is kept: its removal could not be recorded in the audit log (the gateway's log says why)", name)
	}
	if err := r.removeFile(rm); err != nil {
		return nil, err
	}
	r.cfg.Log.Info("removed a stored image", "name", img.Name, "class", img.Class, "root", img.Root.String(), "reason", reason)
	return img, nil
}

// removalFields is the audit record of an image's removal.
func (r *Receiver) removalFields(img *ImageRecord, reason string) map[string]any {
	self := r.cfg.Identity().Attributes()
	return map[string]any{
		"action": "removed", "name": img.Name, "class": img.Class, "format": img.Format, "root": img.Root.String(),
		"size": img.Manifest.Size, "from_site": img.FromSite, "migration_id": img.Migration, "received": img.Received,
		"site": self.Site, "jurisdiction": self.Jurisdiction, "reason": reason,
	}
}

// removeFile removes an image's file — the one it was when its removal
// began, not a newer version stored at its path since — once its removal
// is recorded, and then its entry in the list of removals under way.
func (r *Receiver) removeFile(rm *removal) error {
	img := &rm.Image
	id, err := sourceID(img.Path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("image %q: its removal is recorded but its file %s stays (the next start removes it): %w", img.Name, img.Path, err)
	case rm.File != nil && !sameContent(id, *rm.File), rm.File == nil && (rm.Inode == 0 || id.Inode != rm.Inode):
		if cur, err := r.cfg.Journal.Image(img.Name); err == nil && cur.Path == img.Path {
			r.cfg.Log.Warn("a newer version of the removed image is stored at its path: kept", "name", img.Name, "path", img.Path)
		} else {
			r.cfg.Log.Error("the file at a removed image's path is not the one its removal began with (written to since), and no stored image is there: left for you to look at and remove", "name", img.Name, "path", img.Path)
		}
	default:
		if err := os.Remove(img.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("image %q: its removal is recorded but its file %s stays (the next start removes it): %w", img.Name, img.Path, err)
		}
		if err := atomicfile.SyncDir(filepath.Dir(img.Path)); err != nil {
			return fmt.Errorf("image %q: %w", img.Name, err)
		}
	}
	return r.cfg.Journal.deleteKey(bucketRemoving, img.Name)
}

// sameContent says whether a is still the file b was, its content
// unchanged: as SourceID.Same, but for what changes a file's ctime and
// not its content (chmod, chown, chattr: an operator's fix after a
// removal failed) and for a device number a restart may change.
func sameContent(a, b SourceID) bool {
	return a.Inode == b.Inode && a.Size == b.Size && a.MTime.Equal(b.MTime)
}

// finishRemovals finishes, at a start, the removals a stop interrupted:
// their record is written again (whether it was is not known) and their
// files go. One that cannot finish is logged and kept for the next start:
// it does not keep the gateway from starting.
func (r *Receiver) finishRemovals() error {
	pending, err := list[removal](r.cfg.Journal, bucketRemoving)
	if err != nil {
		return err
	}
	for i := range pending {
		rm := &pending[i]
		// The operator's reason, and that the removal was finished later
		// (its record may then be there twice).
		reason := "a removal cut short by a stop, finished when the gateway started again"
		if rm.Reason != "" {
			reason = rm.Reason
		}
		f := r.removalFields(&rm.Image, reason)
		f["recovered"] = true
		if !r.appendEvent("image", f) {
			// As RemoveImage: no removal without its record. The file
			// stays, its entry among the removals, until a start whose
			// audit log takes it.
			r.cfg.Log.Error("a removal cut short by a stop is not finished: its record cannot be written to the audit log (see the error above); the image's file stays until a start that can record it", "name", rm.Image.Name, "path", rm.Image.Path)
			continue
		}
		if err := r.removeFile(rm); err != nil {
			r.cfg.Log.Error("finish the removal of a stored image, cut short by a stop", "name", rm.Image.Name, "err", err)
			continue
		}
		r.cfg.Log.Warn("finished the removal of a stored image, cut short by a stop", "name", rm.Image.Name, "path", rm.Image.Path)
	}
	return nil
}
