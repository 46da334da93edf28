#!/usr/bin/env bash
# Membership benchmark: a 3-node raft-kv cluster on loopback (release build,
# separate processes) is filled with KEYS keys of 256 B; then
#  1. a fourth node is started empty with `--join` (its certificate signed
#     with `raft-kv certs --add 4`): reported, the time until it is a voter
#     and until it has applied everything committed when it started (it is
#     caught up by the leader's snapshot, then the log);
#  2. three times: 16 clients write through two followers while the leader
#     gets SIGTERM (it hands leadership over, then exits): reported, the
#     longest time no write was acknowledged, and the errors the clients saw.
#     The stopped node is started again between repeats.
#
# Usage: scripts/bench-membership.sh [KEYS]    (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-1000000}
cargo build --release -q -p raft-kv
bin=target/release/raft-kv
dir=$(mktemp -d /tmp/raft-kv-memberbench.XXXXXX)
declare -A pids
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$dir"; }
trap cleanup EXIT

raft() { echo "127.0.0.1:$((7600 + $1))"; }
client() { echo "127.0.0.1:$((7700 + $1))"; }
$bin certs --dir "$dir/certs" --nodes 1,2,3 >/dev/null
start_node() { # id [extra args...]
  local id=$1; shift
  local peers=()
  for p in 1 2 3; do [ "$p" = "$id" ] || peers+=(--peer "$p=$(raft "$p")"); done
  [ "$id" = 4 ] && peers=()
  RUST_LOG=info $bin node --id "$id" --raft-addr "$(raft "$id")" --client-addr "$(client "$id")" \
    "${peers[@]}" "$@" --data-dir "$dir/node-$id" --tls-dir "$dir/certs" 2>>"$dir/node-$id.log" &
  pids[$id]=$!
}
info() { printf '*1\r\n$4\r\nINFO\r\n' | timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$((7700 + $1)); cat >&3; timeout 0.5 cat <&3" 2>/dev/null || true; }
field() { info "$1" | tr -d '\r' | sed -n "s/^$2://p"; }
find_leader() {
  for _ in $(seq 1 200); do
    for id in "$@"; do [ "$(field "$id" role)" = leader ] && { echo "$id"; return; }; done
    sleep 0.05
  done
  echo "no leader" >&2; exit 1
}
now() { date +%s.%N; }

for id in 1 2 3; do start_node "$id"; done
leader=$(find_leader 1 2 3)
t0=$(now)
$bin bench --addr "$(client "$leader")" --clients 256 --conns 16 --value-size 256 --keys "$keys" --op fill | sed -n 1p | sed 's/^/-- fill: /'
echo "-- filled $keys keys in $(echo "$(now) - $t0" | bc) s"
sleep 2

echo "== a new member joins"
$bin certs --dir "$dir/certs" --add 4 >/dev/null
commit=$(field "$leader" commit_index)
t_start=$(now)
start_node 4 --join "$(client "$leader")"
t_voter=""
for _ in $(seq 1 6000); do
  if [ -z "$t_voter" ] && [[ ",$(field "$leader" raft_voters)," == *",4,"* ]]; then t_voter=$(now); fi
  a=$(field 4 applied_index)
  [ -n "$a" ] && (( a >= commit )) && [ -n "$t_voter" ] && break
  sleep 0.1
done
t_caught=$(now)
echo "-- node 4 started with --join: a voter after $(echo "$t_voter - $t_start" | bc) s; applied the $commit entries committed before it started after $(echo "$t_caught - $t_start" | bc) s"
echo "-- its snapshot: $(sed 's/\x1b\[[0-9;]*m//g' "$dir/node-4.log" | grep -c 'snapshot loaded') loaded; INFO snapshot_bytes on node 4: $(field 4 snapshot_bytes)"

echo "== SIGTERM on the leader while 16 clients write through two followers (3 repeats)"
for r in 1 2 3; do
  leader=$(find_leader 1 2 3 4)
  followers=()
  for id in 1 2 3 4; do
    if [ "$id" != "$leader" ] && [ ${#followers[@]} -lt 2 ]; then followers+=("$(client "$id")"); fi
  done
  $bin bench --addr "${followers[0]},${followers[1]}" --clients 16 --conns 4 --secs 6 --value-size 256 --keys 10000 --op set >"$dir/bench-$r.txt" &
  bench=$!
  sleep 2
  kill -TERM "${pids[$leader]}"
  wait "${pids[$leader]}" 2>/dev/null || true
  wait "$bench" || true
  handed=$(sed "s/\x1b\[[0-9;]*m//g" "$dir/node-$leader.log" | grep -o "leadership handed over in [0-9]* ms" | tail -1 || true)
  echo "-- repeat $r: node $leader stopped (${handed:-no hand-over}); clients: $(head -1 "$dir/bench-$r.txt" | sed 's/.*ops\/s, //'); $(sed -n 2p "$dir/bench-$r.txt")"
  for id in 1 2 3 4; do
    if [ "$id" != "$leader" ] && ! kill -0 "${pids[$id]}" 2>/dev/null; then echo "-- node $id is not running!"; fi
  done
  if [ "$leader" = 4 ]; then start_node 4 --join "$(client 1)"; else start_node "$leader"; fi
  sleep 3
done
