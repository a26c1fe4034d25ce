package peering

// The cluster simulation of issue 13: up to 1,000 agents in one process, on go-libp2p's mocknet (links
// with a latency and a bandwidth), each a real Node (kad-dht with the /imagemesh prefix, the provide
// and reprovide loops, the blob protocol, the leader rule) over its own content store, fetching as the
// agent does: peers first, then a shared in-process registry. Nothing in it is a model of the DHT or of
// the leader rule: what it reports is what this package's code does at that size.
//
// It is a benchmark so that `go test` never runs it; hack/sim.sh (make bench-sim) runs it and prints
// the table. Knobs, all optional, through the environment (see simConfigFromEnv).

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/ipfs/go-cid"
	kb "github.com/libp2p/go-libp2p-kbucket"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/memsource"
)

// simConfig is what one run of the simulation does. Every field has an IMAGEMESH_SIM_* variable.
type simConfig struct {
	Nodes       []int         // cluster sizes, one sub-benchmark each (NODES, default 100,300,1000)
	Latency     time.Duration // one way, every link (LATENCY, default 1ms)
	Bandwidth   float64       // bytes/s, every link, each direction shared (BANDWIDTH, default 125e6: 1 Gbit/s)
	Bootstrap   int           // peers each node is given to join through (BOOTSTRAP, default 8)
	Starters    int           // nodes starting at once (STARTERS, default 16)
	Settle      time.Duration // wait after the last node started (SETTLE, default 10s)
	Digests     int           // random digests for leader agreement (DIGESTS, default 200)
	Lookups     int           // provide+find samples (LOOKUPS, default 200)
	Held        int           // digests held by each reprovide node (HELD, default 50000)
	HeldNodes   int           // nodes that hold Held digests (HELD_NODES, default 2)
	HeldWindow  time.Duration // how long their first sweep is watched at most (HELD_WINDOW, default 2m)
	BlobSize    int           // bytes of each cold blob (BLOB, default 2 MiB)
	ColdRounds  int           // cold blobs, one after the other (COLD_ROUNDS, default 2)
	RegLatency  time.Duration // the registry's time to first byte (REGISTRY_LATENCY, default 50ms)
	RegRate     float64       // the registry's bytes/s per request (REGISTRY_RATE, default 50e6)
	UploadSlots int           // Options.UploadSlots (UPLOAD_SLOTS, default: New's)
	// BusyWait is the peer source's Source.BusyWait (BUSY_WAIT, default: Source's). The protocol's
	// waits are wall-clock: at 1,000 nodes on a few cores every message takes far longer than on
	// nodes of their own, and a longer wait shows what the protocol does when CPU is not the limit.
	BusyWait    time.Duration
	ColdTimeout time.Duration // how long each node may take for a cold blob (COLD_TIMEOUT, default 5m)
	// ColdProfile, if set, is a file for a CPU profile of the cold blobs alone (COLD_PROFILE): what
	// the nodes spend spreading a blob, without the DHT's start-up and the lookups before it (of the
	// last cluster size, when there are several).
	ColdProfile string
}

func simConfigFromEnv(tb testing.TB) simConfig {
	tb.Helper()
	c := simConfig{
		Nodes: []int{100, 300, 1000}, Latency: time.Millisecond, Bandwidth: 125e6, Bootstrap: 8, Starters: 16,
		Settle: 10 * time.Second, Digests: 200, Lookups: 200, Held: 50000, HeldNodes: 2,
		HeldWindow: 2 * time.Minute, BlobSize: 2 << 20, ColdRounds: 2, RegLatency: 50 * time.Millisecond,
		RegRate: 50e6, ColdTimeout: 5 * time.Minute,
	}
	env := func(name string, set func(string) error) {
		if v := os.Getenv("IMAGEMESH_SIM_" + name); v != "" {
			if err := set(v); err != nil {
				tb.Fatalf("IMAGEMESH_SIM_%s=%q: %v", name, v, err)
			}
		}
	}
	dur := func(p *time.Duration) func(string) error {
		return func(v string) (err error) { *p, err = time.ParseDuration(v); return err }
	}
	integer := func(p *int) func(string) error {
		return func(v string) (err error) { *p, err = strconv.Atoi(v); return err }
	}
	float := func(p *float64) func(string) error {
		return func(v string) (err error) { *p, err = strconv.ParseFloat(v, 64); return err }
	}
	env("NODES", func(v string) error {
		c.Nodes = nil
		for f := range strings.SplitSeq(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 2 {
				return fmt.Errorf("cluster size %q: want an integer of at least 2", f)
			}
			c.Nodes = append(c.Nodes, n)
		}
		return nil
	})
	env("LATENCY", dur(&c.Latency))
	env("BANDWIDTH", float(&c.Bandwidth))
	env("BOOTSTRAP", integer(&c.Bootstrap))
	env("STARTERS", integer(&c.Starters))
	env("SETTLE", dur(&c.Settle))
	env("DIGESTS", integer(&c.Digests))
	env("LOOKUPS", integer(&c.Lookups))
	env("HELD", integer(&c.Held))
	env("HELD_NODES", integer(&c.HeldNodes))
	env("HELD_WINDOW", dur(&c.HeldWindow))
	env("BLOB", integer(&c.BlobSize))
	env("COLD_ROUNDS", integer(&c.ColdRounds))
	env("REGISTRY_LATENCY", dur(&c.RegLatency))
	env("REGISTRY_RATE", float(&c.RegRate))
	env("UPLOAD_SLOTS", integer(&c.UploadSlots))
	env("BUSY_WAIT", dur(&c.BusyWait))
	env("COLD_TIMEOUT", dur(&c.ColdTimeout))
	env("COLD_PROFILE", func(v string) error { c.ColdProfile = v; return nil })
	return c
}

