package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Dockerd is a real Docker Engine daemon (Debian's docker.io: dockerd 20.10) whose data root, exec
// root, pidfile, API socket, daemon.json and key file live under a temp dir. It uses a containerd of
// its own (StartContainerd, 1.6, the containerd Debian's docker.io runs on): left to itself,
// dockerd would use the machine's containerd whenever /run/containerd/containerd.sock exists. It
// needs no network of its own: no bridge, no iptables rules, and the vfs storage driver, which
// mounts nothing (overlay2 needs kernel support a sandbox may lack; vfs copies every layer, which
// small test images afford).
//
// Everything it would fetch from outside the machine goes to a proxy of the test's that refuses
// every connection and counts it (OutsideAttempts): a pull that passes has been served from
// loopback only. The one trace it leaves outside its dir is the empty /run/docker/plugins, which
// dockerd 20.10 creates whatever its exec root.
type Dockerd struct {
	// Socket is the API socket; Host is "unix://" + Socket, as DOCKER_HOST names it.
	Socket, Host string
	// DataRoot is dockerd's --data-root: images, layers, containers.
	DataRoot string

	docker, config, cliConfig, log string
	proc                           *process
	outside                        atomic.Int64
}

// DockerdOptions configure a Dockerd through its daemon.json.
type DockerdOptions struct {
	// RegistryMirrors is daemon.json's registry-mirrors ("http://127.0.0.1:5000"): dockerd asks
	// them, in order, for images of docker.io only, and Docker Hub itself when they fail.
	RegistryMirrors []string
	// InsecureRegistries is daemon.json's insecure-registries; 127.0.0.0/8 is insecure anyway.
	InsecureRegistries []string
}

// StartDockerd starts dockerd (and its containerd), waits until its API answers, and when the test
// ends stops both and removes their dirs. It needs root.
func StartDockerd(t testing.TB, opts DockerdOptions) *Dockerd {
	t.Helper()
	bin, cli := Tool(t, "dockerd"), Tool(t, "docker")
	RequireRoot(t)
	// containerd first: its cleanup, registered first, runs after dockerd's.
	ctrd := StartContainerd(t, Containerd16, t.TempDir())
	dir := shortTempDir(t, "dkd")
	d := &Dockerd{
		Socket:    filepath.Join(dir, "d.sock"),
		DataRoot:  filepath.Join(dir, "data"),
		docker:    cli,
		config:    filepath.Join(dir, "daemon.json"),
		cliConfig: filepath.Join(dir, "cli"),
		log:       filepath.Join(dir, "dockerd.log"),
	}
	d.Host = "unix://" + d.Socket
	daemonJSON := map[string]any{
		"registry-mirrors":    nonNil(opts.RegistryMirrors),
		"insecure-registries": nonNil(opts.InsecureRegistries),
	}
	if v := dockerdMajor(bin); v > 0 && v < 23 {
		// Before 23.0, dockerd makes a key that names it, by default /etc/docker/key.json, the
		// machine's; later versions make none, and refuse the setting.
		daemonJSON["deprecated-key-path"] = filepath.Join(dir, "key.json")
	}
	config, err := json.MarshalIndent(daemonJSON, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(d.config, config, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(d.cliConfig, 0o700); err != nil {
		t.Fatal(err)
	}
	proxy := d.refuseOutside(t)
	t.Cleanup(func() {
		if d.proc != nil {
			d.proc.stop(20 * time.Second)
		}
		if t.Failed() {
			t.Logf("dockerd daemon.json:\n%s\ndockerd log (end):\n%s", config, logTail(d.log))
		}
		if err := unmountUnder(dir); err != nil {
			t.Errorf("dockerd: %v", err)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("dockerd: %v", err)
		}
	})

	cmd := exec.Command(bin,
		"--config-file", d.config,
		"--data-root", d.DataRoot,
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"),
		"--host", d.Host,
		"--containerd", ctrd.Socket,
		"--storage-driver", "vfs",
		"--bridge", "none", "--iptables=false", "--ip6tables=false",
		"--log-level", "debug")
	// Go's proxy settings leave loopback alone: the mirrors and registries on 127.0.0.1 are reached
	// directly, everything else (Docker Hub) meets the refusing proxy.
	cmd.Env = append(os.Environ(), "HTTP_PROXY="+proxy, "HTTPS_PROXY="+proxy, "http_proxy="+proxy, "https_proxy="+proxy,
		"NO_PROXY=", "no_proxy=")
	p, err := startCmd(d.log, cmd)
	if err != nil {
		t.Fatalf("start dockerd: %v", err)
	}
	d.proc = p
	api := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", d.Socket)
		},
	}}
	err = waitReady(p, 60*time.Second, func() error {
		resp, err := api.Get("http://dockerd/_ping")
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /_ping: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("dockerd not ready: %v\n%s", err, logTail(d.log))
	}
	version, err := d.Docker(context.Background(), "version", "--format", "client {{.Client.Version}}, server {{.Server.Version}}")
	if err != nil {
		t.Fatalf("dockerd: %v", err)
	}
	t.Logf("dockerd %s (docker %s), %s, containerd %s", bin, cli, strings.TrimSpace(version), ctrd.Socket)
	return d
}

// refuseOutside listens on loopback, counts and closes every connection, and returns its URL, the
// proxy dockerd is given for everything outside the machine.
func (d *Dockerd) refuseOutside(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d.outside.Add(1)
			_ = c.Close()
		}
	}()
	return "http://" + ln.Addr().String()
}

