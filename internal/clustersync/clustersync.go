// Package clustersync applies the mirror configuration the imagemesh controller publishes (a
// ConfigMap built from the ImageSources) to one node: the registries whose node selector matches the
// node, their upstreams and credentials, their decentralized sources, their containerd hosts.toml,
// and the images to prefetch. It reports what it applied in the node's Lease.
//
// Invariants: a configuration is reported as applied only when every part of it was; the hosts.toml
// files it writes point at the agent, and it removes only files it wrote (hostconfig's ownership
// marker); it keeps no secret in memory beyond the sources and endpoints built from it, and logs none.
package clustersync

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"slices"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/pkg/hostconfig"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// Kubernetes is what the sync asks of the API server; *kubeclient.Client provides it.
type Kubernetes interface {
	ConfigMapInformer(namespace, name string, resync time.Duration) cache.SharedIndexInformer
	Node(ctx context.Context, name string) (*corev1.Node, error)
	Secret(ctx context.Context, namespace, name string) (*corev1.Secret, error)
	Lease(ctx context.Context, namespace, name string) (*coordinationv1.Lease, error)
	CreateLease(ctx context.Context, l *coordinationv1.Lease) error
	UpdateLease(ctx context.Context, l *coordinationv1.Lease) error
	DaemonSetMeta(ctx context.Context, namespace, name string) (*metav1.PartialObjectMetadata, error)
}

// Mirror is what the sync changes in the node's mirror.
type Mirror interface {
	// SetRegistries sets the only registries the mirror pulls from.
	SetRegistries(hosts []string)
	// Prefetch pulls an image into the cache.
	Prefetch(ctx context.Context, image string) error
}

// Upstream is the registry source, whose endpoints the sync sets.
type Upstream interface {
	SetEndpoints(map[string]source.Endpoint) error
}

// NewSourceFunc builds a decentralized source; access is a Storj source's serialized grant.
type NewSourceFunc func(spec mirrorconfig.Source, access string) (source.Source, error)

// Options configure a Sync.
type Options struct {
	Client Kubernetes
	// ConfigMap is the controller's mirror configuration.
	ConfigMap types.NamespacedName
	// Node is this node's name.
	Node string
	// DaemonSet is the agents' DaemonSet, or empty: see Cleanup.
	DaemonSet types.NamespacedName
	// HostsDir is containerd's config_path; empty writes no hosts.toml.
	HostsDir string
	// MirrorHost is the agent as containerd reaches it: its URL, and the header (the node token)
	// containerd sends it, if any. Every hosts.toml the sync writes names it.
	MirrorHost hostconfig.Mirror
	// StaticHosts are the hosts.toml files the agent's own configuration asks for: never pruned.
	StaticHosts []string
	// StaticRegistries are registries the agent's own configuration allows besides the cluster's.
	StaticRegistries []string
	// StaticSources are the agent's own decentralized sources per registry, asked before the
	// ImageSources' ones.
	StaticSources map[string][]source.Source
	Upstream      Upstream
	// Decentralized gets each registry's sources: the agent's own, then its ImageSources'.
	Decentralized *source.ByRegistry
	Mirror        Mirror
	NewSource     NewSourceFunc
	Registerer    prometheus.Registerer
	Logger        *slog.Logger
}

// Sync keeps the node's mirror in step with the cluster's configuration.
type Sync struct {
	opts Options
	log  *slog.Logger

	built      map[builtSource]source.Source // sources kept across syncs (connections, IPNS cache)
	registries prometheus.Gauge
	syncs      *prometheus.CounterVec

	mu         sync.Mutex
	peerTags   map[string]bool
	applied    string
	prefetched map[string]bool
	status     Status
}

// Status is what the sync last did, for the agent's status page.
type Status struct {
	// Applied is the hash of the configuration last applied in full; empty before the first.
	Applied string
	// Registries are the cluster's registries this node mirrors, from the last sync.
	Registries []RegistryStatus
	// LastSync is when the last sync ended; LastError is its error, empty if it succeeded.
	LastSync  time.Time
	LastError string
}

// RegistryStatus is one registry the node mirrors for the cluster.
type RegistryStatus struct {
	Host        string
	ImageSource string
	// Endpoint is where the agent reaches the registry (no credentials).
	Endpoint string
	// Sources are the types of its decentralized sources, in order.
	Sources []string
}

