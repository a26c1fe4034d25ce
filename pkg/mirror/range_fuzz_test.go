package mirror

import (
	"bytes"
	"context"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// blobSource serves the blobs it was given, from any offset. The last byte of each waits for gate to
// close, so that a client meets the blob while it is still arriving.
type blobSource struct {
	mu    sync.Mutex
	blobs map[digest.Digest][]byte
	gate  chan struct{}
}

func (s *blobSource) Name() string { return "blobs" }

func (s *blobSource) Resolve(context.Context, reference.Named, string) (ocispec.Descriptor, error) {
	return ocispec.Descriptor{}, source.ErrNotFound
}

func (s *blobSource) get(d digest.Digest) ([]byte, chan struct{}, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.blobs[d]
	return b, s.gate, ok
}

func (s *blobSource) Stat(_ context.Context, obj source.Object) (ocispec.Descriptor, error) {
	b, _, ok := s.get(obj.Digest)
	if !ok {
		return ocispec.Descriptor{}, source.ErrNotFound
	}
	return ocispec.Descriptor{Digest: obj.Digest, Size: int64(len(b))}, nil
}

func (s *blobSource) Open(_ context.Context, obj source.Object, offset int64) (*source.Content, error) {
	b, gate, ok := s.get(obj.Digest)
	if !ok {
		return nil, source.ErrNotFound
	}
	var body io.Reader = bytes.NewReader(b[offset:])
	if n := int64(len(b)); offset < n && gate != nil {
		body = io.MultiReader(bytes.NewReader(b[offset:n-1]), gatedReader{gate}, bytes.NewReader(b[n-1:]))
	} else if n == 0 && gate != nil {
		// An empty blob too ends only at the gate: otherwise it can be committed before the first
		// answer begins, which then comes from the store.
		body = gatedReader{gate}
	}
	return &source.Content{ReadCloser: io.NopCloser(body),
		Descriptor: ocispec.Descriptor{Digest: obj.Digest, Size: int64(len(b))}, Source: s.Name()}, nil
}

// gatedReader ends when its gate is closed.
type gatedReader struct{ gate chan struct{} }

func (g gatedReader) Read([]byte) (int, error) { <-g.gate; return 0, io.EOF }

// openingRecorder closes open when the answer's header is written: the reader of the blob is open
// by then.
type openingRecorder struct {
	*httptest.ResponseRecorder
	once sync.Once
	open chan struct{}
}

func (w *openingRecorder) WriteHeader(code int) {
	w.once.Do(func() { close(w.open) })
	w.ResponseRecorder.WriteHeader(code)
}

var singleContentRange = regexp.MustCompile(`^bytes ([0-9]+)-([0-9]+)/([0-9]+)$`)

// FuzzBlobRange sends a Range header for a blob of a fuzzed size twice: while the blob is being
// fetched (served from the growing file through a SectionReader over content.Reader) and once the
// store holds it (served from the file). It holds the mirror to: no panic; both answers agree; an
// answer is 200 with the whole blob, 206 with ranges that lie within the blob and carry its bytes,
// or 416, so that malformed, reversed, empty and past-the-end ranges are refused, never served.
func FuzzBlobRange(f *testing.F) {
	for _, s := range []struct {
		size uint16
		rng  string
	}{
		{1000, "bytes=0-99"}, {1000, "bytes=100-"}, {1000, "bytes=-100"}, {1000, "bytes=999-999"},
		{1000, "bytes=0-0,500-599"}, {1000, "bytes=0-999"}, {1000, "bytes=0-5000"},
		{1000, "bytes=1000-"}, {1000, "bytes=1000-1000"}, {1000, "bytes=5-1"}, {1000, "bytes=-0"},
		{1000, "bytes=-5000"}, {1000, "bytes=--1"}, {1000, "bytes=-1-2"}, {1000, "bytes=1--2"},
		{1000, "bytes=0-1,0-1"}, {1000, "bytes=0-,1-,2-"}, {1000, "items=0-1"}, {1000, "bytes="},
		{1000, "bytes=,"}, {1000, "bytes= 0 - 1 "}, {1000, "bytes=+1-2"}, {1000, "bytes=0x1-0x2"},
		{1000, "bytes=99999999999999999999-"}, {1000, "bytes=9223372036854775807-"},
		{1000, "bytes=0-9223372036854775807"}, {1000, "bytes=-9223372036854775808"},
		{0, "bytes=0-0"}, {0, "bytes=-1"}, {1, "bytes=0-0"}, {1, "bytes=-1"}, {4096, "bytes=4095-"},
		{1000, ""},
	} {
		f.Add(s.size, s.rng)
	}
	ctx := context.Background()
	store, err := content.Open(f.TempDir(), content.Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = store.Close() })
	src := &blobSource{blobs: map[digest.Digest][]byte{}}
	m, err := New(Options{Store: store, Source: src, DefaultRegistry: "example.test"})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, size uint16, rng string) {
		data := make([]byte, int(size)%4097)
		for i := range data {
			data[i] = byte(i*131 + len(data))
		}
		d := digest.FromBytes(data)
		gate := make(chan struct{})
		release := sync.OnceFunc(func() { close(gate) })
		src.mu.Lock()
		src.blobs[d], src.gate = data, gate
		src.mu.Unlock()
		if err := store.Delete(d); err != nil && !errors.Is(err, content.ErrNotFound) {
			t.Fatal(err)
		}
		get := func() (*httptest.ResponseRecorder, string) {
			r := httptest.NewRequestWithContext(ctx, http.MethodGet, "/v2/team/app/blobs/"+d.String(), nil)
			if rng != "" {
				r.Header.Set("Range", rng)
			}
			w := &openingRecorder{ResponseRecorder: httptest.NewRecorder(), open: make(chan struct{})}
			go func() {
				// The last byte arrives once the answer has begun, or after a while if it never does.
				select {
				case <-w.open:
				case <-time.After(time.Second):
				}
				release()
			}()
			m.ServeHTTP(w, r)
			return w.ResponseRecorder, m.Journal().Pulls[0].Source
		}

		fetching, from := get()
		if from != "blobs" {
			t.Fatalf("first answer came from %q, want the fetch under way", from)
		}
		// The fetch goes on after the answer: wait for it to end with the blob in the store.
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Microsecond) {
			_, err := store.Stat(d)
			if _, _, fetching := store.Fetching(d); err == nil && !fetching {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("blob of %d bytes not committed", len(data))
			}
		}
		held, from := get()
		if from != "local" {
			t.Fatalf("second answer came from %q, want the store", from)
		}
		if fetching.Code != held.Code || fetching.Header().Get("Content-Range") != held.Header().Get("Content-Range") {
			t.Fatalf("Range %q on %d bytes: %d %q while fetching, %d %q once held", rng, len(data),
				fetching.Code, fetching.Header().Get("Content-Range"), held.Code, held.Header().Get("Content-Range"))
		}
		checkRangeAnswer(t, rng, data, fetching)
		checkRangeAnswer(t, rng, data, held)
	})
}

