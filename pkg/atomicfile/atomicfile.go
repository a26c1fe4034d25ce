// Package atomicfile writes files whole or not at all.
//
// Invariants: a reader of the path sees its old content or the new, never part of either; the new
// file has its mode from its first byte (a secret is never readable by others, not even briefly);
// a crash or a failed write leaves at most a temp file in the same directory whose name starts with
// a dot, and never under the path itself.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Write writes data to path: into a temp file ".<base>-*" in path's directory (made if need be),
// with mode perm, synced, then renamed over path.
func Write(path string, data []byte, perm fs.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+"-") // 0600 until the Chmod
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	err = tmp.Chmod(perm)
	if err == nil {
		_, err = tmp.Write(data)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return errors.Join(fmt.Errorf("write %s: %w", path, err), os.Remove(tmp.Name()))
	}
	return nil
}
