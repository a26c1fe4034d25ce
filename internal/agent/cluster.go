package agent

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/pkg/hostconfig"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// clusterSync applies the mirror configuration the controller publishes: it watches the ConfigMap,
// keeps the registries whose node selector matches this node, points their hosts.toml at the agent,
// reaches their upstreams as the ImageSources say (credentials from their Secrets), prefetches their
// images, and reports the configuration it applied in its Lease.
type clusterSync struct {
	client      *kubeClient
	namespace   string
	configMap   string
	node        string
	daemonSet   string // NAMESPACE/NAME of the agents' DaemonSet, or empty
	hostsDir    string
	mirrorURL   string
	staticHosts []string // hosts.toml the agent's own configuration asks for
	// staticRegistries are registries the agent's own configuration allows besides the cluster's.
	staticRegistries []string
	// decentralized gets each registry's sources: the agent's own, then its ImageSource's.
	decentralized *source.ByRegistry
	staticSources map[string][]source.Source
	upstream      *source.Registry
	mirror        func() *mirror.Mirror
	log           *slog.Logger

	built      map[builtSource]source.Source // sources kept across syncs (connections, IPNS cache)
	registries prometheus.Gauge
	syncs      *prometheus.CounterVec

	mu         sync.Mutex
	peerTags   map[string]bool
	applied    string
	prefetched map[string]bool
}

// peersMayResolve says whether the ImageSource of host lets peers answer its tags.
func (c *clusterSync) peersMayResolve(host string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peerTags[host]
}

func (c *clusterSync) run(ctx context.Context) error {
	informer := c.client.configMapInformer(c.namespace, c.configMap, 10*time.Minute)
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
		return fmt.Errorf("watch ConfigMap %s/%s: %w", c.namespace, c.configMap, err)
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
		obj, ok, err := informer.GetStore().GetByKey(c.namespace + "/" + c.configMap)
		if ok {
			cm = obj.(*corev1.ConfigMap)
		}
		if err == nil {
			err = c.sync(ctx, cm)
		}
		result := "ok"
		if err != nil {
			result = "error"
		}
		c.syncs.WithLabelValues(result).Inc()
		if err != nil && ctx.Err() == nil {
			c.log.Warn("mirror configuration not applied; retrying", "configMap", c.namespace+"/"+c.configMap, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-tick.C:
		}
	}
}

