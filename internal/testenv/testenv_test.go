package testenv

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestContainerdPullsFromRegistry proves the harness end to end: both containerd versions pull an
// image pushed with crane, with ctr and through CRI, following the hosts.toml files in HostsDir,
// and end up with the pushed digest, complete and unpacked.
func TestContainerdPullsFromRegistry(t *testing.T) {
	reg := StartRegistry(t)
	ref := reg.Host + "/harness/app:v1"
	want := PushImage(t, ref, Layer{Size: 100 << 10}, Layer{Size: 200 << 10})
	indexRef := reg.Host + "/harness/multi:v1"
	wantIndex := PushIndex(t, indexRef, "linux/amd64", "linux/arm64")

	hosts := t.TempDir()
	// The registry's own host, with no mirror. The [host] table repeats the server because
	// containerd 1.6.20 rejects a hosts.toml without one ("invalid `host` tree"), logs it, and
	// silently falls back to its defaults.
	writeHostsTOML(t, hosts, reg.Host, reg.URL)
	// A name that resolves nowhere: pulling it works only if containerd really reads HostsDir.
	const alias = "harness.invalid"
	writeHostsTOML(t, hosts, alias, reg.URL)
	aliasRef := alias + "/harness/app:v1"

	pulls := []struct {
		ref  string
		want digest.Digest
	}{{ref, want}, {aliasRef, want}, {indexRef, wantIndex}}

	for _, v := range []ContainerdVersion{Containerd16, Containerd2} {
		t.Run(string(v), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			c := StartContainerd(t, v, hosts)
			for _, p := range pulls {
				if out, err := c.CtrPull(ctx, p.ref); err != nil {
					t.Fatalf("%v\n%s", err, out)
				}
				imageID, err := c.CRIPull(ctx, p.ref)
				if err != nil {
					t.Fatal(err)
				}
				if !strings.HasPrefix(imageID, "sha256:") {
					t.Errorf("CRI PullImage %s returned image ref %q, want an image id", p.ref, imageID)
				}
				for _, ns := range []string{CtrNamespace, CRINamespace} {
					img, err := c.Image(ctx, ns, p.ref)
					if err != nil {
						t.Fatal(err)
					}
					if img.Digest != p.want || !img.Complete || !img.Unpacked {
						t.Errorf("%s in %s: %+v, want digest %s, complete and unpacked", p.ref, ns, img, p.want)
					}
				}
			}
			if _, err := c.Image(ctx, CtrNamespace, reg.Host+"/harness/never:v1"); err == nil {
				t.Error("Image found an image that was never pulled")
			}
		})
	}
}

// TestRegistryRestart: a stopped registry refuses connections, and Start serves the same storage
// on the same address again.
func TestRegistryRestart(t *testing.T) {
	reg := StartRegistry(t)
	ref := reg.Host + "/harness/restart:v1"
	want := PushImage(t, ref, Layer{Size: 1 << 10})
	reg.Stop(t)
	if reg.PID() != 0 {
		t.Error("PID of a stopped registry is not 0")
	}
	if resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(reg.URL + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatal("stopped registry still answers")
	}
	reg.Start(t)
	if got := craneDigest(t, Tool(t, "crane"), ref); got != want {
		t.Fatalf("after restart %s is %s, want %s", ref, got, want)
	}
}

// TestToolMissing: a missing tool skips the test, except under CI=true, where it fails it. Under
// -short (the unit tier) a test that needs a tool or root always skips, installed or not, CI=true or
// not, and says what it needs.
func TestToolMissing(t *testing.T) {
	tools := t.TempDir()
	t.Setenv("IMAGEMESH_TOOLS", tools)
	const absent, present = "imagemesh-no-such-tool", "imagemesh-test-tool"
	if err := os.WriteFile(filepath.Join(tools, present), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	defer func(f func() bool) { short = f }(short)
	for _, c := range []struct {
		short       bool
		ci          string
		tool        string
		fatal, skip bool
		msg         []string // what the message must name
	}{
		{short: false, ci: "", tool: absent, skip: true, msg: []string{absent, "make test-deps"}},
		{short: false, ci: "true", tool: absent, fatal: true, msg: []string{absent, "make test-deps"}},
		{short: false, ci: "true", tool: present},
		{short: true, ci: "", tool: absent, skip: true, msg: []string{"needs " + absent + ": run make test"}},
		{short: true, ci: "true", tool: absent, skip: true, msg: []string{"needs " + absent + ": run make test"}},
		{short: true, ci: "true", tool: present, skip: true, msg: []string{"needs " + present + ": run make test"}},
	} {
		t.Setenv("CI", c.ci)
		short = func() bool { return c.short }
		var path string
		rec := record(t, func(tb testing.TB) { path = Tool(tb, c.tool) })
		name := fmt.Sprintf("short=%v CI=%q %s", c.short, c.ci, c.tool)
		if rec.fatal != c.fatal || rec.skip != c.skip {
			t.Errorf("%s: fatal=%v skip=%v, want fatal=%v skip=%v (%s)", name, rec.fatal, rec.skip, c.fatal, c.skip, rec.msg)
		}
		if !c.fatal && !c.skip && path != filepath.Join(tools, present) {
			t.Errorf("%s: Tool = %q, want %s", name, path, filepath.Join(tools, present))
		}
		for _, m := range c.msg {
			if !strings.Contains(rec.msg, m) {
				t.Errorf("%s: message %q does not say %q", name, rec.msg, m)
			}
		}
	}

	// Root and processes alike: under -short the test skips whoever runs it, and without -short
	// SkipShort lets it go on.
	t.Setenv("CI", "true")
	short = func() bool { return true }
	if rec := record(t, RequireRoot); !rec.skip || rec.msg != "needs root: run make test" {
		t.Errorf("RequireRoot under -short: skip=%v fatal=%v %q", rec.skip, rec.fatal, rec.msg)
	}
	if rec := record(t, func(tb testing.TB) { SkipShort(tb, "the node-agent binary") }); !rec.skip || rec.msg != "needs the node-agent binary: run make test" {
		t.Errorf("SkipShort under -short: skip=%v fatal=%v %q", rec.skip, rec.fatal, rec.msg)
	}
	short = func() bool { return false }
	if rec := record(t, func(tb testing.TB) { SkipShort(tb, "anything") }); rec.skip || rec.fatal {
		t.Errorf("SkipShort without -short: skip=%v fatal=%v %q", rec.skip, rec.fatal, rec.msg)
	}
}

// record runs f with a testing.TB whose Fatalf and Skipf end f, as the real ones end a test, and
// records which of them was called and with what message.
func record(t *testing.T, f func(testing.TB)) *recorder {
	rec := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(rec)
	}()
	<-done
	return rec
}

// recorder records Fatalf and Skipf instead of ending the test.
type recorder struct {
	testing.TB
	fatal, skip bool
	msg         string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.fatal, r.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (r *recorder) Skipf(format string, args ...any) {
	r.skip, r.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// writeHostsTOML points containerd's registry host at server, with no mirror.
func writeHostsTOML(t *testing.T, hostsDir, host, server string) {
	t.Helper()
	body := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", server, server)
	if err := os.MkdirAll(filepath.Join(hostsDir, host), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(hostsDir, host, "hosts.toml"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestDockerdPullsFromRegistry proves the dockerd harness: it pulls an image from a registry on
// loopback (insecure, as 127.0.0.0/8 is to dockerd) with every layer, and cannot reach Docker Hub.
func TestDockerdPullsFromRegistry(t *testing.T) {
	reg := StartRegistry(t)
	ref := reg.Host + "/harness/app:v1"
	want := PushImage(t, ref, Layer{Size: 100 << 10}, Layer{Size: 200 << 10})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	d := StartDockerd(t, DockerdOptions{})
	if out, err := d.Pull(ctx, ref); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	img, err := d.Image(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if len(img.RootFS.Layers) != 2 || !slices.Contains(img.RepoDigests, reg.Host+"/harness/app@"+want.String()) {
		t.Fatalf("pulled image %+v, want 2 layers and the digest %s", img, want)
	}
	if d.OutsideAttempts() != 0 {
		t.Fatalf("dockerd tried to reach outside the machine %d times for a pull from loopback", d.OutsideAttempts())
	}
	// Docker Hub is out of reach: the pull fails at the refusing proxy, which counts it.
	if out, err := d.Pull(ctx, "docker.io/library/imagemesh-harness-absent:v1"); err == nil {
		t.Fatalf("a pull from Docker Hub succeeded:\n%s", out)
	}
	if d.OutsideAttempts() == 0 {
		t.Fatal("a pull from Docker Hub did not go to the refusing proxy")
	}
}
