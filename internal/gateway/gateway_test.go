package gateway_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/internal/gateway"
	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/source/ipfs"
)

// Every problem of a configuration is reported, at once, before anything is contacted.
func TestValidate(t *testing.T) {
	ok := []gateway.Config{
		{Storage: gateway.StorageIPFS, IPFS: gateway.IPFSLayout{API: "http://127.0.0.1:5001"}},
		{Storage: gateway.StorageIPFS, IPFS: gateway.IPFSLayout{API: "http://127.0.0.1:5001", Dir: "/images"}},
		{Storage: gateway.StorageStorj, Storj: gateway.StorjLayout{Bucket: "images"}},
		{Storage: gateway.StorageStorj, Storj: gateway.StorjLayout{Bucket: "images", AccessFile: "/etc/access", Prefix: "registry"}, StaticLayout: true},
	}
	for _, c := range ok {
		if err := c.Validate(); err != nil {
			t.Errorf("%+v: %v", c, err)
		}
	}
	for _, tc := range []struct {
		cfg  gateway.Config
		want []string
	}{
		{gateway.Config{}, []string{`storage ""`}},
		{gateway.Config{Storage: "s3"}, []string{`storage "s3": want ipfs or storj`}},
		{gateway.Config{Storage: gateway.StorageIPFS, IPFS: gateway.IPFSLayout{Dir: "images"}}, []string{"kubo RPC API is required", `"images" must be an absolute MFS path`}},
		{gateway.Config{Storage: gateway.StorageStorj}, []string{"bucket is required"}},
	} {
		err := tc.cfg.Validate()
		for _, want := range tc.want {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%+v: %v, want an error saying %q", tc.cfg, err, want)
			}
		}
	}
}

