package e2e

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// startGateway runs `imagemesh gateway` storing into kubo k, and returns its host:port.
func startGateway(t testing.TB, k *testenv.Kubo) string {
	t.Helper()
	addr := testenv.FreeAddr(t)
	runDaemon(t, "gateway", imagemeshBin, "gateway", "--listen", addr, "--ipfs-api", k.API)
	eventually(t, "gateway serving", func() bool {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == http.StatusOK
	})
	return addr
}

func imagemesh(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(imagemeshBin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("imagemesh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestPushToIPFSAndPull: crane pushes an image through the gateway into kubo A. A node agent with no
// registry, whose kubo B is connected only to A, pulls it with containerd from the root the gateway
// names. A second publisher (kubo C) gets the same image: its layer has the same CID.
func TestPushToIPFSAndPull(t *testing.T) {
	a, b := testenv.StartKubo(t), testenv.StartKubo(t)
	b.Connect(t, a)
	gw := startGateway(t, a)
	testenv.PushImage(t, gw+"/team/app:v1", testenv.Layer{Size: 4 << 20})

	_, body, err := get(t, "http://"+gw+"/imagemesh/v1/root")
	root := strings.TrimSpace(string(body))
	if err != nil || !strings.HasPrefix(root, "/ipfs/") {
		t.Fatalf("root from the gateway: %q %v", body, err)
	}
	if cli := imagemesh(t, "ipfs", "root", "--ipfs-api", a.API); cli != root {
		t.Fatalf("imagemesh ipfs root = %s, the gateway says %s", cli, root)
	}

	hosts := t.TempDir()
	agent := startAgent(t, "--config", ipfsAgentConfig(t, "", root, b.API, hosts))
	ctrd := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := ctrd.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull from IPFS: %v\n%s", err, out)
	}
	if got := agent.Metric("imagemesh_content_fetched_bytes_total", `source="ipfs"`); got < 4<<20 {
		t.Fatalf("%v bytes from IPFS", got)
	}

	// Publishing: an IPNS name for the root.
	name := imagemesh(t, "ipfs", "publish", "--ipfs-api", a.API)
	if !strings.HasPrefix(name, "/ipns/") || strings.TrimSpace(a.Run(t, "name", "resolve", name)) != root {
		t.Fatalf("published %q does not resolve to %s", name, root)
	}

	// An independent publisher pushes the same image: the same bytes make the same CIDs.
	c := testenv.StartKubo(t)
	gw2 := startGateway(t, c)
	crane := testenv.Tool(t, "crane")
	if out, err := exec.Command(crane, "copy", "--insecure", gw+"/team/app:v1", gw2+"/team/app:v1").CombinedOutput(); err != nil {
		t.Fatalf("crane copy: %v\n%s", err, out)
	}
	blobs := "/imagemesh/docker/registry/v2/blobs/sha256"
	for _, dir := range strings.Fields(a.Run(t, "files", "ls", blobs)) {
		for _, hex := range strings.Fields(a.Run(t, "files", "ls", blobs+"/"+dir)) {
			p := blobs + "/" + dir + "/" + hex + "/data"
			ca := strings.TrimSpace(a.Run(t, "files", "stat", "--hash", p))
			cc := strings.TrimSpace(c.Run(t, "files", "stat", "--hash", p))
			if ca != cc {
				t.Errorf("%s: CID %s on one publisher, %s on the other", p, ca, cc)
			}
			// And the CID `ipfs add --cid-version=1 --raw-leaves` gives the same bytes.
			f := filepath.Join(t.TempDir(), "blob")
			mustWrite(t, f, []byte(a.Run(t, "files", "read", p)), 0o644)
			if added := strings.TrimSpace(a.Run(t, "add", "-Q", "--only-hash", "--cid-version=1", "--raw-leaves", f)); added != ca {
				t.Errorf("%s: CID %s in the layout, %s from ipfs add", p, ca, added)
			}
		}
	}
}

// ipfsAgentConfig writes an agent configuration in which example.test is read from an IPFS root
// through the kubo at kuboAPI, with endpoint as its registry ("" for none) and, if hosts is set, a
// hosts.toml for containerd there. It returns the file's path.
func ipfsAgentConfig(t testing.TB, endpoint, root, kuboAPI, hosts string) string {
	t.Helper()
	cfg := "upstreams:\n  - host: example.test\n"
	if endpoint != "" {
		cfg += "    endpoint: " + endpoint + "\n"
	}
	cfg += "    sources:\n      - {type: IPFS, root: " + root + ", endpoint: " + kuboAPI + "}\n"
	if hosts != "" {
		cfg += "hostConfig: {dir: " + hosts + ", registries: [example.test]}\n"
	}
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
