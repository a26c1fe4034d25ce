// Package hostconfig writes containerd's registry host configuration (hosts.toml under a config_path
// such as /etc/containerd/certs.d) that sends a registry's pulls to the node agent first.
//
// The upstream stays the `server`, so containerd falls back to it on its own when the agent is down
// or answers 404. Files carry a marker line: the agent replaces and removes only files it wrote, and
// refuses to overwrite one an operator wrote.
package hostconfig

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/distribution/reference"
	"github.com/pelletier/go-toml/v2"
	"golang.org/x/net/http/httpguts"

	"github.com/imagemesh/imagemesh/pkg/atomicfile"
)

// Marker is the first line of every file this package writes.
const Marker = "# Managed by imagemesh node-agent: edits are overwritten, the file is removed with its ImageSource."

// FileName is the file containerd reads in each registry's directory.
const FileName = "hosts.toml"

// ErrNotManaged is returned for a file that exists but was not written by imagemesh.
var ErrNotManaged = errors.New("hosts.toml not managed by imagemesh")

// Registry is the configuration of one registry host.
type Registry struct {
	// Host is the registry as image references name it: docker.io, ghcr.io, registry.example:5000.
	Host string
	// Server is where containerd goes when no mirror answers. Default: https://<Host>, and
	// https://registry-1.docker.io for docker.io.
	Server string
	// Mirrors are asked first, in order.
	Mirrors []Mirror
}

// Mirror is one host containerd asks before the server.
type Mirror struct {
	// URL of the mirror, e.g. http://127.0.0.1:5000. containerd appends /v2/... and ?ns=<registry>.
	URL string
	// Capabilities default to pull and resolve; resolve lets the mirror answer tag lookups.
	Capabilities []string
	SkipVerify   bool
	// CA is a CA certificate file for a TLS mirror.
	CA string
	// Header is sent with every request containerd makes to this mirror (and never to the server):
	// the agent's node token. A file with a header is written readable by its owner only.
	Header map[string]string
}

type hostsFile struct {
	Server string               `toml:"server,omitempty"`
	Host   map[string]hostEntry `toml:"host,omitempty"`
}

type hostEntry struct {
	Capabilities []string `toml:"capabilities"`
	SkipVerify   bool     `toml:"skip_verify,omitempty"`
	CA           string   `toml:"ca,omitempty"`
	// Header is containerd's [host."<url>".header] table: name = value, sent on every request to
	// that host (containerd 1.5 and later).
	Header map[string]string `toml:"header,omitempty"`
}

// DefaultServer is the upstream endpoint containerd uses for a registry host without a server.
func DefaultServer(host string) string {
	if host == "docker.io" {
		return "https://registry-1.docker.io"
	}
	return "https://" + host
}

