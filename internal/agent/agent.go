package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

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
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid configuration:\n%w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// The store announces what it holds and what it is fetching through the peering node, which
	// needs the store to start: the hooks find the node once it is there.
	var node atomic.Pointer[peering.Node]
	announce := func(d digest.Digest) {
		if n := node.Load(); n != nil {
			n.Announce(d)
		}
	}
	store, err := content.Open(filepath.Join(cfg.DataDir, "content"), content.Options{
		OnCommit:      announce,
		OnFetch:       announce,
		MaxBytes:      int64(cfg.Cache.MaxBytes),
		HighWatermark: cfg.Cache.HighWatermark,
		LowWatermark:  cfg.Cache.LowWatermark,
		Registerer:    reg,
		Logger:        log.With("component", "content"),
	})
	if err != nil {
		return err
	}
	defer store.Close()

	endpoints, err := endpoints(cfg.Upstreams)
	if err != nil {
		return err
	}
	upstream, err := source.NewRegistry(source.RegistryOptions{
		Endpoints:  endpoints,
		Registerer: reg,
		Logger:     log.With("component", "upstream"),
		UserAgent:  "imagemesh-node-agent/" + Version,
	})
	if err != nil {
		return err
	}
	// The registries' decentralized sources (IPFS roots) are asked before the registry for content;
	// for tags, after it: a published root can be older than the registry, and is the fallback when
	// the registry is down or absent.
	decentralized := source.NewByRegistry()
	static, err := decentralizedSources(cfg.Upstreams)
	if err != nil {
		return err
	}
	decentralized.Set(static)
	trusted := source.NewChain(
		source.Link{Source: decentralized, TagFallback: true},
		source.Link{Source: upstream, ResolveTags: true},
	)
	chain := trusted
	var m *mirror.Mirror
	var cs *clusterSync
	if cfg.Cluster.ConfigMap != "" {
		client, err := connectKubernetes(cfg.Kubeconfig)
		if err != nil {
			return fmt.Errorf("cluster configuration: %w", err)
		}
		ns, name, _ := strings.Cut(cfg.Cluster.ConfigMap, "/")
		cs = &clusterSync{
			client: client, namespace: ns, configMap: name, node: cfg.Cluster.NodeName, daemonSet: cfg.Cluster.DaemonSet,
			hostsDir: cfg.HostConfig.Dir, staticHosts: cfg.HostConfig.Registries, staticRegistries: cfg.Registries,
			upstream: upstream, mirror: func() *mirror.Mirror { return m },
			decentralized: decentralized, staticSources: static,
			log: log.With("component", "cluster"), prefetched: map[string]bool{},
		}
		cs.registries, cs.syncs = newClusterMetrics(reg)
	}
	if cfg.Peering.Enabled() {
		n, err := startPeering(ctx, cfg, store, reg, log.With("component", "peering"), trusted, func() *mirror.Mirror { return m })
		if err != nil {
			return err
		}
		defer n.Close()
		node.Store(n)
		// Peers first for content; for tags, only after the registry, and only if allowed: by the
		// agent's configuration, or by the ImageSource of the registry.
		peers := n.Source()
		if cs != nil && !cfg.Peering.ResolveTags {
			peers.TagsAllowed = cs.peersMayResolve
		}
		chain = source.NewChain(
			source.Link{Source: peers, TagFallback: cfg.Peering.ResolveTags || cs != nil},
			source.Link{Source: decentralized, TagFallback: true},
			source.Link{Source: upstream, ResolveTags: true},
		)
	}
	m, err = mirror.New(mirror.Options{
		Store:           store,
		Source:          chain,
		DefaultRegistry: cfg.DefaultRegistry,
		Registries:      cfg.Registries,
		TagTTL:          time.Duration(cfg.TagTTL),
		TagDir:          filepath.Join(cfg.DataDir, "tags"),
		Registerer:      reg,
		Logger:          log.With("component", "mirror"),
	})
	if err != nil {
		return err
	}
	if cs != nil {
		// Until the cluster's configuration is applied, only what the agent's own configuration names.
		m.SetRegistries(append(append([]string{}, cfg.Registries...), cfg.HostConfig.Registries...))
	}

	// Listen before writing hosts.toml, so that containerd is never pointed at a port nobody holds.
	apiLn, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	var ready atomic.Bool
	api := http.NewServeMux()
	api.Handle("/v2/", m)
	api.Handle("/v2", m)
	if n := node.Load(); n != nil {
		api.Handle(peering.InfoPath, n.InfoHandler())
	}
	ops := api
	var metricsLn net.Listener
	if cfg.MetricsListen != "" {
		if metricsLn, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			apiLn.Close()
			return fmt.Errorf("listen %s: %w", cfg.MetricsListen, err)
		}
		ops = http.NewServeMux()
	}
	ops.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	ops.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	ops.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "not ready\n", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	if ops != api {
		// The health endpoints answer on the API address too: that is what a hosts.toml user can see.
		api.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	}

	if cfg.HostConfig.Dir != "" && len(cfg.HostConfig.Registries) > 0 {
		if err := applyHostConfig(cfg, apiLn.Addr().String(), log); err != nil {
			apiLn.Close()
			if metricsLn != nil {
				metricsLn.Close()
			}
			return err
		}
	}

	if cs != nil {
		cs.mirrorURL = cfg.HostConfig.MirrorURL
		if cs.mirrorURL == "" {
			cs.mirrorURL = "http://" + apiLn.Addr().String()
		}
	}

	servers := []*http.Server{newServer(api, log)}
	listeners := []net.Listener{apiLn}
	if metricsLn != nil {
		servers = append(servers, newServer(ops, log))
		listeners = append(listeners, metricsLn)
	}
	g, gctx := errgroup.WithContext(ctx)
	for i := range servers {
		srv, ln := servers[i], listeners[i]
		g.Go(func() error {
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve %s: %w", ln.Addr(), err)
			}
			return nil
		})
	}
	if cs != nil {
		g.Go(func() error { return cs.run(gctx) })
	}
	ready.Store(true)
	attrs := []any{"version", Version, "listen", apiLn.Addr().String(), "dataDir", cfg.DataDir,
		"cacheMaxBytes", int64(cfg.Cache.MaxBytes), "defaultRegistry", cfg.DefaultRegistry, "upstreams", upstreamSummary(cfg.Upstreams)}
	if metricsLn != nil {
		attrs = append(attrs, "metricsListen", metricsLn.Addr().String())
	}
	if n := node.Load(); n != nil {
		attrs = append(attrs, "peerID", n.ID().String(), "peerAddrs", n.Addrs())
	}
	log.Info("node agent serving", attrs...)

	g.Go(func() error {
		<-gctx.Done()
		ready.Store(false)
		log.Info("shutting down; waiting for transfers under way", "timeout", time.Duration(cfg.ShutdownTimeout).String())
		sctx, cancel := context.WithTimeout(context.Background(), time.Duration(cfg.ShutdownTimeout))
		defer cancel()
		var errs []error
		for _, srv := range servers {
			if err := srv.Shutdown(sctx); err != nil {
				errs = append(errs, err)
				srv.Close()
			}
		}
		return errors.Join(errs...)
	})
	err = g.Wait()
	if cs != nil {
		cs.cleanup(context.Background())
	}
	if n := node.Load(); n != nil {
		n.Close()
	}
	store.Close()
	log.Info("node agent stopped")
	return err
}

