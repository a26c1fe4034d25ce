package peering

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// A host that holds the key but floods a node with blob streams gets the streams over its share
// refused, while another node is still served.
func TestStreamFloodIsRefusedWhileOthersAreServed(t *testing.T) {
	psk := testKey(t)
	// Upload slots would refuse the flood first: the resource manager's limits are what is tested.
	a := testNodeWith(t, psk, func(o *Options) { o.UploadSlots = 1000 })
	good := testNode(t, psk, a.Addrs()[0])
	blob := make([]byte, 8<<20) // far over a stream's window: a stream that is not read stays open
	rand.Read(blob)
	d := digest.FromBytes(blob)
	if err := a.opts.Store.Put(d, blob); err != nil {
		t.Fatal(err)
	}

	// The flooder is a plain libp2p host with the key and no limits of its own.
	flooder, err := libp2p.New(securityOption(psk, EncryptionTLS), libp2p.NoTransports, libp2p.Transport(tcp.NewTCPTransport),
		libp2p.ListenAddrs(), libp2p.DisableRelay(), libp2p.ResourceManager(&network.NullResourceManager{}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { flooder.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := flooder.Connect(ctx, peer.AddrInfo{ID: a.ID(), Addrs: a.host.Addrs()}); err != nil {
		t.Fatal(err)
	}
	const streams = 200
	var open []network.Stream
	refused := 0
	for range streams {
		st, err := flooder.NewStream(ctx, a.ID(), blobProtocol)
		if err != nil {
			refused++
			continue
		}
		if err := st.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		var ans blobAnswer
		line, err := func() ([]byte, error) {
			if err := writeLine(st, blobRequest{Digest: d}); err != nil {
				return nil, err
			}
			return bufio.NewReader(st).ReadSlice('\n')
		}()
		if err == nil {
			err = json.Unmarshal(line, &ans)
		}
		if err != nil || ans.Error != "" || ans.Size != int64(len(blob)) {
			refused++
			_ = st.Reset()
			continue
		}
		open = append(open, st) // served, and held open: the node is stuck sending
	}
	t.Cleanup(func() {
		for _, st := range open {
			_ = st.Reset()
		}
	})
	if len(open) == 0 || len(open) > limitBlobStreamsPerPeer || refused < streams-limitBlobStreamsPerPeer {
		t.Fatalf("flood of %d blob streams: %d served and held, %d refused; want at most %d served", streams, len(open), refused, limitBlobStreamsPerPeer)
	}
	if got := testutil.ToFloat64(a.metrics.limitRefused.WithLabelValues("protocol_peer")); got == 0 {
		t.Errorf("no protocol_peer refusal counted")
	}

	// A well-behaved node is served in full meanwhile.
	c, err := good.request(ctx, a.ID(), blobRequest{Digest: d})
	if err != nil {
		t.Fatalf("a well-behaved peer was refused during the flood: %v", err)
	}
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || digest.FromBytes(got) != d {
		t.Fatalf("a well-behaved peer got %d bytes (%v), want the blob", len(got), err)
	}
}

// A peer may have a node fetch through at most MaxFetchThroughPerPeer blobs at once, and all peers
// together MaxFetchThrough; past that, the peer is refused at once and goes to its next source, while
// the fetches under way go on. Peers that ask for a blob being fetched through share its fetch.
func TestFetchThroughIsCapped(t *testing.T) {
	psk := testKey(t)
	const perPeer, total = 8, 12
	gate := make(chan struct{})
	var started atomic.Int32
	var mu sync.Mutex
	blobs := map[digest.Digest][]byte{}
	var leader *Node
	leader = testNodeWith(t, psk, func(o *Options) {
		o.MaxFetchThroughPerPeer, o.MaxFetchThrough = perPeer, total
		o.UploadSlots = 100 // the fetch-through caps, not the slots, are what is tested
		o.FetchThrough = func(ctx context.Context, obj source.Object) (*content.Reader, error) {
			started.Add(1)
			select {
			case <-gate:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			mu.Lock()
			b := blobs[obj.Digest]
			mu.Unlock()
			if err := leader.opts.Store.Put(obj.Digest, b); err != nil {
				return nil, err
			}
			return leader.opts.Store.Reader(ctx, obj.Digest)
		}
	})
	b := testNode(t, psk, leader.Addrs()[0])
	c := testNode(t, psk, leader.Addrs()[0])
	waitRouting(t, leader, b, c)
	repo, _ := reference.ParseNamed("example.test/team/app")

	// Blobs that b and c both see the leader lead, so that their peer source asks it to fetch through.
	newBlob := func() digest.Digest {
		t.Helper()
		for range 1000 {
			data := make([]byte, 64<<10)
			rand.Read(data)
			d := digest.FromBytes(data)
			lb, okb := b.leader(context.Background(), d)
			lc, okc := c.leader(context.Background(), d)
			if okb && okc && lb == leader.ID() && lc == leader.ID() {
				mu.Lock()
				blobs[d] = data
				mu.Unlock()
				return d
			}
		}
		t.Fatal("no digest led by the leader")
		return ""
	}
	type result struct {
		d    digest.Digest
		body []byte
		err  error
	}
	results := make(chan result, 32)
	ask := func(n *Node, d digest.Digest) {
		go func() {
			src := n.Source()
			src.FindTimeout = 500 * time.Millisecond
			src.BusyWait = 0 // a busy answer ends the search at once
			got, err := src.Open(context.Background(), source.Object{Repo: repo, Kind: source.KindBlob, Digest: d}, 0)
			if err != nil {
				results <- result{d: d, err: err}
				return
			}
			body, err := io.ReadAll(got)
			got.Close()
			results <- result{d: d, body: body, err: err}
		}()
	}
	waitStarted := func(want int32) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for started.Load() < want {
			if time.Now().After(deadline) {
				t.Fatalf("%d fetches through started, want %d", started.Load(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	expectRefusals := func(n int, what string) {
		t.Helper()
		for range n {
			select {
			case r := <-results:
				if r.err == nil || !errors.Is(r.err, source.ErrNotFound) || !strings.Contains(r.err.Error(), errBusy) {
					t.Fatalf("%s: a fetch past the cap ended with %v, want a busy answer as not found here", what, r.err)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("%s: a fetch past the cap was not refused at once", what)
			}
		}
	}

	// b asks for 10 blobs: 8 are fetched, 2 refused.
	var asked []digest.Digest
	for range perPeer + 2 {
		d := newBlob()
		asked = append(asked, d)
		ask(b, d)
	}
	waitStarted(perPeer)
	expectRefusals(2, "over the peer's cap")
	// c has a cap of its own; the node's is 12 blobs: 4 more are fetched, 2 refused.
	for range total - perPeer + 2 {
		d := newBlob()
		asked = append(asked, d)
		ask(c, d)
	}
	waitStarted(total)
	expectRefusals(2, "over the node's cap")
	// A blob already being fetched through is no new work: c shares b's fetch, node cap or not.
	ask(c, asked[0])
	waitStarted(total + 1)
	if got := started.Load(); got != total+1 {
		t.Fatalf("%d fetches through started, want %d", got, total+1)
	}
	if peerRefused, nodeRefused := testutil.ToFloat64(leader.metrics.throughRefused.WithLabelValues(limitPeer)),
		testutil.ToFloat64(leader.metrics.throughRefused.WithLabelValues(limitNode)); peerRefused != 2 || nodeRefused != 2 {
		t.Fatalf("refusals counted: %v by the peer limit, %v by the node limit; want 2 and 2", peerRefused, nodeRefused)
	}

	// The fetches under way finish, whole.
	close(gate)
	for range total + 1 {
		select {
		case r := <-results:
			mu.Lock()
			want := blobs[r.d]
			mu.Unlock()
			if r.err != nil || digest.FromBytes(r.body) != r.d || len(r.body) != len(want) {
				t.Fatalf("fetch through of %s: %d bytes, %v", r.d, len(r.body), r.err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("fetches through did not finish")
		}
	}
	// Their slots are free again.
	leader.through.mu.Lock()
	left := len(leader.through.digests) + len(leader.through.peers)
	leader.through.mu.Unlock()
	if left != 0 {
		t.Fatalf("fetch-through slots still held after every transfer ended: %d", left)
	}
}

func TestFetchThroughLimitSharesADigest(t *testing.T) {
	l := newFetchThroughLimit(2, 3)
	p1, p2, p3 := peer.ID("p1"), peer.ID("p2"), peer.ID("p3")
	d := func(i int) digest.Digest { return digest.FromString(fmt.Sprint(i)) }
	mustAcquire := func(p peer.ID, dg digest.Digest) func() {
		t.Helper()
		release, err := l.acquire(p, dg)
		if err != nil {
			t.Fatalf("acquire(%s, %s): %v", p, dg, err)
		}
		return release
	}
	r1 := mustAcquire(p1, d(1))
	mustAcquire(p1, d(2))
	if _, err := l.acquire(p1, d(3)); !errors.Is(err, errFetchThroughPeer) {
		t.Fatalf("third digest of a peer with a cap of 2: %v", err)
	}
	again := mustAcquire(p1, d(1)) // the same digest again: no new work
	mustAcquire(p2, d(3))
	if _, err := l.acquire(p3, d(4)); !errors.Is(err, errFetchThroughNode) {
		t.Fatalf("fourth digest on a node with a cap of 3: %v", err)
	}
	mustAcquire(p3, d(1)) // shared
	r1()
	r1() // a release twice counts once
	if _, err := l.acquire(p1, d(5)); !errors.Is(err, errFetchThroughPeer) {
		t.Fatalf("p1 still fetches d1 through its second request: %v", err)
	}
	again()
	if _, err := l.acquire(p1, d(5)); !errors.Is(err, errFetchThroughNode) {
		t.Fatalf("d1 is still fetched for p3, so the node is full: %v", err)
	}
}
