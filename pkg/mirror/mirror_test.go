package mirror_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// faultProxy stands between the agent and the real registry: it counts blob fetches and, when told to,
// corrupts blob bodies or fails, so that the tests can see what the agent does with a bad upstream.
type faultProxy struct {
	*httptest.Server
	blobGETs  sync.Map // digest -> *atomic.Int32
	corrupt   atomic.Bool
	down      atomic.Bool
	slowBlobs atomic.Bool // delay blob bodies, so that clients pile up on a cold fetch
	silent    atomic.Bool // accept blob requests and never answer, as a registry that hangs
	bigDigest atomic.Value
}

func newFaultProxy(t *testing.T, upstream string) *faultProxy {
	u, _ := url.Parse(upstream)
	p := &faultProxy{}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		if p.corrupt.Load() && strings.Contains(resp.Request.URL.Path, "/blobs/") && resp.StatusCode == http.StatusOK {
			resp.Body = &flipReader{r: resp.Body, at: resp.ContentLength / 2}
		}
		if p.slowBlobs.Load() && strings.Contains(resp.Request.URL.Path, "/blobs/") {
			time.Sleep(300 * time.Millisecond)
		}
		return nil
	}
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.down.Load() {
			http.Error(w, "down for the test", http.StatusServiceUnavailable)
			return
		}
		if p.silent.Load() && strings.Contains(r.URL.Path, "/blobs/") {
			<-r.Context().Done()
			return
		}
		if i := strings.Index(r.URL.Path, "/blobs/sha256:"); i >= 0 && r.Method == http.MethodGet {
			c, _ := p.blobGETs.LoadOrStore(r.URL.Path[i+len("/blobs/"):], new(atomic.Int32))
			c.(*atomic.Int32).Add(1)
		}
		if d, ok := p.bigDigest.Load().(string); ok && strings.HasSuffix(r.URL.Path, "/manifests/"+d) {
			w.Header().Set("Content-Type", ocispec.MediaTypeImageManifest)
			w.Header().Set("Docker-Content-Digest", d)
			_, _ = w.Write(bytes.Repeat([]byte(" "), 5<<20)) // the mirror under test may stop reading
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(p.Close)
	return p
}

func (p *faultProxy) gets(d digest.Digest) int32 {
	if c, ok := p.blobGETs.Load(d.String()); ok {
		return c.(*atomic.Int32).Load()
	}
	return 0
}

type flipReader struct {
	r   io.ReadCloser
	at  int64
	pos int64
}

func (f *flipReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if f.pos <= f.at && f.at < f.pos+int64(n) {
		p[f.at-f.pos] ^= 0xff
	}
	f.pos += int64(n)
	return n, err
}
func (f *flipReader) Close() error { return f.r.Close() }

type env struct {
	reg     *testenv.Registry
	proxy   *faultProxy
	store   *content.Store
	metrics *prometheus.Registry
	mirror  *httptest.Server
	repo    string // repository path in the registry
	image   digest.Digest
	layer   ocispec.Descriptor
}

// ns is the registry host the tests pull from; the agent maps it to the proxy.
const ns = "example.test"

func setup(t *testing.T, layerSize int64, tune ...func(*content.Options, *mirror.Options)) *env {
	t.Helper()
	reg := testenv.StartRegistry(t)
	e := &env{reg: reg, repo: "team/app"}
	e.image = testenv.PushImage(t, reg.Host+"/"+e.repo+":v1", testenv.Layer{Size: layerSize})
	e.proxy = newFaultProxy(t, reg.URL)
	e.metrics = prometheus.NewRegistry()
	var err error
	storeOpts := content.Options{Registerer: e.metrics, StallTimeout: 5 * time.Second}
	var mirrorOpts mirror.Options
	for _, f := range tune {
		f(&storeOpts, &mirrorOpts)
	}
	e.store, err = content.Open(t.TempDir(), storeOpts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.store.Close() })
	proxyURL, _ := url.Parse(e.proxy.URL)
	up, err := source.NewRegistry(source.RegistryOptions{
		Endpoints:  map[string]source.Endpoint{ns: {URL: proxyURL}},
		Registerer: e.metrics,
	})
	if err != nil {
		t.Fatal(err)
	}
	mirrorOpts.Store = e.store
	mirrorOpts.Source = source.NewChain(source.Link{Source: up, ResolveTags: true})
	mirrorOpts.TagTTL = 200 * time.Millisecond
	mirrorOpts.TagDir = t.TempDir()
	mirrorOpts.Registerer = e.metrics
	m, err := mirror.New(mirrorOpts)
	if err != nil {
		t.Fatal(err)
	}
	e.mirror = httptest.NewServer(m)
	t.Cleanup(e.mirror.Close)

	var man ocispec.Manifest
	if err := json.Unmarshal(e.get(t, "manifests/v1", allManifestTypes).body, &man); err != nil || len(man.Layers) != 1 {
		t.Fatalf("pushed image has %d layers", len(man.Layers))
	}
	e.layer = man.Layers[0]
	return e
}

