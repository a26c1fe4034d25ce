#!/usr/bin/env bash
# Installs what the tests need and prints the directory of the built tools:
#   - Debian packages: containerd (1.6), runc, skopeo, docker.io (dockerd 20.10 and the docker CLI),
#     iproute2 (ip, tc), curl, gcc, postgresql, etcd, CNI plugins, iptables, conntrack,
#     ca-certificates (the bundle `make images` puts into the images), chromium (the status page)
#   - built from Go modules into ~/.cache/imagemesh/tools (reused when present): the distribution
#     registry, crane, containerd 2.x (and its runc shim), Kubernetes (kube-apiserver, kubelet and the
#     rest of a cluster), helm, controller-gen, kubo, a testplanet
#     test binary (a real Storj satellite and storage nodes; needs gcc for sqlite), Storj's linksharing,
#     and the OCI distribution-spec conformance suite
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
command -v skopeo >/dev/null || missing+=(skopeo)
# Docker Engine, for the tests of the agent as Docker's registry mirror. The tests run dockerd on their
# own dirs and socket; where an init system lets the package start its own docker service, it does.
command -v dockerd >/dev/null || missing+=(docker.io)
# Headless Chromium loads the agent's status page.
command -v chromium >/dev/null || missing+=(chromium)
command -v ip >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
command -v initdb >/dev/null || [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql)
[ -x /usr/bin/etcd ] || missing+=(etcd-server)
# The multi-node cluster (hack/cluster.sh): CNI plugins, iptables and conntrack for kube-proxy and
# portmap, nsenter and unshare for the nodes' namespaces.
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v iptables >/dev/null || missing+=(iptables)
command -v conntrack >/dev/null || missing+=(conntrack)
command -v nsenter >/dev/null || missing+=(util-linux)
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "test-deps: missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "test-deps: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

tools=(registry crane containerd2 kubernetes helm controller-gen kubo storj-planet linksharing oci-conformance golangci-lint helm-docs)
bin=$(hack/tools/build.sh "${tools[@]}" | tail -n 1)
# envtest finds kube-apiserver and etcd in one directory (KUBEBUILDER_ASSETS): Debian's etcd joins
# the built tools there.
ln -sfn /usr/bin/etcd "$bin/etcd"
# testplanet's satellite keeps its database in PostgreSQL: the tests start their own server from
# Debian's binaries, which are not on PATH.
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
ln -sfn "$pgbin/initdb" "$bin/initdb"
ln -sfn "$pgbin/postgres" "$bin/postgres"
echo "$bin"
