// Command node-agent is the imagemesh agent: a registry mirror for the node's containerd, with a
// verified local cache. With no flags it serves on 127.0.0.1:5000 and pulls through to the registries
// images name.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/imagemesh/imagemesh/internal/agent"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	run := func(ctx context.Context, cfg agent.Config) error {
		return agent.Run(ctx, cfg, agent.NewLogger(cfg.Log))
	}
	err := newCommand(os.Args[1:], run).ExecuteContext(ctx)
	stop()
	if err != nil {
		os.Exit(1)
	}
}

// newCommand builds the command for args, which calls run with the resulting configuration.
// Precedence is defaults, then the --config file, then the flags given: the file is read first, and
// the flags are bound to the configuration it produced, so a flag not given leaves the file's value.
func newCommand(args []string, run func(context.Context, agent.Config) error) *cobra.Command {
	cfg := agent.Default()
	pre := pflag.NewFlagSet("config", pflag.ContinueOnError)
	pre.ParseErrorsAllowlist.UnknownFlags = true
	pre.SetOutput(io.Discard)
	configFile := pre.String("config", "", "")
	_ = pre.Parse(args) // the command's own parse reports what is wrong with args
	var loadErr error
	if *configFile != "" {
		loadErr = cfg.LoadFile(*configFile)
	}

	var upstreams []string
	cmd := &cobra.Command{
		Use:           "node-agent",
		Short:         "OCI pull mirror with a verified local cache, for containerd on this node",
		Version:       agent.Version,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if loadErr != nil {
				return report(loadErr)
			}
			for _, u := range upstreams {
				if err := cfg.SetUpstream(u); err != nil {
					return report(err)
				}
			}
			if err := run(cmd.Context(), cfg); err != nil {
				return report(err)
			}
			return nil
		},
	}
	cmd.SetArgs(args)
	f := cmd.Flags()
	f.StringVar(configFile, "config", *configFile, "YAML config file; flags override it")
	f.StringVar(&cfg.Listen, "listen", cfg.Listen, "address of the pull API")
	f.StringVar(&cfg.MetricsListen, "metrics-listen", cfg.MetricsListen, "address for /metrics, /healthz and /readyz (default: on --listen)")
	f.StringVar(&cfg.DataDir, "data-dir", cfg.DataDir, "directory of the cache")
	f.Var(&cfg.Cache.MaxBytes, "cache-max-bytes", "size limit of the cache: bytes, e.g. 20GiB, or a share of the data dir's filesystem, e.g. 15% (0: unbounded)")
	f.Var(&cfg.Cache.UntrustedHold, "untrusted-hold", "how long a client waits for a blob's bytes from peers, Storj or IPFS to verify before it gets them as they arrive (0: at once)")
	f.StringVar(&cfg.DefaultRegistry, "default-registry", cfg.DefaultRegistry, "registry of pulls that name none (no ns parameter)")
	f.StringSliceVar(&cfg.Registries, "registry", cfg.Registries, "only pull from these registries (repeatable; default: any)")
	f.Var(&cfg.TagTTL, "tag-ttl", "how long a tag's answer is reused before asking the upstream again")
	f.StringArrayVar(&upstreams, "upstream", nil, "HOST=URL: reach registry HOST at URL, e.g. example.test=http://127.0.0.1:5001 (repeatable)")
	f.StringVar(&cfg.HostConfig.Dir, "hosts-dir", cfg.HostConfig.Dir, "containerd's registry config_path to write hosts.toml into, e.g. /etc/containerd/certs.d")
	f.StringSliceVar(&cfg.HostConfig.Registries, "mirror-registry", cfg.HostConfig.Registries, "registries to point at this agent in --hosts-dir (repeatable)")
	f.StringVar(&cfg.HostConfig.MirrorURL, "mirror-url", cfg.HostConfig.MirrorURL, "URL containerd reaches this agent at (default: http://<listen>)")
	f.Var(optionalBool{&cfg.RequireNodeToken}, "require-node-token", "answer /v2/ requests only with the node token, which the agent writes into its hosts.toml (default: true with --hosts-dir, else false)")
	f.Lookup("require-node-token").NoOptDefVal = "true"
	f.StringArrayVar(&cfg.Peering.Listen, "peer-listen", cfg.Peering.Listen, "libp2p multiaddr to listen on for peers, e.g. /ip4/0.0.0.0/tcp/5001; turns peering on (repeatable)")
	f.StringVar(&cfg.Peering.KeyFile, "peer-key", cfg.Peering.KeyFile, "file with the cluster key (swarm.key format), which peers prove they hold")
	f.BoolVar(&cfg.Peering.Open, "peer-open", cfg.Peering.Open, "peer without a key: any host that reaches --peer-listen can fetch from the cache")
	f.StringVar(&cfg.Peering.DirectListen, "peer-direct-listen", cfg.Peering.DirectListen, "HOST:PORT where peers take the bytes of large blobs on direct TCP connections, secured as --peer-encryption says, e.g. 0.0.0.0:5003 (default: none, every byte over libp2p)")
	f.StringVar(&cfg.Peering.Encryption, "peer-encryption", cfg.Peering.Encryption, "tls (default) or none: peers prove the key but send bytes unencrypted, only for networks that encrypt every packet already")
	f.IntVar(&cfg.Peering.UploadSlots, "peer-upload-slots", cfg.Peering.UploadSlots, "how many peers this node sends one blob to at once; past it they are sent to the peers it is sending to (default 1)")
	f.StringArrayVar(&cfg.Peering.Bootstrap, "bootstrap", cfg.Peering.Bootstrap, "peer multiaddr ending in /p2p/<peer id> to join through (repeatable)")
	f.Var(&hostPorts{list: &cfg.Peering.DNS}, "bootstrap-dns", "HOST:PORT: find peers at the addresses of HOST (a headless Service), asking each agent's API on PORT for its peer ID (repeatable)")
	f.Var(kubernetesService{&cfg.Peering}, "bootstrap-service", "NAMESPACE/NAME: find peers through the EndpointSlices of the agents' Service (port \"api\")")
	f.Var(&cfg.Cluster.ConfigMap, "cluster-config", "NAMESPACE/NAME of the ConfigMap the imagemesh controller publishes; the agent applies it to this node")
	f.StringVar(&cfg.Cluster.NodeName, "node-name", cfg.Cluster.NodeName, "this node's name (default $NODE_NAME)")
	f.Var(&cfg.Cluster.DaemonSet, "daemonset", "NAMESPACE/NAME of the agents' DaemonSet: on SIGTERM, hosts.toml files stay while it lives (rolling update) and go with it (uninstall)")
	f.StringVar(&cfg.Kubeconfig, "kubeconfig", cfg.Kubeconfig, "kubeconfig outside the cluster (default: the pod's service account)")
	f.BoolVar(&cfg.Peering.ResolveTags, "peer-resolve-tags", cfg.Peering.ResolveTags, "let peers answer tag lookups when the registry cannot")
	f.StringVar(&cfg.Log.Level, "log-level", cfg.Log.Level, "debug, info, warn or error")
	f.StringVar(&cfg.Log.Format, "log-format", cfg.Log.Format, "text or json")
	f.Var(&cfg.ShutdownTimeout, "shutdown-timeout", "how long SIGTERM waits for transfers under way")
	return cmd
}

