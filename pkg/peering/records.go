package peering

import (
	"fmt"

	leveldb "github.com/ipfs/go-ds-leveldb"
)

// newRecordStore returns the store of the provider records this node keeps for the DHT: in memory,
// as kad-dht's default, but ordered. kad-dht reads a key's records with a prefix query, and its
// default store, a map, answers one by scanning every record the node holds. Its cache keeps only
// keys that have providers, so every lookup that passes through the node for a key it holds nothing
// for (every new blob, asked for by every node that pulls it) costs a scan of all its records: with
// two nodes holding 50,000 blobs each, that scan was 70% of the CPU of the cluster simulation while a
// cold blob spread. LevelDB answers a prefix from its index. Records live for minutes and every
// provider renews its own, so they are not kept across restarts.
//
// LevelDB's defaults are sized for a disk database: a 4 MiB write buffer, allocated whole up front
// and kept twice over across a flush, would cost every node 8 MiB for records that take a few (70
// bytes each), and a 1,000-node simulation 8 GiB. A 256 KiB buffer holds some 3,500 records between
// flushes, which in memory cost a copy.
func newRecordStore() (*leveldb.Datastore, error) {
	ds, err := leveldb.NewDatastore("", &leveldb.Options{WriteBuffer: 256 << 10, BlockCacheCapacity: 1 << 20})
	if err != nil {
		return nil, fmt.Errorf("peering: provider record store: %w", err)
	}
	return ds, nil
}
