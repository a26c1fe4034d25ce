package content

import (
	"cmp"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	size, blobs, inflight   prometheus.Gauge
	reserved                prometheus.Gauge
	evictions, evictedBytes prometheus.Counter
	verifyFailures          prometheus.Counter
	fetchedBytes            *prometheus.CounterVec
	eventsDropped           prometheus.Counter
	abandoned               prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		size: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imagemesh_content_size_bytes", Help: "Bytes held by the node's content store.",
		}),
		blobs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imagemesh_content_blobs", Help: "Blobs held by the node's content store.",
		}),
		reserved: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imagemesh_content_fetching_bytes", Help: "Bytes reserved in the cache's size limit for blobs being fetched (their full size, when a trusted source told it).",
		}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imagemesh_content_fetches_in_flight", Help: "Blob fetches under way; one per digest.",
		}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_content_evictions_total", Help: "Blobs evicted to stay under the size limit.",
		}),
		evictedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_content_evicted_bytes_total", Help: "Bytes evicted to stay under the size limit.",
		}),
		verifyFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_content_verification_failures_total", Help: "Fetched blobs rejected because they did not match their digest.",
		}),
		fetchedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagemesh_content_fetched_bytes_total", Help: "Bytes fetched into the store, by source.",
		}, []string{"source"}),
		abandoned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_content_fetches_abandoned_total", Help: "Fetches cancelled because no client waited for them any more; nothing of them was kept.",
		}),
		eventsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_content_events_dropped_total", Help: "Store events a subscriber was too far behind to receive (announcements peering then makes at its next reprovide).",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.size, m.blobs, m.inflight, m.reserved, m.evictions, m.evictedBytes, m.verifyFailures, m.fetchedBytes, m.eventsDropped, m.abandoned)
	}
	return m
}

func (m *metrics) observe(size int64, blobs int) {
	m.size.Set(float64(size))
	m.blobs.Set(float64(blobs))
}

func sortByTime[T any](s []T, key func(T) time.Time) {
	slices.SortFunc(s, func(a, b T) int { return cmp.Compare(key(a).UnixNano(), key(b).UnixNano()) })
}
