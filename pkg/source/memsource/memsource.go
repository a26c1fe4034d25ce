// Package memsource is a source.Source over maps in memory: repositories, their tags, and the
// manifests and blobs each holds. It stands in for a registry where a test is about what surrounds a
// source (the mirror's answers, a chain's order) and not about a backend, and it is held to the same
// contract (sourcetest.Run) as the upstream registry, the peers, Storj and IPFS, so that what such a
// test finds holds for them too.
//
// Invariants:
//   - Content is named by the digest of its bytes, computed when it is added: it always verifies. A
//     test that wants a lying source wraps this one.
//   - Content belongs to the repository it was added to, as in a registry: another repository, or
//     another registry host, does not see it. A manifest is also a blob of its repository (registries
//     serve manifests under /blobs/ too); a blob is never a manifest.
//   - A tag names a manifest of its own repository. The source answers tags, and lists them
//     (source.TagLister), as a source trusted with tags does: a repository is known once it holds
//     something, and then lists its tags, none or more.
//   - Stored bytes are never changed and never handed out: Add copies what it is given, Open reads from
//     a reader that cannot write. Every call is safe for concurrent use.
//   - A canceled context fails every call, and every read of an opened object, with the context's
//     error, never ErrNotFound: a client that went away must not look like content that is not there.
//   - Errors are *source.Error values naming the source, the operation and the object; not-found ones
//     wrap source.ErrNotFound.
package memsource

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
)

// Source holds repositories in memory. The zero value is not usable; call New.
type Source struct {
	name string

	mu    sync.RWMutex
	repos map[string]*repository // by reference.Named.Name(): registry host and path
}

type repository struct {
	tags    map[string]digest.Digest
	objects map[digest.Digest]object
}

type object struct {
	manifest  bool
	mediaType string // manifests only
	data      []byte // never written after it is stored
}

// descriptor describes the object as kind: a manifest read as a blob has no media type, as a
// registry's /blobs/ answer has none.
func (o object) descriptor(kind source.Kind, d digest.Digest) ocispec.Descriptor {
	desc := ocispec.Descriptor{Digest: d, Size: int64(len(o.data))}
	if kind == source.KindManifest {
		desc.MediaType = o.mediaType
	}
	return desc
}

// New returns an empty source named name (in metrics and logs, and in Content.Source); "" is
// "memory".
func New(name string) *Source {
	if name == "" {
		name = "memory"
	}
	return &Source{name: name, repos: map[string]*repository{}}
}

// Name labels the source.
func (s *Source) Name() string { return s.name }

// AddBlob stores data as a blob of repo and returns its descriptor (no media type: a registry does not
// know what a blob is).
func (s *Source) AddBlob(repo reference.Named, data []byte) ocispec.Descriptor {
	return s.add(repo, object{data: bytes.Clone(data)})
}

// AddManifest stores data as a manifest of repo and returns its descriptor. mediaType is what Resolve
// and Stat report for it; "" takes it from the manifest itself, as the storage layouts do
// (source.ManifestMediaType).
func (s *Source) AddManifest(repo reference.Named, mediaType string, data []byte) ocispec.Descriptor {
	if mediaType == "" {
		mediaType = source.ManifestMediaType(data)
	}
	return s.add(repo, object{manifest: true, mediaType: mediaType, data: bytes.Clone(data)})
}

func (s *Source) add(repo reference.Named, o object) ocispec.Descriptor {
	d := digest.FromBytes(o.data)
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.repos[repo.Name()]
	if r == nil {
		r = &repository{tags: map[string]digest.Digest{}, objects: map[digest.Digest]object{}}
		s.repos[repo.Name()] = r
	}
	if old, ok := r.objects[d]; ok && old.manifest && !o.manifest {
		return o.descriptor(source.KindBlob, d) // the same bytes, added as a blob too: still a manifest
	}
	r.objects[d] = o
	if o.manifest {
		return o.descriptor(source.KindManifest, d)
	}
	return o.descriptor(source.KindBlob, d)
}