// Status returns what the sync last did.
func (c *Sync) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.status
	s.Registries = slices.Clone(s.Registries)
	return s
}

// New returns a Sync; Run starts it.
func New(opts Options) (*Sync, error) {
	if opts.Client == nil || opts.Mirror == nil || opts.Upstream == nil || opts.Decentralized == nil || opts.NewSource == nil {
		return nil, errors.New("clustersync: client, mirror, upstream, decentralized and newSource are required")
	}
	if opts.ConfigMap.Namespace == "" || opts.ConfigMap.Name == "" || opts.Node == "" {
		return nil, errors.New("clustersync: the ConfigMap's namespace and name, and the node, are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	c := &Sync{opts: opts, log: opts.Logger, prefetched: map[string]bool{}}
	c.registries, c.syncs = newMetrics(opts.Registerer)
	return c, nil
}

// PeersMayResolve says whether the ImageSource of host lets peers answer its tags.
func (c *Sync) PeersMayResolve(host string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peerTags[host]
}

// Run applies the configuration at every change of the ConfigMap, and renews the Lease (reading the
// node's labels again) on a timer, until ctx is done.
func (c *Sync) Run(ctx context.Context) error {
	informer := c.opts.Client.ConfigMapInformer(c.opts.ConfigMap.Namespace, c.opts.ConfigMap.Name, 10*time.Minute)
	changed := make(chan struct{}, 1)
	poke := func(any) {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	if _, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: poke, UpdateFunc: func(_, o any) { poke(o) }, DeleteFunc: poke,
	}); err != nil {
		return fmt.Errorf("watch ConfigMap %s: %w", c.opts.ConfigMap, err)
	}
	var informing sync.WaitGroup
	informing.Go(func() { informer.RunWithContext(ctx) })
	defer informing.Wait()
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		return ctx.Err()
	}
	// The Lease is renewed, and node labels read again, on a timer; the configuration on every change.
	tick := time.NewTicker(mirrorconfig.LeaseStale / 4)
	defer tick.Stop()
	for {
		cm := &corev1.ConfigMap{}
		obj, ok, err := informer.GetStore().GetByKey(c.opts.ConfigMap.String())
		if ok {
			cm = obj.(*corev1.ConfigMap)
		}
		if err == nil {
			err = c.sync(ctx, cm)
		}
		c.mu.Lock()
		c.status.LastSync, c.status.LastError = time.Now(), ""
		if err != nil {
			c.status.LastError = err.Error()
		}
		c.mu.Unlock()
		result := "ok"
		if err != nil {
			result = "error"
		}
		c.syncs.WithLabelValues(result).Inc()
		if err != nil && ctx.Err() == nil {
			c.log.Warn("mirror configuration not applied; retrying", "configMap", c.opts.ConfigMap.String(), "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-tick.C:
		}
	}
}

func (c *Sync) sync(ctx context.Context, cm *corev1.ConfigMap) error {
	doc, err := mirrorconfig.Parse([]byte(cm.Data[mirrorconfig.ConfigMapKey]))
	if err != nil {
		return err
	}
	hash := doc.Hash()
	node, err := c.opts.Client.Node(ctx, c.opts.Node)
	if err != nil {
		return fmt.Errorf("node %s: %w", c.opts.Node, err)
	}
	mine, skipped := Select(doc.Registries, node.Labels)
	for _, err := range skipped {
		c.log.Warn("registry skipped", "err", err)
	}

	var errs []error
	endpoints := map[string]source.Endpoint{}
	peerTags := map[string]bool{}
	var reachable []mirrorconfig.Registry
	for _, r := range mine {
		ep, err := c.endpoint(ctx, r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		endpoints[r.Host] = ep
		peerTags[r.Host] = r.PeersResolveTags
		reachable = append(reachable, r)
	}
	hosts, files := Hosts(c.opts.StaticHosts, reachable, endpoints, c.opts.MirrorHost)
	if err := c.opts.Upstream.SetEndpoints(endpoints); err != nil {
		return err
	}
	sources := map[string][]source.Source{}
	for host, srcs := range c.opts.StaticSources {
		sources[host] = append(sources[host], srcs...)
	}
	for _, r := range mine {
		for _, spec := range r.Sources {
			src, err := c.source(ctx, spec)
			if err != nil {
				c.log.Warn("source skipped", "registry", r.Host, "imageSource", r.ImageSource, "type", spec.Type, "err", err)
				continue
			}
			sources[r.Host] = append(sources[r.Host], src)
		}
	}
	c.opts.Decentralized.Set(sources)
	// In a cluster the agent serves the registries its node mirrors, and those its own configuration
	// names; it is no open proxy for anything a pod asks of it.
	c.opts.Mirror.SetRegistries(append(slices.Clone(c.opts.StaticRegistries), hosts...))
	regs := make([]RegistryStatus, 0, len(reachable))
	for _, r := range reachable {
		rs := RegistryStatus{Host: r.Host, ImageSource: r.ImageSource, Endpoint: endpoints[r.Host].URL.Redacted()}
		for _, s := range r.Sources {
			rs.Sources = append(rs.Sources, s.Type)
		}
		regs = append(regs, rs)
	}
	c.mu.Lock()
	c.peerTags = peerTags
	c.status.Registries = regs
	c.mu.Unlock()
	c.registries.Set(float64(len(mine)))
	if c.opts.HostsDir != "" {
		written, err := hostconfig.Apply(c.opts.HostsDir, files)
		if err != nil {
			errs = append(errs, err)
		}
		removed, err := hostconfig.Prune(c.opts.HostsDir, hosts)
		if err != nil {
			errs = append(errs, err)
		}
		if len(written) > 0 || len(removed) > 0 {
			c.log.Info("containerd hosts.toml updated", "written", written, "removed", removed)
		}
	}
	if len(errs) > 0 {
		// Not reported as applied: the controller keeps counting this node as pending.
		return errors.Join(errs...)
	}
	if err := c.report(ctx, hash); err != nil {
		return fmt.Errorf("report applied configuration: %w", err)
	}
	c.mu.Lock()
	if c.applied != hash {
		c.log.Info("mirror configuration applied", "hash", hash, "registries", hosts)
		c.applied = hash
	}
	c.status.Applied = hash
	c.mu.Unlock()
	c.prefetch(ctx, mine)
	return nil
}

// endpoint is how to reach r's upstream, with the credentials of its Secret.
func (c *Sync) endpoint(ctx context.Context, r mirrorconfig.Registry) (source.Endpoint, error) {
	raw := r.Endpoint
	if raw == "" {
		raw = hostconfig.DefaultServer(r.Host)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return source.Endpoint{}, fmt.Errorf("registry %s: endpoint: %w", r.Host, err)
	}
	ep := source.Endpoint{URL: u}
	if r.CredentialsSecret == "" {
		return ep, nil
	}
	sec, err := c.opts.Client.Secret(ctx, c.opts.ConfigMap.Namespace, r.CredentialsSecret)
	if err != nil {
		return source.Endpoint{}, fmt.Errorf("registry %s: credentials: %w", r.Host, err)
	}
	ep.Username, ep.Password, err = credentials(sec, r.Host, u.Host)
	if err != nil {
		return source.Endpoint{}, fmt.Errorf("registry %s: credentials in Secret %s/%s: %w", r.Host, c.opts.ConfigMap.Namespace, r.CredentialsSecret, err)
	}
	return ep, nil
}

// report renews the node's Lease with the hash it applied.
func (c *Sync) report(ctx context.Context, hash string) error {
	name, ns, node := mirrorconfig.LeasePrefix+c.opts.Node, c.opts.ConfigMap.Namespace, c.opts.Node
	now := metav1.NewMicroTime(time.Now())
	lease, err := c.opts.Client.Lease(ctx, ns, name)
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns,
			Labels: map[string]string{"app.kubernetes.io/name": "imagemesh", "app.kubernetes.io/component": "node-agent"}}}
		lease.Annotations = map[string]string{mirrorconfig.AppliedAnnotation: hash}
		lease.Spec.HolderIdentity = &node
		lease.Spec.RenewTime = &now
		return c.opts.Client.CreateLease(ctx, lease)
	}
	if err != nil {
		return err
	}
	if lease.Annotations == nil {
		lease.Annotations = map[string]string{}
	}
	lease.Annotations[mirrorconfig.AppliedAnnotation] = hash
	lease.Spec.HolderIdentity = &node
	lease.Spec.RenewTime = &now
	return c.opts.Client.UpdateLease(ctx, lease)
}

