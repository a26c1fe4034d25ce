// Package sourcetest is the contract every source.Source meets, written once and run by each
// implementation against its real backend, as distribution's storage drivers share one test suite.
package sourcetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/pkg/source"
)

// Fixture is content that the source under test holds, put there by the backend's own means
// (a push to a registry, an upload to a bucket, ...).
type Fixture struct {
	Source source.Source
	Repo   reference.Named
	// Tag resolves to Manifest, whose media type is MediaType.
	Tag       string
	Manifest  []byte
	MediaType string
	// Blob is a blob in Repo, at least a few bytes long.
	Blob []byte
	// ResolvesTags is false for sources that must not answer tag lookups.
	ResolvesTags bool
}

// Run holds f.Source to the contract.
func Run(t *testing.T, f Fixture) {
	manifest := digest.FromBytes(f.Manifest)
	blob := digest.FromBytes(f.Blob)
	unknown := digest.FromString(fmt.Sprintf("not there %d", time.Now().UnixNano()))
	ctx := func(t *testing.T) context.Context {
		c, cancel := context.WithTimeout(context.Background(), time.Minute)
		t.Cleanup(cancel)
		return c
	}
	src := f.Source

	t.Run("Name", func(t *testing.T) {
		if src.Name() == "" {
			t.Fatal("empty name: metrics and logs need one")
		}
	})
	t.Run("ResolveTag", func(t *testing.T) {
		desc, err := src.Resolve(ctx(t), f.Repo, f.Tag)
		if !f.ResolvesTags {
			if err == nil {
				t.Fatalf("source answered tag %s but must not resolve tags", f.Tag)
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if desc.Digest != manifest || desc.Size != int64(len(f.Manifest)) || desc.MediaType != f.MediaType {
			t.Fatalf("Resolve(%s) = %s %d %q, want %s %d %q", f.Tag, desc.Digest, desc.Size, desc.MediaType, manifest, len(f.Manifest), f.MediaType)
		}
	})
	t.Run("ResolveUnknownTag", func(t *testing.T) {
		if !f.ResolvesTags {
			t.Skip("source does not resolve tags")
		}
		if _, err := src.Resolve(ctx(t), f.Repo, "no-such-tag"); !errors.Is(err, source.ErrNotFound) {
			t.Fatalf("Resolve(no-such-tag) = %v, want ErrNotFound", err)
		}
	})
	t.Run("ListTags", func(t *testing.T) {
		lister, ok := src.(source.TagLister)
		switch {
		case ok && !f.ResolvesTags:
			t.Fatal("source lists tags but must not resolve them: nobody could check its list")
		case !ok:
			t.Skip("source does not list tags")
		}
		tags, err := lister.ListTags(ctx(t), f.Repo)
		if err != nil || !slices.Contains(tags, f.Tag) {
			t.Fatalf("ListTags(%s) = %q, %v; want a list with %q", f.Repo, tags, err, f.Tag)
		}
		unknown, err := reference.ParseNormalizedNamed(f.Repo.Name() + "-no-such-repository")
		if err != nil {
			t.Fatal(err)
		}
		if tags, err := lister.ListTags(ctx(t), unknown); !errors.Is(err, source.ErrNotFound) {
			t.Fatalf("ListTags(%s) = %q, %v; want ErrNotFound", unknown, tags, err)
		}
	})
	t.Run("Stat", func(t *testing.T) {
		desc, err := src.Stat(ctx(t), source.Object{Repo: f.Repo, Kind: source.KindBlob, Digest: blob})
		if err != nil || desc.Size != int64(len(f.Blob)) {
			t.Fatalf("Stat(blob) = %v, %v; want size %d", desc, err, len(f.Blob))
		}
		if _, err := src.Stat(ctx(t), source.Object{Repo: f.Repo, Kind: source.KindBlob, Digest: unknown}); !errors.Is(err, source.ErrNotFound) {
			t.Fatalf("Stat(unknown) = %v, want ErrNotFound", err)
		}
	})
	t.Run("OpenBlob", func(t *testing.T) {
		for _, off := range []int64{0, 1, int64(len(f.Blob)) / 2, int64(len(f.Blob)) - 1} {
			got, size := open(ctx(t), t, src, source.Object{Repo: f.Repo, Kind: source.KindBlob, Digest: blob}, off)
			if size != int64(len(f.Blob)) || !bytes.Equal(got, f.Blob[off:]) {
				t.Fatalf("Open(blob, %d): size %d, %d bytes; want size %d and the blob from %d", off, size, len(got), len(f.Blob), off)
			}
		}
	})
	t.Run("OpenManifest", func(t *testing.T) {
		got, _ := open(ctx(t), t, src, source.Object{Repo: f.Repo, Kind: source.KindManifest, Digest: manifest}, 0)
		if !bytes.Equal(got, f.Manifest) {
			t.Fatalf("Open(manifest): %d bytes differ from the %d pushed", len(got), len(f.Manifest))
		}
	})
	t.Run("OpenUnknown", func(t *testing.T) {
		for _, k := range []source.Kind{source.KindBlob, source.KindManifest} {
			c, err := src.Open(ctx(t), source.Object{Repo: f.Repo, Kind: k, Digest: unknown}, 0)
			if c != nil {
				_ = c.Close() // read-only
			}
			if !errors.Is(err, source.ErrNotFound) {
				t.Fatalf("Open(unknown %s) = %v, want ErrNotFound", k, err)
			}
		}
	})
	t.Run("ConcurrentOpens", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for i := 0; i < 8; i++ {
			off := int64(i) * int64(len(f.Blob)) / 8
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := src.Open(ctx(t), source.Object{Repo: f.Repo, Kind: source.KindBlob, Digest: blob}, off)
				if err != nil {
					errs <- err
					return
				}
				defer func() { _ = c.Close() }() // read-only
				got, err := io.ReadAll(c)
				if err != nil || !bytes.Equal(got, f.Blob[off:]) {
					errs <- fmt.Errorf("concurrent Open at %d: %w, %d bytes", off, err, len(got))
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
	t.Run("CanceledContext", func(t *testing.T) {
		c, cancel := context.WithCancel(context.Background())
		cancel()
		content, err := src.Open(c, source.Object{Repo: f.Repo, Kind: source.KindBlob, Digest: blob}, 0)
		if err == nil {
			// The answer may have been under way; reading it must then fail.
			_, err = io.ReadAll(content)
			_ = content.Close() // read-only
		}
		if err == nil {
			t.Fatal("Open with a canceled context succeeded")
		}
		if errors.Is(err, source.ErrNotFound) {
			t.Fatalf("canceled Open reported ErrNotFound, which would make the mirror answer 404: %v", err)
		}
	})
}

func open(ctx context.Context, t *testing.T, src source.Source, obj source.Object, off int64) ([]byte, int64) {
	t.Helper()
	c, err := src.Open(ctx, obj, off)
	if err != nil {
		t.Fatalf("Open(%s, %d): %v", obj, off, err)
	}
	defer func() { _ = c.Close() }() // read-only
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read %s from %d: %v", obj, off, err)
	}
	return got, c.Descriptor.Size
}
