package content

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func randomBlob(t testing.TB, n int) ([]byte, digest.Digest) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	return b, digest.FromBytes(b)
}

func openStore(t testing.TB, root string, opts Options) *Store {
	t.Helper()
	s, err := Open(root, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestPutVerifiesAndSurvivesReopen(t *testing.T) {
	root := t.TempDir()
	s := openStore(t, root, Options{})
	data, d := randomBlob(t, 1000)
	if err := s.Put(d, append([]byte{}, data[:999]...)); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Put of wrong bytes: %v, want ErrDigestMismatch", err)
	}
	if _, err := s.Stat(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("wrong bytes were kept: %v", err)
	}
	if err := s.Put(d, data); err != nil {
		t.Fatal(err)
	}
	s.Close()

	// A leftover temp file from a crash must be cleared, and never become a blob.
	if err := os.WriteFile(filepath.Join(root, "ingest", "fetch-123"), data[:10], 0o600); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, root, Options{})
	got, err := s2.ReadAll(d, 1<<20)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after reopen: %v", err)
	}
	if left, _ := os.ReadDir(filepath.Join(root, "ingest")); len(left) != 0 {
		t.Fatalf("ingest dir not cleared: %v", left)
	}
}

func TestPathRejectsInvalidDigests(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	for _, d := range []digest.Digest{"sha256:../../etc/passwd", "sha256:" + "AB", "md5:abc", "../x"} {
		if _, _, err := s.Open(d); err == nil {
			t.Errorf("Open(%q) succeeded", d)
		}
		if _, err := s.Fetch(context.Background(), d, nil); err == nil {
			t.Errorf("Fetch(%q) succeeded", d)
		}
	}
}

func TestEvictionLRUWatermarksAndPins(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{MaxBytes: 10_000, HighWatermark: 0.9, LowWatermark: 0.5})
	ctx, cancel := context.WithCancel(context.Background())
	events := s.Subscribe(ctx)
	var ds []digest.Digest
	for i := 0; i < 4; i++ {
		b, d := randomBlob(t, 2000)
		if err := s.Put(d, b); err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	// Use the oldest, pin the second: the third is then the least recently used, unpinned blob.
	if f, _, err := s.Open(ds[0]); err == nil {
		f.Close()
	}
	if err := s.Pin(ds[1]); err != nil {
		t.Fatal(err)
	}
	b, d := randomBlob(t, 2000) // 10000 > 9000: evict down to 5000
	if err := s.Put(d, b); err != nil {
		t.Fatal(err)
	}
	if s.Size() > 5000 {
		t.Fatalf("size %d after eviction, want <= 5000", s.Size())
	}
	for _, keep := range []digest.Digest{ds[1], d} {
		if _, err := s.Stat(keep); err != nil {
			t.Errorf("%s evicted: pinned or newest", keep)
		}
	}
	cancel()
	var removed, committed []digest.Digest
	for ev := range events {
		switch ev.Kind {
		case EventRemoved:
			removed = append(removed, ev.Digest)
		case EventCommitted:
			committed = append(committed, ev.Digest)
		}
	}
	if len(removed) != 3 || removed[0] != ds[2] {
		t.Errorf("removed %v, want 3 starting with the least recently used %s", removed, ds[2])
	}
	if len(committed) != 5 || committed[4] != d {
		t.Errorf("committed %v, want the 5 blobs put, in order", committed)
	}
}

