package peering

import (
	"context"
	"time"

	"github.com/libp2p/go-libp2p-kad-dht/provider"
	"github.com/libp2p/go-libp2p-kad-dht/provider/stats"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/prometheus/client_golang/prometheus"
)

// badPeerReasons are the values of the reason label of imagemesh_peering_bad_peer_events_total.
var badPeerReasons = []string{reasonOversized, reasonDigestMismatch, reasonSlow, reasonWrongSize}

const (
	reasonOversized      = "oversized"       // a manifest over the size limit of manifests
	reasonDigestMismatch = "digest_mismatch" // bytes that do not hash to the digest asked for
	reasonSlow           = "slow"            // a transfer that stalled or trickled under the store's minimum rate
	reasonWrongSize      = "wrong_size"      // a size other than the one a verified manifest gives
)

type metrics struct {
	provide, find  *prometheus.HistogramVec
	provideDropped prometheus.Counter
	servedBytes    prometheus.Counter
	fetchThrough   prometheus.Counter
	// throughRedirected counts fetches through passed on to a node closer to the digest.
	throughRedirected prometheus.Counter
	badPeer           *prometheus.CounterVec
	// throughRefused counts fetches through refused, by the limit that refused them; limitRefused
	// the resource manager's refusals.
	throughRefused *prometheus.CounterVec
	limitRefused   *prometheus.CounterVec
	// slotRefused counts blob requests refused because every upload slot of the blob was in use.
	slotRefused prometheus.Counter
	// direct counts the direct connections a provider accepted, by what became of them;
	// directFallback the blobs an asker was offered one for and took over the stream instead.
	direct         *prometheus.CounterVec
	directFallback prometheus.Counter
}

// The values of the result label of imagemesh_peering_direct_connections_total.
var directResults = []string{"taken", "refused", "busy"}

// The values of the limit label of imagemesh_peering_fetch_through_refused_total.
const (
	limitPeer = "peer"
	limitNode = "node"
)

// newMetrics makes the node's metrics; register exports them once the host is up.
func newMetrics() *metrics {
	m := &metrics{
		provide: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "imagemesh_peering_provide_duration_seconds", Help: "Time to announce one digest in the cluster DHT, by result.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 9),
		}, []string{"result"}),
		find: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "imagemesh_peering_find_duration_seconds", Help: "Time to the first provider of a digest, or to giving up, by result.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 9),
		}, []string{"result"}),
		provideDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_peering_announcements_dropped_total", Help: "Announcements of content being fetched dropped because the queue was full; the blob is announced when it is committed.",
		}),
		servedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_peering_served_bytes_total", Help: "Blob bytes sent to other nodes.",
		}),
		fetchThrough: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_peering_fetch_through_total", Help: "Blobs this node fetched from its own sources because a peer asked it to lead.",
		}),
		throughRedirected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_peering_fetch_through_redirected_total", Help: "Fetches through that peers asked for and this node sent on to a node closer to the digest, which leads for it.",
		}),
		badPeer: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagemesh_peering_bad_peer_events_total", Help: "Times a peer sent content that failed verification or came too slowly, by reason; the peer is skipped for that digest.",
		}, []string{"reason"}),
		throughRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagemesh_peering_fetch_through_refused_total", Help: "Fetches through that peers asked for and this node refused, by the limit reached (per peer, or the node's); the peer goes to its next source.",
		}, []string{"limit"}),
		slotRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_peering_upload_slots_refused_total", Help: "Blob requests of peers refused because every upload slot of the blob was in use; the peer goes to another provider.",
		}),
		limitRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagemesh_peering_limit_refusals_total", Help: "Connections, streams and memory that the libp2p resource manager refused, by the scope or resource whose limit was reached.",
		}, []string{"limit"}),
		direct: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagemesh_peering_direct_connections_total", Help: "Direct connections peers opened to this node for blob bytes, by result: taken (with a good ticket), refused (no handshake or no good ticket), busy (too many waiting for theirs).",
		}, []string{"result"}),
		directFallback: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagemesh_peering_direct_fallbacks_total", Help: "Blobs a peer offered a direct connection for that this node fetched over the libp2p stream instead, because the connection failed.",
		}),
	}
	for _, r := range directResults {
		m.direct.WithLabelValues(r)
	}
	// Every reason is exported from the start, at zero: a series that appears only with the first
	// event leaves dashboards and alerts with nothing to compare it with.
	for _, reason := range badPeerReasons {
		m.badPeer.WithLabelValues(reason)
	}
	for _, limit := range []string{limitPeer, limitNode} {
		m.throughRefused.WithLabelValues(limit)
	}
	for _, limit := range limitRefusals {
		m.limitRefused.WithLabelValues(limit)
	}
	return m
}

func (m *metrics) register(reg prometheus.Registerer, h host.Host, uploads *uploadSlots, sweep func() *provider.SweepingProvider) {
	if reg != nil {
		peers := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imagemesh_peering_peers", Help: "Peers connected.",
		}, func() float64 { return float64(len(h.Network().Peers())) })
		sending := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imagemesh_peering_uploads", Help: "Blob streams being sent to peers now.",
		}, func() float64 { return float64(uploads.inUse()) })
		reg.MustRegister(m.provide, m.find, m.provideDropped, m.servedBytes, m.fetchThrough, m.throughRedirected, m.badPeer,
			m.throughRefused, m.limitRefused, m.slotRefused, m.direct, m.directFallback, peers, sending, sweepCollector{sweep})
	}
}

func (m *metrics) observe(h *prometheus.HistogramVec, start time.Time, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	h.WithLabelValues(result).Observe(time.Since(start).Seconds())
}

// sweepCollector reports what the sweeping provider did, from its own statistics, at scrape time;
// zeros before it has started.
type sweepCollector struct {
	sweep func() *provider.SweepingProvider
}

var (
	sweepKeys = prometheus.NewDesc("imagemesh_peering_reprovide_keys",
		"Digests the node reprovides every reprovide interval.", nil, nil)
	sweepProvided = prometheus.NewDesc("imagemesh_peering_keys_provided_total",
		"Digests provided or reprovided by the sweeping provider.", nil, nil)
	sweepFailed = prometheus.NewDesc("imagemesh_peering_keys_provide_failed_total",
		"Digests the sweeping provider failed to provide; it retries them.", nil, nil)
)

func (c sweepCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- sweepKeys
	ch <- sweepProvided
	ch <- sweepFailed
}

func (c sweepCollector) Collect(ch chan<- prometheus.Metric) {
	var st stats.Stats
	if sweep := c.sweep(); sweep != nil {
		var err error
		if st, err = sweep.Stats(context.Background()); err != nil {
			return
		}
	}
	ch <- prometheus.MustNewConstMetric(sweepKeys, prometheus.GaugeValue, float64(st.Schedule.Keys))
	ch <- prometheus.MustNewConstMetric(sweepProvided, prometheus.CounterValue, float64(st.Operations.Past.KeysProvided))
	ch <- prometheus.MustNewConstMetric(sweepFailed, prometheus.CounterValue, float64(st.Operations.Past.KeysFailed))
}
