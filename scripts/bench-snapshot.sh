#!/usr/bin/env bash
# Snapshot transfer benchmark: a 3-node raft-kv cluster on loopback (release
# build, separate processes) is filled with KEYS keys of 256 B; a follower's
# data directory is wiped, it is removed from the cluster and started again
# with --join, so the leader takes a snapshot and streams it. Reported: the snapshot's size, its transfer rate (leader
# starts sending -> follower holds the whole file, checked), the follower's
# load time, peak RSS growth of sender and receiver over their steady state,
# and the leader's SET p99 before and during the rebuild. The anchor is
# raft-net-quic's own bulk rate (1 MiB messages, 4 in flight) in the same run.
#
# Usage: scripts/bench-snapshot.sh [KEYS]    (default 4000000, about 1 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-4000000}
cargo build --release -q -p raft-kv
cargo build --release -q -p raft-net-quic --example quic_bulk
bin=target/release/raft-kv
dir=$(mktemp -d /tmp/raft-kv-snapbench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$dir"; }
trap cleanup EXIT

echo "-- anchor: $(target/release/examples/quic_bulk 1024)"

$bin certs --dir "$dir/certs" --nodes 1,2,3 >/dev/null
start_node() { # id [--join ADDR]
  local id=$1 peers=(); shift
  for p in 1 2 3; do [ "$p" = "$id" ] || peers+=(--peer "$p=127.0.0.1:$((7400 + p))"); done
  [ $# -gt 0 ] && peers=("$@")
  RUST_LOG=info $bin node --id "$id" --raft-addr "127.0.0.1:$((7400 + id))" --client-addr "127.0.0.1:$((7500 + id))" \
    "${peers[@]}" --snapshot-threshold 0 --data-dir "$dir/node-$id" --tls-dir "$dir/certs" 2>>"$dir/node-$id.log" &
  pids[$id]=$!
}
info() { printf '*1\r\n$4\r\nINFO\r\n' | timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$((7500 + $1)); cat >&3; timeout 0.5 cat <&3" 2>/dev/null || true; }
field() { info "$1" | tr -d '\r' | sed -n "s/^$2://p"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

for id in 1 2 3; do start_node "$id"; done
leader=""
for _ in $(seq 1 100); do
  for id in 1 2 3; do [ "$(field "$id" role)" = leader ] && leader=$id; done
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { echo "no leader"; exit 1; }
addr="127.0.0.1:$((7500 + leader))"
follower=$(( leader % 3 + 1 ))
echo "leader: node $leader; the wiped follower: node $follower"

t0=$(date +%s.%N)
$bin bench --addr "$addr" --clients 256 --conns 16 --value-size 256 --keys "$keys" --op fill | sed 's/^/-- fill: /'
t1=$(date +%s.%N)
echo "-- filled $keys keys in $(echo "$t1 - $t0" | bc) s"
# Every member holds the whole log: compaction (without snapshots) proceeds.
sleep 3
# Leader write latency in one-second slices: steady, then while the wiped
# follower is rebuilt (snapshot taken, sent, loaded, log caught up).
slices() { $bin bench --addr "$addr" --clients 16 --conns 4 --secs 1 --value-size 256 --keys 10000 --op set | sed -n 1p | sed 's/.*p99 \([0-9.]*\) ms.*/\1/'; }
steady=$(for _ in 1 2 3 4 5; do slices; done | sort -n | tr '\n' ' ')
echo "-- steady SET p99 per second (ms, sorted): $steady"

# One rebuild of the follower: wipe it, restart it, sample RSS until it has
# caught up, then five more seconds. With LOAD=1, 16 clients write to the
# leader throughout and their p99 is recorded per second.
rebuild() {
  local load=$1
  kill -9 "${pids[$follower]}"; wait "${pids[$follower]}" 2>/dev/null || true
  rm -rf "$dir/node-$follower"
  : >"$dir/node-$follower.log"
  # A wiped member is another storage identity: it leaves the cluster and
  # joins again as a new member (the leader adds it and sends the snapshot).
  $bin member --addr "$addr" remove "$follower" >/dev/null
  lead_base=$(rss_kb "${pids[$leader]}")
  commit=$(field "$leader" commit_index)
  t_restart=$(date +%s.%N)
  start_node "$follower" --join "$addr"
  sleep 0.3
  fol_base=$(rss_kb "${pids[$follower]}")
  bench_pid=""
  if [ "$load" = 1 ]; then
    ( while :; do slices; done >"$dir/during.txt" ) &
    bench_pid=$!
  fi
  lead_peak=$lead_base; fol_peak=$fol_base
  for _ in $(seq 1 6000); do
    l=$(rss_kb "${pids[$leader]}"); f=$(rss_kb "${pids[$follower]}")
    (( l > lead_peak )) && lead_peak=$l
    (( f > fol_peak )) && fol_peak=$f
    a=$(field "$follower" applied_index)
    [ -n "$a" ] && (( a >= commit )) && break
    sleep 0.1
  done
  caught=$(date +%s.%N)
  sleep 5
  fol_after=$(rss_kb "${pids[$follower]}"); lead_after=$(rss_kb "${pids[$leader]}")
  if [ -n "$bench_pid" ]; then kill "$bench_pid" 2>/dev/null; wait "$bench_pid" 2>/dev/null || true; fi
  strip() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }
  ts() { date -d "$(awk '{print $1}' <<<"$1")" +%s.%N; }
  taken=$(strip "$dir/node-$leader.log" | grep 'snapshot taken' | tail -1)
  sending=$(strip "$dir/node-$leader.log" | grep 'sending a snapshot' | tail -1)
  received=$(strip "$dir/node-$follower.log" | grep 'snapshot received' | tail -1)
  loaded=$(strip "$dir/node-$follower.log" | grep 'snapshot loaded' | tail -1)
  size=$(strip "$dir/node-$follower.log" | grep 'receiving a snapshot' | tail -1 | sed 's/.*size=\([0-9]*\).*/\1/')
  secs=$(echo "$(ts "$received") - $(ts "$sending")" | bc)
  echo "-- snapshot: $size bytes; taken in $(sed 's/.* ms=\([0-9]*\).*/\1/' <<<"$taken") ms on the leader"
  echo "-- transfer: $secs s = $(echo "$size / $secs / 1000000" | bc) MB/s (leader sends -> follower holds it, checked)"
  echo "-- load on the follower: $(sed 's/.* ms=\([0-9]*\).*/\1/' <<<"$loaded") ms"
  echo "-- leader RSS: $(( lead_base / 1024 )) MiB before, peak $(( lead_peak / 1024 )) MiB during, $(( lead_after / 1024 )) MiB after: peak growth $(( (lead_peak - lead_base) / 1024 )) MiB"
  echo "-- follower RSS: $(( fol_base / 1024 )) MiB at start, peak $(( fol_peak / 1024 )) MiB during, $(( fol_after / 1024 )) MiB after: peak above the state after $(( (fol_peak - fol_after) / 1024 )) MiB"
  echo "-- rebuild (restart -> caught up): $(echo "$caught - $t_restart" | bc) s"
  if [ "$load" = 1 ]; then
    echo "-- during the rebuild and 5 s after, SET p99 per second (ms, in order): $(tr '\n' ' ' <"$dir/during.txt")"
  fi
}

echo "== rebuild under load"
rebuild 1
# The log settles (every member holds it again and it is compacted).
sleep 5
echo "== rebuild without load (memory of the transfer alone)"
rebuild 0
