package peering

import (
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

// The limits of the libp2p host, sized for an agent whose container may use 512 MiB (the chart's
// limit): libp2p gets at most half of it. A peer holds the cluster key, but a node must still not let
// one peer, buggy or taken over, take everything: every peer gets a bounded share of connections,
// streams and memory, and the blob protocol, whose every stream holds a send buffer, is bounded on its
// own. The numbers are in the README's peering section, with their reasons.
const (
	// limitMemory bounds what libp2p reserves on the node: yamux receive windows (256 KiB a stream,
	// growing while a transfer is fast) and the send buffers of blob streams.
	limitMemory = 256 << 20
	// limitConns bounds connections: every node of a large cluster, with room above the connection
	// manager's high water mark, which trims back to the low one.
	limitConns, limitConnsInOut = 512, 384
	connLowWater, connHighWater = 192, 320
	// limitPeerStreams bounds the streams one peer may have open with the node, all protocols together.
	limitPeerStreams = 128
	// limitPeerMemory bounds what one peer's connections reserve: its streams' windows.
	limitPeerMemory = 64 << 20
	// limitBlobStreamsPerPeer bounds the blobs one peer may be sent at once: containerd pulls three
	// layers of an image at a time, so 32 is about ten images pulled from this one peer at once.
	limitBlobStreamsPerPeer = 32
	// limitBlobStreams bounds the blobs the node sends at once, to all peers: each holds a send buffer.
	limitBlobStreams = 128
	// limitTagStreamsPerPeer and limitTagStreams bound tag lookups, one short exchange each.
	limitTagStreamsPerPeer, limitTagStreams = 16, 128
)

// sendBufferSize is the buffer a blob goes out through; a stream reserves it from the resource
// manager before it takes one, so that the memory of blob streams is accounted for.
const sendBufferSize = 1 << 20

// Defaults of Options.MaxFetchThroughPerPeer and Options.MaxFetchThrough.
const (
	DefaultMaxFetchThroughPerPeer = 8
	DefaultMaxFetchThrough        = 64
)

// limits are the resource manager's: libp2p's defaults for a node with limitMemory, with the scopes
// the agent uses set to its own numbers.
func limits() rcmgr.ConcreteLimitConfig {
	base := rcmgr.DefaultLimits
	lim := func(v int) rcmgr.LimitVal { return rcmgr.LimitVal(v) }
	mem := func(v int64) rcmgr.LimitVal64 { return rcmgr.LimitVal64(v) }
	partial := rcmgr.PartialLimitConfig{
		System: rcmgr.ResourceLimits{
			Conns: lim(limitConns), ConnsInbound: lim(limitConnsInOut), ConnsOutbound: lim(limitConnsInOut),
			Streams: lim(8192), StreamsInbound: lim(4096), StreamsOutbound: lim(4096),
			FD: lim(limitConns), Memory: mem(limitMemory),
		},
		// Connections and streams before the peer or the protocol is known: more than one peer's
		// share, so that one peer cannot fill them alone.
		Transient: rcmgr.ResourceLimits{
			Conns: lim(128), ConnsInbound: lim(64), ConnsOutbound: lim(64),
			Streams: lim(4 * limitPeerStreams), StreamsInbound: lim(4 * limitPeerStreams), StreamsOutbound: lim(4 * limitPeerStreams),
			FD: lim(64), Memory: mem(32 << 20),
		},
		PeerDefault: rcmgr.ResourceLimits{
			Conns: lim(8), ConnsInbound: lim(8), ConnsOutbound: lim(8), FD: lim(8),
			Streams: lim(2 * limitPeerStreams), StreamsInbound: lim(limitPeerStreams), StreamsOutbound: lim(limitPeerStreams),
			Memory: mem(limitPeerMemory),
		},
		Protocol: map[protocol.ID]rcmgr.ResourceLimits{
			blobProtocol: {
				Streams: lim(4 * limitBlobStreams), StreamsInbound: lim(limitBlobStreams), StreamsOutbound: lim(2 * limitBlobStreams),
				Memory: mem(limitBlobStreams * sendBufferSize),
			},
			tagProtocol: {
				Streams: lim(2 * limitTagStreams), StreamsInbound: lim(limitTagStreams), StreamsOutbound: lim(limitTagStreams),
				Memory: mem(1 << 20),
			},
		},
		ProtocolPeer: map[protocol.ID]rcmgr.ResourceLimits{
			blobProtocol: {
				Streams: lim(2 * limitBlobStreamsPerPeer), StreamsInbound: lim(limitBlobStreamsPerPeer), StreamsOutbound: lim(limitBlobStreamsPerPeer),
				Memory: mem(limitBlobStreamsPerPeer * sendBufferSize),
			},
			tagProtocol: {
				Streams: lim(2 * limitTagStreamsPerPeer), StreamsInbound: lim(limitTagStreamsPerPeer), StreamsOutbound: lim(limitTagStreamsPerPeer),
				Memory: mem(1 << 20),
			},
		},
	}
	return partial.Build(base.Scale(limitMemory, limitConns))
}

// newResourceManager is libp2p's resource manager with the agent's limits. Its refusals count in
// imagemesh_peering_limit_refusals_total, and with a registerer, libp2p's own libp2p_rcmgr_* metrics
// are exported too.
func newResourceManager(reg prometheus.Registerer, refusals *prometheus.CounterVec) (network.ResourceManager, error) {
	opts := []rcmgr.Option{rcmgr.WithMetrics(refusalReporter{refusals})}
	if reg != nil {
		rcmgr.MustRegisterWith(reg)
	} else {
		opts = append(opts, rcmgr.WithMetricsDisabled())
	}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits()), opts...)
	if err != nil {
		return nil, fmt.Errorf("peering: resource manager: %w", err)
	}
	return rm, nil
}