// prefetch pulls each listed image once into the cache, in the background.
func (c *Sync) prefetch(ctx context.Context, regs []mirrorconfig.Registry) {
	m := c.opts.Mirror
	for _, r := range regs {
		for _, img := range r.Prefetch {
			c.mu.Lock()
			done := c.prefetched[img]
			c.prefetched[img] = true
			c.mu.Unlock()
			if done {
				continue
			}
			go func() {
				start := time.Now()
				if err := m.Prefetch(ctx, img); err != nil {
					c.log.Warn("prefetch failed", "image", img, "err", err)
					c.mu.Lock()
					delete(c.prefetched, img) // the next sync tries again
					c.mu.Unlock()
					return
				}
				c.log.Info("prefetched", "image", img, "took", time.Since(start).Round(time.Millisecond).String())
			}()
		}
	}
}

// Cleanup removes the hosts.toml files the agent wrote for the cluster when the agents are being
// uninstalled: containerd goes back to the registries directly. While the agents' DaemonSet lives,
// this stop is a rolling update or a drain, and the files stay: containerd falls back to their
// `server` while nobody answers on the agent's port, and the next agent takes over at once. When the
// DaemonSet cannot be read, the files go, as they always did.
func (c *Sync) Cleanup(ctx context.Context) {
	if c.opts.HostsDir == "" {
		return
	}
	if ds := c.opts.DaemonSet; ds.Name != "" {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		meta, err := c.opts.Client.DaemonSetMeta(ctx, ds.Namespace, ds.Name)
		cancel()
		if err == nil && meta.DeletionTimestamp == nil {
			c.log.Info("containerd hosts.toml kept: the agents' DaemonSet stays", "daemonSet", ds.String())
			return
		}
		if err != nil && !apierrors.IsNotFound(err) {
			c.log.Warn("cannot tell an uninstall from a restart; removing hosts.toml", "daemonSet", ds.String(), "err", err)
		}
	}
	removed, err := hostconfig.Prune(c.opts.HostsDir, c.opts.StaticHosts)
	if err != nil {
		c.log.Warn("removing hosts.toml", "err", err)
	}
	if len(removed) > 0 {
		c.log.Info("containerd hosts.toml removed", "registries", removed)
	}
}

