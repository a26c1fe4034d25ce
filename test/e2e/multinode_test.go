package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	imagemeshv1alpha1 "github.com/imagemesh/imagemesh/api/v1alpha1"
	"github.com/imagemesh/imagemesh/internal/controller"
	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/hostconfig"
	imagemeshmirror "github.com/imagemesh/imagemesh/pkg/mirror"
)

const (
	meshNamespace = "imagemesh-system"
	meshRelease   = "imagemesh"
	// agentHostPort is the chart's default hostPort, where each node's containerd reaches its agent.
	agentHostPort = 30020
)

// pushImagemeshImages builds imagemesh's images with `make images` and pushes them into the
// cluster's own registry, which serves them to the nodes under the chart's default names
// (ghcr.io/imagemesh/...).
func pushImagemeshImages(t *testing.T, c *testenv.Cluster) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", c.ControlPlaneNetns, "make", "-C", "../..", "images",
		"REGISTRY="+c.Registry+"/imagemesh", "INSECURE=1")
	cmd.Env = append(os.Environ(), "PATH="+c.Tools+":"+os.Getenv("PATH"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make images REGISTRY=%s/imagemesh: %v\n%s", c.Registry, err, out)
	}
}

// mesh is the chart installed on a cluster, with an upstream registry on the cluster's outside host.
type mesh struct {
	c        *testenv.Cluster
	kube     client.Client
	upstream *testenv.Registry
}

