package peering

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imagemesh/imagemesh/pkg/source"
)

// holdBlob puts size random bytes into n's store and announces them.
func holdBlob(t *testing.T, n *Node, size int) ([]byte, digest.Digest) {
	t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	d := digest.FromBytes(data)
	if err := n.opts.Store.Put(d, data); err != nil {
		t.Fatal(err)
	}
	c, _ := DigestCID(d)
	if err := n.dht.Provide(context.Background(), c, true); err != nil {
		t.Fatalf("provide: %v", err)
	}
	return data, d
}

func blobObject(t *testing.T, d digest.Digest) source.Object {
	t.Helper()
	repo, err := reference.ParseNamed("example.test/team/app")
	if err != nil {
		t.Fatal(err)
	}
	return source.Object{Repo: repo, Kind: source.KindBlob, Digest: d}
}

// readPeer opens obj on n's peers from offset and reads it to the end.
func readPeer(t *testing.T, n *Node, obj source.Object, offset int64) ([]byte, error) {
	t.Helper()
	c, err := n.Source().Open(context.Background(), obj, offset)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return io.ReadAll(c)
}

func directCount(n *Node, result string) float64 {
	return testutil.ToFloat64(n.metrics.direct.WithLabelValues(result))
}

// The bytes of a large blob go over a direct connection, with either encryption setting, from the
// start or from an offset, to a node that has no direct listener of its own; fewer bytes than
// directMinSize stay on the stream.
func TestLargeBlobsGoOverDirectConnections(t *testing.T) {
	for _, enc := range []Encryption{EncryptionTLS, EncryptionNone} {
		t.Run(string(enc), func(t *testing.T) {
			psk := testKey(t)
			n1 := testNodeWith(t, psk, func(o *Options) { o.Encryption = enc })
			n2 := testNodeWith(t, psk, func(o *Options) { o.Encryption = enc; o.DirectListen = "" }, n1.Addrs()[0])
			waitRouting(t, n1, n2)
			large, dl := holdBlob(t, n1, directMinSize+2<<20)
			small, ds := holdBlob(t, n1, 64<<10)
			for _, c := range []struct {
				name   string
				data   []byte
				d      digest.Digest
				offset int64
				direct bool
			}{
				{"large blob", large, dl, 0, true},
				{"large blob from an offset", large, dl, 1<<20 + 7, true},
				{"the last bytes of a large blob", large, dl, int64(len(large)) - directMinSize + 1, false},
				{"small blob", small, ds, 0, false},
			} {
				before := directCount(n1, "taken")
				got, err := readPeer(t, n2, blobObject(t, c.d), c.offset)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if !bytes.Equal(got, c.data[c.offset:]) {
					t.Fatalf("%s: read %d bytes, not the %d of the blob from %d", c.name, len(got), len(c.data)-int(c.offset), c.offset)
				}
				if direct := directCount(n1, "taken") > before; direct != c.direct {
					t.Fatalf("%s: went over a direct connection: %v, want %v", c.name, direct, c.direct)
				}
			}
			if fb := testutil.ToFloat64(n2.metrics.directFallback); fb != 0 {
				t.Fatalf("%v fallbacks to the stream", fb)
			}
		})
	}
}

// A direct port that cannot be reached costs one fallback: the blob comes over the stream, and the
// asker asks that peer for no direct connection for a while.
func TestUnreachableDirectPortFallsBackToTheStream(t *testing.T) {
	psk := testKey(t)
	n1 := testNode(t, psk)
	n2 := testNode(t, psk, n1.Addrs()[0])
	waitRouting(t, n1, n2)
	if err := n1.direct.ln.Close(); err != nil { // node 1 still offers its port
		t.Fatal(err)
	}
	for i := range 2 {
		data, d := holdBlob(t, n1, directMinSize+1<<20)
		got, err := readPeer(t, n2, blobObject(t, d), 0)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("fetch %d: %d of %d bytes, %v", i, len(got), len(data), err)
		}
	}
	if fb := testutil.ToFloat64(n2.metrics.directFallback); fb != 1 {
		t.Fatalf("%v fallbacks to the stream, want 1: the second fetch should not have tried", fb)
	}
}

