package migrate

import (
	"errors"
	"fmt"
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
// a policy change). It refuses while a migration stores a new version of the image,
// and when the audit log cannot take the record: data of a regulated class
// does not leave a site without a trace. The file is first renamed into
// .incoming, where a stop before the catalog forgets it leaves it for the
// next start's sweep; the catalog entry, left by such a stop, names a
// missing file, and removing the image again finishes the job.
func (r *Receiver) RemoveImage(name, reason string) (*ImageRecord, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if strings.TrimSpace(reason) == "" {
		return nil, fmt.Errorf("image %q is kept: say why it is removed (a ticket, a policy change); the audit record keeps the reason", name)
	}
	if r.cfg.Audit != nil {
		if err := r.cfg.Audit.Ready(); err != nil {
			return nil, fmt.Errorf("image %q is kept: its removal could not be recorded in the audit log: %w", name, err)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock() // no receive of the name starts meanwhile
	if id, _ := r.receivingName(&Offer{Name: name}); id != "" {
		return nil, fmt.Errorf("image %q is being received (migration %s): cancel that migration at its sender, or remove the image once it has been stored", name, id)
	}
	img, err := r.cfg.Journal.Image(name)
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("no stored image %q on this gateway: an image is stored by the gateway it was migrated to (skybridge migrate list there)", name)
	} else if err != nil {
		return nil, fmt.Errorf("image %q: %w", name, err)
	}
	incoming := filepath.Join(r.cfg.StoreDir, ".incoming")
	aside := filepath.Join(incoming, "removed-"+NewID()+"."+img.Format)
	switch err := os.Rename(img.Path, aside); {
	case errors.Is(err, os.ErrNotExist):
		r.cfg.Log.Warn("the stored image's file is already gone: forgetting the image", "name", name, "path", img.Path)
		aside = ""
	case err != nil:
		return nil, fmt.Errorf("remove image %q: %w", name, err)
	default:
		if err := errors.Join(atomicfile.SyncDir(filepath.Dir(img.Path)), atomicfile.SyncDir(incoming)); err != nil {
			return nil, fmt.Errorf("remove image %q: %w", name, err)
		}
	}
	if err := r.cfg.Journal.deleteKey(bucketImages, name); err != nil {
		return nil, fmt.Errorf("image %q: its file is removed but the catalog still lists it (remove it again): %w", name, err)
	}
	r.catalogChanged()
	if aside != "" {
		if err := os.Remove(aside); err != nil {
			r.cfg.Log.Warn("remove a stored image's file: the next start removes it", "file", aside, "err", err)
		}
	}
	self := r.cfg.Identity().Attributes()
	f := map[string]any{
		"action": "removed", "name": img.Name, "class": img.Class, "format": img.Format, "root": img.Root.String(),
		"size": img.Manifest.Size, "from_site": img.FromSite, "migration_id": img.Migration, "received": img.Received,
		"site": self.Site, "jurisdiction": self.Jurisdiction, "reason": reason,
	}
	if r.cfg.Audit != nil {
		if _, err := r.cfg.Audit.Append(r.cfg.Identity(), "image", f, r.cfg.Now()); err != nil {
			r.cfg.Log.Error("audit log: the removal of an image is not recorded", "name", name, "err", err)
		}
	}
	r.cfg.Log.Info("removed a stored image", "name", img.Name, "class", img.Class, "root", img.Root.String(), "reason", reason)
	return img, nil
}
