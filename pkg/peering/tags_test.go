package peering

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/source"
)

// Peers answer tags they resolved within the TTL; the asking node ignores older answers, and answers
// from further in the future than clock skew explains, whatever the answering node's own TTL.
func TestPeerTagAnswersExpire(t *testing.T) {
	psk := testKey(t)
	now := time.Now()
	answers := func(resolved map[string]time.Time) CachedTagFunc {
		return func(_ reference.Named, tag string) (ocispec.Descriptor, time.Time, bool) {
			at, ok := resolved[tag]
			return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString(tag), Size: 1}, at, ok
		}
	}
	strict := testNodeWith(t, psk, func(o *Options) {
		o.CachedTag = answers(map[string]time.Time{"fresh": now.Add(-time.Minute), "stale": now.Add(-time.Hour)})
	})
	// A node that answers however old (another TTL, an older version): the asking side checks too.
	lenient := testNodeWith(t, psk, func(o *Options) {
		o.TagTTL = 48 * time.Hour
		o.CachedTag = answers(map[string]time.Time{"stale": now.Add(-time.Hour), "future": now.Add(time.Hour)})
	}, strict.Addrs()[0])
	asker := testNode(t, psk, strict.Addrs()[0], lenient.Addrs()[0])
	waitRouting(t, strict, lenient, asker)
	for asker.Peers() < 2 {
		time.Sleep(10 * time.Millisecond)
	}
	repo, _ := reference.ParseNamed("example.test/team/app")
	src := asker.Source()

	desc, err := src.Resolve(context.Background(), repo, "fresh")
	if err != nil || desc.Digest != digest.FromString("fresh") {
		t.Fatalf("a tag resolved a minute ago: %v, %v", desc.Digest, err)
	}
	// The answer keeps its age, so that whoever caches it does not hand it on as new.
	if _, at := source.Resolved(desc, time.Now()); at.Sub(now.Add(-time.Minute)).Abs() > time.Second {
		t.Fatalf("answer of a tag resolved at %s passed on as resolved at %s", now.Add(-time.Minute), at)
	}
	// The serving side refuses what it resolved longer ago than its TTL, by its own clock.
	if ans := askTag(t, asker, strict.ID(), repo, "stale"); ans.Error == "" || !strings.HasPrefix(ans.Error, errNotHere) {
		t.Fatalf("a node answered a tag resolved an hour ago: %+v", ans)
	}
	if ans := askTag(t, asker, strict.ID(), repo, "fresh"); ans.Error != "" {
		t.Fatalf("a node refused a tag resolved a minute ago: %s", ans.Error)
	}
	for _, tag := range []string{"stale", "future", "unknown"} {
		if desc, err := src.Resolve(context.Background(), repo, tag); !errors.Is(err, source.ErrNotFound) {
			t.Errorf("tag %q: %v, %v; want not found", tag, desc.Digest, err)
		}
	}
}

func TestFreshToleratesClockSkew(t *testing.T) {
	now := time.Now()
	ttl := 5 * time.Minute
	for _, c := range []struct {
		age  time.Duration
		want bool
	}{
		{0, true}, {ttl, true}, {ttl + maxClockSkew, true}, {ttl + maxClockSkew + time.Second, false},
		{-maxClockSkew, true}, {-maxClockSkew - time.Second, false}, {time.Hour, false},
	} {
		if got := fresh(now, now.Add(-c.age), ttl); got != c.want {
			t.Errorf("answer %s old, TTL %s: fresh = %v, want %v", c.age, ttl, got, c.want)
		}
	}
}

// askTag is one exchange of the tag protocol, as a peer's Source makes it.
func askTag(t *testing.T, from *Node, to peer.ID, repo reference.Named, tag string) tagAnswer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := from.host.NewStream(ctx, to, tagProtocol)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var ans tagAnswer
	if err := writeLine(st, tagRequest{Repo: repo.Name(), Tag: tag}); err != nil {
		t.Fatal(err)
	}
	if err := readLine(st, &ans); err != nil {
		t.Fatal(err)
	}
	return ans
}
