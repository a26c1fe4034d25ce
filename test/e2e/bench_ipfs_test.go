package e2e

import (
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
	const rounds = 3
	newLayer := func() (string, digest.Digest) {
		file := randomFile(b, "layer", benchLayer)
		return file, digestFile(b, file)
	}
	a := testenv.StartKubo(b)
	gw := startGateway(b, a)
	ref := testenv.StartKubo(b)
	// Each round pushes new bytes through the gateway and adds other new bytes to the reference node,
	// alternately; the medians are reported.
	var pushes, adds []time.Duration
	var d digest.Digest
	for i := 0; i < rounds; i++ {
		file, fd := newLayer()
		d = fd
		dropCaches(b)
		start := time.Now()
		pushBlob(b, gw, "bench/big", file, fd)
		pushes = append(pushes, time.Since(start))

		file, _ = newLayer()
		dropCaches(b)
		start = time.Now()
		ref.Run(b, "add", "-Q", "--cid-version=1", "--raw-leaves", file)
		adds = append(adds, time.Since(start))
	}
	push, add := median(pushes), median(adds)
	mib := float64(benchLayer) / (1 << 20)
	b.ReportMetric(mib/push.Seconds(), "gateway-push-MiB/s")
	b.ReportMetric(mib/add.Seconds(), "ipfs-add-MiB/s")
	b.ReportMetric(add.Seconds()/push.Seconds(), "push/add")

	// The reader's kubo gets the last layer's blocks once (bitswap from the publisher); then, warm, a
	// fresh agent reads it through kubo, against ipfs cat to /dev/null and to a file.
	reader := testenv.StartKubo(b)
	reader.Connect(b, a)
	root := imagemesh(b, "ipfs", "root", "--ipfs-api", a.API)
	blobPath := root + layout.BlobData(d)
	ipfsBin := testenv.Tool(b, "ipfs")
	apiAddr := "/ip4/127.0.0.1/tcp/" + strings.Split(reader.API, ":")[2]
	cat := func(out io.Writer) time.Duration {
		cmd := exec.Command(ipfsBin, "--api", apiAddr, "cat", blobPath)
		cmd.Stdout = out
		dropCaches(b)
		start := time.Now()
		if err := cmd.Run(); err != nil {
			b.Fatalf("ipfs cat: %v", err)
		}
		return time.Since(start)
	}
	cat(io.Discard)
	config := ipfsAgentConfig(b, "", root, reader.API, "")
	var cats, catFiles, reads []time.Duration
	for i := 0; i < rounds; i++ {
		cats = append(cats, cat(io.Discard))
		out, _ := os.Create(filepath.Join(b.TempDir(), "cat"))
		catFiles = append(catFiles, cat(out))
		out.Close()
		os.Remove(out.Name())

		reads = append(reads, coldAgentRead(b, config, d))
	}
	read, catT, catFile := median(reads), median(cats), median(catFiles)
	b.ReportMetric(mib/read.Seconds(), "agent-read-MiB/s")
	b.ReportMetric(mib/catT.Seconds(), "ipfs-cat-MiB/s")
	b.ReportMetric(catT.Seconds()/read.Seconds(), "read/cat")
	b.ReportMetric(mib/catFile.Seconds(), "ipfs-cat-file-MiB/s")
	b.ReportMetric(catFile.Seconds()/read.Seconds(), "read/cat-file")
}

// coldAgentRead starts a fresh agent with config, times a client reading the blob d through it (the
// agent fetching it from its source as it serves it), and removes the agent's data.
func coldAgentRead(b *testing.B, config string, d digest.Digest) time.Duration {
	b.Helper()
	agent := startAgent(b, "--config", config)
	defer func() {
		agent.Stop()
		os.RemoveAll(agent.DataDir)
	}()
	dropCaches(b)
	start := time.Now()
	resp, err := http.Get(agent.URL + "/v2/bench/big/blobs/" + d.String() + "?ns=example.test")
	if err != nil {
		b.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	took := time.Since(start)
	if err != nil || n != benchLayer {
		b.Fatalf("agent read %d bytes: %v", n, err)
	}
	return took
}

// dropCaches empties the page cache, if it can.
func dropCaches(b testing.TB) {
	if out, err := exec.Command("sync").CombinedOutput(); err != nil {
		b.Logf("sync: %v %s", err, out)
	}
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
