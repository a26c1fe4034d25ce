#!/usr/bin/env bash
# Builds the real components the tests use, once, into a cache outside the clone, and prints the
# directory that holds the binaries. Each tool has a scratch module under hack/tools/<name> whose go.mod
# pins the exact version (the module proxy refuses version lists for some modules, so never @latest).
#
#   hack/tools/build.sh registry crane      # build (or reuse) and print the bin dir
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${IMAGEMESH_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imagemesh/tools}
bin="$cache/bin"
mkdir -p "$bin"

# name -> packages; a tool with several packages builds each into the same directory.
declare -A pkg=(
  [registry]=github.com/distribution/distribution/v3/cmd/registry
  [crane]=github.com/google/go-containerregistry/cmd/crane
  [containerd2]="github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
  # The control plane (envtest uses kube-apiserver alone) and a node's programs, for hack/cluster.sh.
  [kubernetes]="k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kubectl"
  [controller-gen]=sigs.k8s.io/controller-tools/cmd/controller-gen
  [helm]=helm.sh/helm/v3/cmd/helm
  [kubo]=github.com/ipfs/kubo/cmd/ipfs
  # A test binary, not a command: testplanet runs a satellite and storage nodes only inside a test.
  [storj-planet]=test:storj-planet
  # Storj's linksharing, which serves a bucket over HTTP: module storj.io/edge (once storj.io/gateway-mt)
  # v1.114.0, the one version of it the module proxy serves. The storj.io/minio that version requires
  # is refused, so go.mod replaces it with the one edge v1.110.0 to v1.113.0 built with, and
  # github.com/amwolff/awsig with the one that minio requires. The checksum database knows neither
  # module: their go.sum lines came from the proxy (GONOSUMDB=storj.io/minio,github.com/amwolff/awsig
  # for `go get` and `go mod tidy`); a build reads go.sum alone.
  [linksharing]=storj.io/edge/cmd/linksharing
  # The OCI distribution-spec conformance suite (a command named conformance).
  [oci-conformance]=github.com/opencontainers/distribution-spec/conformance
  # make check's linter, and the generator of the chart's README from values.yaml.
  [golangci-lint]=github.com/golangci/golangci-lint/v2/cmd/golangci-lint
  [helm-docs]=github.com/norwoodj/helm-docs/cmd/helm-docs
)
# Extra go build flags per tool.
declare -A flags=(
  [containerd2]='-tags=no_btrfs,no_devmapper,no_zfs'
)
# Tools that need cgo (testplanet's storage nodes keep their databases in sqlite, mattn/go-sqlite3);
# the rest build static.
declare -A cgo=(
  [storj-planet]=1
)
# Linker flags per tool. Kubernetes built outside its repository reports version v0.0.0 unless told;
# Helm charts and clients that check the server version need the real one, and kubelets register it.
declare -A ldflags=(
  [kubernetes]="-X k8s.io/component-base/version.gitVersion=v1.34.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34"
)
# Names the binaries get in the bin dir, so that containerd 2.x does not shadow Debian's 1.6.
declare -A alias=(
  [containerd2/containerd]=containerd2
  [containerd2/ctr]=ctr2
  [containerd2/containerd-shim-runc-v2]=containerd2-shim-runc-v2
)

build() {
  local name=$1 mod="$here/$1"
  [ -n "${pkg[$name]:-}" ] || { echo "build.sh: unknown tool $name" >&2; exit 2; }
  # The version key is the hash of the scratch module's go.mod, go.sum and Go files, and of what is
  # built from it and how (packages, flags): a change of either rebuilds, nothing else does.
  local key; key=$( (cat "$mod/go.mod" "$mod/go.sum" "$mod"/*.go 2>/dev/null; echo "${pkg[$name]}|${flags[$name]:-}|${ldflags[$name]:-}|${cgo[$name]:-}") | sha256sum | cut -c1-12)
  local dir="$cache/$name-$key"
  if [ ! -f "$dir/.complete" ]; then
    # One build of a tool at a time, whoever asks (make test, and a hack/ script started beside it):
    # the others wait for it, then find it built.
    local lock
    exec {lock}>"$dir.lock"
    flock "$lock"
    if [ ! -f "$dir/.complete" ]; then
      echo "build.sh: building $name into $dir" >&2
      rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
      if [[ ${pkg[$name]} == test:* ]]; then
        # Not -trimpath: testplanet finds its satellite's web and mail templates next to its source, in
        # the module cache, through the paths compiled in.
        # shellcheck disable=SC2086
        (cd "$mod" && CGO_ENABLED=${cgo[$name]:-0} GOFLAGS=-mod=mod go test -c ${flags[$name]:-} -o "$dir.tmp/${pkg[$name]#test:}" .)
      else
        # shellcheck disable=SC2086
        (cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath ${flags[$name]:-} -ldflags "${ldflags[$name]:-}" -o "$dir.tmp/" ${pkg[$name]})
      fi
      touch "$dir.tmp/.complete"
      rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    exec {lock}>&-
  fi
  # testplanet reads its satellite's templates from its module's source at run time: make sure the
  # module cache still holds it (a no-op when it does).
  if [ "$name" = storj-planet ]; then
    (cd "$mod" && GOFLAGS=-mod=mod go mod download storj.io/storj)
  fi
  local p b
  for p in ${pkg[$name]}; do
    b=$(basename "${p#test:}")
    ln -sfn "$dir/$b" "$bin/${alias[$name/$b]:-$b}"
  done
}

for t in "$@"; do build "$t"; done
echo "$bin"
