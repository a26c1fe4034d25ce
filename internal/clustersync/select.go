package clustersync

import (
	"fmt"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/imagemesh/imagemesh/pkg/hostconfig"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// Select returns the registries whose node selector matches a node with nodeLabels; a registry
// with no selector is every node's. A selector that does not parse leaves its registry out, with
// an error that says so: one bad ImageSource must not keep the others from the node.
func Select(regs []mirrorconfig.Registry, nodeLabels map[string]string) ([]mirrorconfig.Registry, []error) {
	var mine []mirrorconfig.Registry
	var errs []error
	for _, r := range regs {
		sel := labels.Everything()
		if r.NodeSelector != nil {
			var err error
			if sel, err = metav1.LabelSelectorAsSelector(r.NodeSelector); err != nil {
				errs = append(errs, fmt.Errorf("registry %s of ImageSource %s: node selector: %w", r.Host, r.ImageSource, err))
				continue
			}
		}
		if sel.Matches(labels.Set(nodeLabels)) {
			mine = append(mine, r)
		}
	}
	return mine, errs
}

// Hosts returns the registries the node mirrors (the agent's own, then regs) and the hosts.toml
// files for regs: each points containerd at mirror (the agent's URL, and the node token it must
// send), with the registry's endpoint as the server containerd falls back to when the agent does
// not answer.
func Hosts(static []string, regs []mirrorconfig.Registry, endpoints map[string]source.Endpoint, mirror hostconfig.Mirror) ([]string, []hostconfig.Registry) {
	hosts := slices.Clone(static)
	files := make([]hostconfig.Registry, 0, len(regs))
	for _, r := range regs {
		server := ""
		if ep, ok := endpoints[r.Host]; ok && ep.URL != nil {
			server = strings.TrimSuffix(ep.URL.String(), "/")
		}
		hosts = append(hosts, r.Host)
		files = append(files, hostconfig.Registry{Host: r.Host, Server: server, Mirrors: []hostconfig.Mirror{mirror}})
	}
	return hosts, files
}
