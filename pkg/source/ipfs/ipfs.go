// Package ipfs reads images from IPFS: a root (/ipfs/<cid>, /ipns/<name> or a DNSLink domain) holding
// the distribution registry's storage layout, read through a kubo node's RPC API. The kubo node fetches
// what it lacks from its peers over bitswap, and checks every block against its CID.
//
// It reads the root's files and nothing else; pkg/source/layoutsource answers from them. So the root
// is trusted for tags, as the ImageSource names it, and not for bytes: blocks match their CIDs, but a
// file at a digest's path may not hold that digest's bytes (a broken publisher, or a root someone else
// publishes), so its bytes come marked untrusted, and a blob that fails verification is not asked of
// this root again for a while. An /ipns root is resolved again after ResolveTTL. Every metadata request
// is bounded by Timeout; every failure says whether the path is missing (source.ErrNotFound) or kubo or
// the root could not answer (source.ErrUnavailable).
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

	"github.com/ipfs/go-cid"
	"github.com/ipfs/kubo/client/rpc"

	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/layoutsource"
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
	// RejectFor is how long a blob that failed verification is not read from the root. Default 10m.
	RejectFor  time.Duration
	HTTPClient *http.Client
}

// Source reads one root's layout.
type Source struct {
	*layoutsource.Source
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
	name, err := normalizeRoot(opts.Root)
	if err != nil {
		return nil, err
	}
	api, err := rpc.NewURLApiWithClient(opts.API, opts.HTTPClient)
	if err != nil {
		return nil, fmt.Errorf("ipfs: kubo API %q: %w", opts.API, err)
	}
	r := &root{api: api, name: name, timeout: opts.Timeout, resolveTTL: opts.ResolveTTL}
	return &Source{layoutsource.New(r, layoutsource.Options{Name: "ipfs", Location: "root " + name, RejectFor: opts.RejectFor})}, nil
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

// root reads the layout's files under an IPFS path through kubo: layoutsource.Files.
type root struct {
	api        *rpc.HttpApi
	name       string // /ipfs/<cid>[/...] or /ipns/<name>[/...]
	timeout    time.Duration
	resolveTTL time.Duration

	mu         sync.Mutex
	resolved   string // /ipfs/<cid> of an /ipns root
	resolvedAt time.Time
}

// path returns the immutable path of the root, resolving /ipns names (IPNS or DNSLink) now and then.
func (r *root) path(ctx context.Context) (string, error) {
	if strings.HasPrefix(r.name, "/ipfs/") {
		return r.name, nil
	}
	r.mu.Lock()
	if r.resolved != "" && time.Since(r.resolvedAt) < r.resolveTTL {
		p := r.resolved
		r.mu.Unlock()
		return p, nil
	}
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	var out struct{ Path string }
	if err := r.api.Request("name/resolve", r.name).Option("recursive", true).Exec(ctx, &out); err != nil {
		return "", fmt.Errorf("resolve %s: %w", r.name, classify(err))
	}
	if !strings.HasPrefix(out.Path, "/ipfs/") {
		return "", fmt.Errorf("%s resolved to %q, not an /ipfs path: %w", r.name, out.Path, source.ErrUnavailable)
	}
	r.mu.Lock()
	r.resolved, r.resolvedAt = out.Path, time.Now()
	r.mu.Unlock()
	return out.Path, nil
}

// ReadFile reads a whole small file of the layout.
func (r *root) ReadFile(ctx context.Context, p string, limit int64) ([]byte, error) {
	rp, err := r.path(ctx)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	resp, err := r.api.Request("cat", rp+p).Option("length", limit+1).Send(ctx)
	if err == nil && resp.Error != nil {
		err = resp.Error
	}
	if err != nil {
		return nil, classify(err)
	}
	defer func() { _ = resp.Close() }() // read to its end or to the limit: nothing left to fail
	b, err := io.ReadAll(io.LimitReader(resp.Output, limit+1))
	if err != nil {
		return nil, classify(err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("over %d bytes, more than a manifest or link may have", limit)
	}
	return b, nil
}

// Size is the size of the file at p in the layout.
func (r *root) Size(ctx context.Context, p string) (int64, error) {
	rp, err := r.path(ctx)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	var st struct {
		Size int64
		Type string
	}
	if err := r.api.Request("files/stat", rp+p).Exec(ctx, &st); err != nil {
		return 0, classify(err)
	}
	if st.Type != "file" {
		return 0, fmt.Errorf("a %s, not a file: %w", st.Type, source.ErrNotFound)
	}
	return st.Size, nil
}

// Open reads the file at p from offset on. The stream is not bounded by the timeout: a transfer that
// stalls is cut off by the content store.
func (r *root) Open(ctx context.Context, p string, offset int64) (io.ReadCloser, int64, error) {
	size, err := r.Size(ctx, p)
	if err != nil {
		return nil, 0, err
	}
	if offset > size {
		return nil, 0, fmt.Errorf("offset %d past the end of the file (%d bytes)", offset, size)
	}
	rp, err := r.path(ctx)
	if err != nil {
		return nil, 0, err
	}
	resp, err := r.api.Request("cat", rp+p).Option("offset", offset).Send(ctx)
	if err == nil && resp.Error != nil {
		err = resp.Error
	}
	if err != nil {
		return nil, 0, classify(err)
	}
	return resp.Output, size, nil
}

// classify tells a missing path (the next source may have it) from a kubo that cannot answer.
func classify(err error) error {
	var rerr *rpc.Error
	if errors.As(err, &rerr) {
		msg := rerr.Message
		if strings.Contains(msg, "no link named") || strings.Contains(msg, "not found") || strings.Contains(msg, "does not exist") {
			return fmt.Errorf("%s: %w", msg, source.ErrNotFound)
		}
	}
	return fmt.Errorf("%w: %w", source.ErrUnavailable, err)
}

var (
	_ source.Source      = (*Source)(nil)
	_ layoutsource.Files = (*root)(nil)
)