func newConnManager() (*connmgr.BasicConnMgr, error) {
	cm, err := connmgr.NewConnManager(connLowWater, connHighWater)
	if err != nil {
		return nil, fmt.Errorf("peering: connection manager: %w", err)
	}
	return cm, nil
}

// The values of the limit label of imagemesh_peering_limit_refusals_total: which of the resource
// manager's limits refused something.
var limitRefusals = []string{"connection", "stream", "peer", "protocol", "protocol_peer", "service", "memory"}

// refusalReporter counts the resource manager's refusals; what it allowed is not counted.
type refusalReporter struct{ c *prometheus.CounterVec }

func (r refusalReporter) AllowConn(network.Direction, bool)      {}
func (r refusalReporter) BlockConn(network.Direction, bool)      { r.c.WithLabelValues("connection").Inc() }
func (r refusalReporter) AllowStream(peer.ID, network.Direction) {}
func (r refusalReporter) BlockStream(peer.ID, network.Direction) { r.c.WithLabelValues("stream").Inc() }
func (r refusalReporter) AllowPeer(peer.ID)                      {}
func (r refusalReporter) BlockPeer(peer.ID)                      { r.c.WithLabelValues("peer").Inc() }
func (r refusalReporter) AllowProtocol(protocol.ID)              {}
func (r refusalReporter) BlockProtocol(protocol.ID)              { r.c.WithLabelValues("protocol").Inc() }
func (r refusalReporter) BlockProtocolPeer(protocol.ID, peer.ID) {
	r.c.WithLabelValues("protocol_peer").Inc()
}
func (r refusalReporter) AllowService(string)              {}
func (r refusalReporter) BlockService(string)              { r.c.WithLabelValues("service").Inc() }
func (r refusalReporter) BlockServicePeer(string, peer.ID) { r.c.WithLabelValues("service").Inc() }
func (r refusalReporter) AllowMemory(int)                  {}
func (r refusalReporter) BlockMemory(int)                  { r.c.WithLabelValues("memory").Inc() }

var _ rcmgr.MetricsReporter = refusalReporter{}

// errBusy is the answer to a request past a limit: the asking node goes to its next source.
const errBusy = "busy"

// errPeerBusy is a peer's answer that it is busy: its upload slots of the blob are taken, or a limit
// was reached. It is no verdict on the peer: it may have room a moment later.
var errPeerBusy = errors.New("peer busy")

// busyError is a busy answer with the peers the busy node is sending the blob to: the asker tries
// them next, without a search. Nodes that ask at once so walk down the line of nodes that receive
// the blob to its end, a stream's round trip a step.
type busyError struct {
	msg string
	try []peer.AddrInfo
}

func (e *busyError) Error() string        { return e.msg }
func (e *busyError) Is(target error) bool { return target == errPeerBusy }

// fetchThroughLimit bounds the fetches a node makes from its own sources for its peers: per peer and
// in all. The work is a digest being fetched: peers that ask for a digest already being fetched
// through share its slot, so that a cluster's cold pull (every node asks the leader for the same
// layers) takes one slot a layer, not one a node.
type fetchThroughLimit struct {
	perPeer, total int
	mu             sync.Mutex
	digests        map[digest.Digest]map[peer.ID]int // requests in flight, by digest and peer
	peers          map[peer.ID]int                   // digests in flight, by peer
}

// errFetchThroughPeer and errFetchThroughNode say which limit refused a fetch through.
var (
	errFetchThroughPeer = errors.New("too many fetches through for this peer")
	errFetchThroughNode = errors.New("too many fetches through on this node")
)

func newFetchThroughLimit(perPeer, total int) *fetchThroughLimit {
	return &fetchThroughLimit{perPeer: perPeer, total: total, digests: map[digest.Digest]map[peer.ID]int{}, peers: map[peer.ID]int{}}
}

