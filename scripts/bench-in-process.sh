#!/usr/bin/env bash
# The driver's own speed, side by side with openraft's: 3 nodes in one
# process, in-memory log, in-process network, N clients each awaiting its
# write's application before the next (examples/bench_in_process.rs), with
# the system allocator and with mimalloc; then, if OPENRAFT points at an
# openraft checkout, its `benchmarks/minimal` (same shape: empty requests,
# a state machine with no data) on the same machine, alternating, ROUNDS
# times.
#
# Usage: scripts/bench-in-process.sh [SECS] [ROUNDS]
#   OPENRAFT=/path/to/openraft scripts/bench-in-process.sh 3 3
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
rounds=${2:-3}
out=$(mktemp -d /tmp/bench-in-process.XXXXXX)
trap 'rm -rf "$out"' EXIT

cargo build --release -q -p examples --example bench_in_process
cp target/release/examples/bench_in_process "$out/ours-system"
cargo build --release -q -p examples --example bench_in_process --features mimalloc
cp target/release/examples/bench_in_process "$out/ours-mimalloc"

openraft=""
if [ -n "${OPENRAFT:-}" ]; then
  # Its own toolchain file asks for a nightly; the stable one builds it.
  (cd "$OPENRAFT/benchmarks/minimal" &&
    CARGO_TARGET_DIR="$out/openraft-target" RUSTUP_TOOLCHAIN="${RUSTUP_TOOLCHAIN:-1.95.0}" \
      cargo build --release -q --bin bench)
  openraft="$out/openraft-target/release/bench"
fi

for r in $(seq 1 "$rounds"); do
  echo "== round $r"
  for alloc in system mimalloc; do
    echo "-- raft-core ($alloc)"
    "$out/ours-$alloc" "$secs" 1,64,256,4096 | tail -4
  done
  if [ -n "$openraft" ]; then
    echo "-- openraft benchmarks/minimal (system allocator)"
    # -n sized for about SECS seconds at this machine's usual rates.
    for c in "1 $((secs * 20))k" "64 $((secs * 600))k" "256 $((secs * 1000))k" "4096 $((secs * 1400))k"; do
      set -- $c
      "$openraft" -c "$1" -n "$2" 2>&1 | grep 'ns/op' |
        sed -E 's/.*clients: ([0-9]+),.*time: ([0-9.]+)s, ns\/op: ([0-9]+), op\/ms: ([0-9]+).*/\1 clients: \4000 writes\/s (\3 ns\/op, \2 s)/'
    done
  fi
done
