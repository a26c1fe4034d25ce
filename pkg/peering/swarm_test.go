package peering

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/reference"
	kb "github.com/libp2p/go-libp2p-kbucket"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/memsource"
)

// slowRegistry is a trusted source that counts its blob opens and sends at a fixed rate, so that a
// cold blob takes long enough for every node to ask for it while it is arriving.
type slowRegistry struct {
	*memsource.Source
	rate  int // bytes per second
	opens atomic.Int32
}

func (r *slowRegistry) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	c, err := r.Source.Open(ctx, obj, offset)
	if err != nil {
		return nil, err
	}
	r.opens.Add(1)
	c.ReadCloser = &paced{ReadCloser: c.ReadCloser, rate: r.rate}
	return c, nil
}

type paced struct {
	io.ReadCloser
	rate int
}

func (p *paced) Read(b []byte) (int, error) {
	const chunk = 64 << 10
	if len(b) > chunk {
		b = b[:chunk]
	}
	n, err := p.ReadCloser.Read(b)
	time.Sleep(time.Duration(n) * time.Second / time.Duration(p.rate))
	return n, err
}

// Nodes that start the same cold pull at the same moment get the blob from the registry once: one
// node, the leader all of them agree on, fetches it, and the others line up behind each other, each
// streaming from a node that is itself still receiving it, no node sending it to more peers at once
// than its upload slots.
func TestColdPullSpreadsWithinUploadSlots(t *testing.T) {
	const nodes, size = 6, 4 << 20
	psk := testKey(t)
	repo, _ := reference.ParseNamed("example.test/team/app")
	data := make([]byte, size)
	rand.Read(data)
	reg := &slowRegistry{Source: memsource.New("upstream"), rate: 4 << 20}
	desc := reg.AddBlob(repo, data)
	obj := source.Object{Repo: repo, Kind: source.KindBlob, Digest: desc.Digest, Size: size}

	var all []*Node
	for range nodes {
		var n *Node
		n = testNodeWith(t, psk, func(o *Options) {
			o.FetchThrough = func(ctx context.Context, obj source.Object) (*content.Reader, error) {
				return n.opts.Store.Fetch(ctx, obj.Digest, simFetchFrom(reg, obj))
			}
		}, firstAddrs(all)...)
		all = append(all, n)
	}
	waitRouting(t, all...)

	var wg sync.WaitGroup
	start := time.Now()
	errs := make([]error, nodes)
	got := make([]digest.Digest, nodes)
	for i, n := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			chain := source.NewChain(source.Link{Source: n.Source()}, source.Link{Source: reg})
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			rd, err := n.opts.Store.Fetch(ctx, obj.Digest, simFetchFrom(chain, obj))
			if err != nil {
				errs[i] = err
				return
			}
			defer rd.Close()
			h := digest.Canonical.Digester()
			if _, err := rd.WriteTo(h.Hash()); err != nil {
				errs[i] = err
				return
			}
			got[i] = h.Digest()
			t.Logf("node %d done after %s", i, time.Since(start).Round(time.Millisecond))
		}()
	}
	wg.Wait()
	for i := range all {
		if errs[i] != nil || got[i] != obj.Digest {
			t.Errorf("node %d: %v, got %s", i, errs[i], got[i])
		}
	}
	if n := reg.opens.Load(); n != 1 {
		t.Errorf("the registry was asked for the blob %d times, want once", n)
	}
	for i, n := range all {
		t.Logf("node %d: sent %.0f bytes to peers, at most %d at once; refused %.0f asks for want of a slot",
			i, testutil.ToFloat64(n.metrics.servedBytes), n.uploads.maxPerBlob(), testutil.ToFloat64(n.metrics.slotRefused))
		if peak := n.uploads.maxPerBlob(); peak > n.opts.UploadSlots {
			t.Errorf("node %d sent the blob to %d peers at once, over its %d upload slots", i, peak, n.opts.UploadSlots)
		}
	}
}

// firstAddrs is the first address of each node, to bootstrap a new one from.
func firstAddrs(nodes []*Node) []string {
	var out []string
	for _, n := range nodes {
		out = append(out, n.Addrs()[0])
	}
	return out
}

