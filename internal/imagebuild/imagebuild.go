// Package imagebuild builds the OCI images of imagemesh's commands from source, with
// go-containerregistry: no container runtime, no base image, nothing pulled.
//
// Invariants:
//   - An image holds one static, stripped binary at /usr/bin/<name>, its entrypoint, and the CA
//     certificates at /etc/ssl/certs/ca-certificates.crt, where Go's crypto/x509 looks first; nothing
//     else. One layer; every entry owned by 0:0, directories and the binary 0755, the certificates 0644.
//   - The same commit, Go toolchain, CA file and epoch give the same bytes, hence the same digests:
//     binaries are built with CGO_ENABLED=0, -trimpath and without VCS stamping; every timestamp (tar
//     entries, the config's created and history, the created annotation) is the epoch; tar entries are
//     sorted; gzip writes no name and no time; the index lists platforms in the order given.
//   - One OCI image index per command, one OCI manifest per platform. The index, each manifest and the
//     config carry the org.opencontainers.image.* source, revision, version and created values.
package imagebuild

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"sigs.k8s.io/yaml"
)

// Command is one command packaged as an image.
type Command struct {
	// Name is the image's name under the repository, and the binary's.
	Name string
	// Package is the Go package of its main, relative to the module's root.
	Package string
	// User is the config's User.
	User string
}

// Commands are the images `make images` builds. The agent runs as root (the chart says so too,
// runAsUser: 0): it writes containerd's hosts.toml and the cache on the node.
var Commands = []Command{
	{Name: "node-agent", Package: "./cmd/node-agent", User: "0"},
	{Name: "controller", Package: "./cmd/controller", User: "65532"},
	{Name: "imagemesh", Package: "./cmd/imagemesh", User: "65532"},
}

// Platforms are the platforms every image is built for.
var Platforms = []v1.Platform{{OS: "linux", Architecture: "amd64"}, {OS: "linux", Architecture: "arm64"}}

const (
	// CACerts is where Debian's ca-certificates package keeps the bundle, and where images hold it.
	CACerts = "/etc/ssl/certs/ca-certificates.crt"
	// SourceURL is the org.opencontainers.image.source of every image.
	SourceURL = "https://github.com/imagemesh/imagemesh"
	// VersionVar is the variable the binaries' version is stamped into.
	VersionVar = "github.com/imagemesh/imagemesh/internal/agent.Version"
)

// Options say what to build and how to name it.
type Options struct {
	// ModuleDir is the module's root, where go build runs ("" for the working directory).
	ModuleDir string
	// WorkDir receives the binaries; the layers read them until the images are written.
	WorkDir   string
	Commands  []Command
	Platforms []v1.Platform
	// Repository and Tag name the images: Repository/<name>:Tag.
	Repository, Tag string
	// Version is stamped into the binaries (VersionVar); Revision is the commit.
	Version, Revision string
	// Created is the time of every timestamp in the images: SOURCE_DATE_EPOCH, or the commit's time.
	Created time.Time
	// CACerts is the certificate bundle to copy into the images (default CACerts).
	CACerts string
	// Go is the go command (default "go").
	Go string
}

// Image is one built command: a multi-platform index.
type Image struct {
	Command Command
	// Ref is Repository/<name>:Tag.
	Ref, Tag  string
	Index     v1.ImageIndex
	Platforms []PlatformImage
}

// PlatformImage is one platform's image in an index.
type PlatformImage struct {
	Platform v1.Platform
	Digest   v1.Hash
	// CompressedSize is the sum of the compressed sizes of the image's layers: what a pull transfers.
	CompressedSize int64
}

// Build compiles every command for every platform and assembles their images. The images read the
// binaries in WorkDir until they are written (layout.Write, remote.Write).
func Build(ctx context.Context, o Options) ([]*Image, error) {
	if o.Go == "" {
		o.Go = "go"
	}
	if o.CACerts == "" {
		o.CACerts = CACerts
	}
	if _, err := os.Stat(o.CACerts); err != nil {
		return nil, fmt.Errorf("CA certificates: %w (Debian's ca-certificates package holds them; hack/test-deps.sh installs it)", err)
	}
	if o.Created.IsZero() || o.Tag == "" || o.Repository == "" {
		return nil, errors.New("imagebuild: Created, Repository and Tag are required")
	}
	created := o.Created.UTC().Truncate(time.Second)
	annotations := map[string]string{
		"org.opencontainers.image.source":   SourceURL,
		"org.opencontainers.image.revision": o.Revision,
		"org.opencontainers.image.version":  o.Tag,
		"org.opencontainers.image.created":  created.Format(time.RFC3339),
	}

	bins := map[string]string{} // platform/name → binary
	for _, p := range o.Platforms {
		dir := filepath.Join(o.WorkDir, p.OS+"_"+p.Architecture)
		if err := goBuild(ctx, o, p, dir); err != nil {
			return nil, err
		}
		for _, c := range o.Commands {
			bins[p.String()+"/"+c.Name] = filepath.Join(dir, path.Base(c.Package))
		}
	}

	var out []*Image
	for _, c := range o.Commands {
		im := &Image{Command: c, Ref: fmt.Sprintf("%s/%s:%s", o.Repository, c.Name, o.Tag), Tag: o.Tag}
		anns := map[string]string{"org.opencontainers.image.title": c.Name}
		for k, v := range annotations {
			anns[k] = v
		}
		idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
		for _, p := range o.Platforms {
			img, size, err := platformImage(c, p, bins[p.String()+"/"+c.Name], o.CACerts, created, anns)
			if err != nil {
				return nil, fmt.Errorf("%s for %s: %w", c.Name, p, err)
			}
			d, err := img.Digest()
			if err != nil {
				return nil, fmt.Errorf("%s for %s: %w", c.Name, p, err)
			}
			im.Platforms = append(im.Platforms, PlatformImage{Platform: p, Digest: d, CompressedSize: size})
			idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &p}})
		}
		im.Index = mutate.Annotations(idx, anns).(v1.ImageIndex)
		out = append(out, im)
	}
	return out, nil
}

