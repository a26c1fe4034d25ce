package e2e

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// TestDockerPullsThroughAgent: Docker Engine uses the agent as its registry mirror for docker.io
// (daemon.json registry-mirrors), and as a registry of its own (`docker pull <agent>/<name>`, the
// agent's default registry being docker.io). The agent's docker.io is a local registry, and dockerd
// can reach nothing off the machine, so every byte comes through the agent. A second dockerd, empty,
// pulls the image again with the registry stopped: from the agent's cache.
func TestDockerPullsThroughAgent(t *testing.T) {
	reg := testenv.StartRegistry(t)
	// In docker.io's library, under a name Docker Hub does not have.
	const name = "imagemesh-e2e-docker"
	want := testenv.PushImage(t, reg.Host+"/library/"+name+":v1",
		testenv.Layer{Size: 256 << 10}, testenv.Layer{Size: 1 << 20}, testenv.Layer{Size: 2 << 20})
	a := startAgent(t, "--upstream", "docker.io="+reg.URL, "--tag-ttl", "1s")
	mirror := testenv.DockerdOptions{RegistryMirrors: []string{a.URL}}

	// checkImage inspects ref in d: all three layers, pulled as the pushed manifest.
	checkImage := func(t *testing.T, d *testenv.Dockerd, ref, repoDigest string) testenv.DockerImage {
		t.Helper()
		img, err := d.Image(ctx(t), ref)
		if err != nil {
			t.Fatal(err)
		}
		if len(img.RootFS.Layers) != 3 || !slices.Contains(img.RepoDigests, repoDigest) {
			t.Fatalf("docker image inspect %s: %d layers, repo digests %q; want 3 layers and %s", ref, len(img.RootFS.Layers), img.RepoDigests, repoDigest)
		}
		return img
	}

	first := testenv.StartDockerd(t, mirror)
	if out, err := first.Pull(ctx(t), name+":v1"); err != nil {
		t.Fatalf("docker pull with the agent as mirror: %v\n%s", err, out)
	}
	img := checkImage(t, first, "docker.io/library/"+name+":v1", name+"@"+want.String())
	if n := a.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `method="GET"`, `code="200"`); n < 4 {
		t.Fatalf("agent served %v blobs, want the config and 3 layers: docker did not pull through it", n)
	}
	if n := a.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`); n < 3<<20 {
		t.Fatalf("agent fetched %v bytes from upstream, want the layers", n)
	}

	// The agent as the registry: localhost:5000/<name> is docker.io/library/<name>.
	if out, err := first.Pull(ctx(t), a.Addr+"/"+name+":v1"); err != nil {
		t.Fatalf("docker pull %s/%s: %v\n%s", a.Addr, name, err, out)
	}
	if byAgent := checkImage(t, first, a.Addr+"/"+name+":v1", a.Addr+"/"+name+"@"+want.String()); byAgent.ID != img.ID {
		t.Fatalf("image through the agent as registry is %s, through the mirror %s", byAgent.ID, img.ID)
	}
	if n := first.OutsideAttempts(); n != 0 {
		t.Fatalf("dockerd went off the machine %d times: the mirror did not answer every request", n)
	}

	// The registry goes away, the tag's TTL passes, and an empty dockerd pulls from the agent's cache.
	reg.Stop(t)
	time.Sleep(1200 * time.Millisecond)
	local := a.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `source="local"`, `code="200"`)
	second := testenv.StartDockerd(t, mirror)
	if out, err := second.Pull(ctx(t), "docker.io/library/"+name+":v1"); err != nil {
		t.Fatalf("docker pull with the registry stopped: %v\n%s", err, out)
	}
	if again := checkImage(t, second, name+":v1", name+"@"+want.String()); again.ID != img.ID || !slices.Equal(again.RootFS.Layers, img.RootFS.Layers) {
		t.Fatalf("second dockerd has %s %q, the first %s %q", again.ID, again.RootFS.Layers, img.ID, img.RootFS.Layers)
	}
	if n := a.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `source="local"`, `code="200"`) - local; n < 4 {
		t.Fatalf("agent served %v blobs from its cache to the second dockerd, want the config and 3 layers", n)
	}
	if n := a.Metric("imagemesh_mirror_tag_lookups_total", `result="stale"`); n < 1 {
		t.Fatal("no stale tag answer counted: the tag did not come from the agent's last answer")
	}
	if n := second.OutsideAttempts(); n != 0 {
		t.Fatalf("second dockerd went off the machine %d times", n)
	}
	if !strings.Contains(a.Logs(), "serving the cached answer") {
		t.Fatal("no log line says the cached tag answer was served")
	}
}
