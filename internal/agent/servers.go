package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"

	"github.com/imagemesh/imagemesh/pkg/mirror"
	"github.com/imagemesh/imagemesh/pkg/peering"
)

// listeners are the agent's ports: the pull API, and the operational endpoints when they have their
// own (ops is nil otherwise).
type listeners struct {
	api, ops net.Listener
	// mirrorURL is the agent as containerd reaches it: the configured URL, else the API's address.
	mirrorURL string
}

func listen(cfg Config) (*listeners, error) {
	api, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	l := &listeners{api: api, mirrorURL: cfg.HostConfig.MirrorURL}
	if l.mirrorURL == "" {
		l.mirrorURL = "http://" + api.Addr().String()
	}
	if cfg.MetricsListen != "" {
		if l.ops, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			_ = api.Close() // never served
			return nil, fmt.Errorf("listen %s: %w", cfg.MetricsListen, err)
		}
	}
	return l, nil
}

// close releases the ports. After the servers shut down (which closes them) it does nothing.
func (l *listeners) close() {
	for _, ln := range []net.Listener{l.api, l.ops} {
		if ln != nil {
			_ = ln.Close() // net.ErrClosed once served: nothing to report
		}
	}
}

// servers are the HTTP servers on the agent's listeners.
type servers []struct {
	srv *http.Server
	ln  net.Listener
}

// servers routes the pull API (and the peer ID, for discovery) to the API's port, and the status
// page (/), /metrics, /healthz and /readyz to the operational port, or to the API's when there is
// none.
func (l *listeners) servers(m *mirror.Mirror, node *peering.Node, reg *prometheus.Registry, ready *atomic.Bool, status http.Handler, log *slog.Logger) servers {
	api := http.NewServeMux()
	api.Handle("/v2/", m)
	api.Handle("/v2", m)
	if node != nil {
		api.Handle(peering.InfoPath, node.InfoHandler())
	}
	ok := func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n") // a client that went away is no error of ours
	}
	readyz := func(w http.ResponseWriter, r *http.Request) {
		if !ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		ok(w, r)
	}
	// The health endpoints answer on the API address too: that is what a hosts.toml user, and a
	// kubelet probing the agent's port, can see.
	api.HandleFunc("/healthz", ok)
	api.HandleFunc("/readyz", readyz)
	out := servers{{newServer(api, log), l.api}}
	ops := api
	if l.ops != nil {
		ops = http.NewServeMux()
		ops.HandleFunc("/healthz", ok)
		ops.HandleFunc("/readyz", readyz)
		out = append(out, servers{{newServer(ops, log), l.ops}}...)
	}
	ops.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	ops.Handle("GET /{$}", status)
	return out
}

func (s servers) serve(g *errgroup.Group) {
	for _, x := range s {
		g.Go(func() error {
			if err := x.srv.Serve(netutil.LimitListener(x.ln, maxConns)); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve %s: %w", x.ln.Addr(), err)
			}
			return nil
		})
	}
}

// shutdown lets the transfers under way finish until ctx is done, then cuts them off.
func (s servers) shutdown(ctx context.Context) error {
	var errs []error
	for _, x := range s {
		if err := x.srv.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("shut down %s: %w", x.ln.Addr(), err))
			_ = x.srv.Close() // cut off what did not finish; the error above says so
		}
	}
	return errors.Join(errs...)
}

// maxConns bounds the connections each of the agent's servers holds at once (a goroutine and two
// 4 KiB buffers each): past it, new connections wait in the listen backlog. A node's containerd
// needs a handful; a flood gets no more of the agent's memory than this.
const maxConns = 1024

// maxHeaderBytes bounds a request's headers: pull requests carry a few hundred bytes.
const maxHeaderBytes = 64 << 10

func newServer(h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    maxHeaderBytes,
		// No WriteTimeout: a layer of several GiB to a slow node is a legitimate, long answer. The
		// mirror bounds each write instead (mirror.WriteStall).
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}
