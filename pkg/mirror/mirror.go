// Package mirror serves the OCI distribution pull API for a node: containerd (through hosts.toml),
// docker, crane and skopeo pull through it. It answers from the content store, and fetches what the store
// lacks from its source chain, once per digest, streaming to every waiting client as bytes arrive.
//
// The mirror is pull-only. Tags are resolved through the chain's trusted sources and cached for a short
// TTL; when those sources are unavailable, the last answer is served, and a log line says so.
package mirror

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/singleflight"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// Options configure a Mirror.
type Options struct {
	Store  *content.Store
	Source source.Source
	// DefaultRegistry is the registry of requests that name none (no ns parameter): what
	// `docker pull localhost:5000/alpine` means. Default docker.io.
	DefaultRegistry string
	// Registries, if not empty, are the only registries the mirror pulls from.
	Registries []string
	// TagTTL is how long a tag's answer is used without asking again. Default 30s.
	TagTTL time.Duration
	// TagDir keeps tag answers across restarts, so that a restarted agent still serves while the
	// upstream is down. Empty keeps them in memory only.
	TagDir string
	// MaxTags bounds the tag answers kept, in memory and in TagDir (see tagCache). Default
	// DefaultMaxTags.
	MaxTags int
	// MaxSourceRequests bounds the requests that wait on a source (peers, decentralized storage, the
	// registry) at once; MaxSourceRequestsPerClient bounds them per client address. Past either, the
	// mirror answers 429 TOOMANYREQUESTS at once. Requests the store answers alone are not counted.
	// Defaults: DefaultMaxSourceRequests, DefaultMaxSourceRequestsPerClient.
	MaxSourceRequests, MaxSourceRequestsPerClient int
	// NodeToken, if set, is required in the NodeTokenHeader of every /v2 request: the node's
	// containerd sends it (the agent writes it into the hosts.toml files it owns), other clients
	// get 401 UNAUTHORIZED. Empty serves anyone who reaches the port.
	NodeToken  string
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Defaults of Options.
const (
	// DefaultRegistry is the registry of requests that name none: Docker's convention.
	DefaultRegistry = "docker.io"
	// DefaultTagTTL is how long a tag's answer is reused: short enough that a pushed tag shows within
	// a minute, long enough that a burst of pulls asks the registry once.
	DefaultTagTTL = 30 * time.Second
)

// NodeTokenHeader carries the node token (Options.NodeToken) on requests to the mirror.
const NodeTokenHeader = "X-Imagemesh-Node-Token"

// Mirror is an http.Handler for the /v2/ pull API.
type Mirror struct {
	opts    Options
	store   *content.Store
	source  atomic.Pointer[sourceRef]
	tags    *tagCache
	log     *slog.Logger
	metrics *metrics

	journal   journal
	sizes     knownSizes
	limit     *sourceLimit
	manifests singleflight.Group
	resolves  singleflight.Group
	tagLists  singleflight.Group
	// registries, when set, are the only registries pulled from: opts.Registries, then SetRegistries.
	registries atomic.Pointer[[]string]
}

// New returns a Mirror.
func New(opts Options) (*Mirror, error) {
	if opts.Store == nil || opts.Source == nil {
		return nil, errors.New("mirror: a store and a source are required")
	}
	if opts.DefaultRegistry == "" {
		opts.DefaultRegistry = DefaultRegistry
	}
	if opts.TagTTL == 0 {
		opts.TagTTL = DefaultTagTTL
	}
	if opts.MaxSourceRequests <= 0 {
		opts.MaxSourceRequests = DefaultMaxSourceRequests
	}
	if opts.MaxSourceRequestsPerClient <= 0 {
		opts.MaxSourceRequestsPerClient = DefaultMaxSourceRequestsPerClient
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.MaxTags <= 0 {
		opts.MaxTags = DefaultMaxTags
	}
	tags, err := newTagCache(opts.TagDir, opts.MaxTags)
	if err != nil {
		return nil, err
	}
	m := &Mirror{
		opts:    opts,
		store:   opts.Store,
		tags:    tags,
		sizes:   newKnownSizes(),
		log:     opts.Logger,
		metrics: newMetrics(opts.Registerer),
		limit:   newSourceLimit(opts.MaxSourceRequests, opts.MaxSourceRequestsPerClient),
	}
	m.SetSource(opts.Source)
	if len(opts.Registries) > 0 {
		m.SetRegistries(opts.Registries)
	}
	return m, nil
}

// sourceRef holds the mirror's source for atomic replacement.
type sourceRef struct{ source.Source }

// SetSource replaces where the mirror gets what the store does not hold. Requests under way finish
// with the source they started with. The agent starts with its trusted sources and adds the peers
// once the peering node, which serves peers through the mirror, is up.
func (m *Mirror) SetSource(s source.Source) { m.source.Store(&sourceRef{s}) }

// src is the mirror's current source.
func (m *Mirror) src() source.Source { return m.source.Load().Source }

// request is one parsed API request.
type request struct {
	repo reference.Named
	name string // the repository as the client named it in the path
	kind string // "manifests", "blobs", "tags" (ref is "list")
	ref  string
}

func (m *Mirror) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rw := &responseWriter{ResponseWriter: w, source: "none", rc: http.NewResponseController(w)}
	kind := "other"
	var req *request
	defer func() {
		// The server keeps a write deadline across the requests of a connection: the next answer
		// on it starts with none.
		_ = rw.rc.SetWriteDeadline(time.Time{}) // writers without deadlines need no reset
		took := time.Since(start)
		m.metrics.observe(kind, r.Method, rw.status(), rw.source, rw.bytes, took)
		if req != nil && (kind == "manifest" || kind == "blob") {
			m.journal.record(Pull{Time: start, Method: methodLabel(r.Method), Kind: kind, Repo: req.repo.Name(), Ref: req.ref,
				Status: rw.status(), Source: rw.source, Bytes: rw.bytes, Duration: took, Error: rw.err})
		}
	}()
	rw.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if !m.authorized(r) {
		// No WWW-Authenticate: there is nothing a client could log in with. containerd goes on to its
		// next host (the registry).
		m.writeError(rw, 0, errcode.ErrorCodeUnauthorized.WithMessage(
			"this mirror serves its node's containerd only (the "+NodeTokenHeader+" header of its hosts.toml)"))
		return
	}

	path := r.URL.Path
	if path == "/v2" || path == "/v2/" {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			rw.Header().Set("Allow", "GET, HEAD")
			m.writeError(rw, 0, errcode.ErrorCodeUnsupported.WithMessage("the mirror is pull-only"))
			return
		}
		rw.Header().Set("Content-Type", "application/json")
		rw.Header().Set("Content-Length", "2")
		rw.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			_, _ = io.WriteString(rw, "{}") // a client that went away is no error of ours
		}
		return
	}
	if !strings.HasPrefix(path, "/v2/") {
		http.NotFound(rw, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		rw.Header().Set("Allow", "GET, HEAD")
		m.writeError(rw, http.StatusMethodNotAllowed, errcode.ErrorCodeUnsupported.WithMessage(
			"the mirror is pull-only: push to the upstream registry or to an imagemesh gateway"))
		return
	}
	req, err := m.parse(r)
	if err != nil {
		m.writeError(rw, 0, err)
		return
	}
	kind = kindLabel(req.kind)
	if !m.local(req) {
		release, ok := m.limit.acquire(clientAddr(r))
		if !ok {
			m.writeError(rw, 0, errTooManyRequests)
			return
		}
		defer release()
	}
	switch req.kind {
	case "manifests":
		m.serveManifest(rw, r, req)
	case "blobs":
		m.serveBlob(rw, r, req)
	case "tags":
		m.serveTagList(rw, r, req)
	}
}

