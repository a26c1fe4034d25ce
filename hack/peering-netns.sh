#!/usr/bin/env bash
# Peering across real links: one network namespace per node (an agent and a containerd 1.6 in each),
# the upstream registry in a namespace of its own, all joined by veth pairs to a bridge that lives in
# a switch namespace, so that nothing touches the host's network. The upstream's link can be shaped
# with tc. Every namespace and process the script makes is removed when it exits, failed or not.
#
#   hack/peering-netns.sh test    3 nodes: node 1 pulls; the registry goes away; nodes 2 and 3 pull
#                                 from node 1 with ctr; a node killed while serving; a node with a
#                                 corrupt copy; a host without the key.
#   hack/peering-netns.sh bench   8 nodes start pulling one 256 MiB image at once, upstream link shaped
#                                 to 200 Mbit/s, peering off then on; then the warm-blob part.
#   hack/peering-netns.sh warm-blob   only the warm-blob part: a warm 256 MiB blob from node 1 to a
#                                 fresh node 2 from peers, on a direct connection and on the libp2p
#                                 stream, for each peering.encryption setting, against HTTPS (Go's TLS
#                                 1.3) and plain HTTP from node 1 on the same link; RUNS times each.
#   hack/peering-netns.sh swarm   16 nodes, each running containerd 2.x, start pulling one 128 MiB image
#                                 at once, the upstream's link AND every node's shaped to 100 Mbit/s:
#                                 one node alone, peering off, a star (every node may send a blob to
#                                 64 peers at once), the tree (peering.uploadSlots, default 1) RUNS
#                                 times, the warm agents (what 16 containerds taking in the image at
#                                 once cost this machine's CPUs); then one slow round (16 Mbit/s links)
#                                 in which every transfer from peers takes over 60 s. Needs
#                                 containerd2 and ctr2 in the tools.
#
# Settings (environment): NODES, SIZE_MIB, UPSTREAM_RATE (tc rate, e.g. 200mbit), NODE_RATE (every
# node's egress, swarm), RUNS (warm-blob: runs of each, default 3; swarm: tree rounds, default 10),
# STAR_RUNS, SLOW_RATE, ENCRYPTIONS (the warm-blob part's --peer-encryption values, default
# "tls none"; "default" passes no flag), VIAS (the warm-blob part's ways for the bytes, default
# "direct stream"), DIRECT=0 (no node has a direct listener; default: every node has one on port
# 5004), IMAGEMESH_TOOLS (directory with registry and crane; default:
# built by hack/test-deps.sh), KEEP=1 keeps the work dir.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-test}
case $mode in
test) NODES=${NODES:-4} SIZE_MIB=${SIZE_MIB:-64} ;;
bench) NODES=${NODES:-8} SIZE_MIB=${SIZE_MIB:-256} ;;
swarm) NODES=${NODES:-16} SIZE_MIB=${SIZE_MIB:-128} UPSTREAM_RATE=${UPSTREAM_RATE:-100mbit} NODE_RATE=${NODE_RATE:-100mbit} ;;
warm-blob) NODES=${NODES:-2} SIZE_MIB=${SIZE_MIB:-256} ;;
*) echo "usage: $0 test|bench|swarm|warm-blob" >&2; exit 2 ;;
esac
UPSTREAM_RATE=${UPSTREAM_RATE:-200mbit}
NODE_RATE=${NODE_RATE:-}
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (ip netns)" >&2; exit 1; }
for c in ip tc containerd ctr curl sha256sum awk; do
  command -v $c >/dev/null || { echo "$0: missing $c (hack/test-deps.sh installs it)" >&2; exit 1; }
done
tools=${IMAGEMESH_TOOLS:-$(hack/test-deps.sh)}
needed="registry crane"
[ "$mode" = swarm ] && needed="$needed containerd2 ctr2"
for c in $needed; do
  [ -x "$tools/$c" ] || { echo "$0: missing $tools/$c (hack/test-deps.sh builds it)" >&2; exit 1; }
