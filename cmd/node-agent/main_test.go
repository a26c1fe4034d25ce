package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/imagemesh/imagemesh/internal/agent"
)

// configOf parses args as the command does and returns the configuration it would run with.
func configOf(t *testing.T, args ...string) (agent.Config, error) {
	t.Helper()
	var got agent.Config
	err := newCommand(args, func(_ context.Context, c agent.Config) error { got = c; return nil }).Execute()
	return got, err
}

func TestPrecedenceDefaultsFileFlags(t *testing.T) {
	file := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(file, []byte(`
listen: 0.0.0.0:6000
tagTTL: 2m
cache: {maxBytes: 20GiB}
registries: [docker.io, ghcr.io]
upstreams:
  - {host: example.test, endpoint: "http://127.0.0.1:5001", username: u, passwordFile: /p}
`), 0o644); err != nil {
		t.Fatal(err)
	}

	c, err := configOf(t)
	if err != nil || c.Listen != "127.0.0.1:5000" || c.DefaultRegistry != "docker.io" {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	c, err = configOf(t, "--config", file, "--tag-ttl", "10s", "--registry", "quay.io", "--untrusted-hold", "30s", "--peer-upload-slots", "3",
		"--upstream", "example.test=https://mirror.example", "--upstream", "other.test=http://127.0.0.1:5002")
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "0.0.0.0:6000" {
		t.Errorf("listen %q: the file's value was lost", c.Listen)
	}
	if time.Duration(c.TagTTL) != 10*time.Second {
		t.Errorf("tagTTL %v: the flag did not win", time.Duration(c.TagTTL))
	}
	if time.Duration(c.Cache.UntrustedHold) != 30*time.Second || c.Peering.UploadSlots != 3 {
		t.Errorf("cache.untrustedHold %v, peering.uploadSlots %d: the flags did not win", time.Duration(c.Cache.UntrustedHold), c.Peering.UploadSlots)
	}
	if c.Cache.MaxBytes.Bytes != 20<<30 {
		t.Errorf("cache.maxBytes %+v, want 20GiB", c.Cache.MaxBytes)
	}
	if strings.Join(c.Registries, ",") != "quay.io" {
		t.Errorf("registries %v: a list flag replaces the file's list", c.Registries)
	}
	if len(c.Upstreams) != 2 || c.Upstreams[0].Endpoint != "https://mirror.example" || c.Upstreams[0].Username != "u" {
		t.Errorf("upstreams %+v: --upstream replaces the endpoint and keeps the file's credentials", c.Upstreams)
	}
}

func TestBadArguments(t *testing.T) {
	for _, args := range [][]string{
		{"--config", "/nonexistent/agent.yaml"},
		{"--cache-max-bytes", "lots"},
		{"--upstream", "no-equals-sign"},
		{"--tag-ttl", "soon"},
		{"--untrusted-hold", "soon"},
		{"--peer-upload-slots", "one"},
		{"extra-argument"},
	} {
		if _, err := configOf(t, args...); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}

// TestEveryFlagInREADME: the README's configuration table is where users look; a flag added to the
// command without a row there fails here, and so does a row for a flag that no longer exists.
func TestEveryFlagInREADME(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	cmd := newCommand(nil, nil)
	flags := map[string]bool{}
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		flags[f.Name] = true
		if !strings.Contains(readme, "| `--"+f.Name) && !strings.Contains(readme, ", `--"+f.Name) {
			t.Errorf("--%s is not in the README's configuration table", f.Name)
		}
	})
	// Rows of the table: "| `--name ARG` | ..." (several flags may share a row).
	for _, line := range strings.Split(readme, "\n") {
		if !strings.HasPrefix(line, "| `--") {
			continue
		}
		first := strings.SplitN(line, "|", 3)[1]
		for _, m := range flagName.FindAllStringSubmatch(first, -1) {
			if !flags[m[1]] && m[1] != "help" && m[1] != "version" {
				t.Errorf("the README's table names --%s, which node-agent does not have", m[1])
			}
		}
	}
}

var flagName = regexp.MustCompile("`--([a-z0-9-]+)")

// TestRequireNodeTokenFlag: absent, the file's choice (or none) stays; given, it wins either way.
func TestRequireNodeTokenFlag(t *testing.T) {
	file := filepath.Join(t.TempDir(), "agent.yaml")
	mustWriteFile(t, file, "requireNodeToken: false\nhostConfig: {dir: /etc/containerd/certs.d}\n")
	for _, c := range []struct {
		args []string
		want bool
	}{
		{nil, false},
		{[]string{"--hosts-dir", "/etc/containerd/certs.d"}, true},
		{[]string{"--hosts-dir", "/etc/containerd/certs.d", "--require-node-token=false"}, false},
		{[]string{"--require-node-token"}, true},
		{[]string{"--config", file}, false},
		{[]string{"--config", file, "--require-node-token"}, true},
	} {
		cfg, err := configOf(t, c.args...)
		if err != nil {
			t.Fatalf("%v: %v", c.args, err)
		}
		if got := cfg.NodeTokenRequired(); got != c.want {
			t.Errorf("%v: node token required %v, want %v", c.args, got, c.want)
		}
	}
	if _, err := configOf(t, "--require-node-token=maybe"); err == nil {
		t.Error("--require-node-token=maybe accepted")
	}
}

func mustWriteFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}
