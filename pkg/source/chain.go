package source

import (
	"context"
	"errors"
	"fmt"

	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Link is one source in a Chain.
type Link struct {
	Source Source
	// ResolveTags lets this source answer tag lookups. Digests verify themselves, tags do not: only
	// sources trusted for the registry (its upstream, an ImageSource's own bucket or root) should.
	ResolveTags bool
	// TagFallback lets this source answer tag lookups only when no ResolveTags source could: peers
	// that may answer tags are asked after the registry, not before.
	TagFallback bool
}

// Chain asks its sources in order and returns the first answer. It is itself a Source.
type Chain struct {
	links []Link
}

// NewChain returns a chain of the given links, asked in that order.
func NewChain(links ...Link) *Chain { return &Chain{links: links} }

// Name labels the source in metrics and logs; the answers name the link that gave them.
func (c *Chain) Name() string { return "chain" }

// Resolve asks the sources trusted with tags, then the fallbacks. It returns ErrNotFound only if every one of them said
// not found; if any failed otherwise, the caller learns that the answer is unknown, not negative.
func (c *Chain) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	var errs []error
	for _, fallback := range []bool{false, true} {
		for _, l := range c.links {
			if (fallback && !l.TagFallback) || (!fallback && !l.ResolveTags) {
				continue
			}
			desc, err := l.Source.Resolve(ctx, repo, tag)
			if err == nil {
				return desc, nil
			}
			errs = append(errs, err)
		}
	}
	return ocispec.Descriptor{}, joinErrors(errs)
}

// ListTags asks the links trusted with tags whose sources can list (TagLister), in the order of
// Resolve: the ResolveTags links, then the TagFallback ones. Sources that cannot list are passed
// over; with none that can, the answer is ErrNotFound. Like Resolve, it returns ErrNotFound only if
// every source asked said so.
func (c *Chain) ListTags(ctx context.Context, repo reference.Named) ([]string, error) {
	var errs []error
	for _, fallback := range []bool{false, true} {
		for _, l := range c.links {
			if (fallback && !l.TagFallback) || (!fallback && !l.ResolveTags) {
				continue
			}
			lister, ok := l.Source.(TagLister)
			if !ok {
				continue
			}
			tags, err := lister.ListTags(ctx, repo)
			if err == nil {
				return tags, nil
			}
			errs = append(errs, err)
		}
	}
	return nil, joinErrors(errs)
}

// Stat asks the links in order until one knows the object, at its trusted size if it has one.
func (c *Chain) Stat(ctx context.Context, obj Object) (ocispec.Descriptor, error) {
	var errs []error
	for _, l := range c.links {
		desc, err := l.Source.Stat(ctx, obj)
		if err == nil {
			if err = checkSize(obj, desc.Size, l.Source.Name()); err == nil {
				return desc, nil
			}
		}
		errs = append(errs, err)
	}
	return ocispec.Descriptor{}, joinErrors(errs)
}

// Open asks the links in order until one opens the object, at its trusted size if it has one: a
// source that claims another size is told (Content.Reject) and passed over.
func (c *Chain) Open(ctx context.Context, obj Object, offset int64) (*Content, error) {
	var errs []error
	for _, l := range c.links {
		content, err := l.Source.Open(ctx, obj, offset)
		if err == nil {
			if content.Source == "" {
				content.Source = l.Source.Name()
			}
			if err = checkSize(obj, content.Descriptor.Size, content.Source); err == nil {
				return content, nil
			}
			_ = content.Close() // refused unread
			if content.Reject != nil {
				content.Reject(err)
			}
		}
		errs = append(errs, err)
	}
	return nil, joinErrors(errs)
}

func checkSize(obj Object, claimed int64, src string) error {
	if obj.Size > 0 && claimed >= 0 && claimed != obj.Size {
		return fmt.Errorf("%s from %s: %d bytes, the manifest says %d: %w", obj, src, claimed, obj.Size, ErrWrongSize)
	}
	return nil
}

// joinErrors keeps ErrNotFound visible only when it is the whole truth.
func joinErrors(errs []error) error {
	if len(errs) == 0 {
		return ErrNotFound
	}
	for _, err := range errs {
		if !errors.Is(err, ErrNotFound) {
			var others []error
			for _, e := range errs {
				if !errors.Is(e, ErrNotFound) {
					others = append(others, e)
				}
			}
			return errors.Join(others...)
		}
	}
	return errors.Join(errs...)
}
