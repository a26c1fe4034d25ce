package ipfs_test

import (
	"fmt"
	"testing"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/testsuites"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/storage/driver/ipfs"
)

// distribution's own storage driver suite, against a real kubo daemon.
func TestDriverSuite(t *testing.T) {
	kubo := testenv.StartKubo(t)
	n := 0
	testsuites.Driver(t, func() (storagedriver.StorageDriver, error) {
		n++
		return ipfs.New(ipfs.Parameters{API: kubo.API, Root: fmt.Sprintf("/suite-%d-%d", time.Now().UnixNano(), n)})
	}, false)
}
