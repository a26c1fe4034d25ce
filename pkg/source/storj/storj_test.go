package storj_test

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"storj.io/uplink"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/source"
	"github.com/imagemesh/imagemesh/pkg/source/sourcetest"
	storjsource "github.com/imagemesh/imagemesh/pkg/source/storj"
	"github.com/imagemesh/imagemesh/pkg/storage/driver/storj"
	"github.com/imagemesh/imagemesh/pkg/storage/layout"
)

const dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"

type fixture struct {
	network           *testenv.Storj
	bucket, prefix    string
	repo              reference.Named
	manifest, layer   []byte
	manifestD, layerD digest.Digest
}

// publish writes an image into the bucket's registry layout with the storage driver, as the gateway
// does: the layer, the manifest and the tag's link.
func publish(t *testing.T) fixture {
	t.Helper()
	network := testenv.StartStorj(t)
	f := fixture{network: network, bucket: network.Bucket(t, "images"), prefix: "reg"}
	f.repo, _ = reference.ParseNamed("example.test/team/app")
	f.layer = make([]byte, 3<<20)
	rand.Read(f.layer)
	f.layerD = digest.FromBytes(f.layer)
	f.manifest = []byte(`{"schemaVersion":2,"mediaType":"` + dockerManifest + `","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":2,"digest":"` +
		digest.FromString("{}").String() + `"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":3145728,"digest":"` + f.layerD.String() + `"}]}`)
	f.manifestD = digest.FromBytes(f.manifest)
	d, err := storj.New(context.Background(), storj.Parameters{Access: network.Access, Bucket: f.bucket, Prefix: f.prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx := context.Background()
	for p, b := range map[string][]byte{
		layout.BlobData(f.layerD):                            f.layer,
		layout.BlobData(f.manifestD):                         f.manifest,
		layout.TagCurrentLink("team/app", "v1"):              []byte(f.manifestD),
		layout.ManifestRevisionLink("team/app", f.manifestD): []byte(f.manifestD),
	} {
		if err := d.PutContent(ctx, p, b); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func (f fixture) source(t *testing.T, access, bucket string) *storjsource.Source {
	t.Helper()
	src, err := storjsource.New(storjsource.Options{Access: access, Bucket: bucket, Prefix: f.prefix, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return c
}

// The contract every source meets, and every way the network, the bucket or the grant can be wrong,
// on one real network: each is a clear error, and none is ErrNotFound's "try elsewhere" unless the
// object really is not there.
func TestStorjSource(t *testing.T) {
	f := publish(t)
	t.Run("Contract", func(t *testing.T) {
		sourcetest.Run(t, sourcetest.Fixture{
			Source: f.source(t, f.network.Access, f.bucket), Repo: f.repo, Tag: "v1",
			Manifest: f.manifest, MediaType: dockerManifest, Blob: f.layer, ResolvesTags: true,
		})
	})

	t.Run("UntrustedUntilVerified", func(t *testing.T) {
		src := f.source(t, f.network.Access, f.bucket)
		obj := source.Object{Repo: f.repo, Kind: source.KindBlob, Digest: f.layerD}
		c, err := src.Open(ctx(t), obj, 0)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if !c.Untrusted || c.Reject == nil {
			t.Fatal("bucket bytes must be held back from clients until verified, and a failure reported")
		}
		c.Reject(errors.New("digest mismatch"))
		_, err = src.Open(ctx(t), obj, 0)
		if !errors.Is(err, source.ErrNotFound) || !strings.Contains(err.Error(), "failed verification") {
			t.Fatalf("a rejected blob is asked again: %v", err)
		}
	})

	t.Run("GarbageGrant", func(t *testing.T) {
		_, err := storjsource.New(storjsource.Options{Access: "not-a-grant-SECRET", Bucket: f.bucket})
		if err == nil || !strings.Contains(err.Error(), "access grant is not valid") || strings.Contains(err.Error(), "SECRET") {
			t.Fatalf("garbage grant: %v (want a clear error that does not quote the grant)", err)
		}
	})

	t.Run("MissingBucket", func(t *testing.T) {
		_, err := f.source(t, f.network.Access, "no-such-bucket").Resolve(ctx(t), f.repo, "v1")
		if !errors.Is(err, source.ErrUnavailable) || !strings.Contains(err.Error(), `bucket "no-such-bucket" does not exist`) {
			t.Fatalf("missing bucket: %v", err)
		}
	})

	t.Run("WrongPassphrase", func(t *testing.T) {
		// A grant to the same project with another encryption passphrase cannot decrypt the keys:
		// for it, nothing is there.
		_, err := f.source(t, f.network.Grant(t, "another passphrase"), f.bucket).Resolve(ctx(t), f.repo, "v1")
		if err == nil {
			t.Fatal("a grant with the wrong passphrase resolved a tag")
		}
		t.Logf("wrong passphrase: %v", err)
	})

	t.Run("RevokedGrant", func(t *testing.T) {
		full, err := uplink.ParseAccess(f.network.Access)
		if err != nil {
			t.Fatal(err)
		}
		child, err := full.Share(uplink.ReadOnlyPermission(), uplink.SharePrefix{Bucket: f.bucket})
		if err != nil {
			t.Fatal(err)
		}
		serialized, _ := child.Serialize()
		src := f.source(t, serialized, f.bucket)
		if _, err := src.Resolve(ctx(t), f.repo, "v1"); err != nil {
			t.Fatalf("before revocation: %v", err)
		}
		if err := f.network.Project(t).RevokeAccess(ctx(t), child); err != nil {
			t.Fatal(err)
		}
		// The satellite caches revocations for a while (a second in the test network).
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, err = f.source(t, serialized, f.bucket).Resolve(ctx(t), f.repo, "v1")
			if err != nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(time.Second)
		}
		if !errors.Is(err, source.ErrUnavailable) || !strings.Contains(err.Error(), "refused") {
			t.Fatalf("revoked grant: %v", err)
		}
	})

	t.Run("Offset", func(t *testing.T) {
		c, err := f.source(t, f.network.Access, f.bucket).Open(ctx(t), source.Object{Repo: f.repo, Digest: f.layerD}, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		if err != nil || string(b) != string(f.layer[1<<20:]) || c.Descriptor.Size != int64(len(f.layer)) {
			t.Fatalf("read from 1 MiB: %d bytes, size %d, %v", len(b), c.Descriptor.Size, err)
		}
	})

	// Last: the network goes down.
	t.Run("NetworkDown", func(t *testing.T) {
		src := f.source(t, f.network.Access, f.bucket)
		f.network.Stop()
		start := time.Now()
		_, err := src.Resolve(ctx(t), f.repo, "v1")
		if !errors.Is(err, source.ErrUnavailable) {
			t.Fatalf("network down: %v, want ErrUnavailable", err)
		}
		t.Logf("network down, after %s: %v", time.Since(start).Round(time.Millisecond), err)
	})
}
