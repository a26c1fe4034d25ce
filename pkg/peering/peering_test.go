package peering

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	mh "github.com/multiformats/go-multihash"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/sourcetest"
)

func testNode(t *testing.T, psk pnet.PSK, bootstrap ...string) *Node {
	t.Helper()
	return testNodeWith(t, psk, nil, bootstrap...)
}

// testNodeWith is testNode with options of the test's own, set by with.
func testNodeWith(t *testing.T, psk pnet.PSK, with func(*Options), bootstrap ...string) *Node {
	t.Helper()
	store, err := content.Open(t.TempDir(), content.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	// Every test node offers direct connections, so that every large blob of the tests goes over one.
	opts := Options{
		ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, DirectListen: "127.0.0.1:0", PSK: psk, DataDir: t.TempDir(),
		Store: store, Bootstrap: bootstrap,
	}
	if with != nil {
		with(&opts)
	}
	n, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func testKey(t *testing.T) pnet.PSK {
	t.Helper()
	k := make(pnet.PSK, 32)
	rand.Read(k)
	return k
}

// waitRouting waits until every node has every other in its DHT routing table.
func waitRouting(t *testing.T, nodes ...*Node) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, n := range nodes {
		for n.dht.RoutingTable().Size() < len(nodes)-1 {
			if time.Now().After(deadline) {
				t.Fatalf("node %s knows %d of %d peers", n.ID(), n.dht.RoutingTable().Size(), len(nodes)-1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func TestDigestCIDIsTheRawBlockCID(t *testing.T) {
	data := []byte("hello, layer")
	c, err := DigestCID(digest.FromBytes(data))
	if err != nil {
		t.Fatal(err)
	}
	// The CID IPFS gives the same bytes as one raw block.
	want, _ := cid.V1Builder{Codec: cid.Raw, MhType: mh.SHA2_256}.Sum(data)
	if !c.Equals(want) {
		t.Fatalf("DigestCID = %s, want %s", c, want)
	}
	for _, bad := range []digest.Digest{"", "sha256:abc", "md5:d41d8cd98f00b204e9800998ecf8427e"} {
		if _, err := DigestCID(bad); err == nil {
			t.Errorf("DigestCID(%q) succeeded", bad)
		}
	}
}

func TestLoadPSK(t *testing.T) {
	dir := t.TempDir()
	key, err := EncodePSK()
	if err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "swarm.key")
	if err := os.WriteFile(good, key, 0o600); err != nil {
		t.Fatal(err)
	}
	if psk, err := LoadPSK(good); err != nil || len(psk) != 32 {
		t.Fatalf("LoadPSK(EncodePSK()) = %d bytes, %v", len(psk), err)
	}
	for name, body := range map[string]string{
		"garbage":   "not a key\n",
		"short":     "/key/swarm/psk/1.0.0/\n/base16/\nabcd\n",
		"bad hex":   "/key/swarm/psk/1.0.0/\n/base16/\n" + strings.Repeat("zz", 32) + "\n",
		"bad codec": "/key/swarm/psk/1.0.0/\n/rot13/\n" + strings.Repeat("ab", 32) + "\n",
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadPSK(p); err == nil {
			t.Errorf("%s key accepted", name)
		}
	}
	if _, err := LoadPSK(filepath.Join(dir, "missing")); err == nil {
		t.Error("missing key file accepted")
	}
	if _, err := New(context.Background(), Options{DataDir: dir, Store: &content.Store{}}); err == nil {
		t.Error("node without a key and not open started")
	}
}

// Every node of a cluster names the same leader for a digest, so that a cold pull started everywhere
// at once is fetched from upstream by one node.
func TestNodesAgreeOnTheLeader(t *testing.T) {
	psk := testKey(t)
	first := testNode(t, psk)
	nodes := []*Node{first}
	for i := 0; i < 4; i++ {
		nodes = append(nodes, testNode(t, psk, first.Addrs()[0]))
	}
	// Everyone meets everyone, as in a small cluster after discovery.
	for _, a := range nodes {
		for _, b := range nodes {
			if a != b {
				if err := a.Connect(context.Background(), b.Addrs()[0]); err != nil {
					t.Fatalf("connect: %v", err)
				}
			}
		}
	}
	waitRouting(t, nodes...)
	leaders := map[peer.ID]int{}
	for i := 0; i < 50; i++ {
		d := digest.FromString(strings.Repeat("x", i))
		var agreed peer.ID
		for j, n := range nodes {
			l, ok := n.leader(context.Background(), d)
			if !ok {
				l = n.ID()
			}
			if j == 0 {
				agreed = l
			} else if l != agreed {
				t.Fatalf("digest %d: node %d names leader %s, node 0 names %s", i, j, l, agreed)
			}
		}
		leaders[agreed]++
	}
	if len(leaders) < 2 {
		t.Fatalf("50 digests all led by one node: %v", leaders)
	}
}

// The peers as a source meet the contract every source meets: node 1 holds a manifest and a blob,
// node 2 reads them through its peers.
func TestPeerSourceContract(t *testing.T) {
	psk := testKey(t)
	n1 := testNode(t, psk)
	n2 := testNode(t, psk, n1.Addrs()[0])
	waitRouting(t, n1, n2)
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
	blob := make([]byte, 3<<20)
	rand.Read(blob)
	for _, b := range [][]byte{manifest, blob} {
		d := digest.FromBytes(b)
		if err := n1.opts.Store.Put(d, b); err != nil {
			t.Fatal(err)
		}
		c, _ := DigestCID(d)
		if err := n1.dht.Provide(context.Background(), c, true); err != nil {
			t.Fatal(err)
		}
	}
	repo, _ := reference.ParseNamed("example.test/team/app")
	sourcetest.Run(t, sourcetest.Fixture{
		Source: n2.Source(), Repo: repo, Tag: "v1", Manifest: manifest,
		MediaType: "application/vnd.oci.image.manifest.v1+json", Blob: blob, ResolvesTags: false,
	})
}

// A peer that holds a rotten copy of a manifest is found out at once. A blob, small or large, comes
// marked untrusted for the store to verify as it streams, so that the node can pass its first bytes
// on before the last arrive; a peer the store rejects is not asked again.
func TestPeerSourceVerifiesManifestsAndMarksBlobsUntrusted(t *testing.T) {
	psk := testKey(t)
	n1 := testNode(t, psk)
	n2 := testNode(t, psk, n1.Addrs()[0])
	waitRouting(t, n1, n2)
	repo, _ := reference.ParseNamed("example.test/team/app")
	for _, tc := range []struct {
		kind source.Kind
		size int
	}{{source.KindManifest, 64 << 10}, {source.KindBlob, 64 << 10}, {source.KindBlob, verifyLimit + 1}} {
		_, d := holdBlob(t, n1, tc.size)
		f, _, err := n1.opts.Store.Open(d)
		if err != nil {
			t.Fatal(err)
		}
		path := f.Name()
		f.Close()
		rot, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := rot.WriteAt([]byte("rot"), 100); err != nil {
			t.Fatal(err)
		}
		rot.Close()

		obj := source.Object{Repo: repo, Kind: tc.kind, Digest: d}
		got, err := n2.Source().Open(context.Background(), obj, 0)
		if tc.kind == source.KindManifest {
			if !errors.Is(err, source.ErrNotFound) || !n2.bad.has(n1.ID(), d) {
				t.Fatalf("rotten manifest: %v, bad peer recorded: %v", err, n2.bad.has(n1.ID(), d))
			}
			continue
		}
		if err != nil {
			t.Fatalf("%d byte blob: %v", tc.size, err)
		}
		b, _ := io.ReadAll(got)
		got.Close()
		if !got.Untrusted || got.Reject == nil || digest.FromBytes(b) == d {
			t.Fatalf("%d byte blob from a peer: untrusted %v, reject set %v", tc.size, got.Untrusted, got.Reject != nil)
		}
		got.Reject(content.ErrDigestMismatch)
		if _, err := n2.Source().Open(context.Background(), obj, 0); !errors.Is(err, source.ErrNotFound) {
			t.Fatalf("a rejected peer was asked again: %v", err)
		}
	}
}

// Every reason of the bad-peer counter is exported at zero before any event, so that a dashboard or
// an alert sees the series from the start; an event counts under its reason.
func TestBadPeerEventsExportedFromTheStart(t *testing.T) {
	store, err := content.Open(t.TempDir(), content.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	reg := prometheus.NewRegistry()
	n, err := New(context.Background(), Options{
		ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, PSK: testKey(t), DataDir: t.TempDir(), Store: store, Registerer: reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	events := func() map[string]float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]float64{}
		for _, mf := range mfs {
			if mf.GetName() != "imagemesh_peering_bad_peer_events_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "reason" {
						got[l.GetValue()] = m.GetCounter().GetValue()
					}
				}
			}
		}
		return got
	}
	if got := events(); !maps.Equal(got, map[string]float64{reasonOversized: 0, reasonDigestMismatch: 0, reasonSlow: 0, reasonWrongSize: 0}) {
		t.Fatalf("bad-peer events before any: %v, want every reason at 0", got)
	}
	n.reject(n.ID(), digest.FromString("rotten"), reasonDigestMismatch, nil)
	if got := events(); got[reasonDigestMismatch] != 1 || got[reasonOversized] != 0 {
		t.Fatalf("bad-peer events after one digest mismatch: %v", got)
	}
}

// A read from a peer that has stopped sending returns as soon as the reader's context ends: the
// content store cuts a stalled or trickling source off by cancelling it, and must not then wait for
// the connection to die (yamux's keepalive takes 40 s) before it resumes elsewhere.
func TestPeerStreamFollowsItsContext(t *testing.T) {
	psk := testKey(t)
	n1 := testNode(t, psk)
	n2 := testNode(t, psk, n1.Addrs()[0])
	waitRouting(t, n1, n2)
	data := make([]byte, 2*verifyLimit)
	rand.Read(data)
	d := digest.FromBytes(data)
	// Node 1 is fetching the blob itself, and its source stops half way.
	gate := make(chan struct{})
	t.Cleanup(func() { close(gate) })
	fetchAndProvide(t, n1, d, len(data), func(off int64) io.Reader {
		return io.MultiReader(bytes.NewReader(data[off:verifyLimit+1]), gateReader(gate), bytes.NewReader(data[verifyLimit+1:]))
	})

	repo, _ := reference.ParseNamed("example.test/team/app")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got, err := n2.Source().Open(ctx, source.Object{Repo: repo, Kind: source.KindBlob, Digest: d}, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, got)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("the read ended before the peer stopped sending: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the read of a blob cut off half way ended without an error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the read from a peer that stopped sending went on after its context ended")
	}
}

// fetchAndProvide has n fetch blob d of size bytes from body (from offset off) and announce it while
// the fetch is under way.
func fetchAndProvide(t *testing.T, n *Node, d digest.Digest, size int, body func(off int64) io.Reader) {
	t.Helper()
	rd, err := n.opts.Store.Fetch(context.Background(), d, func(ctx context.Context, off int64) (*content.Fetched, error) {
		return &content.Fetched{Body: io.NopCloser(body(off)), Size: int64(size), Source: "test", SizeTrusted: true}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	c, _ := DigestCID(d)
	if err := n.dht.Provide(context.Background(), c, true); err != nil {
		t.Fatalf("provide: %v", err)
	}
}

// gateReader reads nothing until gate is closed, then ends.
type gateReader chan struct{}

func (g gateReader) Read([]byte) (int, error) {
	<-g
	return 0, io.EOF
}

// A node asked for a blob from a byte it has not received yet says so at once, rather than hold the
// asker until its own source gets there: that source may be the asker itself.
func TestResumePastWhatAProviderHasIsRefused(t *testing.T) {
	psk := testKey(t)
	n1 := testNode(t, psk)
	n2 := testNode(t, psk, n1.Addrs()[0])
	waitRouting(t, n1, n2)
	data := make([]byte, 4<<20)
	rand.Read(data)
	d := digest.FromBytes(data)
	gate := make(chan struct{})
	t.Cleanup(func() { close(gate) })
	const half = 2 << 20
	rd, err := n1.opts.Store.Fetch(context.Background(), d, func(ctx context.Context, off int64) (*content.Fetched, error) {
		body := io.MultiReader(bytes.NewReader(data[off:half]), gateReader(gate), bytes.NewReader(data[half:]))
		return &content.Fetched{Body: io.NopCloser(body), Size: int64(len(data)), Source: "test", SizeTrusted: true}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	for deadline := time.Now().Add(5 * time.Second); rd.Received() < half; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("node 1 received %d bytes, want %d", rd.Received(), half)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := n2.request(ctx, n1.ID(), blobRequest{Digest: d, Offset: half + 1}); err == nil || !strings.Contains(err.Error(), errBehind) {
		t.Fatalf("a resume past what the provider has: %v, want %q", err, errBehind)
	}
	// From a byte it has, it serves at once.
	c, err := n2.request(ctx, n1.ID(), blobRequest{Digest: d, Offset: half - 10})
	if err != nil {
		t.Fatalf("a resume within what the provider has: %v", err)
	}
	buf := make([]byte, 10)
	if _, err := io.ReadFull(c, buf); err != nil || !bytes.Equal(buf, data[half-10:half]) {
		t.Fatalf("read: %v", err)
	}
	c.Close()
}

// A node that starts holding blobs (as after a restart) provides them all, without any fetch
// announcing them, and keeps reproviding exactly what its store holds: a blob committed later is
// added, a removed one dropped, so that its records expire.
func TestStoredBlobsAreProvidedWhileHeld(t *testing.T) {
	psk := testKey(t)
	store, err := content.Open(t.TempDir(), content.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	var held []digest.Digest
	for i := range 300 {
		data := fmt.Appendf(nil, "held %d", i)
		d := digest.FromBytes(data)
		if err := store.Put(d, data); err != nil {
			t.Fatal(err)
		}
		held = append(held, d)
	}
	other := testNode(t, psk)
	reg := prometheus.NewRegistry()
	holder := testNodeWith(t, psk, func(o *Options) { o.Store = store; o.Registerer = reg }, other.Addrs()[0])
	waitRouting(t, other, holder)

	found := func(d digest.Digest) bool {
		t.Helper()
		c, err := DigestCID(d)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		for info := range other.dht.FindProvidersAsync(ctx, c, 1) {
			if info.ID == holder.ID() {
				return true
			}
		}
		return false
	}
	reprovided := func() float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "imagemesh_peering_reprovide_keys" {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatal("no imagemesh_peering_reprovide_keys")
		return 0
	}
	eventually := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !ok(); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("after 30s: %s", what)
			}
		}
	}
	eventually("the held blobs are not all reprovided", func() bool { return reprovided() == 300 })
	for _, d := range []digest.Digest{held[0], held[150], held[299]} {
		eventually("no provider record of "+string(d), func() bool { return found(d) })
	}

	data := []byte("committed after the start")
	late := digest.FromBytes(data)
	if err := store.Put(late, data); err != nil {
		t.Fatal(err)
	}
	eventually("the blob committed later is not provided", func() bool { return found(late) })
	eventually("the blob committed later is not reprovided", func() bool { return reprovided() == 301 })
	if err := store.Delete(held[0]); err != nil {
		t.Fatal(err)
	}
	eventually("the removed blob is still reprovided", func() bool { return reprovided() == 300 })
}