var allManifestTypes = strings.Join(source.ManifestMediaTypes, ", ")

type answer struct {
	status int
	header http.Header
	body   []byte
	err    error
}

func (e *env) do(t *testing.T, method, path string, hdr ...string) answer {
	t.Helper()
	req, _ := http.NewRequest(method, e.mirror.URL+"/v2/"+e.repo+"/"+path+"?ns="+ns, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return answer{err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return answer{status: resp.StatusCode, header: resp.Header, body: body, err: err}
}

func (e *env) get(t *testing.T, path, accept string) answer {
	t.Helper()
	a := e.do(t, http.MethodGet, path, "Accept", accept)
	if a.err != nil || a.status != http.StatusOK {
		t.Fatalf("GET %s: %d %v %s", path, a.status, a.err, a.body)
	}
	return a
}

func TestPullAPI(t *testing.T) {
	e := setup(t, 300_000)

	t.Run("base", func(t *testing.T) {
		resp, err := http.Get(e.mirror.URL + "/v2/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
			t.Fatalf("GET /v2/: %v", resp)
		}
	})
	t.Run("manifest by tag and digest", func(t *testing.T) {
		head := e.do(t, http.MethodHead, "manifests/v1", "Accept", allManifestTypes)
		if head.status != 200 || head.header.Get("Docker-Content-Digest") != e.image.String() || head.header.Get("Content-Length") == "" {
			t.Fatalf("HEAD by tag: %d %v", head.status, head.header)
		}
		byTag := e.get(t, "manifests/v1", allManifestTypes)
		byDigest := e.get(t, "manifests/"+e.image.String(), allManifestTypes)
		if !bytes.Equal(byTag.body, byDigest.body) || digest.FromBytes(byTag.body) != e.image {
			t.Fatal("manifest by tag and by digest differ, or do not match the pushed digest")
		}
		if ct := byTag.header.Get("Content-Type"); ct != byDigest.header.Get("Content-Type") || !strings.Contains(ct, "manifest") {
			t.Fatalf("Content-Type %q", ct)
		}
		if byTag.header.Get("Content-Length") != fmt.Sprint(len(byTag.body)) {
			t.Fatalf("Content-Length %q for %d bytes", byTag.header.Get("Content-Length"), len(byTag.body))
		}
	})
	t.Run("blob with range", func(t *testing.T) {
		full := e.get(t, "blobs/"+e.layer.Digest.String(), "")
		if digest.FromBytes(full.body) != e.layer.Digest || full.header.Get("Docker-Content-Digest") != e.layer.Digest.String() {
			t.Fatal("blob does not match its digest")
		}
		part := e.do(t, http.MethodGet, "blobs/"+e.layer.Digest.String(), "Range", "bytes=100-199")
		if part.status != http.StatusPartialContent || !bytes.Equal(part.body, full.body[100:200]) {
			t.Fatalf("Range: %d, %d bytes", part.status, len(part.body))
		}
		head := e.do(t, http.MethodHead, "blobs/"+e.layer.Digest.String())
		if head.status != 200 || head.header.Get("Content-Length") != fmt.Sprint(e.layer.Size) {
			t.Fatalf("HEAD blob: %d %v", head.status, head.header)
		}
	})
	t.Run("accept negotiation", func(t *testing.T) {
		// crane pushes Docker schema 2; a client that takes only OCI manifests is told no, as the
		// registry itself would.
		a := e.do(t, http.MethodGet, "manifests/v1", "Accept", ocispec.MediaTypeImageManifest)
		if a.status != 200 || a.header.Get("Content-Type") != "application/vnd.docker.distribution.manifest.v2+json" {
			t.Fatalf("schema2 manifest for an OCI-only client: %d %s", a.status, a.header.Get("Content-Type"))
		}
	})
}

func TestBadInput(t *testing.T) {
	e := setup(t, 1000)
	zero := "sha256:" + strings.Repeat("0", 64)
	bigDigest := "sha256:" + strings.Repeat("b", 64)
	e.proxy.bigDigest.Store(bigDigest)
	for _, c := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/v2/Team/App/manifests/v1?ns=" + ns, 400, "NAME_INVALID"},
		{"GET", "/v2/team/app/manifests/v1?ns=bad_host!", 400, "NAME_INVALID"},
		{"GET", "/v2/team/app/manifests/v1:x?ns=" + ns, 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/sha256:abc?ns=" + ns, 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/blobs/md5:abc?ns=" + ns, 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/manifests/sha256:..%2f..%2fetc?ns=" + ns, 404, "NAME_UNKNOWN"},
		{"GET", "/v2/team/app/manifests/-bad-tag?ns=" + ns, 400, "TAG_INVALID"},
		{"GET", "/v2/team/app/manifests/nope?ns=" + ns, 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/team/app/manifests/" + zero + "?ns=" + ns, 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/team/app/blobs/" + zero + "?ns=" + ns, 404, "BLOB_UNKNOWN"},
		{"HEAD", "/v2/team/app/blobs/" + zero + "?ns=" + ns, 404, ""},
		{"GET", "/v2/team/app/manifests/" + bigDigest + "?ns=" + ns, 502, "MANIFEST_INVALID"},
		{"PUT", "/v2/team/app/manifests/v1?ns=" + ns, 405, "UNSUPPORTED"},
		{"POST", "/v2/team/app/blobs/uploads/?ns=" + ns, 405, "UNSUPPORTED"},
		{"DELETE", "/v2/team/app/blobs/" + zero + "?ns=" + ns, 405, "UNSUPPORTED"},
		{"GET", "/v2/team/app/blobs/uploads/123?ns=" + ns, 405, "UNSUPPORTED"},
		{"GET", "/v2/../../../etc/passwd/blobs/" + zero, 400, "NAME_INVALID"},
		{"GET", "/v2/team/app/referrers/" + zero + "?ns=" + ns, 405, "UNSUPPORTED"},
		{"GET", "/v2/team/app/tags/list?n=-1&ns=" + ns, 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/team/app/tags/list?n=two&ns=" + ns, 400, "PAGINATION_NUMBER_INVALID"},
		{"GET", "/v2/team/nope/tags/list?ns=" + ns, 404, "NAME_UNKNOWN"},
	} {
		req, _ := http.NewRequest(c.method, e.mirror.URL+c.path, nil)
		req.URL.RawPath = "" // send the path as written, .. and all
		req.URL.Opaque = strings.SplitN(c.path, "?", 2)[0]
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", c.method, c.path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.status {
			t.Errorf("%s %s: status %d, want %d (%s)", c.method, c.path, resp.StatusCode, c.status, body)
			continue
		}
		if c.code == "" {
			continue
		}
		var errs struct {
			Errors []struct{ Code, Message string } `json:"errors"`
		}
		if err := json.Unmarshal(body, &errs); err != nil || len(errs.Errors) != 1 || errs.Errors[0].Code != c.code {
			t.Errorf("%s %s: body %s, want code %s", c.method, c.path, body, c.code)
		}
	}
	// Nothing of that got into the store.
	n := 0
	if err := e.store.Walk(func(content.Info) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	if n != 1 { // the manifest setup fetched
		t.Errorf("store holds %d blobs after bad requests, want 1", n)
	}
}

// TestMetricLabelsClosed: whatever a client sends, the request metric's labels come from a closed set,
// so a client cannot grow the agent's memory and its scrapes by inventing methods or paths.
func TestMetricLabelsClosed(t *testing.T) {
	e := setup(t, 1000)
	for i := range 200 {
		for _, path := range []string{"/v2/", fmt.Sprintf("/v2/x%d/manifests/v1?ns=%s", i, ns), fmt.Sprintf("/nope/%d", i)} {
			req, _ := http.NewRequest(fmt.Sprintf("X%d", i), e.mirror.URL+path, nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
		}
	}
	families, err := e.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != "imagemesh_mirror_requests_total" {
			continue
		}
		methods := map[string]bool{}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "method" {
					methods[l.GetValue()] = true
				}
			}
		}
		if len(f.GetMetric()) > 20 || len(methods) > 3 {
			t.Fatalf("%d series of %s with methods %v after 600 requests with invented methods", len(f.GetMetric()), f.GetName(), methods)
		}
		return
	}
	t.Fatal("no imagemesh_mirror_requests_total")
}

// TestFloodOfMissesIsBounded: requests for blobs nobody has, from a registry that never answers, each
// hold a slot while they wait, and the fetches they start go on after their clients left. Both are
// bounded: a client past its share, and a request that would start a fetch past the store's bound, is
// answered 429 at once, and a blob the node holds is still served.
func TestFloodOfMissesIsBounded(t *testing.T) {
	e := setup(t, 1000, func(c *content.Options, m *mirror.Options) { c.MaxFetches, m.MaxSourceRequestsPerClient = 8, 4 })
	e.get(t, "blobs/"+e.layer.Digest.String(), "")
	e.proxy.silent.Store(true)
	blobURL := func() string {
		b := make([]byte, 32)
		rand.Read(b)
		return e.mirror.URL + "/v2/" + e.repo + "/blobs/" + digest.FromBytes(b).String() + "?ns=" + ns
	}
	inFlight := func() float64 { return gauge(t, e.metrics, "imagemesh_content_fetches_in_flight") }

	// One client with 4 requests waiting: its 5th is refused at once.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, blobURL(), nil)
			if resp, err := http.DefaultClient.Do(req); err == nil {
				resp.Body.Close()
			}
		}()
	}
	for deadline := time.Now().Add(5 * time.Second); inFlight() < 4; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%v fetches under way, want 4", inFlight())
		}
	}
	start := time.Now()
	resp, err := http.Get(blobURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || time.Since(start) > time.Second || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("a 5th waiting request of one client: %s after %s, want 429 at once with Retry-After", resp.Status, time.Since(start))
	}
	cancel()
	wg.Wait()

	// Their 4 fetches go on without them; clients that give up after 200 ms start 4 more at most, and
	// every request past that is refused at once.
	refused := 0
	for range 24 {
		c := &http.Client{Timeout: 200 * time.Millisecond}
		if resp, err := c.Get(blobURL()); err == nil {
			if resp.StatusCode == http.StatusTooManyRequests {
				refused++
			}
			resp.Body.Close()
		}
	}
	if n := inFlight(); n > 8 || refused < 16 {
		t.Fatalf("%v fetches under way (bound 8), %d of 24 requests refused (want 16 or more)", n, refused)
	}
	// What the node holds is still served.
	e.get(t, "blobs/"+e.layer.Digest.String(), "")
}

