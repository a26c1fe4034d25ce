package e2e

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	imagemeshv1alpha1 "github.com/imagemesh/imagemesh/api/v1alpha1"
	"github.com/imagemesh/imagemesh/internal/controller"
	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/hostconfig"
	"github.com/imagemesh/imagemesh/pkg/storage/driver/storj"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

// storjBucket starts a Storj network with a bucket "images" and writes a file holding an access
// grant to it, as a user keeps one.
func storjBucket(t testing.TB) (*testenv.Storj, string) {
	t.Helper()
	network := testenv.StartStorj(t)
	network.Bucket(t, "images")
	f := filepath.Join(t.TempDir(), "access")
	if err := os.WriteFile(f, []byte(network.Access+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return network, f
}

// startStorjGateway runs `imagemesh gateway --storage storj` into the bucket, writing the static
// layout too if asked, and returns its host:port.
func startStorjGateway(t testing.TB, accessFile string, extra ...string) string {
	addr, _ := startStorjGatewayProcess(t, accessFile, extra...)
	return addr
}

func startStorjGatewayProcess(t testing.TB, accessFile string, extra ...string) (string, *os.Process) {
	t.Helper()
	addr := testenv.FreeAddr(t)
	args := append([]string{"gateway", "--listen", addr, "--storage", "storj", "--storj-access-file", accessFile,
		"--storj-bucket", "images", "--storj-prefix", "registry"}, extra...)
	p := runDaemon(t, "gateway", imagemeshBin, args...)
	eventually(t, "gateway serving", func() bool {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == http.StatusOK
	})
	return addr, p
}

// storjAgentConfig writes an agent configuration in which example.test is read from the bucket, with
// endpoint as its registry ("" for none) and a hosts.toml for containerd in hosts.
func storjAgentConfig(t testing.TB, endpoint, accessFile, hosts string) string {
	t.Helper()
	cfg := "upstreams:\n  - host: example.test\n"
	if endpoint != "" {
		cfg += "    endpoint: " + endpoint + "\n"
	}
	cfg += "    sources:\n      - {type: Storj, bucket: images, prefix: registry, accessFile: " + accessFile + "}\n"
	cfg += "hostConfig: {dir: " + hosts + ", registries: [example.test]}\n"
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPushToStorjAndPull: crane and skopeo push images through the gateway into a Storj bucket. A node
// agent with no registry at all pulls them with containerd, through ctr (1.6) and CRI (2.x), from
// Storj alone. The static layout the gateway exported is served by a plain HTTP server, and
// containerd pulls from it with no agent in between.
func TestPushToStorjAndPull(t *testing.T) {
	testenv.RequireRoot(t)
	network, access := storjBucket(t)
	gw := startStorjGateway(t, access, "--static-layout")

	// crane: an image built and pushed straight to the gateway.
	testenv.PushImage(t, gw+"/team/app:v1", testenv.Layer{Size: 6 << 20}, testenv.Layer{Size: 64 << 10})
	// skopeo: an image copied from another registry into the gateway.
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/tool:v2", testenv.Layer{Size: 2 << 20})
	skopeo := testenv.Tool(t, "skopeo")
	if out, err := exec.Command(skopeo, "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
		"docker://"+reg.Host+"/team/tool:v2", "docker://"+gw+"/team/tool:v2").CombinedOutput(); err != nil {
		t.Fatalf("skopeo copy into the gateway: %v\n%s", err, out)
	}
	reg.Stop(t)

	// The agent knows no registry endpoint: example.test exists only in Storj.
	hosts := t.TempDir()
	agent := startAgent(t, "--config", storjAgentConfig(t, "", access, hosts))
	old := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := old.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("ctr pull from Storj: %v\n%s", err, out)
	}
	cur := testenv.StartContainerd(t, testenv.Containerd2, hosts)
	if out, err := cur.CRIPull(ctx(t), "example.test/team/tool:v2"); err != nil {
		t.Fatalf("CRI pull from Storj: %v\n%s", err, out)
	}
	if got := agent.Metric("imagemesh_content_fetched_bytes_total", `source="storj"`); got < 8<<20 {
		t.Fatalf("%v bytes fetched from Storj, want both images' layers", got)
	}

	// The static layout: a plain file server over the bucket, and containerd pulling from it
	// directly, as from linksharing.
	static := network.StartLinkshare(t, "images")
	direct := t.TempDir()
	if _, err := hostconfig.Apply(direct, []hostconfig.Registry{{
		Host: "example.test", Server: "http://" + static, Mirrors: []hostconfig.Mirror{{URL: "http://" + static}},
	}}); err != nil {
		t.Fatal(err)
	}
	plain := testenv.StartContainerd(t, testenv.Containerd16, direct)
	for _, img := range []string{"example.test/team/app:v1", "example.test/team/tool:v2"} {
		if out, err := plain.CtrPull(ctx(t), img); err != nil {
			t.Fatalf("ctr pull %s from the static layout: %v\n%s", img, err, out)
		}
	}
	if code, _, _ := get(t, "http://"+static+"/v2/"); code != http.StatusOK {
		t.Fatalf("GET /v2/ of the static layout: %d", code)
	}

	// `imagemesh storj export` writes the same layout for a repository pushed without it.
	gw2 := startStorjGateway(t, access)
	testenv.PushImage(t, gw2+"/team/later:v3", testenv.Layer{Size: 1 << 20})
	if code, _, _ := get(t, "http://"+static+"/v2/team/later/manifests/v3"); code != http.StatusNotFound {
		t.Fatalf("static layout written without --static-layout: %d", code)
	}
	out := imagemesh(t, "storj", "export", "--storj-access-file", access, "--storj-bucket", "images", "--storj-prefix", "registry", "--repository", "team/later")
	if out != "team/later:v3" {
		t.Fatalf("export printed %q", out)
	}
	if out, err := plain.CtrPull(ctx(t), "example.test/team/later:v3"); err != nil {
		t.Fatalf("ctr pull of the exported image: %v\n%s", err, out)
	}
}

// TestStorjCorruptAndDown: the agent falls through to the registry when the bucket's copy of a layer
// does not match its digest (nothing corrupt is kept or served) and when the Storj network is down.
func TestStorjCorruptAndDown(t *testing.T) {
	testenv.RequireRoot(t)
	network, access := storjBucket(t)
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 5 << 20})
	gw := startStorjGateway(t, access)
	crane := testenv.Tool(t, "crane")
	for _, img := range []string{"team/app:v1"} {
		if out, err := exec.Command(crane, "copy", "--insecure", reg.Host+"/"+img, gw+"/"+img).CombinedOutput(); err != nil {
			t.Fatalf("crane copy: %v\n%s", err, out)
		}
	}
	layer := manifestLayers(t, reg.URL+"/v2/team/app/manifests/v1")[0]

	// Rot the bucket's copy of the layer: same size, other bytes, written over the committed one.
	d, err := storj.New(context.Background(), storj.Parameters{AccessFile: access, Bucket: "images", Prefix: "registry"})
	if err != nil {
		t.Fatal(err)
	}
	good, err := d.GetContent(ctx(t), layout.BlobData(layer))
	if err != nil {
		t.Fatal(err)
	}
	bad := append([]byte{}, good...)
	bad[len(bad)/2] ^= 0xff
	if err := d.PutContent(ctx(t), layout.BlobData(layer), bad); err != nil {
		t.Fatal(err)
	}
	d.Close()

	hosts := t.TempDir()
	agent := startAgent(t, "--config", storjAgentConfig(t, reg.URL, access, hosts))
	ctrd := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := ctrd.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull with a corrupt layer in Storj: %v\n%s", err, out)
	}
	if got := agent.Metric("imagemesh_content_verification_failures_total"); got < 1 {
		t.Fatalf("verification failures: %v, want the corrupt copy caught", got)
	}
	code, body, _ := get(t, agent.URL+"/v2/team/app/blobs/"+layer.String()+"?ns=example.test")
	if code != http.StatusOK || digest.FromBytes(body) != layer {
		t.Fatalf("the agent serves %d, %d bytes that are not the layer", code, len(body))
	}
	if !strings.Contains(agent.Logs(), "storj") {
		t.Fatalf("the agent's log does not say which source failed:\n%s", agent.Logs())
	}

	// The network goes down: a fresh agent pulls from the registry.
	network.Stop()
	hosts2 := t.TempDir()
	agent2 := startAgent(t, "--config", storjAgentConfig(t, reg.URL, access, hosts2))
	ctrd2 := testenv.StartContainerd(t, testenv.Containerd16, hosts2)
	if out, err := ctrd2.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull with Storj down: %v\n%s", err, out)
	}
	if got := agent2.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`); got < 5<<20 {
		t.Fatalf("%v bytes from the registry with Storj down", got)
	}
}

// TestClusterStorjSource: an ImageSource names a Storj bucket and a Secret with the access grant. The
// controller checks the grant (a garbage one is reported, never quoted) and the bucket; the agent in
// cluster mode reads the grant from the Secret and prefetches the image from Storj alone, and
// containerd pulls it from the agent's cache.
func TestClusterStorjSource(t *testing.T) {
	testenv.RequireRoot(t)
	network, access := storjBucket(t)
	gw := startStorjGateway(t, access)
	testenv.PushImage(t, gw+"/team/app:v1", testenv.Layer{Size: 3 << 20})

	kube := testenv.StartKubernetes(t, "../../config/crd/bases")
	c, err := client.New(kube.Config, client.Options{Scheme: controller.NewScheme()})
	if err != nil {
		t.Fatal(err)
	}
	bg := context.Background()
	const ns = "imagemesh-system"
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "storj-access", Namespace: ns}, StringData: map[string]string{"access": "garbage-SECRET"}}
	for _, obj := range []client.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}},
		secret,
	} {
		if err := c.Create(bg, obj); err != nil {
			t.Fatal(err)
		}
	}
	startController(t, kube.Kubeconfig, ns)
	hosts := t.TempDir()
	a := startAgent(t, "--cluster-config", ns+"/imagemesh-mirrors", "--node-name", "node-a", "--kubeconfig", kube.Kubeconfig, "--hosts-dir", hosts)

	const image = "example.test/team/app:v1"
	is := &imagemeshv1alpha1.ImageSource{
		ObjectMeta: metav1.ObjectMeta{Name: "from-storj"},
		Spec: imagemeshv1alpha1.ImageSourceSpec{
			Registries: []string{"example.test"},
			Sources: []imagemeshv1alpha1.Source{{Type: imagemeshv1alpha1.SourceStorj, Storj: &imagemeshv1alpha1.StorjSource{
				Bucket: "images", Prefix: "registry", AccessSecretRef: corev1.LocalObjectReference{Name: "storj-access"},
			}}},
			Prefetch: []string{image},
		},
	}
	if err := c.Create(bg, is); err != nil {
		t.Fatal(err)
	}
	sourcesCondition := func() *metav1.Condition {
		var got imagemeshv1alpha1.ImageSource
		if err := c.Get(bg, client.ObjectKeyFromObject(is), &got); err != nil {
			return nil
		}
		return meta.FindStatusCondition(got.Status.Conditions, imagemeshv1alpha1.ConditionSourcesReachable)
	}
	eventually(t, "a garbage grant reported", func() bool {
		cond := sourcesCondition()
		return cond != nil && cond.Reason == controller.ReasonInvalidAccess
	})
	if cond := sourcesCondition(); strings.Contains(cond.Message, "SECRET") || !strings.Contains(cond.Message, ns+"/storj-access") {
		t.Fatalf("condition message quotes the grant or does not name the Secret: %q", cond.Message)
	}

	secret.StringData = map[string]string{"access": network.Access}
	if err := c.Update(bg, secret); err != nil {
		t.Fatal(err)
	}
	eventually(t, "image prefetched from Storj", func() bool {
		return a.Metric("imagemesh_content_fetched_bytes_total", `source="storj"`) >= 3<<20
	})
	eventually(t, "bucket and grant reachable", func() bool {
		cond := sourcesCondition()
		return cond != nil && cond.Status == metav1.ConditionTrue
	})
	t.Logf("SourcesReachable: %+v", sourcesCondition())
	ctrd := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := ctrd.CtrPull(bg, image); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	if got := a.Metric("imagemesh_content_fetched_bytes_total", `source="upstream"`); got != 0 {
		t.Fatalf("%v bytes from an upstream that does not exist", got)
	}
	if strings.Contains(a.Logs(), network.Access) {
		t.Fatal("the agent logged the access grant")
	}

	// The bucket goes away: the controller says so at its next check (forced here by a change of
	// the Secret, which every check follows; otherwise every 5 minutes).
	if _, err := network.Project(t).DeleteBucketWithObjects(bg, "images"); err != nil {
		t.Fatal(err)
	}
	if err := c.Get(bg, client.ObjectKeyFromObject(secret), secret); err != nil {
		t.Fatal(err)
	}
	secret.Labels = map[string]string{"touched": "yes"}
	if err := c.Update(bg, secret); err != nil {
		t.Fatal(err)
	}
	eventually(t, "missing bucket reported", func() bool {
		cond := sourcesCondition()
		return cond != nil && cond.Status == metav1.ConditionFalse && strings.Contains(cond.Message, "bucket does not exist")
	})
}
