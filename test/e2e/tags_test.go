package e2e

import (
	"encoding/json"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// TestListTagsThroughAgent: `crane ls` and `skopeo list-tags` list a repository's tags through the
// agent, which asks the registry; a repository the registry does not know is NAME_UNKNOWN.
func TestListTagsThroughAgent(t *testing.T) {
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 1000})
	crane := testenv.Tool(t, "crane")
	want := []string{"1.0", "latest", "v1", "v2"}
	for _, tag := range []string{"v2", "latest", "1.0"} {
		if out, err := exec.Command(crane, "tag", "--insecure", reg.Host+"/team/app:v1", tag).CombinedOutput(); err != nil {
			t.Fatalf("crane tag %s: %v\n%s", tag, err, out)
		}
	}
	a := startAgent(t, "--upstream", "example.test="+reg.URL, "--default-registry", "example.test")

	out, err := exec.Command(crane, "ls", "--insecure", a.Addr+"/team/app").Output()
	if got := strings.Fields(string(out)); err != nil || !slices.Equal(got, want) {
		t.Fatalf("crane ls through the agent = %q, %v; want %q", got, err, want)
	}
	out, err = exec.Command(testenv.Tool(t, "skopeo"), "list-tags", "--tls-verify=false", "docker://"+a.Addr+"/team/app").Output()
	var listed struct{ Tags []string }
	if err != nil || json.Unmarshal(out, &listed) != nil || !slices.Equal(listed.Tags, want) {
		t.Fatalf("skopeo list-tags through the agent = %s, %v; want %q", out, err, want)
	}
	out, err = exec.Command(crane, "ls", "--insecure", a.Addr+"/team/nope").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "NAME_UNKNOWN") {
		t.Fatalf("crane ls of an unknown repository = %v:\n%s; want NAME_UNKNOWN", err, out)
	}
	if n := a.Metric("imagemesh_mirror_requests_total", `kind="tags"`, `code="200"`); n < 2 {
		t.Fatalf("agent counted %v tag lists, want crane's and skopeo's", n)
	}
}
