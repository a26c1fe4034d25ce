package mirror

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	tags     *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagemesh_mirror_requests_total",
			Help: "Pull API requests, by kind (manifest, blob, tags: a tag list), method, status code and the source that answered (local, upstream, ...).",
		}, []string{"kind", "method", "code", "source"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagemesh_mirror_response_bytes_total",
			Help: "Bytes sent to pull clients, by kind and source.",
		}, []string{"kind", "source"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imagemesh_mirror_request_duration_seconds",
			Help:    "Time to answer pull API requests in full, by kind and source.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}, []string{"kind", "source"}),
		tags: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagemesh_mirror_tag_lookups_total",
			Help: "Tag lookups, by result: cached (fresh answer reused), resolved, not_found, stale (source unavailable, old answer served), error.",
		}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.bytes, m.duration, m.tags)
	}
	return m
}

// methodLabel keeps the method label to a closed set: a client that invents methods must not make a
// new series with each (the pull API answers GET and HEAD; everything else is refused alike).
func methodLabel(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead:
		return method
	default:
		return "other"
	}
}

func (m *metrics) observe(kind, method string, code int, source string, bytes int64, d time.Duration) {
	m.requests.WithLabelValues(kind, methodLabel(method), strconv.Itoa(code), source).Inc()
	if bytes > 0 {
		m.bytes.WithLabelValues(kind, source).Add(float64(bytes))
	}
	m.duration.WithLabelValues(kind, source).Observe(d.Seconds())
}
