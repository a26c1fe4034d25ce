package peering

import (
	"context"
	"fmt"
	"net"
	"net/http"

	"github.com/libp2p/go-libp2p/core/peer"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// KubernetesPeers finds peers through the EndpointSlices of the agents' Service: every ready endpoint
// is an agent, whose API (the Service port named PortName) tells its peer ID.
type KubernetesPeers struct {
	Client    EndpointSliceLister
	Namespace string
	Service   string
	// PortName names the Service port of the agents' API. Default "api".
	PortName string
	HTTP     *http.Client
}

// EndpointSliceLister lists the EndpointSlices in a namespace that match a label selector.
type EndpointSliceLister interface {
	EndpointSlices(ctx context.Context, namespace, selector string) (*discoveryv1.EndpointSliceList, error)
}

// Name labels the discovery in logs.
func (k KubernetesPeers) Name() string { return "kubernetes " + k.Namespace + "/" + k.Service }

// Discover lists the Service's ready endpoints and asks each for its peer ID.
func (k KubernetesPeers) Discover(ctx context.Context) ([]peer.AddrInfo, error) {
	portName := k.PortName
	if portName == "" {
		portName = "api"
	}
	list, err := k.Client.EndpointSlices(ctx, k.Namespace, discoveryv1.LabelServiceName+"="+k.Service)
	if err != nil {
		return nil, fmt.Errorf("discover peers through %s: %w", k.Name(), err)
	}
	var out []peer.AddrInfo
	for _, slice := range list.Items {
		port := 0
		for _, p := range slice.Ports {
			if p.Name != nil && *p.Name == portName && p.Port != nil {
				port = int(*p.Port)
			}
		}
		if port == 0 {
			continue
		}
		var ips []net.IP
		for _, ep := range slice.Endpoints {
			// Terminating or unready agents are not worth a dial.
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			for _, a := range ep.Addresses {
				if ip := net.ParseIP(a); ip != nil {
					ips = append(ips, ip)
				}
			}
		}
		out = append(out, askPeers(ctx, k.HTTP, ips, port)...)
	}
	return out, nil
}