// A ticket opens one direct connection, for the node it was given to, from the address that node
// reached the provider at; nothing else gets a connection past its ticket.
func TestDirectTicketIsGoodOnceForItsPeer(t *testing.T) {
	for _, enc := range []Encryption{EncryptionTLS, EncryptionNone} {
		t.Run(string(enc), func(t *testing.T) {
			psk := testKey(t)
			withEnc := func(o *Options) { o.Encryption = enc }
			n1 := testNodeWith(t, psk, withEnc)
			n2 := testNodeWith(t, psk, withEnc)
			n3 := testNodeWith(t, psk, withEnc)
			ticket := make([]byte, 32)
			rand.Read(ticket)
			offered := &directTicket{peer: n2.ID(), ip: net.IPv4(127, 0, 0, 1), conn: make(chan net.Conn, 1)}
			n1.direct.mu.Lock()
			n1.direct.tickets[string(ticket)] = offered
			n1.direct.mu.Unlock()

			take := func(n *Node, from string, ticket []byte) error {
				t.Helper()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				dialer := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
				raw, err := dialer.DialContext(ctx, "tcp", n1.direct.addr())
				if err != nil {
					t.Fatal(err)
				}
				defer raw.Close()
				_, err = n.direct.handshake(ctx, raw, n1.ID(), ticket)
				return err
			}
			wrong := make([]byte, 32)
			rand.Read(wrong)
			refusals := []struct {
				name   string
				n      *Node
				from   string
				ticket []byte
			}{
				{"a ticket no one was given", n2, "127.0.0.1", wrong},
				{"the ticket, from another address", n2, "127.0.0.2", ticket},
			}
			if enc == EncryptionTLS {
				refusals = append(refusals, struct {
					name   string
					n      *Node
					from   string
					ticket []byte
				}{"the ticket, from another member", n3, "127.0.0.1", ticket})
			}
			for _, r := range refusals {
				if err := take(r.n, r.from, r.ticket); err == nil {
					t.Fatalf("%s: taken", r.name)
				}
			}
			if err := take(n2, "127.0.0.1", ticket); err != nil {
				t.Fatalf("the ticket, from its node: %v", err)
			}
			select {
			case c := <-offered.conn:
				c.Close()
			case <-time.After(5 * time.Second):
				t.Fatal("the connection taken never reached the offer")
			}
			if err := take(n2, "127.0.0.1", ticket); err == nil {
				t.Fatal("a ticket was taken twice")
			}
			want := float64(len(refusals) + 1)
			deadline := time.Now().Add(5 * time.Second)
			for directCount(n1, "refused") < want && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if got, taken := directCount(n1, "refused"), directCount(n1, "taken"); got != want || taken != 1 {
				t.Fatalf("refused %v, taken %v; want %v and 1", got, taken, want)
			}
		})
	}
}

// A blob that the provider was still fetching, and that failed verification there, ends short on the
// direct connection: the asker gets an error, never the whole rotten blob.
func TestDirectConnectionOfABlobThatFailsVerificationEndsShort(t *testing.T) {
	psk := testKey(t)
	n1 := testNode(t, psk)
	n2 := testNode(t, psk, n1.Addrs()[0])
	waitRouting(t, n1, n2)
	data := make([]byte, 2*directMinSize)
	rand.Read(data)
	d := digest.FromBytes(data)
	rotten := bytes.Clone(data)
	rotten[len(rotten)-10] ^= 0xff
	gate := make(chan struct{})
	fetchAndProvide(t, n1, d, len(data), func(off int64) io.Reader {
		// Half the blob, then, once the asker has it, the rest, rotten near the end.
		return io.MultiReader(bytes.NewReader(rotten[off:directMinSize]), gateReader(gate), bytes.NewReader(rotten[directMinSize:]))
	})
	got, err := n2.Source().Open(context.Background(), blobObject(t, d), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	head := make([]byte, directMinSize-1)
	if _, err := io.ReadFull(got, head); err != nil {
		t.Fatalf("read the first half: %v", err)
	}
	if directCount(n1, "taken") != 1 {
		t.Fatal("the blob did not go over a direct connection")
	}
	close(gate)
	rest, err := io.ReadAll(got)
	if err == nil || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read the rest of a blob that failed verification: %d bytes, %v; want an unexpected EOF", len(rest), err)
	}
	if n := len(head) + len(rest); n >= len(data) {
		t.Fatalf("the asker got %d bytes of a %d-byte blob that failed verification", n, len(data))
	}
}

