package source_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

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
	var auth authn.Authenticator = authn.Anonymous
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
