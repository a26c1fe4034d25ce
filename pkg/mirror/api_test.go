package mirror_test

// The pull API's answers, table by table, over an in-memory source (memsource): content negotiation,
// error mapping, Range and the method set. No registry process: these run in the unit tier. What is
// asserted is what the mirror does, which follows distribution's registry where it can.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/memsource"
)

const (
	mtDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mtDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
	mtArtifact       = "application/vnd.example.thing.v1+json" // a type distribution does not negotiate
)

// images is what the source holds in example.test/team/app, by tag.
type images struct {
	layer, config                                []byte
	oci, ociBare, docker, dockerArm, index, list []byte
	listArmOnly, artifact                        []byte
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func descOf(mediaType string, b []byte, platform ...string) ocispec.Descriptor {
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if len(platform) == 2 {
		d.Platform = &ocispec.Platform{OS: platform[0], Architecture: platform[1]}
	}
	return d
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func newImages() *images {
	im := &images{layer: randomBytes(1, 100_000), config: []byte(`{"architecture":"amd64","os":"linux"}`)}
	manifest := func(mediaType, configType, layerType string, config []byte) []byte {
		return mustJSON(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: mediaType,
			Config: descOf(configType, config), Layers: []ocispec.Descriptor{descOf(layerType, im.layer)}})
	}
	index := func(mediaType string, manifests ...ocispec.Descriptor) []byte {
		return mustJSON(ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: mediaType, Manifests: manifests})
	}
	im.oci = manifest(ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageLayerGzip, im.config)
	im.ociBare = manifest("", ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageLayer, im.config)
	im.docker = manifest(mtDockerManifest, "application/vnd.docker.container.image.v1+json", "application/vnd.docker.image.rootfs.diff.tar.gzip", im.config)
	im.dockerArm = manifest(mtDockerManifest, "application/vnd.docker.container.image.v1+json", "application/vnd.docker.image.rootfs.diff.tar.gzip", []byte(`{"architecture":"arm64","os":"linux"}`))
	im.index = index(ocispec.MediaTypeImageIndex, descOf(ocispec.MediaTypeImageManifest, im.oci, "linux", "amd64"))
	im.list = index(mtDockerList, descOf(mtDockerManifest, im.dockerArm, "linux", "arm64"), descOf(mtDockerManifest, im.docker, "linux", "amd64"))
	im.listArmOnly = index(mtDockerList, descOf(mtDockerManifest, im.dockerArm, "linux", "arm64"))
	im.artifact = []byte(`{"schemaVersion":2,"mediaType":"` + mtArtifact + `","blobs":[]}`)
	return im
}

// fill puts the images into src under example.test/team/app, and the OCI manifest also under
// docker.io/library/alpine:3.20, for requests that name no registry.
func (im *images) fill(t *testing.T, src *memsource.Source) {
	t.Helper()
	repo := named(t, ns+"/team/app")
	src.AddBlob(repo, im.layer)
	src.AddBlob(repo, im.config)
	for tag, m := range map[string][]byte{
		"oci": im.oci, "oci-bare": im.ociBare, "docker": im.docker, "docker-arm": im.dockerArm, "index": im.index,
		"list": im.list, "list-arm": im.listArmOnly, "artifact": im.artifact,
	} {
		if err := src.Tag(repo, tag, src.AddManifest(repo, "", m).Digest); err != nil {
			t.Fatal(err)
		}
	}
	alpine := named(t, "docker.io/library/alpine")
	if err := src.Tag(alpine, "3.20", src.AddManifest(alpine, "", im.oci).Digest); err != nil {
		t.Fatal(err)
	}
}

func named(t *testing.T, s string) reference.Named {
	t.Helper()
	n, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// hooked is the source the mirror asks: the memsource, unless a hook answers instead.
type hooked struct {
	*memsource.Source
	resolve func(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error)
	stat    func(ctx context.Context, obj source.Object) (ocispec.Descriptor, error)
	open    func(ctx context.Context, obj source.Object, offset int64) (*source.Content, error)
	list    func(ctx context.Context, repo reference.Named) ([]string, error)
	opens   atomic.Int32
}

func (h *hooked) ListTags(ctx context.Context, repo reference.Named) ([]string, error) {
	if h.list != nil {
		return h.list(ctx, repo)
	}
	return h.Source.ListTags(ctx, repo)
}

func (h *hooked) Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	if h.resolve != nil {
		return h.resolve(ctx, repo, tag)
	}
	return h.Source.Resolve(ctx, repo, tag)
}

func (h *hooked) Stat(ctx context.Context, obj source.Object) (ocispec.Descriptor, error) {
	if h.stat != nil {
		return h.stat(ctx, obj)
	}
	return h.Source.Stat(ctx, obj)
}

func (h *hooked) Open(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
	h.opens.Add(1)
	if h.open != nil {
		return h.open(ctx, obj, offset)
	}
	return h.Source.Open(ctx, obj, offset)
}

// unit is a mirror over an in-memory source, served on 127.0.0.1.
type unit struct {
	im     *images
	mem    *memsource.Source
	src    *hooked
	store  *content.Store
	mirror *mirror.Mirror
	url    string
}

// newUnit makes a mirror whose source holds the images; hooks, set before the first request, make
// the source answer otherwise; tune changes the options.
func newUnit(t *testing.T, hooks func(*hooked), tune ...func(*content.Options, *mirror.Options)) *unit {
	t.Helper()
	u := &unit{im: newImages(), mem: memsource.New("memory")}
	u.im.fill(t, u.mem)
	u.src = &hooked{Source: u.mem}
	if hooks != nil {
		hooks(u.src)
	}
	storeOpts := content.Options{StallTimeout: 5 * time.Second}
	mirrorOpts := mirror.Options{Source: u.src, TagTTL: time.Hour}
	for _, f := range tune {
		f(&storeOpts, &mirrorOpts)
	}
	var err error
	if u.store, err = content.Open(t.TempDir(), storeOpts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.store.Close() })
	mirrorOpts.Store = u.store
	if u.mirror, err = mirror.New(mirrorOpts); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(u.mirror)
	t.Cleanup(srv.Close)
	u.url = srv.URL
	return u
}

