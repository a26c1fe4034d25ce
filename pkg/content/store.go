// Package content is the node's content-addressed blob store.
//
// Blobs live at <root>/blobs/<algorithm>/<encoded>, the path derived only from a parsed digest, so no
// request can name a path outside the store. A blob enters the store through a temp file under
// <root>/ingest that is fsynced, verified against its digest and only then renamed into place: a crash at
// any point leaves at most a stray temp file, which Open removes, never a partial or corrupt blob.
//
// The store is bounded by size. When a commit takes it over the high watermark, the least recently used
// blobs that are not pinned are removed until it is under the low watermark. The index is kept in memory
// and rebuilt from the directory on Open, with file modification times, refreshed on use at most hourly,
// standing in for last use.
package content

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

// ErrNotFound is returned for a digest the store does not hold.
var ErrNotFound = errors.New("content not found")

// ErrDigestMismatch is returned when bytes do not hash to the digest they were fetched for.
var ErrDigestMismatch = errors.New("content does not match its digest")

// ErrTooManyFetches is returned when a blob would need a new fetch and MaxFetches are under way.
var ErrTooManyFetches = errors.New("too many fetches under way")

// Defaults of Options.
const (
	DefaultMaxFetches    = 512
	DefaultHighWatermark = 0.9
	DefaultLowWatermark  = 0.8
	// DefaultMinRate and DefaultRateWindow drop a source that sends less than 640 KiB in 20 s: far
	// below any network a node pulls over, far above a peer that holds a blob hostage.
	DefaultMinRate    = 32 << 10
	DefaultRateWindow = 20 * time.Second
	// DefaultAbandonAfter lets a client that gave up and retries find its fetch still under way.
	DefaultAbandonAfter = 10 * time.Second
	// DefaultUntrustedHold keeps a client off untrusted bytes long enough for nearly any blob from
	// peers to verify first (1.5 GB at 100 Mbit/s), and short enough that a bigger one reaches the
	// client well inside CRI's image_pull_progress_timeout (5 min without a byte cancels a pull).
	DefaultUntrustedHold = 2 * time.Minute
)

// ErrSizeMismatch is returned when a source sends more or fewer bytes than it announced.
var ErrSizeMismatch = errors.New("content does not match its announced size")

