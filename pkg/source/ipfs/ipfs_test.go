package ipfs_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/ipfs/go-cid"
	mh "github.com/multiformats/go-multihash"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/ipfs"
	"github.com/imagemesh/imagemesh/pkg/source/sourcetest"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

const dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"

func fetch(t *testing.T, url, accept string) []byte {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	return b
}

// published pushes an image to a real registry and adds the registry's storage, as it is on disk, to
// kubo A: the layout a publisher puts in IPFS. It returns the root and the image's manifest and layer.
func published(t *testing.T, a *testenv.Kubo) (root string, manifest, layer []byte) {
	t.Helper()
	root, _, manifest, layer = publishedFrom(t, a)
	return root, manifest, layer
}

// publishedFrom is published, and returns the registry's storage directory too.
func publishedFrom(t *testing.T, a *testenv.Kubo) (root, dir string, manifest, layer []byte) {
	t.Helper()
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 3 << 20})
	manifest = fetch(t, reg.URL+"/v2/team/app/manifests/v1", dockerManifest)
	var m struct {
		Layers []struct{ Digest digest.Digest }
	}
	if err := jsonUnmarshal(manifest, &m); err != nil || len(m.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	layer = fetch(t, reg.URL+"/v2/team/app/blobs/"+m.Layers[0].Digest.String(), "")
	out := a.Run(t, "add", "-r", "-Q", "--cid-version=1", "--raw-leaves", reg.Dir)
	return "/ipfs/" + strings.TrimSpace(out), reg.Dir, manifest, layer
}