// BenchmarkCluster runs the simulation once for each cluster size and prints one table of them all.
// Run it through hack/sim.sh; by hand:
//
//	IMAGEMESH_SIM_NODES=100 go test -run '^$' -bench '^BenchmarkCluster$' -benchtime 1x -timeout 0 ./pkg/peering/
func BenchmarkCluster(b *testing.B) {
	cfg := simConfigFromEnv(b)
	fmt.Printf("sim: mocknet links %s one way, %.0f Mbit/s each (per link, not per node: a node's uplink is not shared among its links); "+
		"registry %s to first byte, %.0f Mbit/s a request; cold blob %d KiB; %d bootstrap peers a node; upload slots %s; busy wait %s; cold blob timeout %s; GOMAXPROCS %d\n",
		cfg.Latency, cfg.Bandwidth*8/1e6, cfg.RegLatency, cfg.RegRate*8/1e6, cfg.BlobSize>>10, cfg.Bootstrap,
		uploadSlotsLabel(cfg), cmp.Or(cfg.BusyWait, DefaultBusyWait), cfg.ColdTimeout, runtime.GOMAXPROCS(0))
	var rows []simResult
	for _, n := range cfg.Nodes {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			r := runSim(b, cfg, n)
			rows = append(rows, r)
			b.ReportMetric(float64(r.leaders.distinctMean), "leaders/digest")
			b.ReportMetric(r.leaders.majorityShare*100, "%agree")
			b.ReportMetric(r.cold.opensPerBlob, "registry-opens/blob")
			b.ReportMetric(float64(r.cold.maxSlots), "max-peers-per-blob")
		})
		// After every size, not only at the end: a larger size that runs out of memory or time
		// leaves the table of the smaller ones.
		fmt.Print(simTable(cfg, rows))
	}
}

// uploadSlotsLabel names the upload-slot limit the nodes run with (issue 13's target is that no node
// serves more than it).
func uploadSlotsLabel(cfg simConfig) string {
	if cfg.UploadSlots == 0 {
		return strconv.Itoa(DefaultUploadSlots) + " (the default)"
	}
	return strconv.Itoa(cfg.UploadSlots)
}

// simNode is one agent: a Node, its store, and what the simulation counts of it.
type simNode struct {
	*Node
	store *content.Store
	chain source.Source // peers, then the registry: the mirror's source
	reg   *prometheus.Registry

	serving, maxServing, served atomic.Int64          // inbound blob streams: now, most at once, in all
	kadSent                     atomic.Int64          // DHT requests this node sent
	peerErr                     atomic.Pointer[error] // why its peers last failed it
}

// simHost is a mocknet host that counts, for its node, the DHT requests it sends and the blob streams
// it serves at once. It wraps whatever handler the node sets, so that it measures the protocol code
// as it is, and is test code only.
type simHost struct {
	host.Host
	n *simNode
}

func (h *simHost) NewStream(ctx context.Context, p peer.ID, pids ...protocol.ID) (network.Stream, error) {
	s, err := h.Host.NewStream(ctx, p, pids...)
	if err != nil || !slices.ContainsFunc(pids, isKad) {
		return s, err
	}
	return &countingStream{Stream: s, writes: &h.n.kadSent}, nil
}

func isKad(p protocol.ID) bool { return strings.HasPrefix(string(p), ProtocolPrefix+"/kad/") }

func (h *simHost) SetStreamHandler(pid protocol.ID, handler network.StreamHandler) {
	if pid == blobProtocol {
		inner := handler
		handler = func(s network.Stream) {
			now := h.n.serving.Add(1)
			h.n.served.Add(1)
			for m := h.n.maxServing.Load(); now > m && !h.n.maxServing.CompareAndSwap(m, now); m = h.n.maxServing.Load() {
			}
			defer h.n.serving.Add(-1)
			inner(s)
		}
	}
	h.Host.SetStreamHandler(pid, handler)
}

// countingStream counts writes: kad-dht writes each message whole, through a buffer, in one.
type countingStream struct {
	network.Stream
	writes *atomic.Int64
}

func (s *countingStream) Write(p []byte) (int, error) {
	s.writes.Add(1)
	return s.Stream.Write(p)
}

// simRegistry is the registry of the simulation: a memsource behind a time to first byte and a rate,
// counting the requests it is sent.
type simRegistry struct {
	*memsource.Source
	latency  time.Duration
	rate     float64
	opens    atomic.Int64 // every Open
	fresh    atomic.Int64 // Opens at offset 0: a fetch, not the resumption of one
	forPeers atomic.Int64 // Opens a leader made for its peers
}

// simRegistryView is the registry as one node sees it, so that Opens made to fetch through for peers
// count apart from a node's own.
type simRegistryView struct {
	*simRegistry
	through bool
}

