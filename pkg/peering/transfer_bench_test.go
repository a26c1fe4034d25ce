package peering

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/pkg/content"
)

// BenchmarkWarmBlob moves a 256 MiB blob held by one node to another over the blob protocol, and,
// as the references in the same run, over HTTPS (Go's TLS 1.3, HTTP/1.1) and plain HTTP on the same
// loopback. libp2p with encryption compares with HTTPS: both spend one cipher pass a byte, so the
// ratio is the cost of libp2p's framing (yamux) and of the stream protocol. libp2p with encryption
// "none" compares with plain HTTP. The direct cases move the same bytes over a direct connection
// (direct.go) with either setting.
func BenchmarkWarmBlob(b *testing.B) {
	const size = 256 << 20
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	psk := make(pnet.PSK, 32)
	d := digest.FromBytes(data)
	buf := make([]byte, 1<<20)
	var held *Node
	for _, bc := range []struct {
		name string
		with func(*Options)
	}{
		{"libp2p-tls", nil},
		{"libp2p-none", withEncryption(EncryptionNone)},
		{"direct-tls", withDirect(EncryptionTLS)},
		{"direct-none", withDirect(EncryptionNone)},
	} {
		a, c := benchNode(b, psk, bc.with), benchNode(b, psk, bc.with)
		if err := a.opts.Store.Put(d, data); err != nil {
			b.Fatal(err)
		}
		held = a
		if err := c.Connect(context.Background(), a.Addrs()[0]); err != nil {
			b.Fatal(err)
		}
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				ct, err := c.request(context.Background(), a.ID(), blobRequest{Digest: d})
				if err != nil {
					b.Fatal(err)
				}
				if n, err := drain(ct, buf); err != nil || n != size {
					b.Fatalf("%d bytes: %v", n, err)
				}
				ct.Close()
			}
		})
	}
	serve := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, _, err := held.opts.Store.Open(d)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		defer f.Close()
		_, _ = io.Copy(w, f) // a short copy shows as a short read in the benchmark's client
	})
	cert, pool := benchCert(b)
	for _, bc := range []struct {
		name   string
		scheme string
		tls    *tls.Config
		client *http.Client
	}{
		// HTTP/1.1 over TLS 1.3: the cipher alone, without HTTP/2's framing, the strictest reference.
		{"https", "https", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13, NextProtos: []string{"http/1.1"}},
			&http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}}},
		{"http", "http", nil, &http.Client{Transport: &http.Transport{}}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			if bc.tls != nil {
				ln = tls.NewListener(ln, bc.tls)
			}
			srv := &http.Server{Handler: serve, ReadHeaderTimeout: 10 * time.Second}
			go func() { _ = srv.Serve(ln) }() // ends with ErrServerClosed at srv.Close
			defer srv.Close()
			b.SetBytes(size)
			for b.Loop() {
				resp, err := bc.client.Get(bc.scheme + "://" + ln.Addr().String())
				if err != nil {
					b.Fatal(err)
				}
				if n, err := drain(resp.Body, buf); err != nil || n != size {
					b.Fatalf("%d bytes: %v", n, err)
				}
				resp.Body.Close()
			}
		})
	}
}

// drain reads r to its end in reads of len(buf), the same for every client of the benchmark (io.Copy
// to io.Discard would read 8 KiB at a time, which costs an HTTP client a syscall each).
func drain(r io.Reader, buf []byte) (int64, error) {
	return io.CopyBuffer(struct{ io.Writer }{io.Discard}, r, buf)
}

// benchCert is a self-signed certificate for 127.0.0.1 and a pool that trusts it.
func benchCert(b *testing.B) (tls.Certificate, *x509.CertPool) {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "bench"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

func benchNode(b *testing.B, psk pnet.PSK, with func(*Options)) *Node {
	b.Helper()
	store, err := content.Open(b.TempDir(), content.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { store.Close() })
	opts := Options{ListenAddrs: []string{"/ip4/127.0.0.1/tcp/0"}, PSK: psk, DataDir: b.TempDir(), Store: store}
	if with != nil {
		with(&opts)
	}
	n, err := New(context.Background(), opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.Close() })
	return n
}

// withDirect gives a node a direct listener and the encryption enc.
func withDirect(enc Encryption) func(*Options) {
	return func(o *Options) {
		o.Encryption = enc
		o.DirectListen = "127.0.0.1:0"
	}
}
