// Package agent assembles the node agent from its parts: configuration, content store, sources, the
// mirror and the operational endpoints.
package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/docker/go-units"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/hostconfig"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
	"github.com/imagemesh/imagemesh/pkg/storjaccess"
)

// Config is the agent's configuration. The YAML file uses these field names; flags override them.
type Config struct {
	// Listen is the address of the pull API.
	Listen string `json:"listen"`
	// MetricsListen, if set, serves /metrics and the health endpoints on their own address;
	// otherwise they are served on Listen.
	MetricsListen string `json:"metricsListen,omitempty"`
	// DataDir holds the content store and the tag answers.
	DataDir string      `json:"dataDir"`
	Cache   CacheConfig `json:"cache"`
	// DefaultRegistry is the registry of requests that name none.
	DefaultRegistry string `json:"defaultRegistry"`
	// Registries, if set, are the only registries the agent pulls from.
	Registries []string `json:"registries,omitempty"`
	// TagTTL is how long a tag's answer is reused before the upstream is asked again.
	TagTTL Duration `json:"tagTTL"`
	// Upstreams say how to reach registries; any other registry is reached at https://<host>.
	Upstreams  []Upstream       `json:"upstreams,omitempty"`
	HostConfig HostConfigConfig `json:"hostConfig"`
	// RequireNodeToken makes the pull API (/v2/) answer only requests that carry the node token,
	// which the agent keeps in <dataDir>/node-token and writes into every hosts.toml it owns, so
	// that only the node's containerd can pull through it. Unset: required when the agent writes
	// hosts.toml (hostConfig.dir), not otherwise (a standalone cache for docker, crane, skopeo,
	// which cannot send the header). See NodeTokenRequired.
	RequireNodeToken *bool         `json:"requireNodeToken,omitempty"`
	Peering          PeeringConfig `json:"peering"`
	// Cluster connects the agent to the imagemesh controller's mirror configuration.
	Cluster ClusterConfig `json:"cluster"`
	// Kubeconfig is for an agent outside the cluster; inside, the pod's service account is used.
	Kubeconfig string    `json:"kubeconfig,omitempty"`
	Log        LogConfig `json:"log"`
	// ShutdownTimeout bounds how long SIGTERM waits for transfers under way.
	ShutdownTimeout Duration `json:"shutdownTimeout"`
}

// CacheConfig bounds the content store.
type CacheConfig struct {
	// MaxBytes is a number of bytes, a size such as 20GiB, or a share of the data dir's filesystem
	// such as 15%; 0 means unbounded.
	MaxBytes      CacheSize `json:"maxBytes"`
	HighWatermark float64   `json:"highWatermark"`
	LowWatermark  float64   `json:"lowWatermark"`
	// UntrustedHold is how long a client waits for a blob's bytes from peers, Storj or IPFS to
	// verify before it gets them as they arrive; 0 sends them at once.
	UntrustedHold Duration `json:"untrustedHold"`
}

// Upstream is how to reach one registry.
type Upstream struct {
	// Host as image references name it: docker.io, ghcr.io, registry.example:5000.
	Host string `json:"host"`
	// Endpoint is the URL requests go to, e.g. https://registry-1.docker.io or http://127.0.0.1:5001.
	Endpoint string `json:"endpoint"`
	Username string `json:"username,omitempty"`
	// PasswordFile holds the password, so that the config itself carries no secret.
	PasswordFile       string `json:"passwordFile,omitempty"`
	CAFile             string `json:"caFile,omitempty"`
	InsecureSkipVerify bool   `json:"insecureSkipVerify,omitempty"`
	// Sources hold this registry's images besides the registry itself, asked after the peers and
	// before the registry: Storj buckets and IPFS roots, in the registry storage layout.
	Sources []mirrorconfig.Source `json:"sources,omitempty"`
}

