// Command imagemesh is the user's tool: the push gateway that puts images into IPFS, and the commands
// that name and publish what it holds.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	"github.com/ipfs/kubo/client/rpc"
	"github.com/spf13/cobra"

	"github.com/imagemesh/imagemesh/pkg/storage/driver/ipfs"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newCommand().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "imagemesh:", err)
		os.Exit(1)
	}
}

type ipfsFlags struct{ api, root string }

func (f *ipfsFlags) bind(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.api, "ipfs-api", "http://127.0.0.1:5001", "kubo RPC API")
	cmd.Flags().StringVar(&f.root, "ipfs-root", "/imagemesh", "MFS directory the registry layout lives under")
}

func (f *ipfsFlags) driver() (*ipfs.Driver, error) {
	return ipfs.New(ipfs.Parameters{API: f.api, Root: f.root})
}

func newCommand() *cobra.Command {
	root := &cobra.Command{Use: "imagemesh", Short: "Put images into IPFS and name them", SilenceUsage: true}
	root.AddCommand(gatewayCommand(), ipfsCommand())
	return root
}

func gatewayCommand() *cobra.Command {
	var f ipfsFlags
	var listen string
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "A registry that stores what is pushed to it in IPFS (docker push, crane push)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runGateway(cmd.Context(), listen, f)
		},
	}
	f.bind(cmd)
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:5080", "address of the registry API")
	return cmd
}

func runGateway(ctx context.Context, listen string, f ipfsFlags) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	d, err := f.driver()
	if err != nil {
		return err
	}
	cfg := &configuration.Configuration{Version: "0.1"}
	cfg.Storage = configuration.Storage{
		ipfs.DriverName: configuration.Parameters{"api": f.api, "root": f.root},
		"maintenance":   configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
	}
	cfg.Log.Level = "warn"
	cfg.HTTP.Secret = fmt.Sprintf("%d", time.Now().UnixNano())
	app := handlers.NewApp(ctx, cfg)

	// After every manifest push, the layout's root has a new CID: say it, so that it can be published.
	var handler http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/imagemesh/v1/root" {
			c, err := d.RootCID(r.Context())
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			fmt.Fprintf(w, "/ipfs/%s\n", c)
			return
		}
		rec := &statusRecorder{ResponseWriter: w}
		app.ServeHTTP(rec, r)
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/") && rec.status == http.StatusCreated {
			if c, err := d.RootCID(r.Context()); err == nil {
				log.Info("pushed; the layout's root is now", "manifest", r.URL.Path, "root", "/ipfs/"+c)
			}
		}
	})
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	log.Info("gateway serving", "listen", ln.Addr().String(), "ipfs", f.api, "root", f.root)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func ipfsCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "ipfs", Short: "Name and publish the layout the gateway keeps in IPFS"}
	var f ipfsFlags
	rootCmd := &cobra.Command{
		Use:   "root",
		Short: "Print the layout's root as /ipfs/<cid>: what node agents pull from",
		RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := f.driver()
			if err != nil {
				return err
			}
			c, err := d.RootCID(cmd.Context())
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "/ipfs/%s\n", c)
			return nil
		},
	}
	f.bind(rootCmd)
	var pf ipfsFlags
	var key string
	publish := &cobra.Command{
		Use:   "publish",
		Short: "Publish the layout's root under an IPNS name, and print /ipns/<name>",
		RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := pf.driver()
			if err != nil {
				return err
			}
			c, err := d.RootCID(cmd.Context())
			if err != nil {
				return err
			}
			api, err := rpc.NewURLApiWithClient(pf.api, &http.Client{})
			if err != nil {
				return err
			}
			var out struct{ Name, Value string }
			if err := api.Request("name/publish", "/ipfs/"+c).Option("key", key).Exec(cmd.Context(), &out); err != nil {
				return fmt.Errorf("publish /ipfs/%s under %s: %w", c, key, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "/ipns/%s\n", out.Name)
			return nil
		},
	}
	pf.bind(publish)
	publish.Flags().StringVar(&key, "key", "self", "kubo key to publish under")
	cmd.AddCommand(rootCmd, publish)
	return cmd
}