func (r simRegistryView) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	r.opens.Add(1)
	if offset == 0 {
		r.fresh.Add(1)
	}
	if r.through {
		r.forPeers.Add(1)
	}
	select {
	case <-time.After(r.latency):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c, err := r.Source.Open(ctx, obj, offset)
	if err != nil {
		return nil, err
	}
	c.ReadCloser = &throttled{ReadCloser: c.ReadCloser, rate: r.rate, start: time.Now()}
	return c, nil
}

// throttled reads no faster than rate bytes a second.
type throttled struct {
	io.ReadCloser
	rate  float64
	start time.Time
	n     int64
}

func (t *throttled) Read(p []byte) (int, error) {
	if len(p) > 64<<10 {
		p = p[:64<<10]
	}
	n, err := t.ReadCloser.Read(p)
	t.n += int64(n)
	if due := time.Duration(float64(t.n) / t.rate * float64(time.Second)); due > time.Since(t.start) {
		time.Sleep(due - time.Since(t.start))
	}
	return n, err
}

// simPeers is a node's peers as its chain asks them, remembering why they last failed: a node that
// went to the registry for a cold blob says why its peers could not serve it.
type simPeers struct {
	*Source
	n *simNode
}

func (p *simPeers) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	c, err := p.Source.Open(ctx, obj, offset)
	if err != nil {
		p.n.peerErr.Store(&err)
	}
	return c, err
}

// simFetchFrom is the mirror's FetchFunc over a source (pkg/mirror fetchFrom), which this package
// cannot import. The package's other tests that fetch as an agent does use it too.
func simFetchFrom(src source.Source, obj source.Object) content.FetchFunc {
	return func(ctx context.Context, offset int64) (*content.Fetched, error) {
		c, err := src.Open(ctx, obj, offset)
		if err != nil {
			return nil, err
		}
		return &content.Fetched{Body: c, Size: c.Descriptor.Size, Source: c.Source, Untrusted: c.Untrusted, Reject: c.Reject,
			SizeTrusted: !c.Untrusted || obj.Size > 0}, nil
	}
}

type simCluster struct {
	cfg   simConfig
	mn    mocknet.Mocknet
	hosts []host.Host // every host, the reprovide nodes' last
	nodes []*simNode  // the cluster's nodes, in start order
	held  []*simNode  // the reprovide nodes, once started
	reg   *simRegistry
	repo  reference.Named
	dir   string
}

// simOptions are the nodes' options; newOnHost fills in New's defaults for the rest.
func (c *simCluster) simOptions(store *content.Store, regView source.Source) Options {
	return Options{
		Open: true, Store: store, UploadSlots: c.cfg.UploadSlots,
		FetchThrough: func(ctx context.Context, obj source.Object) (*content.Reader, error) {
			// As the agent: a leader fetches from its own trusted sources only, never its peers.
			return store.Fetch(ctx, obj.Digest, simFetchFrom(regView, obj))
		},
	}
}

// start makes host h a node over the store in dir, joining through the given peers.
func (c *simCluster) start(ctx context.Context, h host.Host, dir string, bootstrap []peer.AddrInfo, withRegistry bool) (*simNode, error) {
	store, err := content.Open(dir, content.Options{})
	if err != nil {
		return nil, fmt.Errorf("sim: store in %s: %w", dir, err)
	}
	sn := &simNode{store: store}
	opts := c.simOptions(store, simRegistryView{simRegistry: c.reg, through: true})
	if withRegistry {
		sn.reg = prometheus.NewRegistry()
		opts.Registerer = sn.reg
	}
	n, err := newOnHost(ctx, opts, &simHost{Host: h, n: sn}, newMetrics(), bootstrap, nil)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("sim: node on %s: %w", h.ID(), err), store.Close())
	}
	sn.Node = n
	peers := n.Source()
	if c.cfg.BusyWait > 0 {
		peers.BusyWait = c.cfg.BusyWait
	}
	sn.chain = source.NewChain(
		source.Link{Source: &simPeers{Source: peers, n: sn}},
		source.Link{Source: simRegistryView{simRegistry: c.reg}, ResolveTags: true},
	)
	return sn, nil
}

func (c *simCluster) close() {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, n := range append(slices.Clone(c.nodes), c.held...) {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			_ = n.Close()       // the simulation is over; a close error changes none of its figures
			_ = n.store.Close() // idem
		}()
	}
	wg.Wait()
	_ = c.mn.Close() // idem
}

// simResult is one row of the table.
type simResult struct {
	nodes                   int
	startTime, settleTime   time.Duration
	rtMean, rtMin, connMean float64
	connMax                 int
	leadersFresh, leaders   leaderStats
	provide, find           latencies
	lookupErrs              int
	held                    heldStats
	cold                    coldStats
	heapMiB, rssMiB         float64
	goroutines              int
	total                   time.Duration
}

