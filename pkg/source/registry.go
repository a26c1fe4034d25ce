package source

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
)

// ErrUnavailable marks failures that say nothing about the content: the source could not be reached,
// timed out, or failed on its side. A mirror may answer from what it learned earlier.
var ErrUnavailable = errors.New("source unavailable")

// MaxManifestSize is the largest manifest the agent reads, as in distribution's registry.
const MaxManifestSize = 4 << 20

// ManifestMediaTypes are the manifest types the agent asks registries for.
var ManifestMediaTypes = []string{
	ocispec.MediaTypeImageIndex,
	ocispec.MediaTypeImageManifest,
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}

// Endpoint says how to reach one registry host.
type Endpoint struct {
	// URL is the scheme and host (and port) to send requests to, e.g. https://registry-1.docker.io.
	URL *url.URL
	// Username and Password, if set, take precedence over the keychain.
	Username, Password string
	// CAFile adds a PEM bundle to the system roots for this endpoint.
	CAFile             string
	InsecureSkipVerify bool
}

// RegistryOptions configure the upstream source.
type RegistryOptions struct {
	// Endpoints maps registry hosts (as in image references: docker.io, ghcr.io, example.test) to where
	// they are served. A host without an entry is reached at https://<host>; docker.io at
	// https://registry-1.docker.io.
	Endpoints map[string]Endpoint
	// Keychain supplies credentials for hosts without a Username; nil means the docker config.json
	// ($DOCKER_CONFIG or ~/.docker) and its credential helpers.
	Keychain   authn.Keychain
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	UserAgent  string
	// TagPageSize is the number of tags asked for per page when listing tags (the `n` parameter);
	// the registry may send fewer, and the source follows its Link headers. Default
	// DefaultTagPageSize.
	TagPageSize int
}

// DefaultTagPageSize is the page size go-containerregistry's clients (crane ls) ask registries for.
const DefaultTagPageSize = 1000

// Bounds on a tag list from a registry: its pages' bodies together, and the number of pages (a
// registry that links a page to itself must not keep the agent busy).
const (
	maxTagListBytes = 16 << 20
	maxTagPages     = 1000
)

// Registry is the upstream registry source: the OCI distribution API of the registry an image names.
type Registry struct {
	opts    RegistryOptions
	latency *prometheus.HistogramVec

	mu         sync.Mutex
	dynamic    map[string]Endpoint          // from SetEndpoints, over opts.Endpoints
	bases      map[string]http.RoundTripper // by endpoint host
	transports map[string]http.RoundTripper // authenticated, by registry host and repository
}

// NewRegistry returns the upstream source.
func NewRegistry(opts RegistryOptions) (*Registry, error) {
	if opts.Keychain == nil {
		opts.Keychain = authn.DefaultKeychain
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.UserAgent == "" {
		opts.UserAgent = "imagemesh"
	}
	if opts.TagPageSize <= 0 {
		opts.TagPageSize = DefaultTagPageSize
	}
	for host, ep := range opts.Endpoints {
		if ep.URL == nil || (ep.URL.Scheme != "http" && ep.URL.Scheme != "https") || ep.URL.Host == "" {
			return nil, fmt.Errorf("upstream %s: endpoint must be an http or https URL", host)
		}
		if ep.URL.Path != "" && ep.URL.Path != "/" {
			return nil, fmt.Errorf("upstream %s: endpoint %s: a path is not supported", host, ep.URL.Redacted())
		}
	}
	r := &Registry{
		opts:       opts,
		bases:      make(map[string]http.RoundTripper),
		transports: make(map[string]http.RoundTripper),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imagemesh_upstream_request_duration_seconds",
			Help:    "Time until the upstream registry answered (headers), by operation and status code.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2.5, 10),
		}, []string{"operation", "code"}),
	}
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(r.latency)
	}
	return r, nil
}

// Name labels the source in metrics and logs.
func (r *Registry) Name() string { return "upstream" }

var (
	_ Source    = (*Registry)(nil)
	_ TagLister = (*Registry)(nil)
	_ TagLister = (*Chain)(nil)
	_ TagLister = (*ByRegistry)(nil)
)