done
# containerd 1.6 from Debian by default; containerd 2.x (what current nodes run) for the swarm.
containerd=containerd ctr=ctr
if [ "$mode" = swarm ]; then containerd=$tools/containerd2 ctr=$tools/ctr2; fi

id=imx$$
work=$(mktemp -d /tmp/$id.XXXX)
pids=()
namespaces=()
cleanup() {
  local rc=$?
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for ns in "${namespaces[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  done
  sleep 0.2
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
  if [ $rc -ne 0 ]; then
    echo "--- FAILED ($rc); logs in $work" >&2
    for f in "$work"/*.log; do echo "--- $f (end)" >&2; tail -n 20 "$f" >&2; done
  elif [ "${KEEP:-}" != 1 ]; then
    rm -rf "$work"
  fi
  left=$(ip netns list | grep -c "^$id-" || true)
  [ "$left" -eq 0 ] || echo "cleanup: $left namespaces left" >&2
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$(date +%T)] $*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# inns NS CMD... runs CMD in namespace NS. Processes started in the background call ip netns exec
# directly, so that $! is the process itself (a backgrounded function would be a subshell).
inns() { local ns=$1; shift; ip netns exec "$id-$ns" "$@"; }

go build -o "$work/node-agent" ./cmd/node-agent
[ "$mode" = test ] || go build -o "$work/blobref" ./hack/blobref

# --- network: a bridge in the switch namespace, one veth per namespace -------------------------
ip netns add "$id-sw"; namespaces+=("$id-sw")
inns sw ip link add br0 type bridge
inns sw ip link set br0 up
inns sw ip link set lo up
attach() { # attach NS ADDR
  local ns=$1 addr=$2
  ip netns add "$id-$ns"; namespaces+=("$id-$ns")
  ip link add "$id$ns" type veth peer name eth0 netns "$id-$ns"
  ip link set "$id$ns" netns "$id-sw"
  inns sw ip link set "$id$ns" master br0 up
  inns "$ns" ip addr add "$addr/24" dev eth0
  inns "$ns" ip link set eth0 up
  inns "$ns" ip link set lo up
}
up=10.77.0.254
attach up $up
for i in $(seq 1 "$NODES"); do attach "n$i" "10.77.0.$i"; done

# --- upstream registry ----------------------------------------------------------------------------
cat > "$work/registry.yml" <<EOF
version: 0.1
log: {level: warn, formatter: text, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: "$up:5000"}
EOF
ip netns exec "$id-up" "$tools/registry" serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
wait_http() { # wait_http NS URL
  for _ in $(seq 1 200); do inns "$1" curl -fsS -o /dev/null "$2" 2>/dev/null && return 0; sleep 0.05; done
  fail "no answer from $2 in namespace $1"
}
wait_http up "http://$up:5000/v2/"

# One image of one layer of SIZE_MIB random bytes. crane pushes from node 1's namespace, before the
# link is shaped.
mkdir -p "$work/layer/data"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/layer/data/blob.bin"
tar -C "$work/layer" -cf "$work/layer.tar" data
image=example.test/bench/app:v1
inns n1 "$tools/crane" append --insecure --oci-empty-base -t "$up:5000/bench/app:v1" -f "$work/layer.tar" >/dev/null 2>"$work/crane.log"
layer=$(inns n1 "$tools/crane" manifest --insecure "$up:5000/bench/app:v1" | sed -n 's/.*"layers":\[{[^}]*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p')
[ -n "$layer" ] || fail "no layer digest in the pushed manifest"
layer_size=$(stat -c %s "$work/layer.tar")
log "pushed $image ($SIZE_MIB MiB layer $layer)"

# shape NS RATE: the namespace's egress, as one NIC of that speed sends.
shape() { inns "$1" tc qdisc replace dev eth0 root tbf rate "$2" burst 256kb latency 100ms; }
if [ "$mode" != test ]; then
  shape up "$UPSTREAM_RATE"
  log "upstream link shaped to $UPSTREAM_RATE"
fi
upstream_tx() { inns up cat /sys/class/net/eth0/statistics/tx_bytes; }

# --- nodes -------------------------------------------------------------------------------------------
key="$work/swarm.key"
printf '/key/swarm/psk/1.0.0/\n/base16/\n%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$key"
chmod 600 "$key"

# start_node I [agent flags...]: a fresh containerd and agent in namespace nI.
# With keep_data=1, the node keeps its cache and peer identity from its last start.
start_node() {
  local i=$1; shift
  local d="$work/n$i" ip=10.77.0.$i
  [ "${keep_data:-}" = 1 ] || rm -rf "$d"
  mkdir -p "$d/hosts" "$d/agent"
  [ -z "$NODE_RATE" ] || shape "n$i" "$NODE_RATE"
  if [ "$mode" = swarm ]; then
    cat >"$d/containerd.toml" <<EOF
version = 3
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd-ttrpc.sock"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/$(go env GOARCH)"
  snapshotter = "native"
EOF
  else
    cat >"$d/containerd.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.overlayfs"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd-ttrpc.sock"
EOF
  fi
  ip netns exec "$id-n$i" "$containerd" --config "$d/containerd.toml" >"$work/containerd-n$i.log" 2>&1 &
  pids+=($!)
  ip netns exec "$id-n$i" "$work/node-agent" --listen "$ip:5000" --data-dir "$d/agent" \
    --upstream "example.test=http://$up:5000" --hosts-dir "$d/hosts" --mirror-registry example.test \
    --mirror-url "http://$ip:5000" "$@" >"$work/agent-n$i.log" 2>&1 &
  pids+=($!)
  eval "agent_pid_$i=$!"
  wait_http "n$i" "http://$ip:5000/readyz"
  for _ in $(seq 1 100); do [ -S "$d/containerd.sock" ] && break; sleep 0.05; done
}
peer_args() { # peer_args I: node I's peering flags; with DIRECT=0, no direct listener
  echo --peer-listen "/ip4/10.77.0.$1/tcp/5001" --peer-key "$key"
  [ "${DIRECT:-1}" = 0 ] || echo --peer-direct-listen "10.77.0.$1:5004"
}
node1_addr() {
  inns n1 curl -fsS "http://10.77.0.1:5000/imagemesh/v1/peer" |
    sed -n 's/.*"id":"\([^"]*\)".*/\/ip4\/10.77.0.1\/tcp\/5001\/p2p\/\1/p'
}
metric() { # metric I NAME [LABEL...]: the sum of a metric's samples on node I
  local i=$1 name=$2; shift 2
  inns "n$i" curl -fsS "http://10.77.0.$i:5000/metrics" | grep -E "^$name(\{| )" |
    { local f; f=$(cat); for l in "$@"; do f=$(grep -F -- "$l" <<<"$f" || true); done; echo "$f"; } |
    awk '{s += $NF} END {printf "%.0f\n", s}'
}
wait_peers() { # wait_peers I N
  for _ in $(seq 1 400); do [ "$(metric "$1" imagemesh_peering_peers)" -ge "$2" ] && return 0; sleep 0.05; done
  fail "node $1 has $(metric "$1" imagemesh_peering_peers) peers, want $2"
}
pull() { # pull I [REF]: ctr pull through node I's hosts.toml
  local i=$1 ref=${2:-$image}
  local d="$work/n$i"
  inns "n$i" "$ctr" --address "$d/containerd.sock" -n imagemesh images pull --hosts-dir "$d/hosts" \
    --snapshotter native "$ref" >>"$work/ctr-n$i.log" 2>&1
}
stop_nodes() {
  for i in $(seq 1 "$NODES"); do
    for p in $(ip netns pids "$id-n$i"); do kill "$p" 2>/dev/null || true; done
  done
  sleep 0.5
  for i in $(seq 1 "$NODES"); do
    for p in $(ip netns pids "$id-n$i"); do kill -9 "$p" 2>/dev/null || true; done
  done
}
layer_ok() { # layer_ok I: node I's agent holds the layer, intact (it commits just after its client's last byte)
  local f="$work/n$1/agent/content/blobs/sha256/${layer#sha256:}"
  for _ in $(seq 1 100); do [ -f "$f" ] && break; sleep 0.05; done
  [ -f "$f" ] && [ "sha256:$(sha256sum "$f" | cut -d' ' -f1)" = "$layer" ]
}