// OutsideAttempts is how often dockerd tried to reach something off the machine (Docker Hub, say).
func (d *Dockerd) OutsideAttempts() int64 { return d.outside.Load() }

// Docker runs the docker CLI against this daemon, with a client config of its own (no credentials),
// and returns its stdout; stderr goes into the error.
func (d *Dockerd) Docker(ctx context.Context, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, d.docker, args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+d.Host, "DOCKER_CONFIG="+d.cliConfig, "DOCKER_CONTEXT=")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Pull runs `docker pull ref` and returns its output, for failure messages.
func (d *Dockerd) Pull(ctx context.Context, ref string) (string, error) {
	return d.Docker(ctx, "pull", ref)
}

// DockerImage is what `docker image inspect` says of an image.
type DockerImage struct {
	// ID is the image's id: its config's digest.
	ID string `json:"Id"`
	// RepoTags are the names it is tagged with, RepoDigests "<repository>@<manifest digest>" for
	// each repository it was pulled from.
	RepoTags    []string
	RepoDigests []string
	RootFS      struct {
		// Layers are the diff IDs of its layers, bottom first.
		Layers []string
	}
}

// Image inspects the image named ref in this daemon.
func (d *Dockerd) Image(ctx context.Context, ref string) (DockerImage, error) {
	out, err := d.Docker(ctx, "image", "inspect", ref)
	if err != nil {
		return DockerImage{}, err
	}
	var images []DockerImage
	if err := json.Unmarshal([]byte(out), &images); err != nil {
		return DockerImage{}, fmt.Errorf("docker image inspect %s: %w:\n%s", ref, err, out)
	}
	if len(images) != 1 {
		return DockerImage{}, fmt.Errorf("docker image inspect %s: %d images:\n%s", ref, len(images), out)
	}
	return images[0], nil
}

// dockerdMajor returns the major version of dockerd at bin ("Docker version 20.10.24+dfsg1, build
// 5d6db84"), or 0 if it cannot tell.
func dockerdMajor(bin string) int {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return 0
	}
	_, v, ok := strings.Cut(string(out), "version ")
	if !ok {
		return 0
	}
	major, _, _ := strings.Cut(v, ".")
	n, err := strconv.Atoi(major)
	if err != nil {
		return 0
	}
	return n
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
