// Package storj reads images from a Storj bucket that holds the distribution registry's storage layout
// (what `imagemesh gateway --storage storj` or any distribution registry on the storj driver wrote),
// over Storj's native protocol (storj.io/uplink): the node decrypts and decodes the erasure-coded
// pieces itself, straight from the storage nodes.
//
// The bucket is trusted as the ImageSource names it, so tags resolve here. Its bytes are not: a
// bucket can hold a corrupt object (a broken publisher, a wrong upload), so they come marked
// untrusted, the content store gives clients none of them before the whole blob has verified, and a
// blob that fails is not asked of this bucket again for a while: the agent falls through to its next
// source.
package storj

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"storj.io/uplink"

	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/layoutsource"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
	"github.com/imagemesh/imagemesh/pkg/storjaccess"
)

// Options configure a Source.
type Options struct {
	// Access is a serialized access grant. It is a secret: no error or log quotes it.
	Access string
	// Bucket and Prefix say where the layout is: <prefix>/docker/registry/v2/... in the bucket.
	Bucket string
	Prefix string
	// Timeout bounds each metadata request (a tag's link, a manifest, an object's size): a satellite
	// that does not answer fails the request after it. Default 30s.
	Timeout time.Duration
	// RejectFor is how long a blob that failed verification is not read from the bucket. Default 10m.
	RejectFor time.Duration
}

// Source reads one bucket's layout.
type Source struct {
	opts    Options
	project *uplink.Project
	prefix  string

	mu       sync.Mutex
	rejected map[digest.Digest]time.Time // blobs that failed verification, until when
	bucketOK time.Time                   // when the bucket was last seen to exist
}

// New parses the access grant and opens the project. It does not contact the network: a satellite
// that is down makes requests fail (and the agent go on to its next source), not the agent's start.
func New(opts Options) (*Source, error) {
	if opts.Bucket == "" {
		return nil, errors.New("storj source: bucket is required")
	}
	if opts.Timeout == 0 {
		opts.Timeout = 30 * time.Second
	}
	if opts.RejectFor == 0 {
		opts.RejectFor = 10 * time.Minute
	}
	access, err := storjaccess.Parse(opts.Access)
	if err != nil {
		return nil, fmt.Errorf("storj source for bucket %q: %w", opts.Bucket, err)
	}
	project, err := (uplink.Config{UserAgent: "imagemesh"}).OpenProject(context.Background(), access)
	if err != nil {
		return nil, fmt.Errorf("storj source for bucket %q: open project on %s: %w", opts.Bucket, access.SatelliteAddress(), err)
	}
	prefix := strings.Trim(opts.Prefix, "/")
	if prefix != "" {
		prefix += "/"
	}
	return &Source{opts: opts, project: project, prefix: prefix, rejected: map[digest.Digest]time.Time{}}, nil
}

// Close closes the project's connections.
func (s *Source) Close() error { return s.project.Close() }

func (s *Source) Name() string { return "storj" }

// key is the object key of a layout path.
func (s *Source) key(p string) string { return s.prefix + strings.TrimPrefix(p, "/") }

// Resolve reads a tag's link from the layout, and the manifest it names for its size and type.
func (s *Source) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	desc, err := layoutsource.ResolveTag(ctx, s.readSmall, repo, tag)
	if err != nil && !errors.As(err, new(*source.Error)) {
		err = fmt.Errorf("storj: bucket %q: %w", s.opts.Bucket, err)
	}
	return desc, err
}

func (s *Source) Stat(ctx context.Context, obj source.Object) (ocispec.Descriptor, error) {
	if err := obj.Digest.Validate(); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("storj: %w", err)
	}
	if obj.Kind == source.KindManifest {
		return layoutsource.ManifestDescriptor(ctx, s.readSmall, obj.Digest)
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	o, err := s.project.StatObject(ctx, s.opts.Bucket, s.key(layout.BlobData(obj.Digest)))
	if err != nil {
		return ocispec.Descriptor{}, s.wrap("stat", obj.String(), err)
	}
	return ocispec.Descriptor{Digest: obj.Digest, Size: o.System.ContentLength}, nil
}

