package mirror

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/distribution/reference"
	lru "github.com/hashicorp/golang-lru/v2"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/atomicfile"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// tagAnswer is what a tag resolved to, and when.
type tagAnswer struct {
	Name       string             `json:"name"`
	Descriptor ocispec.Descriptor `json:"descriptor"`
	Resolved   time.Time          `json:"resolved"`
}

// tagCache keeps tag answers in memory and, if dir is set, on disk, one file per tag named by the hash
// of the tag's full name, so that no name can become a path. Both are bounded: memory holds the limit
// most recently used answers, and a file goes with its answer when memory evicts it; at start the
// directory is pruned to the limit newest files. So at most limit answers are in memory and 2 × limit
// files on disk (those of the last run not read again yet, and this run's).
type tagCache struct {
	dir string
	mem *lru.Cache[string, tagAnswer]
}

// DefaultMaxTags is the default of Options.MaxTags.
const DefaultMaxTags = 10_000

func newTagCache(dir string, limit int) (*tagCache, error) {
	c := &tagCache{dir: dir}
	var err error
	c.mem, err = lru.NewWithEvict(limit, func(name string, _ tagAnswer) { c.removeFile(name) })
	if err != nil {
		return nil, fmt.Errorf("tag cache: %w", err)
	}
	if dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("tag cache: %w", err)
		}
		if err := prune(dir, limit); err != nil {
			return nil, fmt.Errorf("tag cache: %w", err)
		}
	}
	return c, nil
}

// prune removes all but the limit newest files of dir, and temp files left by a crash.
func prune(dir string, limit int) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	type file struct {
		name string
		mod  time.Time
	}
	var files []file
	var errs []error
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			continue // gone meanwhile
		}
		if strings.HasPrefix(e.Name(), ".") { // a write's temp file, left by a crash
			errs = append(errs, os.Remove(filepath.Join(dir, e.Name())))
			continue
		}
		files = append(files, file{e.Name(), info.ModTime()})
	}
	slices.SortFunc(files, func(a, b file) int { return b.mod.Compare(a.mod) })
	for _, f := range files[min(limit, len(files)):] {
		errs = append(errs, os.Remove(filepath.Join(dir, f.name)))
	}
	return errors.Join(errs...)
}

func (c *tagCache) removeFile(name string) {
	if c.dir == "" {
		return
	}
	_ = os.Remove(c.file(name)) // gone already is fine; a leftover is pruned at the next start
}

func (c *tagCache) file(name string) string {
	sum := sha256.Sum256([]byte(name))
	return filepath.Join(c.dir, hex.EncodeToString(sum[:])+".json")
}

func (c *tagCache) get(name string) (tagAnswer, bool) {
	a, ok := c.mem.Get(name)
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
	c.mem.Add(name, a)
	return a, true
}

func (c *tagCache) put(name string, desc ocispec.Descriptor, resolved time.Time) error {
	a := tagAnswer{Name: name, Descriptor: desc, Resolved: resolved}
	c.mem.Add(name, a)
	if c.dir == "" {
		return nil
	}
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	// A leftover temp file (a dot name) is never read as an answer, and prune removes it.
	return atomicfile.Write(c.file(name), b, 0o600)
}

func (c *tagCache) delete(name string) {
	c.mem.Remove(name) // and its file
	c.removeFile(name)
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
