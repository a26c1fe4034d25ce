// Package layout is the distribution registry's storage layout, in which images are kept on Storj and
// IPFS: the same layout a distribution registry writes, so that one reader serves what the gateway
// pushed, what `imagemesh publish` wrote, and an existing registry's bucket.
//
// It knows paths and link files only. Every path is absolute and starts at Root; a blob's (or a
// manifest's) bytes live under its digest, shared by every repository; a link file holds one digest as
// text. The functions that take a digest expect a valid one (digest.Digest.Validate): they do not
// check it again. Nothing here knows who holds a layout or how it is read: the sources that read one
// (pkg/source/layoutsource) and the storage drivers that write one build on this package.
package layout

import (
	"fmt"
	"path"
	"strings"

	"github.com/opencontainers/go-digest"
)

// Root is where the layout starts under a storage root.
const Root = "/docker/registry/v2"

// MaxLinkSize bounds the size of a link file a reader accepts: a link holds one digest (71 bytes for
// sha256), and anything much larger is not a link.
const MaxLinkSize = 1024

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

// ParseLink returns the digest a link file's content names; the registry may end it with a newline.
func ParseLink(content []byte) (digest.Digest, error) {
	d, err := digest.Parse(strings.TrimSpace(string(content)))
	if err != nil {
		return "", fmt.Errorf("link %q does not hold a digest: %w", content, err)
	}
	return d, nil
}