func runSim(b *testing.B, cfg simConfig, size int) simResult {
	begin := time.Now()
	ctx := context.Background()
	c := &simCluster{cfg: cfg, mn: mocknet.New(), reg: &simRegistry{
		Source: memsource.New("registry"), latency: cfg.RegLatency, rate: cfg.RegRate,
	}, dir: b.TempDir()}
	c.repo, _ = reference.ParseNamed("registry.sim/app")
	c.mn.SetLinkDefaults(mocknet.LinkOptions{Latency: cfg.Latency, Bandwidth: cfg.Bandwidth})
	r := simResult{nodes: size}
	for range size + cfg.HeldNodes {
		h, err := c.mn.GenPeer()
		if err != nil {
			b.Fatalf("sim: generate a peer: %v", err)
		}
		c.hosts = append(c.hosts, h)
	}
	// Every host can reach every other, as on one cluster network; connections are what the nodes make.
	if err := c.mn.LinkAll(); err != nil {
		b.Fatalf("sim: link the hosts: %v", err)
	}
	defer c.close()

	// Nodes start as a DaemonSet's agents do, many at once (Starters at a time), each given Bootstrap
	// random nodes already up (the agents it finds Ready). The first few start alone, one by one.
	started := make([]*simNode, size)
	var up []int // started nodes, by index
	var mu sync.Mutex
	var wg sync.WaitGroup
	var failed error
	sem := make(chan struct{}, max(1, cfg.Starters))
	for i, h := range c.hosts[:size] {
		if i <= cfg.Bootstrap {
			wg.Wait() // the first ones one after the other, so that the others have someone to join
		}
		mu.Lock()
		var boot []peer.AddrInfo
		for _, j := range randomPicks(len(up), cfg.Bootstrap) {
			boot = append(boot, peer.AddrInfo{ID: c.hosts[up[j]].ID(), Addrs: c.hosts[up[j]].Addrs()})
		}
		mu.Unlock()
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			n, err := c.start(ctx, h, filepath.Join(c.dir, strconv.Itoa(i)), boot, false)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed = errors.Join(failed, err)
				return
			}
			started[i] = n
			up = append(up, i)
		}()
	}
	wg.Wait()
	for _, n := range started {
		if n != nil {
			c.nodes = append(c.nodes, n)
		}
	}
	if failed != nil {
		b.Fatal(failed)
	}
	r.startTime = time.Since(begin)
	fmt.Printf("sim: %d nodes started in %s\n", size, r.startTime.Round(time.Millisecond))
	r.leadersFresh = c.leaderAgreement(cfg.Digests)
	fmt.Printf("sim: %d nodes, at start: %s\n", size, r.leadersFresh)

	// Routing tables fill as nodes look up, and refresh every 10 minutes: wait, and refresh once, as
	// the first periodic refresh would.
	settle := time.Now()
	time.Sleep(cfg.Settle)
	if failed := c.refreshAll(); failed > 0 {
		fmt.Printf("sim: %d of %d routing table refreshes failed\n", failed, size)
	}
	r.settleTime = time.Since(settle)
	r.rtMean, r.rtMin, r.connMean, r.connMax = c.tables()
	r.leaders = c.leaderAgreement(cfg.Digests)
	fmt.Printf("sim: %d nodes, settled (%s): routing tables mean %.0f min %.0f peers; connections mean %.0f max %d; %s\n",
		size, r.settleTime.Round(time.Millisecond), r.rtMean, r.rtMin, r.connMean, r.connMax, r.leaders)

	r.provide, r.find, r.lookupErrs = c.lookups(ctx, cfg.Lookups)
	fmt.Printf("sim: %d nodes: provide %s; find %s; %d failed\n", size, r.provide, r.find, r.lookupErrs)

	held, err := c.heldDigests(ctx, b)
	if err != nil {
		b.Fatal(err)
	}
	r.held = held
	fmt.Printf("sim: %d nodes: %s\n", size, r.held)

	if cfg.ColdProfile != "" {
		f, err := os.Create(cfg.ColdProfile)
		if err != nil {
			b.Fatal(err)
		}
		defer func() { _ = f.Close() }() // the profile is written by StopCPUProfile
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	for round := range cfg.ColdRounds {
		cs, err := c.coldStart(round)
		if err != nil {
			b.Fatal(err)
		}
		r.cold.add(cs)
		fmt.Printf("sim: %d nodes: cold blob %d: %s\n", size, round+1, cs)
	}
	r.cold.opensPerBlob = float64(r.cold.opens) / float64(max(1, r.cold.rounds))

	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r.heapMiB = float64(ms.HeapAlloc) / (1 << 20)
	r.rssMiB = peakRSSMiB()
	r.goroutines = runtime.NumGoroutine()
	r.total = time.Since(begin)
	return r
}

// randomPicks returns up to k distinct random integers below n.
func randomPicks(n, k int) []int {
	if n <= k {
		out := make([]int, n)
		for i := range out {
			out[i] = i
		}
		return out
	}
	seen := map[int]bool{}
	var out []int
	for len(out) < k {
		j := randIntn(n)
		if !seen[j] {
			seen[j] = true
			out = append(out, j)
		}
	}
	return out
}

func randIntn(n int) int {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand never fails
	var v uint64
	for _, x := range b {
		v = v<<8 | uint64(x)
	}
	return int(v % uint64(n))
}

func randomDigest() digest.Digest {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // crypto/rand never fails
	return digest.FromBytes(b)
}

