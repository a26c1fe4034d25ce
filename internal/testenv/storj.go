package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
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
	t.Cleanup(func() { _ = p.Close() })
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

// Linksharing is Storj's linksharing service (storj.io/edge cmd/linksharing, built by
// hack/tools/build.sh linksharing) in front of a test network: it serves a bucket's objects over
// plain HTTP to anyone holding an access grant, which the URL carries.
type Linksharing struct {
	// URL is where it listens: http://127.0.0.1:port.
	URL string
}

// StartLinksharing starts linksharing for the network, over plain HTTP on 127.0.0.1, with no auth
// service (URLs carry serialized access grants, not access key IDs), no telemetry and no tracing. It
// starts serving only once it has dialed the network's satellite.
func (s *Storj) StartLinksharing(t testing.TB) *Linksharing {
	t.Helper()
	bin := Tool(t, "linksharing")
	dir := shortTempDir(t, "linkshare")
	addr := FreeAddr(t)
	l := &Linksharing{URL: "http://" + addr}
	log := filepath.Join(dir, "linksharing.log")
	p, err := startProcess(log, bin, "run",
		"--config-dir", dir,
		"--address", addr,
		"--insecure-disable-tls",
		// Requests for other hosts are website hosting, looked up in DNS: the public URL is the only
		// host it serves links on.
		"--public-url", l.URL,
		"--redirect-https=false",
		"--landing-redirect-target=",
		"--startup-check.satellites", s.Satellite,
		"--metrics.addr=", "--metrics.event-addr=", "--tracing.enabled=false",
		"--debug.addr=127.0.0.1:0",
		"--shutdown-delay=0s",
		"--log.level=debug",
	)
	if err != nil {
		t.Fatalf("start linksharing: %v", err)
	}
	t.Cleanup(func() {
		p.stop(10 * time.Second)
		if t.Failed() {
			t.Logf("linksharing log (end):\n%s", logTail(log))
		}
	})
	err = waitReady(p, 60*time.Second, func() error {
		resp, err := http.Get(l.URL + "/health/process")
		if err != nil {
			return err
		}
		_ = resp.Body.Close() // only the status matters
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("health: HTTP %d", resp.StatusCode)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("linksharing: %v\n%s", err, logTail(log))
	}
	return l
}

// Raw is the URL under which linksharing serves the objects of bucket as they are (its raw mode, no
// HTML around them), read with the serialized access grant: <URL>/raw/<grant>/<bucket>/<key>.
func (l *Linksharing) Raw(grant, bucket string) string {
	return l.URL + "/raw/" + grant + "/" + bucket
}

// ShareGrant returns a serialized access grant that can only read and list bucket's objects under
// prefix ("" for all of them): what one hands to linksharing.
func (s *Storj) ShareGrant(t testing.TB, bucket, prefix string) string {
	t.Helper()
	access, err := uplink.ParseAccess(s.Access)
	if err != nil {
		t.Fatal(err)
	}
	shared, err := access.Share(uplink.ReadOnlyPermission(), uplink.SharePrefix{Bucket: bucket, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	out, err := shared.Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}
