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
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/peering"
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
	// Only this node's containerd may pull through the agent: the token the agent keeps goes in the
	// mirror's header table, and the file is root's alone.
	token := a.Token()
	if !strings.Contains(string(written), "[host.'"+a.URL+"'.header]\n"+mirror.NodeTokenHeader+" = '"+token+"'") {
		t.Fatalf("hosts.toml has no header table with the node token:\n%s", written)
	}
	if fi, err := os.Stat(filepath.Join(hosts, "example.test", "hosts.toml")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("hosts.toml mode %v, %v; want 0600", fi.Mode().Perm(), err)
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
	// containerd sent the header every time: no request of its was refused.
	if n := a.Metric("imagemesh_mirror_requests_total", `code="401"`); n != 0 {
		t.Fatalf("the agent refused %v of containerd's requests", n)
	}
	// Anything else on the node (a pod, standing in: crane and curl from the same host) is refused,
	// and pulls what it wants from the registry itself, with its own credentials, or not at all.
	refusedWithoutToken(t, a, "/team/app:v1", "example.test")
	if strings.Contains(a.Logs(), token) {
		t.Fatalf("the agent logged its node token")
	}

	// The agent restarts (as in a rolling update): it keeps its token, so what containerd holds
	// stays valid.
	a.Stop()
	a.Start()
	if got := a.Token(); got != token {
		t.Fatalf("the node token changed across a restart")
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
	if n := a.Metric("imagemesh_mirror_requests_total", `code="401"`); n != 0 {
		t.Fatalf("the restarted agent refused %v of containerd's requests", n)
	}
}

// refusedWithoutToken checks that clients without the node token cannot pull image (/<repo>:<tag>)
// through the agent, and that the same request with it is served.
func refusedWithoutToken(t *testing.T, a *agent, image, ns string) {
	t.Helper()
	repo, tag, _ := strings.Cut(strings.TrimPrefix(image, "/"), ":")
	out, err := exec.Command(testenv.Tool(t, "crane"), "digest", "--insecure", a.Addr+"/"+repo+":"+tag).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "UNAUTHORIZED") {
		t.Fatalf("crane without the node token: %v %s; want UNAUTHORIZED", err, out)
	}
	manifest := a.URL + "/v2/" + repo + "/manifests/" + tag + "?ns=" + ns
	accept := "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
	curl := func(args ...string) (string, string) {
		t.Helper()
		out, err := exec.Command("curl", append([]string{"-sS", "-w", "\n%{http_code}", "-H", accept}, args...)...).Output()
		if err != nil {
			t.Fatalf("curl: %v", err)
		}
		body, code, _ := strings.Cut(string(out), "\n")
		return code, body
	}
	for _, hdr := range [][]string{nil, {"-H", mirror.NodeTokenHeader + ": " + strings.Repeat("0", 64)}} {
		code, body := curl(append(hdr, manifest)...)
		if code != "401" || !strings.Contains(body, `"code":"UNAUTHORIZED"`) {
			t.Fatalf("curl %v: %s %s; want 401 UNAUTHORIZED", hdr, code, body)
		}
	}
	if code, body := curl("-H", mirror.NodeTokenHeader+": "+a.Token(), manifest); code != "200" {
		t.Fatalf("curl with the node token: %s %s", code, body)
	}
}

// TestNodeTokenStandalone: a standalone agent (no hosts.toml to write) requires no token, so that
// docker, crane and skopeo pull through it (TestClientsWithoutNamespace); --require-node-token turns
// it on. What must stay open stays open: the health endpoints, /metrics, the status page and the
// peer info other agents find each other through.
func TestNodeTokenStandalone(t *testing.T) {
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 64 << 10})
	a := startAgent(t, "--upstream", "example.test="+reg.URL, "--default-registry", "example.test",
		"--require-node-token", "--peer-listen", "/ip4/127.0.0.1/tcp/0", "--peer-open")
	refusedWithoutToken(t, a, "/team/app:v1", "example.test")
	for _, path := range []string{"/healthz", "/readyz", "/metrics", "/", peering.InfoPath} {
		if code, body, err := get(t, a.URL+path); err != nil || code != http.StatusOK {
			t.Errorf("GET %s without the token: %d %v %.200s", path, code, err, body)
		}
	}
	if strings.Contains(a.Logs(), a.Token()) {
		t.Fatalf("the agent logged its node token")
	}
	// Off by default without --hosts-dir, and explicitly off with it.
	for _, args := range [][]string{nil, {"--hosts-dir", t.TempDir(), "--mirror-registry", "example.test", "--require-node-token=false"}} {
		b := startAgent(t, append([]string{"--upstream", "example.test=" + reg.URL, "--default-registry", "example.test"}, args...)...)
		if out, err := exec.Command(testenv.Tool(t, "crane"), "digest", "--insecure", b.Addr+"/team/app:v1").CombinedOutput(); err != nil {
			t.Errorf("agent %v: crane without a token: %v %s", args, err, out)
		}
		if _, err := os.Stat(filepath.Join(b.DataDir, "node-token")); !os.IsNotExist(err) {
			t.Errorf("agent %v made a node token it does not use: %v", args, err)
		}
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