// gauge returns the value of a gauge without labels.
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name && len(f.GetMetric()) == 1 {
			return f.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}

func TestConcurrentColdPullsFetchOnce(t *testing.T) {
	e := setup(t, 8<<20)
	e.proxy.slowBlobs.Store(true)
	const clients = 50
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a := e.do(t, http.MethodGet, "blobs/"+e.layer.Digest.String())
			if a.err != nil || a.status != 200 || digest.FromBytes(a.body) != e.layer.Digest {
				errs <- fmt.Errorf("status %d, err %w, %d bytes", a.status, a.err, len(a.body))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := e.proxy.gets(e.layer.Digest); n != 1 {
		t.Fatalf("%d upstream fetches for %d concurrent pulls of one cold blob, want 1", n, clients)
	}
}

func TestCorruptUpstreamNeverReachesClientOrCache(t *testing.T) {
	e := setup(t, 2<<20)
	e.proxy.corrupt.Store(true)
	a := e.do(t, http.MethodGet, "blobs/"+e.layer.Digest.String())
	if a.err == nil && a.status == http.StatusOK && int64(len(a.body)) == e.layer.Size {
		t.Fatalf("client got a complete body of a corrupt blob")
	}
	if a.err == nil && a.status == http.StatusOK {
		t.Fatalf("client got status 200 and a body without error")
	}
	if _, err := e.store.Stat(e.layer.Digest); err == nil {
		t.Fatal("corrupt blob in the store")
	}
	if v := counter(t, e.metrics, "imagemesh_content_verification_failures_total", ""); v < 1 {
		t.Fatalf("verification failures metric %v", v)
	}
	// Once the upstream behaves, the same pull succeeds.
	e.proxy.corrupt.Store(false)
	good := e.get(t, "blobs/"+e.layer.Digest.String(), "")
	if digest.FromBytes(good.body) != e.layer.Digest {
		t.Fatal("blob after recovery does not match")
	}
}

func TestStaleTagServedWhenUpstreamDown(t *testing.T) {
	e := setup(t, 1000)
	e.get(t, "manifests/"+e.image.String(), allManifestTypes)
	time.Sleep(300 * time.Millisecond) // past the TTL
	e.reg.Stop(t)
	a := e.do(t, http.MethodHead, "manifests/v1", "Accept", allManifestTypes)
	if a.status != 200 || a.header.Get("Docker-Content-Digest") != e.image.String() {
		t.Fatalf("HEAD with upstream down: %d %v", a.status, a.header)
	}
	if v := counter(t, e.metrics, "imagemesh_mirror_tag_lookups_total", "stale"); v < 1 {
		t.Fatalf("stale lookups metric %v", v)
	}
	// A tag never seen cannot be answered: the error says the upstream is unavailable.
	a = e.do(t, http.MethodGet, "manifests/other", "Accept", allManifestTypes)
	if a.status != http.StatusServiceUnavailable || !strings.Contains(string(a.body), "UNAVAILABLE") {
		t.Fatalf("unknown tag with upstream down: %d %s", a.status, a.body)
	}
}

// counter returns the value of a counter, the first one whose first label is label if label is set.
func counter(t *testing.T, g prometheus.Gatherer, name, label string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.Metric {
			if label == "" || (len(m.Label) > 0 && m.Label[0].GetValue() == label) {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}
