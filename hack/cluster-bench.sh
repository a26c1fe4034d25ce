#!/usr/bin/env bash
# Cold pulls on a real cluster (hack/cluster.sh), with the chart and without it, side by side in one
# run. The upstream registry sits on the cluster's outside host behind a link shaped to UPSTREAM_RATE;
# each round pushes a new image of one SIZE_MIB layer of random bytes (on the cluster's pause image,
# so that its pods run), so that every round is cold everywhere.
#
#   alone      one pod on node1, straight from the registry (an operator's hosts.toml, no agent)
#   direct     one pod per node (a DaemonSet), straight from the registry
#   imagemesh  one pod per node, through the agents the chart deployed (an ImageSource for the registry)
#
# For each: the time from `kubectl apply` until every pod is Running, and the bytes the registry's
# link carried. Medians of ROUNDS rounds; the rounds take turns (alone, direct, imagemesh), the chart
# installed and uninstalled each time, so that the machine's noise falls on all three alike.
#
# Settings (environment): NODES (3), SIZE_MIB (256), UPSTREAM_RATE (200mbit), ROUNDS (3), and
# hack/cluster.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-3}
SIZE_MIB=${SIZE_MIB:-256}
UPSTREAM_RATE=${UPSTREAM_RATE:-200mbit}
ROUNDS=${ROUNDS:-3}
export NAME=${NAME:-imb} CLUSTER_DIR=${CLUSTER_DIR:-/tmp/imagemesh-bench-cluster} NODES

log() { echo "[bench $(date +%T)] $*" >&2; }
trap 'hack/cluster.sh down >/dev/null 2>&1 || true' EXIT
env_file=$(hack/cluster.sh up)
# shellcheck disable=SC1090
. "$env_file"
T=$IMAGEMESH_TOOLS
incp() { ip netns exec "$CONTROL_PLANE_NETNS" env KUBECONFIG="$KUBECONFIG" PATH="$T:$PATH" "$@"; }
k() { incp kubectl "$@"; }

log "make images into the cluster registry"
incp make images REGISTRY="$CLUSTER_REGISTRY/imagemesh" INSECURE=1 >"$CLUSTER_DIR/images.log" 2>&1

up=$UPSTREAM_IP:5000
cat >"$CLUSTER_DIR/upstream.yml" <<EOF
version: 0.1
log: {level: warn, formatter: text, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $CLUSTER_DIR/upstream}}
http: {addr: "$up"}
EOF
setsid ip netns exec "$UPSTREAM_NETNS" "$T/registry" serve "$CLUSTER_DIR/upstream.yml" >"$CLUSTER_DIR/upstream.log" 2>&1 </dev/null &
disown # hack/cluster.sh down ends it with the cluster
for _ in $(seq 1 100); do incp curl -fsS -o /dev/null "http://$up/v2/" 2>/dev/null && break; sleep 0.1; done

push() { # push NAME: a new image of one SIZE_MIB layer
  local d=$CLUSTER_DIR/layer
  rm -rf "$d" && mkdir -p "$d/data"
  head -c $((SIZE_MIB << 20)) /dev/urandom >"$d/data/blob.bin"
  tar -C "$d" -cf "$d.tar" data
  # The link is shaped on the registry's egress only: pushes go the other way, at full speed.
  incp crane append --insecure -b "$CLUSTER_REGISTRY/pause:3.10" -f "$d.tar" -t "$up/bench/$1:v1" >/dev/null 2>>"$CLUSTER_DIR/crane.log"
}
# operator_hosts on|off: the operator's own hosts.toml for the registry (plain HTTP) on every node,
# for the pulls without imagemesh; the agent leaves an operator's file alone, so it goes before the
# chart comes.
operator_hosts() {
  local i f
  for i in $(seq 1 "$NODES"); do
    f=$CLUSTER_DIR/node$i/root/etc/containerd/certs.d/$up/hosts.toml
    if [ "$1" = on ]; then
      mkdir -p "$(dirname "$f")" && printf 'server = "http://%s"\n' "$up" >"$f"
    else
      rm -f "$f"
    fi
  done
}
tx() { ip netns exec "$UPSTREAM_NETNS" cat /sys/class/net/eth0/statistics/tx_bytes; }
now() { date +%s.%N; }
# run NAME PODS [nodeName]: apply a DaemonSet (or one pod on a node) of image NAME and wait until PODS
# pods are Running; prints "seconds upstream-bytes".
run() {
  local name=$1 want=$2 node=${3:-} spec start bytes n
  if [ -n "$node" ]; then
    spec="{apiVersion: v1, kind: Pod, metadata: {name: $name, labels: {bench: $name}}, spec: {nodeName: $node, terminationGracePeriodSeconds: 0, containers: [{name: c, image: \"$up/bench/$name:v1\"}]}}"
  else
    spec="{apiVersion: apps/v1, kind: DaemonSet, metadata: {name: $name}, spec: {selector: {matchLabels: {bench: $name}}, template: {metadata: {labels: {bench: $name}}, spec: {terminationGracePeriodSeconds: 0, containers: [{name: c, image: \"$up/bench/$name:v1\"}]}}}}"
  fi
  bytes=$(tx)
  start=$(now)
  echo "$spec" | k apply -f - >/dev/null
  for _ in $(seq 1 3000); do
    n=$(k get pods -l "bench=$name" -o jsonpath='{.items[*].status.phase}' | grep -o Running | wc -l)
    [ "$n" -ge "$want" ] && break
    sleep 0.1
  done
  [ "$n" -ge "$want" ] || { echo "bench: $name: $n of $want pods Running after 300 s" >&2; exit 1; }
  echo "$(awk "BEGIN {print $(now) - $start}") $(($(tx) - bytes))"
  if [ -n "$node" ]; then k delete pod "$name" --wait=true >/dev/null; else k delete ds "$name" --wait=true >/dev/null; fi
}

