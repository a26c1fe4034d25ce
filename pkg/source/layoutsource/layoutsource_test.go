package layoutsource_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/layoutsource"
	"github.com/imagemesh/imagemesh/pkg/source/sourcetest"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

const dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"

// dirFiles reads a layout kept in a directory, as distribution's filesystem driver keeps it: the
// smallest real backend. It honours its context as a network backend does.
type dirFiles struct{ root string }

func (d dirFiles) file(ctx context.Context, p string) (*os.File, int64, error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, fmt.Errorf("%w: %w", source.ErrUnavailable, err)
	}
	f, err := os.Open(filepath.Join(d.root, filepath.FromSlash(p)))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, fmt.Errorf("%w: %w", source.ErrNotFound, err)
	} else if err != nil {
		return nil, 0, fmt.Errorf("%w: %w", source.ErrUnavailable, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("%w: %w", source.ErrUnavailable, err)
	}
	if st.IsDir() {
		f.Close()
		return nil, 0, fmt.Errorf("%s is a directory: %w", p, source.ErrNotFound)
	}
	return f, st.Size(), nil
}

func (d dirFiles) ReadFile(ctx context.Context, p string, limit int64) ([]byte, error) {
	f, size, err := d.file(ctx, p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if size > limit {
		return nil, fmt.Errorf("%d bytes, over %d", size, limit)
	}
	return io.ReadAll(f)
}

func (d dirFiles) Size(ctx context.Context, p string) (int64, error) {
	f, size, err := d.file(ctx, p)
	if err != nil {
		return 0, err
	}
	f.Close()
	return size, nil
}

func (d dirFiles) Open(ctx context.Context, p string, offset int64) (io.ReadCloser, int64, error) {
	f, size, err := d.file(ctx, p)
	if err != nil {
		return nil, 0, err
	}
	if offset > size {
		f.Close()
		return nil, 0, fmt.Errorf("offset %d past the end (%d bytes)", offset, size)
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		f.Close()
		return nil, 0, err
	}
	return &ctxFile{ctx: ctx, File: f}, size, nil
}

type ctxFile struct {
	ctx context.Context
	*os.File
}

func (f *ctxFile) Read(p []byte) (int, error) {
	if err := f.ctx.Err(); err != nil {
		return 0, err
	}
	return f.File.Read(p)
}

// image is an image a real registry wrote into its storage directory.
type image struct {
	dir      string // the registry's storage root: the layout is under dir/docker/registry/v2
	repo     reference.Named
	manifest []byte
	layers   [][]byte
}

func pushed(t *testing.T, layers int) image {
	t.Helper()
	reg := testenv.StartRegistry(t)
	sizes := make([]testenv.Layer, layers)
	for i := range sizes {
		sizes[i] = testenv.Layer{Size: 256 << 10}
	}
	testenv.PushImage(t, reg.Host+"/team/app:v1", sizes...)
	img := image{dir: reg.Dir, manifest: get(t, reg.URL+"/v2/team/app/manifests/v1", dockerManifest)}
	img.repo, _ = reference.ParseNamed("example.test/team/app")
	var m struct {
		Layers []struct{ Digest digest.Digest }
	}
	if err := json.Unmarshal(img.manifest, &m); err != nil || len(m.Layers) != layers {
		t.Fatalf("manifest with %d layers: %v\n%s", layers, err, img.manifest)
	}
	for _, l := range m.Layers {
		img.layers = append(img.layers, get(t, reg.URL+"/v2/team/app/blobs/"+l.Digest.String(), ""))
	}
	return img
}

func get(t *testing.T, url, accept string) []byte {
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

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return c
}

// The base holds any backend to the contract: here over the layout a real registry wrote.
func TestContract(t *testing.T) {
	img := pushed(t, 1)
	src := layoutsource.New(dirFiles{img.dir}, layoutsource.Options{Name: "dir", Location: "dir " + img.dir})
	sourcetest.Run(t, sourcetest.Fixture{
		Source: src, Repo: img.repo, Tag: "v1", Manifest: img.manifest, MediaType: dockerManifest,
		Blob: img.layers[0], ResolvesTags: true,
	})
}

// A layout's bytes are untrusted. A digest whose bytes failed verification is not read from the layout
// again, while the others are; and the memory of such digests keeps MaxRejected of them at most,
// forgetting the one rejected longest ago first.
func TestRejectMemory(t *testing.T) {
	img := pushed(t, 3)
	src := layoutsource.New(dirFiles{img.dir}, layoutsource.Options{Name: "dir", Location: "dir " + img.dir, MaxRejected: 2})
	obj := func(i int) source.Object {
		return source.Object{Repo: img.repo, Kind: source.KindBlob, Digest: digest.FromBytes(img.layers[i])}
	}
	reject := func(i int) {
		t.Helper()
		c, err := src.Open(ctx(t), obj(i), 0)
		if err != nil {
			t.Fatalf("open layer %d: %v", i, err)
		}
		c.Close()
		if !c.Untrusted || c.Reject == nil {
			t.Fatal("a layout's bytes must be held back from clients until verified, and a failure reported")
		}
		c.Reject(errors.New("digest mismatch"))
	}
	rejected := func(i int) bool {
		t.Helper()
		c, err := src.Open(ctx(t), obj(i), 0)
		if err == nil {
			c.Close()
			return false
		}
		if !errors.Is(err, source.ErrNotFound) || !strings.Contains(err.Error(), "failed verification") {
			t.Fatalf("open layer %d: %v, want ErrNotFound saying why", i, err)
		}
		return true
	}

	reject(0)
	if !rejected(0) || rejected(1) {
		t.Fatal("want layer 0 rejected and layer 1 not")
	}
	if _, err := src.Stat(ctx(t), obj(0)); err != nil {
		t.Fatalf("Stat of a rejected blob: %v; only reading its bytes is skipped", err)
	}
	reject(1)
	reject(2) // over MaxRejected: layer 0, rejected first, is forgotten
	if rejected(0) || !rejected(1) || !rejected(2) {
		t.Fatal("with MaxRejected 2, want the last two layers rejected and the first forgotten")
	}
}

// failingFiles is a backend that cannot answer.
type failingFiles struct{}

var errDown = fmt.Errorf("%w: connection refused", source.ErrUnavailable)

func (failingFiles) ReadFile(context.Context, string, int64) ([]byte, error) { return nil, errDown }
func (failingFiles) Size(context.Context, string) (int64, error)             { return 0, errDown }
func (failingFiles) Open(context.Context, string, int64) (io.ReadCloser, int64, error) {
	return nil, 0, errDown
}

// Every error names the source, what it did and the path it read; a backend that is down is never
// "not found", and a corrupt layout is neither.
func TestErrors(t *testing.T) {
	repo, _ := reference.ParseNamed("example.test/team/app")
	d := digest.FromString("x")
	down := layoutsource.New(failingFiles{}, layoutsource.Options{Name: "down", Location: "nowhere"})
	_, rerr := down.Resolve(ctx(t), repo, "v1")
	_, serr := down.Stat(ctx(t), source.Object{Repo: repo, Digest: d})
	_, oerr := down.Open(ctx(t), source.Object{Repo: repo, Kind: source.KindManifest, Digest: d}, 0)
	t.Logf("backend down: %v", rerr)
	for _, err := range []error{rerr, serr, oerr} {
		var se *source.Error
		if !errors.As(err, &se) || se.Source != "down" || !errors.Is(err, source.ErrUnavailable) || errors.Is(err, source.ErrNotFound) ||
			!strings.Contains(err.Error(), layout.Root) {
			t.Errorf("backend down: %v", err)
		}
	}

	dir := t.TempDir()
	link := filepath.Join(dir, filepath.FromSlash(layout.TagCurrentLink("team/app", "v1")))
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(link, []byte("not a digest"), 0o644); err != nil {
		t.Fatal(err)
	}
	corrupt := layoutsource.New(dirFiles{dir}, layoutsource.Options{Name: "dir", Location: "dir " + dir})
	_, err := corrupt.Resolve(ctx(t), repo, "v1")
	if err == nil || errors.Is(err, source.ErrNotFound) || !strings.Contains(err.Error(), "dir "+dir) {
		t.Errorf("corrupt tag link: %v", err)
	}
	t.Logf("corrupt tag link: %v", err)
	if _, err := corrupt.Open(ctx(t), source.Object{Repo: repo, Digest: "sha256:short"}, 0); err == nil || errors.Is(err, source.ErrNotFound) {
		t.Errorf("invalid digest: %v", err)
	}
}
