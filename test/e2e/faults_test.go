package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/storage/driver/storj"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

// The faults of issue 12 that only show through the real binary: a disk that fills up, a peer that
// trickles, sources that lie about sizes, and a corrupt manifest in IPFS. Each test drives node-agent
// through its socket against real components and then looks at what the agent kept on disk.

// fill writes zeroes to a new file at path until it holds size bytes or the disk is full, and returns
// what it wrote and the error that stopped it.
func fill(t testing.TB, path string, size int64) (int64, error) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatalf("create %s: %v", path, err)
	}
	buf := make([]byte, 1<<20)
	var n int64
	for n < size {
		k, werr := f.Write(buf[:min(int64(len(buf)), size-n)])
		n += int64(k)
		if werr != nil {
			err = werr
			break
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return n, err
}

// keptBlobs checks what an agent's store holds on disk: nothing left in ingest/, and every blob file a
// match for the digest it is named by. It returns the digests held.
func keptBlobs(t testing.TB, dataDir string) map[digest.Digest]int64 {
	t.Helper()
	root := filepath.Join(dataDir, "content")
	if left, err := os.ReadDir(filepath.Join(root, "ingest")); err != nil || len(left) != 0 {
		t.Fatalf("ingest/ of %s: %v, %d files left: %v", root, err, len(left), left)
	}
	held := map[digest.Digest]int64{}
	dir := filepath.Join(root, "blobs", "sha256")
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(b)
		if hex.EncodeToString(sum[:]) != de.Name() {
			t.Errorf("the store keeps %s, whose %d bytes do not match its name", p, len(b))
		}
		held[digest.NewDigestFromEncoded(digest.SHA256, de.Name())] = int64(len(b))
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	return held
}

// getBlob GETs a blob from an agent, with the given header name, value pairs, and returns the
// status, the digest and length of a 200's body, the body of any other answer, and the error that
// ended the body (nil when it ended cleanly).
func getBlob(t testing.TB, url string, header ...string) (int, digest.Digest, int64, []byte, error) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, "", 0, nil, err
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", 0, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, "", int64(len(b)), b, err
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	return resp.StatusCode, digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(h.Sum(nil))), n, nil, err
}

