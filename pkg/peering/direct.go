package peering

// Blob bytes on a connection of their own.
//
// Over a libp2p stream, every byte of a blob is copied from the file into yamux's frames, and on the
// other side from the connection into yamux's buffer and from there to the reader, with at most one
// yamux window (256 KiB) in flight. Between two nodes on one network that moved about 0.6 times what
// plain HTTP with sendfile moves on the same link, and 0.85 times HTTPS (README, Peering, "Direct
// connections").
// So a node with a direct listener offers, for the bytes of a large blob, a TCP connection that
// carries nothing else:
//
//  1. The asker says in its request that it can take one (blobRequest.Direct).
//  2. The provider answers with the size, as always, and an offer: its direct port and a ticket,
//     32 random bytes, good once, for that peer, while the stream waits for it (directClaimWait).
//  3. The asker dials the port at the address its libp2p connection reaches the provider at,
//     secures the connection as the libp2p one is (TLS 1.3 with both nodes' libp2p identities, or no
//     cipher with EncryptionNone), and sends the ticket. The provider answers one byte: taken.
//  4. The asker says on the stream where the bytes are to come (directReply), and the provider sends
//     them there: with sendfile from a file where there is no cipher, else through TLS, as HTTPS does.
//
// Invariants: a direct connection carries one blob range, from the offset asked to the end, and is
// then closed; it is taken only with a ticket a blob stream gave to the node at the other end, from
// the address of that node's libp2p connection, and under TLS by that node's peer ID (without a
// cipher, the member proof of the libp2p connection is what authenticated the node that got the
// ticket); and the blob stream stays open until the last byte is
// sent, so that upload slots, the resource manager's stream and memory limits, and cancellation hold
// as for bytes sent on the stream. Anything that fails before the first byte (no route to the port, a
// handshake, a ticket) falls back to the stream, and the asker takes no direct connection from a peer
// whose port failed for directRetry.

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imagemesh/imagemesh/pkg/content"
)

const (
	// directMinSize is the fewest bytes a direct connection is offered for: below, the connection
	// and its handshake cost more than they save. It is also past the largest manifest (verifyLimit),
	// which keeps manifests, read whole, on the stream and its read deadline.
	directMinSize = verifyLimit + 1
	// directClaimWait bounds how long a provider waits for the asker to take its ticket, and
	// directHandshakeWait how long a direct connection may take to bring its ticket.
	directClaimWait     = directHandshakeWait + 5*time.Second
	directHandshakeWait = 10 * time.Second
	// maxDirectPending bounds the direct connections accepted that have not shown a ticket yet:
	// past it, new ones are closed at once. Taken ones are bounded by the blob streams they serve.
	maxDirectPending = 64
	// directRetry is how long an asker fetches from a peer over the stream after a direct
	// connection to it failed.
	directRetry = 5 * time.Minute
)

// directTaken is the one byte a provider answers a good ticket with.
const directTaken = 1

type directOffer struct {
	Port   int    `json:"port"`
	Ticket []byte `json:"ticket"`
}

type directReply struct {
	Direct bool `json:"direct"`
}

// direct is a node's side of direct connections: its listener, if it has one, and the identity that
// secures them with TLS (nil with EncryptionNone).
type direct struct {
	id  *libp2ptls.Identity
	ln  net.Listener // nil: the node takes direct connections but offers none
	log *slog.Logger

	pending chan struct{}
	taken   *prometheus.CounterVec
	retry   *badPeers // peers whose direct port failed, for directRetry

	mu      sync.Mutex
	tickets map[string]*directTicket
	sending map[net.Conn]struct{} // taken connections that carry a blob now
	closed  bool
}

// directTicket is an offer waiting to be taken.
type directTicket struct {
	peer peer.ID
	ip   net.IP
	conn chan net.Conn // gets the taken connection; buffered, it is sent to once
	// withdrawn says the stream stopped waiting: a connection taken after that is closed.
	withdrawn bool
}

// newDirect listens on addr (host:port; empty listens nowhere) and secures connections with key's
// libp2p TLS identity unless plain.
func newDirect(addr string, key crypto.PrivKey, plain bool, m *metrics, log *slog.Logger) (*direct, error) {
	d := &direct{
		log: log, pending: make(chan struct{}, maxDirectPending), taken: m.direct,
		retry: newBadPeers(directRetry), tickets: map[string]*directTicket{}, sending: map[net.Conn]struct{}{},
	}
	if !plain {
		id, err := libp2ptls.NewIdentity(key)
		if err != nil {
			return nil, fmt.Errorf("peering: direct connections' TLS identity: %w", err)
		}
		d.id = id
	}
	if addr == "" {
		return d, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("peering: direct listener: %w", err)
	}
	d.ln = ln
	return d, nil
}

// port is the listener's, 0 without one.
func (d *direct) port() int {
	if d == nil || d.ln == nil {
		return 0
	}
	return d.ln.Addr().(*net.TCPAddr).Port
}