// SetEndpoints replaces the endpoints set at run time (from the cluster's ImageSources), which take
// precedence over the configured ones. Connections and tokens of the old endpoints are dropped.
func (r *Registry) SetEndpoints(eps map[string]Endpoint) error {
	for host, ep := range eps {
		if ep.URL == nil || (ep.URL.Scheme != "http" && ep.URL.Scheme != "https") || ep.URL.Host == "" {
			return fmt.Errorf("upstream %s: endpoint must be an http or https URL", host)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dynamic = eps
	clear(r.transports)
	return nil
}

func (r *Registry) endpoint(host string) Endpoint {
	r.mu.Lock()
	ep, ok := r.dynamic[host]
	r.mu.Unlock()
	if ok {
		return ep
	}
	if ep, ok := r.opts.Endpoints[host]; ok {
		return ep
	}
	if host == "docker.io" {
		return Endpoint{URL: &url.URL{Scheme: "https", Host: "registry-1.docker.io"}}
	}
	return Endpoint{URL: &url.URL{Scheme: "https", Host: host}}
}

// Resolve asks the registry for the tag with HEAD, and with GET when the answer has no digest.
func (r *Registry) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	target := repo.Name() + ":" + tag
	resp, err := r.do(ctx, "resolve", repo, http.MethodHead, "manifests/"+tag, nil)
	if err != nil {
		return ocispec.Descriptor{}, r.wrap("resolve", target, err)
	}
	_ = resp.Body.Close() // a HEAD answer has no body
	desc, err := manifestDescriptor(resp)
	if err != nil {
		return ocispec.Descriptor{}, r.wrap("resolve", target, err)
	}
	if desc.Digest != "" {
		return desc, nil
	}
	// Some registries leave Docker-Content-Digest off HEAD answers: read the manifest and hash it.
	resp, err = r.do(ctx, "resolve", repo, http.MethodGet, "manifests/"+tag, nil)
	if err != nil {
		return ocispec.Descriptor{}, r.wrap("resolve", target, err)
	}
	defer func() { _ = resp.Body.Close() }() // read below; a failed read is the error
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	if err != nil {
		return ocispec.Descriptor{}, r.wrap("resolve", target, fmt.Errorf("%w: %w", ErrUnavailable, err))
	}
	if len(b) > MaxManifestSize {
		return ocispec.Descriptor{}, r.wrap("resolve", target, fmt.Errorf("manifest is larger than %d bytes", MaxManifestSize))
	}
	desc, err = manifestDescriptor(resp)
	if err != nil {
		return ocispec.Descriptor{}, r.wrap("resolve", target, err)
	}
	desc.Digest, desc.Size = digest.FromBytes(b), int64(len(b))
	return desc, nil
}

// Stat asks the registry for the object with HEAD.
func (r *Registry) Stat(ctx context.Context, obj Object) (ocispec.Descriptor, error) {
	resp, err := r.do(ctx, "stat", obj.Repo, http.MethodHead, objectPath(obj), nil)
	if err != nil {
		return ocispec.Descriptor{}, r.wrap("stat", obj.String(), err)
	}
	_ = resp.Body.Close() // a HEAD answer has no body
	if resp.ContentLength < 0 {
		return ocispec.Descriptor{}, r.wrap("stat", obj.String(), errors.New("no Content-Length in the answer"))
	}
	desc := ocispec.Descriptor{Digest: obj.Digest, Size: resp.ContentLength, MediaType: mediaType(resp)}
	return desc, nil
}

// Open GETs the object from offset, with a Range request, or by skipping when Range is ignored.
func (r *Registry) Open(ctx context.Context, obj Object, offset int64) (*Content, error) {
	var hdr http.Header
	if offset > 0 {
		hdr = http.Header{"Range": {fmt.Sprintf("bytes=%d-", offset)}}
	}
	resp, err := r.do(ctx, "open", obj.Repo, http.MethodGet, objectPath(obj), hdr)
	if err != nil {
		return nil, r.wrap("open", obj.String(), err)
	}
	desc := ocispec.Descriptor{Digest: obj.Digest, MediaType: mediaType(resp)}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != offset {
			_ = resp.Body.Close() // refused unread
			return nil, r.wrap("open", obj.String(), fmt.Errorf("asked for bytes from %d, got Content-Range %q", offset, resp.Header.Get("Content-Range")))
		}
		desc.Size = total
	default:
		// A manifest is read whole and capped by the reader; a blob's size is what every waiting
		// client is told up front, so it must be known.
		if resp.ContentLength < 0 && obj.Kind != KindManifest {
			_ = resp.Body.Close() // refused unread
			return nil, r.wrap("open", obj.String(), errors.New("no Content-Length in the answer"))
		}
		desc.Size = resp.ContentLength
		if offset > 0 {
			// The server ignored Range: skip what we have.
			if _, err := io.CopyN(io.Discard, resp.Body, offset); err != nil {
				_ = resp.Body.Close() // the read failed already
				return nil, r.wrap("open", obj.String(), fmt.Errorf("%w: skip to %d: %w", ErrUnavailable, offset, err))
			}
		}
	}
	return &Content{ReadCloser: resp.Body, Descriptor: desc, Source: r.Name()}, nil
}

