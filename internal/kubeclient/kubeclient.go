// Package kubeclient is the node agent's Kubernetes client: the few calls the agent makes, through
// REST clients whose scheme knows only the API groups it uses, so that the agent does not link
// client-go's whole clientset.
package kubeclient

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// Client is the agent's Kubernetes client: the few calls it makes (one ConfigMap watched, Nodes
// and Secrets read, Leases written, EndpointSlices listed), as client-go's typed clients make them,
// through REST clients whose scheme knows core/v1, coordination.k8s.io/v1 and discovery.k8s.io/v1
// only. client-go's clientset registers every built-in API group in its scheme, and so links all of
// them (a fifth of the agent's code) into a binary that uses three.
type Client struct {
	core, coordination, discovery *rest.RESTClient
	// apps reads only the metadata of the agents' DaemonSet: no apps/v1 types are linked for it.
	apps *rest.RESTClient
}

var (
	kubeScheme = func() *runtime.Scheme {
		s := runtime.NewScheme()
		metav1.AddToGroupVersion(s, schema.GroupVersion{Version: "v1"}) // Status, for API errors
		for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, coordinationv1.AddToScheme, discoveryv1.AddToScheme} {
			if err := add(s); err != nil {
				panic(err)
			}
		}
		return s
	}()
	kubeCodecs         = serializer.NewCodecFactory(kubeScheme)
	kubeParameterCodec = runtime.NewParameterCodec(kubeScheme)
)

// New makes the REST clients for cfg. They share one HTTP client, and each has the rate
// limit cfg asks for (client-go's defaults if none), as the clientset's typed clients do.
func New(cfg *rest.Config) (*Client, error) {
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, err
	}
	restClient := func(apiPath string, gv schema.GroupVersion) (*rest.RESTClient, error) {
		c := rest.CopyConfig(cfg)
		c.APIPath, c.GroupVersion = apiPath, &gv
		c.NegotiatedSerializer = kubeCodecs.WithoutConversion()
		if c.UserAgent == "" {
			c.UserAgent = rest.DefaultKubernetesUserAgent()
		}
		return rest.RESTClientForConfigAndClient(c, httpClient)
	}
	var k Client
	if k.core, err = restClient("/api", corev1.SchemeGroupVersion); err != nil {
		return nil, err
	}
	if k.coordination, err = restClient("/apis", coordinationv1.SchemeGroupVersion); err != nil {
		return nil, err
	}
	if k.discovery, err = restClient("/apis", discoveryv1.SchemeGroupVersion); err != nil {
		return nil, err
	}
	if k.apps, err = restClient("/apis", schema.GroupVersion{Group: "apps", Version: "v1"}); err != nil {
		return nil, err
	}
	return &k, nil
}

func request(r *rest.Request, namespace, resource string) *rest.Request {
	return r.UseProtobufAsDefaultIfPreferred(true).NamespaceIfScoped(namespace, namespace != "").Resource(resource)
}

// Node reads a Node.
func (k *Client) Node(ctx context.Context, name string) (*corev1.Node, error) {
	var n corev1.Node
	return &n, request(k.core.Get(), "", "nodes").Name(name).Do(ctx).Into(&n)
}

// Secret reads a Secret.
func (k *Client) Secret(ctx context.Context, namespace, name string) (*corev1.Secret, error) {
	var s corev1.Secret
	return &s, request(k.core.Get(), namespace, "secrets").Name(name).Do(ctx).Into(&s)
}

// Lease reads a Lease.
func (k *Client) Lease(ctx context.Context, namespace, name string) (*coordinationv1.Lease, error) {
	var l coordinationv1.Lease
	return &l, request(k.coordination.Get(), namespace, "leases").Name(name).Do(ctx).Into(&l)
}

// CreateLease creates a Lease.
func (k *Client) CreateLease(ctx context.Context, l *coordinationv1.Lease) error {
	return request(k.coordination.Post(), l.Namespace, "leases").Body(l).Do(ctx).Error()
}

// UpdateLease replaces a Lease; it fails on a conflict.
func (k *Client) UpdateLease(ctx context.Context, l *coordinationv1.Lease) error {
	return request(k.coordination.Put(), l.Namespace, "leases").Name(l.Name).Body(l).Do(ctx).Error()
}

// DaemonSetMeta reads the metadata of a DaemonSet (JSON, decoded into metadata only).
func (k *Client) DaemonSetMeta(ctx context.Context, namespace, name string) (*metav1.PartialObjectMetadata, error) {
	b, err := k.apps.Get().Namespace(namespace).Resource("daemonsets").Name(name).DoRaw(ctx)
	if err != nil {
		return nil, err
	}
	var m metav1.PartialObjectMetadata
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("daemonset %s/%s: %w", namespace, name, err)
	}
	return &m, nil
}

// EndpointSlices lists the EndpointSlices in namespace that match a label selector (for
// peering.KubernetesPeers).
func (k *Client) EndpointSlices(ctx context.Context, namespace, selector string) (*discoveryv1.EndpointSliceList, error) {
	var list discoveryv1.EndpointSliceList
	opts := metav1.ListOptions{LabelSelector: selector}
	err := request(k.discovery.Get(), namespace, "endpointslices").VersionedParams(&opts, kubeParameterCodec).Do(ctx).Into(&list)
	return &list, err
}

// ConfigMapInformer watches the ConfigMap namespace/name, as client-go's informer factory does with
// a namespace and a field selector on the name.
func (k *Client) ConfigMapInformer(namespace, name string, resync time.Duration) cache.SharedIndexInformer {
	configMaps := func(opts *metav1.ListOptions) *rest.Request {
		opts.FieldSelector = "metadata.name=" + name
		var timeout time.Duration
		if opts.TimeoutSeconds != nil {
			timeout = time.Duration(*opts.TimeoutSeconds) * time.Second
		}
		return request(k.core.Get(), namespace, "configmaps").VersionedParams(opts, kubeParameterCodec).Timeout(timeout)
	}
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			var list corev1.ConfigMapList
			return &list, configMaps(&opts).Do(ctx).Into(&list)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.Watch = true
			return configMaps(&opts).Watch(ctx)
		},
	}
	return cache.NewSharedIndexInformer(lw, &corev1.ConfigMap{}, resync, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
}
