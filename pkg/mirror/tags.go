package mirror

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
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
		os.Remove(tmp.Name())
	}
	return err
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
