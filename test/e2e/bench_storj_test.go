package e2e

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// BenchmarkStorj measures, side by side on one testplanet network: a 256 MiB layer pushed through the
// gateway (POST, one streamed PATCH, PUT) against a plain uplink upload of the same number of bytes
// from a file; and a cold agent reading a layer from Storj (verified, written to its store, streamed
// to the client) against a plain uplink download of it, to /dev/null and to a file. It also reports
// the gateway's peak RSS after the 256 MiB pushes and after one 1 GiB push, to show that a layer
// streams through and is not held in memory.
func BenchmarkStorj(b *testing.B) {
	const rounds = 5
	network, access := storjBucket(b)
	gw, gwProc := startStorjGatewayProcess(b, access)
	project := network.Project(b)
	ctx := context.Background()
	newLayer := func() (string, digest.Digest) {
		file := randomFile(b, "layer", benchLayer)
		return file, digestFile(b, file)
	}
	upload := func(file, key string) {
		f, err := os.Open(file)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		up, err := project.UploadObject(ctx, "images", key, nil)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.Copy(up, f); err != nil {
			b.Fatal(err)
		}
		if err := up.Commit(); err != nil {
			b.Fatal(err)
		}
	}
	download := func(key string, out io.Writer) {
		dl, err := project.DownloadObject(ctx, "images", key, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer dl.Close()
		if n, err := io.Copy(out, dl); err != nil || n != benchLayer {
			b.Fatalf("download %s: %d bytes, %v", key, n, err)
		}
	}

	// Each round pushes new bytes through the gateway and uploads other new bytes with uplink; the
	// medians are reported.
	var pushes, uploads []time.Duration
	var d digest.Digest
	for i := 0; i < rounds; i++ {
		steps := []func(){
			func() {
				file, fd := newLayer()
				d = fd
				dropCaches(b)
				start := time.Now()
				pushBlob(b, gw, "bench/big", file, fd)
				pushes = append(pushes, time.Since(start))
			},
			func() {
				file, _ := newLayer()
				dropCaches(b)
				start := time.Now()
				upload(file, "plain/layer")
				uploads = append(uploads, time.Since(start))
			},
		}
		// The network's storage nodes are still settling the last upload when the next starts: take
		// turns at going first.
		if i%2 == 1 {
			steps[0], steps[1] = steps[1], steps[0]
		}
		steps[0]()
		steps[1]()
	}
	push, up := median(pushes), median(uploads)
	mib := float64(benchLayer) / (1 << 20)
	b.ReportMetric(mib/push.Seconds(), "gateway-push-MiB/s")
	b.ReportMetric(mib/up.Seconds(), "uplink-upload-MiB/s")
	b.ReportMetric(up.Seconds()/push.Seconds(), "push/upload")
	b.ReportMetric(float64(peakRSS(b, gwProc.Pid))/(1<<20), "gateway-peak-RSS-MiB")
	// A layer four times larger leaves the gateway's peak where it was: layers stream through.
	big := randomFile(b, "big", 4*benchLayer)
	pushBlob(b, gw, "bench/bigger", big, digestFile(b, big))
	os.Remove(big)
	b.ReportMetric(float64(peakRSS(b, gwProc.Pid))/(1<<20), "gateway-peak-RSS-after-1GiB-MiB")

	// Reads: the last pushed layer, by a fresh agent each round, against uplink downloads of the
	// plain object.
	config := filepath.Join(b.TempDir(), "agent.yaml")
	mustWrite(b, config, []byte("upstreams:\n  - host: example.test\n    sources:\n      - {type: Storj, bucket: images, prefix: registry, accessFile: "+access+"}\n"), 0o644)
	var reads, downloads, downloadFiles []time.Duration
	for i := 0; i < rounds; i++ {
		dropCaches(b)
		start := time.Now()
		download("plain/layer", io.Discard)
		downloads = append(downloads, time.Since(start))

		out, _ := os.Create(filepath.Join(b.TempDir(), "download"))
		dropCaches(b)
		start = time.Now()
		download("plain/layer", out)
		out.Close()
		downloadFiles = append(downloadFiles, time.Since(start))
		os.Remove(out.Name())

		reads = append(reads, coldAgentRead(b, config, d))
	}
	read, dl, dlFile := median(reads), median(downloads), median(downloadFiles)
	b.ReportMetric(mib/read.Seconds(), "agent-read-MiB/s")
	b.ReportMetric(mib/dl.Seconds(), "uplink-download-MiB/s")
	b.ReportMetric(dl.Seconds()/read.Seconds(), "read/download")
	b.ReportMetric(mib/dlFile.Seconds(), "uplink-download-file-MiB/s")
	b.ReportMetric(dlFile.Seconds()/read.Seconds(), "read/download-file")
}