// The layout published on kubo A, read through kubo B, which is connected to A only: every block
// comes over bitswap.
func TestContract(t *testing.T) {
	a, b := testenv.StartKubo(t), testenv.StartKubo(t)
	b.Connect(t, a)
	root, manifest, layer := published(t, a)
	src, err := ipfs.New(ipfs.Options{API: b.API, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	repo, _ := reference.ParseNamed("example.test/team/app")
	sourcetest.Run(t, sourcetest.Fixture{
		Source: src, Repo: repo, Tag: "v1", Manifest: manifest, MediaType: dockerManifest, Blob: layer, ResolvesTags: true,
	})
}

// A root named by IPNS on kubo A resolves, on kubo B, to the published layout.
func TestIPNSRoot(t *testing.T) {
	a, b := testenv.StartKubo(t), testenv.StartKubo(t)
	b.Connect(t, a)
	root, manifest, _ := published(t, a)
	out := a.Run(t, "name", "publish", "-Q", root)
	src, err := ipfs.New(ipfs.Options{API: b.API, Root: "/ipns/" + strings.TrimSpace(out)})
	if err != nil {
		t.Fatal(err)
	}
	repo, _ := reference.ParseNamed("example.test/team/app")
	desc, err := src.Resolve(context.Background(), repo, "v1")
	if err != nil || desc.Digest != digest.FromBytes(manifest) || desc.MediaType != dockerManifest {
		t.Fatalf("Resolve through IPNS: %v %v", desc, err)
	}
}

// Every failure is an error that says what failed, in bounded time, and that lets the chain go on to
// the next source: unavailable (kubo down, a root nobody serves) is not "not found".
func TestBadInput(t *testing.T) {
	a := testenv.StartKubo(t)
	repo, _ := reference.ParseNamed("example.test/team/app")
	obj := source.Object{Repo: repo, Kind: source.KindBlob, Digest: digest.FromString("x")}

	for _, bad := range []string{"", "ipfs/bafy", "/ipfs/not-a-cid", "/ipns/", "a domain with spaces"} {
		if _, err := ipfs.New(ipfs.Options{API: a.API, Root: bad}); err == nil {
			t.Errorf("root %q accepted", bad)
		}
	}

	down, _ := ipfs.New(ipfs.Options{API: "http://127.0.0.1:1", Root: "/ipfs/bafkqaaa"})
	if _, err := down.Stat(context.Background(), obj); !errors.Is(err, source.ErrUnavailable) {
		t.Errorf("kubo down: %v, want ErrUnavailable", err)
	}

	// A root whose blocks nobody has: the request gives up after Timeout.
	m, _ := mh.Sum([]byte(time.Now().String()), mh.SHA2_256, -1)
	missing, _ := ipfs.New(ipfs.Options{API: a.API, Root: "/ipfs/" + cid.NewCidV1(cid.DagProtobuf, m).String(), Timeout: 2 * time.Second})
	start := time.Now()
	_, err := missing.Stat(context.Background(), obj)
	if err == nil || errors.Is(err, source.ErrNotFound) || time.Since(start) > 10*time.Second {
		t.Errorf("root nobody serves: %v after %s, want a timeout error within the bound", err, time.Since(start))
	}

	// An IPNS name that nobody published.
	unknown, _ := ipfs.New(ipfs.Options{API: a.API, Root: "/ipns/k51qzi5uqu5dlvj2baxnqndepeb86cbk3ng7n3i46uzyxzyqj2xjonzllnv0v8", Timeout: 2 * time.Second})
	if _, err := unknown.Resolve(context.Background(), repo, "v1"); err == nil || !strings.Contains(err.Error(), "resolve") {
		t.Errorf("unpublished IPNS name: %v", err)
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// A root named by a DNSLink domain: kubo resolves _dnslink.<domain> (here through a DoH server of the
// test's own) to the published root.
func TestDNSLinkRoot(t *testing.T) {
	pub := testenv.StartKubo(t)
	root, manifest, _ := published(t, pub)
	doh := testenv.StartDoH(t, map[string][]string{"_dnslink.images.example.test.": {"dnslink=" + root}})
	a := testenv.StartKubo(t, testenv.WithDNSResolver("example.test.", doh))
	a.Connect(t, pub)
	for _, name := range []string{"images.example.test", "/ipns/images.example.test"} {
		src, err := ipfs.New(ipfs.Options{API: a.API, Root: name})
		if err != nil {
			t.Fatal(err)
		}
		repo, _ := reference.ParseNamed("example.test/team/app")
		desc, err := src.Resolve(context.Background(), repo, "v1")
		if err != nil || desc.Digest != digest.FromBytes(manifest) {
			t.Fatalf("Resolve through DNSLink %s: %v %v", name, desc, err)
		}
	}
	missing, _ := ipfs.New(ipfs.Options{API: a.API, Root: "nothing.example.test", Timeout: 5 * time.Second})
	if _, err := missing.Resolve(context.Background(), reference.TrimNamed(mustNamed(t, "example.test/team/app")), "v1"); err == nil {
		t.Fatal("a domain without a DNSLink record resolved")
	}
}

func mustNamed(t *testing.T, s string) reference.Named {
	n, err := reference.ParseNamed(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A root whose copy of a layer is corrupt (a broken publisher): its bytes are untrusted, so the content
// store verifies the whole layer before any client gets it, rejects the copy, and fetches the layer
// again from the next source, a good root. The corrupt root is not asked for that layer again, while it
// still answers for everything else.
func TestRejectMemory(t *testing.T) {
	a := testenv.StartKubo(t)
	goodRoot, dir, manifest, layer := publishedFrom(t, a)
	layerD := digest.FromBytes(layer)
	// The same layout with the layer's bytes changed, its size kept.
	data := filepath.Join(dir, filepath.FromSlash(layout.BlobData(layerD)))
	corrupted := append([]byte(nil), layer...)
	for i := 0; i < len(corrupted); i += 4096 {
		corrupted[i] ^= 0xff
	}
	if err := os.WriteFile(data, corrupted, 0o644); err != nil {
		t.Fatal(err)
	}
	badRoot := "/ipfs/" + strings.TrimSpace(a.Run(t, "add", "-r", "-Q", "--cid-version=1", "--raw-leaves", dir))

	bad, err := ipfs.New(ipfs.Options{API: a.API, Root: badRoot})
	if err != nil {
		t.Fatal(err)
	}
	good, err := ipfs.New(ipfs.Options{API: a.API, Root: goodRoot})
	if err != nil {
		t.Fatal(err)
	}
	chain := source.NewChain(source.Link{Source: bad}, source.Link{Source: good})
	store, err := content.Open(t.TempDir(), content.Options{Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })

	repo := mustNamed(t, "example.test/team/app")
	obj := source.Object{Repo: repo, Kind: source.KindBlob, Digest: layerD}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := store.Fetch(ctx, layerD, func(ctx context.Context, offset int64) (*content.Fetched, error) {
		c, err := chain.Open(ctx, obj, offset)
		if err != nil {
			return nil, err
		}
		return &content.Fetched{Body: c, Size: c.Descriptor.Size, Source: c.Source, Untrusted: c.Untrusted, Reject: c.Reject}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	_, err = r.WriteTo(&got)
	r.Close()
	if err != nil || !bytes.Equal(got.Bytes(), layer) {
		t.Fatalf("fetch through a corrupt root, then a good one: %d bytes, %v; want the layer's %d", got.Len(), err, len(layer))
	}

	_, err = bad.Open(ctx, obj, 0)
	if !errors.Is(err, source.ErrNotFound) || !strings.Contains(err.Error(), "failed verification") || !strings.Contains(err.Error(), badRoot) {
		t.Fatalf("the corrupt root is asked for the layer again: %v", err)
	}
	t.Logf("corrupt root, asked again: %v", err)
	c, err := bad.Open(ctx, source.Object{Repo: repo, Kind: source.KindManifest, Digest: digest.FromBytes(manifest)}, 0)
	if err != nil {
		t.Fatalf("the corrupt root no longer answers for the manifest it holds intact: %v", err)
	}
	c.Close()
	c, err = good.Open(ctx, obj, 0)
	if err != nil {
		t.Fatalf("the good root was rejected too: %v", err)
	}
	c.Close()
}
