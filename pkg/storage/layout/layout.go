// Package layout names the paths of the distribution registry's storage layout, in which images are
// kept on Storj and IPFS: the same layout a distribution registry writes, so that one reader serves
// what the gateway pushed, what `imagemesh publish` wrote, and an existing registry's bucket.
package layout

import (
	"context"
	"fmt"
	"path"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
)

// Root is where the layout starts under a storage root.
const Root = "/docker/registry/v2"

// BlobData is the path of a blob's (or manifest's) bytes.
func BlobData(d digest.Digest) string {
	hex := d.Encoded()
	return path.Join(Root, "blobs", d.Algorithm().String(), hex[:2], hex, "data")
}

// TagCurrentLink is the path of the link that holds the digest a tag points at. repo is the
// repository's path, without the registry host.
func TagCurrentLink(repo, tag string) string {
	return path.Join(Root, "repositories", repo, "_manifests", "tags", tag, "current", "link")
}

// ManifestRevisionLink is the path of the link that says repo holds manifest d.
func ManifestRevisionLink(repo string, d digest.Digest) string {
	return path.Join(Root, "repositories", repo, "_manifests", "revisions", d.Algorithm().String(), d.Encoded(), "link")
}

// LayerLink is the path of the link that says repo holds blob d.
func LayerLink(repo string, d digest.Digest) string {
	return path.Join(Root, "repositories", repo, "_layers", d.Algorithm().String(), d.Encoded(), "link")
}

// ReadFunc reads a whole small file of a layout, refusing one over limit bytes.
type ReadFunc func(ctx context.Context, path string, limit int64) ([]byte, error)

// ResolveTag reads a tag's link, and the manifest it names for its size and media type: how a source
// that holds a layout (IPFS, Storj) answers a tag lookup.
func ResolveTag(ctx context.Context, read ReadFunc, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	b, err := read(ctx, TagCurrentLink(reference.Path(repo), tag), 1024)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	d, err := digest.Parse(strings.TrimSpace(string(b)))
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("tag %s:%s links to %q: %w", repo.Name(), tag, b, err)
	}
	return ManifestDescriptor(ctx, read, d)
}

// ManifestDescriptor reads a manifest kept as a blob, for its size and media type.
func ManifestDescriptor(ctx context.Context, read ReadFunc, d digest.Digest) (ocispec.Descriptor, error) {
	body, err := read(ctx, BlobData(d), source.MaxManifestSize)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: source.ManifestMediaType(body), Digest: d, Size: int64(len(body))}, nil
}
