package mirror

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

// handedOn answers every tag as a peer does: with what it resolved some time ago.
type handedOn struct{ resolved time.Time }

func (h handedOn) Name() string { return "peer" }
func (h handedOn) Resolve(context.Context, reference.Named, string) (ocispec.Descriptor, error) {
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("m"), Size: 1}
	return source.WithResolved(desc, h.resolved), nil
}
func (h handedOn) Stat(context.Context, source.Object) (ocispec.Descriptor, error) {
	return ocispec.Descriptor{}, source.ErrNotFound
}
func (h handedOn) Open(context.Context, source.Object, int64) (*source.Content, error) {
	return nil, errors.New("no content")
}

// A tag answer handed on by a peer is kept with the time it was resolved, not the time it arrived: it
// expires here when it does there, and this node does not hand it on to others as new.
func TestHandedOnTagAnswerKeepsItsAge(t *testing.T) {
	store, err := content.Open(t.TempDir(), content.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	then := time.Now().Add(-2 * time.Minute).Round(0)
	m, err := New(Options{Store: store, Source: source.NewChain(source.Link{Source: handedOn{then}, TagFallback: true})})
	if err != nil {
		t.Fatal(err)
	}
	repo, _ := reference.ParseNamed("example.test/team/app")
	desc, err := m.resolve(context.Background(), repo, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := desc.Annotations[source.AnnotationResolved]; ok {
		t.Errorf("the resolved time leaked into the descriptor: %v", desc.Annotations)
	}
	_, at, ok := m.CachedTag(repo, "v1")
	if !ok || !at.Equal(then) {
		t.Fatalf("cached answer resolved at %v (%v), want %v", at, ok, then)
	}
}
