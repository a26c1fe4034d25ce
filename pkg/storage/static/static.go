// Package static writes, next to a registry layout kept in a Storj bucket, the static layout that a
// plain HTTP file server can serve to `docker pull` and containerd: Storj linksharing, for one.
//
//	<prefix>v2/                               an empty object: the API version check
//	<prefix>v2/<repo>/manifests/<tag>         the manifest, with its media type as content-type
//	<prefix>v2/<repo>/manifests/<digest>      the same, by digest
//	<prefix>v2/<repo>/blobs/<digest>          each config and layer
//
// Blobs are copied inside Storj (CopyObject: the satellite re-keys the object, no bytes travel), so
// exporting a large image costs a few requests, not its size. Every object is committed whole or not
// at all, and the tag is written last: a reader never finds a tag whose content is not there yet.
package static

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"storj.io/uplink"

	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/storage/driver/storj"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

// ContentTypeKey is the custom metadata key linksharing (and the S3 gateway) read an object's
// Content-Type from.
const ContentTypeKey = "content-type"

// Exporter writes the static layout of images held in a driver's bucket.
type Exporter struct {
	Driver *storj.Driver
	// Prefix is where the static layout starts in the bucket: "" for the bucket's root, so that a
	// linkshare of the bucket is a registry; else it ends in "/".
	Prefix string
}

// Key is the object key of a static path ("v2/<repo>/blobs/<digest>").
func (e *Exporter) Key(p string) string {
	prefix := strings.Trim(e.Prefix, "/")
	if prefix != "" {
		prefix += "/"
	}
	return prefix + p
}

// Export writes repo's manifest named ref (a tag or a digest), the manifests an index names, and
// every blob they reference. repo is the repository's path (no registry host).
func (e *Exporter) Export(ctx context.Context, repo, ref string) error {
	if _, err := reference.ParseNormalizedNamed(repo); err != nil || strings.Contains(repo, ":") {
		return fmt.Errorf("export: repository %q: not a repository path", repo)
	}
	var d digest.Digest
	if dd, err := digest.Parse(ref); err == nil {
		d = dd
	} else {
		if !reference.TagRegexp.MatchString(ref) || len(ref) > 128 {
			return fmt.Errorf("export %s: %q is neither a tag nor a digest", repo, ref)
		}
		b, err := e.Driver.GetContent(ctx, layout.TagCurrentLink(repo, ref))
		if err != nil {
			return fmt.Errorf("export %s:%s: read the tag: %w", repo, ref, err)
		}
		if d, err = digest.Parse(strings.TrimSpace(string(b))); err != nil {
			return fmt.Errorf("export %s:%s: tag links to %q: %w", repo, ref, b, err)
		}
	}
	mediaType, body, err := e.exportManifest(ctx, repo, d, 0)
	if err != nil {
		return fmt.Errorf("export %s@%s: %w", repo, d, err)
	}
	if err := e.writeV2(ctx); err != nil {
		return err
	}
	if d.String() != ref {
		if err := e.upload(ctx, e.Key("v2/"+repo+"/manifests/"+ref), body, mediaType); err != nil {
			return fmt.Errorf("export %s:%s: %w", repo, ref, err)
		}
	}
	return nil
}

// ExportAll exports every tag of repo.
func (e *Exporter) ExportAll(ctx context.Context, repo string) (tags []string, err error) {
	dir := strings.TrimSuffix(layout.TagCurrentLink(repo, "x"), "/x/current/link")
	entries, err := e.Driver.List(ctx, dir)
	if err != nil {
		var nf storagedriver.PathNotFoundError
		if errors.As(err, &nf) {
			return nil, fmt.Errorf("export %s: no tags in the bucket's registry layout", repo)
		}
		return nil, fmt.Errorf("export %s: list tags: %w", repo, err)
	}
	for _, p := range entries {
		tag := p[strings.LastIndex(p, "/")+1:]
		if err := e.Export(ctx, repo, tag); err != nil {
			return tags, err
		}
		tags = append(tags, tag)
	}
	return tags, nil
}

const maxIndexDepth = 2

