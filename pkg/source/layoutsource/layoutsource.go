// Package layoutsource is a source.Source over the distribution registry's storage layout
// (pkg/storage/layout), wherever it is kept: a Storj bucket, an IPFS root. It answers Resolve, Stat and
// Open from the layout's files; a backend implements Files, the reading of a path, and nothing else.
//
// Invariants, the same for every backend:
//   - A tag resolves only through its current link and the manifest that link names. A manifest is read
//     whole, never more than source.MaxManifestSize bytes, and its media type comes from its bytes.
//   - The layout is trusted for tags (as the ImageSource names it), not for bytes: a file at a digest's
//     path may not hold that digest's bytes (a broken publisher, a wrong upload). Every answer is marked
//     Untrusted, so that the content store gives clients none of it before the whole object verified.
//   - A digest whose bytes failed verification (Content.Reject) is not read from this layout again for
//     Options.RejectFor: Open answers source.ErrNotFound for it, so that the chain goes on to its next
//     source. The memory of rejected digests is bounded by Options.MaxRejected; past it, the digest
//     rejected longest ago is forgotten first.
//   - Every error is a *source.Error that names the source, the operation and its target; it wraps
//     source.ErrNotFound only when the layout does not hold what was asked for, and source.ErrUnavailable
//     when the backend could not say.
package layoutsource

import (
	"bytes"
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

// Files reads the files of one layout. Paths are the layout's (pkg/storage/layout): absolute, from
// layout.Root. Errors wrap source.ErrNotFound when the file is not there and source.ErrUnavailable
// when the backend could not answer (unreachable, refused, timed out), and say why in the backend's
// terms; the Source adds the path, the operation and its own name.
type Files interface {
	// ReadFile returns a whole small file (a link, a manifest). A file over limit bytes is an error.
	ReadFile(ctx context.Context, path string, limit int64) ([]byte, error)
	// Size returns the size of a file.
	Size(ctx context.Context, path string) (int64, error)
	// Open returns a file's bytes from offset to its end, and the file's whole size. An offset equal
	// to the size gives an empty stream, one past it an error. The stream need not be bounded in time:
	// the content store cuts off one that stalls.
	Open(ctx context.Context, path string, offset int64) (io.ReadCloser, int64, error)
}

// Options configure a Source.
type Options struct {
	// Name labels the source in metrics, logs and errors: "storj", "ipfs".
	Name string
	// Location names the layout in errors: `bucket "images"`, `root /ipns/images.example.org`.
	Location string
	// RejectFor is how long a digest whose bytes failed verification is not read from the layout.
	// Default 10m.
	RejectFor time.Duration
	// MaxRejected is how many rejected digests are remembered at most. Default 4096.
	MaxRejected int
}

// Defaults of Options.
const (
	DefaultRejectFor   = 10 * time.Minute
	DefaultMaxRejected = 4096
)

// Source answers for one layout through its Files.
type Source struct {
	files    Files
	opts     Options
	rejected *rejectMemory
}

// New returns a Source over files. It does not read anything.
func New(files Files, opts Options) *Source {
	if opts.Name == "" {
		opts.Name = "layout"
	}
	if opts.RejectFor <= 0 {
		opts.RejectFor = DefaultRejectFor
	}
	if opts.MaxRejected <= 0 {
		opts.MaxRejected = DefaultMaxRejected
	}
	return &Source{files: files, opts: opts, rejected: newRejectMemory(opts.RejectFor, opts.MaxRejected, time.Now)}
}

// Name labels the source in metrics and logs.
func (s *Source) Name() string { return s.opts.Name }

// Resolve reads a tag's current link, and the manifest it names for its size and media type.
func (s *Source) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	target := repo.Name() + ":" + tag
	p := layout.TagCurrentLink(reference.Path(repo), tag)
	b, err := s.files.ReadFile(ctx, p, layout.MaxLinkSize)
	if err != nil {
		return ocispec.Descriptor{}, s.fail("resolve", target, fmt.Errorf("%s: %w", p, err))
	}
	d, err := layout.ParseLink(b)
	if err != nil {
		return ocispec.Descriptor{}, s.fail("resolve", target, fmt.Errorf("%s: %s: %w", s.opts.Location, p, err))
	}
	desc, _, err := s.manifest(ctx, d)
	if err != nil {
		return ocispec.Descriptor{}, s.fail("resolve", target, err)
	}
	return desc, nil
}

// Stat returns an object's descriptor: a manifest's with its media type, read from its bytes.
func (s *Source) Stat(ctx context.Context, obj source.Object) (ocispec.Descriptor, error) {
	if err := obj.Digest.Validate(); err != nil {
		return ocispec.Descriptor{}, s.fail("stat", obj.String(), err)
	}
	if obj.Kind == source.KindManifest {
		desc, _, err := s.manifest(ctx, obj.Digest)
		if err != nil {
			return ocispec.Descriptor{}, s.fail("stat", obj.String(), err)
		}
		return desc, nil
	}
	p := layout.BlobData(obj.Digest)
	size, err := s.files.Size(ctx, p)
	if err != nil {
		return ocispec.Descriptor{}, s.fail("stat", obj.String(), fmt.Errorf("%s: %w", p, err))
	}
	return ocispec.Descriptor{Digest: obj.Digest, Size: size}, nil
}