func (c *clusterSync) sync(ctx context.Context, cm *corev1.ConfigMap) error {
	doc, err := mirrorconfig.Parse([]byte(cm.Data[mirrorconfig.ConfigMapKey]))
	if err != nil {
		return err
	}
	hash := doc.Hash()
	node, err := c.client.node(ctx, c.node)
	if err != nil {
		return fmt.Errorf("node %s: %w", c.node, err)
	}
	var mine []mirrorconfig.Registry
	for _, r := range doc.Registries {
		sel := labels.Everything()
		if r.NodeSelector != nil {
			if sel, err = metav1.LabelSelectorAsSelector(r.NodeSelector); err != nil {
				c.log.Warn("bad node selector; registry skipped", "registry", r.Host, "imageSource", r.ImageSource, "err", err)
				continue
			}
		}
		if sel.Matches(labels.Set(node.Labels)) {
			mine = append(mine, r)
		}
	}

	var errs []error
	endpoints := map[string]source.Endpoint{}
	peerTags := map[string]bool{}
	hosts := slices.Clone(c.staticHosts)
	var files []hostconfig.Registry
	for _, r := range mine {
		ep, err := c.endpoint(ctx, r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		endpoints[r.Host] = ep
		peerTags[r.Host] = r.PeersResolveTags
		hosts = append(hosts, r.Host)
		files = append(files, hostconfig.Registry{Host: r.Host, Server: strings.TrimSuffix(ep.URL.String(), "/"), Mirrors: []hostconfig.Mirror{{URL: c.mirrorURL}}})
	}
	if err := c.upstream.SetEndpoints(endpoints); err != nil {
		return err
	}
	sources := map[string][]source.Source{}
	for host, srcs := range c.staticSources {
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
	c.decentralized.Set(sources)
	// In a cluster the agent serves the registries its node mirrors, and those its own configuration
	// names; it is no open proxy for anything a pod asks of it.
	if m := c.mirror(); m != nil {
		m.SetRegistries(append(append([]string{}, c.staticRegistries...), hosts...))
	}
	c.mu.Lock()
	c.peerTags = peerTags
	c.mu.Unlock()
	c.registries.Set(float64(len(mine)))
	if c.hostsDir != "" {
		written, err := hostconfig.Apply(c.hostsDir, files)
		if err != nil {
			errs = append(errs, err)
		}
		removed, err := hostconfig.Prune(c.hostsDir, hosts)
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
	c.mu.Unlock()
	c.prefetch(ctx, mine)
	return nil
}

// endpoint is how to reach r's upstream, with the credentials of its Secret.
func (c *clusterSync) endpoint(ctx context.Context, r mirrorconfig.Registry) (source.Endpoint, error) {
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
	sec, err := c.client.secret(ctx, c.namespace, r.CredentialsSecret)
	if err != nil {
		return source.Endpoint{}, fmt.Errorf("registry %s: credentials: %w", r.Host, err)
	}
	ep.Username, ep.Password, err = credentials(sec, r.Host, u.Host)
	if err != nil {
		return source.Endpoint{}, fmt.Errorf("registry %s: credentials in Secret %s/%s: %w", r.Host, c.namespace, r.CredentialsSecret, err)
	}
	return ep, nil
}

// credentials reads a username and password from a Secret: the keys username and password, or a
// kubernetes.io/dockerconfigjson Secret's entry for the registry.
func credentials(sec *corev1.Secret, hosts ...string) (string, string, error) {
	if u, ok := sec.Data["username"]; ok {
		return string(u), string(sec.Data["password"]), nil
	}
	raw, ok := sec.Data[corev1.DockerConfigJsonKey]
	if !ok {
		return "", "", errors.New("neither username/password nor .dockerconfigjson")
	}
	var cfg struct {
		Auths map[string]struct {
			Username string `json:"username"`
			Password string `json:"password"`
			Auth     string `json:"auth"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return "", "", fmt.Errorf(".dockerconfigjson: %w", err)
	}
	for key, a := range cfg.Auths {
		k := strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(key, "https://"), "http://"), "/")
		if !slices.Contains(hosts, k) && (k != "index.docker.io/v1" || !slices.Contains(hosts, "docker.io")) {
			continue
		}
		if a.Username != "" {
			return a.Username, a.Password, nil
		}
		b, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return "", "", fmt.Errorf(".dockerconfigjson auth for %s: %w", key, err)
		}
		user, pass, _ := strings.Cut(string(b), ":")
		return user, pass, nil
	}
	return "", "", fmt.Errorf(".dockerconfigjson has no entry for %s", strings.Join(hosts, " or "))
}

// report renews the node's Lease with the hash it applied.
func (c *clusterSync) report(ctx context.Context, hash string) error {
	name := mirrorconfig.LeasePrefix + c.node
	now := metav1.NewMicroTime(time.Now())
	lease, err := c.client.lease(ctx, c.namespace, name)
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: c.namespace,
			Labels: map[string]string{"app.kubernetes.io/name": "imagemesh", "app.kubernetes.io/component": "node-agent"}}}
		lease.Annotations = map[string]string{mirrorconfig.AppliedAnnotation: hash}
		lease.Spec.HolderIdentity = &c.node
		lease.Spec.RenewTime = &now
		return c.client.createLease(ctx, lease)
	}
	if err != nil {
		return err
	}
	if lease.Annotations == nil {
		lease.Annotations = map[string]string{}
	}
	lease.Annotations[mirrorconfig.AppliedAnnotation] = hash
	lease.Spec.HolderIdentity = &c.node
	lease.Spec.RenewTime = &now
	return c.client.updateLease(ctx, lease)
}

// prefetch pulls each listed image once into the cache, in the background.
func (c *clusterSync) prefetch(ctx context.Context, regs []mirrorconfig.Registry) {
	m := c.mirror()
	if m == nil {
		return
	}
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

// cleanup removes the hosts.toml files the agent wrote for the cluster when the agents are being
// uninstalled: containerd goes back to the registries directly. While the agents' DaemonSet lives,
// this stop is a rolling update or a drain, and the files stay: containerd falls back to their
// `server` while nobody answers on the agent's port, and the next agent takes over at once. When the
// DaemonSet cannot be read, the files go, as they always did.
func (c *clusterSync) cleanup(ctx context.Context) {
	if c.hostsDir == "" {
		return
	}
	if ns, name, ok := strings.Cut(c.daemonSet, "/"); ok {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ds, err := c.client.daemonSetMeta(ctx, ns, name)
		cancel()
		if err == nil && ds.DeletionTimestamp == nil {
			c.log.Info("containerd hosts.toml kept: the agents' DaemonSet stays", "daemonSet", c.daemonSet)
			return
		}
		if err != nil && !apierrors.IsNotFound(err) {
			c.log.Warn("cannot tell an uninstall from a restart; removing hosts.toml", "daemonSet", c.daemonSet, "err", err)
		}
	}
	removed, err := hostconfig.Prune(c.hostsDir, c.staticHosts)
	if err != nil {
		c.log.Warn("removing hosts.toml", "err", err)
	}
	if len(removed) > 0 {
		c.log.Info("containerd hosts.toml removed", "registries", removed)
	}
}

func newClusterMetrics(reg prometheus.Registerer) (prometheus.Gauge, *prometheus.CounterVec) {
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
func (c *clusterSync) source(ctx context.Context, spec mirrorconfig.Source) (source.Source, error) {
	var access string
	if spec.Type == mirrorconfig.SourceStorj {
		if spec.AccessSecret == "" {
			return nil, fmt.Errorf("bucket %s on Storj: no access Secret", spec.Bucket)
		}
		sec, err := c.client.secret(ctx, c.namespace, spec.AccessSecret)
		if err != nil {
			return nil, fmt.Errorf("bucket %s on Storj: access grant: %w", spec.Bucket, err)
		}
		b, ok := sec.Data[mirrorconfig.StorjAccessKey]
		if !ok {
			return nil, fmt.Errorf("bucket %s on Storj: Secret %s/%s has no key %q", spec.Bucket, c.namespace, spec.AccessSecret, mirrorconfig.StorjAccessKey)
		}
		access = string(b)
	}
	key := builtSource{spec: spec, access: sha256.Sum256([]byte(access))}
	c.mu.Lock()
	defer c.mu.Unlock()
	if src, ok := c.built[key]; ok {
		return src, nil
	}
	src, err := newSource(spec, access)
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
