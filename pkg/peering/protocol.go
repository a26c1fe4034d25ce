package peering

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/ipfs/go-cid"
	kb "github.com/libp2p/go-libp2p-kbucket"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// The two stream protocols. Each exchange is one JSON request line, one JSON answer line, then, for
// blobs, the bytes from the requested offset to the end.
const (
	blobProtocol = ProtocolPrefix + "/blob/1.0.0"
	tagProtocol  = ProtocolPrefix + "/tag/1.0.0"
)

type blobRequest struct {
	Digest digest.Digest `json:"digest"`
	Offset int64         `json:"offset"`
	// Stat asks for the size only.
	Stat bool `json:"stat,omitempty"`
	// Through asks the node to fetch the blob from its own trusted sources if it has not got it, and
	// to stream it as it arrives. Repo names where it lives; Kind is always a blob.
	Through bool   `json:"through,omitempty"`
	Repo    string `json:"repo,omitempty"`
	// Direct says the asker can take the bytes on a direct connection (direct.go).
	Direct bool `json:"direct,omitempty"`
}

type blobAnswer struct {
	Size  int64  `json:"size"`
	Error string `json:"error,omitempty"`
	// Try, with a busy answer, names the peers the blob is being sent to, where a slot may be free.
	Try []peer.AddrInfo `json:"try,omitempty"`
	// Leader, with the answer to a fetch through that this node refused (errNotLeader), names a
	// node closer to the digest's key, which leads for it.
	Leader *peer.AddrInfo `json:"leader,omitempty"`
	// Direct offers the bytes on a direct connection; the asker then says where it wants them.
	Direct *directOffer `json:"direct,omitempty"`
}

type tagRequest struct {
	Repo string `json:"repo"`
	Tag  string `json:"tag"`
}

type tagAnswer struct {
	Descriptor ocispec.Descriptor `json:"descriptor"`
	Resolved   time.Time          `json:"resolved"`
	Error      string             `json:"error,omitempty"`
}

// maxRequestLine bounds what a peer can make a node read before it answers.
const maxRequestLine = 4096

func readLine(r io.Reader, v any) error {
	line, err := bufio.NewReader(io.LimitReader(r, maxRequestLine)).ReadBytes('\n')
	if err != nil {
		return err
	}
	return json.Unmarshal(line, v)
}

func writeLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// serve turns a stream handler that returns an error into a network.StreamHandler: a stream whose
// handler failed is reset, so that the peer sees a broken stream rather than a short answer, and one
// that was served is closed.
func (n *Node) serve(handle func(network.Stream) error) network.StreamHandler {
	return func(s network.Stream) {
		if err := handle(s); err != nil {
			n.log.Debug("peer stream failed", "protocol", s.Protocol(), "peer", s.Conn().RemotePeer(), "err", err)
			_ = s.Reset() // the stream is unusable either way
			return
		}
		if err := s.Close(); err != nil {
			n.log.Debug("close peer stream", "protocol", s.Protocol(), "peer", s.Conn().RemotePeer(), "err", err)
		}
	}
}

// refuse answers a request with an error line. The request failed either way: the error of the
// write only says the peer is gone too.
func refuse(s network.Stream, ans any) error {
	if err := writeLine(s, ans); err != nil {
		return fmt.Errorf("answer: %w", err)
	}
	return nil
}

// held is what a blob request holds while it is served (its upload slot, its send buffer, its
// reader), let go in reverse order. A refusal lets go before it is written: the asker may ask
// again the moment it reads it, and must find the slot its refused request held free.
type held []func()

func (h *held) add(release func()) { *h = append(*h, release) }

func (h *held) release() {
	for i := len(*h) - 1; i >= 0; i-- {
		(*h)[i]()
	}
	*h = nil
}