// New refuses what it cannot serve from before it serves anything, and says why; a Storj grant is
// never quoted.
func TestNewRefuses(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	grant := filepath.Join(dir, "access")
	if err := os.WriteFile(grant, []byte("not-a-grant-SECRET\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	short := filepath.Join(dir, "secret")
	if err := os.WriteFile(short, []byte("123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	k := testenv.StartKubo(t)
	for _, tc := range []struct {
		name string
		cfg  gateway.Config
		want string
	}{
		{"invalid", gateway.Config{Storage: "s3"}, "invalid configuration"},
		{"kubo down", gateway.Config{Storage: gateway.StorageIPFS, IPFS: gateway.IPFSLayout{API: "http://127.0.0.1:1"}}, "127.0.0.1:1"},
		{"garbage grant", gateway.Config{Storage: gateway.StorageStorj, Storj: gateway.StorjLayout{AccessFile: grant, Bucket: "images"}}, "access grant file " + grant},
		{"short secret", gateway.Config{Storage: gateway.StorageIPFS, IPFS: gateway.IPFSLayout{API: k.API}, UploadSecretFile: short}, "at least 16"},
	} {
		g, err := gateway.New(ctx, tc.cfg, nil)
		if err == nil {
			g.Close()
			t.Errorf("%s: accepted", tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "SECRET") {
			t.Errorf("%s: %v, want an error saying %q and no secret", tc.name, err, tc.want)
		}
	}
}

// logBuffer is a slog handler's output that tests can read while the gateway writes it.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v %s", url, resp.StatusCode, err, b)
	}
	return string(b)
}

// A gateway on IPFS, run until its context ends: crane pushes into kubo through it, each manifest push
// returns only once the new root is logged, the gateway and IPFSLayout.Root name the same root, and a
// node agent's IPFS source reads the image from that root. Publish names the root under IPNS.
func TestIPFS(t *testing.T) {
	k := testenv.StartKubo(t)
	addr := testenv.FreeAddr(t)
	var logs logBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg := gateway.Config{Listen: addr, Storage: gateway.StorageIPFS, IPFS: gateway.IPFSLayout{API: k.API, Dir: "/images"}}
	ran := make(chan error, 1)
	go func() { ran <- gateway.Run(ctx, cfg, slog.New(slog.NewTextHandler(&logs, nil))) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case err := <-ran:
			t.Fatalf("gateway stopped: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("gateway not serving after 30s: %v\n%s", err, logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	pushed := testenv.PushImage(t, addr+"/team/app:v1", testenv.Layer{Size: 1 << 20})
	root := strings.TrimSpace(get(t, "http://"+addr+gateway.RootPath))
	if !strings.HasPrefix(root, "/ipfs/") {
		t.Fatalf("root from the gateway: %q", root)
	}
	if !strings.Contains(logs.String(), "root="+root) {
		t.Fatalf("the push returned before the root %s was logged:\n%s", root, logs.String())
	}
	if r, err := cfg.IPFS.Root(ctx); err != nil || r != root {
		t.Fatalf("IPFSLayout.Root = %q, %v; the gateway says %s", r, err, root)
	}
	src, err := ipfs.New(ipfs.Options{API: k.API, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	repo, _ := reference.ParseNamed("example.test/team/app")
	if desc, err := src.Resolve(ctx, repo, "v1"); err != nil || desc.Digest != pushed {
		t.Fatalf("the IPFS source reads team/app:v1 from %s as %v, %v; pushed %s", root, desc.Digest, err, pushed)
	}

	name, err := cfg.IPFS.Publish(ctx, "self")
	if err != nil || !strings.HasPrefix(name, "/ipns/") {
		t.Fatalf("Publish: %q, %v", name, err)
	}
	if resolved := strings.TrimSpace(k.Run(t, "name", "resolve", name)); resolved != root {
		t.Fatalf("published %s resolves to %s, want %s", name, resolved, root)
	}

	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("Run after its context ended: %v", err)
		}
	case <-time.After(40 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
}

// startUpload starts a blob upload on a gateway and returns where to continue it: the path and query,
// whose _state the gateway signed.
func startUpload(t *testing.T, gw string) string {
	t.Helper()
	resp, err := http.Post(gw+"/v2/team/app/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusAccepted || !strings.Contains(loc, "_state=") {
		t.Fatalf("start upload on %s: %d, Location %q", gw, resp.StatusCode, loc)
	}
	if i := strings.Index(loc, "/v2/"); i > 0 {
		loc = loc[i:]
	}
	return loc
}

// finishUpload sends a whole blob to where an upload continues, on gateway gw, and returns the
// status and the body of the answer.
func finishUpload(t *testing.T, gw, loc string, blob []byte) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, gw+loc+"&digest="+digest.FromBytes(blob).String(), bytes.NewReader(blob))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// Gateways behind one address share the secret from UploadSecretFile, so that an upload started on
// one is finished on another. Without it, each has a random secret of its own, and refuses the state
// another signed: a client cannot forge an upload's state either.
func TestSharedUploadSecret(t *testing.T) {
	k := testenv.StartKubo(t)
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("shared-by-every-gateway-replica\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	start := func(secretFile string) string {
		cfg := gateway.Config{Storage: gateway.StorageIPFS, IPFS: gateway.IPFSLayout{API: k.API}, UploadSecretFile: secretFile}
		g, err := gateway.New(context.Background(), cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(g)
		t.Cleanup(func() { srv.Close(); g.Close() })
		return srv.URL
	}
	a, b := start(secret), start(secret)
	for i, blob := range [][]byte{[]byte("a blob started on one gateway"), []byte("and another")} {
		if code, body := finishUpload(t, b, startUpload(t, a), blob); code != http.StatusCreated {
			t.Fatalf("upload %d started on A, finished on B with the same secret: %d %s, want 201", i, code, body)
		}
	}

	c, d := start(""), start("")
	blob := []byte(fmt.Sprintf("a blob for two strangers, %d", time.Now().UnixNano()))
	// distribution answers a state it cannot verify as an unknown upload: 404 BLOB_UPLOAD_INVALID.
	if code, body := finishUpload(t, d, startUpload(t, c), blob); code != http.StatusNotFound || !strings.Contains(body, "BLOB_UPLOAD_INVALID") {
		t.Fatalf("upload started on C, finished on D, each with a random secret: %d %s, want 404 BLOB_UPLOAD_INVALID", code, body)
	}
	if code, body := finishUpload(t, c, startUpload(t, c), blob); code != http.StatusCreated {
		t.Fatalf("upload started and finished on C: %d %s, want 201", code, body)
	}
}