ip netns exec "$UPSTREAM_NETNS" tc qdisc replace dev eth0 root tbf rate "$UPSTREAM_RATE" burst 256kb latency 100ms
log "upstream link shaped to $UPSTREAM_RATE; $NODES nodes; $SIZE_MIB MiB layer; $ROUNDS rounds"
declare -A secs bytes
for r in $(seq 1 "$ROUNDS"); do
  operator_hosts on
  push "alone$r"
  out=$(run "alone$r" 1 node1); read -r s b <<<"$out"; secs[alone]+="$s " bytes[alone]+="$b "
  push "direct$r"
  out=$(run "direct$r" "$NODES"); read -r s b <<<"$out"; secs[direct]+="$s " bytes[direct]+="$b "
  operator_hosts off
  incp helm install imagemesh charts/imagemesh --namespace imagemesh-system --create-namespace --wait --timeout 5m >/dev/null
  printf '{apiVersion: imagemesh.io/v1alpha1, kind: ImageSource, metadata: {name: bench}, spec: {registries: ["%s"], upstream: {endpoint: "http://%s"}}}' "$up" "$up" | k apply -f - >/dev/null
  for _ in $(seq 1 600); do
    [ "$(k get imagesource bench -o jsonpath='{.status.nodesConfigured}')" = "$NODES" ] && break
    sleep 0.2
  done
  # Steady state: every agent has found the others (a fresh install takes a few seconds).
  for ip in $(k -n imagemesh-system get pods -l app.kubernetes.io/component=node-agent -o jsonpath='{.items[*].status.podIP}'); do
    for _ in $(seq 1 300); do
      [ "$(incp curl -fsS "http://$ip:5000/metrics" | awk '/^imagemesh_peering_peers /{print $2}')" = $((NODES - 1)) ] && break
      sleep 0.2
    done
  done
  push "mesh$r"
  out=$(run "mesh$r" "$NODES"); read -r s b <<<"$out"; secs[imagemesh]+="$s " bytes[imagemesh]+="$b "
  k delete imagesource bench >/dev/null
  incp helm uninstall imagemesh --namespace imagemesh-system --wait >/dev/null
  log "after round $r: seconds alone ${secs[alone]}| direct ${secs[direct]}| imagemesh ${secs[imagemesh]}| imagemesh upstream bytes ${bytes[imagemesh]}"
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
image=$((SIZE_MIB << 20))
alone=$(median <<<"${secs[alone]}")
printf '\n%-10s %-28s %10s %16s %14s\n' case "seconds (rounds)" "median s" "upstream bytes" "x image"
# The upstream bytes are the median round's; every round's are in the log lines above.
for c in alone direct imagemesh; do
  s=$(median <<<"${secs[$c]}")
  b=$(median <<<"${bytes[$c]}")
  printf '%-10s %-28s %10.2f %16d %14.2f\n' "$c" "${secs[$c]}" "$s" "$b" "$(awk "BEGIN {print $b / $image}")"
done
printf '\nimagemesh / alone (time): %.2f   direct / alone: %.2f\n' \
  "$(awk "BEGIN {print $(median <<<"${secs[imagemesh]}") / $alone}")" \
  "$(awk "BEGIN {print $(median <<<"${secs[direct]}") / $alone}")"
