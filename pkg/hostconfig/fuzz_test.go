package hostconfig

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

// FuzzRender holds Render and Apply, which put strings from ImageSources and flags into a file
// containerd reads, to: a host ValidateHost rejects is rejected, and nothing is written for it; what
// is rendered is TOML that reads back as containerd's hosts.toml with exactly the server, the one
// mirror and its settings it was given, so that no quote, newline or bracket in a URL or CA path
// adds a key, a table or a host; and the file lands at <dir>/<host>/hosts.toml, inside dir.
func FuzzRender(f *testing.F) {
	type seed struct {
		host, server, mirror, ca, capability string
		skipVerify                           bool
	}
	for _, s := range []seed{
		{"docker.io", "", "http://127.0.0.1:5000", "", "", false},
		{"ghcr.io", "https://ghcr.io", "https://agent.local:5443", "/etc/imagemesh/ca.pem", "pull", true},
		{"127.0.0.1:5001", "http://127.0.0.1:5001", "http://127.0.0.1:5000", "", "resolve", false},
		{"[::1]:5000", "", "http://[::1]:5000", "", "", false},
		{"localhost", "", "http://localhost:5000", "", "", false},
		{"registry.example:5000", "", "http://127.0.0.1:5000/path", "", "", false},
		// Strings that would break out of a TOML string or key.
		{"ghcr.io", `https://ghcr.io/"]\n[host."http://evil"]`, "http://127.0.0.1:5000", "", "", false},
		{"ghcr.io", "https://ghcr.io", `http://127.0.0.1:5000/"]` + "\n" + `[host."http://evil"]`, "", "", false},
		{"ghcr.io", "https://ghcr.io", `http://127.0.0.1:5000/x"]#'`, "a\"\nskip_verify = true\n[host.\"x\"]", "", false},
		{"ghcr.io", "https://ghcr.io", "http://127.0.0.1:5000/'''\"\"\"\\u0000", "ca'''\\", "", false},
		{"ghcr.io", "https://ghcr.io?x=\"a\"#]", "http://a%22b:5000", "\x00\x7f\u2028", "", false},
		{"ghcr.io", "https://ghcr.io", "http://127.0.0.1:5000/\xb1", "/etc/\xb1.pem", "", false}, // not UTF-8
		// Hosts and URLs that must be refused.
		{"../etc", "", "http://127.0.0.1:5000", "", "", false},
		{"..", "", "http://127.0.0.1:5000", "", "", false},
		{"a/b", "", "http://127.0.0.1:5000", "", "", false},
		{"a\\b", "", "http://127.0.0.1:5000", "", "", false},
		{".hidden.io", "", "http://127.0.0.1:5000", "", "", false},
		{"/abs", "", "http://127.0.0.1:5000", "", "", false},
		{"Docker.io/x", "", "http://127.0.0.1:5000", "", "", false},
		{"ghcr.io\n[x]", "", "http://127.0.0.1:5000", "", "", false},
		{"", "", "http://127.0.0.1:5000", "", "", false},
		{"ghcr.io", "", "127.0.0.1:5000", "", "", false},
		{"ghcr.io", "https://user:pw@ghcr.io", "http://127.0.0.1:5000", "", "", false},
		{"ghcr.io", "", "http://127.0.0.1:5000", "", "push", false},
	} {
		f.Add(s.host, s.server, s.mirror, s.ca, s.capability, s.skipVerify)
	}
	f.Fuzz(func(t *testing.T, host, server, mirrorURL, ca, capability string, skipVerify bool) {
		m := Mirror{URL: mirrorURL, CA: ca, SkipVerify: skipVerify}
		if capability != "" {
			m.Capabilities = []string{capability}
		}
		r := Registry{Host: host, Server: server, Mirrors: []Mirror{m}}
		body, err := Render(r)
		hostErr := ValidateHost(host)
		if hostErr != nil {
			if err == nil {
				t.Fatalf("Render accepted host %q that ValidateHost rejects: %v", host, hostErr)
			}
			dir := t.TempDir()
			if _, aerr := Apply(dir, []Registry{r}); aerr == nil {
				t.Fatalf("Apply accepted host %q that ValidateHost rejects", host)
			}
			if des, _ := os.ReadDir(dir); len(des) != 0 {
				t.Fatalf("Apply of rejected host %q wrote %v", host, des)
			}
			return
		}
		if err != nil {
			return
		}
		if !bytes.HasPrefix(body, []byte(Marker+"\n")) {
			t.Fatalf("no marker line:\n%s", body)
		}
		var got map[string]any
		if err := toml.Unmarshal(body, &got); err != nil {
			t.Fatalf("rendered file is not TOML: %v\n%s", err, body)
		}
		wantServer := server
		if wantServer == "" {
			wantServer = DefaultServer(host)
		}
		for k := range got {
			if k != "server" && k != "host" {
				t.Fatalf("extra top-level key %q:\n%s", k, body)
			}
		}
		if got["server"] != wantServer {
			t.Fatalf("server = %q, want %q:\n%s", got["server"], wantServer, body)
		}
		hosts, ok := got["host"].(map[string]any)
		if !ok || len(hosts) != 1 {
			t.Fatalf("host tables = %#v, want one:\n%s", got["host"], body)
		}
		entry, ok := hosts[mirrorURL].(map[string]any)
		if !ok {
			t.Fatalf("no host table for %q: %#v\n%s", mirrorURL, hosts, body)
		}
		wantCaps := []any{"pull", "resolve"}
		if capability != "" {
			wantCaps = []any{capability}
		}
		for k, v := range entry {
			switch k {
			case "capabilities":
				if caps, _ := v.([]any); !slices.Equal(caps, wantCaps) {
					t.Fatalf("capabilities = %#v, want %v:\n%s", v, wantCaps, body)
				}
			case "skip_verify":
				if v != true || !skipVerify {
					t.Fatalf("skip_verify = %#v, given %v:\n%s", v, skipVerify, body)
				}
			case "ca":
				if v != ca || ca == "" {
					t.Fatalf("ca = %#v, want %q:\n%s", v, ca, body)
				}
			default:
				t.Fatalf("extra key %q in the host table:\n%s", k, body)
			}
		}
		if _, ok := entry["capabilities"]; !ok {
			t.Fatalf("no capabilities:\n%s", body)
		}
		if _, ok := entry["skip_verify"]; ok != skipVerify {
			t.Fatalf("skip_verify given %v, rendered %v:\n%s", skipVerify, ok, body)
		}
		if _, ok := entry["ca"]; ok != (ca != "") {
			t.Fatalf("ca %q given, rendered %v:\n%s", ca, ok, body)
		}

		dir := t.TempDir()
		changed, err := Apply(dir, []Registry{r})
		if err != nil || len(changed) != 1 || changed[0] != host {
			t.Fatalf("Apply = %v, %v", changed, err)
		}
		want := filepath.Join(dir, host, FileName)
		if rel, err := filepath.Rel(dir, want); err != nil || rel != filepath.Join(host, FileName) || strings.HasPrefix(rel, "..") {
			t.Fatalf("hosts.toml of %q at %s, outside %s", host, want, dir)
		}
		written, err := os.ReadFile(want)
		if err != nil || !bytes.Equal(written, body) {
			t.Fatalf("%s: %v; want the rendered file", want, err)
		}
	})
}
