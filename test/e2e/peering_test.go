package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/peering"
)

// writeKey writes a new cluster key and returns its path.
func writeKey(t testing.TB) string {
	t.Helper()
	key, err := peering.EncodePSK()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "swarm.key")
	if err := os.WriteFile(p, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// startPeer starts an agent that peers on a free loopback port.
func startPeer(t testing.TB, args ...string) *agent {
	t.Helper()
	listen := "/ip4/127.0.0.1/tcp/" + strings.TrimPrefix(testenv.FreeAddr(t), "127.0.0.1:")
	return startAgent(t, append([]string{"--peer-listen", listen}, args...)...)
}

// peerAddr asks an agent's API for its peer ID, as DNS discovery does, and returns its multiaddr.
func (a *agent) peerAddr() string {
	a.t.Helper()
	_, body, err := get(a.t, a.URL+peering.InfoPath)
	var info peering.Info
	if err == nil {
		err = json.Unmarshal(body, &info)
	}
	if err != nil || len(info.Addrs) == 0 {
		a.t.Fatalf("peer info of %s: %v %s", a.URL, err, body)
	}
	return info.Addrs[0] + "/p2p/" + info.ID.String()
}

// waitMetric waits until an agent's metric reaches want.
func waitMetric(t testing.TB, a *agent, want float64, name string, labels ...string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		v := a.Metric(name, labels...)
		if v >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s%v on %s is %v, want at least %v", name, labels, a.URL, v, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestPeersServeAPullWithTheUpstreamDown: a pull on node 1 warms it; two agents join it through its
// static bootstrap address; with the registry stopped, nodes 2 and 3 pull the image from node 1.
// Node 2 lets peers answer tag lookups, node 3 does not: it pulls by digest, and its tag pull fails.
func TestPeersServeAPullWithTheUpstreamDown(t *testing.T) {
	reg := testenv.StartRegistry(t)
	manifest := testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 1 << 20}, testenv.Layer{Size: 24 << 20})
	const image = "example.test/team/app:v1"
	key := writeKey(t)
	common := []string{"--upstream", "example.test=" + reg.URL, "--mirror-registry", "example.test", "--peer-key", key, "--tag-ttl", "1s"}

	hosts := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	// Node 1 pulls first, alone, so that it holds the whole image; then the others join it.
	n1 := startPeer(t, append(common, "--hosts-dir", hosts[0])...)
	c1 := testenv.StartContainerd(t, testenv.Containerd16, hosts[0])
	if out, err := c1.CtrPull(ctx(t), image); err != nil {
		t.Fatalf("pull on node 1: %v\n%s", err, out)
	}
	n2 := startPeer(t, append(common, "--hosts-dir", hosts[1], "--bootstrap", n1.peerAddr(), "--peer-resolve-tags")...)
	n3 := startPeer(t, append(common, "--hosts-dir", hosts[2], "--bootstrap", n1.peerAddr())...)
	for _, n := range []*agent{n1, n2, n3} {
		waitMetric(t, n, 2, "imagemesh_peering_peers")
	}
	reg.Stop(t)
	time.Sleep(1100 * time.Millisecond) // the tag's TTL

	c2 := testenv.StartContainerd(t, testenv.Containerd16, hosts[1])
	if out, err := c2.CtrPull(ctx(t), image); err != nil {
		t.Fatalf("pull by tag on node 2 with the upstream stopped: %v\n%s", err, out)
	}
	if got := n2.Metric("imagemesh_content_fetched_bytes_total", `source="peer"`); got < 25<<20 {
		t.Fatalf("node 2 fetched %v bytes from peers, want the whole image", got)
	}
	if got := n2.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `source="peer"`, `code="200"`); got < 1 {
		t.Fatalf("node 2's metrics show no blob served from a peer")
	}
	if got := n1.Metric("imagemesh_peering_served_bytes_total"); got < 24<<20 {
		t.Fatalf("node 1 served %v bytes to peers", got)
	}

	c3 := testenv.StartContainerd(t, testenv.Containerd16, hosts[2])
	if _, err := c3.CtrPull(ctx(t), image); err == nil {
		t.Fatalf("node 3 resolved a tag through peers without being allowed to")
	}
	byDigest := "example.test/team/app@" + manifest.String()
	if out, err := c3.CtrPull(ctx(t), byDigest); err != nil {
		t.Fatalf("pull by digest on node 3 with the upstream stopped: %v\n%s", err, out)
	}
}

