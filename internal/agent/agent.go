package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/imagemesh/imagemesh/internal/clustersync"
	"github.com/imagemesh/imagemesh/internal/kubeclient"
	"github.com/imagemesh/imagemesh/internal/statuspage"
	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/hostconfig"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
	"github.com/imagemesh/imagemesh/pkg/peering"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/ipfs"
	storjsource "github.com/imagemesh/imagemesh/pkg/source/storj"
	"github.com/imagemesh/imagemesh/pkg/storjaccess"
)

// Version is set at build time.
var Version = "dev"

// NewLogger returns the structured logger the config asks for.
func NewLogger(c LogConfig) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

// Run runs the agent until ctx is done, then shuts down gracefully.
//
// The parts are built in the order their dependencies run: the store; the trusted sources; the
// mirror over them; the peering node, which serves peers through the mirror and subscribes to the
// store's events; then the mirror's source becomes peers first. Nothing refers back to something
// built after it.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid configuration:\n%w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// The ports are taken first: a port in use fails the start before anything else is done, and the
	// mirror's URL (for hosts.toml) is known. Connections wait in the backlog until serving starts.
	lns, err := listen(cfg)
	if err != nil {
		return err
	}
	defer lns.close()

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	maxBytes, err := cfg.Cache.MaxBytes.Resolve(cfg.DataDir)
	if err != nil {
		return err
	}
	store, err := content.Open(filepath.Join(cfg.DataDir, "content"), content.Options{
		MaxBytes:      maxBytes,
		HighWatermark: cfg.Cache.HighWatermark,
		LowWatermark:  cfg.Cache.LowWatermark,
		UntrustedHold: untrustedHold(cfg.Cache.UntrustedHold),
		Registerer:    reg,
		Logger:        log.With("component", "content"),
	})
	if err != nil {
		return err
	}
	defer closeLogged(log, "content store", store)

	src, err := newSources(cfg, reg, log)
	if err != nil {
		return err
	}
	// The agent as containerd reaches it, with the node token in a header when the API requires it.
	mirrorHost := hostconfig.Mirror{URL: lns.mirrorURL}
	var nodeToken string
	if cfg.NodeTokenRequired() {
		token, created, err := loadNodeToken(cfg.DataDir)
		if err != nil {
			return err
		}
		nodeToken = token
		mirrorHost.Header = map[string]string{mirror.NodeTokenHeader: token}
		// Where the token is, never the token.
		log.Info("the pull API answers only requests with the node token", "header", mirror.NodeTokenHeader,
			"file", filepath.Join(cfg.DataDir, NodeTokenFile), "new", created)
	}
	m, err := mirror.New(mirror.Options{
		Store:           store,
		Source:          src.trusted,
		DefaultRegistry: cfg.DefaultRegistry,
		Registries:      cfg.Registries,
		TagTTL:          time.Duration(cfg.TagTTL),
		TagDir:          filepath.Join(cfg.DataDir, "tags"),
		NodeToken:       nodeToken,
		Registerer:      reg,
		Logger:          log.With("component", "mirror"),
	})
	if err != nil {
		return err
	}

	var cs *clustersync.Sync
	if !cfg.Cluster.ConfigMap.IsZero() {
		if cs, err = newClusterSync(cfg, mirrorHost, m, src, reg, log.With("component", "cluster")); err != nil {
			return err
		}
		// Until the cluster's configuration is applied, only what the agent's own configuration names.
		m.SetRegistries(append(slices.Clone(cfg.Registries), cfg.HostConfig.Registries...))
	}

	var node *peering.Node
	if cfg.Peering.Enabled() {
		// Peers that ask this node to lead a fetch get it from the trusted sources only, so that no
		// request goes round the cluster.
		fetchThrough := func(ctx context.Context, obj source.Object) (*content.Reader, error) {
			return m.FetchBlob(ctx, obj, src.trusted)
		}
		if node, err = startPeering(ctx, cfg, store, fetchThrough, m.CachedTag, reg, log.With("component", "peering")); err != nil {
			return err
		}
		defer closeLogged(log, "peering node", node)
		// Peers first for content; for tags, only after the registry, and only if allowed: by the
		// agent's configuration, or by the ImageSource of the registry.
		peers := node.Source()
		if cs != nil && !cfg.Peering.ResolveTags {
			peers.TagsAllowed = cs.PeersMayResolve
		}
		m.SetSource(source.NewChain(
			source.Link{Source: peers, TagFallback: cfg.Peering.ResolveTags || cs != nil},
			source.Link{Source: src.decentralized, TagFallback: true},
			source.Link{Source: src.upstream, ResolveTags: true},
		))
	}

	// The port is held, so containerd is never pointed at a port nobody holds.
	if cfg.HostConfig.Dir != "" && len(cfg.HostConfig.Registries) > 0 {
		if err := applyHostConfig(cfg, mirrorHost, log); err != nil {
			return err
		}
	}

	var ready atomic.Bool
	started := time.Now()
	status := statuspage.Handler(func() statuspage.Status {
		s := statuspage.Status{
			Version: Version, Node: cfg.Cluster.NodeName, Started: started, Now: time.Now(),
			Cache:            statuspage.Cache{Bytes: store.Size(), MaxBytes: store.MaxBytes(), Blobs: store.Blobs()},
			Journal:          m.Journal(),
			StaticRegistries: staticRegistries(cfg),
		}
		if node != nil {
			s.Peering, s.PeerID, s.Peers = true, node.ID().String(), node.ConnectedPeers()
		}
		if cs != nil {
			cst := cs.Status()
			s.Cluster = &cst
		}
		return s
	}, log.With("component", "status"))
	servers := lns.servers(m, node, reg, &ready, status, log)
	g, gctx := errgroup.WithContext(ctx)
	servers.serve(g)
	if cs != nil {
		g.Go(func() error { return cs.Run(gctx) })
	}
	ready.Store(true)
	attrs := []any{"version", Version, "listen", lns.api.Addr().String(), "dataDir", cfg.DataDir,
		"cacheMaxBytes", store.MaxBytes(), "cacheLimit", cfg.Cache.MaxBytes.String(), "defaultRegistry", cfg.DefaultRegistry, "upstreams", upstreamSummary(cfg.Upstreams)}
	if lns.ops != nil {
		attrs = append(attrs, "metricsListen", lns.ops.Addr().String())
	}
	if node != nil {
		attrs = append(attrs, "peerID", node.ID().String(), "peerAddrs", node.Addrs())
	}
	log.Info("node agent serving", attrs...)

	g.Go(func() error {
		<-gctx.Done()
		ready.Store(false)
		log.Info("shutting down; waiting for transfers under way", "timeout", time.Duration(cfg.ShutdownTimeout).String())
		sctx, cancel := context.WithTimeout(context.Background(), time.Duration(cfg.ShutdownTimeout))
		defer cancel()
		return servers.shutdown(sctx)
	})
	err = g.Wait()
	if cs != nil {
		cs.Cleanup(context.Background())
	}
	log.Info("node agent stopped")
	return err
}

