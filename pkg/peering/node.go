// Package peering lets the agents of a cluster share their caches. Each agent runs a libp2p host whose
// connections are secured by one TLS 1.3 session (or, where the network already encrypts, by none) in
// which each side proves that it holds the cluster key before any stream opens (membership.go: hosts
// without the key cannot connect), finds which peers hold a digest through a Kademlia DHT that is the
// cluster's own (protocol prefix /imagemesh, never the public IPFS DHT), and fetches blobs over a
// stream protocol that starts at any offset, so that a transfer cut off by a dying peer resumes
// elsewhere.
//
// Peers are never trusted with content: every byte goes through the content store, which verifies
// the digest before it keeps a blob or lets a reader have its last byte.
package peering

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/distribution/reference"
	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p-kad-dht/provider"
	dhtrecords "github.com/libp2p/go-libp2p-kad-dht/records"
	kb "github.com/libp2p/go-libp2p-kbucket"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	yamuxlib "github.com/libp2p/go-yamux/v5"
	ma "github.com/multiformats/go-multiaddr"
	mh "github.com/multiformats/go-multihash"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// ProtocolPrefix keeps the cluster's DHT apart from any other libp2p network.
const ProtocolPrefix = "/imagemesh"

// Defaults of Options.
const (
	DefaultReprovideInterval = 10 * time.Minute
	DefaultProvideRate       = 50
	DefaultTagTTL            = 5 * time.Minute
)

// FetchThroughFunc fetches a blob into the store from this node's trusted sources, for a peer.
type FetchThroughFunc func(ctx context.Context, obj source.Object) (*content.Reader, error)

// CachedTagFunc answers a tag from what this node resolved itself, with when it did.
type CachedTagFunc func(repo reference.Named, tag string) (ocispec.Descriptor, time.Time, bool)

// Options configure a Node.
type Options struct {
	// ListenAddrs are TCP multiaddrs, e.g. /ip4/0.0.0.0/tcp/5001.
	ListenAddrs []string
	// DirectListen is a TCP address (HOST:PORT) where peers take the bytes of large blobs on
	// connections of their own, secured as Encryption says (direct.go). Empty: every byte goes over
	// libp2p streams. The node takes other nodes' direct connections either way.
	DirectListen string
	// PSK is the cluster key: peers prove that they hold it. Nil is accepted only with Open.
	PSK pnet.PSK
	// Encryption protects the bytes between members on the wire: EncryptionTLS (the default, also
	// when empty) or EncryptionNone, for networks that encrypt every packet already. It needs a PSK.
	Encryption Encryption
	// Open runs without a cluster key: any host that can reach this one can fetch from it.
	Open bool
	// DataDir keeps the node's identity key, so that its peer ID survives restarts.
	DataDir string
	// Bootstrap are peers to join through, as multiaddrs ending in /p2p/<id>.
	Bootstrap []string
	// Store is served to peers and fills the provider records.
	Store *content.Store
	// ReprovideInterval re-announces every blob of the store, one keyspace region after the other
	// (go-libp2p-kad-dht's sweeping provider); provider records live twice as long. Default 10m.
	ReprovideInterval time.Duration
	// ProvideRate bounds the announcements per second of content this node starts fetching, which
	// go out one at a time, at once, so that peers find a blob while it is still arriving. Default 50.
	ProvideRate int
	// FetchThrough, if set, lets peers ask this node to fetch a blob from its own trusted sources and
	// stream it as it arrives. It must not ask peers in turn.
	FetchThrough FetchThroughFunc
	// MaxFetchThroughPerPeer bounds the blobs one peer may have this node fetch through at once, and
	// MaxFetchThrough those of all peers together; past either, the peer is told to look elsewhere.
	// Defaults 8 and 64.
	MaxFetchThroughPerPeer, MaxFetchThrough int
	// UploadSlots bounds how many peers this node sends one blob to at once; past it, a peer is
	// told the node is busy and looks for another provider. Default DefaultUploadSlots.
	UploadSlots int
	// CachedTag, if set, answers peers' tag lookups from what this node resolved itself.
	CachedTag CachedTagFunc
	// TagTTL is how old a tag's answer may be for peers to use it: a node answers only what it
	// resolved more recently, and a node that asks ignores older answers. Default 5m.
	TagTTL time.Duration
	// Discover finds more peers, periodically while the node has few: DNS, Kubernetes.
	Discover []Discoverer
	// DiscoverInterval is how often discovery runs while the node has fewer than MinPeers. Default 30s.
	DiscoverInterval time.Duration
	// MinPeers is the number of peers below which the node keeps discovering. Default 8.
	MinPeers   int
	Registerer prometheus.Registerer
	Logger     *slog.Logger

	// fetchThroughWait bounds how long a fetch through waits for the upstream's first answer, and
	// throughAnswerWait how long an asker waits for the leader's answer to one. Tests shorten them.
	fetchThroughWait, throughAnswerWait time.Duration
	// sendStall bounds how long one write of a blob to a peer may block (see stallWriter). Tests
	// shorten it.
	sendStall time.Duration
}

