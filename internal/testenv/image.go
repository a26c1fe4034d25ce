package testenv

import (
	"archive/tar"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// Layer describes one layer of a test image: a tar holding one file of Size random bytes. Random
// content does not compress, so the gzipped layer blob is about Size bytes too, and every layer is
// new to every cache.
type Layer struct{ Size int64 }

// PushImage builds an image of the given layers with the real crane (an empty base plus one
// `crane append -f layer.tar` per layer, Docker schema 2 media types, as crane makes them), pushes
// it to ref over plain HTTP, and returns its manifest digest as the registry reports it.
// ref names a registry on 127.0.0.1, e.g. reg.Host+"/team/app:v1".
func PushImage(t testing.TB, ref string, layers ...Layer) digest.Digest {
	t.Helper()
	return PushImageOnBase(t, "", ref, layers...)
}

// PushImageOnBase is PushImage with the layers appended to the image base (pulled over plain HTTP),
// whose configuration the new image keeps: its entrypoint runs, e.g. in a pod. An empty base is
// PushImage's empty image.
func PushImageOnBase(t testing.TB, base, ref string, layers ...Layer) digest.Digest {
	t.Helper()
	crane := Tool(t, "crane")
	dir := t.TempDir()
	args := []string{"append", "--insecure", "-t", ref}
	if base != "" {
		args = append(args, "-b", base)
	}
	for i, l := range layers {
		p := filepath.Join(dir, fmt.Sprintf("layer%d.tar", i))
		if err := writeLayerTar(p, fmt.Sprintf("data/file%d.bin", i), l.Size); err != nil {
			t.Fatal(err)
		}
		args = append(args, "-f", p)
	}
	runCrane(t, crane, args...)
	return craneDigest(t, crane, ref)
}

// PushIndex pushes a multi-platform OCI image index to ref, with one single-layer image (64 KiB of
// random data) per platform ("linux/amd64", "linux/arm64/v8", ...), and returns the index digest.
// The per-platform images are pushed by digest into ref's repository; only ref's tag names the
// index.
func PushIndex(t testing.TB, ref string, platforms ...string) digest.Digest {
	t.Helper()
	crane := Tool(t, "crane")
	repo := repository(ref)
	dir := t.TempDir()
	args := []string{"index", "append", "--insecure", "-t", ref}
	for i, platform := range platforms {
		p := filepath.Join(dir, fmt.Sprintf("layer%d.tar", i))
		if err := writeLayerTar(p, "data/platform.bin", 64<<10); err != nil {
			t.Fatal(err)
		}
		// crane can only append to a tag, and sets the platform in a second step that pushes a new
		// manifest; ref's tag is reused for that and moved to the index at the end.
		runCrane(t, crane, "append", "--insecure", "--oci-empty-base", "-t", ref, "-f", p)
		runCrane(t, crane, "mutate", "--insecure", "--set-platform", platform, ref)
		args = append(args, "-m", repo+"@"+craneDigest(t, crane, ref).String())
	}
	runCrane(t, crane, args...)
	return craneDigest(t, crane, ref)
}

// repository strips the tag or digest from an image reference.
func repository(ref string) string {
	if i := strings.Index(ref, "@"); i >= 0 {
		return ref[:i]
	}
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		return ref[:i]
	}
	return ref
}

func runCrane(t testing.TB, crane string, args ...string) string {
	t.Helper()
	out, err := exec.Command(crane, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("crane %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func craneDigest(t testing.TB, crane, ref string) digest.Digest {
	t.Helper()
	var stderr strings.Builder
	cmd := exec.Command(crane, "digest", "--insecure", ref)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("crane digest %s: %v\n%s", ref, err, stderr.String())
	}
	d, err := digest.Parse(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("crane digest %s: %q: %v", ref, out, err)
	}
	return d
}

// writeLayerTar writes a layer tar holding the directory data/ and one file of size random bytes.
func writeLayerTar(path, name string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	err = tw.WriteHeader(&tar.Header{Name: "data/", Typeflag: tar.TypeDir, Mode: 0o755})
	if err == nil {
		err = tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size})
	}
	if err == nil {
		_, err = io.CopyN(tw, rand.Reader, size)
	}
	if err == nil {
		err = tw.Close()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