// refreshAll refreshes every node's routing table, a few at a time, and waits for them. It returns
// how many refreshes failed or took over 2 minutes.
func (c *simCluster) refreshAll() int {
	var wg sync.WaitGroup
	var failed atomic.Int64
	sem := make(chan struct{}, 32)
	for _, n := range c.nodes {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			select {
			case err := <-n.dht.ForceRefresh():
				if err != nil {
					failed.Add(1)
				}
			case <-time.After(2 * time.Minute):
				failed.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(failed.Load())
}

func (c *simCluster) tables() (rtMean, rtMin, connMean float64, connMax int) {
	rtMin = math.Inf(1)
	for _, n := range c.nodes {
		rt := float64(n.dht.RoutingTable().Size())
		rtMean += rt
		rtMin = min(rtMin, rt)
		conns := n.Peers()
		connMean += float64(conns)
		connMax = max(connMax, conns)
	}
	return rtMean / float64(len(c.nodes)), rtMin, connMean / float64(len(c.nodes)), connMax
}

// leaderStats say how far the nodes agree on who leads a digest.
type leaderStats struct {
	digests       int
	distinctMean  float64 // leaders per digest, over all nodes (1: every node picks the same)
	distinctMax   int
	majorityShare float64 // nodes that pick the digest's most picked leader
	idealShare    float64 // nodes that pick the node closest to the digest in the whole cluster
	// Fetchers are the nodes that would fetch the digest from the registry when every node asks the
	// leader it picked to fetch it through, and each leader sends on to a closer node it knows
	// (Node.closerNode): what the registry serves a cold blob, with no upload slot ever busy.
	fetchersMean float64
	fetchersMax  int
}

func (s leaderStats) String() string {
	return fmt.Sprintf("leaders per digest mean %.2f max %d; %.1f%% of nodes agree with the majority, %.1f%% pick the closest node of the cluster; fetchers after redirects mean %.2f max %d",
		s.distinctMean, s.distinctMax, s.majorityShare*100, s.idealShare*100, s.fetchersMean, s.fetchersMax)
}

// leaderAgreement asks every node who leads each of k random digests: the leader rule of the node
// itself (Node.leader).
func (c *simCluster) leaderAgreement(k int) leaderStats {
	ids := make([]peer.ID, len(c.nodes))
	byID := make(map[peer.ID]*simNode, len(c.nodes))
	for i, n := range c.nodes {
		ids[i] = n.ID()
		byID[n.ID()] = n
	}
	s := leaderStats{digests: k}
	for range k {
		d := randomDigest()
		key, _ := DigestCID(d) // a sha256 digest always has a CID
		ideal := kb.SortClosestPeers(ids, kb.ConvertKey(string(key.Hash())))[0]
		// The rule is a DHT lookup: ask every node at once, a few dozen lookups at a time.
		leaders := make([]peer.ID, len(c.nodes))
		var wg sync.WaitGroup
		sem := make(chan struct{}, 64)
		for i, n := range c.nodes {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer func() { <-sem; wg.Done() }()
				l, ok := n.leader(context.Background(), d)
				if !ok {
					l = n.ID() // the node leads itself: it fetches from the registry
				}
				leaders[i] = l
			}()
		}
		wg.Wait()
		votes := map[peer.ID]int{}
		for _, l := range leaders {
			votes[l]++
		}
		top := 0
		for _, v := range votes {
			top = max(top, v)
		}
		fetchers := map[peer.ID]bool{}
		for i, l := range leaders {
			fetchers[c.fetcher(byID, ids[i], l, d)] = true
		}
		s.fetchersMean += float64(len(fetchers))
		s.fetchersMax = max(s.fetchersMax, len(fetchers))
		s.distinctMean += float64(len(votes))
		s.distinctMax = max(s.distinctMax, len(votes))
		s.majorityShare += float64(top) / float64(len(c.nodes))
		s.idealShare += float64(votes[ideal]) / float64(len(c.nodes))
	}
	s.distinctMean /= float64(k)
	s.fetchersMean /= float64(k)
	s.majorityShare /= float64(k)
	s.idealShare /= float64(k)
	return s
}

// fetcher is the node that fetches d from the registry when node self asks leader to fetch it
// through: the end of the chain of redirects, as Source.redirected follows it.
func (c *simCluster) fetcher(byID map[peer.ID]*simNode, self, leader peer.ID, d digest.Digest) peer.ID {
	for leader != self {
		n, ok := byID[leader]
		if !ok {
			return leader
		}
		next, ok := n.closerNode(d)
		if !ok {
			return leader
		}
		leader = next
	}
	return self
}

type latencies []time.Duration

func (l latencies) pct(p float64) time.Duration {
	if len(l) == 0 {
		return 0
	}
	s := slices.Clone(l)
	slices.Sort(s)
	return s[min(len(s)-1, int(math.Ceil(p*float64(len(s))))-1)]
}

func (l latencies) String() string {
	return fmt.Sprintf("p50 %s p95 %s p99 %s (%d)", l.pct(.5).Round(100*time.Microsecond),
		l.pct(.95).Round(100*time.Microsecond), l.pct(.99).Round(100*time.Microsecond), len(l))
}

// lookups has a random node provide a random digest (dht.Provide, as the provide loop does), then
// another random node look for it (FindProvidersAsync, as Source.open does) until its first provider,
// k times, 8 at once.
func (c *simCluster) lookups(ctx context.Context, k int) (provide, find latencies, failed int) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for range k {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			p := c.nodes[randIntn(len(c.nodes))]
			f := c.nodes[randIntn(len(c.nodes))]
			for f == p {
				f = c.nodes[randIntn(len(c.nodes))]
			}
			key, _ := DigestCID(randomDigest()) // a sha256 digest always has a CID
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			start := time.Now()
			err := p.dht.Provide(pctx, key, true)
			pt := time.Since(start)
			cancel()
			var ft time.Duration
			if err == nil {
				ft, err = firstProvider(ctx, f, key, p.ID())
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
				return
			}
			provide = append(provide, pt)
			find = append(find, ft)
		}()
	}
	wg.Wait()
	return provide, find, failed
}