// HostConfigConfig says which containerd hosts.toml files the agent writes.
type HostConfigConfig struct {
	// Dir is containerd's registry config_path, e.g. /etc/containerd/certs.d. Empty writes nothing.
	Dir string `json:"dir,omitempty"`
	// MirrorURL is the agent as containerd reaches it. Default http://<listen>.
	MirrorURL string `json:"mirrorURL,omitempty"`
	// Registries get a hosts.toml that points them at the agent.
	Registries []string `json:"registries,omitempty"`
}

// PeeringConfig lets the agent share its cache with the other nodes' agents. Peering is on when
// Listen names at least one address.
type PeeringConfig struct {
	// Listen are libp2p TCP multiaddrs, e.g. /ip4/0.0.0.0/tcp/5001.
	Listen []string `json:"listen,omitempty"`
	// DirectListen is a TCP address, HOST:PORT, where peers take the bytes of large blobs on
	// connections of their own, secured as Encryption says, instead of over libp2p streams (faster:
	// README, Peering, "Direct connections"). Empty offers none.
	DirectListen string `json:"directListen,omitempty"`
	// KeyFile holds the cluster's pre-shared key (swarm.key format): only hosts with it can connect.
	KeyFile string `json:"keyFile,omitempty"`
	// Open runs without a key: anyone who can reach the port can fetch from the cache.
	Open bool `json:"open,omitempty"`
	// Encryption protects peer traffic on the wire: "tls" (default) or "none", for networks that
	// encrypt every packet already (WireGuard or IPsec in the CNI). With "none", peers still prove
	// that they hold the key, but the bytes between them have no confidentiality and no integrity
	// beyond the network's; blobs are still verified against their digests.
	Encryption string `json:"encryption,omitempty"`
	// Bootstrap are peers' multiaddrs, ending in /p2p/<peer id>.
	Bootstrap []string `json:"bootstrap,omitempty"`
	// DNS is a name with one address per agent (a headless Service), as HOST:PORT where PORT is the
	// agents' HTTP API port, which tells each agent's peer ID.
	DNS []HostPort `json:"dns,omitempty"`
	// Kubernetes finds peers through the EndpointSlices of the agents' Service.
	Kubernetes *KubernetesDiscovery `json:"kubernetes,omitempty"`
	// ResolveTags lets peers answer tag lookups when the registry cannot. Digests verify themselves,
	// tags do not: turn it on only where every node is trusted alike.
	ResolveTags bool `json:"resolveTags,omitempty"`
	// ReprovideInterval is how often every cached digest is announced again.
	ReprovideInterval Duration `json:"reprovideInterval,omitempty"`
	// ProvideRate bounds announcements per second.
	ProvideRate int `json:"provideRate,omitempty"`
	// TagTTL is how old a tag's answer may be for peers to use it (peering.DefaultTagTTL if zero).
	TagTTL Duration `json:"tagTTL,omitempty"`
	// UploadSlots bounds how many peers the node sends one blob to at once
	// (peering.DefaultUploadSlots if zero).
	UploadSlots int `json:"uploadSlots,omitempty"`
}

// KubernetesDiscovery names the agents' Service. The agent lists its EndpointSlices (RBAC: list
// endpointslices.discovery.k8s.io in its namespace) and asks each ready endpoint for its peer ID.
type KubernetesDiscovery struct {
	// Service is NAMESPACE/NAME.
	Service NamespacedName `json:"service"`
	// PortName is the Service port of the agents' API. Default "api".
	PortName string `json:"portName,omitempty"`
}

// ClusterConfig is where the agent finds the mirror configuration the controller publishes from the
// ImageSources, and which node it runs on.
type ClusterConfig struct {
	// ConfigMap is NAMESPACE/NAME; empty runs the agent standalone.
	ConfigMap NamespacedName `json:"configMap,omitzero"`
	// NodeName is the agent's node (the downward API's spec.nodeName).
	NodeName string `json:"nodeName,omitempty"`
	// DaemonSet is NAMESPACE/NAME of the agents' DaemonSet. On SIGTERM the agent keeps its hosts.toml
	// files while the DaemonSet lives (a rolling update, a drain: containerd falls back to the
	// registries until the next agent starts) and removes them once it is gone (uninstall). Empty
	// removes them on every stop.
	DaemonSet NamespacedName `json:"daemonSet,omitzero"`
}

