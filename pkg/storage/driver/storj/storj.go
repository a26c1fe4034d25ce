// Package storj is a distribution/v3 storage driver that keeps the registry's storage layout in a
// Storj bucket, through Storj's native protocol (storj.io/uplink): objects are encrypted on this side
// and erasure-coded across storage nodes; no S3 gateway is involved.
//
// Files are objects: a registry path /a/b/data is the object <prefix>/a/b/data. Directories are the
// prefixes Storj lists. Writers are multipart uploads: each writer session is one part, a resumed
// writer adds the next part, and Commit commits the upload. An upload is invisible in the bucket until
// it is committed, so a push that dies half-way leaves nothing a reader can see, and Cancel or Delete
// abort it. Content streams through; no file is held in memory.
package storj

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
	"golang.org/x/sync/errgroup"
	"storj.io/uplink"

	"github.com/imagemesh/imagemesh/pkg/storjaccess"
)

// DriverName is the name the registry's configuration uses:
// storage: {storj: {access: ..., accessfile: ..., bucket: ..., prefix: ...}}.
const DriverName = "storj"

// AccessEnv is the environment variable a serialized access grant is read from when the
// configuration names none.
const AccessEnv = storjaccess.Env

func init() { factory.Register(DriverName, storjFactory{}) }

type storjFactory struct{}

func (storjFactory) Create(ctx context.Context, params map[string]any) (driver.StorageDriver, error) {
	return FromParameters(ctx, params)
}

// Parameters configure the driver.
type Parameters struct {
	// Access is a serialized access grant; AccessFile a file holding one. With neither, the grant
	// is read from $STORJ_ACCESS.
	Access     string
	AccessFile string
	// Bucket must exist: the driver does not create buckets, so that a typo is an error, not a new
	// bucket nobody reads from.
	Bucket string
	// Prefix is where the layout starts in the bucket ("" for the bucket's root).
	Prefix string
}

// FromParameters reads the registry configuration's parameters: access or accessfile, bucket, prefix.
func FromParameters(ctx context.Context, params map[string]any) (*Driver, error) {
	str := func(k string) string { s, _ := params[k].(string); return s }
	return New(ctx, Parameters{Access: str("access"), AccessFile: str("accessfile"), Bucket: str("bucket"), Prefix: str("prefix")})
}

// ParseAccess reads the access grant the parameters name: given inline, from a file, or from the
// environment, in that order (storjaccess.Load). Errors never quote the grant: it is a secret.
func ParseAccess(p Parameters) (*uplink.Access, error) {
	access, err := storjaccess.Load(p.Access, p.AccessFile)
	if err != nil {
		return nil, fmt.Errorf("storj: %w", err)
	}
	return access, nil
}

// Driver is the storj storage driver.
type Driver struct {
	base.Base
	d *bucketDriver
}