// Defaults of Options.fetchThroughWait and Options.throughAnswerWait: the asker waits for the
// leader's own wait, and the leader's answer on top. Default of Options.sendStall: a megabyte
// written at the least rate the asker's store accepts from a source (32 KiB/s) takes 32 s, so an
// asker that reads is never cut off by it, only one that stopped reading.
const (
	defaultFetchThroughWait  = 30 * time.Second
	defaultThroughAnswerWait = 40 * time.Second
	defaultSendStall         = time.Minute
)

// Node is one agent's presence in the cluster.
type Node struct {
	opts    Options
	host    host.Host
	dht     *dht.IpfsDHT
	records io.Closer // the DHT's provider records (newRecordStore)
	log     *slog.Logger
	metrics *metrics

	bad     *badPeers
	direct  *direct // nil in the simulation, whose hosts have no TCP
	through *fetchThroughLimit
	uploads *uploadSlots
	urgent  chan digest.Digest // content being fetched, announced at once
	// sweep reprovides what the store holds; nil until the node first has a peer.
	sweep  atomic.Pointer[provider.SweepingProvider]
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	discover  []Discoverer
	closeOnce sync.Once
	closeErr  error
}

// New starts a node: its host listens and its DHT joins the bootstrap peers it can reach. A node
// that reaches nobody keeps working alone and joins peers that connect to it later.
func New(ctx context.Context, opts Options) (*Node, error) {
	if opts.PSK == nil && !opts.Open {
		return nil, errors.New("peering: a cluster key is required (or run open explicitly)")
	}
	if err := opts.Encryption.validate(); err != nil {
		return nil, err
	}
	if opts.PSK == nil && opts.Encryption == EncryptionNone {
		// Without a key, nothing would authenticate peers: anyone could read and alter every byte.
		return nil, errors.New("peering: encryption none needs a cluster key")
	}
	if opts.Store == nil {
		return nil, errors.New("peering: a content store is required")
	}
	opts = opts.withDefaults()
	key, err := loadIdentity(filepath.Join(opts.DataDir, "peer-identity.key"))
	if err != nil {
		return nil, err
	}
	listen := make([]ma.Multiaddr, 0, len(opts.ListenAddrs))
	for _, s := range opts.ListenAddrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("peering listen address %q: %w", s, err)
		}
		listen = append(listen, a)
	}
	bootstrap, err := addrInfos(opts.Bootstrap)
	if err != nil {
		return nil, err
	}
	m := newMetrics()
	rm, err := newResourceManager(opts.Registerer, m.limitRefused)
	if err != nil {
		return nil, err
	}
	cm, err := newConnManager()
	if err != nil {
		return nil, errors.Join(err, rm.Close())
	}
	hostOpts := []libp2p.Option{
		libp2p.Identity(key),
		libp2p.ListenAddrs(listen...),
		// TCP only: the member transport secures a stream connection, and QUIC brings its own TLS
		// that no proof of the cluster key could go into before streams open.
		libp2p.NoTransports,
		libp2p.Transport(tcp.NewTCPTransport),
		securityOption(opts.PSK, opts.Encryption),
		libp2p.Muxer(yamux.ID, muxer()),
		libp2p.DisableRelay(),
		libp2p.DisableMetrics(),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionManager(cm),
	}
	plain := opts.PSK != nil && opts.Encryption == EncryptionNone
	d, err := newDirect(opts.DirectListen, key, plain, m, opts.Logger)
	if err != nil {
		return nil, errors.Join(err, rm.Close(), cm.Close())
	}
	h, err := libp2p.New(hostOpts...)
	if err != nil {
		// libp2p owns the resource and connection managers from here, and closes what it started.
		return nil, errors.Join(fmt.Errorf("peering: start host: %w", err), d.close())
	}
	return newOnHost(ctx, opts, h, m, bootstrap, d)
}