// do sends method path (with its query) and header values given as name, value pairs; a name given
// twice sends two header lines.
func (u *unit) do(t *testing.T, method, path string, hdr ...string) answer {
	t.Helper()
	req, err := http.NewRequest(method, u.url+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return answer{err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return answer{status: resp.StatusCode, header: resp.Header, body: body, err: err}
}

// errorCode is the code of the one error in an OCI error body, "" if there is none.
func errorCode(t *testing.T, a answer) string {
	t.Helper()
	var body struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	if err := json.Unmarshal(a.body, &body); err != nil || len(body.Errors) != 1 {
		return ""
	}
	return body.Errors[0].Code
}

// checkError checks an error answer: the status, the OCI error JSON with code (GET; a HEAD answer has
// no body), and no header that describes content.
func checkError(t *testing.T, what string, a answer, method string, status int, code string) {
	t.Helper()
	if a.err != nil {
		t.Errorf("%s: %v", what, a.err)
		return
	}
	if a.status != status {
		t.Errorf("%s: status %d, want %d (%s)", what, a.status, status, a.body)
		return
	}
	if ct := a.header.Get("Content-Type"); ct != "application/json; charset=utf-8" {
		t.Errorf("%s: Content-Type %q, want the error JSON's", what, ct)
	}
	if method == http.MethodGet {
		if got := errorCode(t, a); got != code {
			t.Errorf("%s: error code %q, want %s (%s)", what, got, code, a.body)
		}
		if cl := a.header.Get("Content-Length"); cl != strconv.Itoa(len(a.body)) {
			t.Errorf("%s: Content-Length %q for a %d-byte error body", what, cl, len(a.body))
		}
	} else if len(a.body) != 0 {
		t.Errorf("%s: HEAD answered with a body: %s", what, a.body)
	}
	for _, h := range []string{"Docker-Content-Digest", "Etag", "Content-Range", "Accept-Ranges", "Cache-Control"} {
		if v := a.header.Get(h); v != "" {
			t.Errorf("%s: error answer carries %s: %s", what, h, v)
		}
	}
}

var bothMethods = []string{http.MethodGet, http.MethodHead}

// Accept against the manifest's type, by tag and by digest, GET and HEAD: what is served (type, digest,
// length, bytes) or which error, as distribution's registry negotiates.
func TestManifestNegotiation(t *testing.T) {
	im := newImages()
	d := func(b []byte) string { return digest.FromBytes(b).String() }
	var (
		oci        = ocispec.MediaTypeImageManifest
		ociIndex   = ocispec.MediaTypeImageIndex
		withQ      = ocispec.MediaTypeImageManifest + "; q=0.1"
		everything = allManifestTypes
	)
	for _, c := range []struct {
		name   string
		ref    string   // tag, or digest
		accept []string // one Accept line each
		status int
		code   string
		want   []byte // the manifest served
		typ    string // its Content-Type
	}{
		{name: "OCI manifest, accepted", ref: "oci", accept: []string{everything}, status: 200, want: im.oci, typ: oci},
		{name: "OCI manifest, accepted with a q value", ref: "oci", accept: []string{withQ}, status: 200, want: im.oci, typ: oci},
		{name: "OCI manifest, accepted on a second Accept line", ref: "oci", accept: []string{ociIndex, oci}, status: 200, want: im.oci, typ: oci},
		{name: "OCI manifest by digest, accepted", ref: d(im.oci), accept: []string{oci}, status: 200, want: im.oci, typ: oci},
		{name: "OCI manifest, no Accept", ref: "oci", status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "OCI manifest, Accept */*", ref: "oci", accept: []string{"*/*"}, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "OCI manifest, Docker types only", ref: "oci", accept: []string{mtDockerManifest + ", " + mtDockerList}, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "OCI manifest by digest, not accepted", ref: d(im.oci), accept: []string{mtDockerManifest}, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "OCI manifest without mediaType, typed by its shape", ref: "oci-bare", accept: []string{oci}, status: 200, want: im.ociBare, typ: oci},
		{name: "OCI manifest without mediaType, not accepted", ref: "oci-bare", accept: []string{ociIndex}, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "OCI index, accepted", ref: "index", accept: []string{ociIndex}, status: 200, want: im.index, typ: ociIndex},
		{name: "OCI index by digest, accepted", ref: d(im.index), accept: []string{everything}, status: 200, want: im.index, typ: ociIndex},
		{name: "OCI index, only manifests accepted: no platform is picked", ref: "index", accept: []string{oci}, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "Docker manifest, accepted", ref: "docker", accept: []string{everything}, status: 200, want: im.docker, typ: mtDockerManifest},
		{name: "Docker manifest, no Accept: served as it is", ref: "docker", status: 200, want: im.docker, typ: mtDockerManifest},
		{name: "Docker manifest, OCI types only: served as it is", ref: "docker", accept: []string{oci + ", " + ociIndex}, status: 200, want: im.docker, typ: mtDockerManifest},
		{name: "Docker list, accepted", ref: "list", accept: []string{everything}, status: 200, want: im.list, typ: mtDockerList},
		{name: "Docker list by tag, lists not accepted: its linux/amd64 manifest", ref: "list", accept: []string{mtDockerManifest}, status: 200, want: im.docker, typ: mtDockerManifest},
		{name: "Docker list by tag, neither accepted", ref: "list", accept: []string{oci}, status: 400, code: "MANIFEST_INVALID"},
		{name: "Docker list by tag, no Accept", ref: "list", status: 400, code: "MANIFEST_INVALID"},
		{name: "Docker list by digest, lists not accepted: the list as it is", ref: d(im.list), accept: []string{mtDockerManifest}, status: 200, want: im.list, typ: mtDockerList},
		{name: "Docker list without linux/amd64, lists not accepted", ref: "list-arm", accept: []string{mtDockerManifest}, status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "a type nobody negotiates: served as it is", ref: "artifact", status: 200, want: im.artifact, typ: mtArtifact},
		{name: "a blob by digest is no manifest", ref: d(im.layer), accept: []string{everything}, status: 404, code: "MANIFEST_UNKNOWN"},
	} {
		t.Run(c.name, func(t *testing.T) {
			u := newUnit(t, nil)
			var hdr []string
			for _, a := range c.accept {
				hdr = append(hdr, "Accept", a)
			}
			path := "/v2/team/app/manifests/" + c.ref + "?ns=" + ns
			// HEAD first: by tag it may answer from the tag's descriptor alone, before anything is
			// fetched, and must say what GET then says.
			head := u.do(t, http.MethodHead, path, hdr...)
			get := u.do(t, http.MethodGet, path, hdr...)
			if c.status != 200 {
				checkError(t, "HEAD", head, http.MethodHead, c.status, c.code)
				checkError(t, "GET", get, http.MethodGet, c.status, c.code)
				return
			}
			want := digest.FromBytes(c.want).String()
			for _, a := range []struct {
				method string
				answer
			}{{http.MethodHead, head}, {http.MethodGet, get}} {
				if a.err != nil || a.status != 200 {
					t.Fatalf("%s: %d %v %s", a.method, a.status, a.err, a.body)
				}
				h := a.header
				if h.Get("Content-Type") != c.typ || h.Get("Docker-Content-Digest") != want || h.Get("Etag") != `"`+want+`"` ||
					h.Get("Content-Length") != strconv.Itoa(len(c.want)) || h.Get("Docker-Distribution-API-Version") != "registry/2.0" {
					t.Errorf("%s: headers %v; want %s, digest %s, %d bytes", a.method, h, c.typ, want, len(c.want))
				}
			}
			if len(head.body) != 0 {
				t.Errorf("HEAD answered with %d bytes of body", len(head.body))
			}
			if !bytes.Equal(get.body, c.want) {
				t.Errorf("GET: %d bytes, not the %d of the manifest", len(get.body), len(c.want))
			}
		})
	}
}

// HEAD of a manifest by tag, in a type the client takes, is answered from the tag's descriptor: what
// containerd sends first costs no manifest fetch.
func TestManifestHeadByTagFetchesNothing(t *testing.T) {
	u := newUnit(t, nil)
	a := u.do(t, http.MethodHead, "/v2/team/app/manifests/oci?ns="+ns, "Accept", allManifestTypes)
	if a.status != 200 || a.header.Get("Docker-Content-Digest") != digest.FromBytes(u.im.oci).String() {
		t.Fatalf("HEAD: %d %v", a.status, a.header)
	}
	if n := u.src.opens.Load(); n != 0 {
		t.Fatalf("HEAD by tag opened %d objects on the source, want none", n)
	}
	// A list the client does not take is answered with its linux/amd64 manifest, which takes the list.
	a = u.do(t, http.MethodHead, "/v2/team/app/manifests/list?ns="+ns, "Accept", mtDockerManifest)
	if a.status != 200 || a.header.Get("Docker-Content-Digest") != digest.FromBytes(u.im.docker).String() || u.src.opens.Load() != 2 {
		t.Fatalf("HEAD of a list for a client without lists: %d %v after %d opens", a.status, a.header, u.src.opens.Load())
	}
}

// Names, registries, tags and digests the mirror refuses, and content it cannot find: the status and
// OCI error code of each, for GET and HEAD.
func TestRequestErrors(t *testing.T) {
	im := newImages()
	layer := digest.FromBytes(im.layer).String()
	zero := "sha256:" + strings.Repeat("0", 64)
	for _, c := range []struct {
		name, path string
		status     int
		code       string
	}{
		{"unknown tag", "/v2/team/app/manifests/nope?ns=" + ns, 404, "MANIFEST_UNKNOWN"},
		{"unknown manifest digest", "/v2/team/app/manifests/" + zero + "?ns=" + ns, 404, "MANIFEST_UNKNOWN"},
		{"unknown repository", "/v2/team/nothing/manifests/oci?ns=" + ns, 404, "MANIFEST_UNKNOWN"},
		{"another registry's repository", "/v2/team/app/manifests/oci?ns=other.test", 404, "MANIFEST_UNKNOWN"},
		{"no registry: the default, docker.io", "/v2/team/app/manifests/oci", 404, "MANIFEST_UNKNOWN"},
		{"unknown blob", "/v2/team/app/blobs/" + zero + "?ns=" + ns, 404, "BLOB_UNKNOWN"},
		{"another repository's blob", "/v2/team/other/blobs/" + layer + "?ns=" + ns, 404, "BLOB_UNKNOWN"},
		{"empty reference", "/v2/team/app/manifests/?ns=" + ns, 404, "NAME_UNKNOWN"},
		{"unknown API path", "/v2/team/app/things/v1?ns=" + ns, 404, "NAME_UNKNOWN"},
		{"no repository", "/v2/manifests/oci?ns=" + ns, 404, "NAME_UNKNOWN"},
		{"upper case repository", "/v2/Team/App/manifests/oci?ns=" + ns, 400, "NAME_INVALID"},
		{"empty path component", "/v2/team//app/manifests/oci?ns=" + ns, 400, "NAME_INVALID"},
		{"repository name too long", "/v2/" + strings.Repeat("a", 256) + "/manifests/oci?ns=" + ns, 400, "NAME_INVALID"},
		{"invalid registry", "/v2/team/app/manifests/oci?ns=bad_host!", 400, "NAME_INVALID"},
		{"registry that is not a host", "/v2/team/app/manifests/oci?ns=nohost", 400, "NAME_INVALID"},
		{"invalid tag", "/v2/team/app/manifests/-bad-tag?ns=" + ns, 400, "TAG_INVALID"},
		{"tag too long", "/v2/team/app/manifests/" + strings.Repeat("t", 129) + "?ns=" + ns, 400, "TAG_INVALID"},
		{"manifest reference with a colon", "/v2/team/app/manifests/v1:x?ns=" + ns, 400, "DIGEST_INVALID"},
		{"short digest", "/v2/team/app/blobs/sha256:abc?ns=" + ns, 400, "DIGEST_INVALID"},
		{"unknown algorithm", "/v2/team/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e?ns=" + ns, 400, "DIGEST_INVALID"},
		{"upper case hex", "/v2/team/app/blobs/sha256:" + strings.Repeat("A", 64) + "?ns=" + ns, 400, "DIGEST_INVALID"},
		{"blob by tag", "/v2/team/app/blobs/oci?ns=" + ns, 400, "DIGEST_INVALID"},
		{"tag list of an unknown repository", "/v2/team/nothing/tags/list?ns=" + ns, 404, "NAME_UNKNOWN"},
		{"tag list, negative n", "/v2/team/app/tags/list?n=-1&ns=" + ns, 400, "PAGINATION_NUMBER_INVALID"},
		{"tag list, n not a number", "/v2/team/app/tags/list?n=two&ns=" + ns, 400, "PAGINATION_NUMBER_INVALID"},
		{"tag list, bad name", "/v2/Team/App/tags/list?ns=" + ns, 400, "NAME_INVALID"},
		{"referrers", "/v2/team/app/referrers/" + zero + "?ns=" + ns, 405, "UNSUPPORTED"},
		{"upload", "/v2/team/app/blobs/uploads/?ns=" + ns, 405, "UNSUPPORTED"},
		{"upload session", "/v2/team/app/blobs/uploads/123?ns=" + ns, 405, "UNSUPPORTED"},
	} {
		t.Run(c.name, func(t *testing.T) {
			u := newUnit(t, nil)
			for _, method := range bothMethods {
				checkError(t, method, u.do(t, method, c.path, "Accept", allManifestTypes), method, c.status, c.code)
			}
			if n := u.src.opens.Load(); c.status != 404 && n != 0 {
				t.Errorf("a refused request opened %d objects on the source", n)
			}
		})
	}
}

// Tag lists come from the source, sorted, a page at a time as the distribution spec says; a source
// that cannot list, or fails, says so.
func TestTagList(t *testing.T) {
	all := []string{"artifact", "docker", "docker-arm", "index", "list", "list-arm", "oci", "oci-bare"}
	path := "/v2/team/app/tags/list?ns=" + ns
	type tagList struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}
	u := newUnit(t, nil)
	for _, c := range []struct {
		query string
		want  []string
		link  string // the next page's, "" for none
	}{
		{"", all, ""},
		{"&n=3", all[:3], `</v2/team/app/tags/list?last=docker-arm&n=3&ns=example.test>; rel="next"`},
		{"&n=3&last=docker-arm", all[3:6], `</v2/team/app/tags/list?last=list-arm&n=3&ns=example.test>; rel="next"`},
		{"&n=3&last=list-arm", all[6:], ""},
		{"&last=m", all[6:], ""},
		{"&last=zzz", []string{}, ""},
		{"&n=0", []string{}, ""},
		{"&n=100", all, ""},
	} {
		get := u.do(t, http.MethodGet, path+c.query)
		var l tagList
		if get.status != 200 || json.Unmarshal(get.body, &l) != nil || l.Name != "team/app" || l.Tags == nil || !slices.Equal(l.Tags, c.want) {
			t.Errorf("GET %s: %d %s; want %q", c.query, get.status, get.body, c.want)
		}
		if got := get.header.Get("Link"); got != c.link {
			t.Errorf("GET %s: Link %q, want %q", c.query, got, c.link)
		}
		head := u.do(t, http.MethodHead, path+c.query)
		if head.status != 200 || len(head.body) != 0 || head.header.Get("Content-Length") != strconv.Itoa(len(get.body)) ||
			head.header.Get("Content-Type") != "application/json" || get.header.Get("Content-Type") != "application/json" {
			t.Errorf("HEAD %s: %d, %d bytes, %v; GET's Content-Type %q", c.query, head.status, len(head.body), head.header, get.header.Get("Content-Type"))
		}
	}

	for _, c := range []struct {
		err    error
		status int
		code   string
	}{
		{fmt.Errorf("dial: %w", source.ErrUnavailable), 503, "UNAVAILABLE"},
		{errors.New("boom"), 502, "UNKNOWN"},
	} {
		u := newUnit(t, func(h *hooked) {
			h.list = func(context.Context, reference.Named) ([]string, error) { return nil, c.err }
		})
		checkError(t, fmt.Sprintf("tag list, source error %v", c.err), u.do(t, http.MethodGet, path), http.MethodGet, c.status, c.code)
	}
	u = newUnit(t, nil)
	u.mirror.SetSource(struct{ source.Source }{u.mem}) // a source that answers tags but cannot list them
	checkError(t, "tag list, source that cannot list", u.do(t, http.MethodGet, path), http.MethodGet, http.StatusMethodNotAllowed, "UNSUPPORTED")
}

// Requests that name no registry go to the default one, whose names are normalized as docker does.
func TestDefaultRegistry(t *testing.T) {
	u := newUnit(t, nil)
	want := digest.FromBytes(u.im.oci).String()
	for _, path := range []string{
		"/v2/library/alpine/manifests/3.20",
		"/v2/alpine/manifests/3.20",
		"/v2/alpine/manifests/3.20?ns=docker.io",
		"/v2/library/alpine/manifests/3.20?ns=index.docker.io",
	} {
		a := u.do(t, http.MethodGet, path, "Accept", allManifestTypes)
		if a.status != 200 || a.header.Get("Docker-Content-Digest") != want {
			t.Errorf("GET %s: %d %s", path, a.status, a.body)
		}
	}
}

// A registry the mirror does not pull from is refused before anything is asked.
func TestRegistriesNotMirrored(t *testing.T) {
	u := newUnit(t, nil, func(_ *content.Options, m *mirror.Options) { m.Registries = []string{"other.test"} })
	for _, path := range []string{"/v2/team/app/manifests/oci?ns=" + ns, "/v2/team/app/blobs/" + digest.FromBytes(u.im.layer).String() + "?ns=" + ns} {
		for _, method := range bothMethods {
			checkError(t, method+" "+path, u.do(t, method, path), method, http.StatusForbidden, "DENIED")
		}
	}
	u.mirror.SetRegistries(nil)
	if a := u.do(t, http.MethodGet, "/v2/team/app/manifests/oci?ns="+ns, "Accept", allManifestTypes); a.status != 200 {
		t.Fatalf("after SetRegistries(nil): %d %s", a.status, a.body)
	}
}

// lying answers Open with body instead of what the object holds, and says its size is len(body).
func lying(body []byte) func(context.Context, source.Object, int64) (*source.Content, error) {
	return func(_ context.Context, obj source.Object, offset int64) (*source.Content, error) {
		return &source.Content{ReadCloser: io.NopCloser(bytes.NewReader(body[offset:])), Source: "liar",
			Descriptor: ocispec.Descriptor{Digest: obj.Digest, Size: int64(len(body))}}, nil
	}
}

// Failures of the source, as the client sees them: not there is 404, unreachable is 503, anything
// else the source got wrong is 502.
func TestSourceErrors(t *testing.T) {
	im := newImages()
	boom := errors.New("boom")
	unavailable := fmt.Errorf("connect: %w", source.ErrUnavailable)
	notFound := fmt.Errorf("gone: %w", source.ErrNotFound)
	failResolve := func(err error) func(*hooked) {
		return func(h *hooked) {
			h.resolve = func(context.Context, reference.Named, string) (ocispec.Descriptor, error) {
				return ocispec.Descriptor{}, err
			}
		}
	}
	failStat := func(err error) func(*hooked) {
		return func(h *hooked) {
			h.stat = func(context.Context, source.Object) (ocispec.Descriptor, error) { return ocispec.Descriptor{}, err }
		}
	}
	failOpen := func(err error) func(*hooked) {
		return func(h *hooked) {
			h.open = func(context.Context, source.Object, int64) (*source.Content, error) { return nil, err }
		}
	}
	manifestByTag := "/v2/team/app/manifests/oci?ns=" + ns
	manifestByDigest := "/v2/team/app/manifests/" + digest.FromBytes(im.oci).String() + "?ns=" + ns
	blob := "/v2/team/app/blobs/" + digest.FromBytes(im.layer).String() + "?ns=" + ns
	big := append([]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","x":"`), bytes.Repeat([]byte("a"), source.MaxManifestSize)...)
	big = append(big, `"}`...)

	for _, c := range []struct {
		name    string
		hooks   func(*hooked)
		method  string
		path    string
		status  int
		code    string
		noStore string // a digest that must not be in the store afterwards
	}{
		{"tag: not found", failResolve(notFound), "GET", manifestByTag, 404, "MANIFEST_UNKNOWN", ""},
		{"tag: unavailable", failResolve(unavailable), "GET", manifestByTag, 503, "UNAVAILABLE", ""},
		{"tag: HEAD, unavailable", failResolve(unavailable), "HEAD", manifestByTag, 503, "UNAVAILABLE", ""},
		{"tag: timed out", failResolve(context.DeadlineExceeded), "GET", manifestByTag, 503, "UNAVAILABLE", ""},
		{"tag: other error", failResolve(boom), "GET", manifestByTag, 502, "UNKNOWN", ""},
		{"tag: an invalid digest from the source", func(h *hooked) {
			h.resolve = func(context.Context, reference.Named, string) (ocispec.Descriptor, error) {
				return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: "sha256:nope", Size: 10}, nil
			}
		}, "GET", manifestByTag, 502, "UNKNOWN", ""},
		{"manifest: not found", failOpen(notFound), "GET", manifestByDigest, 404, "MANIFEST_UNKNOWN", ""},
		{"manifest: unavailable", failOpen(unavailable), "GET", manifestByDigest, 503, "UNAVAILABLE", ""},
		{"manifest: HEAD, unavailable", failOpen(unavailable), "HEAD", manifestByDigest, 503, "UNAVAILABLE", ""},
		{"manifest by tag: unavailable", failOpen(unavailable), "GET", manifestByTag, 503, "UNAVAILABLE", ""},
		{"manifest: other error", failOpen(boom), "GET", manifestByDigest, 502, "UNKNOWN", ""},
		{"manifest: bytes that are not its digest's", func(h *hooked) { h.open = lying(im.docker) }, "GET", manifestByDigest, 502, "DIGEST_INVALID", digest.FromBytes(im.oci).String()},
		{"manifest: over 4 MiB", func(h *hooked) { h.open = lying(big) }, "GET", manifestByDigest, 502, "MANIFEST_INVALID", digest.FromBytes(im.oci).String()},
		{"blob: HEAD, not found", failStat(notFound), "HEAD", blob, 404, "BLOB_UNKNOWN", ""},
		{"blob: HEAD, unavailable", failStat(unavailable), "HEAD", blob, 503, "UNAVAILABLE", ""},
		{"blob: HEAD, other error", failStat(boom), "HEAD", blob, 502, "UNKNOWN", ""},
		{"blob: not found", failOpen(notFound), "GET", blob, 404, "BLOB_UNKNOWN", ""},
		{"blob: unavailable", failOpen(unavailable), "GET", blob, 503, "UNAVAILABLE", ""},
		{"blob: other error", failOpen(boom), "GET", blob, 502, "UNKNOWN", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			u := newUnit(t, c.hooks)
			checkError(t, c.method, u.do(t, c.method, c.path, "Accept", allManifestTypes), c.method, c.status, c.code)
			if c.noStore != "" {
				if _, err := u.store.Stat(digest.Digest(c.noStore)); err == nil {
					t.Errorf("%s is in the store", c.noStore)
				}
			}
		})
	}
}