// TestMultiNodeCluster runs the README's main path the way a user meets it: the chart, with the
// images `make images` built, installed with its default values on three nodes of real kubelets
// (hack/cluster.sh), one ImageSource for a registry behind a shaped link, and pods on every node.
func TestMultiNodeCluster(t *testing.T) {
	c := testenv.ClusterTest(t, 3, func(c *testenv.Cluster) { pushImagemeshImages(t, c) })
	if c == nil {
		return
	}
	m := installMesh(t, c)
	source := m.imageSource(t, "team", nil)

	t.Run("Workload", func(t *testing.T) {
		ref := m.upstream.Host + "/team/app:v1"
		layers := m.push(t, ref, 60<<20, 50<<20)
		// The upstream link is shaped, as a registry across the internet is.
		c.InUpstream(t, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "200mbit", "burst", "256kb", "latency", "100ms")
		defer c.InUpstream(t, "tc", "qdisc", "del", "dev", "eth0", "root")

		m.runDaemonSet(t, "workload", ref)
		gets := m.upstream.BlobGets(t)
		for _, l := range layers {
			if gets[l.String()] != 1 {
				t.Errorf("upstream served layer %s %d times, want once for %d nodes", l, gets[l.String()], c.Nodes)
			}
		}
		// One node fetched each layer from the registry; the others got it from their peers.
		var size float64 = 110 << 20
		var fromPeers, fromUpstream float64
		for node, ip := range m.agents(t) {
			p := scrape(t, "http://"+ip+":5000/metrics", "imagemesh_content_fetched_bytes_total", `source="peer"`)
			u := scrape(t, "http://"+ip+":5000/metrics", "imagemesh_content_fetched_bytes_total", `source="upstream"`)
			t.Logf("%s: %.1f MiB from peers, %.1f MiB from upstream", node, p/(1<<20), u/(1<<20))
			fromPeers += p
			fromUpstream += u
		}
		if fromPeers < float64(c.Nodes-1)*size*0.99 {
			t.Errorf("%.1f MiB came from peers, want the image on %d nodes (%.0f MiB)", fromPeers/(1<<20), c.Nodes-1, float64(c.Nodes-1)*size/(1<<20))
		}
		if fromUpstream > size*1.1 {
			t.Errorf("%.1f MiB came from upstream, want about one image (%.0f MiB)", fromUpstream/(1<<20), size/(1<<20))
		}
		// Every node's hosts.toml for the registry is the agent's, pointing at its own node.
		for i := 1; i <= c.Nodes; i++ {
			b, err := os.ReadFile(filepath.Join(c.NodeRoot(i), "etc", "containerd", "certs.d", m.upstream.Host, "hosts.toml"))
			if err != nil {
				t.Fatalf("node%d: %v", i, err)
			}
			mirror := fmt.Sprintf("http://%s:%d", c.NodeIPs[i-1], agentHostPort)
			if !strings.HasPrefix(string(b), hostconfig.Marker) || !strings.Contains(string(b), mirror) {
				t.Errorf("node%d's hosts.toml for %s is not the agent's, or does not name %s:\n%s", i, m.upstream.Host, mirror, b)
			}
			// It carries the node's own token, which containerd sent with every pull above.
			if !strings.Contains(string(b), "[host.'"+mirror+"'.header]\n"+imagemeshmirror.NodeTokenHeader+" = '"+m.nodeToken(t, i)+"'") {
				t.Errorf("node%d's hosts.toml does not carry the node's token:\n%s", i, b)
			}
			// The operator's own hosts.toml files are left alone.
			b, err = os.ReadFile(filepath.Join(c.NodeRoot(i), "etc", "containerd", "certs.d", "ghcr.io", "hosts.toml"))
			if err != nil || strings.HasPrefix(string(b), hostconfig.Marker) || !strings.Contains(string(b), c.Registry) {
				t.Errorf("node%d: the operator's hosts.toml for ghcr.io changed: %v\n%s", i, err, b)
			}
		}
		m.delete(t, &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "workload", Namespace: "default"}})
	})

	// The pods' images came through the agents (Workload); the pods themselves cannot pull through
	// them: from a pod's network namespace, the agent's hostPort and its pod IP answer the pull API
	// 401 without the node's token, while the endpoints that must stay open answer.
	t.Run("PodCannotPullThroughAgent", func(t *testing.T) {
		ref := m.upstream.Host + "/team/app:v1"
		m.runDaemonSet(t, "probe", ref)
		agents := m.agents(t)
		manifest := "/v2/team/app/manifests/v1?ns=" + m.upstream.Host
		for i := 1; i <= c.Nodes; i++ {
			node := fmt.Sprintf("node%d", i)
			netns := m.podNetns(t, "app=probe", node)
			for _, base := range []string{fmt.Sprintf("http://%s:%d", c.NodeIPs[i-1], agentHostPort), "http://" + agents[node] + ":5000"} {
				if code, body := curlIn(t, netns, base+"/healthz"); code != 200 {
					t.Fatalf("%s: a pod cannot reach its agent at %s: %d %s", node, base, code, body)
				}
				if code, body := curlIn(t, netns, base+manifest); code != 401 || !strings.Contains(body, `"code":"UNAUTHORIZED"`) {
					t.Errorf("%s: a pod's GET %s%s: %d %s, want 401 UNAUTHORIZED", node, base, manifest, code, body)
				}
				if code, body := curlIn(t, netns, base+manifest, "-H", imagemeshmirror.NodeTokenHeader+": "+strings.Repeat("0", 64)); code != 401 {
					t.Errorf("%s: a pod's GET %s%s with a made-up token: %d %s, want 401", node, base, manifest, code, body)
				}
			}
			// The same request with the node's token (which no pod can read) is served: the 401 above
			// is the token's doing, nothing else's.
			hostPort := fmt.Sprintf("http://%s:%d", c.NodeIPs[i-1], agentHostPort)
			if code, body := curlIn(t, netns, hostPort+manifest, "-H", imagemeshmirror.NodeTokenHeader+": "+m.nodeToken(t, i),
				"-H", "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"); code != 200 {
				t.Errorf("%s: GET with the node's token: %d %s", node, code, body)
			}
			if n := scrape(t, "http://"+agents[node]+":5000/metrics", "imagemesh_mirror_requests_total", `code="401"`); n < 4 {
				t.Errorf("%s: the agent counted %v refusals, want the pod's 4", node, n)
			}
		}
		m.delete(t, &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "probe", Namespace: "default"}})
	})

	t.Run("Prefetch", func(t *testing.T) {
		ref := m.upstream.Host + "/team/prefetched:v1"
		layers := m.push(t, ref, 20<<20)
		m.update(t, source, func(is *imagemeshv1alpha1.ImageSource) { is.Spec.Prefetch = []string{ref} })
		for i := 1; i <= c.Nodes; i++ {
			for _, l := range layers {
				blob := filepath.Join(c.NodeRoot(i), "var", "lib", "imagemesh", "content", "blobs", "sha256", l.Encoded())
				waitUntil(t, 2*time.Minute, fmt.Sprintf("node%d holds prefetched layer %s", i, l), func() bool {
					_, err := os.Stat(blob)
					return err == nil
				})
			}
		}
		before := m.upstream.BlobGets(t)
		m.runDaemonSet(t, "prefetched", ref)
		after := m.upstream.BlobGets(t)
		for _, l := range layers {
			if after[l.String()] != before[l.String()] {
				t.Errorf("layer %s went to the upstream again after the prefetch (%d, then %d)", l, before[l.String()], after[l.String()])
			}
		}
		m.delete(t, &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "prefetched", Namespace: "default"}})
	})

	t.Run("PrivateRegistry", func(t *testing.T) {
		private := testenv.StartRegistry(t, testenv.InNetns(c.UpstreamNetns, c.UpstreamIP+":5001"), testenv.WithHtpasswd("puller", "s3cret-pull"))
		ref := private.Host + "/secret/app:v1"
		// crane pushes with the same credentials, from a docker config of the test's.
		cfg := t.TempDir()
		auth := fmt.Sprintf(`{"auths":{%q:{"username":"puller","password":"s3cret-pull"}}}`, private.Host)
		if err := os.WriteFile(filepath.Join(cfg, "config.json"), []byte(auth), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv("DOCKER_CONFIG", cfg)
		m.push(t, ref, 8<<20)
		secret := &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: "private-pull", Namespace: meshNamespace},
			Type:       corev1.SecretTypeDockerConfigJson,
			Data:       map[string][]byte{corev1.DockerConfigJsonKey: []byte(auth)},
		}
		m.create(t, secret)
		m.imageSource(t, "private", &imagemeshv1alpha1.ImageSource{
			ObjectMeta: metav1.ObjectMeta{Name: "private"},
			Spec: imagemeshv1alpha1.ImageSourceSpec{
				Registries: []string{private.Host},
				Upstream:   &imagemeshv1alpha1.Upstream{Endpoint: private.URL, CredentialsSecretRef: &corev1.LocalObjectReference{Name: secret.Name}},
			},
		})
		// The pods name no pull secret: only the agents, with the ImageSource's credentials, can pull.
		m.runDaemonSet(t, "private", ref)
		m.delete(t, &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "private", Namespace: "default"}})
	})

	t.Run("AgentDeletedDuringPull", func(t *testing.T) {
		ref := m.upstream.Host + "/team/slow:v1"
		m.push(t, ref, 100<<20)
		// About 17 s for the layer: the agent goes while it streams.
		c.InUpstream(t, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "50mbit", "burst", "256kb", "latency", "100ms")
		defer c.InUpstream(t, "tc", "qdisc", "del", "dev", "eth0", "root")
		agent := m.agentPods(t)["node2"]
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "slow", Namespace: "default", Labels: map[string]string{"app": "slow"}},
			Spec: corev1.PodSpec{NodeName: "node2", TerminationGracePeriodSeconds: new(int64),
				Containers: []corev1.Container{{Name: "slow", Image: ref}}},
		}
		m.create(t, pod)
		waitUntil(t, time.Minute, "node2 pulling", func() bool {
			out, _ := c.KubectlErr("get", "events", "-n", "default", "--field-selector", "involvedObject.name=slow,reason=Pulling", "-o", "name")
			return strings.TrimSpace(out) != ""
		})
		time.Sleep(3 * time.Second)
		m.delete(t, agent)
		m.waitRunning(t, "app=slow", 1)
		m.delete(t, pod)
		// The DaemonSet brings the agent back, and it takes the node over again.
		m.waitApplied(t, source)
	})

	t.Run("UpgradeDuringPull", func(t *testing.T) {
		// A changed value rolls every agent, one node at a time. Pods keep starting on every node while
		// it does, each pulling an image no node has yet, so that pulls begin in every phase of each
		// agent's restart.
		const rounds = 16
		var refs []string
		for i := range rounds {
			ref := fmt.Sprintf("%s/team/roll-%d:v1", m.upstream.Host, i)
			m.push(t, ref, 1<<20)
			refs = append(refs, ref)
		}
		var tokens []string
		for i := 1; i <= c.Nodes; i++ {
			tokens = append(tokens, m.nodeToken(t, i))
		}
		upgraded := make(chan string, 1)
		go func() {
			out, err := exec.Command(filepath.Join(c.Tools, "helm"), "upgrade", meshRelease, "../../charts/imagemesh",
				"--namespace", meshNamespace, "--reuse-values", "--set", "agent.logLevel=debug", "--wait", "--timeout", "5m",
				"--kubeconfig", c.Kubeconfig).CombinedOutput()
			if err != nil {
				upgraded <- fmt.Sprintf("helm upgrade: %v\n%s", err, out)
			}
			close(upgraded)
		}()
		pods := 0
		rolling := true
		for i := 0; i < rounds && rolling; i++ {
			for n := 1; n <= c.Nodes; n++ {
				m.create(t, &corev1.Pod{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("roll-%d-%d", i, n), Namespace: "default", Labels: map[string]string{"app": "roll"}},
					Spec: corev1.PodSpec{NodeName: fmt.Sprintf("node%d", n), TerminationGracePeriodSeconds: new(int64),
						Containers: []corev1.Container{{Name: "roll", Image: refs[i]}}},
				})
				pods++
			}
			select {
			case msg, ok := <-upgraded:
				if ok {
					t.Fatal(msg)
				}
				rolling = false
			case <-time.After(2 * time.Second):
			}
		}
		if rolling {
			if msg, ok := <-upgraded; ok {
				t.Fatal(msg)
			}
		}
		t.Logf("%d pods started during the rollout", pods)
		// Every node's new agent kept its token: the hosts.toml files that stayed through the rollout
		// were never stale.
		for i := 1; i <= c.Nodes; i++ {
			if m.nodeToken(t, i) != tokens[i-1] {
				t.Errorf("node%d's token changed in the rollout", i)
			}
		}
		m.waitRunning(t, "app=roll", pods)
		if out := c.Kubectl(t, "get", "events", "-n", "default", "--field-selector", "reason=Failed", "-o",
			"jsonpath={range .items[*]}{.involvedObject.name}: {.message}{\"\\n\"}{end}"); strings.Contains(out, "roll-") {
			t.Errorf("pulls failed during the upgrade:\n%s", out)
		}
		c.Kubectl(t, "delete", "pods", "-n", "default", "-l", "app=roll", "--wait=true")
	})

	t.Run("Uninstall", func(t *testing.T) {
		helm(t, c, "uninstall", meshRelease, "--namespace", meshNamespace, "--wait", "--timeout", "3m")
		for i := 1; i <= c.Nodes; i++ {
			dir := filepath.Join(c.NodeRoot(i), "etc", "containerd", "certs.d")
			waitUntil(t, time.Minute, fmt.Sprintf("node%d has no hosts.toml of the agent's", i), func() bool {
				files, _ := filepath.Glob(filepath.Join(dir, "*", "hosts.toml"))
				for _, f := range files {
					if b, _ := os.ReadFile(f); strings.HasPrefix(string(b), hostconfig.Marker) {
						return false
					}
				}
				return len(files) > 0 // the operator's files are still there
			})
		}
		// The nodes pull straight from the registry again: here, with the operator's own hosts.toml
		// for it (a plain-HTTP registry), as before the chart came.
		for i := 1; i <= c.Nodes; i++ {
			dir := filepath.Join(c.NodeRoot(i), "etc", "containerd", "certs.d", m.upstream.Host)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(fmt.Sprintf("server = %q\n", m.upstream.URL)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		ref := m.upstream.Host + "/team/after:v1"
		layers := m.push(t, ref, 4<<20)
		m.runDaemonSet(t, "after", ref)
		if got := m.upstream.BlobGets(t)[layers[0].String()]; got != c.Nodes {
			t.Errorf("after the uninstall, the registry served the layer %d times, want once to each of %d nodes", got, c.Nodes)
		}
	})
}

// installMesh installs the chart with its default values, and starts the upstream registry on the
// cluster's outside host.
func installMesh(t *testing.T, c *testenv.Cluster) *mesh {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	kube, err := client.New(cfg, client.Options{Scheme: controller.NewScheme()})
	if err != nil {
		t.Fatal(err)
	}
	m := &mesh{c: c, kube: kube}
	m.upstream = testenv.StartRegistry(t, testenv.InNetns(c.UpstreamNetns, c.UpstreamIP+":5000"))
	helm(t, c, "install", meshRelease, "../../charts/imagemesh", "--namespace", meshNamespace, "--create-namespace",
		"--wait", "--timeout", "5m")
	return m
}

func helm(t *testing.T, c *testenv.Cluster, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(c.Tools, "helm"), append(args, "--kubeconfig", c.Kubeconfig)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helm %s: %v\n%s\n%s", strings.Join(args, " "), err, out,
			c.Kubectl(t, "get", "pods", "-A", "-o", "wide"))
	}
	return string(out)
}