// withDefaults fills in what opts leaves unset. New and newOnHost both call it, so that a node
// started on a host of its own (the simulation's) runs with the same settings as any other.
func (opts Options) withDefaults() Options {
	if opts.ReprovideInterval == 0 {
		opts.ReprovideInterval = DefaultReprovideInterval
	}
	if opts.ProvideRate == 0 {
		opts.ProvideRate = DefaultProvideRate
	}
	if opts.DiscoverInterval == 0 {
		opts.DiscoverInterval = 30 * time.Second
	}
	if opts.MinPeers == 0 {
		opts.MinPeers = 8
	}
	if opts.MaxFetchThroughPerPeer == 0 {
		opts.MaxFetchThroughPerPeer = DefaultMaxFetchThroughPerPeer
	}
	if opts.MaxFetchThrough == 0 {
		opts.MaxFetchThrough = DefaultMaxFetchThrough
	}
	if opts.TagTTL == 0 {
		opts.TagTTL = DefaultTagTTL
	}
	if opts.UploadSlots <= 0 {
		opts.UploadSlots = DefaultUploadSlots
	}
	if opts.fetchThroughWait == 0 {
		opts.fetchThroughWait = defaultFetchThroughWait
	}
	if opts.throughAnswerWait == 0 {
		opts.throughAnswerWait = defaultThroughAnswerWait
	}
	if opts.sendStall == 0 {
		opts.sendStall = defaultSendStall
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return opts
}

// newOnHost is New from the DHT on, on a host someone else built: New's, or an in-process network's
// (go-libp2p's mocknet) in the cluster simulation. opts has New's defaults; the node owns h and closes
// it and d (nil: no direct connections), on failure too.
func newOnHost(ctx context.Context, opts Options, h host.Host, m *metrics, bootstrap []peer.AddrInfo, d *direct) (*Node, error) {
	opts = opts.withDefaults()
	records, err := newRecordStore()
	if err != nil {
		return nil, errors.Join(err, h.Close(), d.close())
	}
	kad, err := dht.New(h,
		dht.Mode(dht.ModeServer),
		dht.ProtocolPrefix(ProtocolPrefix),
		dht.DisableValues(),
		dht.Datastore(records),
		// Records of blobs a node evicted expire: it stops reproviding them.
		dht.ProviderManagerOpts(dhtrecords.ProvideValidity(2*opts.ReprovideInterval)),
		dht.BootstrapPeers(bootstrap...),
	)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("peering: start DHT: %w", err), records.Close(), h.Close(), d.close())
	}
	n := &Node{
		opts:    opts,
		host:    h,
		dht:     kad,
		records: records,
		log:     opts.Logger,
		metrics: m,
		bad:     newBadPeers(10 * time.Minute),
		direct:  d,
		through: newFetchThroughLimit(opts.MaxFetchThroughPerPeer, opts.MaxFetchThrough),
		uploads: newUploadSlots(opts.UploadSlots),
		urgent:  make(chan digest.Digest, 4096),
	}
	m.register(opts.Registerer, h, n.uploads, n.sweep.Load)
	n.ctx, n.cancel = context.WithCancel(context.Background())
	h.SetStreamHandler(blobProtocol, n.serve(n.serveBlob))
	h.SetStreamHandler(tagProtocol, n.serve(n.serveTag))
	n.discover = append([]Discoverer{StaticPeers(bootstrap)}, opts.Discover...)
	n.join(ctx)
	if err := kad.Bootstrap(ctx); err != nil {
		n.log.Warn("DHT bootstrap", "err", err)
	}
	events := opts.Store.Subscribe(n.ctx)
	n.wg.Add(4)
	go n.announceLoop(events)
	go n.provideLoop()
	go n.provideStored()
	go n.discoverLoop()
	if d.port() != 0 {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			d.serve(n.ctx)
		}()
	}
	n.log.Info("peering node started", "id", h.ID().String(), "addrs", n.Addrs(), "direct", d.addr(), "member", opts.PSK != nil, "encryption", encryptionName(opts))
	return n, nil
}

