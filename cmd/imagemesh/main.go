// Command imagemesh is the user's tool: the push gateway that puts images into IPFS or a Storj bucket,
// and the commands that name, publish and export what it holds. It parses flags; internal/gateway
// does the work.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/imagemesh/imagemesh/internal/gateway"
	"github.com/imagemesh/imagemesh/pkg/storjaccess"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	runGateway := func(ctx context.Context, cfg gateway.Config) error {
		return gateway.Run(ctx, cfg, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	}
	err := newCommand(runGateway).ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "imagemesh:", err)
		os.Exit(1)
	}
}

func bindIPFS(cmd *cobra.Command, l *gateway.IPFSLayout) {
	cmd.Flags().StringVar(&l.API, "ipfs-api", "http://127.0.0.1:5001", "kubo RPC API")
	cmd.Flags().StringVar(&l.Dir, "ipfs-root", "/imagemesh", "MFS directory the registry layout lives under")
}

// bindStorj binds the flags that name a bucket and the access grant to it. The grant comes from a
// file or $STORJ_ACCESS, never from the command line, where every user of the machine could read it.
func bindStorj(cmd *cobra.Command, l *gateway.StorjLayout) {
	cmd.Flags().StringVar(&l.AccessFile, "storj-access-file", "", "file holding a serialized Storj access grant (default: $"+storjaccess.Env+")")
	cmd.Flags().StringVar(&l.Bucket, "storj-bucket", "", "bucket the registry layout lives in (it must exist)")
	cmd.Flags().StringVar(&l.Prefix, "storj-prefix", "", "where the registry layout starts in the bucket")
}

// newCommand builds the command line; the gateway command calls runGateway with the configuration
// its flags give.
func newCommand(runGateway func(context.Context, gateway.Config) error) *cobra.Command {
	root := &cobra.Command{Use: "imagemesh", Short: "Put images into IPFS or Storj, and name, publish and export them", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(gatewayCommand(runGateway), ipfsCommand(), storjCommand())
	return root
}

func gatewayCommand(run func(context.Context, gateway.Config) error) *cobra.Command {
	var cfg gateway.Config
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "A registry that stores what is pushed to it in IPFS or a Storj bucket (docker push, crane push, skopeo copy)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return run(cmd.Context(), cfg)
		},
	}
	bindIPFS(cmd, &cfg.IPFS)
	bindStorj(cmd, &cfg.Storj)
	cmd.Flags().StringVar(&cfg.Listen, "listen", "127.0.0.1:5080", "address of the registry API")
	cmd.Flags().StringVar(&cfg.Storage, "storage", gateway.StorageIPFS, "where pushed images go: ipfs or storj")
	cmd.Flags().StringVar(&cfg.UploadSecretFile, "upload-secret-file", "", "file holding the secret that signs upload state; gateways behind one address need the same (default: random, one per process)")
	cmd.Flags().BoolVar(&cfg.StaticLayout, "static-layout", false, "storj: after each manifest push, also write the static /v2/ layout that linksharing serves to docker pull")
	cmd.Flags().StringVar(&cfg.StaticPrefix, "static-prefix", "", "storj: where the static layout starts in the bucket")
	return cmd
}

func ipfsCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "ipfs", Short: "Name and publish the layout the gateway keeps in IPFS"}
	var l gateway.IPFSLayout
	rootCmd := &cobra.Command{
		Use:   "root",
		Short: "Print the layout's root as /ipfs/<cid>: what node agents pull from",
		RunE: func(cmd *cobra.Command, _ []string) error {
			root, err := l.Root(cmd.Context())
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), root)
			return err
		},
	}
	bindIPFS(rootCmd, &l)
	var pl gateway.IPFSLayout
	var key string
	publish := &cobra.Command{
		Use:   "publish",
		Short: "Publish the layout's root under an IPNS name, and print /ipns/<name>",
		RunE: func(cmd *cobra.Command, _ []string) error {
			name, err := pl.Publish(cmd.Context(), key)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), name)
			return err
		},
	}
	bindIPFS(publish, &pl)
	publish.Flags().StringVar(&key, "key", "self", "kubo key to publish under")
	cmd.AddCommand(rootCmd, publish)
	return cmd
}

func storjCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "storj", Short: "Work with the registry layout the gateway keeps in a Storj bucket"}
	var l gateway.StorjLayout
	var repos []string
	var prefix string
	export := &cobra.Command{
		Use:   "export",
		Short: "Write the static /v2/ layout of repositories (every tag), for linksharing to serve to docker pull",
		Example: `  imagemesh storj export --storj-access-file access.txt --storj-bucket images --repository team/app
  # then: uplink share --url --not-after=none sj://images/v2/  (or a linksharing custom domain)`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			exported, err := l.Export(cmd.Context(), prefix, repos)
			for _, image := range exported {
				if _, werr := fmt.Fprintln(cmd.OutOrStdout(), image); werr != nil {
					return werr
				}
			}
			return err
		},
	}
	bindStorj(export, &l)
	export.Flags().StringArrayVar(&repos, "repository", nil, "repository path to export, e.g. team/app (repeatable)")
	export.Flags().StringVar(&prefix, "static-prefix", "", "where the static layout starts in the bucket")
	cmd.AddCommand(export)
	return cmd
}
