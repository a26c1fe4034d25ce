package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// procStatus reads a field of /proc/<pid>/status in kB, as bytes.
func procStatus(t testing.TB, pid int, field string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			var kb int64
			if _, err := fmt.Sscanf(strings.TrimSpace(rest), "%d kB", &kb); err != nil {
				t.Fatalf("%s %q: %v", field, rest, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// peakRSS is VmHWM, the high-water mark of a process's resident set.
func peakRSS(t testing.TB, pid int) int64 { return procStatus(t, pid, "VmHWM") }

// openFiles counts a process's open file descriptors.
func openFiles(t testing.TB, pid int) int {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}

// silentUpstream accepts connections and never answers, as a registry that hangs does.
func silentUpstream(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return "http://" + ln.Addr().String()
}

func randomDigest() digest.Digest {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return digest.FromBytes(b)
}

// TestHostileClients drives the real agent binary through its socket the way a misbehaving pod or a
// flood would, and checks that every resource stays bounded and that what the node holds is served
// throughout.
func TestHostileClients(t *testing.T) {
	reg := testenv.StartRegistry(t)
	layerSize := int64(8 << 20)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: layerSize})
	a := startAgent(t, "--upstream", "cached.test="+reg.URL, "--upstream", "silent.test="+silentUpstream(t),
		"--default-registry", "cached.test", "--log-level", "info")
	pid := a.cmd.Process.Pid
	// Cache the image: its manifest and blobs are what a pulling client gets during the floods.
	out, err := exec.Command(testenv.Tool(t, "crane"), "pull", "--insecure", a.Addr+"/team/app:v1", filepath.Join(t.TempDir(), "img.tar")).CombinedOutput()
	if err != nil {
		t.Fatalf("crane pull through the agent: %v\n%s", err, out)
	}
	manifest, err := exec.Command(testenv.Tool(t, "crane"), "manifest", "--insecure", a.Addr+"/team/app:v1").Output()
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		Layers []struct {
			Digest string `json:"digest"`
			Size   int64  `json:"size"`
		} `json:"layers"`
	}
	if err := jsonDecode(strings.NewReader(string(manifest)), &m); err != nil || len(m.Layers) != 1 {
		t.Fatalf("manifest %s: %v", manifest, err)
	}
	cachedBlob := a.URL + "/v2/team/app/blobs/" + m.Layers[0].Digest
	layerSize = m.Layers[0].Size
	baseFDs := openFiles(t, pid)
	baseRSS := procStatus(t, pid, "VmRSS")

	t.Run("FloodOfMisses", func(t *testing.T) {
		// 10,000 requests for digests nobody has, against an upstream that never answers, from 200
		// clients that give up after 0.3 s; meanwhile one client pulls the cached layer again and again.
		const requests, clients = 10_000, 200
		var sent, refused, failed atomic.Int64
		var maxFDs atomic.Int64
		stop := make(chan struct{})
		var pulls []time.Duration
		var pullErrs int
		var watchers sync.WaitGroup
		watchers.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
				if n := int64(openFiles(t, pid)); n > maxFDs.Load() {
					maxFDs.Store(n)
				}
			}
		})
		watchers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				resp, err := http.Get(cachedBlob)
				if err == nil {
					var n int64
					n, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && (resp.StatusCode != http.StatusOK || n != layerSize) {
						err = fmt.Errorf("%s, %d bytes", resp.Status, n)
					}
				}
				if err != nil {
					pullErrs++
					t.Logf("pull of the cached layer during the flood: %v", err)
					continue
				}
				pulls = append(pulls, time.Since(start))
			}
		})
		start := time.Now()
		var flood sync.WaitGroup
		transports := make([]*http.Transport, clients)
		for i := range clients {
			transports[i] = &http.Transport{MaxIdleConnsPerHost: 1}
			flood.Go(func() {
				c := &http.Client{Timeout: 300 * time.Millisecond, Transport: transports[i]}
				for sent.Add(1) <= requests {
					resp, err := c.Get(a.URL + "/v2/team/app/blobs/" + randomDigest().String() + "?ns=silent.test")
					if err != nil {
						failed.Add(1) // gave up: the point of the flood
						continue
					}
					if resp.StatusCode == http.StatusTooManyRequests {
						refused.Add(1)
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			})
		}
		flood.Wait()
		took := time.Since(start)
		for _, tr := range transports {
			tr.CloseIdleConnections() // the clients are gone: what stays open is the agent's
		}
		peak := peakRSS(t, pid)
		close(stop)
		watchers.Wait()
		slices.Sort(pulls)
		t.Logf("flood of %d in %s: %d refused at once (429), %d given up by their clients; agent peak RSS %.1f MiB (%.1f before), open files up to %d (%d before)",
			requests, took.Round(time.Millisecond), refused.Load(), failed.Load(), float64(peak)/(1<<20), float64(baseRSS)/(1<<20), maxFDs.Load(), baseFDs)
		if len(pulls) > 0 {
			t.Logf("the cached layer (%d bytes), pulled %d times during the flood: p50 %s, p99 %s", layerSize, len(pulls),
				pulls[len(pulls)/2].Round(time.Millisecond), pulls[len(pulls)*99/100].Round(time.Millisecond))
		}
		if peak > 150<<20 {
			t.Errorf("peak RSS %.1f MiB during the flood, over 150 MiB", float64(peak)/(1<<20))
		}
		// The bound by design: at most 512 fetches (content.DefaultMaxFetches), each with a connection
		// to its source and a file, and at most 1024 client connections (the server's limit).
		if bound := int64(baseFDs + 2*512 + 1024); maxFDs.Load() > bound {
			t.Errorf("%d open files during the flood, over the bound of %d", maxFDs.Load(), bound)
		}
		if len(pulls) == 0 || pullErrs > 0 {
			t.Errorf("the cached layer: %d pulls served, %d failed during the flood", len(pulls), pullErrs)
		}
		// The fetches nobody waits for are abandoned: the files go back to where they were.
		deadline := time.Now().Add(45 * time.Second)
		for openFiles(t, pid) > baseFDs+20 {
			if time.Now().After(deadline) {
				t.Fatalf("%d open files 45 s after the flood (%d before)", openFiles(t, pid), baseFDs)
			}
			time.Sleep(500 * time.Millisecond)
		}
		if n := a.Metric("imagemesh_content_fetches_in_flight"); n != 0 {
			t.Errorf("%v fetches still under way after the flood", n)
		}
	})

	t.Run("ClientsThatNeverRead", func(t *testing.T) {
		// 100 connections ask for the cached layer and never read a byte of it. Each costs the agent a
		// goroutine, a copy buffer (256 KiB) and a connection, until the write deadline cuts it off.
		before := procStatus(t, pid, "VmRSS")
		for range 100 {
			c, err := net.Dial("tcp", a.Addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			if _, err := fmt.Fprintf(c, "GET /v2/team/app/blobs/%s HTTP/1.1\r\nHost: %s\r\n\r\n", m.Layers[0].Digest, a.Addr); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(2 * time.Second)
		rss := procStatus(t, pid, "VmRSS")
		perClient := float64(rss-before) / 100
		t.Logf("100 clients that never read: agent RSS %.1f MiB (%.1f before: %.0f KiB each), %d open files",
			float64(rss)/(1<<20), float64(before)/(1<<20), perClient/(1<<10), openFiles(t, pid))
		if perClient > 1<<20 {
			t.Errorf("each client that never reads costs %.0f KiB, over 1 MiB", perClient/(1<<10))
		}
		// A client that reads is served meanwhile.
		resp, err := http.Get(cachedBlob)
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || n != layerSize {
			t.Errorf("a client that reads, beside them: %d bytes, %v", n, err)
		}
	})

	t.Run("BadRequests", func(t *testing.T) {
		do := func(method, path string, header http.Header) int {
			t.Helper()
			req, err := http.NewRequestWithContext(context.Background(), method, a.URL+path, nil)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range header {
				req.Header[k] = v
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatalf("%s %s: %v", method, path, err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return resp.StatusCode
		}
		blob := "/v2/team/app/blobs/" + m.Layers[0].Digest
		size := fmt.Sprint(layerSize)
		for _, tc := range []struct {
			name, method, path string
			header             http.Header
			want               int
		}{
			{"invented method", "X1", "/v2/", nil, http.StatusMethodNotAllowed},
			{"another invented method", "BREW", blob, nil, http.StatusMethodNotAllowed},
			{"name too long", "GET", "/v2/" + strings.Repeat("a/", 200) + "app/manifests/v1", nil, http.StatusBadRequest},
			{"path with dots", "GET", "/v2/../../etc/manifests/v1", nil, http.StatusNotFound},                  // cleaned to /etc/...: not the API
			{"name with dots", "GET", "/v2/team/../app/manifests/v1?ns=cached.test", nil, http.StatusNotFound}, // redirected to the cleaned path: no name climbs
			{"bad digest", "GET", "/v2/team/app/blobs/sha256:xyz", nil, http.StatusBadRequest},
			{"oversized header", "GET", blob, http.Header{"X-Big": {strings.Repeat("x", 128<<10)}}, http.StatusRequestHeaderFieldsTooLarge},
			{"range malformed", "GET", blob, http.Header{"Range": {"bytes=zz-"}}, http.StatusRequestedRangeNotSatisfiable},
			{"range reversed", "GET", blob, http.Header{"Range": {"bytes=100-10"}}, http.StatusRequestedRangeNotSatisfiable},
			{"range past the end", "GET", blob, http.Header{"Range": {"bytes=" + size + "-"}}, http.StatusRequestedRangeNotSatisfiable},
			{"range within", "GET", blob, http.Header{"Range": {"bytes=10-19"}}, http.StatusPartialContent},
		} {
			if code := do(tc.method, tc.path, tc.header); code != tc.want {
				t.Errorf("%s: %d, want %d", tc.name, code, tc.want)
			}
		}
		// The metrics know each invented method as "other", and the agent still serves.
		if n := a.Metric("imagemesh_mirror_requests_total", `method="other"`); n < 2 {
			t.Errorf("requests with invented methods counted as %v under method=\"other\"", n)
		}
		if code := do("GET", blob, nil); code != http.StatusOK {
			t.Errorf("the cached layer after the bad requests: %d", code)
		}
	})
}