// A blob whose bytes do not match its digest never reaches a client whole, whether it is empty or
// not, and is not kept.
func TestLyingBlobIsCutOff(t *testing.T) {
	im := newImages()
	wrong := bytes.Clone(im.layer)
	wrong[len(wrong)/2] ^= 0xff
	for name, body := range map[string][]byte{"one byte changed": wrong, "empty": {}} {
		t.Run(name, func(t *testing.T) {
			u := newUnit(t, func(h *hooked) { h.open = lying(body) })
			d := digest.FromBytes(im.layer)
			a := u.do(t, http.MethodGet, "/v2/team/app/blobs/"+d.String()+"?ns="+ns)
			if a.err == nil && a.status == 200 {
				t.Fatalf("the client got the whole of a blob that does not match its digest: %d bytes", len(a.body))
			}
			if a.err == nil && a.status != 502 {
				t.Fatalf("status %d, want 502 or a transfer cut off", a.status)
			}
			deadline := time.Now().Add(5 * time.Second)
			for u.store.Size() != 0 || len(fetching(u.store, d)) != 0 {
				if time.Now().After(deadline) {
					t.Fatalf("store holds %d bytes after a blob failed verification", u.store.Size())
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

// fetching says whether the store is still fetching d ("" when it is not).
func fetching(s *content.Store, d digest.Digest) string {
	if src, _, ok := s.Fetching(d); ok {
		return src
	}
	return ""
}

// A tag's answer is reused while the source cannot be reached, however old; an answer that the tag
// is gone is not.
func TestTagAnswerOutlivesTheSource(t *testing.T) {
	var mode atomic.Value // "", "unavailable", "gone"
	mode.Store("")
	u := newUnit(t, func(h *hooked) {
		h.resolve = func(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
			switch mode.Load() {
			case "unavailable":
				return ocispec.Descriptor{}, fmt.Errorf("dial: %w", source.ErrUnavailable)
			case "gone":
				return ocispec.Descriptor{}, fmt.Errorf("tag: %w", source.ErrNotFound)
			}
			return h.Source.Resolve(ctx, repo, tag)
		}
	}, func(_ *content.Options, m *mirror.Options) { m.TagTTL = time.Nanosecond })
	path := "/v2/team/app/manifests/oci?ns=" + ns
	want := digest.FromBytes(u.im.oci).String()
	if a := u.do(t, http.MethodGet, path, "Accept", allManifestTypes); a.status != 200 {
		t.Fatalf("GET: %d %s", a.status, a.body)
	}
	mode.Store("unavailable")
	for _, method := range bothMethods {
		if a := u.do(t, method, path, "Accept", allManifestTypes); a.status != 200 || a.header.Get("Docker-Content-Digest") != want {
			t.Fatalf("%s with the source unavailable: %d %s", method, a.status, a.body)
		}
	}
	mode.Store("gone")
	checkError(t, "GET of a tag that is gone", u.do(t, http.MethodGet, path, "Accept", allManifestTypes), http.MethodGet, 404, "MANIFEST_UNKNOWN")
	mode.Store("unavailable")
	checkError(t, "GET once the source is unavailable again", u.do(t, http.MethodGet, path, "Accept", allManifestTypes), http.MethodGet, 503, "UNAVAILABLE")
}

// blocking makes blob opens wait until release is closed; opened is told of each.
func blocking(release <-chan struct{}, opened chan<- digest.Digest) func(*hooked) {
	return func(h *hooked) {
		h.open = func(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
			if obj.Kind == source.KindBlob {
				opened <- obj.Digest
				select {
				case <-release:
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
			return h.Source.Open(ctx, obj, offset)
		}
	}
}

// getAsync sends a GET that waits in the background until the test ends.
func getAsync(t *testing.T, url string) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body) // its content does not matter
			resp.Body.Close()
		}
	}()
}

// Past the bounds on requests waiting for sources, per client, and on fetches, the answer is 429 at
// once; what the store holds is still served.
func TestTooManyRequests(t *testing.T) {
	blobPath := func(d digest.Digest) string { return "/v2/team/app/blobs/" + d.String() + "?ns=" + ns }
	t.Run("requests of one client", func(t *testing.T) {
		release, opened := make(chan struct{}), make(chan digest.Digest, 4)
		u := newUnit(t, blocking(release, opened), func(_ *content.Options, m *mirror.Options) { m.MaxSourceRequestsPerClient = 1 })
		defer close(release)
		stored := u.do(t, http.MethodGet, "/v2/team/app/manifests/oci?ns="+ns, "Accept", allManifestTypes)
		if stored.status != 200 {
			t.Fatalf("GET manifest: %d", stored.status)
		}
		getAsync(t, u.url+blobPath(digest.FromBytes(u.im.layer)))
		<-opened
		a := u.do(t, http.MethodGet, blobPath(digest.FromBytes(u.im.config)))
		checkError(t, "the client's second waiting request", a, http.MethodGet, http.StatusTooManyRequests, "TOOMANYREQUESTS")
		if a.header.Get("Retry-After") != "1" {
			t.Errorf("Retry-After %q, want 1", a.header.Get("Retry-After"))
		}
		if a := u.do(t, http.MethodGet, "/v2/team/app/manifests/"+stored.header.Get("Docker-Content-Digest")+"?ns="+ns, "Accept", allManifestTypes); a.status != 200 {
			t.Fatalf("GET of a stored manifest while the client waits: %d", a.status)
		}
	})
	t.Run("fetches", func(t *testing.T) {
		release, opened := make(chan struct{}), make(chan digest.Digest, 4)
		u := newUnit(t, blocking(release, opened), func(c *content.Options, _ *mirror.Options) { c.MaxFetches = 1 })
		defer close(release)
		getAsync(t, u.url+blobPath(digest.FromBytes(u.im.layer)))
		<-opened
		a := u.do(t, http.MethodGet, blobPath(digest.FromBytes(u.im.config)))
		checkError(t, "a fetch past the store's bound", a, http.MethodGet, http.StatusTooManyRequests, "TOOMANYREQUESTS")
		if a.header.Get("Retry-After") != "1" {
			t.Errorf("Retry-After %q, want 1", a.header.Get("Retry-After"))
		}
	})
}

// Range on blobs, on a blob being fetched (cold) and on one the store holds (warm): what
// http.ServeContent makes of it, as distribution's registry does.
func TestBlobRange(t *testing.T) {
	im := newImages()
	size := len(im.layer)
	d := digest.FromBytes(im.layer)
	path := "/v2/team/app/blobs/" + d.String() + "?ns=" + ns
	for _, c := range []struct {
		name, rng    string
		status       int
		from, to     int    // the bytes served, [from, to)
		contentRange string // "" for none
	}{
		{"none", "", 200, 0, size, ""},
		{"first bytes", "bytes=0-99", 206, 0, 100, fmt.Sprintf("bytes 0-99/%d", size)},
		{"middle", "bytes=100-199", 206, 100, 200, fmt.Sprintf("bytes 100-199/%d", size)},
		{"from an offset", "bytes=99000-", 206, 99000, size, fmt.Sprintf("bytes 99000-%d/%d", size-1, size)},
		{"suffix", "bytes=-100", 206, size - 100, size, fmt.Sprintf("bytes %d-%d/%d", size-100, size-1, size)},
		{"whole, as a range", "bytes=0-", 206, 0, size, fmt.Sprintf("bytes 0-%d/%d", size-1, size)},
		{"end past the end", "bytes=99990-200000", 206, 99990, size, fmt.Sprintf("bytes 99990-%d/%d", size-1, size)},
		{"last byte", fmt.Sprintf("bytes=%d-%d", size-1, size-1), 206, size - 1, size, fmt.Sprintf("bytes %d-%d/%d", size-1, size-1, size)},
		{"empty list", "bytes=", 200, 0, size, ""},
		{"reversed", "bytes=200-100", 416, 0, 0, ""},
		{"start at the end", fmt.Sprintf("bytes=%d-", size), 416, 0, 0, fmt.Sprintf("bytes */%d", size)},
		{"past the end", "bytes=200000-200100", 416, 0, 0, fmt.Sprintf("bytes */%d", size)},
		{"malformed", "bytes=abc", 416, 0, 0, ""},
		{"no dash", "bytes=100", 416, 0, 0, ""},
		{"negative suffix", "bytes=--5", 416, 0, 0, ""},
		{"zero suffix: no bytes", "bytes=-0", 416, 0, 0, fmt.Sprintf("bytes */%d", size)},
		{"another unit", "items=0-99", 416, 0, 0, ""},
	} {
		for _, warm := range []bool{false, true} {
			name := c.name + map[bool]string{false: ", cold", true: ", warm"}[warm]
			t.Run(name, func(t *testing.T) {
				hooks := slowBlobs // cold: the blob is still arriving when the answer starts
				if warm {
					hooks = nil
				}
				u := newUnit(t, hooks)
				if warm {
					if a := u.do(t, http.MethodGet, path); a.status != 200 || !bytes.Equal(a.body, im.layer) {
						t.Fatalf("warming GET: %d, %d bytes", a.status, len(a.body))
					}
					waitStored(t, u.store, d)
				}
				var hdr []string
				if c.rng != "" {
					hdr = []string{"Range", c.rng}
				}
				a := u.do(t, http.MethodGet, path, hdr...)
				if a.err != nil || a.status != c.status {
					t.Fatalf("Range %q: %d %v %q", c.rng, a.status, a.err, truncate(a.body))
				}
				if got := a.header.Get("Content-Range"); got != c.contentRange {
					t.Errorf("Content-Range %q, want %q", got, c.contentRange)
				}
				if c.status == 416 {
					return
				}
				if !bytes.Equal(a.body, im.layer[c.from:c.to]) || a.header.Get("Content-Length") != strconv.Itoa(c.to-c.from) {
					t.Errorf("%d bytes (Content-Length %s), want bytes %d to %d", len(a.body), a.header.Get("Content-Length"), c.from, c.to)
				}
				if a.header.Get("Content-Type") != "application/octet-stream" || a.header.Get("Docker-Content-Digest") != d.String() ||
					a.header.Get("Accept-Ranges") != "bytes" || a.header.Get("Etag") != `"`+d.String()+`"` {
					t.Errorf("headers %v", a.header)
				}
			})
		}
	}

	t.Run("several ranges, cold", func(t *testing.T) {
		u := newUnit(t, slowBlobs)
		a := u.do(t, http.MethodGet, path, "Range", "bytes=0-9,500-519")
		mt, params, err := mime.ParseMediaType(a.header.Get("Content-Type"))
		if a.status != 206 || err != nil || mt != "multipart/byteranges" {
			t.Fatalf("%d %q %v", a.status, a.header.Get("Content-Type"), err)
		}
		mr := multipart.NewReader(bytes.NewReader(a.body), params["boundary"])
		for _, want := range [][2]int{{0, 10}, {500, 520}} {
			p, err := mr.NextPart()
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(p)
			if !bytes.Equal(got, im.layer[want[0]:want[1]]) || p.Header.Get("Content-Range") != fmt.Sprintf("bytes %d-%d/%d", want[0], want[1]-1, size) {
				t.Errorf("part %q: %d bytes, want bytes %d to %d", p.Header.Get("Content-Range"), len(got), want[0], want[1])
			}
		}
	})
	t.Run("If-None-Match, warm", func(t *testing.T) {
		u := newUnit(t, nil)
		u.do(t, http.MethodGet, path)
		waitStored(t, u.store, d)
		if a := u.do(t, http.MethodGet, path, "If-None-Match", `"`+d.String()+`"`); a.status != http.StatusNotModified || len(a.body) != 0 {
			t.Fatalf("If-None-Match with the blob's Etag: %d, %d bytes", a.status, len(a.body))
		}
	})
}

// slowBlobs makes the source's blob bytes start 20 ms after it answered, so that a request is
// served while its fetch is under way.
func slowBlobs(h *hooked) {
	h.open = func(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
		c, err := h.Source.Open(ctx, obj, offset)
		if err == nil && obj.Kind == source.KindBlob {
			c.ReadCloser = &slowStart{ReadCloser: c.ReadCloser}
		}
		return c, err
	}
}

type slowStart struct {
	io.ReadCloser
	started bool
}

func (s *slowStart) Read(p []byte) (int, error) {
	if !s.started {
		time.Sleep(20 * time.Millisecond)
		s.started = true
	}
	return s.ReadCloser.Read(p)
}

func waitStored(t *testing.T, s *content.Store, d digest.Digest) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, err := s.Stat(d); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not in the store", d)
		}
	}
}

func truncate(b []byte) string {
	if len(b) > 200 {
		return string(b[:200]) + "..."
	}
	return string(b)
}

// HEAD of a blob says what GET would send, without a body and without fetching it.
func TestBlobHead(t *testing.T) {
	u := newUnit(t, nil)
	d := digest.FromBytes(u.im.layer)
	path := "/v2/team/app/blobs/" + d.String() + "?ns=" + ns
	check := func(what string, a answer) {
		t.Helper()
		h := a.header
		if a.status != 200 || len(a.body) != 0 || h.Get("Content-Length") != strconv.Itoa(len(u.im.layer)) ||
			h.Get("Content-Type") != "application/octet-stream" || h.Get("Docker-Content-Digest") != d.String() ||
			h.Get("Etag") != `"`+d.String()+`"` || h.Get("Accept-Ranges") != "bytes" {
			t.Errorf("%s: %d, %d bytes, %v", what, a.status, len(a.body), h)
		}
	}
	check("HEAD, cold", u.do(t, http.MethodHead, path))
	if n := u.src.opens.Load(); n != 0 {
		t.Fatalf("HEAD opened the blob on the source %d times", n)
	}
	if _, err := u.store.Stat(d); err == nil {
		t.Fatal("HEAD fetched the blob into the store")
	}
	u.do(t, http.MethodGet, path)
	waitStored(t, u.store, d)
	check("HEAD, warm", u.do(t, http.MethodHead, path))
	check("HEAD with a Range", u.do(t, http.MethodHead, path, "Range", "bytes=0-9"))
}

// The mirror is pull-only: GET and HEAD, and every other method refused with 405, its Allow header
// and UNSUPPORTED, whatever the path.
func TestMethods(t *testing.T) {
	u := newUnit(t, nil)
	layer := "/v2/team/app/blobs/" + digest.FromBytes(u.im.layer).String() + "?ns=" + ns
	for _, path := range []string{"/v2/", "/v2", "/v2/team/app/manifests/oci?ns=" + ns, layer, "/v2/team/app/blobs/uploads/?ns=" + ns, "/v2/Bad/Name/manifests/x"} {
		for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions, "PROPFIND"} {
			a := u.do(t, method, path)
			checkError(t, method+" "+path, a, http.MethodGet, http.StatusMethodNotAllowed, "UNSUPPORTED")
			if a.header.Get("Allow") != "GET, HEAD" {
				t.Errorf("%s %s: Allow %q, want GET, HEAD", method, path, a.header.Get("Allow"))
			}
			if a.header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
				t.Errorf("%s %s: no Docker-Distribution-API-Version", method, path)
			}
		}
	}
	for _, method := range bothMethods {
		for _, path := range []string{"/v2/", "/v2"} {
			a := u.do(t, method, path)
			wantBody := map[string]string{http.MethodGet: "{}", http.MethodHead: ""}[method]
			if a.status != 200 || string(a.body) != wantBody || a.header.Get("Content-Type") != "application/json" ||
				a.header.Get("Content-Length") != "2" || a.header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
				t.Errorf("%s %s: %d %q %v", method, path, a.status, a.body, a.header)
			}
		}
		if a := u.do(t, method, layer); a.status != 200 {
			t.Errorf("%s of a blob: %d", method, a.status)
		}
	}
	// Outside /v2/ there is nothing, and no OCI error either.
	if a := u.do(t, http.MethodGet, "/v1/"); a.status != 404 || strings.HasPrefix(a.header.Get("Content-Type"), "application/json") {
		t.Errorf("GET /v1/: %d %q", a.status, a.header.Get("Content-Type"))
	}
}