// NodeTokenRequired says whether the pull API requires the node token: as RequireNodeToken says,
// else when the agent writes containerd's hosts.toml.
func (c *Config) NodeTokenRequired() bool {
	if c.RequireNodeToken != nil {
		return *c.RequireNodeToken
	}
	return c.HostConfig.Dir != ""
}

// Enabled says whether the agent peers.
func (p PeeringConfig) Enabled() bool { return len(p.Listen) > 0 }

// LogConfig configures the structured log.
type LogConfig struct {
	Level  string `json:"level"`  // debug, info, warn, error
	Format string `json:"format"` // text or json
}

// Default returns the configuration the agent runs with when nothing is given.
func Default() Config {
	return Config{
		Listen:          "127.0.0.1:5000",
		DataDir:         defaultDataDir(),
		Cache:           CacheConfig{HighWatermark: content.DefaultHighWatermark, LowWatermark: content.DefaultLowWatermark, UntrustedHold: Duration(content.DefaultUntrustedHold)},
		DefaultRegistry: mirror.DefaultRegistry,
		TagTTL:          Duration(mirror.DefaultTagTTL),
		Log:             LogConfig{Level: "info", Format: "text"},
		ShutdownTimeout: Duration(30 * time.Second),
		Cluster:         ClusterConfig{NodeName: os.Getenv("NODE_NAME")},
	}
}

func defaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/imagemesh"
	}
	if dir, err := os.UserCacheDir(); err == nil {
		return filepath.Join(dir, "imagemesh")
	}
	return filepath.Join(os.TempDir(), "imagemesh")
}