func (n *Node) serveBlob(s network.Stream) error {
	if err := s.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	var req blobRequest
	if err := readLine(s, &req); err != nil || req.Digest.Validate() != nil || req.Offset < 0 {
		return refuse(s, blobAnswer{Error: "bad request"})
	}
	if err := s.SetReadDeadline(time.Time{}); err != nil {
		return err
	}
	var hold held
	defer hold.release()
	refuseFreed := func(ans blobAnswer) error {
		hold.release()
		return refuse(s, ans)
	}
	if !req.Stat {
		// One of the blob's upload slots first: a node whose link already carries the blob to as
		// many peers as it should sends the asker elsewhere at once, before any work.
		release, receivers, ok := n.uploads.acquire(req.Digest, s.Conn().RemotePeer())
		if !ok {
			n.metrics.slotRefused.Inc()
			ans := blobAnswer{Error: fmt.Sprintf("%s: all %d upload slots of this blob in use", errBusy, n.opts.UploadSlots)}
			for _, r := range receivers {
				ans.Try = append(ans.Try, n.host.Peerstore().PeerInfo(r))
			}
			return refuse(s, ans)
		}
		hold.add(release)
		// The send buffer counts against the blob protocol's memory, the peer's share of it included:
		// past it, the peer is told to go elsewhere rather than the node growing without bound.
		if err := s.Scope().ReserveMemory(sendBufferSize, network.ReservationPriorityAlways); err != nil {
			return refuseFreed(blobAnswer{Error: errBusy + ": " + err.Error()})
		}
		hold.add(func() { s.Scope().ReleaseMemory(sendBufferSize) })
	}
	rd, release, err := n.blobReader(s.Conn().RemotePeer(), req)
	if err != nil {
		ans := blobAnswer{Error: err.Error()}
		if nl := (*notLeaderError)(nil); errors.As(err, &nl) {
			ans.Leader = &nl.leader
		}
		return refuseFreed(ans)
	}
	hold.add(release)
	hold.add(func() { _ = rd.Close() }) // a reader's Close only releases it
	if req.Offset > rd.Size() {
		return refuseFreed(blobAnswer{Error: fmt.Sprintf("offset %d past the end (%d)", req.Offset, rd.Size())})
	}
	// A resume from a byte this node has not received yet would wait on this node's own source,
	// which may be the asker itself (a node whose provider died asking a node that streams from it):
	// both would stall until the store gives up on them. The asker goes elsewhere at once instead.
	if got := rd.Received(); req.Offset > got {
		return refuseFreed(blobAnswer{Error: fmt.Sprintf("%s: offset %d, this node has %d bytes of it so far", errBehind, req.Offset, got)})
	}
	ans := blobAnswer{Size: rd.Size()}
	var ticket *directTicket
	if req.Direct && !req.Stat && rd.Size()-req.Offset >= directMinSize {
		var withdraw func()
		ans.Direct, ticket, withdraw = n.direct.offer(s)
		if withdraw != nil {
			defer withdraw()
		}
	}
	if err := writeLine(s, ans); err != nil || req.Stat {
		return err
	}
	if ticket != nil {
		conn, err := n.awaitDirect(s, ticket)
		if err != nil {
			return err
		}
		if conn != nil {
			sent, err := n.direct.send(conn, rd, req.Offset, n.opts.sendStall)
			n.metrics.servedBytes.Add(float64(sent))
			if err != nil {
				return fmt.Errorf("send %s on a direct connection: %w", req.Digest, err)
			}
			return nil
		}
	}
	// A blob still arriving is sent as it arrives; a reader that fails (the blob did not verify)
	// resets the stream, so that the peer never takes a short blob for a whole one.
	sent, err := sendRange(stallWriter{w: s, setDeadline: s.SetWriteDeadline, stall: n.opts.sendStall}, rd, req.Offset)
	n.metrics.servedBytes.Add(float64(sent))
	if err != nil {
		return fmt.Errorf("send %s: %w", req.Digest, err)
	}
	return nil
}

// awaitDirect reads on s where the asker of a direct offer wants the bytes: on the direct connection
// it took, which it returns, or on the stream (nil).
func (n *Node) awaitDirect(s network.Stream, t *directTicket) (net.Conn, error) {
	if err := s.SetReadDeadline(time.Now().Add(directClaimWait)); err != nil {
		return nil, err
	}
	var reply directReply
	if err := readLine(s, &reply); err != nil {
		return nil, fmt.Errorf("read the answer to a direct offer: %w", err)
	}
	if err := s.SetReadDeadline(time.Time{}); err != nil || !reply.Direct {
		return nil, err
	}
	// The asker saw the ticket taken, so the connection is on its way to t.conn, if not there yet.
	select {
	case c := <-t.conn:
		return c, nil
	case <-time.After(directClaimWait):
		return nil, errors.New("the asker took a direct connection that never arrived")
	}
}

