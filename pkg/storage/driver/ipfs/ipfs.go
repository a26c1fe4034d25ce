// Package ipfs is a distribution/v3 storage driver that keeps the registry's storage layout in IPFS,
// in a kubo node's mutable file system (MFS), through its RPC API. Uploads stream into MFS (no blob is
// held in memory), reads go by path and offset, and the root of the layout is an IPFS directory whose
// CID can be published (IPNS, DNSLink) for nodes to pull from.
//
// Every file is written in one way: as `ipfs add --cid-version=1 --raw-leaves` adds it (the balanced
// DAG of 256 KiB raw leaves), so that the same layer pushed by independent publishers, or added by
// hand, gets the same CID. The driver never caches content: what it returns is what
// kubo holds, and the registry verifies digests as it always does.
package ipfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/base"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	"github.com/ipfs/kubo/client/rpc"
)

// DriverName is the name the registry's configuration uses: storage: {ipfs: {api: ..., root: ...}}.
const DriverName = "ipfs"

func init() { factory.Register(DriverName, ipfsFactory{}) }

type ipfsFactory struct{}

func (ipfsFactory) Create(_ context.Context, params map[string]any) (driver.StorageDriver, error) {
	return FromParameters(params)
}

// Parameters configure the driver.
type Parameters struct {
	// API is the kubo RPC API, e.g. http://127.0.0.1:5001.
	API string
	// Root is the MFS directory the layout lives under. Default /imagemesh.
	Root       string
	HTTPClient *http.Client
}

// FromParameters reads the registry configuration's parameters: api (required) and root.
func FromParameters(params map[string]any) (*Driver, error) {
	p := Parameters{}
	if v, ok := params["api"].(string); ok {
		p.API = v
	}
	if v, ok := params["root"].(string); ok {
		p.Root = v
	}
	return New(p)
}

// Driver is the ipfs storage driver.
type Driver struct {
	base.Base
	d *mfsDriver
}

// New returns a driver over the kubo node at p.API. It creates the root directory.
func New(p Parameters) (*Driver, error) {
	if p.API == "" {
		return nil, errors.New("ipfs driver: api (the kubo RPC API URL) is required")
	}
	if p.Root == "" {
		p.Root = "/imagemesh"
	}
	if !strings.HasPrefix(p.Root, "/") {
		return nil, fmt.Errorf("ipfs driver: root %q must be an absolute MFS path", p.Root)
	}
	if p.HTTPClient == nil {
		p.HTTPClient = &http.Client{}
	}
	api, err := rpc.NewURLApiWithClient(p.API, p.HTTPClient)
	if err != nil {
		return nil, fmt.Errorf("ipfs driver: %w", err)
	}
	d := &mfsDriver{api: api, root: path.Clean(p.Root), mtimes: map[string]time.Time{}, appended: map[string]bool{}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := api.Request("files/mkdir", d.root).Option("parents", true).Exec(ctx, nil); err != nil {
		return nil, fmt.Errorf("ipfs driver: create %s on %s: %w", d.root, p.API, err)
	}
	return &Driver{Base: base.Base{StorageDriver: d}, d: d}, nil
}

// RootCID is the CID of the layout's root directory now: what a node pulls from, and what is published.
func (d *Driver) RootCID(ctx context.Context) (string, error) {
	return d.d.hash(ctx, d.d.root)
}

// mfsDriver implements the driver over MFS; base.Base validates paths and names the driver in errors.
type mfsDriver struct {
	api  *rpc.HttpApi
	root string

	// MFS keeps a file's mtime in its DAG, which would change its CID: modification times are the
	// driver's own, kept in memory. After a restart, files report the time the driver started.
	mu      sync.Mutex
	mtimes  map[string]time.Time
	started time.Time
	// appended are files written past offset 0 in a later session: not in canonical form.
	appended map[string]bool

	// ns serialises changes to the directory tree (link, move, remove): concurrent ones in kubo's
	// MFS can lose each other's updates of a shared parent, so a committed file went missing.
	ns sync.Mutex
}

func (d *mfsDriver) Name() string { return DriverName }

func (d *mfsDriver) full(p string) string { return path.Join(d.root, p) }

func (d *mfsDriver) touch(p string) {
	d.mu.Lock()
	d.mtimes[p] = time.Now()
	d.mu.Unlock()
}

func (d *mfsDriver) mtime(p string) time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	if t, ok := d.mtimes[p]; ok {
		return t
	}
	if d.started.IsZero() {
		d.started = time.Now()
	}
	return d.started
}