// authorized says whether r carries the node token, when one is required. Every value of the
// header is compared in full, in time that does not depend on where a guess goes wrong.
func (m *Mirror) authorized(r *http.Request) bool {
	if m.opts.NodeToken == "" {
		return true
	}
	want := []byte(m.opts.NodeToken)
	ok := 0
	for _, got := range r.Header.Values(NodeTokenHeader) {
		ok |= subtle.ConstantTimeCompare([]byte(got), want)
	}
	return ok == 1
}

// kindLabel is the kind label of a request's metrics: manifest, blob or tags.
func kindLabel(kind string) string {
	switch kind {
	case "manifests":
		return "manifest"
	case "blobs":
		return "blob"
	case "tags":
		return "tags"
	}
	return "other"
}

// parse turns /v2/<name>/(manifests|blobs)/<reference>?ns=<registry> and /v2/<name>/tags/list into a
// request, or an API error.
// Only names that pass the reference grammar get through; they never become file paths.
func (m *Mirror) parse(r *http.Request) (*request, error) {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/v2/"), "/")
	n := len(parts)
	switch {
	case n >= 3 && parts[n-2] == "blobs" && parts[n-1] == "uploads",
		n >= 4 && parts[n-3] == "blobs" && parts[n-2] == "uploads":
		return nil, errcode.ErrorCodeUnsupported.WithMessage("the mirror is pull-only: uploads are not accepted")
	case n >= 3 && (parts[n-2] == "manifests" || parts[n-2] == "blobs"),
		n >= 3 && parts[n-2] == "tags" && parts[n-1] == "list":
	case n >= 3 && parts[n-2] == "referrers":
		return nil, errcode.ErrorCodeUnsupported.WithMessage("the mirror serves manifests, blobs and tag lists only; ask the registry")
	default:
		return nil, errcode.ErrorCodeNameUnknown.WithMessage("unknown API path")
	}
	name, kind, ref := strings.Join(parts[:n-2], "/"), parts[n-2], parts[n-1]

	host := r.URL.Query().Get("ns")
	if host == "" {
		host = m.opts.DefaultRegistry
	}
	repo, err := reference.ParseNormalizedNamed(host + "/" + name)
	if err != nil || !reference.IsNameOnly(repo) || reference.Domain(repo) != normalizeHost(host) {
		return nil, errcode.ErrorCodeNameInvalid.WithMessage(fmt.Sprintf("invalid repository %q in registry %q", name, host))
	}
	if err := m.allowed(repo); err != nil {
		return nil, err
	}
	if ref == "" {
		return nil, errcode.ErrorCodeNameUnknown.WithMessage("empty reference")
	}
	return &request{repo: repo, name: name, kind: kind, ref: ref}, nil
}