// blobReader finds what peer p asked for: in the store, in flight, or, if asked and allowed, fetched
// now from this node's trusted sources. A fetch through holds a slot of the fetch-through limits
// until release: the whole time the blob is sent, which is the time the node fetches it for p.
func (n *Node) blobReader(p peer.ID, req blobRequest) (rd *content.Reader, release func(), err error) {
	ctx, cancel := context.WithTimeout(n.ctx, n.opts.fetchThroughWait)
	defer cancel()
	rd, err = n.opts.Store.Reader(ctx, req.Digest)
	if err == nil || !req.Through || req.Stat || n.opts.FetchThrough == nil {
		if err != nil {
			return nil, nil, errors.New(errNotHere)
		}
		return rd, func() {}, nil
	}
	repo, err := reference.ParseNamed(req.Repo)
	if err != nil {
		return nil, nil, fmt.Errorf("bad repository %q", req.Repo)
	}
	if closer, ok := n.closerNode(req.Digest); ok {
		// The asker's lookup stopped short of the leader. Fetching anyway would make this node a
		// second leader, and the registry serve the blob again, for every node whose lookup
		// stopped here: the asker is sent on to the closer node instead.
		n.metrics.throughRedirected.Inc()
		return nil, nil, &notLeaderError{leader: n.host.Peerstore().PeerInfo(closer)}
	}
	release, err = n.through.acquire(p, req.Digest)
	if err != nil {
		limit := limitNode
		if errors.Is(err, errFetchThroughPeer) {
			limit = limitPeer
		}
		n.metrics.throughRefused.WithLabelValues(limit).Inc()
		n.log.Debug("fetch through refused", "peer", p, "digest", req.Digest, "err", err)
		return nil, nil, fmt.Errorf("%s: %w", errBusy, err)
	}
	rd, err = n.opts.FetchThrough(ctx, source.Object{Repo: repo, Kind: source.KindBlob, Digest: req.Digest})
	if err != nil && errors.Is(err, context.DeadlineExceeded) && n.ctx.Err() == nil {
		if _, _, fetching := n.opts.Store.Fetching(req.Digest); fetching {
			// The upstream is slow, not failing: the peer asks again rather than fetch the blob
			// from the upstream too, which would only make it slower.
			release()
			return nil, nil, fmt.Errorf("%s: fetch through under way, no answer from the upstream in %s", errBusy, n.opts.fetchThroughWait)
		}
	}
	if err != nil {
		release()
		n.log.Debug("fetch for a peer failed", "digest", req.Digest, "repo", req.Repo, "err", err)
		return nil, nil, fmt.Errorf("fetch through: %w", err)
	}
	n.metrics.fetchThrough.Inc()
	// The fetch was started for the peer; its own reader verifies. Serve the peer's view of it.
	_ = rd.Close() // a reader's Close only releases it
	rd, err = n.opts.Store.Reader(ctx, req.Digest)
	if err != nil {
		release()
		return nil, nil, fmt.Errorf("fetch through: %w", err)
	}
	return rd, release, nil
}

const errNotHere = "not found"

// errNotLeader answers a fetch through asked of a node that knows a node closer to the digest's key.
const errNotLeader = "not the leader"

// notLeaderError is a refused fetch through, with the node the refusing one takes for the leader.
type notLeaderError struct {
	leader peer.AddrInfo
}

func (e *notLeaderError) Error() string {
	return fmt.Sprintf("%s: %s is closer to the digest", errNotLeader, e.leader.ID)
}

// errBehind answers a request from a byte the node has not received yet.
const errBehind = "behind"

// sendBuffers are what blobs go out through: large writes cross the stream muxer and the secure
// channel in few, large frames.
var sendBuffers = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// sendRange writes rd from off to its end to w through a send buffer, each byte as soon as rd has it.
func sendRange(w stallWriter, rd *content.Reader, off int64) (int64, error) {
	buf := sendBuffers.Get().(*[]byte)
	defer sendBuffers.Put(buf)
	return io.CopyBuffer(w, io.NewSectionReader(rd, off, rd.Size()-off), *buf)
}