func newServer(h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// No WriteTimeout: a layer of several GiB to a slow node is a legitimate, long answer.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
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

func applyHostConfig(cfg Config, listenAddr string, log *slog.Logger) error {
	mirrorURL := cfg.HostConfig.MirrorURL
	if mirrorURL == "" {
		mirrorURL = "http://" + listenAddr
	}
	servers := map[string]string{}
	for _, u := range cfg.Upstreams {
		servers[u.Host] = strings.TrimSuffix(u.Endpoint, "/")
	}
	var regs []hostconfig.Registry
	for _, host := range cfg.HostConfig.Registries {
		regs = append(regs, hostconfig.Registry{Host: host, Server: servers[host], Mirrors: []hostconfig.Mirror{{URL: mirrorURL}}})
	}
	changed, err := hostconfig.Apply(cfg.HostConfig.Dir, regs)
	if len(changed) > 0 {
		log.Info("wrote containerd hosts.toml", "dir", cfg.HostConfig.Dir, "registries", changed, "mirror", mirrorURL)
	}
	if err != nil {
		return fmt.Errorf("containerd host configuration: %w", err)
	}
	return nil
}

// startPeering starts the node's libp2p host. Peers that ask this node to lead a fetch get it from the
// trusted sources only, so that no request goes round the cluster.
func startPeering(ctx context.Context, cfg Config, store *content.Store, reg prometheus.Registerer, log *slog.Logger,
	trusted source.Source, mirrorOf func() *mirror.Mirror) (*peering.Node, error) {
	p := cfg.Peering
	opts := peering.Options{
		ListenAddrs:       p.Listen,
		Open:              p.Open,
		DataDir:           cfg.DataDir,
		Bootstrap:         p.Bootstrap,
		Store:             store,
		ReprovideInterval: time.Duration(p.ReprovideInterval),
		ProvideRate:       p.ProvideRate,
		Registerer:        reg,
		Logger:            log,
		FetchThrough: func(ctx context.Context, obj source.Object) (*content.Reader, error) {
			m := mirrorOf()
			if m == nil {
				return nil, errors.New("starting")
			}
			return m.FetchBlob(ctx, obj, trusted)
		},
		CachedTag: func(repo reference.Named, tag string) (ocispec.Descriptor, time.Time, bool) {
			if m := mirrorOf(); m != nil {
				return m.CachedTag(repo, tag)
			}
			return ocispec.Descriptor{}, time.Time{}, false
		},
	}
	if p.KeyFile != "" {
		psk, err := peering.LoadPSK(p.KeyFile)
		if err != nil {
			return nil, err
		}
		opts.PSK = psk
	}
	if k := p.Kubernetes; k != nil {
		d, err := kubernetesPeers(k, cfg.Kubeconfig)
		if err != nil {
			return nil, err
		}
		opts.Discover = append(opts.Discover, d)
	}
	for _, d := range p.DNS {
		host, port, _ := net.SplitHostPort(d)
		n, _ := strconv.Atoi(port)
		opts.Discover = append(opts.Discover, peering.DNSPeers{Host: host, Port: n})
	}
	return peering.New(ctx, opts)
}

func kubernetesPeers(k *KubernetesDiscovery, kubeconfig string) (peering.KubernetesPeers, error) {
	client, err := connectKubernetes(kubeconfig)
	if err != nil {
		return peering.KubernetesPeers{}, fmt.Errorf("peering through Kubernetes: %w", err)
	}
	ns, name, _ := strings.Cut(k.Service, "/")
	return peering.KubernetesPeers{Client: client, Namespace: ns, Service: name, PortName: k.PortName}, nil
}

// connectKubernetes connects to the API server: with kubeconfig outside the cluster, with the pod's
// service account inside.
func connectKubernetes(kubeconfig string) (*kubeClient, error) {
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
	return newKubeClient(rc)
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