// SetRegistries replaces the registries the mirror pulls from (nil: any), as the cluster's
// ImageSources change.
func (m *Mirror) SetRegistries(hosts []string) {
	if hosts == nil {
		m.registries.Store(nil)
		return
	}
	h := slices.Clone(hosts)
	m.registries.Store(&h)
}

// allowed refuses repositories of registries the mirror does not pull from.
func (m *Mirror) allowed(repo reference.Named) error {
	if p := m.registries.Load(); p != nil && !slices.Contains(*p, reference.Domain(repo)) {
		return errcode.ErrorCodeDenied.WithMessage(fmt.Sprintf("registry %q is not mirrored here", reference.Domain(repo)))
	}
	return nil
}

// normalizeHost is what the reference grammar makes of a registry host (index.docker.io is docker.io).
func normalizeHost(host string) string {
	if host == "index.docker.io" || host == "registry-1.docker.io" {
		return "docker.io"
	}
	return host
}

func parseDigest(ref string) (digest.Digest, error) {
	d, err := digest.Parse(ref)
	if err != nil {
		return "", errcode.ErrorCodeDigestInvalid.WithMessage(fmt.Sprintf("invalid digest %q: %v", ref, err))
	}
	return d, nil
}

// fail answers with the API error for an error from the store or the sources; unknown is the code for
// content that is not there.
func (m *Mirror) fail(w http.ResponseWriter, err error, unknown errcode.ErrorCode) {
	status, apiErr := errorFor(err, unknown)
	m.writeError(w, status, apiErr)
}