func (n *Node) serveTag(s network.Stream) error {
	if err := s.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	var req tagRequest
	if err := readLine(s, &req); err != nil {
		return refuse(s, tagAnswer{Error: "bad request"})
	}
	repo, err := reference.ParseNamed(req.Repo)
	if err != nil || !reference.TagRegexp.MatchString(req.Tag) || n.opts.CachedTag == nil {
		return refuse(s, tagAnswer{Error: "bad request"})
	}
	desc, resolved, ok := n.opts.CachedTag(repo, req.Tag)
	if !ok {
		return refuse(s, tagAnswer{Error: errNotHere})
	}
	// An answer older than the TTL may be of a tag deleted or moved since: the asking node goes to
	// the next source rather than keep it alive. The age is by this node's clock, which set it.
	if age := time.Since(resolved); age > n.opts.TagTTL {
		return refuse(s, tagAnswer{Error: fmt.Sprintf("%s: resolved %s ago, over the %s limit", errNotHere, age.Round(time.Second), n.opts.TagTTL)})
	}
	return writeLine(s, tagAnswer{Descriptor: desc, Resolved: resolved})
}

// verifyLimit is the largest manifest a peer may send. Manifests are read whole and verified before
// they are handed on.
const verifyLimit = source.MaxManifestSize

// DefaultBusyWait is Source.BusyWait's default: with the search, well inside the 30 s that containerd
// gives a mirror to answer.
const DefaultBusyWait = 15 * time.Second

// Source is the peers of the cluster as a source.Source. Peers answer for digests; they answer tag
// lookups (from what they resolved themselves) only when the chain links this source with TagFallback.
type Source struct {
	node *Node
	// FindTimeout bounds the search for providers of one digest. Default 3s.
	FindTimeout time.Duration
	// MaxProviders bounds how many providers are tried for one digest in a round. Default 20.
	MaxProviders int
	// BusyWait bounds how long providers that are busy (their upload slots for the blob taken) are
	// asked again before the node goes to its next source. Default DefaultBusyWait.
	BusyWait time.Duration
	// TagsAllowed, if set, says for which registry hosts peers may answer tag lookups; otherwise the
	// chain's link decides alone.
	TagsAllowed func(host string) bool
}

// Source returns the node's peers as a source.
func (n *Node) Source() *Source {
	return &Source{node: n, FindTimeout: 3 * time.Second, MaxProviders: 20, BusyWait: DefaultBusyWait}
}

// Name labels the source in metrics and logs.
func (s *Source) Name() string { return "peer" }

// Resolve asks connected peers what they resolved the tag to, and takes the most recent answer.
func (s *Source) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	n := s.node
	if s.TagsAllowed != nil && !s.TagsAllowed(reference.Domain(repo)) {
		return ocispec.Descriptor{}, fmt.Errorf("peers may not answer tags of %s: %w", reference.Domain(repo), source.ErrNotFound)
	}
	peers := n.host.Network().Peers()
	if len(peers) > s.MaxProviders {
		peers = peers[:s.MaxProviders]
	}
	ctx, cancel := context.WithTimeout(ctx, s.FindTimeout)
	defer cancel()
	answers := make(chan tagAnswer, len(peers))
	for _, p := range peers {
		go func() {
			var ans tagAnswer
			st, err := n.host.NewStream(ctx, p, tagProtocol)
			if err != nil {
				ans.Error = err.Error()
				answers <- ans
				return
			}
			defer func() { _ = st.Close() }() // the answer is read; nothing is left to flush
			if err := st.SetDeadline(time.Now().Add(s.FindTimeout)); err != nil {
				_ = st.Reset()
				ans.Error = err.Error()
			} else if err := writeLine(st, tagRequest{Repo: repo.Name(), Tag: tag}); err != nil {
				ans.Error = err.Error()
			} else if err := readLine(st, &ans); err != nil {
				ans.Error = err.Error()
			}
			answers <- ans
		}()
	}
	var best *tagAnswer
	now := time.Now()
	for range peers {
		ans := <-answers
		if ans.Error != "" || ans.Descriptor.Digest.Validate() != nil || !fresh(now, ans.Resolved, n.opts.TagTTL) {
			continue
		}
		if best == nil || ans.Resolved.After(best.Resolved) {
			best = &ans
		}
	}
	if best == nil {
		return ocispec.Descriptor{}, fmt.Errorf("no peer knows %s:%s: %w", repo.Name(), tag, source.ErrNotFound)
	}
	// The answer keeps its age: the node that caches it hands it on no longer than the TTL after it
	// was resolved from a trusted source, so that a deleted tag does not go round the cluster.
	resolved := best.Resolved
	if resolved.After(now) {
		resolved = now
	}
	return source.WithResolved(best.Descriptor, resolved), nil
}

