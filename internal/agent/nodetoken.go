package agent

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/imagemesh/imagemesh/pkg/atomicfile"
)

// NodeTokenFile is the file under the data dir that holds the node token.
const NodeTokenFile = "node-token"

// nodeTokenBytes is the token's entropy; it is kept and sent as hex.
const nodeTokenBytes = 32

// loadNodeToken returns the node token kept in dir, making one (crypto/rand) on first use.
//
// The token outlives the process on purpose: the hosts.toml files an agent wrote stay on the node
// through a restart (a rolling update keeps them while the next agent starts), and containerd must
// not be refused with the header it has in the meantime. The file is the owner's alone (0600), as
// the hosts.toml files that carry it are; a file with wider permissions is narrowed, one that does
// not hold a token is replaced. Deleting the file and restarting the agent makes a new token.
func loadNodeToken(dir string) (token string, created bool, err error) {
	path := filepath.Join(dir, NodeTokenFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil && validNodeToken(strings.TrimSpace(string(b))):
		if err := narrowMode(path); err != nil {
			return "", false, err
		}
		return strings.TrimSpace(string(b)), false, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return "", false, fmt.Errorf("node token: %w", err)
	}
	// Absent, or not a token (a truncated write, an edit): a new one.
	raw := make([]byte, nodeTokenBytes)
	if _, err := rand.Read(raw); err != nil {
		return "", false, fmt.Errorf("node token: %w", err)
	}
	token = hex.EncodeToString(raw)
	if err := atomicfile.Write(path, []byte(token+"\n"), 0o600); err != nil {
		return "", false, fmt.Errorf("node token: %w", err)
	}
	return token, true, nil
}

func validNodeToken(s string) bool {
	if len(s) != 2*nodeTokenBytes {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// narrowMode makes path readable by its owner only.
func narrowMode(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("node token: %w", err)
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return nil
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("node token: %w", err)
	}
	return nil
}