// ValidateHost checks that host is a registry host as the reference grammar defines it, which also
// keeps it a single, harmless path element.
func ValidateHost(host string) error {
	named, err := reference.ParseNormalizedNamed(host + "/x")
	if err != nil || reference.Domain(named) != host || strings.ContainsAny(host, `/\`) || strings.HasPrefix(host, ".") {
		return fmt.Errorf("invalid registry host %q", host)
	}
	return nil
}

// Render returns the hosts.toml for a registry.
func Render(r Registry) ([]byte, error) {
	if err := ValidateHost(r.Host); err != nil {
		return nil, err
	}
	if len(r.Mirrors) == 0 {
		// containerd 1.6 ignores a hosts.toml without [host] tables, silently: such a file would
		// change nothing and look as if it did.
		return nil, fmt.Errorf("registry %s: a mirror is required", r.Host)
	}
	if len(r.Mirrors) > 1 {
		// hosts.toml orders [host] tables by their position in the file, and TOML maps have none here.
		return nil, fmt.Errorf("registry %s: one mirror per registry is supported, got %d", r.Host, len(r.Mirrors))
	}
	f := hostsFile{Server: r.Server, Host: map[string]hostEntry{}}
	if f.Server == "" {
		f.Server = DefaultServer(r.Host)
	}
	if err := checkURL(f.Server); err != nil {
		return nil, fmt.Errorf("registry %s: server: %w", r.Host, err)
	}
	for _, m := range r.Mirrors {
		if err := checkURL(m.URL); err != nil {
			return nil, fmt.Errorf("registry %s: mirror: %w", r.Host, err)
		}
		if !utf8.ValidString(m.CA) {
			// TOML strings are UTF-8: go-toml would write another path than the one given.
			return nil, fmt.Errorf("registry %s: mirror %s: CA path %q is not UTF-8", r.Host, m.URL, m.CA)
		}
		caps := m.Capabilities
		if len(caps) == 0 {
			caps = []string{"pull", "resolve"}
		}
		for _, c := range caps {
			if c != "pull" && c != "resolve" {
				return nil, fmt.Errorf("registry %s: mirror %s: capability %q: the agent only pulls and resolves", r.Host, m.URL, c)
			}
		}
		for name, value := range m.Header {
			if !httpguts.ValidHeaderFieldName(name) || !httpguts.ValidHeaderFieldValue(value) {
				// The value is a secret: the error names the header only.
				return nil, fmt.Errorf("registry %s: mirror %s: header %q: invalid name or value", r.Host, m.URL, name)
			}
		}
		f.Host[m.URL] = hostEntry{Capabilities: caps, SkipVerify: m.SkipVerify, CA: m.CA, Header: m.Header}
	}
	body, err := toml.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("registry %s: %w", r.Host, err)
	}
	return append([]byte(Marker+"\n"), body...), nil
}

func checkURL(s string) error {
	if !utf8.ValidString(s) {
		return fmt.Errorf("%q is not UTF-8", s)
	}
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
		return fmt.Errorf("%q: want http(s)://host[:port] without credentials", s)
	}
	return nil
}

// Apply writes the hosts.toml of each registry under dir (dir/<host>/hosts.toml), atomically, and
// reports the hosts whose file changed. It does not touch files of other registries. A file that
// carries a header (a secret) is readable by its owner only (containerd runs as root); others are
// readable by all, as containerd's own examples are.
func Apply(dir string, registries []Registry) (changed []string, err error) {
	var errs []error
	for _, r := range registries {
		body, err := Render(r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		perm := fileMode(r)
		path := filepath.Join(dir, r.Host, FileName)
		old, err := os.ReadFile(path)
		switch {
		case err == nil && !bytes.HasPrefix(old, []byte(Marker)):
			errs = append(errs, fmt.Errorf("%s: %w: leaving it alone", path, ErrNotManaged))
			continue
		case err == nil && bytes.Equal(old, body):
			if err := ensureMode(path, perm); err != nil {
				errs = append(errs, err)
			}
			continue
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			errs = append(errs, err)
			continue
		}
		if err := atomicfile.Write(path, body, perm); err != nil {
			errs = append(errs, err)
			continue
		}
		changed = append(changed, r.Host)
	}
	return changed, errors.Join(errs...)
}

// Managed lists the registry hosts under dir whose hosts.toml imagemesh wrote.
func Managed(dir string) ([]string, error) {
	des, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var hosts []string
	for _, de := range des {
		if !de.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, de.Name(), FileName))
		if err == nil && bytes.HasPrefix(b, []byte(Marker)) {
			hosts = append(hosts, de.Name())
		}
	}
	slices.Sort(hosts)
	return hosts, nil
}

// Remove deletes a registry's hosts.toml if imagemesh wrote it, and its directory if that is then
// empty. A file imagemesh did not write is left alone and reported with ErrNotManaged.
func Remove(dir, host string) error {
	if err := ValidateHost(host); err != nil {
		return err
	}
	path := filepath.Join(dir, host, FileName)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(b, []byte(Marker)) {
		return fmt.Errorf("%s: %w", path, ErrNotManaged)
	}
	if err := os.Remove(path); err != nil {
		return err
	}
	_ = os.Remove(filepath.Dir(path)) // only succeeds if empty: certificates an operator put there stay
	return nil
}

// Prune removes every managed file whose host is not in keep.
func Prune(dir string, keep []string) (removed []string, err error) {
	hosts, err := Managed(dir)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, h := range hosts {
		if slices.Contains(keep, h) {
			continue
		}
		if err := Remove(dir, h); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, h)
	}
	return removed, errors.Join(errs...)
}

// fileMode is the mode of a registry's hosts.toml: the owner's alone when it holds a header.
func fileMode(r Registry) fs.FileMode {
	for _, m := range r.Mirrors {
		if len(m.Header) > 0 {
			return 0o600
		}
	}
	return 0o644
}

// ensureMode gives an unchanged file the mode it should have.
func ensureMode(path string, perm fs.FileMode) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Mode().Perm() == perm {
		return nil
	}
	if err := os.Chmod(path, perm); err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	return nil
}