// TestHostWithoutTheKeyCannotPeer: an agent with another key, and one running open, find the
// cluster's node but cannot connect, and cannot fetch what it holds.
func TestHostWithoutTheKeyCannotPeer(t *testing.T) {
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 1 << 20})
	layer := firstLayer(t, reg.URL+"/v2/team/app/manifests/v1")
	n1 := startPeer(t, "--upstream", "example.test="+reg.URL, "--peer-key", writeKey(t))
	blob := "/v2/team/app/blobs/" + layer.Digest.String() + "?ns=example.test"
	if code, _, err := get(t, n1.URL+blob); err != nil || code != http.StatusOK {
		t.Fatalf("warm node 1: %d %v", code, err)
	}
	reg.Stop(t)

	for _, mode := range [][]string{{"--peer-key", writeKey(t)}, {"--peer-open"}} {
		stranger := startPeer(t, append([]string{"--upstream", "example.test=" + reg.URL, "--bootstrap", n1.peerAddr()}, mode...)...)
		if code, _, _ := get(t, stranger.URL+blob); code == http.StatusOK {
			t.Fatalf("%v: a host without the cluster key fetched a blob from the cluster", mode)
		}
		if got := stranger.Metric("imagemesh_peering_peers"); got != 0 {
			t.Fatalf("%v: a host without the cluster key has %v peers", mode, got)
		}
		if got := n1.Metric("imagemesh_peering_peers"); got != 0 {
			t.Fatalf("%v: node 1 accepted a host without the cluster key (%v peers)", mode, got)
		}
	}
	// Peering without a key is refused unless asked for.
	out, err := exec.Command(agentBin, "--peer-listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", t.TempDir()).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--peer-key") {
		t.Fatalf("agent peering without a key: %v\n%s", err, out)
	}
}

