// Package e2e runs the node-agent binary against real components: the distribution registry as
// upstream and containerd (1.6 from Debian, 2.x built from its module) pulling through it.
package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/pkg/mirror"
)

var agentBin, controllerBin, imagemeshBin string

func TestMain(m *testing.M) {
	// Every test here runs the binaries built below against real components: none belongs to the
	// unit tier (-short, make test-unit), so under -short nothing is built and nothing runs.
	flag.Parse()
	if testing.Short() {
		fmt.Println("test/e2e: every test needs the built binaries and real components: skipped under -short; run make test")
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "imagemesh-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	agentBin = filepath.Join(dir, "node-agent")
	controllerBin = filepath.Join(dir, "controller")
	imagemeshBin = filepath.Join(dir, "imagemesh")
	build := exec.Command("go", "build", "-o", dir+"/", "github.com/imagemesh/imagemesh/cmd/node-agent", "github.com/imagemesh/imagemesh/cmd/controller", "github.com/imagemesh/imagemesh/cmd/imagemesh")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build node-agent and controller:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// agent is a node-agent process.
type agent struct {
	t       testing.TB
	args    []string
	Addr    string
	URL     string
	DataDir string
	// netns, if set, is the network namespace the process runs in (ip netns exec).
	netns string
	log   string
	cmd   *exec.Cmd
}

// startAgent starts node-agent with args on a free port and a fresh data dir, and waits until ready.
func startAgent(t testing.TB, args ...string) *agent {
	t.Helper()
	return startAgentOn(t, "127.0.0.1", args...)
}

// startAgentOn starts node-agent with its API on a free port of host.
func startAgentOn(t testing.TB, host string, args ...string) *agent {
	t.Helper()
	return startAgentAt(t, testenv.FreeAddrOn(t, host), args...)
}

// startAgentAt starts node-agent with its API on addr.
func startAgentAt(t testing.TB, addr string, args ...string) *agent {
	t.Helper()
	return launchAgent(t, &agent{Addr: addr, DataDir: t.TempDir()}, args...)
}

// launchAgent starts the agent a describes (its Addr and DataDir set, and netns if it runs in one)
// with args, stops it when the test ends, and waits until it is ready.
func launchAgent(t testing.TB, a *agent, args ...string) *agent {
	t.Helper()
	a.t, a.args = t, args
	a.URL = "http://" + a.Addr
	a.log = filepath.Join(t.TempDir(), "agent.log")
	// Before Start: an agent that never gets ready is stopped too.
	t.Cleanup(func() {
		a.Stop()
		if t.Failed() {
			b, _ := os.ReadFile(a.log)
			t.Logf("node-agent log:\n%s", b)
		}
	})
	a.Start()
	return a
}

// Start (re)starts the process on the same address and data dir.
func (a *agent) Start() {
	a.t.Helper()
	logf, err := os.OpenFile(a.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		a.t.Fatal(err)
	}
	args := append([]string{"--listen", a.Addr, "--data-dir", a.DataDir, "--log-level", "debug"}, a.args...)
	a.cmd = exec.Command(agentBin, args...)
	if a.netns != "" {
		// ip execs the agent in place: the process, its PID and its signals are the agent's.
		a.cmd = exec.Command("ip", append([]string{"netns", "exec", a.netns, agentBin}, args...)...)
	}
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	if err := a.cmd.Start(); err != nil {
		a.t.Fatal(err)
	}
	logf.Close()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(a.URL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := os.ReadFile(a.log)
	a.t.Fatalf("node-agent not ready on %s:\n%s", a.Addr, b)
}

// Stop sends SIGTERM and waits for a graceful exit.
func (a *agent) Stop() {
	if a.cmd == nil || a.cmd.Process == nil {
		return
	}
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		a.t.Errorf("SIGTERM node-agent: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- a.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			a.t.Errorf("node-agent did not exit cleanly on SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		_ = a.cmd.Process.Kill()
		a.t.Errorf("node-agent did not exit within 30s of SIGTERM; killed: %v", <-done)
	}
	a.cmd = nil
}

// mustWrite writes a file the test needs.
func mustWrite(t testing.TB, path string, data []byte, perm os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, perm); err != nil {
		t.Fatal(err)
	}
}

// randomFile writes size random bytes to a new file in a temp dir and returns its path.
func randomFile(t testing.TB, name string, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// Kill sends SIGKILL: no chance to clean up.
func (a *agent) Kill() {
	a.cmd.Process.Kill()
	a.cmd.Wait()
	a.cmd = nil
}

// Metric returns the sum of the samples of a metric whose labels contain every given name="value".
func (a *agent) Metric(name string, labels ...string) float64 {
	a.t.Helper()
	return scrape(a.t, a.URL+"/metrics", name, labels...)
}

// scrape returns the sum of the samples of a metric at a Prometheus endpoint whose labels contain
// every given name="value".
func scrape(t testing.TB, url, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(line, l)
		}
		if !ok {
			continue
		}
		var v float64
		if _, err := fmt.Sscanf(line[strings.LastIndexByte(line, ' ')+1:], "%g", &v); err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

// Logs returns what the agent has logged so far.
func (a *agent) Logs() string {
	b, _ := os.ReadFile(a.log)
	return string(b)
}

// Token is the node token the agent keeps in its data dir (the agent requires it of /v2/ requests
// when it writes hosts.toml, or when told to).
func (a *agent) Token() string {
	a.t.Helper()
	b, err := os.ReadFile(filepath.Join(a.DataDir, "node-token"))
	if err != nil {
		a.t.Fatalf("node token: %v", err)
	}
	return strings.TrimSpace(string(b))
}

// Get is get with the agent's node token, as its node's containerd asks.
func (a *agent) Get(url string) (int, []byte, error) {
	a.t.Helper()
	return get(a.t, url, mirror.NodeTokenHeader, a.Token())
}

// get GETs url with the given header name, value pairs.
func get(t testing.TB, url string, header ...string) (int, []byte, error) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return c
}
