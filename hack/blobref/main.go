// Command blobref serves one file over HTTPS (Go's TLS 1.3, HTTP/1.1, a self-signed certificate) and
// over plain HTTP: the references hack/peering-netns.sh measures peer transfers against. HTTP/1.1
// rather than HTTP/2, so that the HTTPS reference costs the cipher and nothing else.
//
//	blobref -file BLOB -https 10.77.0.1:5443 -http 10.77.0.1:5080
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	file := flag.String("file", "", "file to serve at every path")
	httpsAddr := flag.String("https", "", "address for HTTPS")
	httpAddr := flag.String("http", "", "address for plain HTTP")
	flag.Parse()
	if err := run(*file, *httpsAddr, *httpAddr); err != nil {
		fmt.Fprintln(os.Stderr, "blobref:", err)
		os.Exit(1)
	}
}

func run(file, httpsAddr, httpAddr string) error {
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
		cert, err := selfSigned()
		if err != nil {
			return fmt.Errorf("certificate: %w", err)
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

// selfSigned is a P-256 certificate for any name: clients of a benchmark skip verification.
func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "blobref"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
