package source_test

import (
	"context"
	"errors"
	"io"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// TestChainListTags: a chain lists tags from the links trusted with tags, in the order of Resolve,
// and from no other link; two real registries hold different tags of one repository.
func TestChainListTags(t *testing.T) {
	const host = "example.test"
	repo, err := reference.ParseNormalizedNamed(host + "/team/app")
	if err != nil {
		t.Fatal(err)
	}
	registry := func(tags ...string) (*testenv.Registry, *source.Registry) {
		reg := testenv.StartRegistry(t)
		testenv.PushImage(t, reg.Host+"/team/app:"+tags[0], testenv.Layer{Size: 1000})
		tagImage(t, reg.Host+"/team/app:"+tags[0], tags[1:]...)
		u, _ := url.Parse(reg.URL)
		src, err := source.NewRegistry(source.RegistryOptions{Endpoints: map[string]source.Endpoint{host: {URL: u}}, Keychain: noCredentials})
		if err != nil {
			t.Fatal(err)
		}
		return reg, src
	}
	_, other := registry("other-1", "other-2")
	trustedReg, trusted := registry("v1", "v2")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	list := func(c *source.Chain) ([]string, error) {
		tags, err := c.ListTags(ctx, repo)
		slices.Sort(tags)
		return tags, err
	}

	untrusted := source.NewChain(source.Link{Source: other}, source.Link{Source: trusted, ResolveTags: true})
	fallback := source.NewChain(source.Link{Source: other, TagFallback: true}, source.Link{Source: trusted, ResolveTags: true})
	if tags, err := list(untrusted); err != nil || !slices.Equal(tags, []string{"v1", "v2"}) {
		t.Fatalf("ListTags = %q, %v; want the trusted link's v1, v2", tags, err)
	}
	if tags, err := list(fallback); err != nil || !slices.Equal(tags, []string{"v1", "v2"}) {
		t.Fatalf("ListTags with a fallback = %q, %v; want the trusted link's v1, v2 first", tags, err)
	}
	// Nothing that can list: not found.
	if tags, err := list(source.NewChain(source.Link{Source: source.NewByRegistry(), ResolveTags: true})); !errors.Is(err, source.ErrNotFound) {
		t.Fatalf("ListTags from a chain that cannot list = %q, %v; want ErrNotFound", tags, err)
	}

	trustedReg.Stop(t)
	if tags, err := list(fallback); err != nil || !slices.Equal(tags, []string{"other-1", "other-2"}) {
		t.Fatalf("ListTags with the trusted registry down = %q, %v; want the fallback's tags", tags, err)
	}
	// A link not trusted with tags is never asked, however the others fare.
	if tags, err := list(untrusted); !errors.Is(err, source.ErrUnavailable) || errors.Is(err, source.ErrNotFound) {
		t.Fatalf("ListTags with the trusted registry down and no fallback = %q, %v; want ErrUnavailable", tags, err)
	}
}

// liar claims a size for every object it is asked for and records whether it was told off.
type liar struct {
	size     int64
	rejected error
}

func (l *liar) Name() string { return "liar" }
func (l *liar) Resolve(context.Context, reference.Named, string) (ocispec.Descriptor, error) {
	return ocispec.Descriptor{}, source.ErrNotFound
}
func (l *liar) Stat(_ context.Context, obj source.Object) (ocispec.Descriptor, error) {
	return ocispec.Descriptor{Digest: obj.Digest, Size: l.size}, nil
}
func (l *liar) Open(_ context.Context, obj source.Object, _ int64) (*source.Content, error) {
	return &source.Content{ReadCloser: io.NopCloser(strings.NewReader("")), Descriptor: ocispec.Descriptor{Digest: obj.Digest, Size: l.size},
		Untrusted: true, Reject: func(err error) { l.rejected = err }}, nil
}

// TestChainPassesOverAWrongSize: with a size from a trusted descriptor, a chain passes over a source
// that claims another one, tells it why, and opens the object on the next link, a real registry.
func TestChainPassesOverAWrongSize(t *testing.T) {
	const host = "example.test"
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 4096})
	u, _ := url.Parse(reg.URL)
	registry, err := source.NewRegistry(source.RegistryOptions{Endpoints: map[string]source.Endpoint{host: {URL: u}}, Keychain: noCredentials})
	if err != nil {
		t.Fatal(err)
	}
	repo, _ := reference.ParseNormalizedNamed(host + "/team/app")
	ctx := context.Background()
	desc, err := registry.Resolve(ctx, repo, "v1")
	if err != nil {
		t.Fatal(err)
	}
	obj := source.Object{Repo: repo, Kind: source.KindManifest, Digest: desc.Digest, Size: desc.Size}
	bad := &liar{size: 1 << 40}
	chain := source.NewChain(source.Link{Source: bad}, source.Link{Source: registry, ResolveTags: true})
	c, err := chain.Open(ctx, obj, 0)
	if err != nil {
		t.Fatalf("Open past a source that lies about the size: %v", err)
	}
	c.Close()
	if c.Source != "upstream" || c.Descriptor.Size != desc.Size {
		t.Errorf("opened on %s with size %d, want upstream with %d", c.Source, c.Descriptor.Size, desc.Size)
	}
	if !errors.Is(bad.rejected, source.ErrWrongSize) {
		t.Errorf("the lying source was told %v, want ErrWrongSize", bad.rejected)
	}
	if got, err := chain.Stat(ctx, obj); err != nil || got.Size != desc.Size {
		t.Errorf("Stat = %d, %v; want %d from the registry", got.Size, err, desc.Size)
	}
	// Without a trusted size, the first answer stands: there is nothing to check it against.
	obj.Size = 0
	if c, err := chain.Open(ctx, obj, 0); err != nil || c.Descriptor.Size != 1<<40 {
		t.Errorf("Open without a trusted size: %v; want the first source's answer", err)
	}
}
