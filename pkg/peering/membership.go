package peering

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/core/sec"
	tptu "github.com/libp2p/go-libp2p/p2p/net/upgrader"
	"github.com/libp2p/go-libp2p/p2p/security/insecure"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
)

// Encryption is what protects the bytes between peers on the wire.
type Encryption string

const (
	// EncryptionTLS is one TLS 1.3 session a connection (libp2p's TLS transport). The default.
	EncryptionTLS Encryption = "tls"
	// EncryptionNone is no cipher at all, for networks that already encrypt every packet (WireGuard or
	// IPsec in the CNI). Peers still prove that they hold the cluster key, so that only members
	// connect, but the bytes on the wire have no confidentiality and no integrity beyond what the
	// network gives them. Content stays safe: every blob is verified against its digest.
	EncryptionNone Encryption = "none"
)

// The security protocols of members. They are our own IDs, not libp2p's, so that a host that does
// not prove membership (an open host, an agent of the private-network era, the other Encryption)
// fails at protocol negotiation, before any handshake, with "protocols not supported".
const (
	memberTLSID   protocol.ID = "/imagemesh/member-tls/1.0.0"
	memberPlainID protocol.ID = "/imagemesh/member-plain/1.0.0"
)

// proofTimeout bounds the membership proof: two round trips on a cluster network.
const proofTimeout = 10 * time.Second

// proofContext separates the proof's MACs from any other use of the cluster key.
const proofContext = "imagemesh cluster membership proof v1"

func (e Encryption) validate() error {
	switch e {
	case "", EncryptionTLS, EncryptionNone:
		return nil
	}
	return fmt.Errorf("peering: encryption %q: want %q or %q", string(e), EncryptionTLS, EncryptionNone)
}

// securityOption is the libp2p security transport of a host: with a cluster key, the member transport
// over TLS (or over no cipher, with EncryptionNone); without one (open), libp2p's TLS alone.
//
// It replaces a libp2p private network, which encrypted every byte with the key (XSalsa20) under the
// TLS session that encrypted it again: two cipher passes a byte, a third of HTTPS's throughput. The
// key now authenticates instead of encrypting, inside the one TLS session.
func securityOption(psk pnet.PSK, enc Encryption) libp2p.Option {
	if psk == nil {
		return libp2p.Security(libp2ptls.ID, libp2ptls.New)
	}
	key := append([]byte(nil), psk...)
	if enc == EncryptionNone {
		return libp2p.Security(string(memberPlainID), func(id protocol.ID, self peer.ID, priv crypto.PrivKey) *memberTransport {
			// The inner transport's own protocol ID is never negotiated: ours is.
			return &memberTransport{id: id, key: key, inner: insecure.NewWithIdentity(insecure.ID, self, priv)}
		})
	}
	return libp2p.Security(string(memberTLSID), func(id protocol.ID, priv crypto.PrivKey, muxers []tptu.StreamMuxer) (*memberTransport, error) {
		inner, err := libp2ptls.New(libp2ptls.ID, priv, muxers)
		if err != nil {
			return nil, fmt.Errorf("peering: TLS transport: %w", err)
		}
		return &memberTransport{id: id, key: key, inner: inner}, nil
	})
}

// memberTransport runs an inner security transport (TLS, or insecure), then, on the secured
// connection and before any muxer or stream exists, has each side prove that it holds the cluster
// key. A host that cannot gets its connection closed: no stream of any protocol, the DHT's included.
//
// The proof is a challenge and an answer each way: each side sends a fresh nonce, then
// HMAC-SHA256(key, context, protocol, its direction, its peer ID, the remote peer ID, its nonce, the
// remote nonce). Under TLS the peer IDs are those TLS authenticated and the exchange is encrypted;
// without a cipher, the nonces keep a MAC seen on the wire from being replayed, and the direction
// keeps a host from reflecting a node's own MAC back to it.
type memberTransport struct {
	id    protocol.ID
	key   []byte
	inner sec.SecureTransport
}

var _ sec.SecureTransport = (*memberTransport)(nil)

// ID is the member protocol, negotiated instead of the inner transport's.
func (t *memberTransport) ID() protocol.ID { return t.id }