// sources are the agent's sources besides the peers: the registries, and the registries'
// decentralized sources (Storj buckets, IPFS roots).
type sources struct {
	upstream      *source.Registry
	decentralized *source.ByRegistry
	static        map[string][]source.Source // the decentralized sources of the agent's own configuration
	// trusted is decentralized then upstream: the decentralized sources are asked before the registry
	// for content; for tags, after it: a published root can be older than the registry, and is the
	// fallback when the registry is down or absent.
	trusted source.Source
}

func newSources(cfg Config, reg prometheus.Registerer, log *slog.Logger) (*sources, error) {
	endpoints, err := endpoints(cfg.Upstreams)
	if err != nil {
		return nil, err
	}
	upstream, err := source.NewRegistry(source.RegistryOptions{
		Endpoints:  endpoints,
		Registerer: reg,
		Logger:     log.With("component", "upstream"),
		UserAgent:  "imagemesh-node-agent/" + Version,
	})
	if err != nil {
		return nil, err
	}
	static, err := decentralizedSources(cfg.Upstreams)
	if err != nil {
		return nil, err
	}
	decentralized := source.NewByRegistry()
	decentralized.Set(static)
	return &sources{
		upstream:      upstream,
		decentralized: decentralized,
		static:        static,
		trusted: source.NewChain(
			source.Link{Source: decentralized, TagFallback: true},
			source.Link{Source: upstream, ResolveTags: true},
		),
	}, nil
}

