package testenv

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Registry is a real distribution v3 registry on 127.0.0.1, storing into a temp dir.
type Registry struct {
	// Host is "127.0.0.1:port", as an image reference names the registry.
	Host string
	// URL is "http://127.0.0.1:port".
	URL string
	// Dir is the registry's storage root.
	Dir string

	bin, config, log string
	cmd              *exec.Cmd
}

// StartRegistry starts a registry and stops it when the test ends.
func StartRegistry(t testing.TB) *Registry {
	t.Helper()
	dir := t.TempDir()
	r := &Registry{
		bin:    Tool(t, "registry"),
		Host:   freePort(t),
		Dir:    filepath.Join(dir, "storage"),
		config: filepath.Join(dir, "config.yml"),
		log:    filepath.Join(dir, "registry.log"),
	}
	r.URL = "http://" + r.Host
	config := fmt.Sprintf(`version: 0.1
log: {level: warn, formatter: text}
storage:
  filesystem: {rootdirectory: %s}
  delete: {enabled: true}
http:
  addr: %s
`, r.Dir, r.Host)
	if err := os.WriteFile(r.config, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	r.Start(t)
	t.Cleanup(func() { r.Stop(t) })
	return r
}

// Start starts the registry (again) on the same address and storage.
func (r *Registry) Start(t testing.TB) {
	t.Helper()
	logf, err := os.OpenFile(r.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	r.cmd = exec.Command(r.bin, "serve", r.config)
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	if err := r.cmd.Start(); err != nil {
		t.Fatalf("start registry: %v", err)
	}
	err = waitFor(20*time.Second, func() error {
		resp, err := http.Get(r.URL + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("registry on %s: %v\n%s", r.Host, err, logTail(r.log))
	}
}

// Stop stops the registry; its storage stays.
func (r *Registry) Stop(t testing.TB) {
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { r.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		r.cmd.Process.Kill()
		<-done
	}
	r.cmd = nil
}

// PID is the registry's process id, for measuring it.
func (r *Registry) PID() int {
	if r.cmd == nil {
		return 0
	}
	return r.cmd.Process.Pid
}
