package content

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// trickle sends one byte per interval until its context ends.
type trickle struct {
	ctx      context.Context
	data     []byte
	interval time.Duration
}

func (t *trickle) Read(p []byte) (int, error) {
	if len(t.data) == 0 {
		return 0, io.EOF
	}
	select {
	case <-time.After(t.interval):
	case <-t.ctx.Done():
		return 0, t.ctx.Err()
	}
	p[0], t.data = t.data[0], t.data[1:]
	return 1, nil
}

// A source that sends a byte now and then is dropped like one that stalls: the fetch resumes on
// the next source from the byte reached, and the slow source is told why.
func TestFetchDropsASourceThatTrickles(t *testing.T) {
	data, d := randomBlob(t, 64<<10)
	s := openStore(t, t.TempDir(), Options{MinRate: 4 << 10, RateWindow: 300 * time.Millisecond})
	var rejected atomic.Value
	var offsets []int64
	var mu sync.Mutex
	fetch := func(ctx context.Context, off int64) (*Fetched, error) {
		mu.Lock()
		offsets = append(offsets, off)
		first := len(offsets) == 1
		mu.Unlock()
		if first {
			// 1000 fast bytes, then one byte every 20 ms: 50 B/s.
			body := io.MultiReader(bytes.NewReader(data[:1000]), &trickle{ctx: ctx, data: data[1000:], interval: 20 * time.Millisecond})
			return &Fetched{Body: io.NopCloser(body), Size: int64(len(data)), Source: "slow",
				Reject: func(err error) { rejected.Store(err) }}, nil
		}
		return &Fetched{Body: io.NopCloser(bytes.NewReader(data[off:])), Size: int64(len(data)), Source: "fast"}, nil
	}
	start := time.Now()
	rd, err := s.Fetch(context.Background(), d, fetch)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(io.NewSectionReader(rd, 0, rd.Size()))
	rd.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes, %v", len(got), err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("took %s: the slow source held the blob", took)
	}
	if err, _ := rejected.Load().(error); !errors.Is(err, ErrTooSlow) {
		t.Errorf("the slow source was told %v, want ErrTooSlow", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(offsets) != 2 || offsets[1] < 1000 {
		t.Errorf("attempts at offsets %v, want a second one from the byte reached (>= 1000)", offsets)
	}
}

// silent is a source that never answers until its context ends.
func silent(ctx context.Context, _ int64) (*Fetched, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// A fetch that no client waits for any more is cancelled after the grace, and leaves nothing.
func TestFetchNobodyWaitsForIsAbandoned(t *testing.T) {
	root := t.TempDir()
	reg := prometheus.NewRegistry()
	s := openStore(t, root, Options{AbandonAfter: 200 * time.Millisecond, Registerer: reg})
	_, d := randomBlob(t, 100)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Fetch(ctx, d, silent); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Fetch from a silent source: %v, want the client's deadline", err)
	}
	if _, _, ok := s.Fetching(d); !ok {
		t.Fatal("the fetch ended with its client; it should outlive it by the grace")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, _, ok := s.Fetching(d); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the fetch nobody waits for is still under way")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := testutil.ToFloat64(s.metrics.abandoned); n != 1 {
		t.Errorf("imagemesh_content_fetches_abandoned_total = %v, want 1", n)
	}
	left, _ := os.ReadDir(filepath.Join(root, "ingest"))
	if len(left) != 0 {
		t.Errorf("ingest/ holds %d files after the fetch was abandoned", len(left))
	}
}

// A client that comes back within the grace joins the fetch, which then completes.
func TestFetchJoinedWithinTheGraceGoesOn(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{AbandonAfter: 300 * time.Millisecond})
	data, d := randomBlob(t, 100)
	release := make(chan struct{})
	fetch := func(ctx context.Context, off int64) (*Fetched, error) {
		select {
		case <-release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return &Fetched{Body: io.NopCloser(bytes.NewReader(data[off:])), Size: int64(len(data)), Source: "test"}, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Fetch(ctx, d, fetch); err == nil {
		t.Fatal("Fetch returned before the source answered")
	}
	time.Sleep(150 * time.Millisecond) // within the grace
	done := make(chan error, 1)
	go func() {
		rd, err := s.Fetch(context.Background(), d, fetch)
		if err == nil {
			_, err = io.ReadAll(io.NewSectionReader(rd, 0, rd.Size()))
			rd.Close()
		}
		done <- err
	}()
	time.Sleep(400 * time.Millisecond) // past the first grace: only the second client keeps it
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("the client that came back: %v", err)
	}
	// The last byte goes out once the blob verified; the commit follows.
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := s.Stat(d); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("blob not kept: %v", err)
		}
	}
}

// A fetch whose size a trusted source told counts against the size limit from its first byte: the
// cache makes room for it before it arrives, so that the blobs and ingest/ together stay within
// the limit. An untrusted size reserves nothing.
func TestFetchReservesItsTrustedSize(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{MaxBytes: 10_000, HighWatermark: 0.9, LowWatermark: 0.5, Registerer: prometheus.NewRegistry()})
	for i := 0; i < 4; i++ {
		b, d := randomBlob(t, 2000)
		if err := s.Put(d, b); err != nil {
			t.Fatal(err)
		}
	}
	for _, trusted := range []bool{true, false} {
		held := s.Size()
		data, d := randomBlob(t, 3000)
		gate := make(chan struct{})
		fetch := func(ctx context.Context, off int64) (*Fetched, error) {
			body := io.MultiReader(bytes.NewReader(data[off:1000]), gated{gate}, bytes.NewReader(data[1000:]))
			return &Fetched{Body: io.NopCloser(body), Size: int64(len(data)), Source: "test", SizeTrusted: trusted}, nil
		}
		rd, err := s.Fetch(context.Background(), d, fetch)
		if err != nil {
			t.Fatal(err)
		}
		reserved := testutil.ToFloat64(s.metrics.reserved)
		switch {
		case trusted && (reserved != 3000 || s.Size()+3000 > 5000):
			t.Errorf("trusted size: %v bytes reserved, %d held; want 3000 reserved and at most 2000 held", reserved, s.Size())
		case !trusted && (reserved != 0 || s.Size() != held):
			t.Errorf("untrusted size: %v bytes reserved, %d held; want nothing reserved or evicted", reserved, s.Size())
		}
		close(gate)
		if _, err := io.ReadAll(io.NewSectionReader(rd, 0, rd.Size())); err != nil {
			t.Fatal(err)
		}
		rd.Close()
		for deadline := time.Now().Add(2 * time.Second); testutil.ToFloat64(s.metrics.reserved) != 0; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%v bytes still reserved after the fetch", testutil.ToFloat64(s.metrics.reserved))
			}
		}
		// The reservation ends before the commit counts the blob: the next round's held is measured
		// once the blob is in.
		for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if _, err := s.Stat(d); err == nil {
				break
			} else if time.Now().After(deadline) {
				t.Fatalf("blob not committed after the fetch: %v", err)
			}
		}
	}
}
