package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// TestConfigFileAndCredentials runs the agent from a YAML file against a registry that wants a
// bearer token, with the password in a file of its own, and checks that flags override the file and
// that the password never reaches the log.
func TestConfigFileAndCredentials(t *testing.T) {
	const user, password = "puller", "Tok3n-Pa55word"
	var tokens *testenv.TokenServer
	reg := testenv.StartRegistry(t, testenv.WithTokenAuth(user, password, &tokens))
	t.Setenv("DOCKER_CONFIG", reg.DockerConfig(t, user, password)) // crane's push
	want := testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 256 << 10})
	t.Setenv("DOCKER_CONFIG", t.TempDir()) // the agent must get its credentials from its own config

	dir := t.TempDir()
	pwFile := filepath.Join(dir, "password")
	mustWrite(t, pwFile, []byte(password+"\n"), 0o600)
	config := filepath.Join(dir, "agent.yaml")
	mustWrite(t, config, []byte(fmt.Sprintf(`
defaultRegistry: example.test
tagTTL: 5m
log: {level: info, format: json}
upstreams:
  - host: example.test
    endpoint: %s
    username: %s
    passwordFile: %s
`, reg.URL, user, pwFile)), 0o644)
	// --log-format on the command line wins over the file's json.
	a := startAgent(t, "--config", config, "--log-format", "text")

	out, err := exec.Command(testenv.Tool(t, "crane"), "digest", "--insecure", a.Addr+"/team/app:v1").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != want.String() {
		t.Fatalf("crane digest through the agent: %v %s, want %s", err, out, want)
	}
	if tokens.Issued.Load() == 0 {
		t.Fatal("the agent got no token: it did not authenticate")
	}
	logs := a.Logs()
	if strings.Contains(logs, password) {
		t.Fatal("the upstream password appears in the agent's log")
	}
	if strings.Contains(logs, `{"time"`) || !strings.Contains(logs, `level=INFO msg="node agent serving"`) {
		t.Fatalf("log is not text: --log-format did not override the file:\n%s", logs)
	}
	if !strings.Contains(logs, "example.test="+reg.URL+" (authenticated)") {
		t.Fatalf("start-up line does not describe the upstream:\n%s", logs)
	}
}

func TestBadConfigIsRefused(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"unknown key":  "listen: 127.0.0.1:0\nlisen: typo\n",
		"bad endpoint": "upstreams: [{host: example.test, endpoint: 'ftp://x'}]\n",
		"bad size":     "cache: {maxBytes: lots}\n",
		"bad host":     "defaultRegistry: 'Bad_Host'\n",
	} {
		config := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".yaml")
		mustWrite(t, config, []byte(body), 0o644)
		out, err := exec.Command(agentBin, "--config", config, "--data-dir", filepath.Join(dir, "data")).CombinedOutput()
		if err == nil {
			t.Errorf("%s: agent started with %q", name, body)
			continue
		}
		if !strings.Contains(string(out), "node-agent:") {
			t.Errorf("%s: no clear error: %s", name, out)
		}
	}
	if _, err := exec.Command(agentBin, "--upstream", "no-equals-sign").CombinedOutput(); err == nil {
		t.Error("agent accepted --upstream without HOST=URL")
	}
}
