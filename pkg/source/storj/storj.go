// Package storj reads images from a Storj bucket that holds the distribution registry's storage layout
// (what `imagemesh gateway --storage storj` or any distribution registry on the storj driver wrote),
// over Storj's native protocol (storj.io/uplink): the node decrypts and decodes the erasure-coded
// pieces itself, straight from the storage nodes.
//
// It reads the bucket's files and nothing else; pkg/source/layoutsource answers from them. So the
// bucket is trusted for tags, as the ImageSource names it, and not for bytes: a bucket can hold a
// corrupt object (a broken publisher, a wrong upload), so its bytes come marked untrusted, and a blob
// that fails verification is not asked of this bucket again for a while. Every failure says whether
// the object is missing (source.ErrNotFound) or the network, the bucket or the grant is at fault
// (source.ErrUnavailable), and which; no error quotes the access grant.
package storj

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"storj.io/uplink"

	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/layoutsource"
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
	*layoutsource.Source
	bucket *bucket
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
	b := &bucket{project: project, name: opts.Bucket, prefix: prefix, timeout: opts.Timeout}
	return &Source{
		Source: layoutsource.New(b, layoutsource.Options{Name: "storj", Location: fmt.Sprintf("bucket %q", opts.Bucket), RejectFor: opts.RejectFor}),
		bucket: b,
	}, nil
}

// Close closes the project's connections.
func (s *Source) Close() error { return s.bucket.project.Close() }

// bucket reads the layout's files from a bucket: layoutsource.Files.
type bucket struct {
	project *uplink.Project
	name    string
	prefix  string // "" or ending in "/"
	timeout time.Duration

	mu       sync.Mutex
	existsAt time.Time // when the bucket was last seen to exist
}

// key is the object key of a layout path.
func (b *bucket) key(p string) string { return b.prefix + strings.TrimPrefix(p, "/") }

// ReadFile reads a whole small object of the layout.
func (b *bucket) ReadFile(ctx context.Context, p string, limit int64) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	dl, err := b.project.DownloadObject(ctx, b.name, b.key(p), nil)
	if err != nil {
		return nil, b.classify(err)
	}
	defer func() { _ = dl.Close() }() // a download read to its end has nothing left to fail
	if size := dl.Info().System.ContentLength; size > limit {
		return nil, fmt.Errorf("bucket %q holds %d bytes there, over the %d a manifest or link may have", b.name, size, limit)
	}
	body, err := io.ReadAll(io.LimitReader(dl, limit+1))
	if err != nil {
		return nil, b.classify(err)
	}
	if int64(len(body)) > limit {
		return nil, fmt.Errorf("bucket %q holds over %d bytes there, more than a manifest or link may have", b.name, limit)
	}
	return body, nil
}

// Size stats an object of the layout.
func (b *bucket) Size(ctx context.Context, p string) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	o, err := b.project.StatObject(ctx, b.name, b.key(p))
	if err != nil {
		return 0, b.classify(err)
	}
	return o.System.ContentLength, nil
}

// Open downloads an object of the layout from offset on. The stream is not bounded by the timeout: a
// transfer that stalls is cut off by the content store.
func (b *bucket) Open(ctx context.Context, p string, offset int64) (io.ReadCloser, int64, error) {
	dl, err := b.project.DownloadObject(ctx, b.name, b.key(p), &uplink.DownloadOptions{Offset: offset, Length: -1})
	if err != nil {
		// Storj refuses a range that starts at or past the end; at the end, the rest is empty.
		size, serr := b.Size(ctx, p)
		switch {
		case serr != nil || offset < size:
			return nil, 0, b.classify(err)
		case offset > size:
			return nil, 0, fmt.Errorf("offset %d past the end of the object (%d bytes)", offset, size)
		}
		return io.NopCloser(strings.NewReader("")), size, nil
	}
	// The object's size comes with the download: no second request to the satellite.
	return &classifiedReader{dl: dl, b: b}, dl.Info().System.ContentLength, nil
}

// classify tells a missing object (the next source may have it) from a network, bucket or grant that
// cannot answer, and says which.
func (b *bucket) classify(err error) error {
	if errors.Is(err, uplink.ErrObjectNotFound) {
		// The satellite says "object not found" in a bucket that does not exist, too: that is a
		// configuration error to name, not a miss.
		berr := b.checkExists()
		if berr == nil {
			return source.ErrNotFound
		}
		err = berr
	}
	var why error
	switch {
	case errors.Is(err, uplink.ErrBucketNotFound):
		why = fmt.Errorf("bucket %q does not exist", b.name)
	case errors.Is(err, uplink.ErrPermissionDenied):
		why = fmt.Errorf("the access grant for bucket %q was refused (revoked, expired, or not for this bucket)", b.name)
	case errors.Is(err, context.DeadlineExceeded):
		why = fmt.Errorf("no answer from the Storj network within %s", b.timeout)
	default:
		why = fmt.Errorf("bucket %q", b.name)
	}
	return fmt.Errorf("%w: %w: %w", source.ErrUnavailable, why, err)
}

// checkExists returns the error of looking up the bucket, at most once a minute while it exists.
func (b *bucket) checkExists() error {
	b.mu.Lock()
	fresh := time.Since(b.existsAt) < time.Minute
	b.mu.Unlock()
	if fresh {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
	defer cancel()
	if _, err := b.project.StatBucket(ctx, b.name); err != nil {
		return err
	}
	b.mu.Lock()
	b.existsAt = time.Now()
	b.mu.Unlock()
	return nil
}

// classifiedReader says, of an error that breaks a download off, whether the network, the bucket or
// the grant failed.
type classifiedReader struct {
	dl *uplink.Download
	b  *bucket
}

func (r *classifiedReader) Read(p []byte) (int, error) {
	n, err := r.dl.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		err = r.b.classify(err)
	}
	return n, err
}

func (r *classifiedReader) Close() error { return r.dl.Close() }

var (
	_ source.Source      = (*Source)(nil)
	_ layoutsource.Files = (*bucket)(nil)
)