// push pushes an image of random layers of the given sizes onto the cluster's pause image (so that
// its pods run) and returns the layers' digests.
func (m *mesh) push(t *testing.T, ref string, sizes ...int64) []digest.Digest {
	t.Helper()
	var layers []testenv.Layer
	for _, s := range sizes {
		layers = append(layers, testenv.Layer{Size: s})
	}
	testenv.PushImageOnBase(t, m.c.Registry+"/pause:3.10", ref, layers...)
	var manifest struct {
		Layers []struct{ Digest digest.Digest } `json:"layers"`
	}
	out, err := exec.Command(testenv.Tool(t, "crane"), "manifest", "--insecure", ref).Output()
	if err != nil {
		t.Fatalf("crane manifest %s: %v", ref, err)
	}
	if err := json.Unmarshal(out, &manifest); err != nil {
		t.Fatal(err)
	}
	var ds []digest.Digest
	for _, l := range manifest.Layers[len(manifest.Layers)-len(sizes):] {
		ds = append(ds, l.Digest)
	}
	return ds
}

// imageSource creates an ImageSource (by default, one for the upstream registry, named name) and
// waits until every node applied it.
func (m *mesh) imageSource(t *testing.T, name string, is *imagemeshv1alpha1.ImageSource) *imagemeshv1alpha1.ImageSource {
	t.Helper()
	if is == nil {
		is = &imagemeshv1alpha1.ImageSource{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: imagemeshv1alpha1.ImageSourceSpec{
				Registries: []string{m.upstream.Host},
				Upstream:   &imagemeshv1alpha1.Upstream{Endpoint: m.upstream.URL},
			},
		}
	}
	m.create(t, is)
	m.waitApplied(t, is)
	return is
}