// maxClockSkew is how far apart two nodes' clocks may be for tag answers: their clocks are usually
// NTP-synced to well under a second; a node whose clock is further off has its answers taken for a
// little older or younger than they are, by at most this much.
const maxClockSkew = 30 * time.Second

// fresh says whether a peer's answer, resolved at resolved by its clock, may be used at now by ours:
// not older than ttl, and not from the future, either beyond what clock skew explains.
func fresh(now, resolved time.Time, ttl time.Duration) bool {
	age := now.Sub(resolved)
	return age <= ttl+maxClockSkew && age >= -maxClockSkew
}

// Stat asks the peers that announced the digest for its size.
func (s *Source) Stat(ctx context.Context, obj source.Object) (ocispec.Descriptor, error) {
	c, err := s.open(ctx, obj, 0, true)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	_ = c.Close() // a stat's stream carries nothing more
	return c.Descriptor, nil
}

// Open asks the peers that announced the digest, in turn. If none did, it asks the node that leads
// for the digest to fetch it through: when many nodes start the same cold pull at once, they all ask
// the same node, and the upstream serves the blob about once.
func (s *Source) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	return s.open(ctx, obj, offset, false)
}

func (s *Source) open(ctx context.Context, obj source.Object, offset int64, stat bool) (*source.Content, error) {
	n := s.node
	key, err := DigestCID(obj.Digest)
	if err != nil {
		return nil, fmt.Errorf("peers: %w", err)
	}
	start := time.Now()
	var (
		errs   []error
		found  bool
		leader peer.ID
		looked bool // the leader was looked up, once, when first needed
		led    bool // a peer leads (not this node)
	)
	wantLeader := !stat && obj.Kind == source.KindBlob
	// Rounds: every provider that answers busy (its upload slots for the blob are taken) may have
	// a slot free, or new providers may have announced, a moment later. Nodes that start the same
	// cold pull at once so line up behind each other rather than all on the first provider, or on
	// the registry.
	for round := 0; ; round++ {
		errs = errs[:0]
		busy := 0
		tried := map[peer.ID]bool{}
		providers := s.providers(ctx, key, obj.Digest)
		if len(providers) > 0 && !found {
			found = true
			n.metrics.observe(n.metrics.find, start, nil)
		}
		// The providers, then the leader; a busy one's hints go first: the nodes it is sending the
		// blob to, which provide it and may have a slot.
		queue := make([]peerRequest, 0, len(providers)+1)
		for _, info := range providers {
			if len(info.Addrs) > 0 {
				n.host.Peerstore().AddAddrs(info.ID, info.Addrs, time.Minute)
			}
			queue = append(queue, peerRequest{peer: info.ID, obj: obj, offset: offset, stat: stat})
		}
		askedLeader := false
		for hops := 0; hops < maxAsks; hops++ {
			if len(queue) == 0 && wantLeader && !askedLeader {
				// The leader last, and looked up only when no provider answered: the lookup is a
				// DHT query that a pull served by a provider need not wait for.
				askedLeader = true
				if !looked {
					leader, led = n.leader(ctx, obj.Digest)
					looked = true
				}
				if led && !n.bad.has(leader, obj.Digest) {
					queue = append(queue, peerRequest{peer: leader, obj: obj, offset: offset, through: true})
				}
			}
			if len(queue) == 0 {
				break
			}
			r := queue[0]
			queue = queue[1:]
			if tried[r.peer] {
				continue
			}
			tried[r.peer] = true
			c, err := s.fetch(ctx, r)
			if err == nil {
				return c, nil
			}
			errs = append(errs, err)
			if next, ok := s.redirected(r, err, key, tried); ok {
				// The asked node knows a closer one: that one leads, in later rounds too.
				leader = next.peer
				queue = append([]peerRequest{next}, queue...)
				continue
			}
			var b *busyError
			if !errors.As(err, &b) {
				if errors.Is(err, errPeerBusy) || timedOut(ctx, err) {
					busy++
				}
				continue
			}
			busy++
			var next []peerRequest
			for _, info := range b.try {
				if info.ID == n.host.ID() || tried[info.ID] || n.bad.has(info.ID, obj.Digest) {
					continue
				}
				if len(info.Addrs) > 0 {
					n.host.Peerstore().AddAddrs(info.ID, info.Addrs, time.Minute)
				}
				next = append(next, peerRequest{peer: info.ID, obj: obj, offset: offset, stat: stat})
			}
			queue = append(next, queue...)
		}
		if busy == 0 || ctx.Err() != nil || time.Since(start) > s.BusyWait {
			break
		}
		wait := roundWait(round)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	if !found {
		n.metrics.observe(n.metrics.find, start, errors.New("none"))
	}
	if err := ctx.Err(); err != nil {
		// Not a verdict on the object: the caller gave up.
		return nil, fmt.Errorf("peers: %w", err)
	}
	if len(errs) == 0 {
		n.log.Debug("no peer has it", "digest", obj.Digest, "kind", obj.Kind, "after", time.Since(start))
		return nil, fmt.Errorf("%s: %w: %w", obj.Digest, errNoPeerAsked, source.ErrNotFound)
	}
	n.log.Debug("peers failed", "digest", obj.Digest, "kind", obj.Kind, "err", errors.Join(errs...))
	// Peers that failed are not a verdict on the object: the next source decides.
	return nil, fmt.Errorf("%w: %w", source.ErrNotFound, errors.Join(errs...))
}

// redirected returns the fetch through to ask next when r's was refused by a node that names a node
// closer to the digest's key as its leader. Each step gets closer to the key, so a chain of them ends.
// A node named that is this one (a closer node takes this node for the leader) is not asked: this
// node then goes to its next source, as a leader does.
func (s *Source) redirected(r peerRequest, err error, key cid.Cid, tried map[peer.ID]bool) (peerRequest, bool) {
	n := s.node
	var nl *notLeaderError
	if !r.through || !errors.As(err, &nl) {
		return peerRequest{}, false
	}
	to := nl.leader
	if to.ID == n.host.ID() || tried[to.ID] || n.bad.has(to.ID, r.obj.Digest) || !kb.Closer(to.ID, r.peer, string(key.Hash())) {
		return peerRequest{}, false
	}
	if len(to.Addrs) > 0 {
		n.host.Peerstore().AddAddrs(to.ID, to.Addrs, time.Minute)
	}
	return peerRequest{peer: to.ID, obj: r.obj, offset: r.offset, through: true}, true
}

// errNoPeerAsked is why the peers could not serve an object that no peer announced and for which
// no other node leads (this node does, or the lookup found no node): nobody was asked.
var errNoPeerAsked = errors.New("no peer has it and no other node leads for it")

// timedOut says whether a request failed on a deadline of its own (the dial, identify, the answer)
// while the caller still waits. A peer that does not answer in time is loaded, like a busy one, not
// proof that nobody has the blob: it is asked again within BusyWait. When a whole cluster is slow
// at once (every node pulling on starved CPUs), its nodes then keep waiting on each other rather than
// all turn to the registry. A dead peer costs little: after a failed dial, libp2p's dial backoff
// refuses the next one at once.
func timedOut(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	var timeout interface{ Timeout() bool } // a stream's deadline (yamux's ErrTimeout)
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		errors.As(err, &timeout) && timeout.Timeout()
}

// roundWait is how long a node waits after round (from 0) of asking found every provider busy:
// 50 to 250 ms at first, twice as long each round after, up to maxRoundWait. Slots free within a
// transfer, so the first rounds come quickly; a node that waits longer is in a large cluster, where
// every round is a DHT search that lands on the same few nodes closest to the digest, and the
// searches of a thousand waiting nodes would load those nodes (and, in one process, the simulation)
// more than the waiting gains.
func roundWait(round int) time.Duration {
	base := time.Duration(50+rand.IntN(200)) * time.Millisecond
	return min(base<<min(round, 8), maxRoundWait-time.Duration(rand.IntN(int(maxRoundWait/4))))
}

// maxRoundWait bounds roundWait.
const maxRoundWait = 2 * time.Second

// maxAsks bounds the peers asked in one round, hints included.
const maxAsks = 64

// gatherProviders is how long the search for providers goes on after the first one answered: long
// enough for the others a lookup finds, so that the node picks among them, not the first one found.
const gatherProviders = 100 * time.Millisecond

// providers returns the providers of key that may be asked for d, in random order: nodes that ask
// at the same moment then spread over the providers rather than queue on the first one found.
func (s *Source) providers(ctx context.Context, key cid.Cid, d digest.Digest) []peer.AddrInfo {
	n := s.node
	fctx, cancel := context.WithTimeout(ctx, s.FindTimeout)
	defer cancel()
	var out []peer.AddrInfo
	var gather <-chan time.Time
	found := n.dht.FindProvidersAsync(fctx, key, s.MaxProviders)
	for {
		select {
		case info, ok := <-found:
			if !ok {
				rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
				return out
			}
			if info.ID == n.host.ID() || n.bad.has(info.ID, d) || slices.ContainsFunc(out, func(a peer.AddrInfo) bool { return a.ID == info.ID }) {
				continue
			}
			out = append(out, info)
			if gather == nil {
				gather = time.After(gatherProviders)
			}
		case <-gather:
			cancel() // the channel closes
		}
	}
}

// fetch opens one object on one peer. A manifest is read whole and verified here, so that a bad peer
// is skipped at once. A blob of any size streams, marked untrusted, and the store verifies it: the
// node can then pass the blob's first bytes on while the rest arrives. A small blob read whole would
// make every level of a cold pull's tree wait for a whole transfer before it serves the next, and the
// store already keeps a corrupt blob from every client and fetches it again from a good source.
func (s *Source) fetch(ctx context.Context, r peerRequest) (*source.Content, error) {
	n := s.node
	manifest := r.obj.Kind == source.KindManifest
	offset := r.offset
	if manifest {
		offset = 0
	}
	c, err := n.request(ctx, r.peer, blobRequest{Digest: r.obj.Digest, Offset: offset, Stat: r.stat, Through: r.through, Repo: r.obj.Repo.Name()})
	if err != nil {
		return nil, fmt.Errorf("fetch %s from peer %s: %w", r.obj.Digest, r.peer, err)
	}
	if r.stat {
		return c, nil
	}
	if !manifest {
		c.Untrusted = true
		c.Reject = func(err error) {
			reason := reasonDigestMismatch
			switch {
			case errors.Is(err, content.ErrTooSlow):
				reason = reasonSlow
			case errors.Is(err, source.ErrWrongSize):
				reason = reasonWrongSize
			}
			n.reject(r.peer, r.obj.Digest, reason, err)
		}
		return c, nil
	}
	if c.Descriptor.Size > verifyLimit {
		_ = c.Close() // refused unread
		n.reject(r.peer, r.obj.Digest, reasonOversized, nil)
		return nil, fmt.Errorf("fetch %s from peer %s: %d bytes, over the %d byte limit for manifests", r.obj.Digest, r.peer, c.Descriptor.Size, verifyLimit)
	}
	defer func() { _ = c.Close() }() // read whole below; nothing is left to flush
	// Read whole here, the manifest escapes the store's stall and rate checks: a deadline does their
	// work, at the store's minimum rate for its size, and never less than smallReadTime.
	if ps, ok := c.ReadCloser.(*peerStream); ok {
		wait := max(smallReadTime, time.Duration(c.Descriptor.Size/content.DefaultMinRate)*time.Second)
		if err := ps.s.SetReadDeadline(time.Now().Add(wait)); err != nil {
			return nil, fmt.Errorf("fetch %s from peer %s: %w", r.obj.Digest, r.peer, err)
		}
	}
	body, err := io.ReadAll(io.LimitReader(c, verifyLimit+1))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("%w: %w", content.ErrTooSlow, err)
		n.reject(r.peer, r.obj.Digest, reasonSlow, err)
	}
	if err != nil {
		return nil, fmt.Errorf("fetch %s from peer %s: %w", r.obj.Digest, r.peer, err)
	}
	if int64(len(body)) != c.Descriptor.Size || r.obj.Digest.Algorithm().FromBytes(body) != r.obj.Digest {
		n.reject(r.peer, r.obj.Digest, reasonDigestMismatch, nil)
		return nil, fmt.Errorf("fetch %s from peer %s: %w", r.obj.Digest, r.peer, content.ErrDigestMismatch)
	}
	return &source.Content{
		ReadCloser: io.NopCloser(bytes.NewReader(body[min(r.offset, int64(len(body))):])),
		Descriptor: c.Descriptor,
		Source:     s.Name(),
	}, nil
}

