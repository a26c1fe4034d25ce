package main

import (
	"os/exec"
	"strings"
	"testing"
)

// The agent links only what it uses. Each of these once came in through one import and made the
// agent's image much larger (79.6 MB stripped, down to 38 MB without them): distribution's storage
// drivers (and through their base, OpenTelemetry's exporters and gRPC) for parsing a Storj access
// grant, which pkg/storjaccess does with uplink alone; and client-go's clientset, which registers
// every built-in API group, for the few calls of kube.go.
func TestAgentLinksWhatItUses(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 100 {
		t.Fatalf("go list -deps: %d packages; want the agent's", len(deps))
	}
	for _, unwanted := range []string{
		"github.com/distribution/distribution/v3/registry/storage",
		"github.com/imagemesh/imagemesh/pkg/storage/driver",
		"go.opentelemetry.io/otel/exporters",
		"google.golang.org/grpc",
		"k8s.io/client-go/kubernetes",
		"k8s.io/client-go/informers",
	} {
		for _, d := range deps {
			if d == unwanted || strings.HasPrefix(d, unwanted+"/") {
				t.Errorf("node-agent links %s", d)
			}
		}
	}
}