// ID is the node's peer ID.
func (n *Node) ID() peer.ID { return n.host.ID() }

// Addrs are the node's full multiaddrs, /p2p/<id> included, as other nodes bootstrap from them.
func (n *Node) Addrs() []string {
	var out []string
	for _, a := range n.host.Addrs() {
		out = append(out, a.String()+"/p2p/"+n.host.ID().String())
	}
	return out
}

// Peers is the number of peers connected.
func (n *Node) Peers() int { return len(n.host.Network().Peers()) }

// PeerInfo is a connected peer.
type PeerInfo struct {
	ID peer.ID
	// Addrs are the remote addresses of the connections to it.
	Addrs []string
}

// ConnectedPeers lists the peers connected now, with the addresses they are reached at.
func (n *Node) ConnectedPeers() []PeerInfo {
	net := n.host.Network()
	peers := net.Peers()
	out := make([]PeerInfo, 0, len(peers))
	for _, p := range peers {
		info := PeerInfo{ID: p}
		for _, c := range net.ConnsToPeer(p) {
			info.Addrs = append(info.Addrs, c.RemoteMultiaddr().String())
		}
		out = append(out, info)
	}
	slices.SortFunc(out, func(a, b PeerInfo) int { return strings.Compare(a.ID.String(), b.ID.String()) })
	return out
}

// Connect dials a peer given as a multiaddr ending in /p2p/<id>.
func (n *Node) Connect(ctx context.Context, addr string) error {
	infos, err := addrInfos([]string{addr})
	if err != nil {
		return err
	}
	return n.host.Connect(ctx, infos[0])
}

// announceLoop announces what the store starts fetching (readable in flight from then on), has the
// sweeping provider reprovide what it commits, and stops reproviding what it removes: that blob's
// records expire.
func (n *Node) announceLoop(events <-chan content.Event) {
	defer n.wg.Done()
	for ev := range events {
		switch ev.Kind {
		case content.EventFetching:
			n.Announce(ev.Digest)
		case content.EventCommitted:
			n.keep(ev.Digest)
		case content.EventRemoved:
			n.forget(ev.Digest)
		}
	}
}

// Announce queues d to be provided at once, one digest at a time: peers find the blob while it is
// still arriving, which a region of the sweeping provider's would delay. It never blocks: when the
// queue is full, d is provided when it is committed.
func (n *Node) Announce(d digest.Digest) {
	select {
	case n.urgent <- d:
	default:
		n.metrics.provideDropped.Inc()
	}
}

// Close stops announcing and closes the host. It may be called more than once.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		n.cancel()
		directErr := n.direct.close() // ends its accept loop
		n.wg.Wait()
		var sweepErr error
		if sweep := n.sweep.Load(); sweep != nil {
			sweepErr = sweep.Close()
		}
		dhtErr := n.dht.Close() // writes the records it buffers, before they are closed
		n.closeErr = errors.Join(sweepErr, directErr, dhtErr, n.records.Close(), n.host.Close())
	})
	return n.closeErr
}

// provideWorkers is how many announcements may be under way at once: each is a DHT lookup and a few
// RPCs, mostly waiting on the network.
const provideWorkers = 4