start_cluster() { # start_cluster N [peering [agent flags...]]: nodes 1..N, node 1 first, the others bootstrap from it
  local n=$1 peering=${2:-}
  shift $(($# < 2 ? $# : 2))
  if [ -n "$peering" ]; then
    start_node 1 $(peer_args 1) "$@"
    local boot; boot=$(node1_addr)
    for i in $(seq 2 "$n"); do start_node "$i" $(peer_args "$i") --bootstrap "$boot" "$@"; done
    for i in $(seq 1 "$n"); do wait_peers "$i" $((n - 1)); done
  else
    for i in $(seq 1 "$n"); do start_node "$i"; done
  fi
}
# stop_node I: kill everything in node I's namespace, and reap what the script started there (so that
# bash does not report each as Killed; wait refuses the others, containerd's shims).
stop_node() {
  local p killed
  killed=$(ip netns pids "$id-n$1")
  for p in $killed; do kill -9 "$p" 2>/dev/null || true; done
  for p in $killed; do wait "$p" 2>/dev/null || true; done
}
calc() { awk "BEGIN { printf \"%.2f\", $* }"; }

if [ "$mode" = test ]; then
  # Node 1 pulls alone, so that it holds the whole image (with peers, the node that leads for a blob
  # would fetch it); then nodes 2 and 3 join it.
  start_node 1 $(peer_args 1)
  pull 1 || fail "pull on node 1"
  for i in 2 3; do start_node "$i" $(peer_args "$i") --bootstrap "$(node1_addr)"; done
  for i in 1 2 3; do wait_peers "$i" 2; done
  # Node 1 pulled with nobody to tell: it announces what it holds once it has peers (the sweeping
  # provider starts at the first one), within a second or so. A pull in that second finds no
  # provider, and with the registry down, fails: wait for the announcements, and hold them to 10 s.
  for _ in $(seq 1 200); do [ "$(metric 1 imagemesh_peering_keys_provided_total)" -ge 3 ] && break; sleep 0.05; done
  [ "$(metric 1 imagemesh_peering_keys_provided_total)" -ge 3 ] ||
    fail "node 1 announced $(metric 1 imagemesh_peering_keys_provided_total) of the 3 blobs it holds within 10 s of having peers"
  log "node 1 pulled; 3 nodes peered; node 1 announced what it holds"

  # The registry goes away: node 2 pulls by digest from node 1.
  digest_ref="example.test/bench/app@$(inns n1 "$tools/crane" digest --insecure "$up:5000/bench/app:v1")"
  kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
  pull 2 "$digest_ref" || fail "pull on node 2 with the registry down"
  layer_ok 2 || fail "node 2 holds no intact layer"
  [ "$(metric 2 imagemesh_content_fetched_bytes_total 'source="peer"')" -ge "$((SIZE_MIB << 20))" ] || fail "node 2 did not fetch the layer from a peer"
  [ "$(metric 1 imagemesh_peering_direct_connections_total 'result="taken"')" -ge 1 ] || fail "node 1 sent the layer over no direct connection"
  [ "$(metric 2 imagemesh_peering_direct_fallbacks_total)" = 0 ] || fail "node 2 fell back from a direct connection (agent-n2.log)"
  log "ok: node 2 pulled $digest_ref from node 1, on a direct connection, with the registry down"

  # Node 2's copy rots: node 3 skips it and gets the layer from node 1.
  printf 'rot' | dd of="$work/n2/agent/content/blobs/sha256/${layer#sha256:}" bs=1 seek=4096 conv=notrunc 2>/dev/null
  pull 3 "$digest_ref" || fail "pull on node 3 with a corrupt peer"
  layer_ok 3 || fail "node 3 holds no intact layer"
  log "ok: node 3 pulled an intact layer ($(metric 3 imagemesh_peering_bad_peer_events_total) bad-peer events)"

  # A host without the key, in node 3's namespace, bootstraps from node 1: no peers, no layer.
  printf '/key/swarm/psk/1.0.0/\n/base16/\n%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$work/other.key"
  ip netns exec "$id-n3" "$work/node-agent" --listen 10.77.0.3:5002 --data-dir "$work/stranger" --upstream "example.test=http://$up:5000" \
    --peer-listen /ip4/10.77.0.3/tcp/5003 --peer-key "$work/other.key" --log-level debug --bootstrap "$(node1_addr)" >"$work/agent-stranger.log" 2>&1 &
  pids+=($!)
  wait_http n3 "http://10.77.0.3:5002/readyz"
  code=$(inns n3 curl -s -o /dev/null -w '%{http_code}' "http://10.77.0.3:5002/v2/bench/app/blobs/$layer?ns=example.test")
  [ "$code" != 200 ] || fail "a host without the key fetched the layer (HTTP $code)"
  peers=$(inns n3 curl -fsS http://10.77.0.3:5002/metrics | awk '/^imagemesh_peering_peers /{print $2}')
  [ "$peers" = 0 ] || fail "a host without the key has $peers peers"
  log "ok: a host without the key got HTTP $code and no peers"

  # A peer killed while it serves. Node 2 (corrupt) leaves; nodes 1 and 3 hold the layer behind
  # links slowed to 100 Mbit/s, so that a transfer takes seconds. Node 4 starts pulling; whichever
  # of them serves it is killed half way; node 4 resumes on the other one.
  stop_node 2
  for i in 1 3; do inns "n$i" tc qdisc add dev eth0 root tbf rate 100mbit burst 256kb latency 100ms; done
  served1=$(metric 1 imagemesh_peering_served_bytes_total); served3=$(metric 3 imagemesh_peering_served_bytes_total)
  start_node 4 $(peer_args 4) --bootstrap "$(node1_addr)"
  wait_peers 4 2
  pull 4 "$digest_ref" &
  puller=$!
  victim=
  for _ in $(seq 1 400); do
    if [ $(($(metric 1 imagemesh_peering_served_bytes_total) - served1)) -gt $((8 << 20)) ]; then victim=1; break; fi
    if [ $(($(metric 3 imagemesh_peering_served_bytes_total) - served3)) -gt $((8 << 20)) ]; then victim=3; break; fi
    sleep 0.05
  done
  [ -n "$victim" ] || fail "node 4 is not fetching from node 1 or 3"
  stop_node "$victim"
  wait $puller || fail "pull on node 4 with node $victim killed mid-transfer"
  layer_ok 4 || fail "node 4 holds no intact layer"
  peer_bytes=$(metric 4 imagemesh_content_fetched_bytes_total 'source="peer"')
  [ "$peer_bytes" -lt $((2 * (SIZE_MIB << 20))) ] || fail "node 4 fetched $peer_bytes bytes for a $SIZE_MIB MiB layer: it started over instead of resuming"
  log "ok: node 4 pulled an intact layer with node $victim killed mid-transfer ($peer_bytes bytes from peers)"
  log "PASS"
  exit 0
fi

# --- a warm blob between two namespaces ------------------------------------------------------------
# Node 1 holds the layer. In node 2's namespace, blobref -get fetches it from node 1 over HTTPS (Go's
# TLS 1.3 both ends, as between peers) and plain HTTP (blobref serves both), and blobref -peer-get
# from peers, through the peers' Source as an agent does (the DHT, the blob protocol, a direct
# connection if node 1 offers one): clients that drop the bytes, so that the ratios are the
# transports'. curl's times for the same two URLs are reported beside them. Then the whole way: curl asks node 2's agent, which, with the registry
# gone, fetches the layer from node 1, verifies and stores it, and only then (it is untrusted until
# verified: cache.untrustedHold) serves it; and, for scale, curl from node 1's agent over plain HTTP.
# Both nodes start anew for every run, so that each run finds the blob through the DHT as a real
# miss does.
blob="v2/bench/app/blobs/$layer?ns=example.test"
# The agents write hosts.toml, so their pull API wants each node's token (what containerd sends).
token() { echo "X-Imagemesh-Node-Token: $(cat "$work/n$1/agent/node-token")"; }
declare -A warm_rows
warm_blob() {
  inns up tc qdisc del dev eth0 root 2>/dev/null || true # the upstream is not on this path
  stop_nodes
  start_node 1 $(peer_args 1)
  pull 1 || fail "warm-blob: pull on node 1"
  kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
  local f="$work/n1/agent/content/blobs/sha256/${layer#sha256:}"
  local via enc run enc_args client_enc p2p_t https_t http_t curl_https_t curl_http_t agent_t peer_n peer_t peer_lookup direct taken
  # Run by run, every setting in turn, so that a busy moment of the machine spreads over all of them.
  for run in $(seq 1 "${RUNS:-3}"); do
    for via in ${VIAS:-direct stream}; do
      direct=1
      [ "$via" = direct ] || direct=0
      for enc in ${ENCRYPTIONS:-tls none}; do
        enc_args=()
        [ "$enc" = default ] || enc_args=(--peer-encryption "$enc")
        client_enc=$enc
        [ "$enc" = default ] && client_enc=
        stop_node 1; stop_node 2
        keep_data=1 start_node 1 $(DIRECT=$direct peer_args 1) "${enc_args[@]}"
        ip netns exec "$id-n1" "$work/blobref" -file "$f" -https 10.77.0.1:5443 -http 10.77.0.1:5080 -cert-out "$work/blobref.pem" >"$work/blobref.log" 2>&1 &
        pids+=($!)
        start_node 2 $(DIRECT=$direct peer_args 2) "${enc_args[@]}" --bootstrap "$(node1_addr)"
        wait_peers 2 1
        for _ in $(seq 1 200); do [ "$(metric 1 imagemesh_peering_keys_provided_total)" -ge 3 ] && break; sleep 0.05; done
        for _ in $(seq 1 200); do inns n2 curl -fsSI -o /dev/null http://10.77.0.1:5080/ 2>/dev/null && break; sleep 0.05; done
        # The references: Go's HTTP client, as the peers' client is Go's TLS and TCP; and curl.
        read -r _ https_t < <(inns n2 "$work/blobref" -get https://10.77.0.1:5443/ -ca "$work/blobref.pem" 2>>"$work/blobref.log") || fail "warm-blob: HTTPS reference"
        read -r _ http_t < <(inns n2 "$work/blobref" -get http://10.77.0.1:5080/ 2>>"$work/blobref.log") || fail "warm-blob: HTTP reference"
        curl_https_t=$(inns n2 curl -fsSk -o /dev/null -w '%{time_total}' "https://10.77.0.1:5443/")
        curl_http_t=$(inns n2 curl -fsS -o /dev/null -w '%{time_total}' "http://10.77.0.1:5080/")
        read -r peer_n peer_t peer_lookup < <(inns n2 "$work/blobref" -peer-get "$layer" -key "$key" -encryption "$client_enc" \
          -listen /ip4/10.77.0.2/tcp/5009 -bootstrap "$(node1_addr)" 2>>"$work/blobref.log") || true
        [ "$peer_n" = "$(stat -c %s "$f")" ] || fail "warm-blob $via $enc: the peer client read ${peer_n:-no} bytes (blobref.log)"
        agent_t=$(inns n2 curl -fsS -o /dev/null -H "$(token 1)" -w '%{time_total}' "http://10.77.0.1:5000/$blob")
        p2p_t=$(inns n2 curl -fsS -o /dev/null -H "$(token 2)" -w '%{time_total}' "http://10.77.0.2:5000/$blob")
        layer_ok 2 || fail "warm-blob $via $enc: node 2 holds no intact layer"
        [ "$(metric 2 imagemesh_content_fetched_bytes_total 'source="peer"')" -ge "$((SIZE_MIB << 20))" ] || fail "warm-blob $via $enc: node 2 did not fetch the layer from node 1"
        # blobref's and node 2's fetches: both on direct connections, or neither.
        taken=$(metric 1 imagemesh_peering_direct_connections_total 'result="taken"')
        [ "$taken" = $((2 * direct)) ] || fail "warm-blob $via $enc: node 1 took $taken direct connections, want $((2 * direct))"
        warm_rows[$via.$enc.$run]="| $via | $enc | $run | $peer_t s | $peer_lookup s | $https_t s | $http_t s | $(calc "$https_t / $peer_t")× | $(calc "$http_t / $peer_t")× | $curl_https_t s | $curl_http_t s | $p2p_t s | $agent_t s |"
        log "warm-blob $via $enc run $run: peers $peer_t s after a $peer_lookup s lookup, HTTPS $https_t s, HTTP $http_t s; through node 2's agent $p2p_t s, node 1's agent $agent_t s"
      done
    done
  done
}
warm_table() {
  echo
  echo "warm $SIZE_MIB MiB blob, node 1 → node 2 (clients in node 2's namespace that drop the bytes; then the whole way through node 2's agent)."
  echo "peers: from the provider's answer to the last byte, as a client's time for one request; the provider lookup and request before it (with a direct connection's dial and handshake) is a cost a blob, not a byte."
  echo
  echo "| bytes on | --peer-encryption | run | peers | lookup | HTTPS (Go) | HTTP (Go) | HTTPS / peers | HTTP / peers | HTTPS (curl) | HTTP (curl) | through node 2's agent | HTTP from node 1's agent |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  local via enc run
  for via in ${VIAS:-direct stream}; do
    for enc in ${ENCRYPTIONS:-tls none}; do
      for run in $(seq 1 "${RUNS:-3}"); do echo "${warm_rows[$via.$enc.$run]}"; done
    done
  done
  echo
  echo "targets: tls ≥ 0.9× HTTPS; none ≥ 0.8× HTTP"
}
if [ "$mode" = warm-blob ]; then
  warm_blob
  warm_table
  exit 0
fi

# --- bench ---------------------------------------------------------------------------------------
declare -A wall upbytes agents
if [ "$mode" = swarm ]; then
  # A star: every node may send a blob to as many peers as ask, as before upload slots.
  printf 'peering:\n  uploadSlots: 64\n' >"$work/star.yaml"
  default_rounds="alone off $(for r in $(seq 1 "${STAR_RUNS:-2}"); do printf 'star#%d ' "$r"; done)$(for r in $(seq 1 "${RUNS:-10}"); do printf 'tree#%d ' "$r"; done)warm slow"
else
  default_rounds="alone off on warm"
fi
rounds=${ROUNDS:-$default_rounds}
for round in $rounds; do
  case ${round%%#*} in
  alone) stop_nodes; n=1; start_node 1 ;;
  off) stop_nodes; n=$NODES; start_cluster "$n" ;;
  on | tree) stop_nodes; n=$NODES; start_cluster "$n" peering ;;
  star) stop_nodes; n=$NODES; start_cluster "$n" peering --config "$work/star.yaml" ;;
  slow)
    # Every link at SLOW_RATE: a transfer from peers takes over containerd's 30 s, and CRI's
    # progress timeout is not far: no containerd may give up on its agent (it would pull from the
    # registry itself, and the upstream would send more than the image).
    stop_nodes; n=$NODES; NODE_RATE=${SLOW_RATE:-16mbit}; shape up "$NODE_RATE"
    start_cluster "$n" peering ;;
  warm)
    # The same nodes, every agent warm, containerd emptied: what 8 containerds taking in and
    # unpacking the image at once cost on this machine, with no network in the way.
    n=$NODES
    for i in $(seq 1 "$n"); do
      inns "n$i" "$ctr" --address "$work/n$i/containerd.sock" -n imagemesh images rm --sync "$image" >/dev/null
      rm -f "$work/n$i/agent-done" "$work/n$i/done"
    done ;;
  esac
  before=$(upstream_tx)
  start=$(date +%s.%N)
  ps=()
  for i in $(seq 1 $n); do { pull "$i"; echo "$(date +%s.%N)" >"$work/n$i/done"; } & ps+=($!); done
  # When every agent holds the verified layer: the cluster cache is warm; what remains is containerd
  # taking the layer in and unpacking it, on every node at once (here: on the same two cores).
  (
    while :; do
      all=1
      for i in $(seq 1 $n); do
        [ -f "$work/n$i/agent-done" ] && continue
        if [ -f "$work/n$i/agent/content/blobs/sha256/${layer#sha256:}" ]; then date +%s.%N >"$work/n$i/agent-done"; else all=; fi
      done
      [ -n "$all" ] && { date +%s.%N >"$work/agents-done"; break; }
      sleep 0.05
    done
  ) &
  watcher=$!
  for p in "${ps[@]}"; do wait "$p" || fail "$round: a pull failed"; done
  end=$(date +%s.%N)
  wait $watcher
  agents[$round]=$(calc "$(cat "$work/agents-done") - $start")
  for i in $(seq 1 $n); do layer_ok "$i" || fail "$round: node $i holds no intact layer"; done
  wall[$round]=$(calc "$end - $start")
  upbytes[$round]=$(($(upstream_tx) - before))
  log "$round: $n nodes in ${wall[$round]} s, upstream sent ${upbytes[$round]} bytes; pulls done after $(for i in $(seq 1 $n); do printf '%s ' "$(calc "$(cat "$work/n$i/done") - $start")"; done)s, agents after $(for i in $(seq 1 $n); do printf '%s ' "$(calc "$(cat "$work/n$i/agent-done") - $start")"; done)s"
  if [ "${round%%#*}" != off ] && [ "$n" -gt 1 ]; then
    sent=""; for i in $(seq 1 $n); do sent="$sent $(($(metric "$i" imagemesh_peering_served_bytes_total) >> 20))"; done
    log "$round: MiB each node sent to peers:$sent"
  fi