// waitApplied waits until the ImageSource is Ready on every node, as `kubectl get imagesources` shows it.
func (m *mesh) waitApplied(t *testing.T, is *imagemeshv1alpha1.ImageSource) {
	t.Helper()
	n := int32(m.c.Nodes)
	waitUntil(t, 2*time.Minute, "ImageSource "+is.Name+" Ready on every node", func() bool {
		var got imagemeshv1alpha1.ImageSource
		if err := m.kube.Get(context.Background(), client.ObjectKeyFromObject(is), &got); err != nil {
			return false
		}
		return got.Status.ObservedGeneration == got.Generation &&
			meta.IsStatusConditionTrue(got.Status.Conditions, imagemeshv1alpha1.ConditionReady) &&
			got.Status.NodesConfigured == n && got.Status.NodesSelected == n
	})
	out := m.c.Kubectl(t, "get", "imagesources", is.Name, "--no-headers")
	// NAME REGISTRIES READY NODES SELECTED AGE
	if f := strings.Fields(out); len(f) < 5 || f[2] != "True" || f[3] != fmt.Sprint(n) || f[4] != fmt.Sprint(n) {
		t.Fatalf("kubectl get imagesources %s: %q, want Ready True on %d of %d nodes", is.Name, out, n, n)
	}
}