// acquire takes a slot for p's request of d, and returns its release; past a limit, it says which.
func (l *fetchThroughLimit) acquire(p peer.ID, d digest.Digest) (func(), error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	byPeer, fetching := l.digests[d]
	switch {
	case byPeer[p] > 0: // p asks again for what it is being fetched: no new work
	case l.peers[p] >= l.perPeer:
		return nil, errFetchThroughPeer
	case !fetching && len(l.digests) >= l.total:
		return nil, errFetchThroughNode
	}
	if !fetching {
		byPeer = map[peer.ID]int{}
		l.digests[d] = byPeer
	}
	if byPeer[p] == 0 {
		l.peers[p]++
	}
	byPeer[p]++
	var once sync.Once
	return func() { once.Do(func() { l.release(p, d) }) }, nil
}

func (l *fetchThroughLimit) release(p peer.ID, d digest.Digest) {
	l.mu.Lock()
	defer l.mu.Unlock()
	byPeer := l.digests[d]
	if byPeer[p]--; byPeer[p] > 0 {
		return
	}
	delete(byPeer, p)
	if len(byPeer) == 0 {
		delete(l.digests, d)
	}
	if l.peers[p]--; l.peers[p] <= 0 {
		delete(l.peers, p)
	}
}

// DefaultUploadSlots is how many peers a node sends one blob to at once. A node's link is shared by
// the peers it serves: with one slot, nodes that start the same cold pull at once line up in a chain
// in which every node streams from the one before it at the whole rate of its link, and the chain's
// depth costs only the latency of each hop; with k slots, each of k peers gets a k-th of it.
const DefaultUploadSlots = 1

// uploadSlots bounds the peers a node sends one blob to at once, so that a cold pull spreads as a
// tree over every node's link rather than as a star over one node's. A peer refused a slot is told
// the node is busy and looks for another provider: every node that receives a blob provides it from
// its first bytes on.
type uploadSlots struct {
	slots int
	mu    sync.Mutex
	used  map[digest.Digest][]peer.ID // the peers each blob is being sent to
	total int                         // streams being sent, all blobs together
	peak  int                         // the most streams one blob had at once, since the node started
}

func newUploadSlots(slots int) *uploadSlots {
	return &uploadSlots{slots: slots, used: map[digest.Digest][]peer.ID{}}
}

// acquire takes a slot of d for p and returns its release. When every slot of d is in use, it
// returns false and the peers d is being sent to: they are receiving it, so they provide it, and
// the asker may find a slot free with them.
func (u *uploadSlots) acquire(d digest.Digest, p peer.ID) (func(), []peer.ID, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.used[d]) >= u.slots {
		return nil, slices.Clone(u.used[d]), false
	}
	u.used[d] = append(u.used[d], p)
	u.total++
	u.peak = max(u.peak, len(u.used[d]))
	var once sync.Once
	return func() {
		once.Do(func() {
			u.mu.Lock()
			defer u.mu.Unlock()
			receivers := u.used[d]
			if i := slices.Index(receivers, p); i >= 0 {
				receivers = slices.Delete(receivers, i, i+1)
			}
			if len(receivers) == 0 {
				delete(u.used, d)
			} else {
				u.used[d] = receivers
			}
			u.total--
		})
	}, nil, true
}

// inUse is the number of blob streams being sent to peers now.
func (u *uploadSlots) inUse() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.total
}

// maxPerBlob is the most peers one blob was sent to at once since the node started.
func (u *uploadSlots) maxPerBlob() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.peak
}

// stallWriter writes blob bytes to a peer, each write within stall of its start: a peer that stops
// reading is cut off then, which frees the upload slot it holds (with one slot a blob, a member that
// asked and never read would otherwise keep a blob from every other peer of the node for as long as
// it kept the connection open). A peer that reads, however slowly, is never cut off: the deadline
// moves with every write, and one write is at most a send buffer.
type stallWriter struct {
	w           io.Writer
	setDeadline func(time.Time) error // the write deadline of what w writes to
	stall       time.Duration
}

func (w stallWriter) Write(p []byte) (int, error) {
	if err := w.setDeadline(time.Now().Add(w.stall)); err != nil {
		return 0, err
	}
	return w.w.Write(p)
}

// stallReaderFrom is a stallWriter for a copy from a file: it hands the file on to the connection's
// ReadFrom (sendfile, for TCP) a send buffer's worth at a time, each part within the stall.
type stallReaderFrom struct{ stallWriter }

func (w stallReaderFrom) ReadFrom(r io.Reader) (int64, error) {
	// The connection sends a file with sendfile only when it gets it as the file or as an
	// *io.LimitedReader of it, not as one LimitedReader in another.
	lr, ok := r.(*io.LimitedReader)
	if !ok {
		lr = &io.LimitedReader{R: r, N: math.MaxInt64}
	}
	var n int64
	for lr.N > 0 {
		if err := w.setDeadline(time.Now().Add(w.stall)); err != nil {
			return n, err
		}
		part := &io.LimitedReader{R: lr.R, N: min(lr.N, sendBufferSize)}
		m, err := io.Copy(w.w, part)
		n += m
		lr.N -= m
		if err != nil || part.N > 0 { // part.N > 0: the reader ended before the part did
			return n, err
		}
	}
	return n, nil
}