func firstProvider(ctx context.Context, n *simNode, key cid.Cid, want peer.ID) (time.Duration, error) {
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	start := time.Now()
	for info := range n.dht.FindProvidersAsync(fctx, key, 1) {
		if info.ID == want {
			return time.Since(start), nil
		}
	}
	return 0, fmt.Errorf("find %s from %s: no provider", key, n.ID())
}

// heldStats is what the reprovide walk of a node holding many digests sends.
type heldStats struct {
	nodes, digests int
	window         time.Duration
	ratePerNode    float64 // announcements a second, each node
	msgsPerAnnounc float64 // DHT requests sent per announcement
}

func (s heldStats) String() string {
	walk := time.Duration(float64(s.digests) / max(s.ratePerNode, 1e-9) * float64(time.Second))
	return fmt.Sprintf("%d nodes holding %d digests each: %.1f announcements/s a node over %s, %.1f DHT requests each; a whole reprovide sweep takes %s (ReprovideInterval %s, records live %s)",
		s.nodes, s.digests, s.ratePerNode, s.window, s.msgsPerAnnounc,
		walk.Round(time.Second), DefaultReprovideInterval, 2*DefaultReprovideInterval)
}

// heldDigests starts HeldNodes more nodes, each with a store that holds Held tiny blobs from a previous
// run, as after a restart: their sweeping provider announces every one, region by region.
func (c *simCluster) heldDigests(ctx context.Context, b *testing.B) (heldStats, error) {
	cfg := c.cfg
	s := heldStats{nodes: cfg.HeldNodes, digests: cfg.Held, window: cfg.HeldWindow}
	if cfg.HeldNodes == 0 || cfg.Held == 0 {
		return s, nil
	}
	for i, h := range c.hosts[len(c.nodes):] {
		dir := filepath.Join(c.dir, "held-"+strconv.Itoa(i))
		if err := writeHeldBlobs(dir, i, cfg.Held); err != nil {
			return s, err
		}
		var boot []peer.AddrInfo
		for _, j := range randomPicks(len(c.nodes), cfg.Bootstrap) {
			boot = append(boot, peer.AddrInfo{ID: c.nodes[j].ID(), Addrs: c.nodes[j].host.Addrs()})
		}
		n, err := c.start(ctx, h, dir, boot, true)
		if err != nil {
			return s, err
		}
		c.held = append(c.held, n)
	}
	// The walk starts once a node has a routing table; the window starts then too, so that it
	// measures the steady rate.
	type mark struct {
		provides uint64
		sent     int64
	}
	start := make([]mark, len(c.held))
	for i, n := range c.held {
		for n.dht.RoutingTable().Size() == 0 {
			time.Sleep(10 * time.Millisecond)
		}
		start[i] = mark{keysProvided(b, n), n.kadSent.Load()}
	}
	// Until every node has provided all it holds (a sweep can finish well inside the window), or
	// the window ends.
	begin := time.Now()
	done := func() bool {
		for i, n := range c.held {
			if keysProvided(b, n)-start[i].provides < uint64(cfg.Held) {
				return false
			}
		}
		return true
	}
	for !done() && time.Since(begin) < cfg.HeldWindow {
		time.Sleep(250 * time.Millisecond)
	}
	s.window = time.Since(begin)
	var provides, sent float64
	for i, n := range c.held {
		provides += float64(keysProvided(b, n) - start[i].provides)
		sent += float64(n.kadSent.Load() - start[i].sent)
	}
	s.ratePerNode = provides / float64(len(c.held)) / s.window.Seconds()
	s.msgsPerAnnounc = sent / max(provides, 1)
	return s, nil
}

// writeHeldBlobs lays count tiny blobs out as a store's files, as a previous run left them: the store
// indexes them when it opens. Written straight, not through Put, which syncs each to disk.
func writeHeldBlobs(dir string, seed, count int) error {
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return fmt.Errorf("sim: %w", err)
	}
	for i := range count {
		data := fmt.Appendf(nil, "held %d %d", seed, i)
		if err := os.WriteFile(filepath.Join(blobs, digest.FromBytes(data).Encoded()), data, 0o644); err != nil {
			return fmt.Errorf("sim: held blob: %w", err)
		}
	}
	return nil
}

// keysProvided is how many digests the node's sweeping provider has provided, reprovides included.
func keysProvided(b *testing.B, n *simNode) uint64 {
	sweep := n.sweep.Load()
	if sweep == nil {
		return 0
	}
	st, err := sweep.Stats(context.Background())
	if err != nil {
		b.Fatalf("sim: provider statistics: %v", err)
	}
	return uint64(st.Operations.Past.KeysProvided)
}

// coldStats is what a cold blob costs when every node asks for it at once.
type coldStats struct {
	rounds                 int
	opens, fresh, through  int64 // registry requests: all, at offset 0, by leaders for peers
	opensPerBlob           float64
	maxServing             int64 // most blob streams one node had open at once, refused ones included
	maxSlots               int   // most peers one node sent one blob to at once (its upload slots)
	maxServed              int64 // most blob streams one node served in a round
	servers                int   // nodes that served a blob stream in a round (most of any round)
	failed                 int
	fromPeer, fromRegistry int
	// Why nodes went to the registry first: they asked no peer (they took themselves for the
	// blob's leader, or found none), every peer they asked was busy until the busy wait ran out,
	// or peers failed otherwise.
	askedNone, waitedOut, peersFailed int
	done                              latencies
}