// TestCorruptManifestFallsThrough: a source whose copy of a manifest does not verify is told why and
// passed over in the same request; the client gets the manifest from the next source, not an error.
// Only copies that keep failing verification end in an error, after a bounded number of tries.
func TestCorruptManifestFallsThrough(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt int32 // how many opens answer with a corrupt copy
		status  int
	}{
		{"one corrupt copy", 1, http.StatusOK},
		{"every copy corrupt", 100, http.StatusBadGateway},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rejected atomic.Int32
			u := newUnit(t, func(h *hooked) {
				h.open = func(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
					c, err := h.Source.Open(ctx, obj, offset)
					if err != nil || obj.Kind != source.KindManifest || h.opens.Load() > tc.corrupt {
						return c, err
					}
					body, err := io.ReadAll(c)
					c.Close()
					if err != nil {
						return nil, err
					}
					body[len(body)/2] ^= 0xff
					return &source.Content{ReadCloser: io.NopCloser(bytes.NewReader(body)), Descriptor: c.Descriptor,
						Source: "bucket", Untrusted: true, Reject: func(error) { rejected.Add(1) }}, nil
				}
			})
			d := digest.FromBytes(u.im.oci)
			a := u.do(t, http.MethodGet, "/v2/team/app/manifests/"+d.String()+"?ns="+ns, "Accept", allManifestTypes)
			if a.status != tc.status {
				t.Fatalf("GET a manifest whose first %d copies are corrupt: %d, want %d (%s)", tc.corrupt, a.status, tc.status, a.body)
			}
			if tc.status == http.StatusOK && !bytes.Equal(a.body, u.im.oci) {
				t.Error("the manifest served is not the one asked for")
			}
			if want := min(tc.corrupt, 3); rejected.Load() != want {
				t.Errorf("the source was told %d times, want %d", rejected.Load(), want)
			}
			if _, err := u.store.Stat(d); (err == nil) != (tc.status == http.StatusOK) {
				t.Errorf("store holds the manifest: %v; it should only when it verified", err == nil)
			}
		})
	}
}

