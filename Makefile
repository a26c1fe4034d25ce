# imagemesh: `make run` starts a node agent on its defaults; `make test` installs what the tests need
# (Debian packages, tools built from Go modules into ~/.cache/imagemesh/tools) and runs every test.

GO        ?= go
BIN       ?= bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/imagemesh/imagemesh/internal/agent.Version=$(VERSION)
TOOLS_DIR  = $(HOME)/.cache/imagemesh/tools/bin
TESTFLAGS ?=

.PHONY: all build run test test-deps check bench bench-peering generate clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...

run: build
	$(BIN)/node-agent

test-deps:
	hack/test-deps.sh

check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

test: test-deps check
	IMAGEMESH_TOOLS=$(TOOLS_DIR) $(GO) test -race -count=1 -timeout 30m $(TESTFLAGS) ./...

# Deepcopy, the CRD and the controller's RBAC, from the kubebuilder markers.
generate:
	$$(hack/tools/build.sh controller-gen | tail -n 1)/controller-gen object paths=./api/...
	$$(hack/tools/build.sh controller-gen | tail -n 1)/controller-gen crd paths=./api/... output:crd:artifacts:config=config/crd/bases
	cp config/crd/bases/*.yaml charts/imagemesh/crds/
	$$(hack/tools/build.sh controller-gen | tail -n 1)/controller-gen rbac:roleName=imagemesh-controller paths=./internal/controller/... output:rbac:artifacts:config=config/rbac

bench: test-deps
	IMAGEMESH_TOOLS=$(TOOLS_DIR) hack/bench.sh

# 8 nodes in network namespaces pull one 256 MiB image at once; peering off, then on. Needs root.
bench-peering: test-deps
	IMAGEMESH_TOOLS=$(TOOLS_DIR) hack/peering-netns.sh bench

clean:
	rm -rf $(BIN)
