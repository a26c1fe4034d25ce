#!/usr/bin/env bash
# A real multi-node Kubernetes v1.34 cluster on this one machine, for the tests and benchmarks that
# need kubelets: the way kind gives each node a container, this gives each node a network namespace
# and a mount namespace of its own.
#
#   hack/cluster.sh up          bring the cluster up (removing any earlier one first); prints the env file
#   hack/cluster.sh down        remove every process, namespace, cgroup and file it made, also after a failure
#   hack/cluster.sh exec CMD…   run CMD where the cluster is reachable (the control plane's namespace), with
#                               KUBECONFIG set and the tools on PATH: hack/cluster.sh exec kubectl get nodes
#   hack/cluster.sh status      the nodes, or why there are none
#
# Layout (every address lives in a namespace this script made; nothing touches the machine's network):
#
#   $NAME-sw   a bridge that joins the others, like a switch
#   $NAME-cp   10.79.0.254: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and the
#              registry that holds the cluster's own images (imagemesh's, the pause image)
#   $NAME-up   10.79.0.253: an empty host "outside the cluster", where tests start upstream registries
#              and shape the link with tc
#   $NAME-nI   10.79.0.I (I = 1..NODES): a node. Its own mount namespace binds a private directory over
#              /etc/containerd, /etc/cni/net.d, /etc/kubernetes, /var/lib/{kubelet,containerd,cni,
#              imagemesh,imagemesh-ipfs}, /var/log/{pods,containers}, /run/{containerd,netns}; in it run
#              containerd 2.x (CRI, overlayfs, Debian's runc), a kubelet and kube-proxy (iptables). Pods
#              get 10.244.I.0/24 from the CNI bridge plugin (host-local IPAM, portmap for hostPorts);
#              every namespace routes each node's pod range to that node.
#
# Nothing can be pulled from outside here, so the cluster serves what it needs itself: containerd on
# every node has an operator's hosts.toml (no imagemesh marker) that sends registry.k8s.io and
# ghcr.io to the cluster registry, which holds registry.k8s.io/pause:3.10 (hack/pause, built here) and
# whatever `make images REGISTRY=10.79.0.254:5000/imagemesh` pushes there. The chart then runs with
# its default image names.
#
# Settings (environment): NODES (3), NAME (imc), CLUSTER_DIR (/tmp/imagemesh-cluster), IMAGEMESH_TOOLS
# (default: built by hack/test-deps.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

NODES=${NODES:-3}
NAME=${NAME:-imc}
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/imagemesh-cluster}
K8S_VERSION=v1.34.4
NET=10.79.0
CP_IP=$NET.254
UP_IP=$NET.253
POD_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
REGISTRY=$CP_IP:5000
PAUSE_IMAGE=registry.k8s.io/pause:3.10
# Directories each node sees as its own (bind mounts in its mount namespace).
NODE_DIRS=(etc/containerd etc/cni/net.d etc/kubernetes var/lib/kubelet var/lib/containerd var/lib/cni
  var/lib/imagemesh var/lib/imagemesh-ipfs var/log/pods var/log/containers run/containerd run/netns)

log() { echo "[cluster $(date +%T)] $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }
inns() { local ns=$1; shift; ip netns exec "$NAME-$ns" "$@"; }

tools() {
  [ -n "${IMAGEMESH_TOOLS:-}" ] || IMAGEMESH_TOOLS=$("$root/hack/test-deps.sh" | tail -n 1)
  T=$IMAGEMESH_TOOLS
  local c
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubeadm kubectl etcd \
    containerd2 containerd2-shim-runc-v2 registry crane; do
    [ -x "$T/$c" ] || die "missing $T/$c (hack/test-deps.sh builds it)"
  done
  for c in ip tc iptables runc nsenter unshare curl; do
    command -v "$c" >/dev/null || die "missing $c (hack/test-deps.sh installs it)"
  done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/portmap ] || die "missing CNI plugins in /usr/lib/cni (Debian's containernetworking-plugins)"
}