// waitIdle waits until an agent has no fetch under way: a fetch that failed has then cleaned up.
func waitIdle(t testing.TB, a *agent) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for a.Metric("imagemesh_content_fetches_in_flight") != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("fetches still under way on %s after 20s", a.URL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDataDiskFillsUp: the agent's data dir is on a 24 MiB tmpfs that a filler file already half
// fills. A blob larger than the free space is refused before the client learns its size (503, the OCI
// error body, saying the disk is full); a blob that fits when its fetch starts meets ENOSPC half way
// when something else fills the disk, and its client's transfer is cut. Either way nothing partial is
// kept, the agent stays up and serves what it holds, and once the filler goes, the same pulls succeed.
func TestDataDiskFillsUp(t *testing.T) {
	disk := testenv.SmallDisk(t, "24m")
	filler := filepath.Join(disk, "filler")
	if _, err := fill(t, filler, 12<<20); err != nil {
		t.Fatalf("filler: %v", err)
	}
	reg := testenv.StartRegistry(t)
	for _, img := range []struct {
		repo string
		size int64
	}{{"small", 256 << 10}, {"mid", 6 << 20}, {"big", 16 << 20}} {
		testenv.PushImage(t, reg.Host+"/team/"+img.repo+":v1", testenv.Layer{Size: img.size})
	}
	small := firstLayer(t, reg.URL+"/v2/team/small/manifests/v1")
	mid := firstLayer(t, reg.URL+"/v2/team/mid/manifests/v1")
	big := firstLayer(t, reg.URL+"/v2/team/big/manifests/v1")
	// slow.test is the same registry at 2 MiB/s: time for the disk to fill while a blob arrives.
	slow := newThrottle(t, reg.URL, 2<<20)
	a := launchAgent(t, &agent{Addr: testenv.FreeAddr(t), DataDir: filepath.Join(disk, "data")},
		"--upstream", "example.test="+reg.URL, "--upstream", "slow.test="+slow.URL)
	blobURL := func(repo, ns string, d digest.Digest) string {
		return a.URL + "/v2/team/" + repo + "/blobs/" + d.String() + "?ns=" + ns
	}
	smallURL := blobURL("small", "example.test", small.Digest)
	if code, got, _, body, err := getBlob(t, smallURL); code != http.StatusOK || got != small.Digest || err != nil {
		t.Fatalf("pull of the small layer: %d %s %v %s", code, got, err, body)
	}
	// servesSmall pulls the small layer again and says whether the cache answered.
	servesSmall := func(when string) bool {
		t.Helper()
		before := a.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `source="local"`, `code="200"`)
		if code, got, _, body, err := getBlob(t, smallURL); code != http.StatusOK || got != small.Digest || err != nil {
			t.Fatalf("%s: the small layer: %d %s %v %s", when, code, got, err, body)
		}
		return a.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `source="local"`, `code="200"`) == before+1
	}

	// Up front: 16 MiB with about 11.7 MiB free.
	start := time.Now()
	code, _, _, body, err := getBlob(t, blobURL("big", "example.test", big.Digest))
	var oci struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	if err != nil || code != http.StatusServiceUnavailable || json.Unmarshal(body, &oci) != nil || len(oci.Errors) != 1 ||
		oci.Errors[0].Code != "UNAVAILABLE" || !strings.Contains(oci.Errors[0].Message, "disk is full") {
		t.Fatalf("a blob larger than the free space: %d %v %s; want 503 UNAVAILABLE saying the disk is full", code, err, body)
	}
	t.Logf("a blob larger than the free space: %d in %s: %s", code, time.Since(start).Round(time.Millisecond), body)
	waitIdle(t, a)
	if held := keptBlobs(t, a.DataDir); held[big.Digest] != 0 {
		t.Fatalf("the refused blob is kept")
	}
	// A blob that could never fit, even in an emptied cache, evicts nothing: the small layer is still
	// served from the cache.
	if !servesSmall("after a refused fetch") {
		t.Fatal("the refused fetch evicted the cached small layer: it was fetched again from the registry")
	}

	// Mid-fetch: 6 MiB that fit when the fetch starts; once 1 MiB has arrived, a second filler takes
	// every byte left.
	fetched := a.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`)
	type result struct {
		code int
		got  digest.Digest
		n    int64
		err  error
	}
	done := make(chan result, 1)
	go func() {
		code, got, n, _, err := getBlob(t, blobURL("mid", "slow.test", mid.Digest))
		done <- result{code, got, n, err}
	}()
	waitMetric(t, a, fetched+1<<20, "imagemesh_content_fetched_bytes_total", `source="upstream"`)
	filler2 := filepath.Join(disk, "filler2")
	if _, err := fill(t, filler2, 64<<20); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling the disk: %v, want ENOSPC", err)
	}
	res := <-done
	if res.code != http.StatusOK || res.err == nil || res.n >= mid.Size || res.got == mid.Digest {
		t.Fatalf("a blob whose fetch met a full disk: %d, %d of %d bytes, %v; want a 200 cut short", res.code, res.n, mid.Size, res.err)
	}
	t.Logf("a blob whose fetch met a full disk: 200, cut after %d of %d bytes: %v", res.n, mid.Size, res.err)
	waitIdle(t, a)
	if held := keptBlobs(t, a.DataDir); held[mid.Digest] != 0 {
		t.Fatalf("the blob whose fetch failed is kept")
	}
	if !strings.Contains(a.Logs(), "no space left on device") {
		t.Errorf("the agent's log does not say the disk was full")
	}
	if code, _, _ := get(t, a.URL+"/readyz"); code != http.StatusOK {
		t.Fatalf("the agent is not ready with its disk full: %d", code)
	}
	if !servesSmall("with the disk full") {
		t.Errorf("with the disk full, the small layer was not served from the cache")
	}

	// Room again: the same pulls succeed, with nothing restarted.
	for _, tc := range []struct {
		filler   string
		repo, ns string
		layer    digest.Digest
	}{{filler2, "mid", "slow.test", mid.Digest}, {filler, "big", "example.test", big.Digest}} {
		if err := os.Remove(tc.filler); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		code, got, n, body, err := getBlob(t, blobURL(tc.repo, tc.ns, tc.layer))
		if code != http.StatusOK || got != tc.layer || err != nil {
			t.Fatalf("%s once %s is removed: %d, %d bytes, %s, %v %s", tc.repo, filepath.Base(tc.filler), code, n, got, err, body)
		}
		t.Logf("%s (%d bytes) pulled in %s once %s was removed", tc.repo, n, time.Since(start).Round(time.Millisecond), filepath.Base(tc.filler))
	}
	held := keptBlobs(t, a.DataDir)
	for _, d := range []digest.Digest{small.Digest, mid.Digest, big.Digest} {
		if held[d] == 0 {
			t.Errorf("%s is not kept once there was room", d)
		}
	}
}

// splitLinks makes a network namespace for a second node, joined to this one by two veth pairs: one
// that carries peering alone (10.91.1.0/24, this side .1, the namespace .2), whose end here can be
// shaped with tc, and one for everything else (10.91.2.0/24: the API, the registry). The kernel here
// has tbf but no classful qdisc to shape one port of a link, so the traffic to shape gets a link of
// its own. It returns the namespace and the name of the shapeable end.
func splitLinks(t *testing.T) (ns, peerLink string) {
	t.Helper()
	testenv.Tool(t, "tc")
	ns = testenv.Netns(t, "imx-faults")
	id := os.Getpid() % 100000
	peerLink = fmt.Sprintf("imxf%dp", id)
	apiLink := fmt.Sprintf("imxf%da", id)
	run := func(args ...string) { testenv.IP(t, args...) }
	for i, link := range []string{peerLink, apiLink} {
		inside := fmt.Sprintf("eth%d", i)
		run("link", "add", link, "type", "veth", "peer", "name", inside, "netns", ns)
		run("addr", "add", fmt.Sprintf("10.91.%d.1/24", i+1), "dev", link)
		run("-n", ns, "addr", "add", fmt.Sprintf("10.91.%d.2/24", i+1), "dev", inside)
		run("link", "set", link, "up")
		run("-n", ns, "link", "set", inside, "up")
	}
	return ns, peerLink
}

// shape sets the tbf qdisc of dev (added, or changed in place).
func shape(t *testing.T, dev string, tbf ...string) {
	t.Helper()
	args := append([]string{"qdisc", "replace", "dev", dev, "root", "tbf"}, tbf...)
	if out, err := exec.Command("tc", args...).CombinedOutput(); err != nil {
		t.Fatalf("tc %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestPeerSendsOneBytePerSecond: node 1 holds a 16 MiB layer; node 2, in a network namespace of its
// own, pulls it while node 1's link to it is shaped with tbf: 1 Mbit/s while the transfer starts, so
// that the answer and the first bytes arrive, then 8 bit/s, a byte a second. Node 2's store drops
// node 1 for the blob (it sent less than 32 KiB/s over 20 s), counts it as a slow peer, and resumes
// from the registry at the byte it had reached: its client gets the right blob.
func TestPeerSendsOneBytePerSecond(t *testing.T) {
	ns, peerLink := splitLinks(t)
	// The registry lives in the namespace, on the unshaped link: both nodes reach it, neither
	// through the shaped one.
	reg := testenv.StartRegistry(t, testenv.InNetns(ns, "10.91.2.2:5000"))
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 16 << 20})
	layer := firstLayer(t, reg.URL+"/v2/team/app/manifests/v1")
	key := writeKey(t)
	common := []string{"--upstream", "example.test=" + reg.URL, "--peer-key", key}
	blob := "/v2/team/app/blobs/" + layer.Digest.String() + "?ns=example.test"

	n1 := startAgent(t, append(common, "--peer-listen", "/ip4/10.91.1.1/tcp/"+strings.TrimPrefix(testenv.FreeAddrOn(t, "10.91.1.1"), "10.91.1.1:"))...)
	if code, got, _, body, err := getBlob(t, n1.URL+blob); code != http.StatusOK || got != layer.Digest || err != nil {
		t.Fatalf("warm node 1: %d %s %v %s", code, got, err, body)
	}
	n2 := launchAgent(t, &agent{Addr: "10.91.2.2:5001", DataDir: t.TempDir(), netns: ns},
		append(common, "--peer-listen", "/ip4/10.91.1.2/tcp/4001", "--bootstrap", n1.peerAddr())...)
	waitMetric(t, n2, 1, "imagemesh_peering_peers")
	waitMetric(t, n1, 1, "imagemesh_peering_peers")

	shape(t, peerLink, "rate", "1mbit", "burst", "32kb", "latency", "100ms")
	type result struct {
		code int
		got  digest.Digest
		n    int64
		err  error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		code, got, n, _, err := getBlob(t, n2.URL+blob)
		done <- result{code, got, n, err}
	}()
	waitMetric(t, n2, 1, "imagemesh_content_fetched_bytes_total", `source="peer"`)
	// 8 bit/s. tbf keeps its bucket in 32 bits of 64 ns ticks, so at this rate it holds at most 274
	// bytes: 200 here. A full-size segment never fits, and only small ones (acks) pass, a byte's
	// worth of tokens a second: less than a byte a second of the blob reaches node 2.
	shape(t, peerLink, "rate", "8bit", "burst", "200", "limit", "1500")
	trickle := time.Now()
	var dropped time.Time
	var res result
	for waiting := true; waiting; {
		select {
		case res = <-done:
			waiting = false
		case <-time.After(100 * time.Millisecond):
			if dropped.IsZero() && n2.Metric("imagemesh_peering_bad_peer_events_total", `reason="slow"`) >= 1 {
				dropped = time.Now()
			}
		}
	}
	if res.code != http.StatusOK || res.got != layer.Digest || res.err != nil {
		t.Fatalf("node 2's client: %d, %d bytes, %s, %v; want %s", res.code, res.n, res.got, res.err, layer.Digest)
	}
	if dropped.IsZero() && n2.Metric("imagemesh_peering_bad_peer_events_total", `reason="slow"`) >= 1 {
		dropped = time.Now()
	}
	if dropped.IsZero() {
		t.Fatalf("node 2 counted no slow peer; bad peer events: %v", n2.Metric("imagemesh_peering_bad_peer_events_total"))
	}
	fromPeer := n2.Metric("imagemesh_content_fetched_bytes_total", `source="peer"`)
	fromUpstream := n2.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`)
	t.Logf("node 1 held the blob %s from the request (%s at a byte a second) until node 2 dropped it; the client had it after %s: %.0f bytes from the peer, %.0f from the registry",
		dropped.Sub(start).Round(100*time.Millisecond), dropped.Sub(trickle).Round(100*time.Millisecond),
		time.Since(start).Round(100*time.Millisecond), fromPeer, fromUpstream)
	// The store gives up on the peer after its first 20 s window and resets the peer's stream at once,
	// rather than wait for the connection to die (yamux's keepalive: about 40 s in all).
	if held := dropped.Sub(start); held > 30*time.Second {
		t.Fatalf("node 1 held the blob %s, past the store's 20 s window", held.Round(100*time.Millisecond))
	}
	if fromPeer <= 0 || fromUpstream <= 0 || fromPeer+fromUpstream != float64(layer.Size) {
		t.Fatalf("node 2 fetched %v bytes from the peer and %v from the registry; want a resume that adds up to %d", fromPeer, fromUpstream, layer.Size)
	}
	if held := keptBlobs(t, n2.DataDir); held[layer.Digest] != layer.Size {
		t.Fatalf("node 2 keeps %d bytes of the layer, want %d", held[layer.Digest], layer.Size)
	}
}

