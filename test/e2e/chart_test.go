package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/internal/testenv/kubeenv"
	"github.com/imagemesh/imagemesh/pkg/peering"
)

const chartDir = "../../charts/imagemesh"

// TestHelmChart lints the chart, renders it with default and other values, and applies every
// rendered object to a real API server with a server-side dry run; the kustomize bases under config/
// go the same way.
func TestHelmChart(t *testing.T) {
	helm := testenv.Tool(t, "helm")
	if out, err := exec.Command(helm, "lint", chartDir, "--kube-version", "1.34.4").CombinedOutput(); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
	crds, _ := os.ReadFile(filepath.Join(chartDir, "crds", "imagemesh.io_imagesources.yaml"))
	generated, _ := os.ReadFile("../../config/crd/bases/imagemesh.io_imagesources.yaml")
	if len(crds) == 0 || !bytes.Equal(crds, generated) {
		t.Fatal("charts/imagemesh/crds differs from the generated CRD in config/crd/bases: run make generate")
	}

	kube := kubeenv.Start(t, filepath.Join(chartDir, "crds"))
	c, err := client.New(kube.Config, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const ns = "imagemesh"
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}

	for name, set := range map[string][]string{
		"default": nil,
		"custom": {"fullnameOverride=mesh", "agent.cacheMaxBytes=50GiB", "agent.peersResolveTags=true", "agent.nodeSelector.pool=gpu",
			"peering.existingSecret=cluster-key", "metrics.serviceMonitor.enabled=true", "controller.replicas=2", "agent.extraArgs={--tag-ttl=1m}",
			"ipfs.kubo.enabled=true", "agent.leasePolicy.enabled=false", "agent.untrustedHold=30s", "peering.encryption=none", "peering.uploadSlots=3", "ipfs.kubo.peers={/ip4/10.0.0.9/tcp/4001/p2p/12D3KooWDJairjG2pDATRRpKRdCx1CN3hG58rQHAWCcagKtKAfna}"},
	} {
		t.Run(name, func(t *testing.T) {
			objs := render(t, helm, ns, set...)
			kinds := map[string]int{}
			var args []string
			var configMapArg string
			for _, o := range objs {
				kinds[o.GetKind()]++
				switch o.GetKind() {
				case "ServiceMonitor":
					continue // no Prometheus Operator CRDs here; rendered is what is checked
				case "DaemonSet":
					cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
					for _, a := range cs[0].(map[string]any)["args"].([]any) {
						args = append(args, a.(string))
					}
				case "Deployment":
					cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
					for _, a := range cs[0].(map[string]any)["args"].([]any) {
						if v, ok := strings.CutPrefix(a.(string), "--configmap="); ok {
							configMapArg = v
						}
					}
				case "Secret":
					key, _, _ := unstructured.NestedString(o.Object, "data", "swarm.key")
					raw, _ := base64.StdEncoding.DecodeString(key)
					p := filepath.Join(t.TempDir(), "swarm.key")
					mustWrite(t, p, raw, 0o600)
					if _, err := peering.LoadPSK(p); err != nil {
						t.Fatalf("generated peering key: %v", err)
					}
				}
				if err := c.Patch(ctx, o, client.Apply, client.FieldOwner("helm-test"), client.DryRunAll, client.ForceOwnership); err != nil {
					t.Errorf("server-side dry run of %s %s: %v", o.GetKind(), o.GetName(), err)
				}
			}
			for _, k := range []string{"DaemonSet", "Deployment", "ServiceAccount", "ClusterRole", "Role", "Service"} {
				if kinds[k] == 0 {
					t.Errorf("no %s rendered", k)
				}
			}
			if !slices.Contains(args, "--cluster-config=$(POD_NAMESPACE)/"+configMapArg) || configMapArg == "" {
				t.Errorf("agent reads %v, controller writes %q", args, configMapArg)
			}
			if name == "custom" {
				if kinds["ServiceMonitor"] != 2 || kinds["Secret"] != 0 || kinds["ConfigMap"] != 1 || !slices.Contains(args, "--peer-resolve-tags") ||
					!slices.Contains(args, "--cache-max-bytes=50GiB") || !slices.Contains(args, "--tag-ttl=1m") ||
					!slices.Contains(args, "--untrusted-hold=30s") || !slices.Contains(args, "--peer-encryption=none") ||
					!slices.Contains(args, "--peer-upload-slots=3") ||
					kinds["ValidatingAdmissionPolicy"] != 0 || kinds["ValidatingAdmissionPolicyBinding"] != 0 {
					t.Errorf("custom values not rendered: kinds %v, args %v", kinds, args)
				}
			} else {
				if kinds["Secret"] != 1 {
					t.Errorf("no peering key Secret rendered")
				}
				for _, a := range []string{"--untrusted-hold=2m", "--peer-encryption=tls", "--peer-upload-slots=1"} {
					if !slices.Contains(args, a) {
						t.Errorf("default agent args %v lack %s", args, a)
					}
				}
				if kinds["ValidatingAdmissionPolicy"] != 1 || kinds["ValidatingAdmissionPolicyBinding"] != 1 {
					t.Errorf("no agent Lease policy and binding rendered: kinds %v", kinds)
				}
			}
		})
	}

	// A real install, upgrade and uninstall: the peering key is made once, survives the upgrade (a new
	// key would split the cluster until every agent restarted) and the uninstall.
	t.Run("install upgrade uninstall", func(t *testing.T) {
		home := t.TempDir()
		run := func(args ...string) {
			t.Helper()
			cmd := exec.Command(helm, append(args, "--kubeconfig", kube.Kubeconfig, "--namespace", ns)...)
			cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("helm %v: %v\n%s", args, err, out)
			}
		}
		key := func() string {
			t.Helper()
			var sec corev1.Secret
			if err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: "rel-imagemesh-peering"}, &sec); err != nil {
				t.Fatal(err)
			}
			return string(sec.Data["swarm.key"])
		}
		run("install", "rel", chartDir)
		first := key()
		run("upgrade", "rel", chartDir, "--set", "agent.logLevel=debug")
		if key() != first {
			t.Fatal("helm upgrade replaced the peering key")
		}
		run("uninstall", "rel")
		if key() != first {
			t.Fatal("helm uninstall removed the peering key")
		}
	})

	t.Run("bad values", func(t *testing.T) {
		for set, want := range map[string]string{
			"agent.port=abc":                  "agent/port",
			"agent.unknown=1":                 "unknown",
			"agent.logLevel=verbose":          "logLevel",
			"agent.dataDir=relative":          "dataDir",
			"agent.leasePolicy.enabled=maybe": "leasePolicy",
			// kubo's API and the agent's peering port would share the pod's network namespace.
			"ipfs.kubo.enabled=true,agent.peerPort=5001":       "taken by kubo",
			"agent.peerDirectPort=5002":                        "agent.peerDirectPort 5002",
			"ipfs.kubo.enabled=true,agent.peerDirectPort=4001": "taken by kubo",
			"agent.peerDirectPort=-1":                          "peerDirectPort",
		} {
			out, err := exec.Command(helm, "template", "im", chartDir, "--kube-version", "1.34.4", "--set", set).CombinedOutput()
			if err == nil || !strings.Contains(string(out), want) {
				t.Errorf("--set %s: %v, want an error naming %q:\n%s", set, err, want, out)
			}
		}
	})

	t.Run("kustomize bases", func(t *testing.T) {
		for _, dir := range []string{"../../config/rbac", "../../config/manager", "../../config/agent"} {
			files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
			for _, f := range files {
				if filepath.Base(f) == "kustomization.yaml" {
					continue
				}
				b, _ := os.ReadFile(f)
				for _, o := range decodeAll(t, b) {
					if o.GetKind() == "Namespace" {
						continue
					}
					if o.GetNamespace() != "" {
						o.SetNamespace(ns)
					}
					if err := c.Patch(ctx, o, client.Apply, client.FieldOwner("kustomize-test"), client.DryRunAll, client.ForceOwnership); err != nil {
						t.Errorf("%s: %s %s: %v", f, o.GetKind(), o.GetName(), err)
					}
				}
			}
		}
	})
}

