package mirror_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// TestNodeToken: with a node token, the pull API answers only requests that carry it, whatever
// they ask for, and refuses the others with the OCI error body of a 401, which names no token.
func TestNodeToken(t *testing.T) {
	e := setup(t, 4096) // a mirror without a token, and the registry behind it
	const token = "8d3f3c0d2b5e4f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c"
	proxyURL, _ := url.Parse(e.proxy.URL)
	reg := prometheus.NewRegistry()
	up, err := source.NewRegistry(source.RegistryOptions{Endpoints: map[string]source.Endpoint{ns: {URL: proxyURL}}, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	m, err := mirror.New(mirror.Options{Store: e.store, Source: up, NodeToken: token, TagDir: t.TempDir(), Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(m)
	t.Cleanup(srv.Close)

	manifest := "/v2/" + e.repo + "/manifests/v1?ns=" + ns
	blob := "/v2/" + e.repo + "/blobs/" + e.layer.Digest.String() + "?ns=" + ns
	do := func(method, path string, tokens ...string) (int, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		req.Header.Set("Accept", allManifestTypes)
		for _, tok := range tokens {
			req.Header.Add(mirror.NodeTokenHeader, tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}

	for name, tokens := range map[string][]string{
		"missing":        nil,
		"empty":          {""},
		"wrong":          {strings.Repeat("0", len(token))},
		"one char off":   {token[:len(token)-1] + "d"},
		"prefix":         {token[:32]},
		"token and more": {token + "0"},
		"other case":     {strings.ToUpper(token)},
	} {
		for _, path := range []string{manifest, blob, "/v2/", "/v2", "/v2/" + e.repo + "/tags/list?ns=" + ns} {
			code, body := do(http.MethodGet, path, tokens...)
			var errs struct {
				Errors []struct{ Code, Message string } `json:"errors"`
			}
			if code != http.StatusUnauthorized || json.Unmarshal(body, &errs) != nil || len(errs.Errors) != 1 || errs.Errors[0].Code != "UNAUTHORIZED" {
				t.Errorf("%s token, GET %s: %d %s; want 401 UNAUTHORIZED", name, path, code, body)
			}
			if strings.Contains(string(body), token) {
				t.Errorf("the answer tells the token: %s", body)
			}
		}
		if code, body := do(http.MethodHead, manifest, tokens...); code != http.StatusUnauthorized || len(body) != 0 {
			t.Errorf("%s token, HEAD: %d %q", name, code, body)
		}
	}

	// The right token, alone or beside a wrong one (a header given twice): served.
	for _, tokens := range [][]string{{token}, {"wrong", token}} {
		if code, body := do(http.MethodGet, manifest, tokens...); code != http.StatusOK {
			t.Errorf("manifest with %d token values: %d %s", len(tokens), code, body)
		}
		if code, body := do(http.MethodGet, blob, tokens...); code != http.StatusOK || int64(len(body)) != e.layer.Size {
			t.Errorf("blob with the token: %d, %d bytes", code, len(body))
		}
		if code, _ := do(http.MethodGet, "/v2/", tokens...); code != http.StatusOK {
			t.Errorf("GET /v2/ with the token: %d", code)
		}
	}
	// Refusals are counted as any answer is, so that an operator sees pods knocking.
	if n := sumCounter(t, reg, "imagemesh_mirror_requests_total", "code", "401"); n < 7*6 {
		t.Errorf("requests_total{code=401} = %v, want every refusal", n)
	}
}

// sumCounter sums the samples of a counter whose label is value.
func sumCounter(t *testing.T, g prometheus.Gatherer, name, label, value string) float64 {
	t.Helper()
	fams, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.Metric {
			for _, l := range m.Label {
				if l.GetName() == label && l.GetValue() == value {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}