// Options configure a Store.
type Options struct {
	// MaxBytes bounds the size of the store; 0 means unbounded.
	MaxBytes int64
	// HighWatermark and LowWatermark are fractions of MaxBytes: eviction starts above the high one and
	// stops below the low one, so that one commit does not trigger one eviction. Defaults 0.9 and 0.8.
	HighWatermark, LowWatermark float64
	// StallTimeout aborts a fetch attempt whose source sent nothing for this long; the fetch then resumes
	// from the next attempt. Default 30s.
	StallTimeout time.Duration
	// MinRate, in bytes per second, aborts a fetch attempt whose source sent less than MinRate ×
	// RateWindow in a whole RateWindow: a source that trickles is dropped like one that stalls, and
	// the fetch resumes from the byte reached on the next source. Defaults DefaultMinRate and
	// DefaultRateWindow; a negative MinRate turns the check off.
	MinRate    int64
	RateWindow time.Duration
	// AbandonAfter is how long a fetch goes on once no client waits for it (no reader, nobody waiting
	// for one): past it, the fetch is cancelled and nothing is kept. A client that comes back within
	// it joins the fetch. Default DefaultAbandonAfter.
	AbandonAfter time.Duration
	// UntrustedHold is how long clients (Fetch) wait for a blob's untrusted bytes to verify before they
	// get them as they arrive. A client that holds bytes which then fail verification has its transfer
	// cut, and containerd keeps the bytes it got in its ingest and resumes from them, so its next
	// pulls fail too until its garbage collector drops them: untrusted bytes go to a client only when
	// waiting longer would cost more. The clock starts at the fetch's first untrusted byte. Peers
	// (Reader) verify for themselves and get them at once. Default DefaultUntrustedHold; negative: no
	// hold.
	UntrustedHold time.Duration
	// FetchAttempts bounds how often one fetch is resumed after a source failed mid-way. Default 4.
	FetchAttempts int
	// MaxFetches bounds the fetches under way at once (each holds a file in ingest/, a goroutine and a
	// source's connection); past it, Fetch of a blob nobody fetches yet fails with ErrTooManyFetches.
	// Joining a fetch under way, and reading what the store holds, are never refused. Default
	// DefaultMaxFetches.
	MaxFetches int
	// Registerer receives the store's metrics; nil registers nothing.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Info describes a blob held by the store.
type Info struct {
	Digest digest.Digest
	Size   int64
}

type entry struct {
	Info
	pins    int
	elem    *list.Element
	touched time.Time // last time the file's mtime was set: the use time the index is rebuilt from
}

// touchInterval bounds how often a read updates a blob's mtime: enough for the order of eviction after
// a restart, not a syscall on every read.
const touchInterval = time.Hour

// Store is a content-addressed blob store on local disk. It is safe for concurrent use.
type Store struct {
	root string
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	entries map[digest.Digest]*entry
	lru     *list.List // front: most recently used
	total   int64
	// reserved is the size of the blobs being fetched whose size a trusted source told: they count
	// against MaxBytes from the start, so that the cache and its ingest/ together stay within it.
	reserved int64
	fetching map[digest.Digest]*ingestion

	// ctx bounds the fetches the store runs on behalf of readers: a fetch outlives the request that
	// started it (others may be waiting for it), but not the store.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	metrics *metrics
	events  events
}

// Open opens or creates the store under root and rebuilds its index from disk.
func Open(root string, opts Options) (*Store, error) {
	if opts.HighWatermark == 0 {
		opts.HighWatermark = DefaultHighWatermark
	}
	if opts.LowWatermark == 0 {
		opts.LowWatermark = DefaultLowWatermark
	}
	if opts.LowWatermark > opts.HighWatermark || opts.HighWatermark > 1 || opts.LowWatermark <= 0 {
		return nil, fmt.Errorf("content store: watermarks must satisfy 0 < low (%v) <= high (%v) <= 1", opts.LowWatermark, opts.HighWatermark)
	}
	if opts.StallTimeout == 0 {
		opts.StallTimeout = 30 * time.Second
	}
	if opts.MinRate == 0 {
		opts.MinRate = DefaultMinRate
	}
	if opts.RateWindow <= 0 {
		opts.RateWindow = DefaultRateWindow
	}
	if opts.AbandonAfter <= 0 {
		opts.AbandonAfter = DefaultAbandonAfter
	}
	switch {
	case opts.UntrustedHold == 0:
		opts.UntrustedHold = DefaultUntrustedHold
	case opts.UntrustedHold < 0:
		opts.UntrustedHold = 0
	}
	if opts.FetchAttempts == 0 {
		opts.FetchAttempts = 4
	}
	if opts.MaxFetches <= 0 {
		opts.MaxFetches = DefaultMaxFetches
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	root, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("content store: %w", err)
	}
	s := &Store{
		root:     root,
		opts:     opts,
		log:      opts.Logger,
		entries:  make(map[digest.Digest]*entry),
		lru:      list.New(),
		fetching: make(map[digest.Digest]*ingestion),
		metrics:  newMetrics(opts.Registerer),
	}
	s.events.dropped = s.metrics.eventsDropped.Inc
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if err := s.load(); err != nil {
		return nil, err
	}
	s.metrics.observe(s.total, len(s.entries))
	s.mu.Lock()
	s.evictLocked()
	s.mu.Unlock()
	return s, nil
}

// Close stops the fetches under way and waits for them to end. Their readers get an error.
func (s *Store) Close() error {
	s.cancel()
	s.wg.Wait()
	return nil
}

// Root is the directory the store lives in.
func (s *Store) Root() string { return s.root }

func (s *Store) ingestDir() string { return filepath.Join(s.root, "ingest") }

// path is the only way a digest becomes a file name. Callers pass digests that were validated, and
// Validate is checked again here so that no caller can get a path outside the store by mistake.
func (s *Store) path(d digest.Digest) (string, error) {
	if err := d.Validate(); err != nil {
		return "", fmt.Errorf("%w: %q", err, d)
	}
	return filepath.Join(s.root, "blobs", d.Algorithm().String(), d.Encoded()), nil
}

func (s *Store) load() error {
	// Temp files are only ever half-written blobs of a previous run: nothing refers to them.
	if err := os.RemoveAll(s.ingestDir()); err != nil {
		return fmt.Errorf("content store: clear %s: %w", s.ingestDir(), err)
	}
	if err := os.MkdirAll(s.ingestDir(), 0o700); err != nil {
		return fmt.Errorf("content store: %w", err)
	}
	type found struct {
		info  Info
		mtime time.Time
	}
	var all []found
	blobs := filepath.Join(s.root, "blobs")
	for _, alg := range []digest.Algorithm{digest.SHA256, digest.SHA384, digest.SHA512} {
		dir := filepath.Join(blobs, alg.String())
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("content store: %w", err)
		}
		des, err := os.ReadDir(dir)
		if err != nil {
			return fmt.Errorf("content store: read %s: %w", dir, err)
		}
		for _, de := range des {
			d := digest.NewDigestFromEncoded(alg, de.Name())
			fi, err := de.Info()
			if err != nil || !fi.Mode().IsRegular() || d.Validate() != nil {
				// Not ours: leave it, but never serve it.
				s.log.Warn("ignoring unexpected file in content store", "path", filepath.Join(dir, de.Name()))
				continue
			}
			all = append(all, found{Info{Digest: d, Size: fi.Size()}, fi.ModTime()})
		}
	}
	// Oldest first, so that pushing each to the front leaves the most recent at the front.
	sortByTime(all, func(f found) time.Time { return f.mtime })
	for _, f := range all {
		e := &entry{Info: f.info, touched: f.mtime}
		e.elem = s.lru.PushFront(e)
		s.entries[f.info.Digest] = e
		s.total += f.info.Size
	}
	return nil
}

