package source

import (
	"context"
	"sync"

	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ByRegistry asks, for each registry host, the sources configured for it, in order: an ImageSource's
// Storj buckets and IPFS roots hold the images of its registries only. A host with no sources is
// ErrNotFound. The sources can be replaced while it serves.
type ByRegistry struct {
	mu      sync.RWMutex
	sources map[string][]Source
}

// NewByRegistry returns a ByRegistry with no sources.
func NewByRegistry() *ByRegistry { return &ByRegistry{sources: map[string][]Source{}} }

// Set replaces every host's sources.
func (b *ByRegistry) Set(sources map[string][]Source) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sources = sources
}

func (b *ByRegistry) chain(repo reference.Named) *Chain {
	b.mu.RLock()
	defer b.mu.RUnlock()
	srcs := b.sources[reference.Domain(repo)]
	links := make([]Link, 0, len(srcs))
	for _, s := range srcs {
		links = append(links, Link{Source: s, ResolveTags: true})
	}
	return NewChain(links...)
}

// Name labels the source in metrics and logs.
func (b *ByRegistry) Name() string { return "decentralized" }

// Resolve asks the sources of the repository's registry, in order.
func (b *ByRegistry) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	return b.chain(repo).Resolve(ctx, repo, tag)
}

// ListTags asks the registry's sources that can list tags, in order; they are all trusted with
// tags, as they are for Resolve.
func (b *ByRegistry) ListTags(ctx context.Context, repo reference.Named) ([]string, error) {
	return b.chain(repo).ListTags(ctx, repo)
}

// Stat asks the sources of the object's registry, in order.
func (b *ByRegistry) Stat(ctx context.Context, obj Object) (ocispec.Descriptor, error) {
	return b.chain(obj.Repo).Stat(ctx, obj)
}

// Open asks the sources of the object's registry, in order.
func (b *ByRegistry) Open(ctx context.Context, obj Object, offset int64) (*Content, error) {
	return b.chain(obj.Repo).Open(ctx, obj, offset)
}