func newClusterSync(cfg Config, mirrorHost hostconfig.Mirror, m *mirror.Mirror, src *sources, reg prometheus.Registerer, log *slog.Logger) (*clustersync.Sync, error) {
	client, err := connectKubernetes(cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("cluster configuration: %w", err)
	}
	return clustersync.New(clustersync.Options{
		Client:           client,
		ConfigMap:        cfg.Cluster.ConfigMap.NamespacedName,
		Node:             cfg.Cluster.NodeName,
		DaemonSet:        cfg.Cluster.DaemonSet.NamespacedName,
		HostsDir:         cfg.HostConfig.Dir,
		MirrorHost:       mirrorHost,
		StaticHosts:      cfg.HostConfig.Registries,
		StaticRegistries: cfg.Registries,
		StaticSources:    src.static,
		Upstream:         src.upstream,
		Decentralized:    src.decentralized,
		Mirror:           m,
		NewSource:        newSource,
		Registerer:       reg,
		Logger:           log,
	})
}

// staticRegistries are the registries the agent's own configuration names: those it writes hosts.toml
// for, those it is limited to, and those it has upstreams for, once each.
func staticRegistries(cfg Config) []string {
	var out []string
	for _, h := range slices.Concat(cfg.HostConfig.Registries, cfg.Registries, upstreamHosts(cfg.Upstreams)) {
		if !slices.Contains(out, h) {
			out = append(out, h)
		}
	}
	return out
}

func upstreamHosts(ups []Upstream) []string {
	out := make([]string, len(ups))
	for i, u := range ups {
		out[i] = u.Host
	}
	return out
}

// closeLogged closes c at the end of Run; a failure is logged, as Run's own error is the one that
// says why it stopped.
func closeLogged(log *slog.Logger, what string, c io.Closer) {
	if err := c.Close(); err != nil {
		log.Warn("close "+what, "err", err)
	}
}

func endpoints(ups []Upstream) (map[string]source.Endpoint, error) {
	eps := make(map[string]source.Endpoint, len(ups))
	for _, u := range ups {
		if u.Endpoint == "" {
			continue // https://<host>
		}
		ep, err := url.Parse(u.Endpoint)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: %w", u.Host, err)
		}
		e := source.Endpoint{URL: ep, Username: u.Username, CAFile: u.CAFile, InsecureSkipVerify: u.InsecureSkipVerify}
		if u.PasswordFile != "" {
			pw, err := os.ReadFile(u.PasswordFile)
			if err != nil {
				return nil, fmt.Errorf("upstream %s: password file: %w", u.Host, err)
			}
			e.Password = strings.TrimRight(string(pw), "\r\n")
		}
		eps[u.Host] = e
	}
	return eps, nil
}

