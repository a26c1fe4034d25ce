// Package gateway is imagemesh's push gateway: distribution's own registry handlers over the ipfs or
// storj storage driver, so that docker push, crane and skopeo put images into IPFS or a Storj bucket
// in the registry storage layout that node agents read; and the operations on what it keeps: naming
// and publishing the IPFS layout's root, exporting a bucket's static layout.
//
// Invariants:
//   - A configuration is checked whole (Config.Validate) before anything is contacted, and the Storj
//     grant and bucket are checked before the registry starts: distribution panics on a driver it
//     cannot make.
//   - The Storj grant comes from a file or $STORJ_ACCESS, never from the configuration itself, and no
//     error or log line quotes it.
//   - A manifest push is answered only after what follows it has run (the IPFS root logged, the static
//     layout written): a client whose push returned finds it exported.
//   - The state of an upload, which a client hands back with every chunk, is signed with a secret from
//     the operator's file (at least 16 characters; gateways behind one address share it), else with 32
//     random bytes: never with a guessable one, which would let a client forge another's upload.
//   - Uploads a client abandoned are purged after a week on Storj, where they are stored (pending
//     multipart uploads); never on IPFS, where MFS keeps nothing of them.
package gateway

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
	"path"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"

	"github.com/imagemesh/imagemesh/pkg/storage/driver/ipfs"
	"github.com/imagemesh/imagemesh/pkg/storage/driver/storj"
	"github.com/imagemesh/imagemesh/pkg/storage/static"
)

// Where pushed images go: Config.Storage.
const (
	StorageIPFS  = "ipfs"
	StorageStorj = "storj"
)

// RootPath is where a gateway on IPFS answers the layout's root, as /ipfs/<cid>.
const RootPath = "/imagemesh/v1/root"

// MinUploadSecretLength is the shortest upload secret a file may hold.
const MinUploadSecretLength = 16

// Config configures a Gateway.
type Config struct {
	// Listen is the address Run serves the registry API on.
	Listen string
	// Storage is StorageIPFS or StorageStorj.
	Storage string
	IPFS    IPFSLayout
	Storj   StorjLayout
	// StaticLayout, on Storj, writes the static /v2/ layout that linksharing serves after every
	// manifest push, under StaticPrefix in the bucket.
	StaticLayout bool
	StaticPrefix string
	// UploadSecretFile holds the secret that signs upload state; "" for a random one per process.
	UploadSecretFile string
}

// Validate checks the configuration without contacting anything, and reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	switch c.Storage {
	case StorageIPFS:
		errs = append(errs, c.IPFS.validate())
	case StorageStorj:
		errs = append(errs, c.Storj.validate())
	default:
		errs = append(errs, fmt.Errorf("storage %q: want %s or %s", c.Storage, StorageIPFS, StorageStorj))
	}
	return errors.Join(errs...)
}

// Gateway is the registry API over the configured storage, with what follows a push.
type Gateway struct {
	log     *slog.Logger
	app     *handlers.App
	handler http.Handler
	closers []func() error
	where   []any // names the storage in logs
}

// New checks the configuration, opens the storage (on IPFS it creates the layout's directory; on
// Storj it checks the grant and the bucket) and builds the registry. ctx bounds the registry's
// background work: the upload purger on Storj. log nil logs nothing.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Gateway, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("gateway: invalid configuration: %w", err)
	}
	secret, err := uploadSecret(cfg.UploadSecretFile)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g := &Gateway{log: log}
	regCfg := &configuration.Configuration{Version: "0.1"}
	var rootHandler http.HandlerFunc
	var afterPush func(ctx context.Context, repo, ref string)
	switch cfg.Storage {
	case StorageIPFS:
		d, err := cfg.IPFS.driver()
		if err != nil {
			return nil, err
		}
		regCfg.Storage = configuration.Storage{ipfs.DriverName: cfg.IPFS.parameters()}
		rootHandler = func(w http.ResponseWriter, r *http.Request) {
			c, err := d.RootCID(r.Context())
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			_, _ = fmt.Fprintf(w, "/ipfs/%s\n", c) // a client that left needs no answer
		}
		// After every manifest push, the layout's root has a new CID: say it, so that it can be published.
		afterPush = func(ctx context.Context, repo, ref string) {
			c, err := d.RootCID(ctx)
			if err != nil {
				log.Warn("pushed, but the layout's root is unknown", "repository", repo, "reference", ref, "err", err)
				return
			}
			log.Info("pushed; the layout's root is now", "repository", repo, "reference", ref, "root", "/ipfs/"+c)
		}
		g.where = []any{"ipfs", cfg.IPFS.API, "root", cfg.IPFS.dir()}
	case StorageStorj:
		// The gateway's own driver checks the grant and the bucket before the registry starts (the
		// registry panics on a driver it cannot make), and writes the static layout.
		d, err := cfg.Storj.driver(ctx)
		if err != nil {
			return nil, err
		}
		g.closers = append(g.closers, d.Close)
		regCfg.Storage = configuration.Storage{storj.DriverName: cfg.Storj.parameters()}
		exporter := &static.Exporter{Driver: d, Prefix: cfg.StaticPrefix}
		bucket := cfg.Storj.Bucket
		afterPush = func(ctx context.Context, repo, ref string) {
			if !cfg.StaticLayout {
				log.Info("pushed", "repository", repo, "reference", ref, "bucket", bucket)
				return
			}
			if err := exporter.Export(ctx, repo, ref); err != nil {
				log.Error("pushed, but the static layout was not written", "repository", repo, "reference", ref, "err", err)
				return
			}
			log.Info("pushed and exported to the static layout", "repository", repo, "reference", ref, "bucket", bucket)
		}
		g.where = []any{"storj bucket", bucket, "prefix", cfg.Storj.Prefix}
	}
	// Uploads a client abandoned: on Storj they are pending multipart uploads, invisible but stored;
	// distribution's purger deletes them after a week (the driver aborts them). MFS has no such cost.
	purge := map[any]any{"enabled": false}
	if cfg.Storage == StorageStorj {
		purge = map[any]any{"enabled": true, "age": "168h", "interval": "24h", "dryrun": false}
	}
	regCfg.Storage["maintenance"] = configuration.Parameters{"uploadpurging": purge}
	regCfg.Log.Level = "warn"
	regCfg.HTTP.Secret = secret
	g.app = handlers.NewApp(ctx, regCfg)
	g.handler = withAfterPush(g.app, rootHandler, afterPush)
	return g, nil
}