// ListTags returns every tag of repo, page by page as the registry hands them out (`n` and the Link
// header of the OCI distribution spec), or ErrNotFound if the registry does not know the repository.
// Links are followed only on the endpoint's own scheme and host.
func (r *Registry) ListTags(ctx context.Context, repo reference.Named) ([]string, error) {
	target := repo.Name()
	ep := r.endpoint(reference.Domain(repo))
	first := *ep.URL
	first.Path = "/v2/" + reference.Path(repo) + "/tags/list"
	first.RawQuery = url.Values{"n": {strconv.Itoa(r.opts.TagPageSize)}}.Encode()
	tags := []string{}
	read := int64(0)
	for page, next := 0, &first; next != nil; page++ {
		if page == maxTagPages {
			return nil, r.wrap("list tags of", target, fmt.Errorf("more than %d pages of tags", maxTagPages))
		}
		resp, err := r.send(ctx, "list", repo, ep, http.MethodGet, next, nil)
		if err != nil {
			return nil, r.wrap("list tags of", target, err)
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxTagListBytes-read+1))
		_ = resp.Body.Close() // read, or failed to be
		if err != nil {
			return nil, r.wrap("list tags of", target, fmt.Errorf("%w: page %d: %w", ErrUnavailable, page+1, err))
		}
		if read += int64(len(body)); read > maxTagListBytes {
			return nil, r.wrap("list tags of", target, fmt.Errorf("the list is larger than %d bytes", maxTagListBytes))
		}
		var list struct {
			Tags []string `json:"tags"`
		}
		if err := json.Unmarshal(body, &list); err != nil {
			return nil, r.wrap("list tags of", target, fmt.Errorf("page %d: %w", page+1, err))
		}
		tags = append(tags, list.Tags...)
		if next, err = nextPage(resp, ep.URL); err != nil {
			return nil, r.wrap("list tags of", target, err)
		}
	}
	return tags, nil
}

// nextPage returns the URL of the next page that a Link header (`<url>; rel="next"`) names, resolved
// against the request, or nil without one. It must stay on the endpoint's scheme and host: the
// request carries the endpoint's credentials.
func nextPage(resp *http.Response, endpoint *url.URL) (*url.URL, error) {
	for _, link := range splitLinks(resp.Header.Values("Link")) {
		target, params, ok := strings.Cut(link, ";")
		target = strings.TrimSpace(target)
		if !ok || !strings.Contains(strings.ReplaceAll(params, " ", ""), `rel="next"`) ||
			!strings.HasPrefix(target, "<") || !strings.HasSuffix(target, ">") {
			continue
		}
		u, err := url.Parse(strings.TrimSuffix(strings.TrimPrefix(target, "<"), ">"))
		if err != nil {
			return nil, fmt.Errorf("the Link header %q: %w", link, err)
		}
		u = resp.Request.URL.ResolveReference(u)
		if u.Scheme != endpoint.Scheme || u.Host != endpoint.Host {
			return nil, fmt.Errorf("the Link header %q leads away from %s", link, endpoint.Redacted())
		}
		return u, nil
	}
	return nil, nil
}