// TestPeerClaimsWrongSize: node 1's copies of an image's layers grow on disk (bytes appended to the
// blob files, read back as their sizes when node 1 restarts), so that node 1 announces sizes other
// than the manifest's. Node 2's containerd pulls the image: node 2 knows the true sizes from the
// verified manifest, passes node 1 over for both layers on their sizes alone, counts it as bad,
// and gets the image from the registry; it keeps the verified layers only.
func TestPeerClaimsWrongSize(t *testing.T) {
	reg, n1, common := pulledPeer(t, testenv.Layer{Size: 512 << 10}, testenv.Layer{Size: 8 << 20})
	const image = "example.test/team/app:v1"
	hosts2 := t.TempDir()

	layers := map[digest.Digest]int64{}
	n1.Stop()
	for _, l := range manifestLayers(t, reg.URL+"/v2/team/app/manifests/v1") {
		p := filepath.Join(n1.DataDir, "content", "blobs", "sha256", l.Encoded())
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("node 1 does not hold layer %s: %v", l, err)
		}
		layers[l] = fi.Size()
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString("and some bytes more"); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	n1.Start()

	n2 := startPeer(t, append(common, "--hosts-dir", hosts2, "--bootstrap", n1.peerAddr())...)
	waitMetric(t, n2, 1, "imagemesh_peering_peers")
	// The restarted node 1 announces everything it holds as soon as it has a peer to tell, not a
	// reprovide interval (10 minutes) later: node 1 is found for every layer.
	announced, err := os.ReadDir(filepath.Join(n1.DataDir, "content", "blobs", "sha256"))
	if err != nil {
		t.Fatal(err)
	}
	waitMetric(t, n1, float64(len(announced)), "imagemesh_peering_keys_provided_total")
	c2 := testenv.StartContainerd(t, testenv.Containerd16, hosts2)
	if out, err := c2.CtrPull(ctx(t), image); err != nil {
		t.Fatalf("pull on node 2 with a peer that claims wrong sizes: %v\n%s", err, out)
	}
	wrongSize := n2.Metric("imagemesh_peering_bad_peer_events_total", `reason="wrong_size"`)
	mismatch := n2.Metric("imagemesh_peering_bad_peer_events_total", `reason="digest_mismatch"`)
	t.Logf("node 2's bad peer events: %v wrong_size, %v digest_mismatch", wrongSize, mismatch)
	if wrongSize < float64(len(layers)) {
		t.Fatalf("node 2 counted %v wrong sizes and %v digest mismatches; want node 1 counted bad for its size for each of %d layers",
			wrongSize, mismatch, len(layers))
	}
	held := keptBlobs(t, n2.DataDir)
	var total int64
	for l, size := range layers {
		if held[l] != size {
			t.Errorf("node 2 keeps %d bytes of layer %s, want %d", held[l], l, size)
		}
		total += size
	}
	if got := n2.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`); got < float64(total) {
		t.Errorf("node 2 fetched %v bytes from the registry, want both layers (%d)", got, total)
	}
}

// TestStorjObjectOfWrongSize: a Storj bucket holds an image whose large layer's object was replaced
// by one of another size. An agent that also has the registry pulls the image right, from the
// registry for that layer; an agent with the bucket alone refuses the layer with an error that names
// the wrong size, and containerd's pull fails. Neither keeps anything that does not verify.
func TestStorjObjectOfWrongSize(t *testing.T) {
	testenv.RequireRoot(t)
	_, access := storjBucket(t)
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 64 << 10}, testenv.Layer{Size: 5 << 20})
	gw := startStorjGateway(t, access)
	if out, err := exec.Command(testenv.Tool(t, "crane"), "copy", "--insecure", reg.Host+"/team/app:v1", gw+"/team/app:v1").CombinedOutput(); err != nil {
		t.Fatalf("crane copy: %v\n%s", err, out)
	}
	layer := manifestLayers(t, reg.URL+"/v2/team/app/manifests/v1")[1]
	d, err := storj.New(context.Background(), storj.Parameters{AccessFile: access, Bucket: "images", Prefix: "registry"})
	if err != nil {
		t.Fatal(err)
	}
	good, err := d.GetContent(ctx(t), layout.BlobData(layer))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.PutContent(ctx(t), layout.BlobData(layer), append(good, "and some bytes more"...)); err != nil {
		t.Fatal(err)
	}
	d.Close()

	hosts := t.TempDir()
	a := startAgent(t, "--config", storjAgentConfig(t, reg.URL, access, hosts))
	c := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := c.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull with a layer of the wrong size in Storj: %v\n%s", err, out)
	}
	if got := a.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`); got < float64(len(good)) {
		t.Fatalf("%v bytes from the registry, want the layer Storj has wrong (%d)", got, len(good))
	}
	if held := keptBlobs(t, a.DataDir); held[layer] != int64(len(good)) {
		t.Fatalf("the agent keeps %d bytes of the layer, want %d", held[layer], len(good))
	}

	// The bucket alone: the manifest from Storj teaches the agent the layer's size, and Storj's
	// object is not that size.
	alone := startAgent(t, "--config", storjAgentConfig(t, "", access, t.TempDir()))
	if code, _, err := alone.Get(alone.URL + "/v2/team/app/manifests/v1?ns=example.test"); err != nil || code != http.StatusOK {
		t.Fatalf("manifest from Storj alone: %d %v", code, err)
	}
	code, _, _, body, err := getBlob(t, alone.URL+"/v2/team/app/blobs/"+layer.String()+"?ns=example.test",
		mirror.NodeTokenHeader, alone.Token())
	t.Logf("the layer of the wrong size, from Storj alone: %d %s", code, body)
	if err != nil || code == http.StatusOK || !strings.Contains(string(body), "the manifest says") {
		t.Fatalf("the layer of the wrong size, from Storj alone: %d %v %s; want an error that names the size", code, err, body)
	}
	hostsAlone := t.TempDir()
	startAgent(t, "--config", storjAgentConfig(t, "", access, hostsAlone))
	c2 := testenv.StartContainerd(t, testenv.Containerd16, hostsAlone)
	if out, err := c2.CtrPull(ctx(t), "example.test/team/app:v1"); err == nil {
		t.Fatalf("containerd pulled an image whose layer Storj has wrong, with no registry: %s", out)
	}
	if held := keptBlobs(t, alone.DataDir); held[layer] != 0 {
		t.Fatalf("the agent with Storj alone keeps the layer of the wrong size")
	}
}