// ServeHTTP serves the registry API, and on IPFS the layout's root at RootPath.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) { g.handler.ServeHTTP(w, r) }

// Close stops the registry's background work and closes the storage's connections.
func (g *Gateway) Close() error {
	var errs []error
	if g.app != nil {
		errs = append(errs, g.app.Shutdown())
	}
	for _, c := range g.closers {
		errs = append(errs, c())
	}
	return errors.Join(errs...)
}

// Serve serves the gateway on ln until ctx is done, then lets the requests under way finish, for 30s
// at most.
func (g *Gateway) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{Handler: g, ReadHeaderTimeout: 10 * time.Second}
	g.log.Info("gateway serving", append([]any{"listen", ln.Addr().String()}, g.where...)...)
	stopped := make(chan error, 1)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		stopped <- srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("gateway on %s: %w", ln.Addr(), err)
	}
	if err := <-stopped; err != nil {
		return fmt.Errorf("gateway on %s: shut down: %w", ln.Addr(), err)
	}
	return nil
}

// Run runs a gateway of cfg on cfg.Listen until ctx is done.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	g, err := New(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer func() { _ = g.Close() }() // on the way out, with nothing left to report to
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	return g.Serve(ctx, ln)
}

// withAfterPush serves app; it answers a manifest push only after afterPush ran, and RootPath with
// rootHandler if there is one.
func withAfterPush(app http.Handler, rootHandler http.HandlerFunc, afterPush func(ctx context.Context, repo, ref string)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == RootPath && rootHandler != nil {
			rootHandler(w, r)
			return
		}
		repo, ref, isManifest := manifestPath(r.URL.Path)
		if r.Method != http.MethodPut || !isManifest {
			app.ServeHTTP(w, r)
			return
		}
		// A manifest push is answered only after afterPush ran: a client that pushed an image finds
		// it exported (and the root logged) when its push returns.
		held := &heldResponse{header: http.Header{}, code: http.StatusOK}
		app.ServeHTTP(held, r)
		if held.code == http.StatusCreated {
			afterPush(r.Context(), repo, ref)
		}
		for k, v := range held.header {
			w.Header()[k] = v
		}
		w.WriteHeader(held.code)
		_, _ = w.Write(held.body.Bytes()) // a client that left needs no answer
	})
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

// uploadSecret is the secret distribution signs the state of an upload with: from the operator's
// file, else random.
func uploadSecret(file string) (string, error) {
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("upload secret: %w", err)
		}
		s := strings.TrimSpace(string(b))
		if len(s) < MinUploadSecretLength {
			return "", fmt.Errorf("upload secret file %s: %d characters, want at least %d", file, len(s), MinUploadSecretLength)
		}
		return s, nil
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("upload secret: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// IPFSLayout is where the gateway keeps the layout in IPFS: a directory of a kubo node's MFS.
type IPFSLayout struct {
	// API is the kubo RPC API, e.g. http://127.0.0.1:5001.
	API string
	// Dir is the MFS directory the layout lives under. Default /imagemesh.
	Dir string
}

func (l IPFSLayout) dir() string {
	if l.Dir == "" {
		return "/imagemesh"
	}
	return l.Dir
}

func (l IPFSLayout) validate() error {
	var errs []error
	if l.API == "" {
		errs = append(errs, errors.New("ipfs: the kubo RPC API is required"))
	}
	if d := l.dir(); !path.IsAbs(d) {
		errs = append(errs, fmt.Errorf("ipfs: directory %q must be an absolute MFS path", d))
	}
	return errors.Join(errs...)
}

func (l IPFSLayout) parameters() configuration.Parameters {
	return configuration.Parameters{"api": l.API, "root": l.dir()}
}

func (l IPFSLayout) driver() (*ipfs.Driver, error) {
	return ipfs.New(ipfs.Parameters{API: l.API, Root: l.dir()})
}

// StorjLayout is where the gateway keeps the layout in Storj: a bucket, under a prefix.
type StorjLayout struct {
	// AccessFile holds a serialized access grant; "" reads it from $STORJ_ACCESS.
	AccessFile string
	// Bucket must exist.
	Bucket string
	// Prefix is where the layout starts in the bucket.
	Prefix string
}

func (l StorjLayout) validate() error {
	if l.Bucket == "" {
		return errors.New("storj: a bucket is required")
	}
	return nil
}

func (l StorjLayout) parameters() configuration.Parameters {
	return configuration.Parameters{"accessfile": l.AccessFile, "bucket": l.Bucket, "prefix": l.Prefix}
}

func (l StorjLayout) driver(ctx context.Context) (*storj.Driver, error) {
	return storj.New(ctx, storj.Parameters{AccessFile: l.AccessFile, Bucket: l.Bucket, Prefix: l.Prefix})
}
