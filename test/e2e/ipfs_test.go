package e2e

import (
	"strings"
	"testing"

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
