package testenv

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Kubo is a real IPFS node (kubo's ipfs daemon) on 127.0.0.1, with the test profile: no bootstrap
// peers, no mDNS, no autoconf, so that it never joins the public network. Nodes of a test meet by
// Connect.
type Kubo struct {
	// API is the RPC API's URL, http://127.0.0.1:<port>.
	API string
	// Swarm is the node's swarm multiaddr with its peer ID, for Connect.
	Swarm string
	dir   string
	bin   string
	proc  *process
}

// KuboOption changes a node's configuration before it starts.
type KuboOption func(t testing.TB, k *Kubo)

// WithDNSResolver makes the node resolve names under domain (e.g. "example.test.") through the DoH
// server at url (StartDoH): DNSLink records for the test.
func WithDNSResolver(domain, url string) KuboOption {
	return func(t testing.TB, k *Kubo) {
		k.run(t, "config", "--json", "DNS.Resolvers", fmt.Sprintf(`{%q: %q}`, domain, url))
	}
}

// StartKubo initialises and starts an ipfs daemon for the test and stops it when the test ends.
func StartKubo(t testing.TB, opts ...KuboOption) *Kubo {
	t.Helper()
	k := &Kubo{bin: Tool(t, "ipfs"), dir: shortTempDir(t, "kubo")}
	k.run(t, "init", "--profile=test", "--empty-repo")
	api, swarm := FreeAddr(t), FreeAddr(t)
	k.run(t, "config", "Addresses.API", "/ip4/127.0.0.1/tcp/"+strings.Split(api, ":")[1])
	k.run(t, "config", "--json", "Addresses.Gateway", "[]")
	k.run(t, "config", "--json", "Addresses.Swarm", fmt.Sprintf(`["/ip4/127.0.0.1/tcp/%s"]`, strings.Split(swarm, ":")[1]))
	// The DHT of the nodes the test connects, and nothing else: IPNS records go between them, blocks
	// come over bitswap from connected peers.
	k.run(t, "config", "Routing.Type", "dht")
	for _, opt := range opts {
		opt(t, k)
	}
	id := strings.TrimSpace(k.run(t, "config", "Identity.PeerID"))
	k.API = "http://" + api
	k.Swarm = fmt.Sprintf("/ip4/127.0.0.1/tcp/%s/p2p/%s", strings.Split(swarm, ":")[1], id)

	log := filepath.Join(k.dir, "daemon.log")
	p, err := startProcessEnv(log, []string{"IPFS_PATH=" + k.dir, "IPFS_TELEMETRY=off"}, k.bin, "daemon")
	if err != nil {
		t.Fatalf("start ipfs daemon: %v", err)
	}
	k.proc = p
	t.Cleanup(func() {
		p.stop(10 * time.Second)
		if t.Failed() {
			t.Logf("ipfs daemon %s log (end):\n%s", k.API, logTail(log))
		}
	})
	err = waitReady(p, 60*time.Second, func() error {
		resp, err := http.Post(k.API+"/api/v0/id", "", nil)
		if err != nil {
			return err
		}
		_ = resp.Body.Close() // only the status matters
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ipfs daemon not ready: %v\n%s", err, logTail(log))
	}
	return k
}

// Run runs the ipfs command line against this node's repository and returns its output.
func (k *Kubo) Run(t testing.TB, args ...string) string {
	t.Helper()
	return k.run(t, args...)
}

func (k *Kubo) run(t testing.TB, args ...string) string {
	t.Helper()
	cmd := exec.Command(k.bin, args...)
	cmd.Env = append(os.Environ(), "IPFS_PATH="+k.dir, "IPFS_TELEMETRY=off")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("ipfs %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Connect connects this node to another over its swarm address.
func (k *Kubo) Connect(t testing.TB, other *Kubo) {
	t.Helper()
	k.run(t, "swarm", "connect", other.Swarm)
}