func (m *mesh) update(t *testing.T, is *imagemeshv1alpha1.ImageSource, change func(*imagemeshv1alpha1.ImageSource)) {
	t.Helper()
	if err := m.kube.Get(context.Background(), client.ObjectKeyFromObject(is), is); err != nil {
		t.Fatal(err)
	}
	change(is)
	if err := m.kube.Update(context.Background(), is); err != nil {
		t.Fatal(err)
	}
	m.waitApplied(t, is)
}

func (m *mesh) create(t *testing.T, obj client.Object) {
	t.Helper()
	if err := m.kube.Create(context.Background(), obj); err != nil {
		t.Fatalf("create %T %s: %v", obj, obj.GetName(), err)
	}
}

// delete deletes obj and waits until it and its pods are gone.
func (m *mesh) delete(t *testing.T, obj client.Object) {
	t.Helper()
	if err := m.kube.Delete(context.Background(), obj, client.PropagationPolicy(metav1.DeletePropagationForeground)); err != nil {
		t.Fatalf("delete %T %s: %v", obj, obj.GetName(), err)
	}
	waitUntil(t, 2*time.Minute, "deleted "+obj.GetName(), func() bool {
		err := m.kube.Get(context.Background(), client.ObjectKeyFromObject(obj), obj)
		return err != nil
	})
}

