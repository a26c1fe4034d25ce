package testenv

import (
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

// SmallDisk mounts a tmpfs of the given size (mount's syntax: "24m") on a new temp dir and returns
// the dir: a real filesystem that fills up, so that a test meets ENOSPC where the product writes,
// not a stand-in for it. It is unmounted when the test ends. It needs root.
func SmallDisk(t testing.TB, size string) string {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount a tmpfs of %s on %s: %v %s", size, dir, err, out)
	}
	// Registered after TempDir's own cleanup, so it runs before it: the dir is removed once empty.
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}