// Tag points repo:tag at the manifest d of repo, which must have been added.
func (s *Source) Tag(repo reference.Named, tag string, d digest.Digest) error {
	if _, err := reference.WithTag(repo, tag); err != nil {
		return fmt.Errorf("memsource: tag %s:%s: %w", repo.Name(), tag, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.repos[repo.Name()]
	if r == nil || !r.objects[d].manifest {
		return fmt.Errorf("memsource: tag %s:%s: %s is not a manifest of the repository", repo.Name(), tag, d)
	}
	r.tags[tag] = d
	return nil
}

// Untag removes repo:tag, if it is there.
func (s *Source) Untag(repo reference.Named, tag string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.repos[repo.Name()]; r != nil {
		delete(r.tags, tag)
	}
}

// Resolve returns the descriptor of the manifest repo:tag names, or ErrNotFound.
func (s *Source) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	target := repo.Name() + ":" + tag
	if err := ctx.Err(); err != nil {
		return ocispec.Descriptor{}, s.wrap("resolve", target, err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	r := s.repos[repo.Name()]
	if r == nil {
		return ocispec.Descriptor{}, s.wrap("resolve", target, fmt.Errorf("repository: %w", source.ErrNotFound))
	}
	d, ok := r.tags[tag]
	if !ok {
		return ocispec.Descriptor{}, s.wrap("resolve", target, fmt.Errorf("tag: %w", source.ErrNotFound))
	}
	return r.objects[d].descriptor(source.KindManifest, d), nil
}

// ListTags returns repo's tags, sorted, or ErrNotFound if repo holds nothing.
func (s *Source) ListTags(ctx context.Context, repo reference.Named) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, s.wrap("list tags", repo.Name(), err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	r := s.repos[repo.Name()]
	if r == nil {
		return nil, s.wrap("list tags", repo.Name(), fmt.Errorf("repository: %w", source.ErrNotFound))
	}
	return slices.Sorted(maps.Keys(r.tags)), nil
}

// Stat returns an object's descriptor, or ErrNotFound.
func (s *Source) Stat(ctx context.Context, obj source.Object) (ocispec.Descriptor, error) {
	o, err := s.lookup(ctx, "stat", obj)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	return o.descriptor(obj.Kind, obj.Digest), nil
}

// Open returns an object's bytes from offset on, or ErrNotFound. An offset past the end is an error,
// not ErrNotFound: the object is there.
func (s *Source) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	o, err := s.lookup(ctx, "open", obj)
	if err != nil {
		return nil, err
	}
	if offset < 0 || offset > int64(len(o.data)) {
		return nil, s.wrap("open", obj.String(), fmt.Errorf("offset %d outside the object's %d bytes", offset, len(o.data)))
	}
	return &source.Content{
		ReadCloser: &reader{ctx: ctx, r: bytes.NewReader(o.data[offset:])},
		Descriptor: o.descriptor(obj.Kind, obj.Digest),
		Source:     s.name,
	}, nil
}

func (s *Source) lookup(ctx context.Context, op string, obj source.Object) (object, error) {
	if err := ctx.Err(); err != nil {
		return object{}, s.wrap(op, obj.String(), err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	o, ok := object{}, false
	if r := s.repos[obj.Repo.Name()]; r != nil {
		o, ok = r.objects[obj.Digest]
	}
	if !ok || (obj.Kind == source.KindManifest && !o.manifest) {
		return object{}, s.wrap(op, obj.String(), fmt.Errorf("%s: %w", obj.Kind, source.ErrNotFound))
	}
	return o, nil
}

func (s *Source) wrap(op, target string, err error) error {
	return &source.Error{Source: s.name, Op: op, Target: target, Err: err}
}

// reader reads an object's bytes while its context lasts, as a body read from a network does.
type reader struct {
	ctx context.Context
	r   *bytes.Reader
}

func (r *reader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

func (r *reader) Close() error { return nil }