type peerRequest struct {
	peer    peer.ID
	obj     source.Object
	offset  int64
	stat    bool
	through bool
}

// request opens a blob stream on a peer and reads its answer line.
func (n *Node) request(ctx context.Context, p peer.ID, req blobRequest) (*source.Content, error) {
	octx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := n.host.NewStream(octx, p, blobProtocol)
	if err != nil {
		return nil, err
	}
	// A fetch through waits for the upstream's first answer; a plain one only for the peer's disk.
	wait := 10 * time.Second
	if req.Through {
		wait = n.opts.throughAnswerWait
	}
	if err := st.SetDeadline(time.Now().Add(wait)); err != nil {
		_ = st.Reset()
		return nil, err
	}
	req.Direct = !req.Stat && n.direct != nil && !n.direct.retry.has(p, "")
	if err := writeLine(st, req); err != nil {
		_ = st.Reset()
		return nil, err
	}
	br := bufio.NewReader(st)
	line, err := br.ReadSlice('\n')
	var ans blobAnswer
	if err == nil {
		err = json.Unmarshal(line, &ans)
	}
	if err == nil && ans.Error != "" {
		err = errors.New(ans.Error)
		switch {
		case strings.HasPrefix(ans.Error, errBusy):
			err = &busyError{msg: "peer busy: " + ans.Error, try: ans.Try}
		case req.Through && ans.Leader != nil && ans.Leader.ID.Validate() == nil:
			err = &notLeaderError{leader: *ans.Leader}
		}
	}
	if err == nil && ans.Size < 0 {
		err = fmt.Errorf("bad size %d", ans.Size)
	}
	if err != nil {
		_ = st.Reset()
		return nil, err
	}
	// Stalls from here on are the content store's to detect: it cuts off a source that goes quiet
	// by cancelling ctx, which resets the stream, so that a read blocked on the peer returns at once
	// rather than when the connection dies.
	if err := st.SetDeadline(time.Time{}); err != nil {
		_ = st.Reset()
		return nil, err
	}
	if ans.Direct != nil && req.Direct {
		if c, ok, err := n.takeDirect(ctx, st, req, ans); ok || err != nil {
			return c, err
		}
	}
	stop := context.AfterFunc(ctx, func() { _ = st.Reset() })
	return &source.Content{
		ReadCloser: &peerStream{Reader: br, s: st, stop: stop},
		Descriptor: ocispec.Descriptor{Digest: req.Digest, Size: ans.Size},
		Source:     "peer",
	}, nil
}