// A node whose upload slots of a blob are taken answers busy with the peers it is sending the blob
// to, and their addresses: the asker tries them next, without a search.
func TestBusyProviderNamesItsReceivers(t *testing.T) {
	psk := testKey(t)
	a := testNode(t, psk)
	b := testNode(t, psk, a.Addrs()[0])
	c := testNode(t, psk, a.Addrs()[0])
	waitRouting(t, a, b, c)
	data := make([]byte, 16<<20) // far over a stream's window: a stream that is not read stays open
	rand.Read(data)
	d := digest.FromBytes(data)
	if err := a.opts.Store.Put(d, data); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	held, err := b.request(ctx, a.ID(), blobRequest{Digest: d})
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close() // b holds a's only slot of d, reading nothing

	_, err = c.request(ctx, a.ID(), blobRequest{Digest: d})
	var busy *busyError
	if !errors.As(err, &busy) || !errors.Is(err, errPeerBusy) {
		t.Fatalf("asking a node whose only slot is taken: %v, want a busy answer", err)
	}
	if len(busy.try) != 1 || busy.try[0].ID != b.ID() || len(busy.try[0].Addrs) == 0 {
		t.Fatalf("the busy answer names %v, want node b (%s) and its addresses", busy.try, b.ID())
	}
}

// A leader whose upstream is slow, or whose answer comes later than the asker waits, is loaded, not
// failing: the node that asked it asks again within its busy wait, and gets the blob the leader
// fetched (through, or as a provider by then), rather than go to the registry itself. When a whole cluster pulls on starved CPUs, its
// nodes so keep waiting on each other instead of all turning to the registry at once.
func TestSlowLeaderIsAskedAgain(t *testing.T) {
	for _, tc := range []struct {
		name          string
		leader, asker func(*Options)
	}{
		{"upstream slower than the leader waits", func(o *Options) { o.fetchThroughWait = 300 * time.Millisecond }, nil},
		{"leader answers later than the asker waits", nil, func(o *Options) { o.throughAnswerWait = 300 * time.Millisecond }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			psk := testKey(t)
			data := make([]byte, 256<<10)
			rand.Read(data)
			gate := make(chan struct{})
			var opens atomic.Int32
			var leader *Node
			leader = testNodeWith(t, psk, func(o *Options) {
				if tc.leader != nil {
					tc.leader(o)
				}
				o.FetchThrough = func(ctx context.Context, obj source.Object) (*content.Reader, error) {
					return leader.opts.Store.Fetch(ctx, obj.Digest, func(_ context.Context, offset int64) (*content.Fetched, error) {
						opens.Add(1)
						<-gate // the upstream answers late
						return &content.Fetched{Body: io.NopCloser(bytes.NewReader(data[offset:])), Size: int64(len(data)),
							Source: "registry", SizeTrusted: true}, nil
					})
				}
			})
			asker := testNodeWith(t, psk, tc.asker, leader.Addrs()[0])
			waitRouting(t, leader, asker)
			repo, _ := reference.ParseNamed("example.test/team/app")
			var d digest.Digest
			for range 1000 {
				rand.Read(data)
				d = digest.FromBytes(data)
				if l, ok := asker.leader(context.Background(), d); ok && l == leader.ID() {
					break
				}
			}
			time.AfterFunc(1500*time.Millisecond, func() { close(gate) })

			src := asker.Source()
			src.FindTimeout = 200 * time.Millisecond
			src.BusyWait = 20 * time.Second
			got, err := src.Open(context.Background(), source.Object{Repo: repo, Kind: source.KindBlob, Digest: d}, 0)
			if err != nil {
				t.Fatalf("asking a slow leader: %v, want the blob once its upstream answered", err)
			}
			body, err := io.ReadAll(got)
			got.Close()
			if err != nil || !bytes.Equal(body, data) {
				t.Fatalf("blob from the slow leader: %d bytes of %d, %v", len(body), len(data), err)
			}
			if opens.Load() != 1 {
				t.Fatalf("the upstream was opened %d times, want once", opens.Load())
			}
		})
	}
}

