package hostconfig

import (
	"errors"
	"os"
	"path/filepath"
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
