// Package statuspage renders the node agent's status page: what an operator looks at first when a
// node's pulls are slow or failing. It is one server-rendered HTML page (html/template, no
// JavaScript), built from a snapshot the agent assembles on each request.
//
// Invariants: everything a client could have put on the page (repositories, references, error
// messages) goes through html/template's escaping; the page shows no credentials (endpoints are
// shown redacted by whoever fills Status); rendering holds no lock of the agent's.
package statuspage

import (
	"bytes"
	_ "embed"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	units "github.com/docker/go-units"

	"github.com/imagemesh/imagemesh/internal/clustersync"
	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/peering"
)

// Status is a snapshot of the agent.
type Status struct {
	Version string
	Node    string // the Kubernetes node, or empty when standalone
	Started time.Time
	Now     time.Time

	Cache Cache
	// Journal is the mirror's: last pulls and failures, bytes served by source.
	Journal mirror.Journal

	// Peering is false when the agent does not peer.
	Peering bool
	PeerID  string
	Peers   []peering.PeerInfo

	// Cluster is nil when the agent runs without the cluster's configuration.
	Cluster *clustersync.Status
	// Registries the agent's own configuration mirrors (hosts.toml it writes, upstreams it names).
	StaticRegistries []string
}

// Cache is the content store's state.
type Cache struct {
	Bytes, MaxBytes int64 // MaxBytes 0: unbounded
	Blobs           int
}

//go:embed status.html.tmpl
var pageTemplate string

var page = template.Must(template.New("status").Funcs(template.FuncMap{
	"bytes": func(n int64) string { return units.BytesSize(float64(n)) },
	"ago": func(now, t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return units.HumanDuration(now.Sub(t)) + " ago"
	},
	"ms":      func(d time.Duration) string { return d.Round(time.Millisecond).String() },
	"percent": func(f float64) string { return fmt.Sprintf("%.1f%%", 100*f) },
	"join":    strings.Join,
}).Parse(pageTemplate))

// view is what the template reads: the snapshot and what is derived from it.
type view struct {
	Status
	HitRatio    float64 // bytes served from the cache over all bytes served; -1 before any
	Served      []served
	CacheFilled float64 // Bytes over MaxBytes; 0 when unbounded
}

type served struct {
	Source string
	Bytes  int64
}

func newView(s Status) view {
	v := view{Status: s, HitRatio: -1}
	var total int64
	for src, n := range s.Journal.Served {
		v.Served = append(v.Served, served{src, n})
		total += n
	}
	slices.SortFunc(v.Served, func(a, b served) int { return int(b.Bytes - a.Bytes) })
	if total > 0 {
		v.HitRatio = float64(s.Journal.Served["local"]) / float64(total)
	}
	if s.Cache.MaxBytes > 0 {
		v.CacheFilled = float64(s.Cache.Bytes) / float64(s.Cache.MaxBytes)
	}
	return v
}

// Render writes the page for s.
func Render(s Status) ([]byte, error) {
	var buf bytes.Buffer
	if err := page.Execute(&buf, newView(s)); err != nil {
		return nil, fmt.Errorf("render status page: %w", err)
	}
	return buf.Bytes(), nil
}

// Handler serves the page at exactly "/", from a snapshot taken on each request.
func Handler(snapshot func() Status, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		body, err := Render(snapshot())
		if err != nil {
			log.Error("status page", "err", err)
			http.Error(w, "status page failed; see the agent's log", http.StatusInternalServerError)
			return
		}
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
		if r.Method == http.MethodGet {
			_, _ = w.Write(body) // a client that went away is no error of ours
		}
	})
}
