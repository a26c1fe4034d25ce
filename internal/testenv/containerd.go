package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// ContainerdVersion selects which containerd a test runs.
type ContainerdVersion string

const (
	// Containerd16 is Debian's containerd 1.6, what many nodes still run.
	Containerd16 ContainerdVersion = "1.6"
	// Containerd2 is containerd 2.x built from its module (hack/tools/containerd2).
	Containerd2 ContainerdVersion = "2"
)

// Containerd is a real containerd daemon with its own root, state, config and socket, the native
// snapshotter (overlayfs needs kernel support a sandbox may lack), and the CRI plugin, whose registry
// config_path is HostsDir.
type Containerd struct {
	Version  ContainerdVersion
	Socket   string
	Root     string
	HostsDir string

	ctr string
	log string
	cmd *exec.Cmd
}

// The version 2 config of containerd 1.6; CRI's registry settings live in the CRI plugin.
const config16 = `version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = %[5]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[6]q
    conf_dir = %[6]q
`

// The version 3 config of containerd 2.x; CRI's image service is its own plugin.
const config2 = `version = 3
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs"]
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
# ctr pulls through the transfer service, which unpacks only for the snapshotters named here.
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = %[7]q
  snapshotter = "native"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`

// StartContainerd starts a containerd of version v whose CRI plugin reads registry hosts from
// hostsDir, and stops it and removes its state when the test ends.
func StartContainerd(t testing.TB, v ContainerdVersion, hostsDir string) *Containerd {
	t.Helper()
	RequireRoot(t)
	var bin, ctr, tmpl string
	switch v {
	case Containerd16:
		bin, ctr, tmpl = Tool(t, "containerd"), Tool(t, "ctr"), config16
	case Containerd2:
		bin, ctr, tmpl = Tool(t, "containerd2"), Tool(t, "ctr2"), config2
	default:
		t.Fatalf("unknown containerd version %q", v)
	}
	// Unix socket paths are limited to 108 bytes: keep the daemon's directory short.
	dir, err := os.MkdirTemp("", "ctrd")
	if err != nil {
		t.Fatal(err)
	}
	c := &Containerd{
		Version:  v,
		Socket:   filepath.Join(dir, "c.sock"),
		Root:     filepath.Join(dir, "root"),
		HostsDir: hostsDir,
		ctr:      ctr,
		log:      filepath.Join(dir, "containerd.log"),
	}
	config := filepath.Join(dir, "config.toml")
	body := fmt.Sprintf(tmpl, c.Root, filepath.Join(dir, "state"), c.Socket, c.Socket+".ttrpc", hostsDir, filepath.Join(dir, "cni"),
		"linux/"+runtime.GOARCH)
	if err := os.WriteFile(config, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(c.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	c.cmd = exec.Command(bin, "--config", config, "--log-level", "info")
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	// Its own process group, so that the shims it might start go with it.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start containerd %s: %v", v, err)
	}
	t.Cleanup(func() {
		c.stop()
		if t.Failed() {
			t.Logf("containerd %s log:\n%s", v, logTail(c.log))
		}
		os.RemoveAll(dir)
	})
	err = waitFor(30*time.Second, func() error {
		out, err := c.run(context.Background(), "version")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("containerd %s not ready: %v\n%s", v, err, logTail(c.log))
	}
	return c
}

func (c *Containerd) stop() {
	if c.cmd == nil {
		return
	}
	syscall.Kill(-c.cmd.Process.Pid, syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	c.cmd = nil
}

func (c *Containerd) run(ctx context.Context, args ...string) (string, error) {
	args = append([]string{"--address", c.Socket, "--namespace", "imagemesh"}, args...)
	out, err := exec.CommandContext(ctx, c.ctr, args...).CombinedOutput()
	return string(out), err
}

// CtrPull pulls ref with ctr through the registry hosts in HostsDir, and unpacks it.
func (c *Containerd) CtrPull(ctx context.Context, ref string) (string, error) {
	out, err := c.run(ctx, "images", "pull", "--hosts-dir", c.HostsDir, "--snapshotter", "native", ref)
	if err != nil {
		return out, fmt.Errorf("ctr images pull %s: %w", ref, err)
	}
	check, err := c.run(ctx, "images", "check", "name=="+ref)
	if err != nil || !strings.Contains(check, "complete") {
		return out + check, fmt.Errorf("ctr images check %s: image not complete: %v", ref, err)
	}
	return out, nil
}

// CRIPull pulls ref through the CRI image service, as the kubelet does, and returns the image
// reference containerd reports.
func (c *Containerd) CRIPull(ctx context.Context, ref string) (string, error) {
	conn, err := grpc.NewClient("unix://"+c.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	images := runtimeapi.NewImageServiceClient(conn)
	resp, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return "", fmt.Errorf("CRI PullImage %s: %w", ref, err)
	}
	status, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil || status.Image == nil {
		return "", fmt.Errorf("CRI ImageStatus %s after pull: %v", ref, err)
	}
	return resp.ImageRef, nil
}