func newMetrics(reg prometheus.Registerer) (prometheus.Gauge, *prometheus.CounterVec) {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "imagemesh_cluster_registries", Help: "Registries the cluster's ImageSources have this node mirror.",
	})
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imagemesh_cluster_syncs_total", Help: "Applications of the cluster's mirror configuration, by result.",
	}, []string{"result"})
	reg.MustRegister(g, c)
	return g, c
}

// source returns the source for spec, the same one as long as spec (and, for Storj, the access
// grant in its Secret) does not change.
func (c *Sync) source(ctx context.Context, spec mirrorconfig.Source) (source.Source, error) {
	var access string
	if spec.Type == mirrorconfig.SourceStorj {
		if spec.AccessSecret == "" {
			return nil, fmt.Errorf("bucket %s on Storj: no access Secret", spec.Bucket)
		}
		sec, err := c.opts.Client.Secret(ctx, c.opts.ConfigMap.Namespace, spec.AccessSecret)
		if err != nil {
			return nil, fmt.Errorf("bucket %s on Storj: access grant: %w", spec.Bucket, err)
		}
		b, ok := sec.Data[mirrorconfig.StorjAccessKey]
		if !ok {
			return nil, fmt.Errorf("bucket %s on Storj: Secret %s/%s has no key %q", spec.Bucket, c.opts.ConfigMap.Namespace, spec.AccessSecret, mirrorconfig.StorjAccessKey)
		}
		access = string(b)
	}
	key := builtSource{spec: spec, access: sha256.Sum256([]byte(access))}
	c.mu.Lock()
	defer c.mu.Unlock()
	if src, ok := c.built[key]; ok {
		return src, nil
	}
	src, err := c.opts.NewSource(spec, access)
	if err != nil {
		return nil, err
	}
	if c.built == nil {
		c.built = map[builtSource]source.Source{}
	}
	// A grant that changed replaces the source built with the old one.
	for k, old := range c.built {
		if k.spec == spec {
			if cl, ok := old.(io.Closer); ok {
				if err := cl.Close(); err != nil {
					c.log.Warn("close replaced source", "source", old.Name(), "err", err)
				}
			}
			delete(c.built, k)
		}
	}
	c.built[key] = src
	return src, nil
}

// builtSource keys the sources built so far; the grant is kept as a hash, not as the secret itself.
type builtSource struct {
	spec   mirrorconfig.Source
	access [sha256.Size]byte
}