// TestCorruptPeerIsSkipped: node 1's copies of both layers rot on disk. Node 2 joins and pulls: the small
// layer is verified before it is used, the large one when it is complete; node 1 is counted as bad,
// skipped, and the pull gets the right bytes elsewhere. Nothing corrupt is kept.
func TestCorruptPeerIsSkipped(t *testing.T) {
	reg, n1, common := pulledPeer(t, testenv.Layer{Size: 1 << 20}, testenv.Layer{Size: 16 << 20})
	const image = "example.test/team/app:v1"
	hosts2 := t.TempDir()

	manifestURL := reg.URL + "/v2/team/app/manifests/v1"
	var layers []digest.Digest
	for _, l := range manifestLayers(t, manifestURL) {
		layers = append(layers, l)
		rot(t, n1, l)
	}

	n2 := startPeer(t, append(common, "--hosts-dir", hosts2, "--bootstrap", n1.peerAddr())...)
	waitMetric(t, n2, 1, "imagemesh_peering_peers")
	c2 := testenv.StartContainerd(t, testenv.Containerd16, hosts2)
	if out, err := c2.CtrPull(ctx(t), image); err != nil {
		t.Fatalf("pull on node 2 with a corrupt peer: %v\n%s", err, out)
	}
	if got := n2.Metric("imagemesh_peering_bad_peer_events_total", `reason="digest_mismatch"`); got < 2 {
		t.Fatalf("bad peer events on node 2: %v, want one per corrupt layer", got)
	}
	for _, l := range layers {
		b, err := os.ReadFile(filepath.Join(n2.DataDir, "content", "blobs", "sha256", l.Encoded()))
		if err != nil {
			t.Fatalf("node 2 did not keep layer %s: %v", l, err)
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != l.Encoded() {
			t.Fatalf("node 2 kept a corrupt copy of %s", l)
		}
	}
}

// TestCorruptPeerEveryClient: a node whose copy of a layer rotted serves it to a node that joins, under
// every client containerd has (ctr and CRI, 1.6 and 2.x). The corrupt bytes are held back from the
// client until the layer verified, so every pull succeeds the first time: containerd keeps whatever
// bytes it gets in its ingest and resumes from them, so a client that got corrupt ones would fail
// pull after pull.
func TestCorruptPeerEveryClient(t *testing.T) {
	reg, n1, common := pulledPeer(t, testenv.Layer{Size: 16 << 20})
	const image = "example.test/team/app:v1"
	layer := firstLayer(t, reg.URL+"/v2/team/app/manifests/v1").Digest
	rot(t, n1, layer)

	for _, v := range []testenv.ContainerdVersion{testenv.Containerd16, testenv.Containerd2} {
		for _, client := range []string{"ctr", "CRI"} {
			t.Run(string(v)+"/"+client, func(t *testing.T) {
				h := t.TempDir()
				n := startPeer(t, append(common, "--hosts-dir", h, "--bootstrap", n1.peerAddr())...)
				waitMetric(t, n, 1, "imagemesh_peering_peers")
				c := testenv.StartContainerd(t, v, h)
				var out string
				var err error
				if client == "CRI" {
					out, err = c.CRIPull(ctx(t), image)
				} else {
					out, err = c.CtrPull(ctx(t), image)
				}
				if err != nil {
					t.Fatalf("first pull from a corrupt peer: %v\n%s", err, out)
				}
				if got := n.Metric("imagemesh_peering_bad_peer_events_total", `reason="digest_mismatch"`); got < 1 {
					t.Fatalf("bad peer events: %v; the corrupt peer was not asked, so this tested nothing", got)
				}
				b, err := os.ReadFile(filepath.Join(n.DataDir, "content", "blobs", "sha256", layer.Encoded()))
				if err != nil {
					t.Fatalf("the layer was not kept: %v", err)
				}
				if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != layer.Encoded() {
					t.Fatal("a corrupt copy was kept")
				}
			})
		}
	}
}

// pulledPeer starts a registry holding example.test/team/app:v1 with the given layers and a first
// node that pulls the image alone through containerd, so that it fetches every layer itself rather
// than through a peer that leads. common are the flags every node of the test shares.
func pulledPeer(t *testing.T, layers ...testenv.Layer) (reg *testenv.Registry, n1 *agent, common []string) {
	t.Helper()
	reg = testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", layers...)
	common = []string{"--upstream", "example.test=" + reg.URL, "--mirror-registry", "example.test", "--peer-key", writeKey(t)}
	hosts := t.TempDir()
	n1 = startPeer(t, append(common, "--hosts-dir", hosts)...)
	c1 := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := c1.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull on node 1: %v\n%s", err, out)
	}
	return reg, n1, common
}

// rot changes three bytes of an agent's copy of blob d, as a failing disk would, its size kept.
func rot(t testing.TB, a *agent, d digest.Digest) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(a.DataDir, "content", "blobs", "sha256", d.Encoded()), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("rot"), 4096); err != nil {
		t.Fatal(err)
	}
}

