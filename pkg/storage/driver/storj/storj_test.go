package storj_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path"
	"strings"
	"testing"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/testsuites"
	"storj.io/uplink"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/storage/driver/storj"
)

// distribution's own storage driver suite, against a real Storj network (testplanet).
func TestStorjDriverSuite(t *testing.T) {
	network := testenv.StartStorj(t)
	bucket := network.Bucket(t, "suite")
	n := 0
	testsuites.Driver(t, func() (storagedriver.StorageDriver, error) {
		n++
		return storj.New(context.Background(), storj.Parameters{Access: network.Access, Bucket: bucket, Prefix: fmt.Sprintf("suite-%d-%d", time.Now().UnixNano(), n)})
	}, false)
}

// What a writer has not committed is invisible in the bucket, and cancelling it (or deleting its
// directory, as the registry does with an abandoned upload) leaves no pending upload behind.
func TestUncommittedInvisible(t *testing.T) {
	network := testenv.StartStorj(t)
	bucket := network.Bucket(t, "half")
	ctx := context.Background()
	d, err := storj.New(ctx, storj.Parameters{Access: network.Access, Bucket: bucket})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	project := network.Project(t)
	objects := func() (keys []string) {
		it := project.ListObjects(ctx, bucket, &uplink.ListObjectsOptions{Recursive: true})
		for it.Next() {
			keys = append(keys, it.Item().Key)
		}
		if it.Err() != nil {
			t.Fatal(it.Err())
		}
		return keys
	}
	pending := func() (n int) {
		it := project.ListUploads(ctx, bucket, &uplink.ListUploadsOptions{Recursive: true})
		for it.Next() {
			n++
		}
		if it.Err() != nil {
			t.Fatal(it.Err())
		}
		return n
	}

	for _, finish := range []string{"cancel", "delete"} {
		p := "/docker/registry/v2/repositories/team/app/_uploads/" + finish + "/data"
		w, err := d.Writer(ctx, p, false)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(bytes.Repeat([]byte("x"), 3<<20)); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		if keys := objects(); len(keys) != 0 {
			t.Fatalf("%s: uncommitted upload visible as %v", finish, keys)
		}
		if _, err := d.Stat(ctx, p); !errors.As(err, new(storagedriver.PathNotFoundError)) {
			t.Fatalf("%s: Stat of an uncommitted file: %v", finish, err)
		}
		if n := pending(); n != 1 {
			t.Fatalf("%s: %d pending uploads, want 1", finish, n)
		}
		switch finish {
		case "cancel":
			w, err := d.Writer(ctx, p, true)
			if err != nil {
				t.Fatal(err)
			}
			if w.Size() != 3<<20 {
				t.Fatalf("resumed writer at %d bytes, want %d", w.Size(), 3<<20)
			}
			if err := w.Cancel(ctx); err != nil {
				t.Fatal(err)
			}
		case "delete":
			// The registry keeps a startedat file next to an upload; deleting the directory takes both.
			if err := d.PutContent(ctx, path.Join(path.Dir(p), "startedat"), []byte("now")); err != nil {
				t.Fatal(err)
			}
			if err := d.Delete(ctx, path.Dir(p)); err != nil {
				t.Fatal(err)
			}
		}
		if n := pending(); n != 0 {
			t.Fatalf("%s: %d pending uploads left", finish, n)
		}
		if keys := objects(); len(keys) != 0 {
			t.Fatalf("%s: objects left: %v", finish, keys)
		}
	}
}

// A grant that is garbage, a bucket that does not exist: the driver says which, and never quotes the
// grant.
func TestBadConfiguration(t *testing.T) {
	network := testenv.StartStorj(t)
	ctx := context.Background()
	_, err := storj.New(ctx, storj.Parameters{Access: "garbage-SECRET", Bucket: "x"})
	if err == nil || strings.Contains(err.Error(), "SECRET") || !strings.Contains(err.Error(), "not hold a valid access grant") {
		t.Fatalf("garbage grant: %v", err)
	}
	_, err = storj.New(ctx, storj.Parameters{Access: network.Access, Bucket: "missing"})
	if err == nil || !strings.Contains(err.Error(), `bucket "missing"`) || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing bucket: %v", err)
	}
	_, err = storj.New(ctx, storj.Parameters{AccessFile: "/nonexistent/access", Bucket: "x"})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/access") {
		t.Fatalf("missing access file: %v", err)
	}
}
