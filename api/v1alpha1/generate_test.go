package v1alpha1_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// The deepcopy functions, the CRD (in config/ and in the chart) and the controller's RBAC are what
// controller-gen makes of the markers now: `make generate` was run after the last change.
func TestGeneratedFilesAreCurrent(t *testing.T) {
	cg := testenv.Tool(t, "controller-gen")
	root := filepath.Join("..", "..")
	out := t.TempDir()
	for _, args := range [][]string{
		{"object", "paths=./api/...", "output:object:dir=" + filepath.Join(out, "object")},
		{"crd", "paths=./api/...", "output:crd:dir=" + filepath.Join(out, "crd")},
		{"rbac:roleName=imagemesh-controller", "paths=./internal/controller/...", "output:rbac:dir=" + filepath.Join(out, "rbac")},
	} {
		cmd := exec.Command(cg, args...)
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("controller-gen %v: %v\n%s", args, err, b)
		}
	}
	for _, f := range []struct{ fresh, committed string }{
		{"object/zz_generated.deepcopy.go", "api/v1alpha1/zz_generated.deepcopy.go"},
		{"crd/imagemesh.io_imagesources.yaml", "config/crd/bases/imagemesh.io_imagesources.yaml"},
		{"crd/imagemesh.io_imagesources.yaml", "charts/imagemesh/crds/imagemesh.io_imagesources.yaml"},
		{"rbac/role.yaml", "config/rbac/role.yaml"},
	} {
		want, err := os.ReadFile(filepath.Join(out, f.fresh))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(root, f.committed))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is not what controller-gen makes of the markers: run make generate", f.committed)
		}
	}
}