func (d *mfsDriver) forget(prefix string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for p := range d.mtimes {
		if p == prefix || strings.HasPrefix(p, prefix+"/") {
			delete(d.mtimes, p)
		}
	}
}

// write writes body at p from offset. A write from offset 0 replaces the file with a new one, added
// as `ipfs add --cid-version=1 --raw-leaves` adds it: the canonical DAG, the same CID for the same
// bytes whoever publishes them. A write past 0 appends through MFS, which builds another DAG shape;
// such a file is made canonical again when it is moved into place (Move).
func (d *mfsDriver) write(ctx context.Context, p string, body io.Reader, offset int64) error {
	if offset > 0 {
		err := d.api.Request("files/write", d.full(p)).
			Option("offset", offset).Option("raw-leaves", true).Option("cid-version", 1).
			FileBody(body).Exec(ctx, nil)
		if err == nil {
			d.mu.Lock()
			d.appended[p] = true
			d.mu.Unlock()
		}
		return err
	}
	return d.add(ctx, p, body)
}

// add adds body as a new file and links it at p, replacing what was there.
func (d *mfsDriver) add(ctx context.Context, p string, body io.Reader) error {
	var out struct{ Hash string }
	err := d.api.Request("add").
		Option("cid-version", 1).Option("raw-leaves", true).Option("pin", false).Option("quieter", true).
		FileBody(body).Exec(ctx, &out)
	if err != nil {
		return err
	}
	if out.Hash == "" {
		return errors.New("add returned no CID")
	}
	if err := d.link(ctx, out.Hash, p); err != nil {
		return err
	}
	d.mu.Lock()
	delete(d.appended, p)
	d.mu.Unlock()
	return nil
}

// link puts the file with CID c at p, replacing what was there.
func (d *mfsDriver) link(ctx context.Context, c, p string) error {
	d.ns.Lock()
	defer d.ns.Unlock()
	if err := d.api.Request("files/rm", d.full(p)).Option("force", true).Exec(ctx, nil); err != nil && !isNotFound(err) {
		return err
	}
	return d.api.Request("files/cp", "/ipfs/"+c, d.full(p)).Option("parents", true).Exec(ctx, nil)
}

func (d *mfsDriver) GetContent(ctx context.Context, p string) ([]byte, error) {
	rc, err := d.Reader(ctx, p, 0)
	if err != nil {
		return nil, err
	}
	defer func() { _ = rc.Close() }() // read whole below; a failed read is the error
	return io.ReadAll(rc)
}

func (d *mfsDriver) PutContent(ctx context.Context, p string, content []byte) error {
	if err := d.add(ctx, p, bytes.NewReader(content)); err != nil {
		return d.fail(p, err)
	}
	d.touch(p)
	return nil
}

func (d *mfsDriver) Reader(ctx context.Context, p string, offset int64) (io.ReadCloser, error) {
	st, err := d.stat(ctx, p)
	if err != nil {
		return nil, err
	}
	if st.Type != "file" {
		return nil, driver.PathNotFoundError{Path: p, DriverName: DriverName}
	}
	if offset < 0 || offset > int64(st.Size) {
		return nil, driver.InvalidOffsetError{Path: p, Offset: offset, DriverName: DriverName}
	}
	resp, err := d.api.Request("files/read", d.full(p)).Option("offset", offset).Send(ctx)
	if err == nil && resp.Error != nil {
		err = resp.Error
	}
	if err != nil {
		return nil, d.fail(p, err)
	}
	return resp.Output, nil
}