# --- down ------------------------------------------------------------------------------------------
# Everything is found from the names alone, so that down works after any failure, and after a lost
# CLUSTER_DIR.
down() {
  set +e
  local ns cg p i
  # Pods' processes live in pod namespaces, not the node's: find every process through the node's
  # cgroups (the node's own daemons are in $NAME-nI/system, pods under $NAME-nI/kubepods).
  for _ in 1 2 3; do
    for cg in /sys/fs/cgroup/pids/$NAME-n*; do
      [ -d "$cg" ] || continue
      find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null
    done
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$NAME-(sw|cp|up|n[0-9]+)$"); do
      ip netns pids "$ns" | xargs -r kill -9 2>/dev/null
    done
    sleep 0.3
  done
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$NAME-(sw|cp|up|n[0-9]+)$"); do
    ip netns del "$ns"
  done
  # Cgroups, deepest first, in every hierarchy.
  for cg in /sys/fs/cgroup/*/$NAME-n*; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  # Mount points made on the machine for the nodes' bind mounts (empty directories), then the files.
  if [ -f "$CLUSTER_DIR/made-dirs" ]; then
    tac "$CLUSTER_DIR/made-dirs" | while read -r p; do rmdir "$p" 2>/dev/null; done
  fi
  if [ -d "$CLUSTER_DIR" ]; then
    # A node's mounts die with its mount namespace; a leftover one would be refused by rm -rf
    # --one-file-system rather than followed into the machine's own directories.
    rm -rf --one-file-system "$CLUSTER_DIR"
  fi
  local left
  left=$(ip netns list | grep -E "^$NAME-(sw|cp|up|n[0-9]+)( |$)"; ls -d /sys/fs/cgroup/*/$NAME-n* 2>/dev/null)
  [ -z "$left" ] || { echo "cluster down: left behind: $left" >&2; return 1; }
  return 0
}

# --- network ---------------------------------------------------------------------------------------
network() {
  ip netns add "$NAME-sw"
  inns sw ip link set lo up
  inns sw ip link add br0 type bridge
  inns sw ip link set br0 up
  local ns addr i j
  attach() { # attach NS ADDR
    ns=$1 addr=$2
    ip netns add "$NAME-$ns"
    ip link add "$NAME-$ns" type veth peer name eth0 netns "$NAME-$ns"
    ip link set "$NAME-$ns" netns "$NAME-sw"
    inns sw ip link set "$NAME-$ns" master br0 up
    inns "$ns" ip addr add "$addr/24" dev eth0
    inns "$ns" ip link set eth0 up
    inns "$ns" ip link set lo up
    # A default route: servers pick the address they advertise from it (kube-apiserver, kubelet).
    inns "$ns" ip route add default dev eth0
  }
  attach cp "$CP_IP"
  attach up "$UP_IP"
  for i in $(seq 1 "$NODES"); do attach "n$i" "$NET.$i"; done
  for ns in cp up $(seq -f 'n%g' 1 "$NODES"); do
    inns "$ns" sysctl -qw net.ipv4.ip_forward=1
    for j in $(seq 1 "$NODES"); do
      [ "$ns" = "n$j" ] || inns "$ns" ip route add "10.244.$j.0/24" via "$NET.$j"
    done
  done
}

# --- certificates and kubeconfigs, made by kubeadm's phases ----------------------------------------
pki() {
  local k=$CLUSTER_DIR/kubeadm.yaml
  cat >"$k" <<EOF
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint: {advertiseAddress: $CP_IP, bindPort: 6443}
nodeRegistration: {name: $NAME-cp}
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
kubernetesVersion: $K8S_VERSION
clusterName: imagemesh-test
controlPlaneEndpoint: $CP_IP:6443
certificatesDir: $CLUSTER_DIR/pki
networking: {serviceSubnet: $SERVICE_CIDR, podSubnet: $POD_CIDR, dnsDomain: cluster.local}
apiServer: {certSANs: [$CP_IP]}
EOF
  local p
  for p in ca apiserver apiserver-kubelet-client front-proxy-ca front-proxy-client sa; do
    "$T/kubeadm" init phase certs "$p" --config "$k" >>"$CLUSTER_DIR/kubeadm.log" 2>&1
  done
  user() { # user FILE NAME [ORG]
    "$T/kubeadm" kubeconfig user --config "$k" --client-name "$2" ${3:+--org "$3"} >"$1" 2>>"$CLUSTER_DIR/kubeadm.log"
  }
  user "$CLUSTER_DIR/admin.conf" imagemesh-admin system:masters
  user "$CLUSTER_DIR/controller-manager.conf" system:kube-controller-manager
  user "$CLUSTER_DIR/scheduler.conf" system:kube-scheduler
  user "$CLUSTER_DIR/kube-proxy.conf" system:kube-proxy
  for i in $(seq 1 "$NODES"); do user "$CLUSTER_DIR/node$i.conf" "system:node:node$i" system:nodes; done
}

