package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// TestPeeringAcrossNamespaces runs hack/peering-netns.sh test: agents and containerds in network
// namespaces joined by veth pairs and a bridge, the registry in a namespace of its own; ctr pulls with
// the registry down, from a corrupt peer, with a peer killed mid-transfer, and a host without the key.
func TestPeeringAcrossNamespaces(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tool := range []string{"ip", "tc", "containerd", "ctr", "curl"} {
		testenv.Tool(t, tool)
	}
	registry := testenv.Tool(t, "registry")
	testenv.Tool(t, "crane")
	cmd := exec.Command("bash", "hack/peering-netns.sh", "test")
	cmd.Dir = filepath.Join("..", "..")
	cmd.Env = append(os.Environ(), "IMAGEMESH_TOOLS="+filepath.Dir(registry))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "PASS") {
		t.Fatalf("hack/peering-netns.sh test: %v\n%s", err, out)
	}
	// Every namespace the script made is gone.
	if ns, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(ns), "imx") {
		t.Fatalf("namespaces left behind:\n%s", ns)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "ok:") {
			t.Log(line)
		}
	}
}
