package source_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/sourcetest"
)

// fixture pushes an image to reg (with the credentials in DOCKER_CONFIG, if any) and reads back,
// straight from the registry, what the source must then serve.
func fixture(t *testing.T, reg *testenv.Registry, user, password string) sourcetest.Fixture {
	t.Helper()
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 300 << 10})
	repo, err := reference.ParseNormalizedNamed(reg.Host + "/team/app")
	if err != nil {
		t.Fatal(err)
	}
	// Read it back through go-containerregistry's remote client, a code path independent of ours.
	ref, err := name.ParseReference(reg.Host+"/team/app:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	auth := authn.Anonymous
	if user != "" {
		auth = &authn.Basic{Username: user, Password: password}
	}
	opts := []remote.Option{remote.WithAuth(auth), remote.WithTransport(reg.Transport(t))}
	desc, err := remote.Get(ref, opts...)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(desc.Manifest, &m); err != nil || len(m.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	layer, err := remote.Layer(ref.Context().Digest(m.Layers[0].Digest.String()), opts...)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := layer.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	blob, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return sourcetest.Fixture{
		Repo: repo, Tag: "v1", Manifest: desc.Manifest, MediaType: string(desc.MediaType),
		Blob: blob, ResolvesTags: true,
	}
}

func newSource(t *testing.T, reg *testenv.Registry, ep source.Endpoint, kc authn.Keychain) *source.Registry {
	t.Helper()
	ep.URL, _ = url.Parse(reg.URL)
	src, err := source.NewRegistry(source.RegistryOptions{Endpoints: map[string]source.Endpoint{reg.Host: ep}, Keychain: kc})
	if err != nil {
		t.Fatal(err)
	}
	return src
}

// noCredentials is a keychain that knows nobody, so that only the endpoint's own credentials count.
var noCredentials = authn.NewMultiKeychain()

func TestRegistryContract(t *testing.T) {
	reg := testenv.StartRegistry(t)
	f := fixture(t, reg, "", "")
	f.Source = newSource(t, reg, source.Endpoint{}, noCredentials)
	sourcetest.Run(t, f)
}

func TestRegistryTokenAuth(t *testing.T) {
	const user, password = "puller", "s3cret-Pa55word"
	var tokens *testenv.TokenServer
	reg := testenv.StartRegistry(t, testenv.WithTokenAuth(user, password, &tokens))
	t.Setenv("DOCKER_CONFIG", reg.DockerConfig(t, user, password)) // for crane's push
	f := fixture(t, reg, user, password)

	t.Run("credentials from the config", func(t *testing.T) {
		before := tokens.Issued.Load()
		f := f
		f.Source = newSource(t, reg, source.Endpoint{Username: user, Password: password}, noCredentials)
		sourcetest.Run(t, f)
		if tokens.Issued.Load() == before {
			t.Fatal("no token was issued: the source did not go through the token flow")
		}
	})
	t.Run("credentials from docker config.json", func(t *testing.T) {
		f := f
		f.Source = newSource(t, reg, source.Endpoint{}, nil) // nil: the default keychain, DOCKER_CONFIG
		sourcetest.Run(t, f)
	})
	t.Run("wrong or missing credentials", func(t *testing.T) {
		for name, ep := range map[string]source.Endpoint{
			"wrong password": {Username: user, Password: "wrong-password"},
			"none":           {},
		} {
			src := newSource(t, reg, ep, noCredentials)
			_, err := src.Resolve(context.Background(), f.Repo, f.Tag)
			if err == nil || errors.Is(err, source.ErrNotFound) || errors.Is(err, source.ErrUnavailable) {
				t.Errorf("%s: Resolve = %v; want an authentication error, neither not-found nor unavailable", name, err)
			}
			if err != nil && (strings.Contains(err.Error(), password) || strings.Contains(err.Error(), "wrong-password")) {
				t.Errorf("%s: error names the password: %v", name, err)
			}
		}
	})
}

func TestRegistryBasicAuth(t *testing.T) {
	const user, password = "puller", "basic-Pa55"
	reg := testenv.StartRegistry(t, testenv.WithHtpasswd(user, password))
	t.Setenv("DOCKER_CONFIG", reg.DockerConfig(t, user, password))
	f := fixture(t, reg, user, password)
	f.Source = newSource(t, reg, source.Endpoint{Username: user, Password: password}, noCredentials)
	sourcetest.Run(t, f)
	src := newSource(t, reg, source.Endpoint{Username: user, Password: "nope"}, noCredentials)
	if _, err := src.Resolve(context.Background(), f.Repo, f.Tag); err == nil || errors.Is(err, source.ErrNotFound) {
		t.Fatalf("Resolve with a wrong password = %v, want an error", err)
	}
}

func TestRegistryUnreachableIsUnavailable(t *testing.T) {
	reg := testenv.StartRegistry(t)
	f := fixture(t, reg, "", "")
	src := newSource(t, reg, source.Endpoint{}, noCredentials)
	reg.Stop(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := src.Resolve(ctx, f.Repo, f.Tag); !errors.Is(err, source.ErrUnavailable) {
		t.Fatalf("Resolve with the registry down = %v, want ErrUnavailable (so that a cached answer may serve)", err)
	}
}

func TestRegistryTLS(t *testing.T) {
	var ca string
	reg := testenv.StartRegistry(t, testenv.WithTLS(&ca))
	f := fixture(t, reg, "", "")

	t.Run("CA from caFile", func(t *testing.T) {
		f := f
		f.Source = newSource(t, reg, source.Endpoint{CAFile: ca}, noCredentials)
		sourcetest.Run(t, f)
	})
	t.Run("unknown CA is refused", func(t *testing.T) {
		src := newSource(t, reg, source.Endpoint{}, noCredentials)
		_, err := src.Resolve(context.Background(), f.Repo, f.Tag)
		if err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("Resolve against an unknown CA = %v, want a certificate error", err)
		}
	})
}

// tagImage gives the image at ref (a registry on 127.0.0.1) more tags, with the real crane.
func tagImage(t *testing.T, ref string, tags ...string) {
	t.Helper()
	for _, tag := range tags {
		if out, err := exec.Command(testenv.Tool(t, "crane"), "tag", "--insecure", ref, tag).CombinedOutput(); err != nil {
			t.Fatalf("crane tag %s %s: %v\n%s", ref, tag, err, out)
		}
	}
}

// TestRegistryListTags lists tags page by page, as the registry hands them out when asked for two at
// a time, and refuses a Link that leads to another host.
func TestRegistryListTags(t *testing.T) {
	reg := testenv.StartRegistry(t)
	f := fixture(t, reg, "", "")
	want := []string{"2.0", "latest", "v1", "v1.1", "v2"}
	tagImage(t, reg.Host+"/team/app:v1", "v2", "v1.1", "latest", "2.0")
	u, _ := url.Parse(reg.URL)
	metrics := prometheus.NewRegistry()
	src, err := source.NewRegistry(source.RegistryOptions{
		Endpoints: map[string]source.Endpoint{reg.Host: {URL: u}}, Keychain: noCredentials,
		TagPageSize: 2, Registerer: metrics,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	tags, err := src.ListTags(ctx, f.Repo)
	slices.Sort(tags)
	if err != nil || !slices.Equal(tags, want) {
		t.Fatalf("ListTags = %q, %v; want %q", tags, err, want)
	}
	if pages := histogramCount(t, metrics, "imagemesh_upstream_request_duration_seconds", "list"); pages != 3 {
		t.Fatalf("%d list requests for 5 tags 2 at a time, want 3 pages", pages)
	}

	// A Link to another host would carry the endpoint's credentials there: refused.
	away := httptest.NewServer(httputil.NewSingleHostReverseProxy(u))
	defer away.Close()
	proxy := httputil.NewSingleHostReverseProxy(u)
	proxy.ModifyResponse = func(resp *http.Response) error {
		if l := resp.Header.Get("Link"); l != "" {
			resp.Header.Set("Link", strings.Replace(l, "</v2/", "<"+away.URL+"/v2/", 1))
		}
		return nil
	}
	front := httptest.NewServer(proxy)
	defer front.Close()
	fu, _ := url.Parse(front.URL)
	redirected, err := source.NewRegistry(source.RegistryOptions{
		Endpoints: map[string]source.Endpoint{reg.Host: {URL: fu}}, Keychain: noCredentials, TagPageSize: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	if tags, err := redirected.ListTags(ctx, f.Repo); err == nil || !strings.Contains(err.Error(), "leads away") {
		t.Fatalf("ListTags with a Link to %s = %q, %v; want it refused", away.URL, tags, err)
	}

	reg.Stop(t)
	if tags, err := src.ListTags(ctx, f.Repo); !errors.Is(err, source.ErrUnavailable) {
		t.Fatalf("ListTags with the registry down = %q, %v; want ErrUnavailable", tags, err)
	}
}

// histogramCount returns the number of observations of a histogram whose labels include value.
func histogramCount(t *testing.T, g prometheus.Gatherer, name, value string) uint64 {
	t.Helper()
	families, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetValue() == value {
					n += m.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	return n
}
