package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// inNetnsEnv marks a test process that RunInNetns re-executed inside its namespace.
const inNetnsEnv = "IMAGEMESH_TEST_NETNS"

// RunInNetns runs the calling test inside a network namespace of its own, which has loopback and an
// interface with the given IPv4 addresses (/24), and returns false; the caller returns at once.
// In the re-executed process it returns true, and the test goes on there. Servers in the test may
// then bind addresses that are not loopback (a Kubernetes API server refuses loopback endpoints)
// without touching the machine's network. The namespace is removed when the test ends.
func RunInNetns(t *testing.T, addrs ...string) bool {
	t.Helper()
	if os.Getenv(inNetnsEnv) == t.Name() {
		return true
	}
	ns := Netns(t, "imx-test")
	run := func(args ...string) { IP(t, args...) }
	// A veth pair with both ends inside: the addresses need an interface that is up, and the kernel
	// here may lack the dummy driver.
	run("-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	for _, a := range addrs {
		run("-n", ns, "addr", "add", a+"/24", "dev", "d0")
	}
	run("-n", ns, "link", "set", "d0", "up")
	run("-n", ns, "link", "set", "d1", "up")
	// A default route: some servers (kube-apiserver) pick the address they advertise from it.
	run("-n", ns, "route", "add", "default", "dev", "d0")

	args := []string{"netns", "exec", ns, os.Args[0], "-test.run", "^" + t.Name() + "$", "-test.v", "-test.count=1"}
	cmd := exec.Command("ip", args...)
	cmd.Env = append(os.Environ(), inNetnsEnv+"="+t.Name())
	out, err := cmd.CombinedOutput()
	t.Logf("in network namespace %s:\n%s", ns, out)
	if err != nil || !strings.Contains(string(out), "--- PASS: "+t.Name()) {
		t.Fatalf("test in network namespace %s: %v", ns, err)
	}
	return false
}

// Netns makes a network namespace named prefix-<pid>, with its loopback up, and removes it when
// the test ends (with the veth pairs that have an end in it). It needs root and ip.
func Netns(t testing.TB, prefix string) string {
	t.Helper()
	RequireRoot(t)
	Tool(t, "ip")
	ns := fmt.Sprintf("%s-%d", prefix, os.Getpid())
	IP(t, "netns", "add", ns)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v %s", ns, err, out)
		}
	})
	IP(t, "-n", ns, "link", "set", "lo", "up")
	return ns
}

// IP runs ip with args and fails the test if it fails.
func IP(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
