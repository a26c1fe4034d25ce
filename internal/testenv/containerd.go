package testenv

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// ContainerdVersion selects which containerd a test runs.
type ContainerdVersion string

const (
	// Containerd16 is Debian's containerd 1.6 (binaries containerd and ctr), what many nodes still run.
	Containerd16 ContainerdVersion = "1.6"
	// Containerd2 is containerd 2.x built from its module by `hack/tools/build.sh containerd2`
	// (binaries containerd2 and ctr2, so that they do not shadow Debian's).
	Containerd2 ContainerdVersion = "2"
)

// Namespaces in which the pulls land: ctr's is ours, CRI's is fixed by the kubelet's convention.
const (
	CtrNamespace = "imagemesh"
	CRINamespace = "k8s.io"
)

// Containerd is a real containerd daemon with its own root, state, config and socket under a temp
// dir. It uses the native snapshotter for ctr and CRI alike (overlayfs needs kernel support that a
// sandbox may lack, and native needs none), and its CRI plugin reads registry hosts from HostsDir.
type Containerd struct {
	Version ContainerdVersion
	// Socket is the gRPC socket, for ctr --address and for CRI clients.
	Socket string
	// Root is containerd's root (content store, metadata, snapshots).
	Root string
	// HostsDir holds <registry host>/hosts.toml, for CRI (config_path) and for ctr (--hosts-dir).
	HostsDir string

	ctr, config, log string
	proc             *process
}

// config16 is containerd 1.6's config (version 2): CRI's registry and snapshotter settings live in
// the CRI plugin. The snapshotters disabled here only fill the log with "skip"/"devmapper not
// configured" without a matching filesystem or device.
const config16 = `version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.grpc.v1.cri"]
  # The streaming server (exec, attach) is not used; keep it off the network.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = %[5]q
  # An empty CNI dir of our own, rather than the host's /etc/cni/net.d.
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[6]q
    conf_dir = %[6]q
`

// config2 is containerd 2.x's config. Version 3 is what 2.0 to 2.3 write; 2.4 (version 4) migrates
// it at startup and logs a warning, so one file serves every 2.x. CRI's image service is its own
// plugin there, and ctr pulls through the transfer service, which unpacks only for the
// snapshotters its unpack_config names.
const config2 = `version = 3
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %[5]q
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = [%[6]q]
  conf_dir = %[6]q
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = %[7]q
  snapshotter = "native"
`

// StartContainerd starts a containerd of version v whose CRI plugin reads registry hosts from
// hostsDir, waits until it answers, and when the test ends stops it, unmounts anything left
// mounted under its dirs and removes them. It needs root.
func StartContainerd(t testing.TB, v ContainerdVersion, hostsDir string) *Containerd {
	t.Helper()
	var bin, ctr, tmpl string
	switch v {
	case Containerd16:
		bin, ctr, tmpl = Tool(t, "containerd"), Tool(t, "ctr"), config16
	case Containerd2:
		bin, ctr, tmpl = Tool(t, "containerd2"), Tool(t, "ctr2"), config2
	default:
		t.Fatalf("unknown containerd version %q", v)
	}
	RequireRoot(t)
	if abs, err := filepath.Abs(hostsDir); err == nil {
		hostsDir = abs
	}
	dir := shortTempDir(t, "ctrd")
	c := &Containerd{
		Version:  v,
		Socket:   filepath.Join(dir, "c.sock"),
		Root:     filepath.Join(dir, "root"),
		HostsDir: hostsDir,
		ctr:      ctr,
		config:   filepath.Join(dir, "config.toml"),
		log:      filepath.Join(dir, "containerd.log"),
	}
	body := fmt.Sprintf(tmpl, c.Root, filepath.Join(dir, "state"), c.Socket, c.Socket+".ttrpc", hostsDir,
		filepath.Join(dir, "cni"), "linux/"+runtime.GOARCH)
	if err := os.WriteFile(c.config, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c.proc != nil {
			c.proc.stop(15 * time.Second)
		}
		if t.Failed() {
			t.Logf("containerd %s config %s:\n%s\ncontainerd %s log (end):\n%s", v, c.config, body, v, logTail(c.log))
		}
		if err := unmountUnder(dir); err != nil {
			t.Errorf("containerd %s: %v", v, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("containerd %s: %v", v, err)
		}
	})
	p, err := startProcess(c.log, bin, "--config", c.config, "--log-level", "info")
	if err != nil {
		t.Fatalf("start containerd %s: %v", v, err)
	}
	c.proc = p
	var version string
	err = waitReady(p, 30*time.Second, func() error {
		out, err := c.ctrOutput(context.Background(), "", "version")
		version = out
		return err
	})
	if err != nil {
		t.Fatalf("containerd %s not ready: %v\n%s", v, err, logTail(c.log))
	}
	// The binary found may not be the version asked for (another containerd on PATH): say which ran.
	if _, server, ok := strings.Cut(version, "Server:"); ok {
		version = server
	}
	t.Logf("containerd %s: %s, server %s, socket %s", v, bin, strings.Join(strings.Fields(version), " "), c.Socket)
	return c
}

