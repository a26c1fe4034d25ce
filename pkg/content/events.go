package content

import (
	"context"
	"sync"

	"github.com/opencontainers/go-digest"
)

// EventKind says what happened to a blob.
type EventKind uint8

// What a Store reports about its blobs.
const (
	// EventFetching: a fetch has a source answering. From then on the blob can be read in flight
	// (Store.Reader), so peering announces it and nodes that start the same pull join this one. Not
	// before: a node that announced a blob it has no source for yet would have peers wait on it, and
	// two such nodes on each other.
	EventFetching EventKind = iota + 1
	// EventCommitted: the blob verified and is held.
	EventCommitted
	// EventRemoved: the blob was evicted or deleted.
	EventRemoved
)

func (k EventKind) String() string {
	switch k {
	case EventFetching:
		return "fetching"
	case EventCommitted:
		return "committed"
	case EventRemoved:
		return "removed"
	}
	return "unknown"
}

// Event is one change to what the store holds or fetches.
type Event struct {
	Kind   EventKind
	Digest digest.Digest
}

// eventBuffer is how many events a subscriber may fall behind by before it loses some. A commit
// storm of a few hundred layers fits; past that, events are hints only (see Subscribe).
const eventBuffer = 1024

// events fans the store's events out to its subscribers. Sending never blocks the store: a
// subscriber that falls behind loses events, and the loss is counted.
type events struct {
	mu      sync.Mutex
	subs    map[chan Event]struct{}
	dropped func()
}

// Subscribe returns the store's events from now on, until ctx is done; then the channel is closed.
// Events are hints, not a log: a subscriber that falls more than a thousand events behind loses
// some (imagemesh_content_events_dropped_total counts them), so what must not be missed is
// recovered from Walk. Peering, for one, announces on each event and reprovides by walking.
func (s *Store) Subscribe(ctx context.Context) <-chan Event {
	ch := make(chan Event, eventBuffer)
	s.events.mu.Lock()
	if s.events.subs == nil {
		s.events.subs = map[chan Event]struct{}{}
	}
	s.events.subs[ch] = struct{}{}
	s.events.mu.Unlock()
	go func() {
		<-ctx.Done()
		s.events.mu.Lock()
		delete(s.events.subs, ch)
		close(ch)
		s.events.mu.Unlock()
	}()
	return ch
}

// publish sends an event to every subscriber that has room for it. It must not be called with the
// store's lock held: it takes the subscribers' own.
func (e *events) publish(kind EventKind, ds ...digest.Digest) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for ch := range e.subs {
		for _, d := range ds {
			select {
			case ch <- Event{Kind: kind, Digest: d}:
			default:
				e.dropped()
			}
		}
	}
}
