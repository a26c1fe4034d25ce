// Package layout names the paths of the distribution registry's storage layout, in which images are
// kept on Storj and IPFS: the same layout a distribution registry writes, so that one reader serves
// what the gateway pushed, what `imagemesh publish` wrote, and an existing registry's bucket.
package layout

import (
	"path"

	"github.com/opencontainers/go-digest"
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
