package main

import (
	"context"
	"testing"

	"github.com/imagemesh/imagemesh/internal/gateway"
)

// The gateway's flags land in the configuration, with the documented defaults.
func TestGatewayFlags(t *testing.T) {
	parse := func(args ...string) gateway.Config {
		t.Helper()
		var got gateway.Config
		cmd := newCommand(func(_ context.Context, cfg gateway.Config) error { got = cfg; return nil })
		cmd.SetArgs(append([]string{"gateway"}, args...))
		if err := cmd.Execute(); err != nil {
			t.Fatalf("gateway %v: %v", args, err)
		}
		return got
	}
	want := gateway.Config{Listen: "127.0.0.1:5080", Storage: "ipfs", IPFS: gateway.IPFSLayout{API: "http://127.0.0.1:5001", Dir: "/imagemesh"}}
	if got := parse(); got != want {
		t.Errorf("defaults: %+v, want %+v", got, want)
	}
	want = gateway.Config{
		Listen: "0.0.0.0:5080", Storage: "storj",
		IPFS:         gateway.IPFSLayout{API: "http://127.0.0.1:5001", Dir: "/imagemesh"},
		Storj:        gateway.StorjLayout{AccessFile: "/etc/access", Bucket: "images", Prefix: "registry"},
		StaticLayout: true, StaticPrefix: "static", UploadSecretFile: "/etc/secret",
	}
	got := parse("--listen", "0.0.0.0:5080", "--storage", "storj", "--storj-access-file", "/etc/access", "--storj-bucket", "images",
		"--storj-prefix", "registry", "--static-layout", "--static-prefix", "static", "--upload-secret-file", "/etc/secret")
	if got != want {
		t.Errorf("storj: %+v, want %+v", got, want)
	}
}
