package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"golang.org/x/crypto/bcrypt"
)

// WithHtpasswd makes the registry ask for HTTP basic credentials of one user.
func WithHtpasswd(user, password string) RegistryOption {
	return func(t testing.TB, r *Registry, dir string) string {
		hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(path, []byte(user+":"+string(hash)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("auth:\n  htpasswd: {realm: imagemesh-test, path: %s}\n", path)
	}
}

// TokenServer issues registry bearer tokens, as Docker Hub's auth service does, to one user.
type TokenServer struct {
	// Issued counts the tokens handed out.
	Issued atomic.Int32
}

// WithTokenAuth makes the registry use the token flow: it answers 401 with
// `WWW-Authenticate: Bearer realm=http://<Host>/token`, and accepts only JWTs signed by the token
// service this option runs in the test process, which hands them to user/password. ts, if not nil,
// receives the service, to count what it issued.
func WithTokenAuth(user, password string, ts **TokenServer) RegistryOption {
	return func(t testing.TB, r *Registry, dir string) string {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(1),
			Subject:               pkix.Name{CommonName: "imagemesh test token issuer"},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().Add(24 * time.Hour),
			KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
			BasicConstraintsValid: true,
			IsCA:                  true,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		bundle := filepath.Join(dir, "token-ca.pem")
		if err := os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
			t.Fatal(err)
		}
		signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key},
			(&jose.SignerOptions{}).WithType("JWT").WithHeader("x5c", []string{base64.StdEncoding.EncodeToString(der)}))
		if err != nil {
			t.Fatal(err)
		}
		const service, issuer = "imagemesh-test-registry", "imagemesh-test-issuer"
		srv := &TokenServer{}
		r.token = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			u, p, ok := req.BasicAuth()
			if !ok || u != user || p != password {
				w.Header().Set("WWW-Authenticate", `Basic realm="imagemesh-test"`)
				http.Error(w, `{"details":"invalid credentials"}`, http.StatusUnauthorized)
				return
			}
			if req.URL.Query().Get("service") != service {
				http.Error(w, `{"details":"unknown service"}`, http.StatusBadRequest)
				return
			}
			type access struct {
				Type    string   `json:"type"`
				Name    string   `json:"name"`
				Actions []string `json:"actions"`
			}
			var granted []access
			for _, scope := range req.URL.Query()["scope"] {
				// repository:<name>:<actions>; names may not contain ':', actions are comma-separated.
				parts := strings.Split(scope, ":")
				if len(parts) == 3 && parts[0] == "repository" {
					granted = append(granted, access{Type: "repository", Name: parts[1], Actions: strings.Split(parts[2], ",")})
				}
			}
			now := time.Now()
			claims, _ := json.Marshal(map[string]any{
				"iss": issuer, "sub": user, "aud": service, "jti": fmt.Sprint(now.UnixNano()),
				"iat": now.Unix(), "nbf": now.Add(-time.Minute).Unix(), "exp": now.Add(5 * time.Minute).Unix(),
				"access": granted,
			})
			jws, err := signer.Sign(claims)
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			tok, _ := jws.CompactSerialize()
			srv.Issued.Add(1)
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(map[string]any{"token": tok, "access_token": tok, "expires_in": 300, "issued_at": now.UTC().Format(time.RFC3339)})
		})
		if ts != nil {
			*ts = srv
		}
		return fmt.Sprintf("auth:\n  token: {realm: %s/token, service: %s, issuer: %s, rootcertbundle: %s}\n",
			r.URL, service, issuer, bundle)
	}
}

// DockerConfig writes a docker config.json holding user/password for the registry and returns its
// directory, for DOCKER_CONFIG (crane and the agent's keychain both read it).
func (r *Registry) DockerConfig(t testing.TB, user, password string) string {
	t.Helper()
	dir := t.TempDir()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	body, _ := json.Marshal(map[string]any{"auths": map[string]any{r.Host: map[string]string{"auth": auth}}})
	if err := os.WriteFile(filepath.Join(dir, "config.json"), body, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// WithTLS serves the registry over HTTPS with a certificate for 127.0.0.1 from a fresh CA, and sets
// URL to https. The CA's PEM file is written to *caFile.
func WithTLS(caFile *string) RegistryOption {
	return func(t testing.TB, r *Registry, dir string) string {
		caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		caTmpl := &x509.Certificate{
			SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "imagemesh test CA"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		}
		caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		ca, _ := x509.ParseCertificate(caDER)
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		leafTmpl := &x509.Certificate{
			SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		cert, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
		*caFile = filepath.Join(dir, "ca.crt")
		for path, block := range map[string]*pem.Block{
			cert:    {Type: "CERTIFICATE", Bytes: leafDER},
			keyFile: {Type: "EC PRIVATE KEY", Bytes: keyDER},
			*caFile: {Type: "CERTIFICATE", Bytes: caDER},
		} {
			if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		r.URL = "https://" + r.Host
		r.tlsCA, r.tlsCert, r.tlsKey = *caFile, cert, keyFile
		return ""
	}
}