// addr is the listener's address, "" without one.
func (d *direct) addr() string {
	if d.port() == 0 {
		return ""
	}
	return d.ln.Addr().String()
}

// serve accepts direct connections until the listener closes.
func (d *direct) serve(ctx context.Context) {
	for {
		c, err := d.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			d.log.Warn("direct listener", "err", err)
			select { // a full file table or the like: the next Accept would fail the same way
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		select {
		case d.pending <- struct{}{}:
		default:
			d.taken.WithLabelValues("busy").Inc()
			_ = c.Close() // nothing to say to a connection that has not shown a ticket
			continue
		}
		go func() {
			defer func() { <-d.pending }()
			if err := d.claim(ctx, c); err != nil {
				d.taken.WithLabelValues("refused").Inc()
				d.log.Debug("direct connection refused", "remote", c.RemoteAddr(), "err", err)
				_ = c.Close()
			}
		}()
	}
}

// claim secures c, reads its ticket and hands c to the stream that gave the ticket out.
func (d *direct) claim(ctx context.Context, raw net.Conn) error {
	if err := raw.SetDeadline(time.Now().Add(directHandshakeWait)); err != nil {
		return err
	}
	conn, remote, err := d.secure(ctx, raw, "", false)
	if err != nil {
		return err
	}
	var ticket [32]byte
	if _, err := io.ReadFull(conn, ticket[:]); err != nil {
		return fmt.Errorf("read ticket: %w", err)
	}
	ip := raw.RemoteAddr().(*net.TCPAddr).IP
	d.mu.Lock()
	t, ok := d.tickets[string(ticket[:])]
	if ok && (d.id != nil && t.peer != remote || !t.ip.Equal(ip)) {
		ok = false // not the node the ticket was given to: the ticket stays for that one
	}
	if ok {
		delete(d.tickets, string(ticket[:]))
	}
	d.mu.Unlock()
	if !ok {
		return errors.New("no such ticket for this peer")
	}
	if _, err := conn.Write([]byte{directTaken}); err != nil {
		return fmt.Errorf("answer ticket: %w", err)
	}
	if err := raw.SetDeadline(time.Time{}); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if t.withdrawn {
		return errors.New("ticket withdrawn while it was being taken")
	}
	d.taken.WithLabelValues("taken").Inc()
	t.conn <- conn // buffered, and sent to once: the ticket is gone from the map
	return nil
}

// secure runs the TLS handshake on raw, unless direct connections are plain: as the server, with any
// libp2p peer (the ticket tells who it must be); as the client, with peer p only. It returns the
// connection to use and, under TLS, the peer at the other end.
func (d *direct) secure(ctx context.Context, raw net.Conn, p peer.ID, client bool) (net.Conn, peer.ID, error) {
	if d.id == nil {
		return raw, "", nil
	}
	cfg, keys := d.id.ConfigForPeer(p)
	var tc *tls.Conn
	if client {
		tc = tls.Client(raw, cfg)
	} else {
		tc = tls.Server(raw, cfg)
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, "", fmt.Errorf("TLS handshake: %w", err)
	}
	select {
	case key := <-keys:
		remote, err := peer.IDFromPublicKey(key)
		if err != nil {
			return nil, "", err
		}
		return tc, remote, nil
	default: // cannot happen: the handshake verified the certificate, which sent the key
		return nil, "", errors.New("TLS handshake: no peer key")
	}
}

// offer makes a ticket for the peer at the other end of s, if this node has a listener and the
// stream's connection has an IP address to bind the ticket to; withdraw ends it.
func (d *direct) offer(s network.Stream) (_ *directOffer, t *directTicket, withdraw func()) {
	if d.port() == 0 {
		return nil, nil, nil
	}
	addr, err := manet.ToNetAddr(s.Conn().RemoteMultiaddr())
	tcp, ok := addr.(*net.TCPAddr)
	if err != nil || !ok {
		return nil, nil, nil
	}
	o := &directOffer{Port: d.port(), Ticket: make([]byte, 32)}
	_, _ = rand.Read(o.Ticket) // never fails (crypto/rand)
	t = &directTicket{peer: s.Conn().RemotePeer(), ip: tcp.IP, conn: make(chan net.Conn, 1)}
	d.mu.Lock()
	d.tickets[string(o.Ticket)] = t
	d.mu.Unlock()
	return o, t, func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		delete(d.tickets, string(o.Ticket))
		t.withdrawn = true
		select {
		case c := <-t.conn: // taken, then not used: the asker fell back after all
			_ = c.Close()
		default:
		}
	}
}