// Stat returns the info of a blob the store holds, or ErrNotFound.
func (s *Store) Stat(d digest.Digest) (Info, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[d]
	if !ok {
		return Info{}, fmt.Errorf("%s: %w", d, ErrNotFound)
	}
	return e.Info, nil
}

// Open returns the blob as an open file, or ErrNotFound, and marks it used. The file stays readable
// even if the blob is evicted while it is open.
func (s *Store) Open(d digest.Digest) (*os.File, Info, error) {
	p, err := s.path(d)
	if err != nil {
		return nil, Info{}, err
	}
	s.mu.Lock()
	e, ok := s.entries[d]
	if !ok {
		s.mu.Unlock()
		return nil, Info{}, fmt.Errorf("%s: %w", d, ErrNotFound)
	}
	s.lru.MoveToFront(e.elem)
	info := e.Info
	now := time.Now()
	touch := now.Sub(e.touched) > touchInterval
	if touch {
		e.touched = now
	}
	s.mu.Unlock()
	if touch {
		_ = os.Chtimes(p, now, now)
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		// Removed behind our back: forget it rather than fail forever.
		s.forget(d)
		return nil, Info{}, fmt.Errorf("%s: %w", d, ErrNotFound)
	}
	if err != nil {
		return nil, Info{}, fmt.Errorf("open %s: %w", d, err)
	}
	return f, info, nil
}

// ReadAll returns a small blob's bytes; it refuses blobs over limit.
func (s *Store) ReadAll(d digest.Digest, limit int64) ([]byte, error) {
	f, info, err := s.Open(d)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read-only
	if info.Size > limit {
		return nil, fmt.Errorf("%s is %d bytes, over the limit of %d", d, info.Size, limit)
	}
	b := make([]byte, info.Size)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("read %s: %w", d, err)
	}
	return b, nil
}

// Put verifies data against d and stores it. Storing a blob the store already holds is a no-op.
func (s *Store) Put(d digest.Digest, data []byte) error {
	if _, err := s.Stat(d); err == nil {
		return nil
	}
	if got := d.Algorithm().FromBytes(data); got != d {
		s.metrics.verifyFailures.Inc()
		return fmt.Errorf("put %s: got %s: %w", d, got, ErrDigestMismatch)
	}
	f, err := os.CreateTemp(s.ingestDir(), "put-")
	if err != nil {
		return fmt.Errorf("put %s: %w", d, err)
	}
	if _, err := f.Write(data); err != nil {
		s.discard(f)
		return fmt.Errorf("put %s: %w", d, err)
	}
	return s.commit(f, d, int64(len(data)))
}

// commit makes a verified temp file the blob d. It takes ownership of f.
func (s *Store) commit(f *os.File, d digest.Digest, size int64) error {
	tmp := f.Name()
	err := f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		s.removeTemp(tmp)
		return fmt.Errorf("commit %s: %w", d, err)
	}
	p, err := s.path(d)
	if err != nil {
		s.removeTemp(tmp)
		return err
	}
	// Modification time is the last-use time the index is rebuilt from.
	now := time.Now()
	_ = os.Chtimes(tmp, now, now)
	s.mu.Lock()
	if _, ok := s.entries[d]; ok {
		s.mu.Unlock()
		s.removeTemp(tmp)
		return nil
	}
	if err := os.Rename(tmp, p); err != nil {
		s.mu.Unlock()
		s.removeTemp(tmp)
		return fmt.Errorf("commit %s: %w", d, err)
	}
	syncDir(filepath.Dir(p))
	e := &entry{Info: Info{Digest: d, Size: size}, touched: now}
	e.elem = s.lru.PushFront(e)
	s.entries[d] = e
	s.total += size
	evicted := s.evictLocked()
	total, n := s.total, len(s.entries)
	s.mu.Unlock()

	s.metrics.observe(total, n)
	s.events.publish(EventCommitted, d)
	s.events.publish(EventRemoved, evicted...)
	return nil
}

