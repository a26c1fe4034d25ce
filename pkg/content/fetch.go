package content

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// Fetched is one answer of a FetchFunc: the blob's bytes from the requested offset on.
type Fetched struct {
	Body io.ReadCloser
	// Size is the size of the whole blob, whatever the offset.
	Size int64
	// Source names where the bytes come from, for metrics and logs.
	Source string
	// SizeTrusted says Size comes from a trusted source or was checked against one. Only a trusted
	// size is reserved in the cache up front (evicting to make room); an untrusted one counts as its
	// bytes arrive, so that a lie cannot empty the cache.
	SizeTrusted bool
	// Untrusted marks bytes from a source that may lie, such as another node. Peers get them as they
	// arrive; clients once the blob verified, or once they waited Options.UntrustedHold for them. If
	// the blob fails verification, every reader that was given a byte of this answer fails, so that
	// no reader ever has a whole corrupt blob, and the fetch goes again from the first untrusted byte
	// for the others.
	Untrusted bool
	// Reject, if set, is told when the blob failed verification with bytes from this answer in it
	// (ErrDigestMismatch; the fetch then starts again from the first untrusted byte), or when this
	// answer was cut off for being too slow (ErrTooSlow; the fetch resumes from the byte reached).
	Reject func(err error)
}

// ErrTooSlow is the cause of a fetch attempt cut off because its source stalled or sent too little
// (Options.StallTimeout, Options.MinRate). The source's Reject hears it, so that it can send the
// next attempt elsewhere.
var ErrTooSlow = errors.New("source too slow")

// ErrAbandoned ends a fetch that no client waited for any more (Options.AbandonAfter).
var ErrAbandoned = errors.New("fetch abandoned: no client waits for it")

// FetchFunc opens a blob at offset. The store calls it again, with the offset it has reached, when an
// attempt breaks off, so that one fetch can resume on another source.
type FetchFunc func(ctx context.Context, offset int64) (*Fetched, error)

// Fetch returns a reader of blob d. If the store holds d, the reader reads the file. Otherwise it joins
// the fetch of d under way, or starts one with fetch: there is at most one fetch per digest per store, and
// every reader gets the bytes as they are written. A reader never gets the last byte of a blob before the
// whole blob has been verified and committed, so a client never receives a corrupt blob in full; a
// fetch whose source says the blob is empty returns only once the empty blob has verified.
//
// Fetch returns when the size of the blob is known; ctx bounds only that wait. The fetch itself runs
// until it ends, or the store is closed, or no client has waited for it for Options.AbandonAfter.
func (s *Store) Fetch(ctx context.Context, d digest.Digest, fetch FetchFunc) (*Reader, error) {
	if _, err := s.path(d); err != nil {
		return nil, err
	}
	for {
		if f, info, err := s.Open(d); err == nil {
			return &Reader{f: f, size: info.Size, source: "local"}, nil
		}
		s.mu.Lock()
		if _, ok := s.entries[d]; ok { // committed since Open looked
			s.mu.Unlock()
			continue
		}
		ing, ok := s.fetching[d]
		if !ok {
			var err error
			ing, err = s.startLocked(d, fetch)
			if err != nil {
				s.mu.Unlock()
				return nil, err
			}
		}
		s.mu.Unlock()
		return ing.reader(ctx, false)
	}
}

// Reader returns a reader of blob d if the store holds it or is fetching it, and ErrNotFound
// otherwise; it never starts a fetch. It is how other nodes are served: they verify for themselves, so
// they get a blob still arriving as it arrives, untrusted bytes included, and its last byte only once
// it verified, as every reader does.
func (s *Store) Reader(ctx context.Context, d digest.Digest) (*Reader, error) {
	if _, err := s.path(d); err != nil {
		return nil, err
	}
	if f, info, err := s.Open(d); err == nil {
		return &Reader{f: f, size: info.Size, source: "local"}, nil
	}
	s.mu.Lock()
	ing, ok := s.fetching[d]
	s.mu.Unlock()
	if !ok {
		// Committed in between, or not here at all.
		if f, info, err := s.Open(d); err == nil {
			return &Reader{f: f, size: info.Size, source: "local"}, nil
		}
		return nil, fmt.Errorf("%s: %w", d, ErrNotFound)
	}
	select {
	case <-ing.sized:
	default:
		// No source has answered yet: waiting could be waiting on the asker itself.
		return nil, fmt.Errorf("%s: fetch not started: %w", d, ErrNotFound)
	}
	return ing.reader(ctx, true)
}

