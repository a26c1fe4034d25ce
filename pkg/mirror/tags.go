package mirror

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
)

// tagAnswer is what a tag resolved to, and when.
type tagAnswer struct {
	Name       string             `json:"name"`
	Descriptor ocispec.Descriptor `json:"descriptor"`
	Resolved   time.Time          `json:"resolved"`
}

// tagCache keeps tag answers in memory and, if dir is set, on disk, one file per tag named by the hash
// of the tag's full name, so that no name can become a path.
type tagCache struct {
	dir string
	mu  sync.Mutex
	mem map[string]tagAnswer
}

func newTagCache(dir string) (*tagCache, error) {
	if dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("tag cache: %w", err)
		}
	}
	return &tagCache{dir: dir, mem: make(map[string]tagAnswer)}, nil
}

func (c *tagCache) file(name string) string {
	sum := sha256.Sum256([]byte(name))
	return filepath.Join(c.dir, hex.EncodeToString(sum[:])+".json")
}

func (c *tagCache) get(name string) (tagAnswer, bool) {
	c.mu.Lock()
	a, ok := c.mem[name]
	c.mu.Unlock()
	if ok || c.dir == "" {
		return a, ok
	}
	b, err := os.ReadFile(c.file(name))
	if err != nil {
		return tagAnswer{}, false
	}
	if err := json.Unmarshal(b, &a); err != nil || a.Name != name || a.Descriptor.Digest.Validate() != nil {
		return tagAnswer{}, false
	}
	c.mu.Lock()
	c.mem[name] = a
	c.mu.Unlock()
	return a, true
}

func (c *tagCache) put(name string, desc ocispec.Descriptor) error {
	a := tagAnswer{Name: name, Descriptor: desc, Resolved: time.Now()}
	c.mu.Lock()
	c.mem[name] = a
	c.mu.Unlock()
	if c.dir == "" {
		return nil
	}
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(c.dir, ".tag-")
	if err != nil {
		return err
	}
	_, err = tmp.Write(b)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), c.file(name))
	}
	if err != nil {
		// A leftover temp file is never read as an answer (they are named apart).
		return errors.Join(err, os.Remove(tmp.Name()))
	}
	return nil
}

func (c *tagCache) delete(name string) {
	c.mu.Lock()
	delete(c.mem, name)
	c.mu.Unlock()
	if c.dir != "" {
		if err := os.Remove(c.file(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return
		}
	}
}

// CachedTag returns what the mirror last resolved repo:tag to, and when, however old: peers that may
// answer tag lookups answer from it.
func (m *Mirror) CachedTag(repo reference.Named, tag string) (ocispec.Descriptor, time.Time, bool) {
	a, ok := m.tags.get(repo.Name() + ":" + tag)
	return a.Descriptor, a.Resolved, ok
}

// serveTagList answers GET /v2/<name>/tags/list from the sources trusted with tags (the registry, and
// when it cannot answer, the registry's Storj or IPFS sources that can list), never from peers, and
// never from a cache: unlike a tag's digest, a list that is served stale cannot be checked by anyone.
// The whole list is asked for once per request (requests for one repository at once share it), and
// the pagination of the OCI distribution spec is applied to it here: the tags in lexical order, at
// most n of them after last, and a Link header to the next page when some were left out.
func (m *Mirror) serveTagList(w *responseWriter, r *http.Request, req *request) {
	lister, ok := m.src().(source.TagLister)
	if !ok {
		m.writeError(w, 0, errcode.ErrorCodeUnsupported.WithMessage("tag listing is not configured on this mirror"))
		return
	}
	q := r.URL.Query()
	limit := -1
	if s := q.Get("n"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			m.writeError(w, 0, errcode.ErrorCodePaginationNumberInvalid.WithMessage(fmt.Sprintf("invalid n %q", s)))
			return
		}
		limit = n
	}
	last := q.Get("last")

	ctx := r.Context()
	v, err, _ := m.tagLists.Do(req.repo.Name(), func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
		defer cancel()
		tags, err := lister.ListTags(ctx, req.repo)
		if err != nil {
			return nil, err
		}
		slices.Sort(tags)
		return slices.Compact(tags), nil
	})
	if err != nil {
		m.fail(w, err, errcode.ErrorCodeNameUnknown)
		return
	}
	tags := v.([]string) // shared: sliced, never changed
	if tags == nil {
		tags = []string{} // "tags": [], not null
	}
	w.source = "upstream"
	if last != "" {
		i, found := slices.BinarySearch(tags, last)
		if found {
			i++
		}
		tags = tags[i:]
	}
	if limit >= 0 && len(tags) > limit {
		tags = tags[:limit]
		if limit > 0 {
			next := url.Values{"n": {strconv.Itoa(limit)}, "last": {tags[len(tags)-1]}}
			if ns := q.Get("ns"); ns != "" {
				next.Set("ns", ns)
			}
			w.Header().Set("Link", fmt.Sprintf(`<%s?%s>; rel="next"`, r.URL.EscapedPath(), next.Encode()))
		}
	}
	body, err := json.Marshal(struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{req.name, tags})
	if err != nil {
		m.writeError(w, 0, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(body) // a client gone midway is no error of ours
	}
}