func (s *Source) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	if err := obj.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("storj: %w", err)
	}
	if s.isRejected(obj.Digest) {
		return nil, &source.Error{Source: s.Name(), Op: "read", Target: obj.String(),
			Err: fmt.Errorf("bucket %q: its copy failed verification recently: %w", s.opts.Bucket, source.ErrNotFound)}
	}
	var desc ocispec.Descriptor
	if obj.Kind == source.KindManifest {
		// A manifest's descriptor carries its media type, read from its bytes.
		d, err := s.Stat(ctx, obj)
		if err != nil {
			return nil, err
		}
		desc = d
	}
	// The stream is not bounded by Timeout: a transfer that stalls is cut off by the content store.
	var rc io.ReadCloser
	dl, err := s.project.DownloadObject(ctx, s.opts.Bucket, s.key(layout.BlobData(obj.Digest)), &uplink.DownloadOptions{Offset: offset, Length: -1})
	if err != nil {
		// Storj refuses a range that starts at or past the end; at the end, the rest is empty.
		st, serr := s.Stat(ctx, obj)
		switch {
		case serr != nil || offset < st.Size:
			return nil, s.wrap("read", obj.String(), err)
		case offset > st.Size:
			return nil, fmt.Errorf("storj: offset %d past the end of %s (%d bytes)", offset, obj.Digest, st.Size)
		}
		rc, desc.Digest, desc.Size = io.NopCloser(strings.NewReader("")), obj.Digest, st.Size
	} else {
		rc = dl
		if obj.Kind != source.KindManifest {
			// A blob's size comes with the download: no second request to the satellite.
			desc = ocispec.Descriptor{Digest: obj.Digest, Size: dl.Info().System.ContentLength}
		}
	}
	return &source.Content{
		ReadCloser: &readErrors{rc: rc, s: s, target: obj.String()}, Descriptor: desc, Source: s.Name(),
		Untrusted: true, Reject: func(error) { s.reject(obj.Digest) },
	}, nil
}

func (s *Source) reject(d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for k, until := range s.rejected {
		if now.After(until) {
			delete(s.rejected, k)
		}
	}
	s.rejected[d] = now.Add(s.opts.RejectFor)
}

func (s *Source) isRejected(d digest.Digest) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	until, ok := s.rejected[d]
	return ok && time.Now().Before(until)
}

// readSmall reads a whole small object of the layout.
func (s *Source) readSmall(ctx context.Context, p string, limit int64) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	dl, err := s.project.DownloadObject(ctx, s.opts.Bucket, s.key(p), nil)
	if err != nil {
		return nil, s.wrap("read", p, err)
	}
	defer dl.Close()
	if size := dl.Info().System.ContentLength; size > limit {
		return nil, fmt.Errorf("storj: %s in bucket %q is %d bytes, over the %d a manifest or link may have", p, s.opts.Bucket, size, limit)
	}
	b, err := io.ReadAll(io.LimitReader(dl, limit+1))
	if err != nil {
		return nil, s.wrap("read", p, err)
	}
	return b, nil
}

// wrap tells a missing object (the next source may have it) from a network, bucket or grant that
// cannot answer, and says which.
func (s *Source) wrap(op, target string, err error) error {
	var why error
	switch {
	case errors.Is(err, uplink.ErrObjectNotFound):
		// The satellite says "object not found" in a bucket that does not exist, too: that is a
		// configuration error to name, not a miss.
		if berr := s.checkBucket(); berr != nil {
			err = berr
			break
		}
		return &source.Error{Source: s.Name(), Op: op, Target: target, Err: source.ErrNotFound}
	}
	switch {
	case errors.Is(err, uplink.ErrBucketNotFound):
		why = fmt.Errorf("bucket %q does not exist", s.opts.Bucket)
	case errors.Is(err, uplink.ErrPermissionDenied):
		why = fmt.Errorf("the access grant for bucket %q was refused (revoked, expired, or not for this bucket)", s.opts.Bucket)
	case errors.Is(err, context.DeadlineExceeded):
		why = fmt.Errorf("no answer from the Storj network within %s", s.opts.Timeout)
	default:
		why = fmt.Errorf("bucket %q", s.opts.Bucket)
	}
	return &source.Error{Source: s.Name(), Op: op, Target: target, Err: fmt.Errorf("%w: %w: %w", source.ErrUnavailable, why, err)}
}

// checkBucket returns the error of looking up the bucket, at most once a minute while it exists.
func (s *Source) checkBucket() error {
	s.mu.Lock()
	fresh := time.Since(s.bucketOK) < time.Minute
	s.mu.Unlock()
	if fresh {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.Timeout)
	defer cancel()
	if _, err := s.project.StatBucket(ctx, s.opts.Bucket); err != nil {
		return err
	}
	s.mu.Lock()
	s.bucketOK = time.Now()
	s.mu.Unlock()
	return nil
}

// readErrors names the source in errors that break a stream off.
type readErrors struct {
	rc     io.ReadCloser
	s      *Source
	target string
}

func (r *readErrors) Read(p []byte) (int, error) {
	n, err := r.rc.Read(p)
	if err != nil && err != io.EOF {
		err = r.s.wrap("read", r.target, err)
	}
	return n, err
}

func (r *readErrors) Close() error { return r.rc.Close() }

var _ source.Source = (*Source)(nil)