// exportManifest exports a manifest by digest and everything it references, and returns its media
// type and bytes.
func (e *Exporter) exportManifest(ctx context.Context, repo string, d digest.Digest, depth int) (string, []byte, error) {
	body, err := e.Driver.GetContent(ctx, layout.BlobData(d))
	if err != nil {
		return "", nil, fmt.Errorf("read manifest: %w", err)
	}
	if len(body) > source.MaxManifestSize {
		return "", nil, fmt.Errorf("manifest is %d bytes, over %d", len(body), source.MaxManifestSize)
	}
	if digest.FromBytes(body) != d {
		return "", nil, fmt.Errorf("the bucket's copy of the manifest does not match its digest")
	}
	var m struct {
		Config *struct{ Digest digest.Digest }
		Layers []struct {
			Digest digest.Digest
			URLs   []string
		}
		Manifests []struct{ Digest digest.Digest }
	}
	if err := json.Unmarshal(body, &m); err != nil {
		return "", nil, fmt.Errorf("parse manifest: %w", err)
	}
	mediaType := source.ManifestMediaType(body)
	if len(m.Manifests) > 0 && depth >= maxIndexDepth {
		return "", nil, fmt.Errorf("indexes nested deeper than %d", maxIndexDepth)
	}
	for _, child := range m.Manifests {
		if _, _, err := e.exportManifest(ctx, repo, child.Digest, depth+1); err != nil {
			return "", nil, fmt.Errorf("manifest %s: %w", child.Digest, err)
		}
	}
	var blobs []digest.Digest
	if m.Config != nil {
		blobs = append(blobs, m.Config.Digest)
	}
	for _, l := range m.Layers {
		if len(l.URLs) == 0 { // foreign layers live elsewhere
			blobs = append(blobs, l.Digest)
		}
	}
	for _, b := range blobs {
		if err := e.copyBlob(ctx, repo, b); err != nil {
			return "", nil, err
		}
	}
	if err := e.upload(ctx, e.Key("v2/"+repo+"/manifests/"+d.String()), body, mediaType); err != nil {
		return "", nil, err
	}
	return mediaType, body, nil
}

// copyBlob copies a blob from the registry layout into the static one, inside Storj, unless a copy
// of the same size is there already.
func (e *Exporter) copyBlob(ctx context.Context, repo string, d digest.Digest) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("blob %q: %w", d, err)
	}
	project, bucket := e.Driver.Project(), e.Driver.Bucket()
	src, dst := e.Driver.Key(layout.BlobData(d)), e.Key("v2/"+repo+"/blobs/"+d.String())
	have, err := project.StatObject(ctx, bucket, src)
	if err != nil {
		return fmt.Errorf("blob %s: %w", d, err)
	}
	if there, err := project.StatObject(ctx, bucket, dst); err == nil && there.System.ContentLength == have.System.ContentLength {
		return nil
	}
	if _, err := project.CopyObject(ctx, bucket, src, bucket, dst, nil); err != nil {
		return fmt.Errorf("copy blob %s to %s: %w", d, dst, err)
	}
	return nil
}

// writeV2 writes the empty object that answers GET /v2/.
func (e *Exporter) writeV2(ctx context.Context) error {
	return e.upload(ctx, e.Key("v2/"), nil, "application/json")
}

// upload writes one small object with its content type.
func (e *Exporter) upload(ctx context.Context, key string, body []byte, contentType string) error {
	project, bucket := e.Driver.Project(), e.Driver.Bucket()
	up, err := project.UploadObject(ctx, bucket, key, nil)
	if err != nil {
		return fmt.Errorf("upload %s: %w", key, err)
	}
	if err := up.SetCustomMetadata(ctx, uplink.CustomMetadata{ContentTypeKey: contentType}); err != nil {
		_ = up.Abort()
		return fmt.Errorf("upload %s: %w", key, err)
	}
	if _, err := up.Write(body); err != nil {
		_ = up.Abort()
		return fmt.Errorf("upload %s: %w", key, err)
	}
	if err := up.Commit(); err != nil {
		return fmt.Errorf("upload %s: %w", key, err)
	}
	return nil
}
