// Package testenv starts the real components that imagemesh's tests run against: the distribution
// registry, crane, skopeo, containerd (1.6 and 2.x) and Docker Engine (dockerd). It finds their
// binaries in $IMAGEMESH_TOOLS, then in ~/.cache/imagemesh/tools/bin (where `make test-deps` builds
// them), then on PATH. The Kubernetes API server is in kubeenv, so that tests that do not need one do
// not link envtest and client-go.
//
// A missing component skips the test on a developer's machine and fails it under CI=true: CI must
// never pass because it quietly tested nothing.
//
// Short mode (go test -short, `make test-unit`) is the unit tier: hermetic, no root, none of these
// components. There every entry point that needs a tool or root skips the test, saying what it needs,
// whether or not the component is installed and whatever CI says, so that the unit tier runs the same
// tests on every machine. Only -short skips that way: without it, CI=true still fails on anything
// missing. Tests that start processes of their own call SkipShort.
//
// Every daemon runs in its own temp dirs, on 127.0.0.1 or a private unix socket, writes its output
// to a log file that is printed when the test fails, and is stopped by t.Cleanup.
package testenv

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Tool returns the path of a binary the tests need. It looks in $IMAGEMESH_TOOLS, then
// ~/.cache/imagemesh/tools/bin, then PATH. A missing tool fails the test under CI=true and skips it
// otherwise, naming the tool and `make test-deps`, which installs it.
func Tool(t testing.TB, name string) string {
	t.Helper()
	SkipShort(t, name)
	var dirs []string
	if d := os.Getenv("IMAGEMESH_TOOLS"); d != "" {
		dirs = append(dirs, d)
	}
	if home, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(home, ".cache", "imagemesh", "tools", "bin"))
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		// Stat follows the cache's symlinks: a dangling link (a half-cleaned cache) counts as missing.
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	missing(t, "%s not found in $IMAGEMESH_TOOLS, ~/.cache/imagemesh/tools/bin or PATH; run `make test-deps`", name)
	return ""
}

// RequireRoot ends the test if it does not run as root: containerd needs it.
func RequireRoot(t testing.TB) {
	t.Helper()
	SkipShort(t, "root")
	if os.Geteuid() != 0 {
		missing(t, "this test runs containerd and needs root")
	}
}

// SkipShort skips the test under -short, the unit tier, which runs no real component: the test needs
// what (a tool, root, a process it starts). It does nothing without -short.
func SkipShort(t testing.TB, what string) {
	t.Helper()
	if short() {
		t.Skipf("needs %s: run make test", what)
	}
}

// short is testing.Short, replaced by the harness's own tests.
var short = testing.Short

// missing fails the test under CI=true and skips it otherwise.
func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("missing component (CI=true, so this fails rather than skips): "+format, args...)
		return // only reached with a testing.TB whose Fatalf returns
	}
	t.Skipf("missing component: "+format, args...)
}

// FreeAddr returns a loopback address (127.0.0.1:port) that nobody listens on right now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	return FreeAddrOn(t, "127.0.0.1")
}

// FreeAddrOn returns host:port with a port free on host, an address of this machine.
func FreeAddrOn(t testing.TB, host string) string {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }() // only held to learn a free port
	return l.Addr().String()
}

// shortTempDir makes a temp dir whose path is short enough for unix sockets inside it (108 bytes
// at most): t.TempDir() embeds the test's name and easily passes that. It is removed when the test
// ends, after the daemons that use it have stopped (their cleanups are registered later, so run
// first); a daemon that mounts under it unmounts in its own cleanup.
func shortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	base := os.TempDir()
	if len(base) > 40 {
		base = "/tmp"
	}
	dir, err := os.MkdirTemp(base, prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	return dir
}

// process is a daemon the harness started, with its output going to a log file.
type process struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once it has exited
	err  error         // how it exited, valid once done is closed
}

// startProcess starts bin in its own process group (so that stop also reaches anything it
// started), appending its stdout and stderr to logPath.
func startProcess(logPath, bin string, args ...string) (*process, error) {
	return startProcessEnv(logPath, nil, bin, args...)
}

// startProcessEnv is startProcess with variables added to the environment.
func startProcessEnv(logPath string, env []string, bin string, args ...string) (*process, error) {
	cmd := exec.Command(bin, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	return startCmd(logPath, cmd)
}

// startCmd starts cmd in its own process group, its output appended to logPath.
func startCmd(logPath string, cmd *exec.Cmd) (*process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	defer func() { _ = logf.Close() }() // the child has its own copy
	cmd.Stdout, cmd.Stderr = logf, logf
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	return p, nil
}

// exited returns a non-nil error once the process has ended.
func (p *process) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("exited: %w", p.err)
	default:
		return nil
	}
}

// stop sends SIGTERM to the process group, and SIGKILL if it has not exited after timeout.
func (p *process) stop(timeout time.Duration) { p.signal(syscall.SIGTERM, timeout) }

// signal sends sig to the process group, and SIGKILL if it has not exited after timeout.
func (p *process) signal(sig syscall.Signal, timeout time.Duration) {
	pid := p.cmd.Process.Pid
	_ = syscall.Kill(-pid, sig) // gone already is fine
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = syscall.Kill(-pid, syscall.SIGKILL) // gone already is fine
		<-p.done
	}
}

// errExited marks a readiness failure that waiting will not fix.
var errExited = errors.New("process exited")

// waitReady polls ready until it returns nil, the process exits, or the timeout passes.
func waitReady(p *process, timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if e := p.exited(); e != nil {
			return fmt.Errorf("%w (%w) before it was ready: %w", errExited, e, err)
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
	if len(b) > 16000 {
		b = b[len(b)-16000:]
	}
	return string(b)
}
