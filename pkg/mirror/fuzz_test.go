package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// The grammars of the OCI distribution spec, written out here rather than taken from the reference
// package the mirror uses, so that the targets check the mirror against the spec, not against itself.
var (
	specComponent = regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$`)
	specTag       = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	tagFile       = regexp.MustCompile(`^[0-9a-f]{64}\.json$`)
)

// fuzzSeeds are request paths and queries, valid and tricky, for both request targets.
var fuzzSeeds = []struct{ path, query string }{
	{"/v2/library/alpine/manifests/3.20", "ns=docker.io"},
	{"/v2/alpine/manifests/latest", ""},
	{"/v2/team/app/manifests/v1", "ns=example.test"},
	{"/v2/team/app/manifests/sha256:" + strings.Repeat("a", 64), "ns=example.test"},
	{"/v2/team/app/blobs/sha256:" + strings.Repeat("0", 64), "ns=example.test"},
	{"/v2/team/app/tags/list", "ns=example.test&n=2&last=a"},
	{"/v2/a/b/c/d/manifests/x", "ns=127.0.0.1:5000"},
	{"/v2/app/manifests/v1", "ns=[::1]:5000"},
	{"/v2/app/manifests/v1", "ns=localhost"},
	{"/v2/app/manifests/v1", "ns=index.docker.io"},
	{"/v2/app/manifests/v1", "ns=registry-1.docker.io"},
	{"/v2/tags/list/tags/list", "ns=example.test"},
	{"/v2/manifests/manifests/manifests", "ns=example.test"},
	{"/v2/blobs/blobs/blobs", ""},
	// Escapes, traversal, odd hosts.
	{"/v2/../../../etc/passwd/blobs/sha256:" + strings.Repeat("0", 64), ""},
	{"/v2/team/../app/manifests/v1", "ns=example.test"},
	{"/v2//etc/manifests/v1", "ns=example.test"},
	{"/v2/./app/manifests/v1", "ns=example.test"},
	{"/v2/app/manifests/..", "ns=example.test"},
	{"/v2/app/manifests/sha256:..%2f..%2fetc", "ns=example.test"},
	{"/v2/app/manifests/v1", "ns=example.test/evil"},
	{"/v2/app/manifests/v1", "ns=../../etc"},
	{"/v2/app/manifests/v1", "ns=/etc"},
	{"/v2/app/manifests/v1", "ns=a.test&ns=b.test"},
	{"/v2/app/manifests/v1", "ns=%zz"},
	{"/v2/app/manifests/v1", "ns=Example.TEST"},
	{"/v2/Team/App/manifests/v1", "ns=example.test"},
	{"/v2/app\\..\\x/manifests/v1", "ns=example.test"},
	{"/v2/app\x00/manifests/v1", "ns=example.test"},
	{"/v2/app/manifests/v1\x00", "ns=example.test"},
	{"/v2/app/manifests/" + strings.Repeat("t", 129), "ns=example.test"},
	{"/v2/app/manifests/-bad", "ns=example.test"},
	{"/v2/app/manifests/v1:x", "ns=example.test"},
	{"/v2/app/blobs/md5:abc", "ns=example.test"},
	{"/v2/app/blobs/sha256:" + strings.Repeat("A", 64), "ns=example.test"},
	{"/v2/app/blobs/", "ns=example.test"},
	{"/v2/app/blobs/uploads/", "ns=example.test"},
	{"/v2/app/referrers/sha256:" + strings.Repeat("0", 64), "ns=example.test"},
	{"/v2/app/tags/other", "ns=example.test"},
	{"/v2/app/tags/list", "n=-1"},
	{"/v2/" + strings.Repeat("a/", 200) + "manifests/v1", ""},
	{"/v2/", ""},
	{"/v3/app/manifests/v1", ""},
}

// FuzzParse holds parse, the one place where a request's path and ns become a repository, to: no
// panic; a refusal is an API error of the closed set; and an accepted request has a kind of the
// closed set, a repository that is a valid, fully qualified name of the registry ns names (the
// default registry without ns), whose path is the name the client gave, made of spec components only
// (no "", ".", "..", no separator but "/"), and the tag cache file of any tag of it inside the cache.
func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s.path, s.query)
	}
	m := &Mirror{opts: Options{DefaultRegistry: DefaultRegistry}}
	tags := &tagCache{dir: f.TempDir()}
	f.Fuzz(func(t *testing.T, path, query string) {
		r := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: path, RawQuery: query}}
		req, err := m.parse(r)
		if err != nil {
			var e errcode.Error
			if !errors.As(err, &e) {
				t.Fatalf("parse(%q, %q): %v is no API error", path, query, err)
			}
			switch e.Code {
			case errcode.ErrorCodeNameInvalid, errcode.ErrorCodeNameUnknown, errcode.ErrorCodeUnsupported:
			default:
				t.Fatalf("parse(%q, %q): unexpected code %v", path, query, e.Code)
			}
			return
		}
		switch req.kind {
		case "manifests", "blobs":
		case "tags":
			if req.ref != "list" {
				t.Fatalf("parse(%q): tags with ref %q", path, req.ref)
			}
		default:
			t.Fatalf("parse(%q): kind %q", path, req.kind)
		}
		if req.ref == "" || strings.Contains(req.ref, "/") {
			t.Fatalf("parse(%q): ref %q", path, req.ref)
		}
		host := r.URL.Query().Get("ns")
		if host == "" {
			host = DefaultRegistry
		}
		checkRepo(t, req.repo)
		if got, want := reference.Domain(req.repo), normalizeHost(host); got != want {
			t.Fatalf("parse(%q, %q): registry %q, want %q", path, query, got, want)
		}
		if p := reference.Path(req.repo); p != req.name && p != "library/"+req.name {
			t.Fatalf("parse(%q): repository path %q, but the client named %q", path, p, req.name)
		}
		// ServeHTTP hands parse only paths under /v2/.
		if strings.HasPrefix(path, "/v2/") && path != "/v2/"+req.name+"/"+req.kind+"/"+req.ref {
			t.Fatalf("parse(%q) = %q %q %q: not what the path says", path, req.name, req.kind, req.ref)
		}
		if file := tags.file(req.repo.Name() + ":" + req.ref); filepath.Dir(file) != tags.dir || !tagFile.MatchString(filepath.Base(file)) {
			t.Fatalf("tag cache file %q for %s:%s is not a plain file of %s", file, req.repo.Name(), req.ref, tags.dir)
		}
	})
}

// checkRepo fails unless repo is a fully qualified repository name, without tag or digest, whose path
// is made of the spec's components.
func checkRepo(t *testing.T, repo reference.Named) {
	t.Helper()
	if !reference.IsNameOnly(repo) {
		t.Fatalf("repository %q has a tag or digest", repo)
	}
	again, err := reference.ParseNamed(repo.Name())
	if err != nil || again.Name() != repo.Name() {
		t.Fatalf("repository %q does not parse back: %v", repo.Name(), err)
	}
	p := reference.Path(repo)
	if strings.HasPrefix(p, "/") || len(p) > 255 {
		t.Fatalf("repository path %q", p)
	}
	for _, c := range strings.Split(p, "/") {
		if !specComponent.MatchString(c) {
			t.Fatalf("repository path %q has component %q", p, c)
		}
	}
}

// checkingSource is a source that fails the running fuzz input when it is asked about anything but a
// valid repository, tag or digest: what reaches a source reaches the registry's URLs, peers and
// decentralized stores. It answers tags with a descriptor, so that the tag cache writes, and knows
// no content.
type checkingSource struct {
	mu  sync.Mutex
	bad []string
}

func (s *checkingSource) fail(format string, args ...any) {
	s.mu.Lock()
	s.bad = append(s.bad, fmt.Sprintf(format, args...))
	s.mu.Unlock()
}

func (s *checkingSource) checkRepo(repo reference.Named) {
	if repo == nil {
		s.fail("nil repository")
		return
	}
	if !reference.IsNameOnly(repo) {
		s.fail("repository %q has a tag or digest", repo)
	}
	for _, c := range strings.Split(reference.Path(repo), "/") {
		if !specComponent.MatchString(c) {
			s.fail("repository %q has component %q", repo.Name(), c)
		}
	}
}

func (s *checkingSource) checkObject(obj source.Object) {
	s.checkRepo(obj.Repo)
	if err := obj.Digest.Validate(); err != nil {
		s.fail("digest %q: %v", obj.Digest, err)
	}
}

func (s *checkingSource) Name() string { return "checking" }

func (s *checkingSource) Resolve(_ context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	s.checkRepo(repo)
	if !specTag.MatchString(tag) {
		s.fail("tag %q", tag)
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString(tag), Size: 2}, nil
}

func (s *checkingSource) Stat(_ context.Context, obj source.Object) (ocispec.Descriptor, error) {
	s.checkObject(obj)
	return ocispec.Descriptor{}, source.ErrNotFound
}

func (s *checkingSource) Open(_ context.Context, obj source.Object, offset int64) (*source.Content, error) {
	s.checkObject(obj)
	if offset != 0 {
		s.fail("offset %d", offset)
	}
	return nil, source.ErrNotFound
}

func (s *checkingSource) ListTags(_ context.Context, repo reference.Named) ([]string, error) {
	s.checkRepo(repo)
	return []string{"b", "a", "c"}, nil
}

// FuzzRequest sends requests through the whole handler, GET and HEAD, and holds it to: no panic;
// nothing but a valid repository, a tag of the spec's grammar or a valid digest reaches a source; the
// tag cache holds nothing but files named by hashes; and every answer is a success, or an error of
// the API in its JSON form.
func FuzzRequest(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s.path, s.query, false)
		f.Add(s.path, s.query, true)
	}
	store, err := content.Open(f.TempDir(), content.Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = store.Close() })
	src := &checkingSource{}
	f.Fuzz(func(t *testing.T, path, query string, head bool) {
		dir := t.TempDir()
		m, err := New(Options{Store: store, Source: src, DefaultRegistry: "example.test", TagDir: dir})
		if err != nil {
			t.Fatal(err)
		}
		method := http.MethodGet
		if head {
			method = http.MethodHead
		}
		r := (&http.Request{Method: method, URL: &url.URL{Path: path, RawQuery: query}, Header: http.Header{},
			RemoteAddr: "192.0.2.1:1234"}).WithContext(t.Context())
		w := httptest.NewRecorder()
		m.ServeHTTP(w, r)

		src.mu.Lock()
		bad := src.bad
		src.bad = nil
		src.mu.Unlock()
		if len(bad) > 0 {
			t.Fatalf("%s %s?%s reached the source with: %v", method, path, query, bad)
		}
		des, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, de := range des {
			if !de.Type().IsRegular() || !tagFile.MatchString(de.Name()) {
				t.Fatalf("%s %s?%s: tag cache holds %q", method, path, query, de.Name())
			}
		}
		switch code := w.Code; {
		case code == http.StatusOK:
		case code == http.StatusNotFound && !strings.HasPrefix(path, "/v2/"):
		case code >= 400 && code < 600:
			if w.Header().Get("Content-Type") != "application/json; charset=utf-8" {
				t.Fatalf("%s %s?%s: %d with Content-Type %q", method, path, query, code, w.Header().Get("Content-Type"))
			}
			var body struct {
				Errors []struct{ Code string } `json:"errors"`
			}
			if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil || len(body.Errors) != 1 || body.Errors[0].Code == "" {
				t.Fatalf("%s %s?%s: %d with body %q", method, path, query, code, w.Body)
			}
		default:
			t.Fatalf("%s %s?%s: status %d", method, path, query, code)
		}
	})
}
