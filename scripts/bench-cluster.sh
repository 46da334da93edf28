#!/usr/bin/env bash
# Starts a 3-node raft-kv cluster on loopback (release build, durable sled log,
# separate processes) and runs the load generator against it.
#
# Usage: scripts/bench-cluster.sh [SECS]
#   BIN=path/to/raft-kv scripts/bench-cluster.sh 5   (compare two builds)
#   READ_POLICY=lease scripts/bench-cluster.sh 5      (leader lease reads)
#   LOG_ENGINE=wal scripts/bench-cluster.sh 5         (the segment-file log)
#   NODE_ARGS="--commit-notice-ms 0" scripts/bench-cluster.sh 5  (more node options)
#   ANCHOR=redis scripts/bench-cluster.sh 5           (then one durable redis-server:
#                                                      appendonly yes, appendfsync always)
#   ANCHOR=etcd scripts/bench-cluster.sh 5            (then a 3-member etcd cluster on loopback,
#                                                      driven through its v3 JSON gateway;
#                                                      ANCHOR="redis etcd" for both)
#   RUNS=5 scripts/bench-cluster.sh 5                (five steady 256-client runs instead of three)
#   FLOOR=1 scripts/bench-cluster.sh 5               (then the bare replication floor,
#                                                      scripts/replication-floor.py, in the same run)
#   FILL=1000000 scripts/bench-cluster.sh 5           (then fill that many keys of 256 B
#                                                      and report memory and disk per node)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p raft-kv
fi
bin=${BIN:-target/release/raft-kv}
dir=$(mktemp -d /tmp/raft-kv-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

policy=()
if [ -n "${READ_POLICY:-}" ]; then policy=(--read-policy "$READ_POLICY"); fi
if [ -n "${LOG_ENGINE:-}" ]; then policy+=(--log-engine "$LOG_ENGINE"); fi
# Any other node options, e.g. NODE_ARGS="--commit-notice-ms 0".
if [ -n "${NODE_ARGS:-}" ]; then read -ra extra <<<"$NODE_ARGS"; policy+=("${extra[@]}"); fi
$bin certs --dir "$dir/certs" --nodes 1,2,3 >/dev/null
for id in 1 2 3; do
  peers=()
  for p in 1 2 3; do [ "$p" = "$id" ] || peers+=(--peer "$p=127.0.0.1:$((7200 + p))"); done
  RUST_LOG=warn $bin node --id "$id" --raft-addr "127.0.0.1:$((7200 + id))" --client-addr "127.0.0.1:$((7300 + id))" \
    "${peers[@]}" "${policy[@]}" --data-dir "$dir/node-$id" --tls-dir "$dir/certs" 2>"$dir/node-$id.log" &
  pids+=($!)
done

# One command to a local port, its reply (empty if none came).
ask() { printf "$2" | timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; cat >&3; timeout 0.3 cat <&3" 2>/dev/null || true; }
info() { ask $((7300 + $1)) '*1\r\n$4\r\nINFO\r\n'; }
# A process's resident set.
rss() { awk '/VmRSS/ {print $2 " " $3}' "/proc/$1/status"; }

# Find the leader through INFO.
leader=""
for _ in $(seq 1 100); do
  for id in 1 2 3; do
    if grep -q 'role:leader' <<<"$(info "$id")"; then
      leader=$id
    fi
  done
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { echo "no leader"; exit 1; }
addr="127.0.0.1:$((7300 + leader))"
echo "leader: node $leader ($addr)"

# CPU time (user + system, clock ticks) of the three node processes.
cpu() { local t=0 f; for p in "${pids[@]}"; do read -ra f < "/proc/$p/stat"; t=$((t + f[13] + f[14])); done; echo "$t"; }
tck=$(getconf CLK_TCK)
# Raft messages the three nodes have queued to each other (INFO's
# peer_messages_sent; 0 for a build that does not count them).
sent() { local t=0 id n; for id in 1 2 3; do n=$(info "$id" | grep -oE 'peer_messages_sent:[0-9]+' | cut -d: -f2); t=$((t + ${n:-0})); done; echo "$t"; }

echo "-- first fill: every SET of this run creates a key (100,000 keys)"
$bin bench --addr "$addr" --clients 256 --conns 16 --secs "$secs" --value-size 256 --op set
echo "-- steady state: SETs overwrite existing keys"
# Cluster CPU and Raft messages per SET, after the load generator's output.
measured() {
  local c0 m0 c1 m1 out ops
  c0=$(cpu); m0=$(sent)
  out=$($bin bench --addr "$addr" "$@" --secs "$secs" --value-size 256 --op set)
  c1=$(cpu); m1=$(sent)
  ops=$(head -1 <<<"$out" | awk '{print $1}')
  echo "$out; cluster CPU per op: $(( (c1 - c0) * 1000000000 / tck / ops )) ns; Raft messages per op: $(awk -v m=$((m1 - m0)) -v o="$ops" 'BEGIN {printf "%.2f", m / o}')"
}
measured --clients 1 --conns 1
for _ in $(seq 1 "${RUNS:-3}"); do
  measured --clients 256 --conns 16
done
$bin bench --addr "$addr" --clients 256 --conns 16 --secs "$secs" --value-size 256 --op get
$bin bench --addr "$addr" --clients 1 --conns 1 --secs "$secs" --value-size 256 --op get
$bin bench --addr 127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303 --clients 256 --conns 16 --secs "$secs" --value-size 256 --op set
# What the load did to the cluster: messages dropped from full queues, and
# whether the leader stayed.
for id in 1 2 3; do
  echo "node $id: $(grep -oE 'role:[a-z]+|term:[0-9]+|peer_messages_dropped:[0-9]+|snapshot_index:[0-9]+' <<<"$(info "$id")" | tr '\n' ' ')"
done
# Memory: each node's resident set after the load (256 B values over
# 100,000 keys).
for i in 0 1 2; do
  echo "node $((i + 1)) RSS: $(rss "${pids[$i]}")"
done

# Memory and disk for a given number of keys (on top of the 100,000 above,
# which the fill overwrites).
if [ -n "${FILL:-}" ]; then
  $bin bench --addr "$addr" --clients 256 --conns 16 --value-size 256 --keys "$FILL" --op fill
  sleep 2
  for i in 0 1 2; do
    echo "after $FILL keys: node $((i + 1)) RSS $(rss "${pids[$i]}"), on disk $(du -sm "$dir/node-$((i + 1))" | cut -f1) MB"
  done
fi

# The other thing a user might run instead: one redis-server that syncs its
# append-only file on every write, driven by the same load generator.
if [[ " ${ANCHOR:-} " == *" redis "* ]]; then
  mkdir -p "$dir/redis"
  redis-server --port 7399 --bind 127.0.0.1 --dir "$dir/redis" --appendonly yes \
    --appendfsync always --save '' --daemonize no >"$dir/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 50); do
    if ask 7399 '*1\r\n$4\r\nPING\r\n' | grep -q PONG; then break; fi
    sleep 0.1
  done
  echo "-- anchor: redis-server $(redis-server --version | awk '{print $3}'), appendonly yes, appendfsync always"
  $bin bench --addr 127.0.0.1:7399 --clients 256 --conns 16 --secs "$secs" --value-size 256 --op set
  $bin bench --addr 127.0.0.1:7399 --clients 1 --conns 1 --secs "$secs" --value-size 256 --op set
  $bin bench --addr 127.0.0.1:7399 --clients 256 --conns 16 --secs "$secs" --value-size 256 --op get
  echo "redis-server RSS: $(rss "${pids[3]}")"
  if [ -n "${FILL:-}" ]; then
    $bin bench --addr 127.0.0.1:7399 --clients 256 --conns 16 --value-size 256 --keys "$FILL" --op fill
    echo "after $FILL keys: redis-server RSS $(rss "${pids[3]}"), on disk $(du -sm "$dir/redis" | cut -f1) MB"
  fi
fi

# etcd, three members on loopback (its own Raft, its WAL fsynced per batch),
# driven by the same load generator over etcd's v3 JSON gateway: HTTP/1.1
# with one request in flight per connection, so 256 clients are 256
# connections, all to the leader (etcd's gRPC clients would be faster; none
# is packaged here).
if [[ " ${ANCHOR:-} " == *" etcd "* ]]; then
  ic="e1=http://127.0.0.1:7421,e2=http://127.0.0.1:7422,e3=http://127.0.0.1:7423"
  epids=()
  for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$dir/etcd-$i" \
      --listen-client-urls "http://127.0.0.1:$((7410 + i))" --advertise-client-urls "http://127.0.0.1:$((7410 + i))" \
      --listen-peer-urls "http://127.0.0.1:$((7420 + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((7420 + i))" \
      --initial-cluster "$ic" --initial-cluster-state new --logger zap --log-level error >"$dir/etcd-$i.log" 2>&1 &
    pids+=($!)
    epids+=($!)
  done
  eleader=""
  for _ in $(seq 1 100); do
    eleader=$(ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:7411,127.0.0.1:7412,127.0.0.1:7413 endpoint status -w json 2>/dev/null \
      | python3 -c 'import json, sys; print(next(x["Endpoint"] for x in json.load(sys.stdin) if x["Status"]["leader"] == x["Status"]["header"]["member_id"]))' 2>/dev/null || true)
    [ -n "$eleader" ] && break
    sleep 0.1
  done
  [ -n "$eleader" ] || { echo "etcd elected no leader"; exit 1; }
  ecpu() { local t=0 f p; for p in "${epids[@]}"; do read -ra f < "/proc/$p/stat"; t=$((t + f[13] + f[14])); done; echo "$t"; }
  echo "-- anchor: etcd $(etcd --version | awk '/etcd Version/ {print $3}'), 3 members, leader $eleader"
  $bin bench --protocol etcd --addr "$eleader" --clients 256 --conns 256 --secs "$secs" --value-size 256 --op set >/dev/null \
    || echo "etcd warm-up run failed"
  $bin bench --protocol etcd --addr "$eleader" --clients 1 --conns 1 --secs "$secs" --value-size 256 --op set \
    || echo "etcd 1-client run failed"
  for _ in 1 2 3; do
    c0=$(ecpu)
    # A failed run (etcd closed a connection, say) is reported, not fatal.
    out=$($bin bench --protocol etcd --addr "$eleader" --clients 256 --conns 256 --secs "$secs" --value-size 256 --op set 2>&1) \
      || { echo "etcd run failed: $out"; continue; }
    c1=$(ecpu)
    ops=$(head -1 <<<"$out" | awk '{print $1}')
    echo "$out; etcd CPU per op: $(( (c1 - c0) * 1000000000 / tck / ops )) ns"
  done
  $bin bench --protocol etcd --addr "$eleader" --clients 256 --conns 256 --secs "$secs" --value-size 256 --op get \
    || echo "etcd GET run failed"
  for i in 0 1 2; do
    echo "etcd member $((i + 1)) RSS: $(rss "${epids[$i]}")"
  done
fi

# The bare floor of a durable 3-way write on this machine, in the same run.
if [ -n "${FLOOR:-}" ]; then
  echo "-- floor: scripts/replication-floor.py (3 processes, UDP, append + fdatasync each)"
  FLOOR_DIR="$dir" python3 scripts/replication-floor.py
fi
