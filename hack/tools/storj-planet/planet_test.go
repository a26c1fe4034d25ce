// Package planet runs storj.io/storj's testplanet (a real satellite and storage nodes, in one process)
// as a service for imagemesh's tests: build this test binary once (hack/tools/build.sh storj-planet),
// start it with STORJ_TEST_POSTGRES and STORJ_PLANET_INFO set, read the satellite address, API key and
// access grant from the info file, and send SIGTERM (or SIGINT) to shut the network down. It also shuts
// down when the process that started it goes away, so that a killed test leaves no network behind.
package planet

import (
	"encoding/json"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"storj.io/common/memory"
	"storj.io/common/testcontext"
	"storj.io/storj/private/testplanet"
	"storj.io/storj/satellite"
	"storj.io/storj/satellite/satellitedb"
	"storj.io/storj/storagenode"
)

// Info is what a test needs to reach the network with storj.io/uplink.
type Info struct {
	Satellite string `json:"satellite"` // node URL: id@host:port
	APIKey    string `json:"apiKey"`
	Access    string `json:"access"` // serialized access grant for the uplink's project
}

func TestServe(t *testing.T) {
	infoPath := os.Getenv("STORJ_PLANET_INFO")
	if infoPath == "" {
		t.Fatal("STORJ_PLANET_INFO (the file to write the network's address and access to) is not set")
	}
	nodes := 4
	if s := os.Getenv("STORJ_PLANET_NODES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("STORJ_PLANET_NODES=%q: want a positive number", s)
		}
		nodes = n
	}
	config := testplanet.Config{
		SatelliteCount: 1, StorageNodeCount: nodes, UplinkCount: 1, NonParallel: true,
		// The network lives as long as the test that started it; testplanet's own limit is 3 minutes.
		Timeout: 24 * time.Hour,
		Reconfigure: testplanet.Reconfigure{
			SatelliteDBOptions: func(log *zap.Logger, index int, options *satellitedb.Options) {
				// A revoked grant is refused within a second, not after testplanet's minute of cache.
				options.RevocationLRUOptions.Expiration = time.Second
			},
			Satellite: func(log *zap.Logger, index int, config *satellite.Config) {
				// Erasure coding as a small real network would have it: any 2 of 4 pieces rebuild a
				// segment, an upload succeeds with 3.
				testplanet.ReconfigureRS(2, 3, 3, 4)(log, index, config)
				// A registry's driver test suite and benchmarks hit one project hard from one host.
				config.Metainfo.RateLimiter.Enabled = false
				config.Metainfo.UploadLimiter.Enabled = false
				config.Metainfo.DownloadLimiter.Enabled = false
			},
			StorageNode: func(index int, config *storagenode.Config) {
				// testplanet's 1 GB per node is less than the driver suite's 5 GiB stream needs.
				config.Storage.AllocatedDiskSpace = 100 * memory.GB
			},
		},
	}
	testplanet.Run(t, config, func(t *testing.T, ctx *testcontext.Context, planet *testplanet.Planet) {
		sat := planet.Satellites[0]
		up := planet.Uplinks[0]
		access, err := up.Access[sat.ID()].Serialize()
		if err != nil {
			t.Fatal(err)
		}
		data, err := json.Marshal(Info{
			Satellite: sat.NodeURL().String(),
			APIKey:    up.APIKey[sat.ID()].Serialize(),
			Access:    access,
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(infoPath+".tmp", data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(infoPath+".tmp", infoPath); err != nil {
			t.Fatal(err)
		}
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		parent := os.Getppid()
		for tick := time.NewTicker(time.Second); ; {
			select {
			case <-stop:
				return
			case <-tick.C:
				if os.Getppid() != parent {
					return
				}
			}
		}
	})
}
