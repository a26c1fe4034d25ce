package mirror

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
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