// ctrOutput runs ctr against this containerd in namespace ns (CtrNamespace if empty) and returns
// its stdout; stderr, where containerd 2's ctr prints deprecation warnings, goes into the error.
func (c *Containerd) ctrOutput(ctx context.Context, ns string, args ...string) (string, error) {
	if ns == "" {
		ns = CtrNamespace
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, c.ctr, append([]string{"--address", c.Socket, "--namespace", ns}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// CtrPull runs `ctr images pull --hosts-dir HostsDir --snapshotter native ref` in CtrNamespace (the
// same flags for 1.6 and 2.x; 2.x pulls through the daemon's transfer service) and then checks
// that the image is complete and unpacked. It returns ctr's output, for failure messages.
func (c *Containerd) CtrPull(ctx context.Context, ref string) (string, error) {
	args := []string{"--address", c.Socket, "--namespace", CtrNamespace,
		"images", "pull", "--hosts-dir", c.HostsDir, "--snapshotter", "native", ref}
	out, err := exec.CommandContext(ctx, c.ctr, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr images pull %s: %w", ref, err)
	}
	if err := c.requireReady(ctx, CtrNamespace, ref); err != nil {
		return string(out), err
	}
	return string(out), nil
}

// CRIPull pulls ref through the CRI image service on the socket, as the kubelet does, checks that
// CRI's ImageStatus knows it and that it is complete and unpacked, and returns the image reference
// PullImage reported (the image id, "sha256:<config digest>").
func (c *Containerd) CRIPull(ctx context.Context, ref string) (string, error) {
	conn, err := grpc.NewClient("unix://"+c.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer func() { _ = conn.Close() }() // only dialled to see it answers
	images := runtimeapi.NewImageServiceClient(conn)
	resp, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return "", fmt.Errorf("CRI PullImage %s: %w", ref, err)
	}
	status, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return resp.ImageRef, fmt.Errorf("CRI ImageStatus %s: %w", ref, err)
	}
	if status.Image == nil || status.Image.Id != resp.ImageRef {
		return resp.ImageRef, fmt.Errorf("CRI ImageStatus %s after pulling %s: %v", ref, resp.ImageRef, status.Image)
	}
	return resp.ImageRef, c.requireReady(ctx, CRINamespace, ref)
}

// Image is an image as containerd's metadata holds it, per `ctr images check`.
type Image struct {
	Ref       string
	MediaType string
	// Digest is the digest of the image's target: the manifest, or the index for multi-platform images.
	Digest digest.Digest
	// Complete: all content for this platform is in the content store.
	Complete bool
	// Unpacked: its layers are unpacked into the native snapshotter, so a container could start.
	Unpacked bool
}

// Image returns what containerd knows of the image named ref (as stored: CRI stores the
// normalized name, e.g. "docker.io/library/x:latest") in namespace ns, CtrNamespace or
// CRINamespace. It errors if there is no such image.
func (c *Containerd) Image(ctx context.Context, ns, ref string) (Image, error) {
	out, err := c.ctrOutput(ctx, ns, "images", "check", "--snapshotter", "native")
	if err != nil {
		return Image{}, err
	}
	// Columns: REF TYPE DIGEST STATUS SIZE UNPACKED; STATUS ("complete (3/3)") and SIZE
	// ("1 MiB/1 MiB") contain spaces, UNPACKED is the last field.
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[0] != ref {
			continue
		}
		d, err := digest.Parse(f[2])
		if err != nil {
			return Image{}, fmt.Errorf("ctr images check: %q: %w", sc.Text(), err)
		}
		unpacked, _ := strconv.ParseBool(f[len(f)-1])
		return Image{Ref: ref, MediaType: f[1], Digest: d, Complete: f[3] == "complete", Unpacked: unpacked}, nil
	}
	return Image{}, fmt.Errorf("containerd %s has no image %s in namespace %s; it has:\n%s", c.Version, ref, ns, out)
}

// requireReady errors unless ref is complete and unpacked in ns.
func (c *Containerd) requireReady(ctx context.Context, ns, ref string) error {
	img, err := c.Image(ctx, ns, ref)
	if err != nil {
		return err
	}
	if !img.Complete || !img.Unpacked {
		return fmt.Errorf("image %s in namespace %s is not ready after the pull: %+v", ref, ns, img)
	}
	return nil
}

// unmountUnder detaches every mount below dir, deepest first. Pulls into the native snapshotter
// mount nothing, but a test that runs containers would leave rootfs mounts that block removal.
func unmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		// Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
		p := unescapeMountinfo(f[4])
		if p == dir || strings.HasPrefix(p, dir+"/") {
			points = append(points, p)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, p := range points {
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil && err != syscall.EINVAL && err != syscall.ENOENT {
			return fmt.Errorf("unmount %s: %w", p, err)
		}
	}
	return nil
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
