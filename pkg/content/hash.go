package content

import (
	"hash"
	"sync"
)

const (
	pipeBuffers    = 4
	pipeBufferSize = 1 << 20
)

// pipeHasher hashes chunks on its own goroutine, in the order they were submitted, so that the
// transfer goes on while the last chunk is hashed. Its buffers are few and fixed: a transfer that
// outruns the hash waits for a free buffer instead of growing memory. They are made when first
// needed: a fetch that waits for a source that never answers holds none.
type pipeHasher struct {
	h    hash.Hash
	work chan []byte
	free chan []byte
	done chan struct{}
	once sync.Once
	made int // buffers made so far; only the fetch's goroutine calls buffer
}

func newPipeHasher(h hash.Hash) *pipeHasher {
	p := &pipeHasher{h: h, work: make(chan []byte, pipeBuffers), free: make(chan []byte, pipeBuffers), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for b := range p.work {
			p.h.Write(b)
			p.free <- b[:cap(b)]
		}
	}()
	return p
}

// buffer returns a free buffer to read the next chunk into.
func (p *pipeHasher) buffer() []byte {
	select {
	case b := <-p.free:
		return b
	default:
	}
	if p.made < pipeBuffers {
		p.made++
		return make([]byte, pipeBufferSize)
	}
	return <-p.free
}

// submit hands a filled buffer to the hash; the buffer comes back to the free list once hashed.
func (p *pipeHasher) submit(b []byte) { p.work <- b }

// release returns a buffer that carried nothing to hash.
func (p *pipeHasher) release(b []byte) { p.free <- b[:cap(b)] }

// finish waits until everything submitted is hashed. It may be called more than once.
func (p *pipeHasher) finish() {
	p.once.Do(func() { close(p.work) })
	<-p.done
}