// A client gets the answer's status and headers at once, while the blob's bytes are still held
// back (untrusted bytes waiting to verify), so that containerd, which gives a mirror 30 s to answer
// and then pulls from the registry itself, does not give up on a blob that is on its way.
func TestBlobHeadersBeforeItsBytes(t *testing.T) {
	gate := make(chan struct{})
	var open sync.Once
	release := func() { open.Do(func() { close(gate) }) }
	u := newUnit(t, func(h *hooked) {
		h.open = func(ctx context.Context, obj source.Object, offset int64) (*source.Content, error) {
			c, err := h.Source.Open(ctx, obj, offset)
			if err != nil || obj.Kind != source.KindBlob {
				return c, err
			}
			// An untrusted source that sends its first half, then waits.
			half, orig := c.Descriptor.Size/2, c.ReadCloser
			body := io.MultiReader(io.LimitReader(orig, half-offset), gateReader(gate), orig)
			c.ReadCloser, c.Untrusted = struct {
				io.Reader
				io.Closer
			}{body, orig}, true
			return c, nil
		}
	})
	t.Cleanup(release) // before the server's and the store's, which wait for the fetch
	d := digest.FromBytes(u.im.layer)
	client := &http.Client{Transport: &http.Transport{ResponseHeaderTimeout: 2 * time.Second}}
	resp, err := client.Get(u.url + "/v2/team/app/blobs/" + d.String() + "?ns=" + ns)
	if err != nil {
		t.Fatalf("no answer while the blob's bytes are held back: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.ContentLength != int64(len(u.im.layer)) {
		t.Fatalf("status %d, length %d; want 200 and %d", resp.StatusCode, resp.ContentLength, len(u.im.layer))
	}
	release()
	body, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(body, u.im.layer) {
		t.Fatalf("body: %d bytes, %v", len(body), err)
	}
}

// gateReader reads nothing until gate is closed, then ends.
type gateReader chan struct{}

func (g gateReader) Read([]byte) (int, error) {
	<-g
	return 0, io.EOF
}
