// Package mirrorconfig is the mirror configuration the controller publishes and every node agent
// applies: which registries are mirrored on which nodes, how to reach them, and what to prefetch. It
// is derived from the ImageSources and carries no secret, only the names of Secrets.
package mirrorconfig

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// ConfigMapKey is the key of the document in the ConfigMap the controller writes.
const ConfigMapKey = "mirrors.yaml"

// Document is the whole configuration.
type Document struct {
	// Registries are sorted by host; each host appears once.
	Registries []Registry `json:"registries"`
}

// Registry is one mirrored registry.
type Registry struct {
	Host string `json:"host"`
	// ImageSource names the ImageSource this comes from.
	ImageSource string `json:"imageSource"`
	// Endpoint is the upstream URL; empty means https://<host>.
	Endpoint string `json:"endpoint,omitempty"`
	// CredentialsSecret names a Secret in the controller's namespace.
	CredentialsSecret string   `json:"credentialsSecret,omitempty"`
	Sources           []Source `json:"sources,omitempty"`
	PeersResolveTags  bool     `json:"peersResolveTags,omitempty"`
	// Prefetch are images of this registry to pull into the cache of every selected node.
	Prefetch     []string              `json:"prefetch,omitempty"`
	NodeSelector *metav1.LabelSelector `json:"nodeSelector,omitempty"`
}

// Source types, the words of the ImageSource API (api/v1alpha1's SourceStorj and SourceIPFS), which
// the agent does not import.
const (
	SourceStorj = "Storj"
	SourceIPFS  = "IPFS"
)

// Source is a decentralized store, in the order the agents ask them.
type Source struct {
	// Type is SourceStorj or SourceIPFS.
	Type string `json:"type"`
	// Storj
	Bucket string `json:"bucket,omitempty"`
	Prefix string `json:"prefix,omitempty"`
	// AccessSecret names a Secret in the controller's namespace whose key StorjAccessKey holds the grant.
	AccessSecret string `json:"accessSecret,omitempty"`
	// AccessFile is a file on the node holding the grant: for an agent configured by file, without
	// a cluster.
	AccessFile string `json:"accessFile,omitempty"`
	// IPFS
	Root     string `json:"root,omitempty"`
	Endpoint string `json:"endpoint,omitempty"`
}

// StorjAccessKey is the key of a Storj access Secret that holds the serialized grant.
const StorjAccessKey = "access"

// Marshal renders the document as YAML.
func (d Document) Marshal() ([]byte, error) { return yaml.Marshal(d) }

// Parse reads a document; unknown fields are errors, so that an agent older than its controller says
// so instead of ignoring what it does not understand.
func Parse(b []byte) (Document, error) {
	var d Document
	if err := yaml.UnmarshalStrict(b, &d); err != nil {
		return Document{}, fmt.Errorf("mirror configuration: %w", err)
	}
	seen := map[string]bool{}
	for _, r := range d.Registries {
		if r.Host == "" || seen[r.Host] {
			return Document{}, fmt.Errorf("mirror configuration: registry %q empty or listed twice", r.Host)
		}
		seen[r.Host] = true
	}
	// A document Marshal cannot write (YAML refuses control characters that JSON escapes) is none
	// the controller wrote, and none it could write again.
	if _, err := d.Marshal(); err != nil {
		return Document{}, fmt.Errorf("mirror configuration: %w", err)
	}
	return d, nil
}

// Hash identifies a document's content: agents report the hash they applied, and the controller
// counts the nodes that applied the current one.
func (d Document) Hash() string {
	b, _ := json.Marshal(d)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// The agents report back through Leases: each keeps one named LeasePrefix+<node name> in the
// controller's namespace, renewed while it runs, whose AppliedAnnotation is the Hash of the document
// it last applied. A Lease older than LeaseStale is an agent gone.
const (
	LeasePrefix       = "imagemesh-node-"
	AppliedAnnotation = "imagemesh.io/applied-config"
	LeaseStale        = 2 * time.Minute
)