func (s *coldStats) add(o coldStats) {
	s.rounds++
	s.opens += o.opens
	s.fresh += o.fresh
	s.through += o.through
	s.maxServing = max(s.maxServing, o.maxServing)
	s.maxSlots = max(s.maxSlots, o.maxSlots)
	s.maxServed = max(s.maxServed, o.maxServed)
	s.servers = max(s.servers, o.servers)
	s.failed += o.failed
	s.fromPeer += o.fromPeer
	s.fromRegistry += o.fromRegistry
	s.askedNone += o.askedNone
	s.waitedOut += o.waitedOut
	s.peersFailed += o.peersFailed
	s.done = append(s.done, o.done...)
}

func (s coldStats) String() string {
	return fmt.Sprintf("registry opens %d (%d at offset 0, %d by leaders for peers); blob streams: most open at once on one node %d, most peers sent one blob at once %d, most served by one node %d, nodes serving %d; first source peer %d registry %d (asked no peer %d, busy wait ran out %d, peers failed %d); %d failed; done %s",
		s.opens, s.fresh, s.through, s.maxServing, s.maxSlots, s.maxServed, s.servers, s.fromPeer, s.fromRegistry,
		s.askedNone, s.waitedOut, s.peersFailed, s.failed, s.done)
}

// coldStart has every node fetch the same new blob at the same moment, as the mirror does on a
// client's GET: store.Fetch over peers then the registry, read to the end.
func (c *simCluster) coldStart(round int) (coldStats, error) {
	data := make([]byte, c.cfg.BlobSize)
	_, _ = rand.Read(data) // crypto/rand never fails
	desc := c.reg.AddBlob(c.repo, data)
	obj := source.Object{Repo: c.repo, Kind: source.KindBlob, Digest: desc.Digest, Size: desc.Size}
	before := struct{ opens, fresh, through int64 }{c.reg.opens.Load(), c.reg.fresh.Load(), c.reg.forPeers.Load()}
	served := make([]int64, len(c.nodes))
	for i, n := range c.nodes {
		n.maxServing.Store(0)
		served[i] = n.served.Load()
	}
	for _, n := range c.nodes {
		n.peerErr.Store(nil)
	}
	var s coldStats
	var mu sync.Mutex
	var wg sync.WaitGroup
	gate := make(chan struct{})
	for _, n := range c.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ColdTimeout)
			defer cancel()
			var first string
			var once sync.Once
			fetch := simFetchFrom(n.chain, obj)
			rd, err := n.store.Fetch(ctx, obj.Digest, func(ctx context.Context, offset int64) (*content.Fetched, error) {
				f, err := fetch(ctx, offset)
				if err == nil {
					once.Do(func() { first = f.Source })
				}
				return f, err
			})
			var got int64
			if err == nil {
				got, err = rd.WriteTo(io.Discard)
				_ = rd.Close() // a reader's Close only releases it
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil || got != int64(len(data)) {
				s.failed++
				if s.failed <= 3 {
					fmt.Printf("sim: cold fetch on %s: %d bytes: %v\n", n.ID(), got, err)
				}
				return
			}
			switch first {
			case "peer":
				s.fromPeer++
			case "":
				// joined a fetch under way in its own store (a leader fetching for peers)
			default:
				s.fromRegistry++
				why := "no error"
				e := n.peerErr.Load()
				if e != nil {
					why = (*e).Error()
				}
				switch {
				case e == nil || errors.Is(*e, errNoPeerAsked):
					s.askedNone++
				case errors.Is(*e, errPeerBusy):
					s.waitedOut++
				default:
					s.peersFailed++
				}
				if s.fromRegistry <= 5 {
					fmt.Printf("sim: %s went to the registry: peers: %.300s\n", n.ID(), why)
				}
			}
			s.done = append(s.done, time.Since(start))
		}()
	}
	close(gate)
	wg.Wait()
	// Streams still being served end shortly after the last reader has its bytes.
	time.Sleep(time.Second)
	s.opens = c.reg.opens.Load() - before.opens
	s.fresh = c.reg.fresh.Load() - before.fresh
	s.through = c.reg.forPeers.Load() - before.through
	for i, n := range c.nodes {
		s.maxServing = max(s.maxServing, n.maxServing.Load())
		s.maxSlots = max(s.maxSlots, n.uploads.maxPerBlob())
		d := n.served.Load() - served[i]
		s.maxServed = max(s.maxServed, d)
		if d > 0 {
			s.servers++
		}
	}
	if s.failed == len(c.nodes) {
		return s, fmt.Errorf("sim: cold blob %d: every node failed", round+1)
	}
	return s, nil
}

// peakRSSMiB is the process's peak resident memory so far (VmHWM), or NaN where /proc has none.
func peakRSSMiB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return math.NaN()
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kib, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err == nil {
				return float64(kib) / 1024
			}
		}
	}
	return math.NaN()
}

