package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	imagemeshv1alpha1 "github.com/imagemesh/imagemesh/api/v1alpha1"
	"github.com/imagemesh/imagemesh/internal/controller"
	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/internal/testenv/kubeenv"
	"github.com/imagemesh/imagemesh/pkg/mirror"
)

// TestClusterMirrorConfiguration runs what a cluster runs: the controller binary and a node agent in
// cluster mode against a real API server. An ImageSource makes the agent write containerd's hosts.toml,
// prefetch its image, and report; containerd then pulls from the agent's cache. Deleting the
// ImageSource, and stopping the agent (uninstall), remove the files the agent wrote.
func TestClusterMirrorConfiguration(t *testing.T) {
	kube := kubeenv.Start(t, "../../config/crd/bases")
	ctx := context.Background()
	c, err := client.New(kube.Config, client.Options{Scheme: controller.NewScheme()})
	if err != nil {
		t.Fatal(err)
	}
	const ns = "imagemesh-system"
	for _, obj := range []client.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{"pool": "a"}}},
	} {
		if err := c.Create(ctx, obj); err != nil {
			t.Fatal(err)
		}
	}
	startController(t, kube.Kubeconfig, ns)

	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 2 << 20})
	const image = "example.test/team/app:v1"
	hosts := t.TempDir()
	a := startAgent(t, "--cluster-config", ns+"/imagemesh-mirrors", "--node-name", "node-a", "--kubeconfig", kube.Kubeconfig, "--hosts-dir", hosts)

	is := &imagemeshv1alpha1.ImageSource{
		ObjectMeta: metav1.ObjectMeta{Name: "example"},
		Spec: imagemeshv1alpha1.ImageSourceSpec{
			Registries:   []string{"example.test"},
			Upstream:     &imagemeshv1alpha1.Upstream{Endpoint: reg.URL},
			Prefetch:     []string{image},
			NodeSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "a"}},
		},
	}
	if err := c.Create(ctx, is); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(hosts, "example.test", "hosts.toml")
	eventually(t, "hosts.toml written", func() bool {
		b, err := os.ReadFile(file)
		return err == nil && strings.Contains(string(b), a.URL) && strings.Contains(string(b), reg.URL)
	})
	// The cluster's hosts.toml carries the node token, for the node's containerd alone.
	if b, _ := os.ReadFile(file); !strings.Contains(string(b), "[host.'"+a.URL+"'.header]") || !strings.Contains(string(b), mirror.NodeTokenHeader+" = '"+a.Token()+"'") {
		t.Fatalf("the cluster's hosts.toml does not carry the node token:\n%s", b)
	}
	if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("the cluster's hosts.toml holds a secret and is not the owner's alone: %v %v", fi.Mode().Perm(), err)
	}
	if got := a.Metric("imagemesh_cluster_registries"); got != 1 {
		t.Fatalf("imagemesh_cluster_registries = %v, want 1", got)
	}
	eventually(t, "image prefetched", func() bool {
		return a.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`) >= 2<<20
	})
	eventually(t, "ImageSource Ready", func() bool {
		var got imagemeshv1alpha1.ImageSource
		if err := c.Get(ctx, client.ObjectKeyFromObject(is), &got); err != nil {
			return false
		}
		return meta.IsStatusConditionTrue(got.Status.Conditions, imagemeshv1alpha1.ConditionReady) &&
			got.Status.NodesConfigured == 1 && got.Status.NodesSelected == 1
	})

	// containerd pulls through what the agent wrote; the layers come from the cache the prefetch filled.
	ctrd := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := ctrd.CtrPull(ctx, image); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if got := a.Metric("imagemesh_mirror_requests_total", `kind="blob"`, `source="local"`, `code="200"`); got < 2 {
		t.Fatalf("%v blobs served from the prefetched cache, want config and layer", got)
	}

	// A registry no ImageSource names is not pulled through the agent: it is no open proxy.
	if code, body, _ := get(t, a.URL+"/v2/team/app/manifests/v1?ns=example.test"); code != 401 || !strings.Contains(string(body), "UNAUTHORIZED") {
		t.Fatalf("pull without the node token: %d %s", code, body)
	}
	if code, body, _ := a.Get(a.URL + "/v2/library/alpine/manifests/3.20?ns=docker.io"); code != 403 || !strings.Contains(string(body), "DENIED") {
		t.Fatalf("pull of a registry no ImageSource names: %d %s", code, body)
	}

	// The ImageSource goes: so does its hosts.toml.
	if err := c.Delete(ctx, is); err != nil {
		t.Fatal(err)
	}
	eventually(t, "hosts.toml removed with its ImageSource", func() bool {
		_, err := os.Stat(file)
		return os.IsNotExist(err)
	})

	// Uninstall: the agent stops and takes its files with it.
	is.ResourceVersion = ""
	if err := c.Create(ctx, is); err != nil {
		t.Fatal(err)
	}
	eventually(t, "hosts.toml written again", func() bool { _, err := os.Stat(file); return err == nil })
	a.Stop()
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Fatalf("hosts.toml left after the agent stopped: %v", err)
	}
}

func startController(t *testing.T, kubeconfig, ns string) {
	t.Helper()
	runDaemon(t, "controller", controllerBin, "--kubeconfig", kubeconfig, "--namespace", ns,
		"--metrics-bind-address", "0", "--health-probe-bind-address", testenv.FreeAddr(t))
}

// runDaemon starts one of the project's binaries for the test, logging to a file that is shown if the
// test fails, and interrupts it when the test ends.
func runDaemon(t testing.TB, name, bin string, args ...string) *os.Process {
	t.Helper()
	log := filepath.Join(t.TempDir(), name+".log")
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt) // gone already is fine
		_ = cmd.Wait()                       // interrupted: the status says only that
		f.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log)
			t.Logf("%s log:\n%s", name, b)
		}
	})
	return cmd.Process
}

// eventually waits up to 30 s for cond.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	waitUntil(t, 30*time.Second, what, cond)
}