// takeDirect takes the direct connection a provider offered for the bytes of req. If it cannot, it
// says so on st, where the bytes then come, and returns ok false.
func (n *Node) takeDirect(ctx context.Context, st network.Stream, req blobRequest, ans blobAnswer) (_ *source.Content, ok bool, _ error) {
	p := st.Conn().RemotePeer()
	conn, err := n.direct.take(ctx, st, ans.Direct)
	if err != nil {
		if ctx.Err() != nil {
			_ = st.Reset()
			return nil, false, ctx.Err()
		}
		n.direct.retry.add(p, "")
		n.metrics.directFallback.Inc()
		n.log.Warn("direct connection to a peer failed: its blob bytes come over libp2p for a while",
			"peer", p, "for", directRetry, "err", err)
	}
	if werr := writeLine(st, directReply{Direct: err == nil}); werr != nil {
		if conn != nil {
			_ = conn.Close()
		}
		_ = st.Reset()
		return nil, false, fmt.Errorf("answer the direct offer: %w", werr)
	}
	if err != nil {
		return nil, false, nil
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.Close(); _ = st.Reset() })
	return &source.Content{
		ReadCloser: &directStream{conn: conn, s: st, left: ans.Size - req.Offset, stop: stop},
		Descriptor: ocispec.Descriptor{Digest: req.Digest, Size: ans.Size},
		Source:     "peer",
	}, true, nil
}

// smallReadTime is the least time a peer has to send a manifest, which is read whole: a peer that
// holds it longer is passed over.
const smallReadTime = 20 * time.Second

// peerStream is a blob arriving from a peer.
type peerStream struct {
	io.Reader
	s    network.Stream
	stop func() bool // stops following the context
	eof  bool
}

func (p *peerStream) Read(b []byte) (int, error) {
	n, err := p.Reader.Read(b)
	if err == io.EOF {
		p.eof = true
	}
	return n, err
}

// Close closes a stream read to its end, and resets one abandoned half way.
func (p *peerStream) Close() error {
	p.stop()
	if p.eof {
		return p.s.Close()
	}
	return p.s.Reset()
}

var _ source.Source = (*Source)(nil)
