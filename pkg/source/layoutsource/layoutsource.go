// Package layoutsource answers for a source that holds the distribution registry's storage layout
// (pkg/storage/layout): how a tag lookup and a manifest's descriptor are read from the layout's files,
// whoever holds them (a Storj bucket, an IPFS root).
//
// A tag resolves only through its current link and the manifest that link names; a manifest is read
// whole, never more than source.MaxManifestSize bytes, and its media type comes from its bytes.
package layoutsource

import (
	"context"
	"fmt"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

// ReadFunc reads a whole small file of a layout, refusing one over limit bytes.
type ReadFunc func(ctx context.Context, path string, limit int64) ([]byte, error)

// ResolveTag reads a tag's link, and the manifest it names for its size and media type.
func ResolveTag(ctx context.Context, read ReadFunc, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	b, err := read(ctx, layout.TagCurrentLink(reference.Path(repo), tag), layout.MaxLinkSize)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	d, err := layout.ParseLink(b)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("tag %s:%s: %w", repo.Name(), tag, err)
	}
	return ManifestDescriptor(ctx, read, d)
}

// ManifestDescriptor reads a manifest kept as a blob, for its size and media type.
func ManifestDescriptor(ctx context.Context, read ReadFunc, d digest.Digest) (ocispec.Descriptor, error) {
	body, err := read(ctx, layout.BlobData(d), source.MaxManifestSize)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: source.ManifestMediaType(body), Digest: d, Size: int64(len(body))}, nil
}
