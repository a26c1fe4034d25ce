package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// Cluster is a multi-node Kubernetes v1.34 cluster of real kubelets on this machine, brought up by
// hack/cluster.sh: a network and mount namespace per node, each with containerd 2.x, a kubelet and
// kube-proxy; the control plane and the cluster's own registry in a namespace of their own; and an
// empty "outside" namespace for the upstream registries a test starts.
//
// The addresses live in those namespaces, so a test that uses the cluster runs inside the control
// plane's namespace: ClusterTest re-executes it there.
type Cluster struct {
	// Dir holds the cluster's state: kubeconfigs, logs, and each node's own directories.
	Dir string
	// Kubeconfig is an admin kubeconfig for the API server.
	Kubeconfig string
	// Nodes is the number of nodes, named node1..nodeN, at NodeIPs.
	Nodes   int
	NodeIPs []string
	// ControlPlaneNetns is the namespace the API server (and a test using the cluster) runs in.
	ControlPlaneNetns string
	// UpstreamNetns and UpstreamIP are the "outside" host, where upstream registries go.
	UpstreamNetns, UpstreamIP string
	// Registry is the cluster's own registry (host:port): it serves registry.k8s.io/pause and ghcr.io
	// to every node through hosts.toml files of the operator's, and takes `make images` pushes.
	Registry string
	// Tools is the directory of the built tools (kubectl, crane, registry, ...).
	Tools string
}

// clusterEnv names the cluster's env file in the re-executed test process.
const clusterEnv = "IMAGEMESH_TEST_CLUSTER"

// repoRoot is the repository's top directory, found from this source file.
func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// ClusterTest gives the calling test a cluster of the given number of nodes. In the test process it
// brings the cluster up (hack/cluster.sh up), calls prepare (with the cluster, from the machine's
// namespace: for work such as pushing images that needs the repository's tools), re-executes the
// test inside the control plane's namespace, takes the cluster down when that ends, and returns nil:
// the caller returns at once. In the re-executed process it returns the cluster, and the test goes on.
func ClusterTest(t *testing.T, nodes int, prepare func(*Cluster)) *Cluster {
	t.Helper()
	if env := os.Getenv(clusterEnv); env != "" {
		c, err := loadCluster(env)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	RequireRoot(t)
	for _, tool := range []string{"kube-apiserver", "kubelet", "kube-proxy", "kubeadm", "kubectl", "containerd2", "registry", "crane", "helm"} {
		Tool(t, tool)
	}
	Tool(t, "ip")
	Tool(t, "nsenter")
	dir, err := os.MkdirTemp("", "imagemesh-cluster-")
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(repoRoot(), "hack", "cluster.sh")
	env := append(os.Environ(), "NAME=imt", "CLUSTER_DIR="+dir, "NODES="+strconv.Itoa(nodes),
		"IMAGEMESH_TOOLS="+filepath.Dir(Tool(t, "kubelet")))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("cluster logs:\n%s", clusterLogs(dir))
		}
		cmd := exec.Command(script, "down")
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("hack/cluster.sh down: %v\n%s", err, out)
		}
	})
	cmd := exec.Command(script, "up")
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		msg := ""
		if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
			msg = string(ee.Stderr)
		}
		t.Fatalf("hack/cluster.sh up: %v\n%s", err, msg)
	}
	envFile := strings.TrimSpace(string(out))
	c, err := loadCluster(envFile)
	if err != nil {
		t.Fatal(err)
	}
	if prepare != nil {
		prepare(c)
		if t.Failed() {
			return nil
		}
	}
	args := []string{"netns", "exec", c.ControlPlaneNetns, os.Args[0], "-test.run", "^" + t.Name() + "$", "-test.v", "-test.count=1",
		"-test.timeout=0"}
	run := exec.Command("ip", args...)
	run.Env = append(os.Environ(), clusterEnv+"="+envFile)
	run.Stderr = os.Stderr
	stdout, err := run.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	// The inner test's output goes on as it comes (it runs for minutes), and is checked for its verdict.
	passed := false
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		fmt.Println("    " + line)
		if strings.HasPrefix(strings.TrimSpace(line), "--- PASS: "+t.Name()+" ") {
			passed = true
		}
	}
	if err := run.Wait(); err != nil || !passed {
		t.Fatalf("test in the cluster's control plane namespace %s: %v", c.ControlPlaneNetns, err)
	}
	return nil
}

// loadCluster reads the env file hack/cluster.sh up writes.
func loadCluster(path string) (*Cluster, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cluster env: %w", err)
	}
	kv := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			kv[k] = v
		}
	}
	n, err := strconv.Atoi(kv["NODES"])
	if err != nil {
		return nil, fmt.Errorf("cluster env %s: NODES: %w", path, err)
	}
	return &Cluster{
		Dir: kv["CLUSTER_DIR"], Kubeconfig: kv["KUBECONFIG"], Nodes: n, NodeIPs: strings.Split(kv["NODE_IPS"], ","),
		ControlPlaneNetns: kv["CONTROL_PLANE_NETNS"], UpstreamNetns: kv["UPSTREAM_NETNS"], UpstreamIP: kv["UPSTREAM_IP"],
		Registry: kv["CLUSTER_REGISTRY"], Tools: kv["IMAGEMESH_TOOLS"],
	}, nil
}

// NodeRoot is the directory that node i (1-based) sees as /etc/containerd, /var/lib/imagemesh and
// the rest of its own directories: NodeRoot(i)+"/etc/containerd/certs.d" is its hosts.toml tree.
func (c *Cluster) NodeRoot(i int) string {
	return filepath.Join(c.Dir, fmt.Sprintf("node%d", i), "root")
}

// Kubectl runs kubectl against the cluster and returns its output; a failure fails the test.
func (c *Cluster) Kubectl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := c.KubectlErr(args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// KubectlErr runs kubectl against the cluster and returns its combined output and error.
func (c *Cluster) KubectlErr(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(c.Tools, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// InUpstream runs a command on the outside host (the upstream namespace), e.g. tc.
func (c *Cluster) InUpstream(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", c.UpstreamNetns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s (in %s): %v\n%s", strings.Join(args, " "), c.UpstreamNetns, err, out)
	}
	return string(out)
}

// clusterLogs is the end of every log the cluster wrote, for a failed test.
func clusterLogs(dir string) string {
	var b strings.Builder
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	nodeLogs, _ := filepath.Glob(filepath.Join(dir, "node*", "*.log"))
	for _, l := range append(logs, nodeLogs...) {
		tail := logTail(l)
		if len(tail) > 3000 {
			tail = tail[len(tail)-3000:]
		}
		fmt.Fprintf(&b, "--- %s (end)\n%s\n", l, tail)
	}
	return b.String()
}