// provideLoop announces the content this node starts fetching, at most ProvideRate a second.
func (n *Node) provideLoop() {
	defer n.wg.Done()
	tick := time.NewTicker(time.Second / time.Duration(n.opts.ProvideRate))
	defer tick.Stop()
	sem := make(chan struct{}, provideWorkers)
	var workers sync.WaitGroup
	defer workers.Wait()
	for {
		var d digest.Digest
		select {
		case <-n.ctx.Done():
			return
		case d = <-n.urgent:
		}
		select {
		case <-n.ctx.Done():
			return
		case <-tick.C:
		}
		c, err := DigestCID(d)
		if err != nil {
			continue
		}
		select {
		case <-n.ctx.Done():
			return
		case sem <- struct{}{}:
		}
		workers.Add(1)
		go func() {
			defer func() { <-sem; workers.Done() }()
			start := time.Now()
			ctx, cancel := context.WithTimeout(n.ctx, 30*time.Second)
			err := n.dht.Provide(ctx, c, true)
			cancel()
			n.metrics.observe(n.metrics.provide, start, err)
			if err != nil && n.ctx.Err() == nil {
				n.log.Debug("provide failed; the next round retries", "digest", d, "err", err)
			}
		}()
	}
}

// provideStored starts the sweeping provider once the node has a peer, and hands it every blob the
// store holds. A node that restarts holds blobs nobody knows of: their records lived in the other
// nodes' memory and have expired or will. The provider announces them at once, region by region
// (one DHT lookup a region, not one a digest), then again every ReprovideInterval.
//
// Not before the first peer: a provider started alone finds itself offline and probes again with
// a backoff of up to a minute, and a node that pulled alone (the first node of a cluster) would
// stay unknown that long after its peers joined.
func (n *Node) provideStored() {
	defer n.wg.Done()
	first := time.NewTicker(250 * time.Millisecond)
	for n.dht.RoutingTable().Size() == 0 {
		select {
		case <-n.ctx.Done():
			first.Stop()
			return
		case <-first.C:
		}
	}
	first.Stop()
	sweep, err := provider.New(
		provider.WithHost(n.host),
		provider.WithRouter(n.dht),
		provider.WithMessageSender(n.dht.MessageSender()),
		provider.WithSelfAddrs(n.host.Addrs),
		provider.WithAddLocalRecord(func(ctx context.Context, key mh.Multihash) error {
			return n.dht.ProviderStore().AddProvider(ctx, key, peer.AddrInfo{ID: n.host.ID()})
		}),
		provider.WithReprovideInterval(n.opts.ReprovideInterval),
		// A region may be reprovided this late (the schedule shifts as regions split and merge):
		// its records, which live 2 intervals, must not expire meanwhile.
		provider.WithMaxReprovideDelay(n.opts.ReprovideInterval/2),
	)
	if err != nil {
		n.log.Error("reprovide: start the provider; held blobs are announced only when fetched", "err", err)
		return
	}
	// Blobs committed or removed from here on reach the provider through keep and forget; the
	// walk below covers what the store held before.
	n.sweep.Store(sweep)
	const batch = 1024
	keys := make([]mh.Multihash, 0, batch)
	held := make([]digest.Digest, 0, batch)
	flush := func() {
		if err := sweep.StartProviding(false, keys...); err != nil && n.ctx.Err() == nil {
			n.log.Warn("reprovide: hand stored blobs to the provider", "err", err)
		}
		// A blob removed after the walk read it may have had its forget before the batch went in:
		// drop it now. One removed later gets its forget after this.
		for i, d := range held {
			if _, err := n.opts.Store.Stat(d); errors.Is(err, content.ErrNotFound) {
				_ = sweep.StopProviding(keys[i])
			}
		}
		keys, held = keys[:0], held[:0]
	}
	err = n.opts.Store.Walk(func(info content.Info) error {
		if err := n.ctx.Err(); err != nil {
			return err
		}
		if key, err := digestKey(info.Digest); err == nil {
			keys, held = append(keys, key), append(held, info.Digest)
		}
		if len(keys) == batch {
			flush()
		}
		return nil
	})
	if err != nil && n.ctx.Err() == nil {
		n.log.Warn("reprovide: walk the content store", "err", err)
	}
	if len(keys) > 0 && n.ctx.Err() == nil {
		flush()
	}
}

