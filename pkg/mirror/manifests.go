package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/registry/api/errcode"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/imagemesh/imagemesh/pkg/content"
	"github.com/imagemesh/imagemesh/pkg/source"
)

const (
	mediaTypeDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// errBadManifest is a manifest a source should not have sent; the client asked nothing wrong.
var errBadManifest = errors.New("invalid manifest from source")

// fetchTimeout bounds work that a request shares with others (a tag lookup, a manifest fetch): it must
// not end when the first requester goes away, nor run forever.
const fetchTimeout = 2 * time.Minute

func (m *Mirror) serveManifest(w *responseWriter, r *http.Request, req *request) {
	ctx := r.Context()
	accept := parseAccept(r.Header)
	var (
		d     digest.Digest
		tag   string
		known ocispec.Descriptor
	)
	if strings.Contains(req.ref, ":") {
		var err error
		if d, err = parseDigest(req.ref); err != nil {
			m.writeError(w, 0, err)
			return
		}
	} else {
		if _, err := reference.WithTag(req.repo, req.ref); err != nil {
			m.writeError(w, 0, errcode.ErrorCodeTagInvalid.WithMessage(fmt.Sprintf("invalid tag %q", req.ref)))
			return
		}
		tag = req.ref
		desc, err := m.resolve(ctx, req.repo, tag)
		if err != nil {
			m.fail(w, err, errcode.ErrorCodeManifestUnknown)
			return
		}
		d, known = desc.Digest, desc
		// HEAD by tag is how containerd resolves: when the client takes the type, the descriptor is the
		// whole answer and the manifest need not be fetched yet.
		if r.Method == http.MethodHead && known.Size > 0 && accept.takes(known.MediaType) && known.MediaType != "" {
			w.source = "upstream"
			if _, err := m.store.Stat(d); err == nil {
				w.source = "local"
			}
			writeManifestHeaders(w, known.MediaType, d, known.Size)
			w.WriteHeader(http.StatusOK)
			return
		}
	}

	body, src, err := m.manifest(ctx, req.repo, d)
	if err != nil {
		m.fail(w, err, errcode.ErrorCodeManifestUnknown)
		return
	}
	w.source = src
	mt := source.ManifestMediaType(body)
	if known.MediaType != "" && mt != known.MediaType && known.MediaType != "application/json" {
		m.log.Debug("manifest type differs from the registry's Content-Type", "repo", req.repo.Name(), "digest", d, "detected", mt, "registry", known.MediaType)
	}

	// Content negotiation, as distribution's registry does it.
	switch {
	case mt == ocispec.MediaTypeImageManifest && !accept.takes(mt):
		m.writeError(w, 0, errcode.ErrorCodeManifestUnknown.WithMessage("OCI manifest found, but accept header does not support OCI manifests"))
		return
	case mt == ocispec.MediaTypeImageIndex && !accept.takes(mt):
		m.writeError(w, 0, errcode.ErrorCodeManifestUnknown.WithMessage("OCI index found, but accept header does not support OCI indexes"))
		return
	case tag != "" && mt == mediaTypeDockerList && !accept.takes(mt):
		child, err := defaultPlatform(body)
		if err != nil {
			m.writeError(w, 0, err)
			return
		}
		if body, src, err = m.manifest(ctx, req.repo, child); err != nil {
			m.fail(w, err, errcode.ErrorCodeManifestUnknown)
			return
		}
		w.source, d, mt = src, child, source.ManifestMediaType(body)
		if mt == mediaTypeDockerManifest && !accept.takes(mt) {
			m.writeError(w, 0, errcode.ErrorCodeManifestInvalid.WithMessage("Schema 2 manifest not supported by client"))
			return
		}
	}

	writeManifestHeaders(w, mt, d, int64(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(body) // a client that went away is no error of ours
	}
}

func writeManifestHeaders(w http.ResponseWriter, mediaType string, d digest.Digest, size int64) {
	h := w.Header()
	h.Set("Content-Type", mediaType)
	h.Set("Content-Length", strconv.FormatInt(size, 10))
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
}

// resolve answers a tag from the cache while it is fresh, else from the trusted sources; when those are
// unavailable, from the cache however old, and says so.
func (m *Mirror) resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error) {
	key := repo.Name() + ":" + tag
	cached, hit := m.tags.get(key)
	if hit && time.Since(cached.Resolved) < m.opts.TagTTL {
		m.metrics.tags.WithLabelValues("cached").Inc()
		return cached.Descriptor, nil
	}
	v, err, _ := m.resolves.Do(key, func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
		defer cancel()
		return m.src().Resolve(ctx, repo, tag)
	})
	switch {
	case err == nil:
		// An answer a peer handed on keeps the time it was first resolved, so that it expires as
		// early here as there.
		desc, resolved := source.Resolved(v.(ocispec.Descriptor), time.Now())
		if desc.Digest.Validate() != nil {
			return ocispec.Descriptor{}, fmt.Errorf("resolve %s: source answered an invalid digest %q", key, desc.Digest)
		}
		if err := m.tags.put(key, desc, resolved); err != nil {
			m.log.Warn("could not persist tag answer", "tag", key, "err", err)
		}
		m.metrics.tags.WithLabelValues("resolved").Inc()
		return desc, nil
	case errors.Is(err, source.ErrNotFound) && !errors.Is(err, source.ErrUnavailable):
		m.tags.delete(key)
		m.metrics.tags.WithLabelValues("not_found").Inc()
		return ocispec.Descriptor{}, err
	case hit && errors.Is(err, source.ErrUnavailable):
		m.log.Warn("tag sources unavailable; serving the cached answer", "tag", key, "digest", cached.Descriptor.Digest,
			"age", time.Since(cached.Resolved).Round(time.Second).String(), "err", err)
		m.metrics.tags.WithLabelValues("stale").Inc()
		return cached.Descriptor, nil
	}
	m.metrics.tags.WithLabelValues("error").Inc()
	return ocispec.Descriptor{}, err
}