func errorFor(err error, unknown errcode.ErrorCode) (int, error) {
	var apiErr errcode.Error
	switch {
	case errors.As(err, &apiErr):
		return 0, apiErr
	case errors.Is(err, source.ErrNotFound), errors.Is(err, content.ErrNotFound):
		return 0, unknown.WithMessage(err.Error())
	case errors.Is(err, errBadManifest):
		return http.StatusBadGateway, errcode.ErrorCodeManifestInvalid.WithMessage(err.Error())
	case errors.Is(err, content.ErrDigestMismatch), errors.Is(err, content.ErrSizeMismatch):
		return http.StatusBadGateway, errcode.ErrorCodeDigestInvalid.WithMessage(err.Error())
	case errors.Is(err, source.ErrUnavailable):
		return 0, errcode.ErrorCodeUnavailable.WithMessage(err.Error())
	case errors.Is(err, content.ErrTooManyFetches):
		return 0, errcode.ErrorCodeTooManyRequests.WithMessage(err.Error())
	case content.IsNoSpace(err):
		// The client's next host (the registry, in hosts.toml) can still serve it.
		return 0, errcode.ErrorCodeUnavailable.WithMessage("this node's cache disk is full: " + err.Error())
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return 0, errcode.ErrorCodeUnavailable.WithMessage(err.Error())
	}
	return http.StatusBadGateway, errcode.ErrorCodeUnknown.WithMessage(err.Error())
}

// writeError writes the OCI error JSON; status 0 means the code's own status. A 429, whichever bound
// it comes from, tells the client when to come back.
func (m *Mirror) writeError(w http.ResponseWriter, status int, err error) {
	var e errcode.Error
	if !errors.As(err, &e) {
		e = errcode.ErrorCodeUnknown.WithMessage(err.Error())
	}
	if status == 0 {
		status = e.Code.Descriptor().HTTPStatusCode
	}
	body, merr := errcode.Errors{e}.MarshalJSON()
	if merr != nil {
		body = []byte(`{"errors":[{"code":"UNKNOWN"}]}`)
	}
	h := w.Header()
	for _, k := range []string{"Docker-Content-Digest", "Etag", "Content-Range", "Accept-Ranges", "Cache-Control"} {
		h.Del(k)
	}
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("Content-Length", fmt.Sprint(len(body)))
	h.Set("X-Content-Type-Options", "nosniff")
	if e.Code == errcode.ErrorCodeTooManyRequests {
		h.Set("Retry-After", "1")
	}
	if rw, ok := w.(*responseWriter); ok {
		rw.err = e.Message
	}
	w.WriteHeader(status)
	_, _ = w.Write(body) // a client that went away is no error of ours
}

// responseWriter records what was answered, for metrics, and sends bodies that come as readers
// (http.ServeContent's, content.Reader's) through large pooled buffers.
type responseWriter struct {
	http.ResponseWriter
	rc     *http.ResponseController
	code   int
	bytes  int64
	source string
	err    string // the message of the API error answered
	// flushHeader sends the status line and headers at once rather than with the first bytes of
	// the body: containerd gives a mirror 30 s to answer, and a blob's first bytes may take longer.
	flushHeader bool
}

// WriteStall bounds how long one write to a client may block: a client that stops reading is cut
// off after it, so that it costs a goroutine and a buffer for that long and no longer. A slow client
// that reads is never cut off: the deadline moves with every write.
const WriteStall = time.Minute

// write writes p within WriteStall.
func (w *responseWriter) write(p []byte) (int, error) {
	_ = w.rc.SetWriteDeadline(time.Now().Add(WriteStall)) // writers without deadlines (tests' recorders) write unbounded
	return w.ResponseWriter.Write(p)
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func (w *responseWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
	if w.flushHeader {
		_ = w.rc.SetWriteDeadline(time.Now().Add(WriteStall))
		_ = w.rc.Flush() // a writer that cannot flush (tests' recorders) sends them with the body
	}
}

func (w *responseWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	n, err := w.write(p)
	w.bytes += int64(n)
	return n, err
}

// copyBuffers hold blob bytes on their way to clients. Measured here on loopback, 256 KiB writes from
// user space send a cached blob at about 1.4 times the reference registry's rate, where sendfile to the
// socket reached 0.9 times; the pool keeps 64 concurrent clients within 16 MiB.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

func (w *responseWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	buf := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(buf)
	// Both sides are wrapped so that io.CopyBuffer cannot hand the copy to a WriteTo or ReadFrom of
	// their own (sendfile, 32 KiB buffers).
	n, err := io.CopyBuffer(writerFunc(w.write), struct{ io.Reader }{r}, *buf)
	w.bytes += n
	return n, err
}

func (w *responseWriter) status() int {
	if w.code == 0 {
		return http.StatusOK
	}
	return w.code
}

func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
