// Package ipfs reads images from IPFS: a root (/ipfs/<cid>, /ipns/<name> or a DNSLink domain) holding
// the distribution registry's storage layout, read through a kubo node's RPC API. The kubo node fetches
// what it lacks from its peers over bitswap.
//
// The root is trusted as the ImageSource names it, so tags resolve here; the bytes are checked
// against their digests by the content store before anything is kept, as for every source.
package ipfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/ipfs/go-cid"
	"github.com/ipfs/kubo/client/rpc"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/layoutsource"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

// Options configure a Source.
type Options struct {
	// API is the kubo RPC API, e.g. http://127.0.0.1:5001.
	API string
	// Root is /ipfs/<cid>, /ipns/<name>, /ipns/<dnslink domain>, or a bare DNSLink domain.
	Root string
	// Timeout bounds each metadata request (resolving the root, a tag's link, a blob's size): a root
	// that does not resolve, or a block nobody sends, fails after it. Default 30s.
	Timeout time.Duration
	// ResolveTTL is how long a resolved /ipns root is reused. Default 1m.
	ResolveTTL time.Duration
	HTTPClient *http.Client
}

// Source reads one root's layout.
type Source struct {
	opts Options
	api  *rpc.HttpApi

	mu         sync.Mutex
	resolved   string // /ipfs/<cid> of the root
	resolvedAt time.Time
}

// New checks the options; it does not contact kubo.
func New(opts Options) (*Source, error) {
	if opts.Timeout == 0 {
		opts.Timeout = 30 * time.Second
	}
	if opts.ResolveTTL == 0 {
		opts.ResolveTTL = time.Minute
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{}
	}
	root, err := normalizeRoot(opts.Root)
	if err != nil {
		return nil, err
	}
	opts.Root = root
	api, err := rpc.NewURLApiWithClient(opts.API, opts.HTTPClient)
	if err != nil {
		return nil, fmt.Errorf("ipfs: kubo API %q: %w", opts.API, err)
	}
	return &Source{opts: opts, api: api}, nil
}

func normalizeRoot(root string) (string, error) {
	switch {
	case strings.HasPrefix(root, "/ipfs/"):
		c := strings.SplitN(strings.TrimPrefix(root, "/ipfs/"), "/", 2)[0]
		if _, err := cid.Decode(c); err != nil {
			return "", fmt.Errorf("ipfs root %q: %w", root, err)
		}
		return strings.TrimSuffix(root, "/"), nil
	case strings.HasPrefix(root, "/ipns/"):
		if strings.TrimPrefix(root, "/ipns/") == "" {
			return "", fmt.Errorf("ipfs root %q: no name", root)
		}
		return strings.TrimSuffix(root, "/"), nil
	case root != "" && !strings.ContainsAny(root, "/ \t"):
		return "/ipns/" + root, nil // a DNSLink domain
	}
	return "", fmt.Errorf("ipfs root %q: want /ipfs/<cid>, /ipns/<name> or a DNSLink domain", root)
}

func (s *Source) Name() string { return "ipfs" }

// root returns the immutable path of the root, resolving /ipns names (IPNS or DNSLink) now and then.
func (s *Source) root(ctx context.Context) (string, error) {
	if strings.HasPrefix(s.opts.Root, "/ipfs/") {
		return s.opts.Root, nil
	}
	s.mu.Lock()
	if s.resolved != "" && time.Since(s.resolvedAt) < s.opts.ResolveTTL {
		r := s.resolved
		s.mu.Unlock()
		return r, nil
	}
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	var out struct{ Path string }
	if err := s.api.Request("name/resolve", s.opts.Root).Option("recursive", true).Exec(ctx, &out); err != nil {
		return "", s.wrap("resolve", s.opts.Root, err)
	}
	if !strings.HasPrefix(out.Path, "/ipfs/") {
		return "", fmt.Errorf("ipfs: %s resolved to %q, not an /ipfs path: %w", s.opts.Root, out.Path, source.ErrUnavailable)
	}
	s.mu.Lock()
	s.resolved, s.resolvedAt = out.Path, time.Now()
	s.mu.Unlock()
	return out.Path, nil
}

