package mirror

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestJournalKeepsTheLastPullsAndFailures(t *testing.T) {
	m := &Mirror{}
	j := &m.journal
	for i := 0; i < journalSize+10; i++ {
		status := http.StatusOK
		if i%10 == 0 {
			status = http.StatusBadGateway
		}
		j.record(Pull{Repo: fmt.Sprintf("r%d", i), Status: status, Source: "local", Bytes: 1})
	}
	j.record(Pull{Repo: strings.Repeat("x", 10*journalField), Status: http.StatusNotFound, Source: "none"})
	got := m.Journal()
	if len(got.Pulls) != journalSize {
		t.Fatalf("%d pulls kept, want %d", len(got.Pulls), journalSize)
	}
	if len(got.Pulls[0].Repo) > journalField+len("…") || got.Pulls[1].Repo != fmt.Sprintf("r%d", journalSize+9) || got.Pulls[journalSize-1].Repo != "r11" {
		t.Errorf("pulls not newest first or not clipped: first %q, second %q, last %q", got.Pulls[0].Repo[:10], got.Pulls[1].Repo, got.Pulls[journalSize-1].Repo)
	}
	// 404 is no failure; every tenth request was a 502.
	if len(got.Failures) != 8 || got.Failures[0].Repo != "r70" || got.Failures[7].Repo != "r0" {
		t.Errorf("failures %v, want r70 down to r0", repos(got.Failures))
	}
	// The 502s' bodies are no content served.
	if want := int64(journalSize + 10 - 8); got.Served["local"] != want {
		t.Errorf("served %v, want %d local bytes", got.Served, want)
	}
}

func repos(ps []Pull) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.Repo
	}
	return out
}

func TestTagCacheIsBounded(t *testing.T) {
	dir := t.TempDir()
	c, err := newTagCache(dir, 10)
	if err != nil {
		t.Fatal(err)
	}
	desc := ocispec.Descriptor{Digest: digest.FromString("x"), Size: 1}
	for i := 0; i < 25; i++ {
		if err := c.put(fmt.Sprintf("example.test/app:%d", i), desc, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	files := func() int {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		return len(entries)
	}
	if c.mem.Len() != 10 || files() != 10 {
		t.Fatalf("%d answers in memory, %d files; want 10 and 10", c.mem.Len(), files())
	}
	if _, ok := c.get("example.test/app:24"); !ok {
		t.Error("the newest answer is gone")
	}
	if _, ok := c.get("example.test/app:0"); ok {
		t.Error("the oldest answer is still there")
	}
	// A restart with a lower bound prunes the directory to the newest files; a crash's temp file goes.
	if err := os.WriteFile(filepath.Join(dir, ".tag-123"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := newTagCache(dir, 4); err != nil {
		t.Fatal(err)
	}
	if n := files(); n != 4 {
		t.Errorf("%d files after a restart bounded to 4", n)
	}
}
