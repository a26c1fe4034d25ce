package storj_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/testsuites"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/storage/driver/storj"
)

// distribution's own storage driver suite, against a real Storj network (testplanet).
func TestDriverSuite(t *testing.T) {
	network := testenv.StartStorj(t)
	bucket := network.Bucket(t, "suite")
	n := 0
	testsuites.Driver(t, func() (storagedriver.StorageDriver, error) {
		n++
		return storj.New(context.Background(), storj.Parameters{Access: network.Access, Bucket: bucket, Prefix: fmt.Sprintf("suite-%d-%d", time.Now().UnixNano(), n)})
	}, false)
}