// A node that closes cuts off the blobs it is sending on direct connections: the asker's read ends
// with an error at once, rather than wait for bytes that will never come.
func TestClosingNodeCutsItsDirectConnections(t *testing.T) {
	psk := testKey(t)
	n1 := testNode(t, psk)
	n2 := testNode(t, psk, n1.Addrs()[0])
	waitRouting(t, n1, n2)
	data := make([]byte, 2*directMinSize)
	rand.Read(data)
	d := digest.FromBytes(data)
	gate := make(chan struct{})
	t.Cleanup(func() { close(gate) })
	fetchAndProvide(t, n1, d, len(data), func(off int64) io.Reader {
		return io.MultiReader(bytes.NewReader(data[off:directMinSize]), gateReader(gate), bytes.NewReader(data[directMinSize:]))
	})
	got, err := n2.Source().Open(context.Background(), blobObject(t, d), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	if _, err := io.ReadFull(got, make([]byte, directMinSize-1)); err != nil {
		t.Fatalf("read the first half: %v", err)
	}
	if err := n1.Close(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := io.ReadAll(got)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the read of a blob cut off half way ended without an error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the read went on after the provider closed")
	}
}

// A peer that asks for a blob and then stops reading is cut off once a write has waited the send
// stall, on the stream and on a direct connection with either setting, and the upload slot it held
// serves the next peer.
func TestPeerThatStopsReadingLosesItsUploadSlot(t *testing.T) {
	for _, c := range []struct {
		name string
		size int // the stream's window, or the sockets' buffers, must not hold it all
		enc  Encryption
	}{
		{"stream", directMinSize - 1, EncryptionTLS},
		{"direct tls", 32 << 20, EncryptionTLS},
		{"direct none", 32 << 20, EncryptionNone},
	} {
		t.Run(c.name, func(t *testing.T) {
			psk := testKey(t)
			n1 := testNodeWith(t, psk, func(o *Options) { o.Encryption = c.enc; o.sendStall = time.Second })
			n2 := testNodeWith(t, psk, func(o *Options) { o.Encryption = c.enc }, n1.Addrs()[0])
			n3 := testNodeWith(t, psk, func(o *Options) { o.Encryption = c.enc }, n1.Addrs()[0])
			waitRouting(t, n1, n2, n3)
			data, d := holdBlob(t, n1, c.size)
			stuck, err := n2.request(context.Background(), n1.ID(), blobRequest{Digest: d})
			if err != nil {
				t.Fatal(err)
			}
			defer stuck.Close()
			// The asker's side says it: the provider counts a taken ticket after it has answered it.
			if _, direct := stuck.ReadCloser.(*directStream); direct != (c.name != "stream") {
				t.Fatalf("went over a direct connection: %v", direct)
			}
			for deadline := time.Now().Add(15 * time.Second); n1.uploads.inUse() > 0; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("a peer that stopped reading still holds its upload slot")
				}
			}
			if got, err := io.ReadAll(stuck); err == nil {
				t.Fatalf("the peer that stopped reading then read %d bytes of %d and no error", len(got), len(data))
			}
			got, err := readPeer(t, n3, blobObject(t, d), 0)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("the next peer: %d of %d bytes, %v", len(got), len(data), err)
			}
		})
	}
}
