package e2e

import (
	"crypto/rand"
	"fmt"
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
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

// BenchmarkIPFS measures, side by side in one run: a 256 MiB layer pushed through the gateway against
// `ipfs add` of the same bytes into a fresh kubo; and the agent reading it from IPFS (kubo warm, agent
// cold) against `ipfs cat` on the same kubo, to /dev/null and to a file.
//
// Each timed step starts with the page cache dropped (as root): on this VM the first touch of guest
// memory costs a host page fault, which would otherwise charge whichever step runs first.
func BenchmarkIPFS(b *testing.B) {
	file := filepath.Join(b.TempDir(), "layer")
	f, _ := os.Create(file)
	io.CopyN(f, rand.Reader, benchLayer)
	f.Close()
	d := digestFile(b, file)

	a := testenv.StartKubo(b)
	gw := startGateway(b, a)
	dropCaches(b)
	start := time.Now()
	pushBlob(b, gw, "bench/big", file, d)
	push := time.Since(start)

	ref := testenv.StartKubo(b)
	dropCaches(b)
	start = time.Now()
	ref.Run(b, "add", "-Q", "--cid-version=1", "--raw-leaves", file)
	add := time.Since(start)

	mib := float64(benchLayer) / (1 << 20)
	b.ReportMetric(mib/push.Seconds(), "gateway-push-MiB/s")
	b.ReportMetric(mib/add.Seconds(), "ipfs-add-MiB/s")
	b.ReportMetric(add.Seconds()/push.Seconds(), "push/add")

	// The reader's kubo gets the blocks once (bitswap from the publisher), then both read it warm.
	reader := testenv.StartKubo(b)
	reader.Connect(b, a)
	root := imagemesh(b, "ipfs", "root", "--ipfs-api", a.API)
	blobPath := root + layout.BlobData(d)
	catToNull := func() time.Duration {
		cmd := exec.Command(testenv.Tool(b, "ipfs"), "--api", "/ip4/127.0.0.1/tcp/"+strings.Split(reader.API, ":")[2], "cat", blobPath)
		cmd.Stdout = io.Discard
		start := time.Now()
		if err := cmd.Run(); err != nil {
			b.Fatalf("ipfs cat: %v", err)
		}
		return time.Since(start)
	}
	catToNull()
	dropCaches(b)
	cat := catToNull()
	out := filepath.Join(b.TempDir(), "cat")
	dropCaches(b)
	start = time.Now()
	of, _ := os.Create(out)
	catFile := exec.Command(testenv.Tool(b, "ipfs"), "--api", "/ip4/127.0.0.1/tcp/"+strings.Split(reader.API, ":")[2], "cat", blobPath)
	catFile.Stdout = of
	if err := catFile.Run(); err != nil {
		b.Fatalf("ipfs cat > file: %v", err)
	}
	of.Close()
	catToFile := time.Since(start)

	config := filepath.Join(b.TempDir(), "agent.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("upstreams:\n  - host: example.test\n    sources:\n      - {type: IPFS, root: %s, endpoint: %s}\n", root, reader.API)), 0o644)
	agent := startAgent(b, "--config", config)
	dropCaches(b)
	start = time.Now()
	resp, err := http.Get(agent.URL + "/v2/bench/big/blobs/" + d.String() + "?ns=example.test")
	if err != nil {
		b.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	read := time.Since(start)
	if err != nil || n != benchLayer {
		b.Fatalf("agent read %d bytes: %v", n, err)
	}
	b.ReportMetric(mib/read.Seconds(), "agent-read-MiB/s")
	b.ReportMetric(mib/cat.Seconds(), "ipfs-cat-MiB/s")
	b.ReportMetric(cat.Seconds()/read.Seconds(), "read/cat")
	b.ReportMetric(mib/catToFile.Seconds(), "ipfs-cat-file-MiB/s")
	b.ReportMetric(catToFile.Seconds()/read.Seconds(), "read/cat-file")
}

// dropCaches empties the page cache, if it can.
func dropCaches(b testing.TB) {
	exec.Command("sync").Run()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("1\n"), 0o200); err != nil {
		b.Logf("page cache not dropped: %v", err)
	}
}

func digestFile(b testing.TB, path string) digest.Digest {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	d, err := digest.FromReader(f)
	if err != nil {
		b.Fatal(err)
	}
	return d
}

// pushBlob uploads a blob as a client does: POST, one streamed PATCH, PUT with the digest.
func pushBlob(b testing.TB, registry, repo, file string, d digest.Digest) {
	b.Helper()
	resp, err := http.Post("http://"+registry+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil || resp.StatusCode != http.StatusAccepted {
		b.Fatalf("start upload: %v %v", resp, err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if !strings.HasPrefix(loc, "http") {
		loc = "http://" + registry + loc
	}
	f, _ := os.Open(file)
	defer f.Close()
	req, _ := http.NewRequest(http.MethodPatch, loc, f)
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusAccepted {
		b.Fatalf("upload: %v %v", resp, err)
	}
	resp.Body.Close()
	loc = resp.Header.Get("Location")
	if !strings.HasPrefix(loc, "http") {
		loc = "http://" + registry + loc
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	req, _ = http.NewRequest(http.MethodPut, loc+sep+"digest="+d.String(), nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusCreated {
		b.Fatalf("commit upload: %v %v", resp, err)
	}
	resp.Body.Close()
}
