package source_test

import (
	"context"
	"errors"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/distribution/reference"

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
