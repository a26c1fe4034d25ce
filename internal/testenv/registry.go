package testenv

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"
)

// Registry is a real distribution v3 registry on 127.0.0.1, storing into a temp dir. It speaks
// plain HTTP, as containerd's hosts.toml `server = "http://..."` and crane's --insecure expect.
type Registry struct {
	// Host is "127.0.0.1:port", as an image reference names the registry.
	Host string
	// URL is "http://127.0.0.1:port".
	URL string
	// Dir is the registry's storage root; it survives Stop, so that Start serves the same images.
	Dir string

	bin, config, log string
	proc             *process
	// token, if set, is served at /token on Host, in front of the registry.
	token http.Handler
	// tlsCA, tlsCert and tlsKey, if set, make the registry serve HTTPS.
	tlsCA, tlsCert, tlsKey string
	// netns, if set, is the network namespace the registry runs in.
	netns string
}

// InNetns runs the registry in network namespace ns, on addr (host:port, an address of ns), e.g. on
// a Cluster's outside host, whose link a test can shape.
func InNetns(ns, addr string) RegistryOption {
	return func(t testing.TB, r *Registry, dir string) string {
		r.netns, r.Host, r.URL = ns, addr, "http://"+addr
		return ""
	}
}

// RegistryOption configures a registry before it starts.
type RegistryOption func(t testing.TB, r *Registry, dir string) (configYAML string)

// StartRegistry starts a registry, waits until GET /v2/ answers, and stops it when the test ends.
func StartRegistry(t testing.TB, opts ...RegistryOption) *Registry {
	t.Helper()
	dir := t.TempDir()
	r := &Registry{
		bin:    Tool(t, "registry"),
		Host:   FreeAddr(t),
		Dir:    filepath.Join(dir, "storage"),
		config: filepath.Join(dir, "config.yml"),
		log:    filepath.Join(dir, "registry.log"),
	}
	r.URL = "http://" + r.Host
	var extra string
	for _, opt := range opts {
		extra += opt(t, r, dir)
	}
	listen := r.Host
	if r.token != nil {
		// go-containerregistry accepts a token realm on a loopback address only when it is the
		// registry's own host:port, so the token service shares the registry's address behind a front,
		// as it often does behind an ingress.
		listen = FreeAddr(t)
		front(t, r.Host, r.token, listen)
	}
	// Access logs at info level: a failing test shows which requests reached upstream.
	config := fmt.Sprintf(`version: 0.1
log: {level: info, formatter: text, accesslog: {disabled: false}}
storage:
  filesystem: {rootdirectory: %s}
  delete: {enabled: true}
http:
  addr: %s
`, r.Dir, listen)
	if r.tlsCert != "" {
		config += fmt.Sprintf("  tls: {certificate: %s, key: %s}\n", r.tlsCert, r.tlsKey)
	}
	config += extra
	if err := os.WriteFile(r.config, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Stop(t)
		if t.Failed() {
			t.Logf("registry %s log (end):\n%s", r.Host, logTail(r.log))
		}
	})
	r.Start(t)
	return r
}

// Start starts the registry (again) on the same address and storage, and waits until it answers.
func (r *Registry) Start(t testing.TB) {
	t.Helper()
	if r.proc != nil {
		t.Fatalf("registry %s is already running", r.Host)
	}
	bin, args := r.bin, []string{"serve", r.config}
	if r.netns != "" {
		bin, args = "ip", append([]string{"netns", "exec", r.netns, r.bin}, args...)
	}
	p, err := startProcess(r.log, bin, args...)
	if err != nil {
		t.Fatalf("start registry: %v", err)
	}
	r.proc = p
	client := &http.Client{Timeout: 2 * time.Second, Transport: r.Transport(t)}
	err = waitReady(p, 20*time.Second, func() error {
		resp, err := client.Get(r.URL + "/v2/")
		if err != nil {
			return err
		}
		_ = resp.Body.Close() // only the status matters
		// 401 is a registry that is up and asks for credentials.
		if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusUnauthorized {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("registry on %s: %v\n%s", r.Host, err, logTail(r.log))
	}
}

// Stop stops the registry (SIGTERM, then SIGKILL after 10s) and waits for it; its storage stays.
// Stopping a stopped registry does nothing.
func (r *Registry) Stop(t testing.TB) {
	t.Helper()
	if r.proc == nil {
		return
	}
	r.proc.stop(10 * time.Second)
	r.proc = nil
}

// BlobGets counts, by digest, the blob GETs the registry answered with 200 or 206, from its access
// log: how often the upstream served each blob's bytes.
func (r *Registry) BlobGets(t testing.TB) map[string]int {
	t.Helper()
	b, err := os.ReadFile(r.log)
	if err != nil {
		t.Fatal(err)
	}
	n := map[string]int{}
	for _, m := range blobGet.FindAllStringSubmatch(string(b), -1) {
		n[m[1]]++
	}
	return n
}

// blobGet matches a blob GET in a combined-format access log line: "GET /v2/<repo>/blobs/<digest>
// HTTP/1.1" 200.
var blobGet = regexp.MustCompile(`"GET /v2/[^ ]+/blobs/(sha256:[0-9a-f]{64}) HTTP/[0-9.]+" 20[06] `)

// PID is the registry's process id while it runs (0 when stopped), for measuring it.
func (r *Registry) PID() int {
	if r.proc == nil {
		return 0
	}
	return r.proc.cmd.Process.Pid
}

// front serves token at /token on addr and passes everything else to the registry at backend.
func front(t testing.TB, addr string, token http.Handler, backend string) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/token", token)
	mux.Handle("/", httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: backend}))
	srv := &http.Server{Handler: mux, ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = srv.Serve(ln) }() // ends with ErrServerClosed at cleanup
	t.Cleanup(func() { _ = srv.Close() })
}

// Transport is an HTTP transport that trusts the registry's certificate, if it has one.
func (r *Registry) Transport(t testing.TB) http.RoundTripper {
	t.Helper()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if r.tlsCA != "" {
		pool := x509.NewCertPool()
		pem, err := os.ReadFile(r.tlsCA)
		if err != nil || !pool.AppendCertsFromPEM(pem) {
			t.Fatalf("registry CA %s: %v", r.tlsCA, err)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	return tr
}