// New opens the project the access grant names and checks that the bucket exists.
func New(ctx context.Context, p Parameters) (*Driver, error) {
	access, err := ParseAccess(p)
	if err != nil {
		return nil, err
	}
	if p.Bucket == "" {
		return nil, errors.New("storj: bucket is required")
	}
	prefix := strings.Trim(p.Prefix, "/")
	if prefix != "" {
		prefix += "/"
	}
	project, err := (uplink.Config{UserAgent: "imagemesh"}).OpenProject(ctx, access)
	if err != nil {
		return nil, fmt.Errorf("storj: open project on %s: %w", access.SatelliteAddress(), err)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := project.StatBucket(sctx, p.Bucket); err != nil {
		_ = project.Close()
		return nil, fmt.Errorf("storj: bucket %q on %s: %w", p.Bucket, access.SatelliteAddress(), describe(err))
	}
	d := &bucketDriver{project: project, bucket: p.Bucket, prefix: prefix, uploads: map[string]*pendingUpload{}}
	return &Driver{Base: base.Base{StorageDriver: d}, d: d}, nil
}

// Close closes the project's connections.
func (d *Driver) Close() error { return d.d.project.Close() }

// Project is the driver's open project, for callers that write next to the layout (the exporter).
func (d *Driver) Project() *uplink.Project { return d.d.project }

// Bucket is the driver's bucket.
func (d *Driver) Bucket() string { return d.d.bucket }

// Key is the object key of a registry path.
func (d *Driver) Key(p string) string { return d.d.key(p) }

// describe turns uplink's errors about the grant into ones that say what to fix.
func describe(err error) error {
	switch {
	case errors.Is(err, uplink.ErrBucketNotFound):
		return fmt.Errorf("the bucket does not exist (create it, e.g. `uplink mb sj://<bucket>`): %w", err)
	case errors.Is(err, uplink.ErrPermissionDenied):
		return fmt.Errorf("the access grant is not allowed to do this (revoked, expired, or restricted to other buckets or operations): %w", err)
	}
	return err
}

// bucketDriver implements the driver; base.Base validates paths and names the driver in errors.
type bucketDriver struct {
	project *uplink.Project
	bucket  string
	prefix  string // "" or ending in "/"

	// uploads remembers the multipart upload behind each path being written, so that a resumed
	// writer need not list the bucket's pending uploads. After a restart they are listed.
	mu      sync.Mutex
	uploads map[string]*pendingUpload
}

type pendingUpload struct {
	id       string
	nextPart uint32
	size     int64
}

func (d *bucketDriver) Name() string { return DriverName }

// key is the object key of a registry path ("/a/b" → "<prefix>a/b").
func (d *bucketDriver) key(p string) string { return d.prefix + strings.TrimPrefix(p, "/") }

// dirPrefix is the listing prefix of a directory ("/" → "<prefix>", "/a" → "<prefix>a/").
func (d *bucketDriver) dirPrefix(p string) string {
	if p == "/" {
		return d.prefix
	}
	return d.key(p) + "/"
}

// pathOf is the registry path of an object key.
func (d *bucketDriver) pathOf(key string) string {
	return "/" + strings.TrimSuffix(strings.TrimPrefix(key, d.prefix), "/")
}

// wrap maps uplink's errors onto the driver's: a missing object is PathNotFoundError, the rest keep
// uplink's message with what was being done.
func (d *bucketDriver) wrap(op, p string, err error) error {
	if errors.Is(err, uplink.ErrObjectNotFound) {
		return driver.PathNotFoundError{Path: p, DriverName: DriverName}
	}
	return fmt.Errorf("storj: %s %s in bucket %q: %w", op, p, d.bucket, describe(err))
}

func (d *bucketDriver) GetContent(ctx context.Context, p string) ([]byte, error) {
	rc, err := d.Reader(ctx, p, 0)
	if err != nil {
		return nil, err
	}
	defer func() { _ = rc.Close() }() // read whole below; a failed read is the error
	b, err := io.ReadAll(rc)
	if err != nil {
		return nil, d.wrap("read", p, err)
	}
	return b, nil
}

func (d *bucketDriver) PutContent(ctx context.Context, p string, content []byte) error {
	up, err := d.project.UploadObject(ctx, d.bucket, d.key(p), nil)
	if err != nil {
		return d.wrap("upload", p, err)
	}
	if _, err := up.Write(content); err != nil {
		_ = up.Abort()
		return d.wrap("upload", p, err)
	}
	if err := up.Commit(); err != nil {
		return d.wrap("commit", p, err)
	}
	return nil
}

func (d *bucketDriver) Reader(ctx context.Context, p string, offset int64) (io.ReadCloser, error) {
	if offset < 0 {
		return nil, driver.InvalidOffsetError{Path: p, Offset: offset, DriverName: DriverName}
	}
	dl, err := d.project.DownloadObject(ctx, d.bucket, d.key(p), &uplink.DownloadOptions{Offset: offset, Length: -1})
	if err == nil {
		return dl, nil
	}
	if errors.Is(err, uplink.ErrObjectNotFound) {
		return nil, d.wrap("download", p, err)
	}
	// A range that starts at or past the end is refused; a reader at the end reads nothing.
	if obj, serr := d.project.StatObject(ctx, d.bucket, d.key(p)); serr == nil && offset >= obj.System.ContentLength {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	return nil, d.wrap("download", p, err)
}

// Writer starts a multipart upload, or with append resumes the one behind p. Appending to a committed
// object is supported for the empty object only, as the driver contract asks.
func (d *bucketDriver) Writer(ctx context.Context, p string, appendTo bool) (driver.FileWriter, error) {
	key := d.key(p)
	if !appendTo {
		// Earlier sessions of this path are abandoned: abort them, so that nothing of them lingers.
		if err := d.abortUploads(ctx, p, key); err != nil {
			return nil, err
		}
		return d.begin(ctx, p, key)
	}
	d.mu.Lock()
	u := d.uploads[p]
	d.mu.Unlock()
	if u != nil {
		return &writer{ctx: ctx, d: d, path: p, key: key, upload: u, size: u.size}, nil
	}
	u, err := d.findUpload(ctx, p, key)
	if err != nil {
		return nil, err
	}
	if u != nil {
		d.remember(p, u)
		return &writer{ctx: ctx, d: d, path: p, key: key, upload: u, size: u.size}, nil
	}
	obj, err := d.project.StatObject(ctx, d.bucket, key)
	switch {
	case errors.Is(err, uplink.ErrObjectNotFound):
		return d.begin(ctx, p, key)
	case err != nil:
		return nil, d.wrap("stat", p, err)
	case obj.System.ContentLength == 0:
		return d.begin(ctx, p, key)
	}
	return nil, fmt.Errorf("storj: append to %s: it is committed and %d bytes long; only uncommitted or empty files can be appended to", p, obj.System.ContentLength)
}

func (d *bucketDriver) begin(ctx context.Context, p, key string) (*writer, error) {
	info, err := d.project.BeginUpload(ctx, d.bucket, key, nil)
	if err != nil {
		return nil, d.wrap("begin upload of", p, err)
	}
	u := &pendingUpload{id: info.UploadID, nextPart: 1}
	d.remember(p, u)
	return &writer{ctx: ctx, d: d, path: p, key: key, upload: u}, nil
}

func (d *bucketDriver) remember(p string, u *pendingUpload) {
	d.mu.Lock()
	d.uploads[p] = u
	d.mu.Unlock()
}

func (d *bucketDriver) forget(p string, u *pendingUpload) {
	d.mu.Lock()
	if d.uploads[p] == u {
		delete(d.uploads, p)
	}
	d.mu.Unlock()
}

// findUpload finds the pending upload of key in the bucket, with its size and next part number.
func (d *bucketDriver) findUpload(ctx context.Context, p, key string) (*pendingUpload, error) {
	var found *pendingUpload
	it := d.project.ListUploads(ctx, d.bucket, &uplink.ListUploadsOptions{Prefix: parentPrefix(key)})
	for it.Next() {
		if item := it.Item(); item.Key == key && !item.IsPrefix {
			if found != nil {
				return nil, fmt.Errorf("storj: resume %s: more than one pending upload of it", p)
			}
			found = &pendingUpload{id: item.UploadID, nextPart: 1}
		}
	}
	if err := it.Err(); err != nil {
		return nil, d.wrap("list uploads of", p, err)
	}
	if found == nil {
		return nil, nil
	}
	parts := d.project.ListUploadParts(ctx, d.bucket, key, found.id, nil)
	for parts.Next() {
		part := parts.Item()
		found.size += part.Size
		if part.PartNumber >= found.nextPart {
			found.nextPart = part.PartNumber + 1
		}
	}
	if err := parts.Err(); err != nil {
		return nil, d.wrap("list parts of", p, err)
	}
	return found, nil
}

// abortUploads aborts the pending uploads of key (exact) or, with key ending in "/", of everything
// under it.
func (d *bucketDriver) abortUploads(ctx context.Context, p, key string) error {
	recursive := strings.HasSuffix(key, "/")
	opts := &uplink.ListUploadsOptions{Prefix: parentPrefix(key)}
	if recursive {
		opts = &uplink.ListUploadsOptions{Prefix: key, Recursive: true}
	}
	var ids []uplink.UploadInfo
	it := d.project.ListUploads(ctx, d.bucket, opts)
	for it.Next() {
		item := it.Item()
		if !item.IsPrefix && (recursive || item.Key == key) {
			ids = append(ids, *item)
		}
	}
	if err := it.Err(); err != nil {
		if errors.Is(err, uplink.ErrObjectNotFound) {
			return nil
		}
		return d.wrap("list uploads of", p, err)
	}
	for _, u := range ids {
		if err := d.project.AbortUpload(ctx, d.bucket, u.Key, u.UploadID); err != nil && !errors.Is(err, uplink.ErrUploadIDInvalid) {
			return d.wrap("abort upload of", d.pathOf(u.Key), err)
		}
		d.mu.Lock()
		delete(d.uploads, d.pathOf(u.Key))
		d.mu.Unlock()
	}
	return nil
}

// parentPrefix is the listing prefix of the directory holding key.
func parentPrefix(key string) string {
	if i := strings.LastIndex(key, "/"); i >= 0 {
		return key[:i+1]
	}
	return ""
}

func (d *bucketDriver) Stat(ctx context.Context, p string) (driver.FileInfo, error) {
	if p != "/" || d.prefix != "" {
		obj, err := d.project.StatObject(ctx, d.bucket, strings.TrimSuffix(d.key(p), "/"))
		if err == nil {
			return driver.FileInfoInternal{FileInfoFields: driver.FileInfoFields{
				Path: p, Size: obj.System.ContentLength, ModTime: obj.System.Created,
			}}, nil
		}
		if !errors.Is(err, uplink.ErrObjectNotFound) {
			return nil, d.wrap("stat", p, err)
		}
	}
	it := d.project.ListObjects(ctx, d.bucket, &uplink.ListObjectsOptions{Prefix: d.dirPrefix(p)})
	exists := it.Next()
	if err := it.Err(); err != nil {
		return nil, d.wrap("stat", p, err)
	}
	if !exists && p != "/" {
		return nil, driver.PathNotFoundError{Path: p, DriverName: DriverName}
	}
	return driver.FileInfoInternal{FileInfoFields: driver.FileInfoFields{Path: p, IsDir: true}}, nil
}

func (d *bucketDriver) List(ctx context.Context, p string) ([]string, error) {
	var out []string
	it := d.project.ListObjects(ctx, d.bucket, &uplink.ListObjectsOptions{Prefix: d.dirPrefix(p)})
	for it.Next() {
		out = append(out, d.pathOf(it.Item().Key))
	}
	if err := it.Err(); err != nil {
		return nil, d.wrap("list", p, err)
	}
	if len(out) == 0 && p != "/" {
		return nil, driver.PathNotFoundError{Path: p, DriverName: DriverName}
	}
	sort.Strings(out)
	return out, nil
}

// Move is Storj's server-side move: no bytes travel, only the object's metadata is re-keyed (and its
// keys re-encrypted for the new path). An object already at dst is replaced.
func (d *bucketDriver) Move(ctx context.Context, src, dst string) error {
	return d.wrapMove(src, dst, d.project.MoveObject(ctx, d.bucket, d.key(src), d.bucket, d.key(dst), nil))
}

func (d *bucketDriver) wrapMove(src, dst string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, uplink.ErrObjectNotFound) {
		return driver.PathNotFoundError{Path: src, DriverName: DriverName}
	}
	return fmt.Errorf("storj: move %s to %s in bucket %q: %w", src, dst, d.bucket, describe(err))
}

// Delete removes the object at p, or every object under p, and aborts uploads pending there.
func (d *bucketDriver) Delete(ctx context.Context, p string) error {
	var keys []string
	if p != "/" || d.prefix != "" {
		if _, err := d.project.StatObject(ctx, d.bucket, d.key(p)); err == nil {
			keys = append(keys, d.key(p))
		} else if !errors.Is(err, uplink.ErrObjectNotFound) {
			return d.wrap("delete", p, err)
		}
	}
	it := d.project.ListObjects(ctx, d.bucket, &uplink.ListObjectsOptions{Prefix: d.dirPrefix(p), Recursive: true})
	for it.Next() {
		keys = append(keys, it.Item().Key)
	}
	if err := it.Err(); err != nil {
		return d.wrap("list for delete", p, err)
	}
	if err := d.abortUploads(ctx, p, d.dirPrefix(p)); err != nil {
		return err
	}
	if len(keys) == 0 {
		return driver.PathNotFoundError{Path: p, DriverName: DriverName}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, k := range keys {
		g.Go(func() error {
			if _, err := d.project.DeleteObject(gctx, d.bucket, k); err != nil && !errors.Is(err, uplink.ErrObjectNotFound) {
				return d.wrap("delete", d.pathOf(k), err)
			}
			return nil
		})
	}
	return g.Wait()
}

// RedirectURL: clients read through the registry; linkshare URLs would need a public grant.
func (d *bucketDriver) RedirectURL(*http.Request, string) (string, error) { return "", nil }

// Walk lists everything under p in one recursive listing (Storj lists in the order of encrypted keys,
// so the listing is sorted here), and visits it in lexical order, directories before their contents.
func (d *bucketDriver) Walk(ctx context.Context, p string, f driver.WalkFn, options ...func(*driver.WalkOptions)) error {
	opts := driver.WalkOptions{}
	for _, o := range options {
		o(&opts)
	}
	files := map[string]driver.FileInfo{}
	it := d.project.ListObjects(ctx, d.bucket, &uplink.ListObjectsOptions{Prefix: d.dirPrefix(p), Recursive: true, System: true})
	for it.Next() {
		obj := it.Item()
		fp := d.pathOf(obj.Key)
		files[fp] = driver.FileInfoInternal{FileInfoFields: driver.FileInfoFields{Path: fp, Size: obj.System.ContentLength, ModTime: obj.System.Created}}
		for dir := path.Dir(fp); dir != p && dir != "/" && len(dir) > len(p); dir = path.Dir(dir) {
			if _, ok := files[dir]; ok {
				break
			}
			files[dir] = driver.FileInfoInternal{FileInfoFields: driver.FileInfoFields{Path: dir, IsDir: true}}
		}
	}
	if err := it.Err(); err != nil {
		return d.wrap("walk", p, err)
	}
	if len(files) == 0 && p != "/" {
		return driver.PathNotFoundError{Path: p, DriverName: DriverName}
	}
	names := make([]string, 0, len(files))
	for n := range files {
		if opts.StartAfterHint == "" || n > opts.StartAfterHint {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var skip string
	for _, n := range names {
		if skip != "" && strings.HasPrefix(n, skip) {
			continue
		}
		skip = ""
		fi := files[n]
		err := f(fi)
		switch {
		case err == nil:
		case errors.Is(err, driver.ErrSkipDir):
			if fi.IsDir() {
				skip = n + "/"
			}
		case errors.Is(err, driver.ErrFilledBuffer):
			return nil
		default:
			return err
		}
	}
	return nil
}

// writer is one session of a multipart upload: what it writes becomes one part.
type writer struct {
	ctx    context.Context // the Writer call's: parts are uploaded within it
	d      *bucketDriver
	path   string
	key    string
	upload *pendingUpload

	part      *uplink.PartUpload
	size      int64
	closed    bool
	committed bool
	cancelled bool
}

func (w *writer) Write(p []byte) (int, error) {
	switch {
	case w.closed:
		return 0, fmt.Errorf("storj: write %s: writer closed", w.path)
	case w.committed:
		return 0, fmt.Errorf("storj: write %s: already committed", w.path)
	case w.cancelled:
		return 0, fmt.Errorf("storj: write %s: cancelled", w.path)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if w.part == nil {
		part, err := w.d.project.UploadPart(w.ctx, w.d.bucket, w.key, w.upload.id, w.upload.nextPart)
		if err != nil {
			return 0, w.d.wrap("upload part of", w.path, err)
		}
		w.part = part
	}
	n, err := w.part.Write(p)
	w.size += int64(n)
	if err != nil {
		return n, w.d.wrap("upload", w.path, err)
	}
	return n, nil
}

func (w *writer) Size() int64 { return w.size }

// finishPart commits the session's part, so that a later session (or Commit) builds on it.
func (w *writer) finishPart() error {
	if w.part == nil {
		return nil
	}
	part := w.part
	w.part = nil
	if err := part.Commit(); err != nil {
		return w.d.wrap("commit part of", w.path, err)
	}
	w.d.mu.Lock()
	w.upload.nextPart++
	w.upload.size = w.size
	w.d.mu.Unlock()
	return nil
}

func (w *writer) Close() error {
	if w.closed {
		return fmt.Errorf("storj: close %s: already closed", w.path)
	}
	w.closed = true
	if w.committed || w.cancelled {
		return nil
	}
	return w.finishPart()
}

func (w *writer) Cancel(ctx context.Context) error {
	if w.closed {
		return fmt.Errorf("storj: cancel %s: already closed", w.path)
	}
	if w.committed {
		return fmt.Errorf("storj: cancel %s: already committed", w.path)
	}
	w.cancelled = true
	if w.part != nil {
		_ = w.part.Abort()
		w.part = nil
	}
	w.d.forget(w.path, w.upload)
	if err := w.d.project.AbortUpload(ctx, w.d.bucket, w.key, w.upload.id); err != nil && !errors.Is(err, uplink.ErrUploadIDInvalid) {
		return w.d.wrap("abort upload of", w.path, err)
	}
	return nil
}

func (w *writer) Commit(ctx context.Context) error {
	switch {
	case w.closed:
		return fmt.Errorf("storj: commit %s: already closed", w.path)
	case w.committed:
		return fmt.Errorf("storj: commit %s: already committed", w.path)
	case w.cancelled:
		return fmt.Errorf("storj: commit %s: cancelled", w.path)
	}
	if err := w.finishPart(); err != nil {
		return err
	}
	if _, err := w.d.project.CommitUpload(ctx, w.d.bucket, w.key, w.upload.id, nil); err != nil {
		return w.d.wrap("commit", w.path, err)
	}
	w.committed = true
	w.d.forget(w.path, w.upload)
	return nil
}
