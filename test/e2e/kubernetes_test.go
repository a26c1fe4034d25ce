package e2e

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/internal/testenv/kubeenv"
)

// TestKubernetesBootstrap: an agent finds its peer through the EndpointSlices of the agents' Service
// on a real API server, skipping endpoints that are not ready.
func TestKubernetesBootstrap(t *testing.T) {
	// The API server refuses loopback addresses in EndpointSlices: the agents get addresses of their
	// own, in a network namespace of the test's own.
	if !testenv.RunInNetns(t, "10.80.0.1", "10.80.0.2") {
		return
	}
	kube := kubeenv.Start(t)
	ctx := context.Background()
	const ns = "imagemesh"
	if _, err := kube.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	key := writeKey(t)
	// Every agent on the same ports of its own address, as the pods of a DaemonSet.
	_, apiPort, _ := strings.Cut(testenv.FreeAddrOn(t, "10.80.0.1"), ":")
	_, p2pPort, _ := strings.Cut(testenv.FreeAddrOn(t, "10.80.0.1"), ":")
	peerOn := func(ip string) *agent {
		return startAgentAt(t, ip+":"+apiPort, "--peer-listen", "/ip4/"+ip+"/tcp/"+p2pPort, "--peer-key", key)
	}
	n1 := peerOn("10.80.0.1")
	// An agent that is shutting down: its endpoint is not ready, and nobody should join it.
	leaving := peerOn("10.80.0.2")
	_, portStr, _ := strings.Cut(n1.Addr, ":")
	port, _ := strconv.Atoi(portStr)

	// The Service's EndpointSlice, as the EndpointSlice controller would write it for the DaemonSet's
	// pods: node 1 ready, the leaving agent not.
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "agents-abcde", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: "agents"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.80.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}},
			{Addresses: []string{"10.80.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false), Terminating: ptr.To(true)}},
		},
		Ports: []discoveryv1.EndpointPort{
			{Name: ptr.To("api"), Port: ptr.To(int32(port)), Protocol: ptr.To(corev1.ProtocolTCP)},
			{Name: ptr.To("p2p"), Port: ptr.To(int32(5001)), Protocol: ptr.To(corev1.ProtocolTCP)},
		},
	}
	if _, err := kube.Client.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	n2 := startPeer(t, "--peer-key", key, "--bootstrap-service", ns+"/agents", "--kubeconfig", kube.Kubeconfig)
	waitMetric(t, n2, 1, "imagemesh_peering_peers")
	waitMetric(t, n1, 1, "imagemesh_peering_peers")
	time.Sleep(500 * time.Millisecond)
	if got := leaving.Metric("imagemesh_peering_peers"); got != 0 {
		t.Fatalf("an agent whose endpoint is not ready got %v peers", got)
	}

	// A Service that does not exist yet is no reason not to start.
	n3 := startPeer(t, "--peer-key", key, "--bootstrap-service", ns+"/nothing", "--kubeconfig", kube.Kubeconfig)
	if got := n3.Metric("imagemesh_peering_peers"); got != 0 {
		t.Fatalf("agent with an empty Service has %v peers", got)
	}
}