// Resolve reads a tag's link from the layout, and the manifest it names for its size and type.
func (s *Source) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	desc, err := layoutsource.ResolveTag(ctx, s.readSmall, repo, tag)
	if err != nil && !errors.As(err, new(*source.Error)) {
		err = fmt.Errorf("ipfs: %s: %w", s.opts.Root, err)
	}
	return desc, err
}

func (s *Source) Stat(ctx context.Context, obj source.Object) (ocispec.Descriptor, error) {
	if err := obj.Digest.Validate(); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("ipfs: %w", err)
	}
	if obj.Kind == source.KindManifest {
		return layoutsource.ManifestDescriptor(ctx, s.readSmall, obj.Digest)
	}
	size, err := s.size(ctx, layout.BlobData(obj.Digest))
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{Digest: obj.Digest, Size: size}, nil
}

func (s *Source) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	if err := obj.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("ipfs: %w", err)
	}
	p := layout.BlobData(obj.Digest)
	size, err := s.size(ctx, p)
	if err != nil {
		return nil, err
	}
	if offset > size {
		return nil, fmt.Errorf("ipfs: offset %d past the end of %s (%d bytes)", offset, obj.Digest, size)
	}
	root, err := s.root(ctx)
	if err != nil {
		return nil, err
	}
	// The stream is not bounded by Timeout: a transfer that stalls is cut off by the content store.
	resp, err := s.api.Request("cat", root+p).Option("offset", offset).Send(ctx)
	if err == nil && resp.Error != nil {
		err = resp.Error
	}
	if err != nil {
		return nil, s.wrap("read", obj.String(), err)
	}
	return &source.Content{ReadCloser: resp.Output, Descriptor: ocispec.Descriptor{Digest: obj.Digest, Size: size}, Source: s.Name()}, nil
}

// size is the size of the file at p in the layout.
func (s *Source) size(ctx context.Context, p string) (int64, error) {
	root, err := s.root(ctx)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	var st struct {
		Size int64
		Type string
	}
	if err := s.api.Request("files/stat", root+p).Exec(ctx, &st); err != nil {
		return 0, s.wrap("stat", p, err)
	}
	if st.Type != "file" {
		return 0, fmt.Errorf("ipfs: %s is a %s: %w", p, st.Type, source.ErrNotFound)
	}
	return st.Size, nil
}

// readSmall reads a whole small file of the layout.
func (s *Source) readSmall(ctx context.Context, p string, limit int64) ([]byte, error) {
	root, err := s.root(ctx)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	resp, err := s.api.Request("cat", root+p).Option("length", limit+1).Send(ctx)
	if err == nil && resp.Error != nil {
		err = resp.Error
	}
	if err != nil {
		return nil, s.wrap("read", p, err)
	}
	defer resp.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Output, limit+1))
	if err != nil {
		return nil, s.wrap("read", p, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("ipfs: %s is over %d bytes", p, limit)
	}
	return b, nil
}

// wrap tells a missing path (the next source may have it) from a kubo that cannot answer.
func (s *Source) wrap(op, target string, err error) error {
	var rerr *rpc.Error
	if errors.As(err, &rerr) {
		msg := rerr.Message
		if strings.Contains(msg, "no link named") || strings.Contains(msg, "not found") || strings.Contains(msg, "does not exist") {
			return &source.Error{Source: s.Name(), Op: op, Target: target, Err: fmt.Errorf("%s: %w", msg, source.ErrNotFound)}
		}
	}
	return &source.Error{Source: s.Name(), Op: op, Target: target, Err: fmt.Errorf("%w: %w", source.ErrUnavailable, err)}
}

var _ source.Source = (*Source)(nil)