// Fetching reports whether a fetch of d is under way, and its source and size once known.
func (s *Store) Fetching(d digest.Digest) (source string, size int64, ok bool) {
	s.mu.Lock()
	ing, ok := s.fetching[d]
	s.mu.Unlock()
	if !ok {
		return "", 0, false
	}
	ing.mu.Lock()
	defer ing.mu.Unlock()
	return ing.source, ing.size, true
}

// ingestion is one fetch under way: a temp file that grows, and the readers that follow it.
type ingestion struct {
	s        *Store
	d        digest.Digest
	fetch    FetchFunc
	file     *os.File
	digester digest.Digester

	// ctx ends the fetch: the store closing, or the fetch abandoned.
	ctx    context.Context
	cancel context.CancelCauseFunc

	mu   sync.Mutex
	cond *sync.Cond
	// refs counts the clients of the fetch: readers not closed, and callers waiting for one. When it
	// drops to zero, abandon is armed.
	refs      int
	abandon   *time.Timer
	sized     chan struct{} // closed once size is known or the fetch failed
	size      int64
	source    string
	written   int64
	verified  bool // the digest matched: every byte may be read
	committed bool
	err       error

	// heldFrom is the offset of the first untrusted byte, -1 if there is none: clients wait for
	// verification past it until holdUntil, and a reader given a byte past it is tainted until the
	// blob verifies.
	heldFrom  int64
	holdUntil time.Time
	holdEnd   *time.Timer
	rejects   []func(error)
	// round counts the passes over the blob: it grows when untrusted bytes failed verification and
	// were cut off, and a reader tainted in an earlier round fails. mismatch says why.
	round    int
	mismatch error
	// reserved is what the fetch holds of the cache's size limit: its size, once a trusted source
	// told it.
	reserved int64
}

func (s *Store) startLocked(d digest.Digest, fetch FetchFunc) (*ingestion, error) {
	if s.ctx.Err() != nil {
		return nil, fmt.Errorf("fetch %s: store is closed", d)
	}
	if len(s.fetching) >= s.opts.MaxFetches {
		return nil, fmt.Errorf("fetch %s: %d under way: %w", d, len(s.fetching), ErrTooManyFetches)
	}
	ing := &ingestion{s: s, d: d, fetch: fetch, digester: d.Algorithm().Digester(), sized: make(chan struct{}), size: -1, heldFrom: -1, round: 1}
	ing.ctx, ing.cancel = context.WithCancelCause(s.ctx)
	ing.cond = sync.NewCond(&ing.mu)
	s.fetching[d] = ing
	s.metrics.inflight.Inc()
	s.wg.Add(1)
	go ing.run()
	return ing, nil
}

// hold counts a client of the fetch; release uncounts it, and arms the abandonment of a fetch that
// has none left.
func (ing *ingestion) hold() {
	ing.mu.Lock()
	ing.refs++
	if ing.abandon != nil {
		ing.abandon.Stop()
		ing.abandon = nil
	}
	ing.mu.Unlock()
}

