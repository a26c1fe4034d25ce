package mirror

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"runtime"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
)

// Prefetch brings an image into the cache as a pull would: the tag resolved through the trusted sources,
// the manifest for this node's platform, its config and layers fetched through the source chain (peers
// first, so that a cluster prefetching the same image fetches it from upstream about once).
func (m *Mirror) Prefetch(ctx context.Context, image string) error {
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return fmt.Errorf("prefetch %q: %w", image, err)
	}
	repo := reference.TrimNamed(named)
	if err := m.allowed(repo); err != nil {
		return fmt.Errorf("prefetch %s: %w", image, err)
	}
	var d digest.Digest
	switch ref := named.(type) {
	case reference.Digested:
		d = ref.Digest()
	case reference.Tagged:
		desc, err := m.resolve(ctx, repo, ref.Tag())
		if err != nil {
			return fmt.Errorf("prefetch %s: %w", image, err)
		}
		d = desc.Digest
	default:
		desc, err := m.resolve(ctx, repo, "latest")
		if err != nil {
			return fmt.Errorf("prefetch %s: %w", image, err)
		}
		d = desc.Digest
	}
	for range 2 { // an index, then the manifest it names for this platform
		body, _, err := m.manifest(ctx, repo, d)
		if err != nil {
			return fmt.Errorf("prefetch %s: manifest %s: %w", image, d, err)
		}
		var probe struct {
			Manifests []ocispec.Descriptor `json:"manifests"`
			Config    *ocispec.Descriptor  `json:"config"`
			Layers    []ocispec.Descriptor `json:"layers"`
		}
		if err := json.Unmarshal(body, &probe); err != nil {
			return fmt.Errorf("prefetch %s: manifest %s: %w", image, d, err)
		}
		if probe.Manifests != nil {
			next, ok := platformManifest(probe.Manifests)
			if !ok {
				return fmt.Errorf("prefetch %s: index %s has no %s/%s manifest", image, d, runtime.GOOS, runtime.GOARCH)
			}
			d = next
			continue
		}
		blobs := probe.Layers
		if probe.Config != nil {
			blobs = append([]ocispec.Descriptor{*probe.Config}, blobs...)
		}
		for _, b := range blobs {
			if err := m.fetchWhole(ctx, source.Object{Repo: repo, Kind: source.KindBlob, Digest: b.Digest}); err != nil {
				return fmt.Errorf("prefetch %s: blob %s: %w", image, b.Digest, err)
			}
		}
		return nil
	}
	return fmt.Errorf("prefetch %s: an index inside an index", image)
}

// fetchWhole fetches a blob into the store and waits until it is verified and kept.
func (m *Mirror) fetchWhole(ctx context.Context, obj source.Object) error {
	if _, err := m.store.Stat(obj.Digest); err == nil {
		return nil
	}
	rd, err := m.store.Fetch(ctx, obj.Digest, m.fetchFunc(obj))
	if err != nil {
		return err
	}
	defer func() { _ = rd.Close() }() // a reader's Close only releases it
	_, err = rd.WriteTo(io.Discard)
	return err
}

func platformManifest(descs []ocispec.Descriptor) (digest.Digest, bool) {
	for _, desc := range descs {
		if p := desc.Platform; p != nil && p.OS == runtime.GOOS && p.Architecture == runtime.GOARCH {
			return desc.Digest, true
		}
	}
	return "", false
}
