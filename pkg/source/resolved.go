package source

import (
	"maps"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// AnnotationResolved is the annotation that, on the descriptor Resolve returns, says when the answer
// was resolved from a source trusted with tags (RFC 3339), when that was before the call: peers hand on what they resolved
// themselves, and an answer handed on must not pass for newer than it is, or a tag deleted upstream
// would go round the cluster for ever. Sources that ask the registry now leave it out.
const AnnotationResolved = "io.imagemesh.resolved"

// WithResolved returns desc annotated with when it was resolved. desc itself is not changed.
func WithResolved(desc ocispec.Descriptor, t time.Time) ocispec.Descriptor {
	annotations := maps.Clone(desc.Annotations)
	if annotations == nil {
		annotations = map[string]string{}
	}
	annotations[AnnotationResolved] = t.UTC().Format(time.RFC3339Nano)
	desc.Annotations = annotations
	return desc
}

// Resolved splits what Resolve returned into the descriptor, without AnnotationResolved, and when it
// was resolved: now, unless the annotation names an earlier time. desc itself is not changed.
func Resolved(desc ocispec.Descriptor, now time.Time) (ocispec.Descriptor, time.Time) {
	v, ok := desc.Annotations[AnnotationResolved]
	if !ok {
		return desc, now
	}
	annotations := maps.Clone(desc.Annotations)
	delete(annotations, AnnotationResolved)
	if len(annotations) == 0 {
		annotations = nil
	}
	desc.Annotations = annotations
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil && t.Before(now) {
		return desc, t
	}
	return desc, now
}