// keep has the sweeping provider provide d, if it is new to it, and reprovide it from then on.
func (n *Node) keep(d digest.Digest) {
	sweep, key, ok := n.sweepKey(d)
	if !ok {
		return // before the first peer, provideStored's walk covers it
	}
	if err := sweep.StartProviding(false, key); err != nil && n.ctx.Err() == nil {
		n.log.Warn("reprovide: add a blob", "digest", d, "err", err)
	}
}

// forget stops reproviding d, which the store removed.
func (n *Node) forget(d digest.Digest) {
	sweep, key, ok := n.sweepKey(d)
	if !ok {
		return
	}
	if err := sweep.StopProviding(key); err != nil && n.ctx.Err() == nil {
		n.log.Warn("reprovide: drop a removed blob", "digest", d, "err", err)
	}
}

// sweepKey returns the sweeping provider, once there is one, and d's key in it.
func (n *Node) sweepKey(d digest.Digest) (*provider.SweepingProvider, mh.Multihash, bool) {
	sweep := n.sweep.Load()
	if sweep == nil {
		return nil, nil, false
	}
	key, err := digestKey(d)
	return sweep, key, err == nil
}

// digestKey is d's multihash, the key of its provider records.
func digestKey(d digest.Digest) (mh.Multihash, error) {
	c, err := DigestCID(d)
	if err != nil {
		return nil, err
	}
	return c.Hash(), nil
}

// DigestCID is the DHT key of a digest: a CIDv1 with the raw codec over the digest's own multihash,
// the CID the same bytes have as a single raw block in IPFS.
func DigestCID(d digest.Digest) (cid.Cid, error) {
	if err := d.Validate(); err != nil {
		return cid.Cid{}, err
	}
	code := uint64(mh.SHA2_256)
	switch d.Algorithm() {
	case digest.SHA256:
	case digest.SHA512:
		code = mh.SHA2_512
	default:
		return cid.Cid{}, fmt.Errorf("no multihash for %s", d.Algorithm())
	}
	raw, err := hex.DecodeString(d.Encoded())
	if err != nil {
		return cid.Cid{}, err
	}
	m, err := mh.Encode(raw, code)
	if err != nil {
		return cid.Cid{}, err
	}
	return cid.NewCidV1(cid.Raw, m), nil
}

// muxer is libp2p's yamux with larger frames: blobs are the traffic, and a 64 KiB frame costs a
// header and a window update for every 64 KiB of a layer.
//
// The first window stays yamux's 256 KiB. yamux grows it only when updates come back within four
// round trips, which between two namespaces (tens of microseconds) they rarely do; yet a 16 MiB
// first window, and striping a blob over 4 streams, were no faster there on a quiet machine (a warm
// 256 MiB blob in 0.31-0.56 s either way, 0.26-0.42 s over HTTPS; runs on a loaded machine said
// otherwise, both ways). A larger window would cost, too: it is one setting for every stream of a
// connection, of which yamux reserves 256 KiB from the resource manager, and the rest is memory a
// peer can fill unaccounted; reserved whole (a refused reservation for an inbound stream closes the
// connection), a node's DHT streams to hundreds of peers would not fit.
func muxer() *yamux.Transport {
	cfg := *(*yamuxlib.Config)(yamux.DefaultTransport)
	cfg.MaxMessageSize = 1 << 20
	cfg.ReadBufSize = 1 << 20
	return (*yamux.Transport)(&cfg)
}

// leaderLookup bounds the DHT lookup that names a digest's leader.
const leaderLookup = 5 * time.Second

