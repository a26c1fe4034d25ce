package peering

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/security/insecure"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/pkg/content"
)

// dhtProtocol is the cluster DHT's protocol: a host that cannot open it cannot even route.
const dhtProtocol = ProtocolPrefix + "/kad/1.0.0"

// rawHost is a plain libp2p host on loopback with the given security, without the agent's limits: a
// host that speaks to a node as anything on the network could.
func rawHost(t *testing.T, security libp2p.Option) host.Host {
	t.Helper()
	h, err := libp2p.New(security, libp2p.NoTransports, libp2p.Transport(tcp.NewTCPTransport),
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableRelay(),
		libp2p.ResourceManager(&network.NullResourceManager{}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func withEncryption(enc Encryption) func(*Options) {
	return func(o *Options) { o.Encryption = enc }
}

// openStreams opens a stream of each of the node's protocols, the DHT's first, from h.
func openStreams(ctx context.Context, h host.Host, n *Node) error {
	h.Peerstore().AddAddrs(n.ID(), n.host.Addrs(), peerstore.TempAddrTTL)
	for _, p := range []protocol.ID{dhtProtocol, blobProtocol, tagProtocol} {
		st, err := h.NewStream(ctx, n.ID(), p)
		if err != nil {
			return err
		}
		_ = st.Reset() // only opening it was the question
	}
	return nil
}

// Members of the cluster, and only they, connect: a host with another key can open no stream of any
// protocol (the DHT's included) and cannot be dialed either; a host with the key can. For both
// encryption settings.
func TestOnlyMembersOpenStreams(t *testing.T) {
	for _, enc := range []Encryption{EncryptionTLS, EncryptionNone} {
		t.Run(string(enc), func(t *testing.T) {
			psk := testKey(t)
			n := testNodeWith(t, psk, withEncryption(enc))
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()

			member := rawHost(t, securityOption(psk, enc))
			if err := openStreams(ctx, member, n); err != nil {
				t.Fatalf("a host with the key: %v", err)
			}
			want := memberTLSID
			if enc == EncryptionNone {
				want = memberPlainID
			}
			for _, c := range n.host.Network().ConnsToPeer(member.ID()) {
				st := c.ConnState()
				if st.Security != want || st.StreamMultiplexer != yamux.ID {
					t.Fatalf("connection state %+v, want security %s and yamux", st, want)
				}
				// TLS picks the muxer in its handshake: the member transport must not hide that.
				if enc == EncryptionTLS && !st.UsedEarlyMuxerNegotiation {
					t.Fatalf("connection state %+v: the muxer was negotiated after TLS, a round trip more", st)
				}
			}

			stranger := rawHost(t, securityOption(testKey(t), enc))
			err := openStreams(ctx, stranger, n)
			if err == nil {
				t.Fatal("a host with another key opened streams")
			}
			if !strings.Contains(err.Error(), "proof") {
				t.Fatalf("a host with another key failed for another reason than the proof: %v", err)
			}
			// Dialed by the node, the stranger is refused too.
			err = n.Connect(ctx, stranger.Addrs()[0].String()+"/p2p/"+stranger.ID().String())
			if err == nil || !strings.Contains(err.Error(), "proof") {
				t.Fatalf("the node dialing a host with another key: %v", err)
			}
			if c := n.host.Network().ConnsToPeer(stranger.ID()); len(c) != 0 {
				t.Fatalf("the node keeps %d connections to a host with another key", len(c))
			}
		})
	}
}

// A node of one encryption setting and a host of the other, with the same key, do not connect, either
// way: the setting is the security protocol, and there is none in common.
func TestEncryptionSettingsDoNotMix(t *testing.T) {
	psk := testKey(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, pair := range [][2]Encryption{{EncryptionTLS, EncryptionNone}, {EncryptionNone, EncryptionTLS}} {
		n := testNodeWith(t, psk, withEncryption(pair[0]))
		other := rawHost(t, securityOption(psk, pair[1]))
		if err := openStreams(ctx, other, n); err == nil {
			t.Fatalf("a host of encryption %s opened streams on a node of encryption %s", pair[1], pair[0])
		}
		if err := n.Connect(ctx, other.Addrs()[0].String()+"/p2p/"+other.ID().String()); err == nil {
			t.Fatalf("a node of encryption %s connected to a host of encryption %s", pair[0], pair[1])
		}
	}
}

// Hosts that do not run the member transport cannot connect: an open one (TLS, no key), and one of an
// agent from before it, a libp2p private network with the same key. Mixed clusters do not peer.
func TestHostsWithoutTheMemberTransportCannotPeer(t *testing.T) {
	psk := testKey(t)
	n := testNode(t, psk)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for name, security := range map[string]libp2p.Option{
		"open":            securityOption(nil, ""),
		"private network": libp2p.PrivateNetwork(psk),
	} {
		h := rawHost(t, security)
		if err := openStreams(ctx, h, n); err == nil {
			t.Fatalf("%s host opened streams on a member", name)
		}
	}
}

// Two nodes of each setting form a cluster: the DHT routes and a blob moves intact.
func TestMembersShareBlobs(t *testing.T) {
	for _, enc := range []Encryption{EncryptionTLS, EncryptionNone} {
		t.Run(string(enc), func(t *testing.T) {
			psk := testKey(t)
			a := testNodeWith(t, psk, withEncryption(enc))
			b := testNodeWith(t, psk, withEncryption(enc), a.Addrs()...)
			waitRouting(t, a, b)
			blob := make([]byte, 3<<20)
			rand.Read(blob)
			d := digest.FromBytes(blob)
			if err := a.opts.Store.Put(d, blob); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			ct, err := b.request(ctx, a.ID(), blobRequest{Digest: d})
			if err != nil {
				t.Fatal(err)
			}
			defer ct.Close()
			got, err := io.ReadAll(ct)
			if err != nil || !bytes.Equal(got, blob) {
				t.Fatalf("%d of %d bytes: %v", len(got), len(blob), err)
			}
		})
	}
}

func TestEncryptionNoneNeedsAKey(t *testing.T) {
	store, err := content.Open(t.TempDir(), content.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	for _, opts := range []Options{
		{Open: true, Encryption: EncryptionNone},
		{PSK: testKey(t), Encryption: "aes"},
	} {
		opts.Store = store
		opts.DataDir = t.TempDir()
		if n, err := New(context.Background(), opts); err == nil {
			n.Close()
			t.Fatalf("New(open %v, encryption %q) started", opts.Open, opts.Encryption)
		}
	}
}

// A host that finishes the inner handshake and then says nothing does not hold a dial past its
// context: the proof gives up when the dial does.
func TestMembershipProofFollowsItsContext(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	silent, silentID := testIdentity(t)
	done := make(chan struct{})
	defer close(done)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		// The plain handshake, then silence.
		if _, err := insecure.NewWithIdentity(insecure.ID, silentID, silent).SecureInbound(context.Background(), c, ""); err != nil {
			return
		}
		<-done
	}()
	key, id := testIdentity(t)
	tr := &memberTransport{id: memberPlainID, key: make([]byte, 32), inner: insecure.NewWithIdentity(insecure.ID, id, key)}
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := tr.SecureOutbound(ctx, c, silentID); err == nil || !strings.Contains(err.Error(), "membership proof") {
		t.Fatalf("SecureOutbound with a silent host: %v", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("the proof waited %s for a dial of 300ms", took)
	}
}

func testIdentity(t *testing.T) (crypto.PrivKey, peer.ID) {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return k, id
}