// take dials the offer of peer p, reached over s's connection, and shows it the ticket.
func (d *direct) take(ctx context.Context, s network.Stream, o *directOffer) (net.Conn, error) {
	addr, err := manet.ToNetAddr(s.Conn().RemoteMultiaddr())
	tcp, ok := addr.(*net.TCPAddr)
	if err != nil || !ok {
		return nil, fmt.Errorf("no TCP address for %s", s.Conn().RemoteMultiaddr())
	}
	if o.Port <= 0 || o.Port > 65535 || len(o.Ticket) != 32 {
		return nil, fmt.Errorf("bad offer: port %d, %d byte ticket", o.Port, len(o.Ticket))
	}
	dctx, cancel := context.WithTimeout(ctx, directHandshakeWait)
	defer cancel()
	// From the address of the libp2p connection, which the ticket is bound to, even on a host with
	// several addresses whose routes would pick another.
	var dialer net.Dialer
	if local, err := manet.ToNetAddr(s.Conn().LocalMultiaddr()); err == nil {
		if l, ok := local.(*net.TCPAddr); ok {
			dialer.LocalAddr = &net.TCPAddr{IP: l.IP}
		}
	}
	raw, err := dialer.DialContext(dctx, "tcp", net.JoinHostPort(tcp.IP.String(), fmt.Sprint(o.Port)))
	if err != nil {
		return nil, err
	}
	conn, err := d.handshake(dctx, raw, s.Conn().RemotePeer(), o.Ticket)
	if err != nil {
		_ = raw.Close()
		return nil, err
	}
	return conn, nil
}

// handshake secures raw as the client of peer p, shows the ticket and waits for it to be taken, all
// before ctx's deadline.
func (d *direct) handshake(ctx context.Context, raw net.Conn, p peer.ID, ticket []byte) (net.Conn, error) {
	deadline, _ := ctx.Deadline()
	if err := raw.SetDeadline(deadline); err != nil {
		return nil, err
	}
	conn, _, err := d.secure(ctx, raw, p, true)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Write(ticket); err != nil {
		return nil, fmt.Errorf("send ticket: %w", err)
	}
	var ans [1]byte
	if _, err := io.ReadFull(conn, ans[:]); err != nil {
		return nil, fmt.Errorf("ticket refused: %w", err)
	}
	if ans[0] != directTaken {
		return nil, fmt.Errorf("ticket answered %d", ans[0])
	}
	return conn, raw.SetDeadline(time.Time{})
}

// send sends rd from off on c, a connection taken for it, and closes c. Node.Close cuts it short,
// and so does an asker that stops reading for stall.
func (d *direct) send(c net.Conn, rd *content.Reader, off int64, stall time.Duration) (int64, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		_ = c.Close()
		return 0, net.ErrClosed
	}
	d.sending[c] = struct{}{}
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		delete(d.sending, c)
		d.mu.Unlock()
	}()
	var n int64
	var err error
	out := stallWriter{w: c, setDeadline: c.SetWriteDeadline, stall: stall}
	if rd.File() != nil {
		// Over TCP without a cipher, with sendfile.
		n, err = rd.CopyTo(stallReaderFrom{out}, off)
	} else {
		// A blob still arriving: each byte as soon as it is here, as on the stream, so that a line of
		// nodes relaying it adds a round trip per node, not a megabyte (CopyTo's least part).
		n, err = sendRange(out, rd, off)
	}
	return n, errors.Join(err, c.Close())
}

// close stops the listener and cuts off the connections that carry blobs.
func (d *direct) close() error {
	if d == nil {
		return nil
	}
	d.mu.Lock()
	d.closed = true
	for c := range d.sending {
		_ = c.Close() // its sender reports the error
	}
	d.mu.Unlock()
	if d.ln == nil {
		return nil
	}
	return d.ln.Close()
}

// directStream is a blob range arriving on a direct connection: exactly size bytes, or an error.
type directStream struct {
	conn net.Conn
	s    network.Stream
	left int64
	stop func() bool // stops following the context
}

func (c *directStream) Read(b []byte) (int, error) {
	if c.left == 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > c.left {
		b = b[:c.left]
	}
	n, err := c.conn.Read(b)
	c.left -= int64(n)
	switch {
	case c.left == 0:
		// The provider is done once it closes the stream, and has freed the blob's upload slot: the
		// end of the bytes waits for that, as it does on the stream, so that a node asking again at
		// once is not told the slot is taken. The bytes are all here whatever the answer.
		_ = c.s.SetReadDeadline(time.Now().Add(directClaimWait))
		_, _ = c.s.Read(make([]byte, 1))
		return n, io.EOF
	case errors.Is(err, io.EOF):
		// The provider ended early: its own copy failed (it did not verify, or its source died).
		return n, fmt.Errorf("direct connection closed with %d bytes to go: %w", c.left, io.ErrUnexpectedEOF)
	}
	return n, err
}

// Close ends the direct connection, and the stream: closed after a whole range, reset otherwise.
func (c *directStream) Close() error {
	c.stop()
	err := c.conn.Close()
	if c.left == 0 {
		return errors.Join(err, c.s.Close())
	}
	return errors.Join(err, c.s.Reset())
}