// leader is the node that fetches d through for the others when nobody has it yet: of every node of
// the cluster, the one closest to d's key, found by a DHT lookup (the same one that places d's
// provider records), so that all nodes agree however large the cluster and however much their
// routing tables differ. It is false when this node leads.
//
// A lookup cut short by its deadline (a cluster whose nodes all start at once, on busy CPUs) still
// names the closest peers it heard of: they are nearer the key than this node's own routing table,
// which only breaks the tie when the lookup found nobody. Nodes whose lookups stopped at different
// points may then ask different nodes; a node asked that knows a closer one sends them on to it
// (closerNode), so that one node fetches. A node that takes itself for the leader fetches without
// asking anyone: when its lookup missed a closer node, the registry serves the blob twice.
func (n *Node) leader(ctx context.Context, d digest.Digest) (peer.ID, bool) {
	c, err := DigestCID(d)
	if err != nil {
		return "", false
	}
	key := string(c.Hash())
	lctx, cancel := context.WithTimeout(ctx, leaderLookup)
	defer cancel()
	nearest, err := n.dht.GetClosestPeers(lctx, key)
	if err != nil {
		n.log.Debug("leader lookup cut short; taking the closest peers it heard of", "digest", d, "heard", len(nearest), "err", err)
	}
	nearest = append(nearest, n.dht.RoutingTable().NearestPeers(kb.ConvertKey(key), 1)...)
	if len(nearest) == 0 {
		return "", false
	}
	best := nearest[0]
	for _, p := range nearest[1:] {
		if kb.Closer(p, best, key) {
			best = p
		}
	}
	if kb.Closer(n.host.ID(), best, key) {
		return "", false
	}
	return best, true
}

// closerNode returns the node of this node's routing table closest to d's key, if it is closer to the
// key than this node: the node that leads for d as far as this node knows. Nodes close to a key know
// the nodes around it (the DHT keeps them in its fullest buckets), so a node that an asker's cut
// short lookup took for the leader mostly knows the real one without a lookup of its own.
func (n *Node) closerNode(d digest.Digest) (peer.ID, bool) {
	c, err := DigestCID(d)
	if err != nil {
		return "", false
	}
	key := string(c.Hash())
	nearest := n.dht.RoutingTable().NearestPeers(kb.ConvertKey(key), 1)
	if len(nearest) == 0 || !kb.Closer(nearest[0], n.host.ID(), key) {
		return "", false
	}
	return nearest[0], true
}

// reject records that p sent bad bytes for d: p is skipped for d for a while.
func (n *Node) reject(p peer.ID, d digest.Digest, reason string, err error) {
	n.bad.add(p, d)
	n.metrics.badPeer.WithLabelValues(reason).Inc()
	n.log.Warn("peer sent bad content; skipping it for this digest", "peer", p, "digest", d, "reason", reason, "err", err)
}

// badPeers remembers, for a while, which peer failed which digest.
type badPeers struct {
	ttl time.Duration
	mu  sync.Mutex
	m   map[badKey]time.Time
}

type badKey struct {
	p peer.ID
	d digest.Digest
}

func newBadPeers(ttl time.Duration) *badPeers {
	return &badPeers{ttl: ttl, m: make(map[badKey]time.Time)}
}

func (b *badPeers) add(p peer.ID, d digest.Digest) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	for k, t := range b.m {
		if now.Sub(t) > b.ttl {
			delete(b.m, k)
		}
	}
	b.m[badKey{p, d}] = now
}

func (b *badPeers) has(p peer.ID, d digest.Digest) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	t, ok := b.m[badKey{p, d}]
	return ok && time.Since(t) < b.ttl
}

func addrInfos(addrs []string) ([]peer.AddrInfo, error) {
	var out []peer.AddrInfo
	for _, s := range addrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("peer address %q: %w", s, err)
		}
		info, err := peer.AddrInfoFromP2pAddr(a)
		if err != nil {
			return nil, fmt.Errorf("peer address %q: want a multiaddr ending in /p2p/<peer id>: %w", s, err)
		}
		out = append(out, *info)
	}
	return out, nil
}
