// Command imagemesh is the user's tool: the push gateway that puts images into IPFS or a Storj bucket,
// and the commands that name, publish and export what it holds.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
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
	"github.com/imagemesh/imagemesh/pkg/storage/driver/storj"
	"github.com/imagemesh/imagemesh/pkg/storage/static"
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

// storjFlags name a bucket and the access grant to it. The grant comes from a file or $STORJ_ACCESS,
// never from the command line, where every user of the machine could read it.
type storjFlags struct{ accessFile, bucket, prefix string }

func (f *storjFlags) bind(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.accessFile, "storj-access-file", "", "file holding a serialized Storj access grant (default: $"+storj.AccessEnv+")")
	cmd.Flags().StringVar(&f.bucket, "storj-bucket", "", "bucket the registry layout lives in (it must exist)")
	cmd.Flags().StringVar(&f.prefix, "storj-prefix", "", "where the registry layout starts in the bucket")
}

func (f *storjFlags) params() configuration.Parameters {
	return configuration.Parameters{"accessfile": f.accessFile, "bucket": f.bucket, "prefix": f.prefix}
}

func (f *storjFlags) driver(ctx context.Context) (*storj.Driver, error) {
	return storj.New(ctx, storj.Parameters{AccessFile: f.accessFile, Bucket: f.bucket, Prefix: f.prefix})
}

func newCommand() *cobra.Command {
	root := &cobra.Command{Use: "imagemesh", Short: "Put images into IPFS or Storj, and name, publish and export them", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(gatewayCommand(), ipfsCommand(), storjCommand())
	return root
}

type gatewayOptions struct {
	listen, storage string
	ipfs            ipfsFlags
	storj           storjFlags
	static          bool
	staticPrefix    string
	secretFile      string
}

func gatewayCommand() *cobra.Command {
	var o gatewayOptions
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "A registry that stores what is pushed to it in IPFS or a Storj bucket (docker push, crane push, skopeo copy)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runGateway(cmd.Context(), o)
		},
	}
	o.ipfs.bind(cmd)
	o.storj.bind(cmd)
	cmd.Flags().StringVar(&o.listen, "listen", "127.0.0.1:5080", "address of the registry API")
	cmd.Flags().StringVar(&o.storage, "storage", "ipfs", "where pushed images go: ipfs or storj")
	cmd.Flags().StringVar(&o.secretFile, "upload-secret-file", "", "file holding the secret that signs upload state; gateways behind one address need the same (default: random, one per process)")
	cmd.Flags().BoolVar(&o.static, "static-layout", false, "storj: after each manifest push, also write the static /v2/ layout that linksharing serves to docker pull")
	cmd.Flags().StringVar(&o.staticPrefix, "static-prefix", "", "storj: where the static layout starts in the bucket")
	return cmd
}

// pushHook runs after a manifest push that the registry accepted.
type pushHook func(ctx context.Context, repo, ref string)

