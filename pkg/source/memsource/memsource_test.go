package memsource_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/memsource"
	"github.com/imagemesh/imagemesh/pkg/source/sourcetest"
)

// An OCI manifest without a mediaType field, as the spec allows: its type comes from its shape.
const manifest = `{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}`

func named(t *testing.T, s string) reference.Named {
	t.Helper()
	n, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func blob(size int) []byte {
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(1, uint64(size)))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// The source meets the contract the registry, the peers, Storj and IPFS meet.
func TestContract(t *testing.T) {
	repo := named(t, "example.test/team/app")
	src := memsource.New("")
	layer := blob(300 << 10)
	src.AddBlob(repo, layer)
	desc := src.AddManifest(repo, "", []byte(manifest))
	if err := src.Tag(repo, "v1", desc.Digest); err != nil {
		t.Fatal(err)
	}
	sourcetest.Run(t, sourcetest.Fixture{
		Source: src, Repo: repo, Tag: "v1", Manifest: []byte(manifest), MediaType: ocispec.MediaTypeImageManifest,
		Blob: layer, ResolvesTags: true,
	})
}

// What a registry does and the contract does not pin down: repositories hold their own content, a
// manifest is a blob too, a blob is not a manifest, tags name manifests.
func TestLikeARegistry(t *testing.T) {
	ctx := context.Background()
	repo, other, elsewhere := named(t, "example.test/team/app"), named(t, "example.test/team/other"), named(t, "other.test/team/app")
	src := memsource.New("mem")
	b := src.AddBlob(repo, []byte("layer bytes"))
	m := src.AddManifest(repo, ocispec.MediaTypeImageIndex, []byte(`{"schemaVersion":2,"manifests":[]}`))
	if b.Digest != digest.FromString("layer bytes") || b.Size != 11 || b.MediaType != "" {
		t.Errorf("AddBlob = %+v", b)
	}
	if m.MediaType != ocispec.MediaTypeImageIndex {
		t.Errorf("AddManifest kept media type %q, want the one given", m.MediaType)
	}

	for _, c := range []struct {
		what  string
		repo  reference.Named
		kind  source.Kind
		d     digest.Digest
		found bool
	}{
		{"blob", repo, source.KindBlob, b.Digest, true},
		{"manifest", repo, source.KindManifest, m.Digest, true},
		{"manifest as a blob", repo, source.KindBlob, m.Digest, true},
		{"blob as a manifest", repo, source.KindManifest, b.Digest, false},
		{"blob of another repository", other, source.KindBlob, b.Digest, false},
		{"blob of another registry", elsewhere, source.KindBlob, b.Digest, false},
	} {
		obj := source.Object{Repo: c.repo, Kind: c.kind, Digest: c.d}
		desc, err := src.Stat(ctx, obj)
		content, oerr := src.Open(ctx, obj, 0)
		if content != nil {
			content.Close()
		}
		if c.found && (err != nil || oerr != nil) {
			t.Errorf("%s: Stat %v, Open %v; want found", c.what, err, oerr)
		}
		if !c.found && (!errors.Is(err, source.ErrNotFound) || !errors.Is(oerr, source.ErrNotFound)) {
			t.Errorf("%s: Stat %v, Open %v; want ErrNotFound", c.what, err, oerr)
		}
		if c.found && (desc.MediaType != "") != (c.kind == source.KindManifest) {
			t.Errorf("%s: media type %q: manifests have one, blobs none", c.what, desc.MediaType)
		}
	}

	if err := src.Tag(repo, "v1", b.Digest); err == nil {
		t.Error("Tag accepted a blob")
	}
	if err := src.Tag(other, "v1", m.Digest); err == nil {
		t.Error("Tag accepted a manifest of another repository")
	}
	if err := src.Tag(repo, "-bad", m.Digest); err == nil {
		t.Error("Tag accepted an invalid tag")
	}
	if tags, err := src.ListTags(ctx, repo); err != nil || len(tags) != 0 {
		t.Errorf("ListTags of a repository without tags = %q, %v; want none", tags, err)
	}
	for _, tag := range []string{"v1", "latest", "V2"} {
		if err := src.Tag(repo, tag, m.Digest); err != nil {
			t.Fatal(err)
		}
	}
	if tags, err := src.ListTags(ctx, repo); err != nil || !slices.Equal(tags, []string{"V2", "latest", "v1"}) {
		t.Errorf("ListTags = %q, %v; want V2, latest, v1", tags, err)
	}
	if _, err := src.Resolve(ctx, other, "v1"); !errors.Is(err, source.ErrNotFound) {
		t.Errorf("Resolve of the tag in another repository = %v, want ErrNotFound", err)
	}
	if tags, err := src.ListTags(ctx, other); !errors.Is(err, source.ErrNotFound) {
		t.Errorf("ListTags of a repository that holds nothing = %q, %v; want ErrNotFound", tags, err)
	}
	src.Untag(repo, "v1")
	if _, err := src.Resolve(ctx, repo, "v1"); !errors.Is(err, source.ErrNotFound) {
		t.Errorf("Resolve after Untag = %v, want ErrNotFound", err)
	}
	_, err := src.Stat(ctx, source.Object{Repo: repo, Kind: source.KindBlob, Digest: digest.FromString("nothing")})
	var serr *source.Error
	if !errors.As(err, &serr) || serr.Source != "mem" || serr.Op != "stat" || !strings.Contains(err.Error(), "example.test/team/app@sha256:") {
		t.Errorf("error %v does not name the source, the operation and the object", err)
	}
}

// Bytes go in and come out as copies; offsets are checked; a context that ends stops reads.
func TestBytesAndOffsets(t *testing.T) {
	ctx := context.Background()
	repo := named(t, "example.test/team/app")
	src := memsource.New("")
	data := []byte("0123456789")
	desc := src.AddBlob(repo, data)
	data[0] = 'X' // the caller's slice is the caller's
	obj := source.Object{Repo: repo, Kind: source.KindBlob, Digest: desc.Digest}

	for _, off := range []int64{0, 4, 10} {
		c, err := src.Open(ctx, obj, off)
		if err != nil {
			t.Fatalf("Open at %d: %v", off, err)
		}
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || !bytes.Equal(got, []byte("0123456789")[off:]) || c.Descriptor.Size != 10 || c.Source != "memory" {
			t.Errorf("Open at %d: %q %v, %+v from %q", off, got, err, c.Descriptor, c.Source)
		}
	}
	for _, off := range []int64{-1, 11} {
		if _, err := src.Open(ctx, obj, off); err == nil || errors.Is(err, source.ErrNotFound) {
			t.Errorf("Open at %d = %v, want an error other than ErrNotFound", off, err)
		}
	}

	cctx, cancel := context.WithCancel(ctx)
	c, err := src.Open(cctx, obj, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var one [1]byte
	if _, err := c.Read(one[:]); err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := c.Read(one[:]); !errors.Is(err, context.Canceled) {
		t.Errorf("read after cancel = %v, want context.Canceled", err)
	}
	if _, err := src.Resolve(cctx, repo, "v1"); !errors.Is(err, context.Canceled) || errors.Is(err, source.ErrNotFound) {
		t.Errorf("Resolve with a canceled context = %v, want context.Canceled", err)
	}
}
