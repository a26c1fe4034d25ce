package imagebuild

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Annotations that name an image's index in its OCI layout: the tag, which `skopeo copy
// oci:DIR:<tag>` selects, and the full reference, which `ctr images import` names the image by.
const (
	AnnotationRefName   = "org.opencontainers.image.ref.name"
	AnnotationImageName = "io.containerd.image.name"
)

// WriteLayout writes one OCI layout per image, at dir/<name>, that holds the image's index and
// nothing else: `crane push dir/<name> REF`, `skopeo copy --all oci:dir/<name>:<tag> ...` and
// `ctr images import` of its tar take it as it is. A directory that holds a layout (or nothing) is
// replaced; any other is refused.
func WriteLayout(dir string, images []*Image) error {
	for _, im := range images {
		d := filepath.Join(dir, im.Command.Name)
		if entries, err := os.ReadDir(d); err == nil && len(entries) > 0 {
			if _, err := os.Stat(filepath.Join(d, "oci-layout")); err != nil {
				return fmt.Errorf("%s exists and is not an OCI layout: not replacing it", d)
			}
		}
		if err := os.RemoveAll(d); err != nil {
			return err
		}
		p, err := layout.Write(d, empty.Index)
		if err != nil {
			return err
		}
		err = p.AppendIndex(im.Index, layout.WithAnnotations(map[string]string{
			AnnotationRefName:   im.Tag,
			AnnotationImageName: im.Ref,
		}))
		if err != nil {
			return fmt.Errorf("%s: %w", im.Ref, err)
		}
	}
	return nil
}

// Push writes every image's index to its reference, with the credentials of the docker config
// (authn.DefaultKeychain). Registries on localhost or a loopback address, and any with insecure,
// are reached over plain HTTP.
func Push(ctx context.Context, images []*Image, insecure bool) error {
	for _, im := range images {
		var opts []name.Option
		if insecure || loopback(im.Ref) {
			opts = append(opts, name.Insecure)
		}
		ref, err := name.ParseReference(im.Ref, opts...)
		if err != nil {
			return err
		}
		if err := remote.WriteIndex(ref, im.Index, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
			return fmt.Errorf("push %s: %w", im.Ref, err)
		}
	}
	return nil
}

// loopback says whether ref's registry is localhost or a loopback address.
func loopback(ref string) bool {
	host, _, _ := strings.Cut(ref, "/")
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return host == "localhost" || (ip != nil && ip.IsLoopback())
}

// Report prints each image's reference and index digest, and per platform its manifest digest and
// compressed size.
func Report(w io.Writer, images []*Image) error {
	for _, im := range images {
		d, err := im.Index.Digest()
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(w, "%s@%s\n", im.Ref, d); err != nil {
			return err
		}
		for _, p := range im.Platforms {
			if _, err := fmt.Fprintf(w, "  %-12s %s  %5.1f MB compressed\n", p.Platform.String(), p.Digest, float64(p.CompressedSize)/1e6); err != nil {
				return err
			}
		}
	}
	return nil
}