// LoadFile reads a YAML config over c. Unknown fields are errors: a typo should not be ignored.
func (c *Config) LoadFile(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if err := yaml.UnmarshalStrict(b, c); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// SetUpstream adds or replaces the endpoint of one registry host, as --upstream HOST=URL does.
func (c *Config) SetUpstream(spec string) error {
	host, endpoint, ok := strings.Cut(spec, "=")
	if !ok || host == "" || endpoint == "" {
		return fmt.Errorf("--upstream %q: want HOST=URL, e.g. example.test=http://127.0.0.1:5001", spec)
	}
	for i := range c.Upstreams {
		if c.Upstreams[i].Host == host {
			c.Upstreams[i].Endpoint = endpoint
			return nil
		}
	}
	c.Upstreams = append(c.Upstreams, Upstream{Host: host, Endpoint: endpoint})
	return nil
}

// Validate reports every problem with the configuration at once.
func (c *Config) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("listen %q: %w", c.Listen, err))
	}
	if c.MetricsListen != "" {
		if _, _, err := net.SplitHostPort(c.MetricsListen); err != nil {
			errs = append(errs, fmt.Errorf("metricsListen %q: %w", c.MetricsListen, err))
		}
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("dataDir is required"))
	}
	if c.Cache.MaxBytes.Bytes < 0 || c.Cache.MaxBytes.Percent < 0 || c.Cache.MaxBytes.Percent > 100 {
		errs = append(errs, errors.New("cache.maxBytes must not be negative, nor over 100%"))
	}
	if !(0 < c.Cache.LowWatermark && c.Cache.LowWatermark <= c.Cache.HighWatermark && c.Cache.HighWatermark <= 1) {
		errs = append(errs, fmt.Errorf("cache watermarks: want 0 < low (%v) <= high (%v) <= 1", c.Cache.LowWatermark, c.Cache.HighWatermark))
	}
	if c.Cache.UntrustedHold < 0 {
		errs = append(errs, fmt.Errorf("cache.untrustedHold %s: want 0 or more", time.Duration(c.Cache.UntrustedHold)))
	}
	if err := hostconfig.ValidateHost(c.DefaultRegistry); err != nil {
		errs = append(errs, fmt.Errorf("defaultRegistry: %w", err))
	}
	for _, h := range c.Registries {
		if err := hostconfig.ValidateHost(h); err != nil {
			errs = append(errs, fmt.Errorf("registries: %w", err))
		}
	}
	errs = append(errs, c.Peering.validate()...)
	if !c.Cluster.ConfigMap.IsZero() && c.Cluster.NodeName == "" {
		errs = append(errs, errors.New("cluster.nodeName (--node-name, $NODE_NAME) is required with cluster.configMap"))
	}
	if !c.Cluster.DaemonSet.IsZero() && c.Cluster.ConfigMap.IsZero() {
		errs = append(errs, errors.New("cluster.daemonSet needs cluster.configMap: it says when to keep the hosts.toml the cluster's configuration wrote"))
	}
	if c.TagTTL < 0 {
		errs = append(errs, errors.New("tagTTL must not be negative"))
	}
	seen := map[string]bool{}
	for _, u := range c.Upstreams {
		if err := hostconfig.ValidateHost(u.Host); err != nil {
			errs = append(errs, fmt.Errorf("upstream: %w", err))
		}
		if seen[u.Host] {
			errs = append(errs, fmt.Errorf("upstream %s: given twice", u.Host))
		}
		seen[u.Host] = true
		ep, err := url.Parse(u.Endpoint)
		if u.Endpoint == "" && len(u.Sources) > 0 {
			// A registry served from decentralized sources only: its host need not exist.
		} else if err != nil || (ep.Scheme != "http" && ep.Scheme != "https") || ep.Host == "" || ep.User != nil || (ep.Path != "" && ep.Path != "/") {
			errs = append(errs, fmt.Errorf("upstream %s: endpoint %q: want http(s)://host[:port], no path or credentials", u.Host, u.Endpoint))
		}
		for i, src := range u.Sources {
			if err := validateSource(src); err != nil {
				errs = append(errs, fmt.Errorf("upstream %s: sources[%d]: %w", u.Host, i, err))
			}
		}
		if u.PasswordFile != "" && u.Username == "" {
			errs = append(errs, fmt.Errorf("upstream %s: passwordFile without username", u.Host))
		}
	}
	for _, h := range c.HostConfig.Registries {
		if err := hostconfig.ValidateHost(h); err != nil {
			errs = append(errs, fmt.Errorf("hostConfig.registries: %w", err))
		}
	}
	if len(c.HostConfig.Registries) > 0 && c.HostConfig.Dir == "" {
		errs = append(errs, errors.New("hostConfig.registries needs hostConfig.dir (containerd's config_path)"))
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log.level %q: want debug, info, warn or error", c.Log.Level))
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		errs = append(errs, fmt.Errorf("log.format %q: want text or json", c.Log.Format))
	}
	return errors.Join(errs...)
}

// NamespacedName is a Kubernetes object's NAMESPACE/NAME, parsed when it is read (from the file or
// a flag), so that a malformed one is an error there and nowhere else.
type NamespacedName struct{ types.NamespacedName }

// IsZero says whether no name was given.
func (n NamespacedName) IsZero() bool { return n.Name == "" && n.Namespace == "" }

// Set parses NAMESPACE/NAME.
func (n *NamespacedName) Set(s string) error {
	ns, name, ok := strings.Cut(s, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return fmt.Errorf("%q: want NAMESPACE/NAME", s)
	}
	for _, part := range []string{ns, name} {
		if errs := validation.IsDNS1123Subdomain(part); len(errs) > 0 {
			return fmt.Errorf("%q: %s", s, strings.Join(errs, "; "))
		}
	}
	n.NamespacedName = types.NamespacedName{Namespace: ns, Name: name}
	return nil
}

// String is NAMESPACE/NAME, or empty.
func (n NamespacedName) String() string {
	if n.IsZero() {
		return ""
	}
	return n.NamespacedName.String()
}

// Type names the flag's value in help.
func (n *NamespacedName) Type() string { return "NAMESPACE/NAME" }

// UnmarshalJSON reads NAMESPACE/NAME from a string.
func (n *NamespacedName) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return errors.New("want a string NAMESPACE/NAME")
	}
	if s == "" {
		*n = NamespacedName{}
		return nil
	}
	return n.Set(s)
}

