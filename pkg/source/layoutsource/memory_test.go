package layoutsource

import (
	"fmt"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// The memory of rejected digests stays within its capacity however many digests fail, forgets the one
// rejected longest ago first, and forgets each one ttl after its latest rejection.
func TestRejectMemoryBounds(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	m := newRejectMemory(10*time.Minute, 3, func() time.Time { return now })
	d := func(i int) digest.Digest { return digest.FromString(fmt.Sprint(i)) }

	for i := range 1000 {
		m.add(d(i))
		if n := m.count(); n > 3 {
			t.Fatalf("after %d rejections the memory holds %d digests, over its capacity of 3", i+1, n)
		}
	}
	for i := range 997 {
		if m.has(d(i)) {
			t.Fatalf("digest %d is remembered; only the last 3 of 1000 should be", i)
		}
	}
	for i := 997; i < 1000; i++ {
		if !m.has(d(i)) {
			t.Fatalf("digest %d, among the last 3 rejected, is forgotten", i)
		}
	}

	// A digest rejected again is remembered anew: it is no longer the first to go.
	now = now.Add(time.Minute)
	m.add(d(997))
	m.add(d(1000))
	if m.has(d(998)) || !m.has(d(997)) || !m.has(d(999)) || !m.has(d(1000)) {
		t.Fatal("at capacity, the digest rejected longest ago should have gone, and only it")
	}

	// Expiry: 998 and 999 were rejected at the start, 997 and 1000 a minute later.
	now = now.Add(9*time.Minute - time.Nanosecond)
	if !m.has(d(999)) {
		t.Fatal("digest forgotten before its ttl ran out")
	}
	now = now.Add(time.Nanosecond)
	if m.has(d(999)) || m.count() != 2 {
		t.Fatalf("at its ttl, a digest is still remembered (%d digests)", m.count())
	}
	now = now.Add(time.Minute)
	if m.has(d(997)) || m.has(d(1000)) || m.count() != 0 {
		t.Fatalf("every ttl ran out, and the memory holds %d digests", m.count())
	}
}