# --- control plane ---------------------------------------------------------------------------------
# bg NS NAME CMD…: a daemon in namespace NS, its output in $CLUSTER_DIR/NAME.log, detached from this
# shell so that it outlives `up`.
bg() {
  local ns=$1 name=$2; shift 2
  setsid ip netns exec "$NAME-$ns" "$@" >"$CLUSTER_DIR/$name.log" 2>&1 </dev/null &
}
wait_for() { # wait_for WHAT SECONDS CMD…
  local what=$1 s=$2; shift 2
  local end=$((SECONDS + s))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "no $what after ${s}s (logs in $CLUSTER_DIR)"
    sleep 0.2
  done
}
kctl() { inns cp "$T/kubectl" --kubeconfig "$CLUSTER_DIR/admin.conf" "$@"; }

control_plane() {
  local P=$CLUSTER_DIR/pki
  bg cp etcd /usr/bin/etcd --data-dir "$CLUSTER_DIR/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 --log-level warn
  bg cp kube-apiserver "$T/kube-apiserver" --advertise-address="$CP_IP" --secure-port=6443 \
    --etcd-servers=http://127.0.0.1:2379 --service-cluster-ip-range="$SERVICE_CIDR" \
    --client-ca-file="$P/ca.crt" --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --proxy-client-cert-file="$P/front-proxy-client.crt" --proxy-client-key-file="$P/front-proxy-client.key" \
    --requestheader-client-ca-file="$P/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-extra-headers-prefix=X-Remote-Extra- --requestheader-group-headers=X-Remote-Group \
    --requestheader-username-headers=X-Remote-User \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=true
  wait_for kube-apiserver 120 kctl get --raw /readyz
  bg cp kube-controller-manager "$T/kube-controller-manager" --kubeconfig="$CLUSTER_DIR/controller-manager.conf" \
    --authentication-kubeconfig="$CLUSTER_DIR/controller-manager.conf" --authorization-kubeconfig="$CLUSTER_DIR/controller-manager.conf" \
    --bind-address=127.0.0.1 --cluster-name=imagemesh-test --cluster-signing-cert-file="$P/ca.crt" \
    --cluster-signing-key-file="$P/ca.key" --root-ca-file="$P/ca.crt" --service-account-private-key-file="$P/sa.key" \
    --use-service-account-credentials=true --controllers='*,bootstrapsigner,tokencleaner' --leader-elect=false \
    --allocate-node-cidrs=false --service-cluster-ip-range="$SERVICE_CIDR"
  bg cp kube-scheduler "$T/kube-scheduler" --kubeconfig="$CLUSTER_DIR/scheduler.conf" \
    --authentication-kubeconfig="$CLUSTER_DIR/scheduler.conf" --authorization-kubeconfig="$CLUSTER_DIR/scheduler.conf" \
    --bind-address=127.0.0.1 --leader-elect=false
  # The roles kubeadm would bind: kube-proxy's, and the API server's towards kubelets (logs, exec).
  kctl create clusterrolebinding imagemesh-test:kube-proxy --clusterrole=system:node-proxier --user=system:kube-proxy >/dev/null
  kctl create clusterrolebinding imagemesh-test:kubelet-api-admin --clusterrole=system:kubelet-api-admin \
    --user=kube-apiserver-kubelet-client >/dev/null
}