// goBuild builds every command for p into dir, as `make build` does, plus what reproducibility asks.
func goBuild(ctx context.Context, o Options, p v1.Platform, dir string) error {
	args := []string{"build", "-trimpath", "-buildvcs=false",
		"-ldflags", "-s -w -X " + VersionVar + "=" + o.Version, "-o", dir + string(filepath.Separator)}
	for _, c := range o.Commands {
		args = append(args, c.Package)
	}
	cmd := exec.CommandContext(ctx, o.Go, args...)
	cmd.Dir = o.ModuleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+p.OS, "GOARCH="+p.Architecture)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build for %s: %w\n%s", p, err, out)
	}
	return nil
}

// platformImage is one command's image for one platform, and its compressed layer size.
func platformImage(c Command, p v1.Platform, bin, caCerts string, created time.Time, anns map[string]string) (v1.Image, int64, error) {
	entry := "/usr/bin/" + c.Name
	files := []tarEntry{
		{name: "etc/", mode: 0o755},
		{name: "etc/ssl/", mode: 0o755},
		{name: "etc/ssl/certs/", mode: 0o755},
		{name: strings.TrimPrefix(CACerts, "/"), mode: 0o644, src: caCerts},
		{name: "usr/", mode: 0o755},
		{name: "usr/bin/", mode: 0o755},
		{name: strings.TrimPrefix(entry, "/"), mode: 0o755, src: bin},
	}
	sort.Slice(files, func(i, j int) bool { return files[i].name < files[j].name })
	layer, err := tarball.LayerFromOpener(tarOpener(files, created),
		tarball.WithCompressionLevel(gzip.BestCompression), tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, 0, err
	}
	size, err := layer.Size()
	if err != nil {
		return nil, 0, err
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, History: v1.History{
		Created:   v1.Time{Time: created},
		CreatedBy: "hack/images: go build " + c.Package,
	}})
	if err != nil {
		return nil, 0, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, 0, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
	cf.Created = v1.Time{Time: created}
	cf.Config = v1.Config{Entrypoint: []string{entry}, User: c.User, WorkingDir: "/", Labels: anns}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, 0, err
	}
	return mutate.Annotations(img, anns).(v1.Image), size, nil
}

type tarEntry struct {
	name string
	mode int64
	src  string // a regular file's content; "" for a directory
}

// tarOpener streams the layer's tar: ggcr opens it more than once (compression check, digests).
func tarOpener(files []tarEntry, mtime time.Time) tarball.Opener {
	return func() (io.ReadCloser, error) {
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(writeTar(pw, files, mtime)) }()
		return pr, nil
	}
}

func writeTar(w io.Writer, files []tarEntry, mtime time.Time) error {
	tw := tar.NewWriter(w)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: f.mode, ModTime: mtime, Typeflag: tar.TypeDir}
		var content *os.File
		if f.src != "" {
			var err error
			if content, err = os.Open(f.src); err != nil {
				return err
			}
			st, err := content.Stat()
			if err != nil {
				_ = content.Close() // read-only
				return err
			}
			h.Typeflag, h.Size = tar.TypeReg, st.Size()
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if content != nil {
			_, err := io.Copy(tw, content)
			_ = content.Close() // read-only
			if err != nil {
				return err
			}
		}
	}
	return tw.Close()
}

// ChartDefaults are the chart's default image repository (values.yaml image.repository) and tag
// (Chart.yaml appVersion): what the images are named unless told otherwise.
func ChartDefaults(chartDir string) (repository, tag string, err error) {
	var chart struct {
		AppVersion string `json:"appVersion"`
	}
	var values struct {
		Image struct {
			Repository string `json:"repository"`
		} `json:"image"`
	}
	for file, into := range map[string]any{"Chart.yaml": &chart, "values.yaml": &values} {
		b, err := os.ReadFile(filepath.Join(chartDir, file))
		if err != nil {
			return "", "", err
		}
		if err := yaml.Unmarshal(b, into); err != nil {
			return "", "", fmt.Errorf("%s: %w", filepath.Join(chartDir, file), err)
		}
	}
	if chart.AppVersion == "" || values.Image.Repository == "" {
		return "", "", fmt.Errorf("%s: no appVersion in Chart.yaml or no image.repository in values.yaml", chartDir)
	}
	return values.Image.Repository, chart.AppVersion, nil
}