func (d *mfsDriver) Writer(ctx context.Context, p string, resume bool) (driver.FileWriter, error) {
	w := &writer{d: d, path: p}
	if resume {
		st, err := d.stat(ctx, p)
		if err != nil {
			return nil, err
		}
		w.size = int64(st.Size)
	} else if err := d.add(ctx, p, bytes.NewReader(nil)); err != nil {
		// The file exists, empty, from now on: a writer that is committed without a byte leaves an
		// empty file, as on a filesystem.
		return nil, d.fail(p, err)
	}
	return w, nil
}

type statOutput struct {
	Hash string
	Size uint64
	Type string
}

func (d *mfsDriver) stat(ctx context.Context, p string) (*statOutput, error) {
	var st statOutput
	if err := d.api.Request("files/stat", d.full(p)).Exec(ctx, &st); err != nil {
		return nil, d.fail(p, err)
	}
	return &st, nil
}

func (d *mfsDriver) hash(ctx context.Context, full string) (string, error) {
	var st statOutput
	if err := d.api.Request("files/stat", full).Exec(ctx, &st); err != nil {
		return "", err
	}
	return st.Hash, nil
}

func (d *mfsDriver) Stat(ctx context.Context, p string) (driver.FileInfo, error) {
	st, err := d.stat(ctx, p)
	if err != nil {
		return nil, err
	}
	fi := driver.FileInfoFields{Path: p, IsDir: st.Type == "directory", ModTime: d.mtime(p)}
	if !fi.IsDir {
		fi.Size = int64(st.Size)
	}
	return driver.FileInfoInternal{FileInfoFields: fi}, nil
}

func (d *mfsDriver) List(ctx context.Context, p string) ([]string, error) {
	var out struct {
		Entries []struct{ Name string }
	}
	if err := d.api.Request("files/ls", d.full(p)).Option("U", true).Exec(ctx, &out); err != nil {
		return nil, d.fail(p, err)
	}
	st, err := d.stat(ctx, p)
	if err != nil {
		return nil, err
	}
	if st.Type != "directory" {
		return nil, driver.PathNotFoundError{Path: p, DriverName: DriverName}
	}
	names := make([]string, 0, len(out.Entries))
	for _, e := range out.Entries {
		names = append(names, path.Join(p, e.Name))
	}
	sort.Strings(names)
	return names, nil
}

func (d *mfsDriver) Move(ctx context.Context, src, dst string) error {
	if _, err := d.stat(ctx, src); err != nil {
		return err
	}
	d.mu.Lock()
	appended := d.appended[src]
	d.mu.Unlock()
	if appended && strings.Contains(dst, "/blobs/") {
		// A blob assembled from several sessions is added again in one, so that its CID is the one
		// any publisher of the same bytes gets.
		if err := d.canonicalize(ctx, src, dst); err != nil {
			return d.fail(src, err)
		}
	} else if err := d.move(ctx, src, dst); err != nil {
		return err
	}
	d.mu.Lock()
	t, ok := d.mtimes[src]
	delete(d.mtimes, src)
	if ok {
		d.mtimes[dst] = t
	}
	if d.appended[src] {
		delete(d.appended, src)
		d.appended[dst] = true
	}
	d.mu.Unlock()
	return nil
}

// move renames src to dst, replacing what was there (mv alone does not).
func (d *mfsDriver) move(ctx context.Context, src, dst string) error {
	d.ns.Lock()
	defer d.ns.Unlock()
	if err := d.api.Request("files/mkdir", d.full(path.Dir(dst))).Option("parents", true).Exec(ctx, nil); err != nil {
		return d.fail(dst, err)
	}
	if err := d.api.Request("files/rm", d.full(dst)).Option("recursive", true).Option("force", true).Exec(ctx, nil); err != nil && !isNotFound(err) {
		return d.fail(dst, err)
	}
	if err := d.api.Request("files/mv", d.full(src), d.full(dst)).Exec(ctx, nil); err != nil {
		return d.fail(src, err)
	}
	return nil
}