// Open returns the object's bytes from offset on, marked untrusted, unless they failed verification
// recently.
func (s *Source) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	if err := obj.Digest.Validate(); err != nil {
		return nil, s.fail("read", obj.String(), err)
	}
	if s.rejected.has(obj.Digest) {
		return nil, s.fail("read", obj.String(), fmt.Errorf("%s: its copy failed verification less than %s ago: %w",
			s.opts.Location, s.opts.RejectFor, source.ErrNotFound))
	}
	var body io.ReadCloser
	var desc ocispec.Descriptor
	if obj.Kind == source.KindManifest {
		// A manifest is small and its descriptor needs its bytes for the media type: read it once.
		d, b, err := s.manifest(ctx, obj.Digest)
		if err != nil {
			return nil, s.fail("read", obj.String(), err)
		}
		if offset < 0 || offset > int64(len(b)) {
			return nil, s.fail("read", obj.String(), fmt.Errorf("offset %d outside the manifest's %d bytes", offset, len(b)))
		}
		body, desc = io.NopCloser(bytes.NewReader(b[offset:])), d
	} else {
		p := layout.BlobData(obj.Digest)
		rc, size, err := s.files.Open(ctx, p, offset)
		if err != nil {
			return nil, s.fail("read", obj.String(), fmt.Errorf("%s: %w", p, err))
		}
		body, desc = &streamErrors{rc: rc, s: s, target: obj.String()}, ocispec.Descriptor{Digest: obj.Digest, Size: size}
	}
	return &source.Content{
		ReadCloser: body, Descriptor: desc, Source: s.opts.Name,
		Untrusted: true, Reject: func(error) { s.rejected.add(obj.Digest) },
	}, nil
}

// manifest reads a manifest kept as a blob, and returns its descriptor and bytes.
func (s *Source) manifest(ctx context.Context, d digest.Digest) (ocispec.Descriptor, []byte, error) {
	p := layout.BlobData(d)
	body, err := s.files.ReadFile(ctx, p, source.MaxManifestSize)
	if err != nil {
		return ocispec.Descriptor{}, nil, fmt.Errorf("%s: %w", p, err)
	}
	return ocispec.Descriptor{MediaType: source.ManifestMediaType(body), Digest: d, Size: int64(len(body))}, body, nil
}

func (s *Source) fail(op, target string, err error) error {
	return &source.Error{Source: s.opts.Name, Op: op, Target: target, Err: err}
}

// streamErrors names the source in the errors that break a stream off.
type streamErrors struct {
	rc     io.ReadCloser
	s      *Source
	target string
}

func (r *streamErrors) Read(p []byte) (int, error) {
	n, err := r.rc.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		err = r.s.fail("read", r.target, err)
	}
	return n, err
}

func (r *streamErrors) Close() error { return r.rc.Close() }

// rejectMemory remembers digests whose bytes failed verification, each for ttl after its latest
// rejection, and at most capacity of them: past it, the one rejected longest ago goes. Every entry lives
// for the same ttl, so the list in order of rejection is also in order of expiry.
type rejectMemory struct {
	ttl      time.Duration
	capacity int
	now      func() time.Time

	mu      sync.Mutex
	order   *list.List // of *rejection, the oldest first
	entries map[digest.Digest]*list.Element
}

type rejection struct {
	d     digest.Digest
	until time.Time
}

func newRejectMemory(ttl time.Duration, capacity int, now func() time.Time) *rejectMemory {
	return &rejectMemory{ttl: ttl, capacity: capacity, now: now, order: list.New(), entries: map[digest.Digest]*list.Element{}}
}

// add remembers d from now on, for ttl.
func (m *rejectMemory) add(d digest.Digest) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	m.expireLocked(now)
	if e, ok := m.entries[d]; ok {
		e.Value.(*rejection).until = now.Add(m.ttl)
		m.order.MoveToBack(e)
		return
	}
	for m.order.Len() >= m.capacity {
		m.removeLocked(m.order.Front())
	}
	m.entries[d] = m.order.PushBack(&rejection{d: d, until: now.Add(m.ttl)})
}

// has reports whether d was rejected less than ttl ago, and is still remembered.
func (m *rejectMemory) has(d digest.Digest) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.expireLocked(m.now())
	_, ok := m.entries[d]
	return ok
}

// count is the number of digests remembered.
func (m *rejectMemory) count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.order.Len()
}

func (m *rejectMemory) expireLocked(now time.Time) {
	for e := m.order.Front(); e != nil && !now.Before(e.Value.(*rejection).until); e = m.order.Front() {
		m.removeLocked(e)
	}
}

func (m *rejectMemory) removeLocked(e *list.Element) {
	delete(m.entries, e.Value.(*rejection).d)
	m.order.Remove(e)
}

var _ source.Source = (*Source)(nil)