// TestIPFSCorruptManifest: an IPFS root holds a registry's storage in which the image's manifest
// blob has one byte changed (its size and its tag's link unchanged). Through an agent that also has
// the registry, containerd gets the right image: the manifest from IPFS fails verification and the
// registry answers it, the layer still comes from IPFS. With the registry down, a fresh agent answers
// with an OCI error, and containerd's pull fails. Neither agent keeps anything that does not verify.
func TestIPFSCorruptManifest(t *testing.T) {
	testenv.RequireRoot(t)
	reg := testenv.StartRegistry(t)
	manifest := testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 2 << 20})
	layer := firstLayer(t, reg.URL+"/v2/team/app/manifests/v1")
	published := filepath.Join(t.TempDir(), "storage")
	if out, err := exec.Command("cp", "-a", reg.Dir, published).CombinedOutput(); err != nil {
		t.Fatalf("copy the registry's storage: %v %s", err, out)
	}
	p := filepath.Join(published, "docker", "registry", "v2", "blobs", "sha256", manifest.Encoded()[:2], manifest.Encoded(), "data")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("the manifest's blob in the registry's storage: %v", err)
	}
	b[len(b)/2] ^= 0x01
	mustWrite(t, p, b, 0o644)
	k := testenv.StartKubo(t)
	root := "/ipfs/" + strings.TrimSpace(k.Run(t, "add", "-r", "-Q", "--cid-version=1", "--raw-leaves", published))

	hosts := t.TempDir()
	a := startAgent(t, "--config", ipfsAgentConfig(t, reg.URL, root, k.API, hosts))
	c := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := c.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull with a corrupt manifest in IPFS: %v\n%s", err, out)
	}
	if got := a.Metric("imagemesh_content_verification_failures_total"); got < 1 {
		t.Fatalf("verification failures: %v, want the corrupt manifest caught", got)
	}
	if got := a.Metric("imagemesh_content_fetched_bytes_total", `source="ipfs"`); got < float64(layer.Size) {
		t.Fatalf("%v bytes from IPFS, want the layer (%d)", got, layer.Size)
	}
	code, body, _ := a.Get(a.URL + "/v2/team/app/manifests/" + manifest.String() + "?ns=example.test")
	if code != http.StatusOK || digest.FromBytes(body) != manifest {
		t.Fatalf("the agent serves %d, %d bytes that are not the manifest", code, len(body))
	}
	if held := keptBlobs(t, a.DataDir); held[manifest] != int64(len(b)) || held[layer.Digest] != layer.Size {
		t.Fatalf("the agent keeps %d bytes of the manifest (want %d) and %d of the layer (want %d)",
			held[manifest], len(b), held[layer.Digest], layer.Size)
	}
	// The corrupt copy shows in the metric and in the log.
	if !strings.Contains(a.Logs(), "manifest failed verification") {
		t.Fatalf("the agent's log does not say that IPFS's manifest failed verification:\n%s", a.Logs())
	}

	// The registry goes down: a fresh agent has the corrupt manifest and nothing else.
	reg.Stop(t)
	hosts2 := t.TempDir()
	down := startAgent(t, "--config", ipfsAgentConfig(t, reg.URL, root, k.API, hosts2))
	code, body, err = down.Get(down.URL + "/v2/team/app/manifests/v1?ns=example.test")
	var oci struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	t.Logf("the manifest with the registry down and IPFS's copy corrupt: %d %s", code, body)
	if err != nil || code != http.StatusBadGateway || json.Unmarshal(body, &oci) != nil || len(oci.Errors) != 1 ||
		oci.Errors[0].Code != "DIGEST_INVALID" || !strings.Contains(oci.Errors[0].Message, "manifest from ipfs") {
		t.Fatalf("the manifest with the registry down and IPFS's copy corrupt: %d %v %s; want 502 DIGEST_INVALID naming IPFS", code, err, body)
	}
	c2 := testenv.StartContainerd(t, testenv.Containerd16, hosts2)
	if out, err := c2.CtrPull(ctx(t), "example.test/team/app:v1"); err == nil {
		t.Fatalf("containerd pulled an image whose only manifest is corrupt: %s", out)
	}
	if held := keptBlobs(t, down.DataDir); held[manifest] != 0 {
		t.Fatalf("the agent with the registry down keeps a manifest")
	}
}