func (d *mfsDriver) canonicalize(ctx context.Context, src, dst string) error {
	resp, err := d.api.Request("files/read", d.full(src)).Send(ctx)
	if err == nil && resp.Error != nil {
		err = resp.Error
	}
	if err != nil {
		return err
	}
	defer func() { _ = resp.Close() }() // read by add; its error is the one that matters
	if err := d.add(ctx, dst, resp.Output); err != nil {
		return err
	}
	d.forget(src)
	return d.remove(ctx, src)
}

// remove deletes p and everything under it.
func (d *mfsDriver) remove(ctx context.Context, p string) error {
	d.ns.Lock()
	defer d.ns.Unlock()
	return d.api.Request("files/rm", d.full(p)).Option("recursive", true).Option("force", true).Exec(ctx, nil)
}

func (d *mfsDriver) Delete(ctx context.Context, p string) error {
	if _, err := d.stat(ctx, p); err != nil {
		return err
	}
	if err := d.remove(ctx, p); err != nil {
		return d.fail(p, err)
	}
	d.forget(p)
	return nil
}

// RedirectURL is empty: clients read through the registry.
func (d *mfsDriver) RedirectURL(*http.Request, string) (string, error) { return "", nil }

func (d *mfsDriver) Walk(ctx context.Context, p string, f driver.WalkFn, options ...func(*driver.WalkOptions)) error {
	return driver.WalkFallback(ctx, d, p, f, options...)
}

func isNotFound(err error) bool {
	var rerr *rpc.Error
	if errors.As(err, &rerr) {
		m := rerr.Message
		return strings.Contains(m, "does not exist") || strings.Contains(m, "not found") || strings.Contains(m, "no link named")
	}
	return false
}

// fail turns kubo's answers into the driver's errors.
func (d *mfsDriver) fail(p string, err error) error {
	if isNotFound(err) {
		return driver.PathNotFoundError{Path: p, DriverName: DriverName}
	}
	return driver.Error{DriverName: DriverName, Detail: fmt.Errorf("%s: %w", p, err)}
}

// writer streams one session of writes into a file: a single files/write request whose body is fed
// by Write, started by the first Write at the size the file had.
type writer struct {
	d      *mfsDriver
	path   string
	size   int64
	pw     *chunkPipe
	done   chan error
	closed bool
	commit bool
	cancel bool
}

func (w *writer) Write(b []byte) (int, error) {
	switch {
	case w.closed:
		return 0, errors.New("ipfs driver: write to a closed writer")
	case w.commit:
		return 0, errors.New("ipfs driver: write to a committed writer")
	case w.cancel:
		return 0, errors.New("ipfs driver: write to a cancelled writer")
	}
	if w.pw == nil {
		p := newChunkPipe()
		w.pw, w.done = p, make(chan error, 1)
		offset := w.size
		go func() {
			err := w.d.write(context.Background(), w.path, p, offset)
			p.CloseRead(err) // unblocks Write if kubo stopped reading
			w.done <- err
		}()
	}
	n, err := w.pw.Write(b)
	w.size += int64(n)
	if err != nil {
		return n, w.d.fail(w.path, err)
	}
	return n, nil
}

// finish ends the session's request and waits for kubo to have the bytes.
func (w *writer) finish() error {
	if w.pw == nil {
		return nil
	}
	w.pw.CloseWrite(nil)
	err := <-w.done
	w.pw = nil
	if err != nil {
		return w.d.fail(w.path, err)
	}
	w.d.touch(w.path)
	return nil
}

func (w *writer) Size() int64 { return w.size }

func (w *writer) Close() error {
	if w.closed {
		return errors.New("ipfs driver: writer already closed")
	}
	w.closed = true
	return w.finish()
}