// checkRangeAnswer holds an answer to a Range request to what RFC 9110 allows.
func checkRangeAnswer(t *testing.T, rng string, data []byte, w *httptest.ResponseRecorder) {
	t.Helper()
	body := w.Body.Bytes()
	switch w.Code {
	case http.StatusOK:
		if !bytes.Equal(body, data) || w.Header().Get("Content-Range") != "" {
			t.Fatalf("Range %q: 200 with %d bytes of %d", rng, len(body), len(data))
		}
	case http.StatusRequestedRangeNotSatisfiable:
		// With the size, or without Content-Range for a header that is no valid range at all.
		if cr := w.Header().Get("Content-Range"); cr != "bytes */"+strconv.Itoa(len(data)) && cr != "" {
			t.Fatalf("Range %q: 416 with Content-Range %q", rng, cr)
		}
	case http.StatusPartialContent:
		mt, params, _ := mime.ParseMediaType(w.Header().Get("Content-Type"))
		if mt != "multipart/byteranges" {
			checkPart(t, rng, data, w.Header().Get("Content-Range"), body)
			return
		}
		mr := multipart.NewReader(bytes.NewReader(body), params["boundary"])
		parts := 0
		for {
			p, err := mr.NextPart()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("Range %q: multipart answer: %v", rng, err)
			}
			b, err := io.ReadAll(p)
			if err != nil {
				t.Fatalf("Range %q: multipart answer: %v", rng, err)
			}
			checkPart(t, rng, data, p.Header.Get("Content-Range"), b)
			parts++
		}
		if parts < 2 {
			t.Fatalf("Range %q: multipart answer of %d parts", rng, parts)
		}
	default:
		t.Fatalf("Range %q: status %d", rng, w.Code)
	}
}

// checkPart fails unless contentRange names bytes within data, and b is those bytes.
func checkPart(t *testing.T, rng string, data []byte, contentRange string, b []byte) {
	t.Helper()
	m := singleContentRange.FindStringSubmatch(contentRange)
	if m == nil {
		t.Fatalf("Range %q: Content-Range %q", rng, contentRange)
	}
	first, _ := strconv.Atoi(m[1])
	last, _ := strconv.Atoi(m[2])
	total, _ := strconv.Atoi(m[3])
	if total != len(data) || first > last || last >= total {
		t.Fatalf("Range %q: Content-Range %q outside a blob of %d bytes", rng, contentRange, len(data))
	}
	if !bytes.Equal(b, data[first:last+1]) {
		t.Fatalf("Range %q: Content-Range %q with other bytes", rng, contentRange)
	}
}
