package mirror

import (
	"encoding/json"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// knownSizesCap bounds the blob sizes remembered from manifests: about 100 bytes each, 6 MiB in
// all, the layers of some thousands of images.
const knownSizesCap = 1 << 16

// knownSizes remembers the sizes of blobs as verified manifests list them. A manifest's digest
// covers its descriptors, so these sizes are as trustworthy as the digests clients ask for: a
// source that claims another size for a blob is passed over (source.Object.Size).
type knownSizes struct {
	cache *lru.Cache[digest.Digest, int64]
}

func newKnownSizes() knownSizes {
	c, err := lru.New[digest.Digest, int64](knownSizesCap)
	if err != nil {
		panic(err) // only for a size <= 0
	}
	return knownSizes{c}
}

// learn records the sizes of the blobs a verified image manifest refers to. Anything else (an
// index, a manifest that does not parse) teaches nothing.
func (k knownSizes) learn(body []byte) {
	var m ocispec.Manifest
	if json.Unmarshal(body, &m) != nil {
		return
	}
	for _, desc := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		if desc.Digest.Validate() == nil && desc.Size > 0 {
			k.cache.Add(desc.Digest, desc.Size)
		}
	}
}

// size returns a blob's size from a manifest, or 0 if no manifest served here listed it.
func (k knownSizes) size(d digest.Digest) int64 {
	n, _ := k.cache.Get(d)
	return n
}
