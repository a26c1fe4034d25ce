package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// TestStatusPageInChromium pulls an image through a real agent twice (from the upstream, then from
// the cache), loads the status page on the agent's metrics address in headless Chromium, and checks
// what it shows: the cache, the hit ratio, the registry, the pulls with their sources, and a failed
// pull among the errors.
func TestStatusPageInChromium(t *testing.T) {
	chromium := testenv.Tool(t, "chromium")
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 512 << 10}, testenv.Layer{Size: 128 << 10})
	metrics := testenv.FreeAddr(t)
	a := startAgent(t, "--metrics-listen", metrics, "--upstream", "example.test="+reg.URL, "--default-registry", "example.test")
	for range 2 {
		out, err := exec.Command(testenv.Tool(t, "crane"), "pull", "--insecure", a.Addr+"/team/app:v1", filepath.Join(t.TempDir(), "img.tar")).CombinedOutput()
		if err != nil {
			t.Fatalf("crane pull through the agent: %v\n%s", err, out)
		}
	}
	// A pull of an image that is not there is a 404, not an error; one the upstream cannot answer is.
	reg.Stop(t)
	if out, err := exec.Command(testenv.Tool(t, "crane"), "digest", "--insecure", a.Addr+"/team/other:v1").CombinedOutput(); err == nil {
		t.Fatalf("crane digest with the upstream down succeeded: %s", out)
	}

	dom := chromiumDump(t, chromium, "http://"+metrics+"/", "")
	for _, want := range []string{
		"imagemesh node agent",
		"example.test/team/app", // the pulls
		">upstream<",            // the first pull's source
		">local<",               // the second's
		"example.test/team/other",
		"hit ratio",
		"agent configuration", // example.test, from --upstream
		"Peering is off",
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
	// Half the blob bytes came from the cache: the ratio is neither 0 nor 100%.
	if strings.Contains(dom, `id="hit-ratio">0.0%`) || strings.Contains(dom, `id="hit-ratio">100.0%`) || strings.Contains(dom, "no pulls yet") {
		t.Errorf("hit ratio after one cold and one warm pull: %s", between(dom, `id="hit-ratio">`, "<"))
	}
	if errs := between(dom, `id="errors"`, "</section>"); !strings.Contains(errs, "example.test/team/other") || strings.Contains(errs, "No failed pulls") {
		t.Errorf("the failed pull is not among the errors:\n%s", errs)
	}

	// The same page as a picture, for the README (IMAGEMESH_SCREENSHOT=path keeps it).
	shot := os.Getenv("IMAGEMESH_SCREENSHOT")
	if shot == "" {
		shot = filepath.Join(t.TempDir(), "status.png")
	}
	chromiumDump(t, chromium, "http://"+metrics+"/", shot)
	png, err := os.ReadFile(shot)
	if err != nil || !bytes.HasPrefix(png, []byte("\x89PNG")) || len(png) < 10<<10 {
		t.Fatalf("screenshot: %d bytes, %v", len(png), err)
	}
}

// chromiumDump loads url in headless Chromium and returns the DOM it rendered, or with shot set,
// writes a screenshot there instead.
func chromiumDump(t *testing.T, chromium, url, shot string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
		"--user-data-dir=" + t.TempDir(), "--window-size=1280,900"}
	if shot != "" {
		args = append(args, "--screenshot="+shot)
	} else {
		args = append(args, "--dump-dom")
	}
	cmd := exec.CommandContext(ctx, chromium, append(args, url)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %s: %v\n%s", url, err, stderr.String())
	}
	return stdout.String()
}

func between(s, from, to string) string {
	_, after, ok := strings.Cut(s, from)
	if !ok {
		return ""
	}
	before, _, _ := strings.Cut(after, to)
	return before
}
