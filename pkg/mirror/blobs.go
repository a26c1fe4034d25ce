package mirror

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

func (m *Mirror) serveBlob(w *responseWriter, r *http.Request, req *request) {
	d, err := parseDigest(req.ref)
	if err != nil {
		m.writeError(w, 0, err)
		return
	}
	obj := source.Object{Repo: req.repo, Kind: source.KindBlob, Digest: d, Size: m.sizes.size(d)}
	if r.Method == http.MethodHead {
		m.headBlob(w, r, obj)
		return
	}
	rd, err := m.store.Fetch(r.Context(), d, m.fetchFunc(obj))
	if err != nil {
		m.fail(w, err, errcode.ErrorCodeBlobUnknown)
		return
	}
	defer func() { _ = rd.Close() }() // a reader's Close only releases it
	w.source = rd.Source()
	writeBlobHeaders(w, d)
	r = withServableRange(r, rd.Size())
	if f := rd.File(); f != nil {
		// A complete blob: ServeContent does Range and conditional requests.
		http.ServeContent(w, r, "", time.Time{}, f)
		return
	}
	// A blob still arriving: the reader waits for bytes, and fails, rather than end, if the blob turns
	// out not to match its digest. Then the connection is cut, so that the client sees a short body
	// and never a complete, corrupt blob. The answer starts at once, whatever the source's pace.
	w.flushHeader = true
	if r.Header.Get("Range") == "" {
		// What containerd asks first: the whole blob, sent as the fetch writes it.
		w.Header().Set("Content-Length", strconv.FormatInt(rd.Size(), 10))
		w.WriteHeader(http.StatusOK)
		if _, err := rd.WriteTo(w); err != nil {
			m.abort(req, d, err)
		}
		return
	}
	body := &failingReader{ReadSeeker: io.NewSectionReader(rd, 0, rd.Size())}
	http.ServeContent(w, r, "", time.Time{}, body)
	if body.err != nil {
		m.abort(req, d, body.err)
	}
}

// abort cuts a blob transfer short, so that the client cannot take a short body for a whole one.
func (m *Mirror) abort(req *request, d digest.Digest, err error) {
	if errors.Is(err, content.ErrDigestMismatch) || errors.Is(err, content.ErrSizeMismatch) {
		m.log.Warn("blob failed verification; transfer aborted", "digest", d, "repo", req.repo.Name(), "err", err)
	} else {
		m.log.Debug("blob transfer ended early", "digest", d, "repo", req.repo.Name(), "err", err)
	}
	panic(http.ErrAbortHandler)
}

func (m *Mirror) headBlob(w *responseWriter, r *http.Request, obj source.Object) {
	var size int64
	if info, err := m.store.Stat(obj.Digest); err == nil {
		size, w.source = info.Size, "local"
	} else if src, sz, ok := m.store.Fetching(obj.Digest); ok && sz >= 0 {
		size, w.source = sz, src
	} else {
		// Asking is enough for HEAD: nothing is fetched until a client wants the bytes.
		desc, err := m.src().Stat(r.Context(), obj)
		if err != nil {
			m.fail(w, err, errcode.ErrorCodeBlobUnknown)
			return
		}
		size, w.source = desc.Size, "upstream"
	}
	writeBlobHeaders(w, obj.Digest)
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.WriteHeader(http.StatusOK)
}

func writeBlobHeaders(w http.ResponseWriter, d digest.Digest) {
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Cache-Control", "max-age=31536000")
}

// fetchFunc opens the blob on the source chain, from whatever offset the store has reached.
func (m *Mirror) fetchFunc(obj source.Object) content.FetchFunc {
	return fetchFrom(m.src(), obj)
}

func fetchFrom(src source.Source, obj source.Object) content.FetchFunc {
	return func(ctx context.Context, offset int64) (*content.Fetched, error) {
		c, err := src.Open(ctx, obj, offset)
		if err != nil {
			return nil, err
		}
		return &content.Fetched{Body: c, Size: c.Descriptor.Size, Source: c.Source, Untrusted: c.Untrusted, Reject: c.Reject,
			// The chain checked the size against the manifest's, if one listed the blob.
			SizeTrusted: !c.Untrusted || obj.Size > 0}, nil
	}
}

// withServableRange returns r with a Range header that http.ServeContent answers correctly for a
// blob of size bytes. ServeContent answers a range of no bytes, a suffix range of length 0 (bytes=-0)
// or any suffix range of an empty blob, with a 206 whose Content-Range ends before it starts ("bytes
// 1000-999/1000", "bytes 0--1/0"; golang/go#81262), which clients may take for a broken answer. Such
// ranges select nothing: they are dropped, and a request left without ranges is answered 416 with the
// blob's size, as ServeContent does for a range past the end. Range on an empty blob is ignored (200),
// as ServeContent does for empty content that no range overlaps.
func withServableRange(r *http.Request, size int64) *http.Request {
	h := r.Header.Get("Range")
	fixed := servableRange(h, size)
	if fixed == h {
		return r
	}
	r = r.Clone(r.Context())
	if fixed == "" {
		r.Header.Del("Range")
	} else {
		r.Header.Set("Range", fixed)
	}
	return r
}

func servableRange(h string, size int64) string {
	specs, ok := strings.CutPrefix(h, "bytes=")
	if !ok {
		return h // no Range, or one ServeContent refuses
	}
	if size == 0 {
		return ""
	}
	var kept []string
	dropped, left := false, false
	for spec := range strings.SplitSeq(specs, ",") {
		if zeroSuffix(spec) {
			dropped = true
			continue
		}
		kept = append(kept, spec)
		left = left || textproto.TrimString(spec) != ""
	}
	switch {
	case !dropped:
		return h
	case !left:
		return "bytes=" + strconv.FormatInt(size, 10) + "-" // past the end: 416, bytes */size
	}
	return "bytes=" + strings.Join(kept, ",")
}

// zeroSuffix says whether a byte-range-spec is a suffix range of length 0, read as ServeContent reads it.
func zeroSuffix(spec string) bool {
	start, end, ok := strings.Cut(textproto.TrimString(spec), "-")
	if !ok || textproto.TrimString(start) != "" {
		return false
	}
	end = textproto.TrimString(end)
	if end == "" || end[0] == '-' {
		return false
	}
	n, err := strconv.ParseInt(end, 10, 64)
	return err == nil && n == 0
}

// failingReader remembers the error that ended a read, which ServeContent does not report.
type failingReader struct {
	io.ReadSeeker
	err error
}

func (r *failingReader) Read(p []byte) (int, error) {
	n, err := r.ReadSeeker.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		r.err = err
	}
	return n, err
}

// FetchBlob fetches a blob into the store from src, or joins its fetch under way, as a client's GET
// would, and returns a reader of it. Peering calls it when another node asks this one to fetch a blob
// for the cluster: src must then be this node's trusted sources, never its peers.
func (m *Mirror) FetchBlob(ctx context.Context, obj source.Object, src source.Source) (*content.Reader, error) {
	if err := m.allowed(obj.Repo); err != nil {
		return nil, err
	}
	return m.store.Fetch(ctx, obj.Digest, fetchFrom(src, obj))
}
