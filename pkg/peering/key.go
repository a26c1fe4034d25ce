package peering

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/pnet"
)

// LoadPSK reads a cluster key in the swarm.key format kubo and go-libp2p use:
//
//	/key/swarm/psk/1.0.0/
//	/base16/
//	<64 hex digits>
func LoadPSK(path string) (pnet.PSK, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("peering key: %w", err)
	}
	defer func() { _ = f.Close() }() // read-only
	psk, err := pnet.DecodeV1PSK(f)
	if err != nil {
		return nil, fmt.Errorf("peering key %s: %w", path, err)
	}
	if len(psk) != 32 {
		return nil, fmt.Errorf("peering key %s: %d bytes, want 32", path, len(psk))
	}
	return psk, nil
}

// EncodePSK returns a new random cluster key in swarm.key format.
func EncodePSK() ([]byte, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, err
	}
	return []byte("/key/swarm/psk/1.0.0/\n/base16/\n" + hex.EncodeToString(k) + "\n"), nil
}

// loadIdentity returns the node's libp2p key from path, creating it on first start, so that a node
// keeps its peer ID across restarts.
func loadIdentity(path string) (crypto.PrivKey, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		k, err := crypto.UnmarshalPrivateKey(b)
		if err != nil {
			return nil, fmt.Errorf("peer identity %s: %w", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("peer identity: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, err
	}
	b, err = crypto.MarshalPrivateKey(k)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return nil, fmt.Errorf("peer identity: %w", err)
	}
	return k, nil
}