done

if [ "$mode" = swarm ]; then
  echo
  echo "| $NODES nodes, containerd 2.x, one $SIZE_MIB MiB layer at once; upstream and every node at $UPSTREAM_RATE (slow: ${SLOW_RATE:-16mbit}) | every ctr pull done | × alone | every agent holds the layer | × alone | upstream bytes | × image |"
  echo "|---|---|---|---|---|---|---|"
  for round in $rounds; do
    echo "| $round | ${wall[$round]} s | $(calc "${wall[$round]} / ${wall[alone]}") | ${agents[$round]} s | $(calc "${agents[$round]} / ${agents[alone]}") | ${upbytes[$round]} | $(calc "${upbytes[$round]} / $layer_size") |"
  done
  echo
  echo "targets for the tree, every run: pulls done in at most 1.5x one node alone, at most 1.1x the image from upstream; slow: no containerd gives up on its agent (upstream at most 1.1x)"
  exit 0
fi

warm_blob
echo
echo "| $NODES nodes pull one $SIZE_MIB MiB image at once, upstream link $UPSTREAM_RATE | every ctr pull done | every agent holds the layer | upstream bytes | × image |"
echo "|---|---|---|---|---|"
for round in $rounds; do
  echo "| $round | ${wall[$round]} s | ${agents[$round]} s | ${upbytes[$round]} | $(calc "${upbytes[$round]} / $layer_size") |"
done
echo
if [ -n "${wall[warm]:-}" ]; then
  echo "warm: $NODES containerds taking in and unpacking the image at once from warm agents need ${wall[warm]} s on this machine"
fi
if [ -n "${wall[alone]:-}" ]; then
  for round in off on; do
    [ -n "${wall[$round]:-}" ] || continue
    echo "peering $round: pulls done in $(calc "${wall[$round]} / ${wall[alone]}")× the time of one node alone, agents warm in $(calc "${agents[$round]} / ${agents[alone]}")×, upstream sent $(calc "${upbytes[$round]} / $layer_size")× the image (targets, peering on: < 1.5×, < 1.2×)"
  done
fi
warm_table
