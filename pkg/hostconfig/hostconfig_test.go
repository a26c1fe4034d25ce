package hostconfig

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

func TestRenderIsContainerdHostsTOML(t *testing.T) {
	body, err := Render(Registry{Host: "docker.io", Mirrors: []Mirror{{URL: "http://127.0.0.1:5000"}}})
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Server string `toml:"server"`
		Host   map[string]struct {
			Capabilities []string `toml:"capabilities"`
		} `toml:"host"`
	}
	if err := toml.Unmarshal(body, &got); err != nil {
		t.Fatalf("rendered file is not TOML: %v\n%s", err, body)
	}
	if got.Server != "https://registry-1.docker.io" {
		t.Errorf("server = %q", got.Server)
	}
	caps := got.Host["http://127.0.0.1:5000"].Capabilities
	if len(caps) != 2 || caps[0] != "pull" || caps[1] != "resolve" {
		t.Errorf("capabilities = %v\n%s", caps, body)
	}
}

func TestRenderRejectsBadInput(t *testing.T) {
	for name, r := range map[string]Registry{
		"traversal host":   {Host: "../etc", Mirrors: []Mirror{{URL: "http://127.0.0.1:5000"}}},
		"slash host":       {Host: "a/b", Mirrors: []Mirror{{URL: "http://127.0.0.1:5000"}}},
		"no mirror":        {Host: "ghcr.io"},
		"uppercase host":   {Host: "Docker.io/x"},
		"push capability":  {Host: "ghcr.io", Mirrors: []Mirror{{URL: "http://127.0.0.1:5000", Capabilities: []string{"push"}}}},
		"mirror not a URL": {Host: "ghcr.io", Mirrors: []Mirror{{URL: "127.0.0.1:5000"}}},
		"credentials":      {Host: "ghcr.io", Server: "https://user:pw@ghcr.io", Mirrors: []Mirror{{URL: "http://127.0.0.1:5000"}}},
	} {
		if _, err := Render(r); err == nil {
			t.Errorf("%s: Render accepted %+v", name, r)
		}
	}
}

func TestApplyRemoveOwnsOnlyItsFiles(t *testing.T) {
	dir := t.TempDir()
	regs := []Registry{
		{Host: "docker.io", Mirrors: []Mirror{{URL: "http://127.0.0.1:5000"}}},
		{Host: "127.0.0.1:5001", Server: "http://127.0.0.1:5001", Mirrors: []Mirror{{URL: "http://127.0.0.1:5000"}}},
	}
	changed, err := Apply(dir, regs)
	if err != nil || len(changed) != 2 {
		t.Fatalf("Apply = %v, %v", changed, err)
	}
	if changed, err := Apply(dir, regs); err != nil || len(changed) != 0 {
		t.Fatalf("second Apply changed %v, %v; want nothing", changed, err)
	}
	// An operator's own file is neither overwritten nor removed.
	own := filepath.Join(dir, "ghcr.io", FileName)
	if err := os.MkdirAll(filepath.Dir(own), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(own, []byte("server = \"https://ghcr.io\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Apply(dir, []Registry{{Host: "ghcr.io", Mirrors: []Mirror{{URL: "http://127.0.0.1:5000"}}}}); !errors.Is(err, ErrNotManaged) {
		t.Fatalf("Apply over an operator's file: %v, want ErrNotManaged", err)
	}
	if err := Remove(dir, "ghcr.io"); !errors.Is(err, ErrNotManaged) {
		t.Fatalf("Remove of an operator's file: %v, want ErrNotManaged", err)
	}
	hosts, err := Managed(dir)
	if err != nil || len(hosts) != 2 {
		t.Fatalf("Managed = %v, %v", hosts, err)
	}
	removed, err := Prune(dir, []string{"docker.io"})
	if err != nil || len(removed) != 1 || removed[0] != "127.0.0.1:5001" {
		t.Fatalf("Prune = %v, %v", removed, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "127.0.0.1:5001")); !os.IsNotExist(err) {
		t.Errorf("pruned registry dir still there: %v", err)
	}
	if _, err := os.Stat(own); err != nil {
		t.Errorf("operator's file gone: %v", err)
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, "*", ".hosts.toml-*"))
	if len(leftovers) != 0 {
		t.Errorf("temp files left: %v", leftovers)
	}
}

// TestRenderHeaderTable: the node token goes into containerd's [host."<mirror>".header] table of
// the mirror (and not to the server, which is the upstream registry), and a file that holds it is
// readable by its owner only.
func TestRenderHeaderTable(t *testing.T) {
	const token = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	r := Registry{Host: "docker.io", Mirrors: []Mirror{{URL: "http://10.0.0.1:30020", Header: map[string]string{"X-Imagemesh-Node-Token": token}}}}
	body, err := Render(r)
	if err != nil {
		t.Fatal(err)
	}
	// containerd's own shape of the file (core/remotes/docker/config/hosts.go: hostFileConfig).
	var got struct {
		Server string         `toml:"server"`
		Header map[string]any `toml:"header"`
		Host   map[string]struct {
			Capabilities []string       `toml:"capabilities"`
			Header       map[string]any `toml:"header"`
		} `toml:"host"`
	}
	if err := toml.Unmarshal(body, &got); err != nil {
		t.Fatalf("rendered file is not TOML: %v\n%s", err, body)
	}
	if len(got.Header) != 0 {
		t.Errorf("a header for the server (the upstream registry): %v", got.Header)
	}
	h := got.Host["http://10.0.0.1:30020"]
	if len(h.Header) != 1 || h.Header["X-Imagemesh-Node-Token"] != token {
		t.Errorf("mirror's header table = %v\n%s", h.Header, body)
	}
	if !strings.Contains(string(body), "[host.'http://10.0.0.1:30020'.header]") {
		t.Errorf("no [host.'<mirror>'.header] table:\n%s", body)
	}

	dir := t.TempDir()
	if _, err := Apply(dir, []Registry{r, {Host: "ghcr.io", Mirrors: []Mirror{{URL: "http://10.0.0.1:30020"}}}}); err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string]os.FileMode{"docker.io": 0o600, "ghcr.io": 0o644} {
		fi, err := os.Stat(filepath.Join(dir, host, FileName))
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, %v; want %v", host, fi.Mode().Perm(), err, want)
		}
	}
	// An unchanged file whose mode was widened is narrowed again.
	path := filepath.Join(dir, "docker.io", FileName)
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := Apply(dir, []Registry{r}); err != nil || len(changed) != 0 {
		t.Fatalf("Apply of the same file: %v, %v", changed, err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode after Apply: %v, %v; want 0600", fi.Mode().Perm(), err)
	}

	// A value that would end the line (or the file's TOML) is refused, and the error does not
	// repeat it.
	bad := Registry{Host: "docker.io", Mirrors: []Mirror{{URL: "http://10.0.0.1:30020", Header: map[string]string{"X-Imagemesh-Node-Token": "secret\nserver = 'https://evil'"}}}}
	if _, err := Render(bad); err == nil || strings.Contains(err.Error(), "secret") {
		t.Errorf("Render of a header value with a newline: %v", err)
	}
	if _, err := Render(Registry{Host: "docker.io", Mirrors: []Mirror{{URL: "http://10.0.0.1:30020", Header: map[string]string{"Bad Name": "v"}}}}); err == nil {
		t.Error("Render accepted a header name with a space")
	}
}