// A subscriber that does not read loses events past its buffer; the store is never held up.
func TestEventsNeverBlockTheStore(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := openStore(t, t.TempDir(), Options{Registerer: reg})
	events := s.Subscribe(t.Context())
	for i := 0; i < eventBuffer+10; i++ {
		b, d := randomBlob(t, 10)
		if err := s.Put(d, b); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(events); n != eventBuffer {
		t.Errorf("%d events buffered, want %d", n, eventBuffer)
	}
	if got := testutil.ToFloat64(s.metrics.eventsDropped); got != 10 {
		t.Errorf("imagemesh_content_events_dropped_total = %v, want 10", got)
	}
}

// script is a FetchFunc that serves data, counts calls, and can misbehave on cue.
type script struct {
	data    []byte
	calls   atomic.Int32
	gate    chan struct{} // if set, the body blocks before its last 1000 bytes until closed
	breakAt int64         // if > 0, the first attempt ends with an error at this offset
	corrupt bool
}

func (s *script) fetch(ctx context.Context, off int64) (*Fetched, error) {
	n := s.calls.Add(1)
	data := s.data
	if s.corrupt {
		data = append([]byte{}, data...)
		data[len(data)/2] ^= 0xff
	}
	var r io.Reader = bytes.NewReader(data[off:])
	if n == 1 && s.breakAt > off {
		r = io.MultiReader(bytes.NewReader(data[off:s.breakAt]), errReader{io.ErrUnexpectedEOF})
	}
	if s.gate != nil {
		cut := int64(len(data)) - 1000
		r = io.MultiReader(bytes.NewReader(data[off:cut]), gated{s.gate}, bytes.NewReader(data[cut:]))
	}
	return &Fetched{Body: io.NopCloser(r), Size: int64(len(s.data)), Source: "test"}, nil
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

type gated struct{ c chan struct{} }

func (g gated) Read([]byte) (int, error) { <-g.c; return 0, io.EOF }

func TestFetchIsSharedAndStreams(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	data, d := randomBlob(t, 3<<20)
	sc := &script{data: data, gate: make(chan struct{})}

	const clients = 50
	var wg sync.WaitGroup
	results := make([][]byte, clients)
	errs := make([]error, clients)
	streaming := make(chan struct{}, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := s.Fetch(context.Background(), d, sc.fetch)
			if err != nil {
				errs[i] = err
				return
			}
			defer r.Close()
			// Every client has its first bytes while the fetch is still held at the gate.
			first := make([]byte, 1024)
			if _, err := r.ReadAt(first, 0); err != nil {
				errs[i] = err
				return
			}
			streaming <- struct{}{}
			results[i], errs[i] = io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
		}(i)
	}
	for i := 0; i < clients; i++ {
		select {
		case <-streaming:
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d clients got bytes before the fetch finished", i)
		}
	}
	close(sc.gate)
	wg.Wait()
	for i := range results {
		if errs[i] != nil || !bytes.Equal(results[i], data) {
			t.Fatalf("client %d: err %v, %d bytes", i, errs[i], len(results[i]))
		}
	}
	if n := sc.calls.Load(); n != 1 {
		t.Fatalf("%d fetches for %d concurrent readers, want 1", n, clients)
	}
	if _, err := s.Stat(d); err != nil {
		t.Fatalf("blob not committed: %v", err)
	}
}

func TestFetchWithholdsLastByteAndDropsCorruptBlob(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	data, d := randomBlob(t, 1<<20)
	sc := &script{data: data, corrupt: true}
	r, err := s.Fetch(context.Background(), d, sc.fetch)
	var got []byte
	if err == nil {
		defer r.Close()
		got, err = io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	}
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("read of corrupt blob: %v, want ErrDigestMismatch", err)
	}
	if len(got) >= len(data) {
		t.Fatalf("reader got %d of %d bytes of a corrupt blob", len(got), len(data))
	}
	if _, err := s.Stat(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("corrupt blob kept: %v", err)
	}
	if left, _ := os.ReadDir(filepath.Join(s.Root(), "ingest")); len(left) != 0 {
		t.Fatalf("temp file of corrupt blob left: %v", left)
	}
}

// Readers that join a fetch as it commits (its temp file renamed into the store before they open it)
// get the committed blob. They once deadlocked there: the reader released its hold on the fetch while
// it still held the fetch's lock, which the release takes.
func TestFetchJoinedAsItCommits(t *testing.T) {
	// Not openStore: a deadlocked fetch would hang its Close in the cleanup, and the test with it.
	s, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		for range 100 {
			data, d := randomBlob(t, 1) // one byte: the fetch commits right after its size is known
			fetch := func(context.Context, int64) (*Fetched, error) {
				return &Fetched{Body: io.NopCloser(bytes.NewReader(data)), Size: 1, Source: "test"}, nil
			}
			var wg sync.WaitGroup
			errs := make(chan error, 20)
			for range 20 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r, err := s.Fetch(context.Background(), d, fetch)
					if err == nil {
						var got []byte
						got, err = io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
						r.Close()
						if err == nil && !bytes.Equal(got, data) {
							err = fmt.Errorf("read %q, want %q", got, data)
						}
					}
					errs <- err
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					done <- err
					return
				}
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("readers of fetches that committed as they joined still wait after 30 s")
	}
}

