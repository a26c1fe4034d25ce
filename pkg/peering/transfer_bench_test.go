package peering

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"

	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/pkg/content"
)

// BenchmarkWarmBlob moves a 256 MiB blob held by one node to another over the blob protocol, and,
// as the reference in the same run, over plain HTTP on the same loopback. The ratio of the two is
// the cost of libp2p: the private network's cipher, the secure channel and the stream muxer.
func BenchmarkWarmBlob(b *testing.B) {
	const size = 256 << 20
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	psk := make(pnet.PSK, 32)
	a, d := benchNode(b, psk), digest.FromBytes(data)
	if err := a.opts.Store.Put(d, data); err != nil {
		b.Fatal(err)
	}
	c := benchNode(b, psk)
	if err := c.Connect(context.Background(), a.Addrs()[0]); err != nil {
		b.Fatal(err)
	}
	b.Run("libp2p", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			ct, err := c.request(context.Background(), a.ID(), blobRequest{Digest: d})
			if err != nil {
				b.Fatal(err)
			}
			if n, err := io.Copy(io.Discard, ct); err != nil || n != size {
				b.Fatalf("%d bytes: %v", n, err)
			}
			ct.Close()
		}
	})
	b.Run("http", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			f, info, err := a.opts.Store.Open(d)
			if err != nil {
				http.Error(w, err.Error(), 404)
				return
			}
			defer f.Close()
			_ = info
			_, _ = io.Copy(w, f) // a short copy shows as a short read in the benchmark's client
		})}
		go func() { _ = srv.Serve(ln) }() // ends with ErrServerClosed at srv.Close
		defer srv.Close()
		b.SetBytes(size)
		for b.Loop() {
			resp, err := http.Get("http://" + ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			if n, err := io.Copy(io.Discard, resp.Body); err != nil || n != size {
				b.Fatalf("%d bytes: %v", n, err)
			}
			resp.Body.Close()
		}
	})
}

func benchNode(b *testing.B, psk pnet.PSK) *Node {
	b.Helper()
	store, err := content.Open(b.TempDir(), content.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { store.Close() })
	n, err := New(context.Background(), Options{ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, PSK: psk, DataDir: b.TempDir(), Store: store})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.Close() })
	return n
}