# --- the cluster's own registry: the pause image now, imagemesh's images when a test pushes them ----
cluster_registry() {
  cat >"$CLUSTER_DIR/registry.yml" <<EOF
version: 0.1
log: {level: warn, formatter: text, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $CLUSTER_DIR/registry}, delete: {enabled: true}}
http: {addr: "$REGISTRY"}
EOF
  bg cp registry "$T/registry" serve "$CLUSTER_DIR/registry.yml"
  wait_for "cluster registry" 30 inns cp curl -fsS "http://$REGISTRY/v2/"
  local d=$CLUSTER_DIR/pause
  mkdir -p "$d/rootfs"
  (cd "$root" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$d/rootfs/pause" ./hack/pause)
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$d/rootfs" -cf "$d/pause.tar" pause
  inns cp "$T/crane" append --insecure --oci-empty-base -f "$d/pause.tar" -t "$REGISTRY/pause:3.10" >/dev/null 2>>"$CLUSTER_DIR/crane.log"
  inns cp "$T/crane" mutate --insecure --entrypoint /pause --set-platform linux/amd64 -t "$REGISTRY/pause:3.10" \
    "$REGISTRY/pause:3.10" >/dev/null 2>>"$CLUSTER_DIR/crane.log"
}

# --- nodes -----------------------------------------------------------------------------------------
node_files() { # node_files I: the node's own /etc, as its bind mounts will show it
  local i=$1; local n=$CLUSTER_DIR/node$i
  local r=$n/root
  for d in "${NODE_DIRS[@]}"; do mkdir -p "$r/$d"; done
  cat >"$r/etc/containerd/config.toml" <<EOF
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "/etc/containerd/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  # This machine forbids a negative oom_score_adj; runc fails without this.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = "$(command -v runc)"
      SystemdCgroup = false
EOF
  # The operator's own hosts.toml files (no imagemesh marker: the agent must leave them alone).
  local h
  for h in registry.k8s.io ghcr.io "$REGISTRY"; do
    mkdir -p "$r/etc/containerd/certs.d/$h"
    cat >"$r/etc/containerd/certs.d/$h/hosts.toml" <<EOF
# The test cluster's registry serves $h: nothing outside can be reached.
server = "http://$REGISTRY"

[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
  done
  cat >"$r/etc/cni/net.d/10-imagemesh-test.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "imagemesh-test",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  mkdir -p "$r/etc/kubernetes/pki"
  cp "$CLUSTER_DIR/pki/ca.crt" "$r/etc/kubernetes/pki/ca.crt"
  cp "$CLUSTER_DIR/node$i.conf" "$r/etc/kubernetes/kubelet.conf"
  cp "$CLUSTER_DIR/kube-proxy.conf" "$r/etc/kubernetes/kube-proxy.conf"
  cat >"$r/etc/kubernetes/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NET.$i
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
# This machine mounts cgroup v1; each node has its own cgroup subtree.
cgroupDriver: cgroupfs
cgroupRoot: /$NAME-n$i
failCgroupV1: false
failSwapOn: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: /etc/kubernetes/pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
# The nodes share one disk with the machine: its fill level is not theirs to act on.
evictionHard: {memory.available: 100Mi, nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
  cat >"$r/etc/kubernetes/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: /etc/kubernetes/kube-proxy.conf}
hostnameOverride: node$i
mode: iptables
clusterCIDR: $POD_CIDR
# Global sysctls are not the node's to change.
conntrack: {maxPerCore: 0}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
}

# node I: runs as the first process of node I's mount namespace (see start_node), in its network
# namespace; it binds the node's directories, starts containerd, the kubelet and kube-proxy, and waits.
node() {
  local i=$1; local n=$CLUSTER_DIR/node$i
  local d c
  # Every process of the node, pods included, lives under one cgroup subtree, which down finds.
  for c in /sys/fs/cgroup/*/; do
    c=${c%/}
    [ -w "$c" ] && [ -f "$c/cgroup.procs" ] || continue
    mkdir -p "$c/$NAME-n$i/system"
    if [ -f "$c/cpuset.cpus" ]; then
      cat "$c/cpuset.cpus" >"$c/$NAME-n$i/cpuset.cpus"; cat "$c/cpuset.mems" >"$c/$NAME-n$i/cpuset.mems"
      cat "$c/cpuset.cpus" >"$c/$NAME-n$i/system/cpuset.cpus"; cat "$c/cpuset.mems" >"$c/$NAME-n$i/system/cpuset.mems"
    fi
    echo $$ >"$c/$NAME-n$i/system/cgroup.procs"
  done
  for d in "${NODE_DIRS[@]}"; do mount --bind "$n/root/$d" "/$d"; done
  export PATH=$n/bin:$PATH
  containerd2 --config /etc/containerd/config.toml >"$n/containerd.log" 2>&1 &
  for _ in $(seq 1 200); do [ -S /run/containerd/containerd.sock ] && break; sleep 0.1; done
  kubelet --config /etc/kubernetes/kubelet.yaml --kubeconfig /etc/kubernetes/kubelet.conf \
    --hostname-override "node$i" --node-ip "$NET.$i" >"$n/kubelet.log" 2>&1 &
  kube-proxy --config /etc/kubernetes/kube-proxy.yaml >"$n/kube-proxy.log" 2>&1 &
  wait
}

start_node() {
  local i=$1; local n=$CLUSTER_DIR/node$i
  node_files "$i"
  # containerd 2.x starts the shim it finds on PATH as containerd-shim-runc-v2; Debian's 1.6 shim is
  # refused, so the node's PATH starts with the 2.x one.
  mkdir -p "$n/bin"
  ln -sf "$T/containerd2-shim-runc-v2" "$n/bin/containerd-shim-runc-v2"
  for c in containerd2 kubelet kube-proxy; do ln -sf "$T/$c" "$n/bin/$c"; done
  # The bind mounts need their mount points on the machine: make the missing ones, and remember them.
  for d in "${NODE_DIRS[@]}"; do
    [ -e "/$d" ] || { mkdir -p "/$d" && echo "/$d" >>"$CLUSTER_DIR/made-dirs"; }
  done
  setsid unshare --mount --propagation private -- nsenter --net="/run/netns/$NAME-n$i" -- \
    env CLUSTER_DIR="$CLUSTER_DIR" NAME="$NAME" NODES="$NODES" bash "$here/cluster.sh" _node "$i" \
    >"$n/node.log" 2>&1 </dev/null &
}

up() {
  [ "$(id -u)" -eq 0 ] || die "needs root (namespaces, mounts, cgroups)"
  tools
  down >/dev/null 2>&1 || true
  mkdir -p "$CLUSTER_DIR"
  log "network: $NODES nodes on $NET.0/24, control plane $CP_IP, outside host $UP_IP"
  network
  pki
  control_plane
  log "control plane up"
  cluster_registry
  for i in $(seq 1 "$NODES"); do start_node "$i"; done
  wait_for "$NODES registered nodes" 120 bash -c "[ \$(ip netns exec $NAME-cp $T/kubectl --kubeconfig $CLUSTER_DIR/admin.conf get nodes -o name | wc -l) -eq $NODES ]"
  kctl wait --for=condition=Ready node --all --timeout=180s >/dev/null || die "nodes not Ready (logs in $CLUSTER_DIR/node*)"
  cat >"$CLUSTER_DIR/env" <<EOF
NAME=$NAME
NODES=$NODES
CLUSTER_DIR=$CLUSTER_DIR
KUBECONFIG=$CLUSTER_DIR/admin.conf
CONTROL_PLANE_NETNS=$NAME-cp
UPSTREAM_NETNS=$NAME-up
UPSTREAM_IP=$UP_IP
CLUSTER_REGISTRY=$REGISTRY
NODE_IPS=$(seq -f "$NET.%g" -s, 1 "$NODES")
IMAGEMESH_TOOLS=$T
EOF
  log "$NODES nodes Ready; hack/cluster.sh exec kubectl get nodes"
  echo "$CLUSTER_DIR/env"
}

case ${1:-} in
up) up ;;
down) down ;;
_node) node "$2" ;;
exec)
  shift
  tools
  exec ip netns exec "$NAME-cp" env KUBECONFIG="$CLUSTER_DIR/admin.conf" PATH="$T:$PATH" "$@"
  ;;
status)
  tools
  kctl get nodes -o wide
  ;;
*)
  echo "usage: $0 up|down|exec CMD…|status" >&2
  exit 2
  ;;
esac