// A source that calls a blob empty gives readers no bytes to hold back: the reader itself waits
// until the empty blob has verified, so that nobody takes an empty answer for a non-empty blob.
func TestFetchOfEmptyBlobWaitsForVerification(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	empty := func(context.Context, int64) (*Fetched, error) {
		return &Fetched{Body: io.NopCloser(bytes.NewReader(nil)), Size: 0, Source: "test"}, nil
	}
	_, d := randomBlob(t, 100)
	if r, err := s.Fetch(context.Background(), d, empty); !errors.Is(err, ErrDigestMismatch) {
		if err == nil {
			r.Close()
		}
		t.Fatalf("Fetch of a blob its source calls empty = %v, want ErrDigestMismatch", err)
	}
	if _, err := s.Stat(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("wrongly empty blob kept: %v", err)
	}
	r, err := s.Fetch(context.Background(), digest.FromBytes(nil), empty)
	if err != nil {
		t.Fatalf("Fetch of the empty blob: %v", err)
	}
	defer r.Close()
	if got, err := io.ReadAll(io.NewSectionReader(r, 0, r.Size())); err != nil || len(got) != 0 {
		t.Fatalf("empty blob: %d bytes, %v", len(got), err)
	}
}

func TestFetchResumesAtOffset(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	data, d := randomBlob(t, 1<<20)
	sc := &script{data: data, breakAt: 300_000}
	r, err := s.Fetch(context.Background(), d, sc.fetch)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, err := io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("resumed read: %v", err)
	}
	if n := sc.calls.Load(); n != 2 {
		t.Fatalf("%d attempts, want 2 (one broken, one resumed)", n)
	}
}

func TestFetchReportsSourceErrors(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	_, d := randomBlob(t, 10)
	want := errors.New("upstream says no")
	_, err := s.Fetch(context.Background(), d, func(context.Context, int64) (*Fetched, error) { return nil, want })
	if !errors.Is(err, want) {
		t.Fatalf("Fetch: %v, want %v", err, want)
	}
	// The failed fetch is over: the next one starts afresh.
	data, d2 := randomBlob(t, 10)
	r, err := s.Fetch(context.Background(), d2, (&script{data: data}).fetch)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
}

func TestFetchRejectsOversizedBody(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	data, d := randomBlob(t, 1000)
	r, err := s.Fetch(context.Background(), d, func(context.Context, int64) (*Fetched, error) {
		// The blob's bytes, then more than the source announced.
		return &Fetched{Body: io.NopCloser(bytes.NewReader(append(data, 1, 2, 3))), Size: 1000, Source: "liar"}, nil
	})
	// The error reaches the reader, or Fetch itself if the fetch ended before the reader joined.
	if err == nil {
		defer r.Close()
		_, err = io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	}
	if !errors.Is(err, ErrSizeMismatch) {
		t.Fatalf("got %v, want ErrSizeMismatch", err)
	}
	if _, err := s.Stat(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("blob from a source that sent too much was kept: %v", err)
	}
}