// MarshalJSON writes NAMESPACE/NAME.
func (n NamespacedName) MarshalJSON() ([]byte, error) { return json.Marshal(n.String()) }

// HostPort is a HOST:PORT with a port in 1..65535, parsed when it is read.
type HostPort struct {
	Host string
	Port int
}

// Set parses HOST:PORT.
func (h *HostPort) Set(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q: want HOST:PORT: %w", s, err)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n <= 0 || n > 65535 || host == "" {
		return fmt.Errorf("%q: want HOST:PORT with a port from 1 to 65535", s)
	}
	*h = HostPort{Host: host, Port: n}
	return nil
}

// String is HOST:PORT.
func (h HostPort) String() string { return net.JoinHostPort(h.Host, strconv.Itoa(h.Port)) }

// UnmarshalJSON reads HOST:PORT from a string.
func (h *HostPort) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return errors.New("want a string HOST:PORT")
	}
	return h.Set(s)
}

// MarshalJSON writes HOST:PORT.
func (h HostPort) MarshalJSON() ([]byte, error) { return json.Marshal(h.String()) }

// ByteSize is a size in bytes that reads from a number or a string such as 512MiB or 20GB.
type ByteSize int64

// UnmarshalJSON reads a number of bytes or a string such as 20GiB.
func (b *ByteSize) UnmarshalJSON(data []byte) error {
	var n int64
	if err := json.Unmarshal(data, &n); err == nil {
		*b = ByteSize(n)
		return nil
	}
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return fmt.Errorf("size: want a number of bytes or a string such as 20GiB")
	}
	return b.Set(s)
}

// MarshalJSON writes the number of bytes.
func (b ByteSize) MarshalJSON() ([]byte, error) { return json.Marshal(int64(b)) }

// Set parses a size; binary and decimal units are both taken as their names say.
func (b *ByteSize) Set(s string) error {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		*b = ByteSize(n)
		return nil
	}
	var (
		n   int64
		err error
	)
	if strings.Contains(strings.ToLower(s), "i") {
		n, err = units.RAMInBytes(s)
	} else {
		n, err = units.FromHumanSize(s)
	}
	if err != nil {
		return fmt.Errorf("size %q: %w", s, err)
	}
	*b = ByteSize(n)
	return nil
}

// String is the size in binary units, e.g. 20GiB.
func (b *ByteSize) String() string { return units.BytesSize(float64(*b)) }

// Type names the flag's value in help.
func (b *ByteSize) Type() string { return "size" }

// CacheSize is a size in bytes (see ByteSize), or a share of a filesystem written as a percentage
// such as 15%, which Resolve turns into bytes.
type CacheSize struct {
	Bytes   int64
	Percent float64
}

// Set parses a size or a percentage.
func (c *CacheSize) Set(s string) error {
	if p, ok := strings.CutSuffix(strings.TrimSpace(s), "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || f <= 0 || f > 100 {
			return fmt.Errorf("size %q: want a percentage above 0 and at most 100", s)
		}
		*c = CacheSize{Percent: f}
		return nil
	}
	var b ByteSize
	if err := b.Set(s); err != nil {
		return err
	}
	*c = CacheSize{Bytes: int64(b)}
	return nil
}

// String is the percentage or the size.
func (c *CacheSize) String() string {
	if c.Percent > 0 {
		return strconv.FormatFloat(c.Percent, 'f', -1, 64) + "%"
	}
	b := ByteSize(c.Bytes)
	return b.String()
}

// Type names the flag's value in help.
func (c *CacheSize) Type() string { return "size|percent" }

// UnmarshalJSON reads a number of bytes or a string: a size such as 20GiB, or a percentage.
func (c *CacheSize) UnmarshalJSON(data []byte) error {
	var n int64
	if err := json.Unmarshal(data, &n); err == nil {
		*c = CacheSize{Bytes: n}
		return nil
	}
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return errors.New("size: want a number of bytes, a string such as 20GiB, or a percentage such as 15%")
	}
	return c.Set(s)
}

