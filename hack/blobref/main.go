// Command blobref serves one file over HTTPS (Go's TLS 1.3, HTTP/1.1, a self-signed certificate) and
// over plain HTTP: the references hack/peering-netns.sh measures peer transfers against. HTTP/1.1
// rather than HTTP/2, so that the HTTPS reference costs the cipher and nothing else.
//
//	blobref -file BLOB -https 10.77.0.1:5443 -http 10.77.0.1:5080
//
// With -peer-get, it is instead the peer counterpart of curl -o /dev/null: a peering node of its own
// that joins the cluster through -bootstrap, fetches the blob through the peers' Source (the DHT, then
// the blob protocol, as an agent does), drops the bytes, and prints how many, how long they took from
// the provider's answer to the last byte (what curl's time_total is for one HTTP request), and how
// long the provider lookup before them took (a fixed cost a blob, whatever its size).
//
//	blobref -peer-get sha256:… -key swarm.key -encryption tls -listen /ip4/10.77.0.2/tcp/5009 -bootstrap /ip4/10.77.0.1/tcp/5001/p2p/12D3Koo…
//
// With -get, it is the references' client: Go's HTTP client, as the peers' client is Go's TLS and
// TCP, on a new connection, dropping the bytes as -peer-get does, trusting the certificate the server
// wrote with -cert-out. It prints the bytes and the seconds from the request to the last byte, the
// connection's set-up included (curl's time_total).
//
//	blobref -file BLOB -https 10.77.0.1:5443 -http 10.77.0.1:5080 -cert-out blobref.pem
//	blobref -get https://10.77.0.1:5443/ -ca blobref.pem
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/peering"
	"github.com/imagemesh/imagemesh/pkg/source"
)

func main() {
	file := flag.String("file", "", "file to serve at every path")
	httpsAddr := flag.String("https", "", "address for HTTPS")
	httpAddr := flag.String("http", "", "address for plain HTTP")
	peerGet := flag.String("peer-get", "", "digest to fetch from peers instead of serving")
	key := flag.String("key", "", "with -peer-get: the cluster key file")
	enc := flag.String("encryption", "", "with -peer-get: tls or none")
	listen := flag.String("listen", "", "with -peer-get: libp2p listen multiaddr")
	bootstrap := flag.String("bootstrap", "", "with -peer-get: a peer's multiaddr ending in /p2p/<id>")
	certOut := flag.String("cert-out", "", "write the HTTPS certificate (PEM) here")
	get := flag.String("get", "", "URL to fetch with Go's HTTP client instead of serving")
	ca := flag.String("ca", "", "with -get: the server's certificate (PEM), -cert-out's")
	flag.Parse()
	var err error
	switch {
	case *peerGet != "":
		err = getFromPeers(digest.Digest(*peerGet), *key, *enc, *listen, *bootstrap)
	case *get != "":
		err = getURL(*get, *ca)
	default:
		err = run(*file, *httpsAddr, *httpAddr, *certOut)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "blobref:", err)
		os.Exit(1)
	}
}

func run(file, httpsAddr, httpAddr, certOut string) error {
	if file == "" || (httpsAddr == "" && httpAddr == "") {
		return errors.New("want -file and -https or -http")
	}
	serve := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, file) })
	errs := make(chan error, 2)
	if httpAddr != "" {
		ln, err := net.Listen("tcp", httpAddr)
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: serve, ReadHeaderTimeout: 10 * time.Second}
		go func() { errs <- fmt.Errorf("http: %w", srv.Serve(ln)) }()
	}
	if httpsAddr != "" {
		host, _, err := net.SplitHostPort(httpsAddr)
		if err != nil {
			return err
		}
		cert, err := selfSigned(net.ParseIP(host))
		if err != nil {
			return fmt.Errorf("certificate: %w", err)
		}
		if certOut != "" {
			pemCert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})
			if err := os.WriteFile(certOut, pemCert, 0o644); err != nil {
				return err
			}
		}
		ln, err := net.Listen("tcp", httpsAddr)
		if err != nil {
			return err
		}
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13, NextProtos: []string{"http/1.1"}}
		srv := &http.Server{Handler: serve, ReadHeaderTimeout: 10 * time.Second}
		go func() { errs <- fmt.Errorf("https: %w", srv.Serve(tls.NewListener(ln, cfg))) }()
	}
	return <-errs
}

// getURL fetches url on a new connection and prints "BYTES SECONDS".
func getURL(url, caFile string) error {
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: x509.NewCertPool()}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return err
		}
		if !cfg.RootCAs.AppendCertsFromPEM(b) {
			return fmt.Errorf("%s: no certificate", caFile)
		}
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 5 * time.Minute}
	start := time.Now()
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	got, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, resp.Body, make([]byte, 1<<20))
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	fmt.Printf("%d %.6f\n", got, time.Since(start).Seconds())
	return nil
}

// selfSigned is a P-256 certificate for the IP addresses given, which -get trusts from -cert-out.
func selfSigned(ips ...net.IP) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "blobref"},
		IPAddresses:  ips,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// getFromPeers fetches d from the cluster as an agent's peer source does, and prints "BYTES SECONDS
// LOOKUP": the transfer's seconds from the provider's answer to the last byte, and the seconds of the
// provider lookup and request before it (the node has joined by then).
func getFromPeers(d digest.Digest, keyFile, enc, listen, bootstrap string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	psk, err := peering.LoadPSK(keyFile)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "blobref")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	store, err := content.Open(dir, content.Options{})
	if err != nil {
		return err
	}
	defer func() { _ = store.Close() }()
	n, err := peering.New(ctx, peering.Options{
		ListenAddrs: []string{listen}, PSK: psk, Encryption: peering.Encryption(enc),
		DataDir: dir, Store: store, Bootstrap: []string{bootstrap},
	})
	if err != nil {
		return err
	}
	defer func() { _ = n.Close() }()
	for n.Peers() == 0 {
		if ctx.Err() != nil {
			return fmt.Errorf("no peer joined: %w", ctx.Err())
		}
		time.Sleep(20 * time.Millisecond)
	}
	repo, err := reference.ParseNormalizedNamed("example.test/bench/app")
	if err != nil {
		return err
	}
	// Connected is not yet routing: the DHT takes the peer into its table a moment later, and until
	// then finds no provider. The time counts from the try that finds one.
	var c *source.Content
	var start time.Time
	for {
		start = time.Now()
		c, err = n.Source().Open(ctx, source.Object{Repo: repo, Kind: source.KindBlob, Digest: d}, 0)
		if err == nil {
			break
		}
		if !errors.Is(err, source.ErrNotFound) || ctx.Err() != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer func() { _ = c.Close() }()
	answered := time.Now()
	got, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, c, make([]byte, 1<<20))
	if err != nil {
		return fmt.Errorf("read %s from peers: %w", d, err)
	}
	fmt.Printf("%d %.6f %.6f\n", got, time.Since(answered).Seconds(), answered.Sub(start).Seconds())
	return nil
}
