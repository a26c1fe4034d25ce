package content

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// smallDisk mounts a tmpfs of size bytes for the test: a disk that fills up.
func smallDisk(t *testing.T, size string) string {
	t.Helper()
	testenv.RequireRoot(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func ingestFiles(t *testing.T, root string) int {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(root, "ingest"))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestFullDisk: a blob the disk cannot hold is refused before any client learns its size, with an
// error that says the disk is full; a disk that fills up mid-fetch cuts the fetch off. Either way
// nothing partial is kept, what the store holds is still served, and once there is room again the
// same blob is fetched and kept.
func TestFullDisk(t *testing.T) {
	root := smallDisk(t, "1m")
	s := openStore(t, root, Options{})
	held, heldDigest := randomBlob(t, 100<<10)
	if err := s.Put(heldDigest, held); err != nil {
		t.Fatal(err)
	}
	serve := func(data []byte, gate chan struct{}, trusted bool) FetchFunc {
		return func(ctx context.Context, off int64) (*Fetched, error) {
			var body io.Reader = bytes.NewReader(data[off:])
			if gate != nil {
				body = io.MultiReader(bytes.NewReader(data[off:100<<10]), gated{gate}, bytes.NewReader(data[100<<10:]))
			}
			return &Fetched{Body: io.NopCloser(body), Size: int64(len(data)), Source: "test", SizeTrusted: trusted}, nil
		}
	}

	// Up front: 2 MiB on a 1 MiB disk, with a size nobody vouched for (so nothing is evicted for it).
	big, bigDigest := randomBlob(t, 2<<20)
	if _, err := s.Fetch(context.Background(), bigDigest, serve(big, nil, false)); !IsNoSpace(err) {
		t.Fatalf("Fetch of a blob larger than the disk: %v, want a full-disk error", err)
	}
	if n := ingestFiles(t, root); n != 0 {
		t.Errorf("%d files left in ingest/ after a refused fetch", n)
	}
	if got, err := s.ReadAll(heldDigest, 1<<20); err != nil || !bytes.Equal(got, held) {
		t.Errorf("the blob held before is not served: %v", err)
	}
	// The same with a trusted size: evicting everything would not make room, so nothing is evicted.
	if _, err := s.Fetch(context.Background(), bigDigest, serve(big, nil, true)); !IsNoSpace(err) {
		t.Fatalf("Fetch of a blob larger than the disk, trusted size: %v, want a full-disk error", err)
	}
	if _, err := s.Stat(heldDigest); err != nil {
		t.Errorf("a blob was evicted for one that could never fit: %v", err)
	}

	// Mid-fetch: the disk fills up (something else writes to it) while the blob arrives.
	blob, blobDigest := randomBlob(t, 300<<10)
	gate := make(chan struct{})
	rd, err := s.Fetch(context.Background(), blobDigest, serve(blob, gate, false))
	if err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(root, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.Copy(f, io.LimitReader(zeroes{}, 4<<20))
	f.Close()
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("filling the disk: %v", err)
	}
	close(gate)
	if _, err := io.ReadAll(io.NewSectionReader(rd, 0, rd.Size())); !IsNoSpace(err) {
		t.Errorf("reading a blob whose fetch found the disk full: %v, want a full-disk error", err)
	}
	rd.Close()
	if _, err := s.Stat(blobDigest); err == nil {
		t.Error("a blob whose fetch failed is held")
	}
	if n := ingestFiles(t, root); n != 0 {
		t.Errorf("%d files left in ingest/ after the disk filled up", n)
	}
	if got, err := s.ReadAll(heldDigest, 1<<20); err != nil || !bytes.Equal(got, held) {
		t.Errorf("the blob held before is not served while the disk is full: %v", err)
	}

	// Room again: the same blob is fetched and kept, with nothing to restart.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	rd, err = s.Fetch(context.Background(), blobDigest, serve(blob, nil, true))
	if err != nil {
		t.Fatalf("Fetch once there is room again: %v", err)
	}
	got, err := io.ReadAll(io.NewSectionReader(rd, 0, rd.Size()))
	rd.Close()
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("the blob fetched once there is room: %d bytes, %v", len(got), err)
	}
}

type zeroes struct{}

func (zeroes) Read(p []byte) (int, error) { clear(p); return len(p), nil }
