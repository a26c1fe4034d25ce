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

// Layer describes one layer of a test image: a tar with one file of Size random bytes. Random
// content does not compress, so the layer blob is about Size bytes too.
type Layer struct{ Size int64 }

// PushImage builds an image of the given layers with crane, pushes it to ref (a registry on
// 127.0.0.1, plain HTTP) and returns the manifest's digest.
func PushImage(t testing.TB, ref string, layers ...Layer) digest.Digest {
	t.Helper()
	crane := Tool(t, "crane")
	dir := t.TempDir()
	args := []string{"append", "--insecure", "-t", ref}
	for i, l := range layers {
		p := filepath.Join(dir, fmt.Sprintf("layer%d.tar", i))
		if err := writeLayerTar(p, fmt.Sprintf("data/file%d.bin", i), l.Size); err != nil {
			t.Fatal(err)
		}
		args = append(args, "-f", p)
	}
	if out, err := exec.Command(crane, args...).CombinedOutput(); err != nil {
		t.Fatalf("crane append to %s: %v\n%s", ref, err, out)
	}
	out, err := exec.Command(crane, "digest", "--insecure", ref).CombinedOutput()
	if err != nil {
		t.Fatalf("crane digest %s: %v\n%s", ref, err, out)
	}
	d, err := digest.Parse(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("crane digest %s: %q: %v", ref, out, err)
	}
	return d
}

func writeLayerTar(path, name string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	if err := tw.WriteHeader(&tar.Header{Name: "data/", Typeflag: tar.TypeDir, Mode: 0o755}); err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size}); err != nil {
		return err
	}
	if _, err := io.CopyN(tw, rand.Reader, size); err != nil {
		return err
	}
	return tw.Close()
}
