package mirror

import (
	"net"
	"net/http"
	"strings"
	"sync"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/opencontainers/go-digest"
)

// Defaults of Options.MaxSourceRequests and Options.MaxSourceRequestsPerClient. A node's containerd
// pulls a few layers per image at once (max_concurrent_downloads is 3) for a handful of images; a
// client past these is flooding.
const (
	DefaultMaxSourceRequests          = 256
	DefaultMaxSourceRequestsPerClient = 64
)

// sourceLimit bounds the requests that wait on a source at once, overall and per client address.
// Every such request holds a goroutine, a connection, and often a fetch and a file in ingest/; a client
// that asks for digests nobody has, from a registry that never answers, would otherwise hold them
// without bound. Requests the node answers from its own store are not counted.
type sourceLimit struct {
	max, perClient int

	mu       sync.Mutex
	total    int
	byClient map[string]int
}

func newSourceLimit(total, perClient int) *sourceLimit {
	return &sourceLimit{max: total, perClient: perClient, byClient: map[string]int{}}
}

// acquire takes a slot for client, or reports that none is free.
func (l *sourceLimit) acquire(client string) (release func(), ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.total >= l.max || l.byClient[client] >= l.perClient {
		return nil, false
	}
	l.total++
	l.byClient[client]++
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.total--
		if l.byClient[client]--; l.byClient[client] == 0 {
			delete(l.byClient, client)
		}
	}, true
}

// clientAddr is the address a request came from, without its port.
func clientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// local says whether the request is answered from the node's store alone: a blob, or a manifest by
// digest, that the store holds.
func (m *Mirror) local(req *request) bool {
	if !strings.Contains(req.ref, ":") {
		return false // a tag: resolving it may ask a source
	}
	d, err := digest.Parse(req.ref)
	if err != nil {
		return true // answered with an error at once
	}
	_, err = m.store.Stat(d)
	return err == nil
}

// errTooManyRequests answers a request past the limits: at once, so that the client (containerd)
// goes to its next host, or comes back.
var errTooManyRequests = errcode.ErrorCodeTooManyRequests.WithMessage(
	"too many requests waiting on a source: try again, or pull from the registry")