// A node asked to fetch a blob through that knows a node closer to the digest's key does not fetch
// it: it names that node, the leader, and the asker goes on to it. Askers whose leader lookups
// stopped short of the leader, at different nodes, so still have the registry serve the blob once.
func TestFetchThroughGoesOnToTheLeader(t *testing.T) {
	psk := testKey(t)
	repo, _ := reference.ParseNamed("example.test/team/app")
	reg := &slowRegistry{Source: memsource.New("upstream"), rate: 64 << 20}
	through := map[peer.ID]*atomic.Int32{}
	var all []*Node
	for range 3 {
		var n *Node
		var count atomic.Int32
		n = testNodeWith(t, psk, func(o *Options) {
			o.FetchThrough = func(ctx context.Context, obj source.Object) (*content.Reader, error) {
				count.Add(1)
				return n.opts.Store.Fetch(ctx, obj.Digest, simFetchFrom(reg, obj))
			}
		}, firstAddrs(all)...)
		through[n.ID()] = &count
		all = append(all, n)
	}
	waitRouting(t, all...)

	// A blob whose key is closest to one node (the leader), then to a second (the one asked), and
	// farthest from the third (the asker).
	data := make([]byte, 256<<10)
	var d digest.Digest
	var order []peer.ID
	ids := []peer.ID{all[0].ID(), all[1].ID(), all[2].ID()}
	for {
		rand.Read(data)
		d = digest.FromBytes(data)
		key, _ := DigestCID(d) // a sha256 digest always has a CID
		order = kb.SortClosestPeers(ids, kb.ConvertKey(string(key.Hash())))
		if order[0] != ids[2] { // any order will do; the nodes' roles follow from it
			break
		}
	}
	desc := reg.AddBlob(repo, data)
	obj := source.Object{Repo: repo, Kind: source.KindBlob, Digest: desc.Digest, Size: desc.Size}
	node := func(id peer.ID) *Node { return all[slices.Index(ids, id)] }
	leader, asked, asker := node(order[0]), node(order[1]), node(order[2])
	key, _ := DigestCID(d)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src := asker.Source()
	r := peerRequest{peer: asked.ID(), obj: obj, through: true}
	_, err := src.fetch(ctx, r)
	var nl *notLeaderError
	if !errors.As(err, &nl) || nl.leader.ID != leader.ID() || len(nl.leader.Addrs) == 0 {
		t.Fatalf("asking a node that knows a closer one to fetch through: %v, want it to name the leader %s with its addresses", err, leader.ID())
	}
	if got := testutil.ToFloat64(asked.metrics.throughRedirected); got != 1 {
		t.Errorf("the node asked counted %v redirects, want 1", got)
	}
	if _, ok := src.redirected(peerRequest{peer: leader.ID(), obj: obj, through: true}, &notLeaderError{leader: nl.leader}, key, map[peer.ID]bool{}); ok {
		t.Error("a redirect to the node asked itself was followed")
	}
	if _, ok := src.redirected(peerRequest{peer: leader.ID(), obj: obj, through: true}, &notLeaderError{leader: peer.AddrInfo{ID: asked.ID()}}, key, map[peer.ID]bool{}); ok {
		t.Error("a redirect to a node farther from the key than the node asked was followed")
	}
	next, ok := src.redirected(r, err, key, map[peer.ID]bool{asked.ID(): true})
	if !ok || next.peer != leader.ID() || !next.through {
		t.Fatalf("the redirect was not followed to the leader: %+v, %v", next, ok)
	}

	// Through the peer source as the mirror asks it: the blob, from the leader's one fetch.
	got, err := src.Open(ctx, obj, 0)
	if err != nil {
		t.Fatalf("open the blob on the peers: %v", err)
	}
	rd, err := asker.opts.Store.Fetch(ctx, d, func(context.Context, int64) (*content.Fetched, error) {
		return &content.Fetched{Body: got, Size: got.Descriptor.Size, Source: got.Source, Untrusted: true, SizeTrusted: true}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	_, err = rd.WriteTo(&body)
	rd.Close()
	if err != nil || !bytes.Equal(body.Bytes(), data) {
		t.Fatalf("blob from the leader: %d bytes of %d, %v", body.Len(), len(data), err)
	}
	for _, n := range all {
		want := int32(0)
		if n == leader {
			want = 1
		}
		if got := through[n.ID()].Load(); got != want {
			t.Errorf("node %s fetched through %d times, want %d", n.ID(), got, want)
		}
	}
	if n := reg.opens.Load(); n != 1 {
		t.Errorf("the registry was asked for the blob %d times, want once", n)
	}
}
