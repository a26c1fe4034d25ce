package gateway_test

import (
	"context"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/distribution/reference"
	"storj.io/uplink"

	"github.com/imagemesh/imagemesh/internal/gateway"
	"github.com/imagemesh/imagemesh/internal/testenv"
	storjsource "github.com/imagemesh/imagemesh/pkg/source/storj"
	"github.com/imagemesh/imagemesh/pkg/storage/static"
)

const dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"

// A gateway on a real Storj network: a push with StaticLayout returns once the static layout holds the
// image, the Storj source reads what the gateway wrote, and Export writes the static layout of an
// image pushed without it. A bucket that does not exist is refused before anything is served.
func TestStorj(t *testing.T) {
	network := testenv.StartStorj(t)
	bucket := network.Bucket(t, "images")
	accessFile := filepath.Join(t.TempDir(), "access")
	if err := os.WriteFile(accessFile, []byte(network.Access+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	layout := gateway.StorjLayout{AccessFile: accessFile, Bucket: bucket, Prefix: "registry"}
	ctx := context.Background()
	start := func(staticLayout bool) string {
		t.Helper()
		g, err := gateway.New(ctx, gateway.Config{Storage: gateway.StorageStorj, Storj: layout, StaticLayout: staticLayout}, nil)
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(g)
		t.Cleanup(func() { srv.Close(); g.Close() })
		return srv.Listener.Addr().String()
	}
	project := network.Project(t)
	staticManifest := func(repo, tag string) (string, []byte, error) {
		t.Helper()
		dl, err := project.DownloadObject(ctx, bucket, "v2/"+repo+"/manifests/"+tag, nil)
		if err != nil {
			return "", nil, err
		}
		defer dl.Close()
		b, err := io.ReadAll(dl)
		return dl.Info().Custom[static.ContentTypeKey], b, err
	}

	t.Run("StaticLayoutOnPush", func(t *testing.T) {
		gw := start(true)
		pushed := testenv.PushImage(t, gw+"/team/app:v1", testenv.Layer{Size: 1 << 20})
		mediaType, body, err := staticManifest("team/app", "v1")
		if err != nil || mediaType != dockerManifest || string(body) != get(t, "http://"+gw+"/v2/team/app/manifests/"+pushed.String()) {
			t.Fatalf("static manifest of team/app:v1 when the push returned: %q, %d bytes, %v", mediaType, len(body), err)
		}

		src, err := storjsource.New(storjsource.Options{Access: network.Access, Bucket: bucket, Prefix: "registry"})
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		repo, _ := reference.ParseNamed("example.test/team/app")
		if desc, err := src.Resolve(ctx, repo, "v1"); err != nil || desc.Digest != pushed {
			t.Fatalf("the Storj source reads team/app:v1 as %v, %v; pushed %s", desc.Digest, err, pushed)
		}
	})

	t.Run("Export", func(t *testing.T) {
		gw := start(false)
		testenv.PushImage(t, gw+"/team/other:v2", testenv.Layer{Size: 64 << 10})
		if _, _, err := staticManifest("team/other", "v2"); err == nil {
			t.Fatal("a gateway without StaticLayout wrote the static layout")
		} else if !strings.Contains(err.Error(), uplink.ErrObjectNotFound.Error()) {
			t.Fatalf("static manifest: %v", err)
		}
		exported, err := layout.Export(ctx, "", []string{"team/other"})
		if err != nil || len(exported) != 1 || exported[0] != "team/other:v2" {
			t.Fatalf("Export(team/other) = %v, %v", exported, err)
		}
		if mediaType, _, err := staticManifest("team/other", "v2"); err != nil || mediaType != dockerManifest {
			t.Fatalf("static manifest after Export: %q %v", mediaType, err)
		}
		if _, err := layout.Export(ctx, "", nil); err == nil {
			t.Fatal("Export of no repository succeeded")
		}
		if exported, err := layout.Export(ctx, "", []string{"team/other", "team/none"}); err == nil || len(exported) != 1 {
			t.Fatalf("Export of a repository with no tags after one with tags: %v, %v; want the first, and an error", exported, err)
		}
	})

	t.Run("MissingBucket", func(t *testing.T) {
		missing := layout
		missing.Bucket = "no-such-bucket"
		g, err := gateway.New(ctx, gateway.Config{Storage: gateway.StorageStorj, Storj: missing}, nil)
		if err == nil {
			g.Close()
			t.Fatal("a gateway on a bucket that does not exist started")
		}
		if !strings.Contains(err.Error(), "does not exist") {
			t.Fatalf("missing bucket: %v", err)
		}
	})
}