// SecureInbound secures a connection a host dialed to us, then proves membership both ways.
func (t *memberTransport) SecureInbound(ctx context.Context, conn net.Conn, p peer.ID) (sec.SecureConn, error) {
	sc, err := t.inner.SecureInbound(ctx, conn, p)
	if err != nil {
		return nil, err
	}
	return t.prove(ctx, sc, false)
}

// SecureOutbound secures a connection we dialed, then proves membership both ways.
func (t *memberTransport) SecureOutbound(ctx context.Context, conn net.Conn, p peer.ID) (sec.SecureConn, error) {
	sc, err := t.inner.SecureOutbound(ctx, conn, p)
	if err != nil {
		return nil, err
	}
	return t.prove(ctx, sc, true)
}

// prove exchanges the membership proof on sc and returns sc itself, so that everything the inner
// transport negotiated (TLS picks the muxer in its handshake) passes through. On failure sc is closed.
func (t *memberTransport) prove(ctx context.Context, sc sec.SecureConn, outbound bool) (_ sec.SecureConn, err error) {
	defer func() {
		if err != nil {
			_ = sc.Close() // the error says why; a close error adds nothing
			err = fmt.Errorf("peering: membership proof with %s: %w", sc.RemotePeer(), err)
		}
	}()
	deadline := time.Now().Add(proofTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := sc.SetDeadline(deadline); err != nil {
		return nil, err
	}
	// A dial given up (its context canceled) must not wait out the proof.
	stop := context.AfterFunc(ctx, func() { _ = sc.SetDeadline(time.Unix(1, 0)) })
	exchangeErr := t.exchange(sc, outbound)
	if !stop() {
		return nil, errors.Join(ctx.Err(), exchangeErr)
	}
	if exchangeErr != nil {
		return nil, exchangeErr
	}
	if err := sc.SetDeadline(time.Time{}); err != nil {
		return nil, err
	}
	return sc, nil
}

func (t *memberTransport) exchange(sc sec.SecureConn, outbound bool) error {
	var local, remote [32]byte
	if _, err := rand.Read(local[:]); err != nil {
		return err
	}
	// 32 bytes each way fit any socket buffer: both sides write first, then read, without deadlock.
	if _, err := sc.Write(local[:]); err != nil {
		return fmt.Errorf("send challenge: %w", err)
	}
	if _, err := io.ReadFull(sc, remote[:]); err != nil {
		return fmt.Errorf("read challenge (a host of another cluster or encryption setting?): %w", err)
	}
	if _, err := sc.Write(t.mac(outbound, sc.LocalPeer(), sc.RemotePeer(), local[:], remote[:])); err != nil {
		return fmt.Errorf("send proof: %w", err)
	}
	got := make([]byte, sha256.Size)
	if _, err := io.ReadFull(sc, got); err != nil {
		return fmt.Errorf("read proof (the host may hold another cluster key): %w", err)
	}
	if !hmac.Equal(got, t.mac(!outbound, sc.RemotePeer(), sc.LocalPeer(), remote[:], local[:])) {
		return errors.New("wrong proof: the host does not hold this cluster's key")
	}
	return nil
}

// mac is the proof that the host from, dialing (outbound) or dialed, with nonce fromNonce, sends to
// the host to.
func (t *memberTransport) mac(outbound bool, from, to peer.ID, fromNonce, toNonce []byte) []byte {
	m := hmac.New(sha256.New, t.key)
	field := func(b []byte) {
		m.Write(binary.BigEndian.AppendUint32(nil, uint32(len(b))))
		m.Write(b)
	}
	field([]byte(proofContext))
	field([]byte(t.id))
	dir := []byte("inbound")
	if outbound {
		dir = []byte("outbound")
	}
	field(dir)
	field([]byte(from))
	field([]byte(to))
	field(fromNonce)
	field(toNonce)
	return m.Sum(nil)
}

// encryptionName is what a node's log says of its wire protection.
func encryptionName(opts Options) Encryption {
	if opts.Encryption == "" {
		return EncryptionTLS
	}
	return opts.Encryption
}