func simTable(cfg simConfig, rows []simResult) string {
	if len(rows) == 0 {
		return ""
	}
	var w strings.Builder
	line := func(name string, f func(r simResult) string) {
		fmt.Fprintf(&w, "| %-52s |", name)
		for _, r := range rows {
			fmt.Fprintf(&w, " %-28s |", f(r))
		}
		fmt.Fprintln(&w)
	}
	fmt.Fprintf(&w, "\nsimulated cluster: mocknet, %s one way and %.0f Mbit/s per link; registry %s to first byte, %.0f Mbit/s a request; %d KiB cold blobs\n\n",
		cfg.Latency, cfg.Bandwidth*8/1e6, cfg.RegLatency, cfg.RegRate*8/1e6, cfg.BlobSize>>10)
	line("nodes", func(r simResult) string { return strconv.Itoa(r.nodes) })
	fmt.Fprintf(&w, "|%s|", strings.Repeat("-", 54))
	for range rows {
		fmt.Fprintf(&w, "%s|", strings.Repeat("-", 30))
	}
	fmt.Fprintln(&w)
	d := func(t time.Duration) string { return t.Round(time.Millisecond).String() }
	ms := func(t time.Duration) string { return fmt.Sprintf("%.1fms", float64(t)/float64(time.Millisecond)) }
	line("routing table size, mean / min", func(r simResult) string { return fmt.Sprintf("%.0f / %.0f", r.rtMean, r.rtMin) })
	line("connections a node, mean / max", func(r simResult) string { return fmt.Sprintf("%.0f / %d", r.connMean, r.connMax) })
	line("leaders per digest at start, mean / max", func(r simResult) string {
		return fmt.Sprintf("%.2f / %d", r.leadersFresh.distinctMean, r.leadersFresh.distinctMax)
	})
	line("leaders per digest settled, mean / max", func(r simResult) string {
		return fmt.Sprintf("%.2f / %d", r.leaders.distinctMean, r.leaders.distinctMax)
	})
	line("registry fetchers per digest after redirects, at start / settled", func(r simResult) string {
		return fmt.Sprintf("%.2f / %.2f", r.leadersFresh.fetchersMean, r.leaders.fetchersMean)
	})
	line("nodes agreeing with majority, at start / settled", func(r simResult) string {
		return fmt.Sprintf("%.1f%% / %.1f%%", r.leadersFresh.majorityShare*100, r.leaders.majorityShare*100)
	})
	line("nodes picking the cluster's closest node (settled)", func(r simResult) string {
		return fmt.Sprintf("%.1f%%", r.leaders.idealShare*100)
	})
	line("provide p50 / p95 / p99", func(r simResult) string {
		return ms(r.provide.pct(.5)) + " / " + ms(r.provide.pct(.95)) + " / " + ms(r.provide.pct(.99))
	})
	line("find first provider p50 / p95 / p99", func(r simResult) string {
		return ms(r.find.pct(.5)) + " / " + ms(r.find.pct(.95)) + " / " + ms(r.find.pct(.99))
	})
	line("provide+find failures", func(r simResult) string { return fmt.Sprintf("%d of %d", r.lookupErrs, r.lookupErrs+len(r.provide)) })
	line(fmt.Sprintf("announcements/s a node, %d digests held", cfg.Held), func(r simResult) string { return fmt.Sprintf("%.1f", r.held.ratePerNode) })
	line("DHT requests sent per announcement", func(r simResult) string { return fmt.Sprintf("%.1f", r.held.msgsPerAnnounc) })
	line("registry opens per cold blob (target <= 2)", func(r simResult) string {
		return fmt.Sprintf("%.1f (%d rounds)", r.cold.opensPerBlob, r.cold.rounds)
	})
	line("  of which by leaders for peers / at offset 0", func(r simResult) string {
		return fmt.Sprintf("%d / %d", r.cold.through, r.cold.fresh)
	})
	line("most peers one node sends a blob to at once (target <= upload slots)", func(r simResult) string { return strconv.Itoa(r.cold.maxSlots) })
	line("most blob streams open on one node at once, refused included", func(r simResult) string { return strconv.FormatInt(r.cold.maxServing, 10) })
	line("most blob streams one node serves a round", func(r simResult) string { return strconv.FormatInt(r.cold.maxServed, 10) })
	line("nodes serving blob streams (most in a round)", func(r simResult) string { return strconv.Itoa(r.cold.servers) })
	line("first source: peer / registry / failed", func(r simResult) string {
		return fmt.Sprintf("%d / %d / %d", r.cold.fromPeer, r.cold.fromRegistry, r.cold.failed)
	})
	line("  registry first: asked no peer / busy wait ran out / peers failed", func(r simResult) string {
		return fmt.Sprintf("%d / %d / %d", r.cold.askedNone, r.cold.waitedOut, r.cold.peersFailed)
	})
	line("cold blob on every node: p50 / p99 / max", func(r simResult) string {
		return d(r.cold.done.pct(.5)) + " / " + d(r.cold.done.pct(.99)) + " / " + d(r.cold.done.pct(1))
	})
	line("start / settle / whole run", func(r simResult) string { return d(r.startTime) + " / " + d(r.settleTime) + " / " + d(r.total) })
	line("heap at end / peak RSS (MiB); goroutines", func(r simResult) string {
		return fmt.Sprintf("%.0f / %.0f; %d", r.heapMiB, r.rssMiB, r.goroutines)
	})
	fmt.Fprintln(&w)
	return w.String()
}
