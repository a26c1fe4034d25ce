package e2e

import (
	"encoding/xml"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// conformance runs the OCI distribution-spec conformance suite against the registry at host (plain
// HTTP) and returns the names of the checks that passed and of those that failed.
func conformance(t *testing.T, host string) (passed, failed []string) {
	t.Helper()
	bin := testenv.Tool(t, "conformance")
	dir := t.TempDir()
	cmd := exec.Command(bin)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "OCI_REGISTRY="+host, "OCI_TLS=disabled", "OCI_REPO1=conformance/repo1",
		"OCI_REPO2=conformance/repo2", "OCI_RESULTS_DIR="+dir, "OCI_LOG=error")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("conformance suite: %v\n%s", err, out)
	}
	f, err := os.Open(filepath.Join(dir, "junit.xml"))
	if err != nil {
		t.Fatalf("conformance suite wrote no junit.xml: %v\n%s", err, out)
	}
	defer f.Close()
	dec := xml.NewDecoder(f)
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("junit.xml: %v", err)
		}
		se, ok := tok.(xml.StartElement)
		if !ok || se.Name.Local != "testcase" {
			continue
		}
		var tc struct {
			Name      string    `xml:"name,attr"`
			Classname string    `xml:"classname,attr"`
			Skipped   *struct{} `xml:"skipped"`
			Failure   *struct{} `xml:"failure"`
			Error     *struct{} `xml:"error"`
		}
		if err := dec.DecodeElement(&tc, &se); err != nil {
			t.Fatalf("junit.xml: %v", err)
		}
		name := tc.Classname + "/" + tc.Name
		switch {
		case tc.Failure != nil || tc.Error != nil:
			failed = append(failed, name)
		case tc.Skipped == nil:
			passed = append(passed, name)
		}
	}
	sort.Strings(passed)
	sort.Strings(failed)
	return passed, failed
}

// TestConformance: the gateway, on Storj and on IPFS, passes the OCI distribution-spec conformance
// suite at least as well as the distribution v3.1.2 registry does on its filesystem driver, check by
// check.
func TestConformance(t *testing.T) {
	reg := testenv.StartRegistry(t)
	refPassed, refFailed := conformance(t, reg.Host)
	t.Logf("distribution v3.1.2 on the filesystem: %d checks passed, %d failed: %v", len(refPassed), len(refFailed), refFailed)
	if len(refPassed) < 10 {
		t.Fatalf("the reference registry passed only %d checks: the suite did not run", len(refPassed))
	}
	ok := map[string]bool{}
	for _, n := range refFailed {
		ok[n] = true
	}
	_, access := storjBucket(t)
	gateways := map[string]string{"storj": startStorjGateway(t, access), "ipfs": startGateway(t, testenv.StartKubo(t))}
	for name, host := range gateways {
		passed, failed := conformance(t, host)
		t.Logf("gateway on %s: %d checks passed, %d failed: %v", name, len(passed), len(failed), failed)
		for _, n := range failed {
			if !ok[n] {
				t.Errorf("gateway on %s fails %q, which the reference registry passes", name, n)
			}
		}
		if len(passed) < len(refPassed) {
			t.Errorf("gateway on %s passed %d checks, the reference %d", name, len(passed), len(refPassed))
		}
	}
}