func (ing *ingestion) release() {
	ing.mu.Lock()
	defer ing.mu.Unlock()
	ing.refs--
	if ing.refs > 0 || ing.committed || ing.err != nil {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(ing.s.opts.AbandonAfter, func() {
		ing.mu.Lock()
		still := ing.abandon == t
		ing.mu.Unlock()
		if still {
			ing.cancel(fmt.Errorf("fetch %s: nobody waited for it for %s: %w", ing.d, ing.s.opts.AbandonAfter, ErrAbandoned))
		}
	})
	ing.abandon = t
}

func (ing *ingestion) reader(ctx context.Context, untrusted bool) (rd *Reader, err error) {
	ing.hold()
	defer func() {
		if rd == nil || !rd.held { // no reader, or one of the committed file: not a client of the fetch
			ing.release()
		}
	}()
	select {
	case <-ing.sized:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	ing.mu.Lock()
	size, source, err := ing.size, ing.source, ing.err
	ing.mu.Unlock()
	if size < 0 {
		return nil, err
	}
	if size == 0 {
		// An empty blob has no last byte to hold back: the end of it is all a reader gets, and that
		// too waits for verification, or a source that calls any digest empty would hand readers a
		// whole blob that does not match it.
		ing.mu.Lock()
		for !ing.verified && !ing.committed && ing.err == nil {
			ing.cond.Wait()
		}
		err = ing.err
		ing.mu.Unlock()
		if err != nil {
			return nil, err
		}
	}
	// Each reader has its own descriptor: the writer's offset is not shared, and the descriptor
	// stays valid when the file is renamed into the store.
	f, err := os.Open(ing.file.Name())
	if err != nil {
		// Renamed or removed in between: the fetch is ending; the store or its error will have the answer.
		ing.mu.Lock()
		defer ing.mu.Unlock()
		for !ing.committed && ing.err == nil {
			ing.cond.Wait()
		}
		if ing.committed {
			// The blob this reader waited for came from the fetch's source, committed or not: an
			// empty blob, which readers get only once it verified, would otherwise be "local" or not
			// by a race with the rename.
			f, _, err := ing.s.Open(ing.d)
			if err != nil {
				return nil, err
			}
			return &Reader{f: f, size: size, source: source}, nil
		}
		if ing.err != nil {
			return nil, ing.err
		}
		return nil, fmt.Errorf("fetch %s: %w", ing.d, err)
	}
	return &Reader{f: f, size: size, source: source, ing: ing, untrusted: untrusted, held: true}, nil
}

func (ing *ingestion) run() {
	s := ing.s
	defer s.wg.Done()
	defer s.metrics.inflight.Dec()
	defer ing.cancel(nil)
	err := ing.fill()
	if err != nil && ing.file != nil {
		s.discard(ing.file)
	}
	ing.mu.Lock()
	reserved := ing.reserved
	ing.reserved = 0
	ing.mu.Unlock()
	s.unreserve(reserved)
	s.mu.Lock()
	delete(s.fetching, ing.d)
	s.mu.Unlock()

	ing.mu.Lock()
	if err != nil {
		ing.err = err
		if ing.size < 0 {
			close(ing.sized)
		}
	} else {
		ing.committed = true
	}
	if ing.abandon != nil {
		ing.abandon.Stop()
		ing.abandon = nil
	}
	if ing.holdEnd != nil {
		ing.holdEnd.Stop()
	}
	ing.cond.Broadcast()
	ing.mu.Unlock()
	switch {
	case errors.Is(err, ErrAbandoned):
		s.metrics.abandoned.Inc()
		s.log.Info("fetch abandoned; nothing was kept", "digest", ing.d, "err", err)
	case err != nil:
		s.log.Warn("fetch failed; nothing was kept", "digest", ing.d, "err", err)
	}
}

// copy fills the temp file, resuming from where it stopped when an attempt breaks off.
func (ing *ingestion) copy(hasher *pipeHasher) error {
	s := ing.s
	var lastErr error
	for attempt := 0; attempt < s.opts.FetchAttempts; attempt++ {
		if attempt > 0 {
			s.log.Info("resuming fetch", "digest", ing.d, "offset", ing.written, "attempt", attempt+1, "after", lastErr)
			select {
			case <-time.After(time.Duration(attempt*attempt) * 100 * time.Millisecond):
			case <-ing.ctx.Done():
				return fmt.Errorf("fetch %s: %w", ing.d, context.Cause(ing.ctx))
			}
		}
		progressed, err := ing.attempt(hasher)
		if err == nil {
			return nil
		}
		lastErr = err
		if errors.Is(err, ErrSizeMismatch) || errors.Is(err, errPermanent) || ing.ctx.Err() != nil {
			return err
		}
		if progressed {
			attempt = 0 // a source that made progress has earned a fresh budget
		}
	}
	return fmt.Errorf("fetch %s: giving up after %d attempts: %w", ing.d, s.opts.FetchAttempts, lastErr)
}

var errPermanent = errors.New("permanent")

// flushInterval bounds how long arrived bytes wait in a fetch's buffer before readers can have them.
const flushInterval = 25 * time.Millisecond

// attempt runs one FetchFunc call to its end and reports whether it moved the offset.
func (ing *ingestion) attempt(hasher *pipeHasher) (bool, error) {
	s := ing.s
	ctx, cancel := context.WithCancelCause(ing.ctx)
	defer cancel(nil)
	start := ing.written
	fetched, err := ing.fetch(ctx, start)
	if err != nil {
		if cause := context.Cause(ing.ctx); cause != nil {
			return false, fmt.Errorf("%w: %w", errPermanent, cause)
		}
		if start == 0 {
			// Nobody has been told a size yet, and the sources have had their chance: report it.
			return false, fmt.Errorf("%w: %w", errPermanent, err)
		}
		return false, err
	}
	defer func() { _ = fetched.Body.Close() }() // read-only; a failed read shows in rerr below

	// Only this goroutine sets the size: first stays true until it does below. The room is made
	// before any client learns the size.
	ing.mu.Lock()
	first := ing.size < 0
	ing.mu.Unlock()
	var reserved int64
	if first && fetched.Size > 0 {
		if fetched.SizeTrusted {
			reserved = fetched.Size
			s.reserve(reserved)
		}
		// Refused now, the client hears why; found full by a write later, its transfer is cut.
		if err := s.makeRoom(fetched.Size, fetched.SizeTrusted); err != nil {
			ing.mu.Lock()
			ing.reserved = reserved // released when the fetch ends
			ing.mu.Unlock()
			return false, fmt.Errorf("%w: fetch %s of %d bytes from %s: %w", errPermanent, ing.d, fetched.Size, fetched.Source, err)
		}
	}
	if first {
		// The file is made once a source answered: a fetch waiting on a source that never does
		// holds no file.
		f, err := os.CreateTemp(s.ingestDir(), "fetch-")
		if err != nil {
			ing.mu.Lock()
			ing.reserved = reserved // released when the fetch ends
			ing.mu.Unlock()
			return false, fmt.Errorf("%w: fetch %s: %w", errPermanent, ing.d, err)
		}
		ing.file = f
	}
	ing.mu.Lock()
	if first {
		ing.size, ing.source, ing.reserved = fetched.Size, fetched.Source, reserved
		close(ing.sized)
	} else {
		ing.source = fetched.Source
	}
	if fetched.Untrusted {
		if ing.heldFrom < 0 {
			ing.heldFrom = start
		}
		if ing.holdUntil.IsZero() {
			// Once, for the whole fetch: clients that waited through one bad source must not wait
			// as long again for the next.
			ing.holdUntil = time.Now().Add(s.opts.UntrustedHold)
			ing.holdEnd = time.AfterFunc(s.opts.UntrustedHold, func() {
				ing.mu.Lock()
				ing.cond.Broadcast()
				ing.mu.Unlock()
			})
		}
		if fetched.Reject != nil {
			ing.rejects = append(ing.rejects, fetched.Reject)
		}
	}
	size := ing.size
	ing.mu.Unlock()
	if first {
		s.events.publish(EventFetching, ing.d)
	}
	if fetched.Size != size {
		return false, fmt.Errorf("fetch %s from %s: size %d, earlier %d: %w", ing.d, fetched.Source, fetched.Size, size, ErrSizeMismatch)
	}

	// A source that stops sending, or sends too little, is cut off, so that the fetch can resume
	// elsewhere; the source hears why.
	stall := time.AfterFunc(s.opts.StallTimeout, func() {
		cancel(fmt.Errorf("no data from %s for %s: %w", fetched.Source, s.opts.StallTimeout, ErrTooSlow))
	})
	defer stall.Stop()
	var received atomic.Int64
	if s.opts.MinRate > 0 {
		done := make(chan struct{})
		defer close(done)
		go watchRate(ctx, done, &received, s.opts.MinRate, s.opts.RateWindow, func(got int64) {
			cancel(fmt.Errorf("%d bytes from %s in %s, under the minimum of %d bytes/s: %w", got, fetched.Source, s.opts.RateWindow, s.opts.MinRate, ErrTooSlow))
		})
	}
	defer func() {
		if cause := context.Cause(ctx); errors.Is(cause, ErrTooSlow) && fetched.Reject != nil {
			fetched.Reject(cause)
		}
	}()

	// Reads are gathered into whole buffers before they are written and hashed: small writes to a new
	// file cost ten times more than large ones. On a slow link a partial buffer is written every
	// flushInterval, so that readers never wait long for bytes that have arrived.
	buf, fill := hasher.buffer(), 0
	lastFlush := time.Now()
	flush := func() error {
		if fill == 0 {
			return nil
		}
		if _, err := ing.file.Write(buf[:fill]); err != nil {
			return fmt.Errorf("%w: write %s: %w", errPermanent, ing.file.Name(), err)
		}
		hasher.submit(buf[:fill])
		s.metrics.fetchedBytes.WithLabelValues(fetched.Source).Add(float64(fill))
		ing.mu.Lock()
		ing.written += int64(fill)
		ing.cond.Broadcast()
		ing.mu.Unlock()
		buf, fill = hasher.buffer(), 0
		lastFlush = time.Now()
		return nil
	}
	defer func() { hasher.release(buf) }()
	for ing.written+int64(fill) < size {
		n, rerr := fetched.Body.Read(buf[fill:])
		if n > 0 {
			received.Add(int64(n))
			stall.Reset(s.opts.StallTimeout)
			if ing.written+int64(fill+n) > size {
				return true, fmt.Errorf("fetch %s from %s: more than %d bytes: %w", ing.d, fetched.Source, size, ErrSizeMismatch)
			}
			fill += n
			if fill == len(buf) || time.Since(lastFlush) > flushInterval {
				if err := flush(); err != nil {
					return true, err
				}
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			// Keep what arrived intact: the next attempt resumes after it.
			if err := flush(); err != nil {
				return true, err
			}
			if cause := context.Cause(ctx); cause != nil && ctx.Err() != nil {
				rerr = cause
			}
			return ing.written > start, fmt.Errorf("fetch %s from %s at offset %d: %w", ing.d, fetched.Source, ing.written, rerr)
		}
	}
	if err := flush(); err != nil {
		return true, err
	}
	if ing.written < size {
		return ing.written > start, fmt.Errorf("fetch %s from %s: ended at %d of %d bytes: %w", ing.d, fetched.Source, ing.written, size, io.ErrUnexpectedEOF)
	}
	// A source that has more to say than it announced is lying about something.
	var one [1]byte
	if n, _ := fetched.Body.Read(one[:]); n > 0 {
		return true, fmt.Errorf("fetch %s from %s: more than %d bytes: %w", ing.d, fetched.Source, size, ErrSizeMismatch)
	}
	return true, nil
}

// watchRate calls tooSlow with what arrived in the last window when that is under minRate per
// second, once, and returns; it returns too when done is closed or ctx is done.
func watchRate(ctx context.Context, done <-chan struct{}, received *atomic.Int64, minRate int64, window time.Duration, tooSlow func(got int64)) {
	floor := int64(float64(minRate) * window.Seconds())
	tick := time.NewTicker(window)
	defer tick.Stop()
	var last int64
	for {
		select {
		case <-done:
			return
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		got := received.Load()
		if got-last < floor {
			tooSlow(got - last)
			return
		}
		last = got
	}
}

// maxVerifyRounds bounds how often a fetch starts again after untrusted bytes failed verification.
const maxVerifyRounds = 3

// fill fetches, verifies and commits the blob. When the blob does not verify and untrusted sources
// contributed, they are rejected and the fetch goes again from the first untrusted byte: the readers
// that were given none of those bytes go on as if nothing happened, the others fail.
func (ing *ingestion) fill() error {
	s := ing.s
	for round := 1; ; round++ {
		hasher := newPipeHasher(ing.digester.Hash())
		err := ing.rehash(hasher)
		if err == nil {
			err = ing.copy(hasher)
		}
		// The bytes were hashed in order as they were written, across resumed attempts; hashing the
		// file again would read the same page cache and delay the last byte of every cold pull.
		hasher.finish()
		if err != nil {
			return err
		}
		got := ing.digester.Digest()
		if got == ing.d {
			break
		}
		s.metrics.verifyFailures.Inc()
		ing.mu.Lock()
		from, rejects, src := ing.heldFrom, ing.rejects, ing.source
		ing.mu.Unlock()
		mismatch := fmt.Errorf("fetch %s from %s: got %s: %w", ing.d, src, got, ErrDigestMismatch)
		if from < 0 || round == maxVerifyRounds {
			return mismatch
		}
		// Readers first: from here on none is given a byte of the round that failed, and those given
		// one fail now, not when the next bytes arrive. Only then are the sources told, so that
		// whoever hears of the failure finds the blob already cut back to its last good byte.
		ing.mu.Lock()
		ing.written, ing.heldFrom, ing.rejects = from, -1, nil
		ing.round++
		ing.mismatch = mismatch
		ing.cond.Broadcast()
		ing.mu.Unlock()
		for _, reject := range rejects {
			reject(mismatch)
		}
		if err := ing.file.Truncate(from); err != nil {
			return fmt.Errorf("%w: %w", mismatch, err)
		}
		if _, err := ing.file.Seek(from, io.SeekStart); err != nil {
			return fmt.Errorf("%w: %w", mismatch, err)
		}
		ing.digester = ing.d.Algorithm().Digester()
		s.log.Warn("blob failed verification; fetching its untrusted part again", "digest", ing.d, "offset", from, "err", mismatch)
	}
	// Verified: readers may have the last byte now. Making the blob durable (fsync, rename) is the
	// store's business and need not delay them; until it is done, nothing else refers to the file.
	ing.mu.Lock()
	ing.verified = true
	ing.cond.Broadcast()
	reserved := ing.reserved
	ing.reserved = 0
	ing.mu.Unlock()
	s.unreserve(reserved) // the commit counts the blob itself
	return s.commit(ing.file, ing.d, ing.size)
}

// rehash feeds the hasher what the file already holds, when a fetch starts again part way.
func (ing *ingestion) rehash(hasher *pipeHasher) error {
	ing.mu.Lock()
	n := ing.written
	ing.mu.Unlock()
	for off := int64(0); off < n; {
		buf := hasher.buffer()
		k, err := ing.file.ReadAt(buf[:min(int64(len(buf)), n-off)], off)
		if k > 0 {
			hasher.submit(buf[:k])
		} else {
			hasher.release(buf)
		}
		if err != nil && (!errors.Is(err, io.EOF) || off+int64(k) != n) {
			return fmt.Errorf("%w: reread %s: %w", errPermanent, ing.file.Name(), err)
		}
		off += int64(k)
	}
	return nil
}

// Reader reads one blob, complete or still arriving. It implements io.ReaderAt.
type Reader struct {
	f      *os.File
	size   int64
	source string
	ing    *ingestion // nil when the blob was complete when the reader was made
	// untrusted readers (peers) verify for themselves: they get untrusted bytes as they arrive.
	untrusted bool
	// tainted is the fetch's round in which the reader was given untrusted bytes, 0 if it was not.
	tainted int
	// held says the reader counts as a client of ing until it is closed.
	held bool
}

// Size is the size of the whole blob.
func (r *Reader) Size() int64 { return r.size }

// Received is how many bytes of the blob the store has: all of them for a blob it held, those
// written so far for one still arriving.
func (r *Reader) Received() int64 {
	if r.ing == nil {
		return r.size
	}
	r.ing.mu.Lock()
	defer r.ing.mu.Unlock()
	if r.ing.verified || r.ing.committed {
		return r.size
	}
	return r.ing.written
}

// Source is "local" for a blob the store held when asked, or else the source of the fetch the reader
// joined, even if that fetch has committed since.
func (r *Reader) Source() string { return r.source }

// File returns the blob's file when the blob was complete when the reader was made, so that it can be
// served as a file (Range, conditional requests); nil otherwise.
func (r *Reader) File() *os.File {
	if r.ing != nil {
		return nil
	}
	return r.f
}

// ReadAt reads from the blob, waiting for bytes that have not arrived yet. The last byte is returned
// only once the blob is verified; if verification or the fetch fails, ReadAt returns that error.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.size {
		return 0, io.EOF
	}
	if r.ing != nil {
		avail, err := r.ing.wait(r, off, 1, off+int64(len(p)))
		if err != nil {
			return 0, err
		}
		if ready := avail - off; int64(len(p)) > ready {
			p = p[:ready]
		}
	}
	if rem := r.size - off; int64(len(p)) > rem {
		p = p[:rem]
	}
	n, err := r.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) && off+int64(n) < r.size {
		err = r.cut()
	}
	if err == nil && off+int64(n) == r.size {
		err = io.EOF
	}
	return n, err
}

// WriteTo writes the whole blob to w, each part as soon as it may be read, in ranges of at least a
// megabyte rather than a wake-up for every write of the fetch. w gets the parts as readers of the
// file (io.Copy), so it may choose how to send them: a TCP connection sends them with sendfile.
// Only one WriteTo or CopyTo at a time: they move the reader's file offset.
func (r *Reader) WriteTo(w io.Writer) (int64, error) { return r.CopyTo(w, 0) }

// CopyTo is WriteTo from offset off of the blob on: it writes the bytes from off to the end.
func (r *Reader) CopyTo(w io.Writer, off int64) (int64, error) {
	if off < 0 || off > r.size {
		return 0, fmt.Errorf("copy %s from %d: offset outside the blob (%d bytes)", r.f.Name(), off, r.size)
	}
	n, err := r.copyTo(w, off)
	return n - off, err
}

// copyTo writes from off to the end and returns the offset reached.
func (r *Reader) copyTo(w io.Writer, off int64) (int64, error) {
	for off < r.size {
		avail := r.size
		if r.ing != nil {
			a, err := r.ing.wait(r, off, 1<<20, r.size)
			if err != nil {
				return off, err
			}
			avail = a
		}
		if _, err := r.f.Seek(off, io.SeekStart); err != nil {
			return off, err
		}
		n, err := io.Copy(w, &io.LimitedReader{R: r.f, N: avail - off})
		off += n
		if err != nil {
			return off, err
		}
		if n == 0 {
			return off, fmt.Errorf("read %s at %d: %w", r.f.Name(), off, r.cut())
		}
	}
	return off, nil
}

// wait blocks until at least chunk bytes past off may be read by r, or all that are left, and
// returns how far the readable bytes go, up to end, where r stops reading. The last byte waits for
// verification, and so, for clients, do untrusted bytes until the hold ends. A reader given untrusted
// bytes that then failed verification gets an error from then on.
func (ing *ingestion) wait(r *Reader, off, chunk, end int64) (int64, error) {
	ing.mu.Lock()
	defer ing.mu.Unlock()
	want := min(off+chunk, ing.size)
	for {
		if r.tainted != 0 && r.tainted != ing.round {
			return 0, fmt.Errorf("bytes already read failed verification: %w", ing.mismatch)
		}
		if ing.verified || ing.committed {
			return ing.size, nil
		}
		if ing.err != nil {
			return 0, ing.err
		}
		limit := ing.written
		if !r.untrusted && ing.heldFrom >= 0 && time.Now().Before(ing.holdUntil) {
			limit = min(limit, ing.heldFrom)
		}
		// Bytes held back end a chunk early: those before them need not wait for the hold.
		if avail := min(limit, ing.size-1, end); avail > off && (ing.written >= want || limit < ing.written) {
			if ing.heldFrom >= 0 && avail > ing.heldFrom {
				r.tainted = ing.round
			}
			return avail, nil
		}
		ing.cond.Wait()
	}
}

// cut says why the file ended before bytes that were readable: the untrusted bytes the reader was
// given failed verification and were cut off.
func (r *Reader) cut() error {
	if r.ing == nil {
		return io.ErrUnexpectedEOF
	}
	ing := r.ing
	ing.mu.Lock()
	defer ing.mu.Unlock()
	for r.tainted != 0 && r.tainted == ing.round && ing.err == nil && !ing.verified && !ing.committed {
		ing.cond.Wait() // the file is cut before the round moves on
	}
	switch {
	case r.tainted != 0 && r.tainted != ing.round:
		return fmt.Errorf("bytes already read failed verification: %w", ing.mismatch)
	case ing.err != nil:
		return ing.err
	}
	return io.ErrUnexpectedEOF
}

// Close releases the reader. A fetch it joined goes on while other clients wait for it, and for
// Options.AbandonAfter once none does.
func (r *Reader) Close() error {
	if r.held {
		r.held = false
		r.ing.release()
	}
	return r.f.Close()
}