// TestPeerKilledMidTransfer: a blob comes from a slow upstream through one node while the other
// streams it from that node as it arrives. The node fetching from upstream dies half way; the other
// resumes on the upstream at the byte it had reached, and its client gets the right blob.
func TestPeerKilledMidTransfer(t *testing.T) {
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/big:v1", testenv.Layer{Size: 48 << 20})
	layer := firstLayer(t, reg.URL+"/v2/team/big/manifests/v1")
	slow := newThrottle(t, reg.URL, 16<<20)
	key := writeKey(t)
	n1 := startPeer(t, "--upstream", "example.test="+slow.URL, "--peer-key", key)
	n2 := startPeer(t, "--upstream", "example.test="+slow.URL, "--peer-key", key, "--bootstrap", n1.peerAddr())
	waitMetric(t, n2, 1, "imagemesh_peering_peers")
	blob := "/v2/team/big/blobs/" + layer.Digest.String() + "?ns=example.test"

	type result struct {
		sum string
		n   int64
		err error
	}
	pull := func(a *agent) chan result {
		done := make(chan result, 1)
		go func() {
			resp, err := http.Get(a.URL + blob)
			if err != nil {
				done <- result{err: err}
				return
			}
			defer resp.Body.Close()
			h := sha256.New()
			n, err := io.Copy(h, resp.Body)
			done <- result{sum: "sha256:" + hex.EncodeToString(h.Sum(nil)), n: n, err: err}
		}()
		return done
	}
	// Node 1's client starts the pull. The node that leads for the digest fetches it from upstream:
	// node 1 itself, or node 2 on node 1's behalf. The other one streams from it.
	done := pull(n1)
	var fetcher, streamer *agent
	for deadline := time.Now().Add(20 * time.Second); fetcher == nil; time.Sleep(20 * time.Millisecond) {
		switch {
		case time.Now().After(deadline):
			t.Fatal("neither node is fetching from upstream")
		case n1.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`) > 0:
			fetcher, streamer = n1, n2
		case n2.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`) > 0:
			fetcher, streamer = n2, n1
		}
	}
	if fetcher == n1 {
		waitMetric(t, n1, 1, "imagemesh_peering_provide_duration_seconds_count", `result="ok"`)
		done = pull(n2)
	}
	waitMetric(t, streamer, 8<<20, "imagemesh_content_fetched_bytes_total", `source="peer"`)
	fetcher.Kill()

	res := <-done
	if res.err != nil || res.sum != layer.Digest.String() {
		t.Fatalf("client of the surviving node: %d bytes, %s, %v; want %s", res.n, res.sum, res.err, layer.Digest)
	}
	fromPeer := streamer.Metric("imagemesh_content_fetched_bytes_total", `source="peer"`)
	fromUpstream := streamer.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`)
	if fromPeer <= 0 || fromUpstream <= 0 || fromPeer+fromUpstream != float64(layer.Size) {
		t.Fatalf("the surviving node fetched %v bytes from the peer and %v from upstream; want a resume that adds up to %d",
			fromPeer, fromUpstream, layer.Size)
	}
}

func manifestLayers(t *testing.T, manifestURL string) []digest.Digest {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, manifestURL, nil)
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m struct {
		Layers []struct {
			Digest digest.Digest `json:"digest"`
		} `json:"layers"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	var out []digest.Digest
	for _, l := range m.Layers {
		out = append(out, l.Digest)
	}
	return out
}

// TestDNSBootstrap: an agent finds its peer through a DNS name (localhost here; a headless Service in
// a cluster) and the agent's API, which tells the peer ID that a libp2p dial needs.
func TestDNSBootstrap(t *testing.T) {
	key := writeKey(t)
	n1 := startPeer(t, "--peer-key", key)
	_, port, _ := strings.Cut(n1.Addr, ":")
	n2 := startPeer(t, "--peer-key", key, "--bootstrap-dns", "localhost:"+port)
	waitMetric(t, n2, 1, "imagemesh_peering_peers")
	waitMetric(t, n1, 1, "imagemesh_peering_peers")
	// A name that does not resolve is no reason not to start: the agent works alone.
	n3 := startPeer(t, "--peer-key", key, "--bootstrap-dns", "no-such-host.invalid:5000")
	if got := n3.Metric("imagemesh_peering_peers"); got != 0 {
		t.Fatalf("agent with an unresolvable bootstrap name has %v peers", got)
	}
}
