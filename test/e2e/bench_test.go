package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// The benchmarks measure the agent and a reference side by side in one run, on loopback, and report
// ratios: a machine that is slower or busier slows both. Run them with hack/bench.sh.

const benchLayer = 256 << 20

type benchImage struct {
	reg    *testenv.Registry
	layer  ocispec.Descriptor
	config ocispec.Descriptor
}

func setupBench(b *testing.B) *benchImage {
	b.Helper()
	reg := testenv.StartRegistry(b)
	testenv.PushImage(b, reg.Host+"/bench/big:v1", testenv.Layer{Size: benchLayer})
	req, _ := http.NewRequest(http.MethodGet, reg.URL+"/v2/bench/big/manifests/v1", nil)
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	var m ocispec.Manifest
	if err := jsonDecode(resp.Body, &m); err != nil || len(m.Layers) != 1 {
		b.Fatalf("manifest: %v", err)
	}
	return &benchImage{reg: reg, layer: m.Layers[0], config: m.Config}
}

// pullBlob downloads a blob and returns how long it took.
func pullBlob(b *testing.B, url string, want int64) time.Duration {
	b.Helper()
	start := time.Now()
	resp, err := http.Get(url)
	if err != nil {
		b.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || n != want {
		b.Fatalf("GET %s: %d, %d of %d bytes, %v", url, resp.StatusCode, n, want, err)
	}
	return time.Since(start)
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func mbps(size int64, d time.Duration) float64 { return float64(size) / (1 << 20) / d.Seconds() }

// BenchmarkWarmBlob: a cached 256 MiB blob from the agent vs the same blob from the registry.
func BenchmarkWarmBlob(b *testing.B) {
	img := setupBench(b)
	a := startAgent(b, "--upstream", "example.test="+img.reg.URL)
	agentURL := a.URL + "/v2/bench/big/blobs/" + img.layer.Digest.String() + "?ns=example.test"
	regURL := img.reg.URL + "/v2/bench/big/blobs/" + img.layer.Digest.String()
	pullBlob(b, agentURL, img.layer.Size) // warm the agent
	pullBlob(b, regURL, img.layer.Size)   // and the registry's page cache

	var agentT, regT []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < 7; r++ { // alternate, so that drift hits both
			agentT = append(agentT, pullBlob(b, agentURL, img.layer.Size))
			regT = append(regT, pullBlob(b, regURL, img.layer.Size))
		}
	}
	b.StopTimer()
	am, rm := mbps(img.layer.Size, median(agentT)), mbps(img.layer.Size, median(regT))
	b.ReportMetric(am, "agent-MiB/s")
	b.ReportMetric(rm, "registry-MiB/s")
	b.ReportMetric(am/rm, "agent/registry")
}

// BenchmarkColdPull: a whole image (manifest, config, 256 MiB layer) through an agent with an empty
// cache vs the same pull straight from the registry. On raw loopback the upstream is faster than
// sha256 on this machine, so verification sets a floor; over a link shaped to 1 Gbit/s (a fast real
// upstream), the agent's own cost shows. Both pulls of a pair go over the same link.
func BenchmarkColdPull(b *testing.B) {
	img := setupBench(b)
	b.Run("loopback", func(b *testing.B) { benchColdPull(b, img, img.reg.URL) })
	b.Run("1Gbit", func(b *testing.B) {
		link := newThrottle(b, img.reg.URL, 125_000_000)
		benchColdPull(b, img, link.URL)
	})
}

func benchColdPull(b *testing.B, img *benchImage, upstream string) {
	pull := func(base, ns string) time.Duration {
		start := time.Now()
		req, _ := http.NewRequest(http.MethodGet, base+"/v2/bench/big/manifests/v1"+ns, nil)
		req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			b.Fatalf("manifest from %s: %v %v", base, resp, err)
		}
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			b.Fatalf("manifest from %s: %v", base, err)
		}
		resp.Body.Close()
		pullBlob(b, base+"/v2/bench/big/blobs/"+img.config.Digest.String()+ns, img.config.Size)
		pullBlob(b, base+"/v2/bench/big/blobs/"+img.layer.Digest.String()+ns, img.layer.Size)
		return time.Since(start)
	}
	pull(upstream, "") // the registry's page cache is warm for both
	var agentT, regT []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < 3; r++ {
			b.StopTimer()
			a := startAgent(b, "--upstream", "example.test="+upstream) // empty cache
			b.StartTimer()
			agentT = append(agentT, pull(a.URL, "?ns=example.test"))
			regT = append(regT, pull(upstream, ""))
			b.StopTimer()
			// Free its pages for the next round: on this VM, the first touch of guest memory costs a
			// host page fault, and a real node's memory is long backed.
			a.Stop()
			os.RemoveAll(a.DataDir)
			b.StartTimer()
		}
	}
	b.StopTimer()
	am, rm := median(agentT), median(regT)
	b.ReportMetric(am.Seconds(), "agent-s")
	b.ReportMetric(rm.Seconds(), "direct-s")
	b.ReportMetric((am.Seconds()/rm.Seconds()-1)*100, "cold-overhead-%")
}

// BenchmarkPeakRSS64Clients: 64 clients stream the 256 MiB layer at once, first cold (one upstream
// fetch, 64 readers following it), then warm. Reports the agent's peak resident set, next to the
// registry's for the same warm load.
func BenchmarkPeakRSS64Clients(b *testing.B) {
	img := setupBench(b)
	for i := 0; i < b.N; i++ {
		a := startAgent(b, "--upstream", "example.test="+img.reg.URL)
		agentURL := a.URL + "/v2/bench/big/blobs/" + img.layer.Digest.String() + "?ns=example.test"
		fanOut(b, agentURL, img.layer.Size, 64) // cold
		fanOut(b, agentURL, img.layer.Size, 64) // warm
		agentPeak := peakRSS(b, a.cmd.Process.Pid)
		fanOut(b, img.reg.URL+"/v2/bench/big/blobs/"+img.layer.Digest.String(), img.layer.Size, 64)
		regPeak := peakRSS(b, img.reg.PID())
		a.Stop()
		b.ReportMetric(float64(agentPeak)/(1<<20), "agent-peak-RSS-MiB")
		b.ReportMetric(float64(regPeak)/(1<<20), "registry-peak-RSS-MiB")
	}
}

func fanOut(b *testing.B, url string, size int64, clients int) {
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pullBlob(b, url, size)
		}()
	}
	wg.Wait()
}

func jsonDecode(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }
