package testenv

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestContainerdPullsFromRegistry proves the harness itself: both containerd versions pull an image
// pushed with crane, with ctr and through CRI, using a hosts.toml with no mirror.
func TestContainerdPullsFromRegistry(t *testing.T) {
	reg := StartRegistry(t)
	ref := reg.Host + "/harness/app:v1"
	PushImage(t, ref, Layer{Size: 100 << 10}, Layer{Size: 200 << 10})
	hosts := t.TempDir()
	os.MkdirAll(filepath.Join(hosts, reg.Host), 0o755)
	os.WriteFile(filepath.Join(hosts, reg.Host, "hosts.toml"), []byte("server = \""+reg.URL+"\"\n"), 0o644)
	for _, v := range []ContainerdVersion{Containerd16, Containerd2} {
		t.Run(string(v), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			c := StartContainerd(t, v, hosts)
			if out, err := c.CtrPull(ctx, ref); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			if _, err := c.CRIPull(ctx, ref); err != nil {
				t.Fatal(err)
			}
		})
	}
}
