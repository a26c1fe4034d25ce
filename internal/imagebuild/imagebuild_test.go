package imagebuild

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// hello stands in for the real commands: the invariants are the pipeline's, and a small program
// keeps the test fast (the second build comes from the Go build cache).
var hello = Command{Name: "hello", Package: "./internal/imagebuild/testdata/hello", User: "65532"}

func testOptions(t *testing.T, created time.Time) Options {
	t.Helper()
	ca := filepath.Join(t.TempDir(), "ca.crt")
	if err := os.WriteFile(ca, []byte("-----BEGIN CERTIFICATE-----\nnot one, but bytes to copy\n-----END CERTIFICATE-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return Options{ModuleDir: "../..", WorkDir: t.TempDir(), Commands: []Command{hello}, Platforms: Platforms,
		Repository: "registry.test/imagemesh", Tag: "0.0.1", Version: "v0.0.1-test", Revision: "0123abcd",
		Created: created, CACerts: ca}
}

func build(t *testing.T, o Options) *Image {
	t.Helper()
	// Build runs the go command for every platform: child compilers on the machine's cores, and the
	// Go build cache written (cold for linux/arm64 on most machines); not for the unit tier.
	testenv.SkipShort(t, "go build for linux/amd64 and linux/arm64")
	images, err := Build(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if len(images) != 1 {
		t.Fatalf("%d images, want 1", len(images))
	}
	return images[0]
}

func indexDigest(t *testing.T, im *Image) v1.Hash {
	t.Helper()
	d, err := im.Index.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// Two builds of the same source, in different directories, give the same digests and the same layout
// files; another epoch gives another digest (the timestamps are the epoch, not the clock).
func TestBuildReproducible(t *testing.T) {
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	o := testOptions(t, created)
	first := build(t, o)
	o.WorkDir = t.TempDir()
	second := build(t, o)
	if a, b := indexDigest(t, first), indexDigest(t, second); a != b {
		t.Fatalf("two builds of the same source: index %s, then %s", a, b)
	}
	for i := range first.Platforms {
		if a, b := first.Platforms[i], second.Platforms[i]; a.Digest != b.Digest || a.CompressedSize != b.CompressedSize {
			t.Errorf("two builds: %+v, then %+v", first.Platforms[i], second.Platforms[i])
		}
	}
	dirs := []string{filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")}
	for i, im := range []*Image{first, second} {
		if err := WriteLayout(dirs[i], []*Image{im}); err != nil {
			t.Fatal(err)
		}
	}
	a, _ := os.ReadFile(filepath.Join(dirs[0], "hello", "index.json"))
	b, _ := os.ReadFile(filepath.Join(dirs[1], "hello", "index.json"))
	if len(a) == 0 || !bytes.Equal(a, b) {
		t.Fatalf("two layouts' index.json differ:\n%s\n%s", a, b)
	}

	later := testOptions(t, created.Add(time.Second))
	if d := indexDigest(t, build(t, later)); d == indexDigest(t, first) {
		t.Fatalf("a build with another epoch has the same digest %s: timestamps are not the epoch", d)
	}
}

// What an image holds and says: the binary and the CA bundle, owned by root, stamped with the epoch;
// a static binary that runs; the config and annotations.
func TestImageContent(t *testing.T) {
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	o := testOptions(t, created)
	dir := filepath.Join(t.TempDir(), "layout")
	if err := WriteLayout(dir, []*Image{build(t, o)}); err != nil {
		t.Fatal(err)
	}
	// Read back what was written, as a consumer of the layout does.
	lp, err := layout.FromPath(filepath.Join(dir, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	top, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	tm, err := top.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(tm.Manifests) != 1 || tm.Manifests[0].Annotations[AnnotationRefName] != "0.0.1" ||
		tm.Manifests[0].Annotations[AnnotationImageName] != "registry.test/imagemesh/hello:0.0.1" {
		t.Fatalf("index.json: %+v", tm.Manifests)
	}
	idx, err := top.ImageIndex(tm.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"org.opencontainers.image.source": SourceURL, "org.opencontainers.image.revision": "0123abcd",
		"org.opencontainers.image.version": "0.0.1", "org.opencontainers.image.created": "2026-01-02T03:04:05Z",
		"org.opencontainers.image.title": "hello",
	}
	if !maps.Equal(im.Annotations, want) {
		t.Errorf("index annotations %v, want %v", im.Annotations, want)
	}
	var platforms []string
	for _, d := range im.Manifests {
		platforms = append(platforms, d.Platform.String())
	}
	if !slices.Equal(platforms, []string{"linux/amd64", "linux/arm64"}) {
		t.Errorf("platforms %v", platforms)
	}

	for _, d := range im.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cf.OS != "linux" || cf.Architecture != d.Platform.Architecture || !cf.Created.Equal(created) ||
			!slices.Equal(cf.Config.Entrypoint, []string{"/usr/bin/hello"}) || cf.Config.User != "65532" ||
			!maps.Equal(cf.Config.Labels, want) || len(cf.History) != 1 || !cf.History[0].Created.Equal(created) {
			t.Errorf("%s config: %+v", d.Platform, cf)
		}
		m, _ := img.Manifest()
		if !maps.Equal(m.Annotations, want) {
			t.Errorf("%s manifest annotations %v", d.Platform, m.Annotations)
		}
		layers, _ := img.Layers()
		if len(layers) != 1 {
			t.Fatalf("%s: %d layers, want 1", d.Platform, len(layers))
		}
		rc, err := layers[0].Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		var binary []byte
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			names = append(names, h.Name)
			mode := int64(0o755)
			if h.Name == "etc/ssl/certs/ca-certificates.crt" {
				mode = 0o644
			}
			if h.Uid != 0 || h.Gid != 0 || h.Mode != mode || !h.ModTime.Equal(created) {
				t.Errorf("%s: %s: uid %d gid %d mode %o mtime %s", d.Platform, h.Name, h.Uid, h.Gid, h.Mode, h.ModTime)
			}
			if h.Name == "usr/bin/hello" {
				binary, _ = io.ReadAll(tr)
			}
		}
		rc.Close()
		wantNames := []string{"etc/", "etc/ssl/", "etc/ssl/certs/", "etc/ssl/certs/ca-certificates.crt", "usr/", "usr/bin/", "usr/bin/hello"}
		if !slices.Equal(names, wantNames) {
			t.Errorf("%s: layer holds %v, want %v", d.Platform, names, wantNames)
		}
		ef, err := elf.NewFile(bytes.NewReader(binary))
		if err != nil {
			t.Fatalf("%s: the binary: %v", d.Platform, err)
		}
		for _, p := range ef.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s: the binary is dynamically linked", d.Platform)
			}
		}
		if ef.Section(".symtab") != nil {
			t.Errorf("%s: the binary is not stripped", d.Platform)
		}
		if d.Platform.Architecture == runtime.GOARCH && runtime.GOOS == "linux" {
			bin := filepath.Join(t.TempDir(), "hello")
			if err := os.WriteFile(bin, binary, 0o755); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command(bin).Output(); err != nil || string(out) != "hello:5000\n" {
				t.Errorf("the binary says %q, %v", out, err)
			}
		}
	}
}

// Push writes the index to a registry on 127.0.0.1 over plain HTTP without being told to.
func TestPush(t *testing.T) {
	reg := testenv.StartRegistry(t)
	o := testOptions(t, time.Unix(1700000000, 0))
	o.Repository = reg.Host + "/imagemesh"
	im := build(t, o)
	if err := Push(context.Background(), []*Image{im}, false); err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(reg.Host+"/imagemesh/hello:0.0.1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	got, err := remote.Index(ref)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := indexDigest(t, im), must(t, got.Digest); a != b {
		t.Fatalf("pushed %s, the registry has %s", a, b)
	}
}

func must[T any](t *testing.T, f func() (T, error)) T {
	t.Helper()
	v, err := f()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestLoopback(t *testing.T) {
	for ref, want := range map[string]bool{
		"localhost:5000/x/y:1": true, "127.0.0.1:5000/x/y:1": true, "[::1]:5000/x/y:1": true, "localhost/x:1": true,
		"registry.example:5000/x/y:1": false, "ghcr.io/imagemesh/node-agent:0.1.0": false, "10.0.0.1:5000/x:1": false,
	} {
		if got := loopback(ref); got != want {
			t.Errorf("loopback(%q) = %v, want %v", ref, got, want)
		}
	}
}
