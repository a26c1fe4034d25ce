// Command node-agent is the imagemesh agent: a registry mirror for the node's containerd, with a
// verified local cache. With no flags it serves on 127.0.0.1:5000 and pulls through to the registries
// images name.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/imagemesh/imagemesh/internal/agent"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := newCommand().ExecuteContext(ctx); err != nil {
		os.Exit(1)
	}
}

func newCommand() *cobra.Command {
	cfg := agent.Default()
	var (
		configFile string
		upstreams  []string
	)
	cmd := &cobra.Command{
		Use:           "node-agent",
		Short:         "OCI pull mirror with a verified local cache, for containerd on this node",
		Version:       agent.Version,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Precedence: defaults, then the file, then the flags that were given.
			final := agent.Default()
			if configFile != "" {
				if err := final.LoadFile(configFile); err != nil {
					return report(err)
				}
			}
			cmd.Flags().Visit(func(f *pflagFlag) { applyFlag(&final, &cfg, f.Name) })
			for _, u := range upstreams {
				if err := final.SetUpstream(u); err != nil {
					return report(err)
				}
			}
			log := agent.NewLogger(final.Log)
			if err := agent.Run(cmd.Context(), final, log); err != nil {
				return report(err)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&configFile, "config", "", "YAML config file; flags override it")
	f.StringVar(&cfg.Listen, "listen", cfg.Listen, "address of the pull API")
	f.StringVar(&cfg.MetricsListen, "metrics-listen", cfg.MetricsListen, "address for /metrics, /healthz and /readyz (default: on --listen)")
	f.StringVar(&cfg.DataDir, "data-dir", cfg.DataDir, "directory of the cache")
	f.Var(&cfg.Cache.MaxBytes, "cache-max-bytes", "size limit of the cache, in bytes or e.g. 20GiB (0: unbounded)")
	f.StringVar(&cfg.DefaultRegistry, "default-registry", cfg.DefaultRegistry, "registry of pulls that name none (no ns parameter)")
	f.StringSliceVar(&cfg.Registries, "registry", nil, "only pull from these registries (repeatable; default: any)")
	f.Var(&cfg.TagTTL, "tag-ttl", "how long a tag's answer is reused before asking the upstream again")
	f.StringArrayVar(&upstreams, "upstream", nil, "HOST=URL: reach registry HOST at URL, e.g. example.test=http://127.0.0.1:5001 (repeatable)")
	f.StringVar(&cfg.HostConfig.Dir, "hosts-dir", "", "containerd's registry config_path to write hosts.toml into, e.g. /etc/containerd/certs.d")
	f.StringSliceVar(&cfg.HostConfig.Registries, "mirror-registry", nil, "registries to point at this agent in --hosts-dir (repeatable)")
	f.StringVar(&cfg.HostConfig.MirrorURL, "mirror-url", "", "URL containerd reaches this agent at (default: http://<listen>)")
	f.StringVar(&cfg.Log.Level, "log-level", cfg.Log.Level, "debug, info, warn or error")
	f.StringVar(&cfg.Log.Format, "log-format", cfg.Log.Format, "text or json")
	f.Var(&cfg.ShutdownTimeout, "shutdown-timeout", "how long SIGTERM waits for transfers under way")
	return cmd
}

func report(err error) error {
	fmt.Fprintln(os.Stderr, "node-agent:", err)
	return err
}
