package testenv

import (
	"os"
	"path/filepath"
	"testing"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
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

// StartKubernetes starts an API server for the test and stops it when the test ends. crdDirs are
// loaded as CustomResourceDefinitions.
func StartKubernetes(t testing.TB, crdDirs ...string) *Kubernetes {
	t.Helper()
	apiserver := Tool(t, "kube-apiserver")
	etcd := Tool(t, "etcd")
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
