package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/imagemesh/imagemesh/internal/testenv"
)

// dashboardFile is the Grafana dashboard the chart ships (dashboard.enabled) and users import by hand.
const dashboardFile = chartDir + "/dashboards/imagemesh.json"

// The dashboard's variables: the Prometheus data source, and the nodes, by the label that the chart's
// ServiceMonitor sets from the pod's node.
const (
	datasourceRef = "${datasource}"
	nodeVariable  = "node"
	nodeLabel     = "node"
)

// grafanaVar matches a variable reference in a query: $name, ${name} or ${name:format} ($1 in a
// label_replace is not one).
var grafanaVar = regexp.MustCompile(`\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)`)

// grafanaIntervals are Grafana's built-in interval variables, and a duration each to parse them as.
var grafanaIntervals = map[string]string{"__rate_interval": "1m", "__interval": "1m", "__range": "6h"}

// dashboardQuery is one PromQL expression of the dashboard and where it is.
type dashboardQuery struct {
	where string
	expr  string
}

type dashboardJSON struct {
	UID           string           `json:"uid"`
	Title         string           `json:"title"`
	SchemaVersion int              `json:"schemaVersion"`
	Panels        []dashboardPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Definition string          `json:"definition"`
			Datasource *datasource     `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
}

type dashboardPanel struct {
	ID         int                `json:"id"`
	Type       string             `json:"type"`
	Title      string             `json:"title"`
	Datasource *datasource        `json:"datasource"`
	GridPos    struct{ X, W int } `json:"gridPos"`
	Panels     []dashboardPanel   `json:"panels"` // a collapsed row's
	Targets    []struct {
		RefID      string      `json:"refId"`
		Expr       string      `json:"expr"`
		Datasource *datasource `json:"datasource"`
	} `json:"targets"`
}

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// loadDashboard reads the dashboard and returns it with every PromQL expression in it: each panel
// target's, and each query variable's (label_values(<selector>, <label>) as its selector).
func loadDashboard(t *testing.T) (*dashboardJSON, []dashboardQuery) {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboardJSON
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var queries []dashboardQuery
	var walk func([]dashboardPanel)
	walk = func(panels []dashboardPanel) {
		for _, p := range panels {
			walk(p.Panels)
			for _, tg := range p.Targets {
				queries = append(queries, dashboardQuery{where: fmt.Sprintf("panel %q target %s", p.Title, tg.RefID), expr: tg.Expr})
			}
		}
	}
	walk(d.Panels)
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		// A query variable's query is a string (older Grafana) or {"query": "...", ...}.
		var q struct{ Query string }
		if err := json.Unmarshal(v.Query, &q.Query); err != nil {
			if err := json.Unmarshal(v.Query, &q); err != nil {
				t.Fatalf("variable %s: query %s: %v", v.Name, v.Query, err)
			}
		}
		m := labelValues.FindStringSubmatch(q.Query)
		if m == nil || q.Query != v.Definition {
			t.Fatalf("variable %s: query %q (definition %q), want label_values(<selector>, <label>) in both", v.Name, q.Query, v.Definition)
		}
		queries = append(queries, dashboardQuery{where: "variable " + v.Name, expr: m[1]})
	}
	return &d, queries
}

// variableValue is what a variable stands for when a query is parsed: a value that a regex matcher
// accepts, as Grafana's values do, and that tells which variable it came from.
func variableValue(name string) string { return "grafana_var_" + name }

// metricNames parses expr with the Prometheus PromQL parser, after putting values in for Grafana's
// variables, and returns the metric names it selects. Every selector must select by name, and by
// the node variable unless it is the node variable's own query.
func metricNames(t *testing.T, variables map[string]bool, q dashboardQuery) []string {
	t.Helper()
	var bad []string
	expr := grafanaVar.ReplaceAllStringFunc(q.expr, func(ref string) string {
		m := grafanaVar.FindStringSubmatch(ref)
		name := m[1] + m[2]
		if d, ok := grafanaIntervals[name]; ok {
			return d
		}
		if !variables[name] {
			bad = append(bad, ref)
		}
		return variableValue(name)
	})
	if len(bad) > 0 {
		t.Errorf("%s: undeclared variables %v in %s", q.where, bad, q.expr)
	}
	parsed, err := parser.ParseExpr(expr)
	if err != nil {
		t.Errorf("%s: %s: %v", q.where, q.expr, err)
		return nil
	}
	var names []string
	parser.Inspect(parsed, func(n parser.Node, path []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		byNode := false
		for _, m := range vs.LabelMatchers {
			if m.Name == model.MetricNameLabel && m.Type == labels.MatchEqual {
				name = m.Value
			}
			byNode = byNode || (m.Name == nodeLabel && m.Type == labels.MatchRegexp && m.Value == variableValue(nodeVariable))
		}
		if name == "" {
			t.Errorf("%s: a selector without a metric name: %s", q.where, vs)
			return nil
		}
		for _, p := range path {
			if c, ok := p.(*parser.Call); ok && c.Func.Name == "histogram_quantile" && !strings.HasSuffix(name, "_bucket") {
				t.Errorf("%s: histogram_quantile over %s, not a histogram's _bucket series", q.where, vs)
			}
		}
		if !byNode && q.where != "variable "+nodeVariable {
			t.Errorf("%s: %s does not select %s=~\"$%s\": the panel ignores the node picker", q.where, vs, nodeLabel, nodeVariable)
		}
		names = append(names, name)
		return nil
	})
	if len(names) == 0 {
		t.Errorf("%s: no metric in %s", q.where, q.expr)
	}
	return names
}

// dashboardMetrics checks the dashboard's structure and queries and returns the metric names it uses.
func dashboardMetrics(t *testing.T) []string {
	t.Helper()
	d, queries := loadDashboard(t)
	if d.UID != "imagemesh-node-agent" || d.Title == "" || d.SchemaVersion < 39 {
		t.Errorf("uid %q, title %q, schemaVersion %d: want the stable uid, a title, and a schema of Grafana 10 or later", d.UID, d.Title, d.SchemaVersion)
	}
	variables := map[string]bool{}
	for _, v := range d.Templating.List {
		variables[v.Name] = true
		switch v.Name {
		case "datasource":
			if v.Type != "datasource" || string(v.Query) != `"prometheus"` {
				t.Errorf("variable datasource: type %s, query %s, want a Prometheus data source variable", v.Type, v.Query)
			}
		case nodeVariable:
			if v.Datasource == nil || v.Datasource.UID != datasourceRef {
				t.Errorf("variable %s: data source %+v, want %s", v.Name, v.Datasource, datasourceRef)
			}
		}
	}
	if !variables["datasource"] || !variables[nodeVariable] {
		t.Errorf("variables %v, want datasource and %s", slices.Sorted(maps.Keys(variables)), nodeVariable)
	}

	ids := map[int]bool{}
	var walk func([]dashboardPanel)
	walk = func(panels []dashboardPanel) {
		for _, p := range panels {
			walk(p.Panels)
			if ids[p.ID] || p.ID == 0 {
				t.Errorf("panel %q: id %d is zero or not unique", p.Title, p.ID)
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				t.Errorf("panel %q: off the 24-column grid: %+v", p.Title, p.GridPos)
			}
			if p.Type == "row" {
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != datasourceRef || len(p.Targets) == 0 {
				t.Errorf("panel %q: data source %+v, %d queries; want %s and a query", p.Title, p.Datasource, len(p.Targets), datasourceRef)
			}
			for _, tg := range p.Targets {
				if tg.Datasource == nil || tg.Datasource.UID != datasourceRef || tg.Expr == "" {
					t.Errorf("panel %q target %s: data source %+v, expr %q", p.Title, tg.RefID, tg.Datasource, tg.Expr)
				}
			}
		}
	}
	walk(d.Panels)

	set := map[string]bool{}
	for _, q := range queries {
		for _, name := range metricNames(t, variables, q) {
			set[name] = true
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// TestDashboardQueries parses every query of the Grafana dashboard with the Prometheus PromQL
// parser: each is valid PromQL, uses only declared variables, and follows the node picker.
func TestDashboardQueries(t *testing.T) {
	names := dashboardMetrics(t)
	if len(names) == 0 {
		t.Fatal("no metrics in the dashboard")
	}
	t.Logf("the dashboard uses %v", names)
}

// TestDashboardMetricsExported runs a real node agent, with peering, in front of a real registry,
// pulls an image through it with crane, and checks that every metric the dashboard names is in the
// agent's /metrics: a renamed or removed metric fails here rather than leaving a panel empty.
func TestDashboardMetricsExported(t *testing.T) {
	names := dashboardMetrics(t)
	reg := testenv.StartRegistry(t)
	testenv.PushImage(t, reg.Host+"/team/app:v1", testenv.Layer{Size: 256 << 10})
	a := startPeer(t, "--peer-key", writeKey(t), "--upstream", "example.test="+reg.URL, "--default-registry", "example.test")
	// Twice: the first pull fetches from the upstream, the second is answered from the cache.
	for range 2 {
		out, err := exec.Command(testenv.Tool(t, "crane"), "pull", "--insecure", a.Addr+"/team/app:v1", filepath.Join(t.TempDir(), "img.tar")).CombinedOutput()
		if err != nil {
			t.Fatalf("crane pull through the agent: %v\n%s", err, out)
		}
	}

	families := exportedFamilies(t, a.URL+"/metrics")
	for _, name := range names {
		if _, ok := families[name]; ok {
			continue
		}
		// A histogram's series are <family>_bucket, _sum and _count; a summary's _sum and _count.
		found := false
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok {
				typ := families[base]
				found = typ == "histogram" || (typ == "summary" && suffix != "_bucket")
			}
		}
		if !found {
			t.Errorf("the dashboard uses %s; the agent does not export it", name)
		}
	}
}

// exportedFamilies scrapes a Prometheus text endpoint and returns its metric families and their types.
func exportedFamilies(t *testing.T, url string) map[string]string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	families := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			families[f[2]] = f[3]
		}
	}
	if err := sc.Err(); err != nil || len(families) == 0 {
		t.Fatalf("scrape %s: %v, %d metric families", url, err, len(families))
	}
	return families
}

// TestHelmChartDashboard: the dashboard ConfigMap renders only when enabled, with the sidecar's
// label (or the one configured), in the configured namespace, with the dashboard file's JSON; the
// agents' ServiceMonitor sets the node label the dashboard selects by.
func TestHelmChartDashboard(t *testing.T) {
	helm := testenv.Tool(t, "helm")
	file, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	dashboards := func(objs []*unstructured.Unstructured) []*unstructured.Unstructured {
		var out []*unstructured.Unstructured
		for _, o := range objs {
			if _, ok := o.GetLabels()["grafana_dashboard"]; ok || strings.HasSuffix(o.GetName(), "-dashboard") {
				out = append(out, o)
			}
		}
		return out
	}
	if got := dashboards(render(t, helm, "imagemesh")); len(got) != 0 {
		t.Fatalf("a dashboard rendered with the default values: %s %s", got[0].GetKind(), got[0].GetName())
	}

	for name, c := range map[string]struct {
		set                          []string
		namespace, label, labelValue string
		annotations                  map[string]string
	}{
		"sidecar defaults": {
			set: []string{"dashboard.enabled=true"}, namespace: "imagemesh", label: "grafana_dashboard", labelValue: "1",
		},
		"custom": {
			set: []string{"dashboard.enabled=true", "dashboard.namespace=monitoring", "dashboard.label=grafana.example/dashboard",
				"dashboard.labelValue=imagemesh", "dashboard.annotations.grafana_folder=Image cache"},
			namespace: "monitoring", label: "grafana.example/dashboard", labelValue: "imagemesh",
			annotations: map[string]string{"grafana_folder": "Image cache"},
		},
	} {
		t.Run(name, func(t *testing.T) {
			args := []string{"lint", chartDir, "--kube-version", "1.34.4"}
			for _, s := range c.set {
				args = append(args, "--set", s)
			}
			if out, err := exec.Command(helm, args...).CombinedOutput(); err != nil {
				t.Fatalf("helm lint: %v\n%s", err, out)
			}
			var cm *unstructured.Unstructured
			for _, o := range render(t, helm, "imagemesh", c.set...) {
				if o.GetKind() == "ConfigMap" && o.GetLabels()[c.label] == c.labelValue {
					if cm != nil {
						t.Fatalf("two ConfigMaps labeled %s=%s", c.label, c.labelValue)
					}
					cm = o
				}
			}
			if cm == nil {
				t.Fatalf("no ConfigMap labeled %s=%s", c.label, c.labelValue)
			}
			if cm.GetNamespace() != c.namespace {
				t.Errorf("ConfigMap in namespace %q, want %q", cm.GetNamespace(), c.namespace)
			}
			for k, v := range c.annotations {
				if cm.GetAnnotations()[k] != v {
					t.Errorf("annotations %v, want %s=%s", cm.GetAnnotations(), k, v)
				}
			}
			data, _, _ := unstructured.NestedStringMap(cm.Object, "data")
			if len(data) != 1 {
				t.Fatalf("ConfigMap data has %d keys, want the dashboard alone", len(data))
			}
			for key, js := range data {
				var v map[string]any
				if !strings.HasSuffix(key, ".json") || json.Unmarshal([]byte(js), &v) != nil {
					t.Fatalf("ConfigMap key %s does not hold a JSON dashboard", key)
				}
				if !bytes.Equal(bytes.TrimSpace([]byte(js)), bytes.TrimSpace(file)) {
					t.Errorf("ConfigMap key %s differs from %s", key, dashboardFile)
				}
			}
		})
	}

	t.Run("node label", func(t *testing.T) {
		var relabeled bool
		for _, o := range render(t, helm, "imagemesh", "metrics.serviceMonitor.enabled=true") {
			if o.GetKind() != "ServiceMonitor" || !strings.HasSuffix(o.GetName(), "-node-agent") {
				continue
			}
			endpoints, _, _ := unstructured.NestedSlice(o.Object, "spec", "endpoints")
			for _, ep := range endpoints {
				rls, _, _ := unstructured.NestedSlice(ep.(map[string]any), "relabelings")
				for _, rl := range rls {
					r := rl.(map[string]any)
					src, _ := r["sourceLabels"].([]any)
					relabeled = relabeled || (r["targetLabel"] == nodeLabel && slices.Equal(src, []any{"__meta_kubernetes_pod_node_name"}))
				}
			}
		}
		if !relabeled {
			t.Errorf("the agents' ServiceMonitor does not set the %s label from the pod's node", nodeLabel)
		}
	})
}