// With no hold, clients get untrusted bytes as they arrive, as peers do. A trusted source serves the
// first part, an untrusted one the rest with a flipped byte, then a good untrusted one takes over.
// When the blob fails verification, the readers that were given corrupt bytes fail, those that were
// not go on to the right blob, the bad source is rejected, and the fetch goes again from where the
// untrusted part began.
func TestFetchWithoutHoldFailsOnlyTheReadersThatHadCorruptBytes(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{UntrustedHold: -1})
	data, d := randomBlob(t, 4<<20)
	const trustedPart = 1 << 20
	src := newBadPeerSource(t, data, trustedPart)
	fetch, peerGate := src.fetch, src.gate
	early, err := s.Fetch(context.Background(), d, fetch)
	if err != nil {
		t.Fatal(err)
	}
	defer early.Close()
	patient, err := s.Fetch(context.Background(), d, fetch)
	if err != nil {
		t.Fatal(err)
	}
	defer patient.Close()
	peerView, err := s.Reader(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	defer peerView.Close()

	// While the bad peer is held at its gate, its first bytes reach every reader that asks for them.
	buf := make([]byte, 1024)
	for name, r := range map[string]*Reader{"client": early, "peer": peerView} {
		if _, err := r.ReadAt(buf, trustedPart+1000); err != nil {
			t.Fatalf("%s reader of untrusted bytes before verification: %v", name, err)
		}
	}
	if _, err := patient.ReadAt(buf, 1000); err != nil {
		t.Fatalf("client reading the trusted part: %v", err)
	}
	close(peerGate)
	// The readers that had the bad peer's bytes fail; one that reads on only after the bad source was
	// rejected gets the right blob.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		n := len(src.rejections())
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the bad source was not rejected")
		}
	}
	got, err := io.ReadAll(io.NewSectionReader(patient, 0, patient.Size()))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("reader of the trusted part: %v (%d bytes, equal %v)", err, len(got), bytes.Equal(got, data))
	}
	for name, r := range map[string]*Reader{"client": early, "peer": peerView} {
		if _, err := io.ReadAll(io.NewSectionReader(r, 0, r.Size())); !errors.Is(err, ErrDigestMismatch) {
			t.Errorf("%s reader that had corrupt bytes: %v, want ErrDigestMismatch", name, err)
		}
	}
	if rejected := src.rejections(); len(rejected) != 1 || rejected[0] != "bad" {
		t.Fatalf("rejected %v, want just the bad source", rejected)
	}
	// The reader has its last byte once the blob verified; the commit follows.
	deadline := time.Now().Add(5 * time.Second)
	for _, err := s.Stat(d); err != nil; _, err = s.Stat(d) {
		if time.Now().After(deadline) {
			t.Fatalf("blob not kept after the good source: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A new reader gets the right blob.
	again, err := s.Fetch(context.Background(), d, fetch)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if got, err := io.ReadAll(io.NewSectionReader(again, 0, again.Size())); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("reader after the commit: %v", err)
	}
}

// A trusted source serves the first part, an untrusted one (a peer) the rest with a flipped byte, then
// a good untrusted one takes over. Clients must never see an untrusted byte before verification, the
// bad source must be rejected, and the fetch must go again from where the untrusted part began. A peer
// reader, which had the corrupt bytes, fails.
func TestFetchHoldsUntrustedBytesAndRetriesWithoutTheBadSource(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	data, d := randomBlob(t, 4<<20)
	const trustedPart = 1 << 20
	src := newBadPeerSource(t, data, trustedPart)
	fetch, peerGate := src.fetch, src.gate
	client, err := s.Fetch(context.Background(), d, fetch)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	peerView, err := s.Reader(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	defer peerView.Close()

	// While the bad peer is held at its gate, a peer reader gets its bytes, a client does not.
	buf := make([]byte, 1024)
	if _, err := peerView.ReadAt(buf, trustedPart+1000); err != nil {
		t.Fatalf("peer reader of untrusted bytes: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := client.ReadAt(buf, trustedPart+1000)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("client read an untrusted byte before verification (err %v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(peerGate)
	got, err := io.ReadAll(io.NewSectionReader(client, 0, client.Size()))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("client read: %v (%d bytes, equal %v)", err, len(got), bytes.Equal(got, data))
	}
	if err := <-done; err != nil {
		t.Fatalf("held client read: %v", err)
	}
	if _, err := io.ReadAll(io.NewSectionReader(peerView, 0, peerView.Size())); !errors.Is(err, ErrDigestMismatch) {
		t.Errorf("peer reader that had corrupt bytes: %v, want ErrDigestMismatch", err)
	}
	if rejected := src.rejections(); len(rejected) != 1 || rejected[0] != "bad" {
		t.Fatalf("rejected %v, want just the bad source", rejected)
	}
	// The reader has its last byte once the blob verified; the commit follows.
	deadline := time.Now().Add(5 * time.Second)
	for _, err := s.Stat(d); err != nil; _, err = s.Stat(d) {
		if time.Now().After(deadline) {
			t.Fatalf("blob not kept after the good source: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Once the hold has passed, a client gets untrusted bytes as they arrive.
func TestFetchReleasesUntrustedBytesAfterTheHold(t *testing.T) {
	const hold = 300 * time.Millisecond
	s := openStore(t, t.TempDir(), Options{UntrustedHold: hold})
	data, d := randomBlob(t, 2<<20)
	gate := make(chan struct{})
	defer close(gate)
	fetch := func(ctx context.Context, off int64) (*Fetched, error) {
		body := io.MultiReader(bytes.NewReader(data[off:1<<20]), gated{gate}, bytes.NewReader(data[1<<20:]))
		return &Fetched{Body: io.NopCloser(body), Size: int64(len(data)), Source: "peer", Untrusted: true}, nil
	}
	start := time.Now()
	client, err := s.Fetch(context.Background(), d, fetch)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	buf := make([]byte, 4096)
	if _, err := client.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	waited := time.Since(start)
	if waited < hold-50*time.Millisecond || waited > 10*hold {
		t.Fatalf("client got its first untrusted byte after %s, want about the %s hold", waited, hold)
	}
	if !bytes.Equal(buf, data[:len(buf)]) {
		t.Fatal("wrong bytes")
	}
}

// Untrusted bytes that never verify are dropped after a bounded number of rounds.
func TestFetchGivesUpOnUntrustedSourcesThatNeverVerify(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	data, d := randomBlob(t, 1<<20)
	var calls atomic.Int32
	fetch := func(ctx context.Context, off int64) (*Fetched, error) {
		calls.Add(1)
		bad := append([]byte{}, data[off:]...)
		bad[len(bad)-1] ^= 1
		return &Fetched{Body: io.NopCloser(bytes.NewReader(bad)), Size: int64(len(data)), Source: "peer", Untrusted: true}, nil
	}
	r, err := s.Fetch(context.Background(), d, fetch)
	if err == nil {
		defer r.Close()
		_, err = io.ReadAll(io.NewSectionReader(r, 0, r.Size()))
	}
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("read: %v, want ErrDigestMismatch", err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, _, ok := s.Fetching(d); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the fetch did not end")
		}
	}
	if n := calls.Load(); n != maxVerifyRounds {
		t.Fatalf("%d rounds, want %d", n, maxVerifyRounds)
	}
	if _, err := s.Stat(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("corrupt blob kept: %v", err)
	}
}

// badPeerSource answers a fetch in three parts: a trusted source that breaks off after trustedPart
// bytes, a bad peer that sends the rest with a byte flipped (waiting at gate once it sent a
// megabyte), then a good peer. It records which sources were rejected.
type badPeerSource struct {
	t           *testing.T
	data        []byte
	trustedPart int64
	gate        chan struct{}
	calls       atomic.Int32
	mu          sync.Mutex
	rejected    []string
}

func newBadPeerSource(t *testing.T, data []byte, trustedPart int64) *badPeerSource {
	return &badPeerSource{t: t, data: data, trustedPart: trustedPart, gate: make(chan struct{})}
}

func (b *badPeerSource) rejections() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.rejected)
}

func (b *badPeerSource) fetch(ctx context.Context, off int64) (*Fetched, error) {
	t, data := b.t, b.data
	reject := func(name string) func(error) {
		return func(err error) {
			if !errors.Is(err, ErrDigestMismatch) {
				t.Errorf("reject %s: %v, want ErrDigestMismatch", name, err)
			}
			b.mu.Lock()
			b.rejected = append(b.rejected, name)
			b.mu.Unlock()
		}
	}
	switch b.calls.Add(1) {
	case 1: // trusted, breaks off
		return &Fetched{Body: io.NopCloser(io.MultiReader(bytes.NewReader(data[:b.trustedPart]), errReader{io.ErrUnexpectedEOF})), Size: int64(len(data)), Source: "upstream"}, nil
	case 2: // a bad peer: waits at the gate, then sends a corrupt rest
		if off != b.trustedPart {
			t.Errorf("bad peer asked from %d, want %d", off, b.trustedPart)
		}
		bad := append([]byte{}, data[off:]...)
		bad[len(bad)/2] ^= 0xff
		body := io.MultiReader(bytes.NewReader(bad[:1<<20]), gated{b.gate}, bytes.NewReader(bad[1<<20:]))
		return &Fetched{Body: io.NopCloser(body), Size: int64(len(data)), Source: "peer", Untrusted: true, Reject: reject("bad")}, nil
	default:
		if off != b.trustedPart {
			t.Errorf("after rejection, asked from %d, want %d", off, b.trustedPart)
		}
		return &Fetched{Body: io.NopCloser(bytes.NewReader(data[off:])), Size: int64(len(data)), Source: "peer", Untrusted: true, Reject: reject("good")}, nil
	}
}
