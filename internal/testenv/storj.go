package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"storj.io/uplink"
)

// Storj is a real Storj network: storj.io/storj's testplanet (a satellite and storage nodes, in one
// process of its own, built by hack/tools/build.sh storj-planet) over a PostgreSQL server of its own.
type Storj struct {
	// Satellite is the satellite's node URL (id@127.0.0.1:port).
	Satellite string
	// APIKey is the test project's API key; Access a serialized access grant to the whole project.
	APIKey string
	Access string

	proc *process
}

// StartPostgres starts a PostgreSQL server (Debian's binaries) on 127.0.0.1 in a temp dir, as the
// postgres user (the server refuses to run as root), with durability off: it is a test database. It
// returns the connection URL.
func StartPostgres(t testing.TB) string {
	t.Helper()
	initdb, postgres := Tool(t, "initdb"), Tool(t, "postgres")
	// The tools dir links to Debian's binaries; the postgres user cannot enter root's home to follow
	// the link, so run them from where they are.
	for _, b := range []*string{&initdb, &postgres} {
		if p, err := filepath.EvalSymlinks(*b); err == nil {
			*b = p
		}
	}
	// PostgreSQL refuses to run as root: as root, run it as the postgres user.
	var cred *syscall.Credential
	var owner *user.User
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			missing(t, "PostgreSQL must run as a user other than root, and there is no postgres user (apt-get install postgresql makes one): %v", err)
			return ""
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		owner, cred = u, &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	dir := shortTempDir(t, "pg")
	t.Cleanup(func() { os.RemoveAll(dir) })
	data, sock := filepath.Join(dir, "data"), filepath.Join(dir, "sock")
	for _, d := range []string{data, sock} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if owner != nil {
		for _, d := range []string{dir, data, sock} {
			if err := os.Chown(d, int(cred.Uid), int(cred.Gid)); err != nil {
				t.Fatal(err)
			}
		}
	}
	run := func(bin string, args ...string) *exec.Cmd {
		cmd := exec.Command(bin, args...)
		// If the test process dies, so does the server: a killed test leaves no database running.
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGQUIT}
		return cmd
	}
	if out, err := run(initdb, "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	addr := FreeAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	log := filepath.Join(dir, "postgres.log")
	cmd := run(postgres, "-D", data, "-p", port, "-k", sock, "-c", "listen_addresses=127.0.0.1",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300")
	p, err := startCmd(log, cmd)
	if err != nil {
		t.Fatalf("start postgres: %v", err)
	}
	t.Cleanup(func() {
		// SIGINT is PostgreSQL's fast shutdown: it does not wait for clients.
		p.signal(syscall.SIGINT, 10*time.Second)
		if t.Failed() {
			t.Logf("postgres log (end):\n%s", logTail(log))
		}
	})
	err = waitReady(p, 60*time.Second, func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Fatalf("postgres: %v\n%s", err, logTail(log))
	}
	return fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", addr)
}

// StartStorj starts a Storj network for the test (PostgreSQL, then testplanet with one satellite and
// four storage nodes) and stops it when the test ends.
func StartStorj(t testing.TB) *Storj {
	t.Helper()
	planet := Tool(t, "storj-planet")
	pg := StartPostgres(t)
	dir := shortTempDir(t, "planet")
	t.Cleanup(func() { os.RemoveAll(dir) })
	info, log := filepath.Join(dir, "info.json"), filepath.Join(dir, "planet.log")
	cmd := exec.Command(planet, "-test.run", "^TestServe$", "-test.count", "1", "-test.timeout", "0")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "STORJ_TEST_POSTGRES="+pg, "STORJ_TEST_COCKROACH=omit", "STORJ_TEST_TIDB=omit",
		"STORJ_PLANET_INFO="+info, "TMPDIR="+dir)
	p, err := startCmd(log, cmd)
	if err != nil {
		t.Fatalf("start storj-planet: %v", err)
	}
	t.Cleanup(func() {
		p.stop(30 * time.Second)
		if t.Failed() {
			t.Logf("storj testplanet log (end):\n%s", logTail(log))
		}
	})
	s := &Storj{proc: p}
	err = waitReady(p, 3*time.Minute, func() error {
		b, err := os.ReadFile(info)
		if err != nil {
			return err
		}
		return json.Unmarshal(b, s)
	})
	if err != nil {
		t.Fatalf("storj testplanet: %v\n%s", err, logTail(log))
	}
	return s
}

// Project opens the test project with the full access grant.
func (s *Storj) Project(t testing.TB) *uplink.Project {
	t.Helper()
	access, err := uplink.ParseAccess(s.Access)
	if err != nil {
		t.Fatal(err)
	}
	p, err := uplink.OpenProject(context.Background(), access)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// Bucket creates a bucket and returns its name.
func (s *Storj) Bucket(t testing.TB, name string) string {
	t.Helper()
	if _, err := s.Project(t).CreateBucket(context.Background(), name); err != nil {
		t.Fatalf("create bucket %s: %v", name, err)
	}
	return name
}

// Grant returns a serialized access grant to the project, derived from the API key with passphrase:
// grants with other passphrases see other (undecryptable) keys.
func (s *Storj) Grant(t testing.TB, passphrase string) string {
	t.Helper()
	access, err := uplink.RequestAccessWithPassphrase(context.Background(), s.Satellite, s.APIKey, passphrase)
	if err != nil {
		t.Fatal(err)
	}
	out, err := access.Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Stop shuts the network down now (a network that is down); Cleanup is then a no-op.
func (s *Storj) Stop() { s.proc.stop(30 * time.Second) }

// StartLinkshare serves the objects of a bucket over plain HTTP as Storj linksharing does in its raw
// mode: GET and HEAD of /<key>, with the object's "content-type" metadata as Content-Type, and nothing
// else (no registry logic). It stands in for linksharing, which is a service of its own.
func (s *Storj) StartLinkshare(t testing.TB, bucket string) string {
	t.Helper()
	project := s.Project(t)
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "read only", http.StatusMethodNotAllowed)
			return
		}
		key := strings.TrimPrefix(r.URL.Path, "/")
		obj, err := project.StatObject(r.Context(), bucket, key)
		if errors.Is(err, uplink.ErrObjectNotFound) {
			http.NotFound(w, r)
			return
		} else if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		if ct := obj.Custom["content-type"]; ct != "" {
			w.Header().Set("Content-Type", ct)
		} else {
			w.Header().Set("Content-Type", "application/octet-stream")
		}
		w.Header().Set("Content-Length", strconv.FormatInt(obj.System.ContentLength, 10))
		if r.Method == http.MethodHead {
			return
		}
		dl, err := project.DownloadObject(r.Context(), bucket, key, nil)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer dl.Close()
		io.Copy(w, dl)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}
