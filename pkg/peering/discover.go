package peering

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// A Discoverer finds peers to join: static addresses, the records of a headless Service, the
// EndpointSlices of the agents' Service.
type Discoverer interface {
	Name() string
	Discover(ctx context.Context) ([]peer.AddrInfo, error)
}

// StaticPeers are peers known by their full multiaddrs.
type StaticPeers []peer.AddrInfo

// Name labels the discovery in logs.
func (s StaticPeers) Name() string { return "static" }

// Discover returns the configured peers.
func (s StaticPeers) Discover(context.Context) ([]peer.AddrInfo, error) { return s, nil }

// InfoPath is where an agent's HTTP API tells its peer ID and addresses. Service records name
// addresses only, and a libp2p connection must know whom it dials: discovery asks here first.
const InfoPath = "/imagemesh/v1/peer"

// Info is what InfoPath answers.
type Info struct {
	ID    peer.ID  `json:"id"`
	Addrs []string `json:"addrs"`
}

// InfoHandler serves the node's Info. The peer ID is public: connecting still takes the cluster key.
func (n *Node) InfoHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		info := Info{ID: n.host.ID()}
		for _, a := range n.host.Addrs() {
			info.Addrs = append(info.Addrs, a.String())
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(info) // a client that went away is no error of ours
	})
}

// DNSPeers finds peers through a DNS name with one address per agent, such as a headless Service's,
// and asks each agent's HTTP API (on Port) for its peer ID.
type DNSPeers struct {
	Host     string
	Port     int
	Resolver *net.Resolver
	Client   *http.Client
}

// Name labels the discovery in logs.
func (d DNSPeers) Name() string { return "dns " + d.Host }

// Discover resolves the name and asks every address for its peer ID; addresses that do not
// answer are left out.
func (d DNSPeers) Discover(ctx context.Context) ([]peer.AddrInfo, error) {
	r := d.Resolver
	if r == nil {
		r = net.DefaultResolver
	}
	ips, err := r.LookupIPAddr(ctx, d.Host)
	if err != nil {
		return nil, fmt.Errorf("discover peers through %s: %w", d.Host, err)
	}
	addrs := make([]net.IP, 0, len(ips))
	for _, ip := range ips {
		addrs = append(addrs, ip.IP)
	}
	return askPeers(ctx, d.Client, addrs, d.Port), nil
}

// askPeers asks each address's agent for its peer info, and returns those that answered, with the
// address they were found at: an agent listening on every interface lists them all.
func askPeers(ctx context.Context, client *http.Client, ips []net.IP, port int) []peer.AddrInfo {
	if client == nil {
		client = &http.Client{Timeout: 3 * time.Second}
	}
	var out []peer.AddrInfo
	for _, ip := range ips {
		u := "http://" + net.JoinHostPort(ip.String(), strconv.Itoa(port)) + InfoPath
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			continue
		}
		resp, err := client.Do(req)
		if err != nil {
			continue
		}
		var info Info
		err = json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 64<<10)).Decode(&info)
		_ = resp.Body.Close()
		if err != nil || info.ID.Validate() != nil {
			continue
		}
		ai := peer.AddrInfo{ID: info.ID}
		for _, s := range info.Addrs {
			a, err := ma.NewMultiaddr(s)
			if err != nil {
				continue
			}
			// Keep the transport and port, put the address the agent was found at in front of it.
			_, rest := ma.SplitFirst(a)
			if rest == nil {
				continue
			}
			host, err := manet.FromIP(ip)
			if err != nil {
				continue
			}
			ai.Addrs = append(ai.Addrs, host.Encapsulate(rest))
			break
		}
		if len(ai.Addrs) > 0 {
			out = append(out, ai)
		}
	}
	return out
}

// join connects to the peers discovery finds that the node is not connected to yet.
func (n *Node) join(ctx context.Context) {
	for _, d := range n.discover {
		infos, err := d.Discover(ctx)
		if err != nil {
			n.log.Debug("peer discovery failed", "via", d.Name(), "err", err)
			continue
		}
		for _, info := range infos {
			if info.ID == n.host.ID() || len(n.host.Network().ConnsToPeer(info.ID)) > 0 {
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := n.host.Connect(cctx, info)
			cancel()
			if err != nil {
				n.log.Debug("peer unreachable; going on without it", "via", d.Name(), "peer", info.ID, "err", err)
				continue
			}
			n.log.Info("joined peer", "via", d.Name(), "peer", info.ID)
		}
	}
}

// discoverLoop keeps looking for peers while the node has few: agents start in any order, and a node
// alone must find the others once they come up. It looks again after 1 s, then backs off to
// DiscoverInterval while nobody new turns up, and starts over at 1 s whenever somebody does: after a
// fresh install every agent starts alone, and the others become findable (Ready) seconds later.
func (n *Node) discoverLoop() {
	defer n.wg.Done()
	const first = time.Second
	wait := min(first, n.opts.DiscoverInterval)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-timer.C:
		}
		wait = min(2*wait, n.opts.DiscoverInterval)
		if n.Peers() < n.opts.MinPeers {
			before := n.Peers()
			n.join(n.ctx)
			if n.Peers() > before {
				n.dht.RefreshRoutingTable()
				wait = min(first, n.opts.DiscoverInterval)
			}
		}
		timer.Reset(wait)
	}
}
