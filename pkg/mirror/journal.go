package mirror

import (
	"net/http"
	"sync"
	"time"
)

// Pull is one pull API request for a manifest or a blob, as an operator reads it on the agent's
// status page.
type Pull struct {
	Time     time.Time
	Method   string // GET or HEAD
	Kind     string // manifest or blob
	Repo     string // registry host and path
	Ref      string // tag or digest
	Status   int
	Source   string // local, peer, upstream, ...; none when nothing was served
	Bytes    int64
	Duration time.Duration
	// Error is the message of the error answered, if any.
	Error string
}

// Failed says whether the request failed on the agent's side or a source's: a 5xx, or a 429 for
// lack of capacity. Content that does not exist (404) is the client's question, not a failure.
func (p Pull) Failed() bool { return p.Status >= 500 || p.Status == http.StatusTooManyRequests }

// journalSize is how many pulls, and how many failures, the journal keeps; journalField bounds
// each string it keeps. Both bound what a client can make the agent hold: 2 × 64 entries of at most
// 4 × 256 bytes.
const (
	journalSize  = 64
	journalField = 256
)

// journal keeps the last pulls and the last failures, and the bytes served by source since start.
type journal struct {
	mu       sync.Mutex
	pulls    []Pull // ring
	next     int
	failures []Pull // ring
	nextFail int
	served   map[string]int64 // bytes by source; sources are a closed set
}

func (j *journal) record(p Pull) {
	p.Repo, p.Ref, p.Error = clip(p.Repo), clip(p.Ref), clip(p.Error)
	j.mu.Lock()
	defer j.mu.Unlock()
	j.pulls, j.next = push(j.pulls, j.next, p)
	if p.Failed() {
		j.failures, j.nextFail = push(j.failures, j.nextFail, p)
	}
	if p.Bytes > 0 && p.Status < 400 { // not the bodies of errors
		if j.served == nil {
			j.served = map[string]int64{}
		}
		j.served[p.Source] += p.Bytes
	}
}

func push(ring []Pull, next int, p Pull) ([]Pull, int) {
	if len(ring) < journalSize {
		return append(ring, p), 0
	}
	ring[next] = p
	return ring, (next + 1) % journalSize
}

// newestFirst returns a copy of a ring, newest entry first.
func newestFirst(ring []Pull, next int) []Pull {
	out := make([]Pull, 0, len(ring))
	if len(ring) < journalSize {
		for i := len(ring) - 1; i >= 0; i-- {
			out = append(out, ring[i])
		}
		return out
	}
	for i := 0; i < journalSize; i++ {
		out = append(out, ring[(next-1-i+2*journalSize)%journalSize])
	}
	return out
}

func clip(s string) string {
	if len(s) <= journalField {
		return s
	}
	return s[:journalField] + "…"
}

// Journal is what the mirror recorded since it started.
type Journal struct {
	// Pulls are the last requests for manifests and blobs, newest first.
	Pulls []Pull
	// Failures are the last requests that failed (see Pull.Failed), newest first.
	Failures []Pull
	// Served is the content bytes sent to clients by the source they came from; "local" is the cache.
	Served map[string]int64
}

// Journal returns the last pulls and failures and the bytes served by source.
func (m *Mirror) Journal() Journal {
	j := &m.journal
	j.mu.Lock()
	defer j.mu.Unlock()
	served := make(map[string]int64, len(j.served))
	for k, v := range j.served {
		served[k] = v
	}
	return Journal{Pulls: newestFirst(j.pulls, j.next), Failures: newestFirst(j.failures, j.nextFail), Served: served}
}
