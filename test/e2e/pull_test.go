package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

func TestContainerdPullsThroughAgent(t *testing.T) {
	for _, v := range []testenv.ContainerdVersion{testenv.Containerd16, testenv.Containerd2} {
		t.Run("containerd-"+string(v), func(t *testing.T) { testContainerdPull(t, v) })
	}
}

func testContainerdPull(t *testing.T, v testenv.ContainerdVersion) {
	reg := testenv.StartRegistry(t)
	const image = "example.test/team/app:v1"
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 1 << 20}, testenv.Layer{Size: 4 << 20})

	// The agent writes containerd's hosts.toml itself: example.test goes to the agent first, and to
	// the registry (the server) when the agent cannot answer.
	hosts := t.TempDir()
	a := startAgent(t, "--upstream", "example.test="+reg.URL, "--hosts-dir", hosts,
		"--mirror-registry", "example.test", "--tag-ttl", "1s")
	written, err := os.ReadFile(filepath.Join(hosts, "example.test", "hosts.toml"))
	if err != nil || !strings.Contains(string(written), a.URL) || !strings.Contains(string(written), reg.URL) {
		t.Fatalf("hosts.toml: %v\n%s", err, written)
	}

	first := testenv.StartContainerd(t, v, hosts)
	if out, err := first.CtrPull(ctx(t), image); err != nil {
		t.Fatalf("ctr pull through the agent: %v\n%s", err, out)
	}
	if _, err := first.CRIPull(ctx(t), image); err != nil {
		t.Fatalf("CRI PullImage through the agent: %v", err)
	}
	// Every blob went through the agent, which fetched the layers' bytes from upstream. (Which source a
	// request is labelled with depends on timing: a blob committed before a second request is "local".)
	if n := a.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `code="200"`); n < 3 {
		t.Fatalf("agent served %v blobs; containerd did not pull through it", n)
	}
	if n := a.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`); n < 5<<20 {
		t.Fatalf("agent fetched %v bytes from upstream, want both layers", n)
	}

	// The upstream goes away, the tag's TTL passes, and a node with an empty containerd pulls again:
	// everything comes from the agent's cache, the tag from its last answer.
	reg.Stop(t)
	time.Sleep(1200 * time.Millisecond)
	second := testenv.StartContainerd(t, v, hosts)
	if out, err := second.CtrPull(ctx(t), image); err != nil {
		t.Fatalf("ctr pull with the upstream stopped: %v\n%s", err, out)
	}
	if _, err := second.CRIPull(ctx(t), image); err != nil {
		t.Fatalf("CRI PullImage with the upstream stopped: %v", err)
	}
	if n := a.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `source="local"`, `code="200"`); n < 3 {
		t.Fatalf("agent served %v blobs from its cache, want the whole image", n)
	}
	if n := a.Metric("imagemesh_mirror_tag_lookups_total", `result="stale"`); n < 1 {
		t.Fatalf("no stale tag answers counted")
	}
	if !strings.Contains(a.Logs(), "serving the cached answer") {
		t.Fatalf("no log line says the cached tag answer was served")
	}
}

// TestClientsWithoutNamespace pulls as docker, crane and skopeo do against a local cache: no ns
// parameter, the registry is the agent's default.
func TestClientsWithoutNamespace(t *testing.T) {
	reg := testenv.StartRegistry(t)
	want := testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 512 << 10})
	a := startAgent(t, "--upstream", "example.test="+reg.URL, "--default-registry", "example.test")

	out, err := exec.Command(testenv.Tool(t, "crane"), "digest", "--insecure", a.Addr+"/team/app:v1").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != want.String() {
		t.Fatalf("crane digest through the agent: %v %s, want %s", err, out, want)
	}
	dst := t.TempDir()
	out, err = exec.Command(testenv.Tool(t, "skopeo"), "copy", "--src-tls-verify=false",
		"docker://"+a.Addr+"/team/app:v1", "oci:"+dst+":v1").CombinedOutput()
	if err != nil {
		t.Fatalf("skopeo copy from the agent: %v\n%s", err, out)
	}
	out, err = exec.Command(testenv.Tool(t, "crane"), "pull", "--insecure", a.Addr+"/team/app:v1", filepath.Join(t.TempDir(), "img.tar")).CombinedOutput()
	if err != nil {
		t.Fatalf("crane pull through the agent: %v\n%s", err, out)
	}
}

// throttle is a proxy in front of the registry that sends bodies at a bounded rate and can be made
// to fail, so that a test can stop the agent mid-transfer.
type throttle struct {
	*httptest.Server
	down atomic.Bool
}

func newThrottle(t testing.TB, upstream string, bytesPerSec int) *throttle {
	u, _ := url.Parse(upstream)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		resp.Body = &slowBody{ReadCloser: resp.Body, rate: bytesPerSec}
		return nil
	}
	th := &throttle{}
	th.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if th.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(th.Close)
	return th
}

// slowBody keeps a body to a schedule: it sleeps only when it is ahead, so that the rate holds
// however coarse the sleeps are.
type slowBody struct {
	io.ReadCloser
	rate  int
	start time.Time
	sent  int64
}

func (s *slowBody) Read(p []byte) (int, error) {
	if s.start.IsZero() {
		s.start = time.Now()
	}
	n, err := s.ReadCloser.Read(p)
	s.sent += int64(n)
	due := s.start.Add(time.Duration(float64(s.sent) / float64(s.rate) * float64(time.Second)))
	if ahead := time.Until(due); ahead > time.Millisecond {
		time.Sleep(ahead)
	}
	return n, err
}

func TestKilledMidDownloadServesNothingCorrupt(t *testing.T) {
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/big:v1", testenv.Layer{Size: 48 << 20})
	layer := firstLayer(t, reg.URL+"/v2/team/big/manifests/v1")
	th := newThrottle(t, reg.URL, 16<<20)
	a := startAgent(t, "--upstream", "example.test="+th.URL)
	blobURL := a.URL + "/v2/team/big/blobs/" + layer.Digest.String() + "?ns=example.test"

	resp, err := http.Get(blobURL)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET blob: %v %v", resp, err)
	}
	if _, err := io.CopyN(io.Discard, resp.Body, 8<<20); err != nil {
		t.Fatalf("first bytes: %v", err)
	}
	a.Kill() // in the middle: about 8 of 48 MiB have arrived
	rest, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err == nil && 8<<20+rest == layer.Size {
		t.Fatal("the download completed before the agent was killed; the test proves nothing")
	}

	blobPath := filepath.Join(a.DataDir, "content", "blobs", "sha256", layer.Digest.Encoded())
	if _, err := os.Stat(blobPath); err == nil {
		t.Fatal("a blob file exists after a crash mid-download")
	}

	// Restarted with the upstream failing, the agent has nothing to serve for that digest.
	th.down.Store(true)
	a.Start()
	if left, _ := os.ReadDir(filepath.Join(a.DataDir, "content", "ingest")); len(left) != 0 {
		t.Fatalf("partial files survived the restart: %v", left)
	}
	if status, body, _ := get(t, blobURL); status == http.StatusOK {
		t.Fatalf("agent served %d bytes of a blob it never finished", len(body))
	}

	// With the upstream back, the pull completes and what is kept is the right blob.
	th.down.Store(false)
	status, body, err := get(t, blobURL)
	if err != nil || status != http.StatusOK || digest.FromBytes(body) != layer.Digest {
		t.Fatalf("pull after restart: %d %v", status, err)
	}
	kept, err := os.ReadFile(blobPath)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(kept); hex.EncodeToString(sum[:]) != layer.Digest.Encoded() {
		t.Fatal("kept blob does not match its digest")
	}
}

func firstLayer(t *testing.T, manifestURL string) ocispec.Descriptor {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, manifestURL, nil)
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, "+ocispec.MediaTypeImageManifest)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m ocispec.Manifest
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil || len(m.Layers) == 0 {
		t.Fatalf("manifest at %s: %v", manifestURL, err)
	}
	return m.Layers[0]
}
