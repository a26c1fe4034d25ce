// Package testenv starts the real components that imagemesh's tests run against: the distribution
// registry, crane, skopeo and containerd. It finds their binaries in $IMAGEMESH_TOOLS, then in
// ~/.cache/imagemesh/tools/bin (where `make test-deps` builds them), then on PATH.
//
// A missing component skips the test on a developer's machine and fails it under CI=true: CI must
// never pass because it quietly tested nothing.
package testenv

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Tool returns the path of a binary the tests need, or ends the test saying how to install it.
func Tool(t testing.TB, name string) string {
	t.Helper()
	var dirs []string
	if d := os.Getenv("IMAGEMESH_TOOLS"); d != "" {
		dirs = append(dirs, d)
	}
	if home, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(home, ".cache", "imagemesh", "tools", "bin"))
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	missing(t, "%s not found in $IMAGEMESH_TOOLS, ~/.cache/imagemesh/tools/bin or PATH; run `make test-deps`", name)
	return ""
}

// RequireRoot ends the test if it does not run as root (containerd needs it).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "this test runs containerd and needs root")
	}
}

func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("missing component (CI=true, so this fails rather than skips): "+format, args...)
	}
	t.Skipf("missing component: "+format, args...)
}

// freePort returns a loopback address nobody listens on right now.
func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// waitFor polls ready until it returns nil or the timeout passes.
func waitFor(timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %s: %w", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// logTail returns the end of a log file, for failure messages.
func logTail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return string(b)
}