func runGateway(ctx context.Context, o gatewayOptions) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg := &configuration.Configuration{Version: "0.1"}
	var extra http.HandlerFunc
	var hook pushHook
	var where []any
	switch o.storage {
	case "ipfs":
		f := o.ipfs
		d, err := f.driver()
		if err != nil {
			return err
		}
		cfg.Storage = configuration.Storage{ipfs.DriverName: configuration.Parameters{"api": f.api, "root": f.root}}
		extra = func(w http.ResponseWriter, r *http.Request) {
			c, err := d.RootCID(r.Context())
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			fmt.Fprintf(w, "/ipfs/%s\n", c)
		}
		// After every manifest push, the layout's root has a new CID: say it, so that it can be published.
		hook = func(ctx context.Context, repo, ref string) {
			if c, err := d.RootCID(ctx); err == nil {
				log.Info("pushed; the layout's root is now", "repository", repo, "reference", ref, "root", "/ipfs/"+c)
			}
		}
		where = []any{"ipfs", f.api, "root", f.root}
	case "storj":
		f := o.storj
		// The gateway's own driver checks the grant and the bucket before the registry starts (the
		// registry panics on a driver it cannot make), and writes the static layout.
		d, err := f.driver(ctx)
		if err != nil {
			return err
		}
		defer d.Close()
		cfg.Storage = configuration.Storage{storj.DriverName: f.params()}
		exporter := &static.Exporter{Driver: d, Prefix: o.staticPrefix}
		hook = func(ctx context.Context, repo, ref string) {
			if !o.static {
				log.Info("pushed", "repository", repo, "reference", ref, "bucket", f.bucket)
				return
			}
			if err := exporter.Export(ctx, repo, ref); err != nil {
				log.Error("pushed, but the static layout was not written", "repository", repo, "reference", ref, "err", err)
				return
			}
			log.Info("pushed and exported to the static layout", "repository", repo, "reference", ref, "bucket", f.bucket)
		}
		where = []any{"storj bucket", f.bucket, "prefix", f.prefix}
	default:
		return fmt.Errorf("--storage %q: want ipfs or storj", o.storage)
	}
	// Uploads a client abandoned: on Storj they are pending multipart uploads, invisible but stored;
	// distribution's purger deletes them after a week (the driver aborts them). MFS has no such cost.
	purge := map[any]any{"enabled": false}
	if o.storage == "storj" {
		purge = map[any]any{"enabled": true, "age": "168h", "interval": "24h", "dryrun": false}
	}
	cfg.Storage["maintenance"] = configuration.Parameters{"uploadpurging": purge}
	cfg.Log.Level = "warn"
	secret, err := uploadSecret(o.secretFile)
	if err != nil {
		return err
	}
	cfg.HTTP.Secret = secret
	app := handlers.NewApp(ctx, cfg)

	var handler http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/imagemesh/v1/root" && extra != nil {
			extra(w, r)
			return
		}
		repo, ref, isManifest := manifestPath(r.URL.Path)
		if r.Method != http.MethodPut || !isManifest {
			app.ServeHTTP(w, r)
			return
		}
		// A manifest push is answered only after the hook ran: a client that pushed an image finds
		// it exported (and the root logged) when its push returns.
		rec := &heldResponse{header: http.Header{}, code: http.StatusOK}
		app.ServeHTTP(rec, r)
		if rec.code == http.StatusCreated {
			hook(r.Context(), repo, ref)
		}
		for k, v := range rec.header {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.code)
		w.Write(rec.body.Bytes())
	})
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	log.Info("gateway serving", append([]any{"listen", ln.Addr().String()}, where...)...)
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

// manifestPath splits /v2/<repo>/manifests/<ref>.
func manifestPath(p string) (repo, ref string, ok bool) {
	rest, found := strings.CutPrefix(p, "/v2/")
	if !found {
		return "", "", false
	}
	i := strings.LastIndex(rest, "/manifests/")
	if i <= 0 {
		return "", "", false
	}
	return rest[:i], rest[i+len("/manifests/"):], true
}

// heldResponse holds a (small) response until the gateway has done what follows a push.
type heldResponse struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (h *heldResponse) Header() http.Header         { return h.header }
func (h *heldResponse) WriteHeader(code int)        { h.code = code }
func (h *heldResponse) Write(b []byte) (int, error) { return h.body.Write(b) }

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

func storjCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "storj", Short: "Work with the registry layout the gateway keeps in a Storj bucket"}
	var f storjFlags
	var repos []string
	var prefix string
	export := &cobra.Command{
		Use:   "export",
		Short: "Write the static /v2/ layout of repositories (every tag), for linksharing to serve to docker pull",
		Example: `  imagemesh storj export --storj-access-file access.txt --storj-bucket images --repository team/app
  # then: uplink share --url --not-after=none sj://images/v2/  (or a linksharing custom domain)`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(repos) == 0 {
				return errors.New("name at least one --repository")
			}
			d, err := f.driver(cmd.Context())
			if err != nil {
				return err
			}
			defer d.Close()
			e := &static.Exporter{Driver: d, Prefix: prefix}
			for _, repo := range repos {
				tags, err := e.ExportAll(cmd.Context(), repo)
				if err != nil {
					return err
				}
				for _, t := range tags {
					fmt.Fprintf(cmd.OutOrStdout(), "%s:%s\n", repo, t)
				}
			}
			return nil
		},
	}
	f.bind(export)
	export.Flags().StringArrayVar(&repos, "repository", nil, "repository path to export, e.g. team/app (repeatable)")
	export.Flags().StringVar(&prefix, "static-prefix", "", "where the static layout starts in the bucket")
	cmd.AddCommand(export)
	return cmd
}

// uploadSecret is the secret distribution signs the state of an upload with, which a client hands
// back with every chunk: from the operator's file (several gateways behind one address must share it),
// else random. A guessable one (it came from the clock) lets a client forge another's upload state.
func uploadSecret(file string) (string, error) {
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("--upload-secret-file: %w", err)
		}
		s := strings.TrimSpace(string(b))
		if len(s) < 16 {
			return "", fmt.Errorf("--upload-secret-file %s: %d characters, want at least 16", file, len(s))
		}
		return s, nil
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("upload secret: %w", err)
	}
	return hex.EncodeToString(b), nil
}