// errWriterCancelled ends the upload of a cancelled writer.
var errWriterCancelled = errors.New("cancelled")

func (w *writer) Cancel(ctx context.Context) error {
	if w.closed {
		return errors.New("ipfs driver: writer already closed")
	}
	w.cancel = true
	var uploadErr error
	if w.pw != nil {
		w.pw.CloseWrite(errWriterCancelled)
		// The upload ends with the cancellation; any other error of it is reported with the delete's.
		if err := <-w.done; err != nil && !errors.Is(err, errWriterCancelled) {
			uploadErr = w.d.fail(w.path, err)
		}
		w.pw = nil
	}
	return errors.Join(uploadErr, w.d.Delete(ctx, w.path))
}

func (w *writer) Commit(context.Context) error {
	switch {
	case w.closed:
		return errors.New("ipfs driver: writer already closed")
	case w.commit:
		return errors.New("ipfs driver: writer already committed")
	case w.cancel:
		return errors.New("ipfs driver: writer already cancelled")
	}
	w.commit = true
	return w.finish()
}

// chunkPipe carries a writer's bytes to the request that sends them, in 1 MiB chunks, a few of them
// buffered: the registry can read and hash the next megabyte while kubo takes the last one, where a
// synchronous pipe would make each wait for the other.
type chunkPipe struct {
	chunks chan []byte
	cur    []byte // being filled by Write
	rd     []byte // being read by Read
	werr   error  // why the writer closed, for Read after the last chunk
	mu     sync.Mutex
	rerr   error // why the reader gave up, for Write
	closed chan struct{}
	once   sync.Once
}

const (
	chunkSize   = 1 << 20
	chunksAhead = 8
)

func newChunkPipe() *chunkPipe {
	return &chunkPipe{chunks: make(chan []byte, chunksAhead), closed: make(chan struct{})}
}

func (p *chunkPipe) Write(b []byte) (int, error) {
	n := 0
	for len(b) > 0 {
		if p.cur == nil {
			p.cur = make([]byte, 0, chunkSize)
		}
		k := copy(p.cur[len(p.cur):cap(p.cur)], b)
		p.cur, b, n = p.cur[:len(p.cur)+k], b[k:], n+k
		if len(p.cur) == cap(p.cur) {
			if err := p.send(); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

func (p *chunkPipe) send() error {
	select {
	case p.chunks <- p.cur:
		p.cur = nil
		return nil
	case <-p.closed:
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.rerr
	}
}

// CloseWrite sends what is left and ends the stream; err, if set, fails the reader instead.
func (p *chunkPipe) CloseWrite(err error) {
	if err == nil && len(p.cur) > 0 {
		if p.send() != nil {
			return
		}
	}
	p.werr = err
	close(p.chunks)
}

func (p *chunkPipe) Read(b []byte) (int, error) {
	for len(p.rd) == 0 {
		c, ok := <-p.chunks
		if !ok {
			if p.werr != nil {
				return 0, p.werr
			}
			return 0, io.EOF
		}
		p.rd = c
	}
	n := copy(b, p.rd)
	p.rd = p.rd[n:]
	return n, nil
}

// WriteTo hands whole chunks to the request, not io.Copy's 32 KiB at a time.
func (p *chunkPipe) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		if len(p.rd) == 0 {
			c, ok := <-p.chunks
			if !ok {
				return total, p.werr
			}
			p.rd = c
		}
		n, err := w.Write(p.rd)
		total += int64(n)
		p.rd = p.rd[n:]
		if err != nil {
			return total, err
		}
	}
}

// CloseRead is the reader giving up: writers fail with err from then on.
func (p *chunkPipe) CloseRead(err error) {
	p.once.Do(func() {
		if err == nil {
			err = io.ErrClosedPipe
		}
		p.mu.Lock()
		p.rerr = err
		p.mu.Unlock()
		close(p.closed)
	})
}