// upstreamSummary is what the log may say about upstreams: hosts and endpoints, never credentials.
func upstreamSummary(ups []Upstream) string {
	parts := make([]string, 0, len(ups))
	for _, u := range ups {
		s := u.Host + "=" + u.Endpoint
		if u.Username != "" {
			s += " (authenticated)"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

func applyHostConfig(cfg Config, mirrorHost hostconfig.Mirror, log *slog.Logger) error {
	servers := map[string]string{}
	for _, u := range cfg.Upstreams {
		servers[u.Host] = strings.TrimSuffix(u.Endpoint, "/")
	}
	var regs []hostconfig.Registry
	for _, host := range cfg.HostConfig.Registries {
		regs = append(regs, hostconfig.Registry{Host: host, Server: servers[host], Mirrors: []hostconfig.Mirror{mirrorHost}})
	}
	changed, err := hostconfig.Apply(cfg.HostConfig.Dir, regs)
	if len(changed) > 0 {
		log.Info("wrote containerd hosts.toml", "dir", cfg.HostConfig.Dir, "registries", changed, "mirror", mirrorHost.URL,
			"nodeToken", len(mirrorHost.Header) > 0)
	}
	if err != nil {
		return fmt.Errorf("containerd host configuration: %w", err)
	}
	return nil
}

// startPeering starts the node's libp2p host.
func startPeering(ctx context.Context, cfg Config, store *content.Store, fetchThrough peering.FetchThroughFunc,
	cachedTag peering.CachedTagFunc, reg prometheus.Registerer, log *slog.Logger) (*peering.Node, error) {
	p := cfg.Peering
	opts := peering.Options{
		ListenAddrs:       p.Listen,
		DirectListen:      p.DirectListen,
		Open:              p.Open,
		Encryption:        peering.Encryption(p.Encryption),
		DataDir:           cfg.DataDir,
		Bootstrap:         p.Bootstrap,
		Store:             store,
		ReprovideInterval: time.Duration(p.ReprovideInterval),
		ProvideRate:       p.ProvideRate,
		TagTTL:            time.Duration(p.TagTTL),
		UploadSlots:       p.UploadSlots,
		Registerer:        reg,
		Logger:            log,
		FetchThrough:      fetchThrough,
		CachedTag:         cachedTag,
	}
	if p.KeyFile != "" {
		psk, err := peering.LoadPSK(p.KeyFile)
		if err != nil {
			return nil, err
		}
		opts.PSK = psk
	}
	if k := p.Kubernetes; k != nil {
		client, err := connectKubernetes(cfg.Kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("peering through Kubernetes: %w", err)
		}
		opts.Discover = append(opts.Discover, peering.KubernetesPeers{Client: client, Namespace: k.Service.Namespace, Service: k.Service.Name, PortName: k.PortName})
	}
	for _, d := range p.DNS {
		opts.Discover = append(opts.Discover, peering.DNSPeers{Host: d.Host, Port: d.Port})
	}
	return peering.New(ctx, opts)
}

// connectKubernetes connects to the API server: with kubeconfig outside the cluster, with the pod's
// service account inside.
func connectKubernetes(kubeconfig string) (*kubeclient.Client, error) {
	var rc *rest.Config
	var err error
	if kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, err
	}
	rc.UserAgent = "imagemesh-node-agent/" + Version
	return kubeclient.New(rc)
}

// decentralizedSources builds the sources the configuration names for each registry.
func decentralizedSources(ups []Upstream) (map[string][]source.Source, error) {
	out := map[string][]source.Source{}
	for _, u := range ups {
		for _, spec := range u.Sources {
			var access string
			if spec.Type == mirrorconfig.SourceStorj {
				a, err := storjaccess.Load("", spec.AccessFile)
				if err != nil {
					return nil, fmt.Errorf("upstream %s: Storj bucket %s: %w", u.Host, spec.Bucket, err)
				}
				if access, err = a.Serialize(); err != nil {
					return nil, fmt.Errorf("upstream %s: Storj bucket %s: %w", u.Host, spec.Bucket, err)
				}
			}
			src, err := newSource(spec, access)
			if err != nil {
				return nil, fmt.Errorf("upstream %s: %w", u.Host, err)
			}
			out[u.Host] = append(out[u.Host], src)
		}
	}
	return out, nil
}

// newSource builds one decentralized source; access is a Storj source's serialized grant.
func newSource(spec mirrorconfig.Source, access string) (source.Source, error) {
	switch spec.Type {
	case mirrorconfig.SourceIPFS:
		return ipfs.New(ipfs.Options{API: spec.Endpoint, Root: spec.Root})
	case mirrorconfig.SourceStorj:
		return storjsource.New(storjsource.Options{Access: access, Bucket: spec.Bucket, Prefix: spec.Prefix})
	}
	return nil, fmt.Errorf("%s sources are not supported yet", spec.Type)
}

// untrustedHold maps the configuration's hold, where 0 means none, to the store's, where 0 means
// the default.
func untrustedHold(d Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return time.Duration(d)
}