// splitLinks splits Link header values into links: one value may hold several, separated by commas
// (`<a>; rel="prev", <b>; rel="next"`), and a URL may hold commas too.
func splitLinks(values []string) []string {
	var links []string
	for _, v := range values {
		for i, part := range strings.Split(v, ",") {
			if i > 0 && !strings.HasPrefix(strings.TrimSpace(part), "<") {
				links[len(links)-1] += "," + part
				continue
			}
			links = append(links, strings.TrimSpace(part))
		}
	}
	return links
}

func (r *Registry) wrap(op, target string, err error) error {
	return &Error{Source: r.Name(), Op: op, Target: target, Err: err}
}

func objectPath(obj Object) string {
	if obj.Kind == KindManifest {
		return "manifests/" + obj.Digest.String()
	}
	return "blobs/" + obj.Digest.String()
}

// do sends one request for repo, authenticated for pulling it, and turns error answers into errors:
// 404 into ErrNotFound, failures of the network or the server into ErrUnavailable.
func (r *Registry) do(ctx context.Context, op string, repo reference.Named, method, path string, hdr http.Header) (*http.Response, error) {
	ep := r.endpoint(reference.Domain(repo))
	u := *ep.URL
	u.Path = "/v2/" + reference.Path(repo) + "/" + path
	if strings.HasPrefix(path, "manifests/") {
		hdr = hdr.Clone()
		if hdr == nil {
			hdr = http.Header{}
		}
		hdr.Set("Accept", strings.Join(ManifestMediaTypes, ", "))
	}
	return r.send(ctx, op, repo, ep, method, &u, hdr)
}

// send is do for a URL of the endpoint ep.
func (r *Registry) send(ctx context.Context, op string, repo reference.Named, ep Endpoint, method string, u *url.URL, hdr http.Header) (*http.Response, error) {
	t, err := r.transport(ctx, reference.Domain(repo), reference.Path(repo), ep)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), nil)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	start := time.Now()
	resp, err := (&http.Client{Transport: t}).Do(req)
	if err != nil {
		r.latency.WithLabelValues(op, "error").Observe(time.Since(start).Seconds())
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	r.latency.WithLabelValues(op, strconv.Itoa(resp.StatusCode)).Observe(time.Since(start).Seconds())
	if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent {
		return resp, nil
	}
	defer func() { _ = resp.Body.Close() }() // CheckError reads the error body
	err = transport.CheckError(resp, http.StatusOK, http.StatusPartialContent)
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("%w: %w", ErrNotFound, err)
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusRequestTimeout:
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return nil, err
}

