package peering

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"

	ds "github.com/ipfs/go-datastore"
	dssync "github.com/ipfs/go-datastore/sync"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/test"
	"github.com/libp2p/go-libp2p/p2p/host/peerstore/pstoremem"
)

// BenchmarkProviderRecords is what a node's DHT pays to answer a lookup (GET_PROVIDERS) while it holds
// records of 100,000 (key, provider) pairs: for a key it holds none for (what every node asks while a
// new blob spreads) and for one it holds. "map" is kad-dht's default store, the reference; "leveldb"
// is the node's (newRecordStore).
//
//	go test ./pkg/peering -run '^$' -bench BenchmarkProviderRecords
func BenchmarkProviderRecords(b *testing.B) {
	const held = 100_000
	for _, store := range []struct {
		name string
		open func() (ds.Batching, error)
	}{
		{"map", func() (ds.Batching, error) { return dssync.MutexWrap(ds.NewMapDatastore()), nil }},
		{"leveldb", func() (ds.Batching, error) { return newRecordStore() }},
	} {
		b.Run(store.name, func(b *testing.B) {
			dstore, err := store.open()
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = dstore.Close() })
			pstore, err := pstoremem.NewPeerstore()
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = pstore.Close() })
			pm, err := records.NewProviderManager(test.RandPeerIDFatal(b), pstore, dstore)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = pm.Close() })
			ctx := context.Background()
			providers := make([]peer.ID, 20)
			for i := range providers {
				providers[i] = test.RandPeerIDFatal(b)
			}
			key := func() []byte {
				k := make([]byte, 34)
				rand.Read(k)
				return k
			}
			var present []byte
			for i := range held / len(providers) {
				k := key()
				for _, p := range providers {
					if err := pm.AddProvider(ctx, k, peer.AddrInfo{ID: p}); err != nil {
						b.Fatal(err)
					}
				}
				if i == 0 {
					present = k
				}
			}
			for _, c := range []struct {
				name string
				key  []byte
				want int
			}{
				{"absent key", key(), 0},
				{"held key", present, len(providers)},
			} {
				b.Run(c.name, func(b *testing.B) {
					for b.Loop() {
						got, err := pm.GetProviders(ctx, c.key)
						if err != nil || len(got) != c.want {
							b.Fatal(fmt.Errorf("%d providers, want %d: %w", len(got), c.want, err))
						}
					}
				})
			}
		})
	}
}
