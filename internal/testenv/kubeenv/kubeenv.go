// Package kubeenv starts a real Kubernetes API server for a test: kube-apiserver (built from
// k8s.io/kubernetes by `make test-deps`) over Debian's etcd, through controller-runtime's envtest.
//
// It is testenv's, kept apart because envtest and client-go are most of what a test binary would
// link through testenv: tests that need no API server (the unit tier's above all) link testenv
// without them, and without envtest, which makes a port cache under the user's cache dir
// (~/.cache/kubebuilder-envtest) as soon as it is loaded.
//
// Invariants, as testenv's: the binaries come from testenv.Tool, so that a missing one skips the
// test, or fails it under CI=true, and under -short (the unit tier) it always skips; the server and
// etcd run on loopback with their data in temp dirs, and stop when the test ends.
package kubeenv

import (
	"os"
	"path/filepath"
	"testing"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// Kubernetes is a real API server (kube-apiserver built from k8s.io/kubernetes, etcd from Debian)
// started by controller-runtime's envtest.
type Kubernetes struct {
	Env    *envtest.Environment
	Config *rest.Config
	Client kubernetes.Interface
	// Kubeconfig is a file with an admin user, for processes such as the node agent.
	Kubeconfig string
}

// Start starts an API server for the test and stops it when the test ends. crdDirs are loaded as
// CustomResourceDefinitions.
func Start(t testing.TB, crdDirs ...string) *Kubernetes {
	t.Helper()
	apiserver := testenv.Tool(t, "kube-apiserver")
	etcd := testenv.Tool(t, "etcd")
	// envtest takes both from one directory, or from these two variables.
	t.Setenv("TEST_ASSET_KUBE_APISERVER", apiserver)
	t.Setenv("TEST_ASSET_ETCD", etcd)
	env := &envtest.Environment{CRDDirectoryPaths: crdDirs, ErrorIfCRDPathMissing: len(crdDirs) > 0}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("start kube-apiserver %s with etcd %s: %v", apiserver, etcd, err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stop kube-apiserver: %v", err)
		}
	})
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	user, err := env.AddUser(envtest.User{Name: "imagemesh-test", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := user.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	return &Kubernetes{Env: env, Config: cfg, Client: client, Kubeconfig: path}
}
