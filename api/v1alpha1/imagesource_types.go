package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ImageSourceSpec says which registries the selected nodes mirror through their agents, and where the
// agents may get those registries' content besides their peers.
// +kubebuilder:validation:XValidation:rule="!has(self.upstream) || !has(self.upstream.credentialsSecretRef) || has(self.upstream.endpoint)",message="upstream.credentialsSecretRef needs upstream.endpoint"
type ImageSourceSpec struct {
	// Registries are the registry hosts this source covers, as image references name them
	// (docker.io, ghcr.io, registry.example:5000).
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=64
	// +listType=set
	// +kubebuilder:validation:items:Pattern=`^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$`
	// +kubebuilder:validation:items:MaxLength=253
	Registries []string `json:"registries"`

	// Upstream is how the agents reach the registry itself. Without it, https://<host>.
	// +optional
	Upstream *Upstream `json:"upstream,omitempty"`

	// Sources are decentralized stores holding these registries' images, asked in order after the
	// peers and before the upstream.
	// +optional
	// +kubebuilder:validation:MaxItems=8
	Sources []Source `json:"sources,omitempty"`

	// PeersResolveTags lets other nodes' agents answer tag lookups when the upstream cannot. Tags do not
	// verify themselves: leave it off unless every node is trusted alike.
	// +optional
	PeersResolveTags bool `json:"peersResolveTags,omitempty"`

	// Prefetch are images (references with a tag or digest) pulled into every selected node's cache.
	// +optional
	// +kubebuilder:validation:MaxItems=256
	// +listType=set
	// +kubebuilder:validation:items:MaxLength=1024
	Prefetch []string `json:"prefetch,omitempty"`

	// NodeSelector selects the nodes that mirror these registries; empty selects every node.
	// +optional
	NodeSelector *metav1.LabelSelector `json:"nodeSelector,omitempty"`
}

// Upstream is how to reach a registry.
type Upstream struct {
	// Endpoint is the URL requests go to, e.g. https://registry-1.docker.io.
	// +kubebuilder:validation:Pattern=`^https?://[^\s/]+(/.*)?$`
	// +kubebuilder:validation:MaxLength=2048
	Endpoint string `json:"endpoint"`
	// CredentialsSecretRef names a kubernetes.io/dockerconfigjson Secret (or one with username and
	// password keys) in the controller's namespace. The credentials stay on the nodes' agents.
	// +optional
	CredentialsSecretRef *corev1.LocalObjectReference `json:"credentialsSecretRef,omitempty"`
}

// SourceType names a kind of decentralized store.
// +kubebuilder:validation:Enum=Storj;IPFS
type SourceType string

// The kinds of decentralized store.
const (
	SourceStorj SourceType = "Storj"
	SourceIPFS  SourceType = "IPFS"
)

// Source is one decentralized store, holding images in the distribution registry's storage layout.
// +kubebuilder:validation:XValidation:rule="self.type == 'Storj' ? has(self.storj) && !has(self.ipfs) : has(self.ipfs) && !has(self.storj)",message="a Storj source needs storj, an IPFS source needs ipfs, and not the other"
type Source struct {
	Type SourceType `json:"type"`
	// +optional
	Storj *StorjSource `json:"storj,omitempty"`
	// +optional
	IPFS *IPFSSource `json:"ipfs,omitempty"`
}

// StorjSource is a bucket on Storj, read with storj.io/uplink.
type StorjSource struct {
	// +kubebuilder:validation:MinLength=3
	// +kubebuilder:validation:MaxLength=63
	Bucket string `json:"bucket"`
	// Prefix is where the registry layout starts in the bucket.
	// +optional
	// +kubebuilder:validation:MaxLength=1024
	Prefix string `json:"prefix,omitempty"`
	// AccessSecretRef names a Secret whose key "access" holds a serialized access grant.
	AccessSecretRef corev1.LocalObjectReference `json:"accessSecretRef"`
}

// IPFSSource is a root in IPFS, read through a kubo node's RPC API.
type IPFSSource struct {
	// Root is /ipfs/<cid>, /ipns/<key> or /ipns/<dnslink domain>.
	// +kubebuilder:validation:Pattern=`^/(ipfs|ipns)/[^/\s]+(/[^\s]*)?$`
	// +kubebuilder:validation:MaxLength=1024
	Root string `json:"root"`
	// Endpoint is the kubo RPC API, e.g. http://kubo.ipfs:5001.
	// +kubebuilder:validation:Pattern=`^https?://[^\s/]+(/.*)?$`
	Endpoint string `json:"endpoint"`
}

// Condition types of an ImageSource.
const (
	// ConditionReady: the mirror configuration is published and every selected node applied it.
	ConditionReady = "Ready"
	// ConditionSourcesReachable: the referenced Secrets exist and the sources answered.
	ConditionSourcesReachable = "SourcesReachable"
)

// ImageSourceStatus is what the controller and the nodes made of an ImageSource.
type ImageSourceStatus struct {
	// ObservedGeneration is the generation the status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Ready, SourcesReachable.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// NodesSelected is how many nodes the node selector matches.
	// +optional
	NodesSelected int32 `json:"nodesSelected"`
	// NodesConfigured is how many of them applied the current configuration.
	// +optional
	NodesConfigured int32 `json:"nodesConfigured"`
	// Registries are the registries this ImageSource is the one to configure; a registry another
	// ImageSource claimed first is left out, and the Ready condition says so.
	// +optional
	Registries []string `json:"registries,omitempty"`
}

// ImageSource declares registries that the cluster's nodes mirror through their node agents.
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=imgsrc,categories=imagemesh
// +kubebuilder:printcolumn:name="Registries",type=string,JSONPath=`.spec.registries`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].reason`,priority=1
// +kubebuilder:printcolumn:name="Nodes",type=string,JSONPath=`.status.nodesConfigured`
// +kubebuilder:printcolumn:name="Selected",type=string,JSONPath=`.status.nodesSelected`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type ImageSource struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   ImageSourceSpec   `json:"spec"`
	Status ImageSourceStatus `json:"status,omitempty"`
}

// ImageSourceList is a list of ImageSources.
// +kubebuilder:object:root=true
type ImageSourceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ImageSource `json:"items"`
}

func init() {
	SchemeBuilder.Register(&ImageSource{}, &ImageSourceList{})
}
