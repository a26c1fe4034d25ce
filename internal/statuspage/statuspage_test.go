package statuspage

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/imagemesh/imagemesh/internal/clustersync"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/peering"
)

func TestRenderShowsTheSnapshotAndEscapesWhatClientsSent(t *testing.T) {
	now := time.Now()
	s := Status{
		Version: "v1.2.3", Node: "worker-1", Started: now.Add(-time.Hour), Now: now,
		Cache: Cache{Bytes: 3 << 30, MaxBytes: 10 << 30, Blobs: 42},
		Journal: mirror.Journal{
			Pulls: []mirror.Pull{
				{Time: now, Method: "GET", Kind: "blob", Repo: "docker.io/library/alpine", Ref: "sha256:abc", Status: 200, Source: "peer", Bytes: 1 << 20},
				{Time: now, Method: "GET", Kind: "manifest", Repo: "docker.io/<script>alert(1)</script>", Ref: "latest", Status: 502, Source: "none", Error: "upstream <b>down</b>"},
			},
			Failures: []mirror.Pull{{Time: now, Repo: "docker.io/<script>alert(1)</script>", Ref: "latest", Status: 502, Error: "upstream <b>down</b>"}},
			Served:   map[string]int64{"local": 3 << 20, "peer": 1 << 20},
		},
		Peering: true, PeerID: "12D3KooWExample",
		Peers: []peering.PeerInfo{{ID: "12D3KooWOther", Addrs: []string{"/ip4/10.0.0.2/tcp/5002"}}},
		Cluster: &clustersync.Status{Applied: "0123456789abcdef", Registries: []clustersync.RegistryStatus{
			{Host: "ghcr.io", ImageSource: "github", Endpoint: "https://ghcr.io", Sources: []string{"Storj", "IPFS"}},
		}},
		StaticRegistries: []string{"docker.io"},
	}
	b, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	page := string(b)
	for _, want := range []string{
		"worker-1", "v1.2.3", "3GiB", "10GiB", "42 blobs", "75.0%", // 3 of 4 MiB from the cache
		s.Peers[0].ID.String(), "/ip4/10.0.0.2/tcp/5002", "ImageSource <b>github</b>", "Storj, IPFS", "0123456789ab",
		"docker.io/library/alpine", "agent configuration",
		"&lt;script&gt;alert(1)&lt;/script&gt;", "upstream &lt;b&gt;down&lt;/b&gt;",
	} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(page, "<script>") || strings.Contains(page, "<b>down") {
		t.Error("page carries a client's markup unescaped")
	}
}

func TestHandlerServesOnlyTheRoot(t *testing.T) {
	h := Handler(func() Status { return Status{Now: time.Now()} }, nil)
	for path, want := range map[string]int{"/": 200, "/x": 404} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if rec.Code != want {
			t.Errorf("GET %s: %d, want %d", path, rec.Code, want)
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST /: %d, want 405", rec.Code)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	if ct := rec.Header().Get("Content-Type"); ct != "text/html; charset=utf-8" || !strings.Contains(rec.Body.String(), "No pulls since") {
		t.Errorf("empty agent: %s\n%s", ct, rec.Body)
	}
}
