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

# name | package | extra build flags
declare -A pkg=(
  [registry]=github.com/distribution/distribution/v3/cmd/registry
  [crane]=github.com/google/go-containerregistry/cmd/crane
)

build() {
  local name=$1 mod="$here/$1"
  [ -n "${pkg[$name]:-}" ] || { echo "build.sh: unknown tool $name" >&2; exit 2; }
  # The version key is the hash of the scratch module's go.sum: a bump rebuilds, nothing else does.
  local key; key=$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-12)
  local out="$cache/$name-$key/$name"
  if [ ! -x "$out" ]; then
    echo "build.sh: building $name (${pkg[$name]}) into $out" >&2
    mkdir -p "$(dirname "$out")"
    (cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o "$out.tmp" "${pkg[$name]}") && mv "$out.tmp" "$out"
  fi
  ln -sfn "$out" "$bin/$name"
}

for t in "$@"; do build "$t"; done
echo "$bin"
