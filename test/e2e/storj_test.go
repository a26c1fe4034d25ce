package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
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
	"github.com/imagemesh/imagemesh/internal/testenv/kubeenv"
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
// Storj alone. The static layout the gateway exported is served by Storj's linksharing, and
// containerd (1.6 and 2.x) pulls from it with no agent in between.
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

	// The static layout, served by Storj's own linksharing with a grant that reads v2/ and nothing
	// else, and containerd pulling from it directly: no agent, no registry. containerd appends
	// /v2/<repo>/... to the mirror's path, so the mirror is the bucket's raw URL.
	links := network.StartLinksharing(t)
	grant := network.ShareGrant(t, "images", "v2/")
	static := links.Raw(grant, "images")
	direct := t.TempDir()
	if _, err := hostconfig.Apply(direct, []hostconfig.Registry{{
		Host: "example.test", Server: static, Mirrors: []hostconfig.Mirror{{URL: static}},
	}}); err != nil {
		t.Fatal(err)
	}
	plain := testenv.StartContainerd(t, testenv.Containerd16, direct)
	for _, img := range []string{"example.test/team/app:v1", "example.test/team/tool:v2"} {
		if out, err := plain.CtrPull(ctx(t), img); err != nil {
			t.Fatalf("ctr pull %s through linksharing: %v\n%s", img, err, out)
		}
	}
	cur2 := testenv.StartContainerd(t, testenv.Containerd2, direct)
	if out, err := cur2.CRIPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("CRI pull through linksharing: %v\n%s", err, out)
	}
	checkLinksharing(t, static)
	// The grant reads the static layout only: the registry layout beside it stays out of reach.
	if code, _, _ := get(t, links.Raw(grant, "images")+"/registry/docker/registry/v2/repositories/team/app/_manifests/tags/v1/current/link"); code != http.StatusForbidden {
		t.Fatalf("the registry layout through linksharing with the v2/ grant: %d, want 403", code)
	}

	// `imagemesh storj export` writes the same layout for a repository pushed without it.
	gw2 := startStorjGateway(t, access)
	testenv.PushImage(t, gw2+"/team/later:v3", testenv.Layer{Size: 1 << 20})
	if code, _, _ := get(t, static+"/v2/team/later/manifests/v3"); code != http.StatusNotFound {
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

// checkLinksharing checks, under base (a registry's /v2/ root as linksharing serves it), what a
// registry client relies on: the manifest's media type as Content-Type, on GET and HEAD; blobs whole
// and in ranges (a pull that broke off resumes with Range); 404 for what is not there; and /v2/.
func checkLinksharing(t *testing.T, base string) {
	t.Helper()
	// reply is what the client got: the body is read whole and closed.
	type reply struct {
		code   int
		header http.Header
		length int64
		body   []byte
	}
	do := func(method, url string, header ...string) reply {
		t.Helper()
		req, err := http.NewRequest(method, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }() // read whole below
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return reply{resp.StatusCode, resp.Header, resp.ContentLength, b}
	}
	man := do(http.MethodGet, base+"/v2/team/app/manifests/v1")
	var m struct {
		MediaType string `json:"mediaType"`
		Layers    []struct {
			Digest digest.Digest `json:"digest"`
			Size   int64         `json:"size"`
		} `json:"layers"`
	}
	if man.code != http.StatusOK {
		t.Fatalf("GET manifest through linksharing: %d %s", man.code, man.body)
	}
	if err := json.Unmarshal(man.body, &m); err != nil || m.MediaType == "" || len(m.Layers) == 0 {
		t.Fatalf("manifest through linksharing: %v: %s", err, man.body)
	}
	if ct := man.header.Get("Content-Type"); ct != m.MediaType {
		t.Fatalf("manifest served as %q, want its media type %q", ct, m.MediaType)
	}
	byDigest := do(http.MethodGet, base+"/v2/team/app/manifests/"+digest.FromBytes(man.body).String())
	if byDigest.code != http.StatusOK || !bytes.Equal(man.body, byDigest.body) {
		t.Fatalf("manifest by digest: %d, same bytes as by tag: %v", byDigest.code, bytes.Equal(man.body, byDigest.body))
	}
	head := do(http.MethodHead, base+"/v2/team/app/manifests/v1")
	if head.code != http.StatusOK || head.header.Get("Content-Type") != m.MediaType || head.length != int64(len(man.body)) {
		t.Fatalf("HEAD manifest: %d, %q, %d bytes", head.code, head.header.Get("Content-Type"), head.length)
	}

	layer := m.Layers[0]
	full := do(http.MethodGet, base+"/v2/team/app/blobs/"+layer.Digest.String())
	if full.code != http.StatusOK || int64(len(full.body)) != layer.Size || digest.FromBytes(full.body) != layer.Digest {
		t.Fatalf("GET layer: %d, %d bytes of %d, digest matches: %v", full.code, len(full.body), layer.Size, digest.FromBytes(full.body) == layer.Digest)
	}
	from := layer.Size / 2
	part := do(http.MethodGet, base+"/v2/team/app/blobs/"+layer.Digest.String(), "Range", fmt.Sprintf("bytes=%d-", from))
	if part.code != http.StatusPartialContent || !bytes.Equal(part.body, full.body[from:]) {
		t.Fatalf("GET layer from byte %d: %d, %d bytes, the right ones: %v", from, part.code, len(part.body), bytes.Equal(part.body, full.body[from:]))
	}

	if missing := do(http.MethodGet, base+"/v2/team/app/manifests/nope"); missing.code != http.StatusNotFound {
		t.Fatalf("GET of a tag that is not there: %d", missing.code)
	}
	if v2 := do(http.MethodGet, base+"/v2/"); v2.code != http.StatusOK {
		t.Fatalf("GET /v2/ through linksharing: %d %s", v2.code, v2.body)
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
	// And the manifest's: it must fall through to the registry in the same request.
	out, err := exec.Command(crane, "digest", "--insecure", reg.Host+"/team/app:v1").Output()
	if err != nil {
		t.Fatal(err)
	}
	manifest := digest.Digest(strings.TrimSpace(string(out)))
	goodManifest, err := d.GetContent(ctx(t), layout.BlobData(manifest))
	if err != nil {
		t.Fatal(err)
	}
	badManifest := append([]byte{}, goodManifest...)
	badManifest[len(badManifest)/2] ^= 0x01
	if err := d.PutContent(ctx(t), layout.BlobData(manifest), badManifest); err != nil {
		t.Fatal(err)
	}
	d.Close()

	hosts := t.TempDir()
	agent := startAgent(t, "--config", storjAgentConfig(t, reg.URL, access, hosts))
	ctrd := testenv.StartContainerd(t, testenv.Containerd16, hosts)
	if out, err := ctrd.CtrPull(ctx(t), "example.test/team/app:v1"); err != nil {
		t.Fatalf("pull with a corrupt layer in Storj: %v\n%s", err, out)
	}
	if got := agent.Metric("imagemesh_content_verification_failures_total"); got < 2 {
		t.Fatalf("verification failures: %v, want both corrupt copies caught", got)
	}
	code, body, _ := agent.Get(agent.URL + "/v2/team/app/manifests/" + manifest.String() + "?ns=example.test")
	if code != http.StatusOK || digest.FromBytes(body) != manifest {
		t.Fatalf("the agent serves %d, %d bytes that are not the manifest", code, len(body))
	}
	code, body, _ = agent.Get(agent.URL + "/v2/team/app/blobs/" + layer.String() + "?ns=example.test")
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

	kube := kubeenv.Start(t, "../../config/crd/bases")
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