// runDaemonSet runs image on every node (the image's own entrypoint) and waits until every pod is
// Running.
func (m *mesh) runDaemonSet(t *testing.T, name, image string) {
	t.Helper()
	m.create(t, daemonSet(name, image))
	m.waitRunning(t, "app="+name, m.c.Nodes)
}

// daemonSet runs image (its own entrypoint) on every node, its pods labelled app=name.
func daemonSet(name, image string) *appsv1.DaemonSet {
	labels := map[string]string{"app": name}
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					Containers:                    []corev1.Container{{Name: name, Image: image}},
					TerminationGracePeriodSeconds: new(int64),
				},
			},
		},
	}
}

// waitRunning waits until want pods that match selector in the default namespace are Running.
func (m *mesh) waitRunning(t *testing.T, selector string, want int) {
	t.Helper()
	waitUntil(t, 5*time.Minute, fmt.Sprintf("%d pods %s Running", want, selector), func() bool {
		out, err := m.c.KubectlErr("get", "pods", "-n", "default", "-l", selector, "-o", "jsonpath={.items[*].status.phase}")
		return err == nil && strings.Count(out, "Running") == want
	})
}

// agents returns each node's agent pod IP by node name.
func (m *mesh) agents(t *testing.T) map[string]string {
	t.Helper()
	ips := map[string]string{}
	for node, p := range m.agentPods(t) {
		ips[node] = p.Status.PodIP
	}
	return ips
}

// agentPods returns each node's running agent pod by node name.
func (m *mesh) agentPods(t *testing.T) map[string]*corev1.Pod {
	t.Helper()
	var pods corev1.PodList
	if err := m.kube.List(context.Background(), &pods, client.InNamespace(meshNamespace),
		client.MatchingLabels{"app.kubernetes.io/component": "node-agent"}); err != nil {
		t.Fatal(err)
	}
	byNode := map[string]*corev1.Pod{}
	for i, p := range pods.Items {
		if p.Status.PodIP != "" && p.DeletionTimestamp == nil {
			byNode[p.Spec.NodeName] = &pods.Items[i]
		}
	}
	if len(byNode) != m.c.Nodes {
		t.Fatalf("agents on %d nodes, want %d", len(byNode), m.c.Nodes)
	}
	return byNode
}

// nodeToken is the token node i's agent keeps in its data dir (the chart's agent.dataDir).
func (m *mesh) nodeToken(t *testing.T, i int) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(m.c.NodeRoot(i), "var", "lib", "imagemesh", "node-token"))
	if err != nil {
		t.Fatalf("node%d's token: %v", i, err)
	}
	return strings.TrimSpace(string(b))
}

// podNetns is the network namespace (/proc/<pid>/ns/net) of the running pod on node that matches
// selector: that of its container's process, found by the container's ID in its cgroup.
func (m *mesh) podNetns(t *testing.T, selector, node string) string {
	t.Helper()
	var id string
	waitUntil(t, time.Minute, "a running pod "+selector+" on "+node, func() bool {
		out, err := m.c.KubectlErr("get", "pods", "-n", "default", "-l", selector, "--field-selector", "spec.nodeName="+node+",status.phase=Running",
			"-o", "jsonpath={.items[0].status.containerStatuses[0].containerID}")
		id = strings.TrimPrefix(strings.TrimSpace(out), "containerd://")
		return err == nil && id != ""
	})
	procs, err := filepath.Glob("/proc/[0-9]*/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), id) {
			return filepath.Join(filepath.Dir(p), "ns", "net")
		}
	}
	t.Fatalf("no process of container %s (%s on %s)", id, selector, node)
	return ""
}

// curlIn GETs url with curl from the network namespace netns, as a process of that pod would, and
// returns the status and body.
func curlIn(t *testing.T, netns, url string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command("nsenter", append([]string{"--net=" + netns, "curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", url}, args...)...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("curl %s in %s: %v %s", url, netns, err, out)
	}
	// The body, a newline, the status (-w).
	i := bytes.LastIndexByte(out, '\n')
	if i < 0 {
		t.Fatalf("curl %s: no status in %q", url, out)
	}
	body, code := string(out[:i]), string(out[i+1:])
	n, err := strconv.Atoi(code)
	if err != nil {
		t.Fatalf("curl %s: no status in %q", url, out)
	}
	return n, body
}

// waitUntil polls cond until it holds, failing the test after timeout.
func waitUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting: %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
