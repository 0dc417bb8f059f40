package migrate

import (
	"context"
	"fmt"
	"slices"
)

// VerifyReport is the outcome of re-proving a stored image.
type VerifyReport struct {
	Name      string  `json:"name"`
	Path      string  `json:"path"`
	Root      Hash    `json:"root"`
	Expected  Hash    `json:"expected"`
	OK        bool    `json:"ok"`
	BytesRead int64   `json:"bytes_read"`           // of the image's data: holes are not read
	BadChunks []int64 `json:"bad_chunks,omitempty"` // chunks whose content differs from the manifest
}

// VerifyImage re-reads a stored image and checks it against the manifest
// and root recorded when it arrived, naming the damaged chunks if any, as
// `restic check --read-data` does for a repository. It reads every byte of
// data, hours for a large image: ctx ends it.
func VerifyImage(ctx context.Context, rec *ImageRecord) (*VerifyReport, error) {
	src, err := openStored(rec)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	// An image stored before receivers left listed chunks of zeros out
	// of its manifest may still list one: a hole all the same.
	m := rec.Manifest.withoutZeroChunks()
	// qcow2 sizes are whole 512-byte sectors: the receiver stores an
	// image of any other size rounded up, as qemu-img convert does, with
	// the tail reading as zeros, and the manifest keeps the size sent.
	padded := m.Size
	if rec.Format == FormatQcow2 {
		padded = (m.Size + 511) &^ 511
	}
	switch {
	case src.Size() < m.Size:
		return nil, fmt.Errorf("%s is %d bytes, the manifest says %d: truncated", rec.Path, src.Size(), m.Size)
	case src.Size() > padded:
		// What lies past the manifest's end was never sent nor checked:
		// the image is not the one stored.
		return nil, fmt.Errorf("%s is %d bytes, the manifest says %d: it has grown since it was stored", rec.Path, src.Size(), m.Size)
	}
	rep := &VerifyReport{Name: rec.Name, Path: rec.Path, Expected: rec.Root}
	if tail := src.Size() - m.Size; tail > 0 {
		// The padding is no chunk of the manifest: zeros are all it may
		// hold, or the image is not the one stored.
		b := make([]byte, tail)
		if err := readChunk(src, b, m.Size); err != nil {
			return nil, fmt.Errorf("read the qcow2 sector padding past the manifest's %d bytes: %w", m.Size, err)
		}
		rep.BytesRead += tail
		if !isZero(b) {
			return nil, fmt.Errorf("%s holds data past the manifest's %d bytes, in the padding to a whole 512-byte sector: it was written since it was stored; migrate it again", rec.Path, m.Size)
		}
	}
	extents, err := src.Extents()
	if err != nil {
		return nil, err
	}
	got := Manifest{Size: m.Size, ChunkSize: m.ChunkSize, Chunks: map[int64]Hash{}}
	buf := make([]byte, m.ChunkSize)
	for _, i := range candidates(extents, m.Size, m.ChunkSize) {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("verify %s: stopped after %d bytes: %w", rec.Path, rep.BytesRead, err)
		}
		n := chunkLen(i, m.Size, m.ChunkSize)
		b := buf[:n]
		if err := readChunk(extentReader{src, extents}, b, i*m.ChunkSize); err != nil {
			return nil, fmt.Errorf("read chunk %d: %w", i, err)
		}
		rep.BytesRead += dataIn(extents, i*m.ChunkSize, n)
		if !isZero(b) {
			got.Chunks[i] = hashChunk(b)
		}
	}
	// The chunks either side lists, not every chunk of the image: a
	// pebibyte of 4 KiB chunks is 2^38 of them, and looked up one by one
	// they kept a verify of a few chunks of data busy for hours.
	n := chunkCount(m.Size, m.ChunkSize)
	for i, h := range m.Chunks {
		if i >= 0 && i < n && got.Chunks[i] != h {
			rep.BadChunks = append(rep.BadChunks, i)
		}
	}
	for i := range got.Chunks {
		if _, ok := m.Chunks[i]; !ok {
			rep.BadChunks = append(rep.BadChunks, i)
		}
	}
	slices.Sort(rep.BadChunks)
	rep.Root = got.Root()
	rep.OK = rep.Root == rec.Root && len(rep.BadChunks) == 0
	return rep, nil
}
