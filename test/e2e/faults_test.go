package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/internal/testenv"
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

// getBlob GETs a blob from an agent and returns the status, the body's digest and length, and the
// error that ended the body (nil when it ended cleanly).
func getBlob(t testing.TB, url string) (int, digest.Digest, int64, []byte, error) {
	t.Helper()
	resp, err := http.Get(url)
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
	// The small layer is served; but makeRoom evicts for a trusted size before it knows whether
	// evicting everything would make room, so a blob that can never fit empties the cache first, and
	// the small layer comes from the registry again. Said here, and in the report of issue 12, until
	// pkg/content checks first; then this becomes an assertion.
	if !servesSmall("after a refused fetch") {
		t.Logf("the refused fetch evicted the cached small layer: it was fetched again from the registry")
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