// manifest returns a manifest's bytes from the store, or fetches, verifies and stores them.
func (m *Mirror) manifest(ctx context.Context, repo reference.Named, d digest.Digest) ([]byte, string, error) {
	if b, err := m.store.ReadAll(d, source.MaxManifestSize); err == nil {
		m.sizes.learn(b)
		return b, "local", nil
	}
	type result struct {
		body   []byte
		source string
	}
	v, err, _ := m.manifests.Do(d.String(), func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
		defer cancel()
		// A source whose manifest does not verify is told, and the request goes on to the next
		// one: a corrupt copy in a bucket or a root costs a try, not the pull. Telling the source
		// makes it pass the digest over; the tries are bounded all the same.
		var errs []error
		for range manifestTries {
			body, src, err := m.fetchManifest(ctx, repo, d)
			if err == nil {
				return result{body, src}, nil
			}
			errs = append(errs, err)
			if !errors.Is(err, content.ErrDigestMismatch) {
				break
			}
			m.log.Warn("manifest failed verification; asking the next source", "digest", d, "repo", repo.Name(), "err", err)
		}
		return nil, errors.Join(errs...)
	})
	if err != nil {
		return nil, "", err
	}
	res := v.(result)
	m.sizes.learn(res.body)
	return res.body, res.source, nil
}

// manifestTries bounds the sources asked for one manifest whose copies do not verify.
const manifestTries = 3

// fetchManifest reads a manifest from the sources, verifies it and stores it.
func (m *Mirror) fetchManifest(ctx context.Context, repo reference.Named, d digest.Digest) ([]byte, string, error) {
	c, err := m.src().Open(ctx, source.Object{Repo: repo, Kind: source.KindManifest, Digest: d}, 0)
	if err != nil {
		return nil, "", err
	}
	defer func() { _ = c.Close() }() // read whole below; a failed read is the error
	if c.Descriptor.Size > source.MaxManifestSize {
		return nil, "", fmt.Errorf("%w: manifest %s from %s is %d bytes, over the %d byte limit",
			errBadManifest, d, c.Source, c.Descriptor.Size, source.MaxManifestSize)
	}
	body, err := io.ReadAll(io.LimitReader(c, source.MaxManifestSize+1))
	if err != nil {
		return nil, "", fmt.Errorf("%w: read manifest %s from %s: %w", source.ErrUnavailable, d, c.Source, err)
	}
	if len(body) > source.MaxManifestSize {
		return nil, "", fmt.Errorf("%w: manifest %s from %s is over the %d byte limit",
			errBadManifest, d, c.Source, source.MaxManifestSize)
	}
	if err := m.store.Put(d, body); err != nil {
		err = fmt.Errorf("manifest from %s: %w", c.Source, err)
		if errors.Is(err, content.ErrDigestMismatch) && c.Reject != nil {
			c.Reject(err)
		}
		return nil, "", err
	}
	return body, c.Source, nil
}

// defaultPlatform picks linux/amd64 from a manifest list, as distribution does for clients that do not
// take lists.
func defaultPlatform(body []byte) (digest.Digest, error) {
	var idx ocispec.Index
	if err := json.Unmarshal(body, &idx); err != nil {
		return "", errcode.ErrorCodeManifestInvalid.WithMessage(err.Error())
	}
	for _, desc := range idx.Manifests {
		if desc.Platform != nil && desc.Platform.OS == "linux" && desc.Platform.Architecture == "amd64" {
			return desc.Digest, nil
		}
	}
	return "", errcode.ErrorCodeManifestUnknown.WithMessage("manifest list has no linux/amd64 entry and the client does not accept lists")
}

// acceptSet is the set of media types a client named in Accept; q values are ignored, as distribution does.
type acceptSet map[string]bool

func parseAccept(h http.Header) acceptSet {
	set := acceptSet{}
	for _, v := range h.Values("Accept") {
		for part := range strings.SplitSeq(v, ",") {
			if mt, _, err := mime.ParseMediaType(strings.TrimSpace(part)); err == nil {
				set[mt] = true
			}
		}
	}
	return set
}

func (a acceptSet) takes(mediaType string) bool {
	switch mediaType {
	case ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageIndex, mediaTypeDockerList, mediaTypeDockerManifest:
		return a[mediaType]
	}
	// Types distribution does not negotiate (schema1, artifacts) are served as they are.
	return true
}
