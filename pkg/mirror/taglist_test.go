package mirror_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/mirror"
)

// TestListTags lists a repository's tags through the mirror, from the real registry: whole, a page
// at a time as the OCI distribution spec says (n, last, Link), with go-containerregistry's client
// following the Links, and with the registry gone.
func TestListTags(t *testing.T) {
	e := setup(t, 1000, func(_ *content.Options, m *mirror.Options) { m.DefaultRegistry = ns })
	crane := testenv.Tool(t, "crane")
	for _, tag := range []string{"v2", "v1.1", "latest", "2.0", "V3"} {
		if out, err := exec.Command(crane, "tag", "--insecure", e.reg.Host+"/"+e.repo+":v1", tag).CombinedOutput(); err != nil {
			t.Fatalf("crane tag %s: %v\n%s", tag, err, out)
		}
	}
	all := []string{"2.0", "V3", "latest", "v1", "v1.1", "v2"} // lexical, upper case first
	type tagList struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}
	// get sends a request for tags/list?query, with ns, as a client that names the registry does.
	get := func(t *testing.T, method, query string) answer {
		t.Helper()
		q, err := url.ParseQuery(query)
		if err != nil {
			t.Fatal(err)
		}
		q.Set("ns", ns)
		req, _ := http.NewRequest(method, e.mirror.URL+"/v2/"+e.repo+"/tags/list?"+q.Encode(), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return answer{err: err}
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return answer{status: resp.StatusCode, header: resp.Header, body: body, err: err}
	}
	list := func(t *testing.T, query string) (tagList, answer) {
		t.Helper()
		a := get(t, http.MethodGet, query)
		var l tagList
		if a.err != nil || a.status != http.StatusOK || json.Unmarshal(a.body, &l) != nil {
			t.Fatalf("GET tags/list?%s: %d %v %s", query, a.status, a.err, a.body)
		}
		if ct := a.header.Get("Content-Type"); ct != "application/json" {
			t.Fatalf("GET tags/list?%s: Content-Type %q", query, ct)
		}
		return l, a
	}

	t.Run("whole", func(t *testing.T) {
		l, a := list(t, "")
		if l.Name != e.repo || !slices.Equal(l.Tags, all) || a.header.Get("Link") != "" {
			t.Fatalf("tags/list = %+v, Link %q; want %q, all of %q, no Link", l, a.header.Get("Link"), e.repo, all)
		}
		head := get(t, http.MethodHead, "")
		if head.status != http.StatusOK || len(head.body) != 0 || head.header.Get("Content-Length") != a.header.Get("Content-Length") {
			t.Fatalf("HEAD tags/list: %d, %d bytes, Content-Length %q", head.status, len(head.body), head.header.Get("Content-Length"))
		}
	})
	t.Run("pages", func(t *testing.T) {
		var got []string
		query := "n=4"
		for pages := 1; ; pages++ {
			l, a := list(t, query)
			if len(l.Tags) > 4 {
				t.Fatalf("page %d of n=4 has %d tags", pages, len(l.Tags))
			}
			got = append(got, l.Tags...)
			link := a.header.Get("Link")
			if link == "" {
				if pages != 2 {
					t.Fatalf("%d pages of 4 for %d tags", pages, len(all))
				}
				break
			}
			// The Link keeps the registry (ns) and carries on after the page's last tag.
			target, rel, _ := strings.Cut(link, ";")
			u, err := url.Parse(strings.Trim(target, "<>"))
			if err != nil || strings.TrimSpace(rel) != `rel="next"` || u.Query().Get("ns") != ns ||
				u.Query().Get("last") != l.Tags[len(l.Tags)-1] || u.Query().Get("n") != "4" || u.Path != "/v2/"+e.repo+"/tags/list" {
				t.Fatalf("Link %q after page %q", link, l.Tags)
			}
			query = u.RawQuery
		}
		if !slices.Equal(got, all) {
			t.Fatalf("pages of 4 gave %q, want %q", got, all)
		}
	})
	t.Run("last and n", func(t *testing.T) {
		for _, c := range []struct {
			query string
			want  []string
			link  bool
		}{
			{"last=latest", []string{"v1", "v1.1", "v2"}, false},
			{"last=v1.0", []string{"v1.1", "v2"}, false}, // not a tag: what sorts after it
			{"last=v2", []string{}, false},
			{"n=0", []string{}, false},
			{"n=1&last=2.0", []string{"V3"}, true},
			{"n=6", all, false},
		} {
			l, a := list(t, c.query)
			if !slices.Equal(l.Tags, c.want) || (a.header.Get("Link") != "") != c.link || l.Tags == nil {
				t.Errorf("tags/list?%s = %q, Link %q; want %q, Link %v", c.query, l.Tags, a.header.Get("Link"), c.want, c.link)
			}
		}
	})
	t.Run("go-containerregistry client", func(t *testing.T) {
		// No ns: the mirror's default registry. remote.List asks for 2 at a time and follows the Links.
		repo, err := name.NewRepository(strings.TrimPrefix(e.mirror.URL, "http://")+"/"+e.repo, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		tags, err := remote.List(repo, remote.WithContext(ctx), remote.WithPageSize(2))
		if err != nil || !slices.Equal(tags, all) {
			t.Fatalf("remote.List through the mirror = %q, %v; want %q", tags, err, all)
		}
	})
	t.Run("registry down", func(t *testing.T) {
		e.proxy.down.Store(true)
		defer e.proxy.down.Store(false)
		a := get(t, http.MethodGet, "")
		if a.status != http.StatusServiceUnavailable || !strings.Contains(string(a.body), "UNAVAILABLE") {
			t.Fatalf("tags/list with the registry down: %d %s; want 503 UNAVAILABLE, not a stale list", a.status, a.body)
		}
	})
	// Every request above is counted under kind="tags", the failed ones too.
	counted := map[string]float64{}
	families, err := e.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != "imagemesh_mirror_requests_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["kind"] == "tags" {
				counted[labels["code"]] += m.GetCounter().GetValue()
			}
		}
	}
	if counted["200"] < 10 || counted["503"] != 1 {
		t.Fatalf("requests with kind=tags by code: %v; want at least 10 with 200 and one with 503", counted)
	}
}
