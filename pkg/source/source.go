// Package source defines where the node agent gets content it does not hold: the upstream registry here,
// peers, Storj and IPFS elsewhere. Every implementation answers the same three questions, so the mirror
// can put them in any order and one test suite (sourcetest) can hold each of them to the same contract.
package source

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ErrNotFound means the source is sure it does not have what was asked for; the next source may.
var ErrNotFound = errors.New("not found")

// ErrWrongSize means a source claimed a size for an object other than the one its trusted
// descriptor gives (Object.Size).
var ErrWrongSize = errors.New("size differs from the trusted descriptor")

// Kind says whether a digest names a manifest or a blob: registries serve them under different paths.
type Kind uint8

// The kinds of object.
const (
	KindBlob Kind = iota
	KindManifest
)

func (k Kind) String() string {
	if k == KindManifest {
		return "manifest"
	}
	return "blob"
}

// Object names content by digest within a repository.
type Object struct {
	Repo   reference.Named // fully qualified: registry host and path
	Kind   Kind
	Digest digest.Digest
	// Size, when above zero, is the object's size from a trusted descriptor (a verified manifest
	// that lists it). A Chain passes over a source whose answer claims another size, so that a peer
	// or a bucket that lies about a size costs a try of the next source, not a failed pull or a
	// full disk.
	Size int64
}

func (o Object) String() string { return fmt.Sprintf("%s@%s", o.Repo.Name(), o.Digest) }

// Content is an open object, read from an offset.
type Content struct {
	io.ReadCloser
	// Descriptor describes the whole object: Size is its full size whatever the offset (-1 for a
	// manifest of unknown length), MediaType is set for manifests.
	Descriptor ocispec.Descriptor
	// Source names the source that answered; a Chain fills it in.
	Source string
	// Untrusted marks bytes from a source that may lie (another node): the store holds them back
	// from clients until the whole object has verified.
	Untrusted bool
	// Reject, if set, is told that the bytes failed verification, so that the source can avoid
	// whoever sent them.
	Reject func(error)
}

// A Source can answer for content the node does not hold.
type Source interface {
	// Name labels the source in metrics and logs.
	Name() string
	// Resolve returns the descriptor a tag points at, or ErrNotFound.
	Resolve(ctx context.Context, repo reference.Named, tag string) (ocispec.Descriptor, error)
	// Stat returns an object's descriptor without its content, or ErrNotFound.
	Stat(ctx context.Context, obj Object) (ocispec.Descriptor, error)
	// Open returns the object's bytes from offset on, or ErrNotFound. The bytes are not verified:
	// the content store verifies everything before it keeps or finishes serving it.
	Open(ctx context.Context, obj Object, offset int64) (*Content, error)
}

// A TagLister lists the tags of a repository: `GET /v2/<name>/tags/list`. Sources implement it when
// they can (the registry), apart from Source, which every source implements. A list of tags is as
// trustworthy as whoever sent it, and nothing can check it, so only sources trusted with tags may
// implement it; peers do not (sourcetest holds a source that must not resolve tags to that).
type TagLister interface {
	// ListTags returns every tag of repo, in no particular order, or ErrNotFound if the source knows
	// no such repository.
	ListTags(ctx context.Context, repo reference.Named) ([]string, error)
}

// Error wraps a failure with the source it came from.
type Error struct {
	Source string
	Op     string
	Target string
	Err    error
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s %s from %s: %v", e.Op, e.Target, e.Source, e.Err)
}
func (e *Error) Unwrap() error { return e.Err }

// ManifestMediaType reads a manifest's type from its mediaType field, or, for OCI manifests that leave
// it out, from its shape. Sources that keep manifests as plain blobs (a storage layout) answer with it.
func ManifestMediaType(body []byte) string {
	var probe struct {
		MediaType string            `json:"mediaType"`
		Manifests []json.RawMessage `json:"manifests"`
	}
	if err := json.Unmarshal(body, &probe); err != nil {
		return "application/octet-stream"
	}
	switch {
	case probe.MediaType != "":
		return probe.MediaType
	case probe.Manifests != nil:
		return ocispec.MediaTypeImageIndex
	}
	return ocispec.MediaTypeImageManifest
}