// transport returns a round tripper authenticated to pull repo from host. Tokens are scoped to one
// repository, so there is one per repository; the bearer transport refreshes its token on its own.
func (r *Registry) transport(ctx context.Context, host, repo string, ep Endpoint) (http.RoundTripper, error) {
	key := host + "/" + repo
	r.mu.Lock()
	if t, ok := r.transports[key]; ok {
		r.mu.Unlock()
		return t, nil
	}
	base, err := r.baseLocked(ep)
	r.mu.Unlock()
	if err != nil {
		return nil, err
	}

	auth := authn.Anonymous
	if ep.Username != "" {
		auth = &authn.Basic{Username: ep.Username, Password: ep.Password}
	} else if logical, err := name.NewRegistry(host); err == nil {
		if a, err := authn.Resolve(ctx, r.opts.Keychain, logical); err == nil {
			auth = a
		} else {
			r.opts.Logger.Warn("no credentials from keychain", "registry", host, "err", err)
		}
	}
	var regOpts []name.Option
	if ep.URL.Scheme == "http" {
		regOpts = append(regOpts, name.Insecure)
	}
	reg, err := name.NewRegistry(ep.URL.Host, regOpts...)
	if err != nil {
		return nil, fmt.Errorf("endpoint %s: %w", ep.URL.Redacted(), err)
	}
	t, err := transport.NewWithContext(ctx, reg, auth, base, []string{reg.Repo(repo).Scope(transport.PullScope)})
	if err != nil {
		// An answer from the registry (bad credentials, say) is not an outage; anything else is.
		var terr *transport.Error
		if errors.As(err, &terr) && terr.StatusCode < 500 && terr.StatusCode != http.StatusTooManyRequests {
			return nil, fmt.Errorf("authenticate to %s: %w", ep.URL.Host, err)
		}
		return nil, fmt.Errorf("%w: reach %s: %w", ErrUnavailable, ep.URL.Host, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.transports) >= 1024 {
		// A crude bound: tokens are cheap to get again, memory for every repository ever pulled is not.
		clear(r.transports)
	}
	r.transports[key] = t
	return t, nil
}

func (r *Registry) baseLocked(ep Endpoint) (http.RoundTripper, error) {
	key := ep.URL.Scheme + "://" + ep.URL.Host
	if t, ok := r.bases[key]; ok {
		return t, nil
	}
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: ep.InsecureSkipVerify} //nolint:gosec // an explicit, per-endpoint choice of the operator
	if ep.CAFile != "" {
		pem, err := os.ReadFile(ep.CAFile)
		if err != nil {
			return nil, fmt.Errorf("endpoint %s: read CA file: %w", ep.URL.Host, err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("endpoint %s: no certificate in %s", ep.URL.Host, ep.CAFile)
		}
		tlsConfig.RootCAs = pool
	}
	base := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsConfig,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   32,
		ForceAttemptHTTP2:     true,
		// Blobs are compressed already, and a transparent gzip would hide the Content-Length.
		DisableCompression: true,
	}
	t := transport.NewUserAgent(transport.NewRetry(base,
		transport.WithRetryBackoff(transport.Backoff{Duration: 200 * time.Millisecond, Factor: 2, Jitter: 0.2, Steps: 4}),
		transport.WithRetryStatusCodes(http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusInternalServerError,
			http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout),
	), r.opts.UserAgent)
	r.bases[key] = t
	return t, nil
}

func manifestDescriptor(resp *http.Response) (ocispec.Descriptor, error) {
	desc := ocispec.Descriptor{MediaType: mediaType(resp), Size: resp.ContentLength}
	if h := resp.Header.Get("Docker-Content-Digest"); h != "" {
		d, err := digest.Parse(h)
		if err != nil {
			return desc, fmt.Errorf("bad Docker-Content-Digest %q: %w", h, err)
		}
		desc.Digest = d
	}
	if desc.Size > MaxManifestSize {
		return desc, fmt.Errorf("manifest is %d bytes, larger than %d", desc.Size, MaxManifestSize)
	}
	return desc, nil
}

func mediaType(resp *http.Response) string {
	mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil {
		return ""
	}
	return mt
}

// parseContentRange parses "bytes start-end/total", the one range of a registry's 206 answer, and
// nothing else: no sign, no other spacing, nothing after the total, decimal digits only.
func parseContentRange(h string) (start, total int64, err error) {
	rest, ok := strings.CutPrefix(h, "bytes ")
	first, rest, ok1 := strings.Cut(rest, "-")
	last, length, ok2 := strings.Cut(rest, "/")
	var end int64
	if ok && ok1 && ok2 {
		start, err = parseDecimal(first)
		if err == nil {
			end, err = parseDecimal(last)
		}
		if err == nil {
			total, err = parseDecimal(length)
		}
	}
	if !ok || !ok1 || !ok2 || err != nil || end < start || total <= end {
		return 0, 0, fmt.Errorf("bad Content-Range %q", h)
	}
	return start, total, nil
}

// parseDecimal parses a non-negative decimal integer of digits alone: strconv.ParseInt would also
// take a sign.
func parseDecimal(s string) (int64, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("not a decimal number: %q", s)
	}
	return strconv.ParseInt(s, 10, 64)
}
