package content

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// ErrNoSpace is the cause of a fetch refused because the disk cannot hold the blob, even after
// evicting every blob it may evict. It wraps syscall.ENOSPC, as a write that found the disk full
// does.
var ErrNoSpace = fmt.Errorf("the cache's disk is full: %w", syscall.ENOSPC)

// IsNoSpace says whether err is the disk being full: refused up front or found by a write.
func IsNoSpace(err error) bool { return errors.Is(err, syscall.ENOSPC) }

// freeBytes is what the filesystem of the store has free for it.
func (s *Store) freeBytes() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.root, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", s.root, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// makeRoom evicts least recently used blobs until the disk has n bytes free, and fails with
// ErrNoSpace when it cannot: before any client is told the blob's size, so that the client gets a
// clear error rather than a cut transfer. evict says whether it may evict for this size (a size
// nobody trusted may not empty the cache). A blob that would not fit even in an emptied cache
// evicts nothing: one request for a blob bigger than the disk must not cost the node its cache.
func (s *Store) makeRoom(n int64, evict bool) error {
	for first := true; ; first = false {
		free, err := s.freeBytes()
		if err != nil {
			return err
		}
		if free >= n {
			return nil
		}
		var removed []digest.Digest
		if evict {
			s.mu.Lock()
			if !first || free+s.evictableLocked() >= n {
				removed = s.evictOneLocked()
			}
			s.mu.Unlock()
		}
		if len(removed) == 0 {
			return fmt.Errorf("%d bytes needed, %d free: %w", n, free, ErrNoSpace)
		}
		s.events.publish(EventRemoved, removed...)
	}
}

// evictableLocked is what evicting every blob that may be evicted would free.
func (s *Store) evictableLocked() int64 {
	var n int64
	for el := s.lru.Back(); el != nil; el = el.Prev() {
		if e := el.Value.(*entry); e.pins == 0 {
			n += e.Size
		}
	}
	return n
}