func render(t *testing.T, helm, ns string, set ...string) []*unstructured.Unstructured {
	t.Helper()
	args := []string{"template", "im", chartDir, "--namespace", ns, "--kube-version", "1.34.4"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(helm, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm template %v: %v\n%s", set, err, stderr.String())
	}
	return decodeAll(t, out)
}

func decodeAll(t *testing.T, b []byte) []*unstructured.Unstructured {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	var objs []*unstructured.Unstructured
	for {
		u := &unstructured.Unstructured{}
		err := dec.Decode(&u.Object)
		if errors.Is(err, io.EOF) {
			return objs
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(u.Object) > 0 {
			objs = append(objs, u)
		}
	}
}

// TestChartRBACMatchesGenerated: the chart's controller roles carry the rules controller-gen
// generates into config/rbac from the controller's markers (make generate), and only one more: events
// in the release namespace, which leader election records there. A marker changed without the chart
// fails here.
func TestChartRBACMatchesGenerated(t *testing.T) {
	helm := testenv.Tool(t, "helm")
	b, err := os.ReadFile("../../config/rbac/role.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rules := func(o *unstructured.Unstructured) []string {
		var r rbacv1.ClusterRole // same rules field as a Role
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &r); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, rule := range r.Rules {
			verbs := slices.Sorted(slices.Values(rule.Verbs))
			for _, g := range rule.APIGroups {
				for _, res := range rule.Resources {
					out = append(out, fmt.Sprintf("%s/%s %v", g, res, verbs))
				}
			}
		}
		slices.Sort(out)
		return out
	}
	want := map[string][]string{}
	for _, o := range decodeAll(t, b) {
		want[o.GetKind()] = rules(o)
	}
	want["Role"] = slices.Sorted(slices.Values(append(want["Role"], "/events [create patch]")))
	got := map[string][]string{}
	for _, o := range render(t, helm, "imagemesh-system") {
		if (o.GetKind() == "Role" || o.GetKind() == "ClusterRole") && strings.HasSuffix(o.GetName(), "-controller") {
			got[o.GetKind()] = rules(o)
		}
	}
	for kind, w := range want {
		if !slices.Equal(got[kind], w) {
			t.Errorf("the chart's controller %s:\n  %v\nconfig/rbac (generated) says:\n  %v", kind, got[kind], w)
		}
	}
}

// helmDocsFlags are the flags `make generate` runs helm-docs with: values in the file's order, and no
// footer that names the helm-docs version.
var helmDocsFlags = []string{"--sort-values-order", "file", "--skip-version-footer"}

// TestChartREADMEIsGenerated runs helm-docs on the chart and compares its output with the README: a
// value added, renamed or described anew in values.yaml without `make generate` fails here, and so
// does a value with no `# --` comment, which would leave its row empty.
func TestChartREADMEIsGenerated(t *testing.T) {
	cmd := exec.Command(testenv.Tool(t, "helm-docs"), append([]string{"--chart-search-root", ".", "--dry-run", "--log-level", "error"}, helmDocsFlags...)...)
	cmd.Dir = chartDir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	want, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm-docs: %v\n%s", err, stderr.String())
	}
	got, err := os.ReadFile(filepath.Join(chartDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(bytes.TrimSpace(got), bytes.TrimSpace(want)) {
		t.Errorf("charts/imagemesh/README.md is not what helm-docs makes of README.md.gotmpl and values.yaml; run `make generate`")
	}
	rows := 0
	for _, line := range strings.Split(string(want), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) != 6 || strings.TrimSpace(cells[1]) == "Key" || strings.HasPrefix(strings.TrimSpace(cells[1]), "---") {
			continue
		}
		rows++
		if strings.TrimSpace(cells[4]) == "" {
			t.Errorf("value %s has no description: give it a `# --` comment in values.yaml", strings.TrimSpace(cells[1]))
		}
	}
	if rows < 30 {
		t.Errorf("the values table has %d rows; the template lost it?", rows)
	}
}
