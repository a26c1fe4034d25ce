package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/peering"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// TestNodeTokenGuardsOnlyThePullAPI: with the node token required, the agent's API port refuses
// /v2/ without it, and still answers what must stay open without it: the health endpoints (kubelet
// probes), the peer info (other agents' discovery), /metrics and the status page (Prometheus, an
// operator's port-forward).
func TestNodeTokenGuardsOnlyThePullAPI(t *testing.T) {
	dir := t.TempDir()
	token, created, err := loadNodeToken(dir)
	if err != nil || !created {
		t.Fatalf("loadNodeToken: %v, created %v", err, created)
	}
	reg := prometheus.NewRegistry()
	store, err := content.Open(filepath.Join(dir, "content"), content.Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	m, err := mirror.New(mirror.Options{Store: store, Source: source.NewChain(), NodeToken: token, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	node, err := peering.New(context.Background(), peering.Options{ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, Open: true, DataDir: dir, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = node.Close() })

	lns, err := listen(Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	var ready atomic.Bool
	ready.Store(true)
	status := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "status") })
	srvs := lns.servers(m, node, reg, &ready, status, slog.New(slog.DiscardHandler))
	var g errgroup.Group
	srvs.serve(&g)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := errors.Join(srvs.shutdown(ctx), g.Wait()); err != nil {
			t.Error(err)
		}
	})
	base := "http://" + lns.api.Addr().String()
	get := func(path string, hdr ...string) int {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		if len(hdr) == 2 {
			req.Header.Set(hdr[0], hdr[1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	for _, path := range []string{"/healthz", "/readyz", "/metrics", "/", peering.InfoPath} {
		if code := get(path); code != http.StatusOK {
			t.Errorf("GET %s without the token: %d, want 200", path, code)
		}
	}
	pull := "/v2/library/alpine/manifests/3.20?ns=docker.io"
	for _, path := range []string{"/v2/", pull} {
		if code := get(path); code != http.StatusUnauthorized {
			t.Errorf("GET %s without the token: %d, want 401", path, code)
		}
		if code := get(path, mirror.NodeTokenHeader, "not-"+token); code != http.StatusUnauthorized {
			t.Errorf("GET %s with a wrong token: %d, want 401", path, code)
		}
	}
	if code := get("/v2/", mirror.NodeTokenHeader, token); code != http.StatusOK {
		t.Errorf("GET /v2/ with the token: %d", code)
	}
	// Past the token, the mirror answers as ever: this one it cannot find.
	if code := get(pull, mirror.NodeTokenHeader, token); code != http.StatusNotFound {
		t.Errorf("GET %s with the token: %d, want 404 from the mirror", pull, code)
	}
}

// TestNodeTokenFile: the token is made once, kept across restarts, readable by the owner only, and
// replaced when the file holds no token.
func TestNodeTokenFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, NodeTokenFile)
	first, created, err := loadNodeToken(dir)
	if err != nil || !created || len(first) != 64 {
		t.Fatalf("first: %q %v %v", first, created, err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode: %v %v, want 0600", fi.Mode().Perm(), err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	again, created, err := loadNodeToken(dir)
	if err != nil || created || again != first {
		t.Fatalf("restart: got a different token or an error: created %v, %v", created, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("a widened token file was not narrowed: %v", fi.Mode().Perm())
	}
	other, _, err := loadNodeToken(t.TempDir())
	if err != nil || other == first {
		t.Fatalf("two data dirs, one token: %v", err)
	}
	for _, junk := range []string{"", "short\n", strings.Repeat("z", 64)} {
		if err := os.WriteFile(path, []byte(junk), 0o600); err != nil {
			t.Fatal(err)
		}
		tok, created, err := loadNodeToken(dir)
		if err != nil || !created || !validNodeToken(tok) {
			t.Errorf("file %q: %v, created %v", junk, err, created)
		}
	}
}

// TestNodeTokenRequired: on by default where the agent writes hosts.toml, off for a standalone cache
// (docker cannot send the header), and as the configuration says when it says.
func TestNodeTokenRequired(t *testing.T) {
	yes, no := true, false
	for _, c := range []struct {
		dir     string
		require *bool
		want    bool
	}{
		{"", nil, false},
		{"/etc/containerd/certs.d", nil, true},
		{"", &yes, true},
		{"/etc/containerd/certs.d", &no, false},
	} {
		cfg := Config{HostConfig: HostConfigConfig{Dir: c.dir}, RequireNodeToken: c.require}
		if got := cfg.NodeTokenRequired(); got != c.want {
			t.Errorf("hostConfig.dir %q, requireNodeToken %v: %v, want %v", c.dir, c.require, got, c.want)
		}
	}
}