// MarshalJSON writes the number of bytes, or the percentage as a string.
func (c CacheSize) MarshalJSON() ([]byte, error) {
	if c.Percent > 0 {
		return json.Marshal(c.String())
	}
	return json.Marshal(c.Bytes)
}

// Resolve returns the size in bytes; a percentage is of the size of the filesystem that holds dir.
func (c CacheSize) Resolve(dir string) (int64, error) {
	if c.Percent <= 0 {
		return c.Bytes, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("cache size %s of %s: %w", c.String(), dir, err)
	}
	return int64(float64(st.Blocks) * float64(st.Bsize) * c.Percent / 100), nil
}

// Duration is a time.Duration that reads from strings such as 30s or 5m.
type Duration time.Duration

// UnmarshalJSON reads a string such as 30s.
func (d *Duration) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return fmt.Errorf("duration: want a string such as 30s or 5m")
	}
	return d.Set(s)
}

// MarshalJSON writes the duration as Go writes it, e.g. 30s.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// Set parses a duration such as 30s or 5m.
func (d *Duration) Set(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// String is the duration as Go writes it.
func (d *Duration) String() string { return time.Duration(*d).String() }

// Type names the flag's value in help.
func (d *Duration) Type() string { return "duration" }

func (p PeeringConfig) validate() []error {
	if !p.Enabled() {
		if len(p.Bootstrap) > 0 || len(p.DNS) > 0 || p.Kubernetes != nil || p.KeyFile != "" || p.DirectListen != "" {
			return []error{errors.New("peering: bootstrap, dns, kubernetes, keyFile and directListen need peering.listen (--peer-listen)")}
		}
		return nil
	}
	var errs []error
	switch {
	case p.KeyFile == "" && !p.Open:
		errs = append(errs, errors.New("peering: keyFile (--peer-key) is required; to let any host that reaches the port fetch from the cache, set peering.open (--peer-open)"))
	case p.KeyFile != "" && p.Open:
		errs = append(errs, errors.New("peering: keyFile and open exclude each other"))
	}
	switch p.Encryption {
	case "", "tls":
	case "none":
		if p.Open {
			errs = append(errs, errors.New("peering: encryption none needs keyFile: without the key, nothing would authenticate peers"))
		}
	default:
		errs = append(errs, fmt.Errorf("peering.encryption (--peer-encryption) %q: want tls or none", p.Encryption))
	}
	if p.DirectListen != "" {
		if _, port, err := net.SplitHostPort(p.DirectListen); err != nil || port == "" {
			errs = append(errs, fmt.Errorf("peering.directListen (--peer-direct-listen) %q: want HOST:PORT, e.g. 0.0.0.0:5003", p.DirectListen))
		}
	}
	if k := p.Kubernetes; k != nil && k.Service.IsZero() {
		errs = append(errs, errors.New("peering.kubernetes.service: want NAMESPACE/NAME"))
	}
	if p.ReprovideInterval < 0 || p.ProvideRate < 0 || p.TagTTL < 0 || p.UploadSlots < 0 {
		errs = append(errs, errors.New("peering: reprovideInterval, provideRate, tagTTL and uploadSlots must not be negative"))
	}
	return errs
}

func validateSource(s mirrorconfig.Source) error {
	switch s.Type {
	case mirrorconfig.SourceIPFS:
		if s.Root == "" || s.Endpoint == "" {
			return errors.New("an IPFS source needs root and endpoint (the kubo RPC API)")
		}
		return nil
	case mirrorconfig.SourceStorj:
		if s.Bucket == "" {
			return errors.New("a Storj source needs bucket")
		}
		if s.AccessFile == "" && os.Getenv(storjaccess.Env) == "" {
			return fmt.Errorf("a Storj source needs accessFile (a file holding an access grant), or $%s", storjaccess.Env)
		}
		return nil
	}
	return fmt.Errorf("type %q: want IPFS or Storj", s.Type)
}
