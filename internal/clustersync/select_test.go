package clustersync

import (
	"net/url"
	"reflect"
	"slices"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/imagemesh/imagemesh/pkg/hostconfig"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
	"github.com/imagemesh/imagemesh/pkg/source"
)

func TestSelectMatchesNodeSelectors(t *testing.T) {
	regs := []mirrorconfig.Registry{
		{Host: "all.test", ImageSource: "a"},
		{Host: "gpu.test", ImageSource: "b", NodeSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"gpu": "true"}}},
		{Host: "not-edge.test", ImageSource: "c", NodeSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
			{Key: "edge", Operator: metav1.LabelSelectorOpDoesNotExist},
		}}},
		{Host: "zone.test", ImageSource: "d", NodeSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
			{Key: "zone", Operator: metav1.LabelSelectorOpIn, Values: []string{"a", "b"}},
		}}},
		{Host: "bad.test", ImageSource: "e", NodeSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
			{Key: "zone", Operator: "Near"},
		}}},
	}
	for name, tc := range map[string]struct {
		labels map[string]string
		want   []string
	}{
		"no labels":        {nil, []string{"all.test", "not-edge.test"}},
		"gpu in zone b":    {map[string]string{"gpu": "true", "zone": "b"}, []string{"all.test", "gpu.test", "not-edge.test", "zone.test"}},
		"edge in zone c":   {map[string]string{"edge": "", "zone": "c"}, []string{"all.test"}},
		"gpu false":        {map[string]string{"gpu": "false"}, []string{"all.test", "not-edge.test"}},
		"edge gpu, zone a": {map[string]string{"edge": "1", "gpu": "true", "zone": "a"}, []string{"all.test", "gpu.test", "zone.test"}},
	} {
		mine, errs := Select(regs, tc.labels)
		var got []string
		for _, r := range mine {
			got = append(got, r.Host)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: selected %v, want %v", name, got, tc.want)
		}
		// The bad selector is reported on every node, and keeps no other registry out.
		if len(errs) != 1 {
			t.Errorf("%s: errors %v, want one for bad.test", name, errs)
		}
	}
}

func TestHostsListsStaticThenSelected(t *testing.T) {
	ep := func(s string) source.Endpoint {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return source.Endpoint{URL: u}
	}
	regs := []mirrorconfig.Registry{{Host: "ghcr.io"}, {Host: "private.test:5000"}, {Host: "only-sources.test"}}
	endpoints := map[string]source.Endpoint{
		"ghcr.io":           ep("https://ghcr.io/"),
		"private.test:5000": ep("http://10.0.0.5:5000"),
	}
	agent := hostconfig.Mirror{URL: "http://10.0.0.1:5000", Header: map[string]string{"X-Imagemesh-Node-Token": "t0ken"}}
	hosts, files := Hosts([]string{"docker.io"}, regs, endpoints, agent)
	if want := []string{"docker.io", "ghcr.io", "private.test:5000", "only-sources.test"}; !slices.Equal(hosts, want) {
		t.Errorf("hosts %v, want %v", hosts, want)
	}
	want := []hostconfig.Registry{
		{Host: "ghcr.io", Server: "https://ghcr.io", Mirrors: []hostconfig.Mirror{agent}},
		{Host: "private.test:5000", Server: "http://10.0.0.5:5000", Mirrors: []hostconfig.Mirror{agent}},
		{Host: "only-sources.test", Mirrors: []hostconfig.Mirror{agent}},
	}
	if len(files) != len(want) {
		t.Fatalf("files %+v, want %+v", files, want)
	}
	for i := range want {
		if files[i].Host != want[i].Host || files[i].Server != want[i].Server || !reflect.DeepEqual(files[i].Mirrors, want[i].Mirrors) {
			t.Errorf("file %d: %+v, want %+v", i, files[i], want[i])
		}
	}
}
