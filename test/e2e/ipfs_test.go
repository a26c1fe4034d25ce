package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// TestPullFromIPFS: a publisher puts a registry's storage into IPFS (kubo A). With the registry gone,
// containerd pulls the image by tag through an agent whose only way to it is its own kubo B, connected
// to A: the tag and the content come from the IPFS root, block by block over bitswap.
func TestPullFromIPFS(t *testing.T) {
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 4 << 20})
	a, b := testenv.StartKubo(t), testenv.StartKubo(t)
	b.Connect(t, a)
	root := "/ipfs/" + strings.TrimSpace(a.Run(t, "add", "-r", "-Q", "--cid-version=1", "--raw-leaves", reg.Dir))
	reg.Stop(t)

	hosts := t.TempDir()
	agent := startAgent(t, "--config", ipfsAgentConfig(t, reg.URL, root, b.API, hosts))
	ctrd := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := ctrd.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull with the registry gone: %v\n%s", err, out)
	}
	if got := agent.Metric("imagemesh_content_fetched_bytes_total", `source="ipfs"`); got < 4<<20 {
		t.Fatalf("%v bytes fetched from IPFS, want the layer", got)
	}
	if got := agent.Metric("imagemesh_mirror_requests_total", `kind="manifest"`, `code="200"`); got < 1 {
		t.Fatalf("no manifest served")
	}
}

// TestSlowUntrustedSourceKeepsContainerd: the only way to a layer is an IPFS root behind a link so
// slow that the layer takes about 40 s to arrive: longer than the 30 s containerd gives a mirror to
// answer, after which it goes to the registry itself (here unreachable, so the pull would fail).
// Bytes from IPFS are untrusted and held back until the layer verified, but the answer starts at
// once, so containerd waits for it and the pull succeeds.
func TestSlowUntrustedSourceKeepsContainerd(t *testing.T) {
	const size = 4 << 20
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: size})
	k := testenv.StartKubo(t)
	root := "/ipfs/" + strings.TrimSpace(k.Run(t, "add", "-r", "-Q", "--cid-version=1", "--raw-leaves", reg.Dir))
	reg.Stop(t)
	slow := newThrottle(t, k.API, size/40)

	hosts := t.TempDir()
	a := startAgent(t, "--config", ipfsAgentConfig(t, reg.URL, root, slow.URL, hosts))
	ctrd := testenv.StartContainerd(t, testenv.Containerd2, hosts)
	start := time.Now()
	if out, err := ctrd.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull from a slow IPFS root, after %s: %v\n%s", time.Since(start).Round(time.Second), err, out)
	}
	took := time.Since(start)
	t.Logf("pulled in %s", took.Round(100*time.Millisecond))
	if took < 30*time.Second {
		t.Fatalf("the pull took %s: the source was not slow enough to test containerd's 30 s", took)
	}
	if got := a.Metric("imagemesh_content_fetched_bytes_total", `source="ipfs"`); got < size {
		t.Fatalf("%v bytes fetched from IPFS, want the layer", got)
	}
}
