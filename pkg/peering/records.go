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
func newRecordStore() (*leveldb.Datastore, error) {
	ds, err := leveldb.NewDatastore("", nil)
	if err != nil {
		return nil, fmt.Errorf("peering: provider record store: %w", err)
	}
	return ds, nil
}
