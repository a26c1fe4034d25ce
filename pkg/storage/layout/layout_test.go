package layout_test

import (
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

// The paths are the ones distribution's registry writes: a layout pushed by any registry reads here.
func TestPaths(t *testing.T) {
	d := digest.Digest("sha256:" + "ab" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd")
	for got, want := range map[string]string{
		layout.BlobData(d):                         "/docker/registry/v2/blobs/sha256/ab/" + d.Encoded() + "/data",
		layout.TagCurrentLink("team/app", "v1"):    "/docker/registry/v2/repositories/team/app/_manifests/tags/v1/current/link",
		layout.ManifestRevisionLink("team/app", d): "/docker/registry/v2/repositories/team/app/_manifests/revisions/sha256/" + d.Encoded() + "/link",
		layout.LayerLink("team/app", d):            "/docker/registry/v2/repositories/team/app/_layers/sha256/" + d.Encoded() + "/link",
	} {
		if got != want {
			t.Errorf("got %s, want %s", got, want)
		}
	}
}

func TestParseLink(t *testing.T) {
	d := digest.FromString("manifest")
	for _, content := range []string{d.String(), d.String() + "\n", " " + d.String() + "\r\n"} {
		if got, err := layout.ParseLink([]byte(content)); err != nil || got != d {
			t.Errorf("ParseLink(%q) = %s, %v; want %s", content, got, err, d)
		}
	}
	for _, bad := range []string{"", "sha256:", "sha256:nothex", "not a link at all", d.String() + " " + d.String()} {
		if got, err := layout.ParseLink([]byte(bad)); err == nil {
			t.Errorf("ParseLink(%q) = %s, want an error", bad, got)
		}
	}
}