func report(err error) error {
	fmt.Fprintln(os.Stderr, "node-agent:", err)
	return err
}

// kubernetesService and kubeconfig set peering.kubernetes, creating it on first use, so that the
// file's other kubernetes settings stay.
type kubernetesService struct{ p *agent.PeeringConfig }

func (k kubernetesService) String() string {
	if k.p == nil || k.p.Kubernetes == nil {
		return ""
	}
	return k.p.Kubernetes.Service.String()
}

func (k kubernetesService) Set(s string) error {
	var svc agent.NamespacedName
	if err := svc.Set(s); err != nil {
		return err
	}
	if k.p.Kubernetes == nil {
		k.p.Kubernetes = &agent.KubernetesDiscovery{}
	}
	k.p.Kubernetes.Service = svc
	return nil
}

func (kubernetesService) Type() string { return "NAMESPACE/NAME" }

// optionalBool is a bool flag whose absence leaves the configuration's choice (nil: the default
// that depends on other settings).
type optionalBool struct{ p **bool }

func (o optionalBool) String() string {
	if o.p == nil || *o.p == nil {
		return ""
	}
	return strconv.FormatBool(**o.p)
}

func (o optionalBool) Set(s string) error {
	v, err := strconv.ParseBool(s)
	if err != nil {
		return err
	}
	*o.p = &v
	return nil
}

func (optionalBool) Type() string { return "bool" }

// hostPorts is a repeatable HOST:PORT flag. Like pflag's string arrays, the first use replaces the
// file's list and later uses add to it.
type hostPorts struct {
	list *[]agent.HostPort
	set  bool
}

func (h *hostPorts) String() string {
	if h.list == nil {
		return ""
	}
	parts := make([]string, len(*h.list))
	for i, hp := range *h.list {
		parts[i] = hp.String()
	}
	return strings.Join(parts, ",")
}

func (h *hostPorts) Set(s string) error {
	var hp agent.HostPort
	if err := hp.Set(s); err != nil {
		return err
	}
	if !h.set {
		*h.list, h.set = nil, true
	}
	*h.list = append(*h.list, hp)
	return nil
}

func (*hostPorts) Type() string { return "HOST:PORT" }
