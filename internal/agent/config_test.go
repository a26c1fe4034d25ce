package agent

import (
	"encoding/json"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCacheSizeBytesOrShareOfTheFilesystem(t *testing.T) {
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	disk := float64(st.Blocks) * float64(st.Bsize)
	for in, want := range map[string]int64{
		`"20GiB"`: 20 << 30,
		`1000`:    1000,
		`"15%"`:   int64(disk * 0.15),
		`"0.5%"`:  int64(disk * 0.005),
	} {
		var c CacheSize
		if err := json.Unmarshal([]byte(in), &c); err != nil {
			t.Errorf("%s: %v", in, err)
			continue
		}
		if got, err := c.Resolve(dir); err != nil || got != want {
			t.Errorf("%s resolves to %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{`"0%"`, `"101%"`, `"-5%"`, `"lots"`, `"%"`, `true`} {
		var c CacheSize
		if err := json.Unmarshal([]byte(bad), &c); err == nil {
			t.Errorf("%s accepted as %+v", bad, c)
		}
	}
}

func TestPeeringEncryption(t *testing.T) {
	for _, tc := range []struct {
		p  PeeringConfig
		ok bool
	}{
		{PeeringConfig{Listen: []string{"/ip4/0.0.0.0/tcp/5001"}, KeyFile: "k"}, true},
		{PeeringConfig{Listen: []string{"/ip4/0.0.0.0/tcp/5001"}, KeyFile: "k", Encryption: "tls"}, true},
		{PeeringConfig{Listen: []string{"/ip4/0.0.0.0/tcp/5001"}, KeyFile: "k", Encryption: "none"}, true},
		{PeeringConfig{Listen: []string{"/ip4/0.0.0.0/tcp/5001"}, Open: true}, true},
		// Open and unencrypted: nobody would be authenticated, every byte readable and alterable.
		{PeeringConfig{Listen: []string{"/ip4/0.0.0.0/tcp/5001"}, Open: true, Encryption: "none"}, false},
		{PeeringConfig{Listen: []string{"/ip4/0.0.0.0/tcp/5001"}, KeyFile: "k", Encryption: "aes"}, false},
	} {
		if errs := tc.p.validate(); (len(errs) == 0) != tc.ok {
			t.Errorf("open %v, encryption %q: %v", tc.p.Open, tc.p.Encryption, errs)
		}
	}
}

func TestPeeringDirectListen(t *testing.T) {
	listen := []string{"/ip4/0.0.0.0/tcp/5001"}
	for _, tc := range []struct {
		p  PeeringConfig
		ok bool
	}{
		{PeeringConfig{Listen: listen, KeyFile: "k", DirectListen: "0.0.0.0:5003"}, true},
		{PeeringConfig{Listen: listen, KeyFile: "k", DirectListen: "[::]:5003", Encryption: "none"}, true},
		{PeeringConfig{Listen: listen, KeyFile: "k", DirectListen: "5003"}, false},
		{PeeringConfig{Listen: listen, KeyFile: "k", DirectListen: "0.0.0.0:"}, false},
		// Without peering, nothing would offer the listener.
		{PeeringConfig{DirectListen: "0.0.0.0:5003"}, false},
	} {
		if errs := tc.p.validate(); (len(errs) == 0) != tc.ok {
			t.Errorf("directListen %q: %v", tc.p.DirectListen, errs)
		}
	}
}