// Delete removes a blob. Readers that have it open keep reading it.
func (s *Store) Delete(d digest.Digest) error {
	p, err := s.path(d)
	if err != nil {
		return err
	}
	s.mu.Lock()
	e, ok := s.entries[d]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%s: %w", d, ErrNotFound)
	}
	s.removeLocked(e)
	total, n := s.total, len(s.entries)
	s.mu.Unlock()
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete %s: %w", d, err)
	}
	s.metrics.observe(total, n)
	s.events.publish(EventRemoved, d)
	return nil
}

// Pin keeps a blob from eviction until as many Unpin calls; pins are not persisted.
func (s *Store) Pin(d digest.Digest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[d]
	if !ok {
		return fmt.Errorf("pin %s: %w", d, ErrNotFound)
	}
	e.pins++
	return nil
}

// Unpin undoes one Pin.
func (s *Store) Unpin(d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.entries[d]; ok && e.pins > 0 {
		e.pins--
	}
}

// Walk calls fn for every blob in the store, most recently used first, on a snapshot of the index.
func (s *Store) Walk(fn func(Info) error) error {
	s.mu.Lock()
	infos := make([]Info, 0, len(s.entries))
	for el := s.lru.Front(); el != nil; el = el.Next() {
		infos = append(infos, el.Value.(*entry).Info)
	}
	s.mu.Unlock()
	for _, info := range infos {
		if err := fn(info); err != nil {
			return err
		}
	}
	return nil
}

// Size is the number of bytes the store holds.
func (s *Store) Size() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total
}

// Blobs is the number of blobs the store holds.
func (s *Store) Blobs() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries)
}

// MaxBytes is the store's size limit; 0 is unbounded.
func (s *Store) MaxBytes() int64 { return s.opts.MaxBytes }

func (s *Store) forget(d digest.Digest) {
	s.mu.Lock()
	e, ok := s.entries[d]
	if ok {
		s.removeLocked(e)
	}
	s.mu.Unlock()
	if ok {
		s.events.publish(EventRemoved, d)
	}
}

func (s *Store) removeLocked(e *entry) {
	s.lru.Remove(e.elem)
	delete(s.entries, e.Digest)
	s.total -= e.Size
}

// reserve counts n bytes of a fetch under way against the size limit, evicting to make room.
func (s *Store) reserve(n int64) {
	s.mu.Lock()
	s.reserved += n
	evicted := s.evictLocked()
	s.mu.Unlock()
	s.metrics.reserved.Add(float64(n))
	s.events.publish(EventRemoved, evicted...)
}

// unreserve gives back what reserve took.
func (s *Store) unreserve(n int64) {
	if n == 0 {
		return
	}
	s.mu.Lock()
	s.reserved -= n
	s.mu.Unlock()
	s.metrics.reserved.Sub(float64(n))
}

// evictLocked removes least recently used, unpinned blobs while the store is over its high watermark,
// down to its low watermark, and returns what it removed.
func (s *Store) evictLocked() []digest.Digest {
	if s.opts.MaxBytes <= 0 || float64(s.total+s.reserved) <= s.opts.HighWatermark*float64(s.opts.MaxBytes) {
		return nil
	}
	low := int64(s.opts.LowWatermark * float64(s.opts.MaxBytes))
	var removed []digest.Digest
	for s.total+s.reserved > low {
		r := s.evictOneLocked()
		if len(r) == 0 {
			break
		}
		removed = append(removed, r...)
	}
	if len(removed) > 0 {
		s.log.Info("evicted blobs", "count", len(removed), "sizeBytes", s.total, "maxBytes", s.opts.MaxBytes)
	}
	return removed
}

// evictOneLocked removes the least recently used blob that is not pinned, and returns it; nothing
// if every blob is pinned or none is left.
func (s *Store) evictOneLocked() []digest.Digest {
	for el := s.lru.Back(); el != nil; el = el.Prev() {
		e := el.Value.(*entry)
		if e.pins > 0 {
			continue
		}
		p, _ := s.path(e.Digest)
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Error("evict blob", "digest", e.Digest, "err", err)
			continue
		}
		s.removeLocked(e)
		s.metrics.evictions.Inc()
		s.metrics.evictedBytes.Add(float64(e.Size))
		return []digest.Digest{e.Digest}
	}
	return nil
}

// syncDir makes a rename in dir durable. It is best effort: the index is rebuilt from the files at
// start, and a blob lost in a crash is fetched again.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// discard closes and removes a temp file that will not become a blob.
func (s *Store) discard(f *os.File) {
	_ = f.Close() // the file is removed next; what it held does not matter
	s.removeTemp(f.Name())
}

// removeTemp removes a temp file that will not become a blob. A file that cannot be removed is
// never served (only committed blobs are) and goes with the ingest directory at the next start;
// it is logged because it takes disk space until then.
func (s *Store) removeTemp(path string) {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("remove temp file", "path", path, "err", err)
	}
}
